"""Calibration: CLI behaviour, determinism, PyramidInfer allocation, end to end on a tiny saved model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_data import make_tokenizer

import runtime
from calibrate.__main__ import main, parse_methods
from calibrate.pipeline import calibrate_model
from calibrate.pyramidinfer import GRID, allocate_keep
from calibrate.recipe import resolve_recipe
from runtime.plan import Plan

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("isolated_cache")


def _calibrate(tiny_dir, out, *extra) -> int:
    return main([
        str(tiny_dir), "--out", str(out), "--max-seq-length", "256", "--num-calibration-samples", "2", "-q", *extra,
    ])


def test_help_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "calibrate", "--help"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0
    for flag in ("--out", "--methods", "--target-ratio", "--num-calibration-samples", "--max-seq-length", "--seed",
                 "--device", "--dtype", "--recipe", "--quiet"):
        assert flag in done.stdout


def test_parse_methods():
    assert parse_methods("none") == []
    assert parse_methods("all") == ["pyramidinfer", "kvsharer", "kvcompress", "kcache"]
    assert parse_methods("pyramidinfer, kvsharer") == ["pyramidinfer", "kvsharer"]
    assert parse_methods(None) is None
    for bad in ("pyramid", "none,pyramidinfer", ""):
        with pytest.raises(ValueError):
            parse_methods(bad)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["smollm2-135m", "--methods", "kvsharer", "--share-layers", "1.5"], "--share-layers"),
        (["smollm2-135m", "--methods", "kvsharer", "--share-layers", "many"], "--share-layers"),
        (["smollm2-135m", "--methods", "pyramid"], "unknown method"),
        (["no-such-model", "--methods", "pyramidinfer"], "unknown model alias"),
        (["smollm2-135m", "--target-ratio", "1.5"], "target_ratio"),
    ],
)
def test_bad_command_lines_exit_2_with_a_clear_message(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path / "p.safetensors")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p.safetensors").exists()


def test_existing_output_needs_force(tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    out.write_bytes(b"keep me")
    assert main(["smollm2-135m", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"


def test_end_to_end_on_a_tiny_saved_model(tiny_dir, tmp_path):
    out = tmp_path / "plan.safetensors"
    assert _calibrate(tiny_dir, out, "--methods", "pyramidinfer", "--target-ratio", "0.5", "--reproducible") == 0
    plan = runtime.load_plan(out)
    assert plan.methods == ("pyramidinfer",)
    keep = plan.tensors["pyramidinfer.layer_keep"]
    assert keep.shape == (4,) and float(keep.min()) > 0 and float(keep.max()) <= 1
    assert abs(float(keep.mean()) - 0.5) <= 1.0 / GRID
    assert plan.provenance["num_samples"] == 2 and plan.provenance["seed"] == 42
    assert plan.recipe["target_ratio"] == 0.5 and plan.params["pyramidinfer"] == {"window": 32, "sink": 4}  # defaults
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    theoretical = runtime.theoretical_bytes(plan, model.config, 256)
    assert theoretical / runtime.stock_bytes(model.config, 256) == pytest.approx(0.5, abs=0.02)
    with runtime.apply_plan(model, plan):
        model.generate(torch.randint(3, 100, (1, 300)), max_new_tokens=4, do_sample=False)


def test_same_inputs_and_seed_give_a_byte_identical_plan(tiny_dir, tmp_path):
    a, b, c = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    assert _calibrate(tiny_dir, a, "--reproducible") == 0
    assert _calibrate(tiny_dir, b, "--reproducible") == 0
    assert a.read_bytes() == b.read_bytes()
    assert _calibrate(tiny_dir, c, "--reproducible", "--seed", "7") == 0
    assert runtime.load_plan(c).provenance["data_hash"] != runtime.load_plan(a).provenance["data_hash"]


def test_timed_plans_differ_only_in_timings(tiny_dir, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert _calibrate(tiny_dir, a) == 0
    assert _calibrate(tiny_dir, b, "--reproducible") == 0
    pa, pb = runtime.load_plan(a), runtime.load_plan(b)
    assert pa.provenance["calibration_seconds"] > 0 and pb.provenance["calibration_seconds"] is None
    for name in pa.tensors:
        assert torch.equal(pa.tensors[name], pb.tensors[name])
    strip = lambda p: {k: v for k, v in p.provenance.items() if not k.endswith("_seconds")}  # noqa: E731
    assert strip(pa) == strip(pb)


def test_methods_none_writes_a_plan_that_changes_nothing(tiny_dir, tmp_path):
    out = tmp_path / "none.safetensors"
    assert _calibrate(tiny_dir, out, "--methods", "none") == 0
    plan = runtime.load_plan(out)
    assert plan.methods == () and plan.is_noop


def test_samples_too_short_for_pyramidinfer_fail_clearly(tiny_dir, tmp_path, capsys):
    out = tmp_path / "short.safetensors"
    assert main([str(tiny_dir), "--out", str(out), "--max-seq-length", "64", "-q"]) == 1
    assert "too short" in capsys.readouterr().err
    assert not out.exists()


def test_llama_3_8b_recipe_calibrates_a_model_of_its_shape_family():
    """The weights are not here; a tiny Llama-3-shaped model (GQA 4:1, rope theta 500k) stands in."""
    from transformers import LlamaConfig, LlamaForCausalLM

    recipe = resolve_recipe("llama-3-8b").with_overrides(max_seq_length=200, num_calibration_samples=2)
    tokenizer = make_tokenizer()
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        vocab_size=len(tokenizer), rope_theta=500000.0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    result = calibrate_model(model, tokenizer, recipe, progress=False)
    assert result.plan.tensors["pyramidinfer.layer_keep"].shape == (4,)
    result.plan.validate(model)
    assert result.plan.recipe["model"] == "meta-llama/Meta-Llama-3-8B-Instruct"


def test_allocation_gives_more_to_layers_with_spread_attention():
    f = torch.linspace(0, 1, GRID + 1, dtype=torch.float64)
    concentrated = 1 - (1 - f) ** 8  # most mass in few tokens
    spread = 1 - (1 - f) ** 2  # mass spread over many tokens
    curves = torch.stack([spread, concentrated, concentrated, spread])
    floor = torch.full((4,), 0.05, dtype=torch.float64)
    keep = allocate_keep(curves, [True] * 4, 0.4, floor)
    assert float(keep.mean()) == pytest.approx(0.4, abs=1.0 / GRID)
    assert keep[0] > keep[1] and keep[3] > keep[2]
    assert keep[0] == keep[3] and keep[1] == keep[2]
    assert float(keep.min()) >= 0.05
    keep = allocate_keep(curves, [False, True, True, True], 0.4, floor)
    assert keep[0] == 1.0
