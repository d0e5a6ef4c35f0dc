"""KVSharer, calibrated: which later layers reuse an earlier layer's K/V.

1. **Distances.** Over the calibration samples, the post-RoPE K and V of every layer are averaged position by
   position over the first ``distance_tokens`` positions (positions a sample does not reach are left out of that
   position's mean, never counted as zeros). For every pair of full-attention layers ``i > j`` the distance is
   ``(||K̄_i - K̄_j|| + ||V̄_i - V̄_j||) / 2`` (``metric``: the paper's flattened L2, or the official code's mean
   per-vector L2).
2. **Greedy search.** Pairs are tried in ``order`` (``dissimilar`` first — the paper's counter-intuitive choice —,
   or ``similar`` / ``random`` for the ablation): a candidate map ``share[i] = j`` (chains resolved) is run through
   kvplan's own runtime on ``accept_samples`` calibration windows of ``accept_tokens`` tokens, and accepted only
   if the mean per-token cosine of the final (post-norm) hidden states with the full model's stays
   ``>= threshold``. Every candidate's cosine, top-1 agreement and KL are logged. The search stops at the target
   number of shared layers or after ``max_trials`` candidates (the number of model re-runs is bounded).

Unlike the official code: samples of different lengths are averaged per position (not skipped with the divisor
unchanged), K/V projections of sharing layers are really skipped at run time, and the decode-time cache is right
(the runtime's ``SharedLayer``); the acceptance threshold is meant to bind (the notebook's 0.5 never does).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from runtime.apply import apply_plan
from runtime.evaluation.lm import agreement_and_kl
from runtime.kvsharer import METHOD, METRICS, ORDERS, parse_share_layers  # noqa: F401  (re-exported)
from runtime.models import input_device
from runtime.plan import Plan, fingerprint_from_model

log = logging.getLogger(__name__)


@dataclass
class SharerSettings:
    """KVSharer calibration settings (recipe key ``kvsharer``); defaults and ranges are those of the method's
    registration (``runtime.kvsharer.METHOD``).

    Attributes:
        share_layers: layers to share: an integer count >= 1, a fraction of the layers in (0, 1), or ``auto``
            (alone: a quarter of the layers; with PyramidInfer: the split between sharing and token budgets
            that keeps fidelity highest for the target memory is searched).
        threshold: smallest mean cosine of the final hidden states (vs the full model) a candidate may have.
        distance_tokens: positions of each sample whose K/V are averaged for the distances.
        accept_samples / accept_tokens: windows (of the calibration samples) each candidate is scored on.
        max_trials: most candidates tried (each costs one run over the acceptance windows).
        order: ``dissimilar`` (paper), ``similar`` or ``random`` (ablations), or ``attention_error`` (kvplan's:
            pairs whose sharing changes the target layer's attention output least on the calibration samples).
        metric: ``flattened_l2`` (paper) or ``mean_per_vector_l2`` (official code).
        seed: seed of the random order.
    """

    share_layers: float | int | str
    threshold: float
    distance_tokens: int
    accept_samples: int
    accept_tokens: int
    max_trials: int
    order: str
    metric: str
    seed: int

    @classmethod
    def from_args(cls, args: dict) -> SharerSettings:
        """Settings from a recipe's ``kvsharer`` mapping (validated, defaults filled in by the registration)."""
        return cls(**METHOD.resolve_args(args, "kvsharer"))

    def target_count(self, num_full_layers: int) -> int:
        """Number of layers to share for a model with ``num_full_layers`` full-attention layers (``auto``: 1/4)."""
        value = 0.25 if self.share_layers == "auto" else self.share_layers
        count = int(value) if isinstance(value, int) else int(math.floor(value * num_full_layers + 0.5))
        if count > num_full_layers - 1:
            raise ValueError(
                f"--share-layers {value} asks for {count} shared layers, but this model has {num_full_layers} "
                f"full-attention layers and at least one must keep its cache"
            )
        return count


@dataclass
class MeanKVObserver:
    """Position-aligned running sums of every layer's post-RoPE K and V over the calibration samples.

    ``k_sum[l]``/``v_sum[l]`` float64 ``[H_kv, T, d]`` (``T = tokens``), ``counts`` float64 ``[T]``: how many samples
    reached each position.
    """

    num_layers: int
    tokens: int
    k_sum: list = field(init=False)
    v_sum: list = field(init=False)
    counts: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.k_sum = [None] * self.num_layers
        self.v_sum = [None] * self.num_layers
        self.counts = torch.zeros(self.tokens, dtype=torch.float64)

    def observe(self, layer_idx, query, key, value, scaling) -> None:
        if layer_idx >= self.num_layers:
            return
        n = min(self.tokens, key.shape[2])
        if self.k_sum[layer_idx] is None:
            shape = (key.shape[1], self.tokens, key.shape[3])
            self.k_sum[layer_idx] = torch.zeros(shape, dtype=torch.float64)
            self.v_sum[layer_idx] = torch.zeros((value.shape[1], self.tokens, value.shape[3]), dtype=torch.float64)
        self.k_sum[layer_idx][:, :n] += key[0, :, :n].detach().double().cpu()
        self.v_sum[layer_idx][:, :n] += value[0, :, :n].detach().double().cpu()
        if layer_idx == 0:
            self.counts[:n] += 1

    def end_sample(self) -> None:
        pass

    def means(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer mean K and V ``[H_kv, T', d]`` over the positions some sample reached."""
        reached = self.counts > 0
        scale = self.counts[reached][None, :, None]
        k = [s[:, reached] / scale if s is not None else None for s in self.k_sum]
        v = [s[:, reached] / scale if s is not None else None for s in self.v_sum]
        return k, v


@dataclass
class AttentionErrorObserver:
    """How much each layer's attention output changes when it reads an earlier layer's K/V instead of its own.

    For every sample, over its first ``tokens`` positions: ``err[i, j] += ||A(q_i, k_j, v_j) - A(q_i, k_i, v_i)||
    / ||A(q_i, k_i, v_i)||`` (causal attention, all heads), for ``i > j``. This measures the sharing itself, one
    pair at a time, from the same short pass as the distances — no model re-runs. Layer ``i``'s errors are taken
    when it runs; only the earlier layers' K/V of the current sample are held (no queries, no attention maps).
    """

    num_layers: int
    tokens: int
    error: torch.Tensor = field(init=False)
    samples: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.error = torch.zeros(self.num_layers, self.num_layers, dtype=torch.float64)
        self._held: dict[int, tuple] = {}

    def observe(self, layer_idx, query, key, value, scaling) -> None:
        if layer_idx >= self.num_layers:
            return
        n = min(self.tokens, key.shape[2])
        q, k, v = query[:, :, :n].float(), key[:, :, :n].float(), value[:, :, :n].float()
        with torch.no_grad():
            own = _causal_attention(q, k, v, scaling)
            norm = own.norm().clamp(min=1e-12)
            for j in sorted(self._held):
                if j >= layer_idx:
                    break
                kj, vj = self._held[j]
                if kj.shape != k.shape:
                    continue
                kj, vj = kj.to(q.device), vj.to(q.device)  # layers may run on different devices
                self.error[layer_idx, j] += float((_causal_attention(q, kj, vj, scaling) - own).norm() / norm)
        self._held[layer_idx] = (k, v)

    def end_sample(self) -> None:
        self.samples += 1
        self._held.clear()

    def mean(self) -> torch.Tensor:
        """float32 ``[L, L]`` mean relative error (0 where not observed)."""
        return (self.error / max(self.samples, 1)).float()


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def _distance(a: torch.Tensor, b: torch.Tensor, metric: str) -> float:
    if metric == "flattened_l2":
        return float(torch.linalg.vector_norm(a - b))
    return float(torch.linalg.vector_norm(a - b, dim=-1).mean())


def layer_distances(observer: MeanKVObserver, metric: str) -> torch.Tensor:
    """float32 ``[2, L, L]``: K (0) and V (1) distances for ``i > j`` (0 elsewhere and for unobserved layers)."""
    k, v = observer.means()
    n = observer.num_layers
    out = torch.zeros(2, n, n, dtype=torch.float32)
    for i in range(n):
        for j in range(i):
            if k[i] is None or k[j] is None:
                continue
            out[0, i, j] = _distance(k[i], k[j], metric)
            out[1, i, j] = _distance(v[i], v[j], metric)
    return out


def candidate_pairs(
    distances: torch.Tensor, kinds: list[str], order: str, seed: int, attention_error: torch.Tensor | None = None
) -> list[tuple[int, int, float]]:
    """Pairs ``(target i, source j, distance)`` with ``i > j``, both full-attention, in search order.

    ``attention_error`` order: ascending attention-output error (``AttentionErrorObserver``), ties by distance.
    """
    if order == "attention_error" and attention_error is None:
        raise ValueError("order 'attention_error' needs the attention errors of the calibration pass")
    mean = distances.mean(dim=0)
    pairs = [
        (i, j, float(mean[i, j]))
        for i in range(len(kinds))
        for j in range(i)
        if kinds[i] == "full_attention" and kinds[j] == "full_attention"
    ]
    if order == "random":
        random.Random(seed).shuffle(pairs)
    elif order == "attention_error":
        pairs.sort(key=lambda p: (float(attention_error[p[0], p[1]]), p[0], p[1]))
    else:  # stable sort on the distance, ties broken by (i, j) so the order is deterministic
        pairs.sort(key=lambda p: (-p[2] if order == "dissimilar" else p[2], p[0], p[1]))
    return pairs


def resolve_chains(sources: list[int]) -> list[int]:
    """Point every layer at the root of its chain (ascending order, as in the paper's search)."""
    out = list(sources)
    for layer in range(len(out)):
        if out[layer] != layer:
            out[layer] = out[out[layer]]
    return out


def sharing_plan(model, sources: list[int], extra: Plan | None = None) -> Plan:
    """A plan with ``share_source = sources`` (plus ``extra``'s PyramidInfer part when given)."""
    tensors = {"kvsharer.share_source": torch.tensor(sources, dtype=torch.int32)}
    methods: tuple[str, ...] = ("kvsharer",)
    params: dict = {}
    if extra is not None and "pyramidinfer" in extra.methods:
        tensors["pyramidinfer.layer_keep"] = extra.tensors["pyramidinfer.layer_keep"]
        params["pyramidinfer"] = dict(extra.params["pyramidinfer"])
        methods = ("pyramidinfer", "kvsharer")
    return Plan(fingerprint=fingerprint_from_model(model), methods=methods, params=params, tensors=tensors)


class Acceptance:
    """Scores a sharing map against the full model on fixed calibration windows (final hidden states, logits).

    The full model's final hidden states (and its next-token log-probabilities at the last ``logit_positions``
    positions of each window) are computed once; each candidate costs one forward per window through kvplan's
    runtime (``apply_plan``), so what is accepted is exactly what will run.
    """

    def __init__(self, model, windows: Sequence[torch.Tensor], logit_positions: int = 64):
        self.model = model
        self.windows = [w[None, :] if w.dim() == 1 else w for w in windows]
        self.device = input_device(model)
        self.logit_positions = logit_positions
        self.reference = [self._hidden(w) for w in self.windows]
        self.reference_logprobs = [self._logprobs(h) for h in self.reference]

    def _hidden(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.model.get_decoder()(input_ids=ids.to(self.device), use_cache=False)
        return out.last_hidden_state[0].float()

    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.model.get_output_embeddings()
        with torch.no_grad():
            logits = head(hidden[-self.logit_positions :].to(head.weight.dtype)).float()
        return torch.log_softmax(logits, dim=-1)

    def score(self, sources: list[int]) -> dict[str, float]:
        """Mean per-token cosine of the final hidden states; top-1 agreement and KL(full ‖ shared) of the
        next-token distributions at the last ``logit_positions`` positions of each window."""
        cos, agree, kl, count, n_logits = 0.0, 0.0, 0.0, 0, 0
        with apply_plan(self.model, sharing_plan(self.model, sources)):
            for ids, ref, ref_lp in zip(self.windows, self.reference, self.reference_logprobs):
                hidden = self._hidden(ids)
                cos += float(torch.nn.functional.cosine_similarity(hidden, ref, dim=-1).sum())
                stats = agreement_and_kl(ref_lp, self._logprobs(hidden))
                agree += float(stats["agree"].sum())
                kl += float(stats["kl"].sum())
                count += hidden.shape[0]
                n_logits += ref_lp.shape[0]
        return {"cosine": cos / count, "top1": agree / n_logits, "kl": kl / n_logits}


@dataclass
class SearchResult:
    """The accepted map and the full log of the search.

    ``steps[k]`` is the (chain-resolved) map after ``k + 1`` acceptances, so ``steps[:k]`` give the maps for fewer
    shared layers (used by the joint split search with PyramidInfer).
    """

    sources: list[int]
    log: list[dict]
    steps: list[list[int]]
    target: int
    trials: int
    seconds: float
    final: dict[str, float] | None
    distances: torch.Tensor | None = None  # float32 [2, L, L] (K, V), filled in by the caller
    attention_error: torch.Tensor | None = None  # float32 [L, L] with order attention_error


def greedy_search(
    acceptance: Acceptance,
    pairs: list[tuple[int, int, float]],
    num_layers: int,
    target: int,
    settings: SharerSettings,
    progress: Callable[[str], None] | None = None,
) -> SearchResult:
    """The paper's greedy loop, bounded by ``settings.max_trials``; every candidate is logged."""
    start = time.perf_counter()
    sources = list(range(num_layers))
    targets: set[int] = set()
    entries: list[dict] = []
    steps: list[list[int]] = []
    final = None
    tried: set[tuple[int, ...]] = set()
    for target_layer, source_layer, dist in pairs:
        if len(targets) >= target or len(entries) >= settings.max_trials:
            break
        if target_layer in targets:
            continue
        candidate = list(sources)
        candidate[target_layer] = source_layer
        candidate = resolve_chains(candidate)
        if tuple(candidate) in tried:  # chains made it the same map as one already scored
            continue
        tried.add(tuple(candidate))
        scores = acceptance.score(candidate)
        accepted = scores["cosine"] >= settings.threshold
        entries.append(
            {"target": target_layer, "source": source_layer, "resolved_source": candidate[target_layer],
             "distance": round(dist, 6), **{k: round(v, 6) for k, v in scores.items()}, "accepted": accepted}
        )
        if progress is not None:
            progress(
                f"kvsharer: try {target_layer}<-{source_layer} (distance {dist:.3f}): cosine {scores['cosine']:.4f} "
                f"top-1 {scores['top1']:.3f} KL {scores['kl']:.4f} -> {'accepted' if accepted else 'rejected'}"
            )
        if accepted:
            sources = candidate
            targets.add(target_layer)
            steps.append(list(sources))
            final = scores
    return SearchResult(
        sources=sources, log=entries, steps=steps, target=target, trials=len(entries),
        seconds=time.perf_counter() - start, final=final,
    )


def acceptance_windows(samples: Sequence[torch.Tensor], settings: SharerSettings) -> list[torch.Tensor]:
    """The first ``accept_tokens`` tokens of the first ``accept_samples`` calibration samples."""
    return [s[: settings.accept_tokens] for s in samples[: settings.accept_samples]]


def search_log_tensor(entries: list[dict]) -> torch.Tensor:
    """float32 ``[trials, 7]``: target, source (resolved), distance, cosine, top-1, KL, accepted (1/0)."""
    rows = [
        [e["target"], e["resolved_source"], e["distance"], e["cosine"], e["top1"], e["kl"], float(e["accepted"])]
        for e in entries
    ]
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 7)


def _share_nothing(ctx, reason: str) -> None:
    """With other methods enabled, a model KVSharer cannot share on still calibrates: the plan keeps KVSharer with
    every layer owning its cache (no sharing), and the log, report and provenance say why."""
    log.warning("kvsharer: %s; the plan shares no layer (the other methods are calibrated as usual)", reason)
    n_layers = len(ctx.kinds)
    ctx.tensors["kvsharer.share_source"] = torch.arange(n_layers, dtype=torch.int32)
    ctx.provenance["kvsharer_search"] = {"skipped": reason, "target_shared": 0, "trials": 0, "log": []}
    ctx.report["kvsharer"] = {
        "shared_layers": [], "share_source": list(range(n_layers)), "target_shared": 0, "trials": 0,
        "search_seconds": 0.0, "final": None, "skipped": reason,
    }


def calibration_step(ctx) -> None:
    """KVSharer's calibration step (``runtime.kvsharer.METHOD``): distances from one short pass, then the greedy
    acceptance search through the runtime. The map is written once every step ran (a later PyramidInfer step may
    choose a map with fewer shared layers: the joint split)."""
    from .budget_split import largest_split, split_is_searched
    from .collect import run_calibration_pass
    from .pipeline import CalibrationError

    try:
        settings = SharerSettings.from_args({"seed": ctx.recipe.seed, **ctx.args("kvsharer")})
    except ValueError as exc:
        raise CalibrationError(str(exc)) from None
    kinds = ctx.kinds
    n_full = sum(1 for k in kinds if k == "full_attention")
    if n_full < 2:
        reason = (
            f"this model has {n_full} full-attention layer{'' if n_full == 1 else 's'} and KVSharer needs two (one "
            "to own a cache, one to read it; sliding-window layers never share)"
        )
        if ctx.methods == ("kvsharer",):
            raise CalibrationError(f"{reason}: nothing to calibrate; leave kvsharer out of --methods")
        _share_nothing(ctx, reason)
        return
    searched = split_is_searched(ctx.recipe, ctx.methods)
    if searched:
        target = largest_split(n_full)
    else:
        try:
            target = settings.target_count(n_full)
        except ValueError as exc:
            raise CalibrationError(str(exc)) from None
    observer = MeanKVObserver(len(kinds), settings.distance_tokens)
    observers: list = [observer]
    errors = None
    if settings.order == "attention_error":
        errors = AttentionErrorObserver(len(kinds), settings.distance_tokens)
        observers.append(errors)
    short = [s[: settings.distance_tokens] for s in ctx.samples]
    ctx.pass_seconds += run_calibration_pass(ctx.model, short, observers, progress=ctx.bar("kvsharer: distances"))
    distances = layer_distances(observer, settings.metric)
    error_matrix = errors.mean() if errors is not None else None
    pairs = candidate_pairs(distances, kinds, settings.order, settings.seed, error_matrix)
    acceptance = Acceptance(ctx.model, acceptance_windows(ctx.samples, settings))
    search = greedy_search(acceptance, pairs, len(kinds), target, settings, progress=ctx.say)
    search.distances = distances
    search.attention_error = error_matrix
    ctx.say(
        "kvsharer: %d of %d layers shared after %d trials (%.1f s): %s",
        sum(1 for l, s in enumerate(search.sources) if s != l), target, search.trials, search.seconds,
        {l: s for l, s in enumerate(search.sources) if s != l},
    )
    ctx.state["kvsharer"] = search
    ctx.provenance["kvsharer_search_seconds"] = round(search.seconds, 3)
    ctx.provenance["kvsharer_search"] = {
        "threshold": settings.threshold, "order": settings.order, "metric": settings.metric,
        "distance_tokens": settings.distance_tokens, "accept_samples": settings.accept_samples,
        "accept_tokens": settings.accept_tokens, "target_shared": search.target, "trials": search.trials,
        "hidden_state": "post-final-norm", "skip_kv_projections": True, "log": search.log,
    }

    def finish() -> None:
        ctx.tensors["kvsharer.share_source"] = torch.tensor(search.sources, dtype=torch.int32)
        ctx.tensors["kvsharer.distance"] = search.distances
        ctx.tensors["kvsharer.search_log"] = search_log_tensor(search.log)
        if search.attention_error is not None:
            ctx.tensors["kvsharer.attention_error"] = search.attention_error
        shared = [l for l, src in enumerate(search.sources) if src != l]
        ctx.report["kvsharer"] = {
            "shared_layers": shared,
            "share_source": list(search.sources),
            "target_shared": search.target,
            "trials": search.trials,
            "search_seconds": search.seconds,
            "final": search.final,
        }
        if len(shared) < search.target and not searched:
            log.warning(
                "kvsharer: only %d of %d layers could be shared within %d trials at threshold %.3f",
                len(shared), search.target, search.trials, settings.threshold,
            )
        if ctx.methods == ("kvsharer",):  # sharing alone keeps the owning layers' caches whole
            ctx.target_ratio = (len(search.sources) - len(shared)) / len(search.sources)

    ctx.finalizers.append(finish)


__all__ = [
    "calibration_step",
    "SharerSettings", "MeanKVObserver", "AttentionErrorObserver", "Acceptance", "SearchResult", "layer_distances", "candidate_pairs",
    "resolve_chains", "greedy_search", "acceptance_windows", "sharing_plan", "search_log_tensor",
    "parse_share_layers",
]
