"""KCache calibration: the top-N output against a reference, GQA selection, the error curves and the choice of N,
KVSharer readers, end to end on a tiny model, bad settings."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model
from helpers import tiny_calibration_llama
from test_data import make_tokenizer

import runtime
from calibrate import kcache as kc
from calibrate.pipeline import CalibrationContext, CalibrationError, calibrate_model
from calibrate.recipe import Recipe, RecipeError
from runtime.cache import layer_types
from runtime.plan import Plan

SEQ = 256


pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_calibration_llama(len(tokenizer))


def _reference(query, key, value, scaling, positions, n, estimator="renormalise"):
    """Plain loops: per KV head and query, the top-n keys by the group's summed probabilities; each query head's
    softmax over its own logits restricted to them (the renormalised probabilities); ``residual_mean``: that times
    the mass the keys hold, plus the rest of the mass times the mean value of the other visible keys."""
    n_q, c, _ = query.shape
    groups = n_q // key.shape[0]
    out = torch.empty_like(query)
    for h in range(n_q):
        kv = h // groups
        for i, t in enumerate(positions.tolist()):
            keys = key[kv, : t + 1]
            group = range(kv * groups, (kv + 1) * groups)
            score = sum(torch.softmax(query[g, i] @ keys.T * scaling, -1) for g in group)
            chosen = torch.topk(score, min(n, t + 1)).indices
            weights = torch.softmax(query[h, i] @ keys[chosen].T * scaling, -1)
            out[h, i] = weights @ value[kv, chosen]
            if estimator == "residual_mean":
                mass = torch.softmax(query[h, i] @ keys.T * scaling, -1)[chosen].sum()
                rest = torch.ones(t + 1, dtype=torch.bool)
                rest[chosen] = False
                mean = value[kv, : t + 1][rest].mean(0) if rest.any() else torch.zeros(value.shape[-1])
                out[h, i] = mass * out[h, i] + (1 - mass) * mean
    return out


# ------------------------------------------------------------------------------------------------- top-N output


@pytest.mark.parametrize("estimator", ["residual_mean", "renormalise"])
def test_topn_output_matches_a_plain_loop_and_is_exact_once_every_key_is_read(estimator):
    torch.manual_seed(1)
    q, k, v = torch.randn(6, 5, 8), torch.randn(2, 50, 8), torch.randn(2, 50, 8)
    positions = torch.tensor([3, 17, 24, 40, 49])
    grid = (1, 4, 16, 24, 48, 64)
    exact, approx = kc.topn_outputs(q, k, v, 0.4, positions, grid, estimator)
    assert exact.shape == (6, 5, 8) and approx.shape == (6, 6, 5, 8) and approx.dtype == torch.float32
    for i, n in enumerate(grid):
        assert torch.allclose(approx[i], _reference(q, k, v, 0.4, positions, n, estimator), atol=1e-5), n
    assert torch.allclose(exact, _reference(q, k, v, 0.4, positions, 50), atol=1e-5)
    assert torch.equal(approx[-1], exact)  # N >= every query's visible keys: all of them, exactly
    assert torch.equal(approx[1][:, 0], exact[:, 0])  # the query at position 3 sees 4 keys: N = 4 reads all


def test_gqa_selection_is_one_set_per_kv_head_chosen_by_the_groups_summed_probabilities():
    key = torch.eye(4).expand(2, 4, 4).clone()  # logit of key j = query[j]
    value = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    query = torch.tensor([
        [12.0, 0, 0, 0],  # KV head 0: head 0 is sure of key 0 ...
        [5.0, 7.0, 0, 0],  # ... head 1 prefers key 1 on its own, but the group's sum picks key 0
        [0, 0, 0, 12.0],  # KV head 1: the group's sum picks key 3 ...
        [0, 0, 9.0, 0],  # ... over head 3's own favourite, key 2
    ])[:, None, :]
    _, approx = kc.topn_outputs(query, key, value, 1.0, torch.tensor([3]), (1,), "renormalise")
    expected = torch.stack([value[0, 0], value[0, 0], value[1, 3], value[1, 3]])
    assert torch.allclose(approx[0, :, 0], expected)
    # each head on its own would have picked keys 0, 1, 3, 2: the set is per KV head, not per query head
    assert not torch.allclose(approx[0, 1, 0], value[0, 1])


def test_errors_per_sample_are_chunked_the_same_and_vanish_at_the_context(monkeypatch):
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 4, 120, 16), torch.randn(1, 2, 120, 16), torch.randn(1, 2, 120, 16)
    grid = (16, 24, 32, 48, 64, 96, 120, 200)
    errors, norm = kc.sample_errors(q, k, v, 0.25, 30, grid)
    monkeypatch.setattr(kc, "BLOCK_ELEMENTS", 4 * 7 * 120)  # chunks of 7 queries
    chunked, norm_chunked = kc.sample_errors(q, k, v, 0.25, 30, grid)
    assert torch.allclose(errors, chunked, rtol=1e-5) and norm == pytest.approx(norm_chunked, rel=1e-6)
    exact, approx = kc.topn_outputs(q[0, :, 90:], k[0], v[0], 0.25, torch.arange(90, 120), grid)
    assert torch.allclose(errors, (approx - exact).double().square().sum(dim=(1, 2, 3)), rtol=1e-5)
    assert errors[-2:].tolist() == [0.0, 0.0] and float(errors[0]) > 0  # N >= 120 visible keys: exact


# ------------------------------------------------------------------------------------------- curves and choice


def _observe(observer, layer, q, k, v, scaling=1.0):
    observer.observe(layer, q[None], k[None], v[None], scaling)


def _dominant_and_spread(length=400, dim=16, spread=100, seed=3):
    """Keys/values where a query along ``u`` sees one dominant key (7) and a query along ``w`` attends evenly to the
    first ``spread`` keys."""
    g = torch.Generator().manual_seed(seed)
    key = 0.1 * torch.randn(1, length, dim, generator=g)
    value = torch.randn(1, length, dim, generator=g)
    u, w = torch.zeros(dim), torch.zeros(dim)
    u[0], w[1] = 1.0, 1.0
    key[0, 7] += 3.0 * u
    key[0, :spread] += 2.0 * w
    q_dominant = (10.0 * u).expand(1, length, dim).clone()
    q_spread = (10.0 * w).expand(1, length, dim).clone()
    return key, value, q_dominant, q_spread


def test_a_dominant_key_needs_a_small_n_flat_attention_keeps_v_and_curves_fall_to_zero():
    key, value, q_dominant, q_spread = _dominant_and_spread()
    flat_key = torch.ones_like(key)  # every key equal: uniform attention
    grid = kc.topn_grid(400)
    assert grid[:4] == (16, 24, 32, 48) and grid[-1] == 384
    obs = kc.TopNErrorObserver(3, grid, 8, [True] * 3, min_length=24, estimator="renormalise")
    _observe(obs, 0, q_dominant, key, value)
    _observe(obs, 1, q_spread, key, value)
    _observe(obs, 2, q_dominant, flat_key, value)
    _observe(obs, 0, q_dominant[:, :20], key[:, :20], value[:, :20])  # shorter than min_length: not measured
    obs.end_sample()
    assert obs.counts.tolist() == [1, 1, 1]
    curves = obs.curves()
    assert curves.shape == (3, len(grid))
    env = kc.envelope(curves)
    assert bool((env[:, 1:] <= env[:, :-1]).all()) and bool((env >= curves).all())
    assert float(curves[0, 0]) < 1e-3  # one key carries the output
    topn = kc.choose_topn(curves, grid, 0.02, limit=200)
    assert topn[0] == 16
    assert 96 <= topn[1] <= 128  # the spread query needs (about) its 100 keys
    assert topn[2] == 0  # flat: no N within the limit keeps the output
    assert kc.choose_topn(curves, grid, 0.02, limit=64).tolist() == [16, 0, 0]  # over the flat limit: keeps V
    errors = kc.error_at(curves, grid, topn)
    assert float(errors[0]) == pytest.approx(float(curves[0, 0])) and float(errors[2]) == 0.0
    # residual_mean: uniform attention is the mean of the rows, which the resident sum gives without reading them
    residual = kc.TopNErrorObserver(2, grid, 8, [True] * 2, min_length=24)
    _observe(residual, 0, q_dominant, flat_key, value)
    _observe(residual, 1, q_spread, key, value)
    assert float(residual.curves()[0].max()) < 1e-5 and kc.choose_topn(residual.curves(), grid, 0.02, 200)[0] == 16
    assert float(residual.curves()[1, 0]) < float(curves[1, 0])  # and it misses less than renormalising
    # the curve of a layer is 0 from the first N that reads all visible keys on
    full = kc.TopNErrorObserver(1, (16, 384, 400, 512), 8, [True])
    _observe(full, 0, q_spread, key, value)
    assert full.curves()[0, 2:].tolist() == [0.0, 0.0] and float(full.curves()[0, 0]) > 0.02


def test_choice_uses_the_non_increasing_envelope():
    curves = torch.tensor([[0.5, 0.01, 0.03, 0.01, 0.0], [0.5, 0.2, 0.1, 0.05, 0.01]], dtype=torch.float64)
    grid = (16, 32, 64, 128, 256)
    assert kc.envelope(curves)[0].tolist() == [0.5, 0.03, 0.03, 0.01, 0.0]
    assert kc.choose_topn(curves, grid, 0.02, 1000).tolist() == [128, 256]  # not the lucky dip at 32
    assert kc.choose_topn(curves, grid, 0.0, 1000).tolist() == [256, 0]
    assert kc.choose_topn(curves[:, :0], (), 0.02, 1000).tolist() == [0, 0]


def test_a_kvsharer_owner_reads_as_many_rows_as_its_reader_needs():
    """The reader's queries are measured over its owner's keys and values, and the owner's N covers them."""
    key, value, q_dominant, q_spread = _dominant_and_spread()
    grid = kc.topn_grid(400, 200)
    obs = kc.TopNErrorObserver(2, grid, 8, [True, True], sources=[0, 0])
    _observe(obs, 0, q_dominant, key, value)
    garbage = torch.randn_like(key)
    _observe(obs, 1, q_spread, garbage, garbage)  # the reader's own k/v are not what it reads
    obs.end_sample()
    curves = obs.curves()
    alone = kc.TopNErrorObserver(1, grid, 8, [True])
    _observe(alone, 0, q_spread, key, value)
    assert torch.allclose(curves[1], alone.curves()[0])
    needs = kc.choose_topn(curves, grid, 0.02, 200)
    grouped = kc.choose_topn(kc.group_curves(curves, [0, 0]), grid, 0.02, 200)
    assert needs[0] == 16 and needs[1] > 16
    assert grouped[0] == max(needs.tolist())  # the owner reads what its reader needs
    with pytest.raises(RuntimeError, match="reads layer 0"):
        fresh = kc.TopNErrorObserver(2, grid, 8, [True, True], sources=[0, 0])
        _observe(fresh, 1, q_spread, key, value)


def test_the_step_gives_owners_their_readers_n_and_readers_no_entry(tokenizer, model):
    recipe = Recipe(model="org/name", num_calibration_samples=2, max_seq_length=SEQ, methods=["kvsharer", "kcache"],
                    method_args={"kcache": {"tolerance": 0.5, "queries": 16}})
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(3, 300, (SEQ,), generator=g) for _ in range(2)]
    ctx = CalibrationContext(
        model=model, tokenizer=tokenizer, recipe=recipe, methods=("kvsharer", "kcache"), samples=samples,
        kinds=layer_types(model.config), config=model.config, progress=False, seq_len=SEQ,
        state={"kvsharer": SimpleNamespace(sources=[0, 0, 2, 2])},
    )
    kc.calibration_step(ctx)
    report, topn = ctx.report["kcache"], ctx.tensors["kcache.topn"]
    assert report["owners"] == [0, 2] and topn[1] == 0 and topn[3] == 0
    for owner, reader in ((0, 1), (2, 3)):
        needs = [report["layer_needs"][owner], report["layer_needs"][reader]]
        assert int(topn[owner]) == (0 if 0 in needs else max(needs))
    assert report["fraction_read"][1] is None and "reads layer 0" in kc.topn_table(report)[3]


# -------------------------------------------------------------------------------------------------- end to end


def _check_plan(plan: Plan, report: dict, model, tmp_path) -> None:
    plan.check()
    plan.validate(model)
    path = plan.save(tmp_path / "plan.safetensors")
    assert runtime.load_plan(path) == plan
    topn, error = plan.tensors["kcache.topn"], plan.tensors["kcache.output_error"]
    assert topn.dtype == torch.int32 and topn.shape == (4,)
    assert error.dtype == torch.float32 and error.shape == (4,)
    assert plan.params["kcache"] == {}
    assert all(n == 0 or n in report["grid"] for n in topn.tolist())
    assert torch.all(error[topn == 0] == 0) and bool((error[topn > 0] <= report["tolerance"] + 1e-6).all())
    assert report["topn"] == topn.tolist() and report["samples"] == 2
    assert report["context"] == pytest.approx(SEQ - (report["queries"] - 1) / 2)
    fractions = [1.0 if n == 0 else n / report["context"] for n in topn.tolist()]
    assert report["fraction_read"] == pytest.approx(fractions)
    assert report["mean_fraction_read"] == pytest.approx(sum(fractions) / 4)
    assert all(n <= report["flat_limit"] for n in report["grid"])
    assert plan.provenance["kcache_calibration"]["samples"] == 2
    lines = kc.topn_table(report)
    assert len(lines) == 2 + 4 + 1 and "mean fraction of value rows read" in lines[0]


@pytest.mark.parametrize("methods", [["kcache"], ["pyramidinfer", "kcache"]], ids=["alone", "with_pyramid"])
def test_end_to_end_on_a_tiny_model(methods, tokenizer, model, tmp_path):
    recipe = Recipe(model="org/name", num_calibration_samples=2, max_seq_length=SEQ, methods=methods)
    result = calibrate_model(model, tokenizer, recipe, progress=False)
    plan = result.plan
    assert plan.methods == tuple(methods)
    _check_plan(plan, result.report["kcache"], model, tmp_path)
    if "pyramidinfer" in methods:
        assert "pyramidinfer.layer_keep" in plan.tensors


def test_a_loose_tolerance_picks_the_smallest_n_and_sliding_layers_are_not_measured():
    model = tiny_model("gemma3")
    kinds = layer_types(model.config)
    assert "sliding_attention" in kinds and "full_attention" in kinds
    recipe = SimpleNamespace(args_for=lambda method: {"tolerance": 1.0, "queries": 8}, seed=0)
    g = torch.Generator().manual_seed(0)
    ctx = CalibrationContext(
        model=model, tokenizer=None, recipe=recipe, methods=("kcache",), kinds=kinds, progress=False, seq_len=96,
        samples=[torch.randint(3, 128, (96,), generator=g)], config=model.config.get_text_config(decoder=True),
    )
    kc.calibration_step(ctx)
    report, topn = ctx.report["kcache"], ctx.tensors["kcache.topn"].tolist()
    for layer, kind in enumerate(kinds):
        if kind == "full_attention":
            assert topn[layer] == 16 and report["layer_error"][layer] <= 1.0
        else:
            assert topn[layer] == 0 and report["layer_error"][layer] is None and report["fraction_read"][layer] is None
    assert report["owners"] == [l for l, k in enumerate(kinds) if k == "full_attention"]


# ------------------------------------------------------------------------------------------------ bad settings


@pytest.mark.parametrize(
    "args, match",
    [({"tolerance": -0.1}, "tolerance"), ({"queries": 0}, "queries"), ({"flat_fraction": 1.5}, "flat_fraction"),
     ({"topn": 8}, "unknown kcache option")],
)
def test_bad_settings_are_refused_clearly(args, match, tokenizer, model):
    with pytest.raises(RecipeError, match=match):  # a recipe is checked against the registration
        Recipe(model="org/name", methods=["kcache"], method_args={"kcache": args})
    recipe = SimpleNamespace(args_for=lambda method: args, seed=0)  # unchecked input
    ctx = CalibrationContext(
        model=model, tokenizer=tokenizer, recipe=recipe, methods=("kcache",), samples=[torch.arange(3, 103)],
        kinds=layer_types(model.config), config=model.config, progress=False, seq_len=100,
    )
    with pytest.raises(CalibrationError, match=match):
        kc.calibration_step(ctx)


def test_samples_too_short_for_the_queries_fail_clearly(tokenizer, model):
    recipe = Recipe(model="org/name", num_calibration_samples=2, max_seq_length=64, methods=["kcache"])
    with pytest.raises(CalibrationError, match="too short for KCache.*80"):
        calibrate_model(model, tokenizer, recipe, progress=False)
