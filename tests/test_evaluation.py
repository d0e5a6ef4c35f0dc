"""The evaluation harness on a tiny random model: a no-op plan scores exactly like the full cache."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import pyramid_plan
from test_data import CORPUS, make_tokenizer
from transformers import DynamicCache

import runtime
from runtime.cache import cache_argument
from runtime.evaluation import EvalSettings, evaluate, full_cache, plan_method, render
from runtime.evaluation.retrieval import build_cases
from runtime.evaluation.texts import EvalDataError, read_qa, read_texts, token_stream, windows
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


@pytest.mark.slow
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

    # the scores, recomputed by hand on the same windows: the full cache's log-probabilities from one plain forward
    # over each whole window, the plan's from its own prefill of the context and one decode step per token
    context, cont = SETTINGS["contexts"][0], SETTINGS["continuation"]
    wins = windows(token_stream(tokenizer, read_texts(text_dir)), SETTINGS["docs"], context + cont)
    assert wins.shape == (2, context + cont)
    with torch.no_grad():
        full = model(wins).logits[:, context - 1 : -1].float().log_softmax(-1)  # [N, C, V]
        cache = DynamicCache(config=model.config)
        with runtime.apply_plan(model, plan):
            steps = [model(wins[:, :context], use_cache=True, **{cache_argument(model): cache}).logits[:, -1]]
            for i in range(cont - 1):
                step = model(wins[:, context + i : context + i + 1], use_cache=True, **{cache_argument(model): cache})
                steps.append(step.logits[:, -1])
    other = torch.stack(steps, dim=1).float().log_softmax(-1)
    assert cache.layers[1].kept_length() < context  # the context was compressed
    targets = wins[:, context:]
    kl = (full.exp() * (full - other)).sum(-1)
    top1 = (full.argmax(-1) == other.argmax(-1)).double().mean().item()
    assert 0.0 < top1 < 1.0  # neither all nor none: the comparison below can tell a wrong count
    nll = lambda logp: -logp.gather(-1, targets[..., None]).mean().item()  # noqa: E731
    assert row["kl"] == pytest.approx(kl.mean().item(), rel=1e-3, abs=1e-7)
    assert row["kl"] > 1e-4  # keeping 30% of the context changes the predictions
    # a count over the 16 positions; only positions where the full cache's top two are within float noise (the
    # harness's full logits come from decode steps, ours from one forward) may count differently
    count = row["top1_agreement"] * kl.numel()
    assert count == pytest.approx(round(count))
    top2 = full.topk(2, dim=-1).values
    near_ties = int((top2[..., 0] - top2[..., 1] < 1e-4).sum())
    assert abs(round(count) - round(top1 * kl.numel())) <= near_ties
    assert row["full_score"] == pytest.approx(math.exp(nll(full)), rel=1e-4)
    assert row["score"] == pytest.approx(math.exp(nll(other)), rel=1e-4)
    assert row["ratio"] == pytest.approx(row["score"] / row["full_score"], rel=1e-9)
    # bytes: what the plan's cache held after the last step, vs the stock cache of the same tokens
    seen = context + cont - 1
    assert row["stock_bytes"] == runtime.stock_bytes(model.config, seen, batch_size=2)
    assert row["theoretical_bytes"] == runtime.theoretical_bytes(plan, model.config, seen, batch_size=2)
    assert row["physical_bytes"] == runtime.physical_bytes(cache)


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


def test_kcache_rows_report_the_value_rows_read_and_the_store(tiny, text_dir):
    import dataclasses

    model, tokenizer = tiny
    topn = torch.tensor([0, 16, 32], dtype=torch.int32)
    plan = dataclasses.replace(Plan.noop(model), methods=("kcache",), tensors={"kcache.topn": topn})
    settings = EvalSettings(tasks=("lm",), **SETTINGS)
    report = evaluate(model, tokenizer, [full_cache(), plan_method(plan, name="kc")], str(text_dir), settings)
    rows = {r["method"]: r for r in report["rows"]}
    kc, full = rows["kc"], rows["full"]
    assert full["store_bytes"] == 0 and full["values_read_fraction"] == 1.0
    seen = SETTINGS["contexts"][0] + SETTINGS["continuation"] - 1  # rows held at the last decode step, per head
    expected = (seen + 16 + 32) / (3 * seen)  # layer 0 reads all; layers 1 and 2 read their N
    assert kc["values_read_fraction"] == pytest.approx(expected)
    values_per_layer = kc["physical_bytes"] / 3 / 2  # K and V of a layer are the same size (no bookkeeping)
    assert kc["store_bytes"] >= 2 * values_per_layer * 0.99  # layers 1 and 2 keep their values in the store
    assert "values read" in render(report)
