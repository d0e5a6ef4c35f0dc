"""KVSharer at run time: layers that own no cache and attend over an earlier layer's.

A plan's ``kvsharer.share_source[l]`` names the layer whose K/V layer ``l`` reads (``l`` itself when it owns its
cache; chains are resolved, so every source owns its cache). A sharing layer:

- holds nothing (:class:`SharedLayer`, like transformers' own ``DummyLayer``; ``physical_bytes`` counts 0 for it);
- skips its k/v projections: while the plan is applied they are replaced by :class:`SkippedProjection`, which
  returns a zero-stride placeholder instead of multiplying by the weights (so compute is saved, not only memory);
- attends with its own queries over the source's cache. The source ran earlier in the same forward, so the
  source already holds this step's tokens. When the source is a PyramidInfer layer, the source's selection applies
  and the sharing layers' queries take part in it (see ``BudgetedLayer.reader_attention``).

Only full-attention layers share (a sliding-window source trims its cache while it updates, so a reader could not
see what the source saw); ``Plan.validate`` refuses other maps.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer


class SharedLayer(DynamicLayer):
    """Cache layer that stores nothing and hands out the cache of its ``source`` layer.

    ``keys``/``values`` stay ``None`` (nothing is held); ``update`` returns the source's held K/V
    ``[B, H_kv, T, d]``. Lengths and mask sizes are the source's.
    """

    def __init__(self, source_idx: int, source: DynamicLayer):
        super().__init__()
        self.source_idx = source_idx
        self.source = source
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        source = self.source
        if not source.is_initialized or source.keys is None:
            raise RuntimeError(
                f"kvplan: a sharing layer ran before its source layer {self.source_idx} cached anything; "
                "the sharing map must point at earlier layers"
            )
        return source.keys, source.values

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def get_seq_length(self) -> int:
        return self.source.get_seq_length()

    def get_mask_sizes(self, *args) -> tuple[int, int]:
        return self.source.get_mask_sizes(*args)

    def get_max_length(self) -> int:
        return self.source.get_max_length()

    # the source holds the data, so it alone reorders, selects, crops and resets it
    def reset(self) -> None:
        pass

    def crop(self, *args, **kwargs) -> None:
        pass

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        pass

    def batch_repeat_interleave(self, repeats: int) -> None:
        pass

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        pass

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass

    def kept_length(self) -> int:
        return 0


class SkippedProjection(torch.nn.Module):
    """Stand-in for a sharing layer's k/v projection: no weights read, no matmul.

    Returns a zero-stride tensor ``[..., out_features]`` of zeros (one element of storage); the layer's cache
    ignores it and returns the source's K/V instead.
    """

    def __init__(self, original: torch.nn.Linear):
        super().__init__()
        self.out_features = original.out_features
        self.original = [original]  # a list so the original is not registered as a submodule (no double params)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states.new_zeros(()).expand(*hidden_states.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, skipped (kvplan: this layer reads another layer's K/V)"


def sharing_map(plan, num_layers: int) -> list[int]:
    """``share_source`` of ``plan`` as a list (identity when the plan does not share)."""
    if "kvsharer" not in plan.methods:
        return list(range(num_layers))
    return [int(s) for s in plan.tensors["kvsharer.share_source"].tolist()]


def readers_of(sources: list[int]) -> list[int]:
    """How many other layers read each layer's cache."""
    counts = [0] * len(sources)
    for layer, source in enumerate(sources):
        if source != layer:
            counts[source] += 1
    return counts


def attention_module(decoder_layer: torch.nn.Module) -> torch.nn.Module | None:
    """The attention module of a decoder layer with separate ``k_proj``/``v_proj`` linears, or None."""
    for module in decoder_layer.modules():
        if isinstance(getattr(module, "k_proj", None), torch.nn.Linear) and isinstance(
            getattr(module, "v_proj", None), torch.nn.Linear
        ):
            return module
    return None


def skip_projections(decoder_layers, sources: list[int]) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """Replace the k/v projections of every sharing layer with :class:`SkippedProjection`.

    Returns ``(module, attribute, original)`` triples for :func:`restore_projections`. Layers whose attention has
    no separate k/v linears (fused projections) keep computing them; their results are discarded.
    """
    swapped = []
    for layer, source in enumerate(sources):
        if source == layer:
            continue
        attn = attention_module(decoder_layers[layer])
        if attn is None:
            continue
        for name in ("k_proj", "v_proj"):
            original = getattr(attn, name)
            setattr(attn, name, SkippedProjection(original))
            swapped.append((attn, name, original))
    return swapped


def restore_projections(swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]]) -> None:
    for module, name, original in reversed(swapped):
        setattr(module, name, original)


__all__ = ["SharedLayer", "SkippedProjection", "sharing_map", "readers_of", "skip_projections", "restore_projections"]
