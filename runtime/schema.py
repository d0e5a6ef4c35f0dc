"""What a method registration is made of: its plan tensors, its parameters and the hooks of both sides.

Every method of kvplan is described by one :class:`MethodSpec`, written once in ``runtime/<method>.py`` and listed
in :mod:`runtime.registry`. The plan loader (``Plan.check``), the cache builder, the calibration pipeline, the recipe
loader, the Hub model card and the CLIs' ``--help`` all read these specs; nothing else names a method's tensors,
parameters or defaults.

Shape symbols: ``L`` = ``num_hidden_layers``, ``H_kv`` = ``num_key_value_heads``; ``*`` = any length (inspection
tensors such as search logs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

SHAPE_SYMBOLS = {"L": "num_hidden_layers", "H_kv": "num_key_value_heads"}
_MAX_INT = 2**31 - 1

#: ``check(values, context) -> problem or None``; ``context`` holds the plan's fingerprint and tensors.
TensorCheck = Callable[[torch.Tensor, "TensorContext"], "str | None"]


@dataclass(frozen=True)
class TensorContext:
    """What a tensor check may look at besides the tensor: the plan's fingerprint and its other tensors."""

    fingerprint: Mapping[str, Any]
    tensors: Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a method in the plan file.

    Attributes:
        name: full name, ``"<method>.<name>"``.
        dtype: ``torch.float32`` or ``torch.int32``.
        shape: symbols or fixed sizes, e.g. ``("L",)``, ``("L", "H_kv")``, ``("*", 7)``.
        check: value rule (ranges, cross-field rules); returns a problem or None. Shape and dtype are checked first.
        meaning: one line for error messages and docs.
        required: True for the tensor the runtime reads (present exactly when the method is enabled); False for
            inspection data (calibration curves, logs) that the runtime never reads but the card and pictures show.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[str | int, ...]
    check: TensorCheck
    meaning: str
    required: bool = True

    def expected_shape(self, fingerprint: Mapping[str, Any], actual: tuple[int, ...]) -> tuple[int, ...]:
        """The shape this tensor must have for ``fingerprint`` (``*`` takes the actual size)."""
        out = []
        for i, symbol in enumerate(self.shape):
            if symbol == "*":
                out.append(actual[i] if i < len(actual) else -1)
            elif isinstance(symbol, int):
                out.append(symbol)
            else:
                out.append(int(fingerprint[SHAPE_SYMBOLS[symbol]]))
        return tuple(out)


@dataclass(frozen=True)
class ParamSpec:
    """A parameter of a method, with its default and range: the only place either is written.

    Attributes:
        name: the key in the recipe (``<method>: {name: value}``) and, for runtime parameters, in the plan.
        kind: ``int``, ``float``, ``str`` or ``bool`` (``parse`` overrides the type rule).
        default: used when the recipe (or the plan) does not give the parameter; ``None`` = "not set"
            (the method decides, e.g. PyramidInfer's ``slack`` grows with the budget).
        minimum / maximum: inclusive numeric range.
        choices: allowed values for strings.
        stage: ``runtime`` (stored in the plan's params, read by the runtime) or ``calibration`` (recipe only).
        in_plan: for runtime parameters, ``always`` (written even when equal to the default) or ``if_set``
            (written only when it differs from the default, so plans made before the parameter existed stay valid).
        parse: custom parser ``value -> value`` that raises ``ValueError`` (e.g. "a count, a fraction or auto").
        help: one line for ``--help`` and the docs.
    """

    name: str
    kind: str
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    stage: str = "runtime"
    in_plan: str = "if_set"
    parse: Callable[[Any], Any] | None = None

    def validate(self, value: Any, where: str) -> Any:
        """``value`` if it obeys this spec (ints accepted for floats); ``ValueError`` naming ``where`` otherwise."""
        if self.parse is not None:
            return self.parse(value)
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{where} must be true or false, got {value!r:.60}")
            return value
        if self.kind == "str":
            if not isinstance(value, str) or (self.choices is not None and value not in self.choices):
                allowed = f"one of {list(self.choices)}" if self.choices is not None else "a string"
                raise ValueError(f"{where} must be {allowed}, got {value!r:.60}")
            return value
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if self.kind == "int":
            ok = is_int
        else:
            ok = (is_int or isinstance(value, float)) and math.isfinite(value)
        if not ok:
            raise ValueError(f"{where} must be {'an integer' if self.kind == 'int' else 'a number'}{self._range()}, "
                             f"got {value!r:.60}")
        too_big = self.kind == "int" and value > _MAX_INT  # plans hold int32-safe values
        if too_big or (self.minimum is not None and value < self.minimum) or (
            self.maximum is not None and value > self.maximum
        ):
            raise ValueError(f"{where} must be {'an integer' if self.kind == 'int' else 'a number'}{self._range()}, "
                             f"got {value!r:.60}")
        return float(value) if self.kind == "float" else value

    def _range(self) -> str:
        if self.minimum is not None and self.maximum is not None:
            return f" in [{_num(self.minimum)}, {_num(self.maximum)}]"
        if self.minimum is not None:
            return f" >= {_num(self.minimum)}"
        if self.maximum is not None:
            return f" <= {_num(self.maximum)}"
        return ""

    def describe(self) -> str:
        """``name (default X, range): help`` for ``--help`` and docs."""
        rule = f"one of {', '.join(map(str, self.choices))}" if self.choices else self._range().strip()
        extra = ", ".join(x for x in (f"default {self.default}", rule) if x)
        return f"{self.name} ({extra}): {self.help}"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


@dataclass(frozen=True)
class MethodSpec:
    """One method of kvplan: plan schema, parameters, runtime layer hook, calibration step, description.

    Attributes:
        name: the method's name in plans, recipes and ``--methods``.
        description: one line for the model card and ``--help``.
        tensors: every tensor the method may put in a plan (the one the runtime reads is ``required``).
        params: every parameter (runtime and calibration), with defaults and ranges.
        configure: runtime hook ``configure(plan, layers, config)`` that fills in, for each layer, what this method
            asks of its cache (:class:`runtime.cache.LayerPlan`); ``None`` when this runtime cannot apply the
            method yet (``apply_plan`` then refuses a plan that enables it).
        calibration_step: ``"module:function"`` of the calibration step on the ``calibrate`` side (resolved only by
            the calibration pipeline; the runtime never imports it), or ``None`` when it cannot be calibrated yet.
        calibration_order: calibration steps run in ascending order (a step may use what earlier steps found,
            e.g. PyramidInfer budgets the layers KVSharer left owning a cache).
        check_plan: cross-method rules ``check_plan(fingerprint, tensors) -> problem or None`` run by ``Plan.check``.
        card_column: ``(title, tensor name, formatter of one layer's row)`` for the model card's per-layer table.
    """

    name: str
    description: str
    tensors: tuple[TensorSpec, ...]
    params: tuple[ParamSpec, ...] = ()
    configure: Callable[..., None] | None = None
    calibration_step: str | None = None
    calibration_order: int = 0
    check_plan: Callable[[Mapping[str, Any], Mapping[str, torch.Tensor]], str | None] | None = None
    card_column: tuple[str, str, Callable[[Any], str]] | None = None
    _params: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_params", {p.name: p for p in self.params})
        for tensor in self.tensors:
            if not tensor.name.startswith(f"{self.name}."):
                raise ValueError(f"tensor {tensor.name} of method {self.name} must start with '{self.name}.'")

    @property
    def runtime_supported(self) -> bool:
        """True when this runtime can apply the method."""
        return self.configure is not None

    @property
    def required_tensor(self) -> TensorSpec:
        return next(t for t in self.tensors if t.required)

    def param(self, name: str) -> ParamSpec:
        return self._params[name]

    def runtime_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.stage == "runtime")

    def resolve_args(self, args: Mapping[str, Any], where: str | None = None) -> dict[str, Any]:
        """Every parameter of the method: ``args`` (recipe values) validated, defaults filled in.

        Raises ``ValueError`` for unknown names or invalid values.
        """
        where = where or self.name
        unknown = sorted(set(args) - set(self._params))
        if unknown:
            raise ValueError(f"unknown {where} option(s) {unknown}; known: {sorted(self._params)}")
        return {
            p.name: p.validate(args[p.name], f"{where}.{p.name}") if p.name in args else p.default
            for p in self.params
        }

    def plan_params(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The runtime parameters as written into a plan (``always`` ones, and ``if_set`` ones that differ)."""
        out = {}
        for p in self.runtime_params():
            value = values.get(p.name, p.default)
            if p.in_plan == "always" or (value is not None and value != p.default):
                out[p.name] = value
        return out

    def read_params(self, plan_params: Mapping[str, Any]) -> dict[str, Any]:
        """The runtime parameters of an applied plan, defaults filled in (values already validated)."""
        return {p.name: plan_params.get(p.name, p.default) for p in self.runtime_params()}


__all__ = ["MethodSpec", "ParamSpec", "TensorSpec", "TensorContext", "SHAPE_SYMBOLS"]
