"""Calibration on models with sliding-window layers (Gemma 3): what ``--target-ratio`` counts, a target the sliding
layers alone exceed (refused before any pass), and KVSharer with fewer than two full-attention layers."""

from __future__ import annotations

import re

import pytest
import torch
import transformers
from conftest import tiny_config
from helpers import greedy
from test_data import make_tokenizer

import runtime
from calibrate import collect
from calibrate.__main__ import _summary_lines
from calibrate.pipeline import CalibrationError, calibrate_model
from calibrate.pyramidinfer import check_target_reachable, fixed_and_stock, full_attention_ratio
from calibrate.recipe import Recipe
from runtime.cache import cache_argument, layer_types

SEQ = 128
WINDOW = 16  # conftest's tiny Gemma 3: layers 0-4 slide over 16 tokens, layer 5 attends to everything


pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def gemma(tokenizer):
    config = tiny_config("gemma3")
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    assert layer_types(model.config) == ["sliding_attention"] * 5 + ["full_attention"]
    return model


def _recipe(methods, target) -> Recipe:
    return Recipe(model="org/name", num_calibration_samples=2, max_seq_length=SEQ, methods=methods,
                  target_ratio=target)


def test_gemma_3_270m_arithmetic():
    """Gemma-3-270M's shape (15 sliding layers, window 512, 3 full) at the recipe's 2048 tokens: the sliding layers
    hold 5/9 of the stock cache, so 0.5 is out of reach; half / a quarter of the full layers is 0.7778 / 0.6667."""
    kinds = (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert fixed_and_stock(kinds, 2048, 512) == (15 * 512, 15 * 512 + 3 * 2048)
    with pytest.raises(ValueError) as refused:
        check_target_reachable(kinds, 0.5, 2048, 512)
    message = str(refused.value)
    for part in ("15 sliding-window layers (window 512)", "0.5556 of the stock cache", "2048 tokens",
                 "3 full-attention layers", "r = 1/2: 0.7778", "r = 1/4: 0.6667"):
        assert part in message, (part, message)
    check_target_reachable(kinds, 0.5556, 2048, 512)  # just above the sliding layers' share: reachable
    assert full_attention_ratio(7 / 9, kinds, 2048, 512) == pytest.approx(0.5)
    assert full_attention_ratio(2 / 3, kinds, 2048, 512) == pytest.approx(0.25)
    assert full_attention_ratio(0.5, ["full_attention"] * 4, 2048, None) is None  # no sliding layers: same number
    check_target_reachable(["full_attention"] * 4, 0.01, 2048, None)
    # shorter than the window: the sliding layers hold every token, their share is their count
    assert fixed_and_stock(kinds, 256, 512) == (15 * 256, 18 * 256)


@pytest.mark.parametrize("methods", [["pyramidinfer"], ["kvcompress"], ["kvsharer", "pyramidinfer"]])
def test_a_target_the_sliding_layers_exceed_fails_before_any_pass(methods, gemma, tokenizer, monkeypatch):
    def no_pass(*args, **kwargs):
        raise AssertionError("a calibration pass ran before the target was checked")

    monkeypatch.setattr(collect, "run_calibration_pass", no_pass)
    fixed = 5 * WINDOW / (5 * WINDOW + SEQ)  # 80 of 208 tokens per KV head
    with pytest.raises(CalibrationError, match=rf"target ratio 0.3 cannot be reached.*alone hold {fixed:.4f}"):
        calibrate_model(gemma, tokenizer, _recipe(methods, 0.3), progress=False)


def test_one_full_attention_layer_shares_nothing_and_says_so(gemma, tokenizer, caplog):
    fixed = 5 * WINDOW / (5 * WINDOW + SEQ)
    target = fixed + (1 - fixed) / 2  # half of the full-attention layer's bytes
    with caplog.at_level("WARNING"):
        result = calibrate_model(gemma, tokenizer, _recipe(["kvsharer", "pyramidinfer"], target), progress=False)
    assert "1 full-attention layer and KVSharer needs two" in caplog.text
    plan = result.plan
    assert plan.methods == ("pyramidinfer", "kvsharer")
    assert plan.tensors["kvsharer.share_source"].tolist() == list(range(6))
    assert plan.provenance["kvsharer_search"]["skipped"]
    keep = plan.tensors["pyramidinfer.layer_keep"].tolist()
    assert keep[:5] == [1.0] * 5 and keep[5] == pytest.approx(0.5, abs=1 / 256)  # sliding layers: not budgeted
    report = result.report["pyramidinfer"]
    assert report["achieved_ratio_at_calibration_length"] == pytest.approx(target, abs=0.005)
    assert report["full_attention_ratio_at_calibration_length"] == pytest.approx(0.5, abs=0.005)
    lines = "\n".join(_summary_lines(plan, result))
    assert "kvsharer: no layer shared: this model has 1 full-attention layer" in lines
    assert "of every layer's KV bytes (0.50" in lines and "of the full-attention layers')" in lines
    ids = torch.randint(3, len(tokenizer), (1, 60), generator=torch.Generator().manual_seed(0))
    cache = transformers.DynamicCache(config=gemma.config)
    with runtime.apply_plan(gemma, plan):
        greedy(gemma, ids, 8, **{cache_argument(gemma): cache})
    assert runtime.kept_lengths(cache)[5] < 67  # the full-attention layer holds about half of what it saw


def test_kvsharer_alone_without_two_full_attention_layers_is_refused(gemma, tokenizer):
    with pytest.raises(CalibrationError, match="needs two.*nothing to calibrate; leave kvsharer out"):
        calibrate_model(gemma, tokenizer, _recipe(["kvsharer"], 0.5), progress=False)


def test_eval_reports_the_full_attention_layers_bytes_apart(gemma, tokenizer, tmp_path):
    """On a model with sliding-window layers, ``runtime eval``'s lm rows also give the full-attention layers'
    physical bytes over their stock bytes (the part a plan compresses); a model without them has no such key."""
    from helpers import pyramid_plan
    from test_data import CORPUS

    from runtime.evaluation import EvalSettings, evaluate, full_cache, plan_method, render

    (tmp_path / "a.txt").write_text(" ".join(CORPUS * 6))
    plan = pyramid_plan(gemma, 0.25, window=8, sink=2)
    settings = EvalSettings(tasks=("lm",), contexts=[96], docs=2, continuation=4, batch_size=2)
    report = evaluate(gemma, tokenizer, [full_cache(), plan_method(plan, name="p")], str(tmp_path), settings)
    rows = {r["method"]: r for r in report["rows"]}
    seen, per_token = 96 + 4 - 1, 2 * gemma.config.num_key_value_heads * gemma.config.head_dim * 4
    for name, row in rows.items():
        assert row["full_attention_stock_bytes"] == 2 * seen * per_token  # 1 full-attention layer, 2 rows
        assert row["physical_bytes"] > row["full_attention_physical_bytes"] > 0
    assert rows["full"]["full_attention_physical_over_stock"] == 1.0
    assert 0.2 < rows["p"]["full_attention_physical_over_stock"] < 0.4  # a quarter, plus bookkeeping and slack
    assert rows["p"]["physical_over_stock"] > 0.5  # over every layer: the sliding windows are held whole
    assert re.search(r"\| lm \| 96 \| p \|.*full-attention layers phys/stock 0\.[23]\d\d", render(report))
    llama = tiny_config("llama")
    assert runtime.cache.full_attention_bytes(transformers.DynamicCache(config=llama), llama) is None
