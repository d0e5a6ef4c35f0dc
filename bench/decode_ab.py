"""Decode speed of this checkout's runtime vs another checkout's, interleaved in one process (A/B of a refactor).

    git worktree add /tmp/base <commit>
    python bench/decode_ab.py --other /tmp/base --plan artifacts/smollm2-135m-r0.25.safetensors --batch 8 --context 2048

The other checkout's ``runtime`` package is imported under another name (its modules import each other relatively),
so both versions run in the same process on the same model, prompt and thread pool. For each plan and version the
prompt is prefilled once; then, round after round, each (plan, version) — and the stock cache — decodes
``--steps`` greedy tokens from a deep copy of its prefilled cache, in a rotating order. Prints the median decode
tokens/s of each and the ratio this / other. Timings are only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

import runtime  # noqa: E402
from runtime.cache import cache_argument  # noqa: E402
from runtime.models import load_model, resolve_model_spec  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "paul_graham_essays"


def import_other(checkout: Path, name: str = "runtime_other"):
    """The ``runtime`` package of another checkout, imported as ``name``."""
    init = checkout / "runtime" / "__init__.py"
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def prompt(tokenizer, batch: int, context: int, data: Path) -> torch.Tensor:
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in sorted(data.glob("*.txt")))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    rows = [ids[i * context : (i + 1) * context] for i in range(batch)]
    return torch.tensor(rows)


def decode(model, cache, first: torch.Tensor, steps: int, name: str) -> float:
    """Seconds for ``steps`` greedy steps from ``cache`` (consumed)."""
    token = first
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(steps):
            out = model(token, use_cache=True, **{name: cache})
            token = out.logits[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--other", type=Path, required=True, help="the other checkout (its runtime/ is compared)")
    p.add_argument("--plan", action="append", required=True, help="plan file (repeatable; valid for both versions)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per measurement")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    other = import_other(args.other)
    loaded = load_model(resolve_model_spec(args.model), progress=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    name = cache_argument(model)
    ids = prompt(tokenizer, args.batch, args.context, args.data)
    versions = {"this": runtime, "other": other}
    prefilled = {}
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        out = model(ids, use_cache=True, logits_to_keep=1, **{name: cache})
        first = out.logits[:, -1].argmax(-1, keepdim=True)
        prefilled[("stock", "-")] = (cache, first)
        for path in args.plan:
            for label, module in versions.items():
                plan = module.load_plan(path)
                cache = DynamicCache(config=model.config)
                with module.apply_plan(model, plan):
                    out = model(ids, use_cache=True, logits_to_keep=1, **{name: cache})
                prefilled[(Path(path).stem, label)] = (cache, out.logits[:, -1].argmax(-1, keepdim=True), module, plan)
                print(f"prefilled {Path(path).stem} with {label}", file=sys.stderr)
    keys = list(prefilled)
    times: dict = {key: [] for key in keys}
    for r in range(args.rounds):
        order = keys[r % len(keys) :] + keys[: r % len(keys)]
        for key in order:
            entry = prefilled[key]
            cache = copy.deepcopy(entry[0])
            if key[0] == "stock":
                seconds = decode(model, cache, entry[1], args.steps, name)
            else:
                module, plan = entry[2], entry[3]
                with module.apply_plan(model, plan):
                    seconds = decode(model, cache, entry[1], args.steps, name)
            times[key].append(seconds)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    rate = {key: args.batch * args.steps / statistics.median(values) for key, values in times.items()}
    print(f"batch {args.batch} x context {args.context}, {args.steps} decode steps, medians of {args.rounds} rounds "
          f"(this = {ROOT}, other = {args.other})\n")
    print("| plan | stock tok/s | other tok/s | this tok/s | this / other | this / stock | other / stock |")
    print("|---|---|---|---|---|---|---|")
    stock = rate[("stock", "-")]
    for path in args.plan:
        stem = Path(path).stem
        a, b = rate[(stem, "other")], rate[(stem, "this")]
        print(f"| {stem} | {stock:.1f} | {a:.1f} | {b:.1f} | **{b / a:.3f}** | {b / stock:.2f} | {a / stock:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
