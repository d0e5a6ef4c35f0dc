"""One calibration pass: run the samples through the model and let each method observe every attention layer.

A collecting attention function is registered with ``transformers.AttentionInterface``; it computes the stock
SDPA output (the forward is unchanged) and hands ``(layer_idx, query, key, value, scaling)`` of that layer to every
observer. Observers reduce what they see to small running statistics on the fly, so no layer's attention map is
ever held beyond the layer that produced it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from runtime.attention import register_attention
from runtime.models import input_device

COLLECT_NAME = "kvplan-collect"
OBSERVER_KWARG = "kvplan_observers"


class LayerObserver(Protocol):
    """What a method implements to see the attention inputs of every layer during calibration."""

    def observe(
        self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
    ) -> None:
        """``query [1, H_q, N, d]``, ``key``/``value [1, H_kv, N, d]`` (post-RoPE) of one sample at one layer."""

    def end_sample(self) -> None:
        """Called after each sample's forward pass."""


def _collect_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
    observers: Sequence[LayerObserver] = kw.pop(OBSERVER_KWARG, ())
    if scaling is None:
        scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is not None:
        with torch.no_grad():
            for observer in observers:
                observer.observe(layer_idx, query, key, value, scaling)
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kw
    )


def run_calibration_pass(
    model: torch.nn.Module,
    samples: Sequence[torch.Tensor],
    observers: Sequence[LayerObserver],
    *,
    progress: Callable | None = None,
) -> float:
    """Forward every sample (1-D token ids) once with the observers attached; returns the wall time in seconds.

    The model's attention implementation is switched to the collector for the pass and restored afterwards. A model
    dispatched by accelerate (``device_map``, weights offloaded to the CPU or disk) runs as its hooks place it: every
    layer on its own execution device, one layer's weights loaded at a time; observers get each layer's tensors on
    that layer's device.
    """
    register_attention(COLLECT_NAME, _collect_attention)
    previous = model.config._attn_implementation
    device = input_device(model)  # the embedding's execution device (accelerate-dispatched models too)
    start = time.perf_counter()
    model.set_attn_implementation(COLLECT_NAME)
    try:
        iterator = progress(samples) if progress is not None else samples
        with torch.no_grad():
            for ids in iterator:
                model(ids.to(device)[None, :], use_cache=False, logits_to_keep=1, **{OBSERVER_KWARG: tuple(observers)})
                for observer in observers:
                    observer.end_sample()
    finally:
        model.set_attn_implementation(previous)
    return time.perf_counter() - start
