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

import math

import torch
from transformers.cache_utils import DynamicLayer

from .layers import Held, LayerPlan, PlanLayer
from .schema import MethodSpec, ParamSpec, TensorContext, TensorSpec


class SharedLayer(DynamicLayer, PlanLayer):
    """Cache layer that stores nothing and hands out the cache of its ``source`` layer.

    ``keys``/``values`` stay ``None`` (nothing is held); ``update`` returns the source's held K/V
    ``[B, H_kv, T, d]``, read through the source's :class:`PlanLayer` interface (whatever its storage). Lengths and
    mask sizes are the source's; attention is the source's ``reader_attention`` (a budgeted source lets the
    reader's queries vote on what it keeps).
    """

    def __init__(self, source_idx: int, source: PlanLayer):
        super().__init__()
        self.source_idx = source_idx
        self.source = source
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.source.holds_anything():
            raise RuntimeError(
                f"kvplan: a sharing layer ran before its source layer {self.source_idx} cached anything; "
                "the sharing map must point at earlier layers"
            )
        return self.source.current_kv()

    # ----- the plan-layer interface: everything is the source's ----------------------------------------------
    def attention(self, query, mask, scaling, exact):
        return self.source.reader_attention(query, mask, scaling, exact)

    def held(self) -> Held:
        return self.source.held()

    def holds_anything(self) -> bool:
        return self.source.holds_anything()

    def physical_bytes(self, by_device: bool = False):
        return {} if by_device else 0  # holds nothing of its own

    def kept_lengths(self) -> torch.Tensor:
        return self.source.kept_lengths()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def get_seq_length(self) -> int:
        return self.source.get_seq_length()

    def get_mask_sizes(self, *args) -> tuple[int, int]:
        return self.source.get_mask_sizes(*args)

    @property
    def reads_own_columns_only(self) -> bool:
        return self.source.reads_own_columns_only

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

    def join_rows(self, others: list) -> None:
        pass  # the source joins its own rows

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


# ----------------------------------------------------------------------------------------------------------
# The registration: plan schema, parameters, runtime hook
# ----------------------------------------------------------------------------------------------------------

ORDERS = ("dissimilar", "similar", "random", "attention_error")
METRICS = ("flattened_l2", "mean_per_vector_l2")


def parse_share_layers(value) -> float | int | str:
    """``auto``, an integer count >= 0, or a fraction in (0, 1) (strings from the command line too)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        try:
            value = int(text) if text.isdigit() else float(text)
        except ValueError:
            raise ValueError(f"--share-layers takes a count, a fraction in (0, 1) or 'auto', not {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"--share-layers takes a count, a fraction in (0, 1) or 'auto', not {value!r}")
    if isinstance(value, float) and value.is_integer() and value >= 1:
        value = int(value)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"--share-layers count must be >= 0, got {value}")
        return value
    if not 0.0 < value < 1.0:
        raise ValueError(f"--share-layers fraction must be in (0, 1), got {value}")
    return float(value)


def _layer_kinds(fingerprint) -> list[str]:
    """Attention type of every layer as the fingerprint describes it (``full_attention`` unless it says otherwise)."""
    kinds = fingerprint.get("layer_types")
    if kinds is None:
        kind = "sliding_attention" if fingerprint.get("sliding_window") else "full_attention"
        kinds = [kind] * int(fingerprint["num_hidden_layers"])
    return list(kinds)


def _check_share_source(values: torch.Tensor, context: TensorContext) -> str | None:
    """``0 <= s[l] <= l``, every source owns its cache (``s[s[l]] == s[l]``), only full-attention layers share (a
    sliding-window source trims its cache as it updates, so a reader could not see what the source saw)."""
    sources = [int(v) for v in values.tolist()]
    for layer, source in enumerate(sources):
        if not 0 <= source <= layer:
            return f"layer {layer} has source {source}; a source must satisfy 0 <= source <= layer"
        if sources[source] != source:
            return (
                f"layer {layer} shares layer {source}, which itself shares layer {sources[source]}; "
                "chains must be resolved (every source owns its cache)"
            )
    kinds = _layer_kinds(context.fingerprint)
    for layer, source in enumerate(sources):
        if source != layer and (kinds[layer] != "full_attention" or kinds[source] != "full_attention"):
            return (
                f"layer {layer} ({kinds[layer]}) shares layer {source} ({kinds[source]}); only full-attention "
                "layers can share a cache"
            )
    return None


def _check_non_negative(values: torch.Tensor, context: TensorContext) -> str | None:
    if bool((values < 0).any()):
        return "values must be >= 0"
    return None


_LOG_COLUMNS = ("target", "source", "distance", "cosine", "top1", "kl", "accepted")


def _check_search_log(values: torch.Tensor, context: TensorContext) -> str | None:
    """Rows ``target, source, distance, cosine, top-1, KL, accepted`` of the greedy search."""
    layers = int(context.fingerprint["num_hidden_layers"])
    if values.numel() == 0:
        return None
    target, source, distance, cosine, top1, kl, accepted = values.unbind(dim=1)
    tol = 1e-4
    problems = [
        ("target", (target < 0) | (target >= layers) | (target != target.round())),
        ("source", (source < 0) | (source >= layers) | (source != source.round())),
        ("distance", distance < 0),
        ("cosine", (cosine < -1 - tol) | (cosine > 1 + tol)),
        ("top1", (top1 < 0) | (top1 > 1)),
        ("kl", kl < -tol),
        ("accepted", (accepted != 0) & (accepted != 1)),
    ]
    bad = [name for name, mask in problems if bool(mask.any())]
    return f"column(s) {', '.join(bad)} out of range" if bad else None


def configure(plan, layers: list[LayerPlan], config) -> None:
    """Point every sharing layer at its source (its own selection is dropped: the source's applies) and count
    each source's readers."""
    sources = [int(s) for s in plan.tensors["kvsharer.share_source"].tolist()]
    for layer, source in zip(layers, sources):
        layer.source = source
        if source != layer.index:
            layer.selection = None
            layers[source].readers += 1


METHOD = MethodSpec(
    name="kvsharer",
    description="KVSharer: some layers reuse the KV cache of an earlier layer instead of storing their own",
    tensors=(
        TensorSpec("kvsharer.share_source", torch.int32, ("L",), _check_share_source,
                   "source layer of each layer's cache (l when layer l owns its cache)"),
        TensorSpec("kvsharer.distance", torch.float32, (2, "L", "L"), _check_non_negative,
                   "calibration: K (0) and V (1) distances of the averaged caches, i > j", required=False),
        TensorSpec("kvsharer.search_log", torch.float32, ("*", 7), _check_search_log,
                   "calibration: every candidate of the greedy search (" + ", ".join(_LOG_COLUMNS) + ")",
                   required=False),
        TensorSpec("kvsharer.attention_error", torch.float32, ("L", "L"), _check_non_negative,
                   "calibration: change of layer i's attention output when it reads layer j's cache",
                   required=False),
    ),
    params=(
        ParamSpec("share_layers", "str", "auto", "layers to share: a count, a fraction of the layers, or auto "
                  "(alone: a quarter of the layers; with pyramidinfer: the split of the target is searched)",
                  stage="calibration", parse=parse_share_layers),
        ParamSpec("threshold", "float", 0.95, "smallest mean cosine of the final hidden states (vs the full model) "
                  "a candidate map may have", minimum=0.0, maximum=1.0, stage="calibration"),
        ParamSpec("distance_tokens", "int", 256, "positions of each sample whose K/V are averaged for the "
                  "distances", minimum=1, stage="calibration"),
        ParamSpec("accept_samples", "int", 2, "calibration windows each candidate is scored on", minimum=1,
                  stage="calibration"),
        ParamSpec("accept_tokens", "int", 512, "tokens of each acceptance window", minimum=1, stage="calibration"),
        ParamSpec("max_trials", "int", 48, "most candidates tried (each costs one run over the acceptance "
                  "windows)", minimum=1, stage="calibration"),
        ParamSpec("order", "str", "dissimilar", "order in which pairs are tried (dissimilar: the paper's)",
                  choices=ORDERS, stage="calibration"),
        ParamSpec("metric", "str", "flattened_l2", "distance of averaged caches (flattened_l2: the paper's; "
                  "mean_per_vector_l2: the official code's)", choices=METRICS, stage="calibration"),
        ParamSpec("seed", "int", 0, "seed of the random order (the recipe's seed by default)", minimum=0,
                  stage="calibration"),
    ),
    configure=configure,
    calibration_step="calibrate.kvsharer:calibration_step",
    calibration_order=0,
    card_column=("cache source", "kvsharer.share_source", str),
)


__all__ = [
    "METHOD", "SharedLayer", "SkippedProjection", "parse_share_layers", "skip_projections", "restore_projections",
]
