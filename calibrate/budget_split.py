"""One memory target, several methods: choose how much of it each method takes, by measured fidelity.

With ``--methods pyramidinfer,kvsharer --target-ratio R`` the kept KV fraction must be ``R`` in total. Sharing
``C`` layers frees ``C`` layers' caches outright; the PyramidInfer budgets of the layers that still own a cache then
make up the rest (``calibrate_layer_keep(..., sources=map)``). Which ``C`` is best depends on the model, so each
candidate split is built as a complete plan and scored through kvplan's own runtime on calibration windows: the
context is prefilled (and compressed), the next ``continuation`` tokens are fed as one chunk, and their next-token
distributions are compared with the full cache's (KL, top-1). The split with the lowest KL wins.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from runtime.apply import apply_plan
from runtime.cache import cache_argument
from runtime.evaluation.lm import agreement_and_kl
from runtime.plan import Plan

SPLIT_FRACTIONS = (0.125, 0.25, 0.375)  # shares of the full-attention layers tried as splits


def largest_split(num_full_layers: int) -> int:
    """The most layers any split shares (what the sharing search is asked to find)."""
    return int(num_full_layers * SPLIT_FRACTIONS[-1] + 0.5)


def split_candidates(num_full_layers: int, available: int) -> list[int]:
    """Shared-layer counts to try: none, 1, 2, 1/8, 1/4 and 3/8 of the full-attention layers, and every layer
    the search accepted — as far as it accepted them."""
    wanted = {0, 1, 2, available} | {int(num_full_layers * f + 0.5) for f in SPLIT_FRACTIONS}
    return sorted(c for c in wanted if c <= available)


class ContinuationFidelity:
    """KL(full ‖ plan) and top-1 agreement on the tokens that follow a compressed context.

    Windows are the first ``context + continuation`` tokens of the last ``num_windows`` calibration samples: the
    context is prefilled (compressed), the continuation fed as one chunk. The full model's log-probabilities are
    computed once.
    """

    def __init__(
        self, model, samples: Sequence[torch.Tensor], num_windows: int = 2, context: int = 1024,
        continuation: int = 64,
    ):
        self.model = model
        self.device = next(model.parameters()).device
        usable = [s for s in samples if s.numel() > 2 * continuation]
        if not usable:
            raise ValueError(f"calibration samples must be longer than {2 * continuation} tokens to score splits")
        self.windows = [s[: context + continuation].to(self.device)[None, :] for s in usable[-num_windows:]]
        self.continuation = continuation
        self.reference = []
        with torch.no_grad():
            for ids in self.windows:
                logits = self.model(ids, use_cache=False).logits[0, -continuation:]
                self.reference.append(torch.log_softmax(logits.float(), dim=-1))

    def score(self, plan: Plan) -> dict[str, float]:
        kl, agree, count = 0.0, 0.0, 0
        name = cache_argument(self.model)
        with apply_plan(self.model, plan), torch.no_grad():
            for ids, ref in zip(self.windows, self.reference):
                cache = DynamicCache(config=self.model.config)
                context, cont = ids[:, : -self.continuation], ids[:, -self.continuation :]
                self.model(context, logits_to_keep=1, **{name: cache})
                logits = self.model(cont, **{name: cache}).logits[0]
                stats = agreement_and_kl(ref, torch.log_softmax(logits.float(), dim=-1))
                kl += float(stats["kl"].sum())
                agree += float(stats["agree"].sum())
                count += ref.shape[0]
        return {"kl": kl / count, "top1": agree / count}


__all__ = ["split_candidates", "largest_split", "ContinuationFidelity"]
