"""The plan-driven cache: plan layer objects inside transformers' own ``Cache`` container.

``install_plan_layers`` swaps the per-layer objects of a fresh ``Cache`` (the one ``generate`` creates) for the
kinds the plan asks for; everything else about the container (``generate``'s bookkeeping, beam reordering) stays
transformers'. ``physical_bytes`` counts every tensor the cache holds; ``theoretical_bytes`` is what the plan
says it should hold; ``stock_bytes`` what a ``DynamicCache`` would.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .kvsharer import SharedLayer, readers_of, sharing_map
from .plan import Plan
from .pyramidinfer import BudgetedLayer, PyramidParams, theoretical_kept


def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def cache_argument(model) -> str:
    """Name of the model forward's cache argument: ``cache`` in recent transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def layer_types(config) -> list[str]:
    """Attention type of every decoder layer (``full_attention`` unless the config says otherwise)."""
    cfg = _text_config(config)
    types = getattr(cfg, "layer_types", None)
    if types is None:
        kind = "sliding_attention" if getattr(cfg, "sliding_window", None) else "full_attention"
        types = [kind] * cfg.num_hidden_layers
    return list(types)


def pyramid_params(plan: Plan, config) -> list[PyramidParams | None]:
    """Per layer: the PyramidInfer settings, or None where the layer keeps everything it sees.

    Only full-attention layers are budgeted (sliding-window layers are already bounded by their window).
    """
    n_layers = _text_config(config).num_hidden_layers
    if "pyramidinfer" not in plan.methods:
        return [None] * n_layers
    keep = plan.tensors["pyramidinfer.layer_keep"].tolist()
    args = plan.params.get("pyramidinfer", {})
    kinds = layer_types(config)
    out: list[PyramidParams | None] = []
    for layer, fraction in enumerate(keep):
        if kinds[layer] != "full_attention" or fraction >= 1.0:
            out.append(None)
        else:
            out.append(
                PyramidParams(
                    keep=float(fraction),
                    window=int(args.get("window", 32)),
                    sink=int(args.get("sink", 4)),
                    slack=args.get("slack"),
                    pool=int(args.get("pool", 1)),
                    head_reduce=str(args.get("head_reduce", "mean")),
                )
            )
    return out


@dataclass(frozen=True)
class LayerSpec:
    """What the plan asks of one layer's cache.

    Attributes:
        source: the layer whose cache this layer reads (its own index when it owns its cache; KVSharer).
        pyramid: the PyramidInfer budget of the layer's own cache, or None when it keeps everything it sees
            (ignored for a sharing layer: its source's budget applies).
        readers: how many later layers read this layer's cache.
    """

    source: int
    pyramid: PyramidParams | None = None
    readers: int = 0


def layer_specs(plan: Plan, config) -> list[LayerSpec]:
    """Per layer, the cache the plan asks for: owned (full or budgeted, with its readers) or shared."""
    n_layers = _text_config(config).num_hidden_layers
    sources = sharing_map(plan, n_layers)
    readers = readers_of(sources)
    pyramid = pyramid_params(plan, config)
    return [
        LayerSpec(source=sources[l], pyramid=pyramid[l] if sources[l] == l else None, readers=readers[l])
        for l in range(n_layers)
    ]


def install_plan_layers(cache: Cache, specs: list[LayerSpec]) -> bool:
    """Swap a fresh cache's layers for plan layers; returns False (and changes nothing) if it already holds tokens.

    A cache that already holds tokens was filled without the plan; compressing it half-way would not match what
    the plan promises, so it is left alone.
    """
    layers = cache.layers
    if any(isinstance(layer, (BudgetedLayer, SharedLayer)) for layer in layers):
        return True
    if any(getattr(layer, "is_initialized", False) and _held(layer) > 0 for layer in layers):
        return False
    replicate = getattr(cache, "layer_class_to_replicate", None)
    while len(layers) < len(specs):
        layers.append(replicate() if replicate is not None else DynamicLayer())
    for idx, spec in enumerate(specs):
        if spec.source == idx and spec.pyramid is not None:
            layers[idx] = BudgetedLayer(spec.pyramid, readers=spec.readers)
    for idx, spec in enumerate(specs):  # sources first, so a sharing layer can point at its source's object
        if spec.source != idx:
            layers[idx] = SharedLayer(spec.source, layers[spec.source])
    return True


def _held(layer) -> int:
    keys = getattr(layer, "keys", None)
    return 0 if keys is None or keys.numel() == 0 else keys.shape[-2]


def physical_bytes(cache: Cache, by_device: bool = False) -> int | dict[str, int]:
    """Bytes of every tensor the cache holds (K, V and any bookkeeping), in total or per device."""
    totals: dict[str, int] = defaultdict(int)
    for layer in cache.layers:
        if isinstance(layer, SharedLayer):  # holds nothing of its own
            continue
        if isinstance(layer, BudgetedLayer):
            if layer.keys is not None:
                totals[str(layer.keys.device)] += layer.physical_bytes()
            continue
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None:
                totals[str(tensor.device)] += tensor.numel() * tensor.element_size()
    return dict(totals) if by_device else sum(totals.values())


def _bytes_per_token(config, dtype: torch.dtype) -> int:
    cfg = _text_config(config)
    n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * n_kv * head_dim * torch.tensor([], dtype=dtype).element_size()


def stock_bytes(config, seq_len: int, batch_size: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """K/V bytes a stock ``DynamicCache`` holds for ``seq_len`` tokens (sliding layers capped at their window)."""
    cfg = _text_config(config)
    window = getattr(cfg, "sliding_window", None)
    per_token = _bytes_per_token(config, dtype)
    total = 0
    for kind in layer_types(config):
        held = min(seq_len, window) if kind != "full_attention" and window else seq_len
        total += held * per_token
    return total * batch_size


def theoretical_bytes(
    plan: Plan, config, seq_len: int, batch_size: int = 1, dtype: torch.dtype = torch.float32
) -> int:
    """K/V bytes the plan says the cache holds after ``seq_len`` real tokens per row (no bookkeeping, no slack)."""
    cfg = _text_config(config)
    window = getattr(cfg, "sliding_window", None)
    per_token = _bytes_per_token(config, dtype)
    total = 0
    for layer, (kind, spec) in enumerate(zip(layer_types(config), layer_specs(plan, config))):
        params = spec.pyramid
        if spec.source != layer:
            held = 0  # a sharing layer reads its source's cache
        elif params is not None:
            held = theoretical_kept(seq_len, params)
        elif kind != "full_attention" and window:
            held = min(seq_len, window)
        else:
            held = seq_len
        total += held * per_token
    return total * batch_size


def kept_lengths(cache: Cache) -> list[int]:
    """Tokens each layer physically holds (per row, the rectangular width)."""
    return [
        layer.kept_length() if isinstance(layer, (BudgetedLayer, SharedLayer)) else _held(layer)
        for layer in cache.layers
    ]
