"""The kvplan plan file: one safetensors file that tells the runtime how to compress a model's KV cache.

A plan is written once by ``python -m calibrate`` and read on every ``runtime.apply_plan``. This module is
the only code that reads or writes the file (schema: ``docs/design.md`` section 1). Everything a loader
reads is validated here, so that a file from a stranger can only ever produce a valid :class:`Plan` or a
:class:`PlanError`.

Shape symbols used in the docstrings: ``L`` = ``num_hidden_layers``, ``H_kv`` = ``num_key_value_heads``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import tempfile
import warnings
from dataclasses import dataclass, field
from importlib import metadata as _importlib_metadata
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

__all__ = [
    "METHODS",
    "SCHEMA_VERSION",
    "Plan",
    "PlanError",
    "TENSOR_SPECS",
    "PARAM_SPECS",
    "fingerprint_from_model",
    "load_plan",
]

METHODS: tuple[str, ...] = ("pyramidinfer", "kvsharer", "kvcompress", "kcache")
"""Every method a plan can enable, in the order the runtime applies them."""

SCHEMA_VERSION = 1
"""Version of the file layout written by this module; loaders refuse any other version."""

DEFAULT_FILENAME = "plan.safetensors"
MAX_FILE_BYTES = 256 * 1024 * 1024
"""A plan holds a few small tensors per layer; anything larger is refused before it is read."""
MAX_HEADER_BYTES = 1024 * 1024
"""Upper bound on the JSON header; ours are a few kilobytes."""
MAX_JSON_DEPTH = 32
"""Deepest nesting accepted in ``recipe`` / ``provenance`` / ``params`` JSON."""
MAX_INT = 2**31 - 1

_CALIBRATE_HINT = "calibrate one for this model with `python -m calibrate <model> --out plan.safetensors`"

# safetensors dtype tag <-> torch dtype <-> little-endian numpy dtype, for the two dtypes a plan may hold.
_DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "F32": (torch.float32, "<f4"),
    "I32": (torch.int32, "<i4"),
}
_DTYPE_TAGS: dict[torch.dtype, str] = {torch_dtype: tag for tag, (torch_dtype, _) in _DTYPES.items()}

_META_PREFIX = "kvplan."
_META_KEYS = (
    "kvplan.schema_version",
    "kvplan.version",
    "kvplan.methods",
    "kvplan.params",
    "kvplan.fingerprint",
    "kvplan.target_ratio",
    "kvplan.recipe",
    "kvplan.provenance",
)

_FINGERPRINT_INT_KEYS = (
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_size",
    "vocab_size",
)
FINGERPRINT_KEYS = (
    "model_type",
    *_FINGERPRINT_INT_KEYS,
    "layer_types",
    "sliding_window",
    "name_or_path",
    "revision",
)
STRUCTURAL_KEYS = ("model_type", *_FINGERPRINT_INT_KEYS, "layer_types")
"""Fingerprint fields that must match the model a plan is applied to."""

_TENSOR_NAME = re.compile(r"^(?P<method>[a-z0-9_]+)\.(?P<name>[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199})$")


class PlanError(ValueError):
    """Any problem with a plan: unreadable file, bad metadata, bad tensors, or a plan for another model."""


# ----------------------------------------------------------------------------------------------------------
# Per-method tables: the tensor each method needs and the parameters it reads.
# ----------------------------------------------------------------------------------------------------------


def _check_fraction(values: torch.Tensor) -> str | None:
    """``layer_keep``: every entry in (0, 1]."""
    if bool(((values <= 0) | (values > 1)).any()):
        return "every value must be in (0, 1]"
    return None


def _check_share_source(values: torch.Tensor) -> str | None:
    """``share_source``: ``0 <= s[l] <= l`` and every source owns its cache (``s[s[l]] == s[l]``)."""
    sources = [int(v) for v in values.tolist()]
    for layer, source in enumerate(sources):
        if not 0 <= source <= layer:
            return f"layer {layer} has source {source}; a source must satisfy 0 <= source <= layer"
        if sources[source] != source:
            return (
                f"layer {layer} shares layer {source}, which itself shares layer {sources[source]}; "
                "chains must be resolved (every source owns its cache)"
            )
    return None


def _check_head_keep(values: torch.Tensor) -> str | None:
    """``head_keep``: non-negative, every layer gives some budget to at least one head."""
    if bool((values < 0).any()):
        return "values must be >= 0"
    if values.numel() and bool((values.sum(dim=1) <= 0).any()):
        return "each layer's row must sum to > 0"
    return None


def _check_non_negative(values: torch.Tensor) -> str | None:
    """``topn``: ``0`` means all values are read."""
    if bool((values < 0).any()):
        return "values must be >= 0"
    return None


@dataclass(frozen=True)
class TensorSpec:
    """The one tensor a method must provide: name, dtype, shape (in fingerprint symbols), value rule."""

    name: str
    dtype: torch.dtype
    shape: tuple[str, ...]
    check: Callable[[torch.Tensor], str | None]
    meaning: str


TENSOR_SPECS: dict[str, TensorSpec] = {
    "pyramidinfer": TensorSpec(
        "pyramidinfer.layer_keep", torch.float32, ("L",), _check_fraction, "fraction of the context kept"
    ),
    "kvsharer": TensorSpec(
        "kvsharer.share_source", torch.int32, ("L",), _check_share_source, "source layer of each layer's cache"
    ),
    "kvcompress": TensorSpec(
        "kvcompress.head_keep", torch.float32, ("L", "H_kv"), _check_head_keep, "per-KV-head budget share"
    ),
    "kcache": TensorSpec("kcache.topn", torch.int32, ("L",), _check_non_negative, "values read per decode step"),
}

_SHAPE_SYMBOLS = {"L": "num_hidden_layers", "H_kv": "num_key_value_heads"}


@dataclass(frozen=True)
class ParamSpec:
    """A parameter a method reads at runtime: an integer ``>= minimum``, or one of ``choices`` (strings)."""

    required: bool
    minimum: int = 0
    choices: tuple[str, ...] | None = None


PARAM_SPECS: dict[str, dict[str, ParamSpec]] = {
    "pyramidinfer": {
        "window": ParamSpec(required=True, minimum=1),
        "sink": ParamSpec(required=True, minimum=0),
        "slack": ParamSpec(required=False, minimum=0),
        "pool": ParamSpec(required=False, minimum=1),
        "head_reduce": ParamSpec(required=False, choices=("mean", "max")),
    },
}


# ----------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------


def _installed_version() -> str:
    """The installed kvplan version (``0.1.0`` when running from a source tree that is not installed)."""
    try:
        return _importlib_metadata.version("kvplan")
    except _importlib_metadata.PackageNotFoundError:
        return "0.1.0"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_scalar(value: Any) -> bool:
    """A JSON scalar: null, bool, int, finite float or string."""
    if value is None or isinstance(value, (bool, int, str)):
        return True
    return isinstance(value, float) and math.isfinite(value)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_json_value(what: str, value: Any) -> None:
    """Refuse anything that does not survive a JSON round trip unchanged (iterative: no recursion limit)."""
    stack: list[tuple[Any, str, int]] = [(value, what, 0)]
    while stack:
        item, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise PlanError(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep (at {where})")
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    raise PlanError(f"{where} has a non-string key {key!r}; JSON keys must be strings")
                stack.append((child, f"{where}.{key}", depth + 1))
        elif isinstance(item, (list, tuple)):
            stack.extend((child, f"{where}[{i}]", depth + 1) for i, child in enumerate(item))
        elif not _is_scalar(item):
            raise PlanError(f"{where} = {item!r} is not a JSON value (need null/bool/int/finite float/str)")


def _dumps(value: Any) -> str:
    """Canonical JSON: sorted keys, compact separators (byte-identical output for equal values)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _loads(text: str, what: str) -> Any:
    """Strict JSON: no duplicate keys, no NaN/Infinity, no overflowing floats; PlanError otherwise."""
    try:
        return json.loads(
            text,
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
        )
    except (ValueError, RecursionError) as exc:
        raise PlanError(f"{what} is not valid JSON: {exc}") from exc


# ----------------------------------------------------------------------------------------------------------
# Fingerprint
# ----------------------------------------------------------------------------------------------------------


def _text_config(model_or_config: Any) -> tuple[Any, Any]:
    """(top-level config, decoder text config) of a transformers model or config."""
    config = getattr(model_or_config, "config", model_or_config)
    get_text_config = getattr(config, "get_text_config", None)
    text_config = get_text_config(decoder=True) if callable(get_text_config) else config
    return config, text_config


def fingerprint_from_model(model_or_config: Any) -> dict[str, Any]:
    """The plan fingerprint of a transformers model or ``PretrainedConfig``.

    Multimodal configs (e.g. Gemma 3's ``Gemma3Config``) are reduced to their decoder text config, so the
    fingerprint (including ``model_type``, e.g. ``gemma3_text``) is the same whether the plan was
    calibrated on the causal LM or on the conditional-generation wrapper.
    """
    if isinstance(model_or_config, Mapping):
        return dict(model_or_config)
    config, text = _text_config(model_or_config)
    try:
        heads = int(text.num_attention_heads)
        hidden = int(text.hidden_size)
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or hidden // heads
        layer_types = getattr(text, "layer_types", None)
        sliding_window = getattr(text, "sliding_window", None)
        fingerprint = {
            "model_type": str(getattr(text, "model_type", "") or getattr(config, "model_type", "")),
            "num_hidden_layers": int(text.num_hidden_layers),
            "num_attention_heads": heads,
            "num_key_value_heads": int(kv_heads),
            "head_dim": int(head_dim),
            "hidden_size": hidden,
            "vocab_size": int(text.vocab_size),
            "layer_types": [str(t) for t in layer_types] if layer_types is not None else None,
            "sliding_window": sliding_window if _is_int(sliding_window) and sliding_window > 0 else None,
            "name_or_path": str(getattr(config, "_name_or_path", "") or getattr(text, "_name_or_path", "") or ""),
            "revision": _commit_hash(config),
        }
    except (AttributeError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise PlanError(f"cannot read the model's structure from its config ({type(config).__name__}): {exc}") from exc
    return fingerprint


def _commit_hash(config: Any) -> str | None:
    """The Hub commit a config was loaded from, when transformers recorded it."""
    value = getattr(config, "_commit_hash", None)
    return value if isinstance(value, str) and value else None


def _check_fingerprint(fingerprint: Any) -> None:
    """Types and cross-field rules of a fingerprint dict."""
    if not isinstance(fingerprint, dict):
        raise PlanError(f"fingerprint must be a JSON object, got {_type_name(fingerprint)}")
    missing = [key for key in FINGERPRINT_KEYS if key not in fingerprint]
    if missing:
        raise PlanError(f"fingerprint is missing {', '.join(missing)}")
    _check_json_value("fingerprint", fingerprint)
    if not isinstance(fingerprint["model_type"], str) or not fingerprint["model_type"]:
        raise PlanError(f"fingerprint.model_type must be a non-empty string, got {fingerprint['model_type']!r}")
    for key in _FINGERPRINT_INT_KEYS:
        value = fingerprint[key]
        if not _is_int(value) or not 1 <= value <= MAX_INT:
            raise PlanError(f"fingerprint.{key} must be a positive integer, got {value!r}")
    kv_heads, heads = fingerprint["num_key_value_heads"], fingerprint["num_attention_heads"]
    if heads % kv_heads:
        raise PlanError(
            f"fingerprint: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})"
        )
    _check_layer_types(fingerprint["layer_types"], fingerprint["num_hidden_layers"])
    window = fingerprint["sliding_window"]
    if window is not None and (not _is_int(window) or window < 1):
        raise PlanError(f"fingerprint.sliding_window must be null or a positive integer, got {window!r}")
    if not isinstance(fingerprint["name_or_path"], str):
        raise PlanError(f"fingerprint.name_or_path must be a string, got {_type_name(fingerprint['name_or_path'])}")
    revision = fingerprint["revision"]
    if revision is not None and not isinstance(revision, str):
        raise PlanError(f"fingerprint.revision must be null or a string, got {_type_name(revision)}")


def _check_layer_types(layer_types: Any, num_layers: int) -> None:
    if layer_types is None:
        return
    if not isinstance(layer_types, (list, tuple)) or not all(isinstance(t, str) for t in layer_types):
        raise PlanError(f"fingerprint.layer_types must be null or a list of strings, got {layer_types!r:.80}")
    if len(layer_types) != num_layers:
        raise PlanError(f"fingerprint.layer_types has {len(layer_types)} entries for {num_layers} layers")


# ----------------------------------------------------------------------------------------------------------
# Semantic checks shared by save and load
# ----------------------------------------------------------------------------------------------------------


def _check_methods(methods: Any) -> None:
    if not isinstance(methods, (list, tuple)):
        raise PlanError(f"methods must be a list of method names, got {_type_name(methods)}")
    for method in methods:
        if not isinstance(method, str) or method not in METHODS:
            raise PlanError(f"unknown method {method!r}; known methods: {', '.join(METHODS)} (upgrade kvplan?)")
    if len(set(methods)) != len(methods):
        raise PlanError(f"methods lists a method twice: {list(methods)}")


def _check_params(params: Any, methods: tuple[str, ...]) -> None:
    if not isinstance(params, dict):
        raise PlanError(f"params must be a JSON object {{method: {{name: value}}}}, got {_type_name(params)}")
    for method, values in params.items():
        if method not in methods:
            raise PlanError(f"params has an entry for {method!r}, which is not an enabled method ({list(methods)})")
        if not isinstance(values, dict):
            raise PlanError(f"params.{method} must be a JSON object, got {_type_name(values)}")
        for name, value in values.items():
            if not isinstance(name, str) or not _is_scalar(value):
                raise PlanError(f"params.{method}.{name} = {value!r:.80} must be a JSON scalar")
    for method in methods:
        _check_method_params(method, params.get(method, {}))


def _check_method_params(method: str, values: dict[str, Any]) -> None:
    for name, spec in PARAM_SPECS.get(method, {}).items():
        if name not in values:
            if spec.required:
                raise PlanError(f"params.{method}.{name} is required (an integer >= {spec.minimum})")
            continue
        value = values[name]
        if spec.choices is not None:
            if value not in spec.choices:
                raise PlanError(f"params.{method}.{name} must be one of {list(spec.choices)}, got {value!r}")
            continue
        if not _is_int(value) or not spec.minimum <= value <= MAX_INT:
            raise PlanError(f"params.{method}.{name} must be an integer >= {spec.minimum}, got {value!r}")


def _check_target_ratio(ratio: Any) -> None:
    if ratio is None:
        return
    if not _is_number(ratio) or not math.isfinite(ratio) or not 0 < ratio <= 1:
        raise PlanError(f"target_ratio must be null or a number in (0, 1], got {ratio!r}")


def _check_json_dict(what: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise PlanError(f"{what} must be a JSON object, got {_type_name(value)}")
    _check_json_value(what, value)


def _expected_shape(spec: TensorSpec, fingerprint: dict[str, Any]) -> tuple[int, ...]:
    return tuple(fingerprint[_SHAPE_SYMBOLS[symbol]] for symbol in spec.shape)


def _check_tensor_basics(name: str, tensor: Any) -> None:
    """Name, type, dtype and finiteness rules that hold for every tensor in a plan."""
    if not isinstance(name, str):
        raise PlanError(f"tensor names must be strings, got {name!r}")
    match = _TENSOR_NAME.match(name)
    if match is None or match["method"] not in METHODS:
        raise PlanError(f"tensor name {name!r} must be '<method>.<name>' with <method> one of {', '.join(METHODS)}")
    if not isinstance(tensor, torch.Tensor):
        raise PlanError(f"tensor {name} must be a torch.Tensor, got {_type_name(tensor)}")
    if tensor.dtype not in _DTYPE_TAGS:
        raise PlanError(f"tensor {name} has dtype {tensor.dtype}; plan tensors must be float32 or int32")
    if tensor.layout != torch.strided or tensor.device.type == "meta":
        raise PlanError(f"tensor {name} must be a dense tensor with data (got {tensor.layout} on {tensor.device})")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise PlanError(f"tensor {name} contains NaN or infinite values")


def _check_tensors(tensors: Any, methods: tuple[str, ...], fingerprint: dict[str, Any]) -> None:
    if not isinstance(tensors, dict):
        raise PlanError(f"tensors must be a dict name -> torch.Tensor, got {_type_name(tensors)}")
    for name, tensor in tensors.items():
        _check_tensor_basics(name, tensor)
    for method, spec in TENSOR_SPECS.items():
        present = spec.name in tensors
        if method in methods and not present:
            raise PlanError(f"{method} is enabled but the plan has no {spec.name} tensor ({spec.meaning})")
        if method not in methods and present:
            raise PlanError(f"tensor {spec.name} is present but {method} is not enabled; enable it or drop the tensor")
        if present:
            _check_required_tensor(spec, tensors[spec.name], fingerprint)
    if "kvsharer" in methods:
        _check_shared_layer_kinds(tensors[TENSOR_SPECS["kvsharer"].name], fingerprint)


def _fingerprint_layer_kinds(fingerprint: dict[str, Any]) -> list[str]:
    """Attention type of every layer as the fingerprint describes it (the runtime's ``layer_types`` rule)."""
    kinds = fingerprint.get("layer_types")
    if kinds is None:
        kind = "sliding_attention" if fingerprint.get("sliding_window") else "full_attention"
        kinds = [kind] * fingerprint["num_hidden_layers"]
    return list(kinds)


def _check_shared_layer_kinds(share_source: torch.Tensor, fingerprint: dict[str, Any]) -> None:
    """KVSharer shares full-attention layers only (a sliding-window source trims its cache as it updates)."""
    kinds = _fingerprint_layer_kinds(fingerprint)
    for layer, source in enumerate(int(v) for v in share_source.tolist()):
        if source != layer and (kinds[layer] != "full_attention" or kinds[source] != "full_attention"):
            raise PlanError(
                f"tensor kvsharer.share_source: layer {layer} ({kinds[layer]}) shares layer {source} "
                f"({kinds[source]}); only full-attention layers can share a cache"
            )


def _check_required_tensor(spec: TensorSpec, tensor: torch.Tensor, fingerprint: dict[str, Any]) -> None:
    shape = _expected_shape(spec, fingerprint)
    symbols = ", ".join(spec.shape)
    if tensor.dtype != spec.dtype or tuple(tensor.shape) != shape:
        raise PlanError(
            f"tensor {spec.name} must be {_dtype_name(spec.dtype)} of shape {list(shape)} ([{symbols}] from the "
            f"fingerprint), got {_dtype_name(tensor.dtype)} {list(tensor.shape)}"
        )
    problem = spec.check(tensor.detach().cpu())
    if problem:
        raise PlanError(f"tensor {spec.name}: {problem}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------------------
# File format: header parsing (stdlib only, before safetensors sees the bytes) and writing
# ----------------------------------------------------------------------------------------------------------


def _parse_header(data: bytes, source: str) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Validate the safetensors header and schema version: returns (tensor entries, metadata)."""
    if len(data) < 8:
        raise PlanError(f"{source}: not a safetensors file ({len(data)} bytes, need at least 8)")
    (length,) = struct.unpack("<Q", data[:8])
    if length > MAX_HEADER_BYTES:
        raise PlanError(f"{source}: header claims {length} bytes (limit {MAX_HEADER_BYTES}); not a kvplan plan")
    if 8 + length > len(data):
        raise PlanError(f"{source}: file is truncated (header needs {length} bytes, {len(data) - 8} present)")
    try:
        text = data[8 : 8 + length].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PlanError(f"{source}: header is not UTF-8: {exc}") from exc
    header = _loads(text, f"{source}: header")
    if not isinstance(header, dict):
        raise PlanError(f"{source}: header must be a JSON object, got {_type_name(header)}")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise PlanError(f"{source}: missing or malformed __metadata__ (a string -> string map); not a kvplan plan")
    _parse_schema_version(metadata, source)  # before the entries: a newer schema may use other dtypes
    _check_entries(header, len(data) - 8 - length, source)
    return header, metadata


def _check_entries(entries: dict[str, Any], buffer_len: int, source: str) -> None:
    """Every entry has a known dtype and consistent shape/offsets; offsets tile the buffer exactly."""
    spans = []
    for name, entry in entries.items():
        begin, end = _check_entry(name, entry, source)
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise PlanError(f"{source}: tensor {name} starts at byte {begin}, expected {position} (holes or overlaps)")
        position = end
    if position != buffer_len:
        raise PlanError(f"{source}: tensors cover {position} bytes of a {buffer_len}-byte buffer (truncated or padded)")


def _check_entry(name: str, entry: Any, source: str) -> tuple[int, int]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise PlanError(f"{source}: tensor {name!r:.80} needs exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _DTYPES:
        raise PlanError(f"{source}: tensor {name!r:.80} has dtype {dtype!r:.20}; plan tensors must be F32 or I32")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(d) and 0 <= d <= MAX_INT for d in shape):
        raise PlanError(f"{source}: tensor {name!r:.80} has an invalid shape {shape!r:.80}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        raise PlanError(f"{source}: tensor {name!r:.80} has invalid data_offsets {offsets!r:.80}")
    begin, end = offsets
    needed = math.prod(shape) * 4
    if end - begin != needed:
        raise PlanError(f"{source}: tensor {name!r:.80} spans {end - begin} bytes but shape {shape} needs {needed}")
    return begin, end


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Little-endian bytes of a contiguous CPU copy."""
    array = tensor.detach().to("cpu").contiguous().numpy()
    return array.astype(_DTYPES[_DTYPE_TAGS[tensor.dtype]][1], copy=False).tobytes()


def _serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file with sorted keys and tensors in name order: equal inputs give equal bytes."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    chunks, offset = [], 0
    for name in sorted(tensors):
        chunk = _tensor_bytes(tensors[name])
        header[name] = {
            "dtype": _DTYPE_TAGS[tensors[name].dtype],
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + len(chunk)],
        }
        chunks.append(chunk)
        offset += len(chunk)
    text = _dumps(header).encode("utf-8")
    text += b" " * (-len(text) % 8)
    if len(text) > MAX_HEADER_BYTES:
        raise PlanError(f"plan metadata is {len(text)} bytes (limit {MAX_HEADER_BYTES}); keep recipe/provenance small")
    data = struct.pack("<Q", len(text)) + text + b"".join(chunks)
    if len(data) > MAX_FILE_BYTES:
        raise PlanError(f"plan is {len(data)} bytes (limit {MAX_FILE_BYTES}); drop large inspection tensors")
    return data


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file in the target directory, fsync, then rename over the target."""
    directory = path.parent
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        mode = 0o644
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if hasattr(os, "fchmod"):  # mkstemp creates 0600; give the plan normal file permissions
                os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    """Persist the rename (POSIX only; best effort)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _read_limited(path: Path) -> bytes:
    """The bytes of a local plan file, refusing missing, non-regular or oversized files."""
    if path.is_dir():
        path = path / DEFAULT_FILENAME
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise PlanError(f"{path}: not a regular file")
        if size > MAX_FILE_BYTES:
            raise PlanError(f"{path}: {size} bytes is larger than any plan (limit {MAX_FILE_BYTES}); not reading it")
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError as exc:
        raise PlanError(f"no plan file at {path}; run `python -m calibrate <model> --out {path}` to make one") from exc
    except OSError as exc:
        raise PlanError(f"cannot read plan file {path}: {exc}") from exc
    if len(data) > MAX_FILE_BYTES:
        raise PlanError(f"{path}: file grew past {MAX_FILE_BYTES} bytes while reading; refusing it")
    return data


def _load_tensors(data: bytes, entries: dict[str, Any], source: str) -> dict[str, torch.Tensor]:
    """Decode tensors with safetensors after the header checks; any safetensors failure becomes PlanError."""
    from safetensors.torch import load as safetensors_load

    try:
        tensors = safetensors_load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError and others; all mean "bad file"
        raise PlanError(f"{source}: safetensors could not read the tensors: {exc}") from exc
    if set(tensors) != set(entries):
        raise PlanError(f"{source}: safetensors read tensors {sorted(tensors)} but the header lists {sorted(entries)}")
    return tensors


def _parse_schema_version(metadata: dict[str, str], source: str) -> None:
    text = metadata.get("kvplan.schema_version")
    if text is None:
        raise PlanError(f"{source}: no kvplan.schema_version metadata; this is not a kvplan plan file")
    if not (text.isascii() and text.isdigit() and len(text) <= 9):
        raise PlanError(f"{source}: kvplan.schema_version must be an integer, got {text!r:.40}")
    version = int(text)
    if version > SCHEMA_VERSION:
        raise PlanError(
            f"{source}: plan schema version {version} is newer than this kvplan supports ({SCHEMA_VERSION}); "
            "upgrade kvplan (`pip install -U kvplan`)"
        )
    if version != SCHEMA_VERSION:
        raise PlanError(f"{source}: plan schema version {version} is not supported (expected {SCHEMA_VERSION})")


def _plan_from_metadata(metadata: dict[str, str], tensors: dict[str, torch.Tensor], source: str) -> "Plan":
    """Decode the kvplan.* metadata (schema version already checked) into an unchecked Plan."""
    missing = [key for key in _META_KEYS if key not in metadata]
    if missing:
        raise PlanError(f"{source}: metadata is missing {', '.join(missing)}")
    if metadata.get("format", "pt") != "pt":
        raise PlanError(f"{source}: metadata format must be 'pt', got {metadata['format']!r:.40}")
    json_keys = ("methods", "params", "fingerprint", "target_ratio", "recipe", "provenance")
    fields = {key: _loads(metadata[f"{_META_PREFIX}{key}"], f"{source}: kvplan.{key}") for key in json_keys}
    _check_methods(fields["methods"])
    return Plan(
        fingerprint=fields["fingerprint"],
        methods=tuple(fields["methods"]),
        params=fields["params"],
        tensors=tensors,
        target_ratio=fields["target_ratio"],
        recipe=fields["recipe"],
        provenance=fields["provenance"],
        kvplan_version=metadata["kvplan.version"],
    )


# ----------------------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------------------


def _canonical_methods(methods: Any) -> Any:
    """Known method names in METHODS order; anything odd is left as is for ``check`` to report."""
    if isinstance(methods, (list, tuple)) and all(isinstance(m, str) and m in METHODS for m in methods):
        return tuple(sorted(methods, key=METHODS.index))
    return methods


@dataclass(eq=False)
class Plan:
    """A KV-cache compression plan for one model.

    Attributes:
        fingerprint: structure of the model the plan was calibrated for (see ``FINGERPRINT_KEYS``).
        methods: enabled methods, in ``METHODS`` order (``()`` = a plan that changes nothing).
        params: ``{method: {name: JSON scalar}}`` for enabled methods, e.g. ``{"pyramidinfer": {"window": 32,
            "sink": 4}}``.
        tensors: ``"<method>.<name>" -> tensor``; per enabled method one required tensor (``TENSOR_SPECS``):
            ``pyramidinfer.layer_keep`` float32 ``[L]``, ``kvsharer.share_source`` int32 ``[L]``,
            ``kvcompress.head_keep`` float32 ``[L, H_kv]``, ``kcache.topn`` int32 ``[L]``; any other
            float32/int32 tensor is inspection data the runtime never reads.
        target_ratio: fraction of full KV memory the plan aims to keep, or None.
        recipe: the resolved calibration recipe (JSON object).
        provenance: data hash, seed, counts, timings, versions (JSON object).
        kvplan_version: version of kvplan that made the plan.

    The constructor does not validate; :meth:`check` (called by :meth:`save` and :meth:`load`) does.
    """

    fingerprint: dict[str, Any]
    methods: tuple[str, ...] = ()
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    target_ratio: float | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    kvplan_version: str = field(default_factory=_installed_version)

    def __post_init__(self) -> None:
        self.methods = _canonical_methods(self.methods)

    # -- equality ------------------------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        same_fields = (
            self.fingerprint == other.fingerprint
            and self.methods == other.methods
            and self.params == other.params
            and self.target_ratio == other.target_ratio
            and self.recipe == other.recipe
            and self.provenance == other.provenance
            and self.kvplan_version == other.kvplan_version
            and set(self.tensors) == set(other.tensors)
        )
        return same_fields and all(
            self.tensors[name].dtype == other.tensors[name].dtype
            and torch.equal(self.tensors[name].cpu(), other.tensors[name].cpu())
            for name in self.tensors
        )

    __hash__ = None  # type: ignore[assignment]

    # -- convenience views ---------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        """``L``: number of decoder layers of the model the plan was made for."""
        return int(self.fingerprint["num_hidden_layers"])

    @property
    def layer_keep(self) -> torch.Tensor | None:
        """float32 ``[L]``: fraction of the context each layer keeps (PyramidInfer), or None."""
        return self.tensors.get(TENSOR_SPECS["pyramidinfer"].name)

    @property
    def share_source(self) -> torch.Tensor | None:
        """int32 ``[L]``: the layer whose cache each layer reads (KVSharer), or None."""
        return self.tensors.get(TENSOR_SPECS["kvsharer"].name)

    @property
    def head_keep(self) -> torch.Tensor | None:
        """float32 ``[L, H_kv]``: per-KV-head share of each layer's budget (KV-Compress), or None."""
        return self.tensors.get(TENSOR_SPECS["kvcompress"].name)

    @property
    def topn(self) -> torch.Tensor | None:
        """int32 ``[L]``: values read per decode step, 0 = all (KCache), or None."""
        return self.tensors.get(TENSOR_SPECS["kcache"].name)

    @property
    def is_noop(self) -> bool:
        """True when no method is enabled: applying the plan changes nothing."""
        return not self.methods

    # -- validation ----------------------------------------------------------------------------------------

    def check(self) -> None:
        """Raise :class:`PlanError` unless the plan obeys every rule of the file schema."""
        _check_fingerprint(self.fingerprint)
        _check_methods(self.methods)
        _check_params(self.params, tuple(self.methods))
        _check_target_ratio(self.target_ratio)
        _check_json_dict("recipe", self.recipe)
        _check_json_dict("provenance", self.provenance)
        if not isinstance(self.kvplan_version, str) or not self.kvplan_version or len(self.kvplan_version) > 100:
            raise PlanError(f"kvplan_version must be a non-empty short string, got {self.kvplan_version!r:.80}")
        _check_tensors(self.tensors, tuple(self.methods), self.fingerprint)

    def validate(self, model_or_config: Any) -> None:
        """Raise :class:`PlanError` unless this plan fits ``model_or_config`` (a model, config or fingerprint).

        Structural fields must match exactly; a different ``name_or_path`` or ``revision`` only warns
        (a fine-tune or a re-upload with the same structure can reuse a plan, at some quality risk).
        """
        self.check()
        model = fingerprint_from_model(model_or_config)
        mismatches = [
            f"{key}: plan {self.fingerprint.get(key)!r} vs model {model.get(key)!r}"
            for key in STRUCTURAL_KEYS
            if _normalize(self.fingerprint.get(key)) != _normalize(model.get(key))
        ]
        if mismatches:
            raise PlanError(
                f"this plan was calibrated for {self._model_label(self.fingerprint)}, not for "
                f"{self._model_label(model)}; mismatching fields: {'; '.join(mismatches)}. {_CALIBRATE_HINT}"
            )
        self._warn_identity(model)

    def _warn_identity(self, model: dict[str, Any]) -> None:
        for key in ("name_or_path", "revision"):
            mine, theirs = self.fingerprint.get(key), model.get(key)
            if mine and theirs and mine != theirs:
                warnings.warn(
                    f"plan {key} {mine!r} differs from the model's {theirs!r}; the structure matches, "
                    "so the plan is applied, but its quality was measured on the other weights",
                    stacklevel=3,
                )

    @staticmethod
    def _model_label(fingerprint: dict[str, Any]) -> str:
        name = fingerprint.get("name_or_path") or "an unnamed model"
        return f"{name} ({fingerprint.get('model_type')}, {fingerprint.get('num_hidden_layers')} layers)"

    # -- construction --------------------------------------------------------------------------------------

    @classmethod
    def noop(cls, model_or_config: Any) -> "Plan":
        """A plan with every method off for ``model_or_config``: applying it changes nothing."""
        return cls(fingerprint=fingerprint_from_model(model_or_config))

    # -- files ---------------------------------------------------------------------------------------------

    def metadata(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` map (all strings) this plan is saved with."""
        ratio = float(self.target_ratio) if _is_number(self.target_ratio) else self.target_ratio
        return {
            "format": "pt",
            "kvplan.schema_version": str(SCHEMA_VERSION),
            "kvplan.version": self.kvplan_version,
            "kvplan.methods": _dumps(list(self.methods)),
            "kvplan.params": _dumps(self.params),
            "kvplan.fingerprint": _dumps(self.fingerprint),
            "kvplan.target_ratio": _dumps(ratio),
            "kvplan.recipe": _dumps(self.recipe),
            "kvplan.provenance": _dumps(self.provenance),
        }

    def to_bytes(self) -> bytes:
        """The file content :meth:`save` writes (validated; deterministic)."""
        self.check()
        return _serialize(self.tensors, self.metadata())

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Validate and write the plan atomically to ``path``; returns the path.

        An invalid plan raises :class:`PlanError` and leaves any existing file untouched.
        """
        target = Path(path)
        data = self.to_bytes()
        try:
            _write_atomic(target, data)
        except OSError as exc:
            raise PlanError(f"cannot write plan to {target}: {exc}") from exc
        return target

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> "Plan":
        """Parse and validate plan file content; raises only :class:`PlanError` for bad content."""
        if len(data) > MAX_FILE_BYTES:
            raise PlanError(f"{source}: {len(data)} bytes is larger than any plan (limit {MAX_FILE_BYTES})")
        entries, metadata = _parse_header(data, source)
        tensors = _load_tensors(data, entries, source)
        plan = _plan_from_metadata(metadata, tensors, source)
        try:
            plan.check()
        except PlanError as exc:
            raise PlanError(f"{source}: {exc}") from exc
        return plan

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Plan":
        """Read and validate a local plan file (or a directory holding ``plan.safetensors``)."""
        return cls.from_bytes(_read_limited(Path(path)), source=str(path))

    @classmethod
    def from_pretrained(
        cls, repo_id: str, revision: str | None = None, filename: str = DEFAULT_FILENAME, **hub_kwargs: Any
    ) -> "Plan":
        """Download (or find in the HF cache) ``filename`` of Hub repo ``repo_id`` and load it."""
        from .hub import download_plan

        return download_plan(repo_id, revision=revision, filename=filename, **hub_kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload the plan, its recipe and a model card to Hub repo ``repo_id``; returns the commit sha."""
        from .hub import push_plan

        return push_plan(self, repo_id, **kwargs)

    # -- display -------------------------------------------------------------------------------------------

    def summary(self) -> str:
        """A few human-readable lines: model, methods with parameters, target ratio, per-layer tensors."""
        fp = self.fingerprint
        lines = [
            f"kvplan plan (schema {SCHEMA_VERSION}, kvplan {self.kvplan_version}) for "
            f"{fp.get('name_or_path') or '<unnamed>'}"
            + (f"@{fp['revision']}" if fp.get("revision") else "")
            + f" [{fp.get('model_type')}: {fp.get('num_hidden_layers')} layers, {fp.get('num_attention_heads')} heads, "
            f"{fp.get('num_key_value_heads')} KV heads, head_dim {fp.get('head_dim')}]",
            "methods: " + (", ".join(self._method_label(m) for m in self.methods) or "none (the plan changes nothing)"),
        ]
        if self.target_ratio is not None:
            lines.append(f"target ratio: {float(self.target_ratio):.3g} of full KV memory")
        lines.extend(self._tensor_lines())
        return "\n".join(lines)

    def _method_label(self, method: str) -> str:
        values = self.params.get(method) or {}
        inner = ", ".join(f"{k}={v}" for k, v in sorted(values.items()))
        return f"{method} ({inner})" if inner else method

    def _tensor_lines(self) -> list[str]:
        lines = []
        if self.layer_keep is not None:
            lines.append("layer keep: " + " ".join(f"{v:.2f}" for v in self.layer_keep.tolist()))
        if self.share_source is not None:
            lines.append("share source: " + " ".join(str(v) for v in self.share_source.tolist()))
        if self.head_keep is not None:
            rows = self.head_keep.float()
            lines.append(f"head keep: min {rows.min().item():.3g}, max {rows.max().item():.3g} over {list(rows.shape)}")
        if self.topn is not None:
            lines.append("top-n values: " + " ".join(str(v) for v in self.topn.tolist()))
        return lines


def _normalize(value: Any) -> Any:
    """Compare lists and tuples alike (a config may hold either)."""
    return list(value) if isinstance(value, tuple) else value


_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")


def looks_like_repo_id(text: str) -> bool:
    """``org/name`` with Hub-legal characters (and not a file name such as ``x/plan.safetensors``)."""
    return bool(_REPO_ID.match(text)) and ".." not in text and "--" not in text and not text.endswith(".safetensors")


def load_plan(path_or_repo_id: str | os.PathLike[str], revision: str | None = None, **hub_kwargs: Any) -> Plan:
    """Load a plan from a local file/directory, or else from a Hub repo id (``org/name``).

    ``revision`` and ``hub_kwargs`` (``filename``, ``cache_dir``, ``endpoint``, ``local_files_only``, ...)
    only apply to Hub downloads. Raises :class:`PlanError` for anything that is not a valid plan.
    """
    if isinstance(path_or_repo_id, os.PathLike) or os.path.exists(path_or_repo_id):
        if revision is not None or hub_kwargs:
            warnings.warn(f"{path_or_repo_id} is a local path; revision/hub arguments are ignored", stacklevel=2)
        return Plan.load(path_or_repo_id)
    if not isinstance(path_or_repo_id, str):
        raise PlanError(f"load_plan needs a path or a Hub repo id, got {_type_name(path_or_repo_id)}")
    if looks_like_repo_id(path_or_repo_id):
        from .hub import download_plan

        return download_plan(path_or_repo_id, revision=revision, **hub_kwargs)
    raise PlanError(
        f"no plan file at {path_or_repo_id} (and it is not a Hub repo id like 'org/name'); "
        f"run `python -m calibrate <model> --out {path_or_repo_id}` to make one"
    )
