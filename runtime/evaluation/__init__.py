"""Evaluation of plans (and peers) against the full cache: the harness behind ``python -m runtime eval``."""

from .harness import TASKS, EvalSettings, evaluate, render
from .methods import Method, full_cache, plan_method

__all__ = ["TASKS", "EvalSettings", "Method", "evaluate", "full_cache", "plan_method", "render"]
