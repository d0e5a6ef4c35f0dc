"""The last stage of a multi-method calibration: whole candidate plans, measured, and the one to ship.

Each method's calibration step has already chosen its part for one memory target (``--target-ratio R``: the KV
bytes the plan holds ÷ the full cache's, **wherever they live** — KCache moves value bytes to its second store, it
does not remove them, so it changes where bytes live, not ``R``). The sharing map was chosen before, by the split
search of :mod:`calibrate.budget_split`. What remains open is measured here, through kvplan's own runtime, on
calibration data only:

1. **Owners' budgets** (a plan with both PyramidInfer and KV-Compress; every variant holds the same bytes):
   ``per-head`` — KV-Compress's per-(layer, KV head) fractions from one global allocation (what its step wrote);
   ``per-layer`` — PyramidInfer's per-layer fractions, every head of a layer keeping the same tokens;
   ``per-layer x per-head`` — PyramidInfer's layer budgets split between a layer's heads by KV-Compress's shares
   (a head's fraction is capped at 1: it may hold a little less than the target).
2. **KCache's N per layer** (a plan with KCache and a token budget): the calibrated error curves give one ``topn``
   per tolerance; ``tolerance / 2``, ``tolerance`` and ``2 x tolerance`` are tried on the chosen budget, beside the
   same plan with KCache off, on the continuation only: KCache leaves retrieval to the keys (complete) and to the
   question chunk (a multi-token chunk reads every row) — measured: passkeys unchanged in both protocols (README).

Every budget candidate is scored on the continuation of calibration windows (KL and top-1 against the full cache,
:class:`calibrate.budget_split.ContinuationFidelity`) and on calibration retrieval probes in both protocols
(:class:`calibrate.probe_score.ProbeRetention`). **Rules.** Budget: the highest mean probe retention (the two
protocols averaged; a protocol whose probes the full cache misses does not count), ties to the lowest KL. KCache:
the largest tolerance whose KL is at most ``KL_off + max(0.1 * KL_off, 0.0005)`` (and, for a candidate scored on the
probes, whose retention is at least the plan's without KCache); when none is, the smallest tried. The search stops
scoring at ``max_seconds``: a candidate is not started when the last measured cost of its parts (continuation,
probes) would take it past the limit (candidates not scored are listed as such and not chosen)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from runtime.plan import Plan, fingerprint_from_model

log = logging.getLogger(__name__)

KL_SLACK_RELATIVE = 0.1  # KCache may raise the continuation KL by this fraction of the plan's without it ...
KL_SLACK_ABSOLUTE = 0.0005  # ... or by this much, whichever is larger
DEFAULT_MAX_SECONDS = 240.0
PROBES = 8  # calibration retrieval probes scored per candidate, in both protocols
PROBE_LENGTH = 1024  # tokens of each probe (haystack, needle, question, answer)


@dataclass
class Candidate:
    """One whole plan to score: the calibrated tensors with ``overrides`` (``None`` removes a tensor)."""

    stage: str  # "budget" or "kcache"
    name: str
    overrides: dict[str, torch.Tensor | None]
    detail: dict = field(default_factory=dict)
    scores: dict | None = None
    report: dict | None = None  # KCache: the calibration report of this tolerance (becomes the plan's if chosen)

    def row(self) -> dict:
        out = {"stage": self.stage, "candidate": self.name, **self.detail}
        if self.scores is None:
            out["scored"] = False
        else:
            out.update({k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.scores.items()})
        return out


def applies(methods: tuple[str, ...]) -> bool:
    """The stage runs when something is left to choose: two budget methods, or KCache next to a budget."""
    budgets = {"pyramidinfer", "kvcompress"} & set(methods)
    return len(budgets) == 2 or (bool(budgets) and "kcache" in methods)


def budget_candidates(ctx) -> list[Candidate]:
    """The owners' budget variants (see the module doc); one (as calibrated) when there is nothing to vary."""
    calibrated = Candidate("budget", "per-head" if "kvcompress" in ctx.methods else "per-layer", {})
    own_keep = ctx.state.get("pyramidinfer.layer_keep")
    if not ("pyramidinfer" in ctx.methods and "kvcompress" in ctx.methods and own_keep is not None):
        return [calibrated]
    shares = ctx.tensors["kvcompress.head_keep"]
    equal = torch.full_like(shares, 1.0 / shares.shape[1])
    return [
        calibrated,
        Candidate("budget", "per-layer", {"pyramidinfer.layer_keep": own_keep, "kvcompress.head_keep": equal}),
        Candidate("budget", "per-layer x per-head", {"pyramidinfer.layer_keep": own_keep}),
    ]


def kcache_candidates(ctx, base: Candidate) -> list[Candidate]:
    """KCache off and three tolerances around the recipe's, on top of ``base``'s budget."""
    build: Callable | None = ctx.state.get("kcache")
    if build is None:
        return []
    tolerance = float(ctx.report["kcache"]["tolerance"])
    off = torch.zeros_like(ctx.tensors["kcache.topn"])
    out = [Candidate("kcache", "kcache off", {**base.overrides, "kcache.topn": off, "kcache.output_error": None},
                     {"budget": base.name, "tolerance": None})]
    for t in (tolerance / 2, tolerance, 2 * tolerance):
        tensors, report = build(t)
        out.append(Candidate("kcache", f"tolerance {t:g}", {**base.overrides, **tensors},
                             {"budget": base.name, "tolerance": t,
                              "values_read": round(report["mean_fraction_read"], 4)}, report=report))
    return out


def _retention(scores: dict) -> float:
    """Mean of the protocols' retentions that mean something (the full cache found some of their probes)."""
    values = [scores.get(k) for k in ("retention_context_first", "retention_question_in_prefill")]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else 1.0


class _Scorer:
    """Scores candidates until the deadline; a candidate whose predicted cost would end past it is not started.

    The prediction is the last measured cost of the same parts: the continuation (every candidate) and the probes
    (candidates scored on them). Before anything was measured a candidate is always started.
    """

    def __init__(self, ctx, fidelity, probes, max_seconds: float):
        self.ctx, self.fidelity, self.probes = ctx, fidelity, probes
        self.deadline = time.perf_counter() + max_seconds
        self.model_fp = fingerprint_from_model(ctx.model)
        self.cost: dict[str, float] = {}  # "continuation" / "probes": seconds the last such pass took

    def predicted_seconds(self, probes: bool) -> float:
        parts = ["continuation"] + (["probes"] if probes and self.probes is not None else [])
        return sum(self.cost.get(part, 0.0) for part in parts)

    def plan(self, candidate: Candidate) -> Plan:
        tensors = dict(self.ctx.tensors)
        for name, value in candidate.overrides.items():
            if value is None:
                tensors.pop(name, None)
            else:
                tensors[name] = value
        plan = Plan(fingerprint=dict(self.model_fp), methods=self.ctx.methods, params=self.ctx.params, tensors=tensors)
        plan.check()
        return plan

    def score(self, candidate: Candidate, probes: bool = True) -> None:
        start = time.perf_counter()
        if start + self.predicted_seconds(probes) > self.deadline:
            log.info("joint: %-8s %-22s not scored: it would take about %.0f s, %.0f s are left", candidate.stage,
                     candidate.name, self.predicted_seconds(probes), max(0.0, self.deadline - start))
            return
        plan = self.plan(candidate)
        scores = dict(self.fidelity.score(plan))
        self.cost["continuation"] = time.perf_counter() - start
        if probes and self.probes is not None:
            scores.update(self.probes.score(plan))
            scores["retention"] = _retention(scores)
            self.cost["probes"] = time.perf_counter() - start - self.cost["continuation"]
        scores["seconds"] = time.perf_counter() - start
        candidate.scores = scores
        log.info("joint: %-8s %-22s KL %.4f top-1 %.3f retention %s (%.1f s)", candidate.stage, candidate.name,
                 scores["kl"], scores["top1"], _fmt(scores.get("retention")), scores["seconds"])


def choose_budget(candidates: list[Candidate]) -> Candidate:
    scored = [c for c in candidates if c.scores is not None] or candidates[:1]
    if scored[0].scores is None:
        return scored[0]
    return min(scored, key=lambda c: (-round(c.scores.get("retention", 1.0), 9), c.scores["kl"]))


def choose_kcache(candidates: list[Candidate]) -> Candidate | None:
    off = next((c for c in candidates if c.detail["tolerance"] is None and c.scores is not None), None)
    tried = [c for c in candidates if c.detail["tolerance"] is not None and c.scores is not None]
    if not tried:
        return None
    if off is None:
        return min(tried, key=lambda c: c.detail["tolerance"])
    limit = off.scores["kl"] + max(KL_SLACK_RELATIVE * off.scores["kl"], KL_SLACK_ABSOLUTE)

    def keeps_retention(c: Candidate) -> bool:  # a candidate scored without probes is judged on KL alone
        mine, base = c.scores.get("retention"), off.scores.get("retention")
        return mine is None or base is None or mine >= base - 1e-9

    fine = [c for c in tried if c.scores["kl"] <= limit and keeps_retention(c)]
    if not fine:
        return min(tried, key=lambda c: c.detail["tolerance"])
    return max(fine, key=lambda c: c.detail["tolerance"])


def joint_search(ctx, max_seconds: float = DEFAULT_MAX_SECONDS) -> None:
    """Score the candidates, write the chosen tensors into ``ctx.tensors`` and the table into ``ctx.report``."""
    from .budget_split import ContinuationFidelity
    from .probe_score import ProbeRetention

    start = time.perf_counter()
    fidelity = ContinuationFidelity(ctx.model, ctx.samples, stepwise=True)
    probes = None
    if ctx.tokenizer is not None:
        try:
            bar = ctx.bar("joint: retrieval probes, full cache", "probe")
            probes = ProbeRetention(ctx.model, ctx.tokenizer, ctx.samples, count=PROBES, length=PROBE_LENGTH,
                                    seed=ctx.recipe.seed, progress=bar)
        except ValueError as exc:
            log.warning("joint: no retrieval probes (%s); candidates are scored on the continuation only", exc)
    scorer = _Scorer(ctx, fidelity, probes, max_seconds - (time.perf_counter() - start))

    budgets = budget_candidates(ctx)
    if "kcache" in ctx.methods:  # the budget is chosen without KCache (it does not change the bytes held)
        off = {"kcache.topn": torch.zeros_like(ctx.tensors["kcache.topn"]), "kcache.output_error": None}
        for c in budgets:
            c.overrides = {**c.overrides, **off}
    if len(budgets) > 1:
        for c in tqdm_or_list(budgets, ctx, "joint: owners' budgets"):
            scorer.score(c)
    best = choose_budget(budgets)
    kc = kcache_candidates(ctx, Candidate("budget", best.name, {
        k: v for k, v in best.overrides.items() if not k.startswith("kcache.")}))
    if best.scores is not None and kc:  # "kcache off" on this budget was just scored
        kc[0].scores = best.scores
    for c in tqdm_or_list(kc, ctx, "joint: KCache top-N"):
        if c.scores is None:  # KCache leaves retrieval to the exact keys and the exact question chunk: KL only
            scorer.score(c, probes=False)
    chosen_kc = choose_kcache(kc)
    if chosen_kc is not None:
        chosen = chosen_kc
    else:  # no KCache candidate scored (or none in the plan): the budget, KCache as calibrated
        kept = {k: v for k, v in best.overrides.items() if not k.startswith("kcache.")}
        chosen = Candidate("budget", best.name, kept)
    for name, value in chosen.overrides.items():
        if value is None:
            ctx.tensors.pop(name, None)
        else:
            ctx.tensors[name] = value
    if chosen_kc is not None:
        ctx.report["kcache"] = chosen_kc.report
    rows = []
    for c in (budgets if len(budgets) > 1 else []) + kc:
        rows.append({**c.row(), "chosen": c is best or c is chosen_kc})
    seconds = time.perf_counter() - start
    ctx.report["joint"] = {
        "rows": rows, "budget": best.name,
        "kcache_tolerance": None if chosen_kc is None else chosen_kc.detail["tolerance"],
        "seconds": round(seconds, 1), "max_seconds": max_seconds,
        "probes": 0 if probes is None else len(probes.probes),
    }
    untimed = [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # reruns stay byte-identical
    ctx.provenance["joint_search"] = {**{k: v for k, v in ctx.report["joint"].items() if k != "seconds"},
                                      "rows": untimed}
    ctx.provenance["joint_search_seconds"] = round(seconds, 3)
    ctx.pass_seconds += seconds


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def tqdm_or_list(items, ctx, desc: str):
    bar = ctx.bar(desc, "plan")
    return items if bar is None else bar(items)


def joint_table(report: dict) -> list[str]:
    """Lines of the candidates table (log and CLI)."""
    scored = sum(1 for row in report["rows"] if row.get("scored", True))
    lines = [f"joint search: {scored} of {len(report['rows'])} candidate plans scored in {report['seconds']:.0f} s "
             f"(limit {report['max_seconds']:.0f} s; {report['probes']} retrieval probes, both protocols)",
             "  stage   candidate               KL      top-1  retention  top-N/context"]
    for row in report["rows"]:
        mark = "  <- chosen" if row.get("chosen") else ""
        if row.get("scored") is False:
            lines.append(f"  {row['stage']:<7} {row['candidate']:<22}  not scored (time limit){mark}")
            continue
        read = row.get("values_read")
        lines.append(
            f"  {row['stage']:<7} {row['candidate']:<22} {row['kl']:.4f}  {row['top1']:.3f}  "
            f"{_fmt(row.get('retention')):>9}  {'' if read is None else f'{read:.3f}'}{mark}"
        )
    return lines


__all__ = ["Candidate", "applies", "budget_candidates", "choose_budget", "choose_kcache", "joint_search",
           "joint_table", "kcache_candidates"]
