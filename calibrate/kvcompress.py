"""KV-Compress, calibrated: one token budget per (layer, KV head), from what each head's future queries need.

PyramidInfer's calibration (``calibrate.pyramidinfer``) one level finer. For every calibration sample and
full-attention layer the observer cuts the sequence at a few points ``t``. For every KV head the context
``[0, t)`` is ranked with the runtime's own selection score (:func:`runtime.kvcompress.kvc_scores`: squared attention
of the last ``window`` queries, max-pooled, summed over the head's GQA group; sinks and the recent window protected),
and the attention of the next ``horizon`` queries of that head's group measures how much of their context mass the
head would still see if it kept a fraction ``f`` of the context. Averaged over observations this gives one curve
``c[l, h](f)`` per unit (layer, KV head), on PyramidInfer's grid ``f = i / GRID``.

**Retrieval probes.** Text alone rarely makes a head fetch something far back, so ``probes`` synthetic sequences
are added: a calibration sample (the shipped calibration text) with a needle sentence ("The secret code of Alice is
48213.") inserted at a random depth, then the question and its answer, teacher forced. The context is cut at the
end of the haystack (the cache is compressed before the question is seen: the last ``window`` haystack queries
score it) and the question + answer queries are the future; a probe's curve counts only their attention on the
needle's tokens (so it rises, by the share of a head's attention that fetches the needle, where the head's
query-agnostic ranking reaches the needle: heads that look things up far back show it, the others stay flat). Probe
curves are kept apart from the text curves and
mixed per unit: ``c = (c_text + probe_weight * c_probe) / (1 + probe_weight)``.

**Allocation.** One memory budget over every budgeted unit (the KV heads of the full-attention layers that own
their cache): :func:`calibrate.pyramidinfer.allocate_keep` (greedy on the curves' upper concave envelopes) with the
budget fraction PyramidInfer would use (``target_ratio`` of the stock bytes at the calibration length, sliding-window
layers fixed, floor ``(sink + window) / seq_len``). With a KVSharer map an owner's heads serve their readers too:
the selection is scored with the summed votes of the owner's and its readers' queries (as the runtime's
``RaggedLayer`` does), and the owner's curve used for the allocation is the **sum** of its own curve and each
reader's curve over the owner's keys (the mass it loses counts once per reader, as ``CapturedMassObserver.pairs``).

**Plan.** ``f[l, h]`` becomes the layer fraction ``k_l = mean_h f[l, h]`` (``pyramidinfer.layer_keep`` when the plan
has PyramidInfer — overwritten —, ``kvcompress.layer_keep`` otherwise) and the shares
``kvcompress.head_keep[l, h] = f[l, h] / sum_h f[l, h]``, so that ``min(1, head_keep * H_kv * k_l) == f`` (the
semantics of ``runtime.kvcompress``).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from runtime.kvcompress import METHOD, kvc_scores

from .pipeline import CalibrationError
from .pyramidinfer import (  # noqa: F401  (precheck: the same target check before any pass)
    CUT_FRACTIONS, GRID, allocate_keep, fixed_and_stock, full_attention_note, full_attention_ratio, precheck,
)

log = logging.getLogger(__name__)

PROBE_NAMES = (
    "Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Grace", "Hiroshi", "Ines", "Jonas", "Kavya", "Lukas",
    "Mei", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Samir", "Tomasz", "Uma", "Viktor", "Wen", "Yara",
)
PROBE_DEPTH = (0.1, 0.9)  # where the needle goes, as a fraction of the haystack


# ----------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------


@dataclass
class KVCompressSettings:
    """KV-Compress's parameters for one calibration (recipe key ``kvcompress``), validated and with the defaults of
    the method's registration (``runtime.kvcompress.METHOD``).

    Attributes:
        window / sink / pool / metric / block / slack: the runtime parameters (stored in the plan).
        horizon: text cuts: queries after each cut point whose attention measures what a budget captures.
        probes: number of built-in retrieval probes (0: none).
        probe_weight: weight of the probes' curves against the text's.
        allocation: ``retrieval`` (heads the greedy gives the whole context keep it, every other head gets the same
            share of what is left) or ``greedy`` (every head's fraction from the greedy).
    """

    window: int
    sink: int
    pool: int
    metric: str
    block: int
    slack: int
    horizon: int
    probes: int
    probe_weight: float
    allocation: str

    @classmethod
    def from_args(cls, args: dict) -> KVCompressSettings:
        """Settings from a recipe's ``kvcompress`` mapping; ``ValueError`` for unknown names or bad values."""
        return cls(**METHOD.resolve_args(args, "kvcompress"))

    def runtime_params(self) -> dict:
        """The parameters written into the plan (``window`` and ``sink`` always, the others when not default)."""
        return METHOD.plan_params(self.__dict__)

    def text_cuts(self, seq_len: int) -> list[tuple[int, int]]:
        """``(t, end)`` observed in a text sample of ``seq_len`` tokens: context ``[0, t)``, future queries
        ``t .. end - 1`` (``end = t + horizon``); PyramidInfer's cut points. None if the sample is too short."""
        last = seq_len - self.horizon
        shortest = self.sink + self.window + 1
        if last <= shortest:
            return []
        return [(t, t + self.horizon) for t in sorted({max(shortest, int(last * c)) for c in CUT_FRACTIONS})]


# ----------------------------------------------------------------------------------------------------------
# Retrieval probes
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One synthetic retrieval sequence: ``haystack[:needle_start] + needle + haystack[needle_start:] + question +
    answer``.

    Attributes:
        ids: int64 ``[N]`` the whole sequence (``N <= limit``).
        cut: end of the haystack (needle included): the context is ``[0, cut)``, queries ``cut .. N - 1`` (question
            and answer) are the future.
        needle_start / needle_len: where the needle's tokens are.
        answer_len: the answer's tokens (the last ones of ``ids``).
        name / code: the fact ("The secret code of <name> is <code>.").
        depth: the drawn depth in ``PROBE_DEPTH`` (the needle starts at ``round(depth * haystack)``, moved out of the
            sinks and the recent window when needed).
        source: index of the calibration sample the haystack was cut from.
    """

    ids: torch.Tensor
    cut: int
    needle_start: int
    needle_len: int
    answer_len: int
    name: str
    code: str
    depth: float
    source: int


def build_probes(
    tokenizer, samples: Sequence[torch.Tensor], count: int, limit: int, seed: int, sink: int, window: int
) -> tuple[list[Probe], list[str]]:
    """Build up to ``count`` retrieval probes from the calibration samples' own tokens.

    Probe ``i`` cuts its haystack from sample ``i % len(samples)`` (its first tokens, so that the sequence is at most
    ``limit`` long once needle, question and answer are added), draws a name, five digits and a depth in
    ``PROBE_DEPTH`` from ``random.Random`` seeded with ``seed`` (the same inputs and seed give the same probes), and
    places the needle so that it lies after the ``sink`` first tokens and before the recent ``window`` of the
    haystack (else it would be kept anyway and tell nothing). A probe whose haystack is too short for that is
    skipped.

    Returns:
        the probes and one line per skipped probe (why).
    """
    if count <= 0 or not samples:
        return [], []
    rng = random.Random(f"kvplan.kvcompress.probes:{seed}")

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    probes: list[Probe] = []
    skipped: list[str] = []
    for i in range(count):
        name = rng.choice(PROBE_NAMES)
        code = "".join(rng.choice("0123456789") for _ in range(5))
        depth = rng.uniform(*PROBE_DEPTH)
        source = i % len(samples)
        needle = encode(f" The secret code of {name} is {code}.")
        question = encode(f" What is the secret code of {name}? The secret code of {name} is")
        answer = encode(f" {code}")
        if not needle or not question or not answer:
            skipped.append(f"probe {i}: the tokenizer gives no tokens for the needle, question or answer")
            continue
        hay_len = min(int(samples[source].numel()), limit - len(needle) - len(question) - len(answer))
        latest = hay_len - window  # the needle must end before the haystack's recent window
        if latest < sink or hay_len + len(needle) <= sink + window + 1:
            skipped.append(
                f"probe {i}: a haystack of {max(hay_len, 0)} tokens is too short to hide a needle of {len(needle)} "
                f"tokens between the {sink} sink and the {window} recent tokens"
            )
            continue
        start = min(max(round(depth * hay_len), sink), latest)
        hay = samples[source][:hay_len].to(torch.long).cpu()
        ids = torch.cat([
            hay[:start], torch.tensor(needle, dtype=torch.long), hay[start:],
            torch.tensor(question + answer, dtype=torch.long),
        ])
        probes.append(Probe(
            ids=ids, cut=hay_len + len(needle), needle_start=start, needle_len=len(needle), answer_len=len(answer),
            name=name, code=code, depth=depth, source=source,
        ))
    return probes, skipped


# ----------------------------------------------------------------------------------------------------------
# The observer
# ----------------------------------------------------------------------------------------------------------


def _grid_steps(t: int, protected: int, device) -> torch.Tensor:
    """int64 ``[GRID + 1]``: tokens kept at fraction ``i / GRID`` of a ``t``-token context (at least the
    protected ones; PyramidInfer's rule)."""
    kept = torch.ceil(torch.linspace(0, 1, GRID + 1, dtype=torch.float64) * t).long()
    return kept.clamp(min=protected, max=t).to(device)


@dataclass
class HeadMassObserver:
    """Accumulates per-(layer, KV head) captured-mass curves on PyramidInfer's grid, text and probes apart.

    The observer sees the samples in the order ``run_calibration_pass`` feeds them; ``schedule[s]`` says what to
    observe in sample ``s``: ``(is_probe, cuts)`` with ``cuts`` a list of ``(t, end)`` (context ``[0, t)``, future
    queries ``t .. end - 1``), or for a probe ``(t, end, needle_start, needle_end)``: only the future's attention on
    the needle's tokens counts as captured (see :func:`group_curves`).

    With a KVSharer map (``sources``, chains resolved), layer ``l`` is observed over the keys of its owner
    ``sources[l]``: the selection of an owner's tokens is scored with the summed votes of the owner's and its
    readers' queries (as the runtime does), and each member's future queries give that member's curve. Members of a
    group are held until the group's last layer has run (readers come after their owner).

    Attributes (after the pass):
        text_sum / probe_sum: float64 ``[L, H_kv, GRID + 1]`` summed curves of layer ``l``'s queries (over its
            owner's keys).
        text_count / probe_count: float64 ``[L]`` observations summed.
    """

    num_layers: int
    num_kv_heads: int
    settings: KVCompressSettings
    schedule: list[tuple[bool, list[tuple[int, ...]]]]
    observed: list[bool]
    sources: list[int] | None = None
    text_sum: torch.Tensor = field(init=False)
    probe_sum: torch.Tensor = field(init=False)
    text_count: torch.Tensor = field(init=False)
    probe_count: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        shape = (self.num_layers, self.num_kv_heads, GRID + 1)
        self.text_sum = torch.zeros(shape, dtype=torch.float64)
        self.probe_sum = torch.zeros(shape, dtype=torch.float64)
        self.text_count = torch.zeros(self.num_layers, dtype=torch.float64)
        self.probe_count = torch.zeros(self.num_layers, dtype=torch.float64)
        self.sources = list(range(self.num_layers)) if self.sources is None else list(self.sources)
        if len(self.sources) != self.num_layers or len(self.observed) != self.num_layers:
            raise ValueError("sources and observed must have one entry per layer")
        self._members: dict[int, list[int]] = {}
        for layer, owner in enumerate(self.sources):
            if self.observed[layer]:
                self._members.setdefault(owner, []).append(layer)
        self._sample = 0
        self._queries: dict[int, torch.Tensor] = {}  # this sample's queries of layers in a group, until it is complete
        self._keys: dict[int, torch.Tensor] = {}  # this sample's keys of owners with readers

    # ----- LayerObserver ----------------------------------------------------------------------------------------
    def observe(self, layer_idx, query, key, value, scaling) -> None:
        """``query [1, H_q, N, d]``, ``key [1, H_kv, N, d]`` of the current sample at one layer."""
        if layer_idx >= self.num_layers or not self.observed[layer_idx]:
            return
        if self._sample >= len(self.schedule):
            raise RuntimeError("kvcompress: the observer saw more samples than it was scheduled for")
        owner = self.sources[layer_idx]
        members = self._members.get(owner, [])
        if members == [layer_idx]:
            self._observe_group([layer_idx], [query], key, scaling)
            return
        if layer_idx == owner:
            self._keys[owner] = key
        self._queries[layer_idx] = query
        if owner in self._keys and all(m in self._queries for m in members):
            device = query.device  # the group's last layer's: layers may run on different devices
            queries = [self._queries.pop(m).to(device) for m in members]
            self._observe_group(members, queries, self._keys.pop(owner).to(device), scaling)

    def end_sample(self) -> None:
        self._sample += 1
        self._queries.clear()
        self._keys.clear()

    # ----- curves -------------------------------------------------------------------------------------------------
    def _observe_group(self, members: list[int], queries: list[torch.Tensor], key: torch.Tensor, scaling) -> None:
        is_probe, cuts = self.schedule[self._sample]
        sums, counts = (self.probe_sum, self.probe_count) if is_probe else (self.text_sum, self.text_count)
        for t, end, *focus in cuts:
            if end > key.shape[2] or t >= end:
                raise RuntimeError(f"kvcompress: cut ({t}, {end}) does not fit a sample of {key.shape[2]} tokens")
            span = tuple(focus) if focus else None
            curves = group_curves(queries, key, scaling, t, end, self.settings, span)  # [M, H_kv, GRID + 1]
            for member, curve in zip(members, curves):
                sums[member] += curve
                counts[member] += 1

    def mean_curves(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Averaged, monotone (cummax) curves float64 ``[L, H_kv, GRID + 1]`` of the text and of the probes (None
        when nothing of that kind was observed); layers never observed: all ones (nothing to gain)."""
        return _mean(self.text_sum, self.text_count), _mean(self.probe_sum, self.probe_count)


def _mean(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor | None:
    if float(counts.max()) == 0:
        return None
    out = torch.ones_like(sums)
    seen = counts > 0
    out[seen] = sums[seen] / counts[seen, None, None]
    return torch.cummax(out, dim=-1).values  # a kept set only grows with f


def group_curves(
    queries: list[torch.Tensor], key: torch.Tensor, scaling: float, t: int, end: int, settings: KVCompressSettings,
    focus: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Captured-mass curves of one cut for a group of layers attending over the same keys.

    Args:
        queries: ``M`` tensors ``[1, H_q, N, d]`` (the owner's and its readers' queries, post-RoPE).
        key: ``[1, H_kv, N, d]`` the owner's keys.
        scaling: softmax scale.
        t / end: the context is ``[0, t)``; queries ``t .. end - 1`` are the future.
        settings: window, sink, pool and metric of the runtime selection.
        focus: ``(start, end)`` of a retrieval probe's needle: only the future's mass on those tokens counts as
            captured (still divided by the whole context mass), so the curve rises by the share of the head's
            attention that fetches the needle, at the fraction where the head's query-agnostic ranking reaches it —
            a head that does not look the needle up gains nothing from a larger budget here.

    Returns:
        float64 ``[M, H_kv, GRID + 1]``: ``out[m, h, i]`` is the fraction of member ``m``'s future context mass (over
        tokens ``< t``, query heads of KV head ``h``'s group and future queries averaged) on the ``ceil(i / GRID *
        t)`` tokens KV head ``h`` ranks highest (sinks and the recent window first; at least those are kept).
    """
    s = settings
    device = key.device
    ctx_keys = key[:, :, :t]
    valid = torch.ones(1, t, dtype=torch.bool, device=device)
    select = sum(kvc_scores(q[:, :, :t], ctx_keys, valid, scaling, s.window, s.pool, s.metric)[0] for q in queries)
    positions = torch.arange(t, device=device)
    protected = (positions < s.sink) | (positions >= t - s.window)  # [t]
    order = torch.argsort(select.masked_fill(protected, math.inf), dim=-1, descending=True, stable=True)  # [H_kv, t]
    kept = _grid_steps(t, int(protected.sum()), device)
    out = []
    for q in queries:
        mass = future_mass(q, key, scaling, t, end)  # [H_kv, t]
        total = mass.sum(dim=-1, keepdim=True).clamp(min=1e-12)
        if focus is not None:
            on_needle = torch.zeros(t, dtype=mass.dtype, device=device)
            on_needle[focus[0] : min(focus[1], t)] = 1.0
            mass = mass * on_needle
        cum = torch.cat([mass.new_zeros(mass.shape[0], 1), mass.gather(1, order).cumsum(dim=-1)], dim=-1) / total
        out.append(cum[:, kept])
    return torch.stack(out).double().cpu()


def future_mass(query: torch.Tensor, key: torch.Tensor, scaling: float, t: int, end: int) -> torch.Tensor:
    """float32 ``[H_kv, t]``: mean attention probability that queries ``t .. end - 1`` of each KV head's group put on
    each context token ``< t`` (averaged over the group's query heads and the queries; causal softmax over keys
    ``[0, end)``). ``query [1, H_q, N, d]``, ``key [1, H_kv, N, d]``."""
    _, n_q, _, dim = query.shape
    n_kv = key.shape[1]
    groups = n_q // n_kv
    horizon = end - t
    q = query[0, :, t:end].float().reshape(n_kv, groups * horizon, dim)  # query head k * G + g -> KV head k
    k = key[0, :, :end].float()  # [H_kv, end, d]
    logits = torch.matmul(q, k.transpose(-1, -2)).view(n_kv, groups, horizon, end) * scaling
    q_pos = torch.arange(t, end, device=key.device)
    causal = torch.arange(end, device=key.device)[None, :] <= q_pos[:, None]  # [horizon, end]
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    return probs[..., :t].mean(dim=(1, 2))


def combine_curves(
    text: torch.Tensor | None, probes: torch.Tensor | None, probe_weight: float
) -> torch.Tensor:
    """``(c_text + probe_weight * c_probe) / (1 + probe_weight)`` per unit; either alone when the other is None."""
    if text is None and probes is None:
        raise ValueError("no curves to combine")
    if probes is None or probe_weight == 0:
        return text if text is not None else probes
    if text is None:
        return probes
    return (text + probe_weight * probes) / (1.0 + probe_weight)


def curve_at(curves: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """float64 ``[...]``: curves ``[..., GRID + 1]`` read at ``fractions [...]`` (linear between grid points)."""
    pos = fractions.double().clamp(0.0, 1.0) * GRID
    lo = pos.floor().long().clamp(max=GRID - 1)
    w = pos - lo
    c = curves.double()
    below = c.gather(-1, lo[..., None])[..., 0]
    above = c.gather(-1, (lo + 1)[..., None])[..., 0]
    return below * (1 - w) + above * w


# ----------------------------------------------------------------------------------------------------------
# Allocation
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """The memory budget of the plan at the calibration length (``calibrate_layer_keep``'s arithmetic).

    Attributes:
        budgeted: per layer, True for full-attention layers that own their cache (their heads share the budget).
        fraction: mean keep fraction over the budgeted heads (``wanted`` clamped to ``[floor, 1]``).
        wanted: the fraction that meets the target exactly.
        floor: smallest fraction any head keeps (``(sink + window) / seq_len``, at most 1).
        held_fixed / stock: tokens (per KV head) the non-budgeted layers hold, and the stock cache holds.
    """

    budgeted: list[bool]
    fraction: float
    wanted: float
    floor: float
    held_fixed: float
    stock: float
    seq_len: int

    @property
    def feasible(self) -> bool:
        return self.floor <= self.wanted <= 1.0

    def achieved(self, layer_keep: torch.Tensor) -> float:
        """Kept fraction of the stock cache at ``seq_len`` with the layers' mean head fractions ``layer_keep [L]``."""
        kept = self.held_fixed + sum(float(layer_keep[l]) * self.seq_len for l, b in enumerate(self.budgeted) if b)
        return kept / self.stock


def plan_budget(
    kinds: list[str], sources: list[int] | None, target_ratio: float, seq_len: int, sliding_window: int | None,
    floor_tokens: int,
) -> Budget:
    """The budget fraction exactly as :func:`calibrate.pyramidinfer.calibrate_layer_keep` computes it: sliding-window
    layers hold ``min(seq_len, window)`` tokens (fixed), sharing layers hold nothing, and the owning full-attention
    layers share the rest of ``target_ratio`` of the stock cache; each keeps at least ``floor_tokens`` (sinks +
    recent window). ``ValueError`` when no layer can be budgeted."""
    full = [kind == "full_attention" for kind in kinds]
    owner = [True] * len(kinds) if sources is None else [src == l for l, src in enumerate(sources)]
    budgeted = [f and o for f, o in zip(full, owner)]
    held_fixed, stock = fixed_and_stock(kinds, seq_len, sliding_window)
    n_budgeted = sum(budgeted)
    if n_budgeted == 0:
        raise ValueError("this model has no full-attention layers owning a cache for KV-Compress to compress")
    wanted = (target_ratio * stock - held_fixed) / (seq_len * n_budgeted)
    floor = min(1.0, floor_tokens / seq_len)
    return Budget(budgeted, min(1.0, max(wanted, floor)), wanted, floor, float(held_fixed), float(stock), seq_len)


def allocate_head_keep(curves: torch.Tensor, budgeted: list[bool], fraction: float, floor: float) -> torch.Tensor:
    """Split one memory budget over every (layer, KV head) unit by marginal gain.

    Args:
        curves: float64 ``[L, H_kv, GRID + 1]`` captured mass at keep fraction ``i / GRID`` (an owner's curve may
            sum several members' curves and exceed 1).
        budgeted: per layer, whether its heads share the budget (the others keep everything).
        fraction: mean keep fraction over the budgeted heads.
        floor: smallest fraction any budgeted head keeps.

    Returns:
        float32 ``[L, H_kv]``: each head's keep fraction, on the grid, in ``[floor, 1]`` (1.0 for heads of layers
        not budgeted), their mean over the budgeted heads ``fraction`` rounded to the grid
        (:func:`calibrate.pyramidinfer.allocate_keep` on the flattened units).
    """
    n_layers, n_heads, points = curves.shape
    if points != GRID + 1:
        raise ValueError(f"curves must have {GRID + 1} grid points, not {points}")
    if len(budgeted) != n_layers:
        raise ValueError(f"budgeted has {len(budgeted)} entries for {n_layers} layers")
    units = [b for b in budgeted for _ in range(n_heads)]
    floors = torch.full((n_layers * n_heads,), floor, dtype=torch.float64)
    keep = allocate_keep(curves.reshape(n_layers * n_heads, points).double(), units, fraction, floors)
    return keep.view(n_layers, n_heads)


def whole_context_credit(probe: torch.Tensor) -> torch.Tensor:
    """Probe curves ``[..., GRID + 1]`` as all-or-nothing gains: 0 below the whole context, the needle share (the
    curve's value at ``f = 1``) at ``f = 1``. A retrieval is answered exactly or not at all, so a head that keeps part
    of the context (and the needle only in some probes) earns nothing; the greedy's envelope then gives the share
    over ``1 - floor`` as the slope of keeping the whole context."""
    out = torch.zeros_like(probe)
    out[..., -1] = probe[..., -1]
    return out


def retrieval_split(f: torch.Tensor, budgeted: list[bool], fraction: float, floor: float) -> torch.Tensor:
    """Heads the greedy gave the whole context (``f = 1``) keep it; every other budgeted head gets the same
    fraction of what is left of the budget (at least ``floor``). float32 ``[L, H_kv]``.

    Measured on the tuning half of the essays (``README``): the greedy's split among the other heads, chosen on the
    calibration text, lost to an even split there (SmolLM2, 4x: KL 0.0197 vs 0.0171); the retrieval heads are what
    the per-head budget buys."""
    mask = torch.tensor(budgeted)[:, None].expand_as(f)
    full = (f >= 1.0) & mask
    rest = mask & ~full
    if not bool(rest.any()):
        return f
    left = fraction * int(mask.sum()) - int(full.sum())
    share = min(1.0, max(floor, left / int(rest.sum())))
    return torch.where(rest, torch.full_like(f, share), f)


def plan_tensors(head_fraction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(layer_keep float32 [L], head_keep float32 [L, H_kv])`` for per-head fractions ``f [L, H_kv]`` in (0, 1]:
    ``layer_keep = mean_h f``, ``head_keep = f / sum_h f`` (rows sum to 1), so that ``min(1, head_keep * H_kv *
    layer_keep) == f`` (``runtime.kvcompress.head_fractions``)."""
    f = head_fraction.double()
    if f.dim() != 2 or bool(((f <= 0) | (f > 1)).any()):
        raise ValueError("head fractions must be a [L, H_kv] tensor with every entry in (0, 1]")
    layer_keep = f.mean(dim=1)
    shares = (f / f.sum(dim=1, keepdim=True)).float()
    shares = shares / shares.sum(dim=1, keepdim=True)  # re-normalised in float32
    return layer_keep.float(), shares


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def budget_table(report: dict) -> list[str]:
    """Lines of the per-layer / per-head budget table of a ``ctx.report["kvcompress"]`` (log and CLI)."""
    lines = [
        f"kvcompress: target ratio {report['target_ratio']:.4f}, kept at {report['calibration_length']} tokens "
        f"{report['achieved_ratio_at_calibration_length']:.4f}{full_attention_note(report)}; mean captured "
        f"attention mass {_fmt(report['mean_captured_mass'])} on the text; needle mass kept on the retrieval probes "
        f"{_fmt(report['mean_captured_mass_probes'])} ({report['probes']} probes)",
        "  layer  keep   per-KV-head keep fractions",
    ]
    sources = report.get("share_source")
    for layer, (keep, heads) in enumerate(zip(report["layer_keep"], report["head_keep_fractions"])):
        if sources is not None and sources[layer] != layer:
            lines.append(f"  {layer:5d}  reads layer {sources[layer]}'s cache")
        elif layer not in report["budgeted_layers"]:
            lines.append(f"  {layer:5d}  {keep:.3f}  (not budgeted: sliding window)")
        else:
            lines.append(f"  {layer:5d}  {keep:.3f}  " + " ".join(f"{h:.3f}" for h in heads))
    at_length = report.get("heads_keeping_everything_at_calibration_length")
    extra = f" ({at_length} drop nothing at {report['calibration_length']} tokens)" if at_length is not None else ""
    lines.append(
        f"kvcompress: {report['heads_keeping_everything']} of {report['budgeted_heads']} heads keep the whole "
        f"context{extra}"
    )
    return lines


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# ----------------------------------------------------------------------------------------------------------
# The calibration step
# ----------------------------------------------------------------------------------------------------------


def calibration_step(ctx) -> None:
    """KV-Compress's calibration step (``runtime.kvcompress.METHOD``, after PyramidInfer's and KVSharer's): one
    observed pass over the calibration samples and the retrieval probes gives per-head curves; one budget over the
    budgeted heads gives ``f[l, h]``; the plan gets ``kvcompress.head_keep`` and the layer fractions (PyramidInfer's
    ``layer_keep`` overwritten when the plan has PyramidInfer)."""
    from .collect import run_calibration_pass

    try:
        settings = KVCompressSettings.from_args(ctx.args("kvcompress"))
    except ValueError as exc:
        raise CalibrationError(str(exc)) from None
    config = ctx.config
    n_layers = int(config.num_hidden_layers)
    n_kv = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    search = ctx.state.get("kvsharer")
    sources = None if search is None else list(search.sources)
    window = getattr(config, "sliding_window", None)

    floor_tokens = settings.sink + settings.window
    with_pyramid = "pyramidinfer" in ctx.methods
    if with_pyramid:  # a layer whose heads end up equal is a PyramidInfer layer at run time, with its own floor
        pyr = ctx.params.get("pyramidinfer", {})
        floor_tokens = max(floor_tokens, int(pyr.get("sink", 0)) + int(pyr.get("window", 0)))
    try:
        budget = plan_budget(ctx.kinds, sources, ctx.recipe.target_ratio, ctx.seq_len, window, floor_tokens)
    except ValueError as exc:
        raise CalibrationError(str(exc)) from None

    # what to observe: the text samples' cut points, then the probes' haystack ends
    schedule: list[tuple[bool, list[tuple[int, ...]]]] = []
    run: list[torch.Tensor] = []
    for sample in ctx.samples:
        cuts = settings.text_cuts(int(sample.numel()))
        if cuts:
            schedule.append((False, cuts))
            run.append(sample)
    probes, skipped = [], []
    if settings.probes > 0 and settings.probe_weight > 0:
        if ctx.tokenizer is None:
            skipped = ["no tokenizer to write the probes with"]
        else:
            probes, skipped = build_probes(ctx.tokenizer, ctx.samples, settings.probes, ctx.seq_len, ctx.recipe.seed,
                                           settings.sink, settings.window)
        for probe in probes:
            needle = (probe.needle_start, probe.needle_start + probe.needle_len)
            schedule.append((True, [(probe.cut, int(probe.ids.numel()), *needle)]))
            run.append(probe.ids)
    if skipped:
        log.warning("kvcompress: %d of %d retrieval probes skipped (%s)", len(skipped), settings.probes, skipped[0])
    if not run:
        raise CalibrationError(
            f"calibration samples of {ctx.seq_len} tokens are too short for KV-Compress (text cuts need more than "
            f"{settings.sink + settings.window + settings.horizon + 1} tokens, a retrieval probe a haystack longer "
            f"than {settings.sink + settings.window} tokens plus the needle and question); raise --max-seq-length"
        )

    observer = HeadMassObserver(
        n_layers, n_kv, settings, schedule, observed=[kind == "full_attention" for kind in ctx.kinds], sources=sources
    )
    ctx.pass_seconds += run_calibration_pass(
        ctx.model, run, [observer], progress=ctx.bar("kvcompress: per-head attention mass")
    )
    text, probe = observer.mean_curves()
    if text is None and probe is None:
        raise CalibrationError("KV-Compress observed no attention at all (no full-attention layer was seen)")
    # a retrieval answer is all or nothing: a probe's needle mass counts only for a head that keeps everything
    credit = None if probe is None else whole_context_credit(probe)
    combined = combine_curves(text, credit, settings.probe_weight)  # [L, H_kv, GRID + 1], per member layer

    # an owner's curve is its own plus each reader's over its keys (the owner's heads serve them all)
    owners = torch.tensor(list(range(n_layers)) if sources is None else sources)
    is_owner = (owners == torch.arange(n_layers))[:, None, None]
    members = torch.bincount(owners, minlength=n_layers).clamp(min=1).double()[:, None, None]
    # owners' rows: own curve + readers' curves; readers' rows stay their own (they are not budgeted)
    grouped = torch.where(is_owner, torch.zeros_like(combined).index_add_(0, owners, combined), combined)
    f = allocate_head_keep(grouped, budget.budgeted, budget.fraction, budget.floor)  # float32 [L, H_kv]
    if settings.allocation == "retrieval":
        f = retrieval_split(f, budget.budgeted, budget.fraction, budget.floor)
    layer_keep, head_keep = plan_tensors(f)

    # inspection data: an owner's row is its group's mean curve, a reader's its own over the owner's keys, read at
    # the owner's fractions (what the reader's queries find)
    mean_curves = torch.where(is_owner, grouped / members, combined).clamp(0.0, 1.0)
    captured = curve_at(mean_curves, f[owners]).clamp(0.0, 1.0)  # [L, H_kv]
    budgeted_mask = torch.tensor(budget.budgeted)

    def mean_mass(curves: torch.Tensor | None) -> float | None:
        """Mean over the budgeted heads of their group's mean curve (text or probes) at the chosen fractions."""
        if curves is None:
            return None
        group = torch.zeros_like(curves).index_add_(0, owners, curves) / members
        return float(curve_at(group, f)[budgeted_mask].mean())

    achieved = budget.achieved(layer_keep)
    if not budget.feasible:
        log.warning(
            "kvcompress: target ratio %.4f cannot be met exactly at %d tokens (sinks + recent window, or every "
            "owning head kept whole); the plan keeps %.4f", ctx.recipe.target_ratio, ctx.seq_len, achieved,
        )
    ctx.tensors["kvcompress.head_keep"] = head_keep
    ctx.tensors["kvcompress.captured_curve"] = mean_curves.float()
    ctx.tensors["kvcompress.captured_mass"] = captured.float()
    if with_pyramid:
        _overwrite_pyramid(ctx, layer_keep, owners, budget, achieved)
    else:
        ctx.tensors["kvcompress.layer_keep"] = layer_keep
    ctx.params["kvcompress"] = settings.runtime_params()

    budgeted_heads = int(budgeted_mask.sum()) * n_kv
    report = {
        "target_ratio": ctx.recipe.target_ratio,
        "achieved_ratio_at_calibration_length": achieved,
        "full_attention_ratio_at_calibration_length": full_attention_ratio(achieved, ctx.kinds, ctx.seq_len, window),
        "calibration_length": ctx.seq_len,
        "feasible": budget.feasible,
        "budgeted_layers": [l for l, b in enumerate(budget.budgeted) if b],
        "budgeted_heads": budgeted_heads,
        "heads_keeping_everything": int((f[budgeted_mask] >= 1.0).sum()),
        # ceil(f * seq_len) >= seq_len: the head drops nothing at the calibration length (f within a grid step of 1)
        "heads_keeping_everything_at_calibration_length": int(
            (torch.ceil(f[budgeted_mask].double() * ctx.seq_len - 1e-6) >= ctx.seq_len).sum()
        ),
        "layer_keep": [float(k) for k in layer_keep],
        "head_keep_fractions": [[float(x) for x in row] for row in f],  # on the grid: multiples of 1 / GRID
        "share_source": sources,
        # the combined curves weigh the probes' all-or-nothing credit: report the text's mass as the headline
        "mean_captured_mass": mean_mass(text) if text is not None else float(captured[budgeted_mask].mean()),
        "mean_captured_mass_text": mean_mass(text),
        "mean_captured_mass_probes": mean_mass(probe),
        "probes": len(probes),
        "probes_skipped": len(skipped),
        "observations_text": int(observer.text_count.max()),
        "observations_probes": int(observer.probe_count.max()),
    }
    ctx.report["kvcompress"] = report
    ctx.provenance["kvcompress_calibration"] = {
        "grid": GRID, "horizon": settings.horizon, "probes": len(probes), "probe_weight": settings.probe_weight,
        "observations_text": report["observations_text"], "observations_probes": report["observations_probes"],
        "reader_curves": "summed into the owner's (one per reader)",
    }
    for line in budget_table(report):
        ctx.say("%s", line)


def _overwrite_pyramid(ctx, layer_keep: torch.Tensor, owners: torch.Tensor, budget: Budget, achieved: float) -> None:
    """With PyramidInfer in the plan, its ``layer_keep`` becomes the layers' mean head fractions (1.0 for layers not
    budgeted, as PyramidInfer writes), and its captured mass (its grouped curve at the new fraction, divided by the
    group's size as PyramidInfer does) and report follow."""
    keep = torch.where(torch.tensor(budget.budgeted), layer_keep, torch.ones_like(layer_keep)).float()
    if "pyramidinfer.layer_keep" in ctx.tensors:  # the joint search (calibrate.joint) also tries PyramidInfer's own
        ctx.state["pyramidinfer.layer_keep"] = ctx.tensors["pyramidinfer.layer_keep"].clone()
    ctx.tensors["pyramidinfer.layer_keep"] = keep
    curves = ctx.tensors.get("pyramidinfer.captured_curve")
    captured = None
    if curves is not None and "pyramidinfer.captured_mass" in ctx.tensors and curves.shape[-1] == GRID + 1:
        members = torch.bincount(owners, minlength=owners.numel()).clamp(min=1).double()
        captured = (curve_at(curves, keep) / members).clamp(0.0, 1.0)
        ctx.tensors["pyramidinfer.captured_mass"] = captured.float()
    report = ctx.report.get("pyramidinfer")
    if report is not None:
        report["achieved_ratio_at_calibration_length"] = achieved
        report["layer_keep_from"] = "kvcompress (mean of each layer's per-head fractions)"
        if captured is not None:
            report["mean_captured_mass"] = float(captured[torch.tensor(budget.budgeted)].mean())


__all__ = [
    "Budget", "HeadMassObserver", "KVCompressSettings", "PROBE_NAMES", "Probe", "allocate_head_keep", "budget_table",
    "build_probes", "calibration_step", "combine_curves", "retrieval_split", "whole_context_credit", "curve_at", "future_mass", "group_curves", "plan_budget",
    "plan_tensors",
]
