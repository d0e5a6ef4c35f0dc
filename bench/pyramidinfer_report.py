"""Side-by-side report of PyramidInfer plans: fidelity on long text, cache memory and decode speed.

One model, one or more plans, one run::

    python -m bench.pyramidinfer_report --plan p50.safetensors --plan p125.safetensors \
        --json artifacts/pyramidinfer_report.json --markdown artifacts/pyramidinfer_report.md

Sections (each plan is compared with the model's stock, full ``DynamicCache``):

1. Fidelity (``--skip-fidelity`` to skip): ``--docs`` disjoint windows of ``--context + --continuation`` tokens
   of real text. The context is prefilled, then the continuation is fed one token at a time (teacher forcing).
   Compared per continuation position: top-1 agreement, KL(full || plan), perplexity of the true tokens.
2. Memory (with the fidelity run): bytes the cache physically holds after the first fidelity batch vs what the
   plan promises (``runtime.theoretical_bytes``) vs a stock cache (``runtime.stock_bytes``).
3. Speed (``--skip-speed`` to skip): greedy decode tokens/s at ``--speed-batch`` after a ``--context`` prefill,
   for the stock cache at the full context, each plan, and the stock cache at the plan's compressed length.
4. The plans themselves: target ratio, parameters and per-layer keep fractions.

The markdown report goes to stdout (and ``--markdown PATH``), progress to stderr, raw numbers to ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import runtime  # noqa: E402  (after the sys.path fix so the script runs from anywhere)
from runtime.evaluation.lm import compare as compare_logprobs  # noqa: E402  (one scoring code for bench and eval)
from runtime.evaluation.lm import summarize as summarize_positions  # noqa: E402
from transformers import DynamicCache  # noqa: E402

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "paul_graham_essays"


# ----- small helpers -------------------------------------------------------------------------------------------------
def log(message: str) -> None:
    """Progress line on stderr (stdout carries the report)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def fmt_bytes(n: int | float) -> str:
    """Human-readable bytes (MiB with two decimals)."""
    return f"{n / 2**20:,.2f} MiB"


def fmt(x: float, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table from a header and rows of printable cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(text: str, report: dict[str, Any], markdown: Path | None, json_path: Path | None) -> None:
    """Write a bench script's markdown report and raw JSON (either path may be None), creating folders."""
    if markdown:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(text)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2, default=str))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ----- model, plans, data --------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    name: str


def load_model(spec: str) -> LoadedModel:
    """Load ``spec``: a local HF model directory, or a kvplan recipe alias (through ``calibrate.models``)."""
    if Path(spec).is_dir():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(spec)
    else:
        from runtime.models import load_model as load_recipe_model
        from calibrate.recipe import resolve_recipe

        loaded = load_recipe_model(resolve_recipe(spec))
        model, tokenizer = loaded.model, loaded.tokenizer
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec)


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the forward's cache argument (``cache`` in recent transformers, ``past_key_values`` before)."""
    return runtime.cache.cache_argument(model)


def plan_label(path: str, plan: runtime.Plan) -> str:
    ratio = plan.target_ratio
    stem = Path(path).stem
    return f"{stem} (r={float(ratio):g})" if ratio is not None else stem


def compressed_ratio(plan: runtime.Plan, config, context: int, dtype: torch.dtype) -> float:
    """The plan's target ratio, or (without one) its theoretical/stock byte ratio at ``context`` tokens."""
    if plan.target_ratio is not None:
        return float(plan.target_ratio)
    return runtime.theoretical_bytes(plan, config, context, 1, dtype) / runtime.stock_bytes(config, context, 1, dtype)


def load_token_stream(data_dir: Path, tokenizer) -> torch.Tensor:
    """Every ``.txt`` file of ``data_dir`` (sorted by name), joined by blank lines, tokenized without special tokens."""
    files = sorted(p for p in data_dir.iterdir() if p.suffix == ".txt")
    if not files:
        raise SystemExit(f"no .txt files in {data_dir}")
    text = "\n\n".join(p.read_text(encoding="utf-8").strip() for p in files)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def fidelity_windows(tokens: torch.Tensor, docs: int, length: int) -> torch.Tensor:
    """``docs`` disjoint windows of ``length`` tokens, spread evenly over the stream: ``[docs, length]``."""
    stride = len(tokens) // docs
    if stride < length:
        raise SystemExit(f"the data has {len(tokens)} tokens: too few for {docs} disjoint windows of {length}")
    return torch.stack([tokens[i * stride : i * stride + length] for i in range(docs)])


def random_windows(tokens: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` windows of ``length`` tokens at seeded random offsets: ``[batch, length]``."""
    if len(tokens) < length:
        raise SystemExit(f"the data has {len(tokens)} tokens: too few for a window of {length}")
    starts = torch.randint(0, len(tokens) - length + 1, (batch,), generator=generator).tolist()
    return torch.stack([tokens[s : s + length] for s in starts])


@contextlib.contextmanager
def maybe_plan(model: torch.nn.Module, plan: runtime.Plan | None) -> Iterator[None]:
    """Apply ``plan`` for the duration of the block (nothing when ``plan`` is None: stock cache)."""
    if plan is None:
        yield
        return
    with runtime.apply_plan(model, plan):
        yield


# ----- 1 + 2: fidelity and memory ------------------------------------------------------------------------------------
@torch.inference_mode()
def teacher_forced_logprobs(
    model: torch.nn.Module, window: torch.Tensor, context: int, plan: runtime.Plan | None
) -> tuple[torch.Tensor, DynamicCache]:
    """Prefill ``window[:, :context]``, then feed every continuation token as its own decode step.

    Returns float32 log-probabilities ``[B, C, V]`` predicting the ``C`` continuation tokens (position 0 from the
    prefill's last logit, position ``i`` from the step that fed continuation token ``i - 1``) and the cache, which
    has seen the whole window (the last continuation token is fed too, its prediction is unused).
    """
    device = model_device(model)
    window = window.to(device)
    cache = DynamicCache(config=model.config)
    kw = cache_kwarg(model)
    steps = []
    with maybe_plan(model, plan):
        out = model(window[:, :context], use_cache=True, logits_to_keep=1, **{kw: cache})
        steps.append(out.logits[:, -1].float().log_softmax(-1))
        for pos in range(context, window.shape[1]):
            out = model(window[:, pos : pos + 1], use_cache=True, **{kw: cache})
            if pos + 1 < window.shape[1]:
                steps.append(out.logits[:, -1].float().log_softmax(-1))
    return torch.stack(steps, dim=1).cpu(), cache


def summarize_fidelity(per_pos: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Aggregate per-position statistics over docs and positions (the harness's summary plus per-doc detail)."""
    base = summarize_positions(per_pos)
    return {
        "positions": base["positions"],
        "top1_agreement": base["top1_agreement"],
        "mean_kl": base["kl"],
        "max_kl": per_pos["kl"].max().item(),
        "ppl_full": base["ppl_full"],
        "ppl_plan": base["ppl_method"],
        "ppl_rise": base["ppl_ratio"] - 1.0,
        "per_doc_agreement": per_pos["agree"].mean(1).tolist(),
        "per_doc_kl": per_pos["kl"].mean(1).tolist(),
        # first vs second half of the continuation: does the error grow while decoding?
        "kl_first_half": per_pos["kl"][:, : per_pos["kl"].shape[1] // 2].mean().item(),
        "kl_second_half": per_pos["kl"][:, per_pos["kl"].shape[1] // 2 :].mean().item(),
    }


def memory_record(
    cache: DynamicCache, plan: runtime.Plan | None, config, seq_len: int, batch: int, dtype: torch.dtype
) -> dict[str, Any]:
    """Physical vs theoretical vs stock bytes of a cache that has seen ``seq_len`` tokens per row."""
    physical = runtime.physical_bytes(cache)
    stock = runtime.stock_bytes(config, seq_len, batch, dtype)
    theoretical = runtime.theoretical_bytes(plan, config, seq_len, batch, dtype) if plan is not None else stock
    return {
        "seq_len": seq_len,
        "batch": batch,
        "physical_bytes": physical,
        "theoretical_bytes": theoretical,
        "stock_bytes": stock,
        "physical_over_theoretical": physical / theoretical,
        "physical_over_stock": physical / stock,
        "theoretical_over_stock": theoretical / stock,
        "kept_lengths": runtime.kept_lengths(cache),
    }


def run_fidelity(model, plans: list[tuple[str, runtime.Plan]], windows: torch.Tensor, args) -> dict[str, Any]:
    """Sections 1 and 2: teacher-forced fidelity of every plan vs the full cache, and cache memory."""
    dtype = model_dtype(model)
    per_plan: dict[str, dict[str, list[torch.Tensor]]] = {label: {} for label, _ in plans}
    memory: dict[str, Any] = {}
    seq_len = args.context + args.continuation
    for start in range(0, windows.shape[0], args.batch_size):
        batch = windows[start : start + args.batch_size]
        targets = batch[:, args.context :]
        log(f"fidelity batch {start // args.batch_size + 1}: full cache, {tuple(batch.shape)}")
        full, cache = teacher_forced_logprobs(model, batch, args.context, None)
        if start == 0:
            memory["full"] = memory_record(cache, None, model.config, seq_len, batch.shape[0], dtype)
        del cache
        for label, plan in plans:
            log(f"fidelity batch {start // args.batch_size + 1}: {label}")
            other, cache = teacher_forced_logprobs(model, batch, args.context, plan)
            if start == 0:
                memory[label] = memory_record(cache, plan, model.config, seq_len, batch.shape[0], dtype)
            del cache
            for key, value in compare_logprobs(full, other, targets).items():
                per_plan[label].setdefault(key, []).append(value)
            del other
        del full
    results = {label: summarize_fidelity({k: torch.cat(v) for k, v in stats.items()}) for label, stats in per_plan.items()}
    return {"fidelity": results, "memory": memory}


# ----- 3: speed ------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def time_decode(model, prompt: torch.Tensor, plan: runtime.Plan | None, steps: int) -> dict[str, float]:
    """Prefill ``prompt`` then run ``steps`` greedy decode steps; seconds of each phase (decode timed alone)."""
    device = model_device(model)
    prompt = prompt.to(device)
    cache = DynamicCache(config=model.config)
    kw = cache_kwarg(model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with maybe_plan(model, plan):
        sync()
        t0 = time.perf_counter()
        out = model(prompt, use_cache=True, logits_to_keep=1, **{kw: cache})
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        t1 = time.perf_counter()
        for _ in range(steps):
            out = model(token, use_cache=True, **{kw: cache})
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        t2 = time.perf_counter()
    decode_s = t2 - t1
    return {
        "prefill_s": t1 - t0,
        "decode_s": decode_s,
        "tokens_per_s": prompt.shape[0] * steps / decode_s,
        "kept_mean_after": statistics.fmean(runtime.kept_lengths(cache)),
        "kept_max_after": max(runtime.kept_lengths(cache)),
    }


@dataclass
class SpeedConfig:
    """One speed measurement: which cache and how long a prompt."""

    label: str
    plan: runtime.Plan | None
    length: int


def speed_configs(model, plans: list[tuple[str, runtime.Plan]], context: int) -> list[SpeedConfig]:
    """Stock at the full context, every plan, and stock at every plan's compressed length (deduplicated)."""
    dtype = model_dtype(model)
    configs = [SpeedConfig("stock@full", None, context)]
    configs += [SpeedConfig(label, plan, context) for label, plan in plans]
    lengths = []
    for _, plan in plans:
        length = max(1, round(context * compressed_ratio(plan, model.config, context, dtype)))
        if length not in lengths:
            lengths.append(length)
    configs += [SpeedConfig(f"stock@{length}", None, length) for length in lengths]
    return configs


def run_speed(model, plans: list[tuple[str, runtime.Plan]], tokens: torch.Tensor, args) -> dict[str, Any]:
    """Section 3: interleaved decode-speed measurements, ``--repeats`` rounds, medians and ratios."""
    configs = speed_configs(model, plans, args.context)
    generator = torch.Generator().manual_seed(args.seed + 1)
    log("speed warm-up")
    warm = random_windows(tokens, args.speed_batch, min(64, args.context), generator)
    for cfg in configs:
        time_decode(model, warm, cfg.plan, 2)
    samples: dict[str, list[dict[str, float]]] = {cfg.label: [] for cfg in configs}
    for rep in range(args.repeats):
        prompts = random_windows(tokens, args.speed_batch, args.context, generator)
        # rotate the order each round so slow drift of a shared machine does not favour one configuration
        order = configs[rep % len(configs) :] + configs[: rep % len(configs)]
        for cfg in order:
            sample = time_decode(model, prompts[:, -cfg.length :], cfg.plan, args.decode_steps)
            samples[cfg.label].append(sample)
            log(f"speed round {rep + 1}/{args.repeats} {cfg.label}: {sample['tokens_per_s']:.1f} tok/s, "
                f"prefill {sample['prefill_s']:.2f}s")
    return summarize_speed(configs, samples, plans, model, args)


def summarize_speed(configs, samples, plans, model, args) -> dict[str, Any]:
    """Medians per configuration and, per plan, its ratios to stock at the full and at the compressed length."""
    dtype = model_dtype(model)
    rows = {}
    for cfg in configs:
        runs = samples[cfg.label]
        rows[cfg.label] = {
            "length": cfg.length,
            "plan": cfg.plan is not None,
            "tokens_per_s": median([r["tokens_per_s"] for r in runs]),
            "prefill_s": median([r["prefill_s"] for r in runs]),
            "decode_s": median([r["decode_s"] for r in runs]),
            "kept_mean_after": runs[-1]["kept_mean_after"],
            "kept_max_after": runs[-1]["kept_max_after"],
            "samples": runs,
        }
    ratios = {}
    stock_full = rows["stock@full"]
    for label, plan in plans:
        length = max(1, round(args.context * compressed_ratio(plan, model.config, args.context, dtype)))
        stock_short = rows[f"stock@{length}"]
        ratios[label] = {
            "compressed_length": length,
            "tokens_per_s_vs_stock_full": rows[label]["tokens_per_s"] / stock_full["tokens_per_s"],
            "tokens_per_s_vs_stock_compressed": rows[label]["tokens_per_s"] / stock_short["tokens_per_s"],
            "prefill_s_vs_stock_full": rows[label]["prefill_s"] / stock_full["prefill_s"],
        }
    return {"configs": rows, "ratios": ratios}


# ----- report --------------------------------------------------------------------------------------------------------
def plan_info(path: str, plan: runtime.Plan) -> dict[str, Any]:
    keep = plan.tensors.get("pyramidinfer.layer_keep")
    return {
        "path": str(path),
        "methods": list(plan.methods),
        "params": plan.params,
        "target_ratio": plan.target_ratio,
        "layer_keep": keep.tolist() if keep is not None else None,
        "mean_layer_keep": keep.mean().item() if keep is not None else None,
    }


def render_plans(plans_json: dict[str, dict[str, Any]]) -> str:
    labels = list(plans_json)
    parts = ["## Plans", ""]
    parts.append(md_table(
        ["plan", "path", "target ratio", "mean layer keep", "params"],
        [[lab, p["path"], p["target_ratio"], fmt(p["mean_layer_keep"] or float("nan"), 3),
          json.dumps(p["params"].get("pyramidinfer", {}))] for lab, p in plans_json.items()],
    ))
    n_layers = max((len(p["layer_keep"] or []) for p in plans_json.values()), default=0)
    if n_layers:
        rows = [[layer] + [fmt(plans_json[lab]["layer_keep"][layer], 3) if plans_json[lab]["layer_keep"] else "-"
                           for lab in labels] for layer in range(n_layers)]
        parts += ["", "Per-layer keep fraction (`pyramidinfer.layer_keep`):", "", md_table(["layer"] + labels, rows)]
    return "\n".join(parts)


def render_fidelity(result: dict[str, Any], args) -> str:
    rows = [[lab, r["positions"], fmt(r["top1_agreement"]), fmt(r["mean_kl"]), fmt(r["kl_first_half"]),
             fmt(r["kl_second_half"]), fmt(r["ppl_full"], 3), fmt(r["ppl_plan"], 3), f"{100 * r['ppl_rise']:+.2f}%"]
            for lab, r in result["fidelity"].items()]
    head = (f"## Fidelity vs full cache\n\n{args.docs} docs x ({args.context} context + {args.continuation} "
            f"teacher-forced decode steps), batch {min(args.batch_size, args.docs)}.\n\n")
    return head + md_table(
        ["plan", "positions", "top-1 agree", "mean KL (nats)", "KL 1st half", "KL 2nd half", "ppl full",
         "ppl plan", "ppl rise"], rows)


def render_memory(result: dict[str, Any]) -> str:
    rows, kept = [], []
    for lab, m in result["memory"].items():
        rows.append([lab, m["batch"], m["seq_len"], fmt_bytes(m["physical_bytes"]), fmt_bytes(m["theoretical_bytes"]),
                     fmt_bytes(m["stock_bytes"]), fmt(m["physical_over_theoretical"], 3),
                     fmt(m["physical_over_stock"], 3), fmt(m["theoretical_over_stock"], 3)])
        kept.append(f"- {lab}: {m['kept_lengths']}")
    return ("## Cache memory after the first fidelity batch\n\n"
            + md_table(["cache", "batch", "tokens seen", "physical", "theoretical", "stock", "phys/theor",
                        "phys/stock", "theor/stock"], rows)
            + "\n\nKept tokens per layer (per row):\n\n" + "\n".join(kept))


def render_speed(result: dict[str, Any], args) -> str:
    rows = [[lab, c["length"], fmt(c["tokens_per_s"], 1), fmt(c["decode_s"], 3), fmt(c["prefill_s"], 2),
             fmt(c["kept_mean_after"], 1), c["kept_max_after"]] for lab, c in result["configs"].items()]
    ratio_rows = [[lab, r["compressed_length"], fmt(r["tokens_per_s_vs_stock_full"], 3),
                   fmt(r["tokens_per_s_vs_stock_compressed"], 3), fmt(r["prefill_s_vs_stock_full"], 3)]
                  for lab, r in result["ratios"].items()]
    head = (f"## Decode speed\n\nBatch {args.speed_batch}, {args.decode_steps} greedy decode steps after the "
            f"prefill, median of {args.repeats} interleaved rounds, {torch.get_num_threads()} threads.\n\n")
    return (head + md_table(["config", "prompt tokens", "decode tok/s", "decode s", "prefill s", "mean kept after",
                            "max kept after"],
                            rows)
            + "\n\n" + md_table(["plan", "compressed length", "tok/s plan/stock@full",
                                 "tok/s plan/stock@compressed", "prefill s plan/stock@full"], ratio_rows))


def render_report(report: dict[str, Any], args) -> str:
    env = report["environment"]
    parts = [
        "# PyramidInfer plan report",
        "",
        f"Model `{report['model']}` ({env['dtype']}, {env['device']}); torch {env['torch']}, "
        f"transformers {env['transformers']}; seed {args.seed}.",
        "",
        render_plans(report["plans"]),
    ]
    if "fidelity" in report:
        parts += ["", render_fidelity(report, args), "", render_memory(report)]
    if "speed" in report:
        parts += ["", render_speed(report["speed"], args)]
    return "\n".join(parts) + "\n"


# ----- CLI -----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Fidelity, memory and decode speed of PyramidInfer plans vs the full KV cache (markdown report).",
    )
    p.add_argument("--model", default="smollm2-135m", help="recipe alias or local HF model directory")
    p.add_argument("--plan", action="append", required=True, help="plan file (repeatable)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of .txt files (default: %(default)s)")
    p.add_argument("--context", type=int, default=2048, help="prefill tokens")
    p.add_argument("--continuation", type=int, default=64, help="teacher-forced decode steps per fidelity window")
    p.add_argument("--docs", type=int, default=8, help="fidelity windows")
    p.add_argument("--batch-size", type=int, default=8, help="fidelity batch size")
    p.add_argument("--speed-batch", type=int, default=8, help="decode-speed batch size")
    p.add_argument("--decode-steps", type=int, default=32, help="timed greedy decode steps")
    p.add_argument("--repeats", type=int, default=3, help="interleaved speed rounds")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-fidelity", action="store_true", help="skip fidelity and memory")
    p.add_argument("--skip-speed", action="store_true", help="skip decode speed")
    p.add_argument("--json", type=Path, default=None, help="write the raw results here")
    p.add_argument("--markdown", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)
    for name in ("context", "continuation", "docs", "batch_size", "speed_batch", "decode_steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def environment(model) -> dict[str, Any]:
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "dtype": str(model_dtype(model)).replace("torch.", ""),
        "device": str(model_device(model)),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "cpu_count": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    log(f"loading model {args.model}")
    loaded = load_model(args.model)
    model = loaded.model
    plans = []
    for path in args.plan:
        plan = runtime.load_plan(path)
        plan.validate(model)
        plans.append((plan_label(path, plan), plan))
    if len({label for label, _ in plans}) != len(plans):
        plans = [(f"{i}:{label}", plan) for i, (label, plan) in enumerate(plans)]
    report: dict[str, Any] = {
        "model": loaded.name,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": environment(model),
        "plans": {label: plan_info(path, plan) for (label, plan), path in zip(plans, args.plan)},
    }
    log(f"tokenizing {args.data}")
    tokens = load_token_stream(args.data, loaded.tokenizer)
    report["data_tokens"] = len(tokens)
    if not args.skip_fidelity:
        windows = fidelity_windows(tokens, args.docs, args.context + args.continuation)
        report.update(run_fidelity(model, plans, windows, args))
    if not args.skip_speed:
        report["speed"] = run_speed(model, plans, tokens, args)
    text = render_report(report, args)
    print(text)
    write_outputs(text, report, args.markdown, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
