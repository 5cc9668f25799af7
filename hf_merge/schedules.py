"""Schedules: a numeric config value that varies over the model, resolved per tensor by the engine.

A :class:`Schedule` is a list of rules ``(filter, points)``. The first rule whose ``filter`` is a substring of the
tensor's name applies (a rule without filter matches every tensor); its ``points`` are a constant (one point) or a
gradient spread evenly over the tensor's position x ∈ [0, 1] in the model and interpolated linearly, as mergekit does:
v(x) = (1 − f)·p[i] + f·p[i + 1] with i = ⌊x·(n − 1)⌋, f = x·(n − 1) − i. Block b of L has x = b / (L − 1); every
tensor outside the blocks (embeddings, final norm, output head) has x = 0, as in mergekit.

    >>> SlerpConfig(t=Schedule({"self_attn": [0, 0.5, 1], "mlp": [1, 0.5, 0]}, default=0.5))
    >>> TaskArithmeticConfig(scaling=1.0, weights={"math": Schedule([0, 1]), "code": 0.5})  # a per-task gradient

Any numeric field of any config may hold a schedule, also inside per-task values. A config with schedules is turned
into one plain config per tensor (:func:`resolve`) before its merger sees it; methods never read schedules.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .params import ParamInfo

Rule = tuple[str | None, tuple[float, ...]]


class Schedule:
    """A value that depends on where a tensor is in the model.

    Args:
        value: a list of numbers (a gradient over the model's blocks), a ``{filter: number or list}`` mapping (the
            first filter that is a substring of the tensor name wins), or mergekit's rule list
            ``[{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.5}]``.
        default: the value of tensors no filter matches (required unless a rule already matches every tensor).
    """

    __slots__ = ("rules",)

    def __init__(self, value: Sequence[Any] | Mapping[str, Any], default: Any = None) -> None:
        if isinstance(value, Mapping):
            rules = [(str(name), _points(f"schedule[{name!r}]", points)) for name, points in value.items()]
        elif isinstance(value, Sequence) and not isinstance(value, str) and value and all(
                isinstance(rule, Mapping) for rule in value):
            rules = [_rule(index, rule) for index, rule in enumerate(value)]
        else:
            rules = [(None, _points("schedule", value))]
        if default is not None:
            rules.append((None, _points("schedule default", default)))
        catch_all = next((i for i, (name, _) in enumerate(rules) if name is None), None)
        if catch_all is None:
            raise ValueError(f"Schedule {_describe(rules)} has no value for tensors that match none of its filters: "
                             "give default=... (or a rule without a filter).")
        if catch_all != len(rules) - 1:
            raise ValueError(f"Schedule {_describe(rules)}: rules after the catch-all rule #{catch_all} can never "
                             "apply; remove them.")
        self.rules: tuple[Rule, ...] = tuple(rules)

    def at(self, name: str, position: float) -> float:
        """The value of tensor ``name`` at ``position`` x ∈ [0, 1] in the model."""
        points = next(points for filter_, points in self.rules if filter_ is None or filter_ in name)
        return interpolate(points, position)

    def points(self) -> list[float]:
        """Every point of every rule (what the schedule's values are interpolated between)."""
        return [p for _, points in self.rules for p in points]

    def to_plain(self) -> dict[str, list[dict[str, Any]]]:
        """``{"schedule": [{"filter": ..., "value": ...}, ...]}`` (mergekit's rule form, JSON/YAML-serialisable)."""
        return {"schedule": [{**({"filter": f} if f is not None else {}), "value": _plain_points(points)}
                             for f, points in self.rules]}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and self.rules == other.rules

    def __hash__(self) -> int:
        return hash(self.rules)

    def __repr__(self) -> str:
        return f"Schedule({_describe(self.rules)})"


def _points(label: str, value: Any) -> tuple[float, ...]:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ValueError(f"{label} is an empty list; give a number or a gradient of numbers.")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise TypeError(f"{label} must be a number or a list of numbers, got {value!r}.")
        if not math.isfinite(item):
            raise ValueError(f"{label} must be finite, got {value!r}.")
    return tuple(items)


def _rule(index: int, rule: Mapping[str, Any]) -> Rule:
    unknown = set(rule) - {"filter", "value"}
    if unknown or "value" not in rule:
        raise ValueError(f"schedule rule #{index} must have a 'value' and optionally a 'filter', got {dict(rule)!r}.")
    filter_ = rule.get("filter")
    if filter_ is not None and not isinstance(filter_, str):
        raise TypeError(f"schedule rule #{index}: filter must be a string, got {filter_!r}.")
    return (None if filter_ in (None, "*") else filter_), _points(f"schedule rule #{index} value", rule["value"])


def _plain_points(points: tuple[float, ...]) -> float | list[float]:
    return points[0] if len(points) == 1 else list(points)


def _describe(rules: Sequence[Rule]) -> str:
    return ", ".join(f"{f if f is not None else '*'}: {_plain_points(p)}" for f, p in rules)


def interpolate(points: Sequence[float], position: float) -> float:
    """mergekit's gradient: the points spread evenly over [0, 1], linear in between."""
    scaled = position * (len(points) - 1)
    low = int(scaled)
    high = min(len(points) - 1, low + 1)
    fraction = scaled - low
    return (1 - fraction) * points[low] + fraction * points[high]


def position(info: ParamInfo) -> float:
    """Where a tensor is in the model, x ∈ [0, 1]: block b of L at b / (L − 1) (1 for a single block); every tensor
    outside the blocks (embeddings, final norm, output head) at 0, as mergekit (0.1.5) places them."""
    if info.block is not None and info.num_blocks:
        return info.block / (info.num_blocks - 1) if info.num_blocks > 1 else 1.0
    return 0.0


def contains_schedule(value: Any) -> bool:
    """Whether ``value`` is a schedule or holds one in a list or mapping (nested configs are not looked into)."""
    if isinstance(value, Schedule):
        return True
    if isinstance(value, Mapping):
        return any(contains_schedule(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(contains_schedule(v) for v in value)
    return False


def resolve(value: Any, name: str, at: float) -> Any:
    """``value`` with every schedule in it replaced by its value for tensor ``name`` at position ``at``."""
    if isinstance(value, Schedule):
        return value.at(name, at)
    if isinstance(value, Mapping):
        return {k: resolve(v, name, at) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(resolve(v, name, at) for v in value)
    return value


def probes(values: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Plain versions of ``values`` to validate a config with schedules: for each point of each schedule, that point
    with every other schedule at its first point (every value a schedule can reach lies between its points)."""
    found: list[Schedule] = []
    _collect(values, found)
    for target in found:
        for point in target.points():
            yield {k: _substitute(v, target, point) for k, v in values.items()}


def _collect(value: Any, found: list[Schedule]) -> None:
    if isinstance(value, Schedule):
        found.append(value)
    elif isinstance(value, Mapping):
        for item in value.values():
            _collect(item, found)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _collect(item, found)


def _substitute(value: Any, target: Schedule, point: float) -> Any:
    if isinstance(value, Schedule):
        return point if value is target else value.points()[0]
    if isinstance(value, Mapping):
        return {k: _substitute(v, target, point) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_substitute(v, target, point) for v in value)
    return value
