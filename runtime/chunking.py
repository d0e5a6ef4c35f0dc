"""Chunked prefill under a plan: a long prompt goes through the model in chunks, compressed between chunks.

With a plan applied, a forward over more than ``prefill_chunk_size`` new tokens (the prefill of
``model.generate``, or ``model(ids, logits_to_keep=1, ...)``) is fed to the model in chunks of
``prefill_chunk_size`` tokens; every plan layer compresses what it holds after each chunk, so what a layer holds
during the prefill is its budget plus one chunk, and the activations are those of one chunk, not of the prompt.

The chunks are aligned on the **end** of the prompt: the last chunk has ``prefill_chunk_size`` tokens and the first
one the remainder. A left-padded batch ends every row at the same column, so every row is cut at the same distances
from its end as when it runs alone (its real tokens are chunked exactly as in its solo run).

How: :class:`ChunkedPrefill` is a forward pre-hook (``torch.nn.Module.register_forward_pre_hook``) on the causal
LM that :func:`runtime.apply_plan` adds. When a forward qualifies, the hook runs every chunk but the last through the
same model (with the same cache, ``logits_to_keep=1``), then lets the forward itself run on the last chunk; the
caller gets the last chunk's output (its logits are the ones ``generate`` asks for). Nothing of transformers is
patched. A forward is fed in one piece when chunking could change what it returns: it asks for logits beyond the
last chunk (``logits_to_keep=0``, the default of a plain forward), for hidden states or attentions, passes labels,
a 4D mask or positional arguments after ``input_ids``, or runs without a cache.

A batch is bounded the same way: a first forward whose rows x ``min(length, prefill_chunk_size)`` tokens exceed
``prefill_chunk_size`` runs in groups of rows, each into its own fresh cache and chunked as above, and the groups'
caches are joined row-wise afterwards (:class:`RowGroupPrefill`; every plan layer's ``join_rows``). One forward then
computes at most ``prefill_chunk_size`` tokens whatever the batch (8 x 4,096 tokens: 8 forwards of one row), and the
joined cache holds what one forward over every row would have left. ``AppliedPlan.prefill_row_groups = False`` turns
it off.

transformers' own ``generate(..., prefill_chunk_size=N)`` works too (every plan layer accepts multi-token chunks
after it compressed); it cuts chunks from the *start* of the prompt, so rows of a left-padded batch are cut at other
places than in their solo runs (each row is still an exact chunked run, with its first chunk shortened by its
padding). The runtime's own chunking, on by default, does not have that difference.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect

import torch
from transformers.cache_utils import Cache, DynamicCache

from .cache import can_join_rows, join_cache_rows

#: Prompt tokens per chunk by default (``apply_plan(..., prefill_chunk_size="auto")``): prompts longer than this are
#: prefilled in chunks of this many tokens. Chosen from ``bench/chunked_prefill.py`` (artifacts/chunked_prefill.md):
#: on SmolLM2-135M with the 8x plan, chunks of 1024 kept 7/10 passkeys with the question in the prompt (512: 6,
#: 256: 4, one-shot: 10) at an lm cost within noise, and still bounded peak memory at 8k tokens (0.21 of stock).
#: Because chunking costs retrieval, the default only chunks prompts above 4096 tokens (in chunks of 4096): prompts
#: up to 4k — every shipped plan's figures, and calibration — run one-shot as before; longer ones are bounded.
#: At 6144 tokens (essays_a, artifacts/chunked_prefill_6k.md), passkeys kept with the question in the prompt: one-shot
#: 8/9, chunks of 4096 7/9, 2048 5/9, 1024 3/9 — the largest chunk keeps retrieval best; its memory cost is the
#: first chunk's one-shot peak (0.49 of stock at 1 x 8k vs 0.21 with chunks of 1024).
DEFAULT_PREFILL_CHUNK_SIZE = 4096

AUTO = "auto"

_CACHE_KWARGS = ("cache", "past_key_values")


def resolve_chunk_size(value, plan) -> int | None:
    """The chunk size a plan is applied with: ``"auto"`` is :data:`DEFAULT_PREFILL_CHUNK_SIZE` for a plan that
    changes the cache and off for one with every method off (it stays stock generation, bit for bit); ``None`` or
    ``0`` is off; a positive int is that size. Raises ``ValueError`` for anything else."""
    return _resolve_size("prefill_chunk_size", value, plan, DEFAULT_PREFILL_CHUNK_SIZE)


def _resolve_size(name: str, value, plan, default: int) -> int | None:
    """``"auto"`` -> ``default`` (None for a plan with every method off), ``None``/``0`` -> None, a positive int ->
    itself; ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, str):
        if value != AUTO:
            raise ValueError(f"{name} must be a positive int, 0/None (off) or 'auto', not {value!r}")
        return None if plan.is_noop else default
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a positive int, 0/None (off) or 'auto', not {value!r}")
    return value or None


def chunk_bounds(length: int, size: int) -> list[tuple[int, int]]:
    """``[start, end)`` of the chunks of a ``length``-token forward, aligned on its end: every chunk has ``size``
    tokens except the first (``1..size``)."""
    if length <= 0:
        return []
    first = length - size * ((length - 1) // size)
    return [(0, first)] + [(start, start + size) for start in range(first, length, size)]


class ChunkedPrefill:
    """Forward pre-hook on the causal LM: feeds a long forward to the model in end-aligned chunks (module doc).

    The chunk size is read at every forward from ``owner.prefill_chunk_size`` (the :class:`runtime.apply.AppliedPlan`;
    None: off), so it can be changed while the plan is applied.
    """

    def __init__(self, owner, config, cache_name: str):
        self.owner = owner
        self.config = config
        self.cache_name = cache_name
        self._running = False  # inside the hook's own chunk forwards: they are never chunked again
        self.rows: RowGroupPrefill | None = None  # set by runtime.apply_plan

    def __call__(self, module, args, kwargs):
        size = self.owner.prefill_chunk_size
        if self._running or size is None:
            return None
        if self.rows is not None and self.rows.groups(args, kwargs) is not None:
            return None  # the forward runs in groups of rows (RowGroupPrefill), each chunked on its own
        plan = self._plan(args, kwargs, size)
        if plan is None:
            return None
        name, cache, bounds, past = plan
        self._running = True
        try:
            for start, end in bounds[:-1]:
                step = self._slice(args, kwargs, name, cache, start, end, past)
                step["logits_to_keep"] = 1
                step["use_cache"] = True
                out = module(**step)
                del out  # only the cache is carried on
        finally:
            self._running = False
        start, end = bounds[-1]
        last = self._slice(args, kwargs, name, cache, start, end, past)
        return (), last

    def _plan(self, args, kwargs, size: int):
        """``(cache kwarg name, cache, chunk bounds, tokens already cached)`` when this forward is chunked, else
        None."""
        if len(args) > 1:
            return None
        ids = args[0] if args else kwargs.get("input_ids")
        embeds = kwargs.get("inputs_embeds")
        tokens = ids if ids is not None else embeds
        if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2 or tokens.shape[1] <= size:
            return None
        keep = kwargs.get("logits_to_keep", 0)
        if not isinstance(keep, int) or isinstance(keep, bool) or not 1 <= keep <= size:
            return None
        if kwargs.get("labels") is not None or kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            return None
        if kwargs.get("use_cache") is False:
            return None
        name = next((k for k in _CACHE_KWARGS if k in kwargs), self.cache_name)
        cache = kwargs.get(name)
        if cache is None:
            cache = DynamicCache(config=self.config)
        if not isinstance(cache, Cache):
            return None
        past = cache.get_seq_length()
        length = tokens.shape[1]
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2
                                 or mask.shape[1] != past + length):
            return None
        return name, cache, chunk_bounds(length, size), past

    @staticmethod
    def _slice(args, kwargs, name, cache, start: int, end: int, past: int) -> dict:
        """The keyword arguments of the forward over tokens ``[start, end)`` of this forward."""
        step = dict(kwargs)
        if args:
            step["input_ids"] = args[0]
        for key in ("input_ids", "inputs_embeds"):
            if step.get(key) is not None:
                step[key] = step[key][:, start:end]
        if step.get("attention_mask") is not None:
            step["attention_mask"] = step["attention_mask"][:, : past + end]
        if step.get("position_ids") is not None:
            step["position_ids"] = step["position_ids"][..., start:end]
        if isinstance(step.get("cache_position"), torch.Tensor):  # older transformers
            step["cache_position"] = step["cache_position"][start:end]
        step[name] = cache
        return step


#: Tokens an MLP of the model computes at once in a long forward with a plan applied (``apply_plan(...,
#: mlp_block_tokens="auto")``). A decoder layer's MLP is position-wise, and in a prefill its intermediate
#: activations are the largest tensors alive (gate, up and their product, ``3 x tokens x intermediate`` floats: 72 MiB
#: for 4,096 tokens of SmolLM2-135M, against 9 MiB for the hidden states): fed in blocks of this many tokens, its
#: transient is that of one block. Row blocks of a linear layer give bit-identical outputs on CPU here
#: (tests/test_chunked_prefill.py checks the logits); on other back ends a GEMM may pick another kernel for fewer rows.
DEFAULT_MLP_BLOCK_TOKENS = 1024


def resolve_block_tokens(value, plan) -> int | None:
    """The MLP block size a plan is applied with: ``"auto"`` is :data:`DEFAULT_MLP_BLOCK_TOKENS` for a plan that
    changes the cache, off for one with every method off; ``None`` or ``0`` is off; a positive int is that size.
    Raises ``ValueError`` for anything else."""
    return _resolve_size("mlp_block_tokens", value, plan, DEFAULT_MLP_BLOCK_TOKENS)


_MISSING = object()


class _ForwardWrapper:
    """Set as one module instance's own ``forward`` attribute (``torch.nn.Module.__call__`` calls ``self.forward``;
    the class, its parameters and ``state_dict`` are untouched); wraps whatever ``forward`` the instance had (the bound
    method, or a wrapper of another library such as accelerate's hooks). :meth:`remove` restores exactly that."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self._own = module.__dict__.get("forward", _MISSING)
        self._forward = module.forward

    def _install(self):
        self.module.forward = self
        return self

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is not self:
            return
        if self._own is _MISSING:
            del self.module.forward
        else:
            self.module.forward = self._own


class BlockwiseMLP(_ForwardWrapper):
    """Runs one position-wise MLP module over blocks of tokens (see :data:`DEFAULT_MLP_BLOCK_TOKENS`).

    Set as that module instance's own ``forward`` attribute by :meth:`attach` (``torch.nn.Module.__call__`` calls
    ``self.forward``; the class, its parameters and ``state_dict`` are untouched) and taken off by :meth:`remove`,
    which restores exactly what the instance had. It wraps whatever ``forward`` the instance had (the bound method,
    or a wrapper of another library such as accelerate's offload hooks) and calls it once per block. A forward runs in
    one piece when blocking is off (``owner.mlp_block_tokens`` None), when autograd records it (its saved activations
    would be as large as the ones blocking avoids), or when its input is not ``[B, L, hidden]`` with
    ``B x L > owner.mlp_block_tokens``. Blocks cut the sequence dimension, ``max(1, size // B)`` positions of every row
    each, so a row's tokens are computed the same way whatever the batch.
    """

    def __init__(self, owner, module: torch.nn.Module):
        super().__init__(module)
        self.owner = owner

    @classmethod
    def attach(cls, owner, module: torch.nn.Module) -> BlockwiseMLP:
        return cls(owner, module)._install()

    def __call__(self, hidden, *args, **kwargs):
        size = self.owner.mlp_block_tokens
        if (size is None or args or kwargs or torch.is_grad_enabled() or not isinstance(hidden, torch.Tensor)
                or hidden.dim() != 3 or hidden.shape[0] * hidden.shape[1] <= size):
            return self._forward(hidden, *args, **kwargs)
        bsz, length = hidden.shape[:2]
        step = max(1, size // bsz)
        first = self._forward(hidden[:, :step])
        out = first.new_empty(bsz, length, *first.shape[2:])
        out[:, :step] = first
        del first
        for start in range(step, length, step):
            out[:, start : start + step] = self._forward(hidden[:, start : start + step])
        return out


#: Keyword arguments of a causal LM's forward that a row group takes its own rows of (when their first dimension is the
#: batch); any other tensor argument makes a forward run in one piece.
_ROW_KWARGS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids")
#: Tensor arguments that are the same for every row.
_SHARED_KWARGS = ("cache_position",)


class RowGroupPrefill(_ForwardWrapper):
    """Runs the prefill of a batch in groups of rows, so that one forward computes at most ``prefill_chunk_size``
    tokens whatever the batch size (as serving engines bound the tokens of a prefill step).

    A forward qualifies when it starts a fresh transformers ``DynamicCache`` (``runtime.cache.can_join_rows``), asks
    for no attentions, hidden states or loss, and ``B`` rows x ``min(L, C)`` tokens exceed ``C``
    (``C = owner.prefill_chunk_size``; None: off; ``owner.prefill_row_groups`` False: off). It then runs as forwards of ``max(1, C // min(L, C))`` rows each
    (each row group with its own fresh cache, chunked by :class:`ChunkedPrefill` when ``L > C``), joins the groups'
    caches row-wise into the forward's cache (``runtime.cache.join_cache_rows``: each plan layer's ``join_rows``) and
    returns the last group's output with the logits of every group, one after the other. A row's tokens go through
    the same computations as in one forward over the whole batch (every row of a padded batch equals its solo run),
    so the joined cache holds what that forward would have left; what changes is the peak memory: the
    activations, rotary and attention temporaries of one group instead of the batch.

    Set as the model instance's own ``forward`` attribute by :meth:`attach` (as :class:`BlockwiseMLP` is for MLPs;
    the class is untouched), with the wrapped forward's signature (``generate`` reads it), and taken off by
    :meth:`remove`.
    """

    def __init__(self, owner, model: torch.nn.Module, cache_name: str):
        super().__init__(model)
        self.owner = owner
        self.cache_name = cache_name
        self.__signature__ = inspect.signature(self._forward)
        self._running = False  # inside the groups' own forwards: never grouped again

    @classmethod
    def attach(cls, owner, model: torch.nn.Module, cache_name: str) -> RowGroupPrefill:
        return cls(owner, model, cache_name)._install()

    def groups(self, args, kwargs) -> tuple[list[slice], str, Cache | None] | None:
        """``(row slices, cache kwarg name, cache or None)`` when this forward runs in row groups, else None."""
        size = self.owner.prefill_chunk_size
        if (self._running or size is None or not self.owner.prefill_row_groups or len(args) > 1
                or torch.is_grad_enabled()):
            return None
        tokens = args[0] if args else kwargs.get("input_ids")
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2:
            return None
        bsz, length = tokens.shape[:2]
        rows = max(1, size // max(1, min(length, size)))
        if rows >= bsz:
            return None
        keep = kwargs.get("logits_to_keep", 0)
        if not isinstance(keep, int) or isinstance(keep, bool):
            return None
        if kwargs.get("labels") is not None or kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            return None
        if kwargs.get("use_cache") is False or kwargs.get("return_dict") is False:
            return None
        name = next((k for k in _CACHE_KWARGS if k in kwargs), self.cache_name)
        cache = kwargs.get(name)
        if cache is not None and not (isinstance(cache, Cache) and can_join_rows(cache)):
            return None
        for key, value in kwargs.items():
            if key == name or key in _SHARED_KWARGS or not isinstance(value, torch.Tensor):
                continue
            if key not in _ROW_KWARGS or value.dim() < 1 or value.shape[0] not in (1, bsz):
                return None  # an argument this wrapper does not know how to cut by rows
        mask = kwargs.get("attention_mask")
        if mask is not None and (mask.dim() != 2 or mask.shape[0] != bsz):
            return None
        return [slice(start, min(start + rows, bsz)) for start in range(0, bsz, rows)], name, cache

    def __call__(self, *args, **kwargs):
        found = self.groups(args, kwargs)
        if found is None:
            return self._forward(*args, **kwargs)
        slices, name, cache = found
        if args:
            kwargs = dict(kwargs, input_ids=args[0])
        if cache is None:
            cache = DynamicCache(config=self.module.config)
        bsz = next(kwargs[k] for k in ("input_ids", "inputs_embeds") if kwargs.get(k) is not None).shape[0]
        parts, logits = [], []
        self._running = True
        try:
            for rows in slices:
                step = {
                    key: value[rows] if key in _ROW_KWARGS and isinstance(value, torch.Tensor) and value.shape[0] == bsz
                    else value
                    for key, value in kwargs.items()
                }
                step[name] = copy.deepcopy(cache)  # fresh, of the same structure
                out = self.module(**step)
                parts.append(step[name])
                logits.append(out.logits)
                del step
        finally:
            self._running = False
        join_cache_rows(cache, parts)
        del parts
        out.logits = torch.cat(logits, dim=0)
        fields = {field.name for field in dataclasses.fields(out)} if dataclasses.is_dataclass(out) else ()
        for key in _CACHE_KWARGS:  # ``cache`` in recent transformers' outputs, ``past_key_values`` before
            if key in fields:
                setattr(out, key, cache)
        return out


def position_wise_mlps(decoder_layers) -> list[torch.nn.Module]:
    """The MLP of each decoder layer that is position-wise for sure: a module named ``mlp`` whose class name ends in
    ``MLP`` (Llama, Mistral, Qwen2, Phi3, Gemma3, ... MLPs). Mixture-of-experts blocks and unknown modules are left
    alone."""
    found = []
    for layer in decoder_layers:
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, torch.nn.Module) and type(mlp).__name__.endswith("MLP"):
            found.append(mlp)
    return found


__all__ = [
    "AUTO", "BlockwiseMLP", "ChunkedPrefill", "DEFAULT_MLP_BLOCK_TOKENS", "DEFAULT_PREFILL_CHUNK_SIZE", "RowGroupPrefill",
    "chunk_bounds", "position_wise_mlps", "resolve_block_tokens", "resolve_chunk_size",
]
