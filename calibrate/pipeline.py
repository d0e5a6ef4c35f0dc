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

from . import kvsharer, pyramidinfer
from .budget_split import ContinuationFidelity, largest_split, split_candidates
from .collect import run_calibration_pass
from .data import build_calibration_set
from runtime.models import load_model
from .recipe import Recipe

log = logging.getLogger(__name__)

IMPLEMENTED_METHODS = ("pyramidinfer", "kvsharer")
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
    seq_len = max(int(s.numel()) for s in data.samples)
    bar = (lambda it: tqdm(it, desc="Calibrating", unit="sample", leave=False)) if progress else None
    pass_seconds = 0.0
    extra_provenance: dict = {}

    search = None
    if "kvsharer" in methods:
        search, kvs_settings, kvs_seconds = _search_sharing(model, data.samples, kinds, recipe, methods, bar, progress)
        pass_seconds += kvs_seconds
        extra_provenance["kvsharer_search_seconds"] = round(search.seconds, 3)
        extra_provenance["kvsharer_search"] = {
            "threshold": kvs_settings.threshold, "order": kvs_settings.order, "metric": kvs_settings.metric,
            "distance_tokens": kvs_settings.distance_tokens, "accept_samples": kvs_settings.accept_samples,
            "accept_tokens": kvs_settings.accept_tokens, "target_shared": search.target, "trials": search.trials,
            "hidden_state": "post-final-norm", "skip_kv_projections": True, "log": search.log,
        }

    if "pyramidinfer" in methods:
        settings = pyramidinfer.PyramidSettings.from_args(dict(recipe.method_args.get("pyramidinfer", {})))
        maps = [] if search is None else search.steps
        pairs = frozenset((r, s) for m in maps for r, s in enumerate(m) if r != s)
        pyr_observer = pyramidinfer.CapturedMassObserver(config.num_hidden_layers, settings, pairs=pairs)
        pass_seconds += run_calibration_pass(model, data.samples, [pyr_observer], progress=bar)
        if pyr_observer.counts.max() == 0:
            raise CalibrationError(
                f"calibration samples of {seq_len} tokens are too short for PyramidInfer (need more than "
                f"{settings.sink + settings.window + settings.horizon + 1}); raise --max-seq-length or use more data"
            )

        def allocate(sources):
            return pyramidinfer.calibrate_layer_keep(
                pyr_observer, kinds, recipe.target_ratio, seq_len, getattr(config, "sliding_window", None), sources
            )

        sources = None if search is None else search.sources
        if search is not None and _split_is_searched(recipe, methods):
            sources, split_table = _choose_split(model, data.samples, kinds, search, settings, allocate)
            report["split"] = split_table
            extra_provenance["joint_split"] = split_table
        keep, pyr_report, curves, captured = allocate(sources)
        if not pyr_report["feasible"]:
            log.warning(
                "target ratio %.4f cannot be met exactly at %d tokens (sinks + recent window, or every owning "
                "layer kept whole); the plan keeps %.4f",
                recipe.target_ratio, seq_len, pyr_report["achieved_ratio_at_calibration_length"],
            )
        tensors["pyramidinfer.layer_keep"] = keep
        tensors["pyramidinfer.captured_curve"] = curves
        tensors["pyramidinfer.captured_mass"] = captured
        params["pyramidinfer"] = settings.runtime_params()
        report["pyramidinfer"] = pyr_report
        if search is not None:
            search.sources = sources

    if search is not None:
        tensors["kvsharer.share_source"] = torch.tensor(search.sources, dtype=torch.int32)
        tensors["kvsharer.distance"] = search.distances
        tensors["kvsharer.search_log"] = kvsharer.search_log_tensor(search.log)
        if search.attention_error is not None:
            tensors["kvsharer.attention_error"] = search.attention_error
        shared = [l for l, src in enumerate(search.sources) if src != l]
        report["kvsharer"] = {
            "shared_layers": shared,
            "share_source": list(search.sources),
            "target_shared": search.target,
            "trials": search.trials,
            "search_seconds": search.seconds,
            "final": search.final,
        }
        if len(shared) < search.target and not _split_is_searched(recipe, methods):
            log.warning(
                "kvsharer: only %d of %d layers could be shared within %d trials at threshold %.3f",
                len(shared), search.target, search.trials, extra_provenance["kvsharer_search"]["threshold"],
            )
    target_ratio = recipe.target_ratio
    if methods == ("kvsharer",):  # sharing alone keeps the owning layers' caches whole
        owners = sum(1 for l, src in enumerate(search.sources) if src == l)
        target_ratio = owners / len(search.sources)
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
        **extra_provenance,
    }
    plan = Plan(
        fingerprint=fingerprint_from_model(model),
        methods=methods,
        params=params,
        tensors=tensors,
        target_ratio=target_ratio if methods else None,
        recipe=recipe.to_dict(),
        provenance=provenance,
    )
    return CalibrationResult(plan=plan, report=report, load_seconds=0.0, calibration_seconds=seconds)


def _split_is_searched(recipe: Recipe, methods: tuple[str, ...]) -> bool:
    """With PyramidInfer and ``share_layers: auto``, the split of the memory target between methods is searched."""
    share = kvsharer.parse_share_layers(recipe.args_for("kvsharer").get("share_layers", "auto"))
    return "pyramidinfer" in methods and share == "auto"


def _search_sharing(model, samples, kinds, recipe: Recipe, methods, bar, progress: bool):
    """KVSharer: distances from one short pass, then the greedy acceptance search. Returns (result, settings, s)."""
    settings = kvsharer.SharerSettings.from_args(
        {"seed": recipe.seed, **recipe.args_for("kvsharer")}
    )
    n_full = sum(1 for k in kinds if k == "full_attention")
    if n_full < 2:
        raise CalibrationError("KVSharer needs at least two full-attention layers (one to own, one to share)")
    if _split_is_searched(recipe, methods):
        target = largest_split(n_full)
    else:
        try:
            target = settings.target_count(n_full)
        except ValueError as exc:
            raise CalibrationError(str(exc)) from None
    observer = kvsharer.MeanKVObserver(len(kinds), settings.distance_tokens)
    observers = [observer]
    errors = None
    if settings.order == "attention_error":
        errors = kvsharer.AttentionErrorObserver(len(kinds), settings.distance_tokens)
        observers.append(errors)
    short = [s[: settings.distance_tokens] for s in samples]
    seconds = run_calibration_pass(model, short, observers, progress=bar)
    distances = kvsharer.layer_distances(observer, settings.metric)
    error_matrix = errors.mean() if errors is not None else None
    pairs = kvsharer.candidate_pairs(distances, kinds, settings.order, settings.seed, error_matrix)
    acceptance = kvsharer.Acceptance(model, kvsharer.acceptance_windows(samples, settings))
    say = log.info if progress else log.debug
    result = kvsharer.greedy_search(acceptance, pairs, len(kinds), target, settings, progress=say)
    result.distances = distances
    result.attention_error = error_matrix
    say(
        "kvsharer: %d of %d layers shared after %d trials (%.1f s): %s",
        sum(1 for l, s in enumerate(result.sources) if s != l), target, result.trials, result.seconds,
        {l: s for l, s in enumerate(result.sources) if s != l},
    )
    return result, settings, seconds


def _choose_split(model, samples, kinds, search, settings, allocate):
    """Score every candidate number of shared layers as a whole plan; return the best map and the table."""
    n_full = sum(1 for k in kinds if k == "full_attention")
    fidelity = ContinuationFidelity(model, samples)
    identity = list(range(len(kinds)))
    table, best = [], None
    for count in split_candidates(n_full, len(search.steps)):
        sources = search.steps[count - 1] if count else identity
        keep, pyr_report, _, _ = allocate(sources)  # the identity map allocates as PyramidInfer alone does
        scores = fidelity.score(kvsharer.sharing_plan(model, sources, _pyramid_plan(model, keep, settings)))
        owners = [l for l in range(len(kinds)) if sources[l] == l and kinds[l] == "full_attention"]
        row = {
            "shared_layers": count,
            "mean_keep_of_owners": round(float(keep[owners].mean()), 4),
            "kept_ratio": round(pyr_report["achieved_ratio_at_calibration_length"], 4),
            "kl": round(scores["kl"], 6),
            "top1": round(scores["top1"], 4),
        }
        table.append(row)
        log.info(
            "split: %2d shared layers, owners keep %.3f on average (total %.3f): KL %.4f top-1 %.3f",
            count, row["mean_keep_of_owners"], row["kept_ratio"], row["kl"], row["top1"],
        )
        if best is None or scores["kl"] < best[0]:
            best = (scores["kl"], sources, count)
    for row in table:
        row["chosen"] = row["shared_layers"] == best[2]
    log.info("split chosen: %d shared layers (lowest KL on the calibration continuation)", best[2])
    return best[1], table


def _pyramid_plan(model, keep: torch.Tensor, settings) -> Plan:
    return Plan(
        fingerprint=fingerprint_from_model(model),
        methods=("pyramidinfer",),
        params={"pyramidinfer": settings.runtime_params()},
        tensors={"pyramidinfer.layer_keep": keep},
    )
