"""The evaluation harness on a tiny random model: a no-op plan scores exactly like the full cache."""

from __future__ import annotations

import pytest
import torch
from helpers import pyramid_plan
from test_data import CORPUS, make_tokenizer

from runtime.evaluation import EvalSettings, evaluate, full_cache, plan_method, render
from runtime.evaluation.retrieval import build_cases
from runtime.evaluation.texts import EvalDataError, read_qa, read_texts, windows
from runtime.plan import Plan


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("texts")
    for i in range(3):
        (folder / f"{i}.txt").write_text(" ".join(CORPUS * 6))
    return folder


SETTINGS = dict(contexts=[256], docs=2, continuation=8, batch_size=2, depths=[0.2, 0.8], trials=1, answer_tokens=4)


def test_noop_plan_scores_exactly_like_the_full_cache(tiny, text_dir):
    model, tokenizer = tiny
    methods = [full_cache(), plan_method(Plan.noop(model), name="noop")]
    settings = EvalSettings(tasks=("lm", "passkey", "needle", "continuation"), **SETTINGS)
    report = evaluate(model, tokenizer, methods, str(text_dir), settings)
    rows = {(r["task"], r["method"]): r for r in report["rows"]}
    lm = rows[("lm", "noop")]
    assert lm["kl"] == pytest.approx(0.0, abs=1e-6) and lm["top1_agreement"] == 1.0 and lm["ratio"] == pytest.approx(1.0)
    assert rows[("continuation", "noop")]["score"] == 1.0
    for task in ("passkey", "needle"):
        assert rows[(task, "noop")]["score"] == rows[(task, "full")]["score"]
    assert lm["physical_bytes"] == rows[("lm", "full")]["physical_bytes"]
    assert "| lm | 256 | noop |" in render(report)


def test_compressing_plan_holds_less_and_reports_theoretical_bytes(tiny, text_dir):
    model, tokenizer = tiny
    plan = pyramid_plan(model, 0.3, window=8, sink=2)
    settings = EvalSettings(tasks=("lm",), **SETTINGS)
    report = evaluate(model, tokenizer, [full_cache(), plan_method(plan, name="p")], str(text_dir), settings)
    row = next(r for r in report["rows"] if r["method"] == "p")
    assert row["physical_over_stock"] < 0.5
    assert row["physical_over_theoretical"] < 1.2
    assert 0.0 <= row["top1_agreement"] <= 1.0 and row["kl"] >= 0.0


def test_retrieval_prompts_have_the_requested_length_and_hold_the_key(tiny):
    _, tokenizer = tiny
    cases = build_cases(tokenizer, None, [150], [0.0, 0.5, 1.0], trials=2, seed=3, tasks=("passkey",))
    assert len(cases) == 6
    for case in cases:
        assert case.context.shape[1] == 150
        assert case.expected in tokenizer.decode(case.context[0])
    again = build_cases(tokenizer, None, [150], [0.0, 0.5, 1.0], trials=2, seed=3, tasks=("passkey",))
    assert [c.expected for c in cases] == [c.expected for c in again]


def test_data_readers(tmp_path, text_dir):
    assert len(read_texts(text_dir)) == 3
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"input": "doc", "instructions": ["q1", "q2"], "outputs": ["a1", "a2"]}\n')
    assert [r.answer for r in read_qa(qa)] == ["a1", "a2"]
    assert read_texts(qa) == ["doc"]
    with pytest.raises(EvalDataError):
        read_texts(tmp_path / "missing")
    with pytest.raises(EvalDataError):
        windows(torch.arange(10), 2, 50)


def test_unknown_task_is_refused(tiny, text_dir):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="unknown task"):
        evaluate(model, tokenizer, [full_cache()], str(text_dir), EvalSettings(tasks=("lm", "mmlu")))


def test_leval_scoring_and_task(tiny, tmp_path):
    from runtime.evaluation.leval import exact_choice, score, token_f1

    assert exact_choice("B. because", "B") == 1.0 and exact_choice("A", "B") == 0.0
    assert exact_choice("A, C are right", "A, C") == 1.0
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))
    assert score("C", "C") == 1.0 and score("totally different", "Oclaro restructured") == 0.0
    model, tokenizer = tiny
    qa = tmp_path / "qa.jsonl"
    qa.write_text(
        '{"input": "' + " ".join(CORPUS) + '", "instructions": ["Which?\\nA. x\\nB. y", "What?"], "outputs": ["A", "cats"]}\n'
    )
    methods = [full_cache(), plan_method(Plan.noop(model), name="noop")]
    settings = EvalSettings(tasks=("leval",), contexts=[200], docs=2, leval_tokens=4)
    rows = evaluate(model, tokenizer, methods, str(qa), settings)["rows"]
    assert [r["method"] for r in rows] == ["full", "noop"]
    assert rows[0]["score"] == rows[1]["score"]


def test_run_stats_count_the_tokens_fed_not_what_the_cache_reports(tiny):
    from runtime.evaluation.decoding import answer, teacher_forced

    model, _ = tiny
    ctx, cont = torch.randint(3, 100, (2, 40)), torch.randint(3, 100, (2, 6))
    _, stats = teacher_forced(model, full_cache(), ctx, cont)
    assert stats.seen == 45
    _, stats = answer(model, full_cache(), ctx[:1], cont[:1], 3)
    assert stats.seen == 40 + 6 + 2
