"""Greedy continuation agreement: how long a method's own generation follows the full cache's."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .decoding import answer
from .methods import Method


def run(
    model, methods: list[Method], windows: torch.Tensor, steps: int, progress: Callable[[int], None] | None = None
) -> dict:
    """Greedy-continue each context window (``[N, context]``) for ``steps`` tokens with every method.

    Per method vs the full cache (``methods[0]``): the mean fraction of matching tokens and the mean position of
    the first divergence (``steps`` when none), plus decode tokens/s of the method. ``progress(1)`` is called
    after each window of each method.
    """
    generated: dict[str, list[torch.Tensor]] = {}
    results = {}
    for method in methods:
        seconds = 0.0
        generated[method.name] = []
        for w in windows:
            tokens, stats = answer(model, method, w[None, :], None, steps)
            seconds += stats.decode_seconds
            generated[method.name].append(tokens[0])
            if progress is not None:
                progress(1)
        matching, first = [], []
        for ref, mine in zip(generated[methods[0].name], generated[method.name]):
            same = (mine == ref).tolist()
            matching.append(sum(same) / len(same))
            first.append(same.index(False) if False in same else len(same))
        results[method.name] = {
            "matching_fraction": sum(matching) / len(matching),
            "first_divergence": sum(first) / len(first),
            "decode_tok_s": len(windows) * (steps - 1) / seconds if seconds > 0 else None,
        }
    return results
