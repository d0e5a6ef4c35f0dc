"""Calibration from a resolved recipe to a :class:`runtime.Plan`.

recipe → model + tokenizer → calibration set → each enabled method's calibration step, in the order the method
registry gives (``runtime.registry``: a step may build on what an earlier one found, e.g. PyramidInfer budgets the
layers KVSharer left owning a cache) → Plan (with the resolved recipe and provenance in its metadata).

Nothing here names a method: the steps are ``calibrate/<method>.py:calibration_step``, found through each method's
registration, and they write their tensors, parameters, report and provenance into one
:class:`CalibrationContext`. A module may also define ``precheck(ctx)``: every enabled method's runs before the
first step (inputs a later step would refuse fail before an earlier step's passes).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm

from runtime import registry
from runtime.cache import layer_types
from runtime.models import default_cache_dir, load_model
from runtime.plan import Plan, fingerprint_from_model

from . import joint
from .data import build_calibration_set
from .recipe import Recipe

log = logging.getLogger(__name__)


class CalibrationError(RuntimeError):
    """Calibration cannot proceed with these inputs (the message says why and what to change)."""


def check_methods(methods: list[str]) -> tuple[str, ...]:
    """Refuse unknown and not-yet-calibratable methods with a clear message; return them in registry order."""
    unknown = [m for m in methods if m not in registry.METHODS]
    if unknown:
        raise CalibrationError(
            f"unknown method(s) {unknown}; choose from {', '.join(registry.METHODS)}, 'all' or 'none'"
        )
    missing = [m for m in methods if registry.get(m).calibration_step is None]
    if missing:
        raise CalibrationError(
            f"method(s) {', '.join(missing)} are not implemented in kvplan yet "
            f"(implemented: {', '.join(registry.calibration_supported())}); leave them out of --methods"
        )
    return tuple(m for m in registry.METHODS if m in methods)


@dataclass
class CalibrationContext:
    """Everything a method's calibration step reads, and where it writes its part of the plan.

    Attributes:
        model / tokenizer / recipe: what is being calibrated and how.
        methods: the enabled methods (registry order).
        samples: 1-D token tensors of the calibration set; ``seq_len`` the longest.
        kinds: attention type of every layer; ``config``: the decoder's text config.
        tensors / params: the plan's tensors and per-method runtime parameters (each step adds its own).
        report: what the CLI prints (each step under its method's name).
        provenance: recorded in the plan (timings, search logs, ...).
        state: what a step hands to later steps (e.g. ``state["kvsharer"]``: the sharing search).
        finalizers: run after every step, in order (e.g. KVSharer writes its map once PyramidInfer chose the split).
        target_ratio: the plan's target ratio (a step may say what it really is, e.g. sharing alone).
        pass_seconds: wall time of the forward passes (added up by the steps).
    """

    model: Any
    tokenizer: Any
    recipe: Recipe
    methods: tuple[str, ...]
    samples: list[torch.Tensor]
    kinds: list[str]
    config: Any
    progress: bool
    seq_len: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    params: dict[str, dict] = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)
    finalizers: list[Callable[[], None]] = field(default_factory=list)
    target_ratio: float | None = None
    pass_seconds: float = 0.0

    def args(self, method: str) -> dict:
        """The recipe's parameters of ``method`` (not yet validated: the step resolves them)."""
        return self.recipe.args_for(method)

    def bar(self, desc: str, unit: str = "sample") -> Callable | None:
        """A progress wrapper for a loop over samples (or ``unit``s; stderr, works in logs too), or None when quiet."""
        if not self.progress:
            return None
        return lambda items: tqdm(items, desc=desc, unit=unit, leave=False, file=sys.stderr)

    def say(self, *args) -> None:
        """Log at INFO when showing progress, at DEBUG otherwise."""
        (log.info if self.progress else log.debug)(*args)


@dataclass
class CalibrationResult:
    plan: Plan
    report: dict
    load_seconds: float
    calibration_seconds: float


def calibrate(
    recipe: Recipe, *, progress: bool = True, search_seconds: float | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
) -> CalibrationResult:
    """Run the whole calibration for ``recipe`` and return the plan (not yet saved).

    With ``device: auto`` the model is placed by accelerate (``max_memory``: what each device may hold; the rest is
    offloaded to the CPU and then to disk) and every stage runs it as placed. ``offload_folder`` is where accelerate
    may write weights it offloads to disk (default: a temporary folder under the kvplan cache, removed afterwards).
    """
    methods = check_methods(list(recipe.methods))
    with _offload_folder(recipe, offload_folder) as folder:
        loaded = load_model(recipe, progress=progress, offload_folder=folder)
        model, tokenizer = loaded.model, loaded.tokenizer
        result = calibrate_model(model, tokenizer, recipe, methods=methods, progress=progress,
                                 search_seconds=search_seconds)
    if loaded.revision:
        result.plan.fingerprint["revision"] = loaded.revision
    result.load_seconds = loaded.load_seconds
    result.plan.provenance["model_load_seconds"] = round(loaded.load_seconds, 3)
    return result


@contextlib.contextmanager
def _offload_folder(recipe: Recipe, folder: str | os.PathLike[str] | None) -> Iterator[str | None]:
    """The disk offload folder for loading ``recipe``'s model: ``folder`` (created if missing, kept), a temporary
    one under ``<kvplan cache>/offload/`` with ``device: auto`` (removed on exit), or None (nothing is offloaded)."""
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        yield str(folder)
    elif recipe.device != "auto":
        yield None
    else:
        root = default_cache_dir() / "offload"
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="calibrate-", dir=root) as temp:
            yield temp


def device_map_summary(model: torch.nn.Module) -> dict[str, int] | None:
    """How accelerate placed a dispatched model: modules of its ``hf_device_map`` per device (``{"0": 30, "cpu": 2,
    "disk": 3}``), or None for a model loaded without a device map."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return None
    counts: dict[str, int] = {}
    for device in device_map.values():
        counts[str(device)] = counts.get(str(device), 0) + 1
    return counts


def _step(spec) -> Callable[[CalibrationContext], None]:
    module_name, _, function = spec.calibration_step.partition(":")
    return getattr(importlib.import_module(module_name), function)


def _precheck(spec) -> Callable[[CalibrationContext], None] | None:
    """The optional ``precheck(ctx)`` of a method's calibration module: run for every enabled method before any
    step, so that inputs a later step would refuse (e.g. a target ratio the model cannot reach) fail before the
    earlier steps' passes."""
    module_name, _, _ = spec.calibration_step.partition(":")
    return getattr(importlib.import_module(module_name), "precheck", None)


def calibrate_model(
    model: torch.nn.Module, tokenizer, recipe: Recipe, *, methods: tuple[str, ...] | None = None,
    progress: bool = True, search_seconds: float | None = None,
) -> CalibrationResult:
    """Calibrate an already loaded model (used by the CLI and by tests with tiny models).

    With several methods, :mod:`calibrate.joint` then scores whole candidate plans for at most ``search_seconds``
    (default ``calibrate.joint.DEFAULT_MAX_SECONDS``) and keeps the best (``0``: no joint search)."""
    methods = check_methods(list(recipe.methods)) if methods is None else methods
    torch.manual_seed(recipe.seed)
    start = time.perf_counter()
    data = build_calibration_set(tokenizer, recipe, progress=progress)
    if not data.samples:
        raise CalibrationError(f"the calibration data {data.source!r} gave no samples")
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    ctx = CalibrationContext(
        model=model, tokenizer=tokenizer, recipe=recipe, methods=methods, samples=data.samples,
        kinds=layer_types(model.config), config=config, progress=progress,
        seq_len=max(int(s.numel()) for s in data.samples), report={"methods": list(methods)},
        target_ratio=recipe.target_ratio if methods else None,
    )
    steps = sorted(registry.specs(methods), key=lambda s: s.calibration_order)
    for spec in steps:
        check = _precheck(spec)
        if check is not None:
            check(ctx)
    for spec in steps:
        _step(spec)(ctx)
    for finalize in ctx.finalizers:
        finalize()
    seconds_left = joint.DEFAULT_MAX_SECONDS if search_seconds is None else search_seconds
    if joint.applies(methods) and seconds_left > 0:
        joint.joint_search(ctx, seconds_left)
    seconds = time.perf_counter() - start
    provenance = {
        "data_source": data.source,
        "data_hash": data.data_hash,
        "num_samples": len(data.samples),
        "num_tokens": int(data.num_tokens),
        "seed": recipe.seed,
        "calibration_seconds": round(seconds, 3),
        "forward_pass_seconds": round(ctx.pass_seconds, 3),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device_map": device_map_summary(model),
        **ctx.provenance,
    }
    plan = Plan(
        fingerprint=fingerprint_from_model(model),
        methods=methods,
        params=ctx.params,
        tensors=ctx.tensors,
        target_ratio=ctx.target_ratio,
        recipe=recipe.to_dict(),
        provenance=provenance,
    )
    return CalibrationResult(plan=plan, report=ctx.report, load_seconds=0.0, calibration_seconds=seconds)


__all__ = [
    "CalibrationContext", "CalibrationError", "CalibrationResult", "calibrate", "calibrate_model", "check_methods",
    "device_map_summary",
]
