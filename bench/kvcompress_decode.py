"""Decode tokens/s of plans vs their physical limit (stock decoding over the context the plan keeps), one process.

    python bench/kvcompress_decode.py --batch 8 --context 2048 PLAN [PLAN ...]

For each plan: the prompt (``--batch`` rows of ``--context`` essay tokens) is prefilled under the plan, and the
**limit** = the stock cache prefilled on the last ``L`` tokens, ``L`` = the plan's theoretical bytes ÷ stock bytes ×
context (what the plan keeps). Then ``--rounds`` interleaved rounds of ``--steps`` greedy decode steps from copies of
those caches; medians. Prints one markdown row per plan: limit tok/s, plan tok/s, plan ÷ limit, and the cache's
physical ÷ theoretical bytes after the prefill. Run it on a quiet machine (2 cores: nothing else running).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from transformers import DynamicCache  # noqa: E402

import runtime  # noqa: E402
from bench.decode_ab import decode, prompt  # noqa: E402
from runtime.cache import cache_argument  # noqa: E402
from runtime.models import load_model, resolve_model_spec  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("plans", nargs="+")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=REPO_ROOT / ".scratch" / "eval" / "essays_b",
                   help="folder of .txt files (bench/eval_texts.py makes the default)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model(resolve_model_spec(args.model), progress=False)
    model, tok = loaded.model, loaded.tokenizer
    name = cache_argument(model)
    ids = prompt(tok, args.batch, args.context, args.data)
    pre, plans = {}, {}
    with torch.inference_mode():
        for path in args.plans:
            plan = runtime.load_plan(path)
            label = Path(path).stem
            plans[label] = plan
            ratio = runtime.theoretical_bytes(plan, model.config, args.context, 1) / runtime.stock_bytes(
                model.config, args.context, 1)
            keep = int(round(ratio * args.context))
            cache = DynamicCache(config=model.config)
            with runtime.apply_plan(model, plan):
                out = model(ids, use_cache=True, logits_to_keep=1, **{name: cache})
            over = runtime.physical_bytes(cache) / runtime.theoretical_bytes(plan, model.config, args.context,
                                                                             args.batch)
            pre[label] = (cache, out.logits[:, -1].argmax(-1, keepdim=True), over)
            cache = DynamicCache(config=model.config)
            out = model(ids[:, -keep:], use_cache=True, logits_to_keep=1, **{name: cache})
            pre["limit@" + label] = (cache, out.logits[:, -1].argmax(-1, keepdim=True), keep)
            print(f"prefilled {label}", file=sys.stderr)
    times: dict[str, list[float]] = {k: [] for k in pre}
    keys = list(pre)
    for r in range(args.rounds):
        for label in keys[r % len(keys):] + keys[: r % len(keys)]:
            cache, first, _ = pre[label]
            cache = copy.deepcopy(cache)
            if label in plans:
                with runtime.apply_plan(model, plans[label]):
                    times[label].append(decode(model, cache, first, args.steps, name))
            else:
                times[label].append(decode(model, cache, first, args.steps, name))
    rate = {k: args.batch * args.steps / statistics.median(v) for k, v in times.items()}
    print("| plan | batch x context | limit context | limit tok/s | plan tok/s | plan / limit | phys/theor |")
    print("|---|---|---|---|---|---|---|")
    for label in plans:
        limit = "limit@" + label
        print(f"| {label} | {args.batch} x {args.context} | {pre[limit][2]} | {rate[limit]:.1f} | {rate[label]:.1f} | "
              f"**{rate[label] / rate[limit]:.3f}** | {pre[label][2]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
