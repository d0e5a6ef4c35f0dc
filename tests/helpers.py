"""Plan builders, tiny models and Hub test plumbing (an endpoint on 127.0.0.1, no internet) for the tests."""

from __future__ import annotations

from pathlib import Path

import torch

from runtime.plan import Plan, fingerprint_from_model


def tiny_gqa_model(seed: int = 0, layers: int = 4, heads: int = 6, kv_heads: int = 2, head_dim: int = 16):
    """A tiny random llama (conftest's config) with ``heads // kv_heads`` query heads per KV head; greedy generation
    never stops early (no EOS) and pads with 0."""
    import transformers
    from conftest import tiny_config

    config = tiny_config("llama")
    config.num_hidden_layers = layers
    config.num_attention_heads = heads
    config.num_key_value_heads = kv_heads
    config.head_dim = head_dim
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def tiny_calibration_llama(vocab_size: int, seed: int = 0):
    """The tiny random llama the calibration tests calibrate (4 layers, GQA 2, 4096 positions, BOS 1); greedy
    generation never stops early and pads with 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab_size, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def hub_config(name_or_path: str = "org/base-model"):
    """The tiny Llama config the Hub tests' plans are made for (4 layers, 4 heads, 2 KV heads, vocab 128)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128,
    )
    config._name_or_path = name_or_path
    return config


def hub_plan(name_or_path: str = "org/base-model", **fields) -> Plan:
    """A PyramidInfer + KVSharer plan for :func:`hub_config`; ``fields`` replace Plan fields (recipe, provenance...)."""
    values = dict(
        fingerprint=fingerprint_from_model(hub_config(name_or_path)),
        methods=("pyramidinfer", "kvsharer"),
        params={"pyramidinfer": {"window": 8, "sink": 2}},
        tensors={
            "pyramidinfer.layer_keep": torch.tensor([1.0, 0.5, 0.5, 0.25]),
            "kvsharer.share_source": torch.tensor([0, 0, 2, 2], dtype=torch.int32),
        },
        target_ratio=0.5,
        recipe={"alias": "tiny", "pyramidinfer": {"window": 8}},
        provenance={"seed": 0, "samples": 4},
    )
    values.update(fields)
    return Plan(**values)


# Every name lookup but the loopback one fails: a test that uses it cannot reach the internet, whatever a library
# tries. Applied in-process by forbid_internet, and in a subprocess as the sitecustomize of no_internet_site.
_NO_INTERNET = '''
import socket

def loopback_only(lookup):
    def guarded(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise socket.gaierror(f"this test has no internet (lookup of {host!r})")
        return lookup(host, *args, **kwargs)
    return guarded
'''


def forbid_internet(monkeypatch) -> None:
    """Until the test ends, every name lookup in this process but the loopback one fails."""
    import socket

    namespace: dict = {}
    exec(_NO_INTERNET, namespace)  # noqa: S102 (the constant above)
    monkeypatch.setattr(socket, "getaddrinfo", namespace["loopback_only"](socket.getaddrinfo))


def no_internet_site(folder: Path) -> Path:
    """``folder`` with a ``sitecustomize.py`` that forbids the internet; put it first on a subprocess's PYTHONPATH."""
    folder.mkdir(parents=True, exist_ok=True)
    install = "\nsocket.getaddrinfo = loopback_only(socket.getaddrinfo)\n"
    (folder / "sitecustomize.py").write_text(_NO_INTERNET + install)
    return folder


def point_hub_at(monkeypatch, endpoint: str, home: Path, token: str | None = None) -> None:
    """What HF_ENDPOINT=endpoint, HF_HOME=home, HF_TOKEN=token and HF_HUB_OFFLINE=0 do when set before
    huggingface_hub is imported (it reads them at import; its own tests patch its constants the same way)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # offline mode forbids even loopback requests
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
    if hasattr(constants, "AGENT_HARNESSES_PATH"):  # huggingface_hub 2.x caches a registry it fetches from ENDPOINT
        monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    if token is not None:
        monkeypatch.setenv("HF_TOKEN", token)


def random_ids(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    """``[rows, length]`` random token ids of the tiny models' vocabulary (no special tokens)."""
    return torch.randint(3, 120, (rows, length), generator=torch.Generator().manual_seed(seed))


def left_padded(lengths: list[int], seed: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)`` of a left-padded batch: row ``i`` holds ``lengths[i]`` random tokens (seed
    ``seed + i``) after zeros."""
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = random_ids(1, n, seed=seed + row)
        mask[row, width - n :] = 1
    return ids, mask


def assert_rows_equal_solo_runs(model, lengths: list[int], new_tokens: int, seed: int = 10) -> None:
    """Greedy generation of a left-padded batch (:func:`left_padded`) under whatever plan is applied: every row's new
    tokens equal the same row generated alone."""
    width = max(lengths)
    ids, mask = left_padded(lengths, seed)
    batch = greedy(model, ids, new_tokens, attention_mask=mask)
    for row, n in enumerate(lengths):
        solo = greedy(model, ids[row : row + 1, width - n :], new_tokens)
        assert torch.equal(batch[row, width:], solo[0, n:]), f"row {row} differs from its solo run"


def pyramid_plan(model, keep, window: int = 8, sink: int = 2, **extra) -> Plan:
    layers = model.config.num_hidden_layers
    keep = torch.as_tensor(keep, dtype=torch.float32).expand(layers).clone()
    return Plan(
        fingerprint=fingerprint_from_model(model),
        methods=("pyramidinfer",),
        params={"pyramidinfer": {"window": window, "sink": sink, **extra}},
        tensors={"pyramidinfer.layer_keep": keep},
        target_ratio=float(keep.mean()),
    )


def greedy(model, ids, new_tokens=16, **kwargs):
    return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)


def share_plan(model, sources, keep=None, window: int = 8, sink: int = 2) -> Plan:
    """A KVSharer plan with ``share_source = sources`` (alone, or with PyramidInfer at ``keep`` on every layer)."""
    layers = model.config.num_hidden_layers
    tensors = {"kvsharer.share_source": torch.tensor(sources, dtype=torch.int32)}
    methods: tuple[str, ...] = ("kvsharer",)
    params: dict = {}
    if keep is not None:
        methods = ("pyramidinfer", "kvsharer")
        tensors["pyramidinfer.layer_keep"] = torch.full((layers,), float(keep))
        params["pyramidinfer"] = {"window": window, "sink": sink}
    owners = sum(1 for layer, source in enumerate(sources) if source == layer)
    return Plan(
        fingerprint=fingerprint_from_model(model),
        methods=methods,
        params=params,
        tensors=tensors,
        target_ratio=owners / layers * (1.0 if keep is None else float(keep)),
    )


def kvcompress_plan(model, keep, shares, window: int = 8, sink: int = 2, with_pyramid: bool = True, **extra) -> Plan:
    """A KV-Compress plan: per-layer keep ``keep`` (PyramidInfer's tensor, or KV-Compress's own without it) and
    per-head shares ``shares`` ``[L, H_kv]`` (rows normalised to sum to 1)."""
    layers = model.config.num_hidden_layers
    keep = torch.as_tensor(keep, dtype=torch.float32).expand(layers).clone()
    shares = torch.as_tensor(shares, dtype=torch.float32).expand(layers, -1).clone()
    shares = shares / shares.sum(dim=1, keepdim=True)
    params = {"kvcompress": {"window": window, "sink": sink, **extra}}
    tensors = {"kvcompress.head_keep": shares}
    if with_pyramid:
        methods: tuple[str, ...] = ("pyramidinfer", "kvcompress")
        params["pyramidinfer"] = {"window": window, "sink": sink}
        tensors["pyramidinfer.layer_keep"] = keep
    else:
        methods = ("kvcompress",)
        tensors["kvcompress.layer_keep"] = keep
    return Plan(
        fingerprint=fingerprint_from_model(model),
        methods=methods,
        params=params,
        tensors=tensors,
        target_ratio=float(keep.mean()),
    )


def error_line(capsys) -> str:
    """The one ``error: ...`` line a CLI printed on stderr (nothing on stdout)."""
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    return lines[0]
