"""The two ways every task runs the model: teacher-forced scoring and greedy answering, after a compressed context.

Both prefill the context under the method (so the context is compressed), then continue token by token exactly as
``generate`` does: the compression of the context is what the scores measure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..cache import cache_argument, full_attention_bytes, physical_bytes, store_bytes, value_rows
from .methods import Method


@dataclass
class RunStats:
    """What one run held and how long it took.

    Attributes:
        physical_bytes: bytes the cache held at the end (every tensor of every layer).
        seen: tokens fed per row by the end (context, question and decoded tokens but the last).
        prefill_seconds / decode_seconds: wall time of the context prefill and of the token-by-token part.
        decode_steps: number of single-token forwards timed in ``decode_seconds``.
        store_bytes: of ``physical_bytes``, what lives in KCache value stores (0 without KCache).
        value_rows_read / value_rows_held: value rows the last decode step read, and the rows held, over every
            cache-owning layer (``runtime.cache.value_rows``).
        full_attention_bytes: of ``physical_bytes``, what the full-attention layers held (None for a model without
            sliding-window layers).
    """

    physical_bytes: int
    seen: int
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    store_bytes: int = 0
    value_rows_read: int = 0
    value_rows_held: int = 0
    full_attention_bytes: int | None = None


def _stats(cache, config, seen: int, prefill: float, decode: float, steps: int) -> RunStats:
    read, held = value_rows(cache)
    return RunStats(
        physical_bytes(cache), seen, prefill, decode, steps, store_bytes(cache), read, held,
        full_attention_bytes(cache, config),
    )


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def teacher_forced(
    model, method: Method, context: torch.Tensor, continuation: torch.Tensor
) -> tuple[torch.Tensor, RunStats]:
    """Log-probabilities ``[B, C, V]`` (float32, CPU) predicting each of the ``C`` continuation tokens.

    ``context [B, N]`` is prefilled under the method; continuation token ``i`` is then fed as decode step ``i``
    (position 0 is predicted by the prefill's last logit). No padding: rows have equal lengths.
    """
    device = _device(model)
    context, continuation = context.to(device), continuation.to(device)
    cache = DynamicCache(config=model.config)
    arg = {cache_argument(model): cache}
    steps = []
    with method.applied(model):
        start = time.perf_counter()
        out = model(context, use_cache=True, logits_to_keep=1, **arg)
        prefill = time.perf_counter() - start
        steps.append(out.logits[:, -1].float().log_softmax(-1).cpu())
        start = time.perf_counter()
        for i in range(continuation.shape[1] - 1):
            out = model(continuation[:, i : i + 1], use_cache=True, **arg)
            steps.append(out.logits[:, -1].float().log_softmax(-1).cpu())
        decode = time.perf_counter() - start
    # tokens fed per row (not the cache's own count: a peer's compressed cache may report what it holds)
    seen = context.shape[1] + continuation.shape[1] - 1
    stats = _stats(cache, model.config, seen, prefill, decode, continuation.shape[1] - 1)
    return torch.stack(steps, dim=1), stats


@torch.inference_mode()
def answer(
    model, method: Method, context: torch.Tensor, question: torch.Tensor | None, max_new_tokens: int
) -> tuple[torch.Tensor, RunStats]:
    """Greedy answer ``[1, max_new_tokens]`` to ``question`` (fed as one chunk after the compressed context)."""
    device = _device(model)
    cache = DynamicCache(config=model.config)
    arg = {cache_argument(model): cache}
    tokens = []
    with method.applied(model):
        start = time.perf_counter()
        out = model(context.to(device), use_cache=True, logits_to_keep=1, **arg)
        if question is not None and question.shape[1] > 0:
            out = model(question.to(device), use_cache=True, logits_to_keep=1, **arg)
        prefill = time.perf_counter() - start
        tokens.append(out.logits[:, -1].argmax(-1))
        start = time.perf_counter()
        for _ in range(max_new_tokens - 1):
            out = model(tokens[-1][:, None], use_cache=True, **arg)
            tokens.append(out.logits[:, -1].argmax(-1))
        decode = time.perf_counter() - start
    seen = context.shape[1] + (question.shape[1] if question is not None else 0) + max_new_tokens - 1
    stats = _stats(cache, model.config, seen, prefill, decode, max_new_tokens - 1)
    return torch.stack(tokens, dim=1).cpu(), stats
