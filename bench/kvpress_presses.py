"""NVIDIA kvpress presses driven by kvplan's own scoring loops (plain ``model(...)`` calls with a cache).

Needs the separate venv built by ``bench/kvpress_env.sh`` (kvpress 0.5.5, transformers 5.2.0). kvpress is
imported lazily inside the functions, so importing this module anywhere else works; only calling them needs
kvpress. Nothing from kvpress is copied here: every press is kvpress's own class.

Ratios. kvpress's ``compression_ratio`` is the fraction of the context REMOVED; kvplan's keep ratio (a plan's
``target_ratio``) is the fraction KEPT. So ``compression_ratio = 1 - keep_ratio``: keep 0.5 <-> 0.5,
keep 0.125 <-> 0.875, keep 1.0 <-> 0.0 (no compression). A ScorerPress keeps ``max(1, int(T * (1 - ratio)))``
of ``T`` prefill tokens per layer and KV head; PyramidKVPress spreads the same total over the layers as a linear
ramp (more tokens in the lower layers); AdaKVPress keeps the same total per layer, split unevenly over the KV
heads.

How kvpress 0.5.5 applies a press (read in ``kvpress/presses/base_press.py`` and ``kvpress/pipeline.py``):

- ``with press(model):`` registers a forward hook on every ``decoder_layer.self_attn``; the hook runs AFTER the
  attention forward, and only when ``cache_position[-1] + 1 == q_len`` (a forward that starts from an empty
  cache). It then replaces ``cache.layers[i].keys/.values`` with the compressed tensors. So the prefill itself
  is exact (full attention), and only the tokens after it see the compressed cache.
- ``KVPressTextGenerationPipeline`` prefills the context inside ``with press(model)``, LEAVES the press, then
  feeds the question and greedy-decodes with explicit ``position_ids = context_length + i``: the compressed
  ``DynamicCache`` reports its physical length from ``get_seq_length()``, so without them the RoPE positions of
  every later token would be shifted back by the number of evicted tokens.
- Head-wise presses (``AdaKVPress``, ``CriticalAdaKVPress``, ``DuoAttentionPress``, ...) do not shrink the cache:
  they store ``module.masked_key_indices`` on the attention module, and the attention wrapper that
  ``import kvpress`` installs over every entry of transformers' ``ALL_ATTENTION_FUNCTIONS`` overwrites those key
  slots with a "fake key" at each later step so that their softmax weight underflows to zero.

``apply_press`` reproduces exactly that protocol for plain forward loops (our fidelity/teacher-forcing code):
a forward whose cache is empty is the prefill and runs inside ``with press(model)``; every later forward runs
without the press hooks and gets ``position_ids`` continuing from the number of tokens *seen* (unless the caller
passes its own). ``model.generate`` is not supported under it (kvpress's own pipeline does not use it either).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:  # torch too is imported lazily: importing this module needs neither torch nor kvpress
    import torch

KVPRESS_VERSION = "0.5.5"


# ----- presses -------------------------------------------------------------------------------------------------------
def _kvpress():
    import kvpress  # noqa: PLC0415  (lazy: only the kvpress venv has it; importing it patches attention functions)

    return kvpress


def _pyramidkv(compression_ratio: float):
    return _kvpress().PyramidKVPress(compression_ratio=compression_ratio)


def _snapkv(compression_ratio: float):
    return _kvpress().SnapKVPress(compression_ratio=compression_ratio)


def _adakv_snapkv(compression_ratio: float):
    kvp = _kvpress()
    return kvp.AdaKVPress(kvp.SnapKVPress(compression_ratio=compression_ratio))


def _streamingllm(compression_ratio: float):
    return _kvpress().StreamingLLMPress(compression_ratio=compression_ratio)


def _knorm(compression_ratio: float):
    return _kvpress().KnormPress(compression_ratio=compression_ratio)


def _keydiff(compression_ratio: float):
    return _kvpress().KeyDiffPress(compression_ratio=compression_ratio)


def _expected_attention(compression_ratio: float):
    return _kvpress().ExpectedAttentionPress(compression_ratio=compression_ratio)


def _tova(compression_ratio: float):
    return _kvpress().TOVAPress(compression_ratio=compression_ratio)


# name -> constructor taking kvpress's compression_ratio (fraction REMOVED); use press_for() with a keep ratio.
# Every press uses kvpress's default parameters (SnapKV/PyramidKV window 64 and kernel 5, PyramidKV beta 20,
# StreamingLLM and ExpectedAttention 4 sinks, AdaKV alpha_safeguard 0.2).
PRESSES: dict[str, Callable[[float], Any]] = {
    "pyramidkv": _pyramidkv,
    "snapkv": _snapkv,
    "adakv-snapkv": _adakv_snapkv,
    "streamingllm": _streamingllm,
    "knorm": _knorm,
    "keydiff": _keydiff,
    "expected-attention": _expected_attention,
    "tova": _tova,
}


def compression_ratio_for(keep_ratio: float) -> float:
    """kvpress's ``compression_ratio`` (fraction removed) for kvplan's keep ratio (fraction kept), in (0, 1]."""
    keep = float(keep_ratio)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    # round away float noise such as 1 - 0.7 = 0.30000000000000004 (kvpress floors T * (1 - ratio))
    return round(1.0 - keep, 12)


def press_for(name: str, keep_ratio: float):
    """The kvpress press ``name`` (a key of ``PRESSES``) that keeps ``keep_ratio`` of the prefill tokens.

    kvplan's keep ratio and kvpress's ``compression_ratio`` are complements: ``compression_ratio = 1 - keep_ratio``
    (keep 0.5 -> compression_ratio 0.5, keep 0.125 -> 0.875, keep 1.0 -> 0.0, i.e. no compression).
    """
    try:
        make = PRESSES[name]
    except KeyError:
        raise KeyError(f"unknown press {name!r}; known: {', '.join(PRESSES)}") from None
    return make(compression_ratio_for(keep_ratio))


# ----- applying a press to plain forward loops -----------------------------------------------------------------------
def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """``self_attn`` of every decoder layer, found the way kvpress finds them."""
    inner = model.model
    language_model = inner.language_model if hasattr(inner, "language_model") else inner
    return [layer.self_attn for layer in language_model.layers]


@dataclass
class PressHandle:
    """What ``apply_press`` yields: the press, and the number of tokens each cache has seen (its true length)."""

    model: torch.nn.Module
    press: Any
    _seen: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    prefills: int = 0

    def seen_tokens(self, cache) -> int:
        """Tokens fed through ``cache`` under this press (its logical length); its physical length may be less."""
        return self._seen.get(cache, cache.get_seq_length())

    def report(self, cache) -> dict[str, Any]:
        """``cache_report`` for ``cache``, with the number of tokens it has seen."""
        return cache_report(self.model, cache, seen=self.seen_tokens(cache))


def _first_tensor_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    if ids is None:
        raise ValueError("apply_press: the forward got neither input_ids nor inputs_embeds")
    return ids


@contextlib.contextmanager
def apply_press(model: torch.nn.Module, press) -> Iterator[PressHandle]:
    """Run ``press`` on plain ``model(input_ids, past_key_values=cache, use_cache=True)`` calls, as kvpress does.

    Under the block:

    - a forward whose cache is empty (or that passes none: a ``DynamicCache`` is created for it and comes back as
      ``out.past_key_values``) is the PREFILL: it runs inside kvpress's own ``with press(model)``, whose hooks
      compress (or, for head-wise presses, mask) every layer's cache right after that layer's attention;
    - every later forward on a cache that holds tokens is a decode/continuation step: it runs with no press hook
      (as in ``KVPressTextGenerationPipeline``, which leaves the press before the question and the answer) and,
      unless the caller passes ``position_ids``, gets ``position_ids = seen + arange(q_len)`` where ``seen`` counts
      every token fed through that cache (the pipeline passes ``context_length + i`` the same way).

    On exit the hooks are removed and the model is restored: ``masked_key_indices`` left on the attention modules
    by head-wise presses are cleared, and the ``self_attn.rotary_emb`` references kvpress adds are removed.
    Limits (kvpress's): batch rows without padding (no ``attention_mask``), one cache in flight at a time for
    head-wise presses (their masks live on the attention modules, not in the cache), no ``model.generate``.
    """
    kvp = _kvpress()
    if isinstance(press, (kvp.DecodingPress, kvp.PrefillDecodingPress)):
        raise ValueError(f"apply_press runs prefill presses only; {type(press).__name__} compresses while decoding")

    attn_modules = _attention_modules(model)
    had_rotary = [("rotary_emb" in getattr(m, "_modules", {})) or hasattr(m, "rotary_emb") for m in attn_modules]
    handle = PressHandle(model=model, press=press)
    active: list[contextlib.AbstractContextManager] = []  # the press context of the prefill in flight

    import torch  # noqa: PLC0415

    def pre_hook(module, args, kwargs):
        ids = _first_tensor_arg(args, kwargs)
        q_len = ids.shape[1]
        cache = kwargs.get("past_key_values")  # transformers 5.2's name (kvpress's hooks read it too)
        if cache is None:
            if kwargs.get("use_cache") is False:
                raise ValueError("apply_press: a press needs a cache; call the model with use_cache=True")
            from transformers import DynamicCache  # noqa: PLC0415

            cache = DynamicCache(config=model.config)
            kwargs["past_key_values"] = cache
        if cache.get_seq_length() == 0:
            # prefill: kvpress's hooks compress it (their own test: cache_position[-1] + 1 == q_len)
            handle._seen[cache] = q_len
            handle.prefills += 1
            ctx = press(model)
            ctx.__enter__()
            active.append(ctx)
        else:
            seen = handle._seen.get(cache, cache.get_seq_length())
            if kwargs.get("position_ids") is None:
                positions = torch.arange(seen, seen + q_len, device=ids.device)
                kwargs["position_ids"] = positions.unsqueeze(0).expand(ids.shape[0], -1)
            handle._seen[cache] = seen + q_len
        return args, kwargs

    def post_hook(module, args, kwargs, output):
        while active:
            active.pop().__exit__(None, None, None)
        return output

    pre = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    post = model.register_forward_hook(post_hook, with_kwargs=True, always_call=True)
    try:
        yield handle
    finally:
        pre.remove()
        post.remove()
        while active:
            active.pop().__exit__(None, None, None)
        for module, had in zip(attn_modules, had_rotary):
            if getattr(module, "masked_key_indices", None) is not None:
                module.masked_key_indices = None
            if not had and hasattr(module, "rotary_emb"):
                delattr(module, "rotary_emb")


# ----- memory accounting ---------------------------------------------------------------------------------------------
def _layer_tensors(layer) -> list[torch.Tensor]:
    """Every tensor a cache layer holds as an attribute (keys, values, quantized copies, bookkeeping)."""
    import torch  # noqa: PLC0415

    return [v for v in vars(layer).values() if isinstance(v, torch.Tensor)]


def held_bytes(cache) -> int:
    """Physical bytes of every tensor the cache's layers hold (each storage counted once, at its full size).

    Counts storages, not views: a tensor sliced out of a larger buffer is charged the whole buffer, because that is
    what stays allocated. For head-wise presses (AdaKV) this is the FULL size: they mask, they do not drop; see
    ``masking``.
    """
    seen: set[tuple[str, int]] = set()
    total = 0
    for layer in cache.layers:
        for tensor in _layer_tensors(layer):
            if tensor.numel() == 0:
                continue
            storage = tensor.untyped_storage()
            key = (str(tensor.device), storage.data_ptr())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total


def held_lengths(cache) -> list[int]:
    """Tokens each layer physically holds (the sequence dimension of its keys)."""
    out = []
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        out.append(0 if keys is None or keys.numel() == 0 else int(keys.shape[-2]))
    return out


def masking(model: torch.nn.Module, cache) -> dict[str, Any]:
    """Whether a head-wise press MASKED cache entries instead of dropping them, and what stays visible.

    kvpress's head-wise presses leave ``module.masked_key_indices = (batch_idx, head_idx, seq_idx)`` on each
    attention module; the cache keeps full-size tensors. Returns ``masked`` (any layer has masked entries), per
    layer the number of masked (row, KV head, token) entries and the effective kept tokens per KV head
    (held - masked in that head; mean, min, max over rows and heads), plus the bytes of the index tensors
    (held on the model, not in the cache).
    """
    import torch  # noqa: PLC0415

    lengths = held_lengths(cache)
    per_layer = []
    index_bytes = 0
    for module, held, layer in zip(_attention_modules(model), lengths, cache.layers):
        indices = getattr(module, "masked_key_indices", None)
        keys = getattr(layer, "keys", None)
        if indices is None or keys is None or keys.numel() == 0:
            per_layer.append({"masked_entries": 0, "effective_kept_mean": float(held),
                              "effective_kept_min": held, "effective_kept_max": held})
            continue
        batch_idx, head_idx, _seq_idx = indices
        index_bytes += sum(t.numel() * t.element_size() for t in indices)
        bsz, n_heads = keys.shape[0], keys.shape[1]
        counts = torch.zeros(bsz * n_heads, dtype=torch.long)
        counts.index_add_(0, (batch_idx.cpu() * n_heads + head_idx.cpu()).long(),
                          torch.ones_like(batch_idx.cpu(), dtype=torch.long))
        effective = held - counts
        per_layer.append({
            "masked_entries": int(counts.sum()),
            "effective_kept_mean": float(effective.float().mean()),
            "effective_kept_min": int(effective.min()),
            "effective_kept_max": int(effective.max()),
        })
    return {
        "masked": any(entry["masked_entries"] > 0 for entry in per_layer),
        "layers": per_layer,
        "mask_index_bytes": index_bytes,
    }


def cache_report(model: torch.nn.Module, cache, seen: int | None = None) -> dict[str, Any]:
    """Held bytes, held tokens per layer, and the masking summary of ``cache`` after a press ran.

    ``effective_kept`` per layer is what attention can still see (held tokens for a dropping press, the mean over
    KV heads of held minus masked for a masking one; ``effective_kept_range`` the min and max over rows and KV
    heads). ``seen`` (the logical length) is echoed when given.
    """
    mask = masking(model, cache)
    return {
        "seen_tokens": seen,
        "held_bytes": held_bytes(cache),
        "held_tokens": held_lengths(cache),
        "masked": mask["masked"],
        "effective_kept": [entry["effective_kept_mean"] for entry in mask["layers"]],
        "effective_kept_range": [(entry["effective_kept_min"], entry["effective_kept_max"]) for entry in mask["layers"]],
        "masked_entries": [entry["masked_entries"] for entry in mask["layers"]],
        "mask_index_bytes": mask["mask_index_bytes"],
    }
