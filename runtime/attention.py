"""The one attention function kvplan registers with transformers.

It is registered under the name ``"kvplan"`` with ``transformers.AttentionInterface`` (and transformers' own SDPA
mask builder under the same name with ``AttentionMaskInterface``) and switched on per model with
``model.set_attn_implementation("kvplan")`` by :func:`runtime.apply_plan`. The cache of the current forward pass
arrives as the keyword argument ``kvplan_cache`` (the decoder's pre-hook adds it; transformers forwards extra
keyword arguments down to the attention function). Layers the plan leaves alone — and every layer when no plan
cache is present — go through transformers' own ``sdpa_attention_forward`` with unchanged arguments, so a plan
with every method off is token-identical to stock generation.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from .layers import PlanLayer

ATTN_NAME = "kvplan"
CACHE_KWARG = "kvplan_cache"


def to_bool_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """transformers' 4D mask as bool ``[B|1, 1, Q, K]`` (True = may attend), or None (no padding, causal)."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def kvplan_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention for one layer, steered by the cache layer object the plan installed for it.

    Shapes: ``query [B, H_q, Q, d]``, ``key``/``value [B, H_kv, K, d]`` (what the cache layer returned),
    ``attention_mask`` bool ``[B|1, 1, Q, K]`` or None. Returns ``([B, Q, H_q, d], None)``.
    """
    cache = kwargs.pop(CACHE_KWARG, None)
    layer = _plan_layer(cache, getattr(module, "layer_idx", None))
    if layer is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if scaling is None:
        scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)

    def exact(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """transformers' own SDPA with this forward's arguments over ``keys``/``values`` (exact)."""
        out, _ = sdpa_attention_forward(
            module, query, keys, values, attention_mask, dropout=dropout, scaling=scaling,
            is_causal=is_causal, **kwargs,
        )
        return out

    return layer.attention(query, to_bool_mask(attention_mask), scaling, exact), None


def _plan_layer(cache, layer_idx: int | None) -> PlanLayer | None:
    """The plan layer that steers this layer's attention, or None (a layer the plan leaves alone: stock SDPA)."""
    if cache is None or layer_idx is None:
        return None
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    return layer if isinstance(layer, PlanLayer) else None


def register_attention(name: str, function) -> str:
    """Register ``function`` with transformers under ``name``, with SDPA's mask builder (idempotent)."""
    if AttentionInterface._global_mapping.get(name) is not function:
        AttentionInterface.register(name, function)
    sdpa_mask = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    if AttentionMaskInterface._global_mapping.get(name) is not sdpa_mask:
        AttentionMaskInterface.register(name, sdpa_mask)
    return name


def register() -> str:
    """Register kvplan's attention function under :data:`ATTN_NAME`; returns the name."""
    return register_attention(ATTN_NAME, kvplan_attention)
