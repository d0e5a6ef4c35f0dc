"""calibrate.probe_score.ProbeRetention: retrieval hits and retention of a whole plan on calibration probes.

A tiny random model answers no probe, so the scoring is checked with an oracle wrapped around a real tiny Llama: the
real forward runs (under the plan, so the plan's runtime cache layers really compress), then the oracle replaces the
last logits: the argmax is the true next token of the probe when ``rule(probe, needle_held)`` says so, a wrong token
otherwise. ``needle_held`` is read from the cache the forward just filled: every needle position is still held by
every head of every layer (``PlanLayer.held().positions``). The oracle knows the probe only from the tokens fed so
far, so a scorer that feeds the wrong tokens, compares with the wrong token or feeds the last answer token fails.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import pyramid_plan, tiny_calibration_llama
from make_tiny_model import make_tokenizer

from calibrate.kvcompress import build_probes
from calibrate.probe_score import PROTOCOLS, ProbeRetention
from runtime.cache import cache_argument
from runtime.plan import Plan

LENGTH = 200
COUNT = 4


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _samples(n=3, length=300, seed=0, vocab=300):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g) for _ in range(n)]


def _needle_held(cache, probe) -> bool:
    needle = torch.arange(probe.needle_start, probe.needle_start + probe.needle_len)
    for layer in cache.layers:
        held = layer.held() if hasattr(layer, "held") else None
        if held is None or held.positions is None:
            continue  # a stock layer, or nothing dropped
        valid = held.valid if held.valid is not None else torch.ones_like(held.positions, dtype=torch.bool)
        for row in range(held.positions.shape[0]):
            for head in range(held.positions.shape[1]):
                kept = held.positions[row, head][valid[row, head]].cpu()
                if not torch.isin(needle, kept).all():
                    return False
    return True


class Oracle:
    """Wraps ``model.forward``; records ``(cache, input length, logits_to_keep)`` of every call in ``calls``."""

    def __init__(self, model, probes, rule):
        self.probes, self.rule, self.calls, self.fed = probes, rule, [], {}
        self.cache_name = cache_argument(model)
        original = model.forward

        @functools.wraps(original)
        def forward(input_ids=None, **kwargs):
            out = original(input_ids=input_ids, **kwargs)
            cache = kwargs[self.cache_name]
            self.calls.append((cache, input_ids.shape[1], kwargs.get("logits_to_keep")))
            _, fed = self.fed.setdefault(id(cache), (cache, []))  # keep the cache alive: ids are not reused
            fed.extend(input_ids[0].tolist())
            probe = next(p for p in self.probes if p.ids[: len(fed)].tolist() == fed)
            assert len(fed) < probe.ids.numel(), "the scorer fed the last answer token"
            truth = int(probe.ids[len(fed)])
            token = truth if self.rule(probe, _needle_held(cache, probe)) else (truth + 1) % out.logits.shape[-1]
            logits = torch.zeros_like(out.logits)
            logits[:, -1, token] = 1.0
            out.logits = logits
            return out

        model.forward = forward


@pytest.fixture
def setup(tokenizer):
    """A fresh tiny Llama with an oracle (rule set by the test), and the probes ProbeRetention will build."""
    model = tiny_calibration_llama(len(tokenizer))
    samples = _samples()
    probes, _ = build_probes(tokenizer, samples, COUNT, LENGTH, 0, 4, 32)
    assert len(probes) == COUNT and all(p.answer_len >= 2 for p in probes)  # multi-token answers: steps are tested

    def make(rule, device="cpu", **kwargs):
        model.to(device)
        oracle = Oracle(model, probes, rule)
        return model, oracle, ProbeRetention(model, tokenizer, samples, count=COUNT, length=LENGTH, **kwargs)

    make.probes = probes
    return make


def test_full_cache_and_noop_plan_answer_the_same_probes(setup):
    first = setup.probes[0]
    model, _, scorer = setup(lambda probe, held: held and probe is not first)  # the full cache misses probe 0 only
    for plan in (None, Plan.noop(model)):
        scores = scorer.score(plan)
        assert scores["probes"] == COUNT
        for p in PROTOCOLS:
            assert scores[f"full_hits_{p}"] == COUNT - 1
            assert scores[f"hits_{p}"] == COUNT - 1 and scores[f"retained_{p}"] == COUNT - 1
            assert scores[f"retention_{p}"] == 1.0
    assert scorer.full_hits == {p: [False] + [True] * (COUNT - 1) for p in PROTOCOLS}


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ]),
])
def test_a_plan_that_drops_the_needle_loses_every_hit(setup, device):
    model, _, scorer = setup(lambda probe, held: held, device=device)
    assert scorer.full_hits == {p: [True] * COUNT for p in PROTOCOLS}
    scores = scorer.score(pyramid_plan(model, 0.01, window=8, sink=2))  # keeps only the 2 sinks and 8 recent tokens
    for p in PROTOCOLS:
        assert scores[f"full_hits_{p}"] == COUNT and scores[f"hits_{p}"] == 0 and scores[f"retention_{p}"] == 0.0
    kept = scorer.score(pyramid_plan(model, 1.0, window=8, sink=2))  # a budget of every token keeps the needle
    assert all(kept[f"retention_{p}"] == 1.0 for p in PROTOCOLS)


def test_retention_is_none_when_the_full_cache_answers_nothing_but_hits_still_count(setup):
    model, _, scorer = setup(lambda probe, held: not held)  # answers only once the needle is gone
    assert scorer.score(None) == {
        "probes": COUNT, **{f"{k}_{p}": v for p in PROTOCOLS for k, v in
                            (("hits", 0), ("full_hits", 0), ("retained", 0), ("retention", None))},
    }
    scores = scorer.score(pyramid_plan(model, 0.01, window=8, sink=2))
    for p in PROTOCOLS:
        assert scores[f"hits_{p}"] == COUNT and scores[f"retained_{p}"] == 0 and scores[f"retention_{p}"] is None


def test_protocols_feed_context_question_and_answer_tokens_as_decoding_does(setup):
    seen = []
    model, oracle, scorer = setup(lambda probe, held: True, progress=lambda items: seen.append(1) or items)
    probes = scorer.probes

    def grouped():
        by_cache: dict[int, list] = {}
        for cache, length, keep in oracle.calls:
            by_cache.setdefault(id(cache), []).append((length, keep))
        return list(by_cache.values())

    def expected():
        rows = []
        for pr in probes:
            question = pr.ids.numel() - pr.cut - pr.answer_len
            steps = [(1, None)] * (pr.answer_len - 1)
            rows.append([(pr.cut, 1), (question, 1), *steps])  # context first: prefill, question chunk, answer
            rows.append([(pr.cut + question, 1), *steps])  # question in prefill
        return rows

    # the full cache's pass runs one protocol (question in prefill: both attend exactly), a fresh cache per probe
    assert grouped() == [row for i, row in enumerate(expected()) if i % 2 == 1]
    oracle.calls.clear()
    scorer.score(Plan.noop(model))
    assert grouped() == expected()

    oracle.rule = lambda probe, held: False  # the first answer token is wrong: no answer step is fed
    oracle.calls.clear()
    scores = scorer.score(None)
    assert grouped() == [row[: 2 if i % 2 == 0 else 1] for i, row in enumerate(expected())]
    assert all(scores[f"hits_{p}"] == 0 and scores[f"retention_{p}"] == 0.0 for p in PROTOCOLS)
    assert len(seen) == 3  # the progress wrapper wraps every pass


def test_no_probe_is_a_clear_error(tokenizer):
    model = tiny_calibration_llama(len(tokenizer))
    with pytest.raises(ValueError, match="no retrieval probe.*too short"):
        ProbeRetention(model, tokenizer, _samples(length=60), count=3, length=60)
    with pytest.raises(ValueError, match="no retrieval probe"):
        ProbeRetention(model, tokenizer, _samples(), count=0)
    with pytest.raises(ValueError, match="no retrieval probe"):
        ProbeRetention(model, tokenizer, [], count=3)
