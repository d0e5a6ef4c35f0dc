"""The method registry: one registration per method drives the plan checks, the runtime, the recipe and the card."""

from __future__ import annotations

import dataclasses

import json
import struct

import pytest
import torch
from conftest import tiny_model
from helpers import pyramid_plan, share_plan

import runtime
from calibrate.recipe import Recipe, RecipeError
from runtime import registry
from runtime.hub import render_model_card
from runtime.plan import Plan, PlanError, fingerprint_from_model, weights_digest


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _with(plan: Plan, **tensors) -> Plan:
    return Plan(fingerprint=plan.fingerprint, methods=plan.methods, params=plan.params,
                tensors={**plan.tensors, **tensors}, target_ratio=plan.target_ratio)


def test_every_method_is_registered_once_with_its_runtime_tensor():
    assert registry.METHODS == ("pyramidinfer", "kvsharer", "kvcompress", "kcache")
    names = {spec.required_tensor.name for spec in registry.specs()}
    assert names == {"pyramidinfer.layer_keep", "kvsharer.share_source", "kvcompress.head_keep", "kcache.topn"}
    assert registry.runtime_supported() == ("pyramidinfer", "kvsharer", "kvcompress", "kcache")
    assert registry.calibration_supported() == ("pyramidinfer", "kvsharer", "kvcompress", "kcache")
    head_keep = registry.get("kvcompress").required_tensor
    assert head_keep.dtype == torch.float32 and head_keep.shape == ("L", "H_kv")
    topn = registry.get("kcache").required_tensor
    assert topn.dtype == torch.int32 and topn.shape == ("L",)


def test_defaults_come_from_the_registration():
    from calibrate.kvsharer import SharerSettings
    from calibrate.pyramidinfer import PyramidSettings

    pyr = PyramidSettings.from_args({})
    spec = registry.get("pyramidinfer")
    assert (pyr.window, pyr.sink, pyr.horizon, pyr.pool, pyr.head_reduce, pyr.slack) == tuple(
        spec.param(name).default for name in ("window", "sink", "horizon", "pool", "head_reduce", "slack")
    )
    assert pyr.runtime_params() == {"window": 32, "sink": 4}  # optional ones only when not default
    assert PyramidSettings.from_args({"head_reduce": "max", "slack": 8}).runtime_params() == {
        "window": 32, "sink": 4, "head_reduce": "max", "slack": 8}
    assert SharerSettings.from_args({}).threshold == registry.get("kvsharer").param("threshold").default


@pytest.fixture
def kcache_without_runtime(monkeypatch):
    """The registry as an older runtime sees it: KCache registered (its plans load) but not applicable."""
    spec = dataclasses.replace(registry.get("kcache"), configure=None, calibration_step=None)
    monkeypatch.setitem(registry.REGISTRY, "kcache", spec)
    return spec


@pytest.mark.parametrize("method,tensor", [
    ("kcache", torch.full((4,), 8, dtype=torch.int32)),
])
def test_a_plan_enabling_a_method_the_runtime_cannot_apply_is_refused_whole(model, method, tensor,
                                                                            kcache_without_runtime):
    base = pyramid_plan(model, 0.5)
    name = registry.get(method).required_tensor.name
    plan = Plan(fingerprint=base.fingerprint, methods=(*base.methods, method), params=base.params,
                tensors={**base.tensors, name: tensor}, target_ratio=0.5)
    plan.check()  # a valid plan: it loads and can be inspected
    with pytest.raises(PlanError, match=f"enables {method}, which this kvplan runtime cannot apply"):
        runtime.apply_plan(model, plan)
    assert model.config._attn_implementation == "sdpa"  # nothing was half-applied
    assert runtime.remove_plan(model) is False
    with pytest.raises(PlanError, match=method):
        runtime.theoretical_bytes(plan, model.config, 100)


def test_a_plan_from_a_newer_kvplan_is_refused(model, tmp_path):
    plan = pyramid_plan(model, 0.5)
    with pytest.raises(PlanError, match="unknown method 'streamingllm'.*newer kvplan"):
        Plan(fingerprint=plan.fingerprint, methods=("streamingllm",), tensors={}).check()
    newer_param = Plan(fingerprint=plan.fingerprint, methods=plan.methods, tensors=plan.tensors,
                       params={"pyramidinfer": {**plan.params["pyramidinfer"], "decay": 3}})
    with pytest.raises(PlanError, match=r"params.pyramidinfer has parameter\(s\) \['decay'\].*newer kvplan"):
        newer_param.check()
    with pytest.raises(PlanError, match="unknown field.*newer kvplan"):
        Plan(fingerprint={**plan.fingerprint, "attention_sinks": 4}).check()


@pytest.mark.parametrize("version", ["\x00{not json", "", "latest", "1.0 beta", "0.1.0\n", "x" * 70])
def test_kvplan_version_must_be_a_version_string(model, tmp_path, version):
    plan = pyramid_plan(model, 0.5)
    with pytest.raises(PlanError, match="version string"):
        Plan(fingerprint=plan.fingerprint, methods=plan.methods, params=plan.params, tensors=plan.tensors,
             kvplan_version=version).check()
    # the same on load: rewrite the metadata of a valid file
    path = plan.save(tmp_path / "p.safetensors")
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"]["kvplan.version"] = version
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])
    with pytest.raises(PlanError, match="version string"):
        Plan.load(path)


@pytest.mark.parametrize("version", ["0.1.0", "1.2.3", "0.2.0.dev1", "1.0rc2", "2.0.post1"])
def test_version_strings_that_are_accepted(model, version):
    plan = pyramid_plan(model, 0.5)
    Plan(fingerprint=plan.fingerprint, methods=plan.methods, params=plan.params, tensors=plan.tensors,
         kvplan_version=version).check()


@pytest.mark.parametrize("name,value,problem", [
    ("pyramidinfer.captured_mass", torch.full((4,), 7.5), "in \\[0, 1\\]"),
    ("pyramidinfer.captured_mass", torch.full((4,), -0.1), "in \\[0, 1\\]"),
    ("pyramidinfer.captured_mass", torch.full((5,), 0.5), "shape"),
    ("pyramidinfer.captured_curve", torch.linspace(0, 1, 9).expand(4, 9) * 7.5, "in \\[0, 1\\]"),
    ("pyramidinfer.captured_curve", -torch.linspace(0, 1, 9).expand(4, 9), "in \\[0, 1\\]"),
    ("pyramidinfer.captured_curve", torch.linspace(1, 0, 9).expand(4, 9).contiguous(), "non-decreasing"),
    ("kvsharer.distance", -torch.ones(2, 4, 4), ">= 0"),
    ("kvsharer.search_log", torch.tensor([[3.0, 9.0, 0.1, 0.9, 0.5, 0.1, 1.0]]), "source"),
    ("kvsharer.search_log", torch.tensor([[3.0, 1.0, 0.1, 1.9, 0.5, 0.1, 1.0]]), "cosine"),
    ("kvsharer.search_log", torch.tensor([[3.0, 1.0, 0.1, 0.9, 0.5, 0.1, 0.5]]), "accepted"),
    ("kvsharer.attention_error", -torch.ones(4, 4), ">= 0"),
])
def test_inspection_tensors_are_range_checked(model, name, value, problem):
    plan = share_plan(model, [0, 0, 2, 2], keep=0.5)
    with pytest.raises(PlanError, match=problem):
        _with(plan, **{name: value}).check()


def test_inspection_tensors_in_range_are_accepted(model):
    plan = share_plan(model, [0, 0, 2, 2], keep=0.5)
    curve = torch.linspace(0, 1, 9).expand(4, 9).clone()
    curve[0] *= 2  # layer 0 is read by layer 1: its curve adds the reader's
    _with(plan, **{
        "pyramidinfer.captured_curve": curve,
        "pyramidinfer.captured_mass": torch.full((4,), 0.9),
        "kvsharer.distance": torch.rand(2, 4, 4),
        "kvsharer.search_log": torch.tensor([[1.0, 0.0, 0.3, 0.97, 0.8, 0.05, 1.0]]),
        "kvsharer.attention_error": torch.rand(4, 4),
    }).check()
    with pytest.raises(PlanError, match="in \\[0, 1\\]"):  # without the reader, 2.0 is out of range
        _with(share_plan(model, [0, 1, 2, 3], keep=0.5), **{"pyramidinfer.captured_curve": curve}).check()


def test_recipe_parameters_are_checked_against_the_registration():
    with pytest.raises(RecipeError, match="unknown pyramidinfer option"):
        Recipe(model="x", method_args={"pyramidinfer": {"windw": 32}})
    with pytest.raises(RecipeError, match="window must be an integer >= 1"):
        Recipe(model="x", method_args={"pyramidinfer": {"window": 0}})
    with pytest.raises(RecipeError, match="head_reduce must be one of"):
        Recipe(model="x", method_args={"pyramidinfer": {"head_reduce": "median"}})
    with pytest.raises(RecipeError, match="threshold must be a number in \\[0, 1\\]"):
        Recipe(model="x", method_args={"kvsharer": {"threshold": 1.5}})
    Recipe(model="x", method_args={"pyramidinfer": {"window": 16, "slack": 8}, "kvsharer": {"share_layers": 0.25}})


def test_model_card_and_help_come_from_the_registry(model):
    plan = share_plan(model, [0, 0, 2, 2], keep=0.5)
    card = render_model_card(plan)
    for spec in registry.specs(plan.methods):
        assert spec.description in card and spec.card_column[0] in card
    assert registry.get("kcache").description not in card
    lines = registry.help_lines()
    assert any(line.startswith("kcache: ") for line in lines)
    assert any(line.startswith("kvcompress: ") for line in lines)


def test_help_marks_a_method_this_runtime_cannot_apply(kcache_without_runtime):
    assert any(line.startswith("kcache [not implemented yet]") for line in registry.help_lines())


def test_weights_digest_identifies_the_weights_not_the_name(model):
    twin = tiny_model("llama")  # same seed: same weights
    twin.config._name_or_path = "somewhere/else"
    assert weights_digest(twin) == weights_digest(model)
    other = tiny_model("llama", seed=1)
    assert weights_digest(other) != weights_digest(model)
    plan = pyramid_plan(model, 0.5)
    assert plan.fingerprint["weights"].startswith("float32:")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same weights under another name: no warning
        plan.validate(twin)
    with pytest.warns(UserWarning, match="weights differ"):
        plan.validate(other)
    no_digest = dict(plan.fingerprint)
    del no_digest["weights"]
    Plan(fingerprint=no_digest).check()  # plans made before the digest existed stay valid
    assert "weights" not in fingerprint_from_model(model.config)
