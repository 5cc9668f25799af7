"""Task Arithmetic (Ilharco et al. 2023): θ = θ₀ + λ Σ_t τ_t."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

from ..config import MergeConfig, MethodCard, SearchSpace, check_number, per_task_items, resolve_per_task
from ..lowrank import LowRank, stack_factors
from ..params import ParamInfo
from ..registry import register_method
from .base import Merger
from .grids import linspace_tail

if TYPE_CHECKING:
    from ..context import MergeContext

#: λ's validation grid in the TSV and TALL-masks code: ``linspace(0, 1, 31)[1:]``.
TASK_ARITHMETIC_GRID = linspace_tail(1.0, 31)

TASK_ARITHMETIC_BIBTEX = """@inproceedings{ilharco2023editing,
  title     = {Editing Models with Task Arithmetic},
  author    = {Ilharco, Gabriel and Ribeiro, Marco Tulio and Wortsman, Mitchell and Gururangan, Suchin and
               Schmidt, Ludwig and Hajishirzi, Hannaneh and Farhadi, Ali},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2023}
}"""


@dataclasses.dataclass(kw_only=True)
class TaskArithmeticConfig(MergeConfig):
    """``scaling`` is λ. It has no universal default: the papers pick it on validation data from
    ``linspace(0, 1, 31)[1:]`` (a typical value for 8 ViT tasks is about 0.3). ``weights`` (optional) weigh the
    task vectors, per task: a sequence in input order or a ``{task_name: weight}`` mapping (mergekit's per-model
    ``weight``): θ = θ₀ + λ Σ_t w_t τ_t."""

    method: str = dataclasses.field(default="task_arithmetic", init=False)
    scaling: float
    weights: Sequence[float] | Mapping[str, float] | None = None

    card: ClassVar[MethodCard] = MethodCard(
        title="Task Arithmetic",
        summary=(
            "Each fine-tuned model is turned into a task vector, its weights minus the pre-trained weights. The task "
            "vectors are summed, scaled by a single coefficient λ, and added back to the pre-trained model, "
            "θ = θ₀ + λ Σ_t τ_t. Adding task vectors transfers several abilities into one model; λ controls how far "
            "the merge moves from the base and is usually chosen on validation data."
        ),
        bibtex=TASK_ARITHMETIC_BIBTEX,
        paper_url="https://arxiv.org/abs/2212.04089",
    )

    def __post_init__(self) -> None:
        check_number("scaling", self.scaling)
        if self.weights is not None:
            for label, weight in per_task_items("weights", self.weights):
                check_number(label, weight)

    def search_space(self) -> SearchSpace:
        """λ over ``linspace(0, 1, 31)[1:]``; θ₀ + λ Σ_t w_t τ_t is linear in λ."""
        return SearchSpace("scaling", TASK_ARITHMETIC_GRID, "linear")


def task_arithmetic(deltas: list[torch.Tensor], scaling: float) -> torch.Tensor:
    """λ Σ_t τ_t, accumulated in the deltas' dtype (float32 in the engine)."""
    total = torch.zeros_like(deltas[0])
    for delta in deltas:
        total.add_(delta)
    return total.mul_(scaling)


class TaskArithmeticMerger(Merger):
    uses_param_info = False
    config: TaskArithmeticConfig

    @property
    def reduces_across_ranks(self) -> bool:
        """No statistics pass: nothing to reduce (a wrapper such as LiNeS may split its own)."""
        return True

    def prepare(self, ctx: MergeContext) -> None:
        self.weights = self._weights(ctx.task_names)

    def _weights(self, task_names: Sequence[str]) -> list[float] | None:
        if self.config.weights is None:
            return None
        return [float(w) for w in resolve_per_task("weights", self.config.weights, task_names)]

    def linear_coefficients(self, task_names: Sequence[str]) -> list[float]:
        weights = self._weights(task_names) or [1.0] * len(task_names)
        return [float(self.config.scaling) * weight for weight in weights]

    def merge_lowrank(self, key: str, parts: list[LowRank], info: ParamInfo) -> LowRank:
        """λ Σ_t w_t P_t Q_t, stacked exactly: [λw_1 P_1 … λw_T P_T] [Q_1; …; Q_T]."""
        weights = self.weights if self.weights is not None else [1.0] * len(parts)
        return stack_factors(parts, [self.config.scaling * weight for weight in weights])

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        if self.weights is None:
            return task_arithmetic(deltas, self.config.scaling)
        return task_arithmetic([delta * weight for delta, weight in zip(deltas, self.weights)], self.config.scaling)


register_method(TaskArithmeticConfig, TaskArithmeticMerger)
