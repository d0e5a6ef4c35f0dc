"""The joint search over whole candidate plans (calibrate/joint.py): its rules, its candidates, end to end on a tiny
model (the plan holds the chosen candidate's tensors; a time limit scores nothing and keeps the calibrated plan)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import tiny_calibration_llama
from test_data import make_tokenizer

import runtime
from calibrate import joint
from calibrate.pipeline import calibrate_model
from calibrate.recipe import Recipe
from runtime.cache import theoretical_bytes

SEQ = 256
ALL_BUDGETS = ["pyramidinfer", "kvcompress", "kcache"]


pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_calibration_llama(len(tokenizer))


def _scored(stage, name, kl, retention, tolerance=None):
    c = joint.Candidate(stage, name, {}, {"tolerance": tolerance})
    c.scores = {"kl": kl, "top1": 0.9, "retention": retention}
    return c


# ------------------------------------------------------------------------------------------------------ the rules


def test_applies_only_when_something_is_left_to_choose():
    assert joint.applies(("pyramidinfer", "kvcompress"))
    assert joint.applies(("kvcompress", "kcache")) and joint.applies(("pyramidinfer", "kvsharer", "kcache"))
    assert not joint.applies(("kcache",)) and not joint.applies(("pyramidinfer",))
    assert not joint.applies(("pyramidinfer", "kvsharer"))  # the split search of budget_split chooses that


def test_budget_rule_is_retention_first_then_kl():
    a, b, c = _scored("budget", "a", 0.01, 0.75), _scored("budget", "b", 0.03, 1.0), _scored("budget", "c", 0.02, 1.0)
    assert joint.choose_budget([a, b, c]) is c
    unscored = joint.Candidate("budget", "late", {})
    assert joint.choose_budget([a, unscored]) is a


def test_kcache_rule_takes_the_largest_tolerance_within_the_kl_slack_and_keeping_retention():
    off = _scored("kcache", "off", 0.020, 1.0)
    half, same, double = (_scored("kcache", str(t), kl, r, t) for t, kl, r in
                          ((0.005, 0.0205, 1.0), (0.01, 0.0215, 1.0), (0.02, 0.021, 0.5)))
    # 0.02 is within the KL slack (0.020 + 0.002) but loses retrieval; 0.01 is within it too
    assert joint.choose_kcache([off, half, same, double]) is same
    same.scores["kl"] = 0.0225  # now above the slack: the next smaller tolerance
    assert joint.choose_kcache([off, half, same, double]) is half
    half.scores["kl"] = same.scores["kl"]  # nothing fits: the smallest tolerance tried
    assert joint.choose_kcache([off, half, same, double]) is half
    assert joint.choose_kcache([off]) is None


def test_budget_candidates_hold_the_pyramid_and_kvcompress_variants():
    shares = torch.tensor([[0.5, 0.5], [0.8, 0.2]])
    own = torch.tensor([0.3, 0.6])
    ctx = SimpleNamespace(methods=("pyramidinfer", "kvcompress"), tensors={"kvcompress.head_keep": shares},
                          state={"pyramidinfer.layer_keep": own})
    per_head, per_layer, both = joint.budget_candidates(ctx)
    assert (per_head.name, per_head.overrides) == ("per-head", {})
    assert torch.equal(per_layer.overrides["pyramidinfer.layer_keep"], own)
    assert torch.equal(per_layer.overrides["kvcompress.head_keep"], torch.full((2, 2), 0.5))
    assert set(both.overrides) == {"pyramidinfer.layer_keep"}
    ctx.methods = ("kvcompress",)
    assert [c.name for c in joint.budget_candidates(ctx)] == ["per-head"]


def test_a_candidate_predicted_to_overrun_the_limit_is_not_started():
    class Counting:
        calls = 0

        def score(self, plan):
            Counting.calls += 1
            return {"kl": 0.0, "top1": 1.0}

    scorer = joint._Scorer.__new__(joint._Scorer)  # only the timing rule: no model behind it
    scorer.fidelity, scorer.probes, scorer.cost = Counting(), None, {}
    scorer.plan = lambda candidate: None
    scorer.deadline = joint.time.perf_counter() + 60
    first = joint.Candidate("kcache", "first", {})
    scorer.score(first, probes=False)  # nothing measured yet: started
    assert first.scores is not None and Counting.calls == 1
    scorer.cost["continuation"] = 120.0  # the last one took longer than what is left
    late = joint.Candidate("kcache", "late", {})
    scorer.score(late, probes=False)
    assert late.scores is None and Counting.calls == 1
    scorer.cost["continuation"] = 1.0
    scorer.probes = SimpleNamespace(probes=[])
    scorer.cost["probes"] = 100.0  # cheap on the continuation, but its probes would overrun
    assert scorer.predicted_seconds(probes=True) == 101.0 and scorer.predicted_seconds(probes=False) == 1.0
    budget = joint.Candidate("budget", "with probes", {})
    scorer.score(budget)
    assert budget.scores is None and Counting.calls == 1


# ------------------------------------------------------------------------------------------------------ end to end


def test_end_to_end_the_plan_holds_the_chosen_candidate(tokenizer, model, tmp_path):
    recipe = Recipe(model="org/name", num_calibration_samples=3, max_seq_length=SEQ, methods=ALL_BUDGETS,
                    target_ratio=0.5, method_args={"kcache": {"queries": 16}, "kvcompress": {"probes": 2}})
    result = calibrate_model(model, tokenizer, recipe, progress=False, search_seconds=600)
    report = result.report["joint"]
    rows = report["rows"]
    assert [r["candidate"] for r in rows if r["stage"] == "budget"] == ["per-head", "per-layer", "per-layer x per-head"]
    kc_rows = [r for r in rows if r["stage"] == "kcache"]
    assert [r["tolerance"] for r in kc_rows] == [None, 0.005, 0.01, 0.02]
    assert sum(r["chosen"] for r in rows if r["stage"] == "budget") == 1 and sum(r["chosen"] for r in kc_rows) == 1
    assert all(r.get("scored", True) and 0.0 <= r["top1"] <= 1.0 and r["kl"] >= 0 for r in rows)
    assert all("retention" in r for r in rows if r["stage"] == "budget")
    assert all("retention" not in r for r in kc_rows[1:])  # KCache tolerances: continuation only
    plan = result.plan
    plan.validate(model)
    assert runtime.load_plan(plan.save(tmp_path / "p.safetensors")) == plan
    chosen_kc = next(r for r in kc_rows if r["chosen"])
    assert result.report["kcache"]["tolerance"] == chosen_kc["tolerance"]
    assert plan.tensors["kcache.topn"].tolist() == result.report["kcache"]["topn"]
    if report["budget"] == "per-layer":
        shares = plan.tensors["kvcompress.head_keep"]
        assert torch.allclose(shares, torch.full_like(shares, 0.5))
    assert plan.provenance["joint_search"]["budget"] == report["budget"]
    assert "seconds" not in plan.provenance["joint_search"]["rows"][0]
    # every budget variant holds the bytes of the target (the per-head caps may only lower it)
    cfg = model.config
    held = theoretical_bytes(plan, cfg, SEQ) / theoretical_bytes(runtime.Plan.noop(model), cfg, SEQ)
    assert held <= 0.5 + 0.02
    lines = joint.joint_table(report)
    assert len(lines) == 2 + len(rows) and sum("<- chosen" in line for line in lines) == 2


def test_a_spent_time_limit_scores_nothing_and_keeps_the_calibrated_plan(tokenizer, model):
    recipe = Recipe(model="org/name", num_calibration_samples=3, max_seq_length=SEQ, methods=ALL_BUDGETS,
                    target_ratio=0.5, method_args={"kcache": {"queries": 16}, "kvcompress": {"probes": 2}})
    result = calibrate_model(model, tokenizer, recipe, progress=False, search_seconds=1e-9)
    rows = result.report["joint"]["rows"]
    assert rows and all(r.get("scored") is False for r in rows)
    assert result.report["joint"]["kcache_tolerance"] is None
    none = calibrate_model(model, tokenizer, recipe, progress=False, search_seconds=0)
    assert "joint" not in none.report
    assert torch.equal(result.plan.tensors["kcache.topn"], none.plan.tensors["kcache.topn"])
    assert torch.equal(result.plan.tensors["pyramidinfer.layer_keep"], none.plan.tensors["pyramidinfer.layer_keep"])
