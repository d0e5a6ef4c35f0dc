"""Same logits? This checkout's runtime vs another checkout's, on a prefill plus greedy decode steps.

    git worktree add /tmp/base <commit>
    python bench/logits_ab.py --other /tmp/base --plan artifacts/smollm2-135m-all-8x --batch 2 --context 1024 --steps 40

For each plan, both runtimes (the other imported under another name, as in ``bench/decode_ab.py``) prefill the same
``--batch`` rows of real text and decode ``--steps`` greedy tokens; prints the largest absolute logit difference,
whether the generated tokens are equal, and whether every logit is bit-identical. A refactor that claims "same
plans, same results" shows bit-identical logits here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

import runtime  # noqa: E402
from bench.decode_ab import DEFAULT_DATA, import_other, prompt  # noqa: E402
from runtime.cache import cache_argument  # noqa: E402
from runtime.models import load_model, resolve_model_spec  # noqa: E402


@torch.inference_mode()
def run(module, model, plan_path: str, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``([steps + 1, B, V] logits, [B, steps + 1] tokens)`` of a prefill and ``steps`` greedy steps."""
    plan = module.load_plan(plan_path)
    name = cache_argument(model)
    with module.apply_plan(model, plan):
        cache = DynamicCache(config=model.config)
        out = model(ids, use_cache=True, logits_to_keep=1, **{name: cache})
        logits, tokens = [out.logits[:, -1]], [out.logits[:, -1:].argmax(-1)]
        for _ in range(steps):
            out = model(tokens[-1], use_cache=True, **{name: cache})
            logits.append(out.logits[:, -1])
            tokens.append(out.logits[:, -1:].argmax(-1))
    return torch.stack(logits), torch.cat(tokens, dim=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--other", type=Path, required=True, help="the other checkout (its runtime/ is compared)")
    p.add_argument("--plan", action="append", required=True, help="plan file or folder (repeatable)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = p.parse_args(argv)
    if not (args.other / "runtime" / "__init__.py").is_file():
        p.error(f"--other {args.other}: no runtime/ package there")
    torch.set_num_threads(args.threads)
    other = import_other(args.other)
    loaded = load_model(resolve_model_spec(args.model), progress=False)
    ids = prompt(loaded.tokenizer, args.batch, args.context, args.data)
    print(f"| plan | max abs logit diff | tokens equal | logits bit-identical |\n|---|---|---|---|")
    for path in args.plan:
        mine, theirs = run(runtime, loaded.model, path, ids, args.steps), run(other, loaded.model, path, ids, args.steps)
        diff = (mine[0] - theirs[0]).abs().max().item()
        print(f"| {path} | {diff:.3g} | {torch.equal(mine[1], theirs[1])} | {torch.equal(mine[0], theirs[0])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
