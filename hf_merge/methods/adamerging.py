"""AdaMerging (Yang et al., ICLR 2024): Task Arithmetic's coefficients learned by entropy minimisation on unlabeled
data of every task.

    task-wise:  θ(λ) = θ₀ + Σ_k λ_k τ_k                 (eq. 5)
    layer-wise: θ^ℓ(λ) = θ₀^ℓ + Σ_k λ_k^ℓ τ_k^ℓ          (eq. 6; ℓ a residual block, or the parameters outside them)
    min_λ Σ_k E_{x ∈ D_k} H(f(x; θ(λ)))                  (eq. 4, H the Shannon entropy of the predictions)

λ starts at ``init`` and takes ``steps`` Adam steps (learning rate ``lr``), each on one batch of every task
(unlabeled; cycled through the task's first ``num_examples`` examples). Gradients reach λ through the merged
parameters by ``torch.func.functional_call`` on one copy of the architecture: the T task vectors are held once, never
T models per step. The learned merge is linear in the task vectors, so the engine writes it in one fused pass.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

from ..config import MergeConfig, MethodCard, check_choice, check_number, check_positive, check_positive_int
from ..data import model_inputs
from ..errors import MergeError
from ..params import ParamInfo
from ..registry import register_method
from .base import Merger

if TYPE_CHECKING:
    from ..context import MergeContext

ADAMERGING_BIBTEX = """@inproceedings{yang2024adamerging,
  title     = {{AdaMerging}: Adaptive Model Merging for Multi-Task Learning},
  author    = {Yang, Enneng and Wang, Zhenyi and Shen, Li and Liu, Shiwei and Guo, Guibing and Wang, Xingwei and
               Tao, Dacheng},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2024}
}"""
GRANULARITIES = ("task", "layer")


@dataclasses.dataclass(kw_only=True)
class AdaMergingConfig(MergeConfig):
    """``granularity``: one λ per task, or per task and residual block (``"layer"``); ``init`` is every λ's start,
    ``lr`` Adam's learning rate, ``steps`` the optimizer steps, each on one batch of ``batch_size`` examples of every
    task (its first ``num_examples``, no labels read)."""

    method: str = dataclasses.field(default="adamerging", init=False)
    granularity: str = "task"
    init: float = 0.3
    lr: float = 1e-3
    steps: int = 500
    batch_size: int = 16
    num_examples: int = 256
    seed: int = 0

    card: ClassVar[MethodCard] = MethodCard(
        title="AdaMerging",
        summary=(
            "Task Arithmetic whose coefficients are learned instead of searched: one coefficient per task (or per "
            "task and layer) is optimised with Adam to minimise the entropy of the merged model's predictions on "
            "unlabeled examples of every task, a surrogate for the multi-task loss that needs no labels."
        ),
        bibtex=ADAMERGING_BIBTEX,
        paper_url="https://arxiv.org/abs/2310.02575",
    )

    def __post_init__(self) -> None:
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_number("init", self.init)
        check_positive("lr", self.lr)
        check_positive_int("steps", self.steps, minimum=0)
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("num_examples", self.num_examples)
        check_positive_int("seed", self.seed, minimum=0)


def group_of(info: ParamInfo, granularity: str) -> tuple[str | None, int | None]:
    """The coefficient group of a tensor: one for every tensor task-wise; its (stack, block) layer-wise, the tensors
    outside the blocks forming one more group."""
    return (None, None) if granularity == "task" else (info.stack, info.block)


class AdaMergingMerger(Merger):
    uses_data = True
    config: AdaMergingConfig

    def prepare(self, ctx: MergeContext) -> None:
        config = self.config
        models = ctx.task_models(config.method)
        keys = [k for k in ctx.merge_keys if models.base.has(k)]
        groups = sorted({group_of(ctx.infos[k], config.granularity) for k in ctx.merge_keys}, key=repr)
        self.group_index = {group: index for index, group in enumerate(groups)}
        model = models.build(lambda key: models.base.get(key).float())
        names = {models.key_of(name): name for name, p in model.named_parameters()}
        trained = [key for key in keys if key in names]
        base = {key: models.base.get(key).float().to(ctx.device) for key in trained}
        deltas = [{key: tensor.to(ctx.device) - base[key] for key, tensor in models.weights(task, trained).items()}
                  for task in ctx.task_names]
        rows = torch.tensor([self.group_index[group_of(ctx.infos[k], config.granularity)] for k in trained])
        coefficients = torch.full((len(ctx.task_names), len(groups)), float(config.init), device=ctx.device,
                                  requires_grad=True)
        optimizer = torch.optim.Adam([coefficients], lr=config.lr)
        streams = {task: _cycle(lambda task=task: models.batches(task, config.batch_size, config.num_examples))
                   for task in ctx.task_names}
        self.entropies: list[float] = []
        for _ in ctx.tracker.track(range(config.steps), f"{config.method} (steps)"):
            merged = {names[key]: base[key] + sum(coefficients[t, rows[i]] * deltas[t][key]
                                                  for t in range(len(deltas)))
                      for i, key in enumerate(trained)}
            loss = torch.zeros((), device=ctx.device)
            for task in ctx.task_names:
                batch = next(streams[task])
                outputs = torch.func.functional_call(model, merged, (), model_inputs(batch))
                loss = loss + models.entropy(task, outputs, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            self.entropies.append(loss.item())
            if not torch.isfinite(coefficients).all():
                raise MergeError(f"adamerging: the coefficients became non-finite after {len(self.entropies)} steps "
                                 f"(lr={config.lr}); lower lr.")
        self.coefficients = coefficients.detach().cpu()
        self.by_key = {key: self.coefficients[:, self.group_index[group_of(ctx.infos[key], config.granularity)]].tolist()
                       for key in ctx.merge_keys}

    def coefficients_of(self, task_names: Sequence[str]) -> Callable[[str], list[float]] | None:
        """The learned λ of each tensor's group (after ``prepare``): the merge is linear in the task vectors."""
        by_key = getattr(self, "by_key", None)
        return None if by_key is None else by_key.__getitem__

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        return sum(c * d for c, d in zip(self.by_key[key], deltas))

    def statistics(self) -> dict[str, float] | None:
        if not self.entropies:
            return None
        return {"entropy_first": self.entropies[0], "entropy_last": self.entropies[-1],
                "coefficient_min": float(self.coefficients.min()), "coefficient_max": float(self.coefficients.max())}


def _cycle(make: Callable[[], object]) -> object:
    return itertools.chain.from_iterable(make() for _ in itertools.count())


register_method(AdaMergingConfig, AdaMergingMerger)
