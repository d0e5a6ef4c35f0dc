"""Apply a plan to a transformers model, and take it off again.

``apply_plan(model, plan)`` validates the plan against the model, registers kvplan's attention function, switches
the model to it, and adds one forward pre-hook (and one post-hook) on the model's decoder. The pre-hook makes sure
the forward has a cache (creating transformers' ``DynamicCache`` when ``use_cache`` is on and none was given),
swaps that cache's layers for the plan's layer kinds while it is still empty, and passes it to the attention
function as the ``kvplan_cache`` keyword. After that, plain ``model.generate(...)`` uses the plan.
``remove_plan(model)`` (or leaving the ``with`` block) restores the previous attention implementation and removes
the hooks. Nothing of transformers is patched.

A prompt longer than ``prefill_chunk_size`` tokens (default :data:`runtime.chunking.DEFAULT_PREFILL_CHUNK_SIZE` for a
plan that changes the cache) is prefilled in chunks, compressed between chunks, by a forward pre-hook on the model
(``runtime/chunking.py``): peak memory is the plan's budget plus one chunk, not the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicCache

from . import attention
from .chunking import (
    AUTO, BlockwiseMLP, ChunkedPrefill, RowGroupPrefill, position_wise_mlps, resolve_block_tokens, resolve_chunk_size,
)
from .cache import cache_argument, install_plan_layers, layer_plans
from .kvsharer import restore_projections, skip_projections
from .layers import PlanLayer
from .plan import Plan, PlanError, load_plan

_CACHE_KWARGS = ("cache", "past_key_values")


@dataclass
class AppliedPlan:
    """Handle of a plan applied to a model; also a context manager that removes it on exit.

    ``prefill_chunk_size``: a forward over more new tokens than this is prefilled in chunks of this many tokens
    (``runtime/chunking.py``); None feeds every forward in one piece. ``mlp_block_tokens``: the decoder layers'
    MLPs compute at most this many tokens at once (``runtime.chunking.BlockwiseMLP``); None: all at once.
    ``prefill_row_groups``: a batched prefill of more than ``prefill_chunk_size`` tokens per forward runs in groups of
    rows, joined afterwards (``runtime.chunking.RowGroupPrefill``; needs ``prefill_chunk_size``). All three may be
    changed while the plan is applied.
    """

    model: torch.nn.Module
    plan: Plan
    previous_attn_implementation: str | None
    prefill_chunk_size: int | None = None
    mlp_block_tokens: int | None = None
    prefill_row_groups: bool = True
    _handles: list = field(default_factory=list, repr=False)
    _swapped: list = field(default_factory=list, repr=False)
    active: bool = True

    def remove(self) -> None:
        """Undo :func:`apply_plan`: hooks removed, previous attention implementation restored."""
        if not self.active:
            return
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        restore_projections(self._swapped)
        self._swapped.clear()
        if self.previous_attn_implementation is not None:
            self.model.set_attn_implementation(self.previous_attn_implementation)
        self.active = False

    def __enter__(self) -> AppliedPlan:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class _CacheHook:
    """Decoder forward pre-hook: give the forward a plan cache and hand it to the attention function."""

    def __init__(self, applied: AppliedPlan, model: torch.nn.Module, layers):
        self.applied = applied
        self.layer_specs = layers
        # a sharing layer's k/v projections are skipped, so it needs its source's cache even without use_cache
        self.needs_cache = any(not spec.owns_cache for spec in self.layer_specs)
        self.config = model.config
        self.cache_name = cache_argument(_decoder(model))  # `cache` in recent transformers, `past_key_values` before

    def __call__(self, module, args, kwargs):
        _refuse_empty_input(args, kwargs)
        name = next((k for k in _CACHE_KWARGS if k in kwargs), self.cache_name)
        cache = kwargs.get(name)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", True)
        if cache is None and (use_cache or self.needs_cache):
            cache = DynamicCache(config=self.config)
            kwargs[name] = cache
        if isinstance(cache, Cache):
            if install_plan_layers(cache, self.layer_specs):
                kwargs[attention.CACHE_KWARG] = cache
            elif self.needs_cache:
                raise PlanError(
                    "kvplan: this forward continues a cache filled without the plan, but the plan's sharing layers "
                    "skip their k/v projections and need their source layers' cache; start from an empty cache"
                )
        return args, kwargs


def _refuse_empty_input(args, kwargs) -> None:
    """A forward over zero tokens has nothing to attend to; say so instead of failing deep inside a reshape."""
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if isinstance(tokens, torch.Tensor) and tokens.dim() >= 2 and tokens.shape[1] == 0:
        raise ValueError(
            "kvplan: the input has 0 tokens; a causal LM needs at least one token to start from "
            "(tokenize with add_special_tokens=True to get the BOS token, or apply the chat template)"
        )


def _check_compressed(module, args, kwargs, output) -> None:
    """Decoder forward post-hook: every plan layer checks that the forward left it consistent (e.g. a budgeted
    layer filled but never compressed means the attention function never saw the cache: an architecture that does
    not forward keyword arguments to attention)."""
    cache = kwargs.get(attention.CACHE_KWARG)
    if cache is None:
        return
    for idx, layer in enumerate(cache.layers):
        if isinstance(layer, PlanLayer):
            layer.check_forward(idx, type(module).__name__)


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    getter = getattr(model, "get_decoder", None)
    decoder = getter() if callable(getter) else None
    if decoder is None or not hasattr(decoder, "layers"):
        decoder = getattr(model, "model", None)
    if decoder is None or not hasattr(decoder, "layers"):
        raise PlanError(f"kvplan cannot find the decoder layers of {type(model).__name__}")
    return decoder


def _unsupported(config) -> str | None:
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if getattr(cfg, "attn_logit_softcapping", None):
        return "attention logit soft-capping (Gemma 2)"
    return None


def find_applied(model: torch.nn.Module) -> AppliedPlan | None:
    """The :class:`AppliedPlan` currently on ``model``, found through the decoder's own hook table."""
    for hook in _decoder(model)._forward_pre_hooks.values():
        if isinstance(hook, _CacheHook) and hook.applied.active:
            return hook.applied
    return None


def apply_plan(
    model: torch.nn.Module,
    plan: Plan | str,
    prefill_chunk_size: int | str | None = AUTO,
    mlp_block_tokens: int | str | None = AUTO,
) -> AppliedPlan:
    """Apply ``plan`` (a :class:`Plan`, a file path or a Hub repo id) to ``model``; returns a removable handle.

    ``prefill_chunk_size``: a forward over more new tokens than this (the prefill of ``generate``) is fed in chunks
    of this many tokens, the cache compressed after each, and a batched prefill of more than this many tokens per
    forward runs in groups of rows joined afterwards (``runtime/chunking.py``). ``"auto"`` (default):
    :data:`runtime.chunking.DEFAULT_PREFILL_CHUNK_SIZE` for a plan that changes the cache, off for a plan with every
    method off; ``None`` or ``0``: off (one-shot prefill); a positive int: that size. ``ValueError`` otherwise.
    ``mlp_block_tokens``: in a forward over more tokens than this (batch x length), each decoder layer's
    position-wise MLP runs over blocks of this many tokens, so its intermediate activations are those of one block
    (``runtime.chunking.BlockwiseMLP``); same values as ``prefill_chunk_size`` (``"auto"``:
    :data:`runtime.chunking.DEFAULT_MLP_BLOCK_TOKENS`, off for a plan with every method off).

    Raises :class:`PlanError` if the plan was made for another architecture or shape, if it enables a method this
    runtime cannot apply (it is refused whole, never applied without that method), or if a plan is already
    applied to this model.
    """
    if not isinstance(plan, Plan):
        plan = load_plan(plan)
    chunk_size = resolve_chunk_size(prefill_chunk_size, plan)
    block_tokens = resolve_block_tokens(mlp_block_tokens, plan)
    plan.validate(model)
    layers = layer_plans(plan, model.config)  # refuses methods this runtime cannot apply
    if find_applied(model) is not None:
        raise PlanError("a plan is already applied to this model; call runtime.remove_plan(model) first")
    reason = _unsupported(model.config) if not plan.is_noop else None
    if reason is not None:
        raise PlanError(f"kvplan's runtime does not support {reason} yet")
    previous = getattr(model.config, "_attn_implementation", None)
    name = attention.register()
    model.set_attn_implementation(name)
    applied = AppliedPlan(model=model, plan=plan, previous_attn_implementation=previous,
                          prefill_chunk_size=chunk_size, mlp_block_tokens=block_tokens)
    decoder = _decoder(model)
    sources = [spec.source for spec in layers]
    applied._swapped = skip_projections(decoder.layers, sources)
    applied._handles.append(
        decoder.register_forward_pre_hook(_CacheHook(applied, model, layers), with_kwargs=True, prepend=True)
    )
    applied._handles.append(decoder.register_forward_hook(_check_compressed, with_kwargs=True))
    if decoder is not model:  # a model whose decoder is itself (no LM head) is not chunked
        chunker = ChunkedPrefill(applied, model.config, cache_argument(model))
        applied._handles.append(model.register_forward_pre_hook(chunker, with_kwargs=True, prepend=True))
        if not plan.is_noop:  # batched prefills in groups of rows (RowGroupPrefill); stock for an all-off plan
            chunker.rows = RowGroupPrefill.attach(applied, model, cache_argument(model))
            applied._handles.append(chunker.rows)
    if not plan.is_noop:  # a plan with every method off stays stock generation, bit for bit
        applied._handles.extend(BlockwiseMLP.attach(applied, mlp) for mlp in position_wise_mlps(decoder.layers))
    return applied


def remove_plan(model: torch.nn.Module) -> bool:
    """Remove the plan applied to ``model``; returns False if none was applied."""
    applied = find_applied(model)
    if applied is None:
        return False
    applied.remove()
    return True
