"""The decode step of a PyramidInfer layer (issue 14): tokens written in place into buffers with room, compaction
checks scheduled by a countdown instead of every step, the long-chunk score fold in closed form.

The invariants: after every decode step each (row, head) holds at most its budget plus slack; the buffers never hold
more than budget + slack + 1 slots; the countdown never lets a compaction come late (the layer compacts at the same
step as a layer that checks every step); the closed-form fold equals the query-by-query moving average.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import pyramid_plan, random_ids, tiny_gqa_model

import runtime
from runtime.cache import cache_argument
import runtime.pyramidinfer as pyramidinfer
from runtime.pyramidinfer import FOLD_LOOP_MAX, BudgetedLayer, PyramidParams, attend, take_rows


@pytest.fixture(scope="module")
def model():
    return tiny_gqa_model()


def _decode(model, plan, ids, steps, each=None):
    cache = transformers.DynamicCache(config=model.config)
    arg = {cache_argument(model): cache}
    with torch.inference_mode(), runtime.apply_plan(model, plan):
        out = model(ids, use_cache=True, **arg)
        token = out.logits[:, -1:].argmax(-1)
        for step in range(steps):
            out = model(token, use_cache=True, **arg)
            token = out.logits[:, -1:].argmax(-1)
            if each is not None:
                each(step, cache)
    return cache


@pytest.mark.parametrize("keep", [0.25, 0.6, 0.9])
def test_every_decode_step_stays_within_budget_plus_slack(model, keep):
    plan = pyramid_plan(model, keep)
    ids = random_ids(2, 120)

    def check(step, cache):
        for layer in cache.layers:
            if not isinstance(layer, BudgetedLayer):
                continue
            budget = layer.params.budget(layer.real_seen)
            slack = layer.params.slack_for(budget)
            held = layer.storage.valid().sum(dim=-1)
            assert bool((held <= budget + slack).all()), f"step {step}: {held} > {budget} + {slack}"
            assert layer.storage.capacity <= int((budget + slack).max()) + 1, (step, layer.storage.capacity)

    _decode(model, plan, ids, 60, check)


class EveryStep(BudgetedLayer):
    """The reference: checks for compaction after every decode step (what the countdown replaces)."""

    def _finish_decode_step(self, probs, full_mask):
        self._countdown = 1
        super()._finish_decode_step(probs, full_mask)


def test_countdown_compacts_at_the_same_steps_as_checking_every_step(model, monkeypatch):
    plan = pyramid_plan(model, 0.3)
    ids = random_ids(3, 90, seed=4)
    widths = {}

    def record(name):
        def each(step, cache):
            widths.setdefault(name, []).append([layer.storage.width for layer in cache.layers])
        return each

    a = _decode(model, plan, ids, 50, record("countdown"))
    monkeypatch.setattr(PyramidParams, "make_layer", lambda self, readers=0, topn=0, estimator="residual_mean":
                        EveryStep(self, readers=readers, topn=topn, estimator=estimator))
    b = _decode(model, plan, ids, 50, record("every step"))
    assert widths["countdown"] == widths["every step"]
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.storage.keys, lb.storage.keys)
        assert torch.equal(la.storage.scores, lb.storage.scores)


def test_closed_form_fold_equals_the_query_by_query_average():
    torch.manual_seed(0)
    layer = PyramidParams(keep=0.5, window=8, sink=2, slack=None, pool=1, head_reduce="mean").make_layer()
    q_len, old = FOLD_LOOP_MAX + 36, 40
    total = old + q_len
    keys = torch.randn(2, 2, total, 4)
    layer.storage.append(keys, keys.clone(), 0)
    scores = torch.rand(2, 1, total)
    scores[0, 0, 3] = float("-inf")
    scores[1, 0, 0] = float("inf")
    layer.storage.scores = scores.clone()
    probs = torch.rand(2, 1, q_len, total)
    allowed = torch.ones(2, 1, q_len, total, dtype=torch.bool)
    allowed[1, 0, :, -1] = False  # a masked new token
    gamma = 1.0 - 1.0 / 8
    expected = scores.clone()
    expected[:, :, old:] = torch.where(allowed[:, :, torch.arange(q_len), old + torch.arange(q_len)], 0.0,
                                       float("-inf"))
    for i in range(q_len):
        expected = gamma * expected + (1.0 - gamma) * probs[:, :, i]
    layer._fold_scores(probs, allowed[:, :, torch.arange(q_len), old + torch.arange(q_len)])
    got = layer.storage.scores
    assert torch.equal(torch.isinf(got), torch.isinf(expected)) and torch.equal(got > 0, expected > 0)
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("head_reduce,per_kv_head", [("mean", False), ("max", False), ("max", True)])
def test_attend_folds_block_by_block_what_it_would_return(monkeypatch, head_reduce, per_kv_head):
    """A long chunk's attention folded as it is computed (``fold``: one block's probabilities at a time) equals the
    weighted sum of the probabilities it returns unfolded, and its output is the same."""
    torch.manual_seed(2)
    bsz, n_q, n_kv, q_len, total, dim = 2, 6, 2, 150, 190, 8
    query, keys, values = torch.randn(bsz, n_q, q_len, dim), torch.randn(bsz, n_kv, total, dim), torch.randn(
        bsz, n_kv, total, dim)
    heads = n_kv if per_kv_head else 1
    allowed = torch.rand(bsz, heads, q_len, total) > 0.3
    allowed[..., 0] = True
    fold = torch.rand(q_len)
    out_full, probs = attend(query, keys, values, allowed, 0.3, head_reduce, per_kv_head)
    monkeypatch.setattr(pyramidinfer, "QUERY_BLOCK_BYTES", 4 * bsz * n_q * total * 40)  # blocks of 40 queries
    assert pyramidinfer.query_block(bsz * n_q, total) == 40
    out_blocks, folded = attend(query, keys, values, allowed, 0.3, head_reduce, per_kv_head, fold=fold)
    assert folded.shape == (bsz, heads, total)
    torch.testing.assert_close(folded, torch.matmul(fold, probs), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_blocks, out_full, rtol=1e-5, atol=1e-6)


def test_a_folded_long_chunk_scores_as_the_unfolded_one():
    """The layer's fold of a long chunk from :func:`attend`'s folded sum equals its fold of the full probabilities."""
    torch.manual_seed(3)
    params = PyramidParams(keep=0.5, window=8, sink=2, slack=None, pool=1, head_reduce="mean")
    q_len, old = FOLD_LOOP_MAX + 36, 40
    total = old + q_len
    keys = torch.randn(2, 2, total, 4)
    probs = torch.rand(2, 1, q_len, total)
    allowed = torch.ones(2, 1, q_len, total, dtype=torch.bool)
    allowed[1, 0, :, -1] = False
    results = []
    for folded in (False, True):
        layer = params.make_layer()
        layer.storage.append(keys, keys.clone(), 0)
        layer.storage.scores = torch.rand(2, 1, total, generator=torch.Generator().manual_seed(4))
        weights = layer._fold_weights(q_len)
        new_real = allowed[:, :, torch.arange(q_len), old + torch.arange(q_len)]
        layer._fold_scores(torch.matmul(weights, probs) if folded else probs, new_real, folded)
        results.append(layer.storage.scores)
    assert layer._fold_weights(FOLD_LOOP_MAX) is None  # short chunks keep the query-by-query loop
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-7)


def test_take_rows_is_gather():
    torch.manual_seed(1)
    buffer = torch.randn(3, 4, 20, 8)
    for heads in (1, 4):
        idx = torch.sort(torch.randint(0, 15, (3, heads, 7)), dim=-1).values
        expected = buffer[:, :, :15].gather(2, idx[..., None].expand(3, 4, 7, 8))
        assert torch.equal(take_rows(buffer, idx), expected)


@pytest.mark.parametrize("n_tail,topn", [(3, 7), (8, 5), (1, 1), (5, 20)])
def test_tail_rows_of_a_topn_readout_are_those_of_a_where_over_every_row(n_tail, topn):
    """KCache over ragged storage writes the tail's rows into the selected rows that come from the tail, reading only
    ``min(n_tail, topn)`` columns: the same tensor as the ``where`` over all ``topn`` rows it replaces."""
    from runtime.kvcompress import _put_tail_rows

    g = torch.Generator().manual_seed(n_tail * 31 + topn)
    segs, n_body, dim = 6, 40, 4
    tail = torch.randn(segs * n_tail, dim, generator=g)
    for _ in range(5):
        # per segment: topn distinct candidates among its body rows and its own tail slots (some segments none)
        ids = []
        for s in range(segs):
            pool = torch.cat([torch.arange(n_body), n_body + s * n_tail + torch.arange(n_tail)])
            if s % 3 == 0:
                pool = torch.arange(n_body)  # this segment selects no tail slot
            ids.append(pool[torch.randperm(pool.numel(), generator=g)[:topn]])
        ids = torch.stack(ids)
        fetched = torch.randn(segs, topn, dim, generator=g)  # what the clamped fetch returned
        rows = tail.index_select(0, (ids - n_body).clamp(min=0).view(-1)).view(segs, topn, dim)
        expected = torch.where((ids < n_body)[..., None], fetched, rows)
        got = fetched.clone()
        _put_tail_rows(got, ids, tail, n_body, min(n_tail, topn))
        assert torch.equal(got, expected)


@pytest.mark.parametrize("window", [1, 8, 32])
@pytest.mark.parametrize("padded", [False, True])
def test_fused_long_chunk_attends_and_scores_as_the_plain_blocks(monkeypatch, window, padded):
    """A long chunk on an accelerator (forced here on the CPU): SDPA's output with the chunk's mask equals the plain
    blocks' output, and scoring only the queries within the fold horizon changes the folded scores by < 1e-9."""
    torch.manual_seed(5)
    bsz, n_q, n_kv, old, q_len, dim = 2, 6, 2, 30, 700, 8
    query = torch.randn(bsz, n_q, q_len, dim)
    keys, values = torch.randn(bsz, n_kv, old + q_len, dim), torch.randn(bsz, n_kv, old + q_len, dim)
    held = torch.ones(bsz, 1, old, dtype=torch.bool)
    new = None
    if padded:  # row 1: holds no real token yet and the chunk's first 40 tokens are padding (they see nothing)
        held[1] = False
        new = torch.ones(bsz, 1, q_len, q_len, dtype=torch.bool).tril()
        new[1, :, :, :40] = False
    mask = pyramidinfer.ChunkMask(held, new, q_len)
    fold = pyramidinfer.fold_weights(q_len, window)
    monkeypatch.setattr(pyramidinfer, "QUERY_BLOCK_BYTES", 4 * bsz * n_q * (old + q_len) * 64)  # blocks of 64
    plain_out, plain_scores = attend(query, keys, values, mask, 0.35, "mean", False, fold=fold)
    monkeypatch.setattr(pyramidinfer, "fused_chunk_attention", lambda device: True)
    calls = []
    original = pyramidinfer._attend_fused
    monkeypatch.setattr(pyramidinfer, "_attend_fused", lambda *a: (calls.append(1), original(*a))[1])
    fused_out, fused_scores = attend(query, keys, values, mask, 0.35, "mean", False, fold=fold)
    assert calls, "the fused path was not taken"
    torch.testing.assert_close(fused_out, plain_out, rtol=1e-5, atol=1e-5)
    assert (fused_scores - plain_scores).abs().max() < 1e-9 + 1e-6 * plain_scores.abs().max()
    if padded:
        assert torch.equal(fused_out[1, :40], torch.zeros_like(fused_out[1, :40]))  # padding queries: 0


def test_fused_chunked_prefill_keeps_what_the_plain_one_keeps(model, monkeypatch):
    """End to end: a chunked prefill (chunks of 96 tokens) under a plan, then decode, with the fused long-chunk path
    forced on the CPU: the same kept positions but for a near-tie flipped by float rounding, logits equal up to
    float rounding."""
    plan = pyramid_plan(model, 0.3)
    ids = random_ids(2, 300, seed=8)
    monkeypatch.setattr(pyramidinfer, "query_block", lambda queries_per_token, keys: 16)  # blocks of 16 queries

    def run():
        cache = transformers.DynamicCache(config=model.config)
        arg = {cache_argument(model): cache}
        logits = []
        with torch.inference_mode(), runtime.apply_plan(model, plan, prefill_chunk_size=96):
            out = model(ids, use_cache=True, logits_to_keep=1, **arg)  # one logit: the prefill is chunked
            for _ in range(6):
                logits.append(out.logits[:, -1])
                out = model(out.logits[:, -1:].argmax(-1), use_cache=True, **arg)
        return logits, [layer.storage.positions.clone() for layer in cache.layers]

    plain_logits, plain_kept = run()
    monkeypatch.setattr(pyramidinfer, "fused_chunk_attention", lambda device: True)
    calls = []
    original = pyramidinfer._attend_fused
    monkeypatch.setattr(pyramidinfer, "_attend_fused", lambda *a: (calls.append(1), original(*a))[1])
    fused_logits, fused_kept = run()
    assert len(calls) >= 2 * model.config.num_hidden_layers, "the fused path was not taken for the later chunks"
    for a, b in zip(plain_kept, fused_kept):  # float rounding may flip a near-tie (random weights attend evenly)
        for row in range(a.shape[0]):
            plain, fused = set(a[row, 0].tolist()), set(b[row, 0].tolist())
            assert len(plain ^ fused) <= 2 * max(1, len(plain) // 50), (row, sorted(plain ^ fused))
    for a, b in zip(plain_logits, fused_logits):  # a flipped near-tie moves a row's logits a little
        torch.testing.assert_close(a, b, rtol=0, atol=2e-2)
