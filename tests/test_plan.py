"""Plan file schema: round trip, determinism, atomic writes, every validation rule, model fingerprints."""

from __future__ import annotations

import json
import math
import os
import struct
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import transformers
from safetensors import safe_open

from runtime import registry
from runtime.planfile import MAX_FILE_BYTES
from runtime.plan import (
    METHODS,
    SCHEMA_VERSION,
    Plan,
    PlanError,
    fingerprint_from_model,
    load_plan,
)

L, H, H_KV = 4, 4, 2


def llama_config(**overrides: Any) -> transformers.LlamaConfig:
    values = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=H_KV,
        vocab_size=128,
    )
    values.update(overrides)
    return transformers.LlamaConfig(**values)


def full_plan(**overrides: Any) -> Plan:
    """A valid plan with every method enabled and one inspection tensor."""
    fields: dict[str, Any] = dict(
        fingerprint=fingerprint_from_model(llama_config()),
        methods=METHODS,
        params={"pyramidinfer": {"window": 8, "sink": 2, "slack": 4}, "kvcompress": {"window": 8, "sink": 2}},
        tensors={
            "pyramidinfer.layer_keep": torch.tensor([1.0, 0.75, 0.5, 0.25]),
            "kvsharer.share_source": torch.tensor([0, 0, 2, 2], dtype=torch.int32),
            "kvcompress.head_keep": torch.tensor([[0.5, 0.5], [0.7, 0.3], [1.0, 0.0], [0.2, 0.8]]),
            "kcache.topn": torch.tensor([0, 16, 16, 8], dtype=torch.int32),
            "pyramidinfer.curve": torch.linspace(0, 1, 6).reshape(2, 3),
        },
        target_ratio=0.4,
        recipe={"alias": "tiny", "budgets": [0.5, 0.25], "nested": {"seed": 0}},
        provenance={"seed": 0, "samples": 8, "tokens": 512, "host": {"torch": torch.__version__}},
    )
    fields.update(overrides)
    return Plan(**fields)


def with_tensor(name: str, value: torch.Tensor | None) -> Plan:
    tensors = dict(full_plan().tensors)
    if value is None:
        tensors.pop(name)
    else:
        tensors[name] = value
    return full_plan(tensors=tensors)


def with_fingerprint(**changes: Any) -> Plan:
    fingerprint = dict(full_plan().fingerprint)
    for key, value in changes.items():
        if value is _DELETE:
            fingerprint.pop(key)
        else:
            fingerprint[key] = value
    return full_plan(fingerprint=fingerprint)


_DELETE = object()


# --------------------------------------------------------------------------------------------------------
# Round trip and file format
# --------------------------------------------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    plan = full_plan()
    path = plan.save(tmp_path / "plan.safetensors")
    loaded = Plan.load(path)
    assert loaded == plan
    for name, tensor in plan.tensors.items():
        assert loaded.tensors[name].dtype == tensor.dtype
        assert torch.equal(loaded.tensors[name], tensor)
    assert loaded.methods == METHODS
    assert loaded.params == plan.params
    assert loaded.fingerprint == plan.fingerprint
    assert loaded.target_ratio == pytest.approx(0.4)
    assert loaded.recipe == plan.recipe and loaded.provenance == plan.provenance
    assert loaded.kvplan_version == plan.kvplan_version


def test_metadata_is_all_strings_and_readable_by_safetensors(tmp_path: Path) -> None:
    path = full_plan().save(tmp_path / "plan.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        assert set(handle.keys()) == set(full_plan().tensors)
    assert metadata["format"] == "pt"
    assert metadata["kvplan.schema_version"] == str(SCHEMA_VERSION)
    assert json.loads(metadata["kvplan.methods"]) == list(METHODS)
    assert json.loads(metadata["kvplan.params"])["pyramidinfer"] == {"window": 8, "sink": 2, "slack": 4}
    assert json.loads(metadata["kvplan.fingerprint"])["num_hidden_layers"] == L
    assert float(metadata["kvplan.target_ratio"]) == pytest.approx(0.4)
    assert all(isinstance(value, str) for value in metadata.values())


def test_methods_are_stored_in_canonical_order() -> None:
    plan = full_plan(methods=("kcache", "kvsharer", "pyramidinfer", "kvcompress"))
    assert plan.methods == METHODS


def test_save_is_byte_identical(tmp_path: Path) -> None:
    plan = full_plan()
    reordered = full_plan(
        tensors=dict(reversed(list(plan.tensors.items()))),
        recipe=dict(reversed(list(plan.recipe.items()))),
        fingerprint=dict(reversed(list(plan.fingerprint.items()))),
    )
    first = plan.save(tmp_path / "a.safetensors").read_bytes()
    second = plan.save(tmp_path / "b.safetensors").read_bytes()
    third = reordered.save(tmp_path / "c.safetensors").read_bytes()
    assert first == second == third
    (length,) = struct.unpack("<Q", first[:8])
    assert length % 8 == 0


def test_non_contiguous_tensors_are_saved(tmp_path: Path) -> None:
    head_keep = torch.tensor([[0.5, 0.7, 1.0, 0.2], [0.5, 0.3, 0.0, 0.8]]).t()
    assert not head_keep.is_contiguous()
    plan = with_tensor("kvcompress.head_keep", head_keep)
    loaded = Plan.load(plan.save(tmp_path / "plan.safetensors"))
    assert torch.equal(loaded.head_keep, head_keep)


def test_atomic_save_leaves_no_temp_files(tmp_path: Path) -> None:
    full_plan().save(tmp_path / "plan.safetensors")
    full_plan(target_ratio=0.5).save(tmp_path / "plan.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["plan.safetensors"]
    assert Plan.load(tmp_path / "plan.safetensors").target_ratio == 0.5


def test_invalid_plan_does_not_touch_existing_file(tmp_path: Path) -> None:
    path = full_plan().save(tmp_path / "plan.safetensors")
    before = path.read_bytes()
    bad = with_tensor("pyramidinfer.layer_keep", torch.tensor([1.0, 0.5, float("nan"), 0.5]))
    with pytest.raises(PlanError, match="NaN"):
        bad.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["plan.safetensors"]


def test_save_into_missing_directory_is_plan_error(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="cannot write"):
        full_plan().save(tmp_path / "missing" / "plan.safetensors")


def test_properties() -> None:
    plan = full_plan()
    assert plan.num_layers == L
    assert plan.layer_keep.shape == (L,)
    assert plan.share_source.dtype == torch.int32
    assert plan.head_keep.shape == (L, H_KV)
    assert plan.topn.tolist() == [0, 16, 16, 8]
    assert not plan.is_noop
    assert isinstance(PlanError("x"), ValueError)


def test_noop_plan(tmp_path: Path) -> None:
    config = llama_config()
    plan = Plan.noop(config)
    assert plan.is_noop and plan.methods == () and plan.tensors == {}
    assert plan.layer_keep is None and plan.share_source is None and plan.head_keep is None and plan.topn is None
    loaded = Plan.load(plan.save(tmp_path / "noop.safetensors"))
    assert loaded == plan and loaded.is_noop
    loaded.validate(config)
    assert "none" in loaded.summary()


def test_summary_mentions_methods_and_keep() -> None:
    text = full_plan().summary()
    assert "pyramidinfer (sink=2, slack=4, window=8)" in text
    assert "layer keep: 1.00 0.75 0.50 0.25" in text
    assert "share source: 0 0 2 2" in text
    assert "target ratio: 0.4" in text
    assert "llama" in text


# --------------------------------------------------------------------------------------------------------
# Plan-level rules (checked by save, and by load on the same data)
# --------------------------------------------------------------------------------------------------------

_NAN = float("nan")
_I32 = torch.int32

INVALID_PLANS: dict[str, tuple[Callable[[], Plan], str]] = {
    "unknown method": (lambda: full_plan(methods=("pyramidinfer", "bogus")), "unknown method 'bogus'"),
    "duplicate method": (lambda: full_plan(methods=["kvsharer", "kvsharer"]), "twice"),
    "methods not a list": (lambda: full_plan(methods="kvsharer"), "methods must be a list"),
    "missing required tensor": (lambda: with_tensor("kcache.topn", None), "no kcache.topn tensor"),
    "tensor of disabled method": (
        lambda: full_plan(
            methods=("pyramidinfer", "kvsharer", "kvcompress"),
            params={"pyramidinfer": {"window": 1, "sink": 0}, "kvcompress": {"window": 1, "sink": 0}},
        ),
        "kcache is not enabled",
    ),
    "layer_keep dtype": (lambda: with_tensor("pyramidinfer.layer_keep", torch.ones(L, dtype=_I32)), "float32 of shape"),
    "layer_keep shape": (lambda: with_tensor("pyramidinfer.layer_keep", torch.ones(L + 1)), r"shape \[4\]"),
    "layer_keep zero": (lambda: with_tensor("pyramidinfer.layer_keep", torch.tensor([1.0, 0.0, 1, 1])), r"\(0, 1\]"),
    "layer_keep above one": (lambda: with_tensor("pyramidinfer.layer_keep", torch.tensor([1.5, 1, 1, 1])), r"\(0, 1\]"),
    "layer_keep nan": (lambda: with_tensor("pyramidinfer.layer_keep", torch.tensor([1, _NAN, 1, 1])), "NaN"),
    "share_source dtype": (lambda: with_tensor("kvsharer.share_source", torch.zeros(L)), "int32 of shape"),
    "share_source shape": (lambda: with_tensor("kvsharer.share_source", torch.zeros(2, 2, dtype=_I32)), "int32"),
    "share_source negative": (
        lambda: with_tensor("kvsharer.share_source", torch.tensor([0, -1, 2, 3], dtype=_I32)),
        "0 <= source <= layer",
    ),
    "share_source forward reference": (
        lambda: with_tensor("kvsharer.share_source", torch.tensor([0, 2, 2, 3], dtype=_I32)),
        "layer 1 has source 2",
    ),
    "share_source unresolved chain": (
        lambda: with_tensor("kvsharer.share_source", torch.tensor([0, 0, 1, 3], dtype=_I32)),
        "chains must be resolved",
    ),
    "head_keep shape": (lambda: with_tensor("kvcompress.head_keep", torch.ones(L, H)), r"shape \[4, 2\]"),
    "head_keep negative": (lambda: with_tensor("kvcompress.head_keep", -torch.ones(L, H_KV)), ">= 0"),
    "head_keep zero row": (
        lambda: with_tensor("kvcompress.head_keep", torch.tensor([[0.5, 0.5], [0, 0], [0.5, 0.5], [0.5, 0.5]])),
        "must sum to 1",
    ),
    "head_keep shares not adding up": (
        lambda: with_tensor("kvcompress.head_keep", torch.tensor([[0.5, 0.5], [0.7, 0.2], [0.5, 0.5], [0.5, 0.5]])),
        r"layer 1 sums to 0\.9",
    ),
    "head_keep above 1": (
        lambda: with_tensor("kvcompress.head_keep", torch.tensor([[1.5, -0.5], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])),
        r"\[0, 1\]",
    ),
    "head_keep nan": (lambda: with_tensor("kvcompress.head_keep", torch.full((L, H_KV), math.nan)), "NaN|finite"),
    "kvcompress layer_keep next to pyramidinfer's": (
        lambda: with_tensor("kvcompress.layer_keep", torch.full((L,), 0.5)), "next to pyramidinfer.layer_keep"
    ),
    "head_keep inf": (lambda: with_tensor("kvcompress.head_keep", torch.full((L, H_KV), math.inf)), "infinite"),
    "topn negative": (lambda: with_tensor("kcache.topn", torch.tensor([0, -1, 0, 0], dtype=_I32)), ">= 0"),
    "topn dtype": (lambda: with_tensor("kcache.topn", torch.zeros(L, dtype=torch.int64)), "float32 or int32"),
    "inspection float64": (
        lambda: with_tensor("kvsharer.curve", torch.zeros(3, dtype=torch.float64)),
        "float32 or int32",
    ),
    "inspection nan": (lambda: with_tensor("kvsharer.curve", torch.tensor([_NAN])), "NaN"),
    "inspection not a tensor": (lambda: with_tensor("kvsharer.curve", [1.0]), "torch.Tensor"),
    "tensor name without method": (lambda: with_tensor("layer_keep", torch.ones(L)), "<method>.<name>"),
    "tensor name unknown method": (lambda: with_tensor("h2o.layer_keep", torch.ones(L)), "<method>.<name>"),
    "window missing": (lambda: full_plan(params={"pyramidinfer": {"sink": 2}}), "window is required"),
    "pyramidinfer params missing": (lambda: full_plan(params={}), "params.pyramidinfer.window is required"),
    "window zero": (
        lambda: full_plan(params={"pyramidinfer": {"window": 0, "sink": 2}}),
        "window must be an integer >= 1",
    ),
    "sink negative": (
        lambda: full_plan(params={"pyramidinfer": {"window": 4, "sink": -1}}),
        "sink must be an integer >= 0",
    ),
    "sink bool": (lambda: full_plan(params={"pyramidinfer": {"window": 4, "sink": True}}), "sink must be an integer"),
    "slack float": (
        lambda: full_plan(params={"pyramidinfer": {"window": 4, "sink": 0, "slack": 1.5}}),
        "slack must be an integer",
    ),
    "params for disabled method": (
        lambda: full_plan(methods=(), tensors={}, params={"kvsharer": {}}),
        "not an enabled method",
    ),
    "params not scalar": (
        lambda: full_plan(params={"pyramidinfer": {"window": 4, "sink": 0, "extra": [1]}}),
        "must be a JSON scalar",
    ),
    "params nan": (
        lambda: full_plan(params={"pyramidinfer": {"window": 4, "sink": 0, "extra": _NAN}}),
        "must be a JSON scalar",
    ),
    "params not dict": (lambda: full_plan(params=[1]), "params must be a JSON object"),
    "fingerprint missing key": (lambda: with_fingerprint(head_dim=_DELETE), "missing head_dim"),
    "fingerprint zero layers": (lambda: with_fingerprint(num_hidden_layers=0), "num_hidden_layers must be a positive"),
    "fingerprint bool": (lambda: with_fingerprint(vocab_size=True), "vocab_size must be a positive"),
    "fingerprint huge": (lambda: with_fingerprint(hidden_size=10**30), "hidden_size must be a positive"),
    "fingerprint string int": (lambda: with_fingerprint(num_attention_heads="4"), "num_attention_heads"),
    "fingerprint gqa": (lambda: with_fingerprint(num_key_value_heads=3), "not a multiple"),
    "fingerprint layer_types length": (lambda: with_fingerprint(layer_types=["full_attention"]), "1 entries for 4"),
    "fingerprint layer_types type": (lambda: with_fingerprint(layer_types=[1, 2, 3, 4]), "list of strings"),
    "fingerprint model_type empty": (lambda: with_fingerprint(model_type=""), "model_type"),
    "fingerprint sliding_window": (lambda: with_fingerprint(sliding_window=0), "sliding_window"),
    "fingerprint revision type": (lambda: with_fingerprint(revision=3), "revision"),
    "fingerprint not dict": (lambda: full_plan(fingerprint=[1]), "fingerprint must be a JSON object"),
    "target_ratio zero": (lambda: full_plan(target_ratio=0.0), "target_ratio"),
    "target_ratio above one": (lambda: full_plan(target_ratio=1.5), "target_ratio"),
    "target_ratio nan": (lambda: full_plan(target_ratio=_NAN), "target_ratio"),
    "target_ratio bool": (lambda: full_plan(target_ratio=True), "target_ratio"),
    "target_ratio string": (lambda: full_plan(target_ratio="0.5"), "target_ratio"),
    "recipe not dict": (lambda: full_plan(recipe=[1, 2]), "recipe must be a JSON object"),
    "recipe nan": (lambda: full_plan(recipe={"x": [1, _NAN]}), r"recipe.x\[1\]"),
    "recipe set": (lambda: full_plan(recipe={"x": {1, 2}}), "not a JSON value"),
    "recipe int key": (lambda: full_plan(recipe={1: "a"}), "non-string key"),
    "provenance too deep": (lambda: full_plan(provenance=_nested(40)), "nested more than"),
    "version empty": (lambda: full_plan(kvplan_version=""), "kvplan_version"),
}


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize("case", sorted(INVALID_PLANS))
def test_invalid_plan_is_refused_by_save(case: str, tmp_path: Path) -> None:
    make, message = INVALID_PLANS[case]
    plan = make()
    with pytest.raises(PlanError, match=message):
        plan.save(tmp_path / "plan.safetensors")
    assert not os.listdir(tmp_path)


# Rules that also hold when a file written by someone else carries the bad value: write the file without
# save's check, then load it.
NOT_WRITABLE_AS_FILE = {
    "methods not a list",  # a string is written as a list of characters
    "target_ratio string",  # written as a number
    "recipe int key",  # JSON turns the key into a string
    "recipe set",
    "recipe nan",
    "params nan",
    "target_ratio nan",
    "inspection not a tensor",
    "inspection float64",
    "topn dtype",
}
LOADABLE_CASES = sorted(set(INVALID_PLANS) - NOT_WRITABLE_AS_FILE)


@pytest.mark.parametrize("case", LOADABLE_CASES)
def test_invalid_plan_is_refused_by_load(case: str, tmp_path: Path) -> None:
    from runtime.planfile import serialize as _serialize

    make, message = INVALID_PLANS[case]
    plan = make()
    path = tmp_path / "plan.safetensors"
    path.write_bytes(_serialize(plan.tensors, _raw_metadata(plan)))
    with pytest.raises(PlanError, match=message):
        Plan.load(path)


def _raw_metadata(plan: Plan) -> dict[str, str]:
    """Metadata strings for a plan without validating it (``Plan.metadata`` keeps methods as given)."""
    metadata = plan.metadata()
    metadata["kvplan.methods"] = json.dumps(list(plan.methods))
    return metadata


# --------------------------------------------------------------------------------------------------------
# File-level rules (checked before and while safetensors reads the bytes)
# --------------------------------------------------------------------------------------------------------


def _valid_file() -> tuple[dict[str, Any], bytes]:
    data = full_plan().to_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _encode(header: Any, buffer: bytes, raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + buffer


def _edit_metadata(**changes: str | None) -> bytes:
    header, buffer = _valid_file()
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            header["__metadata__"].pop(key)
        else:
            header["__metadata__"][key] = value
    return _encode(header, buffer)


def _edit_entry(name: str, **changes: Any) -> bytes:
    header, buffer = _valid_file()
    header[name].update(changes)
    return _encode(header, buffer)


def _with_duplicate_key() -> bytes:
    header, buffer = _valid_file()
    text = json.dumps(header)
    text = text.replace('{"__metadata__": {', '{"__metadata__": {"format": "pt", ', 1)
    return _encode(None, buffer, text.encode())


def _offsets_shifted() -> bytes:
    header, buffer = _valid_file()
    for entry in header.values():
        if isinstance(entry, dict) and "data_offsets" in entry:
            entry["data_offsets"] = [o + 4 for o in entry["data_offsets"]]
    return _encode(header, b"\0" * 4 + buffer)


def _newer_schema_with_bf16() -> bytes:
    header, buffer = _valid_file()
    header["__metadata__"]["kvplan.schema_version"] = "2"
    header["kcache.topn"]["dtype"] = "BF16"
    return _encode(header, buffer)


BAD_FILES: dict[str, tuple[Callable[[], bytes], str]] = {
    "empty": (lambda: b"", "not a safetensors file"),
    "huge header length": (lambda: struct.pack("<Q", 2**40) + b"{}", "header claims"),
    "truncated header": (lambda: struct.pack("<Q", 100) + b"{}", "truncated"),
    "not utf8": (lambda: _encode(None, b"", b"\xff\xfe{}"), "not UTF-8"),
    "not json": (lambda: _encode(None, b"", b"{nope"), "not valid JSON"),
    "json array": (lambda: _encode([1, 2], b""), "must be a JSON object"),
    "nan in header": (lambda: _encode(None, b"", b'{"__metadata__": {}, "x": NaN}'), "NaN is not allowed"),
    "duplicate key": (_with_duplicate_key, "duplicate key"),
    "no metadata": (lambda: _encode({}, b""), "__metadata__"),
    "metadata not strings": (lambda: _encode({"__metadata__": {"a": 1}}, b""), "__metadata__"),
    "not a kvplan file": (lambda: _encode({"__metadata__": {"format": "pt"}}, b""), "not a kvplan plan file"),
    "newer schema": (lambda: _edit_metadata(kvplan__schema_version="2"), "upgrade kvplan"),
    "newer schema with a new dtype": (_newer_schema_with_bf16, "upgrade kvplan"),
    "older schema": (lambda: _edit_metadata(kvplan__schema_version="0"), "not supported"),
    "schema not int": (lambda: _edit_metadata(kvplan__schema_version="1.0"), "must be an integer"),
    "missing methods": (lambda: _edit_metadata(kvplan__methods=None), "missing kvplan.methods"),
    "methods not json": (lambda: _edit_metadata(kvplan__methods="[pyramidinfer"), "kvplan.methods is not valid JSON"),
    "methods not list": (lambda: _edit_metadata(kvplan__methods='{"a": 1}'), "methods must be a list"),
    "fingerprint not json": (lambda: _edit_metadata(kvplan__fingerprint="{"), "kvplan.fingerprint is not valid JSON"),
    "target ratio inf": (lambda: _edit_metadata(kvplan__target_ratio="1e999"), "out of range"),
    "target ratio text": (lambda: _edit_metadata(kvplan__target_ratio='"half"'), "target_ratio"),
    "recipe list": (lambda: _edit_metadata(kvplan__recipe="[]"), "recipe must be a JSON object"),
    "recipe too deep": (lambda: _edit_metadata(kvplan__recipe="[" * 5000 + "]" * 5000), "not valid JSON|nested"),
    "params nan": (lambda: _edit_metadata(kvplan__params='{"pyramidinfer": {"window": NaN}}'), "NaN is not allowed"),
    "format tf": (lambda: _edit_metadata(format="tf"), "format must be 'pt'"),
    "dtype f16": (lambda: _edit_entry("kcache.topn", dtype="F16"), "must be F32 or I32"),
    "bad shape": (lambda: _edit_entry("kcache.topn", shape=[-4]), "invalid shape"),
    "shape vs offsets": (lambda: _edit_entry("kcache.topn", shape=[5]), "needs 20"),
    "bad offsets": (lambda: _edit_entry("kcache.topn", data_offsets=[0]), "invalid data_offsets"),
    "extra entry key": (lambda: _edit_entry("kcache.topn", extra=1), "exactly dtype, shape and data_offsets"),
    "overlapping offsets": (lambda: _edit_entry("kvsharer.share_source", data_offsets=[0, 16]), "holes or overlaps"),
    "hole in buffer": (_offsets_shifted, "starts at byte 4"),
    "trailing bytes": (lambda: full_plan().to_bytes() + b"\0\0\0\0", "buffer"),
    "truncated buffer": (lambda: full_plan().to_bytes()[:-4], "buffer"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_is_refused(case: str, tmp_path: Path) -> None:
    make, message = BAD_FILES[case]
    path = tmp_path / "plan.safetensors"
    path.write_bytes(make())
    with pytest.raises(PlanError, match=message):
        Plan.load(path)


def test_oversized_file_is_refused_without_reading(tmp_path: Path) -> None:
    path = tmp_path / "plan.safetensors"
    with open(path, "wb") as handle:
        handle.truncate(MAX_FILE_BYTES + 1)  # sparse: costs no disk space
    with pytest.raises(PlanError, match="larger than any plan"):
        Plan.load(path)


def test_unknown_metadata_keys_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "plan.safetensors"
    path.write_bytes(_edit_metadata(other__tool="hello"))
    assert Plan.load(path) == full_plan()


def test_inspection_tensor_of_disabled_method_is_allowed(tmp_path: Path) -> None:
    plan = full_plan(
        methods=("pyramidinfer",),
        params={"pyramidinfer": {"window": 4, "sink": 0}},
        tensors={"pyramidinfer.layer_keep": torch.ones(L), "kvsharer.similarity": torch.zeros(L, L)},
    )
    assert Plan.load(plan.save(tmp_path / "plan.safetensors")) == plan


# --------------------------------------------------------------------------------------------------------
# load_plan
# --------------------------------------------------------------------------------------------------------


def test_load_plan_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.safetensors"
    with pytest.raises(PlanError, match="no plan file at .*nothing.safetensors"):
        load_plan(missing)
    with pytest.raises(PlanError, match="no plan file at .*nothing.safetensors"):
        load_plan(str(missing))


def test_load_plan_missing_relative_file_is_not_sent_to_the_hub() -> None:
    with pytest.raises(PlanError, match="no plan file at plans/x.safetensors"):
        load_plan("plans/x.safetensors")


def test_load_plan_local_file_and_directory(tmp_path: Path) -> None:
    plan = full_plan()
    plan.save(tmp_path / "plan.safetensors")
    assert load_plan(str(tmp_path / "plan.safetensors")) == plan
    assert load_plan(tmp_path) == plan


# --------------------------------------------------------------------------------------------------------
# Fingerprints and validate()
# --------------------------------------------------------------------------------------------------------


def test_fingerprint_of_llama_config() -> None:
    fingerprint = fingerprint_from_model(llama_config())
    assert fingerprint == {
        "model_type": "llama",
        "num_hidden_layers": L,
        "num_attention_heads": H,
        "num_key_value_heads": H_KV,
        "head_dim": 16,
        "hidden_size": 64,
        "vocab_size": 128,
        "layer_types": None,
        "sliding_window": None,
        "name_or_path": "",
        "revision": None,
    }


def test_validate_passes_for_matching_config_and_model() -> None:
    config = llama_config()
    plan = full_plan()
    plan.validate(config)
    plan.validate(transformers.LlamaForCausalLM(config))


def test_validate_lists_every_mismatch() -> None:
    other = llama_config(num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    with pytest.raises(PlanError) as info:
        full_plan().validate(other)
    message = str(info.value)
    assert "num_hidden_layers: plan 4 vs model 6" in message
    assert "num_attention_heads: plan 4 vs model 8" in message
    assert "head_dim: plan 16 vs model 8" in message
    assert "num_key_value_heads" not in message
    assert "python -m calibrate" in message


def test_validate_only_warns_about_another_checkpoint_name() -> None:
    plan = full_plan(fingerprint={**full_plan().fingerprint, "name_or_path": "org/base"})
    config = llama_config()
    config._name_or_path = "org/finetune"
    with pytest.warns(UserWarning, match="org/base"):
        plan.validate(config)
    config._name_or_path = "org/base"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan.validate(config)


def _gemma3_text_config() -> transformers.Gemma3TextConfig:
    return transformers.Gemma3TextConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=128,
        sliding_window=32,
    )


def test_fingerprint_of_gemma3_has_layer_types() -> None:
    text = _gemma3_text_config()
    fingerprint = fingerprint_from_model(text)
    assert fingerprint["model_type"] == "gemma3_text"
    assert fingerprint["layer_types"] == list(text.layer_types)
    assert len(fingerprint["layer_types"]) == 6
    assert "full_attention" in fingerprint["layer_types"] and "sliding_attention" in fingerprint["layer_types"]
    assert fingerprint["sliding_window"] == 32
    assert fingerprint["num_key_value_heads"] == 1


def test_fingerprint_of_multimodal_config_uses_text_config() -> None:
    text = _gemma3_text_config()
    wrapper = transformers.Gemma3Config(text_config=text.to_dict())
    assert fingerprint_from_model(wrapper) == fingerprint_from_model(text)


def test_validate_compares_layer_types() -> None:
    text = _gemma3_text_config()
    plan = Plan.noop(text)
    other = _gemma3_text_config()
    other.layer_types = ["full_attention"] * 6
    with pytest.raises(PlanError, match="layer_types: plan"):
        plan.validate(other)


def test_registry_covers_every_method() -> None:
    assert tuple(registry.REGISTRY) == METHODS
    for spec in registry.specs():
        assert spec.required_tensor.name.startswith(spec.name + ".")
