"""Model Breadcrumbs (Davari & Belilovsky 2023, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
Masks", arXiv 2312.06795).

Per tensor and per task, the n entries of τ_t are sorted by |τ_t| (stable: equal magnitudes by position). The mask
m_t drops the top ⌊γ n⌋ (the outliers) and the bottom n − ⌊density · n⌋ − ⌊γ n⌋ (the small changes) and keeps the
⌊density · n⌋ entries of the band in between. The merge is the paper's masked task arithmetic,
θ = θ₀ + α Σ_t m_t ⊙ τ_t (α = ``scaling``), or with ``sign_election`` (``breadcrumbs_ties``) TIES' sign election
and disjoint mean over the masked vectors (:func:`~hf_merge.methods.ties.elect_signs`,
:func:`~hf_merge.methods.ties.disjoint_merge`), times α.

Where this follows the paper and where mergekit (``breadcrumbs``/``breadcrumbs_ties``) departs:

* The paper states the band as a bottom and a top percentile of |τ| per layer; here, as in mergekit, it is given by
  the kept fraction ``density`` and the top fraction ``gamma`` (bottom fraction 1 − density − γ), with
  density + γ ≤ 1 required (mergekit silently drops fewer outliers instead).
* mergekit keeps ``indices[n_bot:-n_top]``: when ⌊γ n⌋ = 0 (small tensors such as biases at γ = 0.01, or γ = 0)
  that slice is empty and the whole task vector is dropped. Here the band is always the ⌊density · n⌋ entries below
  the top ⌊γ n⌋. mergekit also returns the task vector unmasked when density ≥ 1, even with γ > 0.
* ``breadcrumbs_ties`` is mergekit's combination (the paper has no sign election). Its default ``normalize: false``
  makes it the disjoint *sum*; the native path uses TIES' disjoint mean. Exact zeros of the elected sum take the
  tensor's majority sign (mergekit elects +1). mergekit also multiplies by per-model ``weight``s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

from ..config import (
    MethodCard,
    check_fraction,
    per_task_items,
    resolve_per_task,
)
from ..params import ParamInfo
from ..registry import register_method
from .base import Merger
from .della import MaskedMergeConfig, sign_elected_mean
from .task_arithmetic import task_arithmetic

if TYPE_CHECKING:
    from ..context import MergeContext

BREADCRUMBS_BIBTEX = """@article{davari2023breadcrumbs,
  title   = {Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks},
  author  = {Davari, MohammadReza and Belilovsky, Eugene},
  journal = {arXiv preprint arXiv:2312.06795},
  year    = {2023}
}"""


@dataclasses.dataclass(kw_only=True)
class BreadcrumbsConfig(MaskedMergeConfig):
    """``density`` is the kept fraction of each tensor (one value, or per task), ``gamma`` the fraction of
    largest-magnitude entries dropped as outliers (density + gamma ≤ 1); ``scaling`` α and ``sign_election``
    (default off: the paper's sum) as in :class:`~hf_merge.methods.della.MaskedMergeConfig`."""

    method: str = dataclasses.field(default="breadcrumbs", init=False)
    density: float | Sequence[float] | Mapping[str, float]
    gamma: float = 0.01
    sign_election: bool = False

    card: ClassVar[MethodCard] = MethodCard(
        title="Model Breadcrumbs",
        summary=(
            "Model Breadcrumbs sparsifies every task vector layer by layer with a magnitude band: it discards the "
            "small changes, which are mostly noise, and also the few largest ones, outliers that interfere with the "
            "other tasks, and keeps only the entries in between. The masked task vectors are summed, scaled by a "
            "single coefficient and added to the pre-trained model, as in Task Arithmetic; the paper finds that one "
            "setting of the band and the coefficient keeps working as more tasks are added."
        ),
        bibtex=BREADCRUMBS_BIBTEX,
        paper_url="https://arxiv.org/abs/2312.06795",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("gamma", self.gamma, high_open=True)
        for label, density in per_task_items("density", self.density):
            check_fraction(label, density, low_open=True)
            if density + self.gamma > 1 + 1e-12:  # (a tolerance for sums such as 0.7 + 0.3 in binary floats)
                raise ValueError(f"gamma + density must be at most 1 (gamma drops the top, density keeps the band "
                                 f"below it), got gamma={self.gamma!r}, {label}={density!r}.")


@dataclasses.dataclass(kw_only=True)
class BreadcrumbsTiesConfig(BreadcrumbsConfig):
    """Breadcrumbs masks, then TIES' sign election and disjoint mean (mergekit's ``breadcrumbs_ties``)."""

    method: str = dataclasses.field(default="breadcrumbs_ties", init=False)
    sign_election: bool = True

    card: ClassVar[MethodCard] = MethodCard(
        title="Model Breadcrumbs with TIES sign election",
        summary=(
            "Breadcrumbs masks combined with TIES: every task vector keeps only a band of its entries by magnitude, "
            "dropping both the smallest changes and the largest outliers, then a sign is elected for every parameter "
            "from the summed masked vectors and only the entries agreeing with it are averaged. The result is scaled "
            "and added to the pre-trained model."
        ),
        bibtex=BREADCRUMBS_BIBTEX,
        paper_url="https://arxiv.org/abs/2312.06795",
    )


def breadcrumbs_counts(numel: int, density: float, gamma: float) -> tuple[int, int, int]:
    """(dropped at the bottom, kept, dropped at the top): n − ⌊density n⌋ − ⌊γ n⌋, ⌊density n⌋, ⌊γ n⌋."""
    top = int(gamma * numel)
    kept = int(density * numel)
    return numel - kept - top, kept, top


def breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """m = 1 on the ranks [n_bottom, n − n_top) of the ascending |τ| order of the whole tensor (Davari & Belilovsky
    2023: drop the bottom and the top percentiles of each layer's magnitudes); a bool tensor shaped like ``delta``."""
    flat = delta.reshape(-1)
    bottom, kept, _ = breadcrumbs_counts(flat.numel(), density, gamma)
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    if kept:
        order = torch.argsort(flat.abs(), stable=True)
        mask[order[bottom:bottom + kept]] = True
    return mask.view_as(delta)


def breadcrumbs(deltas: list[torch.Tensor], density: float | Sequence[float], gamma: float, scaling: float,
                sign_election: bool = False) -> torch.Tensor:
    """α Σ_t m_t ⊙ τ_t (the paper's masked task arithmetic), or α · TIES elect + disjoint mean of the m_t ⊙ τ_t;
    ``density`` one value or one per task."""
    densities = density if isinstance(density, Sequence) else [density] * len(deltas)
    masked = [d * breadcrumbs_mask(d, kept, gamma) for d, kept in zip(deltas, densities)]
    if sign_election:
        return sign_elected_mean(masked).mul_(scaling)
    return task_arithmetic(masked, scaling)


class BreadcrumbsMerger(Merger):
    uses_param_info = False
    config: BreadcrumbsConfig

    def prepare(self, ctx: MergeContext) -> None:
        self.densities = resolve_per_task("density", self.config.density, ctx.task_names)

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        cfg = self.config
        return breadcrumbs(deltas, self.densities, cfg.gamma, cfg.scaling, cfg.sign_election)


class BreadcrumbsTiesMerger(BreadcrumbsMerger):
    config: BreadcrumbsTiesConfig


register_method(BreadcrumbsConfig, BreadcrumbsMerger)
register_method(BreadcrumbsTiesConfig, BreadcrumbsTiesMerger)
