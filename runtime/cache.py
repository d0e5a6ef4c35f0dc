"""The plan-driven cache: plan layer objects inside transformers' own ``Cache`` container.

``install_plan_layers`` swaps the per-layer objects of a fresh ``Cache`` (the one ``generate`` creates) for the
kinds the plan asks for; everything else about the container (``generate``'s bookkeeping, beam reordering) stays
transformers'. ``physical_bytes`` counts every tensor the cache holds; ``theoretical_bytes`` is what the plan
says it should hold; ``stock_bytes`` what a ``DynamicCache`` would.
"""

from __future__ import annotations

import inspect
from collections import defaultdict

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from . import registry
from .errors import PlanError
from .kcache import OffloadedLayer
from .kvsharer import SharedLayer
from .layers import CompressingLayer, FullLayer, LayerPlan, PlanLayer, join_dense_rows, layer_bytes
from .plan import Plan
from .pyramidinfer import BudgetedLayer, theoretical_kept  # noqa: F401  (BudgetedLayer: re-exported)


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


def layer_plans(plan, config) -> list[LayerPlan]:
    """Per layer, what the plan asks of its cache: each enabled method's ``configure`` hook (registry order) fills
    in its part. Raises :class:`PlanError` naming a method this runtime cannot apply (never half-applies a plan)."""
    unsupported = [m for m in plan.methods if not registry.get(m).runtime_supported]
    if unsupported:
        raise PlanError(
            f"the plan enables {', '.join(unsupported)}, which this kvplan runtime cannot apply yet (it applies: "
            f"{', '.join(registry.runtime_supported())}); refusing the plan rather than applying it without "
            f"{'it' if len(unsupported) == 1 else 'them'}"
        )
    kinds = layer_types(config)
    layers = [LayerPlan(index=i, kind=kind, source=i) for i, kind in enumerate(kinds)]
    for spec in registry.specs(plan.methods):
        spec.configure(plan, layers, config)
    return layers


def _build_layer(spec: LayerPlan, layers: list):
    """The cache layer object for one layer's plan (None: keep transformers' own layer)."""
    if not spec.owns_cache:
        return SharedLayer(spec.source, layers[spec.source])
    if spec.selection is not None:
        return spec.selection.make_layer(readers=spec.readers, topn=spec.topn, estimator=spec.topn_estimator)
    if spec.topn > 0:
        return OffloadedLayer(spec.topn, readers=spec.readers, estimator=spec.topn_estimator)
    if spec.readers:
        return FullLayer()
    return None


def install_plan_layers(cache: Cache, specs: list[LayerPlan]) -> bool:
    """Swap a fresh cache's layers for plan layers; returns False (and changes nothing) if it already holds tokens.

    A cache that already holds tokens was filled without the plan; compressing it half-way would not match what
    the plan promises, so it is left alone.
    """
    layers = cache.layers
    if any(isinstance(layer, PlanLayer) for layer in layers):
        return True
    if any(getattr(layer, "is_initialized", False) and _held(layer) > 0 for layer in layers):
        return False
    replicate = getattr(cache, "layer_class_to_replicate", None)
    while len(layers) < len(specs):
        layers.append(replicate() if replicate is not None else DynamicLayer())
    for spec in sorted(specs, key=lambda s: not s.owns_cache):  # sources first: readers point at their objects
        layer = _build_layer(spec, layers)
        if layer is not None:
            layers[spec.index] = layer
    short = all(getattr(layer, "reads_own_columns_only", False) for layer in layers)
    for layer in layers:
        if isinstance(layer, CompressingLayer):
            layer.short_mask = short
    return True


#: transformers' own layer classes (exact types) whose rows :func:`join_cache_rows` joins: K/V rectangles only.
_STOCK_JOINABLE = (DynamicLayer, DynamicSlidingWindowLayer)


def can_join_rows(cache) -> bool:
    """Whether a prefill into ``cache`` may run in groups of rows joined afterwards (:func:`join_cache_rows`): a
    transformers ``DynamicCache`` (not offloading) that holds nothing yet, whose layers are plan layers or stock
    layers of the classes :data:`_STOCK_JOINABLE`."""
    if type(cache) is not DynamicCache or getattr(cache, "offloading", False):
        return False
    for layer in cache.layers:
        if isinstance(layer, PlanLayer):
            if layer.holds_anything():
                return False
        elif type(layer) not in _STOCK_JOINABLE or _held(layer) > 0:
            return False
    return True


def join_cache_rows(cache: Cache, parts: list[Cache]) -> None:
    """Make ``cache`` hold the batch rows of ``parts`` one after the other: the caches of one prefill run in groups
    of rows (same plan, same token columns; ``runtime.chunking.RowGroupPrefill``). Layer by layer, each part's
    layer is released once joined, so the join's transient is one layer. ``parts`` must not be used afterwards."""
    base = parts[0]
    for idx, layer in enumerate(base.layers):
        others = [part.layers[idx] for part in parts[1:]]
        if isinstance(layer, PlanLayer):
            layer.join_rows(others)
        else:
            join_dense_rows(layer, others)
        for part in parts[1:]:
            part.layers[idx] = None
    cache.layers[:] = base.layers


def _held(layer) -> int:
    keys = getattr(layer, "keys", None)
    return 0 if keys is None or keys.numel() == 0 else keys.shape[-2]


def physical_bytes(cache: Cache, by_device: bool = False) -> int | dict[str, int]:
    """Bytes of every tensor the cache holds (K, V and any bookkeeping), in total or per device."""
    totals: dict[str, int] = defaultdict(int)
    for layer in cache.layers:
        for device, count in layer_bytes(layer, by_device=True).items():
            totals[device] += count
    return dict(totals) if by_device else sum(totals.values())


def full_attention_bytes(cache: Cache, config) -> int | None:
    """Bytes the cache's full-attention layers hold (as :func:`physical_bytes` counts them), or None for a model
    without sliding-window layers (where it is :func:`physical_bytes`). A model with sliding-window layers (Gemma 3)
    keeps their window in any case; this is the part a plan compresses."""
    kinds = layer_types(config)
    if all(kind == "full_attention" for kind in kinds):
        return None
    return sum(layer_bytes(layer) for layer, kind in zip(cache.layers, kinds) if kind == "full_attention")


def stock_full_attention_bytes(config, seq_len: int, batch_size: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """The part of :func:`stock_bytes` held by the full-attention layers."""
    full = sum(kind == "full_attention" for kind in layer_types(config))
    return full * seq_len * _bytes_per_token(config, dtype) * batch_size


def store_bytes(cache: Cache) -> int:
    """Bytes of the cache that live in KCache value stores (part of :func:`physical_bytes`; the rest is with the
    model)."""
    return sum(layer.store_bytes() for layer in cache.layers if isinstance(layer, PlanLayer))


def value_rows(cache: Cache) -> tuple[int, int]:
    """``(read, held)``: value rows the last forward read and the rows the cache held, summed over every layer that
    owns a cache. A KCache layer counts what its last step gathered from its store (``N`` per row and KV head for a
    decode step); any other layer reads every value row it holds. ``read / held`` is the fraction of value rows a
    decode step reads."""
    read = held = 0
    for layer in cache.layers:
        if isinstance(layer, SharedLayer):
            continue
        stores = layer.value_stores() if isinstance(layer, PlanLayer) else []
        if stores:
            read += sum(store.last_read for store in stores)
            held += sum(store.last_held for store in stores)
            continue
        if isinstance(layer, PlanLayer):
            rows = int(layer.kept_lengths().sum()) if layer.holds_anything() else 0
        else:
            keys = getattr(layer, "keys", None)
            rows = 0 if keys is None or keys.numel() == 0 else keys.shape[0] * keys.shape[1] * keys.shape[2]
        read += rows
        held += rows
    return read, held


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


def theoretical_layers(plan: Plan, config, seq_len: int) -> list[tuple[LayerPlan, float]]:
    """Per layer, what the plan asks of it and the tokens it holds per (row, KV head) after ``seq_len`` real tokens
    in theory (0 for a sharing layer: it reads its source's cache; sliding layers capped at their window)."""
    window = getattr(_text_config(config), "sliding_window", None)
    out = []
    for spec in layer_plans(plan, config):
        if not spec.owns_cache:
            held = 0
        elif spec.selection is not None:
            held = spec.selection.theoretical_tokens(seq_len)
        elif spec.kind != "full_attention" and window:
            held = min(seq_len, window)
        else:
            held = seq_len
        out.append((spec, held))
    return out


def theoretical_bytes(
    plan: Plan, config, seq_len: int, batch_size: int = 1, dtype: torch.dtype = torch.float32
) -> int:
    """K/V bytes the plan says the cache holds after ``seq_len`` real tokens per row (no bookkeeping, no slack)."""
    per_token = _bytes_per_token(config, dtype)
    total = 0
    for _, held in theoretical_layers(plan, config, seq_len):
        total += held * per_token
    return round(total * batch_size)


def theoretical_full_attention_bytes(
    plan: Plan, config, seq_len: int, batch_size: int = 1, dtype: torch.dtype = torch.float32
) -> int:
    """The part of :func:`theoretical_bytes` held by the full-attention layers (on a model with sliding-window layers,
    the part a plan compresses: the others hold their window whatever the plan)."""
    per_token = _bytes_per_token(config, dtype)
    total = sum(held * per_token for spec, held in theoretical_layers(plan, config, seq_len)
                if spec.kind == "full_attention")
    return round(total * batch_size)


def theoretical_store_bytes(
    plan: Plan, config, seq_len: int, batch_size: int = 1, dtype: torch.dtype = torch.float32
) -> int:
    """The part of :func:`theoretical_bytes` that KCache moves to its value store: the values of every layer that
    owns its cache and has ``topn > 0`` (moved off the model's device, not removed; the rest stays with the model)."""
    per_value = _bytes_per_token(config, dtype) // 2
    total = 0
    for spec, held in theoretical_layers(plan, config, seq_len):
        if spec.owns_cache and spec.topn > 0:
            total += held * per_value
    return round(total * batch_size)


def kept_lengths(cache: Cache) -> list[int]:
    """Slots each layer physically holds per row and head (the rectangle's width; 0 for a sharing layer)."""
    return [layer.kept_length() if isinstance(layer, PlanLayer) else _held(layer) for layer in cache.layers]
