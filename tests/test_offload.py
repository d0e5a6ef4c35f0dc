"""Models bigger than one device: a tiny saved Llama loaded with accelerate's ``device_map="auto"`` and a
``max_memory`` smaller than the model (the embedding and layer 0 on the CPU, every other layer read from disk,
their parameters on ``meta``) calibrates to exactly the plan of the same model held in memory, for every method and
the joint search; ``--max-memory`` / ``--offload-folder`` on the command line.

Exact equality is expected, not a tolerance: offloading changes where weights wait between forwards, not the
arithmetic. The same CPU kernels run on the same float32 weights (read bit for bit from the same safetensors
file) in the same order.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import runtime
from calibrate.__main__ import main, parse_max_memory
from calibrate.pipeline import calibrate_model, device_map_summary
from calibrate.recipe import Recipe
from runtime.models import ModelSourceError, _placement_kwargs, input_device, memory_size

SEQ = 256
SAMPLES = 2
SHARER = {"threshold": 0.0, "share_layers": 1}  # random weights: accept a pair so the sharing runtime path runs


pytestmark = pytest.mark.usefixtures("isolated_cache")


def _model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.fixture(scope="module")
def models(tiny_dir, tmp_path_factory):
    """(tokenizer, the model in memory, the same model offloaded: max_memory half its size, the rest on disk)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    in_memory = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    offloaded = AutoModelForCausalLM.from_pretrained(
        tiny_dir, device_map="auto", max_memory={"cpu": _model_bytes(in_memory) // 2},
        offload_folder=str(tmp_path_factory.mktemp("offload")),
    ).eval()
    return tokenizer, in_memory, offloaded


def _recipe(tiny_dir, methods: list[str]) -> Recipe:
    return Recipe(
        model=str(tiny_dir), num_calibration_samples=SAMPLES, max_seq_length=SEQ, methods=methods, target_ratio=0.5,
        method_args={"kcache": {"queries": 16}, "kvcompress": {"probes": 2}, "kvsharer": dict(SHARER)},
    )


def _assert_same_tensors(a: runtime.Plan, b: runtime.Plan) -> None:
    assert sorted(a.tensors) == sorted(b.tensors)
    for name in a.tensors:
        assert a.tensors[name].dtype == b.tensors[name].dtype, name
        assert torch.equal(a.tensors[name], b.tensors[name]), f"{name} differs between in-memory and offloaded"
    assert a.params == b.params and a.methods == b.methods and a.target_ratio == b.target_ratio


def test_the_offloaded_model_really_is_offloaded(models):
    _, in_memory, offloaded = models
    placed = set(offloaded.hf_device_map.values())
    assert "disk" in placed and "cpu" in placed
    on_meta = [name for name, p in offloaded.named_parameters() if p.device.type == "meta"]
    assert on_meta and len(on_meta) < len(list(offloaded.parameters()))
    assert next(p for p in offloaded.parameters()).device.type in ("cpu", "meta")
    assert input_device(offloaded) == torch.device("cpu") and input_device(in_memory) == torch.device("cpu")
    summary = device_map_summary(offloaded)
    assert summary["disk"] >= 1 and summary["cpu"] >= 1 and device_map_summary(in_memory) is None
    ids = torch.randint(3, 300, (1, 40))
    assert torch.equal(in_memory(ids).logits, offloaded(ids).logits)  # the premise of exact equality below


def test_input_device_is_the_embeddings_execution_device_never_meta(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    everything_on_disk = AutoModelForCausalLM.from_pretrained(
        tiny_dir, device_map="auto", max_memory={"cpu": 1000}, offload_folder=str(tmp_path)
    )
    assert set(everything_on_disk.hf_device_map.values()) == {"disk"}
    assert everything_on_disk.get_input_embeddings().weight.device.type == "meta"
    assert input_device(everything_on_disk) == torch.device("cpu")


@pytest.mark.parametrize(
    "methods",
    [["pyramidinfer"], ["kvcompress"], ["kcache"], ["kvsharer"], ["pyramidinfer", "kvsharer", "kvcompress", "kcache"]],
    ids=["pyramidinfer", "kvcompress", "kcache", "kvsharer", "all-without-joint-search"],
)
def test_offloaded_calibration_equals_the_in_memory_plan(models, tiny_dir, methods):
    tokenizer, in_memory, offloaded = models
    recipe = _recipe(tiny_dir, methods)
    a = calibrate_model(in_memory, tokenizer, recipe, progress=False, search_seconds=0).plan
    b = calibrate_model(offloaded, tokenizer, recipe, progress=False, search_seconds=0).plan
    _assert_same_tensors(a, b)
    if "kvsharer" in methods:
        assert any(s != l for l, s in enumerate(b.tensors["kvsharer.share_source"].tolist()))  # sharing was run
    assert a.provenance["device_map"] is None and b.provenance["device_map"]["disk"] >= 1


@pytest.mark.slow
def test_offloaded_calibration_with_the_joint_search_equals_the_in_memory_plan(models, tiny_dir):
    """``--methods all`` with the joint search scoring every candidate (no time limit reached on either side)."""
    tokenizer, in_memory, offloaded = models
    recipe = _recipe(tiny_dir, ["pyramidinfer", "kvsharer", "kvcompress", "kcache"])
    a = calibrate_model(in_memory, tokenizer, recipe, progress=False, search_seconds=3600)
    b = calibrate_model(offloaded, tokenizer, recipe, progress=False, search_seconds=3600)
    assert all(row.get("scored", True) for row in a.report["joint"]["rows"] + b.report["joint"]["rows"])
    _assert_same_tensors(a.plan, b.plan)
    assert a.report["joint"]["rows"] == [
        {**row, "seconds": a_row["seconds"]} for row, a_row in zip(b.report["joint"]["rows"], a.report["joint"]["rows"])
    ]


# ------------------------------------------------------------------------------------------------ command line


def test_cli_max_memory_offloads_to_disk_and_writes_the_in_memory_plan(tiny_dir, tmp_path, capsys):
    common = [str(tiny_dir), "--max-seq-length", str(SEQ), "--num-calibration-samples", str(SAMPLES),
              "--methods", "pyramidinfer", "--search-seconds", "0", "--reproducible", "-q"]
    plain, offloaded, folder = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "offload"
    assert main([*common, "--out", str(plain)]) == 0
    assert main([*common, "--out", str(offloaded), "--max-memory", "cpu=300KB", "--offload-folder", str(folder)]) == 0
    a, b = runtime.load_plan(plain), runtime.load_plan(offloaded)
    _assert_same_tensors(a, b)
    assert b.recipe["device"] == "auto" and b.recipe["max_memory"] == {"cpu": "300KB"}
    assert b.provenance["device_map"]["disk"] >= 1 and a.provenance["device_map"] is None
    assert folder.is_dir()  # a folder the user names is kept
    assert not list((Path(_cache()) / "offload").glob("*"))  # nothing left behind in the default place either


def _cache() -> str:
    import os

    return os.environ["KVPLAN_CACHE"]


def test_parse_max_memory():
    assert parse_max_memory(None) is None
    assert parse_max_memory("0=75GiB,cpu=100GiB") == {"0": "75GiB", "cpu": "100GiB"}
    assert parse_max_memory(" cuda:1 = 20GB , CPU=1024, disk=1TiB ") == {"1": "20GB", "cpu": "1024", "disk": "1TiB"}
    assert memory_size("75GiB") == 75 * 2**30 and memory_size("1.5GB") == 1_500_000_000 and memory_size(512) == 512
    assert memory_size("300kb") == 300_000


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "DEVICE=SIZE"),
        ("cpu", "not DEVICE=SIZE"),
        ("cpu=", "not DEVICE=SIZE"),
        ("gpu=10GiB", "unknown device 'gpu'"),
        ("cpu=lots", "is not a memory size"),
        ("cpu=10GiB,cpu=2GiB", "twice"),
        ("cpu=0", "more than 0 bytes"),
        ("cpu=-1GiB", "is not a memory size"),
    ],
)
def test_bad_max_memory_exits_2_with_a_clear_message(tmp_path, capsys, spec, message):
    out = tmp_path / "p.safetensors"
    assert main(["smollm2-135m", "--out", str(out), "--max-memory", spec]) == 2
    err = capsys.readouterr().err
    assert message in err and "--max-memory" in err
    assert not out.exists()


def test_max_memory_with_another_device_or_offload_folder_without_auto_is_refused(tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    assert main(["smollm2-135m", "--out", str(out), "--max-memory", "cpu=1GiB", "--device", "cpu"]) == 2
    assert "cannot be combined with --device cpu" in capsys.readouterr().err
    assert main(["smollm2-135m", "--out", str(out), "--offload-folder", str(tmp_path)]) == 2
    assert "--offload-folder only applies" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["smollm2-135m", "--out", str(out), "--max-memory", "cpu=1GiB", "--offload-folder", str(blocker)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_gpu_in_max_memory_without_cuda_is_refused_before_loading():
    spec = Recipe(model="org/name", device="auto", max_memory={"0": "75GiB", "cpu": "100GiB"})
    with pytest.raises(ModelSourceError, match="names GPU 0, but 0 CUDA device"):
        _placement_kwargs(spec)
    kwargs = _placement_kwargs(Recipe(model="org/name", device="auto", max_memory={"cpu": "2GiB"}), "/tmp/off")
    assert kwargs == {"device_map": "auto", "max_memory": {"cpu": 2 * 2**30}, "offload_folder": "/tmp/off"}


def test_help_lists_the_offload_options(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "--max-memory" in text and "--offload-folder" in text and "0=75GiB,cpu=100GiB" in text
