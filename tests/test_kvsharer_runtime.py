"""KVSharer at run time: sharing layers hold nothing, skip their k/v projections and read their source's cache."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import tiny_model
from helpers import greedy, share_plan

import runtime
from runtime.kvsharer import SharedLayer, SkippedProjection
from runtime.plan import Plan, PlanError
from runtime.planfile import serialize as _serialize
from runtime.pyramidinfer import BudgetedLayer


def _prompt(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def _reference_logits(model, ids: torch.Tensor, sources: list[int]) -> torch.Tensor:
    """Logits of the stock model (no cache, stock attention) with each sharing layer's k/v projection outputs
    replaced by its source's: an independent implementation of cross-layer sharing (Llama: no k-norm, so the
    post-RoPE keys are then exactly the source's)."""
    captured: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for layer, source in enumerate(sources):
        attn = model.model.layers[layer].self_attn
        for name in ("k_proj", "v_proj"):
            if source == layer:
                def save(module, args, output, key=(layer, name)):
                    captured[key] = output
                handles.append(getattr(attn, name).register_forward_hook(save))
            else:
                def swap(module, args, output, key=(source, name)):
                    return captured[key]
                handles.append(getattr(attn, name).register_forward_hook(swap))
    try:
        with torch.no_grad():
            return model(ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()


def test_identity_map_is_token_identical_to_stock(llama):
    ids = _prompt(40)
    stock = greedy(llama, ids, 24)
    with runtime.apply_plan(llama, share_plan(llama, [0, 1, 2, 3])):
        out = greedy(llama, ids, 24)
    assert torch.equal(stock, out)


def test_sharing_matches_an_independent_reference(llama):
    sources = [0, 1, 1, 0]
    ids = _prompt(50, 3)
    reference = _reference_logits(llama, ids, sources)
    with runtime.apply_plan(llama, share_plan(llama, sources)), torch.no_grad():
        one_pass = llama(ids).logits
        # the same sequence fed as a prefill plus one token at a time (the decode path of the cache)
        cache = transformers.DynamicCache(config=llama.config)
        steps = [llama(ids[:, :30], past_key_values=cache).logits]
        for t in range(30, 50):
            steps.append(llama(ids[:, t : t + 1], past_key_values=cache).logits)
        incremental = torch.cat(steps, dim=1)
    torch.testing.assert_close(one_pass, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(incremental, reference, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(reference, llama(ids, use_cache=False).logits, atol=1e-3)  # sharing changed the output


@pytest.mark.parametrize("keep", [None, 0.5], ids=["full-source", "pyramid-source"])
def test_shared_layers_never_call_their_kv_projections(llama, keep):
    sources = [0, 1, 1, 0]
    originals = {(l, n): getattr(llama.model.layers[l].self_attn, n) for l in range(4) for n in ("k_proj", "v_proj")}
    calls: dict[tuple[int, str], int] = {key: 0 for key in originals}
    handles = [
        module.register_forward_hook(lambda m, a, o, key=key: calls.__setitem__(key, calls[key] + 1))
        for key, module in originals.items()
    ]
    try:
        with runtime.apply_plan(llama, share_plan(llama, sources, keep=keep)):
            assert isinstance(llama.model.layers[2].self_attn.k_proj, SkippedProjection)
            greedy(llama, _prompt(30), 8)
    finally:
        for handle in handles:
            handle.remove()
    for (layer, name), count in calls.items():
        assert (count == 0) == (sources[layer] != layer), f"layer {layer} {name}: {count} calls"
    # removing the plan restores the projections
    assert all(getattr(llama.model.layers[l].self_attn, n) is m for (l, n), m in originals.items())


@pytest.mark.parametrize("keep", [None, 0.5], ids=["full-source", "pyramid-source"])
def test_physical_bytes_drop_by_the_shared_layers_share(llama, keep):
    sources = [0, 1, 1, 0]
    ids = torch.cat([_prompt(120, s) for s in range(3)])
    cache = transformers.DynamicCache(config=llama.config)
    plan = share_plan(llama, sources, keep=keep)
    with runtime.apply_plan(llama, plan):
        greedy(llama, ids, 20, past_key_values=cache)
    seen = 139
    assert [type(layer) for layer in cache.layers][2:] == [SharedLayer, SharedLayer]
    assert all(layer.keys is None and layer.values is None for layer in cache.layers[2:])
    stock = runtime.stock_bytes(llama.config, seen, batch_size=3)
    physical = runtime.physical_bytes(cache)
    if keep is None:
        assert physical == stock // 2  # 2 of 4 layers own a full cache
    else:
        assert all(isinstance(layer, BudgetedLayer) for layer in cache.layers[:2])
        assert physical < 0.3 * stock
    theoretical = runtime.theoretical_bytes(plan, llama.config, seen, batch_size=3)
    assert theoretical <= physical <= theoretical * 1.25
    assert runtime.kept_lengths(cache)[2:] == [0, 0]


@pytest.mark.slow
@pytest.mark.parametrize("keep", [None, 0.5], ids=["full-source", "pyramid-source"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_left_padded_batch_rows_equal_solo_runs(arch, keep):
    model = tiny_model(arch)
    prompts = [_prompt(48, 1), _prompt(29, 2), _prompt(37, 3)]
    width = max(p.shape[1] for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - p.shape[1] :] = p[0]
        mask[row, width - p.shape[1] :] = 1
    with runtime.apply_plan(model, share_plan(model, [0, 0, 2, 0], keep=keep)):
        batch = greedy(model, ids, 24, attention_mask=mask)
        solos = [greedy(model, p, 24) for p in prompts]
    for row, solo in enumerate(solos):
        assert torch.equal(batch[row, width:], solo[0, prompts[row].shape[1] :]), f"row {row} differs from its solo run"


def test_sharing_works_without_use_cache(llama):
    sources = [0, 1, 1, 0]
    ids = _prompt(30, 5)
    with runtime.apply_plan(llama, share_plan(llama, sources)), torch.no_grad():
        no_cache = llama(ids, use_cache=False).logits
    torch.testing.assert_close(no_cache, _reference_logits(llama, ids, sources), atol=1e-5, rtol=1e-5)


def test_readers_vote_on_what_a_pyramid_source_keeps(llama):
    """With a reader, the source keeps what its own and the reader's queries attend to (not only its own)."""
    ids = _prompt(100, 7)
    held = {}
    for sources in ([0, 1, 2, 3], [0, 1, 1, 3]):
        cache = transformers.DynamicCache(config=llama.config)
        with runtime.apply_plan(llama, share_plan(llama, sources, keep=0.3)), torch.no_grad():
            llama(ids, past_key_values=cache)
        held[tuple(sources)] = cache.layers[1].positions.clone()
    assert held[(0, 1, 2, 3)].shape == held[(0, 1, 1, 3)].shape
    assert not torch.equal(held[(0, 1, 2, 3)], held[(0, 1, 1, 3)])


@pytest.mark.parametrize(
    "sources, message",
    [
        ([0, 2, 2, 3], "0 <= source <= layer"),  # forward reference
        ([0, 1, 7, 3], "0 <= source <= layer"),  # out of range
        ([0, -1, 2, 3], "0 <= source <= layer"),
        ([0, 0, 1, 3], "chains must be resolved"),
    ],
)
def test_bad_maps_are_refused_at_load_with_a_clear_error(tmp_path, llama, sources, message):
    plan = share_plan(llama, sources)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_serialize(plan.tensors, plan.metadata()))  # written without the writer's validation
    with pytest.raises(PlanError, match=message):
        Plan.load(path)


def _alternating_gemma3():
    """Tiny Gemma 3 with sliding and full-attention layers alternating (0 sliding, 1 full, ...)."""
    torch.manual_seed(0)
    kinds = ["sliding_attention", "full_attention"] * 3
    config = transformers.Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=128, sliding_window=16, query_pre_attn_scalar=16, layer_types=kinds,
        max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=None,
    )
    model = transformers.Gemma3ForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.mark.parametrize("sources", [[0, 1, 0, 3, 4, 5], [0, 1, 1, 3, 4, 5]], ids=["sliding->sliding", "full->sliding"])
def test_sliding_window_layers_cannot_share(sources):
    gemma = _alternating_gemma3()
    with pytest.raises(PlanError, match="only full-attention layers"):
        runtime.apply_plan(gemma, share_plan(gemma, sources))


@pytest.mark.parametrize("keep", [None, 0.5], ids=["full-source", "pyramid-source"])
def test_gemma3_full_attention_layers_share_beside_sliding_layers(keep):
    gemma = _alternating_gemma3()
    sources = [0, 1, 2, 1, 4, 1]  # full-attention layers 3 and 5 read layer 1
    ids = _prompt(60, 2)
    cache = transformers.DynamicCache(config=gemma.config)
    with runtime.apply_plan(gemma, share_plan(gemma, sources, keep=keep)):
        out = greedy(gemma, ids, 12, past_key_values=cache)
        again = greedy(gemma, ids, 12) if keep is None else None
    assert out.shape == (1, 72)
    assert isinstance(cache.layers[3], SharedLayer) and isinstance(cache.layers[5], SharedLayer)
    assert cache.layers[0].keys.shape[-2] <= 16  # sliding layers keep their window cache
    if again is not None:
        assert torch.equal(out, again)
