"""Decode speed and device memory of plans vs the stock cache on a GPU, with random weights of a model's config.

    python bench/gpu_decode.py --config CONFIG_DIR --plan all-8x=artifacts/smollm2-135m-all-8x \
        --cells 1x1024 1x8192 8x8192 --dtype bfloat16 --json gpu.json --markdown gpu.md

``--config``: a folder holding the model's ``config.json`` (``--save-config DIR`` writes the recipe model's config
there, on a machine that has the weights). The model is built from it with random weights, so a GPU machine without
the weights can time the plans: the kept lengths and the work per decode step are the plan's; which tokens are
evicted differs from the real weights' (quality is not measured here). The plans were calibrated on the real weights:
the runtime warns that the weights differ and applies them (the structure matches).

One process, one model. For every cell (batch B x context C) and round, in rotating order: ``stock`` (transformers'
``DynamicCache`` on C random tokens), each plan (``runtime.apply_plan``, same prompt, the runtime's default chunked
prefill and row groups), and each plan's limit ``stock@L`` (stock on the last L = C x keep tokens of the prompt: a
plan cannot decode faster than stock over what it holds). Each measurement: the prefill (timed), 2 untimed decode
steps, then ``--steps`` greedy decode steps timed with the device synchronised (tokens/s = B x steps / seconds); the
peak device memory allocated above the loaded model (``torch.cuda.max_memory_allocated`` after a reset), and the
cache's bytes by device (``runtime.physical_bytes(cache, by_device=True)``: a KCache plan keeps its value rows in
CPU memory, pinned). Medians over ``--rounds``; ratios plan ÷ stock and plan ÷ limit from the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
import warnings
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import DynamicCache  # noqa: E402

import runtime  # noqa: E402
from bench.pyramidinfer_report import compressed_ratio  # noqa: E402
from bench.speed_memory import parse_cell, parse_plan_arg, plan_source_problem  # noqa: E402
from runtime.cache import cache_argument  # noqa: E402
from runtime.planfile import DEFAULT_FILENAME as PLAN_FILENAME  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_plan(text: str) -> tuple[str, Path]:
    """``[LABEL=]PATH`` (a plan file or folder) -> (label, plan file); the label defaults to the file or folder name."""
    arg = parse_plan_arg(text)
    problem = plan_source_problem(arg.path)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{arg.path}: {problem}")
    path = Path(arg.path)
    return arg.label or path.stem, path / PLAN_FILENAME if path.is_dir() else path


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_memory(device: torch.device) -> tuple[int, int]:
    """(allocated now, peak since the last reset) in bytes; (0, 0) off CUDA."""
    if device.type != "cuda":
        return 0, 0
    return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)


def cache_bytes(cache, plan) -> dict[str, int]:
    if plan is not None:
        return {str(k): int(v) for k, v in runtime.physical_bytes(cache, by_device=True).items()}
    total: dict[str, int] = {}
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            if isinstance(tensor, torch.Tensor):
                key = str(tensor.device)
                total[key] = total.get(key, 0) + tensor.numel() * tensor.element_size()
    return total


def measure(model, plan, ids: torch.Tensor, steps: int) -> dict:
    device = ids.device
    name = cache_argument(model)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base, _ = device_memory(device)
    with torch.inference_mode(), (runtime.apply_plan(model, plan) if plan is not None else nullcontext()):
        cache = DynamicCache(config=model.config)
        start = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1, **{name: cache})
        token = out.logits[:, -1:].argmax(-1)
        synchronize(device)
        prefill = time.perf_counter() - start
        for _ in range(2):
            out = model(token, use_cache=True, **{name: cache})
            token = out.logits[:, -1:].argmax(-1)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(token, use_cache=True, **{name: cache})
            token = out.logits[:, -1:].argmax(-1)
        synchronize(device)
        decode = time.perf_counter() - start
        _, peak = device_memory(device)
        kv = cache_bytes(cache, plan)
    del cache, out, token
    return {"prefill_s": prefill, "decode_tok_s": ids.shape[0] * steps / decode, "peak_above_model": peak - base,
            "kv_bytes": kv}


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def report(results: dict, args, device_name: str) -> str:
    lines = [f"Device: {device_name}; model config {args.config} (random weights), {args.dtype}; {args.steps} timed "
             f"decode steps, medians of {args.rounds} interleaved rounds; torch {torch.__version__}, transformers "
             f"{transformers.__version__}.", "",
             "| cell | config | keep | prefill s | decode tok/s | ÷ stock | ÷ limit | peak above model MiB | ÷ stock "
             "| KV MiB by device |", "|---|---|---|---|---|---|---|---|---|---|"]
    for cell, configs in results.items():
        stock = configs.get("stock")
        for label, r in configs.items():
            rate = r["decode_tok_s"]
            limit = configs.get(r["limit"]) if r.get("limit") else None
            vs_stock = "" if stock is None else f"{rate / stock['decode_tok_s']:.2f}"
            vs_limit = "" if limit is None else f"{rate / limit['decode_tok_s']:.2f}"
            peak_ratio = "" if stock is None else f"{r['peak_above_model'] / max(stock['peak_above_model'], 1):.2f}"
            kv = ", ".join(f"{k} {mib(v)}" for k, v in sorted(r["kv_bytes"].items()))
            lines.append(f"| {cell} | {label} | {r['keep']:.3f} | {r['prefill_s']:.3f} | {rate:.1f} | {vs_stock} | "
                         f"{vs_limit} | {mib(r['peak_above_model'])} | {peak_ratio} | {kv} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--config", type=Path, help="folder with the model's config.json (random weights are drawn)")
    p.add_argument("--save-config", type=Path, default=None, metavar="DIR",
                   help="write the config of --model (a recipe alias, loaded with its weights) to DIR and exit")
    p.add_argument("--model", default="smollm2-135m", help="recipe alias for --save-config (default: %(default)s)")
    p.add_argument("--plan", action="append", default=[], type=parse_plan, metavar="[LABEL=]PATH")
    p.add_argument("--cells", type=parse_cell, nargs="+", default=[(1, 1024), (8, 4096)], metavar="BxC")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args(argv)
    if args.save_config is not None:
        from runtime.models import load_model, resolve_model_spec
        model = load_model(resolve_model_spec(args.model), progress=False).model
        args.save_config.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(args.save_config)
        print(f"wrote {args.save_config / 'config.json'}")
        return 0
    if args.config is None or not (args.config / "config.json").is_file():
        p.error("--config must be a folder holding config.json (write one with --save-config)")
    if args.steps < 1 or args.rounds < 1:
        p.error("--steps and --rounds must be positive")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here (--device cpu to check the script itself)")
    dtype = DTYPES[args.dtype]
    config = transformers.AutoConfig.from_pretrained(args.config)
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    plans = []
    for label, path in args.plan:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random weights: "the model's weights differ" is expected
            plans.append((label, runtime.load_plan(str(path))))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{device_name}: {config.model_type}, {config.num_hidden_layers} layers, {args.dtype}; "
          f"plans {[label for label, _ in plans]}", flush=True)
    generator = torch.Generator().manual_seed(args.seed)
    results: dict = {}
    failures: dict = {}
    for batch, context in args.cells:
        cell = f"{batch}x{context}"
        ids = torch.randint(100, config.vocab_size - 100, (batch, context), generator=generator).to(device)
        configs = [("stock", None, ids, None, 1.0)]
        for label, plan in plans:
            keep = compressed_ratio(plan, config, context, dtype)
            length = max(1, round(context * keep))
            configs.append((label, plan, ids, f"stock@{length}", keep))
            if all(c[0] != f"stock@{length}" for c in configs):  # plans of one keep ratio share their limit
                configs.append((f"stock@{length}", None, ids[:, -length:], None, keep))
        runs: dict = {}
        errors: dict = {}
        for r in range(args.rounds):
            order = configs[r % len(configs):] + configs[: r % len(configs)]
            for label, plan, prompt, limit, keep in order:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        m = measure(model, plan, prompt, args.steps)
                    except torch.OutOfMemoryError:
                        m = None
                        errors.setdefault(label, "out of device memory")
                    except Exception as exc:  # noqa: BLE001 - report it, measure the rest
                        m = None
                        if label not in errors:
                            traceback.print_exc()
                        errors.setdefault(label, f"{type(exc).__name__}: {exc}")
                runs.setdefault(label, {"limit": limit, "keep": keep, "runs": []})["runs"].append(m)
            print(f"{cell}: round {r + 1}/{args.rounds} done", flush=True)
        cell_results = {}
        for label, entry in runs.items():
            done = [m for m in entry["runs"] if m is not None]
            if not done:
                print(f"{cell} {label}: failed: {errors.get(label)}", flush=True)
                failures.setdefault(cell, {})[label] = errors.get(label)
                continue
            cell_results[label] = {
                "limit": entry["limit"] if entry["limit"] in runs else None, "keep": entry["keep"],
                "prefill_s": statistics.median(m["prefill_s"] for m in done),
                "decode_tok_s": statistics.median(m["decode_tok_s"] for m in done),
                "peak_above_model": statistics.median(m["peak_above_model"] for m in done),
                "kv_bytes": done[-1]["kv_bytes"], "rounds": len(done),
            }
        results[cell] = cell_results
        partial = report({cell: cell_results}, args, device_name)
        print(partial, flush=True)
    text = report(results, args, device_name)
    if failures:
        text += "\nFailed: " + "; ".join(f"{cell} {label}: {why}" for cell, f in failures.items()
                                        for label, why in f.items()) + "\n"
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"device": device_name, "dtype": args.dtype, "steps": args.steps,
                                         "rounds": args.rounds, "torch": torch.__version__,
                                         "transformers": transformers.__version__, "cells": results,
                                         "failures": failures}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
