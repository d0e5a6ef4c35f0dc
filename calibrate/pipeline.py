"""Calibration from a resolved recipe to a :class:`runtime.Plan`.

recipe → model + tokenizer → calibration set → one observed forward pass → each enabled method turns its
statistics into plan tensors → Plan (with the resolved recipe and provenance in its metadata).
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass

import torch
import transformers
from tqdm.auto import tqdm

from runtime.cache import layer_types
from runtime.plan import Plan, fingerprint_from_model

from . import pyramidinfer
from .collect import run_calibration_pass
from .data import build_calibration_set
from .models import load_model
from .recipe import Recipe

log = logging.getLogger(__name__)

IMPLEMENTED_METHODS = ("pyramidinfer",)
ALL_METHODS = ("pyramidinfer", "kvsharer", "kvcompress", "kcache")


class CalibrationError(RuntimeError):
    """Calibration cannot proceed with these inputs (the message says why and what to change)."""


def check_methods(methods: list[str]) -> tuple[str, ...]:
    """Refuse unknown and not-yet-implemented methods with a clear message; return them in canonical order."""
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise CalibrationError(f"unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}, 'all' or 'none'")
    missing = [m for m in methods if m not in IMPLEMENTED_METHODS]
    if missing:
        raise CalibrationError(
            f"method(s) {', '.join(missing)} are not implemented in kvplan yet "
            f"(implemented: {', '.join(IMPLEMENTED_METHODS)}); leave them out of --methods"
        )
    return tuple(m for m in ALL_METHODS if m in methods)


@dataclass
class CalibrationResult:
    plan: Plan
    report: dict
    load_seconds: float
    calibration_seconds: float


def calibrate(recipe: Recipe, *, progress: bool = True) -> CalibrationResult:
    """Run the whole calibration for ``recipe`` and return the plan (not yet saved)."""
    methods = check_methods(list(recipe.methods))
    loaded = load_model(recipe, progress=progress)
    model, tokenizer = loaded.model, loaded.tokenizer
    result = calibrate_model(model, tokenizer, recipe, methods=methods, progress=progress)
    if loaded.revision:
        result.plan.fingerprint["revision"] = loaded.revision
    result.load_seconds = loaded.load_seconds
    result.plan.provenance["model_load_seconds"] = round(loaded.load_seconds, 3)
    return result


def calibrate_model(
    model: torch.nn.Module, tokenizer, recipe: Recipe, *, methods: tuple[str, ...] | None = None,
    progress: bool = True,
) -> CalibrationResult:
    """Calibrate an already loaded model (used by the CLI and by tests with tiny models)."""
    methods = check_methods(list(recipe.methods)) if methods is None else methods
    torch.manual_seed(recipe.seed)
    start = time.perf_counter()
    data = build_calibration_set(tokenizer, recipe, progress=progress)
    if not data.samples:
        raise CalibrationError(f"the calibration data {data.source!r} gave no samples")
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    kinds = layer_types(model.config)
    tensors: dict[str, torch.Tensor] = {}
    params: dict[str, dict] = {}
    report: dict = {"methods": list(methods)}
    observers = []
    pyr_observer = None
    if "pyramidinfer" in methods:
        settings = pyramidinfer.PyramidSettings.from_args(dict(recipe.method_args.get("pyramidinfer", {})))
        pyr_observer = pyramidinfer.CapturedMassObserver(config.num_hidden_layers, settings)
        observers.append(pyr_observer)
    seq_len = max(int(s.numel()) for s in data.samples)
    pass_seconds = 0.0
    if observers:
        bar = (lambda it: tqdm(it, desc="Calibrating", unit="sample", leave=False)) if progress else None
        pass_seconds = run_calibration_pass(model, data.samples, observers, progress=bar)
    if pyr_observer is not None:
        if pyr_observer.counts.max() == 0:
            raise CalibrationError(
                f"calibration samples of {seq_len} tokens are too short for PyramidInfer (need more than "
                f"{pyr_observer.settings.sink + pyr_observer.settings.window + pyr_observer.settings.horizon + 1}); "
                "raise --max-seq-length or use more data"
            )
        keep, pyr_report, curves, captured = pyramidinfer.calibrate_layer_keep(
            pyr_observer, kinds, recipe.target_ratio, seq_len, getattr(config, "sliding_window", None)
        )
        if not pyr_report["feasible"]:
            log.warning(
                "target ratio %.4f is below what sinks + recent window keep at %d tokens; the plan keeps %.4f",
                recipe.target_ratio, seq_len, pyr_report["achieved_ratio_at_calibration_length"],
            )
        tensors["pyramidinfer.layer_keep"] = keep
        tensors["pyramidinfer.captured_curve"] = curves
        tensors["pyramidinfer.captured_mass"] = captured
        params["pyramidinfer"] = pyr_observer.settings.runtime_params()
        report["pyramidinfer"] = pyr_report
    seconds = time.perf_counter() - start
    provenance = {
        "data_source": data.source,
        "data_hash": data.data_hash,
        "num_samples": len(data.samples),
        "num_tokens": int(data.num_tokens),
        "seed": recipe.seed,
        "calibration_seconds": round(seconds, 3),
        "forward_pass_seconds": round(pass_seconds, 3),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
    plan = Plan(
        fingerprint=fingerprint_from_model(model),
        methods=methods,
        params=params,
        tensors=tensors,
        target_ratio=recipe.target_ratio if methods else None,
        recipe=recipe.to_dict(),
        provenance=provenance,
    )
    return CalibrationResult(plan=plan, report=report, load_seconds=0.0, calibration_seconds=seconds)
