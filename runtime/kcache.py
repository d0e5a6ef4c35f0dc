"""KCache at run time: values in a second store, top-N value rows read per decode step — the plan schema only, for
now.

``kcache.topn`` int32 ``[L]`` holds the values each layer reads per decode step (0 = all). This runtime cannot apply
it yet (the value store comes with the KCache issue): the method is registered with no runtime hook, so
``Plan.load`` validates such a plan and ``runtime.apply_plan`` refuses it with a ``PlanError`` instead of silently
applying the plan without it.
"""

from __future__ import annotations

import torch

from .schema import MethodSpec, TensorContext, TensorSpec


def _check_topn(values: torch.Tensor, context: TensorContext) -> str | None:
    """``0`` means all values are read."""
    if bool((values < 0).any()):
        return "values must be >= 0"
    return None


METHOD = MethodSpec(
    name="kcache",
    description="KCache: values live in a second store and decoding reads only the top-N attended rows",
    tensors=(TensorSpec("kcache.topn", torch.int32, ("L",), _check_topn, "values read per decode step (0 = all)"),),
    configure=None,  # not applicable by this runtime yet: apply_plan refuses such plans
    calibration_step=None,
    calibration_order=3,
    card_column=("top-n values", "kcache.topn", lambda row: "all" if row == 0 else str(row)),
)

__all__ = ["METHOD"]
