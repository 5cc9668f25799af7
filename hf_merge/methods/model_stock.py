"""Model Stock (Jang, Yun & Han 2024, "Model Stock: All we need is just a few fine-tuned models", arXiv 2403.19522).

k ≥ 2 fine-tuned models θ_1 … θ_k of one pre-trained θ₀, task vectors τ_i = θ_i − θ₀. Per tensor (the paper's
layer-wise rule) or per output filter (``filter_wise=True``)::

    cos θ = mean over pairs i < j of ⟨τ_i, τ_j⟩ / (‖τ_i‖ ‖τ_j‖)
    t     = k · cos θ / (1 + (k − 1) · cos θ)
    θ_H   = t · mean_i θ_i + (1 − t) · θ₀        (the merged task vector is t · mean_i τ_i)

t is the ratio that moves the average of the fine-tuned models towards the pre-trained model so that the result is
the point of the plane (θ₀, mean θ_i) closest to the centre of the fine-tuned weights, under the paper's assumption of
equal norms and one angle θ between every pair. Orthogonal task vectors (cos θ = 0) give θ₀; identical ones
(cos θ = 1) give their average.

Where this follows the paper and where mergekit (``model_stock``) departs:

* The paper writes the ratio with one angle θ and its code measures it between two fine-tuned models. For k > 2 the
  mean of the pairwise cosines is used here — mergekit's choice too (the paper gives no rule for more models).
* ``filter_wise``: one ratio per output filter, the rows of the tensor viewed as ``(shape[0], -1)`` (0-D and 1-D
  tensors are one row). mergekit reduces over the last dimension only: the same rows for 2-D weights, but for 3-D
  and 4-D tensors (convolutions) it takes every innermost vector as a "row".
* A pair with a zero task vector has cosine 0 here (so a model equal to the base pulls t towards 0). mergekit clamps
  the norm product to ≥ 1e-6, which also changes the cosine of tiny non-zero task vectors.
* The ratio is the paper's formula for every cos θ: a negative mean cosine gives t < 0 (the formula extrapolates away
  from the average), as in mergekit. Only where 1 + (k − 1) cos θ ≤ 0 — the unit task vectors cancel exactly, since
  the mean pairwise cosine is never below −1/(k − 1) — is t set to 0 (θ₀); mergekit divides by zero there.
* mergekit asks for "at least 3 models" counting the base: the same k ≥ 2.

Cosines are computed in float32 from the engine's float32 task vectors and clamped to [−1, 1].
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

import torch

from ..config import MergeConfig, MethodCard
from ..params import ParamInfo
from ..registry import register_method
from .base import Merger
from .task_arithmetic import task_arithmetic

if TYPE_CHECKING:
    from ..context import MergeContext


@dataclasses.dataclass(kw_only=True)
class ModelStockConfig(MergeConfig):
    """``filter_wise``: one interpolation ratio per output filter (row) instead of one per tensor (the paper's
    layer-wise default). Model Stock has no coefficient to tune: t comes from the geometry of the task vectors."""

    method: str = dataclasses.field(default="model_stock", init=False)
    filter_wise: bool = False

    card: ClassVar[MethodCard] = MethodCard(
        title="Model Stock",
        summary=(
            "Model Stock merges a few fine-tuned models of one pre-trained model without any tuning. For every "
            "layer it measures the angle between the fine-tuned models' task vectors and derives from it how far the "
            "average of the fine-tuned weights should be pulled back towards the pre-trained weights: the more the "
            "task vectors agree, the closer the result stays to their average; orthogonal task vectors give the "
            "pre-trained weights. The interpolation ratio is t = k cos θ / (1 + (k − 1) cos θ) for k models."
        ),
        bibtex="""@inproceedings{jang2024modelstock,
  title     = {Model Stock: All We Need Is Just a Few Fine-Tuned Models},
  author    = {Jang, Dong-Hwan and Yun, Sangdoo and Han, Dongyoon},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2024}
}""",
        paper_url="https://arxiv.org/abs/2403.19522",
    )

    def __post_init__(self) -> None:
        if not isinstance(self.filter_wise, bool):
            raise TypeError(f"filter_wise must be a bool, got {self.filter_wise!r}.")


def _rows(tensor: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """The tensor as (filters, entries): ``(shape[0], -1)`` filter-wise (0-/1-D: one row), else one row."""
    if filter_wise and tensor.dim() >= 2:
        return tensor.reshape(tensor.shape[0], -1)
    return tensor.reshape(1, -1)


def mean_pairwise_cosine(deltas: list[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """cos θ = mean_{i<j} ⟨τ_i, τ_j⟩ / (‖τ_i‖ ‖τ_j‖), per tensor (shape (1, 1)) or per filter (shape (rows, 1)).

    The angle of Model Stock's ratio (Jang et al. 2024), averaged over the k(k − 1)/2 pairs; a pair with a zero task
    vector counts as cosine 0.
    """
    rows = [_rows(d, filter_wise) for d in deltas]
    norms = [r.norm(dim=1) for r in rows]
    total = torch.zeros(rows[0].shape[0], dtype=rows[0].dtype, device=rows[0].device)
    pairs = 0
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            product = norms[i] * norms[j]
            dot = (rows[i] * rows[j]).sum(dim=1)
            cos = torch.where(product > 0, dot / torch.where(product > 0, product, 1.0), 0.0)
            total += cos.clamp_(-1.0, 1.0)
            pairs += 1
    return (total / pairs).unsqueeze(1)


def model_stock_ratio(cos_theta: torch.Tensor, k: int) -> torch.Tensor:
    """t = k cos θ / (1 + (k − 1) cos θ) (Jang et al. 2024, the interpolation ratio of Model Stock); 0 where the
    denominator is not positive (exactly cancelling unit task vectors)."""
    denominator = 1.0 + (k - 1) * cos_theta
    safe = torch.where(denominator > 0, denominator, 1.0)
    return torch.where(denominator > 0, k * cos_theta / safe, 0.0)


def model_stock(deltas: list[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """The merged task vector t · mean_i τ_i, i.e. θ_H = t · mean_i θ_i + (1 − t) θ₀ (Jang et al. 2024)."""
    k = len(deltas)
    if k < 2:
        raise ValueError(f"Model Stock needs at least two fine-tuned models, got {k}.")
    if deltas[0].numel() == 0:
        return torch.zeros_like(deltas[0])
    t = model_stock_ratio(mean_pairwise_cosine(deltas, filter_wise), k)
    mean = task_arithmetic(deltas, 1.0 / k)
    return (_rows(mean, filter_wise) * t).reshape(mean.shape)


class ModelStockMerger(Merger):
    uses_param_info = False
    config: ModelStockConfig

    @property
    def gram_determined(self) -> bool:
        return not self.config.filter_wise  # one angle per tensor; per filter it is not

    def prepare(self, ctx: MergeContext) -> None:
        if len(ctx.task_names) < 2:
            raise ValueError(f"Model Stock needs at least two fine-tuned models, got {len(ctx.task_names)}.")

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        return model_stock(deltas, self.config.filter_wise)


register_method(ModelStockConfig, ModelStockMerger)
