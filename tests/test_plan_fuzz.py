"""Property tests: any bytes given to the loader give a valid Plan or a PlanError, never another exception."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from runtime.plan import METHODS, Plan, PlanError, fingerprint_from_model

L, H_KV = 4, 2
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _valid_plan() -> Plan:
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=L,
        num_attention_heads=4,
        num_key_value_heads=H_KV,
        vocab_size=128,
    )
    return Plan(
        fingerprint=fingerprint_from_model(config),
        methods=METHODS,
        params={"pyramidinfer": {"window": 8, "sink": 2}, "kvcompress": {"window": 8, "sink": 2}},
        tensors={
            "pyramidinfer.layer_keep": torch.tensor([1.0, 0.75, 0.5, 0.25]),
            "kvsharer.share_source": torch.tensor([0, 0, 2, 2], dtype=torch.int32),
            "kvcompress.head_keep": torch.tensor([[0.5, 0.5], [0.7, 0.3], [1.0, 0.0], [0.2, 0.8]]),
            "kcache.topn": torch.tensor([0, 16, 16, 8], dtype=torch.int32),
        },
        target_ratio=0.5,
        recipe={"alias": "tiny"},
        provenance={"seed": 0},
    )


VALID_PLAN = _valid_plan()
VALID_BYTES = VALID_PLAN.to_bytes()


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


VALID_HEADER, VALID_BUFFER = _split(VALID_BYTES)


# --------------------------------------------------------------------------------------------------------
# Our own writer: builds files the real Plan.save would refuse to write
# --------------------------------------------------------------------------------------------------------


def encode(header: dict[str, Any], buffer: bytes) -> bytes:
    """A safetensors file from a header dict (NaN allowed, so bad numbers can reach the loader)."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + buffer


_NUMPY_DTYPES = {"F32": "<f4", "I32": "<i4", "F16": "<f2", "F64": "<f8", "I64": "<i8", "U8": "u1", "BOOL": "?"}


def with_tensors(replacements: dict[str, tuple[str, np.ndarray]]) -> bytes:
    """The valid plan with some tensors replaced by (safetensors dtype tag, array) pairs."""
    header = {"__metadata__": dict(VALID_HEADER["__metadata__"])}
    arrays = {name: _tensor_array(name) for name in VALID_HEADER if name != "__metadata__"}
    arrays.update(replacements)
    chunks, offset = [], 0
    for name, (tag, array) in sorted(arrays.items()):
        chunk = np.ascontiguousarray(array, dtype=_NUMPY_DTYPES[tag]).tobytes()
        header[name] = {"dtype": tag, "shape": list(array.shape), "data_offsets": [offset, offset + len(chunk)]}
        chunks.append(chunk)
        offset += len(chunk)
    return encode(header, b"".join(chunks))


def _tensor_array(name: str) -> tuple[str, np.ndarray]:
    tensor = VALID_PLAN.tensors[name]
    return ("F32" if tensor.dtype == torch.float32 else "I32"), tensor.numpy()


def with_metadata(**changes: Any) -> bytes:
    header = dict(VALID_HEADER)
    metadata = dict(header["__metadata__"])
    for key, value in changes.items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    header["__metadata__"] = metadata
    return encode(header, VALID_BUFFER)


def load_or_error(data: bytes) -> Plan | None:
    """Load; the only acceptable failure is PlanError, and a success must pass the plan's own checks."""
    try:
        plan = Plan.from_bytes(data)
    except PlanError as exc:
        assert str(exc)
        return None
    plan.check()
    assert Plan.from_bytes(plan.to_bytes()) == plan
    return plan


def test_valid_file_loads() -> None:
    assert load_or_error(VALID_BYTES) == VALID_PLAN
    assert load_or_error(with_tensors({})) == VALID_PLAN
    assert load_or_error(with_metadata()) == VALID_PLAN


# --------------------------------------------------------------------------------------------------------
# (1) Random, truncated and bit-flipped bytes
# --------------------------------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    load_or_error(data)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_with_plausible_header_length(body: bytes) -> None:
    load_or_error(struct.pack("<Q", len(body)) + body)


@FUZZ
@given(st.integers(min_value=0, max_value=len(VALID_BYTES) - 1))
def test_truncated_file(length: int) -> None:
    assert load_or_error(VALID_BYTES[:length]) is None


@FUZZ
@given(st.lists(st.integers(min_value=0, max_value=len(VALID_BYTES) * 8 - 1), min_size=1, max_size=8))
def test_bit_flips(bits: list[int]) -> None:
    data = bytearray(VALID_BYTES)
    for bit in bits:
        data[bit // 8] ^= 1 << (bit % 8)
    load_or_error(bytes(data))


@FUZZ
@given(st.binary(min_size=1, max_size=64), st.integers(min_value=0, max_value=len(VALID_BYTES)))
def test_spliced_bytes(chunk: bytes, position: int) -> None:
    load_or_error(VALID_BYTES[:position] + chunk + VALID_BYTES[position:])


# --------------------------------------------------------------------------------------------------------
# (2) Valid header, fuzzed metadata values
# --------------------------------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
metadata_strings = st.one_of(
    st.text(max_size=60),
    json_values.map(lambda value: json.dumps(value)),
    st.sampled_from(["", "null", "NaN", "Infinity", "-1", "0", "2", "1e999", "-0.0", "1.5", "[]", "{}", "9" * 5000]),
)
METADATA_KEYS = sorted(VALID_HEADER["__metadata__"])


@FUZZ
@given(st.sampled_from(METADATA_KEYS), st.one_of(st.none(), metadata_strings))
def test_fuzzed_metadata_value(key: str, value: str | None) -> None:
    load_or_error(with_metadata(**{key: value}))


JSON_FIELDS = {
    "kvplan.fingerprint": sorted(json.loads(VALID_HEADER["__metadata__"]["kvplan.fingerprint"])),
    "kvplan.params": ["pyramidinfer", "kvsharer", "bogus"],
    "kvplan.recipe": ["alias", "x"],
    "kvplan.provenance": ["seed"],
}
_DELETE = object()


@st.composite
def json_field_edits(draw: st.DrawFn) -> tuple[str, str, Any]:
    key = draw(st.sampled_from(sorted(JSON_FIELDS)))
    field = draw(st.sampled_from(JSON_FIELDS[key]))
    value = draw(st.one_of(st.just(_DELETE), json_values))
    return key, field, value


@FUZZ
@given(json_field_edits())
def test_fuzzed_json_field(edit: tuple[str, str, Any]) -> None:
    key, field, value = edit
    content = json.loads(VALID_HEADER["__metadata__"][key])
    if value is _DELETE:
        content.pop(field, None)
    else:
        content[field] = value
    load_or_error(with_metadata(**{key: json.dumps(content)}))


@FUZZ
@given(st.sampled_from(["window", "sink", "slack", "other"]), json_values)
def test_fuzzed_pyramidinfer_param(name: str, value: Any) -> None:
    params = {"pyramidinfer": {"window": 8, "sink": 2, name: value}}
    plan = load_or_error(with_metadata(**{"kvplan.params": json.dumps(params)}))
    is_count = isinstance(value, int) and not isinstance(value, bool)
    if name == "window" and not (is_count and 1 <= value < 2**31):
        assert plan is None
    if name in ("sink", "slack") and not (is_count and 0 <= value < 2**31):
        assert plan is None


@FUZZ
@given(st.sampled_from(["num_hidden_layers", "num_key_value_heads", "head_dim", "vocab_size"]), json_values)
def test_fuzzed_fingerprint_count(name: str, value: Any) -> None:
    fingerprint = json.loads(VALID_HEADER["__metadata__"]["kvplan.fingerprint"])
    assume(value != fingerprint[name])
    fingerprint[name] = value
    plan = load_or_error(with_metadata(**{"kvplan.fingerprint": json.dumps(fingerprint)}))
    if name in ("num_hidden_layers", "num_key_value_heads"):
        assert plan is None  # the tensor shapes no longer match
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        assert plan is None


@FUZZ
@given(json_values)
def test_fuzzed_target_ratio(value: Any) -> None:
    plan = load_or_error(with_metadata(**{"kvplan.target_ratio": json.dumps(value)}))
    ok = value is None or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 < value <= 1
    )
    assert (plan is not None) == ok


@FUZZ
@given(st.lists(st.sampled_from([*METHODS, "bogus", "", "PyramidInfer"]), max_size=6))
def test_fuzzed_methods(methods: list[str]) -> None:
    plan = load_or_error(with_metadata(**{"kvplan.methods": json.dumps(methods)}))
    if plan is not None:
        assert sorted(methods) == sorted(METHODS)  # every tensor present needs its method, and vice versa


# --------------------------------------------------------------------------------------------------------
# (3) Fuzzed tensors
# --------------------------------------------------------------------------------------------------------

REQUIRED = {
    "pyramidinfer.layer_keep": ("F32", (L,)),
    "kvsharer.share_source": ("I32", (L,)),
    "kvcompress.head_keep": ("F32", (L, H_KV)),
    "kcache.topn": ("I32", (L,)),
}
shapes = st.lists(st.integers(min_value=0, max_value=5), max_size=3).map(tuple)
any_floats = st.floats(width=32, allow_nan=True, allow_infinity=True)


@st.composite
def wrong_dtype_or_shape(draw: st.DrawFn) -> tuple[str, str, np.ndarray]:
    name = draw(st.sampled_from(sorted(REQUIRED)))
    tag = draw(st.sampled_from(sorted(_NUMPY_DTYPES)))
    shape = draw(shapes)
    assume((tag, shape) != REQUIRED[name])
    array = np.ones(shape, dtype=_NUMPY_DTYPES[tag])
    return name, tag, array


@FUZZ
@given(wrong_dtype_or_shape())
def test_wrong_dtype_or_shape_is_refused(case: tuple[str, str, np.ndarray]) -> None:
    name, tag, array = case
    with pytest.raises(PlanError):
        Plan.from_bytes(with_tensors({name: (tag, array)}))


def _finite_in_unit(values: list[float]) -> bool:
    return all(math.isfinite(v) and 0 < v <= 1 for v in values)


@FUZZ
@given(st.lists(any_floats, min_size=L, max_size=L))
def test_layer_keep_values(values: list[float]) -> None:
    plan = load_or_error(with_tensors({"pyramidinfer.layer_keep": ("F32", np.array(values, dtype="<f4"))}))
    assert (plan is not None) == _finite_in_unit(np.array(values, dtype="<f4").tolist())


@FUZZ
@given(st.lists(any_floats, min_size=L * H_KV, max_size=L * H_KV))
def test_head_keep_values(values: list[float]) -> None:
    array = np.array(values, dtype="<f4").reshape(L, H_KV)
    plan = load_or_error(with_tensors({"kvcompress.head_keep": ("F32", array)}))
    with np.errstate(all="ignore"):
        sums = array.astype("f8").sum(axis=1)
        ok = bool(np.isfinite(array).all() and (array >= 0).all() and (array <= 1).all()
                  and (np.abs(sums - 1) <= 1e-3).all())
    assert (plan is not None) == ok


def _share_source_ok(sources: list[int]) -> bool:
    return all(0 <= s <= layer and sources[s] == s for layer, s in enumerate(sources))


@FUZZ
@given(st.lists(st.integers(min_value=-3, max_value=2 * L), min_size=L, max_size=L))
def test_share_source_values(sources: list[int]) -> None:
    plan = load_or_error(with_tensors({"kvsharer.share_source": ("I32", np.array(sources, dtype="<i4"))}))
    assert (plan is not None) == _share_source_ok(sources)


@FUZZ
@given(st.lists(st.integers(min_value=-(2**31), max_value=2**31 - 1), min_size=L, max_size=L))
def test_topn_values(values: list[int]) -> None:
    plan = load_or_error(with_tensors({"kcache.topn": ("I32", np.array(values, dtype="<i4"))}))
    assert (plan is not None) == all(v >= 0 for v in values)


@FUZZ
@given(
    st.sampled_from([f"{m}.extra" for m in METHODS] + ["x.y", "pyramidinfer", "pyramidinfer.", ".x", "kcache.a b"]),
    st.sampled_from(["F32", "I32", "F16", "I64"]),
    shapes,
    any_floats,
)
def test_extra_tensors(name: str, tag: str, shape: tuple[int, ...], fill: float) -> None:
    with np.errstate(all="ignore"):
        array = np.full(shape, fill).astype(_NUMPY_DTYPES[tag])
    plan = load_or_error(with_tensors({name: (tag, array)}))
    ok = (
        name.endswith(".extra")
        and tag in ("F32", "I32")
        and (tag == "I32" or array.size == 0 or math.isfinite(float(np.float32(fill))))
    )
    assert (plan is not None) == ok


@FUZZ
@given(
    st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=L * H_KV, max_size=L * H_KV),
    st.sampled_from([0.0, 1e-5, 5e-4, 2e-3, 0.1]),
)
def test_head_keep_shares_near_one(values: list[float], shift: float) -> None:
    """Rows normalised to sum to 1, one entry moved by ``shift``: accepted exactly while every row sums to 1 within
    1e-3 and every share stays in [0, 1]."""
    array = np.array(values, dtype="<f8").reshape(L, H_KV) + 1e-3
    array = (array / array.sum(axis=1, keepdims=True)).astype("<f4")
    array[0, 0] += np.float32(shift)
    plan = load_or_error(with_tensors({"kvcompress.head_keep": ("F32", array)}))
    sums = array.astype("f8").sum(axis=1)
    ok = bool((array >= 0).all() and (array <= 1).all() and (np.abs(sums - 1) <= 1e-3).all())
    assert (plan is not None) == ok
