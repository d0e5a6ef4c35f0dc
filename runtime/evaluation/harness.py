"""``python -m runtime eval``: run the same model with the full cache and with each method; one table.

Tasks: ``lm`` (perplexity, KL, top-1 after a compressed context), ``passkey`` and ``needle`` (depth × length
grids, exact match, retention), ``continuation`` (greedy agreement), ``leval`` (L-Eval exact match / F1). Every row reports the method's score, the full
cache's score and their ratio, the KV bytes the method's cache physically held (vs theoretical vs stock) and decode
tokens/s. Seeded and deterministic (greedy decoding, fixed windows).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field

import torch

from ..cache import stock_bytes, stock_full_attention_bytes
from . import continuation, leval, lm, retrieval
from .methods import Method
from .texts import read_qa, read_texts, token_stream, windows

TASKS = ("lm", "passkey", "needle", "continuation", "leval")


@dataclass
class EvalSettings:
    """What to evaluate (defaults sized for a CPU: a few windows, a small grid)."""

    contexts: list[int] = field(default_factory=lambda: [2048])
    tasks: tuple[str, ...] = ("lm", "passkey")
    docs: int = 4
    continuation: int = 32
    batch_size: int = 4
    depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    trials: int = 2
    answer_tokens: int = 10
    seed: int = 0
    question_in_prefill: bool = False
    leval_tokens: int = 48


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _memory(method: Method, model, stats, batch: int) -> dict:
    dtype = _dtype(model)
    stock = stock_bytes(model.config, stats.seen, batch, dtype)
    theoretical = method.theoretical_bytes(model.config, stats.seen, batch, dtype) or stock
    return {
        "physical_bytes": stats.physical_bytes,
        "theoretical_bytes": theoretical,
        "stock_bytes": stock,
        "physical_over_theoretical": stats.physical_bytes / theoretical,
        "physical_over_stock": stats.physical_bytes / stock,
        "decode_tok_s": batch * stats.decode_steps / stats.decode_seconds if stats.decode_seconds > 0 else None,
        "store_bytes": stats.store_bytes,
        "values_read_fraction": stats.value_rows_read / stats.value_rows_held if stats.value_rows_held else None,
        **_full_attention_memory(model, stats, batch, dtype),
    }


def _full_attention_memory(model, stats, batch: int, dtype: torch.dtype) -> dict:
    """With sliding-window layers (their window is held whatever the plan): the full-attention layers' physical
    bytes and their stock bytes (a DynamicCache holding every token there), the part a plan compresses."""
    if stats.full_attention_bytes is None:
        return {}
    stock = stock_full_attention_bytes(model.config, stats.seen, batch, dtype)
    return {
        "full_attention_physical_bytes": stats.full_attention_bytes,
        "full_attention_stock_bytes": stock,
        "full_attention_physical_over_stock": stats.full_attention_bytes / stock,
    }


def _prepare(tokenizer, data: str | None, settings: EvalSettings) -> list[dict]:
    """Per context length, the inputs of every task (windows, cases, questions); data problems surface here,
    before the model runs."""
    texts = read_texts(data) if data else None
    stream = token_stream(tokenizer, texts) if texts else None
    work = []
    for context in settings.contexts:
        inputs: dict = {}
        if ("lm" in settings.tasks or "continuation" in settings.tasks) and stream is None:
            raise ValueError("the lm and continuation tasks need --data (a folder of .txt, a .txt or a .jsonl)")
        if "lm" in settings.tasks:
            inputs["lm"] = windows(stream, settings.docs, context + settings.continuation)
        for task in ("passkey", "needle"):
            if task in settings.tasks:
                inputs[task] = retrieval.build_cases(
                    tokenizer, "\n\n".join(texts) if texts else None, [context], settings.depths, settings.trials,
                    settings.seed, tasks=(task,),
                )
        if "continuation" in settings.tasks:
            inputs["continuation"] = windows(stream, settings.docs, context)
        if "leval" in settings.tasks:
            if not data or not str(data).endswith(".jsonl"):
                raise ValueError("the leval task needs --data pointing at an L-Eval .jsonl file")
            inputs["leval"] = read_qa(data)[: settings.docs]
        work.append({"context": context, "inputs": inputs})
    return work


def evaluate(
    model, tokenizer, methods: list[Method], data: str | None, settings: EvalSettings, *, progress: bool = False
) -> dict:
    """Run the tasks for every context length; ``methods[0]`` must be the full cache (the reference).

    ``progress``: a tqdm bar on stderr over every run of the model (methods × windows / cases / questions).
    """
    from tqdm import tqdm

    unknown = set(settings.tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; choose from {', '.join(TASKS)}")
    torch.manual_seed(settings.seed)
    work = _prepare(tokenizer, data, settings)
    total = len(methods) * sum(len(inputs) for item in work for inputs in item["inputs"].values())
    report: dict = {"settings": asdict(settings), "methods": [m.name for m in methods], "rows": []}
    with tqdm(total=total, desc="eval", unit="run", disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
        for item in work:
            context, inputs = item["context"], item["inputs"]
            tick = bar.update

            def phase(task: str) -> None:
                bar.set_postfix_str(f"{task} @ {context} tokens", refresh=True)

            if "lm" in inputs:
                phase("lm")
                wins = inputs["lm"]
                batch = min(settings.batch_size, wins.shape[0])
                results = lm.run(model, methods, wins, context, settings.batch_size, progress=tick)
                for name, result in results.items():
                    method = next(m for m in methods if m.name == name)
                    scores = result["scores"]
                    row = {
                        "task": "lm", "context": context, "method": name,
                        **_memory(method, model, result["stats"], batch),
                    }
                    if scores is not None:
                        row.update(
                            score=scores["ppl_method"], full_score=scores["ppl_full"], ratio=scores["ppl_ratio"],
                            metric="perplexity", kl=scores["kl"], top1_agreement=scores["top1_agreement"],
                        )
                    report["rows"].append(row)
            for task in ("passkey", "needle"):
                if task not in inputs:
                    continue
                phase(task)
                results = retrieval.run(
                    model, tokenizer, methods, inputs[task], settings.answer_tokens, settings.question_in_prefill,
                    progress=tick,
                )
                full = results[methods[0].name]["accuracy"]
                for name, result in results.items():
                    report["rows"].append({
                        "task": task, "context": context, "method": name, "metric": "exact match",
                        "score": result["accuracy"], "full_score": full,
                        "ratio": result["accuracy"] / full if full else None,
                        "retention": result["retention"], "grid": result["grid"],
                    })
            if "continuation" in inputs:
                phase("continuation")
                results = continuation.run(model, methods, inputs["continuation"], settings.continuation, progress=tick)
                for name, result in results.items():
                    report["rows"].append({
                        "task": "continuation", "context": context, "method": name, "metric": "matching tokens",
                        "score": result["matching_fraction"], "full_score": 1.0, "ratio": result["matching_fraction"],
                        "first_divergence": result["first_divergence"], "decode_tok_s": result["decode_tok_s"],
                    })
            if "leval" in inputs:
                phase("leval")
                results = leval.run(
                    model, tokenizer, methods, inputs["leval"], context, settings.leval_tokens, progress=tick
                )
                full = results[methods[0].name]
                for name, value in results.items():
                    report["rows"].append({
                        "task": "leval", "context": context, "method": name, "metric": "EM/F1", "score": value,
                        "full_score": full, "ratio": value / full if full else None,
                    })
    return report


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render(report: dict) -> str:
    """Markdown table of the report's rows."""
    mib = 1024 * 1024
    lines = [
        "| task | context | method | metric | score | full cache | ratio | extra | KV physical MiB | phys/theor | phys/stock | decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        extra = ""
        if "kl" in row:
            extra = f"KL {row['kl']:.4f}, top-1 {row['top1_agreement']:.3f}"
            if row.get("full_attention_physical_over_stock") is not None:
                extra += f", full-attention layers phys/stock {row['full_attention_physical_over_stock']:.3f}"
            if row.get("store_bytes"):
                extra += (f", values read {row['values_read_fraction']:.3f}, "
                          f"value store {row['store_bytes'] / mib:.1f} MiB")
        elif "retention" in row and row["retention"] is not None:
            extra = f"retention {row['retention']:.3f}"
        elif "first_divergence" in row:
            extra = f"first divergence {row['first_divergence']:.1f}"
        physical = row.get("physical_bytes")
        lines.append(
            f"| {row['task']} | {row['context']} | {row['method']} | {row.get('metric', '')} | {_fmt(row.get('score'))} "
            f"| {_fmt(row.get('full_score'))} | {_fmt(row.get('ratio'))} | {extra} "
            f"| {_fmt(physical / mib if physical is not None else None, 1)} "
            f"| {_fmt(row.get('physical_over_theoretical'))} | {_fmt(row.get('physical_over_stock'))} "
            f"| {_fmt(row.get('decode_tok_s'), 1)} |"
        )
    return "\n".join(lines)
