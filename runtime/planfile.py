"""The plan file codec: safe reading and deterministic, atomic writing of ``plan.safetensors``.

A plan file is a safetensors file: an 8-byte little-endian header length, a JSON header (tensor entries and a
``__metadata__`` string map) and the tensor bytes. Everything here is about bytes, not meaning: the header is
parsed with the standard library and checked (size limits, dtypes, offsets that tile the buffer, the schema
version) *before* safetensors sees the data; writing sorts keys and tensors so equal plans give equal bytes, and
replaces the target atomically. What the metadata and tensors mean is checked by :mod:`runtime.plan`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import tempfile
from importlib import metadata as _importlib_metadata
from pathlib import Path
from typing import Any

import torch

from .errors import PlanError

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

# safetensors dtype tag <-> torch dtype <-> little-endian numpy dtype, for the two dtypes a plan may hold.
DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "F32": (torch.float32, "<f4"),
    "I32": (torch.int32, "<i4"),
}
DTYPE_TAGS: dict[torch.dtype, str] = {torch_dtype: tag for tag, (torch_dtype, _) in DTYPES.items()}

_VERSION = re.compile(r"^[0-9]+(\.[0-9]+){0,3}((a|b|rc)[0-9]+)?(\.post[0-9]+)?(\.dev[0-9]+)?(\+[a-z0-9.]+)?$")


def installed_version() -> str:
    """The installed kvplan version (``0.1.0`` when running from a source tree that is not installed)."""
    try:
        return _importlib_metadata.version("kvplan")
    except _importlib_metadata.PackageNotFoundError:
        return "0.1.0"


def parse_version(text: Any) -> Any:
    """A kvplan version string (``1.2.3``, ``0.1.0.dev1``, ...) as a comparable ``packaging`` version;
    ``PlanError`` for anything else (control characters, JSON, empty, overlong)."""
    from packaging.version import InvalidVersion, Version

    if not isinstance(text, str) or len(text) > 64 or not _VERSION.fullmatch(text):
        raise PlanError(
            f"kvplan_version (metadata kvplan.version) must be a version string like 0.1.0, got {text!r:.80}"
        )
    try:
        return Version(text)
    except InvalidVersion as exc:
        raise PlanError(
            f"kvplan_version (metadata kvplan.version) must be a version string like 0.1.0, got {text!r:.80}"
        ) from exc

def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_scalar(value: Any) -> bool:
    """A JSON scalar: null, bool, int, finite float or string."""
    if value is None or isinstance(value, (bool, int, str)):
        return True
    return isinstance(value, float) and math.isfinite(value)


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def check_json_value(what: str, value: Any) -> None:
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
        elif not is_scalar(item):
            raise PlanError(f"{where} = {item!r} is not a JSON value (need null/bool/int/finite float/str)")


def dumps(value: Any) -> str:
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


def loads(text: str, what: str) -> Any:
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


def parse_header(data: bytes, source: str) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
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
    header = loads(text, f"{source}: header")
    if not isinstance(header, dict):
        raise PlanError(f"{source}: header must be a JSON object, got {type_name(header)}")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise PlanError(f"{source}: missing or malformed __metadata__ (a string -> string map); not a kvplan plan")
    parse_schema_version(metadata, source)  # before the entries: a newer schema may use other dtypes
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
    if dtype not in DTYPES:
        raise PlanError(f"{source}: tensor {name!r:.80} has dtype {dtype!r:.20}; plan tensors must be F32 or I32")
    if not isinstance(shape, list) or len(shape) > 8 or not all(is_int(d) and 0 <= d <= MAX_INT for d in shape):
        raise PlanError(f"{source}: tensor {name!r:.80} has an invalid shape {shape!r:.80}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) and o >= 0 for o in offsets)):
        raise PlanError(f"{source}: tensor {name!r:.80} has invalid data_offsets {offsets!r:.80}")
    begin, end = offsets
    needed = math.prod(shape) * 4
    if end - begin != needed:
        raise PlanError(f"{source}: tensor {name!r:.80} spans {end - begin} bytes but shape {shape} needs {needed}")
    return begin, end


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Little-endian bytes of a contiguous CPU copy."""
    array = tensor.detach().to("cpu").contiguous().numpy()
    return array.astype(DTYPES[DTYPE_TAGS[tensor.dtype]][1], copy=False).tobytes()


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file with sorted keys and tensors in name order: equal inputs give equal bytes."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    chunks, offset = [], 0
    for name in sorted(tensors):
        chunk = _tensor_bytes(tensors[name])
        header[name] = {
            "dtype": DTYPE_TAGS[tensors[name].dtype],
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + len(chunk)],
        }
        chunks.append(chunk)
        offset += len(chunk)
    text = dumps(header).encode("utf-8")
    text += b" " * (-len(text) % 8)
    if len(text) > MAX_HEADER_BYTES:
        raise PlanError(f"plan metadata is {len(text)} bytes (limit {MAX_HEADER_BYTES}); keep recipe/provenance small")
    data = struct.pack("<Q", len(text)) + text + b"".join(chunks)
    if len(data) > MAX_FILE_BYTES:
        raise PlanError(f"plan is {len(data)} bytes (limit {MAX_FILE_BYTES}); drop large inspection tensors")
    return data


def write_atomic(path: Path, data: bytes) -> None:
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


def read_limited(path: Path) -> bytes:
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


def load_tensors(data: bytes, entries: dict[str, Any], source: str) -> dict[str, torch.Tensor]:
    """Decode tensors with safetensors after the header checks; any safetensors failure becomes PlanError."""
    from safetensors.torch import load as safetensors_load

    try:
        tensors = safetensors_load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError and others; all mean "bad file"
        raise PlanError(f"{source}: safetensors could not read the tensors: {exc}") from exc
    if set(tensors) != set(entries):
        raise PlanError(f"{source}: safetensors read tensors {sorted(tensors)} but the header lists {sorted(entries)}")
    return tensors


def parse_schema_version(metadata: dict[str, str], source: str) -> None:
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



__all__ = [
    "DEFAULT_FILENAME", "DTYPES", "DTYPE_TAGS", "MAX_FILE_BYTES", "MAX_HEADER_BYTES", "MAX_INT", "MAX_JSON_DEPTH",
    "SCHEMA_VERSION", "check_json_value", "dumps", "installed_version", "is_int", "is_number", "is_scalar",
    "load_tensors", "loads", "parse_header", "parse_schema_version", "parse_version", "read_limited", "serialize",
    "type_name", "write_atomic",
]
