"""KVSharer on one model: does sharing *dissimilar* layers beat sharing similar or random ones? And what does it
cost alone and composed with PyramidInfer under one memory target?

    python bench/kvsharer_report.py --share-layers 0.25 --target-ratio 0.25 \
        --json artifacts/kvsharer_report.json --markdown artifacts/kvsharer_report.md

1. Calibrates KVSharer plans with the same number of shared layers and the pairs tried in ``dissimilar`` (the
   paper's order), ``similar`` and ``random`` order (same threshold, same trial bound), plus a composed plan
   (``pyramidinfer,kvsharer`` at ``--target-ratio``, split searched) and a PyramidInfer-only plan at the same ratio.
   Plans are written to ``--plans-dir``; calibration wall times are recorded.
2. Scores every plan against the full cache with the evaluation harness (``runtime.evaluation``: the same code
   as ``python -m runtime eval``): language modelling after a compressed context (KL, top-1, perplexity), passkey
   retrieval (exact match, retention), physical / theoretical / stock KV bytes and decode tokens/s.

Progress on stderr, the markdown report on stdout (and ``--markdown``), raw numbers in ``--json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.pyramidinfer_report import DEFAULT_DATA, log, write_outputs  # noqa: E402  (shared bench helpers)
from runtime.models import load_model  # noqa: E402
from calibrate.pipeline import calibrate_model  # noqa: E402
from calibrate.recipe import resolve_recipe  # noqa: E402
from runtime.evaluation.harness import EvalSettings, evaluate  # noqa: E402
from runtime.evaluation.methods import full_cache, plan_method  # noqa: E402
from runtime.plan import Plan  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="recipe alias (default: %(default)s)")
    p.add_argument("--share-layers", default="0.25", help="shared layers for the order ablation (count or fraction)")
    p.add_argument("--target-ratio", type=float, default=0.25, help="memory target of the composed plan")
    p.add_argument("--orders", default="dissimilar,similar,random,attention_error", help="pair orders to compare")
    p.add_argument("--threshold", type=float, default=None, help="acceptance threshold (default: the recipe's)")
    p.add_argument(
        "--ablation-threshold", type=float, default=0.0,
        help="threshold for the order ablation (default 0: every tried pair is accepted, so every order shares\n"
        "the same number of layers and only the ranking differs)",
    )
    p.add_argument("--max-trials", type=int, default=None, help="candidate bound (default: the recipe's)")
    p.add_argument("--no-composed", action="store_true", help="skip the PyramidInfer and composed plans")
    p.add_argument("--plans-dir", type=Path, default=REPO_ROOT / "artifacts", help="where plans are written")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="evaluation text (never used for calibration)")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--docs", type=int, default=4, help="lm windows")
    p.add_argument("--continuation", type=int, default=32, help="teacher-forced tokens after each context")
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9], help="passkey depths")
    p.add_argument("--trials", type=int, default=2, help="passkey cases per depth")
    p.add_argument("--reuse", action="store_true", help="load plans already in --plans-dir instead of recalibrating")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    return p.parse_args(argv)


def calibrate_variant(model, tokenizer, recipe, name: str, path: Path, reuse: bool = False, **overrides) -> dict:
    if reuse and path.exists():
        plan = Plan.load(path)
        log(f"reusing {path} for {name}")
        sources = plan.tensors.get("kvsharer.share_source")
        search = plan.provenance.get("kvsharer_search") or {}
        shared = [l for l, s in enumerate(sources.tolist()) if s != l] if sources is not None else None
        return {
            "name": name, "path": str(path), "calibration_seconds": plan.provenance.get("calibration_seconds"),
            "kvsharer": {"shared_layers": shared, "trials": search.get("trials")} if shared is not None else None,
            "split": plan.provenance.get("joint_split"), "pyramidinfer": None,
        }
    log(f"calibrating {name} ...")
    variant = recipe.with_overrides(**overrides)
    result = calibrate_model(model, tokenizer, variant, progress=False)
    result.plan.save(path)
    shared = result.report.get("kvsharer", {}).get("shared_layers")
    log(f"  {name}: {result.calibration_seconds:.1f} s, shared layers {shared}, split {result.report.get('split')}")
    return {
        "name": name, "path": str(path), "calibration_seconds": result.calibration_seconds,
        "kvsharer": result.report.get("kvsharer"), "split": result.report.get("split"),
        "pyramidinfer": result.report.get("pyramidinfer"),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    recipe = resolve_recipe(args.model)
    loaded = load_model(recipe, progress=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    alias = recipe.alias or "model"
    kvs_args: dict = {"share_layers": args.share_layers}
    if args.threshold is not None:
        kvs_args["threshold"] = args.threshold
    if args.max_trials is not None:
        kvs_args["max_trials"] = args.max_trials
    variants = []
    reuse = args.reuse
    for order in [o.strip() for o in args.orders.split(",") if o.strip()]:
        variants.append(calibrate_variant(
            model, tokenizer, recipe, f"kvsharer {order} (ranking only)",
            args.plans_dir / f"{alias}-kvsharer-{order}.safetensors", reuse, methods=["kvsharer"],
            method_args={"kvsharer": {**kvs_args, "order": order, "threshold": args.ablation_threshold}},
        ))
    for order in ("dissimilar", recipe.args_for("kvsharer").get("order", "dissimilar")):
        variants.append(calibrate_variant(
            model, tokenizer, recipe, f"kvsharer {order} (threshold)",
            args.plans_dir / f"{alias}-kvsharer-{order}-threshold.safetensors", reuse, methods=["kvsharer"],
            method_args={"kvsharer": {**kvs_args, "order": order}},
        ))
        if order == "dissimilar" and recipe.args_for("kvsharer").get("order", "dissimilar") == "dissimilar":
            break
    if not args.no_composed:
        ratio = args.target_ratio
        variants.append(calibrate_variant(
            model, tokenizer, recipe, f"pyramidinfer {ratio}",
            args.plans_dir / f"{alias}-pyramid-r{ratio}.safetensors", reuse,
            methods=["pyramidinfer"], target_ratio=ratio,
        ))
        composed_args = {k: v for k, v in kvs_args.items() if k != "share_layers"}
        variants.append(calibrate_variant(
            model, tokenizer, recipe, f"pyramidinfer+kvsharer {ratio}",
            args.plans_dir / f"{alias}-pyramid-kvsharer-r{ratio}.safetensors", reuse,
            methods=["pyramidinfer", "kvsharer"], target_ratio=ratio,
            method_args={"kvsharer": {**composed_args, "share_layers": "auto"}},
        ))
    methods = [full_cache()] + [plan_method(Plan.load(v["path"]), v["name"]) for v in variants]
    settings = EvalSettings(
        contexts=[args.context], tasks=("lm", "passkey"), docs=args.docs, continuation=args.continuation,
        depths=list(args.depths), trials=args.trials,
    )
    log(f"evaluating {len(methods)} methods at {args.context} tokens ...")
    start = time.perf_counter()
    torch.manual_seed(0)
    report = evaluate(model, tokenizer, methods, str(args.data), settings)
    log(f"evaluation took {time.perf_counter() - start:.0f} s")
    report["variants"] = variants
    markdown = render(report)
    print(markdown)
    write_outputs(markdown + "\n", report, args.markdown, args.json)
    return 0


def render(report: dict) -> str:
    rows = {(r["task"], r["method"]): r for r in report["rows"]}
    full_lm = rows.get(("lm", "full"))
    lines = [
        "| plan | shared layers | calib. s | top-1 | KL | ppl rise | passkey (full) | retention | KV phys/stock | decode tok/s vs full |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in report["variants"]:
        lm_row, pk = rows.get(("lm", v["name"]), {}), rows.get(("passkey", v["name"]), {})
        shared = (v.get("kvsharer") or {}).get("shared_layers", [])
        speed = (
            lm_row.get("decode_tok_s") / full_lm["decode_tok_s"]
            if lm_row.get("decode_tok_s") and full_lm and full_lm.get("decode_tok_s") else None
        )
        lines.append(
            f"| {v['name']} | {len(shared)} {shared if shared else ''} | {v['calibration_seconds']:.0f} "
            f"| {lm_row.get('top1_agreement', float('nan')):.3f} | {lm_row.get('kl', float('nan')):.4f} "
            f"| {100 * (lm_row.get('ratio', float('nan')) - 1):+.1f}% "
            f"| {pk.get('score', float('nan')):.2f} ({pk.get('full_score', float('nan')):.2f}) "
            f"| {pk.get('retention') if pk.get('retention') is None else round(pk['retention'], 2)} "
            f"| {lm_row.get('physical_over_stock', float('nan')):.3f} "
            f"| {speed:.2f}× |" if speed else
            f"| {v['name']} | {len(shared)} | {v['calibration_seconds']:.0f} | – | – | – | – | – | – | – |"
        )
    splits = [v for v in report["variants"] if v.get("split")]
    for v in splits:
        lines += ["", f"Joint split of {v['name']} (calibration continuation, KL / top-1):", "",
                  "| shared layers | owners' mean keep | kept ratio | KL | top-1 | chosen |", "|---|---|---|---|---|---|"]
        for row in v["split"]:
            lines.append(
                f"| {row['shared_layers']} | {row['mean_keep_of_owners']:.3f} | {row['kept_ratio']:.3f} "
                f"| {row['kl']:.4f} | {row['top1']:.3f} | {'yes' if row['chosen'] else ''} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
