"""kvplan runtime: load a calibrated plan and apply it inside ``model.generate``.

    plan = runtime.load_plan("plan.safetensors")      # or a Hub repo id
    with runtime.apply_plan(model, plan):
        model.generate(**inputs)
"""

from .plan import Plan, PlanError, fingerprint_from_model, load_plan
from .apply import AppliedPlan, apply_plan, remove_plan
from .cache import kept_lengths, physical_bytes, stock_bytes, store_bytes, theoretical_bytes, value_rows

__all__ = [
    "Plan",
    "PlanError",
    "AppliedPlan",
    "apply_plan",
    "remove_plan",
    "load_plan",
    "fingerprint_from_model",
    "physical_bytes",
    "theoretical_bytes",
    "stock_bytes",
    "kept_lengths",
    "store_bytes",
    "value_rows",
]
