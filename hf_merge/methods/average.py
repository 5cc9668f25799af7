"""Weight averaging: θ = Σ_t w_t θ_t / Σ_t w_t (uniform by default), i.e. θ₀ + Σ_t (w_t / Σ w) τ_t."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

from ..config import MergeConfig, MethodCard
from ..lowrank import LowRank, stack_factors
from ..params import ParamInfo
from ..registry import register_method
from .base import Merger

if TYPE_CHECKING:
    from ..context import MergeContext


@dataclasses.dataclass(kw_only=True)
class AverageConfig(MergeConfig):
    """``weights``: ``None`` (uniform), a sequence with one weight per model, or a ``{task_name: weight}`` mapping."""

    method: str = dataclasses.field(default="average", init=False)
    weights: Sequence[float] | Mapping[str, float] | None = None

    card: ClassVar[MethodCard] = MethodCard(
        title="Weight averaging (model soup)",
        summary=(
            "Every parameter of the merged model is the (optionally weighted) mean of the corresponding parameters "
            "of the fine-tuned models. Models fine-tuned from the same pre-trained checkpoint tend to stay in one "
            "low-loss basin, so their average often keeps most of each model's accuracy while costing a single "
            "model at inference time. With a base model this equals Task Arithmetic with scaling 1/T."
        ),
        bibtex="""@inproceedings{wortsman2022soups,
  title     = {Model Soups: Averaging Weights of Multiple Fine-tuned Models Improves Accuracy without Increasing
               Inference Time},
  author    = {Wortsman, Mitchell and Ilharco, Gabriel and Gadre, Samir Yitzhak and Roelofs, Rebecca and
               Gontijo-Lopes, Raphael and Morcos, Ari S. and Namkoong, Hongseok and Farhadi, Ali and Carmon, Yair and
               Kornblith, Simon and Schmidt, Ludwig},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2022}
}""",
        paper_url="https://arxiv.org/abs/2203.05482",
    )

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


def task_weights(config: AverageConfig, task_names: Sequence[str]) -> list[float]:
    """w_t for the tasks ``task_names`` in order (1 each when uniform), checked against the configured weights."""
    weights = config.weights
    if weights is None:
        return [1.0] * len(task_names)
    if isinstance(weights, Mapping):
        if set(weights) != set(task_names):
            raise ValueError(f"weights are given for tasks {sorted(weights)} but the models are {list(task_names)}.")
        return [float(weights[n]) for n in task_names]
    if len(weights) != len(task_names):
        raise ValueError(f"{len(weights)} weights given for {len(task_names)} models.")
    return [float(w) for w in weights]


def weighted_average(deltas: list[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ_t w_t τ_t / Σ_t w_t."""
    total = torch.zeros_like(deltas[0])
    for delta, weight in zip(deltas, weights):
        total.add_(delta, alpha=weight)
    return total.div_(sum(weights))


def normalized(weights: Sequence[float]) -> list[float]:
    """w_t / Σ w: the coefficients of the average as Σ_t c_t τ_t."""
    total = sum(weights)
    return [w / total for w in weights]


class AverageMerger(Merger):
    uses_param_info = False
    config: AverageConfig

    @property
    def reduces_across_ranks(self) -> bool:
        """No statistics pass: nothing to reduce (a wrapper such as LiNeS may split its own)."""
        return True

    def prepare(self, ctx: MergeContext) -> None:
        self.weights = task_weights(self.config, ctx.task_names)

    def linear_coefficients(self, task_names: Sequence[str]) -> list[float]:
        return normalized(task_weights(self.config, task_names))

    def merge_lowrank(self, key: str, parts: list[LowRank], info: ParamInfo) -> LowRank:
        """Σ_t (w_t / Σ w) P_t Q_t, stacked exactly."""
        return stack_factors(parts, normalized(self.weights))

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        return weighted_average(deltas, self.weights)


register_method(AverageConfig, AverageMerger)
