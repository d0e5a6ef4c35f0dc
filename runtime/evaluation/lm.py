"""Language modelling on long text, scored where compression matters: after the compressed context.

Each window is ``context`` tokens (prefilled, so compressed) followed by ``continuation`` tokens fed one at a time
(teacher forcing). Over the continuation positions: perplexity of the true tokens, KL(full ‖ method) of the
next-token distributions, and top-1 agreement with the full cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .decoding import RunStats, teacher_forced
from .methods import Method


def agreement_and_kl(full: torch.Tensor, other: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per position: top-1 agreement (1.0/0.0) and KL(full ‖ other), from log-probabilities ``[..., V]``."""
    return {
        "agree": (full.argmax(-1) == other.argmax(-1)).float(),
        "kl": (full.exp() * (full - other)).sum(-1).clamp(min=0.0),
    }


def compare(full: torch.Tensor, other: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position ``[B, C]`` statistics from log-probabilities ``[B, C, V]`` and target ids ``[B, C]``."""
    return {
        **agreement_and_kl(full, other),
        "nll_full": -full.gather(-1, targets[..., None]).squeeze(-1),
        "nll_method": -other.gather(-1, targets[..., None]).squeeze(-1),
    }


def summarize(per_position: dict[str, torch.Tensor]) -> dict:
    ppl_full = math.exp(per_position["nll_full"].mean().item())
    ppl_method = math.exp(per_position["nll_method"].mean().item())
    return {
        "positions": int(per_position["agree"].numel()),
        "top1_agreement": per_position["agree"].mean().item(),
        "kl": per_position["kl"].mean().item(),
        "ppl_full": ppl_full,
        "ppl_method": ppl_method,
        "ppl_ratio": ppl_method / ppl_full,
    }


def run(
    model, methods: list[Method], windows: torch.Tensor, context: int, batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Score every method against the full cache (``methods[0]``) on ``windows [N, context + continuation]``.

    ``progress(n)`` is called after each method has run ``n`` more windows.

    Returns ``{method name: {"scores": ..., "stats": RunStats of the first batch}}``.
    """
    reference, others = methods[0], methods[1:]
    collected: dict[str, dict[str, list[torch.Tensor]]] = {m.name: {} for m in others}
    stats: dict[str, RunStats] = {}
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size]
        ctx, cont = batch[:, :context], batch[:, context:]
        full, stats_full = teacher_forced(model, reference, ctx, cont)
        stats.setdefault(reference.name, stats_full)
        if progress is not None:
            progress(batch.shape[0])
        for method in others:
            other, stats_method = teacher_forced(model, method, ctx, cont)
            stats.setdefault(method.name, stats_method)
            if progress is not None:
                progress(batch.shape[0])
            for key, value in compare(full, other, cont).items():
                collected[method.name].setdefault(key, []).append(value)
    results = {reference.name: {"scores": None, "stats": stats[reference.name]}}
    for method in others:
        merged = {k: torch.cat(v) for k, v in collected[method.name].items()}
        results[method.name] = {"scores": summarize(merged), "stats": stats[method.name]}
    return results
