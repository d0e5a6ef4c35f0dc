"""What an evaluation compares: a way to run the model with a cache (full, a kvplan plan, a peer's press).

Every method is a context manager factory: inside ``method.applied(model)``, a forward that prefills a context
compresses it the method's way; the harness then feeds questions and decodes with the same cache. The full cache
is the method that changes nothing. Peers (kvpress presses) plug in as methods too, so they are scored by the same
code as our plans (``bench/``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from ..apply import apply_plan
from ..cache import theoretical_bytes
from ..plan import Plan


@dataclass(frozen=True)
class Method:
    """A named way to run the model.

    Attributes:
        name: label in reports.
        applied: ``model -> context manager`` under which prefills compress the cache.
        plan: the kvplan plan, when the method is one (for theoretical bytes).
        compresses_questions: False when only the context prefill is compressed (kvpress's pipeline); our plans
            keep compacting while decoding, so this is True for them.
    """

    name: str
    applied: Callable[[torch.nn.Module], AbstractContextManager]
    plan: Plan | None = None
    compresses_questions: bool = True

    def theoretical_bytes(self, config, seq_len: int, batch: int, dtype: torch.dtype) -> int | None:
        if self.plan is not None:
            return theoretical_bytes(self.plan, config, seq_len, batch, dtype)
        return None


def full_cache() -> Method:
    """The reference: transformers' stock cache, nothing compressed."""
    return Method(name="full", applied=lambda model: contextlib.nullcontext(), compresses_questions=False)


def plan_method(plan: Plan, name: str | None = None, prefill_chunk_size: int | str | None = "auto") -> Method:
    """A kvplan plan as an evaluation method (``prefill_chunk_size``: as :func:`runtime.apply_plan` takes it)."""
    label = name or f"plan({', '.join(plan.methods) or 'none'}, ratio {plan.target_ratio})"
    return Method(name=label, applied=lambda model: apply_plan(model, plan, prefill_chunk_size=prefill_chunk_size),
                  plan=plan)
