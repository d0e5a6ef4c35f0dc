"""CUDA smoke test: calibrate on the GPU, a no-op plan is token-identical there, a budgeted cache holds less on it.

Skipped without CUDA. ``KVPLAN_TEST_DEVICE`` (default ``cuda``) picks another device, e.g. ``cuda:1``, or ``cpu`` to
check the test itself on a machine without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from helpers import greedy
from make_tiny_model import make_tokenizer

import runtime
from calibrate.pipeline import calibrate_model
from calibrate.pyramidinfer import GRID
from calibrate.recipe import Recipe
from runtime.plan import Plan
from runtime.pyramidinfer import BudgetedLayer

DEVICE = os.environ.get("KVPLAN_TEST_DEVICE", "cuda")
KIND = torch.device(DEVICE).type

pytestmark = [
    pytest.mark.usefixtures("isolated_cache"),
    pytest.mark.gpu,
    pytest.mark.skipif(KIND == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(DEVICE).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def calibrated(model, tokenizer) -> Plan:
    recipe = Recipe(model="tiny-llama", device=DEVICE).with_overrides(
        methods=["pyramidinfer"], target_ratio=0.5, num_calibration_samples=2, max_seq_length=256
    )
    return calibrate_model(model, tokenizer, recipe, progress=False).plan


def _prompt(length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (1, length), generator=g).to(DEVICE)


def _on_device(tensor: torch.Tensor) -> bool:
    return tensor.device.type == KIND


def test_pyramidinfer_calibrates_on_the_device(model, calibrated):
    assert _on_device(next(model.parameters()))
    assert calibrated.methods == ("pyramidinfer",)
    keep = calibrated.tensors["pyramidinfer.layer_keep"]
    assert keep.shape == (4,) and float(keep.min()) > 0 and float(keep.max()) <= 1
    assert abs(float(keep.mean()) - 0.5) <= 1.0 / GRID
    calibrated.validate(model)


def test_noop_plan_is_token_identical_to_stock_on_the_device(model):
    ids = _prompt(64)
    stock = greedy(model, ids, 24)
    with runtime.apply_plan(model, Plan.noop(model)):
        out = greedy(model, ids, 24)
    assert _on_device(out) and out.shape == (1, 88)
    assert torch.equal(stock, out)


def test_budgeted_cache_holds_fewer_bytes_on_the_device(model, calibrated):
    prompt, new = 300, 16
    cache = transformers.DynamicCache(config=model.config)
    with runtime.apply_plan(model, calibrated):
        out = greedy(model, _prompt(prompt), new, past_key_values=cache)
    assert out.shape == (1, prompt + new) and _on_device(out)
    seen = prompt + new - 1  # the last generated token is never fed back
    by_device = runtime.physical_bytes(cache, by_device=True)
    assert by_device, "the cache holds nothing"
    assert all(torch.device(name).type == KIND for name in by_device), by_device
    held = sum(by_device.values())
    stock = runtime.stock_bytes(model.config, seen)
    theoretical = runtime.theoretical_bytes(calibrated, model.config, seen)
    assert held < stock
    assert held <= theoretical * 1.25  # K/V plus a position and a score per held token (tiny head_dim)
    budgeted = [layer for layer in cache.layers if isinstance(layer, BudgetedLayer)]
    assert budgeted, "no layer got a budgeted cache"
    for layer in cache.layers:
        assert _on_device(layer.keys) and _on_device(layer.values)
    assert any(layer.kept_length() < seen for layer in budgeted)


@pytest.mark.parametrize("base", ["alone", "pyramidinfer", "kvcompress"])
def test_kcache_values_live_in_pinned_host_memory_and_keys_on_the_device(model, base):
    """KCache on the device: keys stay with the model, values move to the CPU store (pinned where the model runs on
    CUDA); top-N of the whole context is token-identical to the plan without KCache."""
    import dataclasses

    from helpers import kvcompress_plan, pyramid_plan

    from runtime.plan import fingerprint_from_model

    layers = model.config.num_hidden_layers
    plain = {
        "alone": lambda: Plan(fingerprint=fingerprint_from_model(model), methods=(), tensors={}),
        "pyramidinfer": lambda: pyramid_plan(model, 0.5),
        "kvcompress": lambda: kvcompress_plan(model, 0.5, [[3.0, 1.0]], block=4, slack=3),
    }[base]()

    def with_topn(n):
        topn = torch.full((layers,), n, dtype=torch.int32)
        return dataclasses.replace(plain, methods=(*plain.methods, "kcache"),
                                   tensors={**plain.tensors, "kcache.topn": topn})

    ids = _prompt(200)
    with runtime.apply_plan(model, plain):
        reference = greedy(model, ids, 16)
    with runtime.apply_plan(model, with_topn(4096)):
        assert torch.equal(greedy(model, ids, 16), reference)
    cache = transformers.DynamicCache(config=model.config)
    with runtime.apply_plan(model, with_topn(16)):
        out = greedy(model, ids, 16, past_key_values=cache)
    assert _on_device(out)
    stores = [store for layer in cache.layers for store in layer.value_stores()]
    assert len(stores) == layers
    for layer in cache.layers:
        assert _on_device(layer.held().keys)
        for store in layer.value_stores():
            assert store.buffer.device.type == "cpu"
            assert store.buffer.is_pinned() == (KIND == "cuda")
            assert store.last_read < store.last_held
    assert 0 < runtime.store_bytes(cache) < runtime.physical_bytes(cache)
