"""KCache at run time (tiny random models): values in a second store, top-N value rows read per decode step.

The top-N readout of every layer kind (KCache alone, on a PyramidInfer layer, on a KV-Compress layer) is checked
against an independent reference: stock SDPA restricted, per (row, KV head), to the N held rows its group's summed
probability ranks first. Whole-model checks: ``topn`` at least the context is token-identical (alone and composed),
padded batch rows equal their solo runs, values really live in the store, and malformed ``topn`` is refused.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from helpers import assert_rows_equal_solo_runs, greedy, kvcompress_plan, pyramid_plan, random_ids, share_plan, tiny_gqa_model

import runtime
from runtime.cache import cache_argument, physical_bytes
from runtime.errors import PlanError
from runtime.kcache import OffloadedLayer, ValueStore
from runtime.kvcompress import HeadParams
from runtime.layers import FullLayer
from runtime.plan import Plan, fingerprint_from_model
from runtime.pyramidinfer import PyramidParams

SCALE = 0.25


def _model(seed: int = 0, layers: int = 4):
    return tiny_gqa_model(seed, layers)


_ids = random_ids


def with_kcache(plan: Plan, topn) -> Plan:
    layers = plan.fingerprint["num_hidden_layers"]
    topn = torch.as_tensor(topn, dtype=torch.int32).expand(layers).clone()
    return dataclasses.replace(plan, methods=(*plan.methods, "kcache"), tensors={**plan.tensors, "kcache.topn": topn})


def kcache_plan(model, topn) -> Plan:
    base = Plan(fingerprint=fingerprint_from_model(model), methods=(), tensors={})
    return with_kcache(base, topn)


# ----------------------------------------------------------------------------------------------- the reference


def _exact(query):
    """What kvplan's attention function hands a layer: stock SDPA of ``query`` (causal over its own chunk)."""

    def exact(keys, values):
        q_len, total = query.shape[2], keys.shape[2]
        mask = torch.ones(q_len, total, dtype=torch.bool).tril(diagonal=total - q_len)
        out = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=SCALE,
                                                               enable_gqa=True)
        return out.transpose(1, 2)

    return exact


def reference_topn(query, keys, values, valid, topn, estimator="renormalise"):
    """``[B, 1, H_q, d]``: per (row, KV head), SDPA over the ``topn`` valid rows of largest probability summed over
    the group's query heads (a plain loop, independent of the runtime's vectorised code). ``residual_mean``: that
    output weighed by the probability mass the rows hold, plus the rest of the mass times the plain mean of the
    valid rows not selected."""
    bsz, n_q, _, dim = query.shape
    n_kv = keys.shape[1]
    groups = n_q // n_kv
    out = torch.zeros(bsz, 1, n_q, dim)
    for b in range(bsz):
        for h in range(n_kv):
            rows = valid[b, h].nonzero()[:, 0]
            k, v = keys[b, h, rows], values[b, h, rows]
            q = query[b, h * groups : (h + 1) * groups, 0]  # [G, d]
            score = torch.softmax(q @ k.T * SCALE, dim=-1).sum(dim=0)
            pick = score.topk(min(topn, rows.numel())).indices
            ref = torch.nn.functional.scaled_dot_product_attention(q[:, None], k[pick][None], v[pick][None],
                                                                   scale=SCALE)[:, 0]  # [G, d]
            if estimator == "residual_mean":
                mass = torch.softmax(q @ k.T * SCALE, dim=-1)[:, pick].sum(dim=-1, keepdim=True)  # [G, 1]
                rest = torch.ones(rows.numel(), dtype=torch.bool)
                rest[pick] = False
                mean = v[rest].mean(dim=0) if rest.any() else torch.zeros(dim)
                ref = mass * ref + (1 - mass) * mean
            out[b, 0, h * groups : (h + 1) * groups] = ref
    return out


def _layer_case(layer, seen=60, bsz=2, n_kv=2, groups=3, dim=8, seed=0, steps=5):
    """Prefill ``layer`` with ``seen`` tokens, then decode ``steps`` tokens; yield (held before the step, query, out)."""
    g = torch.Generator().manual_seed(seed)
    k0, v0 = torch.randn(bsz, n_kv, seen, dim, generator=g), torch.randn(bsz, n_kv, seen, dim, generator=g)
    q0 = torch.randn(bsz, n_kv * groups, seen, dim, generator=g)
    layer.update(k0, v0)
    layer.attention(q0, None, SCALE, _exact(q0))
    for _ in range(steps):
        k1, v1 = torch.randn(bsz, n_kv, 1, dim, generator=g), torch.randn(bsz, n_kv, 1, dim, generator=g)
        q1 = torch.randn(bsz, n_kv * groups, 1, dim, generator=g)
        layer.update(k1, v1)
        held = layer.held()
        out = layer.attention(q1, None, SCALE, _exact(q1))
        yield held, q1, out


def _valid(held, n_kv):
    if held.valid is None:
        return torch.ones(held.keys.shape[:3], dtype=torch.bool)
    return held.valid.expand(-1, n_kv, -1)


LAYERS = {
    "alone": lambda n, e="residual_mean": OffloadedLayer(n, estimator=e) if n else FullLayer(),
    "pyramidinfer": lambda n, e="residual_mean": PyramidParams(keep=0.5, window=4, sink=2, slack=2, pool=1,
                                                               head_reduce="mean").make_layer(topn=n, estimator=e),
    "kvcompress": lambda n, e="residual_mean": HeadParams(fractions=(0.6, 0.3), window=4, sink=2, pool=1, metric="l2",
                                                          block=4, slack=3).make_layer(topn=n, estimator=e),
}


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("topn", [1, 5, 12, 24])
@pytest.mark.parametrize("estimator", ["residual_mean", "renormalise"])
def test_topn_readout_equals_sdpa_over_the_same_rows(kind, topn, estimator):
    """Every (row, KV head) reads ``min(topn, what it holds)`` rows. With ``topn = 24`` the KV-Compress layer's heads
    hold ~36 and ~18 tokens: one head selects, the other reads all its rows (no padding of it up to ``topn``)."""
    layer = LAYERS[kind](topn, estimator)
    for held, query, out in _layer_case(layer):
        ref = reference_topn(query, held.keys, held.values, _valid(held, 2), topn, estimator)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    counts = _valid(held, 2).sum(dim=-1)  # [B, H_kv] tokens each (row, KV head) held at the last step
    store = layer.value_stores()[0]
    assert store.last_read == int(counts.clamp(max=topn).sum())
    assert store.last_read < store.last_held
    if kind == "kvcompress" and topn == 24:
        assert bool((counts <= topn).any()) and bool((counts > topn).any())


@pytest.mark.parametrize("kind", list(LAYERS))
def test_residual_sums_follow_evictions_and_row_selections(kind):
    """The resident value sums stay those of what each (row, KV head) holds through compactions/merges (5 steps
    with slack 2-3), a beam reorder and a row repeat: the next readout still equals the reference."""
    layer = LAYERS[kind](5)
    for _ in _layer_case(layer, steps=5):
        pass
    layer.reorder_cache(torch.tensor([1, 0]))
    layer.batch_repeat_interleave(2)  # rows 1, 1, 0, 0
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        k1, v1 = torch.randn(4, 2, 1, 8, generator=g), torch.randn(4, 2, 1, 8, generator=g)
        q1 = torch.randn(4, 6, 1, 8, generator=g)
        layer.update(k1, v1)
        held = layer.held()
        out = layer.attention(q1, None, SCALE, _exact(q1))
        ref = reference_topn(q1, held.keys, held.values, _valid(held, 2), 5, "residual_mean")
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_padding_adds_nothing_to_the_resident_sums():
    layer = OffloadedLayer(3)
    g = torch.Generator().manual_seed(3)
    k0, v0 = torch.randn(2, 2, 10, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g)
    mask = torch.ones(2, 1, 10, 10, dtype=torch.bool).tril()
    mask[1, :, :, :4] = False  # row 1: four left-padding tokens
    layer.update(k0, v0)
    layer.attention(torch.randn(2, 6, 10, 8, generator=g), mask, SCALE, lambda k, v: torch.zeros(2, 10, 6, 8))
    expected = v0.sum(dim=2)
    expected[1] = v0[1, :, 4:].sum(dim=1)
    torch.testing.assert_close(layer.store.sums, expected)
    assert torch.equal(layer.store.view()[1, :, :4], torch.zeros(2, 4, 8))


@pytest.mark.parametrize("kind", list(LAYERS))
def test_topn_at_least_what_a_layer_holds_reads_every_row_exactly(kind):
    plain = LAYERS[kind](0)
    kc = LAYERS[kind](10_000)
    for (h_p, _, out_p), (h_k, _, out_k) in zip(_layer_case(plain), _layer_case(kc)):
        assert torch.equal(out_p, out_k)
        assert torch.equal(h_p.values, h_k.values)
    store = kc.value_stores()[0]
    assert store.last_read == store.last_held


def test_prefill_values_move_to_the_store_and_leave_the_model():
    layer = OffloadedLayer(4)
    cases = _layer_case(layer, steps=1)
    next(cases)
    assert layer._fresh is None and layer.values is None
    assert layer.store.buffer.device.type == "cpu" and not layer.store.pin  # CPU model: an ordinary CPU buffer
    assert layer.store_bytes() == layer.store.buffer.numel() * 4
    assert layer.store.length == 61


def test_a_multi_token_chunk_after_the_prefill_reads_every_row():
    layer = OffloadedLayer(3)
    list(_layer_case(layer, steps=1))
    g = torch.Generator().manual_seed(5)
    k, v, q = (torch.randn(2, 2, 4, 8, generator=g), torch.randn(2, 2, 4, 8, generator=g),
               torch.randn(2, 6, 4, 8, generator=g))
    layer.update(k, v)
    held = layer.held()
    out = layer.attention(q, None, SCALE, _exact(q))
    torch.testing.assert_close(out, _exact(q)(held.keys, held.values))
    assert layer.store.last_read == layer.store.last_held == 2 * 2 * 65


# ------------------------------------------------------------------------------------------------ whole models


def test_topn_of_the_whole_context_is_token_identical_to_stock():
    model = _model()
    ids = _ids(2, 90)
    stock = greedy(model, ids, 20)
    with runtime.apply_plan(model, kcache_plan(model, 200)):
        assert torch.equal(greedy(model, ids, 20), stock)


@pytest.mark.parametrize("base", ["pyramidinfer", "kvcompress", "kvsharer", "kvsharer+pyramidinfer"])
def test_topn_of_the_whole_context_leaves_a_composed_plan_unchanged(base):
    model = _model(seed=1)
    plan = {
        "pyramidinfer": lambda: pyramid_plan(model, 0.4, window=8, sink=2),
        "kvcompress": lambda: kvcompress_plan(model, 0.4, [[3.0, 1.0]], window=8, sink=2, block=4, slack=3),
        "kvsharer": lambda: share_plan(model, [0, 1, 1, 0]),
        "kvsharer+pyramidinfer": lambda: share_plan(model, [0, 1, 1, 1], keep=0.4),
    }[base]()
    ids = _ids(2, 100, seed=3)
    with runtime.apply_plan(model, plan):
        without = greedy(model, ids, 20)
    with runtime.apply_plan(model, with_kcache(plan, 500)):
        assert torch.equal(greedy(model, ids, 20), without)


@pytest.mark.parametrize("base", ["alone", "pyramidinfer", "kvcompress", "kvsharer"])
def test_padded_batch_rows_equal_their_solo_runs(base):
    model = _model(seed=2)
    plan = {
        "alone": lambda: kcache_plan(model, [6, 9, 4, 12]),
        "pyramidinfer": lambda: with_kcache(pyramid_plan(model, 0.5, window=8, sink=2), [6, 9, 4, 12]),
        "kvcompress": lambda: with_kcache(
            kvcompress_plan(model, 0.5, [[3.0, 1.0]], window=8, sink=2, block=4, slack=3), [6, 9, 4, 12]),
        "kvsharer": lambda: with_kcache(share_plan(model, [0, 0, 2, 2]), [6, 9, 4, 12]),
    }[base]()
    with runtime.apply_plan(model, plan):
        assert_rows_equal_solo_runs(model, [150, 96, 121], 25)


def test_values_live_in_the_store_and_are_counted_there():
    model = _model(seed=4)
    ids = _ids(2, 120)
    plan = kcache_plan(model, [0, 8, 8, 16])
    cache = transformers.DynamicCache(config=model.config)
    with runtime.apply_plan(model, plan), torch.inference_mode():
        model.generate(ids, max_new_tokens=10, do_sample=False, **{cache_argument(model): cache})
    layers = cache.layers
    assert not isinstance(layers[0], OffloadedLayer)  # topn 0: values stay with the model
    seen = 129
    stock_layer = 2 * (2 * 2 * seen * 16 * 4)  # K + V bytes of one layer: rows x KV heads x tokens x d, float32
    for layer in layers[1:]:
        assert isinstance(layer, OffloadedLayer)
        assert layer.values is None and layer._fresh is None
        assert layer.keys.device.type == "cpu" and layer.store.buffer.device.type == "cpu"
        assert layer.store.length == seen
        assert stock_layer // 2 <= layer.store_bytes() <= stock_layer // 2 * 1.1  # values, a little capacity
        assert layer.store.last_read == 2 * 2 * layer.topn and layer.store.last_held == 2 * 2 * seen
        assert layer.store.steps == 9  # the decode steps (the prefill reads nothing from the store)
    total = physical_bytes(cache)
    assert 4 * stock_layer <= total <= 4 * stock_layer * 1.05  # bytes are moved, not removed


def test_beam_search_reorders_the_store():
    model = _model(seed=5)
    ids = _ids(1, 80)
    plan = with_kcache(pyramid_plan(model, 0.5, window=8, sink=2), 6)
    with runtime.apply_plan(model, plan):
        out = model.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False)
    assert out.shape == (1, 88)
    with runtime.apply_plan(model, kcache_plan(model, 6)):
        out = model.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False)
    assert out.shape == (1, 88)


BAD = {
    "negative": (torch.tensor([0, -1, 4, 4], dtype=torch.int32), ">= 0"),
    "wrong shape": (torch.tensor([4, 4, 4], dtype=torch.int32), r"shape \[4\]"),
    "float values": (torch.tensor([4.5, 4, 4, 4], dtype=torch.float32), "integer|int32"),
    "int64": (torch.tensor([4, 4, 4, 4], dtype=torch.int64), "int32"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_malformed_topn_is_refused(case):
    model = _model(seed=6)
    tensor, message = BAD[case]
    plan = dataclasses.replace(kcache_plan(model, 4), tensors={"kcache.topn": tensor})
    with pytest.raises(PlanError, match=message):
        plan.check()
    with pytest.raises(PlanError, match=message):
        runtime.apply_plan(model, plan)
    assert runtime.remove_plan(model) is False


def test_value_store_grows_by_appending_and_fetches_flat_rows():
    store = ValueStore(torch.device("cpu"))
    a = torch.arange(2 * 3 * 5 * 4, dtype=torch.float32).view(2, 3, 5, 4)
    store.append(a)
    store.append(a[:, :, :1] + 1000)
    assert store.length == 6 and torch.equal(store.view()[:, :, :5], a)
    cap = store.buffer.shape[-2]
    idx = torch.tensor([[0, 5], [1, 2]])  # flat rows: (row 0, head 0, slots 0 / 5), (row 0, head 0, slots 1 / 2)
    rows = store.fetch(store.buffer, idx)
    assert torch.equal(rows[0, 1], a[0, 0, 0] + 1000) and torch.equal(rows[1, 0], a[0, 0, 1])
    assert cap >= 6
