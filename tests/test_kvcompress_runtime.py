"""KV-Compress at run time: per-head budgets in ragged, physically compact storage (tiny random models).

Exactness against an independent SDPA reference (evicted positions masked) lives in ``test_eviction.py``; here:
identity, batch rows vs solo runs, bytes held per (layer, head) vs the plan, equal shares vs the PyramidInfer plan,
beam reordering, and plan validation.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import transformers
from helpers import assert_rows_equal_solo_runs, greedy, kvcompress_plan, pyramid_plan, random_ids, tiny_gqa_model

import runtime
from runtime.cache import cache_argument
from runtime.errors import PlanError
from runtime.kvcompress import RaggedLayer, RaggedStorage, head_fractions, ragged_attend

SHARES = [[4.0, 1.0]]  # head 0 gets 4x the budget of head 1 in every layer


def _model(seed: int = 0, layers: int = 4):
    return tiny_gqa_model(seed, layers)


_ids = random_ids


def _prefill(model, plan, ids, mask=None):
    cache = transformers.DynamicCache(config=model.config)
    with runtime.apply_plan(model, plan), torch.inference_mode():
        model(ids, attention_mask=mask, use_cache=True, **{cache_argument(model): cache})
    return cache


def test_a_plan_whose_heads_keep_everything_is_token_identical_to_stock():
    model = _model()
    ids = _ids(2, 200)
    # window >= context: every head's budget is the whole context, so the ragged path holds everything
    plan = kvcompress_plan(model, 0.2, SHARES, window=400, sink=2, block=8, slack=5)
    expected = greedy(model, ids, 24, output_scores=True, return_dict_in_generate=True)
    with runtime.apply_plan(model, plan):
        got = greedy(model, ids, 24, output_scores=True, return_dict_in_generate=True)
    cache = _prefill(model, plan, ids)
    assert all(isinstance(layer, RaggedLayer) for layer in cache.layers)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.scores, expected.scores):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_equal_shares_reproduce_the_pyramidinfer_plan_exactly():
    model = _model(seed=1)
    ids = _ids(2, 260, seed=1)
    pyramid = pyramid_plan(model, 0.3, window=8, sink=2)
    equal = kvcompress_plan(model, 0.3, [[1.0, 1.0]], window=8, sink=2)
    with runtime.apply_plan(model, pyramid):
        a = greedy(model, ids, 24, output_scores=True, return_dict_in_generate=True)
    with runtime.apply_plan(model, equal):
        b = greedy(model, ids, 24, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.scores, b.scores))


def test_padded_batch_rows_equal_their_solo_runs():
    model = _model(seed=2)
    plan = kvcompress_plan(model, [0.3, 0.2, 0.4, 0.25], [[3.0, 1.0]], window=8, sink=2, block=4, slack=3)
    with runtime.apply_plan(model, plan):
        assert_rows_equal_solo_runs(model, [240, 170, 205], 30)


def test_each_head_holds_its_own_budget_within_one_block():
    model = _model(seed=3)
    seen = 400
    block = 8
    plan = kvcompress_plan(model, 0.25, SHARES, window=8, sink=2, block=block)
    cache = _prefill(model, plan, _ids(2, seen))
    n_kv, dim = model.config.num_key_value_heads, model.config.head_dim
    slot_bytes = 2 * dim * 4  # K + V, float32
    for index, layer in enumerate(cache.layers):
        assert isinstance(layer, RaggedLayer)
        fractions = head_fractions(plan, index)
        budgets = [min(seen, max(math.ceil(f * seen - 1e-6), 2 + 8)) for f in fractions]
        kept = layer.kept_lengths()
        assert kept.tolist() == [budgets] * 2
        body = layer.body
        per_seg_blocks = torch.bincount(body.block_seg, minlength=2 * n_kv)
        assert per_seg_blocks.tolist() == [math.ceil(b / block) for b in budgets] * 2  # no padding to the widest
        held = per_seg_blocks * block * slot_bytes
        wanted = torch.tensor(budgets * 2) * slot_bytes
        assert bool((held - wanted < block * slot_bytes).all()) and bool((held >= wanted).all())
        assert body.keys.numel() * 4 * 2 == int(held.sum())  # K/V tensors hold exactly those blocks
        # head 0 has 4x head 1's share: ~4x the bytes (within one block each)
        assert abs(int(held[0]) / int(held[1]) - 4.0) < 0.3
    physical = runtime.physical_bytes(cache)
    theoretical = runtime.theoretical_bytes(plan, model.config, seen, 2)
    assert theoretical < physical < theoretical * 1.15  # block rounding + int32 position + float32 score per slot


def test_beam_search_reorders_ragged_rows():
    model = _model(seed=4)
    ids = _ids(1, 150, seed=4)
    plan = kvcompress_plan(model, 0.3, SHARES, window=8, sink=2, block=4, slack=3)
    with runtime.apply_plan(model, plan):
        out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, num_beams=3, do_sample=False)
    assert out.shape == (1, 162)


def test_select_rows_moves_whole_segments():
    model = _model(seed=5)
    plan = kvcompress_plan(model, 0.3, SHARES, window=8, sink=2, block=4)
    cache = _prefill(model, plan, _ids(3, 120, seed=5))
    layer = cache.layers[0]
    before = layer.held()
    layer.batch_select_indices(torch.tensor([2, 0]))
    after = layer.held()
    for new, old in enumerate([2, 0]):
        width = int(before.valid[old].sum(dim=-1).max())
        assert torch.equal(after.positions[new][after.valid[new]], before.positions[old][before.valid[old]])
        assert torch.equal(after.keys[new, :, :width], before.keys[old, :, :width])


def test_ragged_attention_equals_dense_attention_over_the_same_rows():
    """The segmented softmax over blocks equals SDPA over each (row, head)'s rows, several queries, GQA 3."""
    g = torch.Generator().manual_seed(0)
    bsz, n_kv, groups, q_len, dim, block = 2, 2, 3, 4, 8, 4
    lengths = torch.tensor([5, 11, 1, 8])
    seg = torch.repeat_interleave(torch.arange(4), lengths)
    keys, values = torch.randn(seg.numel(), dim, generator=g), torch.randn(seg.numel(), dim, generator=g)
    body = RaggedStorage(block)
    body.pack(seg, keys, values, torch.arange(seg.numel()), torch.zeros(seg.numel()), 4)
    tail_k, tail_v = torch.randn(bsz, n_kv, q_len, dim, generator=g), torch.randn(bsz, n_kv, q_len, dim, generator=g)
    allowed = torch.ones(q_len, q_len, dtype=torch.bool).tril().expand(bsz, q_len, q_len)
    query = torch.randn(bsz, n_kv * groups, q_len, dim, generator=g)
    out, votes_b, votes_t = ragged_attend(query, body, tail_k, tail_v, allowed, 0.5, "l1")
    for s in range(4):
        row, head = divmod(s, n_kv)
        k = torch.cat([keys[seg == s][None].expand(q_len, -1, -1), tail_k[row, head][None].expand(q_len, -1, -1)], 1)
        v = torch.cat([values[seg == s][None].expand(q_len, -1, -1), tail_v[row, head][None].expand(q_len, -1, -1)], 1)
        mask = torch.cat([torch.ones(q_len, int(lengths[s]), dtype=torch.bool), allowed[row]], dim=1)
        for g_ in range(groups):
            q = query[row, head * groups + g_][:, None, :]  # [Q, 1, d]
            ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, :], scale=0.5)
            torch.testing.assert_close(out[row, :, head * groups + g_], ref[:, 0], atol=1e-5, rtol=1e-5)
    # l1 votes: every query's probabilities sum to 1 over body + tail, for each of the group's heads
    total = torch.zeros(4).index_add_(0, body.block_seg, votes_b.sum(dim=1)) + votes_t.reshape(4, -1).sum(dim=1)
    torch.testing.assert_close(total, torch.full((4,), float(groups * q_len)))


BAD = {
    "no layer budget": (lambda p: dataclasses.replace(p, tensors={k: v for k, v in p.tensors.items()
                                                                if k != "kvcompress.layer_keep"}), "layers' budgets"),
    "wrong shape": (lambda p: _with(p, "kvcompress.head_keep", torch.full((4, 3), 1 / 3)), r"shape \[4, 2\]"),
    "nan": (lambda p: _with(p, "kvcompress.head_keep", torch.full((4, 2), math.nan)), "NaN"),
    "inf": (lambda p: _with(p, "kvcompress.head_keep", torch.full((4, 2), math.inf)), "infinite"),
    "negative": (lambda p: _with(p, "kvcompress.head_keep", torch.tensor([[1.2, -0.2]] * 4)), r"\[0, 1\]"),
    "shares not adding up": (lambda p: _with(p, "kvcompress.head_keep", torch.tensor([[0.6, 0.6]] * 4)), "sum to 1"),
    "layer keep zero": (lambda p: _with(p, "kvcompress.layer_keep", torch.zeros(4)), r"\(0, 1\]"),
    "layer keep int": (lambda p: _with(p, "kvcompress.layer_keep", torch.ones(4, dtype=torch.int32)), "float32"),
}


def _with(plan, name, value):
    return dataclasses.replace(plan, tensors={**plan.tensors, name: value})


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_malformed_kvcompress_tensors_are_refused(case, tmp_path):
    model = _model(seed=6)
    plan = kvcompress_plan(model, 0.3, SHARES, with_pyramid=False)
    plan.check()
    make, message = BAD[case]
    bad = make(plan)
    with pytest.raises(PlanError, match=message):
        bad.check()
    with pytest.raises(PlanError, match=message):
        with runtime.apply_plan(model, bad):
            pass
