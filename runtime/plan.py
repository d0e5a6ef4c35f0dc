"""The plan schema: what a kvplan plan holds, the rules it obeys, and the :class:`Plan` object.

A plan is written once by ``python -m calibrate`` and read on every ``runtime.apply_plan``. The bytes of the file
are read and written by :mod:`runtime.planfile`; this module gives them meaning and checks everything a loader
reads (metadata, JSON fields, fingerprint, every method's tensors and parameters as its registration in
:mod:`runtime.registry` describes them, and the ranges of inspection tensors), so that a file from a stranger can
only ever produce a valid :class:`Plan` or a :class:`PlanError` (schema: ``docs/design.md`` section 1).

Shape symbols used in the docstrings: ``L`` = ``num_hidden_layers``, ``H_kv`` = ``num_key_value_heads``.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from . import hub, planfile, registry
from .errors import PlanError
from .planfile import (
    DEFAULT_FILENAME,
    MAX_INT,
    SCHEMA_VERSION,
    check_json_value,
    dumps,
    installed_version,
    is_int,
    is_number,
    is_scalar,
    loads,
    parse_version,
    type_name,
)
from .registry import METHODS
from .schema import TensorContext

__all__ = [
    "METHODS",
    "SCHEMA_VERSION",
    "FINGERPRINT_KEYS",
    "Plan",
    "PlanError",
    "fingerprint_from_model",
    "load_plan",
    "weights_digest",
]

_CALIBRATE_HINT = "calibrate one for this model with `python -m calibrate <model> --out plan.safetensors`"
_UPGRADE_HINT = "upgrade kvplan (`pip install -U kvplan`)"

_META_PREFIX = "kvplan."
_META_KEYS = (
    "kvplan.schema_version",
    "kvplan.version",
    "kvplan.methods",
    "kvplan.params",
    "kvplan.fingerprint",
    "kvplan.target_ratio",
    "kvplan.recipe",
    "kvplan.provenance",
)

_FINGERPRINT_INT_KEYS = (
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_size",
    "vocab_size",
)
FINGERPRINT_KEYS = (
    "model_type",
    *_FINGERPRINT_INT_KEYS,
    "layer_types",
    "sliding_window",
    "name_or_path",
    "revision",
)
"""Keys every fingerprint has. ``weights`` (see :func:`weights_digest`) is optional: plans made before it existed
lack it."""
STRUCTURAL_KEYS = ("model_type", *_FINGERPRINT_INT_KEYS, "layer_types")
"""Fingerprint fields that must match the model a plan is applied to."""

_TENSOR_NAME = re.compile(r"^(?P<method>[a-z0-9_]+)\.(?P<name>[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199})$")
_WEIGHTS = re.compile(r"^(float32|float16|bfloat16|[a-z0-9_]{1,20}):[0-9a-f]{64}$")
_DIGEST_SAMPLES = 512


# ----------------------------------------------------------------------------------------------------------
# Fingerprint
# ----------------------------------------------------------------------------------------------------------


def _text_config(model_or_config: Any) -> tuple[Any, Any]:
    """(top-level config, decoder text config) of a transformers model or config."""
    config = getattr(model_or_config, "config", model_or_config)
    get_text_config = getattr(config, "get_text_config", None)
    text_config = get_text_config(decoder=True) if callable(get_text_config) else config
    return config, text_config


def fingerprint_from_model(model_or_config: Any) -> dict[str, Any]:
    """The plan fingerprint of a transformers model or ``PretrainedConfig``.

    Multimodal configs (e.g. Gemma 3's ``Gemma3Config``) are reduced to their decoder text config, so the
    fingerprint (including ``model_type``, e.g. ``gemma3_text``) is the same whether the plan was
    calibrated on the causal LM or on the conditional-generation wrapper.
    """
    if isinstance(model_or_config, Mapping):
        return dict(model_or_config)
    config, text = _text_config(model_or_config)
    try:
        heads = int(text.num_attention_heads)
        hidden = int(text.hidden_size)
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or hidden // heads
        layer_types = getattr(text, "layer_types", None)
        sliding_window = getattr(text, "sliding_window", None)
        fingerprint = {
            "model_type": str(getattr(text, "model_type", "") or getattr(config, "model_type", "")),
            "num_hidden_layers": int(text.num_hidden_layers),
            "num_attention_heads": heads,
            "num_key_value_heads": int(kv_heads),
            "head_dim": int(head_dim),
            "hidden_size": hidden,
            "vocab_size": int(text.vocab_size),
            "layer_types": [str(t) for t in layer_types] if layer_types is not None else None,
            "sliding_window": sliding_window if is_int(sliding_window) and sliding_window > 0 else None,
            "name_or_path": str(getattr(config, "_name_or_path", "") or getattr(text, "_name_or_path", "") or ""),
            "revision": _commit_hash(config),
        }
        digest = weights_digest(model_or_config) if isinstance(model_or_config, torch.nn.Module) else None
        if digest is not None:
            fingerprint["weights"] = digest
    except (AttributeError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise PlanError(f"cannot read the model's structure from its config ({type(config).__name__}): {exc}") from exc
    return fingerprint


def weights_digest(model: torch.nn.Module) -> str | None:
    """``"<dtype>:<sha256>"`` of the model's weights: every parameter's name, shape and up to 512 evenly spaced
    values. It identifies the weights whatever route loaded them (kvplan's converted GGUF copy, plain
    ``from_pretrained(dir, gguf_file=...)``, a Hub id or a local directory), where ``name_or_path`` does not.
    None when a parameter has no data here (meta / offloaded) or the parameters mix dtypes."""
    digest = hashlib.sha256()
    dtypes = set()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if param.device.type == "meta":
            return None
        dtypes.add(param.dtype)
        flat = param.detach().reshape(-1)
        if flat.numel() > _DIGEST_SAMPLES:
            index = torch.arange(_DIGEST_SAMPLES, device=flat.device) * (flat.numel() - 1) // (_DIGEST_SAMPLES - 1)
            flat = flat[index]
        digest.update(f"{name}:{list(param.shape)}:".encode())
        digest.update(flat.float().cpu().numpy().tobytes())
    if len(dtypes) != 1:
        return None
    return f"{str(dtypes.pop()).removeprefix('torch.')}:{digest.hexdigest()}"


def _commit_hash(config: Any) -> str | None:
    """The Hub commit a config was loaded from, when transformers recorded it."""
    value = getattr(config, "_commit_hash", None)
    return value if isinstance(value, str) and value else None


def _check_fingerprint(fingerprint: Any) -> None:
    """Types and cross-field rules of a fingerprint dict."""
    if not isinstance(fingerprint, dict):
        raise PlanError(f"fingerprint must be a JSON object, got {type_name(fingerprint)}")
    missing = [key for key in FINGERPRINT_KEYS if key not in fingerprint]
    if missing:
        raise PlanError(f"fingerprint is missing {', '.join(missing)}")
    check_json_value("fingerprint", fingerprint)
    if not isinstance(fingerprint["model_type"], str) or not fingerprint["model_type"]:
        raise PlanError(f"fingerprint.model_type must be a non-empty string, got {fingerprint['model_type']!r}")
    for key in _FINGERPRINT_INT_KEYS:
        value = fingerprint[key]
        if not is_int(value) or not 1 <= value <= MAX_INT:
            raise PlanError(f"fingerprint.{key} must be a positive integer, got {value!r}")
    kv_heads, heads = fingerprint["num_key_value_heads"], fingerprint["num_attention_heads"]
    if heads % kv_heads:
        raise PlanError(
            f"fingerprint: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})"
        )
    _check_layer_types(fingerprint["layer_types"], fingerprint["num_hidden_layers"])
    window = fingerprint["sliding_window"]
    if window is not None and (not is_int(window) or window < 1):
        raise PlanError(f"fingerprint.sliding_window must be null or a positive integer, got {window!r}")
    if not isinstance(fingerprint["name_or_path"], str):
        raise PlanError(f"fingerprint.name_or_path must be a string, got {type_name(fingerprint['name_or_path'])}")
    revision = fingerprint["revision"]
    if revision is not None and not isinstance(revision, str):
        raise PlanError(f"fingerprint.revision must be null or a string, got {type_name(revision)}")
    weights = fingerprint.get("weights")
    if weights is not None and (not isinstance(weights, str) or not _WEIGHTS.fullmatch(weights)):
        raise PlanError(f"fingerprint.weights must be null or '<dtype>:<sha256 hex>', got {weights!r:.80}")
    unknown = sorted(set(fingerprint) - set(FINGERPRINT_KEYS) - {"weights"})
    if unknown:
        raise PlanError(f"fingerprint has unknown field(s) {unknown}; made by a newer kvplan? {_UPGRADE_HINT}")


def _check_layer_types(layer_types: Any, num_layers: int) -> None:
    if layer_types is None:
        return
    if not isinstance(layer_types, (list, tuple)) or not all(isinstance(t, str) for t in layer_types):
        raise PlanError(f"fingerprint.layer_types must be null or a list of strings, got {layer_types!r:.80}")
    if len(layer_types) != num_layers:
        raise PlanError(f"fingerprint.layer_types has {len(layer_types)} entries for {num_layers} layers")


# ----------------------------------------------------------------------------------------------------------
# Semantic checks shared by save and load: every method's part as its registration describes it
# ----------------------------------------------------------------------------------------------------------


def _check_methods(methods: Any) -> None:
    if not isinstance(methods, (list, tuple)):
        raise PlanError(f"methods must be a list of method names, got {type_name(methods)}")
    for method in methods:
        if not isinstance(method, str) or method not in METHODS:
            raise PlanError(
                f"unknown method {method!r:.40}: this kvplan ({installed_version()}) knows {', '.join(METHODS)}; "
                f"the plan needs a newer kvplan: {_UPGRADE_HINT}"
            )
    if len(set(methods)) != len(methods):
        raise PlanError(f"methods lists a method twice: {list(methods)}")


def _check_params(params: Any, methods: tuple[str, ...]) -> None:
    if not isinstance(params, dict):
        raise PlanError(f"params must be a JSON object {{method: {{name: value}}}}, got {type_name(params)}")
    for method, values in params.items():
        if method not in methods:
            raise PlanError(f"params has an entry for {method!r}, which is not an enabled method ({list(methods)})")
        if not isinstance(values, dict):
            raise PlanError(f"params.{method} must be a JSON object, got {type_name(values)}")
        for name, value in values.items():
            if not isinstance(name, str) or not is_scalar(value):
                raise PlanError(f"params.{method}.{name} = {value!r:.80} must be a JSON scalar")
    for method in methods:
        _check_method_params(method, params.get(method, {}))


def _check_method_params(method: str, values: dict[str, Any]) -> None:
    spec = registry.get(method)
    known = {p.name: p for p in spec.runtime_params()}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise PlanError(
            f"params.{method} has parameter(s) {unknown} that this kvplan ({installed_version()}) does not know "
            f"(known: {sorted(known)}); the plan needs a newer kvplan: {_UPGRADE_HINT}"
        )
    for name, param in known.items():
        if name not in values:
            if param.in_plan == "always":
                raise PlanError(f"params.{method}.{name} is required ({param.describe()})")
            continue
        try:
            param.validate(values[name], f"params.{method}.{name}")
        except ValueError as exc:
            raise PlanError(str(exc)) from None


def _check_target_ratio(ratio: Any) -> None:
    if ratio is None:
        return
    if not is_number(ratio) or not math.isfinite(ratio) or not 0 < ratio <= 1:
        raise PlanError(f"target_ratio must be null or a number in (0, 1], got {ratio!r}")


def _check_json_dict(what: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise PlanError(f"{what} must be a JSON object, got {type_name(value)}")
    check_json_value(what, value)


def _check_tensor_basics(name: str, tensor: Any, methods: tuple[str, ...]) -> None:
    """Name, type, dtype and finiteness rules that hold for every tensor in a plan."""
    if not isinstance(name, str):
        raise PlanError(f"tensor names must be strings, got {name!r}")
    match = _TENSOR_NAME.fullmatch(name)
    if match is None or match["method"] not in METHODS:
        raise PlanError(f"tensor name {name!r} must be '<method>.<name>' with <method> one of {', '.join(METHODS)}")
    if not isinstance(tensor, torch.Tensor):
        raise PlanError(f"tensor {name} must be a torch.Tensor, got {type_name(tensor)}")
    if tensor.dtype not in planfile.DTYPE_TAGS:
        raise PlanError(f"tensor {name} has dtype {tensor.dtype}; plan tensors must be float32 or int32")
    if tensor.layout != torch.strided or tensor.device.type == "meta":
        raise PlanError(f"tensor {name} must be a dense tensor with data (got {tensor.layout} on {tensor.device})")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise PlanError(f"tensor {name} contains NaN or infinite values")


def _check_tensors(tensors: Any, methods: tuple[str, ...], fingerprint: dict[str, Any]) -> None:
    """Every tensor: basics; each enabled method's required tensor present; every known tensor's shape, dtype and
    value rules (ranges of inspection tensors too, also of a method that is not enabled). Unknown
    ``<method>.<name>`` tensors are carried as opaque inspection data: nothing reads or shows them."""
    if not isinstance(tensors, dict):
        raise PlanError(f"tensors must be a dict name -> torch.Tensor, got {type_name(tensors)}")
    for name, tensor in tensors.items():
        _check_tensor_basics(name, tensor, methods)
    context = TensorContext(fingerprint=fingerprint, tensors={n: t.detach().cpu() for n, t in tensors.items()})
    for spec in registry.specs():
        required = spec.required_tensor
        if spec.name in methods and required.name not in tensors:
            raise PlanError(f"{spec.name} is enabled but the plan has no {required.name} tensor ({required.meaning})")
        if spec.name not in methods and required.name in tensors:
            raise PlanError(
                f"tensor {required.name} is present but {spec.name} is not enabled; enable it or drop the tensor"
            )
        for tensor_spec in spec.tensors:
            if tensor_spec.name in tensors:
                _check_tensor(tensor_spec, context.tensors[tensor_spec.name], context)


def _check_tensor(spec, tensor: torch.Tensor, context: TensorContext) -> None:
    shape = spec.expected_shape(context.fingerprint, tuple(tensor.shape))
    symbols = ", ".join(map(str, spec.shape))
    if tensor.dtype != spec.dtype or tuple(tensor.shape) != shape:
        expected = [("*" if s == "*" else d) for s, d in zip(spec.shape, shape)]
        raise PlanError(
            f"tensor {spec.name} must be {_dtype_name(spec.dtype)} of shape {expected} ([{symbols}] from the "
            f"fingerprint), got {_dtype_name(tensor.dtype)} {list(tensor.shape)}"
        )
    problem = spec.check(tensor, context)
    if problem:
        raise PlanError(f"tensor {spec.name}: {problem}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _plan_from_metadata(metadata: dict[str, str], tensors: dict[str, torch.Tensor], source: str) -> "Plan":
    """Decode the kvplan.* metadata (schema version already checked) into an unchecked Plan."""
    missing = [key for key in _META_KEYS if key not in metadata]
    if missing:
        raise PlanError(f"{source}: metadata is missing {', '.join(missing)}")
    if metadata.get("format", "pt") != "pt":
        raise PlanError(f"{source}: metadata format must be 'pt', got {metadata['format']!r:.40}")
    parse_version(metadata["kvplan.version"])
    json_keys = ("methods", "params", "fingerprint", "target_ratio", "recipe", "provenance")
    fields = {key: loads(metadata[f"{_META_PREFIX}{key}"], f"{source}: kvplan.{key}") for key in json_keys}
    _check_methods(fields["methods"])
    return Plan(
        fingerprint=fields["fingerprint"],
        methods=tuple(fields["methods"]),
        params=fields["params"],
        tensors=tensors,
        target_ratio=fields["target_ratio"],
        recipe=fields["recipe"],
        provenance=fields["provenance"],
        kvplan_version=metadata["kvplan.version"],
    )


# ----------------------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------------------


def _canonical_methods(methods: Any) -> Any:
    """Known method names in METHODS order; anything odd is left as is for ``check`` to report."""
    if isinstance(methods, (list, tuple)) and all(isinstance(m, str) and m in METHODS for m in methods):
        return tuple(sorted(methods, key=METHODS.index))
    return methods


@dataclass(eq=False)
class Plan:
    """A KV-cache compression plan for one model.

    Attributes:
        fingerprint: structure of the model the plan was calibrated for (see ``FINGERPRINT_KEYS``).
        methods: enabled methods, in ``METHODS`` order (``()`` = a plan that changes nothing).
        params: ``{method: {name: JSON scalar}}`` for enabled methods, e.g. ``{"pyramidinfer": {"window": 32,
            "sink": 4}}``.
        tensors: ``"<method>.<name>" -> tensor``; per enabled method one required tensor (its registration in ``runtime.registry``):
            ``pyramidinfer.layer_keep`` float32 ``[L]``, ``kvsharer.share_source`` int32 ``[L]``,
            ``kvcompress.head_keep`` float32 ``[L, H_kv]``, ``kcache.topn`` int32 ``[L]``; any other
            float32/int32 tensor is inspection data the runtime never reads.
        target_ratio: fraction of full KV memory the plan aims to keep, or None.
        recipe: the resolved calibration recipe (JSON object).
        provenance: data hash, seed, counts, timings, versions (JSON object).
        kvplan_version: version of kvplan that made the plan.

    The constructor does not validate; :meth:`check` (called by :meth:`save` and :meth:`load`) does.
    """

    fingerprint: dict[str, Any]
    methods: tuple[str, ...] = ()
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    target_ratio: float | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    kvplan_version: str = field(default_factory=installed_version)

    def __post_init__(self) -> None:
        self.methods = _canonical_methods(self.methods)

    # -- equality ------------------------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        same_fields = (
            self.fingerprint == other.fingerprint
            and self.methods == other.methods
            and self.params == other.params
            and self.target_ratio == other.target_ratio
            and self.recipe == other.recipe
            and self.provenance == other.provenance
            and self.kvplan_version == other.kvplan_version
            and set(self.tensors) == set(other.tensors)
        )
        return same_fields and all(
            self.tensors[name].dtype == other.tensors[name].dtype
            and torch.equal(self.tensors[name].cpu(), other.tensors[name].cpu())
            for name in self.tensors
        )

    __hash__ = None  # type: ignore[assignment]

    # -- convenience views ---------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        """``L``: number of decoder layers of the model the plan was made for."""
        return int(self.fingerprint["num_hidden_layers"])

    @property
    def layer_keep(self) -> torch.Tensor | None:
        """float32 ``[L]``: fraction of the context each layer keeps (PyramidInfer), or None."""
        return self.tensors.get("pyramidinfer.layer_keep")

    @property
    def share_source(self) -> torch.Tensor | None:
        """int32 ``[L]``: the layer whose cache each layer reads (KVSharer), or None."""
        return self.tensors.get("kvsharer.share_source")

    @property
    def head_keep(self) -> torch.Tensor | None:
        """float32 ``[L, H_kv]``: per-KV-head share of each layer's budget (KV-Compress), or None."""
        return self.tensors.get("kvcompress.head_keep")

    @property
    def topn(self) -> torch.Tensor | None:
        """int32 ``[L]``: values read per decode step, 0 = all (KCache), or None."""
        return self.tensors.get("kcache.topn")

    @property
    def is_noop(self) -> bool:
        """True when no method is enabled: applying the plan changes nothing."""
        return not self.methods

    # -- validation ----------------------------------------------------------------------------------------

    def check(self) -> None:
        """Raise :class:`PlanError` unless the plan obeys every rule of the file schema."""
        _check_fingerprint(self.fingerprint)
        _check_methods(self.methods)
        _check_params(self.params, tuple(self.methods))
        _check_target_ratio(self.target_ratio)
        _check_json_dict("recipe", self.recipe)
        _check_json_dict("provenance", self.provenance)
        parse_version(self.kvplan_version)
        _check_tensors(self.tensors, tuple(self.methods), self.fingerprint)

    def validate(self, model_or_config: Any) -> None:
        """Raise :class:`PlanError` unless this plan fits ``model_or_config`` (a model, config or fingerprint).

        Structural fields must match exactly. Identity only warns (a fine-tune or a re-upload with the same
        structure can reuse a plan, at some quality risk): when the plan and the model both carry a weights digest
        of the same dtype, it decides (so the same weights loaded by another route are recognised); otherwise a
        different ``name_or_path`` or ``revision`` warns.
        """
        self.check()
        model = fingerprint_from_model(model_or_config)
        mismatches = [
            f"{key}: plan {self.fingerprint.get(key)!r} vs model {model.get(key)!r}"
            for key in STRUCTURAL_KEYS
            if _normalize(self.fingerprint.get(key)) != _normalize(model.get(key))
        ]
        if mismatches:
            raise PlanError(
                f"this plan was calibrated for {self._model_label(self.fingerprint)}, not for "
                f"{self._model_label(model)}; mismatching fields: {'; '.join(mismatches)}. {_CALIBRATE_HINT}"
            )
        self._warn_identity(model)

    def _warn_identity(self, model: dict[str, Any]) -> None:
        mine, theirs = self.fingerprint.get("weights"), model.get("weights")
        if mine and theirs and mine.split(":")[0] == theirs.split(":")[0]:
            if mine != theirs:
                warnings.warn(
                    f"the model's weights differ from those the plan was calibrated on "
                    f"({self.fingerprint.get('name_or_path') or 'unnamed'}); the structure matches, so the plan is "
                    "applied, but its quality was measured on the other weights",
                    stacklevel=3,
                )
            return
        for key in ("name_or_path", "revision"):
            mine, theirs = self.fingerprint.get(key), model.get(key)
            if mine and theirs and mine != theirs:
                warnings.warn(
                    f"plan {key} {mine!r} differs from the model's {theirs!r}; the structure matches, "
                    "so the plan is applied, but its quality was measured on the other weights",
                    stacklevel=3,
                )

    @staticmethod
    def _model_label(fingerprint: dict[str, Any]) -> str:
        name = fingerprint.get("name_or_path") or "an unnamed model"
        return f"{name} ({fingerprint.get('model_type')}, {fingerprint.get('num_hidden_layers')} layers)"

    # -- construction --------------------------------------------------------------------------------------

    @classmethod
    def noop(cls, model_or_config: Any) -> "Plan":
        """A plan with every method off for ``model_or_config``: applying it changes nothing."""
        return cls(fingerprint=fingerprint_from_model(model_or_config))

    # -- files ---------------------------------------------------------------------------------------------

    def metadata(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` map (all strings) this plan is saved with."""
        ratio = float(self.target_ratio) if is_number(self.target_ratio) else self.target_ratio
        return {
            "format": "pt",
            "kvplan.schema_version": str(SCHEMA_VERSION),
            "kvplan.version": self.kvplan_version,
            "kvplan.methods": dumps(list(self.methods)),
            "kvplan.params": dumps(self.params),
            "kvplan.fingerprint": dumps(self.fingerprint),
            "kvplan.target_ratio": dumps(ratio),
            "kvplan.recipe": dumps(self.recipe),
            "kvplan.provenance": dumps(self.provenance),
        }

    def to_bytes(self) -> bytes:
        """The file content :meth:`save` writes (validated; deterministic)."""
        self.check()
        return planfile.serialize(self.tensors, self.metadata())

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Validate and write the plan atomically to ``path``; returns the path.

        An invalid plan raises :class:`PlanError` and leaves any existing file untouched.
        """
        target = Path(path)
        data = self.to_bytes()
        try:
            planfile.write_atomic(target, data)
        except OSError as exc:
            raise PlanError(f"cannot write plan to {target}: {exc}") from exc
        return target

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> "Plan":
        """Parse and validate plan file content; raises only :class:`PlanError` for bad content."""
        if len(data) > planfile.MAX_FILE_BYTES:
            raise PlanError(f"{source}: {len(data)} bytes is larger than any plan (limit {planfile.MAX_FILE_BYTES})")
        entries, metadata = planfile.parse_header(data, source)
        tensors = planfile.load_tensors(data, entries, source)
        plan = _plan_from_metadata(metadata, tensors, source)
        try:
            plan.check()
        except PlanError as exc:
            raise PlanError(f"{source}: {exc}") from exc
        return plan

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Plan":
        """Read and validate a local plan file (or a directory holding ``plan.safetensors``)."""
        return cls.from_bytes(planfile.read_limited(Path(path)), source=str(path))

    @classmethod
    def from_pretrained(
        cls, repo_id: str, revision: str | None = None, filename: str = DEFAULT_FILENAME, **hub_kwargs: Any
    ) -> "Plan":
        """Download (or find in the HF cache) ``filename`` of Hub repo ``repo_id`` and load it.

        ``revision``: a branch, tag or 40-hex commit sha (a cached sha needs no network). ``hub_kwargs``:
        ``cache_dir``, ``endpoint``, ``local_files_only``, ``token``. Every failure raises :class:`PlanError`.
        """
        path = hub.download_file(repo_id, revision=revision, filename=filename, **hub_kwargs)
        try:
            return cls.load(path)
        except PlanError as exc:
            raise PlanError(
                f"{hub.where(repo_id, filename, revision)}: {exc} (that Hub file is not a plan this kvplan can load: "
                "check the repo id, revision and filename)"
            ) from exc

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload the plan, its recipe and a model card to Hub repo ``repo_id``; returns the commit sha.

        ``kwargs``: ``revision`` (a branch, created if missing), ``private``, ``commit_message``, ``token``,
        ``results`` (measured figures for the card), ``license`` (see :func:`runtime.hub.push_plan`).
        """
        return hub.push_plan(self, repo_id, **kwargs)

    # -- display -------------------------------------------------------------------------------------------

    def summary(self) -> str:
        """A few human-readable lines: model, methods with parameters, target ratio, per-layer tensors."""
        fp = self.fingerprint
        lines = [
            f"kvplan plan (schema {SCHEMA_VERSION}, kvplan {self.kvplan_version}) for "
            f"{fp.get('name_or_path') or '<unnamed>'}"
            + (f"@{fp['revision']}" if fp.get("revision") else "")
            + f" [{fp.get('model_type')}: {fp.get('num_hidden_layers')} layers, {fp.get('num_attention_heads')} heads, "
            f"{fp.get('num_key_value_heads')} KV heads, head_dim {fp.get('head_dim')}]",
            "methods: " + (", ".join(self._method_label(m) for m in self.methods) or "none (the plan changes nothing)"),
        ]
        if self.target_ratio is not None:
            lines.append(f"target ratio: {float(self.target_ratio):.3g} of full KV memory")
        lines.extend(self._tensor_lines())
        return "\n".join(lines)

    def _method_label(self, method: str) -> str:
        values = self.params.get(method) or {}
        inner = ", ".join(f"{k}={v}" for k, v in sorted(values.items()))
        return f"{method} ({inner})" if inner else method

    def _tensor_lines(self) -> list[str]:
        lines = []
        if self.layer_keep is not None:
            lines.append("layer keep: " + " ".join(f"{v:.2f}" for v in self.layer_keep.tolist()))
        if self.share_source is not None:
            lines.append("share source: " + " ".join(str(v) for v in self.share_source.tolist()))
        if self.head_keep is not None:
            rows = self.head_keep.float()
            lines.append(f"head keep: min {rows.min().item():.3g}, max {rows.max().item():.3g} over {list(rows.shape)}")
        if self.topn is not None:
            lines.append("top-n values: " + " ".join(str(v) for v in self.topn.tolist()))
        return lines


def _normalize(value: Any) -> Any:
    """Compare lists and tuples alike (a config may hold either)."""
    return list(value) if isinstance(value, tuple) else value


def load_plan(path_or_repo_id: str | os.PathLike[str], revision: str | None = None, **hub_kwargs: Any) -> Plan:
    """Load a plan from a local file/directory, or else from a Hub repo id (``org/name``).

    ``revision`` and ``hub_kwargs`` (``filename``, ``cache_dir``, ``endpoint``, ``local_files_only``, ``token``)
    only apply to Hub downloads. Raises :class:`PlanError` for anything that is not a valid plan.
    """
    if isinstance(path_or_repo_id, os.PathLike) or os.path.exists(path_or_repo_id):
        if revision is not None or hub_kwargs:
            warnings.warn(f"{path_or_repo_id} is a local path; revision/hub arguments are ignored", stacklevel=2)
        return Plan.load(path_or_repo_id)
    if not isinstance(path_or_repo_id, str):
        raise PlanError(f"load_plan needs a path or a Hub repo id, got {type_name(path_or_repo_id)}")
    if hub.looks_like_repo_id(path_or_repo_id):
        return Plan.from_pretrained(path_or_repo_id, revision=revision, **hub_kwargs)
    raise PlanError(
        f"no plan file at {path_or_repo_id} (and it is not a Hub repo id like 'org/name'); "
        f"run `python -m calibrate <model> --out {path_or_repo_id}` to make one"
    )
