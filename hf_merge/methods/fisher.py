"""Fisher merging (Matena & Raffel, NeurIPS 2022): a per-parameter average weighted by each model's diagonal Fisher.

    θ* = Σ_i F̂_i ⊙ θ_i / Σ_i F̂_i   (eq. 4),   F_i = E_x[(∇_θ log p_θ_i(y | x))²]   (eq. 3, diagonal, empirical)

with y the task's label (or the model's own prediction where the data has none), the expectation over the first
``num_examples`` examples of task i, one gradient per example. ``normalize`` scales each F_i by its global L2 norm
(so that no model dominates through the scale of its gradients), and F̂_i = max(F_i, ``floor``) keeps every
denominator positive (a parameter no task's loss reaches is averaged). In task vectors: τ* = Σ_i F̂_i τ_i / Σ_i F̂_i.
Tensors that are not parameters of the model (buffers) are averaged.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

import torch

from ..config import MergeConfig, MethodCard, check_positive, check_positive_int
from ..errors import MergeError
from ..params import ParamInfo
from ..registry import register_method
from .base import Merger

if TYPE_CHECKING:
    from ..context import MergeContext

FISHER_BIBTEX = """@inproceedings{matena2022merging,
  title     = {Merging Models with Fisher-Weighted Averaging},
  author    = {Matena, Michael and Raffel, Colin},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2022}
}"""


@dataclasses.dataclass(kw_only=True)
class FisherConfig(MergeConfig):
    """``num_examples`` per task (one gradient each); ``normalize`` each Fisher by its L2 norm; ``floor`` is the
    smallest Fisher value (F̂ = max(F, floor))."""

    method: str = dataclasses.field(default="fisher", init=False)
    num_examples: int = 256
    normalize: bool = True
    floor: float = 1e-6

    card: ClassVar[MethodCard] = MethodCard(
        title="Fisher merging",
        summary=(
            "Every parameter of the merged model is the average of the fine-tuned models' values weighted by each "
            "model's diagonal Fisher information for it, estimated from squared per-example gradients of the "
            "log-likelihood on a few hundred examples of the model's own task. Parameters a task depends on keep "
            "that task's value; parameters no task is sensitive to are averaged."
        ),
        bibtex=FISHER_BIBTEX,
        paper_url="https://arxiv.org/abs/2111.09832",
    )

    def __post_init__(self) -> None:
        check_positive_int("num_examples", self.num_examples)
        if not isinstance(self.normalize, bool):
            raise TypeError(f"normalize must be a bool, got {self.normalize!r}.")
        check_positive("floor", self.floor, "it keeps every denominator positive")


def fisher_merge(deltas: list[torch.Tensor], fishers: list[torch.Tensor], floor: float) -> torch.Tensor:
    """τ* = Σ_i F̂_i τ_i / Σ_i F̂_i with F̂_i = max(F_i, floor)."""
    floored = [fisher.clamp_min(floor) for fisher in fishers]
    return sum(f * d for f, d in zip(floored, deltas)) / sum(floored)


class FisherMerger(Merger):
    uses_data = True
    uses_param_info = False
    config: FisherConfig

    def prepare(self, ctx: MergeContext) -> None:
        """Each task's diagonal Fisher, folded into Σ_i F̂_i τ_i and Σ_i F̂_i as soon as it is known (three
        model-sized float32 tensors at a time, whatever the number of tasks)."""
        config = self.config
        models = ctx.task_models(config.method)
        keys = set(ctx.merge_keys)
        self.numerator: dict[str, torch.Tensor] = {}
        self.denominator: dict[str, torch.Tensor] = {}
        self.norms: dict[str, float] = {}
        for task in ctx.tracker.track(ctx.task_names, f"{config.method} (tasks)"):
            weights = models.weights(task)
            model = models.build(weights.__getitem__)
            params = {models.key_of(name): p for name, p in model.named_parameters() if p.is_floating_point()}
            params = {key: p.requires_grad_(True) for key, p in params.items() if key in keys}
            fisher = {key: torch.zeros_like(p) for key, p in params.items()}
            count = 0
            for batch in models.batches(task, 1, config.num_examples, labels=True):
                gradients = torch.autograd.grad(models.log_likelihood(task, model, batch), list(params.values()),
                                                allow_unused=True)
                for key, gradient in zip(params, gradients):
                    if gradient is not None:
                        fisher[key].addcmul_(gradient, gradient)
                count += 1
            norm = float(torch.sqrt(sum(f.double().square().sum() for f in fisher.values()))) / count
            if not torch.isfinite(torch.tensor(norm)):
                raise MergeError(f"fisher: the gradients of task {task!r} are not finite.")
            self.norms[task] = norm
            scale = (1.0 / (norm * count) if norm > 0 else 1.0) if config.normalize else 1.0 / count
            for key, value in fisher.items():
                floored = value.mul_(scale).clamp_min_(config.floor)
                delta = weights[key].to(floored.device) - models.base.get(key).float().to(floored.device)
                if key in self.numerator:
                    self.numerator[key].addcmul_(floored, delta)
                    self.denominator[key].add_(floored)
                else:
                    self.numerator[key], self.denominator[key] = floored * delta, floored.clone()
            del model, params, fisher

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        if key in self.numerator:
            return (self.numerator[key] / self.denominator[key]).to(base.device)
        return torch.stack(deltas).mean(dim=0)

    def statistics(self) -> dict[str, float] | None:
        return {f"fisher_norm[{task}]": norm for task, norm in self.norms.items()}


register_method(FisherConfig, FisherMerger)
