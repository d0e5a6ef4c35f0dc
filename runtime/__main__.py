"""``python -m runtime generate | eval``: generate with a plan and print what it saved; score it.

    python -m runtime generate --plan plan.safetensors            # model taken from the plan's recipe
    python -m runtime generate smollm2-135m --plan plan.safetensors --prompt-file doc.txt

Runs the same greedy generation twice — full cache, then the plan — and prints the plan's output, the KV bytes
the plan's cache physically holds vs the plan's theoretical bytes vs a stock cache, fidelity to the full cache
(top-1 agreement and KL along the full cache's own continuation, greedy agreement) and decode speed.
Exit codes: 0 success, 1 failure, 2 bad command line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_QUESTION = "Which of the tasks above is about {topic}? Answer with its number and one sentence."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime", description="Apply a kvplan plan inside generate.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate with and without a plan; print memory, fidelity and speed")
    g.add_argument("model", nargs="?", help="alias, HF repo id, model dir or .gguf (default: the plan's recipe)")
    g.add_argument("--plan", required=True, help="plan file or Hub repo id")
    g.add_argument("--prompt", help="prompt text")
    g.add_argument("--prompt-file", type=Path, help="read the prompt from this file")
    g.add_argument(
        "--context", type=int, default=2000,
        help="length in tokens of the built-in long prompt (used when no prompt is given; default 2000)",
    )
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--json", type=Path, help="also write the numbers as JSON here")
    g.add_argument("-q", "--quiet", action="store_true", help="only the report, no progress output")

    e = sub.add_parser(
        "eval", help="score a plan against the full cache: lm, passkey, needle, continuation",
        description="Run the same model with the full cache and with the plan; print one table (and --json).",
    )
    e.add_argument("model", nargs="?", help="alias, HF repo id, model dir or .gguf (default: the plan's recipe)")
    e.add_argument("--plan", help="plan file or Hub repo id (none: only the full cache)")
    e.add_argument("--data", help="folder of .txt files, one .txt file, or an L-Eval .jsonl (lm, continuation, filler)")
    e.add_argument("--context", type=int, nargs="+", default=[2048], help="context lengths in tokens (several allowed)")
    e.add_argument("--tasks", default="lm,passkey", help="comma list of lm,passkey,needle,continuation,leval")
    e.add_argument("--docs", type=int, default=4, help="text windows for lm / continuation; questions for leval")
    e.add_argument("--continuation", type=int, default=32, help="scored tokens after each context")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9], help="retrieval depths (0..1)")
    e.add_argument("--trials", type=int, default=2, help="retrieval cases per (length, depth)")
    e.add_argument(
        "--question-in-prefill", action="store_true",
        help="retrieval: prefill context and question together (as generate(prompt) does); default: the context "
        "is compressed before the question is seen (kvpress's protocol, query-agnostic)",
    )
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", type=Path, help="also write the report as JSON here")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    return p


def run_eval(args) -> dict:
    import runtime
    from runtime.evaluation import EvalSettings, evaluate, full_cache, plan_method

    plan = runtime.load_plan(args.plan) if args.plan else None
    loaded = _load(args, plan)
    methods = [full_cache()]
    if plan is not None:
        plan.validate(loaded.model)
        methods.append(plan_method(plan))
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    settings = EvalSettings(
        contexts=args.context, tasks=tasks, docs=args.docs, continuation=args.continuation,
        batch_size=args.batch_size, depths=args.depths, trials=args.trials, seed=args.seed,
        question_in_prefill=args.question_in_prefill,
    )
    report = evaluate(loaded.model, loaded.tokenizer, methods, args.data, settings)
    report["model"] = loaded.name_or_path
    return report


def _load(args, plan):
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
    return load_model(spec, progress=not args.quiet)


def _builtin_prompt(tokenizer, context: int) -> str:
    """A long chat prompt from the shipped self-instruct tasks, ending with a question about one of them."""
    from runtime.evaluation.texts import builtin_tasks

    lines, used = [], 0
    for i, text in enumerate(builtin_tasks()):
        line = f"{i + 1}. {' '.join(text.split())}"
        used += len(tokenizer(line, add_special_tokens=False).input_ids) + 1
        if used > context - 60:
            break
        lines.append(line)
    pick = lines[len(lines) // 3]
    topic = " ".join(pick.split(" ", 1)[1].split()[:6])
    body = "Here is a numbered list of tasks.\n\n" + "\n".join(lines) + "\n\n" + DEFAULT_QUESTION.format(topic=topic)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True)
    return body


def _decode_loop(model, ids, steps, cache):
    """Greedy decoding with a given cache; returns (tokens [B, steps], logits list, prefill s, decode s)."""
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
    from runtime.cache import cache_argument

    arg = {cache_argument(model): cache}
    with torch.inference_mode():
        out = model(ids, use_cache=True, logits_to_keep=1, **arg)
        logits = [out.logits[:, -1].float()]
        for t in range(forced.shape[1] - 1):
            out = model(forced[:, t : t + 1], use_cache=True, **arg)
            logits.append(out.logits[:, -1].float())
    return logits


def run_generate(args) -> dict:
    from transformers import DynamicCache

    import runtime

    plan = runtime.load_plan(args.plan)
    loaded = _load(args, plan)
    model, tokenizer = loaded.model, loaded.tokenizer
    plan.validate(model)
    if args.prompt_file:
        prompt = args.prompt_file.read_text(encoding="utf-8")
    elif args.prompt:
        prompt = args.prompt
    else:
        prompt = _builtin_prompt(tokenizer, args.context)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=not getattr(tokenizer, "chat_template", None)).input_ids
    ids = ids.to(next(model.parameters()).device)
    steps = args.max_new_tokens
    dtype = next(model.parameters()).dtype

    _decode_loop(model, ids[:, :32], 2, DynamicCache(config=model.config))  # warm-up: thread pools, allocator
    # two interleaved rounds (stock, plan, stock, plan); the faster of each counts (machines are noisy)
    full_prefill = full_decode = plan_prefill = plan_decode = math.inf
    for _ in range(2):
        full_tokens, full_logits, prefill, decode = _decode_loop(model, ids, steps, DynamicCache(config=model.config))
        full_prefill, full_decode = min(full_prefill, prefill), min(full_decode, decode)
        with runtime.apply_plan(model, plan):
            cache = DynamicCache(config=model.config)
            plan_tokens, _, prefill, decode = _decode_loop(model, ids, steps, cache)
        plan_prefill, plan_decode = min(plan_prefill, prefill), min(plan_decode, decode)
    stock_cache_bytes = runtime.stock_bytes(model.config, ids.shape[1] + steps - 1, 1, dtype)
    physical = runtime.physical_bytes(cache)
    with runtime.apply_plan(model, plan):
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
    return {
        "model": loaded.name_or_path,
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": steps,
        "plan_methods": list(plan.methods),
        "plan_target_ratio": plan.target_ratio,
        "plan_output": tokenizer.decode(plan_tokens[0], skip_special_tokens=True),
        "full_output": tokenizer.decode(full_tokens[0], skip_special_tokens=True),
        "kv_bytes": {"physical": physical, "theoretical": theoretical, "stock": stock_cache_bytes},
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
    print(f"model: {r['model']}   prompt: {r['prompt_tokens']} tokens   generated: {r['new_tokens']} tokens")
    print(f"plan: {', '.join(r['plan_methods']) or 'none'} (target ratio {r['plan_target_ratio']})")
    print(f"\nplan output: {r['plan_output']!r}")
    print(f"full output: {r['full_output']!r}\n")
    print("| measure | value |\n|---|---|")
    print(f"| KV bytes physical (plan cache) | {kv['physical'] / mib:.2f} MiB |")
    print(f"| KV bytes theoretical (plan) | {kv['theoretical'] / mib:.2f} MiB |")
    print(f"| KV bytes stock DynamicCache | {kv['stock'] / mib:.2f} MiB |")
    print(f"| physical / theoretical | {ratio['physical_over_theoretical']:.3f} |")
    print(f"| physical / stock | {ratio['physical_over_stock']:.3f} |")
    print(f"| top-1 agreement along the full cache's continuation | {fid['top1_agreement']:.3f} |")
    print(f"| mean KL(full ‖ plan), nats | {fid['mean_kl_nats']:.4f} |")
    print(f"| greedy tokens equal to full cache | {fid['greedy_matching_fraction']:.3f} (first divergence at {fid['greedy_first_divergence']}) |")
    print(f"| decode tok/s stock → plan (batch 1, best of 2) | {sp['stock_decode_tok_s']:.1f} → {sp['plan_decode_tok_s']:.1f} ({sp['decode_ratio']:.2f}×) |")
    print(f"| prefill s stock → plan | {sp['stock_prefill_s']:.2f} → {sp['plan_prefill_s']:.2f} |")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    from runtime.plan import PlanError

    if args.command == "generate":
        if args.prompt and args.prompt_file:
            print("error: give --prompt or --prompt-file, not both", file=sys.stderr)
            return EXIT_USAGE
        if args.max_new_tokens < 1:
            print("error: --max-new-tokens must be at least 1", file=sys.stderr)
            return EXIT_USAGE
    try:
        report = run_generate(args) if args.command == "generate" else run_eval(args)
    except (PlanError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.command == "generate":
        _print_report(report)
    else:
        from runtime.evaluation import render

        print(f"model: {report['model']}\n")
        print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
