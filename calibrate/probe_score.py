"""Retrieval retention of a whole candidate plan, measured on calibration probes through kvplan's runtime.

:class:`calibrate.budget_split.ContinuationFidelity` scores a plan by how closely it follows the full cache on the
text after a compressed context (KL, top-1). That says little about retrieval: a plan can follow ordinary text
closely and still have dropped the one fact a later question asks for. :class:`ProbeRetention` scores the same plan
on the retrieval probes KV-Compress calibrates with (:func:`calibrate.kvcompress.build_probes`: a calibration
sample with "The secret code of <name> is <code>." hidden in it, then the question and the answer), so that a
budget search can weigh both.

A probe is a **hit** when the model's greedy answer equals the probe's answer tokens exactly. It is computed teacher
forced, but fed as decoding feeds it, in each of the two protocols of ``runtime eval``'s passkey task
(``runtime.evaluation.retrieval``):

- ``context_first`` (kvpress's protocol): the haystack with the needle (``ids[:cut]``) is the prefill, so it is
  compressed before the question is seen; the question is then fed as one chunk;
- ``question_in_prefill`` (what ``generate(prompt)`` does): haystack and question are one prefill, so a query-aware
  selection sees the question.

Then each answer token is fed alone (single-token steps, as decoding runs: some layers, KCache's, only approximate
the exact attention on single-token steps), and the argmax of every step must be the next answer token; the first
miss ends the probe. **Retention** = the plan's hits among the probes the full cache (no plan) answers, per protocol.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache

from runtime.apply import apply_plan
from runtime.cache import cache_argument
from runtime.models import input_device
from runtime.plan import Plan

from .kvcompress import Probe, build_probes

PROTOCOLS = ("context_first", "question_in_prefill")


class ProbeRetention:
    """How many calibration retrieval probes a plan still answers, of those the full cache answers.

    Args:
        model: a causal LM (CPU, CUDA or dispatched by accelerate; token ids go to its embedding's execution device).
        tokenizer: the model's tokenizer (encodes needle, question and answer).
        samples: calibration samples, int64 ``[T_i]`` each (the haystacks are cut from them).
        count / length / seed / sink / window: :func:`calibrate.kvcompress.build_probes`'s ``count``, ``limit``,
            ``seed``, ``sink`` and ``window`` (at most ``count`` probes of at most ``length`` tokens, the needle
            outside the first ``sink`` and the last ``window`` haystack tokens).
        progress: optional wrapper over the loop on probes (e.g. ``lambda it: tqdm(it)``), used for every pass.

    The full cache's hits are computed once, here. Raises ``ValueError`` when no probe can be built (samples too
    short, a tokenizer that gives no tokens, ``count < 1``).
    """

    def __init__(
        self, model, tokenizer, samples: Sequence[torch.Tensor], count: int = 8, length: int = 1024, seed: int = 0,
        sink: int = 4, window: int = 32, progress: Callable | None = None,
    ):
        self.model = model
        self.device = input_device(model)
        self.progress = progress
        self.probes, skipped = build_probes(tokenizer, samples, count, length, seed, sink, window)
        if not self.probes:
            why = f": {skipped[0]}" if skipped else f" (count={count}, {len(samples)} samples)"
            raise ValueError(f"no retrieval probe could be built from the calibration samples{why}")
        # the full cache attends exactly either way: one protocol answers for both (up to float rounding of a
        # one-shot vs a two-chunk prefill), which halves the cost of this pass
        full = self._hits(None, ("question_in_prefill",))["question_in_prefill"]
        self.full_hits = {p: list(full) for p in PROTOCOLS}

    def score(self, plan: Plan | None) -> dict:
        """Hits and retention of ``plan`` (``None``: the full cache), per protocol ``p`` in :data:`PROTOCOLS`.

        Returns ``{"probes": n}`` and, per protocol: ``hits_<p>`` (probes the plan answers), ``full_hits_<p>``
        (probes the full cache answers), ``retained_<p>`` (probes both answer) and ``retention_<p>`` =
        ``retained / full_hits``, or ``None`` when the full cache answers none of them (nothing to retain: the
        probes say nothing about the plan in that protocol).
        """
        hits = self._hits(plan)
        result: dict = {"probes": len(self.probes)}
        for p in PROTOCOLS:
            full, mine = self.full_hits[p], hits[p]
            retained = sum(f and m for f, m in zip(full, mine))
            result[f"hits_{p}"] = sum(mine)
            result[f"full_hits_{p}"] = sum(full)
            result[f"retained_{p}"] = retained
            result[f"retention_{p}"] = retained / sum(full) if any(full) else None
        return result

    def _hits(self, plan: Plan | None, protocols: tuple[str, ...] = PROTOCOLS) -> dict[str, list[bool]]:
        """Per protocol, one bool per probe: does the model (under ``plan``) answer it exactly."""
        hits: dict[str, list[bool]] = {p: [] for p in protocols}
        probes = self.progress(self.probes) if self.progress is not None else self.probes
        applied = apply_plan(self.model, plan) if plan is not None else contextlib.nullcontext()
        with applied, torch.no_grad():
            for probe in probes:
                for p in protocols:
                    hits[p].append(self._answers(probe, question_in_prefill=p == "question_in_prefill"))
        return hits

    def _answers(self, probe: Probe, question_in_prefill: bool) -> bool:
        """Feed one probe as decoding would, in a fresh cache; True if every answer token is the step's argmax.

        ``ids [1, N]``; answer tokens are ``ids[:, a:]`` with ``a = N - answer_len``. Forwards: the prefill
        ``ids[:, :cut]`` then the question chunk ``ids[:, cut:a]`` (context first), or the prefill ``ids[:, :a]``
        (question in prefill); each returns logits ``[1, 1, V]`` (``logits_to_keep=1``) predicting ``ids[:, a]``.
        Then ``ids[:, i:i+1]`` for ``i = a .. N-2``, each predicting ``ids[:, i+1]``; the last answer token is never
        fed. Stops at the first miss.
        """
        ids = probe.ids.to(self.device)[None, :]
        total = ids.shape[1]
        first = total - probe.answer_len
        kwargs = {cache_argument(self.model): DynamicCache(config=self.model.config), "use_cache": True}
        prefill = first if question_in_prefill else probe.cut
        logits = self.model(ids[:, :prefill], logits_to_keep=1, **kwargs).logits
        if prefill < first:
            logits = self.model(ids[:, prefill:first], logits_to_keep=1, **kwargs).logits
        for i in range(first, total):
            if int(logits[0, -1].argmax()) != int(ids[0, i]):
                return False
            if i + 1 < total:
                logits = self.model(ids[:, i : i + 1], **kwargs).logits
        return True


__all__ = ["PROTOCOLS", "ProbeRetention"]
