"""The command lines (``python -m runtime generate|eval``, ``python -m calibrate``) as a new user meets them:
one-line errors, prompts, ``--help``, progress on stderr and ``-q``. Tiny random-weight models, no downloads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import error_line, pyramid_plan
from make_tiny_model import make_tiny_model
from test_data import make_tokenizer

from calibrate.__main__ import main as calibrate_main
from runtime.__main__ import EVAL_TASKS
from runtime.__main__ import main as runtime_main
from runtime.plan import Plan

REPO = Path(__file__).resolve().parents[1]
RETRIEVAL = ["--tasks", "passkey", "--context", "256", "--depths", "0.5", "--trials", "1"]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KVPLAN_CACHE", str(tmp_path_factory.mktemp("kvplan-cache")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), layers=3, tokenizer=make_tokenizer())


@pytest.fixture(scope="module")
def plan_file(tiny_dir, tmp_path_factory) -> Path:
    """A PyramidInfer plan for the tiny model, fingerprinted under the name the CLI loads it by."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model.config._name_or_path = str(tiny_dir)
    path = tmp_path_factory.mktemp("plans") / "tiny.safetensors"
    pyramid_plan(model, 0.5, window=4, sink=2).save(path)
    return path


# --------------------------------------------------------------------------------------------------
# a model that cannot be loaded: one line, exit 1


def _unloadable(kind: str, tmp_path: Path) -> str:
    if kind == "missing directory":
        return str(tmp_path / "no-such-model-dir")
    if kind == "pypi reference":
        return "pypi:no_such_package_xyz/x.gguf"
    if kind == "unreachable hub id":
        return "kvplan-tests/no-such-model-xyz"
    folder = tmp_path / kind.replace(" ", "-")
    folder.mkdir()
    if kind == "broken config":  # transformers itself fails (unknown architecture)
        (folder / "config.json").write_text(json.dumps({"model_type": "no_such_architecture_xyz"}))
    return str(folder)  # "empty directory": no config.json


@pytest.mark.parametrize("command", ["generate", "eval"])
@pytest.mark.parametrize(
    "kind", ["missing directory", "pypi reference", "unreachable hub id", "empty directory", "broken config"]
)
def test_unloadable_model_is_one_error_line_and_exit_1(command, kind, plan_file, tmp_path, capsys):
    model = _unloadable(kind, tmp_path)
    extra = ["--prompt", "Hi"] if command == "generate" else RETRIEVAL
    assert runtime_main([command, model, "--plan", str(plan_file), *extra]) == 1
    line = error_line(capsys)
    if kind != "broken config":
        assert model in line or model.split(":", 1)[-1] in line


def test_missing_model_package_named_by_the_plan_is_one_error_line(tiny_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    plan = Plan.noop(model)
    plan.recipe = {"model": "pypi:no_such_package_xyz/x.gguf", "install_hint": "pip install no-such-package-xyz"}
    path = tmp_path / "plan.safetensors"
    plan.save(path)
    capsys.readouterr()  # the loading bar above
    for argv in (["generate", "--plan", str(path), "--prompt", "Hi"], ["eval", "--plan", str(path), *RETRIEVAL]):
        assert runtime_main(argv) == 1
        line = error_line(capsys)
        assert "no_such_package_xyz" in line and "pip install no-such-package-xyz" in line


def test_verbose_adds_the_traceback(plan_file, tmp_path, capsys):
    argv = ["generate", str(tmp_path / "nope"), "--plan", str(plan_file), "--prompt", "Hi", "-v"]
    assert runtime_main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("error: ")


def test_unloadable_model_as_a_real_process(plan_file, tmp_path):
    """``python -m runtime``: no traceback, one line on stderr, nothing on stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "runtime", "generate", str(tmp_path / "nope"), "--plan", str(plan_file)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("error: "), done.stderr


def test_calibrate_unloadable_model_is_one_error_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert calibrate_main([str(empty), "--out", str(tmp_path / "p.safetensors")]) == 1
    error_line(capsys)


# --------------------------------------------------------------------------------------------------
# prompts


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt_is_refused_with_exit_2(prompt, plan_file, tiny_dir, capsys):
    assert runtime_main(["generate", str(tiny_dir), "--plan", str(plan_file), "--prompt", prompt]) == 2
    assert "--prompt is empty" in error_line(capsys)


def test_empty_or_missing_prompt_file_is_refused_with_exit_2(plan_file, tiny_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert runtime_main(["generate", str(tiny_dir), "--plan", str(plan_file), "--prompt-file", str(empty)]) == 2
    assert "is empty" in error_line(capsys)
    missing = tmp_path / "missing.txt"
    assert runtime_main(["generate", str(tiny_dir), "--plan", str(plan_file), "--prompt-file", str(missing)]) == 2
    assert "--prompt-file" in error_line(capsys)


def test_bad_eval_command_lines_are_refused_before_loading(tiny_dir, capsys):
    assert runtime_main(["eval", str(tiny_dir), "--tasks", "lm,mmlu"]) == 2
    assert "mmlu" in error_line(capsys)
    assert runtime_main(["eval", str(tiny_dir), "--tasks", "lm"]) == 2
    assert "--data" in error_line(capsys)


def test_given_prompt_is_chat_templated_like_the_builtin_one(plan_file, tiny_dir, tmp_path, capsys):
    tokenizer = make_tokenizer()
    text = "Write a short poem about the sea."
    plain = len(tokenizer(text).input_ids)
    templated = len(tokenizer(
        tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    ).input_ids)
    base = ["generate", str(tiny_dir), "--plan", str(plan_file), "--prompt", text, "--max-new-tokens", "2", "-q"]
    reports = {}
    for flag in ([], ["--no-chat-template"]):
        out = tmp_path / f"r{len(flag)}.json"
        assert runtime_main([*base, *flag, "--json", str(out)]) == 0
        reports[bool(flag)] = json.loads(out.read_text())
        printed = capsys.readouterr().out
        assert ("chat template" if not flag else "plain text") in printed.splitlines()[0]
    assert reports[False]["chat_template"] is True and reports[False]["prompt_tokens"] == templated
    assert reports[True]["chat_template"] is False and reports[True]["prompt_tokens"] == plain
    assert reports[False]["prompt_source"] == "--prompt"


# --------------------------------------------------------------------------------------------------
# --help


def _help(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_help_lists_defaults_tasks_and_explains_the_report(capsys):
    top = _help(runtime_main, [], capsys)
    assert "leval" in top and "generate" in top and "eval" in top
    generate = " ".join(_help(runtime_main, ["generate"], capsys).split())
    for text in ("--max-new-tokens", "(default: 64)", "(default: 2000)", "--no-chat-template", "theoretical",
                 "teacher-forced", "greedy tokens equal", "DynamicCache"):
        assert text in generate, text
    evaluation = " ".join(_help(runtime_main, ["eval"], capsys).split())
    for text in ("--batch-size", "(default: 4)", "(default: lm,passkey)", "(default: 2048)", "(default: 0.1 0.5 0.9)",
                 "leval", "retention", "teacher-forced"):
        assert text in evaluation, text
    calibrate = " ".join(_help(calibrate_main, [], capsys).split())
    assert "(default: the recipe's, 0.5)" in calibrate and "-q" in calibrate


def test_cli_task_list_matches_the_harness():
    from runtime.evaluation import TASKS

    assert tuple(EVAL_TASKS) == tuple(TASKS)


# --------------------------------------------------------------------------------------------------
# progress on stderr, the report alone on stdout, -q


def test_generate_says_each_phase_on_stderr_and_q_silences_it(plan_file, tiny_dir, capsys):
    argv = ["generate", str(tiny_dir), "--plan", str(plan_file), "--prompt", "Hello there, sea and sky.",
            "--max-new-tokens", "3"]
    assert runtime_main(argv) == 0
    captured = capsys.readouterr()
    for phase in ("loaded", "prompt: --prompt", "warm-up", "stock run 1/2", "plan run 2/2", "scoring", "done"):
        assert phase in captured.err, phase
    assert "KV bytes physical" in captured.out and "theoretical: the K/V bytes" in captured.out
    assert "warm-up" not in captured.out

    assert runtime_main([*argv, "-q"]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == ""
    assert "KV bytes physical" in quiet.out and "greedy tokens equal" in quiet.out


def test_eval_shows_a_bar_over_the_runs_and_q_silences_it(plan_file, tiny_dir, capsys):
    argv = ["eval", str(tiny_dir), "--plan", str(plan_file), *RETRIEVAL]
    assert runtime_main(argv) == 0
    captured = capsys.readouterr()
    assert "eval" in captured.err and "2/2" in captured.err  # 2 methods × 1 case
    assert "| passkey | 256 |" in captured.out and "retention:" in captured.out
    assert "2/2" not in captured.out

    assert runtime_main([*argv, "-q"]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == ""
    assert "| passkey | 256 |" in quiet.out


def test_calibrate_shows_progress_without_a_terminal_and_q_silences_it(tiny_dir, tmp_path, capsys):
    argv = [str(tiny_dir), "--max-seq-length", "256", "--num-calibration-samples", "2", "--force"]
    assert calibrate_main([*argv, "--out", str(tmp_path / "a.safetensors")]) == 0
    captured = capsys.readouterr()
    assert "Calibrating" in captured.err or "Tokenizing" in captured.err
    assert calibrate_main([*argv, "--out", str(tmp_path / "b.safetensors"), "-q"]) == 0
    assert capsys.readouterr().err == ""
