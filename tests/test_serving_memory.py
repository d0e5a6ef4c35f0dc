"""``bench/serving_memory.py``: the KV bytes serving-engine models would hold for a plan, against hand-computed numbers.

Tiny plans are built here from hand-written fingerprints (no model, no weights); one test reads a shipped KVSharer
plan under ``artifacts/``. Unless a test says otherwise: 4 layers, 2 KV heads, head_dim 16, float32, so one token of
one layer is ``2 (K, V) * 2 heads * 16 * 4 bytes = 256`` bytes; context 100 tokens, blocks of 16 tokens, so a full
layer holds ``ceil(100 / 16) = 7`` blocks in a paged engine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import error_line

import runtime
from runtime.plan import Plan

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench import serving_memory as sm  # noqa: E402

TOKEN_LAYER = 2 * 2 * 16 * 4  # bytes of one token in one layer
BLOCKS = 7  # ceil(100 / 16)


def _fingerprint(layers: int = 4, layer_types: list[str] | None = None, window: int | None = None) -> dict:
    return {
        "model_type": "llama", "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "hidden_size": 64, "vocab_size": 128, "layer_types": layer_types, "sliding_window": window,
        "name_or_path": "tiny", "revision": None,
    }


def _plan(methods: tuple[str, ...], tensors: dict, params: dict | None = None, **fingerprint) -> Plan:
    plan = Plan(fingerprint=_fingerprint(**fingerprint), methods=methods, params=params or {}, tensors=tensors)
    plan.check()
    return plan


def _sharing(sources: list[int]) -> Plan:
    return _plan(("kvsharer",), {"kvsharer.share_source": torch.tensor(sources, dtype=torch.int32)})


def _pyramid(keep: list[float], **fingerprint) -> Plan:
    return _plan(("pyramidinfer",), {"pyramidinfer.layer_keep": torch.tensor(keep)},
                 {"pyramidinfer": {"window": 8, "sink": 2}}, **fingerprint)


def _ratios(result: dict) -> dict[str, float]:
    return {name: engine["ratio"] for name, engine in result["engines"].items()}


def test_a_plan_sharing_two_of_four_layers_halves_every_engine():
    result = sm.measure(_sharing([0, 0, 2, 2]), context=100)
    assert result["shared_layers"] == 2
    assert _ratios(result) == pytest.approx({name: 0.5 for name in sm.ENGINES})
    sharing = result["engines"]["vllm-sharing"]
    assert sharing["stock"] == 4 * BLOCKS * 16 * TOKEN_LAYER  # 4 layers x 7 blocks of 16 tokens
    assert sharing["bytes"] == 2 * BLOCKS * 16 * TOKEN_LAYER
    assert sharing["groups"] == [{"window": None, "layers": [0, 2], "blocks": BLOCKS}]  # sharing layers: no spec
    assert result["engines"]["kvplan"]["stock"] == 4 * 100 * TOKEN_LAYER  # transformers holds exactly 100 tokens


def test_per_layer_budgets_round_up_to_blocks():
    # budgets at 100 tokens: 100, 50, 50, 25 (ceil(keep * 100), never under sink + window = 10)
    result = sm.measure(_pyramid([1.0, 0.5, 0.5, 0.25]), context=100)
    ratios = _ratios(result)
    assert ratios["kvplan"] == pytest.approx((100 + 50 + 50 + 25) / 400)
    # vLLM windows 50 and 25: the blocks covering tokens [50, 100) and [75, 100): 7 - 50 // 16 = 4, 7 - 75 // 16 = 3;
    # three distinct specs (full, 50, 25) and a bucket of one layer: one group per layer, one layer per block
    assert ratios["vllm-sharing"] == 1.0
    assert ratios["vllm-windows"] == pytest.approx((7 + 4 + 4 + 3) / 28)
    assert [g["window"] for g in result["engines"]["vllm-windows"]["groups"]] == [None, 50, 50, 25]
    # per head: ceil(100/16) + ceil(50/16) + ceil(50/16) + ceil(25/16) = 7 + 4 + 4 + 2 blocks, for each of 2 heads
    assert ratios["per-head-paged"] == pytest.approx((7 + 4 + 4 + 2) * 2 / (4 * 2 * 7))
    assert result["engines"]["per-head-paged"]["bytes"] == 17 * 2 * 16 * TOKEN_LAYER // 2


def test_block_size_one_gives_back_the_exact_token_counts():
    result = sm.measure(_pyramid([1.0, 0.5, 0.5, 0.25]), context=100, block=1)
    ratios = _ratios(result)
    assert ratios["vllm-windows"] == pytest.approx(ratios["kvplan"])
    assert ratios["per-head-paged"] == pytest.approx(ratios["kvplan"])


def test_kvcompress_heads_get_their_own_blocks_and_a_window_gets_their_mean():
    shares = torch.tensor([[0.75, 0.25]] * 4)  # f = 0.75 * 2 * 0.5 = 0.75 and 0.25 of the context
    plan = _plan(("kvcompress",), {"kvcompress.head_keep": shares, "kvcompress.layer_keep": torch.full((4,), 0.5)},
                 {"kvcompress": {"window": 8, "sink": 2}})
    result = sm.measure(plan, context=100)
    assert [row["head_tokens"] for row in result["layer_tokens"]] == [[75, 25]] * 4
    assert [row["tokens"] for row in result["layer_tokens"]] == [50.0] * 4
    ratios = _ratios(result)
    assert ratios["kvplan"] == pytest.approx(0.5)
    assert ratios["per-head-paged"] == pytest.approx((5 + 2) * 4 / (2 * 7 * 4))  # ceil(75/16) + ceil(25/16)
    # every layer: a window of 50 tokens, one spec, one group: 7 - 50 // 16 = 4 blocks of 4 layers
    assert result["engines"]["vllm-windows"]["groups"] == [{"window": 50, "layers": [0, 1, 2, 3], "blocks": 4}]
    assert ratios["vllm-windows"] == pytest.approx(4 / 7)


def test_kcache_values_count_as_moved_only_in_the_kvplan_row():
    plan = _plan(("kcache",), {"kcache.topn": torch.tensor([0, 4, 4, 4], dtype=torch.int32)})
    engines = sm.measure(plan, context=100)["engines"]
    kvplan = engines["kvplan"]
    assert kvplan["ratio"] == pytest.approx(5 / 8)  # 4 layers' keys + layer 0's values stay with the model
    assert kvplan["moved_ratio"] == pytest.approx(3 / 8)  # 3 layers' values moved, not removed
    assert kvplan["bytes"] + kvplan["moved"] == kvplan["stock"]
    for name in ("vllm-sharing", "vllm-windows", "per-head-paged"):
        assert engines[name]["ratio"] == 1.0 and engines[name]["moved"] == 0


def test_native_sliding_layers_stay_windows_in_the_stock_engine():
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    result = sm.measure(_pyramid([1.0, 0.5, 1.0, 0.5], layer_types=types, window=32), context=100)
    ratios = _ratios(result)
    assert ratios["kvplan"] == pytest.approx((32 + 50 + 32 + 50) / (32 + 100 + 32 + 100))
    windows = result["engines"]["vllm-windows"]
    # stock: window 32 holds 7 - 68 // 16 = 3 blocks, full 7; groups of 2 layers -> 2 * (3 + 7) layer-blocks
    assert windows["stock_groups"] == [{"window": 32, "layers": [0, 2], "blocks": 3},
                                       {"window": None, "layers": [1, 3], "blocks": 7}]
    assert windows["groups"] == [{"window": 32, "layers": [0, 2], "blocks": 3},
                                 {"window": 50, "layers": [1, 3], "blocks": 4}]
    assert ratios["vllm-windows"] == pytest.approx((3 + 4) / (3 + 7))
    assert ratios["per-head-paged"] == pytest.approx((2 + 4 + 2 + 4) / (2 + 7 + 2 + 7))


def test_sliding_blocks_free_the_blocks_wholly_before_the_window():
    assert sm.sliding_blocks(2048, 1024, 16) == 64  # exactly the window
    assert sm.sliding_blocks(100, 50, 16) == 4  # tokens [50, 100) span blocks 3..6
    assert sm.sliding_blocks(100, 100, 16) == sm.full_blocks(100, 16) == 7
    assert sm.sliding_blocks(10, 50, 16) == 1  # the window reaches past the start: nothing to free


def test_vllm_groups_split_buckets_to_equal_sizes_and_blocks_span_the_largest_group():
    # vLLM's own example: 13 full + 12 sliding layers -> group size 13 (13 < 1.5 * 12): one group each
    layers = [(i, None) for i in range(13)] + [(13 + i, 64) for i in range(12)]
    assert [len(g["layers"]) for g in sm.vllm_groups(layers)] == [13, 12]
    # 2 full + 3 windowed: size 2 (3 >= 1.5 * 2); the 3 split as every 2nd layer: [2, 4] and [3]
    layers = [(0, None), (1, None), (2, 40), (3, 40), (4, 40)]
    groups = sm.vllm_groups(layers)
    assert groups == [{"window": None, "layers": [0, 1]}, {"window": 40, "layers": [2, 4]},
                      {"window": 40, "layers": [3]}]
    counted = sm.vllm_layer_blocks(layers, context=100, block=16)
    assert counted["layers_per_block"] == 2
    assert counted["layer_blocks"] == 2 * (7 + 4 + 4)  # the one-layer group pays for a two-layer block


def test_shipped_sharing_plan_saves_what_its_map_says():
    path = REPO / "artifacts" / "smollm2-135m-kvsharer-dissimilar.safetensors"
    plan = runtime.load_plan(path)
    sources = plan.share_source.tolist()
    owners = sum(1 for layer, source in enumerate(sources) if source == layer)
    result = sm.measure(plan, context=2048)
    assert result["shared_layers"] == len(sources) - owners > 0
    for name in sm.ENGINES:
        assert result["engines"][name]["ratio"] == pytest.approx(owners / len(sources))


def test_default_plans_are_shipped():
    assert all((REPO / path).exists() for path in sm.DEFAULT_PLANS)


def test_cli_prints_one_table_per_context_and_writes_json(tmp_path, capsys):
    share = _sharing([0, 0, 2, 2]).save(tmp_path / "tiny-share.safetensors")
    pyramid = _pyramid([1.0, 0.5, 0.5, 0.25]).save(tmp_path / "tiny-pyramid.safetensors")
    out = tmp_path / "serving.json"
    argv = [str(share), str(pyramid), "--context", "100,2048", "--batch", "2", "--json", str(out)]
    assert sm.main(argv) == sm.EXIT_OK
    text = capsys.readouterr().out
    assert text.count("| share | S | 2/4 | 0.500 | 0.500 | 0.500 | 0.500 | 0.500 |") == 2  # the common prefix is cut
    assert "| pyramid | P | 0/4 | 0.562 | 0.562 | 1.000 | 0.643 | 0.607 | 0.20/0.22 |" in text  # 100 tokens
    assert "Context 100 tokens, batch 2, blocks of 16 tokens, K/V float32, plans tiny-*:" in text
    assert "Context 2048 tokens, batch 2" in text
    assert all(len(line) <= 120 for line in text.splitlines())
    rows = json.loads(out.read_text())["rows"]
    assert [(row["plan"], row["context"]) for row in rows] == [
        ("tiny-share", 100), ("tiny-pyramid", 100), ("tiny-share", 2048), ("tiny-pyramid", 2048)]
    assert rows[0]["engines"]["vllm-sharing"]["bytes"] == 2 * (2 * BLOCKS * 16 * TOKEN_LAYER)  # batch 2


@pytest.mark.parametrize("case", ["missing plan", "folder without a plan", "not a plan", "context 0", "batch 0",
                                  "block 0", "json folder missing"])
def test_bad_input_is_one_error_line_and_exit_2(case, tmp_path, capsys):
    plan_file = _sharing([0, 0, 2, 2]).save(tmp_path / "share.safetensors")
    text_file = tmp_path / "notes.safetensors"
    text_file.write_text("not a plan")
    (tmp_path / "empty").mkdir()
    argv = {
        "missing plan": [str(tmp_path / "no-such-plan.safetensors")],
        "folder without a plan": [str(tmp_path / "empty")],
        "not a plan": [str(text_file)],
        "context 0": [str(plan_file), "--context", "0"],
        "batch 0": [str(plan_file), "--batch", "0"],
        "block 0": [str(plan_file), "--block-size", "0"],
        "json folder missing": [str(plan_file), "--json", str(tmp_path / "no" / "x.json")],
    }[case]
    assert sm.main(argv) == sm.EXIT_USAGE
    line = error_line(capsys)
    assert "Traceback" not in line
    if case == "missing plan":
        assert "plan not found" in line and "no-such-plan" in line


def test_help_names_the_options_and_the_engine_models(capsys):
    with pytest.raises(SystemExit) as exit_:
        sm.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for word in ("--context", "--batch", "--block-size", "--dtype", "--json", *sm.ENGINES):
        assert word in text
