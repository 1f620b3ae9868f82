"""The fitted blend as data: the typed form of ensemble.json's "blend" object, one meaning per field.

    mean, weighted, hill-climb:  blend = sum_m weights[m] * q_m, where q_m is member m's probabilities,
                                 or (weighted with powers) q_m = p_m ** powers[m], renormalised per row
    stack:                       blend = softmax(sum_m coef[m] * f(p_m) + intercept), f = log or identity

`weights` exist only for the convex blends; a stacker has coefficients, not weights. `importance` gives
every method one number per member for plots and reports (the weight, or the mean coefficient).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from core.errors import FlowerError

METHODS = ("mean", "weighted", "hill-climb", "stack")
WEIGHT_TOLERANCE = 1e-6


class SpecError(FlowerError, ValueError):
    """A blend spec that cannot be applied; the message names the field."""


def _numbers(value: Any, field: str, where: str) -> tuple[float, ...]:
    """A non-empty list of finite numbers as a tuple of floats."""
    if not isinstance(value, list | tuple) or not value:
        raise SpecError(f"{where}.{field} must be a non-empty list of numbers, got {value!r}")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise SpecError(f"{where}.{field} must hold finite numbers only, got {list(value)[:8]!r}")
    return tuple(float(v) for v in value)


@dataclass(frozen=True)
class BlendSpec:
    """How to blend M members' probabilities; checked when made, so a bad ensemble.json fails at load."""

    method: str
    weights: tuple[float, ...] | None = None  # convex blends: >= 0, sum 1
    powers: tuple[float, ...] | None = None  # weighted with powers: exponent per member, > 0
    selections: tuple[int, ...] | None = None  # hill-climb: times each member was picked
    features: str | None = None  # stack: "log" (log-probabilities) or "probs"
    C: float | None = None  # stack: inverse L2 strength, chosen by inner CV
    coef: tuple[tuple[float, ...], ...] | None = None  # stack: [member][class]
    intercept: tuple[float, ...] | None = None  # stack: [class]

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SpecError(f"blend.method must be one of {METHODS}, got {self.method!r}")
        if self.method == "stack":
            self._check_stack()
        else:
            self._check_convex()

    def _refuse(self, *names: str) -> None:
        """Fields that mean nothing for this method must be absent."""
        present = [n for n in names if getattr(self, n) is not None]
        if present:
            raise SpecError(f"blend.method {self.method!r} takes no {present}")

    def _check_convex(self) -> None:
        """Weights present, non-negative, summing to 1; powers and selections (if any) one per member."""
        if self.weights is None:
            raise SpecError(f"blend.method {self.method!r} needs 'weights'")
        self._refuse("features", "C", "coef", "intercept", *(("powers",) if self.method != "weighted" else ()),
                     *(("selections",) if self.method != "hill-climb" else ()))
        if min(self.weights) < 0 or abs(sum(self.weights) - 1.0) > WEIGHT_TOLERANCE:
            raise SpecError(f"blend.weights must be >= 0 and sum to 1, got {list(self.weights)}")
        for name in ("powers", "selections"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.weights):
                raise SpecError(f"blend.{name} has {len(values)} entries for {len(self.weights)} weights")
        if self.powers is not None and min(self.powers) <= 0:
            raise SpecError(f"blend.powers must be > 0, got {list(self.powers)}")
        if self.selections is not None and (min(self.selections) < 0 or sum(self.selections) < 1):
            raise SpecError(f"blend.selections must be counts >= 0 with at least one pick, got {list(self.selections)}")

    def _check_stack(self) -> None:
        """Coefficients [M][C] and intercepts [C] of one width; features log or probs; no weights."""
        if self.coef is None or self.intercept is None:
            raise SpecError("blend.method 'stack' needs 'coef' and 'intercept'")
        self._refuse("weights", "powers", "selections")
        if self.C is not None and self.C <= 0:
            raise SpecError(f"blend.C must be > 0, got {self.C}")
        if self.features not in ("log", "probs"):
            raise SpecError(f"blend.features must be 'log' or 'probs', got {self.features!r}")
        if any(len(row) != len(self.intercept) for row in self.coef):
            raise SpecError(f"blend.coef rows must each have {len(self.intercept)} entries (one per class)")

    @property
    def member_count(self) -> int:
        """How many members the spec blends."""
        return len(self.coef) if self.method == "stack" else len(self.weights)

    @property
    def importance(self) -> tuple[float, ...]:
        """One number per member: its weight, or for a stacker its mean coefficient over classes."""
        if self.method == "stack":
            return tuple(sum(row) / len(row) for row in self.coef)
        return self.weights

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: the fields that are set, lists for tuples."""
        def plain(value):
            return [plain(v) for v in value] if isinstance(value, tuple) else value

        return {k: plain(v) for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Any, where: str = "blend") -> BlendSpec:
        """Read a spec from JSON; every problem is a SpecError naming the field."""
        if not isinstance(data, dict):
            raise SpecError(f"{where} must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {f for f in cls.__dataclass_fields__})
        if unknown:
            raise SpecError(f"{where} has unknown field(s) {unknown}")
        values: dict[str, Any] = {"method": data.get("method")}
        for name in ("weights", "powers", "intercept"):
            if name in data:
                values[name] = _numbers(data[name], name, where)
        if "selections" in data:
            counts = _numbers(data["selections"], "selections", where)
            if any(v != int(v) for v in counts):
                raise SpecError(f"{where}.selections must be whole numbers, got {list(counts)}")
            values["selections"] = tuple(int(v) for v in counts)
        if "coef" in data:
            if not isinstance(data["coef"], list) or not data["coef"]:
                raise SpecError(f"{where}.coef must be a non-empty list of rows")
            values["coef"] = tuple(_numbers(row, "coef", where) for row in data["coef"])
        if "C" in data:
            values["C"] = _numbers([data["C"]], "C", where)[0]
        if "features" in data:
            values["features"] = data["features"]
        return cls(**values)
