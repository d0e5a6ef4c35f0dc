"""Owners' budgets between per-layer and per-head, measured: does a blend keep retrieval and gain top-1?

    python bench/budget_blend.py --plan artifacts/smollm2-135m-all-2x \
        --layer-plan artifacts/smollm2-135m-r0.5.safetensors --alphas 0,0.5,0.75,1 --data .scratch/eval/essays_a

Per (layer, KV head) the kept fraction of a blend is ``alpha * f_head + (1 - alpha) * f_layer``: ``f_head`` is the
joint plan's KV-Compress fraction (``min(1, head_keep * H_kv * layer_keep)``), ``f_layer`` the PyramidInfer-only
plan's layer fraction (every head alike). Both hold the same bytes, so every blend does too. The blends keep the
joint plan's other tensors (KCache's N, the sharing map) and are evaluated with ``runtime.evaluation.evaluate``
(lm + passkey, context first; ``--question-in-prefill`` for the other protocol).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import runtime
from runtime.evaluation import EvalSettings, evaluate, full_cache, plan_method
from runtime.plan import Plan


def blends(joint: Plan, layer_keep, alphas: list[float]) -> dict[str, Plan]:
    keep = joint.tensors["pyramidinfer.layer_keep"].double()
    shares = joint.tensors["kvcompress.head_keep"].double()
    heads = shares.shape[1]
    f_head = (shares * heads * keep[:, None]).clamp(max=1.0)
    f_layer = layer_keep.double()[:, None].expand_as(f_head)
    out = {}
    for alpha in alphas:
        f = alpha * f_head + (1 - alpha) * f_layer
        layer = f.mean(1)
        tensors = dict(joint.tensors)
        tensors["pyramidinfer.layer_keep"] = layer.float()
        tensors["kvcompress.head_keep"] = (f / (heads * layer[:, None])).float()
        plan = Plan(fingerprint=joint.fingerprint, methods=joint.methods, params=joint.params, tensors=tensors,
                    target_ratio=joint.target_ratio)
        plan.check()
        out[f"blend {alpha:g}"] = plan
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", required=True, help="a plan with PyramidInfer and KV-Compress (the per-head end)")
    p.add_argument("--layer-plan", required=True, help="a PyramidInfer plan at the same target (the per-layer end)")
    p.add_argument("--alphas", default="0,0.5,0.75,1", help="comma list of blend weights of the per-head end")
    p.add_argument("--data", required=True, help="evaluation text folder")
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--question-in-prefill", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    from calibrate.recipe import resolve_recipe
    from runtime.models import load_model

    joint = runtime.load_plan(args.plan)
    if not {"pyramidinfer", "kvcompress"} <= set(joint.methods):
        p.error(f"{args.plan} holds {joint.methods}: it needs pyramidinfer and kvcompress")
    layer_keep = runtime.load_plan(args.layer_plan).tensors["pyramidinfer.layer_keep"]
    loaded = load_model(resolve_recipe(joint.recipe.get("alias") or "smollm2-135m"), progress=False)
    plans = blends(joint, layer_keep, [float(a) for a in args.alphas.split(",")])
    for plan in plans.values():
        plan.validate(loaded.model)
    methods = [full_cache(), *(plan_method(plan, name=name) for name, plan in plans.items())]
    tasks = ("passkey",) if args.question_in_prefill else ("lm", "passkey")
    settings = EvalSettings(tasks=tasks, docs=args.docs, depths=[0.1, 0.3, 0.5, 0.7, 0.9], trials=2,
                            question_in_prefill=args.question_in_prefill)
    report = evaluate(loaded.model, loaded.tokenizer, methods, args.data, settings, progress=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print("| method | task | top-1 | KL | ppl ratio | passkeys |")
    print("|---|---|---|---|---|---|")
    for row in report["rows"]:
        if row["method"] == "full":
            continue
        if row["task"] == "lm":
            print(f"| {row['method']} | lm | {row['top1_agreement']:.3f} | {row['kl']:.4f} | {row['ratio']:.3f} | |")
        else:
            print(f"| {row['method']} | passkey | | | | {row['score']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
