"""Task Arithmetic (Ilharco et al. 2023): θ = θ₀ + λ Σ_t τ_t."""

from __future__ import annotations

import dataclasses

import torch

from ..config import MergeConfig, check_number
from ..params import ParamInfo
from ..registry import register_method
from .base import Merger


@dataclasses.dataclass(kw_only=True)
class TaskArithmeticConfig(MergeConfig):
    """``scaling`` is λ. It has no universal default: the papers pick it on validation data from
    ``linspace(0, 1, 31)[1:]`` (a typical value for 8 ViT tasks is about 0.3)."""

    method: str = dataclasses.field(default="task_arithmetic", init=False)
    scaling: float

    def __post_init__(self) -> None:
        check_number("scaling", self.scaling)


def task_arithmetic(deltas: list[torch.Tensor], scaling: float) -> torch.Tensor:
    """λ Σ_t τ_t, accumulated in the deltas' dtype (float32 in the engine)."""
    total = torch.zeros_like(deltas[0])
    for delta in deltas:
        total.add_(delta)
    return total.mul_(scaling)


class TaskArithmeticMerger(Merger):
    uses_param_info = False
    config: TaskArithmeticConfig

    def prepare(self, ctx) -> None:
        self.num_tasks = len(ctx.task_names)

    def linear_coefficients(self) -> list[float]:
        return [float(self.config.scaling)] * self.num_tasks

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        return task_arithmetic(deltas, self.config.scaling)


register_method(TaskArithmeticConfig, TaskArithmeticMerger)
