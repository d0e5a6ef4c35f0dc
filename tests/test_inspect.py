"""``python -m runtime inspect``: what a plan holds, read from the plan alone. Tiny plans built here, no downloads."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import tiny_config
from helpers import error_line, kvcompress_plan, pyramid_plan, share_plan

import runtime
from runtime.__main__ import EXIT_OK, EXIT_USAGE
from runtime.__main__ import main as runtime_main
from runtime.inspect import describe, draw, render_text
from runtime.plan import Plan, fingerprint_from_model

# the conftest llama: 4 layers, 2 KV heads, head_dim 16, float32 weights -> one token's K+V = 2 * 2 * 16 * 4 bytes
PER_TOKEN = 2 * 2 * 16 * 4


def _kcache_plan(model, topn, keep=None) -> Plan:
    """KCache (top-N per layer), alone or with PyramidInfer at ``keep`` (window 8, sink 2)."""
    tensors = {"kcache.topn": torch.tensor(topn, dtype=torch.int32)}
    methods, params = ("kcache",), {}
    if keep is not None:
        methods = ("pyramidinfer", "kcache")
        tensors["pyramidinfer.layer_keep"] = torch.tensor(keep, dtype=torch.float32)
        params["pyramidinfer"] = {"window": 8, "sink": 2}
    return Plan(fingerprint=fingerprint_from_model(model), methods=methods, params=params, tensors=tensors)


def _table(text: str) -> list[list[str]]:
    """The per-layer table's rows (header first), split on whitespace."""
    lines = text.splitlines()
    start = lines.index("per layer:") + 1
    rows = []
    for line in lines[start:]:
        if not line.strip() or not (line.strip()[0].isdigit() or line.strip().startswith("layer")):
            break
        rows.append(line.split())
    return rows


# --------------------------------------------------------------------------------------------------
# describe / render_text: every method's columns


def test_pyramidinfer_plan_bytes_equal_a_hand_computation_and_the_runtime(llama):
    plan = pyramid_plan(llama, [1.0, 0.5, 0.25, 0.05], window=8, sink=2)
    d = describe(plan, context=100, batch=3)
    # tokens per (row, KV head): min(seen, max(ceil(keep * seen), sink + window)); keep 1 keeps all
    held = [100, 50, 25, 10]
    assert [row["tokens"] for row in d["layers"]] == held
    assert [row["kept_fraction"] for row in d["layers"]] == pytest.approx([1.0, 0.5, 0.25, 0.05])
    kv = d["kv_bytes"]
    assert kv["dtype"] == "float32" and d["model"]["dtype_source"] == "the weights digest"
    assert kv["stock"] == 4 * 100 * PER_TOKEN * 3
    assert kv["theoretical"] == sum(held) * PER_TOKEN * 3 == kv["with_model"]
    assert kv["value_store"] == 0
    assert kv["theoretical"] == runtime.theoretical_bytes(plan, llama.config, 100, 3, torch.float32)
    assert kv["stock"] == runtime.stock_bytes(llama.config, 100, 3, torch.float32)

    text = render_text(d)
    header, *rows = _table(text)
    assert header == ["layer", "kind", "kept", "tokens@100"]  # no column of a method the plan lacks
    assert rows[3] == ["3", "full", "0.050", "10"]
    assert "sharing (KVSharer):\n  not in this plan" in text
    assert "pyramidinfer: sink=2, window=8; defaults head_reduce=mean, pool=1, slack=unset" in text
    assert "value store" not in text
    assert f"{sum(held) * PER_TOKEN * 3:,d} B" in text


def test_kcache_moves_values_to_the_store_and_counts_them_apart(llama):
    plan = _kcache_plan(llama, [0, 8, 16, 4], keep=[1.0, 0.5, 0.25, 0.25])
    d = describe(plan, context=100, batch=2)
    held = [100, 50, 25, 25]
    kv = d["kv_bytes"]
    value_bytes = PER_TOKEN // 2  # 2 KV heads * 16 * 4 bytes of values per token
    assert kv["theoretical"] == sum(held) * PER_TOKEN * 2
    assert kv["value_store"] == (50 + 25 + 25) * value_bytes * 2  # layer 0 (top-N 0) keeps its values
    assert kv["with_model"] == kv["theoretical"] - kv["value_store"]
    assert kv["theoretical"] == runtime.theoretical_bytes(plan, llama.config, 100, 2, torch.float32)
    assert [row["value_store"] for row in d["layers"]] == [False, True, True, True]

    text = render_text(d)
    header, *rows = _table(text)
    assert header[-2:] == ["top-N", "values"]
    assert rows[0][-2:] == ["all", "model"] and rows[2][-2:] == ["16", "store"]
    assert "plan, in the value store" in text and "not removed" in text
    assert f"{kv['value_store']:,d} B" in text and f"{kv['with_model']:,d} B" in text


def test_kcache_alone_removes_nothing(llama):
    d = describe(_kcache_plan(llama, [0, 8, 0, 8]), context=64, batch=1)
    kv = d["kv_bytes"]
    assert kv["theoretical"] == kv["stock"] == 4 * 64 * PER_TOKEN
    assert kv["value_store"] == 2 * 64 * PER_TOKEN // 2


def test_kvsharer_plan_has_its_arcs_and_sharing_layers_hold_nothing(llama):
    plan = share_plan(llama, [0, 1, 0, 1])
    d = describe(plan, context=40, batch=1)
    assert d["sharing"] == [{"layer": 2, "reads": 0}, {"layer": 3, "reads": 1}]
    assert [row["tokens"] for row in d["layers"]] == [40, 40, 0, 0]
    assert d["kv_bytes"]["theoretical"] == 2 * 40 * PER_TOKEN
    text = render_text(d)
    assert "  layer 2 reads layer 0\n  layer 3 reads layer 1" in text
    header, *rows = _table(text)
    assert header[-1] == "reads"
    assert [row[-1] for row in rows] == ["-", "-", "0", "1"]
    assert "kvsharer: no runtime parameters" in text

    alone = render_text(describe(share_plan(llama, [0, 1, 2, 3]), 40, 1))
    assert "no layer shares" in alone


def test_kvcompress_plan_shows_each_heads_share_and_the_whole_context_heads(llama):
    # layer keep 0.5, shares [1, 0]: head 0 keeps the whole context (1 * 2 * 0.5), head 1 only sink + window
    plan = kvcompress_plan(llama, 0.5, [[1.0, 0.0]], window=8, sink=2)
    d = describe(plan, context=100, batch=1)
    row = d["layers"][0]
    assert row["head_shares"] == [1.0, 0.0]
    assert row["head_fractions"] == [1.0, 0.0]
    assert row["kept_fraction"] == pytest.approx(0.5)  # the mean head fraction
    assert row["tokens"] == pytest.approx((100 + 10) / 2)
    assert d["kv_bytes"]["theoretical"] == runtime.theoretical_bytes(plan, llama.config, 100)
    header, *rows = _table(render_text(d))
    assert header[-2:] == ["head", "shares"]
    assert rows[0][-2:] == ["1.000*", "0.000"]


def test_many_kv_heads_are_summarised_as_min_mean_max(llama):
    fingerprint = dict(fingerprint_from_model(llama), num_attention_heads=8, num_key_value_heads=8)
    shares = torch.full((4, 8), 1 / 8)
    shares[1] = torch.tensor([0.3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    plan = Plan(fingerprint=fingerprint, methods=("kvcompress",), params={"kvcompress": {"window": 8, "sink": 2}},
                tensors={"kvcompress.head_keep": shares, "kvcompress.layer_keep": torch.full((4,), 0.5)})
    header, *rows = _table(render_text(describe(plan, 100, 1)))
    assert header[-3:] == ["head", "shares", "min/mean/max"]
    assert rows[0][-1] == "0.125/0.125/0.125"
    assert rows[1][-2:] == ["0.100/0.125/0.300", "(1*)"]  # 0.3 * 8 heads * 0.5 >= 1: the whole context


def test_sliding_layers_are_bounded_by_their_window():
    config = tiny_config("gemma3")  # 6 layers: 5 sliding (window 16), the last full; 2 KV heads, head_dim 16
    plan = Plan(fingerprint=fingerprint_from_model(config), methods=("pyramidinfer",),
                params={"pyramidinfer": {"window": 4, "sink": 2}},
                tensors={"pyramidinfer.layer_keep": torch.full((6,), 0.5)}, provenance={"dtype": "bfloat16"})
    d = describe(plan, context=100, batch=1)
    assert [row["kind"] for row in d["layers"]] == ["sliding"] * 5 + ["full"]
    assert [row["tokens"] for row in d["layers"]] == [16] * 5 + [50]
    assert d["model"]["dtype"] == "bfloat16" and d["model"]["dtype_source"] == "the calibration's provenance"
    per_token = 2 * 2 * 16 * 2
    assert d["kv_bytes"]["theoretical"] == (5 * 16 + 50) * per_token
    assert d["kv_bytes"]["stock"] == (5 * 16 + 100) * per_token
    assert d["kv_bytes"]["theoretical"] == runtime.theoretical_bytes(plan, config, 100, 1, torch.bfloat16)
    # the full-attention layers apart: the part the plan compresses (the sliding layers hold their window anyway)
    assert d["kv_bytes"]["full_attention_stock"] == 100 * per_token
    assert d["kv_bytes"]["full_attention_theoretical"] == 50 * per_token
    text = render_text(d)
    assert "sliding window 16" in text
    assert "full-attention layers, plan" in text and "0.500 of their stock" in text
    llama_plan = Plan(fingerprint=fingerprint_from_model(tiny_config("llama")))
    assert "full_attention_stock" not in describe(llama_plan, context=100)["kv_bytes"]  # no sliding layers: no rows


def test_model_and_provenance_are_printed_as_the_plan_holds_them(llama):
    plan = pyramid_plan(llama, 0.5)
    plan.fingerprint["name_or_path"], plan.fingerprint["revision"] = "org/tiny", "abc123"
    plan.provenance = {"data_hash": "d" * 64, "seed": 7, "calibration_seconds": 1.5, "log": [1, 2, 3]}
    text = render_text(describe(plan, 2048, 1, dtype="float16"))
    assert "model: org/tiny@abc123 (llama)" in text
    assert "4 layers, 4 attention heads, 2 KV heads, head_dim 16" in text
    assert "KV dtype: float16 (given)" in text
    assert "target ratio: 0.5 of the full KV memory" in text
    assert f"provenance (kvplan {plan.kvplan_version}):" in text
    assert f"  data_hash: {'d' * 64}\n  seed: 7\n  calibration_seconds: 1.5\n  log: [3 entries]" in text
    assert "num_samples" not in text  # nothing invented


def test_noop_plan(llama):
    d = describe(Plan.noop(llama), 10, 1)
    assert d["kv_bytes"]["theoretical"] == d["kv_bytes"]["stock"]
    assert "methods: none (the plan changes nothing)" in render_text(d)


# --------------------------------------------------------------------------------------------------
# the command line


@pytest.fixture
def plan_file(llama, tmp_path):
    path = tmp_path / "plan.safetensors"
    _kcache_plan(llama, [0, 8, 16, 4], keep=[1.0, 0.5, 0.25, 0.25]).save(path)
    return path


def test_cli_prints_the_report_and_writes_the_same_content_as_json(plan_file, tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = ["inspect", str(plan_file), "--context", "100", "--batch", "2", "--json", str(out)]
    assert runtime_main(argv) == EXIT_OK
    captured = capsys.readouterr()
    report = json.loads(out.read_text())
    expected = {"source": str(plan_file), **describe(runtime.load_plan(plan_file), 100, 2)}
    assert report == json.loads(json.dumps(expected))
    assert captured.out.strip() == render_text(report)
    assert report["kv_bytes"]["value_store"] == (50 + 25 + 25) * (PER_TOKEN // 2) * 2
    assert [row["topn"] for row in report["layers"]] == [0, 8, 16, 4]
    assert captured.err == ""


def test_cli_passes_a_hub_id_and_revision_to_load_plan(llama, monkeypatch, capsys):
    asked = []

    def fake_load_plan(path_or_repo_id, revision=None):
        asked.append((path_or_repo_id, revision))
        return pyramid_plan(llama, 0.5)

    monkeypatch.setattr(runtime, "load_plan", fake_load_plan)
    assert runtime_main(["inspect", "org/tiny-kvplan", "--revision", "v1", "-q"]) == EXIT_OK
    assert asked == [("org/tiny-kvplan", "v1")]
    assert capsys.readouterr().out.startswith("plan: org/tiny-kvplan\n")


def test_cli_png(plan_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plan.png"
    assert runtime_main(["inspect", str(plan_file), "--png", str(out)]) == EXIT_OK
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}" in capsys.readouterr().err
    assert runtime_main(["inspect", str(plan_file), "--png", str(out), "-q"]) == EXIT_OK
    assert capsys.readouterr().err == ""


def test_draw_takes_a_plan_or_a_description(llama, tmp_path):
    pytest.importorskip("matplotlib")
    for name, what in [("sharing", share_plan(llama, [0, 1, 0, 1], keep=0.5)),
                       ("heads", describe(kvcompress_plan(llama, 0.5, [[3.0, 1.0]]), 256, 1))]:
        path = draw(what, tmp_path / f"{name}.png")
        assert path.read_bytes()[:4] == b"\x89PNG"


def test_png_without_matplotlib_says_how_to_install_it(plan_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails, find_spec says missing
    assert runtime_main(["inspect", str(plan_file), "--png", str(tmp_path / "x.png")]) == EXIT_USAGE
    assert "pip install matplotlib" in error_line(capsys)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        draw(runtime.load_plan(plan_file), tmp_path / "x.png")


@pytest.mark.parametrize("case", ["missing file", "not a plan", "context 0", "negative context", "batch 0",
                                  "png folder missing", "json folder missing"])
def test_bad_input_is_one_error_line_and_exit_2(case, plan_file, tmp_path, capsys):
    text_file = tmp_path / "notes.safetensors"
    text_file.write_text("not a plan")
    argv = {
        "missing file": ["inspect", str(tmp_path / "no-such-plan.safetensors")],
        "not a plan": ["inspect", str(text_file)],
        "context 0": ["inspect", str(plan_file), "--context", "0"],
        "negative context": ["inspect", str(plan_file), "--context", "-5"],
        "batch 0": ["inspect", str(plan_file), "--batch", "0"],
        "png folder missing": ["inspect", str(plan_file), "--png", str(tmp_path / "no" / "x.png")],
        "json folder missing": ["inspect", str(plan_file), "--json", str(tmp_path / "no" / "x.json")],
    }[case]
    if case == "png folder missing":
        pytest.importorskip("matplotlib")
    assert runtime_main(argv) == EXIT_USAGE
    line = error_line(capsys)
    assert "Traceback" not in line and "Error:" not in line


def test_inspect_help_names_its_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        runtime_main(["inspect", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--png", "--context", "(default: 2048)", "--batch", "(default: 1)", "--json", "--revision",
                   "--dtype", "not removed"):
        assert option in text, option
    with pytest.raises(SystemExit):
        runtime_main(["--help"])
    assert "inspect" in capsys.readouterr().out
