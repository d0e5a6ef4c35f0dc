"""Per memory ratio: kvplan plans beside every kvpress press at the same bytes, and issue 12's targets checked.

    python bench/which_plan.py --context-first artifacts/compare_all.json \
        --question-in-prefill artifacts/compare_all_qip.json [more.json ...] [--markdown artifacts/which_plan.md]

Reads two outputs of ``bench/compare_kvpress.py`` (one harness, one data set; the second run with
``--question-in-prefill --tasks passkey``) and prints, for each keep ratio: every method's physical KV bytes ÷ a
stock cache for the tokens seen, lm top-1 agreement, KL(full ‖ method), perplexity ratio, and passkeys found in both
retrieval protocols; then, for the ``--methods all`` plan (the one enabling the most methods), the targets of issue 12:

- 2×: top-1 ≥ 0.97, perplexity rise ≤ 2 %, passkey retention 1.00;
- 4×: top-1 ≥ 0.95, retention ≥ 0.95;
- 8×: top-1 ≥ 0.90, perplexity rise ≤ 5 %, retention ≥ 0.90 (question in the prefill);
- at every ratio: KL below every kvpress press at that ratio and retention (both protocols) at least theirs.

Retention = passkeys found among the cases the full cache finds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TARGETS = {  # keep ratio: (top-1 at least, perplexity ratio at most, retention at least)
    0.5: (0.97, 1.02, 1.0),
    0.25: (0.95, None, 0.95),
    0.125: (0.90, 1.05, 0.90),
}


def _load(path: Path) -> dict[str, dict]:
    data = json.loads(path.read_text())
    return {row["method"]: row for row in data["summary"]}, data


def _f(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _hits(row: dict | None, cases: int) -> str:
    if row is None or row.get("passkey_accuracy") is None:
        return "–"
    return f"{round(row['passkey_accuracy'] * cases)}/{cases}"


def _merge(paths: list[Path], cases: int, context: int) -> dict[str, dict]:
    """Rows of several question-in-prefill runs (the same grid: depths x trials, context and seed); first wins."""
    merged: dict[str, dict] = {}
    for path in paths:
        rows, data = _load(path)
        args = data["args"]
        if not args.get("question_in_prefill"):
            raise SystemExit(f"{path} was not run with --question-in-prefill")
        if len(args["depths"]) * args["trials"] != cases or args["context"] != context:
            raise SystemExit(f"{path}: another passkey grid than the context-first run")
        for name, row in rows.items():
            merged.setdefault(name, row)
    return merged


def build(first_path: Path, qip_paths: list[Path]) -> str:
    first, first_data = _load(first_path)
    args = first_data["args"]
    cases = len(args["depths"]) * args["trials"]
    qip = _merge(qip_paths, cases, args["context"])
    env = first_data["environment"]
    lines = [
        f"SmolLM2-135M-Instruct, {env['dtype']} on {env['device']}, kvpress {env['kvpress']}, transformers "
        f"{env['transformers']}; data `{args['data']}`; lm: {args['docs']} windows × ({args['context']} context + "
        f"{args['continuation']} teacher-forced tokens); passkeys: {cases} cases at {args['context']} tokens, "
        "context compressed before the question (c-first) and question in the prefill (q-in-prefill).",
        "",
    ]
    verdicts = []
    ratios = sorted({r["keep_ratio"] for r in first.values() if r.get("keep_ratio") is not None}, reverse=True)
    full = next(r for r in first.values() if r["family"] == "full")
    # the full cache's perplexity is stored on the method rows (the ratio's denominator)
    full_ppl = next((r["lm_ppl_full"] for r in first.values() if r.get("lm_ppl_full") is not None), None)
    for keep in ratios:
        rows = [r for r in first.values() if r.get("keep_ratio") == keep]
        lines += [f"#### keep {keep:g} ({1 / keep:g}×)", "",
                  "| method | KV bytes ÷ stock | evicts | top-1 | KL | ppl ratio | passkeys c-first | passkeys q-in-prefill |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: (r["family"] != "kvplan", r.get("lm_kl") or 9)):
            q = qip.get(r["method"])
            lines.append(
                f"| {r['method']} | {_f(r.get('physical_over_stock'))} | {r['evicts']} | {_f(r.get('lm_top1'))} "
                f"| {_f(r.get('lm_kl'), 4)} | {_f(r.get('lm_ppl_ratio'))} | {_hits(r, cases)} | {_hits(q, cases)} |"
            )
        lines.append("")
        plans = [r for r in rows if r["family"] == "kvplan"]
        joint = max(plans, key=lambda r: r["method"].count("+")) if plans else None
        presses = [r for r in rows if r["family"] == "kvpress"]
        if joint is None or keep not in TARGETS:
            continue
        top1_min, ppl_max, ret_min = TARGETS[keep]
        q = qip.get(joint["method"], {})
        checks = [(f"top-1 {joint['lm_top1']:.3f} ≥ {top1_min}", joint["lm_top1"] >= top1_min)]
        if ppl_max is not None:
            checks.append((f"ppl ratio {joint['lm_ppl_ratio']:.3f} ≤ {ppl_max}", joint["lm_ppl_ratio"] <= ppl_max))
        ret_q = q.get("passkey_retention")
        checks.append((f"retention q-in-prefill {_f(ret_q, 2)} ≥ {ret_min}", ret_q is not None and ret_q >= ret_min))
        if presses:
            best_kl = min(presses, key=lambda r: r["lm_kl"])
            checks.append((f"KL {joint['lm_kl']:.4f} < best press {best_kl['method']} {best_kl['lm_kl']:.4f}",
                           joint["lm_kl"] < best_kl["lm_kl"]))
            for name, table in (("c-first", first), ("q-in-prefill", qip)):
                mine = table.get(joint["method"], {}).get("passkey_retention")
                theirs = max((table.get(p["method"], {}).get("passkey_retention") or 0.0) for p in presses)
                checks.append((f"retention {name} {_f(mine, 2)} ≥ best press {theirs:.2f}",
                               mine is not None and mine >= theirs))
        verdicts.append(f"- **{1 / keep:g}×** `{joint['method']}`: " + "; ".join(
            f"{text} {'✓' if ok else '✗ MISSED'}" for text, ok in checks))
    lines += ["#### Targets (issue 12)", "", *verdicts, "",
              f"Full cache: perplexity {_f(full_ppl)}, passkeys {_hits(full, cases)} c-first, "
              f"{_hits(qip.get(full['method']), cases)} q-in-prefill."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context-first", type=Path, required=True, help="compare_kvpress.py JSON (lm + passkey)")
    p.add_argument("--question-in-prefill", type=Path, required=True, nargs="+",
                   help="compare_kvpress.py JSON(s) run with --question-in-prefill and the same passkey grid (several: "
                   "their rows are merged, the first file's row wins for a method in two)")
    p.add_argument("--markdown", type=Path, help="also write the tables here")
    args = p.parse_args(argv)
    for path in (args.context_first, *args.question_in_prefill):
        if not path.is_file():
            p.error(f"no such file: {path}")
    text = build(args.context_first, args.question_in_prefill)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
