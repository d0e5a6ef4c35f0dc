"""The method registry: every method kvplan knows, in the order the runtime applies them.

Each method is one module on each side (``runtime/<method>.py`` holds its registration, a
:class:`runtime.schema.MethodSpec` named ``METHOD``, and its cache layers; ``calibrate/<method>.py`` its calibration
step) and one line below. ``Plan.check``, the cache builder, the calibration pipeline, the recipe loader, the Hub
model card and the CLIs read the specs from here.
"""

from __future__ import annotations

from . import kcache, kvcompress, kvsharer, pyramidinfer
from .schema import MethodSpec

_SPECS: tuple[MethodSpec, ...] = (pyramidinfer.METHOD, kvsharer.METHOD, kvcompress.METHOD, kcache.METHOD)

REGISTRY: dict[str, MethodSpec] = {spec.name: spec for spec in _SPECS}
"""Method name -> its spec, in application order (also the order of ``kvplan.methods`` in a plan file)."""

METHODS: tuple[str, ...] = tuple(REGISTRY)
"""Every method a plan can enable, in the order the runtime applies them."""


def get(name: str) -> MethodSpec:
    """The spec of method ``name``; ``KeyError`` naming the known methods otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}") from None


def specs(names=None) -> list[MethodSpec]:
    """Specs of ``names`` (all when None), in application order."""
    return [spec for spec in REGISTRY.values() if names is None or spec.name in names]


def runtime_supported() -> tuple[str, ...]:
    """Methods this runtime can apply."""
    return tuple(spec.name for spec in REGISTRY.values() if spec.runtime_supported)


def calibration_supported() -> tuple[str, ...]:
    """Methods that can be calibrated."""
    return tuple(spec.name for spec in REGISTRY.values() if spec.calibration_step is not None)


def help_lines() -> list[str]:
    """One line per method for ``--help``: name, whether it can be calibrated and applied, description."""
    lines = []
    for spec in REGISTRY.values():
        status = "" if spec.runtime_supported and spec.calibration_step else " [not implemented yet]"
        lines.append(f"{spec.name}{status}: {spec.description}")
    return lines


__all__ = ["METHODS", "REGISTRY", "get", "specs", "runtime_supported", "calibration_supported", "help_lines"]
