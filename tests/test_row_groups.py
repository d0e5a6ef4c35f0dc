"""A batched prefill under a plan runs in groups of rows (``runtime.chunking.RowGroupPrefill``), each group into its
own fresh cache, the caches then joined row-wise (``PlanLayer.join_rows``): what every layer holds afterwards and
the tokens generated are those of one forward over the whole batch, for every plan layer kind."""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from conftest import tiny_config
from helpers import left_padded, pyramid_plan, random_ids, tiny_gqa_model
from test_chunked_prefill import CHUNK, PLAN_NAMES, WINDOW, _plans
from transformers import DynamicCache

import runtime
from runtime.cache import cache_argument, can_join_rows, join_cache_rows
from runtime.chunking import RowGroupPrefill
from runtime.kvcompress import RaggedLayer
from runtime.kvsharer import SharedLayer
from runtime.layers import PlanLayer
from runtime.pyramidinfer import BudgetedLayer

LENGTHS = [200, 60, 131, 97, 23]  # left-padded rows; the 23-token row is padding in the first chunks


@pytest.fixture(scope="module")
def model():
    return tiny_gqa_model(seed=3)


class BatchLog:
    """Decoder pre-hook: ``(rows, tokens)`` of every forward."""

    def __init__(self, model):
        self.shapes: list[tuple[int, int]] = []
        self._handle = model.get_decoder().register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        self.shapes.append(tuple(tokens.shape[:2]))

    def remove(self):
        self._handle.remove()


def _run(model, plan, ids, mask, groups: bool, chunk=CHUNK, new_tokens=8):
    with runtime.apply_plan(model, plan, prefill_chunk_size=chunk) as applied:
        applied.prefill_row_groups = groups
        log = BatchLog(model)
        try:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, output_scores=True, return_dict_in_generate=True)
        finally:
            log.remove()
    return out, log.shapes


@pytest.mark.parametrize("name", PLAN_NAMES)
def test_a_batched_prefill_in_row_groups_generates_what_one_forward_does(model, name):
    plan = _plans(model)[name]
    ids, mask = left_padded(LENGTHS, seed=20)
    one, one_shapes = _run(model, plan, ids, mask, groups=False)
    grouped, grouped_shapes = _run(model, plan, ids, mask, groups=True)
    assert torch.equal(grouped.sequences, one.sequences)
    for a, b in zip(grouped.scores, one.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # one forward of the whole batch per chunk without groups; with them, each row alone (48 // 48 = 1 row per
    # group), chunked as in its solo run; decode steps see the whole batch again
    assert one_shapes[:5] == [(5, 8), (5, 48), (5, 48), (5, 48), (5, 48)]
    assert grouped_shapes[:25] == [(1, 8), (1, 48), (1, 48), (1, 48), (1, 48)] * 5
    assert grouped_shapes[25:] == [(5, 1)] * 7


def _prefill(model, plan, ids, mask, groups: bool, chunk=CHUNK):
    applied = runtime.apply_plan(model, plan, prefill_chunk_size=chunk)
    applied.prefill_row_groups = groups
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, logits_to_keep=1, use_cache=True,
                    **{cache_argument(model): cache})
    applied.remove()
    return out, cache


def _assert_same_layer(a, b, idx):
    assert type(a) is type(b), idx
    if isinstance(a, SharedLayer):
        assert a.source is not None
        return
    if not isinstance(a, PlanLayer):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-5)
        return
    assert torch.equal(a.kept_lengths(), b.kept_lengths()), idx
    ha, hb = a.held(), b.held()
    if ha.valid is None:
        assert hb.valid is None
        torch.testing.assert_close(ha.keys, hb.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ha.values, hb.values, rtol=1e-5, atol=1e-5)
        return
    # the same tokens per (row, head), in the same slot order, and the same ones in the rectangle's last slots (the
    # recent window a compaction protects); where the empty slots of a narrower row sit may differ
    assert ha.valid.shape[-1] == hb.valid.shape[-1], idx
    bsz, n_kv = ha.keys.shape[:2]
    for row in range(bsz):
        for head in range(n_kv):
            sel = head if ha.valid.shape[1] > 1 else 0
            va, vb = ha.valid[row, sel], hb.valid[row, sel]
            assert torch.equal(ha.positions[row, sel][va], hb.positions[row, sel][vb]), (idx, row, head)
            tail_a, tail_b = ha.positions[row, sel][-WINDOW:], hb.positions[row, sel][-WINDOW:]
            assert torch.equal(tail_a[va[-WINDOW:]], tail_b[vb[-WINDOW:]]), (idx, row, head)
            torch.testing.assert_close(ha.keys[row, head][va], hb.keys[row, head][vb], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ha.values[row, head][va], hb.values[row, head][vb], rtol=1e-5, atol=1e-5)
    if isinstance(a, BudgetedLayer):
        sa, sb = a.storage.scores, b.storage.scores
        torch.testing.assert_close(sa[sa > float("-inf")], sb[sb > float("-inf")], rtol=1e-5, atol=1e-6)
        assert torch.equal(a.real_seen, b.real_seen) and torch.equal(a.prefill_end, b.prefill_end), idx
        assert (a._countdown, a._maybe_empty, a.seen) == (b._countdown, b._maybe_empty, b.seen), idx
        assert a.storage.width == b.storage.width
    if isinstance(a, RaggedLayer):
        assert torch.equal(a.body.lengths, b.body.lengths) and torch.equal(a.body.block_seg, b.body.block_seg), idx
        assert torch.equal(a.body.positions, b.body.positions), idx
        torch.testing.assert_close(a.body.scores, b.body.scores, rtol=1e-5, atol=1e-6)
        assert (a.n_tail, a.tail_start, a.seen) == (b.n_tail, b.tail_start, b.seen), idx
        assert torch.equal(a.real_seen, b.real_seen), idx
    for sa, sb in zip(a.value_stores(), b.value_stores()):
        torch.testing.assert_close(sa.sums, sb.sums, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", PLAN_NAMES)
@pytest.mark.parametrize("chunk", [CHUNK, 450])
def test_the_joined_cache_holds_what_one_forward_over_every_row_leaves(model, name, chunk):
    """Chunks of 48 (groups of one row, each chunked) and of 450 (one chunk; 450 // 200 = 2 rows per group, the
    last group of one row)."""
    plan = _plans(model)[name]
    ids, mask = left_padded(LENGTHS, seed=20)
    one_out, one = _prefill(model, plan, ids, mask, groups=False, chunk=chunk)
    grouped_out, grouped = _prefill(model, plan, ids, mask, groups=True, chunk=chunk)
    torch.testing.assert_close(grouped_out.logits, one_out.logits, rtol=1e-5, atol=1e-5)
    assert len(grouped.layers) == len(one.layers)
    for idx, (a, b) in enumerate(zip(grouped.layers, one.layers)):
        _assert_same_layer(a, b, idx)
    for layer in grouped.layers:  # a sharing layer reads the joined cache's own source
        if isinstance(layer, SharedLayer):
            assert layer.source is grouped.layers[layer.source_idx]


def test_groups_hold_at_most_a_chunk_of_tokens(model):
    """``max(1, C // min(L, C))`` rows per group: 6 rows of 20 tokens with chunks of 48 run as 3 groups of 2."""
    plan = _plans(model)["all"]
    ids = random_ids(6, 20, seed=4)
    one, _ = _run(model, plan, ids, torch.ones_like(ids), groups=False, chunk=48, new_tokens=3)
    grouped, shapes = _run(model, plan, ids, torch.ones_like(ids), groups=True, chunk=48, new_tokens=3)
    assert shapes == [(2, 20)] * 3 + [(6, 1)] * 2
    assert torch.equal(grouped.sequences, one.sequences)
    # 2 rows x 20 tokens fit in one chunk of 48: no groups
    _, shapes = _run(model, plan, ids[:2], None, groups=True, chunk=48, new_tokens=2)
    assert shapes == [(2, 20), (2, 1)]


def test_forwards_that_are_not_grouped(model):
    plan = _plans(model)["pyramidinfer"]
    ids = random_ids(4, 100, seed=5)
    with runtime.apply_plan(model, plan, prefill_chunk_size=48) as applied:
        wrapper = model.__dict__["forward"]
        assert isinstance(wrapper, RowGroupPrefill)
        # generate reads the forward's signature (logits_to_keep, attention_mask, position_ids)
        assert inspect.signature(model.forward) == inspect.signature(type(model).forward.__get__(model))
        cache_name = cache_argument(model)
        with torch.no_grad():
            base = {"input_ids": ids, "logits_to_keep": 1, cache_name: DynamicCache(config=model.config)}
            assert wrapper.groups((), base) is not None
            assert wrapper.groups((), {**base, "output_hidden_states": True}) is None
            assert wrapper.groups((), {**base, "labels": ids}) is None
            assert wrapper.groups((), {**base, "use_cache": False}) is None
            assert wrapper.groups((), {**base, "token_type_ids": torch.zeros_like(ids)}) is None  # unknown row tensor
            with torch.enable_grad():
                assert wrapper.groups((), base) is None
            used = DynamicCache(config=model.config)
            model(input_ids=ids[:, :10], **{cache_name: used})
            assert wrapper.groups((), {**base, cache_name: used}) is None  # a cache that holds tokens already
            applied.prefill_row_groups = False
            assert wrapper.groups((), base) is None
            applied.prefill_row_groups = True
            applied.prefill_chunk_size = None
            assert wrapper.groups((), base) is None
    assert "forward" not in model.__dict__  # taken off with the plan
    noop = runtime.Plan(fingerprint=plan.fingerprint, methods=(), tensors={})
    with runtime.apply_plan(model, noop, prefill_chunk_size=48):
        assert "forward" not in model.__dict__  # a plan with every method off stays stock


def test_join_rows_refuses_layers_at_different_points_of_a_prompt(model):
    plan = pyramid_plan(model, 0.3)
    parts = []
    for length in (60, 61):
        _, cache = _prefill(model, plan, random_ids(1, length, seed=length), None, groups=False)
        parts.append(cache)
    with pytest.raises(ValueError, match="different points of a prompt"):
        join_cache_rows(DynamicCache(config=model.config), parts)


def test_only_a_fresh_dynamic_cache_is_joined(model):
    cache = DynamicCache(config=model.config)
    assert can_join_rows(cache)
    with torch.no_grad():
        model(input_ids=random_ids(1, 5), **{cache_argument(model): cache})
    assert not can_join_rows(cache)
    assert not can_join_rows(transformers.StaticCache(config=model.config, max_cache_len=16))


def test_sliding_window_layers_are_joined_too():
    """Gemma 3 (sliding layers stay transformers' own, the full layer gets the plan)."""
    config = tiny_config("gemma3")
    torch.manual_seed(0)
    gemma = transformers.Gemma3ForCausalLM(config).eval()
    gemma.generation_config.eos_token_id = None
    gemma.generation_config.pad_token_id = 0
    plan = pyramid_plan(gemma, 0.3)
    ids, mask = left_padded([70, 40, 55], seed=7)
    ids = ids % config.vocab_size
    one, _ = _run(gemma, plan, ids, mask, groups=False, chunk=48, new_tokens=6)
    grouped, shapes = _run(gemma, plan, ids, mask, groups=True, chunk=48, new_tokens=6)
    assert shapes[:2] == [(1, 22), (1, 48)]
    assert torch.equal(grouped.sequences, one.sequences)


@pytest.mark.smollm2
@pytest.mark.slow
def test_shipped_8x_plan_generates_the_same_in_row_groups_on_smollm2():
    """SmolLM2-135M, the shipped all-methods 8x plan, a left-padded batch of 3 prompts (~450-900 tokens) with chunks
    of 256: row groups of one row, each chunked and joined, generate the tokens of one forward per chunk over the
    batch, and the joined cache holds as many bytes."""
    from pathlib import Path

    from runtime.models import load_model, resolve_model_spec

    plan_path = Path(__file__).resolve().parent.parent / "artifacts" / "smollm2-135m-all-8x" / "plan.safetensors"
    if not plan_path.exists():
        pytest.skip("the shipped plan artifacts/smollm2-135m-all-8x is not in this checkout")
    loaded = load_model(resolve_model_spec("smollm2-135m"), progress=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    texts = [" ".join(f"Box {i} holds {i * k % 50} marbles and sits next to box {i + 1}." for i in range(1, n))
             for k, n in ((7, 70), (11, 40), (13, 55))]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert batch.input_ids.shape[1] > 800
    plan = runtime.load_plan(plan_path)
    results = {}
    for groups in (False, True):
        cache = DynamicCache(config=model.config)
        with runtime.apply_plan(model, plan, prefill_chunk_size=256) as applied:
            applied.prefill_row_groups = groups
            log = BatchLog(model)
            try:
                out = model.generate(**batch, max_new_tokens=8, do_sample=False, **{cache_argument(model): cache})
            finally:
                log.remove()
        results[groups] = (out, runtime.physical_bytes(cache), log.shapes)
    assert torch.equal(results[True][0], results[False][0])
    assert results[True][1] == pytest.approx(results[False][1], rel=0.02)
    assert {rows for rows, tokens in results[True][2] if tokens > 1} == {1}
