"""Where a plan's decode step spends its time: wall time per call of each plan-layer method, per decode step.

    python bench/decode_profile.py --plan artifacts/smollm2-135m-all-8x --batch 1 --context 1024 --threads 1

Prefills a random-token prompt under the plan, runs a few warm-up decode steps, then times ``--steps`` greedy decode
steps while every method listed in ``TIMED`` (attention, cache update, scoring, compaction, KCache readout, ...) is
wrapped with a wall-clock timer; afterwards one more step runs under a dispatch counter that counts the aten
operations issued inside each plan layer's ``attention`` / ``update``. Prints the decode rate, then per timed
function: microseconds per call, calls per decode step and milliseconds per decode step (nested functions are
included in their callers' times). ``stock`` as the plan times transformers' own cache for comparison.

The timers add a little Python overhead per call; use the figures to see where the time goes, the interleaved
``bench/speed_memory.py`` / ``bench/decode_ab.py`` for rates. Timings only mean something on an otherwise idle
machine.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers import DynamicCache  # noqa: E402

import runtime  # noqa: E402
import runtime.kcache as kcache  # noqa: E402
import runtime.kvcompress as kvcompress  # noqa: E402
import runtime.pyramidinfer as pyramidinfer  # noqa: E402
from runtime.cache import cache_argument  # noqa: E402
from runtime.models import load_model, resolve_model_spec  # noqa: E402

#: (owner, attribute): the functions and methods timed. Module functions are looked up through their module at call
#: time, so patching the module attribute times every call.
TIMED = [
    (pyramidinfer.BudgetedLayer, "attention"), (pyramidinfer.BudgetedLayer, "update"),
    (pyramidinfer, "attend_step"), (pyramidinfer, "attend"),
    (pyramidinfer.BudgetedLayer, "_finish_decode_step"), (pyramidinfer.BudgetedLayer, "_maybe_compact"),
    (pyramidinfer.BudgetedLayer, "_compact"), (pyramidinfer.BudgetedLayer, "_schedule"),
    (pyramidinfer.DenseStorage, "append"), (pyramidinfer.DenseStorage, "gather"),
    (kvcompress.RaggedLayer, "attention"), (kvcompress.RaggedLayer, "update"), (kvcompress, "ragged_attend"),
    (kvcompress, "_topn_readout"), (kvcompress.RaggedLayer, "_finish_step"), (kvcompress.RaggedLayer, "_merge"),
    (kvcompress.RaggedLayer, "_tail_append"), (kcache.OffloadedLayer, "attention"), (kcache.ValueStore, "topn_output"),
]
COUNTED = {(pyramidinfer.BudgetedLayer, "attention"), (pyramidinfer.BudgetedLayer, "update"),
           (kvcompress.RaggedLayer, "attention"), (kvcompress.RaggedLayer, "update"),
           (kcache.OffloadedLayer, "attention")}


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while active (views included)."""

    def __init__(self, counts: collections.Counter, key: str):
        super().__init__()
        self.counts, self.key = counts, key

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[self.key] += 1
        return func(*args, **(kwargs or {}))


def instrument(seconds: dict, calls: collections.Counter, ops: collections.Counter, counting: list) -> None:
    for owner, name in TIMED:
        original = getattr(owner, name)
        key = f"{getattr(owner, '__name__', owner)}.{name}".replace("runtime.", "")
        is_method = isinstance(owner, type)
        counted = (owner, name) in COUNTED

        def make(original=original, key=key, is_method=is_method, counted=counted):
            def timed(*args, **kwargs):
                if counting[0]:
                    if counted:
                        with OpCounter(ops, key):
                            return original(*args, **kwargs)
                    return original(*args, **kwargs)
                start = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    seconds[key] += time.perf_counter() - start
                    calls[key] += 1
            return timed

        setattr(owner, name, make())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--plan", required=True, help="plan file or folder, or 'stock'")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=32, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.batch < 1 or args.context < 1 or args.steps < 1:
        p.error("--batch, --context and --steps must be positive")
    torch.set_num_threads(args.threads)
    seconds: dict = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    ops: collections.Counter = collections.Counter()
    counting = [False]
    instrument(seconds, calls, ops, counting)
    model = load_model(resolve_model_spec(args.model), progress=False).model
    plan = None if args.plan == "stock" else runtime.load_plan(args.plan)
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(100, model.config.vocab_size - 100, (args.batch, args.context), generator=generator)
    name = cache_argument(model)
    with torch.inference_mode(), (runtime.apply_plan(model, plan) if plan is not None else nullcontext()):
        cache = DynamicCache(config=model.config)
        out = model(ids, use_cache=True, logits_to_keep=1, **{name: cache})
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(args.warmup):
            out = model(token, use_cache=True, **{name: cache})
            token = out.logits[:, -1:].argmax(-1)
        seconds.clear()
        calls.clear()
        start = time.perf_counter()
        for _ in range(args.steps):
            out = model(token, use_cache=True, **{name: cache})
            token = out.logits[:, -1:].argmax(-1)
        elapsed = time.perf_counter() - start
        counting[0] = True
        with OpCounter(ops, "whole step"):
            model(token, use_cache=True, **{name: cache})
    kinds = collections.Counter(type(layer).__name__ for layer in cache.layers)
    print(f"{args.plan}: batch {args.batch} x context {args.context}, {args.threads} thread(s): "
          f"{args.batch * args.steps / elapsed:.2f} tok/s, {1000 * elapsed / args.steps:.1f} ms per decode step")
    print("layers: " + ", ".join(f"{n} {k}" for k, n in kinds.items()))
    print(f"aten ops per decode step (views included): {ops['whole step']}")
    print()
    print("| function | us per call | calls per step | ms per step | aten ops per step |")
    print("|---|---|---|---|---|")
    for key in sorted(seconds, key=lambda k: -seconds[k]):
        n = calls[key]
        print(f"| {key} | {1e6 * seconds[key] / n:.0f} | {n / args.steps:.2f} | {1000 * seconds[key] / args.steps:.2f} "
              f"| {ops.get(key, '')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
