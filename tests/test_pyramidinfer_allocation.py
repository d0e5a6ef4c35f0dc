"""PyramidInfer budget allocation (``allocate_keep`` / ``calibrate_layer_keep``) on small synthetic curves.

The curves imitate what ``CapturedMassObserver`` records: cut contexts of ``t`` tokens (shorter than the
calibration length), the first ``sink + window`` tokens of the kept set always protected, so a curve is flat from
0 up to ``(sink + window) / t`` and rises after it. At ``--max-seq-length 512`` the floor
``(sink + window) / 512`` lies inside that flat start for every layer, which made the one-step greedy hand the
whole budget to the first layers in index order (issue: 13 layers at 1.000, one at 0.875, 16 at the floor).
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import pytest
import torch

from calibrate.pyramidinfer import GRID, allocate_keep, calibrate_layer_keep

SINK, WINDOW, HORIZON = 4, 32, 64


def observed_curve(seq_len: int, power: float, protected_mass: float = 0.2) -> torch.Tensor:
    """float64 ``[GRID + 1]``: a layer's curve as the observer builds it, averaged over the three cut points.

    The protected tokens carry ``protected_mass``; the rest of the mass falls off with rank as
    ``1 - (1 - x) ** power`` (large ``power``: concentrated attention, ``1``: spread evenly).
    """
    protected = SINK + WINDOW
    last = seq_len - HORIZON
    curves = []
    for t in sorted({max(protected + 1, int(last * c)) for c in (0.5, 0.75, 1.0)}):
        kept = torch.ceil(torch.linspace(0, 1, GRID + 1, dtype=torch.float64) * t).clamp(min=protected, max=t)
        x = (kept - protected) / (t - protected)
        curves.append(protected_mass + (1 - protected_mass) * (1 - (1 - x) ** power))
    return torch.stack(curves).mean(0)


def one_step_greedy(curves, budgeted, budget_fraction, floor):
    """The allocation before the fix: one grid step at a time to the largest one-step gain (ties: lowest layer)."""
    n_layers = curves.shape[0]
    idx = [l for l in range(n_layers) if budgeted[l]]
    steps = [0] * n_layers
    for l in idx:
        steps[l] = math.ceil(float(floor[l]) * GRID)
    total = round(budget_fraction * GRID * len(idx))
    used = sum(steps[l] for l in idx)
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
    return torch.tensor([steps[l] / GRID if budgeted[l] else 1.0 for l in range(n_layers)], dtype=torch.float32)


def steps_of(keep: torch.Tensor) -> torch.Tensor:
    steps = (keep.double() * GRID).round().long()
    assert torch.equal(steps.double() / GRID, keep.double()), "keep fractions must lie on the grid"
    return steps


def captured(curves: torch.Tensor, keep: torch.Tensor) -> float:
    return float(curves[torch.arange(len(keep)), steps_of(keep)].sum())


def exact_best(curves: torch.Tensor, first: int, total: int) -> float:
    """Exact optimum by dynamic programming: the most mass any split of ``total`` grid steps captures."""
    extra = total - first * curves.shape[0]
    best = torch.full((extra + 1,), float("-inf"), dtype=torch.float64)
    best[0] = 0.0
    src = torch.arange(extra + 1)[:, None] - torch.arange(GRID - first + 1)[None, :]
    for curve in curves:
        cand = best[src.clamp(min=0)] + curve[first:][None, :]
        best = cand.masked_fill(src < 0, float("-inf")).max(dim=1).values
    return float(best[extra])


@functools.lru_cache(maxsize=None)
def envelope_gap(seq_len: int, power: float, start: int) -> float:
    """How far the upper concave envelope of a curve above ``start`` rises over it (gift wrapping)."""
    c = observed_curve(seq_len, power)[start:]
    env = c.clone()
    a = 0
    while a < len(c) - 1:
        slopes = (c[a + 1 :] - c[a]) / torch.arange(1, len(c) - a, dtype=torch.float64)
        b = a + 1 + int(torch.nonzero(slopes == slopes.max())[-1])  # steepest chord, farthest on ties
        env[a : b + 1] = c[a] + slopes[b - a - 1] * torch.arange(b - a + 1, dtype=torch.float64)
        a = b
    return float((env - c).max())


def test_curves_at_512_start_flat_below_the_floor():
    """The premise: at 512 tokens the floor step is inside the flat start of every observed curve."""
    curve = observed_curve(512, power=4.0)
    floor_step = math.ceil((SINK + WINDOW) / 512 * GRID)  # 18
    assert curve[floor_step + 1] == curve[floor_step] and curve[floor_step + 2] == curve[floor_step]
    assert curve[floor_step + 3] > curve[floor_step]
    # at 2048 the longest cut (1984 tokens) resolves the floor: the curve rises right away
    curve = observed_curve(2048, power=4.0)
    floor_step = math.ceil((SINK + WINDOW) / 2048 * GRID)
    assert curve[floor_step + 1] > curve[floor_step]


def test_identical_layers_at_512_get_about_the_same_budget():
    """The issue's lopsided plan: with every curve flat at the floor, the old greedy filled layers in index order."""
    curves = torch.stack([observed_curve(512, power=4.0)] * 6)
    floor = torch.full((6,), (SINK + WINDOW) / 512, dtype=torch.float64)
    keep = allocate_keep(curves, [True] * 6, 0.5, floor)
    assert float(keep.mean()) == 0.5
    assert float(keep.max() - keep.min()) <= 0.03
    old = one_step_greedy(curves, [True] * 6, 0.5, floor)
    assert old.tolist()[:2] == [1.0, 1.0] and old.tolist()[3:] == [math.ceil(36 / 512 * GRID) / GRID] * 3


def test_allocation_does_not_depend_on_layer_order():
    """Reordering the layers reorders the fractions; a fill in index order (the old greedy at 512) does not."""
    curves = torch.stack([observed_curve(512, power=p) for p in (12.0, 9.0, 6.0, 3.0, 2.0, 1.5)])
    floor = torch.full((6,), (SINK + WINDOW) / 512, dtype=torch.float64)
    for budget_fraction in (0.25, 0.5):
        keep = allocate_keep(curves, [True] * 6, budget_fraction, floor)
        assert torch.equal(allocate_keep(curves.flip(0), [True] * 6, budget_fraction, floor), keep.flip(0))
        assert float(keep.max()) < 1.0 and float(keep[:4].min()) > 0.25
    old = one_step_greedy(curves, [True] * 6, 0.5, floor)
    assert not torch.equal(one_step_greedy(curves.flip(0), [True] * 6, 0.5, floor), old.flip(0))


@pytest.mark.parametrize("budget_fraction", [0.1, 0.25, 0.5, 0.8])
@pytest.mark.parametrize("powers", [(6.0, 1.0, 2.5, 12.0), (4.0, 4.0, 4.0, 4.0)])
def test_allocation_is_near_the_exact_optimum(powers, budget_fraction):
    """Within the envelope's gap of the exact optimum (only the last, cut segment can fall below the envelope)."""
    curves = torch.stack([observed_curve(512, power=p) for p in powers])
    n_layers = len(powers)
    floor = torch.full((n_layers,), (SINK + WINDOW) / 512, dtype=torch.float64)
    first = math.ceil(float(floor[0]) * GRID)
    total = round(budget_fraction * GRID * n_layers)
    keep = allocate_keep(curves, [True] * n_layers, budget_fraction, floor)
    assert int(steps_of(keep).sum()) == total
    best = exact_best(curves, first, total)
    gap = max(envelope_gap(512, p, first) for p in powers)
    assert best - gap - 1e-12 <= captured(curves, keep) <= best + 1e-12
    if budget_fraction >= 0.25:  # the old greedy falls far short at 512 tokens
        old = one_step_greedy(curves, [True] * n_layers, budget_fraction, floor)
        assert captured(curves, old) < best - 0.1


def test_flat_then_steep_curve_is_climbed():
    """A curve that is flat for a while and then jumps is worth more than a gently rising one."""
    f = torch.linspace(0, 1, GRID + 1, dtype=torch.float64)
    gentle = 0.5 + 0.1 * f  # +0.1 over the whole range
    jump = torch.where(f < 0.2, 0.5, 0.95)  # +0.45 once 0.2 is kept
    curves = torch.stack([gentle, jump])
    floor = torch.full((2,), 0.05, dtype=torch.float64)
    keep = allocate_keep(curves, [True, True], 0.3, floor)
    assert keep[1] == math.ceil(0.2 * GRID) / GRID  # exactly enough to reach the jump, the rest to the other
    assert int(steps_of(keep).sum()) == round(0.3 * GRID * 2)
    assert one_step_greedy(curves, [True, True], 0.3, floor)[1] == math.ceil(0.05 * GRID) / GRID  # never climbed


def random_curves(generator: torch.Generator, n_layers: int, concave: bool) -> torch.Tensor:
    gains = torch.rand(n_layers, GRID, generator=generator, dtype=torch.float64) ** 3
    gains[torch.rand(n_layers, GRID, generator=generator) < 0.2] = 0.0  # flat stretches
    if concave:
        gains = gains.sort(dim=1, descending=True).values
    gains = gains / gains.sum(dim=1, keepdim=True).clamp(min=1e-12)
    gains = gains * torch.rand(n_layers, 1, generator=generator, dtype=torch.float64)
    start = torch.rand(n_layers, 1, generator=generator, dtype=torch.float64) * 0.3
    return torch.cat([start, start + gains.cumsum(1)], dim=1)


@pytest.mark.parametrize("seed", range(6))
def test_budget_met_exactly_and_nothing_below_the_floor(seed):
    g = torch.Generator().manual_seed(seed)
    n_layers = 7
    for _ in range(20):
        curves = random_curves(g, n_layers, concave=False)
        floor = torch.rand(n_layers, generator=g, dtype=torch.float64) * 0.2
        budgeted = (torch.rand(n_layers, generator=g) < 0.8).tolist()
        budgeted[0] = True
        budget_fraction = float(torch.rand(1, generator=g)) * 0.9 + 0.1
        keep = allocate_keep(curves, budgeted, budget_fraction, floor)
        steps = steps_of(keep)
        idx = [l for l in range(n_layers) if budgeted[l]]
        floor_steps = [math.ceil(float(floor[l]) * GRID) for l in idx]
        assert all(int(steps[l]) >= s for l, s in zip(idx, floor_steps))
        assert all(keep[l] == 1.0 for l in range(n_layers) if not budgeted[l])
        total = round(budget_fraction * GRID * len(idx))
        if total >= sum(floor_steps):
            assert int(steps[idx].sum()) == total
        else:  # the floor alone is over budget: nothing is taken away from it
            assert [int(steps[l]) for l in idx] == floor_steps


@pytest.mark.parametrize("seed", range(4))
def test_concave_curves_allocate_as_the_one_step_greedy(seed):
    """Where the old greedy was right (concave curves, flat stretches and ties included) nothing changes."""
    g = torch.Generator().manual_seed(100 + seed)
    for _ in range(25):
        n_layers = 5
        curves = random_curves(g, n_layers, concave=True)
        curves[3] = curves[1]  # exact ties between layers
        floor = torch.full((n_layers,), float(torch.rand(1, generator=g)) * 0.1, dtype=torch.float64)
        budgeted = [True, True, True, True, bool(torch.rand(1, generator=g) < 0.5)]
        budget_fraction = float(torch.rand(1, generator=g)) * 0.9 + 0.05
        keep = allocate_keep(curves, budgeted, budget_fraction, floor)
        assert torch.equal(keep, one_step_greedy(curves, budgeted, budget_fraction, floor))


def test_calibrate_layer_keep_at_512_is_not_lopsided():
    """Through ``calibrate_layer_keep``, with the curves a 512-token calibration records."""
    n_layers = 8
    powers = [10.0] * 4 + [3.0] * 4
    curves = torch.stack([observed_curve(512, power=p) for p in powers])
    observer = SimpleNamespace(
        settings=SimpleNamespace(sink=SINK, window=WINDOW, horizon=HORIZON),
        counts=torch.full((n_layers,), 24.0, dtype=torch.float64),
        group_curves=lambda sources: curves.clone(),
    )
    keep, report, out_curves, mass = calibrate_layer_keep(observer, ["full_attention"] * n_layers, 0.5, 512, None)
    assert report["achieved_ratio_at_calibration_length"] == pytest.approx(0.5, abs=1e-9)
    assert report["feasible"]
    assert float(keep[:4].max() - keep[:4].min()) <= 0.05 and float(keep[4:].max() - keep[4:].min()) <= 0.05
    assert float(keep[:4].max()) < float(keep[4:].min()) < 1.0
    assert float(keep.min()) >= (SINK + WINDOW) / 512
    assert torch.equal(out_curves, curves.float())
