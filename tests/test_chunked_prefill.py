"""Chunked prefill under a plan (issue 14): a long prompt is fed in chunks and compressed between chunks.

Every method composes with it: budgets hold after every chunk, sharing layers read what their source holds, per-head
budgets and KCache stores grow chunk by chunk, rows of a left-padded batch equal their solo runs, the identity plan
stays stock generation, and transformers' own ``generate(..., prefill_chunk_size=N)`` works with every plan layer.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import requires_smollm2
from helpers import (
    assert_rows_equal_solo_runs,
    greedy,
    kvcompress_plan,
    pyramid_plan,
    random_ids,
    share_plan,
    tiny_gqa_model,
)

from transformers import DynamicCache

import runtime
from runtime.cache import cache_argument
from runtime.chunking import DEFAULT_PREFILL_CHUNK_SIZE, chunk_bounds, resolve_chunk_size
from runtime.kvcompress import RaggedLayer
from runtime.kvsharer import SharedLayer
from runtime.layers import PlanLayer
from runtime.plan import Plan, fingerprint_from_model
from runtime.pyramidinfer import BudgetedLayer

WINDOW, SINK, KEEP, CHUNK = 8, 2, 0.3, 48


def with_kcache(plan: Plan, topn: int) -> Plan:
    layers = plan.fingerprint["num_hidden_layers"]
    tensor = torch.full((layers,), topn, dtype=torch.int32)
    return dataclasses.replace(plan, methods=(*plan.methods, "kcache"), tensors={**plan.tensors, "kcache.topn": tensor})


def _plans(model) -> dict[str, Plan]:
    shares = [[0.8, 0.2]]
    return {
        "pyramidinfer": pyramid_plan(model, KEEP, window=WINDOW, sink=SINK),
        "pyramidinfer_per_kv_head_pool": pyramid_plan(model, KEEP, window=WINDOW, sink=SINK, pool=3, head_reduce="max"),
        "kvsharer": share_plan(model, [0, 0, 2, 2]),
        "kvsharer_pyramidinfer": share_plan(model, [0, 0, 2, 2], keep=KEEP, window=WINDOW, sink=SINK),
        "kvcompress": kvcompress_plan(model, KEEP, shares, window=WINDOW, sink=SINK, with_pyramid=False),
        "kvcompress_pyramidinfer": kvcompress_plan(model, KEEP, shares, window=WINDOW, sink=SINK),
        "kcache": with_kcache(Plan(fingerprint=fingerprint_from_model(model), methods=(), tensors={}), 4),
        "all": _all_plan(model),
    }


def _all_plan(model) -> Plan:
    """PyramidInfer + KVSharer + KV-Compress + KCache in one plan (as ``--methods all`` makes)."""
    base = kvcompress_plan(model, KEEP, [[0.8, 0.2]], window=WINDOW, sink=SINK)
    sources = torch.tensor([0, 0, 2, 2], dtype=torch.int32)
    plan = dataclasses.replace(base, methods=("pyramidinfer", "kvsharer", "kvcompress"),
                               tensors={**base.tensors, "kvsharer.share_source": sources})
    return with_kcache(plan, 4)


PLAN_NAMES = ["pyramidinfer", "pyramidinfer_per_kv_head_pool", "kvsharer", "kvsharer_pyramidinfer", "kvcompress",
              "kvcompress_pyramidinfer", "kcache", "all"]


@pytest.fixture(scope="module")
def model():
    return tiny_gqa_model(seed=3)


class ForwardLog:
    """Decoder pre-hook: the number of new tokens of every forward; post-hook: each plan layer's state after it."""

    def __init__(self, model):
        decoder = model.get_decoder()
        self.sizes: list[int] = []
        self.after: list[list] = []
        self._handles = [
            decoder.register_forward_pre_hook(self._pre, with_kwargs=True),
            decoder.register_forward_hook(self._post, with_kwargs=True),
        ]

    def _pre(self, module, args, kwargs):
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        self.sizes.append(tokens.shape[1])

    def _post(self, module, args, kwargs, output):
        cache = kwargs.get("kvplan_cache")
        self.after.append([] if cache is None else [_state(layer) for layer in cache.layers])

    def remove(self):
        for handle in self._handles:
            handle.remove()


def _state(layer) -> dict:
    state = {"type": type(layer).__name__, "seen": getattr(layer, "seen", None)}
    if isinstance(layer, PlanLayer) and not isinstance(layer, SharedLayer) and layer.holds_anything():
        state["kept"] = layer.kept_lengths().clone()
        state["width"] = layer.kept_length()
        state["store"] = [store.view().shape[-2] for store in layer.value_stores()]
        if isinstance(layer, BudgetedLayer):
            state["budget"] = layer.params.budget(layer.real_seen).clone()
            state["slack"] = layer.params.slack_for(state["budget"])
        if isinstance(layer, RaggedLayer):
            state["budget"] = layer.params.budget(layer.real_seen).clone()
    return state


def _generate(model, plan, ids, chunk, new_tokens=6, **kwargs):
    with runtime.apply_plan(model, plan, prefill_chunk_size=chunk):
        return greedy(model, ids, new_tokens, **kwargs)


# ----------------------------------------------------------------------------------------------- the chunking itself


def test_chunks_are_aligned_on_the_end_of_the_prompt():
    assert chunk_bounds(200, 64) == [(0, 8), (8, 72), (72, 136), (136, 200)]
    assert chunk_bounds(128, 64) == [(0, 64), (64, 128)]
    assert chunk_bounds(30, 64) == [(0, 30)]
    assert chunk_bounds(0, 64) == []


def test_chunk_size_argument(model):
    plan = pyramid_plan(model, KEEP)
    assert resolve_chunk_size("auto", plan) == DEFAULT_PREFILL_CHUNK_SIZE
    assert resolve_chunk_size("auto", Plan.noop(model)) is None  # the identity plan stays stock generation
    assert resolve_chunk_size(None, plan) is None and resolve_chunk_size(0, plan) is None
    assert resolve_chunk_size(96, plan) == 96
    for bad in (-1, 1.5, "512", True):
        with pytest.raises(ValueError, match="prefill_chunk_size"):
            runtime.apply_plan(model, plan, prefill_chunk_size=bad)
    assert runtime.remove_plan(model) is False  # a refused argument applies nothing


def test_generate_feeds_a_long_prompt_in_chunks_by_size(model):
    plan = pyramid_plan(model, KEEP, window=WINDOW, sink=SINK)
    ids = random_ids(1, 200, seed=1)
    log = ForwardLog(model)
    try:
        _generate(model, plan, ids, 64, new_tokens=3)
        assert log.sizes == [8, 64, 64, 64, 1, 1]
        log.sizes.clear()
        _generate(model, plan, ids, None, new_tokens=3)
        assert log.sizes == [200, 1, 1]
        log.sizes.clear()
        _generate(model, plan, random_ids(1, DEFAULT_PREFILL_CHUNK_SIZE), "auto", new_tokens=2)  # not above it
        assert log.sizes == [DEFAULT_PREFILL_CHUNK_SIZE, 1]
        log.sizes.clear()
        with runtime.apply_plan(model, plan, prefill_chunk_size=None) as applied:
            applied.prefill_chunk_size = 100  # may be changed while applied
            greedy(model, ids, 2)
        assert log.sizes == [100, 100, 1]
    finally:
        log.remove()


def test_a_forward_that_wants_every_logit_is_not_chunked(model):
    """``model(ids)`` (``logits_to_keep=0``) returns logits for every position: fed in one piece."""
    plan = pyramid_plan(model, KEEP, window=WINDOW, sink=SINK)
    ids = random_ids(1, 150, seed=2)
    log = ForwardLog(model)
    try:
        with runtime.apply_plan(model, plan, prefill_chunk_size=64), torch.no_grad():
            out = model(ids)
            assert out.logits.shape[1] == 150
            assert log.sizes == [150]
            out = model(ids, logits_to_keep=1)
            assert out.logits.shape[1] == 1
            assert log.sizes == [150, 22, 64, 64]
    finally:
        log.remove()


def test_identity_plan_with_chunking_is_token_identical_to_stock(model):
    ids = random_ids(2, 230, seed=4)
    stock = greedy(model, ids, 12)
    log = ForwardLog(model)
    try:
        out = _generate(model, Plan.noop(model), ids, 64, new_tokens=12)
    finally:
        log.remove()
    assert log.sizes[:4] == [38, 64, 64, 64]
    assert torch.equal(stock, out)


# ----------------------------------------------------------------------------------------------- every method


@pytest.mark.parametrize("name", PLAN_NAMES)
def test_budgets_hold_after_every_chunk(model, name):
    """After each chunk every owning layer holds its budget (per row and KV head) of what it has seen, never more
    than budget + slack, and its widest tensor is at most the budget + one chunk; KCache stores grow chunk by chunk."""
    plan = _plans(model)[name]
    ids = random_ids(1, 230, seed=5)
    log = ForwardLog(model)
    try:
        _generate(model, plan, ids, CHUNK, new_tokens=2)
    finally:
        log.remove()
    assert log.sizes == [38, 48, 48, 48, 48, 1]
    seen = 0
    for size, layers in zip(log.sizes[:5], log.after[:5]):
        seen += size
        for state in layers:
            if state["type"] == "SharedLayer" or "kept" not in state:
                continue
            assert state["seen"] in (None, seen)
            if "budget" in state:
                budget = state["budget"]
                kept = state["kept"]
                if budget.dim() < kept.dim() or budget.shape != kept.shape:
                    budget = budget.expand_as(kept)
                slack = state.get("slack", 0)
                assert bool((kept >= budget).all()), (state["type"], kept, budget)
                assert bool((kept <= budget + slack).all()), (state["type"], kept, budget)
                assert state["width"] <= int(budget.max()) + max(int(torch.as_tensor(slack).max()), 0) + CHUNK
                if name.startswith("kvcompress") or name == "all":
                    assert state["width"] <= int(budget.max())  # every head merged to its own budget
            else:  # KCache alone / a KVSharer source without budget: keeps everything it saw
                assert state["width"] == seen
            if name == "kcache":
                assert state["store"] == [seen]  # the value store grew by one chunk


def test_per_head_budgets_differ_and_hold_after_every_chunk(model):
    plan = _plans(model)["kvcompress"]
    ids = random_ids(1, 230, seed=6)
    log = ForwardLog(model)
    try:
        _generate(model, plan, ids, CHUNK, new_tokens=1)
    finally:
        log.remove()
    seen = 0
    for size, layers in zip(log.sizes, log.after):
        seen += size
        for state in layers:
            fractions = [min(1.0, share * 2 * KEEP) for share in (0.8, 0.2)]
            want = [min(seen, max(math.ceil(seen * f - 1e-6), min(seen, SINK + WINDOW))) for f in fractions]
            assert state["kept"][0].tolist() == want


def test_sharing_layers_read_what_their_source_holds_after_each_chunk(model, monkeypatch):
    """A reader attends, in each chunk, over exactly its source's slots: the source's compressed cache from the
    chunks before plus this chunk's tokens."""
    import runtime.attention as attention

    plan = _plans(model)["kvsharer_pyramidinfer"]
    seen_by: dict[int, list] = {0: [], 1: [], 2: [], 3: []}
    original = attention.kvplan_attention

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        cache = kwargs.get(attention.CACHE_KWARG)
        layer = cache.layers[module.layer_idx]
        owner = layer.source if isinstance(layer, SharedLayer) else layer
        held = owner.held()
        seen_by[module.layer_idx].append((held.positions.clone(), held.valid.clone(), query.shape[2]))
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    monkeypatch.setattr(attention, "kvplan_attention", spy)  # apply_plan registers the module's function
    _generate(model, plan, random_ids(1, 230, seed=7), CHUNK, new_tokens=2)
    attention.register_attention(attention.ATTN_NAME, original)
    for reader, source in ((1, 0), (3, 2)):
        assert len(seen_by[reader]) == len(seen_by[source]) == 6
        seen = 0
        for step, ((pos_r, valid_r, q_r), (pos_s, valid_s, _)) in enumerate(zip(seen_by[reader], seen_by[source])):
            assert torch.equal(pos_r, pos_s) and torch.equal(valid_r, valid_s)
            seen += q_r
            if step > 0:
                # before this chunk's tokens the source held its budget of the chunks before, not every token
                before = int(valid_s[..., : valid_s.shape[-1] - q_r].sum())
                keep = torch.tensor(KEEP, dtype=torch.float32).item()  # the plan stores float32 fractions
                assert before == min(seen - q_r, max(math.ceil(keep * (seen - q_r)), SINK + WINDOW))


@pytest.mark.parametrize("name", PLAN_NAMES)
def test_left_padded_rows_equal_their_solo_runs_with_chunking(model, name):
    """Chunks are cut from the end, so every row is chunked as in its solo run, even a row for which the first
    chunks are all padding."""
    plan = _plans(model)[name]
    with runtime.apply_plan(model, plan, prefill_chunk_size=CHUNK):
        assert_rows_equal_solo_runs(model, [200, 60, 131, 97], 6, seed=20)


@pytest.mark.parametrize("name", PLAN_NAMES)
def test_transformers_own_prefill_chunking_works_with_every_plan_layer(model, name):
    """``generate(..., prefill_chunk_size=N)`` (transformers' chunking, cut from the start) gives the runtime's
    chunked result when the prompt is a multiple of N (the two cut at the same places)."""
    plan = _plans(model)[name]
    ids = random_ids(2, 192, seed=8)
    ours = _generate(model, plan, ids, 64, new_tokens=8)
    log = ForwardLog(model)
    try:
        theirs = _generate(model, plan, ids, None, new_tokens=8, prefill_chunk_size=64)
    finally:
        log.remove()
    assert log.sizes[:3] == [64, 64, 64]
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("name", ["pyramidinfer", "kvcompress_pyramidinfer", "all"])
def test_chunking_changes_what_a_budgeted_plan_keeps(model, name):
    """Not a no-op: compressing after each chunk keeps other tokens than one compression after the whole prompt
    (the fidelity cost is measured on SmolLM2 by bench/chunked_prefill.py)."""
    plan = _plans(model)[name]
    ids = random_ids(1, 230, seed=9)
    kept = {}
    for chunk in (None, CHUNK):
        cache = DynamicCache(config=model.config)
        with runtime.apply_plan(model, plan, prefill_chunk_size=chunk), torch.no_grad():
            model(ids, use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})
        kept[chunk] = [layer.held().positions for layer in cache.layers
                       if isinstance(layer, (BudgetedLayer, RaggedLayer))]
    assert kept[None] and any(not torch.equal(a, b) for a, b in zip(kept[None], kept[CHUNK]))


# ----------------------------------------------------------------------------------------------- real SmolLM2


@requires_smollm2
@pytest.mark.smollm2
@pytest.mark.slow
def test_shipped_8x_plan_prefills_a_long_prompt_in_chunks_on_smollm2():
    """The shipped all-methods 8x plan on SmolLM2-135M: a ~1.6k-token prompt is fed in end-aligned chunks by plain
    ``generate``, every owning layer holds at most its budget + slack after each chunk, and the cache after the
    prefill is what the plan says it keeps."""
    from pathlib import Path

    from runtime.models import load_model, resolve_model_spec

    plan_path = Path(__file__).resolve().parent.parent / "artifacts" / "smollm2-135m-all-8x" / "plan.safetensors"
    if not plan_path.exists():
        pytest.skip("the shipped plan artifacts/smollm2-135m-all-8x is not in this checkout")
    loaded = load_model(resolve_model_spec("smollm2-135m"), progress=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    text = " ".join(f"Box {i} holds {i * 7 % 50} marbles and sits next to box {i + 1}." for i in range(1, 120))
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.shape[1] > 1200
    plan = runtime.load_plan(plan_path)
    log = ForwardLog(model)
    cache = DynamicCache(config=model.config)
    try:
        with runtime.apply_plan(model, plan, prefill_chunk_size=256):
            out = model.generate(ids, max_new_tokens=2, do_sample=False, **{cache_argument(model): cache})
    finally:
        log.remove()
    bounds = chunk_bounds(ids.shape[1], 256)
    assert log.sizes == [end - start for start, end in bounds] + [1]
    assert out.shape[1] == ids.shape[1] + 2
    for layers in log.after[: len(bounds)]:
        for state in layers:
            if "budget" in state:
                budget = state["budget"].expand_as(state["kept"]) if state["budget"].dim() < 2 else state["budget"]
                assert bool((state["kept"] <= budget + state.get("slack", 0)).all())
    seen = ids.shape[1] + 1
    theoretical = runtime.theoretical_bytes(plan, model.config, seen, 1, model.dtype)
    assert runtime.physical_bytes(cache) <= 1.05 * theoretical


@pytest.mark.parametrize("name", ["pyramidinfer_per_kv_head_pool", "kvsharer_pyramidinfer", "kvcompress", "all"])
def test_long_chunks_are_attended_block_by_block_with_the_same_result(model, monkeypatch, name):
    """A chunk whose logits over what a layer holds would exceed ``QUERY_BLOCK_BYTES`` is attended in blocks of
    queries (bounded transient memory); the tokens generated are the same as in one block, decode steps included."""
    import runtime.kvcompress as kvcompress
    import runtime.pyramidinfer as pyramidinfer

    plan = _plans(model)[name]
    ids = random_ids(2, 230, seed=12)
    whole = _generate(model, plan, ids, 96, new_tokens=6)
    calls = []
    monkeypatch.setattr(pyramidinfer, "QUERY_BLOCK_BYTES", 2**16)  # about ten queries per block here
    for module, fn in ((pyramidinfer, "_attend"), (kvcompress, "_ragged_attend")):
        original = getattr(module, fn)
        monkeypatch.setattr(module, fn, lambda *a, _original=original, **k: calls.append(a[0].shape[2]) or
                            _original(*a, **k))
    blocked = _generate(model, plan, ids, 96, new_tokens=6)
    assert torch.equal(whole, blocked)
    assert calls and max(calls) < 96 and any(1 < q for q in calls)


def test_cli_takes_a_prefill_chunk_size(capsys):
    from runtime.__main__ import build_parser

    parser = build_parser()
    assert parser.parse_args(["generate", "--plan", "p"]).prefill_chunk_size == "auto"
    assert parser.parse_args(["eval", "--plan", "p", "--prefill-chunk-size", "128"]).prefill_chunk_size == 128
    assert parser.parse_args(["generate", "--plan", "p", "--prefill-chunk-size", "0"]).prefill_chunk_size == 0
    for bad in ("-3", "big"):
        with pytest.raises(SystemExit):
            parser.parse_args(["eval", "--plan", "p", "--prefill-chunk-size", bad])
        assert "--prefill-chunk-size" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["pyramidinfer", "kvsharer_pyramidinfer", "kvcompress_pyramidinfer", "all"])
def test_every_chunk_attends_exactly_what_the_layer_holds(monkeypatch, name):
    """test_eviction's exactness check over a chunked prefill of a left-padded batch: at every chunk and decode
    step, each steered layer's output (real queries) equals stock SDPA over the full K/V masked to what it holds
    (with KCache, every chunk: a multi-token chunk reads every value row)."""
    from test_eviction import LENGTHS, Recorder, _held_mask, _left_padded, _real_queries, _reference

    model = tiny_gqa_model(seed=4, layers=4, heads=8)
    plan = _plans(model)[name]
    ids, mask = _left_padded(LENGTHS)
    recorder = Recorder()
    recorder.install(monkeypatch)
    with runtime.apply_plan(model, plan, prefill_chunk_size=128) as applied:
        applied.prefill_row_groups = False  # the batch in one forward per chunk (row groups: tests/test_row_groups.py)
        out = greedy(model, ids, 4, attention_mask=mask)
    full_mask_2d = torch.cat([mask, torch.ones(mask.shape[0], out.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    for layer in range(4):
        calls = recorder.steps(layer)
        assert [c["query"].shape[2] for c in calls] == [76, 128, 128, 128, 1, 1, 1]
        for step, call in enumerate(calls):
            if name == "all" and call["query"].shape[2] == 1:
                continue  # KCache: a decode step reads only the top-N value rows (an estimate by design)
            keys, values = recorder.full_kv(call)
            real_q = _real_queries(call, full_mask_2d, keys.shape[2])
            real_keys = full_mask_2d[:, : keys.shape[2]].bool()
            diff = (call["out"] - _reference(call, keys, values, real_keys=real_keys)).abs()[real_q]
            assert float(diff.max()) <= 1e-5, f"layer {layer} step {step}"
            if step > 0:  # from the second chunk on, the layer holds fewer tokens than it has seen
                holds = _held_mask(call["positions"], call["valid"], keys.shape[1], keys.shape[2])
                assert int(holds.sum(dim=-1).max()) < keys.shape[2]


# ----- the MLP in blocks of tokens ------------------------------------------------------------------------------------
def _mlp_calls(model, plan, ids, block_tokens) -> tuple[torch.Tensor, list[int]]:
    """Logits of a one-shot forward over ``ids`` under ``plan`` with ``mlp_block_tokens``, and the number of tokens
    (batch x length) of every call of the first layer's MLP (seen by its down projection)."""
    calls = []
    mlp = model.model.layers[0].mlp
    handle = mlp.down_proj.register_forward_pre_hook(
        lambda module, args: calls.append(args[0].shape[0] * args[0].shape[1]))
    try:
        with torch.inference_mode(), runtime.apply_plan(model, plan, prefill_chunk_size=None,
                                                        mlp_block_tokens=block_tokens):
            cache = DynamicCache(config=model.config)
            logits = model(ids, use_cache=True, **{cache_argument(model): cache}).logits
    finally:
        handle.remove()
    return logits, calls


@pytest.mark.parametrize("rows", [1, 3])
def test_the_mlp_runs_in_blocks_of_tokens_with_the_same_logits(model, rows):
    """A forward over more tokens than ``mlp_block_tokens`` computes every decoder layer's MLP block by block (its
    intermediate activations are one block's) and returns the logits of the one-piece MLP."""
    plan = _plans(model)["all"]
    ids = random_ids(rows, 70, seed=21)
    whole, whole_calls = _mlp_calls(model, plan, ids, None)
    blocked, calls = _mlp_calls(model, plan, ids, 32)
    assert whole_calls == [rows * 70]
    step = max(1, 32 // rows)  # positions of every row per block
    assert calls == [rows * min(step, 70 - start) for start in range(0, 70, step)]
    torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=1e-6)


def test_mlp_blocks_are_taken_off_with_the_plan_and_skip_noop_plans_and_autograd(model):
    mlps = [layer.mlp for layer in model.model.layers]
    plan = _plans(model)["pyramidinfer"]
    with runtime.apply_plan(model, plan, mlp_block_tokens=16) as applied:
        assert all("forward" in mlp.__dict__ for mlp in mlps)
        assert applied.mlp_block_tokens == 16
        ids = random_ids(1, 40, seed=2)
        calls = []
        handle = mlps[0].down_proj.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[1]))
        try:
            model(ids, use_cache=True)  # autograd on: one piece
            assert calls == [40]
        finally:
            handle.remove()
    assert not any("forward" in mlp.__dict__ for mlp in mlps)
    noop = Plan(fingerprint=fingerprint_from_model(model), methods=(), tensors={})
    with runtime.apply_plan(model, noop) as applied:
        assert applied.mlp_block_tokens is None
        assert not any("forward" in mlp.__dict__ for mlp in mlps)
    with runtime.apply_plan(model, plan) as applied:
        assert applied.mlp_block_tokens == runtime.chunking.DEFAULT_MLP_BLOCK_TOKENS


def test_resolve_block_tokens():
    from runtime.chunking import DEFAULT_MLP_BLOCK_TOKENS, resolve_block_tokens

    class _Plan:
        is_noop = False

    assert resolve_block_tokens("auto", _Plan()) == DEFAULT_MLP_BLOCK_TOKENS
    assert resolve_block_tokens(None, _Plan()) is None and resolve_block_tokens(0, _Plan()) is None
    assert resolve_block_tokens(64, _Plan()) == 64
    for bad in ("big", -1, 2.5, True):
        with pytest.raises(ValueError, match="mlp_block_tokens"):
            resolve_block_tokens(bad, _Plan())


@pytest.mark.parametrize("name,narrow", [("all", True), ("pyramidinfer", True), ("kcache", False), ("kvsharer", False)])
def test_the_mask_of_a_later_forward_covers_its_own_tokens_when_every_layer_allows(model, name, narrow):
    """Once compressed, a cache whose every layer reads only its forward's own mask columns (PyramidInfer, KV-Compress
    layers, and sharing layers reading them) reports mask sizes ``(new tokens, seen)``: transformers then builds a
    ``[B, 1, Q, Q]`` mask (or none) for a chunk instead of ``[B, 1, Q, seen + Q]``. A cache with a layer that holds
    every token (KCache alone, a KVSharer source without budget) keeps the full mask."""
    plan = _plans(model)[name]
    with torch.inference_mode(), runtime.apply_plan(model, plan, prefill_chunk_size=None):
        cache = DynamicCache(config=model.config)
        model(random_ids(1, 40, seed=5), use_cache=True, **{cache_argument(model): cache})
        import inspect

        params = inspect.signature(cache.layers[0].get_mask_sizes).parameters
        # transformers >= 5.3 passes the query length, older versions the cache positions
        sizes = cache.layers[0].get_mask_sizes(12 if "query_length" in params else torch.arange(40, 52))
    assert sizes == ((12, 40) if narrow else (52, 0))


def test_window_scores_of_a_large_batch_are_computed_row_by_row_with_the_same_result(monkeypatch):
    """PyramidInfer's and KV-Compress's prefill scores hold one row's window logits at a time once the batch's would
    exceed ``QUERY_BLOCK_BYTES``: bit-identical to the batched computation (rows are independent)."""
    import runtime.kvcompress as kvcompress
    import runtime.pyramidinfer as pyramidinfer

    torch.manual_seed(0)
    query, keys = torch.randn(4, 6, 50, 16), torch.randn(4, 2, 70, 16)
    valid = torch.rand(4, 70) > 0.2
    batched = [pyramidinfer.window_scores(query, keys, valid, 0.25, 8, 3, "max", True),
               kvcompress.kvc_scores(query, keys, valid, 0.25, 8, 3)]
    calls = []
    original = torch.matmul
    monkeypatch.setattr(pyramidinfer, "QUERY_BLOCK_BYTES", 16)
    monkeypatch.setattr(torch, "matmul", lambda a, b, _m=original: calls.append(a.shape[0]) or _m(a, b))
    rows = [pyramidinfer.window_scores(query, keys, valid, 0.25, 8, 3, "max", True),
            kvcompress.kvc_scores(query, keys, valid, 0.25, 8, 3)]
    assert calls and set(calls) == {1}  # every logits product over one row
    for got, expected in zip(rows, batched):
        assert torch.equal(got, expected)
