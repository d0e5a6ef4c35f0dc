"""What chunked prefill costs in fidelity, and what it saves in peak memory (issue 14).

Fidelity: for each plan, the same plan with a one-shot prefill and with the prompt fed in chunks of N tokens
(``runtime.apply_plan(model, plan, prefill_chunk_size=N)``), scored by the eval harness (``runtime.evaluation``)
against the full cache on the same windows and cases: ``lm`` (next-token KL, top-1 agreement, perplexity ratio over
``--docs`` windows of ``--context`` tokens + 32 teacher-forced tokens) and ``passkey`` in both protocols (context
compressed before the question; question in the prefill, as a plain ``generate(prompt)``).

Memory (``--memory``): peak process RSS above the loaded model of ``model.generate`` on a ``--memory-context``-token
prompt (batch ``--memory-batch``, 4 new tokens), stock vs each plan one-shot vs chunked; every configuration in its
own subprocess (model loaded, warmed up, RSS high-water mark reset, then one generate). Timings are not reported.

    python bench/chunked_prefill.py --plan artifacts/smollm2-135m-all-8x/plan.safetensors \\
        --chunks 0 1024 512 256 128 --data .scratch/eval/essays_b \\
        --json artifacts/chunked_prefill.json --markdown artifacts/chunked_prefill.md
    python bench/chunked_prefill.py --memory --plan artifacts/smollm2-135m-all-8x/plan.safetensors \\
        --chunks 0 512 256 --json artifacts/chunked_prefill_memory.json

``--chunks 0`` is the one-shot prefill. ``--from-json`` re-renders a finished run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

import runtime  # noqa: E402
from bench.speed_memory import current_rss, proc_status, reset_peak  # noqa: E402

MIB = 2**20


def _chunk_name(chunk: int) -> str:
    return "one-shot" if chunk == 0 else f"chunk {chunk}"


def _plan_name(path: str) -> str:
    p = Path(path)
    return p.parent.name if p.name == "plan.safetensors" else p.stem


# ----- fidelity ------------------------------------------------------------------------------------------------
def run_fidelity(args) -> dict:
    from runtime.evaluation import EvalSettings, Method, evaluate, full_cache
    from runtime.models import load_model, resolve_model_spec

    torch.set_num_threads(args.threads)
    loaded = load_model(resolve_model_spec(args.model))
    model, tokenizer = loaded.model, loaded.tokenizer
    report = {"args": vars(args) | {"json": str(args.json), "markdown": str(args.markdown)}, "plans": {}}
    for path in args.plan:
        plan = runtime.load_plan(path)
        plan.validate(model)
        name = _plan_name(path)

        def method(chunk: int, plan=plan, name=name) -> Method:
            size = chunk or None
            return Method(name=f"{name} {_chunk_name(chunk)}",
                          applied=lambda m, size=size: runtime.apply_plan(m, plan, prefill_chunk_size=size), plan=plan)

        entry: dict = {"path": path}
        report["plans"][name] = entry
        passkey_chunks = args.passkey_chunks if args.passkey_chunks is not None else args.chunks
        stages = (("lm", False, ("lm",), args.chunks), ("context first", False, ("passkey",), passkey_chunks),
                  ("question in prefill", True, ("passkey",), passkey_chunks))
        for stage, qip, tasks, chunks in stages:
            if not chunks or not set(tasks) & set(args.tasks) or (stage != "lm" and stage not in args.protocols):
                continue
            methods = [full_cache()] + [method(c) for c in chunks]
            settings = EvalSettings(
                contexts=[args.context], tasks=tasks, docs=args.docs, continuation=32, batch_size=args.batch_size,
                depths=args.depths, trials=args.trials, seed=0, question_in_prefill=qip,
            )
            start = time.perf_counter()
            result = evaluate(model, tokenizer, methods, args.data, settings, progress=not args.quiet)
            print(f"{name}: {stage} done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            entry[stage] = result["rows"]
            write(report, args)
    return report


def fidelity_table(report: dict) -> str:
    lines = [
        "| plan | prefill | KL | top-1 | ppl ratio | passkey retention, context first | passkey retention, question in "
        "prefill | KV MiB after prefill+32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in report["plans"].items():
        rows_lm = entry.get("lm", [])
        rows_cf = entry.get("context first", [])
        rows_qip = entry.get("question in prefill", [])
        chunks = list(report["args"]["chunks"])
        chunks += [c for c in report["args"].get("passkey_chunks") or [] if c not in chunks]
        for chunk in chunks:
            label = f"{name} {_chunk_name(chunk)}"
            lm = next((r for r in rows_lm if r["task"] == "lm" and r["method"] == label), None)
            pk = next((r for r in rows_cf if r["task"] == "passkey" and r["method"] == label), None)
            pq = next((r for r in rows_qip if r["task"] == "passkey" and r["method"] == label), None)

            def ret(row):
                if row is None or row.get("retention") is None:
                    return "–"
                return f"{row['retention']:.2f} ({row['score']:.2f} raw)"

            cells = [
                name, _chunk_name(chunk),
                f"{lm['kl']:.4f}" if lm else "–", f"{lm['top1_agreement']:.3f}" if lm else "–",
                f"{lm['ratio']:.3f}" if lm else "–", ret(pk), ret(pq),
                f"{lm['physical_bytes'] / MIB:.1f}" if lm else "–",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----- memory ----------------------------------------------------------------------------------------------------
def memory_worker(spec: dict) -> dict:
    """One configuration, in this (fresh) process: peak RSS above the loaded, warmed-up model of one generate."""
    from runtime.evaluation.texts import read_texts, token_stream, windows
    from runtime.models import load_model, resolve_model_spec

    torch.set_num_threads(spec["threads"])
    loaded = load_model(resolve_model_spec(spec["model"]))
    model, tokenizer = loaded.model, loaded.tokenizer
    stream = token_stream(tokenizer, read_texts(spec["data"]))
    ids = windows(stream, spec["batch"], spec["context"])
    plan = runtime.load_plan(spec["plan"]) if spec["plan"] else None
    chunk = spec["chunk"] or None

    def generate(prompt):
        with torch.inference_mode():
            if plan is None:
                return model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            with runtime.apply_plan(model, plan, prefill_chunk_size=chunk):
                return model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)

    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    generate(ids[:, :64])  # warm-up: thread pools, allocator, lazy imports
    gc.collect()
    resettable = reset_peak()
    baseline = current_rss()
    out = generate(ids)
    peak = proc_status().get("VmHWM", 0)
    del out
    return {"resettable": resettable, "baseline_rss": baseline, "peak_rss": peak, "above_baseline": peak - baseline}


def run_memory(args) -> dict:
    configs = [] if args.skip_stock else [("stock", None, 0)]
    for path in args.plan:
        configs += [(f"{_plan_name(path)} {_chunk_name(c)}", path, c) for c in args.chunks]
    results = []
    for label, path, chunk in configs:
        spec = {"model": args.model, "plan": path, "chunk": chunk, "context": args.memory_context,
                "batch": args.memory_batch, "data": args.data, "threads": args.threads}
        proc = subprocess.run([sys.executable, __file__, "--memory-worker", json.dumps(spec)], capture_output=True,
                              text=True, env=os.environ.copy())
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker for {label} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["label"] = label
        results.append(result)
        print(f"{label}: peak above the loaded model {result['above_baseline'] / MIB:.1f} MiB", file=sys.stderr,
              flush=True)
    stock = args.stock_bytes if args.skip_stock else results[0]["above_baseline"]
    for r in results:
        r["over_stock"] = r["above_baseline"] / stock if stock else None
    return {"batch": args.memory_batch, "context": args.memory_context, "configs": results}


def memory_table(memory: dict) -> str:
    lines = [
        f"Peak process RSS above the loaded model, `generate` of {memory['batch']} × {memory['context']} tokens "
        "+ 4 new tokens, one subprocess per configuration:",
        "",
        "| configuration | baseline RSS MiB | peak RSS MiB | above baseline MiB | ÷ stock |",
        "|---|---|---|---|---|",
    ]
    for r in memory["configs"]:
        lines.append(f"| {r['label']} | {r['baseline_rss'] / MIB:,.1f} | {r['peak_rss'] / MIB:,.1f} | "
                     f"{r['above_baseline'] / MIB:,.1f} | {r['over_stock']:.3f} |")
    return "\n".join(lines)


# ----- output ----------------------------------------------------------------------------------------------------
def render(report: dict) -> str:
    parts = []
    if report.get("plans"):
        a = report["args"]
        parts.append(
            f"Fidelity vs the full cache, SmolLM2-135M-Instruct, data {a['data']}: lm over {a['docs']} windows of "
            f"{a['context']} tokens + 32 teacher-forced tokens; passkey retention (hits among the cases the full "
            f"cache gets right; raw accuracy in brackets) over {len(a['depths']) * a['trials']} cases at "
            f"{a['context']} tokens.\n"
        )
        parts.append(fidelity_table(report))
    if report.get("memory"):
        parts.append(memory_table(report["memory"]))
    return "\n\n".join(parts) + "\n"


def write(report: dict, args) -> None:
    text = render(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    if args.markdown:
        args.markdown.write_text(text)
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--plan", action="append", default=[], help="plan file (repeat for several)")
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 1024, 512, 256, 128],
                   help="prefill chunk sizes (0: one-shot)")
    p.add_argument("--passkey-chunks", type=int, nargs="*", help="chunk sizes for the passkey tasks (default: --chunks)")
    p.add_argument("--tasks", nargs="+", default=["lm", "passkey"], choices=("lm", "passkey"))
    p.add_argument("--protocols", nargs="+", default=["context first", "question in prefill"],
                   choices=("context first", "question in prefill"), help="passkey protocols to run")
    p.add_argument("--data", default=".scratch/eval/essays_b")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory", action="store_true", help="measure peak memory instead of fidelity")
    p.add_argument("--memory-context", type=int, default=8192)
    p.add_argument("--memory-batch", type=int, default=1)
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    p.add_argument("--skip-stock", action="store_true", help="memory: do not measure stock again ...")
    p.add_argument("--stock-bytes", type=int, help="... and divide by this stock peak (bytes above the baseline)")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--from-json", type=Path, help="re-render a finished run")
    p.add_argument("-q", "--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return 0
    if args.from_json:
        print(render(json.loads(args.from_json.read_text())), end="")
        return 0
    if not args.plan:
        print("error: give at least one --plan", file=sys.stderr)
        return 2
    if args.memory:
        report = {"args": vars(args) | {"json": str(args.json), "markdown": str(args.markdown)},
                  "memory": run_memory(args)}
        print(write(report, args), end="")
        return 0
    report = run_fidelity(args)
    print(write(report, args), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
