"""KCache, calibrated: per layer, how many value rows each decode step must read to keep the attention output.

At decode time (arXiv 2404.18057) the keys stay with the model and the values live in a second store: each decode
step of layer ``l`` scores the query against every kept key, takes the ``topn[l]`` rows per (batch row, KV head)
and reads only those value rows. With GQA there is one index set per KV head, chosen by the **sum** over the group's
query heads of their softmax probabilities (query head ``k * G + g`` belongs to KV head ``k``, ``G = H_q / H_kv``);
every query head of the group then weighs the selected rows with its own (exact) probabilities. The plan's
``estimator`` says what it does with the mass the selection missed: ``residual_mean`` (default) gives it to the
mean of the rows not read (the runtime knows their sum from a resident per-(row, KV head) value sum),
``renormalise`` renormalises the weights over the selected rows. Each is calibrated with its own error.

**Measurement.** For every calibration sample and full-attention layer that owns its cache, the observer takes the
last ``queries`` query positions ``t`` (samples shorter than ``queries + GRID_START`` tokens are skipped). For each
of them and each query head the exact output ``o`` over keys ``0 .. t`` (causal) and, for every ``N`` on a grid
(:func:`topn_grid`: 16, 24, 32, 48, 64, ... below the longest sample, up to the flat limit below: a larger ``N`` is
never chosen), the top-``N`` output ``o_N`` are computed as the runtime computes them (:func:`topn_outputs`; one
descending sort of the selection score per (KV head, query), every ``N``'s set is ``rank < N``; ``N >=`` the visible
keys selects them all: error 0). A layer's error at ``N`` is the relative error of its whole output,
``||O_N - O||_F / ||O||_F`` over all measured queries, heads and samples (sums of squares accumulated, then the
square root of their ratio) — the output, not only the captured mass: values that point the same way cost less to
drop than the mass alone says.

**Choice.** ``topn[l]`` is the smallest grid ``N`` whose error — on the curve's non-increasing envelope (the largest
error at this or any larger grid ``N``: the selection is never a lucky dip of a non-monotone curve) — is at most
``tolerance``. A layer with no such ``N``, or whose ``N`` exceeds ``flat_fraction`` of the calibration context (the
mean number of keys the measured queries see), has attention too flat for KCache to pay: ``topn = 0``, it keeps its
values with the model and reads all. ``kcache.output_error[l]`` is the measured error at the chosen ``N`` (0 where
``topn = 0``).

**KVSharer.** A reading layer ``r`` (``sources[r] = l != r``) reads ``l``'s store with its own queries at run time.
Approximation: the calibration pass runs the unshared model, and ``r``'s queries (from the unshared hidden states)
are measured over ``l``'s keys and values of that pass (held until the readers ran, as the KV-Compress observer
does) — closer to run time than ``r``'s own keys and values, still not the shared model's queries. The owner's ``N``
is the largest its group needs (the owner's and each reader's envelope, maximum taken per ``N``: an owner is flat if
any member is), its recorded error the worst member's. Readers own no cache: their ``topn`` entry is written 0 and
ignored at run time.

**Composition.** With PyramidInfer or KV-Compress in the plan, KCache selects among the tokens a layer keeps, not the
whole context, and the runtime estimates over the kept rows. Calibrating on the full context is an
approximation: where the eviction keeps the tokens attention concentrates on (its aim), the top-``N`` of the kept
tokens is mostly the top-``N`` of the context, and the error is close to the one measured here; it is not the same
quantity. ``N`` is not capped by the budget: the runtime reads ``min(N, held)`` rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from runtime.kcache import METHOD

from .pipeline import CalibrationError

log = logging.getLogger(__name__)

GRID_START = 16  # smallest N measured
BLOCK_ELEMENTS = 1 << 21  # largest [H_q, chunk, T] float32 attention block processed at once (8 MiB)


# ----------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------


@dataclass
class KCacheSettings:
    """KCache's calibration parameters (recipe key ``kcache``), validated and with the defaults of the method's
    registration (``runtime.kcache.METHOD``; its one runtime parameter, ``estimator``, goes into the plan's
    ``params["kcache"]`` when it is not the default).

    Attributes:
        tolerance: largest relative error of a layer's attention output (top-N vs all values) its N may cause.
        queries: last query positions of each sample whose top-N output is measured.
        flat_fraction: a layer whose N would exceed this fraction of the calibration context keeps its values with
            the model (``topn = 0``).
    """

    estimator: str
    tolerance: float
    queries: int
    flat_fraction: float

    @classmethod
    def from_args(cls, args: dict) -> KCacheSettings:
        """Settings from a recipe's ``kcache`` mapping; ``ValueError`` for unknown names or bad values."""
        return cls(**METHOD.resolve_args(args, "kcache"))

    def runtime_params(self) -> dict:
        """The runtime parameters written into the plan (``estimator`` when it is not the default)."""
        return METHOD.plan_params(self.__dict__)

    def min_length(self) -> int:
        """Shortest sample measured: every measured query sees more than ``GRID_START`` keys."""
        return self.queries + GRID_START

    def context(self, lengths: Sequence[int]) -> float:
        """Mean number of keys the measured queries of samples of these lengths see (the calibration context)."""
        used = [n for n in lengths if n >= self.min_length()]
        if not used:
            return 0.0
        return sum(n - (self.queries - 1) / 2 for n in used) / len(used)


def topn_grid(longest: int, limit: float | None = None) -> tuple[int, ...]:
    """The top-N grid: ``16, 24, 32, 48, 64, 96, ...`` (``2^k`` and ``3 * 2^(k-1)``) below ``longest`` visible keys
    and at most ``limit`` (the flat limit: a larger N is never chosen, so it is not measured).

    ``N >= longest`` reads every row: its error is 0 and it is not measured.
    """
    top = longest - 1 if limit is None else min(longest - 1, limit)
    grid = []
    n = GRID_START
    while n <= top:
        grid += [m for m in (n, n * 3 // 2) if m <= top]
        n *= 2
    return tuple(grid)


# ----------------------------------------------------------------------------------------------------------
# Top-N attention
# ----------------------------------------------------------------------------------------------------------


def topn_outputs(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, positions: torch.Tensor,
    grid: Sequence[int], estimator: str = "residual_mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact and top-N attention outputs of some queries, as KCache's decode step computes them.

    Args:
        query: ``[H_q, c, d]`` the queries at ``positions``.
        key / value: ``[H_kv, T, d]`` / ``[H_kv, T, d_v]`` (``T > max(positions)``); query ``i`` sees keys
            ``0 .. positions[i]``.
        scaling: the softmax scale.
        positions: int64 ``[c]``.
        grid: the N values.
        estimator: the runtime's estimate from the selected rows (``runtime.kcache.estimate``): ``renormalise``
            or ``residual_mean`` (the missed mass times the mean of the visible rows not selected).

    Returns:
        ``exact`` float32 ``[H_q, c, d_v]`` and ``approx`` float32 ``[len(grid), H_q, c, d_v]``: for each N, per
        (KV head, query) the N visible keys with the largest summed probability of the head's query group, weighed
        by each query head's probabilities, as ``estimator`` says (``N >=`` visible keys: all of them, ``approx ==
        exact`` exactly).
    """
    n_q, c, dim = query.shape
    n_kv = key.shape[0]
    groups = n_q // n_kv
    span = int(positions.max()) + 1  # keys any of these queries sees
    k = key[:, :span].float().contiguous()
    v = value[:, :span].float().contiguous()
    q = query.float().reshape(n_kv, groups * c, dim)
    logits = torch.matmul(q, k.transpose(-1, -2)).view(n_kv, groups, c, span) * scaling
    visible = torch.arange(span, device=key.device)[None, :] <= positions.to(key.device)[:, None]  # [c, span]
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)  # [H_kv, G, c, span]
    flat = probs.view(n_kv, groups * c, span)
    exact = torch.matmul(flat, v) / flat.sum(-1, keepdim=True)  # [H_kv, G * c, d]
    # one index set per (KV head, query): rank of every key by the group's summed probability, invisible keys last
    score = probs.sum(dim=1).masked_fill(~visible, -1.0)  # [H_kv, c, span]
    order = torch.argsort(score, dim=-1, descending=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(span, device=key.device).expand_as(order))
    approx = exact.new_empty(len(grid), *exact.shape)
    for i, n in enumerate(grid):
        if n >= span:  # every visible key of every query is selected
            approx[i] = exact
            continue
        selected = rank < n  # [H_kv, c, span]
        kept = (probs * selected[:, None]).view(n_kv, groups * c, span)
        if estimator == "renormalise":
            approx[i] = torch.matmul(kept, v) / kept.sum(-1, keepdim=True)
            continue
        selected = selected & visible
        rest = (visible.float() - selected.float())  # [H_kv, c, span]: the visible rows not read
        rest_mean = torch.matmul(rest, v) / rest.sum(-1, keepdim=True).clamp(min=1)  # [H_kv, c, d]
        missed = (1.0 - kept.sum(-1, keepdim=True)).clamp(min=0).view(n_kv, groups, c, 1)
        estimate = torch.matmul(kept, v).view(n_kv, groups, c, -1) + missed * rest_mean[:, None]
        read_all = (positions.to(key.device) < n)[:, None]  # [c, 1]: a query that sees <= N keys reads them all
        approx[i] = torch.where(read_all, exact.view(n_kv, groups, c, -1), estimate).view(n_kv, groups * c, -1)
    out_dim = value.shape[-1]
    return exact.view(n_q, c, out_dim), approx.view(len(grid), n_q, c, out_dim)


def sample_errors(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, queries: int, grid: Sequence[int],
    estimator: str = "residual_mean",
) -> tuple[torch.Tensor, float]:
    """Squared top-N output errors of the last ``queries`` queries of one sample.

    Args:
        query: ``[1, H_q, T, d]``; key / value: ``[1, H_kv, T, d]`` (post-RoPE, as the observer sees them).

    Returns:
        float64 ``[len(grid)]`` ``sum ||o_N - o||^2`` and ``sum ||o||^2`` over the measured queries and query heads.
        The queries are processed in chunks so that one ``[H_q, chunk, T]`` block stays within ``BLOCK_ELEMENTS``.
    """
    _, n_q, length, _ = query.shape
    first = max(0, length - queries)
    chunk = max(1, BLOCK_ELEMENTS // (n_q * length))
    key = key[0].float().contiguous()  # the model hands strided views: copy once, not once per N
    value = value[0].float().contiguous()
    errors = torch.zeros(len(grid), dtype=torch.float64)
    norm = 0.0
    for start in range(first, length, chunk):
        positions = torch.arange(start, min(start + chunk, length))
        q = query[0, :, start : start + positions.numel()]
        exact, approx = topn_outputs(q, key, value, scaling, positions, grid, estimator)
        errors += (approx - exact).double().square().sum(dim=(1, 2, 3)).cpu()
        norm += float(exact.double().square().sum())
    return errors, norm


# ----------------------------------------------------------------------------------------------------------
# The observer
# ----------------------------------------------------------------------------------------------------------


@dataclass
class TopNErrorObserver:
    """Accumulates, per layer, the top-N output error on a grid of N (a :class:`calibrate.collect.LayerObserver`).

    With a KVSharer map (``sources``, chains resolved), layer ``l`` is measured with its own queries over the keys and
    values of its owner ``sources[l]`` (held for the sample until the readers, which come after their owner, ran).
    Samples shorter than ``min_length`` are not measured.

    Attributes (after the pass):
        errors: float64 ``[L, len(grid)]`` summed ``||O_N - O||^2``.
        norms: float64 ``[L]`` summed ``||O||^2``.
        counts: int ``[L]`` samples measured.
    """

    num_layers: int
    grid: tuple[int, ...]
    queries: int
    observed: list[bool]
    min_length: int = 1
    sources: list[int] | None = None
    estimator: str = "residual_mean"
    errors: torch.Tensor = field(init=False)
    norms: torch.Tensor = field(init=False)
    counts: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.errors = torch.zeros(self.num_layers, len(self.grid), dtype=torch.float64)
        self.norms = torch.zeros(self.num_layers, dtype=torch.float64)
        self.counts = torch.zeros(self.num_layers, dtype=torch.long)
        self.sources = list(range(self.num_layers)) if self.sources is None else list(self.sources)
        if len(self.sources) != self.num_layers or len(self.observed) != self.num_layers:
            raise ValueError("sources and observed must have one entry per layer")
        self._read = {src for layer, src in enumerate(self.sources) if src != layer and self.observed[layer]}
        self._held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # this sample's k/v of owners with readers

    def observe(self, layer_idx, query, key, value, scaling) -> None:
        """``query [1, H_q, N, d]``, ``key``/``value [1, H_kv, N, d]`` of the current sample at one layer."""
        if layer_idx >= self.num_layers or not self.observed[layer_idx] or query.shape[2] < self.min_length:
            return
        owner = self.sources[layer_idx]
        if owner == layer_idx:
            if layer_idx in self._read:
                self._held[layer_idx] = (key, value)
        else:
            if owner not in self._held:
                raise RuntimeError(f"kcache: layer {layer_idx} reads layer {owner}, whose keys were not seen first")
            key, value = (held.to(query.device) for held in self._held[owner])  # devices may differ per layer
        errors, norm = sample_errors(query, key, value, scaling, self.queries, self.grid, self.estimator)
        self.errors[layer_idx] += errors
        self.norms[layer_idx] += norm
        self.counts[layer_idx] += 1

    def end_sample(self) -> None:
        self._held.clear()

    def curves(self) -> torch.Tensor:
        """float64 ``[L, len(grid)]`` relative output error ``sqrt(sum ||O_N - O||^2 / sum ||O||^2)`` (0 for
        layers never measured)."""
        return (self.errors / self.norms.clamp(min=1e-30)[:, None]).sqrt()


# ----------------------------------------------------------------------------------------------------------
# The choice
# ----------------------------------------------------------------------------------------------------------


def envelope(curves: torch.Tensor) -> torch.Tensor:
    """The non-increasing envelope of error curves ``[..., n]``: at each N the largest error at that or a larger N."""
    return torch.cummax(curves.flip(-1), dim=-1).values.flip(-1)


def group_curves(curves: torch.Tensor, sources: Sequence[int] | None) -> torch.Tensor:
    """Envelopes for a KVSharer map ``[L, n]``: an owner's row is the largest envelope of its group (itself and its
    readers), a reader's row its own."""
    env = envelope(curves)
    if sources is None:
        return env
    index = torch.tensor(list(sources), dtype=torch.long)[:, None].expand_as(env)
    return env.scatter_reduce(0, index, env, reduce="amax", include_self=True)


def choose_topn(curves: torch.Tensor, grid: Sequence[int], tolerance: float, limit: float) -> torch.Tensor:
    """int64 ``[L]``: per row, the smallest grid N whose (envelope) error is ``<= tolerance``; 0 where there is none
    or where it exceeds ``limit`` (flat attention: the layer reads all values)."""
    if not grid:
        return torch.zeros(curves.shape[0], dtype=torch.long)
    ok = envelope(curves) <= tolerance  # non-decreasing along N
    first = torch.where(ok.any(-1), ok.long().argmax(-1), torch.full((curves.shape[0],), -1))
    n = torch.tensor(list(grid), dtype=torch.long)[first.clamp(min=0)]
    return torch.where((first >= 0) & (n <= limit), n, torch.zeros_like(n))


def error_at(curves: torch.Tensor, grid: Sequence[int], topn: torch.Tensor) -> torch.Tensor:
    """float64 ``[L]``: each row's measured error at ``topn`` (0 where ``topn`` is 0 or not on the grid)."""
    if not grid:
        return torch.zeros(curves.shape[0], dtype=torch.float64)
    values = torch.tensor(list(grid), dtype=torch.long)
    hit = topn[:, None] == values[None, :]
    return torch.where(hit.any(-1), curves.gather(1, hit.long().argmax(-1, keepdim=True))[:, 0], 0.0)


def topn_table(report: dict) -> list[str]:
    """Lines of the per-layer table of a ``ctx.report["kcache"]`` (log and CLI)."""
    lines = [
        f"kcache: tolerance {report['tolerance']:.4f}, {report['queries']} queries x {report['samples']} samples; "
        f"context {report['context']:.0f} keys (flat above N = {report['flat_limit']:.0f}); mean fraction of value "
        f"rows read {report['mean_fraction_read']:.4f}",
        "  layer   topn   error   read",
    ]
    sources = report.get("share_source")
    for layer, (n, err, frac) in enumerate(zip(report["topn"], report["layer_error"], report["fraction_read"])):
        if sources is not None and sources[layer] != layer:
            lines.append(f"  {layer:5d}  reads layer {sources[layer]}'s cache (error {_fmt(err)} at its N)")
        elif err is None:
            lines.append(f"  {layer:5d}  not measured (not full attention): reads all")
        elif n == 0:
            lines.append(f"  {layer:5d}    all       -  1.000  (flat)")
        else:
            lines.append(f"  {layer:5d}  {n:5d}  {err:.4f}  {frac:.3f}")
    lines.append(f"kcache: {len(report['flat_layers'])} of {len(report['owners'])} owning layers keep V (flat)")
    return lines


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# ----------------------------------------------------------------------------------------------------------
# The calibration step
# ----------------------------------------------------------------------------------------------------------


def calibration_step(ctx) -> None:
    """KCache's calibration step (``runtime.kcache.METHOD``, after PyramidInfer's, KVSharer's and KV-Compress's):
    one observed pass measures every full-attention layer's top-N output error, the tolerance picks
    ``kcache.topn``; ``kcache.output_error`` records the error at the chosen N."""
    from .collect import run_calibration_pass

    try:
        settings = KCacheSettings.from_args(ctx.args("kcache"))
    except ValueError as exc:
        raise CalibrationError(str(exc)) from None
    n_layers = int(ctx.config.num_hidden_layers)
    search = ctx.state.get("kvsharer")
    sources = list(range(n_layers)) if search is None else list(search.sources)
    full = [kind == "full_attention" for kind in ctx.kinds]
    owners = [l for l in range(n_layers) if full[l] and sources[l] == l]
    if not owners:
        raise CalibrationError("this model has no full-attention layer that owns its cache for KCache to calibrate")

    run = [s for s in ctx.samples if int(s.numel()) >= settings.min_length()]
    if not run:
        raise CalibrationError(
            f"calibration samples of {ctx.seq_len} tokens are too short for KCache (need at least "
            f"{settings.min_length()}: kcache.queries {settings.queries} + {GRID_START}); raise --max-seq-length or "
            f"lower kcache.queries"
        )
    if len(run) < len(ctx.samples):
        log.warning("kcache: %d of %d samples shorter than %d tokens are not measured",
                    len(ctx.samples) - len(run), len(ctx.samples), settings.min_length())
    lengths = [int(s.numel()) for s in run]
    context = settings.context(lengths)
    limit = settings.flat_fraction * context
    grid = topn_grid(max(lengths), limit)
    observer = TopNErrorObserver(
        n_layers, grid, settings.queries, observed=full, min_length=settings.min_length(),
        sources=None if search is None else sources, estimator=settings.estimator,
    )
    ctx.pass_seconds += run_calibration_pass(ctx.model, run, [observer], progress=ctx.bar("kcache: top-N output error"))

    measured = torch.tensor(full) & (observer.counts > 0)
    unseen = [l for l in owners if not measured[l]]
    if len(unseen) == len(owners):
        raise CalibrationError("KCache observed no attention at all (no full-attention layer was seen)")
    if unseen:
        log.warning("kcache: layers %s were never observed; they keep their values (topn = 0)", unseen)
    curves = observer.curves()  # [L, len(grid)]
    owner_mask = torch.tensor([l in owners for l in range(n_layers)])
    is_owner = owner_mask & measured

    def build(tolerance: float) -> tuple[dict[str, torch.Tensor], dict]:
        """The plan's KCache tensors and the report for one tolerance (the joint search tries several)."""
        topn = torch.where(is_owner, choose_topn(group_curves(curves, sources), grid, tolerance, limit), 0)
        reads = topn[torch.tensor(sources)]  # the N of the store each layer reads
        own_error = error_at(curves, grid, reads)  # each layer's error at the N of the store it reads
        group_error = torch.zeros(n_layers, dtype=torch.float64).scatter_reduce(
            0, torch.tensor(sources), torch.where(measured, own_error, 0.0), reduce="amax", include_self=True,
        )
        output_error = torch.where(is_owner & (topn > 0), group_error, 0.0)
        rows = torch.where(topn > 0, topn.double().clamp(max=context), context)
        fraction = rows / max(context, 1e-9)
        tensors = {"kcache.topn": topn.to(torch.int32), "kcache.output_error": output_error.float()}
        report = {
            "estimator": settings.estimator,
            "tolerance": tolerance,
            "queries": settings.queries,
            "flat_fraction": settings.flat_fraction,
            "calibration_length": ctx.seq_len,
            "context": context,
            "flat_limit": limit,
            "grid": list(grid),
            "samples": len(run),
            "topn": [int(n) for n in topn],
            "output_error": [float(e) for e in output_error],
            # a layer's own error at the N of the store it reads (a reader: its owner's N); None: not measured
            "layer_error": [float(own_error[l]) if measured[l] else None for l in range(n_layers)],
            # what each layer alone would need (a reader: over its owner's keys); 0: flat or not measured
            "layer_needs": [int(n) for n in torch.where(measured, choose_topn(curves, grid, tolerance, limit), 0)],
            "fraction_read": [float(fraction[l]) if l in owners else None for l in range(n_layers)],
            "mean_fraction_read": float(rows[owner_mask].sum() / (context * len(owners))),
            "owners": owners,
            "flat_layers": [l for l in owners if int(topn[l]) == 0],
            "share_source": None if search is None else sources,
            "error_curves": [[float(e) for e in curves[l]] if measured[l] else None for l in range(n_layers)],
        }
        return tensors, report

    tensors, report = build(settings.tolerance)
    ctx.tensors.update(tensors)
    ctx.params["kcache"] = settings.runtime_params()
    ctx.state["kcache"] = build  # the joint search (calibrate.joint) may choose another tolerance
    ctx.report["kcache"] = report
    ctx.provenance["kcache_calibration"] = {
        "grid": list(grid), "queries": settings.queries, "samples": len(run), "context": round(context, 1),
        "selection": "per (KV head, query): top-N of the GQA group's summed softmax probabilities",
        "error": "relative Frobenius error of the attention output, on the curve's non-increasing envelope",
        "readers": "reader queries over the owner's keys and values (unshared pass); owner's N = max over its group",
    }


__all__ = [
    "BLOCK_ELEMENTS", "GRID_START", "KCacheSettings", "TopNErrorObserver", "calibration_step", "choose_topn",
    "envelope", "error_at", "group_curves", "sample_errors", "topn_grid", "topn_outputs", "topn_table",
]
