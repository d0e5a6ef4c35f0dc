"""What a plan layer keeps is attended exactly: checked against stock SDPA over every token the layer has seen.

The reference is built here, from records only: during a real ``generate`` (left-padded batch, several hundred
tokens, compaction while decoding), a wrapper around kvplan's attention function records, per layer and call, the
query, the output and which positions the layer holds at that moment; the layers' ``update`` is wrapped to record
every key/value the layer received (post-RoPE). The expected output of each call is then
``torch.nn.functional.scaled_dot_product_attention`` over the FULL keys/values of the sequence (grouped-query heads
expanded by ``repeat_interleave``), with transformers' own mask (causal + padding) AND-ed with "the layer holds this
position". Nothing of ``runtime.pyramidinfer`` is called to build it.

A KVSharer layer reading a PyramidInfer source is checked the same way against the source's full K/V masked to what
the source holds.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import transformers
from helpers import kvcompress_plan, pyramid_plan, share_plan, tiny_gqa_model

import runtime
import runtime.attention
from runtime.cache import cache_argument
from runtime.kvcompress import RaggedLayer
from runtime.kvsharer import SharedLayer
from runtime.pyramidinfer import BudgetedLayer

# =====================================================================================================================
# ADAPTER: every access to plan-layer internals goes through the functions of this block (and nowhere else), so a
# change of the layers' internal layout only needs this block updated.
# =====================================================================================================================

STEERED_KINDS = (BudgetedLayer, RaggedLayer)  # layer kinds whose attention kvplan steers (a SharedLayer counts through its source)
RECORDED_KINDS = (BudgetedLayer, RaggedLayer)  # layer kinds whose ``update`` is wrapped to record every key/value they receive


def owner(layer):
    """The layer object that holds the K/V ``layer`` attends over (a sharing layer's source, else itself)."""
    return layer.source if isinstance(layer, SharedLayer) else layer


def is_steered(layer) -> bool:
    """True when kvplan's attention attends over what ``layer`` (or its source) holds rather than stock SDPA."""
    return isinstance(owner(layer), STEERED_KINDS)


def held(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``layer`` holds now: int64 positions ``[B, H, T]`` and bool validity ``[B, H, T]``.

    ``H`` is 1 (every KV head holds the same tokens) or ``H_kv``; both broadcast over the KV heads. A position is the
    index of the token in the full (padded) sequence, i.e. a column of transformers' attention mask. Slots with
    ``valid`` False hold nothing real (their position is meaningless).
    """
    state = owner(layer).held()  # the PlanLayer interface: Held(keys, values, positions, valid)
    positions, valid = state.positions, state.valid  # None: slot t holds token t / the forward's mask says all
    if positions is None:
        positions = torch.arange(state.keys.shape[-2])[None, None, :]
    if valid is None:
        valid = torch.ones(positions.shape, dtype=torch.bool)
    positions, valid = torch.broadcast_tensors(positions.to(torch.int64), valid)
    return positions.clone(), valid.clone()


def select_per_kv_head(monkeypatch) -> None:
    """Make every budgeted layer keep its own tokens per KV head (``H = H_kv``).

    Not a plan parameter (yet): the layers' ``PyramidParams`` get ``per_kv_head=True`` as they are built.
    """
    original = BudgetedLayer.__init__

    def init(layer, params, *args, **kwargs):
        original(layer, dataclasses.replace(params, per_kv_head=True), *args, **kwargs)

    monkeypatch.setattr(BudgetedLayer, "__init__", init)


# =====================================================================================================================

KEEP = [0.5, 0.4, 0.3, 0.3, 0.25, 0.2]
WINDOW, SINK, SLACK = 8, 2, 2
LENGTHS = [460, 377, 311]  # rows of a left-padded batch
NEW_TOKENS = 24
ATOL = 1e-5


def _model(seed: int = 0):
    """A tiny random llama (conftest's config) with more layers and more query heads per KV head."""
    return tiny_gqa_model(seed, layers=len(KEEP), heads=8)


def _left_padded(lengths: list[int], seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, 128, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask


class Recorder:
    """Records every kvplan attention call of steered layers, and every K/V a recorded layer kind received."""

    def __init__(self):
        self.kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # id(owner layer) -> update chunks
        self.owners: dict[int, object] = {}  # keeps the layer objects alive (ids stay unique)
        self.calls: list[dict] = []

    def install(self, monkeypatch) -> None:
        original_attention = runtime.attention.kvplan_attention
        recorder = self

        def recording_attention(module, query, key, value, attention_mask, *args, **kwargs):
            cache = kwargs.get(runtime.attention.CACHE_KWARG)
            layer = cache.layers[module.layer_idx] if cache is not None else None
            record = None
            if layer is not None and is_steered(layer):
                src = owner(layer)
                positions, valid = held(layer)
                record = {
                    "layer": module.layer_idx,
                    "shared": src is not layer,
                    "owner": id(src),
                    "chunks": len(recorder.kv[id(src)]),  # the full K/V at this call = the first `chunks` updates
                    "query": query.detach().clone(),
                    "mask": None if attention_mask is None else attention_mask.detach().clone(),
                    "scaling": kwargs.get("scaling"),
                    "positions": positions,
                    "valid": valid,
                }
            out, weights = original_attention(module, query, key, value, attention_mask, *args, **kwargs)
            if record is not None:
                record["out"] = out.detach().clone()
                recorder.calls.append(record)
            return out, weights

        monkeypatch.setattr(runtime.attention, "kvplan_attention", recording_attention)
        for kind in RECORDED_KINDS:
            original_update = kind.update

            def recording_update(layer, key_states, value_states, *args, _original=original_update, **kwargs):
                recorder.owners[id(layer)] = layer
                chunk = (key_states.detach().clone(), value_states.detach().clone())
                recorder.kv.setdefault(id(layer), []).append(chunk)
                return _original(layer, key_states, value_states, *args, **kwargs)

            monkeypatch.setattr(kind, "update", recording_update)

    def full_kv(self, call: dict) -> tuple[torch.Tensor, torch.Tensor]:
        chunks = self.kv[call["owner"]][: call["chunks"]]
        return torch.cat([k for k, _ in chunks], dim=2), torch.cat([v for _, v in chunks], dim=2)

    def steps(self, layer: int) -> list[dict]:
        return [c for c in self.calls if c["layer"] == layer]


def _held_mask(positions: torch.Tensor, valid: torch.Tensor, n_kv: int, total: int) -> torch.Tensor:
    """bool ``[B, H_kv, total]``: True at every position a valid slot holds (asserting no position is held twice)."""
    bsz, heads, _ = positions.shape
    positions, valid = positions.expand(bsz, n_kv, -1), valid.expand(bsz, n_kv, -1)
    assert bool(((positions >= 0) & (positions < total))[valid].all()), "a held position outside the sequence"
    slot = torch.where(valid, positions, torch.full_like(positions, total))  # invalid slots land in a spare column
    count = torch.zeros(bsz, n_kv, total + 1, dtype=torch.int64).scatter_add_(2, slot, torch.ones_like(slot))
    assert int(count[..., :total].max()) <= 1, "a position is held twice"
    return count[..., :total] > 0


def _reference(call: dict, keys: torch.Tensor, values: torch.Tensor, masked: bool = True,
               real_keys: torch.Tensor | None = None) -> torch.Tensor:
    """Stock SDPA over the full K/V with transformers' mask AND (if ``masked``) what the layer holds.

    A mask narrowed to the forward's own columns (``CompressingLayer.short_mask``) is completed with ``real_keys``
    (bool ``[B, total]``, the batch's 2D attention mask) over the older positions: a left-padded row's queries of a
    later forward may attend to every earlier real token.

    Returns ``[B, Q, H_q, d]``, the layout of transformers' attention functions.
    """
    query = call["query"]
    bsz, n_q, q_len, dim = query.shape
    n_kv, total = keys.shape[1], keys.shape[2]
    groups = n_q // n_kv
    mask = call["mask"]
    if mask is None:  # no padding: causal over the full sequence
        q_pos = torch.arange(total - q_len, total)
        allowed = (torch.arange(total)[None, :] <= q_pos[:, None]).expand(bsz, 1, q_len, total)
    else:
        assert mask.dtype == torch.bool, mask.dtype
        if mask.shape[-1] < total:
            assert real_keys is not None and mask.shape[-1] == q_len, (mask.shape, q_len, total)
            older = real_keys[:, None, None, : total - q_len].expand(bsz, 1, q_len, total - q_len)
            mask = torch.cat([older, mask.expand(bsz, 1, q_len, q_len)], dim=-1)
        assert mask.shape[-1] == total, (mask.shape, total)
        allowed = mask.expand(bsz, 1, q_len, total)
    allowed = allowed.expand(bsz, n_q, q_len, total)
    if masked:
        holds = _held_mask(call["positions"], call["valid"], n_kv, total)  # [B, H_kv, N]
        allowed = allowed & holds.repeat_interleave(groups, dim=1)[:, :, None, :]
    scale = call["scaling"] if call["scaling"] is not None else dim**-0.5
    out = torch.nn.functional.scaled_dot_product_attention(
        query, keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1),
        attn_mask=allowed, scale=scale,
    )
    return out.transpose(1, 2)


def _real_queries(call: dict, full_mask_2d: torch.Tensor, total: int) -> torch.Tensor:
    """bool ``[B, Q]``: query rows whose own token is real (padding query rows attend to nothing)."""
    q_len = call["query"].shape[2]
    return full_mask_2d[:, total - q_len : total].bool()


def _check_calls(recorder: Recorder, full_mask_2d: torch.Tensor, n_layers: int) -> dict:
    """Every recorded call's output equals the masked reference; returns per-layer facts for further checks."""
    facts = {}
    for layer in range(n_layers):
        calls = recorder.steps(layer)
        assert len(calls) == 1 + NEW_TOKENS - 1, f"layer {layer}: {len(calls)} attention calls"
        evictions = 0
        masked_effect = 0.0
        prev_held = None
        for step, call in enumerate(calls):
            keys, values = recorder.full_kv(call)
            total = keys.shape[2]
            real_q = _real_queries(call, full_mask_2d, total)
            expected = _reference(call, keys, values, real_keys=full_mask_2d[:, :total].bool())
            got = call["out"]
            assert got.shape == expected.shape
            diff = (got - expected).abs()[real_q]
            worst = float(diff.max())
            assert worst <= ATOL, f"layer {layer} step {step}: max |plan - reference| {worst:.3g}"
            holds = _held_mask(call["positions"], call["valid"], keys.shape[1], total)
            real_keys = full_mask_2d[:, :total].bool()
            if step == 0:  # the first chunk is attended exactly: the layer holds every token of it
                assert bool(holds.all()), f"layer {layer}: prefill does not hold every position"
            else:
                unmasked = _reference(call, keys, values, masked=False, real_keys=real_keys[:, :total])
                masked_effect = max(masked_effect, float((unmasked - expected).abs()[real_q].max()))
                # held only real tokens, and the new token itself
                assert not bool((holds & ~real_keys[:, None, :]).any()), f"layer {layer} step {step}: holds padding"
                assert bool(holds[:, :, total - 1].all()), f"layer {layer} step {step}: the new token is not held"
                if prev_held is not None:
                    # compaction at the end of the previous step dropped real tokens held before
                    dropped = prev_held & ~holds[:, :, : prev_held.shape[2]]
                    evictions += int(dropped.any(dim=2).any(dim=1).sum())  # rows that dropped a held token
                prev_held = holds
        facts[layer] = {"evictions": evictions, "masked_effect": masked_effect, "calls": calls}
    return facts


def _budget(keep: float, real: int) -> int:
    """The documented budget: ``max(ceil(keep · seen), sink + window)``, never more than seen."""
    return min(max(math.ceil(keep * real - 1e-9), min(real, SINK + WINDOW)), real)


def _check_budgets(facts: dict, keeps: list[float], width: int, n_kv: int, owners=None) -> None:
    """At every decode call, each row holds between its documented budget and budget + slack + 1 (the new token)
    real tokens per KV head, including its ``sink`` first real tokens and the ``window`` most recent ones."""
    for layer, keep in enumerate(keeps):
        if owners is not None and layer not in owners:
            continue
        for step, call in enumerate(facts[layer]["calls"][1:], start=1):
            total = width + step
            holds = _held_mask(call["positions"], call["valid"], n_kv, total)
            for row, n in enumerate(LENGTHS):
                real = n + step  # real tokens seen by this row, the new one included
                count = holds[row].sum(dim=-1)  # per KV head
                budget = _budget(keep, real)
                assert bool((count >= budget).all()) and bool((count <= budget + SLACK + 1).all()), (
                    f"layer {layer} step {step} row {row}: holds {count.tolist()}, budget {budget}"
                )
                first = width - n  # first real position of the row
                assert bool(holds[row, :, first : first + SINK].all()), f"layer {layer} row {row}: a sink was evicted"
                assert bool(holds[row, :, total - WINDOW :].all()), f"layer {layer} row {row}: recent window evicted"


def _generate(model, plan, ids, mask, monkeypatch) -> tuple[Recorder, torch.Tensor]:
    recorder = Recorder()
    recorder.install(monkeypatch)
    # these tests follow a one-shot prefill and its decode steps; chunked prefill: tests/test_chunked_prefill.py
    with runtime.apply_plan(model, plan, prefill_chunk_size=None):
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )
    full_mask_2d = torch.cat([mask, torch.ones(mask.shape[0], out.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    return recorder, full_mask_2d


SELECTIONS = pytest.mark.parametrize("per_kv_head", [False, True], ids=["one_selection", "per_kv_head"])


@SELECTIONS
def test_pyramid_layers_attend_exactly_what_they_hold(monkeypatch, per_kv_head):
    if per_kv_head:
        select_per_kv_head(monkeypatch)
    model = _model()
    plan = pyramid_plan(model, KEEP, window=WINDOW, sink=SINK, slack=SLACK)
    ids, mask = _left_padded(LENGTHS)
    recorder, full_mask_2d = _generate(model, plan, ids, mask, monkeypatch)
    facts = _check_calls(recorder, full_mask_2d, len(KEEP))
    for layer, f in facts.items():
        # compaction really happened while decoding, in every row, several times
        assert f["evictions"] >= 2 * len(LENGTHS), f"layer {layer}: only {f['evictions']} row-evictions while decoding"
        # and the masking matters: attending over everything would give another output
        assert f["masked_effect"] > 1e-3, f"layer {layer}: holding fewer tokens changes nothing ({f['masked_effect']})"
    _check_budgets(facts, KEEP, ids.shape[1], model.config.num_key_value_heads)


@SELECTIONS
def test_sharing_layers_attend_exactly_what_their_pyramid_source_holds(monkeypatch, per_kv_head):
    if per_kv_head:
        select_per_kv_head(monkeypatch)
    model = _model(seed=1)
    sources = [0, 1, 1, 3, 3, 3]  # layer 1 has one reader, layer 3 two
    plan = share_plan(model, sources, keep=0.3, window=WINDOW, sink=SINK)
    plan.params["pyramidinfer"]["slack"] = SLACK
    ids, mask = _left_padded(LENGTHS, seed=11)
    recorder, full_mask_2d = _generate(model, plan, ids, mask, monkeypatch)
    facts = _check_calls(recorder, full_mask_2d, len(sources))
    for layer, source in enumerate(sources):
        calls = facts[layer]["calls"]
        assert all(c["shared"] == (source != layer) for c in calls)
        if source != layer:
            # a reader attends over its source's cache: same object, same held positions at the same step
            for mine, theirs in zip(calls, facts[source]["calls"]):
                assert mine["owner"] == theirs["owner"] and mine["chunks"] == theirs["chunks"]
                assert torch.equal(mine["positions"], theirs["positions"])
                assert torch.equal(mine["valid"], theirs["valid"])
        assert facts[layer]["evictions"] >= 2 * len(LENGTHS), f"layer {layer}: no compaction while decoding"
        assert facts[layer]["masked_effect"] > 1e-3
    _check_budgets(facts, [0.3] * len(sources), ids.shape[1], model.config.num_key_value_heads, set(sources))


def test_a_chunk_after_compaction_attends_exactly(monkeypatch):
    """A multi-token chunk fed after a compressed prefill (a question after a context) with direct forwards:
    causal within the chunk, padding of the first forward still masked, evicted tokens masked."""
    model = _model(seed=2)
    plan = pyramid_plan(model, KEEP, window=WINDOW, sink=SINK, slack=SLACK)
    ids, mask = _left_padded(LENGTHS, seed=5)
    recorder = Recorder()
    recorder.install(monkeypatch)
    g = torch.Generator().manual_seed(3)
    chunks = [torch.randint(3, 128, (len(LENGTHS), q), generator=g) for q in (7, 1, 5, 1)]
    cache = transformers.DynamicCache(config=model.config)
    full_mask_2d = mask
    with runtime.apply_plan(model, plan), torch.inference_mode():
        model(ids, attention_mask=mask, use_cache=True, **{cache_argument(model): cache})
        for chunk in chunks:
            full_mask_2d = torch.cat([full_mask_2d, torch.ones_like(chunk)], dim=1)
            model(chunk, attention_mask=full_mask_2d, use_cache=True, **{cache_argument(model): cache})
    for layer in range(len(KEEP)):
        calls = recorder.steps(layer)
        assert [c["query"].shape[2] for c in calls] == [ids.shape[1], 7, 1, 5, 1]
        for step, call in enumerate(calls):
            keys, values = recorder.full_kv(call)
            real_q = _real_queries(call, full_mask_2d, keys.shape[2])
            real_keys = full_mask_2d[:, : keys.shape[2]].bool()
            diff = (call["out"] - _reference(call, keys, values, real_keys=real_keys)).abs()[real_q]
            assert float(diff.max()) <= ATOL, f"layer {layer} step {step}: {float(diff.max()):.3g}"
            if step > 0:
                holds = _held_mask(call["positions"], call["valid"], keys.shape[1], keys.shape[2])
                assert int(holds.sum()) < holds.numel(), "nothing evicted: the check would be vacuous"


# ----- KV-Compress: per-head budgets in ragged storage ------------------------------------------------------------

HEAD_SHARES = [[6.0, 1.0], [1.0, 3.0], [1.0, 1.0], [5.0, 2.0], [2.0, 7.0], [1.0, 4.0]]  # per layer, per KV head


def _head_keeps(keeps: list[float], shares) -> list[list[float]]:
    """The documented per-head fractions ``min(1, share * H_kv * keep)``."""
    out = []
    for keep, row in zip(keeps, shares):
        total = sum(row)
        out.append([min(1.0, s / total * len(row) * keep) for s in row])
    return out


def _check_head_budgets(facts: dict, head_keeps, width: int, n_kv: int, slack: int, owners=None) -> None:
    """Each (row, KV head) holds between its own budget and budget + slack (decode tokens wait in the tail), its
    sinks and its recent window included; heads of one layer hold different counts."""
    for layer, keeps in enumerate(head_keeps):
        if owners is not None and layer not in owners:
            continue
        for step, call in enumerate(facts[layer]["calls"][1:], start=1):
            total = width + step
            holds = _held_mask(call["positions"], call["valid"], n_kv, total)
            for row, n in enumerate(LENGTHS):
                real = n + step
                count = holds[row].sum(dim=-1)
                for head, keep in enumerate(keeps):
                    budget = _budget(keep, real)
                    assert budget <= int(count[head]) <= budget + slack, (
                        f"layer {layer} step {step} row {row} head {head}: holds {int(count[head])}, budget {budget}"
                    )
                first = width - n
                assert bool(holds[row, :, first : first + SINK].all()), f"layer {layer} row {row}: a sink was evicted"
                assert bool(holds[row, :, total - WINDOW :].all()), f"layer {layer} row {row}: recent window evicted"


@pytest.mark.parametrize("with_pyramid", [True, False], ids=["with_pyramidinfer", "kvcompress_alone"])
def test_ragged_heads_attend_exactly_what_they_hold(monkeypatch, with_pyramid):
    model = _model(seed=4)
    block, slack = 4, 3
    plan = kvcompress_plan(model, KEEP, HEAD_SHARES, window=WINDOW, sink=SINK, with_pyramid=with_pyramid,
                           block=block, slack=slack)
    ids, mask = _left_padded(LENGTHS, seed=9)
    recorder, full_mask_2d = _generate(model, plan, ids, mask, monkeypatch)
    facts = _check_calls(recorder, full_mask_2d, len(KEEP))
    ragged = [layer for layer, row in enumerate(HEAD_SHARES) if row[0] != row[1] or not with_pyramid]
    for layer in ragged:
        assert facts[layer]["evictions"] >= 2 * len(LENGTHS), f"layer {layer}: no eviction while decoding"
        assert facts[layer]["masked_effect"] > 1e-3
    head_keeps = _head_keeps(KEEP, HEAD_SHARES)
    if with_pyramid:  # the layer with equal shares is a PyramidInfer layer (checked by the pyramid tests)
        head_keeps = [k if layer in ragged else [1.0, 1.0] for layer, k in enumerate(head_keeps)]
    _check_head_budgets(facts, head_keeps, ids.shape[1], model.config.num_key_value_heads, slack,
                        owners=set(ragged))


def test_sharing_layers_attend_exactly_what_their_ragged_source_holds(monkeypatch):
    model = _model(seed=5)
    sources = [0, 1, 1, 3, 3, 3]
    plan = kvcompress_plan(model, 0.3, HEAD_SHARES, window=WINDOW, sink=SINK, block=4, slack=3)
    plan = dataclasses.replace(
        plan, methods=("pyramidinfer", "kvsharer", "kvcompress"),
        tensors={**plan.tensors, "kvsharer.share_source": torch.tensor(sources, dtype=torch.int32)},
    )
    ids, mask = _left_padded(LENGTHS, seed=13)
    recorder, full_mask_2d = _generate(model, plan, ids, mask, monkeypatch)
    facts = _check_calls(recorder, full_mask_2d, len(sources))
    for layer, source in enumerate(sources):
        calls = facts[layer]["calls"]
        assert all(c["shared"] == (source != layer) for c in calls)
        if source != layer:
            for mine, theirs in zip(calls, facts[source]["calls"]):
                assert torch.equal(mine["positions"], theirs["positions"])
        assert facts[layer]["evictions"] >= 2 * len(LENGTHS)
    head_keeps = _head_keeps([0.3] * len(sources), HEAD_SHARES)
    _check_head_budgets(facts, head_keeps, ids.shape[1], model.config.num_key_value_heads, 3, owners=set(sources))


def test_a_chunk_after_ragged_compaction_attends_exactly(monkeypatch):
    model = _model(seed=6)
    plan = kvcompress_plan(model, KEEP, HEAD_SHARES, window=WINDOW, sink=SINK, block=4, slack=3)
    ids, mask = _left_padded(LENGTHS, seed=5)
    recorder = Recorder()
    recorder.install(monkeypatch)
    g = torch.Generator().manual_seed(3)
    chunks = [torch.randint(3, 128, (len(LENGTHS), q), generator=g) for q in (7, 1, 5, 1)]
    cache = transformers.DynamicCache(config=model.config)
    full_mask_2d = mask
    with runtime.apply_plan(model, plan), torch.inference_mode():
        model(ids, attention_mask=mask, use_cache=True, **{cache_argument(model): cache})
        for chunk in chunks:
            full_mask_2d = torch.cat([full_mask_2d, torch.ones_like(chunk)], dim=1)
            model(chunk, attention_mask=full_mask_2d, use_cache=True, **{cache_argument(model): cache})
    for layer in range(len(KEEP)):
        for step, call in enumerate(recorder.steps(layer)):
            keys, values = recorder.full_kv(call)
            real_q = _real_queries(call, full_mask_2d, keys.shape[2])
            real_keys = full_mask_2d[:, : keys.shape[2]].bool()
            diff = (call["out"] - _reference(call, keys, values, real_keys=real_keys)).abs()[real_q]
            assert float(diff.max()) <= ATOL, f"layer {layer} step {step}: {float(diff.max()):.3g}"
