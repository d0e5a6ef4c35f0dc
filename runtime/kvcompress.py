"""KV-Compress at run time: per-(layer, KV head) token budgets — the plan schema only, for now.

``kvcompress.head_keep`` float32 ``[L, H_kv]`` holds each KV head's share of its layer's budget. This runtime
cannot apply it yet (the ragged per-head storage comes with the KV-Compress issue): the method is registered with
no runtime hook, so ``Plan.load`` validates such a plan and ``runtime.apply_plan`` refuses it with a ``PlanError``
instead of silently applying the plan without it.
"""

from __future__ import annotations

import torch

from .schema import MethodSpec, TensorContext, TensorSpec


def _check_head_keep(values: torch.Tensor, context: TensorContext) -> str | None:
    """Non-negative; every layer gives some budget to at least one head."""
    if bool((values < 0).any()):
        return "values must be >= 0"
    if values.numel() and bool((values.sum(dim=1) <= 0).any()):
        return "each layer's row must sum to > 0"
    return None


METHOD = MethodSpec(
    name="kvcompress",
    description="KV-Compress: each KV head gets its own share of the layer's token budget",
    tensors=(
        TensorSpec("kvcompress.head_keep", torch.float32, ("L", "H_kv"), _check_head_keep,
                   "per-KV-head share of the layer budget"),
    ),
    configure=None,  # not applicable by this runtime yet: apply_plan refuses such plans
    calibration_step=None,
    calibration_order=2,
    card_column=("head keep (min–max)", "kvcompress.head_keep", lambda row: f"{min(row):.3f}–{max(row):.3f}"),
)

__all__ = ["METHOD"]
