"""KCache on a real model: fidelity, value rows read and bytes by store, alone and composed with other plans.

    python bench/kcache_eval.py --kcache artifacts/smollm2-135m-kcache.safetensors \
        --base artifacts/smollm2-135m-r0.25.safetensors --base artifacts/smollm2-135m-kvcompress-r0.25.safetensors \
        --data .scratch/eval/essays_b --context 2048 4096 \
        --json artifacts/kcache_eval.json --markdown artifacts/kcache_eval.md

Methods (``methods[0]`` is the full cache, the reference of every score): the KCache plan alone, then for every
``--base`` plan the plan itself and the plan with the KCache plan's ``kcache.topn`` added (KCache applies to what the
base plan keeps). Everything is scored by the project's own harness (``runtime.evaluation``):

- ``lm``: teacher-forced continuation after the context (every continuation token is a decode step, so KCache's
  top-N readout is what is measured): KL(full || method), top-1 agreement, perplexity ratio; the fraction of value
  rows the last decode step read (``runtime.cache.value_rows``: a KCache layer counts the rows it gathered, every
  other cache-owning layer all it holds); bytes with the model and in the value store (``runtime.store_bytes``);
- ``passkey``: exact-match retention, twice: the context compressed before the question is seen (kvpress's
  protocol) and the question in the prefill (``generate(prompt)``).

Decode tokens/s are printed as the harness measured them; they are only comparable on a quiet machine (run nothing
else at the same time) and on CPU the value store is the same memory as the model's, so no transfer is saved.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import runtime  # noqa: E402
from runtime.evaluation import EvalSettings, evaluate, full_cache, plan_method  # noqa: E402
from runtime.kcache import ESTIMATORS  # noqa: E402
from runtime.plan import Plan, PlanError  # noqa: E402


def compose(base: Plan, kcache: Plan) -> Plan:
    """``base`` with ``kcache``'s ``kcache.topn`` added (the same model; the base must not already have KCache)."""
    if "kcache" in base.methods:
        raise PlanError("the base plan already enables kcache")
    if base.fingerprint.get("weights_digest") != kcache.fingerprint.get("weights_digest"):
        raise PlanError("the base plan and the KCache plan were made for different weights")
    topn = kcache.tensors["kcache.topn"]
    error = {k: v for k, v in kcache.tensors.items() if k.startswith("kcache.")}
    methods = tuple(m for m in runtime.registry.METHODS if m in (*base.methods, "kcache"))
    params = {**base.params, "kcache": dict(kcache.params.get("kcache", {}))}
    plan = dataclasses.replace(base, methods=methods, params=params,
                               tensors={**base.tensors, **error, "kcache.topn": topn})
    plan.check()
    return plan


def _label(path: Path) -> str:
    return path.stem.replace("smollm2-135m-", "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="kvplan recipe alias (default: %(default)s)")
    p.add_argument("--kcache", type=Path, required=True, help="a plan with kcache.topn (e.g. --methods kcache)")
    p.add_argument("--base", type=Path, action="append", default=[], help="a plan to compose KCache with "
                   "(repeatable)")
    p.add_argument("--data", type=Path, required=True, help="evaluation text (folder of .txt)")
    p.add_argument("--context", type=int, nargs="+", default=[2048], help="context lengths (default: %(default)s)")
    p.add_argument("--tasks", default="lm,passkey", help="lm and/or passkey (default: %(default)s)")
    p.add_argument("--docs", type=int, default=4, help="lm windows per context (default: %(default)s)")
    p.add_argument("--continuation", type=int, default=32, help="teacher-forced tokens (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="lm batch (default: %(default)s)")
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9],
                   help="passkey depths (default: %(default)s)")
    p.add_argument("--trials", type=int, default=2, help="passkey cases per depth (default: %(default)s)")
    p.add_argument("--estimator", action="append", default=[], choices=ESTIMATORS,
                   help="also run the KCache plan (alone) with this estimator instead of its own (repeatable)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--json", type=Path, default=None, help="write the raw results here")
    p.add_argument("--markdown", type=Path, default=None, help="write the table here")
    args = p.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    if not set(tasks) <= {"lm", "passkey"}:
        p.error("--tasks takes lm and/or passkey")
    torch.set_num_threads(args.threads)

    from runtime.models import load_model
    from calibrate.recipe import resolve_recipe

    kc = runtime.load_plan(str(args.kcache))
    if "kcache" not in kc.methods:
        p.error(f"{args.kcache} does not enable kcache")
    methods = [full_cache(), plan_method(kc, f"kcache ({_label(args.kcache)})")]
    for estimator in args.estimator:
        other = dataclasses.replace(kc, params={**kc.params, "kcache": {**kc.params.get("kcache", {}),
                                                                          "estimator": estimator}})
        methods.append(plan_method(other, f"kcache ({_label(args.kcache)}, {estimator})"))
    for path in args.base:
        base = runtime.load_plan(str(path))
        methods.append(plan_method(base, _label(path)))
        methods.append(plan_method(compose(base, kc), f"{_label(path)} + kcache"))
    loaded = load_model(resolve_recipe(args.model), progress=True)
    model, tokenizer = loaded.model, loaded.tokenizer
    for method in methods[1:]:
        method.plan.validate(model)

    start = time.perf_counter()
    reports = {}
    lm_tasks = tuple(t for t in tasks if t == "lm")
    base_settings = dict(contexts=args.context, docs=args.docs, continuation=args.continuation,
                         batch_size=args.batch_size, depths=args.depths, trials=args.trials)
    if lm_tasks:
        settings = EvalSettings(tasks=lm_tasks, **base_settings)
        reports["lm"] = evaluate(model, tokenizer, methods, str(args.data), settings, progress=True)
    if "passkey" in tasks:
        for qip in (False, True):
            settings = EvalSettings(tasks=("passkey",), question_in_prefill=qip, **base_settings)
            key = "passkey_question_in_prefill" if qip else "passkey_context_first"
            reports[key] = evaluate(model, tokenizer, methods, str(args.data), settings, progress=True)
    seconds = time.perf_counter() - start

    summary = []
    for context in args.context:
        for method in methods:
            row = {"context": context, "method": method.name}
            for key, report in reports.items():
                for r in report["rows"]:
                    if r["context"] != context or r["method"] != method.name:
                        continue
                    if key == "lm":
                        row.update({k: r.get(k) for k in ("kl", "top1_agreement", "ratio", "physical_bytes",
                                                          "store_bytes", "physical_over_stock", "values_read_fraction",
                                                          "decode_tok_s")})
                    else:
                        row[key] = r.get("retention") if method.name != "full" else r.get("score")
            summary.append(row)
    result = {
        "command": " ".join(["python", "bench/kcache_eval.py", *(argv if argv is not None else sys.argv[1:])]),
        "seconds": round(seconds, 1), "torch": torch.__version__, "python": platform.python_version(),
        "summary": summary, "reports": reports,
    }
    table = render(summary)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    if args.markdown:
        args.markdown.write_text(f"`{result['command']}` ({seconds:.0f} s)\n\n{table}\n", encoding="utf-8")
    return 0


def _f(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def render(summary: list[dict]) -> str:
    mib = 1024 * 1024
    lines = [
        "| context | method | value rows read | KL | top-1 | ppl ratio | passkeys context-first | passkeys question "
        "in prefill | KV with model MiB | value store MiB | phys/stock | decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        physical, store = row.get("physical_bytes"), row.get("store_bytes") or 0
        model_side = None if physical is None else (physical - store) / mib
        lines.append(
            f"| {row['context']} | {row['method']} | {_f(row.get('values_read_fraction'))} | {_f(row.get('kl'), 4)} "
            f"| {_f(row.get('top1_agreement'))} | {_f(row.get('ratio'))} | {_f(row.get('passkey_context_first'), 2)} "
            f"| {_f(row.get('passkey_question_in_prefill'), 2)} | {_f(model_side, 1)} | {_f(store / mib, 1)} "
            f"| {_f(row.get('physical_over_stock'))} | {_f(row.get('decode_tok_s'), 1)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
