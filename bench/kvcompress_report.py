"""One table from the KV-Compress comparison runs of ``bench/compare_kvpress.py`` (same harness, same scoring).

    python bench/kvcompress_report.py --essays artifacts/kvcompress_essays.json \
        --passkey-qip artifacts/kvcompress_passkey_qip.json --text encyclopedic=artifacts/kvcompress_encyclopedic.json \
        --text code=artifacts/kvcompress_code.json --markdown artifacts/kvcompress_report.md

Columns per method (rows: the full cache, kvplan plans, kvpress presses): physical KV bytes ÷ stock for the tokens
seen and ÷ the plan's theoretical bytes (lm run, essays), essays KL / top-1 / perplexity ratio, passkey retention
with the context compressed before the question and with the question in the prefill, and KL / top-1 on each
further ``--text`` run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _rows(path: Path) -> tuple[dict, dict]:
    data = json.loads(path.read_text(encoding="utf-8"))
    summary = {row["method"]: row for row in data["summary"]}
    harness = {(row["task"], row["method"]): row for row in data["harness_report"]["rows"]}
    return summary, harness


def _f(value, digits=3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _retention(row) -> str:
    if row is None or row.get("passkey_retention") is None:
        return "–"
    grid = row.get("passkey_grid") or {}
    return f"{row['passkey_retention']:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--essays", type=Path, required=True, help="lm + passkey run (context compressed first)")
    p.add_argument("--passkey-qip", type=Path, required=True, help="passkey run with --question-in-prefill")
    p.add_argument("--text", action="append", default=[], help="NAME=JSON of an lm run on other text (repeatable)")
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)
    essays, essays_h = _rows(args.essays)
    qip, _ = _rows(args.passkey_qip)
    texts = []
    for item in args.text:
        name, _, path = item.partition("=")
        texts.append((name, *_rows(Path(path))))
    head = ["method", "phys/stock", "phys/theor", "essays KL", "essays top-1", "ppl ratio",
            "passkeys, context first", "passkeys, question in prefill"]
    head += [f"{name} KL / top-1" for name, _, _ in texts]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, row in essays.items():
        lm = essays_h.get(("lm", method), {})
        cells = [method, _f(row.get("physical_over_stock")), _f(lm.get("physical_over_theoretical")),
                 _f(row.get("lm_kl"), 4), _f(row.get("lm_top1")), _f(row.get("lm_ppl_ratio")),
                 _retention(row), _retention(qip.get(method))]
        for _, summary, _ in texts:
            other = summary.get(method)
            cells.append("–" if other is None or other.get("lm_kl") is None
                         else f"{other['lm_kl']:.4f} / {other['lm_top1']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
