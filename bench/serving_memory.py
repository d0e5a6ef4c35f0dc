"""KV memory that serving engines would realise for kvplan plans, computed from each plan's tensors alone.

    python bench/serving_memory.py                          # the shipped SmolLM2-135M plans, context 2048
    python bench/serving_memory.py PLAN [PLAN ...] --context 2048,8192 --batch 8 --block-size 16 --json out.json

No model and no engine runs: every number is arithmetic on the plan (its fingerprint, sharing map, budgets) and on
each engine's cache-allocation rules as read in its source (``docs/serving.md`` cites them). For every plan and
context the table gives the K/V bytes an engine model holds for ``--batch`` sequences of ``--context`` tokens,
divided by what the same engine holds for the same model without the plan (its stock cache):

- ``kvplan``: kvplan's own runtime inside transformers' ``generate``: ``runtime.inspect.describe`` (the runtime's
  theoretical bytes, ``runtime.cache.theoretical_bytes``; no slack, no bookkeeping). Its ratio leaves out the
  values KCache moves to its value store; ``kvplan +moved`` counts them (moved off the model's device, not removed).
- ``vllm-sharing``: vLLM 0.33 running the plan's KVSharer map as ``kv_sharing_target_layer_name`` (which needs an
  out-of-tree model class): a sharing layer gets no KV-cache spec and no blocks; every owning layer keeps its
  model's cache (full attention, or its native sliding window) in blocks of ``--block-size`` tokens. PyramidInfer,
  KV-Compress and KCache are not applied.
- ``vllm-windows``: the same, and every owning layer the plan budgets gets a sliding window as wide as the tokens
  it holds at that context (kvplan's theoretical tokens of the layer; for KV-Compress layers the mean over heads,
  rounded up). Counted with vLLM's hybrid allocator rules: one KV-cache group per distinct window (plus one for
  full attention), groups split to equal layer counts, one block id spanning the largest group's layers, and the
  blocks wholly before a window freed. A window keeps the last W tokens, not the tokens PyramidInfer or KV-Compress
  select, and is sized for this one context: the bytes match, the tokens and the fidelity do not (untested).
- ``per-head-paged``: a hypothetical engine whose blocks belong to one (sequence, layer, KV head), the layout of the
  KV-Compress vLLM fork, given the plan's per-head budgets as fixed quotas and the sharing map: every (owning layer,
  KV head) holds ``ceil(budget / block)`` blocks. No released engine does this with offline budgets.

KCache's moved values only count in the ``kvplan`` row: no engine model here moves single value rows per decode
step, so their values stay on the device. Output: a markdown table per context on stdout, every number (bytes,
blocks, vLLM's groups and windows) with ``--json PATH``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import runtime  # noqa: E402
from runtime.cache import theoretical_layers  # noqa: E402
from runtime.inspect import DTYPES, describe  # noqa: E402
from runtime.inspect import _config as plan_config  # noqa: E402  (the config inspect rebuilds from a fingerprint)
from runtime.kvcompress import HeadParams  # noqa: E402

EXIT_OK, EXIT_USAGE = 0, 2

#: the shipped SmolLM2-135M plans (repository-relative): the three ``--methods all`` plans (they share no layer),
#: single-method plans, and KVSharer plans that do share layers
DEFAULT_PLANS = (
    "artifacts/smollm2-135m-all-2x",
    "artifacts/smollm2-135m-all-4x",
    "artifacts/smollm2-135m-all-8x",
    "artifacts/smollm2-135m-r0.25.safetensors",
    "artifacts/smollm2-135m-kvcompress-r0.25.safetensors",
    "artifacts/smollm2-135m-kvcompress-r0.25-kcache.safetensors",
    "artifacts/smollm2-135m-pyramid-kvsharer-r0.25.safetensors",
    "artifacts/smollm2-135m-kvsharer-dissimilar.safetensors",
    "artifacts/smollm2-135m-kvsharer-dissimilar-threshold.safetensors",
)

ENGINES = ("kvplan", "vllm-sharing", "vllm-windows", "per-head-paged")
ENGINE_TITLES = {
    "kvplan": "kvplan runtime (transformers)",
    "vllm-sharing": "vLLM 0.33: sharing only (out-of-tree model)",
    "vllm-windows": "vLLM 0.33: sharing + per-layer windows (out-of-tree model)",
    "per-head-paged": "per-head paged engine (hypothetical, KV-Compress fork's layout)",
}


class UsageError(Exception):
    """Bad input: printed as one ``error:`` line, exit status 2."""


# ----------------------------------------------------------------------------------------------------------
# What each layer of a plan holds
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerHold:
    """What one decoder layer holds under a plan after ``context`` tokens, per sequence.

    Attributes:
        index: the layer.
        kind: the model's attention type of the layer (``full_attention`` or ``sliding_attention``).
        source: the layer whose cache it reads (its own index when it owns its cache; KVSharer).
        tokens: tokens it holds per KV head, as kvplan's theoretical accounting counts them (0 for a sharing layer;
            for a KV-Compress layer the mean over its heads).
        head_tokens: tokens each KV head holds (all equal unless KV-Compress gives the heads different budgets).
        native: tokens the model's stock cache holds in this layer (the context, or its sliding window).
        budgeted: True when the plan keeps fewer tokens than the stock cache in this layer.
    """

    index: int
    kind: str
    source: int
    tokens: float
    head_tokens: tuple[int, ...]
    native: int
    budgeted: bool

    @property
    def owns_cache(self) -> bool:
        return self.source == self.index


def layer_holds(plan: runtime.Plan, context: int) -> list[LayerHold]:
    """Per layer, what ``plan`` holds after ``context`` tokens: kvplan's own accounting
    (``runtime.cache.theoretical_layers``), with KV-Compress's per-head budgets (``HeadParams.budget``)."""
    fingerprint = plan.fingerprint
    config = plan_config(fingerprint)
    heads = int(fingerprint["num_key_value_heads"])
    window = fingerprint["sliding_window"]
    holds = []
    for spec, tokens in theoretical_layers(plan, config, context):
        native = min(context, window) if spec.kind != "full_attention" and window else context
        if not spec.owns_cache:
            head_tokens = (0,) * heads
        elif isinstance(spec.selection, HeadParams):
            head_tokens = tuple(int(t) for t in spec.selection.budget(torch.tensor(context)).tolist())
        else:
            head_tokens = (math.ceil(float(tokens) - 1e-9),) * heads
        holds.append(LayerHold(index=spec.index, kind=spec.kind, source=spec.source, tokens=float(tokens),
                               head_tokens=head_tokens, native=native,
                               budgeted=spec.owns_cache and float(tokens) < native))
    return holds


# ----------------------------------------------------------------------------------------------------------
# Engine models
# ----------------------------------------------------------------------------------------------------------


def sliding_blocks(context: int, window: int, block: int) -> int:
    """Blocks a vLLM sliding-window layer holds for a sequence of ``context`` cached tokens: the blocks covering
    tokens ``[context - window, context)``; blocks wholly before that range are freed
    (``SlidingWindowManager.get_num_skipped_tokens`` + ``remove_skipped_blocks``)."""
    return math.ceil(context / block) - max(0, context - window) // block


def full_blocks(context: int, block: int) -> int:
    """Blocks a full-attention layer holds for ``context`` cached tokens."""
    return math.ceil(context / block)


def vllm_groups(layers: Sequence[tuple[int, int | None]]) -> list[dict[str, Any]]:
    """vLLM 0.33's KV-cache groups for layers with equal page sizes, given ``(layer, window)`` for each layer that
    owns a cache (window None: full attention); sharing layers are left out (they get no KV-cache spec).

    Mirrors ``_get_kv_cache_groups_uniform_spec`` (one spec: one group of every layer) and
    ``_get_kv_cache_groups_uniform_page_size`` (``vllm/v1/core/kv_cache_planning.py``): layers are bucketed by spec in
    layer order; the group size is the smallest bucket (the largest when it is under 1.5 x the smallest); a
    bucket of ``n`` layers becomes ``ceil(n / size)`` groups, group ``i`` taking every ``groups``-th layer from ``i``.
    Returns ``[{"window": W or None, "layers": [layer indices]}]``.
    """
    buckets: dict[int | None, list[int]] = {}
    for layer, window in layers:
        buckets.setdefault(window, []).append(layer)
    if len(buckets) <= 1:
        return [{"window": window, "layers": members} for window, members in buckets.items()]
    smallest = min(len(members) for members in buckets.values())
    largest = max(len(members) for members in buckets.values())
    size = largest if largest < smallest * 1.5 else smallest
    groups = []
    for window, members in buckets.items():
        count = math.ceil(len(members) / size)
        groups += [{"window": window, "layers": members[i::count]} for i in range(count)]
    return groups


def vllm_layer_blocks(layers: Sequence[tuple[int, int | None]], context: int, block: int) -> dict[str, Any]:
    """Per sequence: vLLM's groups for ``(layer, window)`` pairs (see :func:`vllm_groups`), the blocks each group
    holds after ``context`` tokens, and ``layer_blocks``: the blocks times the layers one block id spans (every
    group's block is as large as the largest group's: ``_get_kv_cache_bytes_per_block``). Bytes = ``layer_blocks``
    x one layer's page (``block`` tokens of K and V of every KV head)."""
    groups = vllm_groups(layers)
    span = max((len(group["layers"]) for group in groups), default=0)
    for group in groups:
        window = group["window"]
        group["blocks"] = full_blocks(context, block) if window is None else sliding_blocks(context, window, block)
    return {"groups": groups, "layers_per_block": span, "layer_blocks": span * sum(g["blocks"] for g in groups)}


def _native_window(hold: LayerHold, window: int | None) -> int | None:
    """The vLLM window of a layer's stock cache: the model's sliding window for a sliding layer, else None."""
    return window if hold.kind != "full_attention" and window else None


def _plan_window(hold: LayerHold, window: int | None) -> int | None:
    """The window that holds what the plan keeps in a layer at the context ``hold`` was computed for (None: full
    attention). A budgeted layer gets ``ceil(tokens)``, never more than its own sliding window; any other layer
    keeps its stock cache."""
    native = _native_window(hold, window)
    if not hold.budgeted:
        return native
    width = max(1, math.ceil(hold.tokens - 1e-9))
    return min(width, native) if native is not None else width


def engine_bytes(plan: runtime.Plan, holds: list[LayerHold], context: int, batch: int, block: int,
                 dtype: torch.dtype) -> dict[str, dict[str, Any]]:
    """Bytes on the device (``bytes``), bytes moved off it (``moved``) and the same engine's stock bytes
    (``stock``) for ``batch`` sequences of ``context`` tokens, per engine model of :data:`ENGINES` except
    ``kvplan``; paged engines round every cache up to whole blocks of ``block`` tokens."""
    fingerprint = plan.fingerprint
    heads, head_dim = int(fingerprint["num_key_value_heads"]), int(fingerprint["head_dim"])
    window = fingerprint["sliding_window"]
    token_bytes = 2 * head_dim * torch.tensor([], dtype=dtype).element_size()  # K + V of one token, one KV head
    page = block * heads * token_bytes  # one layer's block: K and V of every KV head

    owners = [hold for hold in holds if hold.owns_cache]
    plan_windows = [(h.index, _plan_window(h, window)) for h in owners]
    stock = vllm_layer_blocks([(h.index, _native_window(h, window)) for h in holds], context, block)
    sharing = vllm_layer_blocks([(h.index, _native_window(h, window)) for h in owners], context, block)
    windows = vllm_layer_blocks(plan_windows, context, block)

    head_stock = sum(heads * math.ceil(h.native / block) for h in holds)
    head_plan = sum(math.ceil(t / block) for h in owners for t in h.head_tokens)

    def entry(layer_blocks: int, stock_blocks: int, unit: int, **details: Any) -> dict[str, Any]:
        return {"bytes": layer_blocks * unit * batch, "moved": 0, "stock": stock_blocks * unit * batch, **details}

    return {
        "vllm-sharing": entry(sharing["layer_blocks"], stock["layer_blocks"], page, groups=sharing["groups"],
                              stock_groups=stock["groups"]),
        "vllm-windows": entry(windows["layer_blocks"], stock["layer_blocks"], page, groups=windows["groups"],
                              stock_groups=stock["groups"],
                              windows=[{"layer": layer, "window": w} for layer, w in plan_windows]),
        "per-head-paged": entry(head_plan, head_stock, block * token_bytes, head_blocks=head_plan,
                                stock_head_blocks=head_stock),
    }


# ----------------------------------------------------------------------------------------------------------
# One plan, every engine
# ----------------------------------------------------------------------------------------------------------


def plan_label(path: Path) -> str:
    """Short name of a plan: its folder's or file's name without ``.safetensors``."""
    return path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name


def measure(plan: runtime.Plan, context: int, batch: int = 1, block: int = 16,
            dtype: str | None = None) -> dict[str, Any]:
    """Every engine model's bytes for ``plan`` at ``context`` tokens x ``batch`` sequences (``dtype``: K/V dtype,
    default the plan's as ``inspect`` resolves it); each engine's ``ratio`` is its bytes on the device divided by
    its own stock bytes."""
    if context < 1 or batch < 1 or block < 1:
        raise ValueError(f"context, batch and block size must be positive, got {context}, {batch}, {block}")
    described = describe(plan, context=context, batch=batch, dtype=dtype)
    kv = described["kv_bytes"]
    holds = layer_holds(plan, context)
    engines = {"kvplan": {"bytes": kv["with_model"], "moved": kv["value_store"], "stock": kv["stock"]}}
    engines.update(engine_bytes(plan, holds, context, batch, block, DTYPES[kv["dtype"]]))
    for values in engines.values():
        values["ratio"] = values["bytes"] / values["stock"]
        values["moved_ratio"] = values["moved"] / values["stock"]
    return {
        "methods": list(plan.methods),
        "target_ratio": plan.target_ratio,
        "layers": plan.num_layers,
        "shared_layers": sum(1 for h in holds if not h.owns_cache),
        "context": context,
        "batch": batch,
        "block_size": block,
        "dtype": kv["dtype"],
        "engines": engines,
        "layer_tokens": [{"layer": h.index, "source": h.source, "tokens": round(h.tokens, 3),
                          "head_tokens": list(h.head_tokens)} for h in holds],
    }


def load(path: Path) -> runtime.Plan:
    """The plan at ``path`` (a ``.safetensors`` file or a plan folder); :class:`UsageError` when there is none."""
    if not path.exists():
        raise UsageError(f"plan not found: {path} (give a plan file or a folder holding plan.safetensors)")
    try:
        return runtime.load_plan(path)
    except runtime.PlanError as exc:
        raise UsageError(f"{path} is not a usable plan: {' '.join(str(exc).split())}") from None


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


METHOD_LETTERS = {"pyramidinfer": "P", "kvsharer": "S", "kvcompress": "C", "kcache": "K"}


def _ratio(value: float) -> str:
    return f"{value:.3f}"


def _common_prefix(labels: list[str]) -> str:
    """The longest prefix ending in ``-`` shared by every label (``""`` for fewer than two labels)."""
    if len(labels) < 2:
        return ""
    prefix = labels[0]
    for label in labels[1:]:
        while not label.startswith(prefix):
            prefix = prefix[:-1]
    return prefix[: prefix.rfind("-") + 1]


def render(rows: list[dict[str, Any]]) -> str:
    """Markdown: one table per context, one row per plan, the KV bytes / stock of every engine model."""
    prefix = _common_prefix(sorted({row["plan"] for row in rows}))
    letters = ", ".join(f"{letter} {method}" for method, letter in METHOD_LETTERS.items())
    out = []
    for context in sorted({row["context"] for row in rows}):
        table = [row for row in rows if row["context"] == context]
        first = table[0]
        dtypes = sorted({row["dtype"] for row in table})
        out += [
            f"Context {context} tokens, batch {first['batch']}, blocks of {first['block_size']} tokens, "
            f"K/V {', '.join(dtypes)}" + (f", plans {prefix}*:" if prefix else ":"),
            "",
            "| plan | methods | shared | kvplan | kvplan +moved | vLLM sharing | vLLM +windows | per-head paged "
            "| stock MiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in table:
            e = row["engines"]
            kvplan = e["kvplan"]
            methods = "+".join(METHOD_LETTERS[m] for m in row["methods"]) or "none"
            out.append(
                f"| {row['plan'][len(prefix):]} | {methods} | {row['shared_layers']}/{row['layers']} "
                f"| {_ratio(kvplan['ratio'])} | {_ratio(kvplan['ratio'] + kvplan['moved_ratio'])} "
                f"| {_ratio(e['vllm-sharing']['ratio'])} | {_ratio(e['vllm-windows']['ratio'])} "
                f"| {_ratio(e['per-head-paged']['ratio'])} "
                f"| {kvplan['stock'] / 2**20:.2f}/{e['vllm-sharing']['stock'] / 2**20:.2f} |"
            )
        out.append("")
    out += ["Each ratio: the engine model's K/V bytes / the same engine's stock K/V bytes.",
            f"methods: {letters}.",
            "kvplan: bytes on the model's device; kvplan +moved: with the values KCache moves to its store.",
            "stock MiB: kvplan's stock (transformers) / a paged engine's stock (whole blocks)."]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    """``"2048,8192"`` -> ``[2048, 8192]`` (argparse type of ``--context``)."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/serving_memory.py",
        description="KV bytes that kvplan's runtime and serving-engine models would hold for each plan, divided by "
        "the same engine's stock cache; computed from the plans' tensors (no model, no engine is run).",
        epilog="engine models: " + "; ".join(f"{key}: {title}" for key, title in ENGINE_TITLES.items())
        + ". See the module docstring and docs/serving.md.",
    )
    p.add_argument("plans", nargs="*", type=Path,
                   help="plan files or plan folders (default: the shipped SmolLM2-135M plans under artifacts/)")
    p.add_argument("--context", type=_int_list, action="extend", metavar="TOKENS[,TOKENS...]",
                   help="context length in tokens per sequence; several: comma-separated or the option repeated "
                   "(default: 2048)")
    p.add_argument("--batch", type=int, default=1, help="sequences (default: 1)")
    p.add_argument("--block-size", type=int, default=16, metavar="TOKENS",
                   help="tokens per paged block (default: 16, vLLM's CacheConfig.DEFAULT_BLOCK_SIZE)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="K/V dtype (default: each plan's, as `python -m runtime inspect` resolves it)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write every number as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    contexts = args.context or [2048]
    try:
        for name, value in (("--context", min(contexts)), ("--batch", args.batch),
                            ("--block-size", args.block_size)):
            if value < 1:
                raise UsageError(f"{name} must be a positive integer, got {value}")
        if args.json is not None and not args.json.parent.is_dir():
            raise UsageError(f"the folder of --json ({args.json.parent}) does not exist")
        paths = args.plans or [REPO_ROOT / path for path in DEFAULT_PLANS]
        plans = [(path, load(path)) for path in paths]
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    rows = []
    for context in contexts:
        for path, plan in plans:
            row = measure(plan, context, args.batch, args.block_size, args.dtype)
            rows.append({"plan": plan_label(path), "path": str(path), **row})
    sys.stdout.write(render(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"engines": ENGINE_TITLES, "rows": rows}, indent=1) + "\n")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
