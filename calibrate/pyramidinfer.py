"""PyramidInfer, calibrated: per-layer keep fractions from how concentrated recent-query attention is.

For every calibration sample and layer the observer cuts the sequence at a few points ``t``. The context
``[0, t)`` is scored exactly as the runtime scores it (mean attention of the last ``window`` queries, sinks and the
recent window protected), and the attention of the *next* ``horizon`` queries — the ones a compressed cache has to
serve — measures how much of their context attention mass a layer would still see if it kept a fraction ``f`` of
the context. Averaged over samples and cut points this gives, per layer, a curve ``captured_l(f)``.

The keep fractions then come from one budget: memory is split across layers so that the total attention mass
lost, ``sum_l (1 - captured_l(f_l))``, is smallest while the kept KV bytes equal ``target_ratio`` of the full
cache (greedy on marginal gains over a fine grid). Layers whose recent queries attend to few tokens get little,
layers with spread attention get much: the pyramid, where the model has one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from runtime.pyramidinfer import window_scores

GRID = 256  # resolution of the captured-mass curves (fractions 0, 1/GRID, ..., 1)
CUT_FRACTIONS = (0.5, 0.75, 1.0)  # cut points as fractions of the longest usable context


@dataclass
class PyramidSettings:
    """Runtime parameters (stored in the plan) and calibration-only parameters.

    Attributes:
        window: recent tokens always kept at runtime; also the number of last queries that score the context.
        sink: first tokens always kept.
        horizon: queries after each cut point whose attention measures what a budget captures.
    """

    window: int = 32
    sink: int = 4
    horizon: int = 64
    pool: int = 1
    head_reduce: str = "mean"

    @classmethod
    def from_args(cls, args: dict) -> PyramidSettings:
        known = {"window", "sink", "horizon", "pool", "head_reduce"}
        unknown = set(args) - known
        if unknown:
            raise ValueError(f"unknown pyramidinfer option(s) {sorted(unknown)}; known: {sorted(known)}")
        settings = cls(**{k: (str(v) if k == "head_reduce" else int(v)) for k, v in args.items()})
        if settings.window < 1 or settings.sink < 0 or settings.horizon < 1 or settings.pool < 1:
            raise ValueError("pyramidinfer needs window >= 1, sink >= 0, horizon >= 1 and pool >= 1")
        if settings.head_reduce not in ("mean", "max"):
            raise ValueError("pyramidinfer head_reduce must be 'mean' or 'max'")
        return settings

    def runtime_params(self) -> dict:
        params = {"window": self.window, "sink": self.sink}
        if self.pool != 1:
            params["pool"] = self.pool
        if self.head_reduce != "mean":
            params["head_reduce"] = self.head_reduce
        return params


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
                for t in cuts:
                    self.pair_curves[(reader, source)] += self._curve(query, self._keys[source], scaling, t)
                    self.pair_counts[(reader, source)] += 1

    def end_sample(self) -> None:
        self._keys.clear()

    def _curve(self, query: torch.Tensor, key: torch.Tensor, scaling: float, t: int) -> torch.Tensor:
        s = self.settings
        ctx_keys = key[:, :, :t]
        valid = torch.ones(1, t, dtype=torch.bool, device=key.device)
        select = window_scores(query[:, :, :t], ctx_keys, valid, scaling, s.window, s.pool, s.head_reduce)[0]
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
        float32 ``[L]`` keep fractions (1.0 for layers not budgeted). Greedy on marginal gains, which is optimal
        for concave curves and a good approximation otherwise.
    """
    n_layers = curves.shape[0]
    idx = [l for l in range(n_layers) if budgeted[l]]
    steps = torch.zeros(n_layers, dtype=torch.long)
    for l in idx:
        steps[l] = int(torch.ceil(floor[l] * GRID))
    total = round(budget_fraction * GRID * len(idx))
    used = int(steps[idx].sum()) if idx else 0
    while used < total:
        best, gain = None, -1.0
        for l in idx:
            if steps[l] < GRID:
                g = float(curves[l, steps[l] + 1] - curves[l, steps[l]])
                if g > gain:
                    best, gain = l, g
        if best is None:
            break
        steps[best] += 1
        used += 1
    keep = torch.ones(n_layers, dtype=torch.float32)
    for l in idx:
        keep[l] = float(steps[l]) / GRID
    return keep


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
    held_fixed = sum(
        min(seq_len, sliding_window or seq_len) for kind in layer_kinds if kind != "full_attention"
    )
    stock = held_fixed + seq_len * sum(full)
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
        "calibration_length": seq_len,
        "mean_captured_mass": float(captured[torch.tensor(budgeted)].mean()),
        "observations_per_layer": int(observer.counts.max()),
        "feasible": floor_frac <= wanted <= 1.0,
    }
    return keep, report, curves.float(), captured.float()
