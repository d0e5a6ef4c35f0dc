"""``python -m runtime generate | eval | inspect``: generate with a plan and print what it saved; score it; show it.

    python -m runtime generate --plan plan.safetensors            # model taken from the plan's recipe
    python -m runtime generate smollm2-135m --plan plan.safetensors --prompt-file doc.txt
    python -m runtime eval --plan plan.safetensors --data essays/ --tasks lm,passkey --context 2048
    python -m runtime inspect plan.safetensors --png plan.png    # what the plan holds, no model loaded

``generate`` runs the same greedy generation twice — full cache, then the plan — and prints the plan's output, the
KV bytes the plan's cache physically holds vs the plan's theoretical bytes vs a stock cache, fidelity to the full
cache (top-1 agreement and KL along the full cache's own continuation, greedy agreement) and decode speed.
``eval`` scores the plan against the full cache on long-context tasks and prints one table. ``inspect`` prints what
a plan holds (model, methods, one row per layer, sharing map, theoretical KV bytes, provenance) and can draw it.

The report goes to stdout; progress (phases, bars) and errors go to stderr (``-q``: no progress). An error is one
line on stderr (``-v``: with its traceback). Exit codes: 0 success, 1 failure, 2 bad command line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

from runtime.cli import HelpFormatter

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_QUESTION = "Which of the tasks above is about {topic}? Answer with its number and one sentence."
# the eval tasks (runtime.evaluation.TASKS, checked by a test; spelled out here so that --help stays fast)
EVAL_TASKS = ("lm", "passkey", "needle", "continuation", "leval")

_KV_LEGEND = """\
- KV bytes physical: bytes of every tensor the {who} cache holds, bookkeeping included (kept positions and
  scores, decode slack); theoretical: the K/V bytes the plan says it keeps, no bookkeeping; stock: a
  transformers DynamicCache holding every token (the full cache)."""
GENERATE_LEGEND = _KV_LEGEND.format(who="plan's") + """
- top-1 agreement: how often the plan's argmax next token equals the full cache's, with both fed the full cache's
  own continuation (teacher-forced); KL(full ‖ plan) compares the two next-token distributions there.
- greedy tokens equal: the free-running greedy outputs of the full cache and of the plan, compared token by token
  (after a first difference the two continuations can drift apart)."""
EVAL_LEGEND = _KV_LEGEND.format(who="method's") + """
- score / full cache / ratio: the method's score, the full cache's, and method ÷ full (perplexity: lower is better).
- lm: perplexity of the text after the compressed context; top-1 agreement: the method's argmax next token equals
  the full cache's along the text (teacher-forced); KL(full ‖ method) in nats.
- passkey / needle: exact match; retention: the method's hits among the cases the full cache gets right.
- continuation: free-running greedy outputs compared token by token with the full cache's (fraction of matching
  tokens; extra: mean position of the first divergence).
- leval: exact match on option letters, token F1 otherwise."""
INSPECT_LEGEND = """\
- kept: fraction of the context a layer keeps (PyramidInfer's layer_keep, or the mean of KV-Compress's per-head
  fractions; 1 without either); tokens@N: tokens it holds per row and KV head after N tokens (0: a KVSharer layer
  that reads another layer's cache; sliding-window layers hold at most their window).
- head shares: each KV head's share of its layer's budget (KV-Compress; * keeps the whole context); top-N: value
  rows a KCache decode step reads per KV head (all: every row, the values stay with the model).
- KV bytes: the theoretical K/V bytes the runtime reports (no bookkeeping) vs a stock full cache, computed from the
  plan alone; KCache's values are moved to a second store (CPU memory), not removed: counted apart.
- exit codes: 0 success, 1 failure (e.g. the picture cannot be written), 2 bad input (missing file, not a plan,
  bad option)."""


CHUNK_HELP = (
    "under the plan, prefill a prompt longer than N tokens in chunks of N, compressed between chunks, and a batch "
    "of more than N tokens per chunk in groups of rows (0: one-shot prefill of the whole batch; default 'auto': "
    "runtime.chunking.DEFAULT_PREFILL_CHUNK_SIZE for a plan that changes the cache)"
)


def _chunk_size(text: str):
    """``--prefill-chunk-size``: ``auto`` or a token count >= 0 (0: off)."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of tokens, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("expected 'auto' or a number of tokens >= 0 (0: one-shot prefill)")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runtime",
        description="Apply a kvplan plan inside generate (generate), score it against the full cache (eval), or "
        "show what it holds (inspect).",
        formatter_class=HelpFormatter,
        epilog="'python -m runtime generate --help', 'python -m runtime eval --help' and 'python -m runtime inspect "
        "--help' list each command's options.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{generate,eval,inspect}")
    g = sub.add_parser(
        "generate", help="generate with and without a plan; print memory, fidelity and speed",
        description="Run the same greedy generation with the full cache and with the plan (best of two interleaved "
        "rounds each); print the plan's output, its KV bytes, its fidelity to the full cache and decode speed.",
        formatter_class=HelpFormatter, epilog="the report's terms:\n" + GENERATE_LEGEND,
    )
    g.add_argument("model", nargs="?", help="alias, HF repo id, model dir or .gguf (default: the plan's recipe)")
    g.add_argument("--plan", required=True, help="plan file or Hub repo id")
    g.add_argument(
        "--prompt", help="prompt text (default: a long built-in prompt of --context tokens: the shipped "
        "self-instruct tasks as a numbered list and a question about one of them)",
    )
    g.add_argument("--prompt-file", type=Path, help="read the prompt from this file")
    g.add_argument(
        "--no-chat-template", dest="chat_template", action="store_false",
        help="feed the prompt as plain text (by default every prompt, given or built in, is wrapped as a user turn "
        "in the tokenizer's chat template when the tokenizer has one)",
    )
    g.add_argument("--context", type=int, default=2000, help="length in tokens of the built-in prompt")
    g.add_argument("--max-new-tokens", type=int, default=64, help="greedy tokens generated in each run")
    g.add_argument("--prefill-chunk-size", type=_chunk_size, default="auto", metavar="N",
                   help=CHUNK_HELP)
    g.add_argument("--json", type=Path, help="also write the numbers as JSON here")
    g.add_argument("-q", "--quiet", action="store_true", help="only the report on stdout, no progress on stderr")
    g.add_argument("-v", "--verbose", action="store_true", help="print the traceback of an error")

    tasks = ",".join(EVAL_TASKS)
    e = sub.add_parser(
        "eval", help=f"score a plan against the full cache: {', '.join(EVAL_TASKS)}",
        description="Run the same model with the full cache and with the plan; print one table (and --json). "
        "A progress bar on stderr counts the runs (methods × windows or cases).",
        formatter_class=HelpFormatter, epilog="the table's terms:\n" + EVAL_LEGEND,
    )
    e.add_argument("model", nargs="?", help="alias, HF repo id, model dir or .gguf (default: the plan's recipe)")
    e.add_argument("--plan", help="plan file or Hub repo id (none: only the full cache)")
    e.add_argument(
        "--data", help="folder of .txt files, one .txt file, or an L-Eval .jsonl (lm, continuation and leval need "
        "it; passkey/needle use it as filler, else a built-in filler sentence)",
    )
    e.add_argument("--context", type=int, nargs="+", default=[2048], help="context lengths in tokens (several allowed)")
    e.add_argument("--tasks", default="lm,passkey", help=f"comma list of {tasks}")
    e.add_argument("--docs", type=int, default=4, help="text windows for lm / continuation; questions for leval")
    e.add_argument("--continuation", type=int, default=32, help="scored tokens after each context")
    e.add_argument("--batch-size", type=int, default=4, help="lm: text windows run together in one forward")
    e.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9], help="retrieval depths (0..1)")
    e.add_argument("--trials", type=int, default=2, help="retrieval cases per (length, depth)")
    e.add_argument(
        "--question-in-prefill", action="store_true",
        help="retrieval: prefill context and question together (as generate(prompt) does); default: the context "
        "is compressed before the question is seen (kvpress's protocol, query-agnostic)",
    )
    e.add_argument("--seed", type=int, default=0, help="seed of the retrieval keys and filler offsets")
    e.add_argument("--prefill-chunk-size", type=_chunk_size, default="auto", metavar="N", help=CHUNK_HELP)
    e.add_argument("--json", type=Path, help="also write the report as JSON here")
    e.add_argument("-q", "--quiet", action="store_true", help="only the table on stdout, no progress on stderr")
    e.add_argument("-v", "--verbose", action="store_true", help="print the traceback of an error")

    i = sub.add_parser(
        "inspect", help="show what a plan holds: model, methods, per-layer table, sharing, KV bytes, provenance",
        description="Print what a plan is for (model, methods, parameters), one row per layer for every method, the "
        "KVSharer sharing map, the theoretical KV bytes at --context and --batch against a stock cache, and the "
        "provenance; read from the plan alone (no model is loaded). --png draws it.",
        formatter_class=HelpFormatter, epilog="the report's terms:\n" + INSPECT_LEGEND,
    )
    i.add_argument("plan", help="plan file (or a folder holding plan.safetensors) or Hub repo id")
    i.add_argument("--revision", help="Hub branch, tag or commit when PLAN is a repo id")
    i.add_argument("--context", type=int, default=2048, help="tokens seen per row for the KV bytes")
    i.add_argument("--batch", type=int, default=1, help="rows for the KV bytes")
    i.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="K/V dtype for the bytes (default: the plan's: its weights digest, else its calibration dtype)")
    i.add_argument("--json", type=Path, help="also write the report as JSON here")
    i.add_argument("--png", type=Path, help="draw the plan into this PNG (needs matplotlib)")
    i.add_argument("-q", "--quiet", action="store_true", help="only the report on stdout, no progress on stderr")
    i.add_argument("-v", "--verbose", action="store_true", help="print the traceback of an error")
    return p


class _Phases:
    """Phase lines on stderr (``[  12.3 s] message``), nothing when quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.start = quiet, time.perf_counter()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.start:7.1f} s] {message}", file=sys.stderr, flush=True)


def _check_eval_args(args) -> str | None:
    """What is wrong with the eval command line (before anything is loaded), or None."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in EVAL_TASKS]
    if not tasks or unknown:
        return f"--tasks: unknown task(s) {unknown or [args.tasks]}; choose from {', '.join(EVAL_TASKS)}"
    if any(c < 1 for c in args.context):
        return "--context takes positive token counts"
    for name in ("docs", "continuation", "batch_size", "trials"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1"
    if any(not 0.0 <= d <= 1.0 for d in args.depths):
        return "--depths takes fractions between 0 and 1"
    needs_data = [t for t in tasks if t in ("lm", "continuation", "leval")]
    if needs_data and not args.data:
        return f"the {', '.join(needs_data)} task(s) need --data (a folder of .txt, a .txt or an L-Eval .jsonl)"
    return None


def run_eval(args, say: _Phases) -> dict:
    import runtime
    from runtime.evaluation import EvalSettings, evaluate, full_cache, plan_method

    plan = runtime.load_plan(args.plan) if args.plan else None
    loaded = _load(args, plan, say)
    methods = [full_cache()]
    if plan is not None:
        plan.validate(loaded.model)
        methods.append(plan_method(plan, prefill_chunk_size=args.prefill_chunk_size))
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    settings = EvalSettings(
        contexts=args.context, tasks=tasks, docs=args.docs, continuation=args.continuation,
        batch_size=args.batch_size, depths=args.depths, trials=args.trials, seed=args.seed,
        question_in_prefill=args.question_in_prefill,
    )
    say(f"evaluating {', '.join(tasks)} at context {', '.join(map(str, args.context))} with "
        f"{', '.join(m.name for m in methods)}")
    report = evaluate(loaded.model, loaded.tokenizer, methods, args.data, settings, progress=not args.quiet)
    report["model"] = loaded.name_or_path
    say("done")
    return report


def _load(args, plan, say: _Phases):
    """The model named on the command line, else the one the plan's recipe names (an alias or a model source)."""
    from runtime.models import ModelSpec, load_model, resolve_model_spec

    if args.model:
        spec = resolve_model_spec(args.model)
    elif plan is not None and plan.recipe.get("alias"):
        spec = resolve_model_spec(plan.recipe["alias"])
    elif plan is not None and plan.recipe.get("model"):
        spec = ModelSpec.from_mapping(plan.recipe)
    else:
        raise ValueError("name the model (alias, repo id, directory or .gguf), or pass a plan that names it")
    start = time.perf_counter()
    loaded = load_model(spec, progress=not args.quiet)
    convert = f", GGUF converted in {loaded.convert_seconds:.1f} s" if loaded.convert_seconds else ""
    say(f"loaded {spec.model} in {time.perf_counter() - start:.1f} s{convert}")
    return loaded


def _builtin_prompt(tokenizer, context: int) -> str:
    """A long prompt (plain text) from the shipped self-instruct tasks, ending with a question about one of them."""
    from runtime.evaluation.texts import builtin_tasks

    lines, used = [], 0
    for i, text in enumerate(builtin_tasks()):
        line = f"{i + 1}. {' '.join(text.split())}"
        used += len(tokenizer(line, add_special_tokens=False).input_ids) + 1
        if used > context - 60:
            break
        lines.append(line)
    if not lines:
        raise ValueError(f"--context {context} is too short for the built-in prompt; give at least 200 tokens")
    pick = lines[len(lines) // 3]
    topic = " ".join(pick.split(" ", 1)[1].split()[:6])
    return "Here is a numbered list of tasks.\n\n" + "\n".join(lines) + "\n\n" + DEFAULT_QUESTION.format(topic=topic)


def _prompt_ids(tokenizer, text: str, chat_template: bool):
    """``(input ids [1, N], whether the chat template was applied)``: the prompt as one user turn of the
    tokenizer's chat template when it has one and ``chat_template`` is set, else the plain text with the
    tokenizer's special tokens (BOS)."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        templated = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(templated, return_tensors="pt", add_special_tokens=False).input_ids, True
    return tokenizer(text, return_tensors="pt").input_ids, False


def _decode_loop(model, ids, steps, cache):
    """Greedy decoding with a given cache; returns (tokens [B, steps], logits list, prefill s, decode s)."""
    import torch

    from runtime.cache import cache_argument

    arg = {cache_argument(model): cache}
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1, **arg)
        prefill = time.perf_counter() - start
        logits = [out.logits[:, -1].float()]
        tokens = [logits[-1].argmax(-1)]
        start = time.perf_counter()
        for _ in range(steps - 1):
            out = model(tokens[-1][:, None], use_cache=True, **arg)
            logits.append(out.logits[:, -1].float())
            tokens.append(logits[-1].argmax(-1))
        decode = time.perf_counter() - start
    return torch.stack(tokens, 1), logits, prefill, decode


def _forced_logits(model, ids, forced, cache):
    """Logits of every step while feeding ``forced`` tokens (the full cache's continuation) through ``cache``."""
    import torch

    from runtime.cache import cache_argument

    arg = {cache_argument(model): cache}
    with torch.inference_mode():
        out = model(ids, use_cache=True, logits_to_keep=1, **arg)
        logits = [out.logits[:, -1].float()]
        for t in range(forced.shape[1] - 1):
            out = model(forced[:, t : t + 1], use_cache=True, **arg)
            logits.append(out.logits[:, -1].float())
    return logits


def run_generate(args, say: _Phases) -> dict:
    import torch
    from transformers import DynamicCache

    import runtime

    plan = runtime.load_plan(args.plan)
    loaded = _load(args, plan, say)
    model, tokenizer = loaded.model, loaded.tokenizer
    plan.validate(model)
    text, source = args.prompt_text, args.prompt_source
    if text is None:
        text = _builtin_prompt(tokenizer, args.context)
    ids, templated = _prompt_ids(tokenizer, text, args.chat_template)
    ids = ids.to(next(model.parameters()).device)
    if args.chat_template and not templated:
        how = "plain text (the tokenizer has no chat template)"
    else:
        how = "as a user turn of the chat template" if templated else "plain text (--no-chat-template)"
    what = f"built-in (the shipped self-instruct tasks and a question, --context {args.context})" if (
        args.prompt_text is None) else source
    say(f"prompt: {what}, {how}: {ids.shape[1]} tokens")
    steps = args.max_new_tokens
    dtype = next(model.parameters()).dtype

    say("warm-up (32 tokens, 2 steps)")
    _decode_loop(model, ids[:, :32], 2, DynamicCache(config=model.config))  # thread pools, allocator
    # two interleaved rounds (stock, plan, stock, plan); the faster of each counts (machines are noisy)
    full_prefill = full_decode = plan_prefill = plan_decode = math.inf
    work = f"prefill {ids.shape[1]} tokens + {steps} greedy tokens"
    for round_ in (1, 2):
        say(f"stock run {round_}/2: full cache, {work}")
        full_tokens, full_logits, prefill, decode = _decode_loop(model, ids, steps, DynamicCache(config=model.config))
        full_prefill, full_decode = min(full_prefill, prefill), min(full_decode, decode)
        say(f"plan run {round_}/2: {work}")
        with runtime.apply_plan(model, plan, prefill_chunk_size=args.prefill_chunk_size):
            cache = DynamicCache(config=model.config)
            plan_tokens, _, prefill, decode = _decode_loop(model, ids, steps, cache)
        plan_prefill, plan_decode = min(plan_prefill, prefill), min(plan_decode, decode)
    say(f"scoring: the plan fed the full cache's {steps} tokens (teacher-forced top-1 agreement and KL)")
    stock_cache_bytes = runtime.stock_bytes(model.config, ids.shape[1] + steps - 1, 1, dtype)
    physical = runtime.physical_bytes(cache)
    in_store = runtime.store_bytes(cache)
    rows_read, rows_held = runtime.value_rows(cache)
    with runtime.apply_plan(model, plan, prefill_chunk_size=args.prefill_chunk_size):
        forced = _forced_logits(model, ids, full_tokens, DynamicCache(config=model.config))
    seen = ids.shape[1] + steps - 1
    theoretical = runtime.theoretical_bytes(plan, model.config, seen, 1, dtype)
    agree = [int(f.argmax(-1).item() == p.argmax(-1).item()) for f, p in zip(full_logits, forced)]
    kl = [
        float(torch.sum(torch.softmax(f, -1) * (torch.log_softmax(f, -1) - torch.log_softmax(p, -1))))
        for f, p in zip(full_logits, forced)
    ]
    same = (full_tokens == plan_tokens)[0].tolist()
    first_div = same.index(False) if False in same else len(same)
    say("done")
    return {
        "model": loaded.name_or_path,
        "prompt_source": source,
        "chat_template": templated,
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": steps,
        "plan_methods": list(plan.methods),
        "plan_target_ratio": plan.target_ratio,
        "plan_output": tokenizer.decode(plan_tokens[0], skip_special_tokens=True),
        "full_output": tokenizer.decode(full_tokens[0], skip_special_tokens=True),
        "kv_bytes": {"physical": physical, "theoretical": theoretical, "stock": stock_cache_bytes,
                     "value_store": in_store},
        "value_rows_read_fraction": rows_read / rows_held if rows_held else None,
        "kv_ratio": {"physical_over_theoretical": physical / theoretical, "physical_over_stock": physical / stock_cache_bytes},
        "kept_per_layer": runtime.kept_lengths(cache),
        "fidelity": {
            "top1_agreement": sum(agree) / len(agree),
            "mean_kl_nats": sum(kl) / len(kl),
            "greedy_matching_fraction": sum(same) / len(same),
            "greedy_first_divergence": first_div,
        },
        "speed": {
            "stock_decode_tok_s": (steps - 1) / full_decode if steps > 1 else math.nan,
            "plan_decode_tok_s": (steps - 1) / plan_decode if steps > 1 else math.nan,
            "decode_ratio": full_decode / plan_decode if steps > 1 else math.nan,
            "stock_prefill_s": full_prefill,
            "plan_prefill_s": plan_prefill,
        },
    }


def _print_report(r: dict) -> None:
    kv, ratio, fid, sp = r["kv_bytes"], r["kv_ratio"], r["fidelity"], r["speed"]
    mib = 1024 * 1024
    template = "chat template" if r["chat_template"] else "plain text"
    print(f"model: {r['model']}   prompt: {r['prompt_tokens']} tokens ({r['prompt_source']}, {template})   "
          f"generated: {r['new_tokens']} tokens")
    print(f"plan: {', '.join(r['plan_methods']) or 'none'} (target ratio {r['plan_target_ratio']})")
    print(f"\nplan output: {r['plan_output']!r}")
    print(f"full output: {r['full_output']!r}\n")
    print("| measure | value |\n|---|---|")
    print(f"| KV bytes physical (plan cache) | {kv['physical'] / mib:.2f} MiB |")
    print(f"| KV bytes theoretical (plan) | {kv['theoretical'] / mib:.2f} MiB |")
    print(f"| KV bytes stock DynamicCache | {kv['stock'] / mib:.2f} MiB |")
    print(f"| physical / theoretical | {ratio['physical_over_theoretical']:.3f} |")
    print(f"| physical / stock | {ratio['physical_over_stock']:.3f} |")
    if kv.get("value_store"):
        print(f"| of which in the KCache value store (with the model: the rest) | {kv['value_store'] / mib:.2f} MiB |")
        print(f"| value rows the last decode step read / rows held | {r['value_rows_read_fraction']:.3f} |")
    print(f"| top-1 agreement along the full cache's continuation (teacher-forced) | {fid['top1_agreement']:.3f} |")
    print(f"| mean KL(full ‖ plan), nats | {fid['mean_kl_nats']:.4f} |")
    print(f"| greedy tokens equal to full cache (free-running) | {fid['greedy_matching_fraction']:.3f} "
          f"(first divergence at {fid['greedy_first_divergence']}) |")
    print(f"| decode tok/s stock → plan (batch 1, best of 2) | {sp['stock_decode_tok_s']:.1f} → "
          f"{sp['plan_decode_tok_s']:.1f} ({sp['decode_ratio']:.2f}×) |")
    print(f"| prefill s stock → plan | {sp['stock_prefill_s']:.2f} → {sp['plan_prefill_s']:.2f} |")
    print("\n" + GENERATE_LEGEND)


def _one_line(exc: BaseException) -> str:
    """The exception as one line: its message (whitespace collapsed), with its type when that says more."""
    message = " ".join(str(exc).split())
    if not message:
        return type(exc).__name__
    known: tuple[type[BaseException], ...] = (ValueError, OSError)
    try:
        from runtime import PlanError
        from runtime.models import ModelSourceError

        known += (PlanError, ModelSourceError)
    except Exception:  # the package itself failed to import: that is the error being reported
        pass
    return message if isinstance(exc, known) else f"{type(exc).__name__}: {message}"


def _is_plan_error(exc: BaseException) -> bool:
    """True for a plan that cannot be read (missing, not a plan, not on the Hub): bad input for ``inspect``."""
    from runtime import PlanError

    return isinstance(exc, PlanError)


def _quiet_libraries(verbose: bool) -> None:
    """Errors only from transformers, and from huggingface_hub unless ``verbose`` (its retry warnings on a
    failing download would otherwise bury the one error line)."""
    import transformers
    from huggingface_hub.utils import logging as hub_logging

    transformers.logging.set_verbosity_error()
    if not verbose:
        hub_logging.set_verbosity_error()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line on stderr (``warning: ...``), without the source line."""
    print(f"warning: {' '.join(str(message).split())}", file=sys.stderr if file is None else file)


def _check_inspect_args(args) -> str | None:
    """What is wrong with the inspect command line (before the plan is read), or None."""
    import importlib.util

    if args.context < 1:
        return f"--context must be a positive number of tokens, got {args.context}"
    if args.batch < 1:
        return f"--batch must be at least 1, got {args.batch}"
    if args.png is not None:
        if importlib.util.find_spec("matplotlib") is None:
            from runtime.inspect import MATPLOTLIB_HINT

            return f"--png: {MATPLOTLIB_HINT}"
        if not args.png.parent.is_dir():
            return f"the folder of --png ({args.png.parent}) does not exist"
    return None


def run_inspect(args, say: _Phases) -> dict:
    import runtime
    from runtime.inspect import describe, draw

    plan = runtime.load_plan(args.plan, revision=args.revision)
    report = {"source": args.plan, **describe(plan, args.context, args.batch, args.dtype)}
    if args.png is not None:
        draw(report, args.png)
        say(f"wrote {args.png}")
    return report


def _usage_error(args) -> str | None:
    """What is wrong with the command line (checked before anything is loaded), or None.

    For ``generate`` also reads the prompt: sets ``args.prompt_text`` (None: the built-in one) and
    ``args.prompt_source``.
    """
    if args.json is not None and not args.json.parent.is_dir():
        return f"the folder of --json ({args.json.parent}) does not exist"
    if args.command == "eval":
        return _check_eval_args(args)
    if args.command == "inspect":
        return _check_inspect_args(args)
    if args.prompt is not None and args.prompt_file:
        return "give --prompt or --prompt-file, not both"
    if args.max_new_tokens < 1:
        return "--max-new-tokens must be at least 1"
    if args.prompt_file:
        try:
            args.prompt_text = args.prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            return f"cannot read --prompt-file: {' '.join(str(exc).split())}"
        args.prompt_source = f"file {args.prompt_file}"
        if not args.prompt_text.strip():
            return f"--prompt-file {args.prompt_file} is empty"
    elif args.prompt is not None:
        args.prompt_text, args.prompt_source = args.prompt, "--prompt"
        if not args.prompt.strip():
            return "--prompt is empty; give some text, or leave --prompt out for the built-in prompt (--context tokens)"
    else:
        if args.context < 200:
            return "--context (the built-in prompt's length) must be at least 200 tokens"
        args.prompt_text, args.prompt_source = None, "built-in"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = _usage_error(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    say = _Phases(args.quiet)
    with warnings.catch_warnings():  # restores the warning machinery when main() is called in-process
        warnings.showwarning = _show_warning
        try:
            _quiet_libraries(args.verbose)
            run = {"generate": run_generate, "eval": run_eval, "inspect": run_inspect}[args.command]
            report = run(args, say)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as exc:  # loading can raise nearly anything (missing package, hub, gguf, torch): one line
            if args.verbose:
                traceback.print_exc()
            print(f"error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_USAGE if args.command == "inspect" and _is_plan_error(exc) else EXIT_FAILED
    if args.command == "generate":
        _print_report(report)
    elif args.command == "inspect":
        from runtime.inspect import render_text

        print(render_text(report))
    else:
        from runtime.evaluation import render

        print(f"model: {report['model']}\n")
        print(render(report))
        print("\n" + EVAL_LEGEND)
    if args.json:
        try:
            args.json.write_text(json.dumps(report, indent=2, default=str))
        except OSError as exc:
            print(f"error: cannot write --json: {' '.join(str(exc).split())}", file=sys.stderr)
            return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
