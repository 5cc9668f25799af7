"""Weight averaging: θ = Σ_t w_t θ_t / Σ_t w_t (uniform by default), i.e. θ₀ + Σ_t (w_t / Σ w) τ_t."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from ..config import MergeConfig
from ..params import ParamInfo
from ..registry import register_method
from .base import Merger


@dataclasses.dataclass(kw_only=True)
class AverageConfig(MergeConfig):
    """``weights``: ``None`` (uniform), a sequence with one weight per model, or a ``{task_name: weight}`` mapping."""

    method: str = dataclasses.field(default="average", init=False)
    weights: Sequence[float] | Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        if self.weights is None:
            return
        values = list(self.weights.values()) if isinstance(self.weights, Mapping) else list(self.weights)
        if not values:
            raise ValueError("weights is empty; use None for a uniform average.")
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"weights must be non-negative numbers, got {value!r}.")
        if sum(values) <= 0:
            raise ValueError("weights must not all be zero.")


def weighted_average(deltas: list[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ_t w_t τ_t / Σ_t w_t."""
    total = torch.zeros_like(deltas[0])
    for delta, weight in zip(deltas, weights):
        total.add_(delta, alpha=weight)
    return total.div_(sum(weights))


class AverageMerger(Merger):
    uses_param_info = False
    config: AverageConfig

    def prepare(self, ctx) -> None:
        weights = self.config.weights
        names = ctx.task_names
        if weights is None:
            self.weights = [1.0] * len(names)
        elif isinstance(weights, Mapping):
            if set(weights) != set(names):
                raise ValueError(f"weights are given for tasks {sorted(weights)} but the models are {names}.")
            self.weights = [float(weights[n]) for n in names]
        else:
            if len(weights) != len(names):
                raise ValueError(f"{len(weights)} weights given for {len(names)} models.")
            self.weights = [float(w) for w in weights]

    def linear_coefficients(self) -> list[float]:
        total = sum(self.weights)
        return [w / total for w in self.weights]

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        return weighted_average(deltas, self.weights)


register_method(AverageConfig, AverageMerger)
