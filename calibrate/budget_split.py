"""One memory target, several methods: choose how much of it each method takes, by measured fidelity.

With ``--methods pyramidinfer,kvsharer --target-ratio R`` the kept KV fraction must be ``R`` in total. Sharing
``C`` layers frees ``C`` layers' caches outright; the PyramidInfer budgets of the layers that still own a cache then
make up the rest (``calibrate_layer_keep(..., sources=map)``). Which ``C`` is best depends on the model, so each
candidate split is built as a complete plan and scored through kvplan's own runtime on calibration windows: the
context is prefilled (and compressed), the next ``continuation`` tokens are fed as one chunk, and their next-token
distributions are compared with the full cache's (KL, top-1). The split with the lowest KL wins.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import DynamicCache

from runtime.apply import apply_plan
from runtime.cache import cache_argument
from runtime.evaluation.lm import agreement_and_kl
from runtime.kvsharer import parse_share_layers
from runtime.models import input_device
from runtime.plan import Plan, fingerprint_from_model

from .kvsharer import sharing_plan

log = logging.getLogger(__name__)

SPLIT_FRACTIONS = (0.125, 0.25, 0.375)  # shares of the full-attention layers tried as splits


def largest_split(num_full_layers: int) -> int:
    """The most layers any split shares (what the sharing search is asked to find)."""
    return int(num_full_layers * SPLIT_FRACTIONS[-1] + 0.5)


def split_candidates(num_full_layers: int, available: int) -> list[int]:
    """Shared-layer counts to try: none, 1, 2, 1/8, 1/4 and 3/8 of the full-attention layers, and every layer
    the search accepted — as far as it accepted them."""
    wanted = {0, 1, 2, available} | {int(num_full_layers * f + 0.5) for f in SPLIT_FRACTIONS}
    return sorted(c for c in wanted if c <= available)


class ContinuationFidelity:
    """KL(full ‖ plan) and top-1 agreement on the tokens that follow a compressed context.

    Windows are the first ``context + continuation`` tokens of the last ``num_windows`` calibration samples: the
    context is prefilled (compressed), the continuation fed as one chunk (``stepwise``: one token at a time, as
    decoding feeds it — a chunk attends exactly where KCache would read only its top-N). The full model's log-probabilities are
    computed once.
    """

    def __init__(
        self, model, samples: Sequence[torch.Tensor], num_windows: int = 2, context: int = 1024,
        continuation: int = 64, stepwise: bool = False,
    ):
        self.stepwise = stepwise  # feed the continuation one token at a time, as decoding does (KCache's top-N)
        self.model = model
        self.device = input_device(model)
        usable = [s for s in samples if s.numel() > 2 * continuation]
        if not usable:
            raise ValueError(f"calibration samples must be longer than {2 * continuation} tokens to score splits")
        self.windows = [s[: context + continuation].to(self.device)[None, :] for s in usable[-num_windows:]]
        self.continuation = continuation
        self.reference = []
        with torch.no_grad():
            for ids in self.windows:
                logits = self.model(ids, use_cache=False).logits[0, -continuation:]
                self.reference.append(torch.log_softmax(logits.float(), dim=-1))

    def score(self, plan: Plan) -> dict[str, float]:
        kl, agree, count = 0.0, 0.0, 0
        name = cache_argument(self.model)
        with apply_plan(self.model, plan), torch.no_grad():
            for ids, ref in zip(self.windows, self.reference):
                cache = DynamicCache(config=self.model.config)
                context, cont = ids[:, : -self.continuation], ids[:, -self.continuation :]
                self.model(context, logits_to_keep=1, **{name: cache})
                if self.stepwise:
                    steps = [self.model(cont[:, i : i + 1], **{name: cache}).logits[0] for i in range(cont.shape[1])]
                    logits = torch.cat(steps)
                else:
                    logits = self.model(cont, **{name: cache}).logits[0]
                stats = agreement_and_kl(ref, torch.log_softmax(logits.float(), dim=-1))
                kl += float(stats["kl"].sum())
                agree += float(stats["agree"].sum())
                count += ref.shape[0]
        return {"kl": kl / count, "top1": agree / count}


def split_is_searched(recipe, methods: Sequence[str]) -> bool:
    """With PyramidInfer and KVSharer's ``share_layers: auto``, the split of the memory target is searched."""
    share = parse_share_layers(recipe.args_for("kvsharer").get("share_layers", "auto"))
    return "pyramidinfer" in methods and "kvsharer" in methods and share == "auto"


def pyramid_plan(model, keep: torch.Tensor, runtime_params: dict) -> Plan:
    """A PyramidInfer-only plan with these keep fractions (a candidate to score)."""
    return Plan(
        fingerprint=fingerprint_from_model(model),
        methods=("pyramidinfer",),
        params={"pyramidinfer": runtime_params},
        tensors={"pyramidinfer.layer_keep": keep},
    )


def choose_split(model, samples, kinds, search, runtime_params: dict, allocate):
    """Score every candidate number of shared layers as a whole plan; return the best map and the table.

    ``allocate(sources)`` gives the owners' keep fractions for a sharing map; ``search.steps[k]`` is the map after
    ``k + 1`` acceptances.
    """

    n_full = sum(1 for k in kinds if k == "full_attention")
    fidelity = ContinuationFidelity(model, samples)
    identity = list(range(len(kinds)))
    table, best = [], None
    for count in split_candidates(n_full, len(search.steps)):
        sources = search.steps[count - 1] if count else identity
        keep, pyr_report, _, _ = allocate(sources)  # the identity map allocates as PyramidInfer alone does
        scores = fidelity.score(sharing_plan(model, sources, pyramid_plan(model, keep, runtime_params)))
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


__all__ = [
    "ContinuationFidelity", "choose_split", "largest_split", "pyramid_plan", "split_candidates", "split_is_searched",
]
