"""The one interface every plan cache layer implements, and what a plan asks of each layer.

A plan is applied by swapping the per-layer objects of transformers' own ``Cache`` for plan layers (``cache.py``).
Every plan layer — whatever it stores (dense K/V today; ragged per-head storage and a value-offloaded store come
next) — implements :class:`PlanLayer`:

- ``attention(query, mask, scaling, exact)``: the attention output of this layer over what it holds;
- ``reader_attention(...)``: the same for a KVSharer layer that reads this layer's cache in the same forward;
- ``held()``: what it holds (:class:`Held`: K/V and, per row and KV head, each slot's position and validity);
- ``physical_bytes(by_device)``: bytes of every tensor it holds; ``kept_lengths()``: tokens held per (row, head);
- ``check_forward(layer_idx)``: called after each forward, raises if the forward left the layer inconsistent;
- ``join_rows(others)``: take in the batch rows of layers of the same kind that saw the same tokens (the caches of
  a prefill run in row groups, ``runtime/chunking.py``), so that the layer holds what one forward over all rows left.

``attention.py`` calls these methods and ``cache.py`` counts through them; neither dispatches on layer classes.

Shape symbols: ``B`` batch rows, ``H_kv`` KV heads, ``H_s`` heads of the selection (1 when every head of a layer keeps
the same tokens, ``H_kv`` when each keeps its own), ``T`` slots held, ``d`` head dim, ``Q`` queries of the chunk.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

#: ``exact(keys, values) -> [B, Q, H_q, d]``: transformers' own SDPA for this forward's query and mask.
ExactFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Held:
    """What a layer holds.

    Attributes:
        keys / values: ``[B, H_kv, T, d]``.
        positions: int ``[B, H_s, T]``: index of each slot's token in the full sequence (the column of
            transformers' attention mask), or None when slot ``t`` holds token ``t`` (nothing was dropped).
        valid: bool ``[B, H_s, T]``: True where the slot holds a real token (False: padding, or a slot a narrower
            row or head left empty), or None when the forward's own mask says it all (nothing was dropped).
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor | None = None
    valid: torch.Tensor | None = None


@dataclass
class LayerPlan:
    """What the plan asks of one layer's cache; each enabled method's ``configure`` hook fills in its part.

    Attributes:
        index: the layer.
        kind: ``full_attention`` or ``sliding_attention`` (from the model config).
        source: the layer whose cache this layer reads (its own index when it owns its cache; KVSharer).
        readers: how many later layers read this layer's cache.
        selection: the token budget of the layer's own cache (PyramidInfer's ``PyramidParams``, KV-Compress's
            ``HeadParams``: anything with ``make_layer(readers, topn, estimator)`` and ``theoretical_tokens(seen)``), or None
            when it keeps everything it sees. Ignored for a sharing layer (its source's selection applies).
        topn: KCache: value rows a decode step reads per (row, KV head), its values in a second store; 0 keeps the
            values with the model. Ignored for a sharing layer (it reads its source's store).
        topn_estimator: KCache: how a decode step estimates the output from the rows it read (``residual_mean`` or
            ``renormalise``; ``runtime.kcache.estimate``).
    """

    index: int
    kind: str
    source: int
    readers: int = 0
    selection: Any = None
    topn: int = 0
    topn_estimator: str = "residual_mean"

    @property
    def owns_cache(self) -> bool:
        return self.source == self.index


def tensor_bytes(tensors, by_device: bool = False) -> int | dict[str, int]:
    """Bytes of the given tensors (None skipped), in total or per device."""
    totals: dict[str, int] = defaultdict(int)
    for tensor in tensors:
        if tensor is not None:
            totals[str(tensor.device)] += tensor.numel() * tensor.element_size()
    return dict(totals) if by_device else sum(totals.values())


class PlanLayer:
    """Interface of every kvplan cache layer (mixed into a transformers ``CacheLayerMixin`` subclass)."""

    #: Whether the attention of a forward after this layer's first needs only the mask's columns of the forward's own
    #: tokens (the layer knows itself which older tokens are real). When every layer of a cache does, the forward's
    #: mask is narrowed to those columns (:attr:`CompressingLayer.short_mask`).
    reads_own_columns_only: bool = False

    def attention(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float, exact: ExactFn) -> torch.Tensor:
        """Output ``[B, Q, H_q, d]`` of ``query [B, H_q, Q, d]`` over what the layer holds (``mask``: bool
        ``[B|1, 1, Q, seen]`` over the full sequence, or None)."""
        raise NotImplementedError

    def reader_attention(
        self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float, exact: ExactFn
    ) -> torch.Tensor:
        """A sharing layer's ``query`` over this layer's cache, in the same forward (default: exact over it)."""
        held = self.held()
        return exact(held.keys, held.values)

    def held(self) -> Held:
        raise NotImplementedError

    def current_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What ``update`` hands back to the model for a sharing layer reading this cache (kvplan's attention reads
        the layer itself; default: the held K/V)."""
        held = self.held()
        return held.keys, held.values

    def physical_bytes(self, by_device: bool = False) -> int | dict[str, int]:
        raise NotImplementedError

    def kept_lengths(self) -> torch.Tensor:
        """int64 ``[B, H_kv]``: real tokens each (row, KV head) holds."""
        raise NotImplementedError

    def value_stores(self) -> list:
        """KCache: the layer's value stores (``runtime.kcache.ValueStore``; empty when its values stay with the
        model)."""
        return []

    def store_bytes(self) -> int:
        """Bytes of this layer's values that live in the KCache value store (included in ``physical_bytes``)."""
        return sum(store.nbytes() for store in self.value_stores())

    def kept_length(self) -> int:
        """Slots held per row and head (the rectangle's width)."""
        keys = self.held().keys if self.holds_anything() else None
        return 0 if keys is None else keys.shape[-2]

    def holds_anything(self) -> bool:
        raise NotImplementedError

    def check_forward(self, layer_idx: int, where: str) -> None:
        """Raise ``RuntimeError`` if the forward that just ended left this layer inconsistent."""

    def join_rows(self, others: list) -> None:
        """Append the batch rows of ``others`` after this layer's own: layers of the same class and plan that saw the
        same token columns (the caches of a prefill run in groups of rows). Afterwards this layer holds what one
        forward over all the rows would have left (same kept tokens, scores and schedule per row); ``others`` must
        not be used again. Raises ``ValueError`` for parts that are not at the same point of the same prompt."""
        raise NotImplementedError(f"kvplan: a {type(self).__name__} cannot join batch rows")


class CompressingLayer(PlanLayer):
    """What every plan layer that drops tokens shares: it reports the tokens it has *seen* (``seen``), so positions
    and masks stay those of the full sequence, and it checks after each forward that its attention ran through
    kvplan (``compressed``) and that no sharing layer it waited for is missing (``_pending``)."""

    seen: int = 0
    compressed: bool = False
    _pending: dict | None = None
    #: Set by ``runtime.cache.install_plan_layers`` when every layer of the cache reads only its forward's own mask
    #: columns (:attr:`PlanLayer.reads_own_columns_only`): once compressed, the layer then reports mask sizes
    #: ``(new tokens, seen)``, so transformers builds the mask of a chunk over the chunk's own positions only
    #: (``[B, 1, Q, Q]``, or none at all without padding) instead of ``[B, 1, Q, seen + Q]``: 32 MiB of bool for the
    #: second chunk of 4,096 of an 8k prompt, 84 MiB for the last chunk of a 24k one.
    short_mask: bool = False

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length_or_cache_position, *args) -> tuple[int, int]:
        q_len = (
            query_length_or_cache_position.shape[0]
            if isinstance(query_length_or_cache_position, torch.Tensor)
            else int(query_length_or_cache_position)
        )
        if self.short_mask and self.compressed:
            return q_len, self.seen
        return self.seen + q_len, 0

    def check_forward(self, layer_idx: int, where: str) -> None:
        if self._pending is not None:
            raise RuntimeError(
                f"kvplan: layer {layer_idx} waited for sharing layers that never attended over its cache in this "
                f"forward pass ({where}); please report it with the model id"
            )
        if self.seen > 0 and not self.compressed:
            raise RuntimeError(
                f"kvplan: layer {layer_idx} cached tokens without going through kvplan's attention function; this "
                f"architecture ({where}) does not pass keyword arguments down to attention, so the plan cannot be "
                "applied to it. Please report it with the model id."
            )


class RowSelection:
    """``generate``'s batch-row operations (beam search, contrastive search) through one ``_select_rows(fn)``, where
    ``fn`` maps a tensor with the batch rows first to the selected rows. Put it before transformers' layer class."""

    def _select_rows(self, fn) -> None:
        raise NotImplementedError

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(lambda t: t[indices.to(t.device)])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))


def check_same(parts: list, *names: str) -> None:
    """``join_rows``: ``ValueError`` unless every part has the same value of each attribute in ``names``."""
    for name in names:
        values = [getattr(part, name) for part in parts]
        if any(value != values[0] for value in values[1:]):
            raise ValueError(
                f"kvplan: cannot join the batch rows of cache layers at different points of a prompt ({name}: "
                f"{values}); row groups must run the same token columns"
            )


def cat_rows(tensors: list) -> torch.Tensor | None:
    """``join_rows``: the tensors (batch rows first) one after the other, or None when every one is None."""
    if all(tensor is None for tensor in tensors):
        return None
    if any(tensor is None for tensor in tensors):
        raise ValueError("kvplan: cannot join the batch rows of cache layers where only some hold a tensor")
    return torch.cat(tensors, dim=0)


def key_valid_from_mask(full_mask: torch.Tensor | None, bsz: int, total: int, device) -> torch.Tensor:
    """bool ``[B, T]``: keys some query may attend to (padding keys are masked in every row)."""
    if full_mask is None:
        return torch.ones(bsz, total, dtype=torch.bool, device=device)
    return full_mask[:, 0].any(dim=1).expand(bsz, total)


class FullLayer(DynamicLayer, PlanLayer):
    """A layer that keeps everything it sees (exactly transformers' ``DynamicLayer``), exposed through
    :class:`PlanLayer` so that sharing layers can read it. Used for a KVSharer source without a token budget."""

    def attention(self, query, mask, scaling, exact):
        return exact(self.keys, self.values)

    def held(self) -> Held:
        if self.keys is None:
            raise RuntimeError("kvplan: the layer has not cached anything yet")
        return Held(self.keys, self.values)

    def holds_anything(self) -> bool:
        return self.keys is not None and self.keys.numel() > 0

    def physical_bytes(self, by_device: bool = False):
        return tensor_bytes((self.keys, self.values), by_device)

    def kept_lengths(self) -> torch.Tensor:
        if not self.holds_anything():
            return torch.zeros(0, 0, dtype=torch.int64)
        bsz, heads, width, _ = self.keys.shape
        return torch.full((bsz, heads), width, dtype=torch.int64)

    def join_rows(self, others: list) -> None:
        join_dense_rows(self, others)


def join_dense_rows(layer, others: list) -> None:
    """``join_rows`` of a layer holding ``keys``/``values`` ``[B, H_kv, T, d]`` (transformers' ``DynamicLayer``, its
    sliding-window variant, :class:`FullLayer`): the rows one after the other."""
    parts = [layer, *others]
    check_same(parts, "is_initialized", *(("cumulative_length",) if hasattr(layer, "cumulative_length") else ()))
    layer.keys = cat_rows([part.keys for part in parts])
    layer.values = cat_rows([part.values for part in parts])


def layer_bytes(layer, by_device: bool = False) -> int | dict[str, int]:
    """Bytes a cache layer holds: a plan layer counts itself; a stock transformers layer, its K and V."""
    if isinstance(layer, PlanLayer):
        return layer.physical_bytes(by_device)
    return tensor_bytes((getattr(layer, "keys", None), getattr(layer, "values", None)), by_device)


__all__ = [
    "CompressingLayer", "RowSelection", "ExactFn", "FullLayer", "cat_rows", "check_same", "join_dense_rows",
    "key_valid_from_mask", "Held", "LayerPlan", "PlanLayer", "layer_bytes", "tensor_bytes",
]
