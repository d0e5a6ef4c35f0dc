"""KVSharer calibration: distances, greedy search with a binding threshold, CLI, composition with PyramidInfer."""

from __future__ import annotations

import pytest
import torch
import transformers
from test_calibrate import _calibrate

import runtime
from calibrate import kvsharer
from calibrate.collect import run_calibration_pass
from calibrate.pipeline import calibrate_model
from runtime.plan import Plan


pytestmark = pytest.mark.usefixtures("isolated_cache")


def _samples(n=3, length=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (length,), generator=g) for _ in range(n)]


def test_share_layers_parsing():
    assert kvsharer.parse_share_layers("auto") == "auto"
    assert kvsharer.parse_share_layers("8") == 8
    assert kvsharer.parse_share_layers("0.25") == 0.25
    assert kvsharer.parse_share_layers(3.0) == 3
    for bad in ("1.5", "-2", "abc", True, 0.0):
        with pytest.raises(ValueError):
            kvsharer.parse_share_layers(bad)
    settings = kvsharer.SharerSettings.from_args({"share_layers": 0.25})
    assert settings.target_count(30) == 8
    assert kvsharer.SharerSettings.from_args({"share_layers": 3}).target_count(30) == 3
    with pytest.raises(ValueError, match="at least one must keep"):
        kvsharer.SharerSettings.from_args({"share_layers": 4}).target_count(4)
    with pytest.raises(ValueError, match="unknown kvsharer option"):
        kvsharer.SharerSettings.from_args({"treshold": 0.5})


def test_mean_kv_is_position_aligned_and_excludes_unreached_positions():
    obs = kvsharer.MeanKVObserver(num_layers=1, tokens=4)
    k1 = torch.ones(1, 1, 4, 2)
    k2 = torch.full((1, 1, 2, 2), 3.0)  # a shorter sample: reaches positions 0 and 1 only
    obs.observe(0, None, k1, k1, 1.0)
    obs.observe(0, None, k2, k2, 1.0)
    k, v = obs.means()
    assert torch.equal(k[0][0, :, 0], torch.tensor([2.0, 2.0, 1.0, 1.0], dtype=torch.float64))


def test_pairs_orders_and_chains():
    d = torch.zeros(2, 4, 4)
    d[:, 1, 0], d[:, 2, 0], d[:, 2, 1], d[:, 3, 0], d[:, 3, 1], d[:, 3, 2] = 1, 5, 2, 4, 3, 6
    kinds = ["full_attention"] * 4
    dis = kvsharer.candidate_pairs(d, kinds, "dissimilar", 0)
    sim = kvsharer.candidate_pairs(d, kinds, "similar", 0)
    assert [(i, j) for i, j, _ in dis] == [(3, 2), (2, 0), (3, 0), (3, 1), (2, 1), (1, 0)]
    assert [(i, j) for i, j, _ in sim] == list(reversed([(i, j) for i, j, _ in dis]))
    assert sorted(kvsharer.candidate_pairs(d, kinds, "random", 1)) == sorted(dis)
    assert kvsharer.candidate_pairs(d, ["full_attention", "sliding_attention", "full_attention", "full_attention"],
                                    "dissimilar", 0)[0][:2] == (3, 2)
    assert all(1 not in (i, j) for i, j, _ in kvsharer.candidate_pairs(
        d, ["full_attention", "sliding_attention", "full_attention", "full_attention"], "dissimilar", 0))
    assert kvsharer.resolve_chains([0, 0, 1, 2]) == [0, 0, 0, 0]


@pytest.mark.slow
def test_threshold_binds_and_every_candidate_is_logged(llama):
    samples = _samples()
    settings = kvsharer.SharerSettings.from_args({"accept_samples": 2, "accept_tokens": 64, "threshold": 0.0})
    obs = kvsharer.MeanKVObserver(4, 32)
    run_calibration_pass(llama, samples, [obs])
    pairs = kvsharer.candidate_pairs(kvsharer.layer_distances(obs, settings.metric), ["full_attention"] * 4,
                                     "dissimilar", 0)
    acceptance = kvsharer.Acceptance(llama, kvsharer.acceptance_windows(samples, settings))
    loose = kvsharer.greedy_search(acceptance, pairs, 4, 2, settings)
    assert len([l for l, s in enumerate(loose.sources) if s != l]) == 2
    assert [e["accepted"] for e in loose.log] == [True, True]
    strict = kvsharer.SharerSettings.from_args({**settings.__dict__, "threshold": 1.0})
    bound = kvsharer.greedy_search(acceptance, pairs, 4, 2, strict)
    assert max(e["cosine"] for e in bound.log) < 1.0
    assert bound.sources == [0, 1, 2, 3]  # sharing changes every output a little: nothing passes 1.0
    assert bound.trials == min(len(pairs), strict.max_trials) and not any(e["accepted"] for e in bound.log)
    capped = kvsharer.SharerSettings.from_args({**strict.__dict__, "max_trials": 2})
    assert kvsharer.greedy_search(acceptance, pairs, 4, 2, capped).trials == 2
    # the acceptance score of a map is what the runtime does with it
    assert acceptance.score([0, 1, 2, 3])["cosine"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_cli_kvsharer_alone(tmp_path, tiny_dir):  # noqa: F811
    out = tmp_path / "p.safetensors"
    assert _calibrate(tiny_dir, out, "--methods", "kvsharer", "--share-layers", "1") == 0
    plan = Plan.load(out)
    assert plan.methods == ("kvsharer",)
    sources = plan.tensors["kvsharer.share_source"].tolist()
    assert sum(1 for l, s in enumerate(sources) if s != l) <= 1
    assert plan.tensors["kvsharer.distance"].shape == (2, 4, 4)
    assert plan.tensors["kvsharer.search_log"].shape[1] == 7
    assert plan.provenance["kvsharer_search"]["log"]
    assert plan.target_ratio == pytest.approx(sum(1 for l, s in enumerate(sources) if s == l) / 4)


@pytest.mark.slow
def test_cli_joint_split_meets_the_target_ratio(tmp_path, tiny_dir, caplog):  # noqa: F811
    out = tmp_path / "p.safetensors"
    assert _calibrate(tiny_dir, out, "--methods", "pyramidinfer,kvsharer", "--target-ratio", "0.5") == 0
    plan = Plan.load(out)
    assert plan.methods == ("pyramidinfer", "kvsharer")
    split = plan.provenance["joint_split"]
    assert [row["shared_layers"] for row in split][0] == 0
    assert sum(row["chosen"] for row in split) == 1
    for row in split:
        assert row["kept_ratio"] == pytest.approx(0.5, abs=0.02)
    sources = plan.tensors["kvsharer.share_source"].tolist()
    keep = plan.tensors["pyramidinfer.layer_keep"]
    owners = [l for l, s in enumerate(sources) if s == l]
    assert float(keep[owners].sum()) / 4 == pytest.approx(0.5, abs=0.02)


def test_joint_split_scores_every_candidate_and_keeps_the_total_budget(tiny_dir):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calibrate.recipe import resolve_recipe

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    recipe = resolve_recipe(str(tiny_dir)).with_overrides(
        methods=["pyramidinfer", "kvsharer"], target_ratio=0.4, max_seq_length=256, num_calibration_samples=3,
        method_args={"kvsharer": {"threshold": 0.0, "accept_tokens": 64}},
    )
    result = calibrate_model(model, tokenizer, recipe, progress=False)
    split = result.report["split"]
    assert [row["shared_layers"] for row in split] == [0, 1, 2]  # 1, 2 and 1/8, 1/4, 3/8 of 4, rounded
    assert sum(row["chosen"] for row in split) == 1
    for row in split:  # every split keeps the same total: shared layers hold nothing, owners make up the rest
        assert row["kept_ratio"] == pytest.approx(0.4, abs=0.02)
    chosen = next(row for row in split if row["chosen"])
    assert chosen["kl"] == min(row["kl"] for row in split)
    sources = result.plan.tensors["kvsharer.share_source"].tolist()
    assert sum(1 for l, s in enumerate(sources) if s != l) == chosen["shared_layers"]
    # the plan runs and holds what it promises
    plan = result.plan
    ids = torch.randint(3, 100, (1, 200), generator=torch.Generator().manual_seed(0))
    cache = transformers.DynamicCache(config=model.config)
    with runtime.apply_plan(model, plan), torch.no_grad():
        model(ids, past_key_values=cache)
    assert runtime.physical_bytes(cache) <= 0.5 * runtime.stock_bytes(model.config, 200)


def test_attention_error_order_ranks_pairs_by_measured_output_change(llama):
    samples = _samples(n=2, length=48)
    errors = kvsharer.AttentionErrorObserver(4, 32)
    obs = kvsharer.MeanKVObserver(4, 32)
    run_calibration_pass(llama, samples, [obs, errors])
    err = errors.mean()
    assert errors.samples == 2
    assert torch.all(err.triu() == 0) and torch.all(err.tril(-1)[[1, 2, 2, 3, 3, 3], [0, 0, 1, 0, 1, 2]] > 0)
    pairs = kvsharer.candidate_pairs(kvsharer.layer_distances(obs, "flattened_l2"), ["full_attention"] * 4,
                                     "attention_error", 0, err)
    values = [float(err[i, j]) for i, j, _ in pairs]
    assert values == sorted(values) and len(pairs) == 6
    with pytest.raises(ValueError, match="attention errors"):
        kvsharer.candidate_pairs(err[None].expand(2, 4, 4), ["full_attention"] * 4, "attention_error", 0)
    # identical K/V give zero error: a layer compared with itself through the same tensors
    q = torch.randn(1, 4, 8, 16)
    k = torch.randn(1, 2, 8, 16)
    same = kvsharer.AttentionErrorObserver(2, 8)
    same.observe(0, q, k, k, 0.25)
    same.observe(1, q, k, k, 0.25)
    same.end_sample()
    assert float(same.mean()[1, 0]) == pytest.approx(0.0, abs=1e-6)
