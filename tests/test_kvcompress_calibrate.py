"""KV-Compress calibration: retrieval probes, per-head allocation, the observer with a KVSharer map, end to end."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import tiny_calibration_llama
from test_data import make_tokenizer

import runtime
from calibrate import kvcompress as kvc
from calibrate.collect import run_calibration_pass
from calibrate.pipeline import CalibrationContext, CalibrationError, calibrate_model
from calibrate.pyramidinfer import GRID
from calibrate.recipe import Recipe, RecipeError
from runtime.cache import layer_types
from runtime.kvcompress import head_fractions
from runtime.plan import Plan, fingerprint_from_model

SEQ = 256


pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_calibration_llama(len(tokenizer))


def _samples(n=3, length=300, seed=0, vocab=300):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g) for _ in range(n)]


def _encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


# ------------------------------------------------------------------------------------------------------ probes


def test_probes_hide_the_needle_at_the_drawn_depth_and_ask_for_it_at_the_end(tokenizer):
    samples = _samples()
    probes, skipped = kvc.build_probes(tokenizer, samples, 6, limit=SEQ, seed=42, sink=4, window=32)
    assert len(probes) == 6 and skipped == []
    for i, p in enumerate(probes):
        needle = _encode(tokenizer, f" The secret code of {p.name} is {p.code}.")
        question = _encode(tokenizer, f" What is the secret code of {p.name}? The secret code of {p.name} is")
        answer = _encode(tokenizer, f" {p.code}")
        ids = p.ids.tolist()
        assert p.ids.dtype == torch.long and len(ids) == SEQ  # as long as the limit allows, never longer
        assert p.name in kvc.PROBE_NAMES and len(p.code) == 5 and p.code.isdigit()
        hay_len = p.cut - p.needle_len
        hay = samples[i % len(samples)][:hay_len].tolist()
        assert 0.1 <= p.depth <= 0.9 and p.source == i % len(samples)
        assert p.needle_start == min(max(round(p.depth * hay_len), 4), hay_len - 32)
        assert ids[p.needle_start : p.needle_start + p.needle_len] == needle and p.needle_len == len(needle)
        assert ids[: p.needle_start] + ids[p.needle_start + p.needle_len : p.cut] == hay  # the haystack, unchanged
        assert ids[p.cut :] == question + answer and p.answer_len == len(answer)
        assert p.cut - (p.needle_start + p.needle_len) >= 32  # the needle is not in the protected recent window


def test_probes_are_deterministic_for_a_seed(tokenizer):
    samples = _samples()
    a, _ = kvc.build_probes(tokenizer, samples, 5, SEQ, seed=7, sink=4, window=32)
    b, _ = kvc.build_probes(tokenizer, samples, 5, SEQ, seed=7, sink=4, window=32)
    c, _ = kvc.build_probes(tokenizer, samples, 5, SEQ, seed=8, sink=4, window=32)
    def key(probes):
        return [(p.name, p.code, p.depth, p.ids.tolist()) for p in probes]

    assert key(a) == key(b)
    assert [(p.code, p.depth) for p in a] != [(p.code, p.depth) for p in c]


def test_short_samples_skip_probes_and_a_calibration_with_nothing_to_observe_fails_clearly(tokenizer, model):
    probes, skipped = kvc.build_probes(tokenizer, _samples(length=60), 3, limit=60, seed=0, sink=4, window=32)
    assert probes == [] and len(skipped) == 3 and "too short" in skipped[0]
    short = [s[:40] for s in _samples(length=300)]  # a haystack shorter than the sequence limit: probe is shorter
    probes, _ = kvc.build_probes(tokenizer, short, 1, limit=SEQ, seed=0, sink=4, window=8)
    assert len(probes) == 1 and probes[0].cut - probes[0].needle_len == 40 and probes[0].ids.numel() < SEQ
    recipe = Recipe(model="org/name", num_calibration_samples=2, max_seq_length=64, methods=["kvcompress"])
    with pytest.raises(CalibrationError, match="too short"):
        calibrate_model(model, tokenizer, recipe, progress=False)


# -------------------------------------------------------------------------------------------------- allocation


def _grid():
    return torch.linspace(0, 1, GRID + 1, dtype=torch.float64)


def _retrieval_curve(rise_at=0.9):
    """Nothing captured until ``rise_at``, then everything: a head that fetches one fact from far back."""
    f = _grid()
    return ((f - rise_at) / (1 - rise_at)).clamp(0, 1)


def test_a_retrieval_head_gets_everything_when_its_gain_beats_the_others():
    f = _grid()
    steep, mild, flat = 1 - (1 - f) ** 8, 1 - (1 - f) ** 2, torch.zeros_like(f)
    curves = torch.stack([
        torch.stack([_retrieval_curve(), steep, steep, flat]),
        torch.stack([mild, steep, steep, flat]),
        torch.stack([mild, mild, mild, mild]),  # a layer that is not budgeted
    ])
    floor = 26 / GRID
    keep = kvc.allocate_head_keep(curves, [True, True, False], 0.5, floor)
    assert keep.shape == (3, 4) and keep.dtype == torch.float32
    assert keep[0, 0] == 1.0  # the late riser is climbed whole
    assert keep[0, 3] == pytest.approx(floor) and keep[1, 3] == pytest.approx(floor)  # nothing to gain: the floor
    assert float(keep[:2].min()) >= floor - 1e-7 and float(keep.max()) <= 1.0
    assert float(keep[:2].mean()) == pytest.approx(0.5, abs=1e-6)  # on the grid: 8 units x 128 steps exactly
    assert torch.all(keep[2] == 1.0)
    assert torch.equal(keep * GRID, (keep * GRID).round())  # on the grid
    # a tight budget: the steep heads' first steps gain more than the retrieval head's mean slope
    tight = kvc.allocate_head_keep(curves, [True, True, False], 0.15, floor)
    assert tight[0, 0] == pytest.approx(floor) and float(tight[0, 1]) > floor
    assert float(tight[:2].mean()) == pytest.approx(0.15, abs=1.0 / GRID)


def test_plan_tensors_reproduce_the_head_fractions():
    f = torch.tensor([[1.0, 0.25, 0.125], [0.5, 0.5, 0.5], [1.0, 1.0, 1.0], [0.140625, 0.9, 0.33]])
    layer_keep, head_keep = kvc.plan_tensors(f)
    assert head_keep.dtype == torch.float32 and layer_keep.dtype == torch.float32
    assert torch.allclose(head_keep.double().sum(dim=1), torch.ones(4, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(layer_keep, f.mean(dim=1))
    again = (head_keep.double() * 3 * layer_keep.double()[:, None]).clamp(max=1.0)
    assert torch.allclose(again, f.double(), atol=1e-6)
    with pytest.raises(ValueError):
        kvc.plan_tensors(torch.tensor([[0.0, 1.0]]))


def test_budget_matches_pyramidinfer_arithmetic():
    kinds = ["sliding_attention", "full_attention", "full_attention", "full_attention"]
    budget = kvc.plan_budget(kinds, None, 0.5, 256, 16, 36)
    assert budget.budgeted == [False, True, True, True]
    assert budget.fraction == pytest.approx((0.5 * (16 + 3 * 256) - 16) / (3 * 256))
    shared = kvc.plan_budget(kinds, [0, 1, 1, 3], 0.5, 256, 16, 36)
    assert shared.budgeted == [False, True, False, True]
    assert shared.fraction == pytest.approx((0.5 * (16 + 3 * 256) - 16) / (2 * 256))
    assert kvc.plan_budget(kinds, None, 0.01, 256, 16, 36).fraction == pytest.approx(36 / 256)  # the floor
    with pytest.raises(ValueError, match="no full-attention"):
        kvc.plan_budget(["sliding_attention"], None, 0.5, 256, 16, 36)


# ---------------------------------------------------------------------------------------------------- observer


def test_observer_curves_are_monotone_per_head_and_readers_are_observed_over_their_owners_keys(model):
    settings = kvc.KVCompressSettings.from_args({"window": 8, "horizon": 16})
    samples = _samples(n=2, length=96)
    schedule = [(False, settings.text_cuts(96)), (True, [(70, 96)])]
    sources = [0, 0, 2, 2]
    obs = kvc.HeadMassObserver(4, 2, settings, schedule, [True] * 4, sources=sources)
    held = {}

    class Keep:
        def observe(self, layer_idx, query, key, value, scaling):
            held[layer_idx] = (query.clone(), key.clone(), scaling)

        def end_sample(self):
            pass

    run_calibration_pass(model, samples[1:], [Keep()])  # what the probe sample shows each layer
    run_calibration_pass(model, samples, [obs])
    assert obs.text_count.tolist() == [3.0] * 4 and obs.probe_count.tolist() == [1.0] * 4
    text, probes = obs.mean_curves()
    assert text.shape == (4, 2, GRID + 1)
    assert bool((text[..., 1:] >= text[..., :-1]).all()) and float(text.max()) <= 1 + 1e-6
    # the probe row of reader layer 1: its queries over layer 0's keys, scored by both layers' window votes
    q0, k0, scale = held[0]
    q1 = held[1][0]
    expected = kvc.group_curves([q0, q1], k0, scale, 70, 96, settings)
    assert torch.allclose(probes[1], torch.cummax(expected[1], dim=-1).values, atol=1e-6)
    assert torch.allclose(probes[0], torch.cummax(expected[0], dim=-1).values, atol=1e-6)
    # protected tokens (sinks + window) are always kept: the curve starts at their share of the mass
    assert float(probes[..., 0].min()) > 0


# -------------------------------------------------------------------------------------------------- end to end


def _check_plan(plan: Plan, report: dict, model, tmp_path, target: float) -> None:
    plan.check()
    plan.validate(model)
    path = plan.save(tmp_path / "plan.safetensors")
    loaded = runtime.load_plan(path)
    assert loaded == plan
    head_keep = plan.tensors["kvcompress.head_keep"]
    assert head_keep.shape == (4, 2) and head_keep.dtype == torch.float32
    assert torch.allclose(head_keep.double().sum(dim=1), torch.ones(4, dtype=torch.float64), atol=1e-6)
    f = torch.tensor(report["head_keep_fractions"], dtype=torch.float64)
    for layer in range(4):
        assert head_fractions(plan, layer) == pytest.approx(f[layer].tolist(), abs=1e-5)
    assert plan.tensors["kvcompress.captured_curve"].shape == (4, 2, GRID + 1)
    assert plan.tensors["kvcompress.captured_mass"].shape == (4, 2)
    theoretical = runtime.theoretical_bytes(plan, model.config, SEQ) / runtime.stock_bytes(model.config, SEQ)
    assert theoretical == pytest.approx(target, abs=0.02)
    assert report["achieved_ratio_at_calibration_length"] == pytest.approx(target, abs=0.01)
    assert 0 <= report["heads_keeping_everything"] <= report["budgeted_heads"] == 8
    assert report["probes"] == 4 and report["mean_captured_mass_probes"] is not None
    with runtime.apply_plan(model, plan):
        out = model.generate(torch.randint(3, 300, (1, 300)), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 304)


@pytest.mark.parametrize("methods", [["kvcompress"], ["pyramidinfer", "kvcompress"]], ids=["alone", "with_pyramid"])
def test_end_to_end_on_a_tiny_model(methods, tokenizer, model, tmp_path):
    recipe = Recipe(
        model="org/name", num_calibration_samples=2, max_seq_length=SEQ, methods=methods, target_ratio=0.4,
        method_args={"kvcompress": {"probes": 4}},
    )
    result = calibrate_model(model, tokenizer, recipe, progress=False)
    plan, report = result.plan, result.report["kvcompress"]
    assert plan.methods == tuple(methods)
    layer_keep = plan.tensors["pyramidinfer.layer_keep" if "pyramidinfer" in methods else "kvcompress.layer_keep"]
    assert torch.allclose(layer_keep, torch.tensor(report["head_keep_fractions"]).mean(dim=1), atol=1e-6)
    if "pyramidinfer" in methods:
        assert "kvcompress.layer_keep" not in plan.tensors
        assert result.report["pyramidinfer"]["layer_keep_from"].startswith("kvcompress")
    assert plan.params["kvcompress"] == {"window": 32, "sink": 4}
    _check_plan(plan, report, model, tmp_path, 0.4)
    lines = kvc.budget_table(report)
    assert "heads keep the whole context" in lines[-1] and len(lines) == 2 + 4 + 1


def test_with_a_sharing_map_only_owners_are_budgeted(tokenizer, model, tmp_path):
    recipe = Recipe(
        model="org/name", num_calibration_samples=2, max_seq_length=SEQ, methods=["kvsharer", "kvcompress"],
        target_ratio=0.3, method_args={"kvcompress": {"probes": 4}},
    )
    sources = [0, 0, 2, 3]
    samples = [torch.tensor(_encode(tokenizer, " The quick brown fox jumps over the lazy dog.") * 40)[:SEQ]] * 2
    ctx = CalibrationContext(
        model=model, tokenizer=tokenizer, recipe=recipe, methods=("kvsharer", "kvcompress"), samples=samples,
        kinds=layer_types(model.config), config=model.config, progress=False, seq_len=SEQ,
        state={"kvsharer": SimpleNamespace(sources=sources)},
    )
    kvc.calibration_step(ctx)
    report = ctx.report["kvcompress"]
    assert report["budgeted_layers"] == [0, 2, 3] and report["budgeted_heads"] == 6
    assert report["head_keep_fractions"][1] == [1.0, 1.0]  # the reader holds nothing of its own
    # kept: 3 owners' mean fractions of 4 layers' stock
    assert report["achieved_ratio_at_calibration_length"] == pytest.approx(0.3, abs=0.01)
    tensors = dict(ctx.tensors, **{"kvsharer.share_source": torch.tensor(sources, dtype=torch.int32)})
    plan = Plan(fingerprint=fingerprint_from_model(model), methods=("kvsharer", "kvcompress"), params=ctx.params,
                tensors=tensors, target_ratio=0.3)
    plan.check()
    theoretical = runtime.theoretical_bytes(plan, model.config, SEQ) / runtime.stock_bytes(model.config, SEQ)
    assert theoretical == pytest.approx(0.3, abs=0.02)
    with runtime.apply_plan(model, plan):
        model.generate(torch.randint(3, 300, (1, 300)), max_new_tokens=4, do_sample=False)


def test_bad_parameters_are_refused_clearly(tokenizer, model):
    with pytest.raises(RecipeError, match="probe_weight"):  # a recipe is checked against the registration
        Recipe(model="org/name", methods=["kvcompress"], method_args={"kvcompress": {"probe_weight": -1.0}})
    recipe = SimpleNamespace(args_for=lambda method: {"horizon": 0}, target_ratio=0.5, seed=0)  # unchecked input
    ctx = CalibrationContext(
        model=model, tokenizer=tokenizer, recipe=recipe, methods=("kvcompress",), samples=_samples(n=1),
        kinds=layer_types(model.config), config=model.config, progress=False, seq_len=300,
    )
    with pytest.raises(CalibrationError, match="horizon"):
        kvc.calibration_step(ctx)


def test_probe_credit_is_all_or_nothing_and_retrieval_heads_keep_everything():
    """A head whose probe curve reaches a needle share earns it only at f = 1; with enough weight the greedy gives it
    the whole context, and the retrieval split shares what is left evenly over the other heads."""
    grid = kvc.GRID
    probe = torch.zeros(2, 2, grid + 1, dtype=torch.float64)
    probe[0, 1] = torch.linspace(0, 0.4, grid + 1, dtype=torch.float64)  # a head that fetches the needle
    credit = kvc.whole_context_credit(probe)
    assert float(credit[0, 1, :-1].abs().max()) == 0.0 and float(credit[0, 1, -1]) == pytest.approx(0.4)
    text = torch.linspace(0, 1, grid + 1, dtype=torch.float64).sqrt().expand(2, 2, -1).clone()  # concave text curves
    curves = kvc.combine_curves(text, credit, 16.0)
    f = kvc.allocate_head_keep(curves, [True, True], 0.4, 0.05)
    assert float(f[0, 1]) == 1.0
    split = kvc.retrieval_split(f, [True, True], 0.4, 0.05)
    assert float(split[0, 1]) == 1.0
    others = split.flatten()[[0, 2, 3]]
    assert torch.allclose(others, torch.full((3,), (0.4 * 4 - 1.0) / 3))
    assert float(split.mean()) == pytest.approx(0.4)
    assert float(kvc.retrieval_split(f, [True, True], 0.1, 0.05).min()) == pytest.approx(0.05)  # never below floor
