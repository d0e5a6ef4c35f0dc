"""The one error a plan ever raises."""


class PlanError(ValueError):
    """Any problem with a plan: unreadable file, bad metadata, bad tensors, a plan for another model, or a plan
    that asks for something this runtime cannot do."""


__all__ = ["PlanError"]
