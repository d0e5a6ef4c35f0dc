"""Runtime invariants on tiny random-weight models: identity when off, batch == solo, physical memory cut."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import tiny_model
from helpers import greedy, pyramid_plan

import runtime
from runtime.cache import cache_argument
from runtime.plan import Plan, PlanError, fingerprint_from_model
from runtime.pyramidinfer import BudgetedLayer

ARCHS = ["llama", "qwen2", "mistral", "gemma3"]


def _prompt(length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (1, length), generator=g)


def _left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(p.shape[1] for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - p.shape[1] :] = p[0]
        mask[row, width - p.shape[1] :] = 1
    return ids, mask


def _assert_rows_equal_solo(batch, width, prompts, solos):
    for row, solo in enumerate(solos):
        assert torch.equal(batch[row, width:], solo[0, prompts[row].shape[1] :]), f"row {row} differs from its solo run"


@pytest.mark.parametrize("arch", ARCHS)
def test_noop_plan_is_token_identical_to_stock(arch):
    model = tiny_model(arch)
    ids = _prompt(40)
    stock = greedy(model, ids, 24)
    with runtime.apply_plan(model, Plan.noop(model)):
        out = greedy(model, ids, 24)
        assert model.config._attn_implementation == "kvplan"
    assert torch.equal(stock, out)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("compress", [False, True], ids=["noop", "pyramid"])
def test_left_padded_batch_rows_equal_solo_runs(arch, compress):
    model = tiny_model(arch)
    plan = pyramid_plan(model, [1.0, 0.5, 0.4, 0.3, 0.5, 0.3][: model.config.num_hidden_layers]) if compress else Plan.noop(model)
    prompts = [_prompt(48, 1), _prompt(29, 2), _prompt(37, 3)]
    ids, mask = _left_padded(prompts)
    with runtime.apply_plan(model, plan):
        batch = greedy(model, ids, 30, attention_mask=mask)
        solos = [greedy(model, p, 30) for p in prompts]
    _assert_rows_equal_solo(batch, ids.shape[1], prompts, solos)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{"pool": 5}, {"head_reduce": "max"}, {"pool": 3, "head_reduce": "max"}])
def test_scoring_options_keep_batch_rows_equal_to_solo_runs(extra):
    model = tiny_model("qwen2")
    plan = pyramid_plan(model, [1.0, 0.5, 0.4, 0.3], **extra)
    prompts = [_prompt(45, 4), _prompt(26, 5)]
    ids, mask = _left_padded(prompts)
    with runtime.apply_plan(model, plan):
        batch = greedy(model, ids, 24, attention_mask=mask)
        solos = [greedy(model, p, 24) for p in prompts]
    _assert_rows_equal_solo(batch, ids.shape[1], prompts, solos)


def test_bad_scoring_options_are_refused_at_load(tmp_path, llama):
    for bad in ({"pool": 0}, {"head_reduce": "median"}, {"pool": "3"}):
        plan = pyramid_plan(llama, 0.5, **bad)
        with pytest.raises(PlanError):
            plan.save(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_pyramid_plan_physically_frees_memory(arch):
    model = tiny_model(arch)
    plan = pyramid_plan(model, 0.25)
    ids = torch.cat([_prompt(200, s) for s in range(4)])
    cache = transformers.DynamicCache(config=model.config)
    with runtime.apply_plan(model, plan):
        greedy(model, ids, 40, past_key_values=cache)
    seen = 239  # 200 prompt tokens + 39 fed back (the 40th generated token is never fed)
    physical = runtime.physical_bytes(cache)
    theoretical = runtime.theoretical_bytes(plan, model.config, seen, batch_size=4)
    stock = runtime.stock_bytes(model.config, seen, batch_size=4)
    assert physical < 0.5 * stock
    # the only overhead over theory: an int32 position + a float32 score per held token, the decode slack
    # (at most `slack` tokens above budget), and one int64 counter per row
    budgeted = [l for l in cache.layers if isinstance(l, BudgetedLayer)]
    allowed_tokens = 0
    for layer in budgeted:
        budget = int(layer.params.budget(torch.tensor([seen]))[0])
        assert layer.kept_length() <= budget + layer.params.slack_for(budget)
        allowed_tokens += budget + layer.params.slack_for(budget)
    head_bytes = 2 * model.config.num_key_value_heads * model.config.head_dim * 4
    other = physical - sum(l.physical_bytes() for l in budgeted)
    assert sum(l.physical_bytes() for l in budgeted) <= 4 * allowed_tokens * (head_bytes + 8) + 4 * 8 * len(budgeted)
    assert other == sum(
        t.numel() * t.element_size() for l in cache.layers if not isinstance(l, BudgetedLayer) for t in (l.keys, l.values)
    )
    assert physical <= theoretical * 1.25  # tiny head_dim: 8 bytes of bookkeeping weigh 3% here, 0.5% on SmolLM2
    kinds = runtime.cache.layer_types(model.config)
    for layer, kind in zip(cache.layers, kinds):
        if kind == "full_attention":
            assert isinstance(layer, BudgetedLayer)
            assert layer.get_seq_length() == seen  # positions keep counting every token seen
            assert layer.kept_length() < seen
        else:
            assert not isinstance(layer, BudgetedLayer)


@pytest.mark.slow
def test_budget_follows_the_sequence_while_decoding(llama):
    """Long generation (far past the prompt) keeps each layer near its budget of the *current* length."""
    plan = pyramid_plan(llama, 0.3, window=8, sink=2)
    cache = transformers.DynamicCache(config=llama.config)
    with runtime.apply_plan(llama, plan):
        greedy(llama, _prompt(32), 300, past_key_values=cache)
    seen = 331
    for layer in cache.layers:
        budget = int(layer.params.budget(torch.tensor([seen]))[0])
        assert budget <= layer.kept_length() <= budget + layer.params.slack_for(budget)
        # sinks are never evicted: the first two positions are still held
        assert layer.positions[0, 0, :2].tolist() == [0, 1]


def test_short_and_bos_only_prompts_match_stock_while_nothing_is_evicted(llama):
    plan = pyramid_plan(llama, 0.5, window=8, sink=2)  # keeps everything up to sink + window = 10 tokens
    for ids in (_prompt(4), torch.tensor([[1]])):
        stock = greedy(llama, ids, 10 - ids.shape[1])
        with runtime.apply_plan(llama, plan):
            out = greedy(llama, ids, 10 - ids.shape[1])
        assert torch.equal(stock, out)


def test_zero_token_prompt_gets_a_clear_error(llama):
    # a forward over 0 tokens (transformers 5.2's generate already fails before the model runs; newer ones reach it)
    with runtime.apply_plan(llama, pyramid_plan(llama, 0.5)):
        with pytest.raises(ValueError, match="0 tokens"):
            llama(torch.zeros(1, 0, dtype=torch.long), use_cache=True)


def test_direct_forward_with_use_cache_gets_a_plan_cache(llama):
    plan = pyramid_plan(llama, 0.25)
    with runtime.apply_plan(llama, plan):
        out = llama(_prompt(64), use_cache=True)
    cache = out.past_key_values
    assert all(isinstance(layer, BudgetedLayer) for layer in cache.layers)
    assert cache.layers[1].kept_length() < 64


def test_plan_for_another_model_is_refused(llama):
    other = tiny_model("qwen2")
    sizes = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size", "vocab_size")
    # same sizes, other architecture: the architecture alone makes the plan refused
    mine, theirs = fingerprint_from_model(llama), fingerprint_from_model(other)
    assert [theirs[k] for k in sizes] == [mine[k] for k in sizes] and theirs["model_type"] != mine["model_type"]
    plan = pyramid_plan(other, 0.5)
    with pytest.raises(PlanError, match="model_type") as refused:
        runtime.apply_plan(llama, plan)
    assert not any(k in str(refused.value) for k in sizes), f"only model_type differs: {refused.value}"
    assert llama.config._attn_implementation == "sdpa"  # nothing half-applied (the apply below would say so too)
    gemma = tiny_model("gemma3")  # 6 layers
    with pytest.raises(PlanError, match="num_hidden_layers"):
        runtime.apply_plan(llama, pyramid_plan(gemma, 0.5))
    with runtime.apply_plan(llama, pyramid_plan(llama, 0.5)):  # the same plan made for llama itself applies
        assert llama.config._attn_implementation == "kvplan"


def test_apply_remove_and_double_apply(llama):
    plan = pyramid_plan(llama, 0.5)
    handle = runtime.apply_plan(llama, plan)
    with pytest.raises(PlanError, match="already applied"):
        runtime.apply_plan(llama, plan)
    assert runtime.remove_plan(llama) is True
    assert not handle.active
    assert runtime.remove_plan(llama) is False
    assert llama.config._attn_implementation == "sdpa"
    out = llama(_prompt(20), use_cache=True)
    assert not any(isinstance(layer, BudgetedLayer) for layer in out.past_key_values.layers)


def test_plan_loaded_from_file_applies(tmp_path, llama):
    """A plan read back from its file runs exactly like the plan object it was saved from, and compresses."""
    path = tmp_path / "plan.safetensors"
    plan = pyramid_plan(llama, [0.6, 0.4, 0.3, 0.25])
    plan.save(path)
    ids = torch.cat([_prompt(96, 1), _prompt(96, 2)])
    stock_cache = transformers.DynamicCache(config=llama.config)
    stock = greedy(llama, ids, 12, **{cache_argument(llama): stock_cache})
    direct_cache = transformers.DynamicCache(config=llama.config)
    with runtime.apply_plan(llama, plan):
        direct = greedy(llama, ids, 12, **{cache_argument(llama): direct_cache})
    file_cache = transformers.DynamicCache(config=llama.config)
    with runtime.apply_plan(llama, str(path)) as applied:
        assert applied.plan == plan  # every field and tensor survived the round trip
        from_file = greedy(llama, ids, 12, **{cache_argument(llama): file_cache})
    assert from_file.shape == stock.shape == (2, 108)
    assert torch.equal(from_file, direct)
    assert runtime.kept_lengths(file_cache) == runtime.kept_lengths(direct_cache)
    physical = runtime.physical_bytes(file_cache)
    assert physical == runtime.physical_bytes(direct_cache)
    # ... and the plan really applied: the cache physically holds far less than the stock run's cache
    assert physical < 0.6 * runtime.physical_bytes(stock_cache)
    assert runtime.physical_bytes(stock_cache) == runtime.stock_bytes(llama.config, 107, batch_size=2)


def test_bfloat16_model_runs_and_accounts_its_bytes():
    model = tiny_model("llama").to(torch.bfloat16)
    plan = pyramid_plan(model, 0.3)
    cache = transformers.DynamicCache(config=model.config)
    with runtime.apply_plan(model, plan):
        out = greedy(model, _prompt(120), 8, past_key_values=cache)
    assert out.shape == (1, 128)
    layer = cache.layers[1]
    assert layer.keys.dtype == torch.bfloat16 and layer.scores.dtype == torch.float32
    seen = 127
    assert runtime.physical_bytes(cache) < runtime.stock_bytes(model.config, seen, dtype=torch.bfloat16)
