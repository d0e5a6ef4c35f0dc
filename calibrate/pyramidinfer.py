"""PyramidInfer, calibrated: per-layer keep fractions from how concentrated recent-query attention is.

For every calibration sample and layer the observer cuts the sequence at a few points ``t``. The context
``[0, t)`` is scored exactly as the runtime scores it (mean attention of the last ``window`` queries, sinks and the
recent window protected), and the attention of the *next* ``horizon`` queries — the ones a compressed cache has to
serve — measures how much of their context attention mass a layer would still see if it kept a fraction ``f`` of
the context. Averaged over samples and cut points this gives, per layer, a curve ``captured_l(f)``.

The keep fractions then come from one budget: memory is split across layers so that the total attention mass
lost, ``sum_l (1 - captured_l(f_l))``, is smallest while the kept KV bytes equal ``target_ratio`` of the full
cache (greedy on marginal gains over a fine grid, taken on each curve's upper concave envelope: see
``allocate_keep``). Layers whose recent queries attend to few tokens get little,
layers with spread attention get much: the pyramid, where the model has one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from runtime.pyramidinfer import METHOD, window_scores

log = logging.getLogger(__name__)

GRID = 256  # resolution of the captured-mass curves (fractions 0, 1/GRID, ..., 1)
CUT_FRACTIONS = (0.5, 0.75, 1.0)  # cut points as fractions of the longest usable context


@dataclass
class PyramidSettings:
    """PyramidInfer's parameters for one calibration: the runtime ones (stored in the plan) and the calibration-only
    ones. Defaults and ranges are those of the method's registration (``runtime.pyramidinfer.METHOD``).

    Attributes:
        window: recent tokens always kept at runtime; also the number of last queries that score the context.
        sink: first tokens always kept.
        slack: tokens a layer may hold above its budget before compacting while decoding (None: grows with it).
        pool: average-pooling width of the prefill scores.
        head_reduce: how the query heads' attention is combined into one score per token.
        horizon: queries after each cut point whose attention measures what a budget captures.
    """

    window: int
    sink: int
    slack: int | None
    pool: int
    head_reduce: str
    horizon: int

    @classmethod
    def from_args(cls, args: dict) -> PyramidSettings:
        """Settings from a recipe's ``pyramidinfer`` mapping (validated, defaults filled in by the registration)."""
        return cls(**METHOD.resolve_args(args, "pyramidinfer"))

    def runtime_params(self) -> dict:
        """The parameters written into the plan (``window`` and ``sink`` always, the others when not default)."""
        return METHOD.plan_params(self.__dict__)


@dataclass
class CapturedMassObserver:
    """Accumulates, per layer, the captured-mass curve ``captured_l(f)`` on a grid of keep fractions.

    ``curves[l]`` is float64 ``[GRID + 1]``: summed over observations, the fraction of the next queries' context
    attention that falls on the tokens a layer keeping ``f = i / GRID`` of the context would hold.
    """

    num_layers: int
    settings: PyramidSettings
    pairs: frozenset = frozenset()  # KVSharer (reader, source) pairs: reader queries over the source's keys
    curves: torch.Tensor = field(init=False)
    counts: torch.Tensor = field(init=False)
    pair_curves: dict = field(init=False)
    pair_counts: dict = field(init=False)

    def __post_init__(self) -> None:
        self.curves = torch.zeros(self.num_layers, GRID + 1, dtype=torch.float64)
        self.counts = torch.zeros(self.num_layers, dtype=torch.float64)
        self.pair_curves = {pair: torch.zeros(GRID + 1, dtype=torch.float64) for pair in self.pairs}
        self.pair_counts = {pair: 0 for pair in self.pairs}
        self._sources = {source for _, source in self.pairs}
        self._keys: dict[int, torch.Tensor] = {}  # this sample's keys of layers some reader needs

    def cut_points(self, seq_len: int) -> list[int]:
        """Context lengths ``t`` observed in a sample of ``seq_len`` tokens (none if it is too short)."""
        s = self.settings
        last = seq_len - s.horizon
        shortest = s.sink + s.window + 1
        if last <= shortest:
            return []
        return sorted({max(shortest, int(last * c)) for c in CUT_FRACTIONS})

    def observe(self, layer_idx, query, key, value, scaling) -> None:
        if layer_idx >= self.num_layers:
            return
        cuts = self.cut_points(query.shape[2])
        for t in cuts:
            self.curves[layer_idx] += self._curve(query, key, scaling, t)
            self.counts[layer_idx] += 1
        if layer_idx in self._sources:
            self._keys[layer_idx] = key
        for reader, source in self.pairs:
            if reader == layer_idx and source in self._keys:
                source_keys = self._keys[source].to(query.device)  # layers may run on different devices
                for t in cuts:
                    self.pair_curves[(reader, source)] += self._curve(query, source_keys, scaling, t)
                    self.pair_counts[(reader, source)] += 1

    def end_sample(self) -> None:
        self._keys.clear()

    def _curve(self, query: torch.Tensor, key: torch.Tensor, scaling: float, t: int) -> torch.Tensor:
        s = self.settings
        ctx_keys = key[:, :, :t]
        valid = torch.ones(1, t, dtype=torch.bool, device=key.device)
        select = window_scores(query[:, :, :t], ctx_keys, valid, scaling, s.window, s.pool, s.head_reduce)[0, 0]
        protected = torch.zeros(t, dtype=torch.bool, device=key.device)
        protected[: s.sink] = True
        protected[t - s.window :] = True
        mass = self._future_mass(query, key, scaling, t)  # [t]
        total = mass.sum().clamp(min=1e-12)
        order = torch.argsort(select.masked_fill(protected, float("inf")), descending=True, stable=True)
        cum = torch.cat([mass.new_zeros(1), mass[order].cumsum(0)]) / total  # cum[k]: top-k tokens kept
        kept = torch.ceil(torch.linspace(0, 1, GRID + 1, dtype=torch.float64) * t).long()
        kept = kept.clamp(min=int(protected.sum()), max=t)
        return cum[kept.to(cum.device)].double().cpu()

    def _future_mass(self, query, key, scaling, t) -> torch.Tensor:
        """Mean attention that queries ``t .. t+horizon`` put on each context token ``< t`` (heads averaged)."""
        h = self.settings.horizon
        bsz, n_q, _, dim = query.shape
        n_kv = key.shape[1]
        groups = n_q // n_kv
        q = query[:, :, t : t + h].float().reshape(bsz, n_kv, groups * h, dim)
        k = key[:, :, : t + h].float()
        logits = torch.matmul(q, k.transpose(-1, -2)).view(bsz, n_kv, groups, h, t + h) * scaling
        future = torch.arange(t, t + h, device=key.device)
        causal = torch.arange(t + h, device=key.device)[None, :] <= future[:, None]  # [h, t+h]
        probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
        return probs[..., :t].mean(dim=(0, 1, 2, 3))

    def mean_curves(self) -> torch.Tensor:
        """float64 ``[L, GRID + 1]`` averaged curves (layers never observed: all ones, i.e. nothing to gain)."""
        out = torch.ones_like(self.curves)
        seen = self.counts > 0
        out[seen] = self.curves[seen] / self.counts[seen, None]
        # a kept set only grows with f: make the curves monotone so the allocation is well posed
        return torch.cummax(out, dim=1).values

    def group_curves(self, sources: list[int] | None) -> torch.Tensor:
        """Curves for a KVSharer map: an owner's curve is its own plus each reader's over the owner's keys.

        A layer read by others serves their queries too, so the attention mass it loses counts once per reader.
        Rows of reading layers are left as their own curves (they are not budgeted).
        """
        curves = self.mean_curves()
        if sources is None:
            return curves
        grouped = curves.clone()
        for reader, source in enumerate(sources):
            if source == reader:
                continue
            count = self.pair_counts.get((reader, source), 0)
            if count == 0:
                raise ValueError(f"no curve observed for layer {reader} reading layer {source}'s cache")
            grouped[source] += torch.cummax(self.pair_curves[(reader, source)] / count, dim=0).values
        return grouped


def _envelope_segments(curve: torch.Tensor, start: int) -> list[tuple[float, int, int]]:
    """The upper concave envelope of ``curve[start:]`` as segments ``(slope, from_step, to_step)``.

    Slopes do not increase along the list. Where the curve is concave, each grid step is its own segment and its
    slope is exactly the one-step gain ``curve[i + 1] - curve[i]``; a stretch that first rises slowly (or stays
    flat) and then steeply becomes one segment whose slope is the mean gain over the whole stretch.
    """
    values = curve.tolist()
    hull: list[int] = []
    for i in range(start, len(values)):
        # drop the last vertex while it lies below the chord from the one before it to step i
        while len(hull) >= 2 and (
            (values[hull[-1]] - values[hull[-2]]) / (hull[-1] - hull[-2])
            < (values[i] - values[hull[-1]]) / (i - hull[-1])
        ):
            hull.pop()
        hull.append(i)
    return [((values[b] - values[a]) / (b - a), a, b) for a, b in zip(hull[:-1], hull[1:])]


def allocate_keep(
    curves: torch.Tensor, budgeted: list[bool], budget_fraction: float, floor: torch.Tensor
) -> torch.Tensor:
    """Split a memory budget across layers to capture the most attention mass.

    Args:
        curves: float64 ``[L, GRID + 1]`` captured mass at keep fraction ``i / GRID``.
        budgeted: which layers may be compressed (others keep everything and are not part of the budget).
        budget_fraction: mean keep fraction over the budgeted layers.
        floor: float64 ``[L]`` smallest fraction each layer keeps anyway (sinks + recent window).

    Returns:
        float32 ``[L]`` keep fractions (1.0 for layers not budgeted), on the grid, at least ``floor``, their mean
        over the budgeted layers ``budget_fraction`` rounded to the grid (unless the floors alone exceed it).

    Greedy on marginal gains, taken on each curve's upper concave envelope above its floor: the budget goes one
    envelope segment at a time to the steepest segment of any layer (ties: the lowest layer first), the last one
    cut to what is left. On concave curves this is exactly the one-step greedy; it differs where a curve is flat or
    rises slowly and then steeply, a stretch the one-step greedy never climbs. Observed curves are flat up to
    ``(sink + window) / t`` of the longest cut context ``t <= seq_len - horizon``: at short calibration lengths
    (512 tokens) that covers every layer's floor, all one-step gains there were zero, and the one-step greedy
    filled the first layers in index order. The result is within one envelope gap (how far a curve falls below its
    envelope) of the exact optimum: only the cut segment can end below the envelope.
    """
    n_layers = curves.shape[0]
    idx = [l for l in range(n_layers) if budgeted[l]]
    steps = torch.zeros(n_layers, dtype=torch.long)
    segments = []
    for l in idx:
        steps[l] = int(torch.ceil(floor[l] * GRID))
        segments += [(slope, l, a, b) for slope, a, b in _envelope_segments(curves[l], int(steps[l]))]
    segments.sort(key=lambda seg: (-seg[0], seg[1], seg[2]))
    total = round(budget_fraction * GRID * len(idx))
    used = int(steps[idx].sum()) if idx else 0
    for _, l, a, b in segments:
        if used >= total:
            break
        take = min(b - a, total - used)
        steps[l] += take
        used += take
    keep = torch.ones(n_layers, dtype=torch.float32)
    for l in idx:
        keep[l] = float(steps[l]) / GRID
    return keep


def fixed_and_stock(layer_kinds: list[str], seq_len: int, sliding_window: int | None) -> tuple[int, int]:
    """Tokens per KV head that the sliding-window layers hold at ``seq_len`` (``min(seq_len, window)`` each: no method
    compresses them, so they are fixed) and that the stock cache holds over every layer."""
    held_fixed = sum(min(seq_len, sliding_window or seq_len) for kind in layer_kinds if kind != "full_attention")
    return held_fixed, held_fixed + seq_len * sum(kind == "full_attention" for kind in layer_kinds)


def full_attention_ratio(
    achieved: float, layer_kinds: list[str], seq_len: int, sliding_window: int | None
) -> float | None:
    """The kept fraction of the *full-attention* layers' stock bytes that a kept fraction ``achieved`` of the whole
    stock cache (every layer, at ``seq_len``) is; None for a model without sliding-window layers (the same number)."""
    held_fixed, stock = fixed_and_stock(layer_kinds, seq_len, sliding_window)
    if held_fixed == 0 or stock == held_fixed:
        return None
    return (achieved * stock - held_fixed) / (stock - held_fixed)


def full_attention_note(report: dict) -> str:
    """What a report's kept ratio is of the full-attention layers' bytes, for a model with sliding-window layers
    (``" of every layer's KV bytes (0.5000 of the full-attention layers')"``); empty otherwise."""
    ratio = report.get("full_attention_ratio_at_calibration_length")
    return "" if ratio is None else f" of every layer's KV bytes ({ratio:.4f} of the full-attention layers')"


def check_target_reachable(
    layer_kinds: list[str], target_ratio: float, seq_len: int, sliding_window: int | None
) -> None:
    """``ValueError`` saying why, when the sliding-window layers alone hold more than ``target_ratio`` of the stock
    cache at ``seq_len``: no plan can reach the target (nothing compresses those layers)."""
    held_fixed, stock = fixed_and_stock(layer_kinds, seq_len, sliding_window)
    if held_fixed == 0 or target_ratio * stock >= held_fixed:
        return
    n_sliding = sum(kind != "full_attention" for kind in layer_kinds)
    fixed = held_fixed / stock
    raise ValueError(
        f"target ratio {target_ratio:g} cannot be reached on this model: --target-ratio counts every layer's KV "
        f"bytes, and its {n_sliding} sliding-window layers (window {sliding_window}) alone hold {fixed:.4f} of the "
        f"stock cache at the calibration length ({seq_len} tokens); no method compresses them (they are bounded by "
        f"their window already). Keeping a fraction r of the {len(layer_kinds) - n_sliding} full-attention layers' "
        f"bytes is --target-ratio {fixed:.4f} + {1 - fixed:.4f} r at {seq_len} tokens (r = 1/2: "
        f"{fixed + (1 - fixed) / 2:.4f}, r = 1/4: {fixed + (1 - fixed) / 4:.4f})"
    )


def precheck(ctx) -> None:
    """Before any calibration pass (``calibrate.pipeline``): refuse a target the sliding-window layers alone exceed."""
    from .pipeline import CalibrationError

    try:
        check_target_reachable(
            ctx.kinds, ctx.recipe.target_ratio, ctx.seq_len, getattr(ctx.config, "sliding_window", None)
        )
    except ValueError as exc:
        raise CalibrationError(str(exc)) from None


def calibrate_layer_keep(
    observer: CapturedMassObserver, layer_kinds: list[str], target_ratio: float, seq_len: int,
    sliding_window: int | None, sources: list[int] | None = None,
) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
    """Turn the observed curves into ``layer_keep`` meeting ``target_ratio`` of the stock cache at ``seq_len``.

    Sliding-window layers are held at ``min(seq_len, window)`` tokens by the stock cache already and stay
    untouched; the full-attention layers share what is left of the budget. With a KVSharer map (``sources``),
    sharing layers hold nothing (their fraction is written as 1.0 and ignored by the runtime) and the layers that
    own a cache share the whole budget, each weighted by the readers it serves. Returns the fractions, a report,
    the (grouped) mean curves float32 ``[L, GRID + 1]`` and the mass each layer captures float32 ``[L]``.
    """
    s = observer.settings
    full = [kind == "full_attention" for kind in layer_kinds]
    owner = [True] * len(layer_kinds) if sources is None else [src == l for l, src in enumerate(sources)]
    budgeted = [f and o for f, o in zip(full, owner)]
    held_fixed, stock = fixed_and_stock(layer_kinds, seq_len, sliding_window)
    n_full = sum(budgeted)
    if n_full == 0:
        raise ValueError("this model has no full-attention layers for PyramidInfer to compress")
    wanted = (target_ratio * stock - held_fixed) / (seq_len * n_full)
    floor_frac = min(1.0, (s.sink + s.window) / seq_len)
    fraction = min(1.0, max(wanted, floor_frac))
    floor = torch.full((len(layer_kinds),), floor_frac, dtype=torch.float64)
    curves = observer.group_curves(sources)
    keep = allocate_keep(curves, budgeted, fraction, floor)
    kept_tokens = held_fixed + sum(float(keep[l]) * seq_len for l in range(len(keep)) if budgeted[l])
    steps = (keep.double() * GRID).round().long().clamp(0, GRID)
    captured = curves[torch.arange(len(keep)), steps]
    if sources is not None:  # grouped curves add one curve per reader: report the group's mean
        members = torch.bincount(torch.tensor(sources), minlength=len(sources)).clamp(min=1)
        captured = captured / members
    report = {
        "target_ratio": target_ratio,
        "achieved_ratio_at_calibration_length": kept_tokens / stock,
        # with sliding-window layers: the same bytes as a fraction of the full-attention layers' stock bytes
        "full_attention_ratio_at_calibration_length": full_attention_ratio(
            kept_tokens / stock, layer_kinds, seq_len, sliding_window
        ),
        "calibration_length": seq_len,
        "mean_captured_mass": float(captured[torch.tensor(budgeted)].mean()),
        "observations_per_layer": int(observer.counts.max()),
        "feasible": floor_frac <= wanted <= 1.0,
    }
    return keep, report, curves.float(), captured.float()


def calibration_step(ctx) -> None:
    """PyramidInfer's calibration step (``runtime.pyramidinfer.METHOD``): one observed pass collects the captured-
    mass curves, the budget split gives ``pyramidinfer.layer_keep``. With KVSharer in the plan, the owners' curves
    include their readers' queries, and — when the split is searched — every candidate split is scored as a whole
    plan and the best sharing map is handed back to KVSharer (``ctx.state["kvsharer"]``)."""
    from .budget_split import choose_split, split_is_searched
    from .collect import run_calibration_pass
    from .pipeline import CalibrationError

    try:
        settings = PyramidSettings.from_args(ctx.args("pyramidinfer"))
    except ValueError as exc:
        raise CalibrationError(str(exc)) from None
    search = ctx.state.get("kvsharer")
    maps = [] if search is None else search.steps
    pairs = frozenset((r, s) for m in maps for r, s in enumerate(m) if r != s)
    observer = CapturedMassObserver(ctx.config.num_hidden_layers, settings, pairs=pairs)
    ctx.pass_seconds += run_calibration_pass(
        ctx.model, ctx.samples, [observer], progress=ctx.bar("pyramidinfer: attention mass")
    )
    if observer.counts.max() == 0:
        raise CalibrationError(
            f"calibration samples of {ctx.seq_len} tokens are too short for PyramidInfer (need more than "
            f"{settings.sink + settings.window + settings.horizon + 1}); raise --max-seq-length or use more data"
        )
    target = ctx.recipe.target_ratio
    window = getattr(ctx.config, "sliding_window", None)

    def allocate(sources):
        return calibrate_layer_keep(observer, ctx.kinds, target, ctx.seq_len, window, sources)

    sources = None if search is None else search.sources
    if search is not None and split_is_searched(ctx.recipe, ctx.methods):
        sources, split_table = choose_split(
            ctx.model, ctx.samples, ctx.kinds, search, settings.runtime_params(), allocate
        )
        ctx.report["split"] = split_table
        ctx.provenance["joint_split"] = split_table
    keep, report, curves, captured = allocate(sources)
    if not report["feasible"]:
        log.warning(
            "target ratio %.4f cannot be met exactly at %d tokens (sinks + recent window, or every owning "
            "layer kept whole); the plan keeps %.4f",
            target, ctx.seq_len, report["achieved_ratio_at_calibration_length"],
        )
    ctx.tensors["pyramidinfer.layer_keep"] = keep
    ctx.tensors["pyramidinfer.captured_curve"] = curves
    ctx.tensors["pyramidinfer.captured_mass"] = captured
    ctx.params["pyramidinfer"] = settings.runtime_params()
    ctx.report["pyramidinfer"] = report
    if search is not None:
        search.sources = sources
