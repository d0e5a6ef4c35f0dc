"""bench/speed_memory.py: --cells and LABEL=PATH parsing, the beyond-trained-positions flag, the memory-cap search
(the pure bisection, and one tiny worker run under RLIMIT_AS), the allocator environment and the report."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import pyramid_plan

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import speed_memory as sm  # noqa: E402

PLAN_8X = REPO_ROOT / "artifacts" / "smollm2-135m-all-8x"


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.txt").write_text("some text")
    return folder


@pytest.fixture
def plan_file(tmp_path, llama):
    path = tmp_path / "p.safetensors"
    pyramid_plan(llama, 0.25).save(path)
    return path


def parse(data_dir, *argv):
    return sm.parse_args([*argv, "--data", str(data_dir)])


def error_of(capsys, data_dir, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        parse(data_dir, *argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


# ----- parsing -------------------------------------------------------------------------------------------------------
def test_parse_cell():
    assert sm.parse_cell("1x1024") == (1, 1024)
    assert sm.parse_cell("8X4096") == (8, 4096)
    for bad in ("3by4", "1x", "x1024", "0x1024", "1x8", "1x1024x2", "-1x64", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            sm.parse_cell(bad)


def test_cells_replace_the_grid(data_dir, plan_file, capsys):
    args = parse(data_dir, "--plan", str(plan_file), "--cells", "1x1024", "8x4096", "1x16384")
    assert args.cells == [(1, 1024), (8, 4096), (1, 16384)]
    args = parse(data_dir, "--plan", str(plan_file))
    assert args.cells == [(b, c) for b in sm.DEFAULT_BATCH for c in sm.DEFAULT_CONTEXT]
    args = parse(data_dir, "--plan", str(plan_file), "--batch", "2", "--context", "64", "128")
    assert args.cells == [(2, 64), (2, 128)]
    assert "not a cell" in error_of(capsys, data_dir, "--plan", str(plan_file), "--cells", "3by4")
    assert "--cells replaces" in error_of(capsys, data_dir, "--plan", str(plan_file), "--cells", "1x64", "--batch", "2")
    assert "given twice" in error_of(capsys, data_dir, "--plan", str(plan_file), "--cells", "1x64", "1x64")


def test_fit_cap_alone_runs_no_cells(data_dir, plan_file, capsys):
    args = parse(data_dir, "--plan", str(plan_file), "--fit-cap", "300", "--fit-max", "2048")
    assert args.cells == [] and args.fit_cap == 300 and args.fit_step == 256 and args.fit_batch == 1
    args = parse(data_dir, "--plan", str(plan_file), "--fit-cap", "300", "--cells", "1x256")
    assert args.cells == [(1, 256)]
    assert "--fit-max" in error_of(capsys, data_dir, "--plan", str(plan_file), "--fit-cap", "9", "--fit-max", "100")
    assert "--fit-cap" in error_of(capsys, data_dir, "--plan", str(plan_file), "--fit-cap", "0")


def test_plan_labels(data_dir, plan_file, tmp_path, capsys):
    assert sm.parse_plan_arg("x.safetensors") == sm.PlanArg("x.safetensors")
    assert sm.parse_plan_arg("all8=artifacts/x") == sm.PlanArg("artifacts/x", "all8")
    odd = tmp_path / "a=b.safetensors"  # an existing path with '=' stays a path
    odd.write_bytes(b"")
    assert sm.parse_plan_arg(str(odd)) == sm.PlanArg(str(odd))
    for bad in ("=x", "lab="):
        with pytest.raises(argparse.ArgumentTypeError):
            sm.parse_plan_arg(bad)
    args = parse(data_dir, "--plan", f"mine={plan_file}", "--plan", str(plan_file))
    assert args.plan == [sm.PlanArg(str(plan_file), "mine"), sm.PlanArg(str(plan_file))]
    assert sm.json_args(args)["plan"] == [f"mine={plan_file}", str(plan_file)]
    assert "twice" in error_of(capsys, data_dir, "--plan", f"a={plan_file}", "--plan", f"a={plan_file}")
    assert "stock" in error_of(capsys, data_dir, "--plan", f"stock@12={plan_file}")
    assert "no such file" in error_of(capsys, data_dir, "--plan", f"a={tmp_path / 'missing'}")
    assert "folder without" in error_of(capsys, data_dir, "--plan", str(data_dir))


@pytest.mark.skipif(not (PLAN_8X / "plan.safetensors").is_file(), reason="needs artifacts/smollm2-135m-all-8x")
def test_plan_folder_loads():
    assert sm.plan_source_problem(str(PLAN_8X)) is None
    plan = sm.runtime.load_plan(str(PLAN_8X))  # the runtime resolves folder/plan.safetensors itself
    assert plan.target_ratio == pytest.approx(0.125)


def test_prefill_chunk_size_flag(data_dir, plan_file, capsys):
    assert parse(data_dir, "--plan", str(plan_file)).prefill_chunk_size == "auto"
    assert parse(data_dir, "--plan", str(plan_file), "--prefill-chunk-size", "512").prefill_chunk_size == 512
    assert parse(data_dir, "--plan", str(plan_file), "--prefill-chunk-size", "0").prefill_chunk_size == 0
    assert "expected 'auto'" in error_of(capsys, data_dir, "--plan", str(plan_file), "--prefill-chunk-size", "big")


def test_beyond_max_positions():
    assert sm.beyond_positions(16384, 8192)
    assert not sm.beyond_positions(8192, 8192)
    assert not sm.beyond_positions(10**6, None)
    assert "8192 trained positions" in sm.beyond_note(8192) and "quality not claimed" in sm.beyond_note(8192)


# ----- the memory-cap search -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("step,maximum,start", [(256, 32768, None), (256, 2048, None), (100, 1050, None),
                                                (1, 37, None), (7, 7, None), (256, 32768, 22528), (256, 32768, 300),
                                                (100, 1050, 1050), (1, 37, 5)])
def test_fit_search_finds_the_threshold(step, maximum, start):
    for threshold in [0, step - 1, step, step + 1, maximum // 3, maximum - 1, maximum, maximum * 4]:
        seen: list[int] = []

        def fits(n: int) -> bool:
            seen.append(n)
            return n <= threshold

        result = sm.fit_search(fits, step, maximum, start)
        if start is not None:
            assert seen[0] == start // step * step
        expected = min(threshold, maximum) // step * step
        assert result.largest == expected, (step, maximum, threshold)
        assert result.reached_max == (expected == maximum // step * step)
        assert len(seen) == len(set(seen)), "a length was probed twice"
        assert all(n % step == 0 and step <= n <= maximum for n in seen)
        assert [(n, n <= threshold) for n in seen] == result.probes
        top = maximum // step
        assert len(seen) <= 2 * top.bit_length() + 1  # exponential + bisection: logarithmic


def test_fit_search_order_and_errors():
    result = sm.fit_search(lambda n: n <= 1300, 256, 32768)
    assert [n for n, _ in result.probes] == [256, 512, 1024, 2048, 1536, 1280]
    assert result.largest == 1280 and not result.reached_max
    with pytest.raises(ValueError):
        sm.fit_search(lambda n: True, 256, 100)
    with pytest.raises(ValueError):
        sm.fit_search(lambda n: True, 0, 100)
    started = sm.fit_search(lambda n: n <= 22528, 256, 32768, start=16384)
    assert [n for n, _ in started.probes] == [16384, 32768, 24576, 20480, 22528, 23552, 23040, 22784]
    assert started.largest == 22528
    below = sm.fit_search(lambda n: n <= 5376, 256, 22528, start=22528)
    assert below.probes[0] == (22528, False) and below.largest == 5376
    for bad_start in (100, 40000):
        with pytest.raises(ValueError):
            sm.fit_search(lambda n: True, 256, 32768, start=bad_start)


def test_is_out_of_memory():
    assert sm.is_out_of_memory(MemoryError())
    assert sm.is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate "
                                            "memory: you tried to allocate 1048576 bytes"))
    assert sm.is_out_of_memory(OSError(12, "Cannot allocate memory"))
    assert not sm.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not sm.is_out_of_memory(ValueError("can't allocate memory"))


def test_fit_ratio_bounds():
    stock = {"label": "stock", "kind": "stock", "largest_fit": 1024, "reached_max": False}
    plan = {"label": "p", "kind": "plan", "largest_fit": 4096, "reached_max": True}
    ratios = sm.fit_ratios([stock, plan])
    assert ratios == {"stock": 1.0, "p": 4.0}
    assert sm.fit_ratio_text(plan, stock, ratios["p"]) == "**>= 4.00**"
    assert sm.fit_ratio_text(stock, stock, 1.0) == "1.00"


def test_worker_malloc_env_restores(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "7")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    with sm.worker_malloc_env("trim") as expected:
        assert expected == sm.MALLOC_TRIM_ENV
        assert all(os.environ[k] == v for k, v in sm.MALLOC_TRIM_ENV.items())
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "7" and "MALLOC_MMAP_THRESHOLD_" not in os.environ
    with sm.worker_malloc_env("default") as expected:
        assert expected == {} and not any(k in os.environ for k in sm.MALLOC_TRIM_ENV)
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "7"


# ----- one tiny end-to-end run of the memory-cap search (spawned worker, RLIMIT_AS) ---------------------------------
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS, /proc and glibc are Linux things")
def test_fit_worker_on_a_tiny_model(tiny_dir):
    """Stock on the tiny model under an 8 MiB cap: long prompts fail to allocate, the worker survives the failures
    (shorter prompts fit again afterwards) and the answer sits between a fitting and a failing length."""
    args = argparse.Namespace(model=str(tiny_dir), threads=1, seed=0, prefill_chunk_size="auto", fit_cap=8,
                              fit_batch=1, fit_max=4096, fit_step=128, fit_start=None, fit_decode_steps=1)
    tokens = torch.randint(3, 300, (5000,), generator=torch.Generator().manual_seed(0))
    with sm.worker_malloc_env("trim"):
        row = sm.fit_config(mp.get_context("spawn"), args, "stock", "stock", None, tokens, max_positions=1024)
    probes = [(p["length"], p["fits"]) for p in row["probes"]]
    assert any(not ok for _, ok in probes), f"nothing failed under an 8 MiB cap: {probes}"
    first_failure = next(i for i, (_, ok) in enumerate(probes) if not ok)
    assert any(ok for _, ok in probes[first_failure + 1:]), probes  # the same worker fit again after a failure
    assert 0 < row["largest_fit"] < 4096 and not row["reached_max"]
    assert all(ok == (n <= row["largest_fit"]) for n, ok in probes)
    assert row["restarts"] == 0
    assert row["rlimit_as"] == row["vm_baseline"] + 8 * sm.MIB
    assert row["malloc_env"] == {**sm.MALLOC_TRIM_ENV, **sm.FIT_WORKER_ENV}
    assert row["peak_above_baseline_at_largest"] is not None
    assert row["beyond_max_positions"] == (row["largest_fit"] > 1024)
    failure = next(p for p in row["probes"] if not p["fits"])
    assert "allocate" in failure["error"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_decode_rate_is_timed_after_switching_malloc(tiny_dir):
    """A cell worker started under --malloc trim: the peak phase's decode steps, then (--decode-malloc keep) malloc
    switched to keep freed memory for the timed steps, and back; two measurements in a row both switch."""
    args = argparse.Namespace(model=str(tiny_dir), threads=1, seed=0, prefill_chunk_size="auto", decode_malloc="keep")
    warm = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(0)).tolist()
    with sm.worker_malloc_env("trim"):
        worker = sm.Worker(mp.get_context("spawn"), sm.worker_spec(args, None, warm, 3), "stock")
    try:
        info = worker.wait_ready()
        assert info["malloc_env"] == sm.MALLOC_TRIM_ENV
        prompt = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(1))
        results = [worker.run(prompt), worker.run(prompt)]
    finally:
        worker.close()
    for r in results:
        assert r["rate_malloc"] == "keep"
        assert r["tokens_per_s"] == pytest.approx(2 * 3 / r["decode_s"])
        assert r["tokens_per_s_peak_phase"] > 0
    assert sm.worker_spec(args, None, warm, 3, fit_cap=8)["decode_malloc"] is None  # the cap search never switches


# ----- the report ----------------------------------------------------------------------------------------------------
def fake_cell(batch: int, context: int, max_positions: int, plan_peak: float) -> dict:
    def config(kind, length, peak_above, tps):
        return {"kind": kind, "plan_path": None, "length": length, "rounds": 1, "prefill_s": 1.0, "decode_s": 0.5,
                "tokens_per_s": tps, "physical_bytes": 2**20, "theoretical_bytes": 2**20, "stock_bytes": 8 * 2**20,
                "kept_mean": 1.0, "kept_max": 1, "baseline_rss": 100 * 2**20, "peak_rss": (100 + peak_above) * 2**20,
                "peak_above_baseline": peak_above * 2**20, "peak_method": "VmHWM after reset", "cpu_per_wall": 2.0,
                "samples": [{"loadavg_1min": 1.0}]}

    limit = context // 8
    return {"batch": batch, "context": context, "rounds": 1, "beyond_max_positions": context > max_positions,
            "max_position_embeddings": max_positions,
            "configs": {"stock": config("stock", context, 100.0, 10.0),
                        "all8": config("plan", context, plan_peak, 20.0),
                        f"stock@{limit}": config("limit", limit, 10.0, 25.0)},
            "ratios": {"all8": {"keep_ratio": 0.125, "limit_length": limit, "prefill_vs_stock": 1.1,
                                "tokens_per_s_vs_stock": 2.0, "tokens_per_s_vs_limit": 0.8, "peak_rss_vs_stock": 0.5,
                                "peak_above_baseline_vs_stock": plan_peak / 100.0, "physical_vs_theoretical": 1.0,
                                "physical_vs_stock": 0.125, "theoretical_vs_stock": 0.125}}}


def test_markdown_targets_beyond_and_fit(data_dir):
    report = {
        "command": "python bench/speed_memory.py", "model": "m", "max_position_embeddings": 8192,
        "environment": {"dtype": "float32", "device": "cpu", "attn_implementation": "sdpa", "torch": "t",
                        "transformers": "x", "cpu_count": 2},
        "plans": {"all8": {"path": "p", "target_ratio": 0.125, "keep_ratio": 0.125, "prefill_chunk_size": 4096}},
        "prefill_chunk": {"flag": "auto", "runtime_default": 4096, "per_plan": {"all8": 4096}},
        "malloc": {"choice": "trim", "expected_env": dict(sm.MALLOC_TRIM_ENV), "verified": True},
        "cells": [fake_cell(1, 1024, 8192, 50.0), fake_cell(1, 8192, 8192, 20.0), fake_cell(1, 16384, 8192, 10.0)],
        "fit": {"cap_mib": 300, "batch": 1, "max": 32768, "step": 256, "decode_steps": 4, "rows": [
            {"label": "stock", "kind": "stock", "largest_fit": 4096, "reached_max": False, "probes": [1, 2],
             "restarts": 0, "vm_baseline": 2**30, "rlimit_as": 2**30 + 300 * 2**20,
             "peak_above_baseline_at_largest": 250 * 2**20, "prefill_s_at_largest": 3.0,
             "beyond_max_positions": False},
            {"label": "all8", "kind": "plan", "largest_fit": 32768, "reached_max": True, "probes": [1, 2, 3],
             "restarts": 0, "vm_baseline": 2**30, "rlimit_as": 2**30 + 300 * 2**20,
             "peak_above_baseline_at_largest": 200 * 2**20, "prefill_s_at_largest": 30.0,
             "beyond_max_positions": True}]},
        "wall_seconds": 60.0,
    }
    args = parse(data_dir, "--plan", str(data_dir / "a.txt"), "--cells", "1x1024")
    text = sm.render_markdown(report, args)
    assert "## Targets (8x plans)" in text
    assert "1x8192 **0.20**" in text and "(none of" not in text  # 8x4096 did not run: 1x8192 alone
    assert "plan ÷ stock at 1x1024: decode tok/s **2.00**" in text
    assert "1x1024 0.80, 1x8192 0.80, 1x16384 0.80" in text  # decode plan ÷ limit in every cell
    assert "| 1 | 16384† |" in text
    assert "† 1x16384: beyond the model's 8192 trained positions: speed and memory only, quality not claimed." in text
    assert "`--malloc trim`" in text and "chunks of 4096" in text
    assert "## Largest prompt under a memory cap" in text
    assert "| all8 | 32768† | **>= 8.00** |" in text and "reached --fit-max" in text
    report["plans"]["all8"]["keep_ratio"] = 0.25  # no 8x plan: no targets block
    assert "## Targets" not in sm.render_markdown(report, args)
    report["cells"] = []  # only the search ran
    text = sm.render_markdown(report, args)
    assert "## Speed" not in text and "## Largest prompt under a memory cap" in text
