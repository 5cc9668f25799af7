"""Model Breadcrumbs (Davari & Belilovsky 2023, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
Masks", arXiv 2312.06795).

Per tensor and per task, the n entries of τ_t are sorted by |τ_t| (stable: equal magnitudes by position). The mask
m_t drops the top ⌊γ_t n⌋ (the outliers) and the bottom n − ⌊density_t · n⌋ − ⌊γ_t n⌋ (the small changes) and keeps
the ⌊density_t · n⌋ entries of the band in between. The merge is the paper's masked task arithmetic,
θ = θ₀ + α Σ_t w_t m_t ⊙ τ_t (α = ``scaling``, w_t = ``weights``, default 1), or with ``sign_election``
(``breadcrumbs_ties``) TIES' sign election and disjoint mean over the masked vectors
(:func:`~hf_merge.methods.della.masked_merge`), times α.

Where this follows the paper and where mergekit (``breadcrumbs``/``breadcrumbs_ties``) departs:

* The paper states the band as a bottom and a top percentile of |τ| per layer; here, as in mergekit, it is given by
  the kept fraction ``density`` and the top fraction ``gamma`` (bottom fraction 1 − density − γ), with
  density + γ ≤ 1 required (mergekit silently drops fewer outliers instead).
* mergekit keeps ``indices[n_bot:-n_top]``: when ⌊γ n⌋ = 0 (small tensors such as biases at γ = 0.01, or γ = 0)
  that slice is empty and the whole task vector is dropped. Here the band is always the ⌊density · n⌋ entries below
  the top ⌊γ n⌋. mergekit also returns the task vector unmasked when density ≥ 1, even with γ > 0 (here: density 1
  with γ_t = 0 for that task). Its sort is not stable: equal magnitudes at the band's edges may go either way.
* mergekit's options: ``rescale: true`` is ``rescale_norm="l1"`` (each m_t ⊙ τ_t scaled to ‖τ_t‖₁), ``normalize`` is
  ``aggregate`` (its default false: the sum for both methods; the native ``breadcrumbs_ties`` uses TIES' disjoint
  mean), and exact zeros of Σ_t w_t m_t τ_t elect +1 (``zero_sign="positive"``; native: the tensor's majority sign).

From plain checkpoints on the CPU (bfloat16 or float32) :meth:`BreadcrumbsMerger.merge_stored` gives the same bits
as the float32 reference below without float32 copies: two rank selections per task over |τ_t| computed on the fly
(one read of the inputs where a sampled bracket holds them, the position where the band starts or ends among equal
magnitudes from that read's per-segment counts), then one fused pass that masks, rescales, weighs and merges
(:class:`~hf_merge.kernels.StoredTies`). mergekit's L1 rescale adds one read; its factors are float64 sums in another
order than torch's, equal to ~1e-15 relative, so the float32 factor (and every result) is the same unless it lies that
close to a float32 rounding boundary (then one ulp of the factor apart).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from ..config import (
    MethodCard,
    PerTask,
    check_fraction,
    per_task_items,
    resolve_per_task,
)
from ..kernels import StoredTies, fused_rank_band
from ..params import ParamInfo
from ..registry import register_method
from ..tensors import stable_rank_band
from .base import Merger
from .della import MaskedMergeConfig, masked_merge, masked_sum_divisor, paired
from .ties import l1_factor, resolve_weights

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
    """``density`` is the kept fraction of each tensor, ``gamma`` the fraction of largest-magnitude entries dropped
    as outliers (each one value, or per task; density + gamma ≤ 1); ``sign_election`` (default off: the paper's sum)
    and the rest as in :class:`~hf_merge.methods.della.MaskedMergeConfig`."""

    method: str = dataclasses.field(default="breadcrumbs", init=False)
    density: float | Sequence[float] | Mapping[str, float]
    gamma: float | Sequence[float] | Mapping[str, float] = 0.01
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
        for label, gamma in per_task_items("gamma", self.gamma):
            check_fraction(label, gamma, high_open=True)
        for label, density in per_task_items("density", self.density):
            check_fraction(label, density, low_open=True)
        self.check_bands(self.density, self.gamma)

    @staticmethod
    def check_bands(density: PerTask, gamma: PerTask) -> None:
        """Raise unless density + γ ≤ 1 for every task."""
        for (d_label, d), (g_label, g) in paired("density", density, "gamma", gamma):
            if d + g > 1 + 1e-12:  # (a tolerance for sums such as 0.7 + 0.3 in binary floats)
                raise ValueError(f"gamma + density must be at most 1 (gamma drops the top, density keeps the band "
                                 f"below it), got {g_label}={g!r}, {d_label}={d!r}.")


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
    bottom, kept, _ = breadcrumbs_counts(delta.numel(), density, gamma)
    return stable_rank_band(delta.abs(), bottom, bottom + kept)


def breadcrumbs_sparsify(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """m ⊙ τ with :func:`breadcrumbs_mask`'s m: one compiled band selection where available."""
    bottom, kept, _ = breadcrumbs_counts(delta.numel(), density, gamma)
    fused = fused_rank_band(delta, bottom, bottom + kept, absolute=True) if kept else None
    return fused if fused is not None else delta * breadcrumbs_mask(delta, density, gamma)


class BreadcrumbsMerger(Merger):
    uses_param_info = False
    config: BreadcrumbsConfig

    def prepare(self, ctx: MergeContext) -> None:
        cfg, names = self.config, ctx.task_names
        self.densities = resolve_per_task("density", cfg.density, names)
        self.gammas = resolve_per_task("gamma", cfg.gamma, names)
        cfg.check_bands(dict(zip(names, self.densities)), dict(zip(names, self.gammas)))
        self.weights = resolve_weights(cfg.weights, names)

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        masked = [breadcrumbs_sparsify(d, density, gamma)
                  for d, density, gamma in zip(deltas, self.densities, self.gammas)]
        if self.config.rescale_norm == "l1":
            masked = [m.mul_(l1_factor(d, m)) for d, m in zip(deltas, masked)]
        return masked_merge(masked, self.weights, self.config)

    def merge_stored(self, key: str, arrays: Sequence[np.ndarray], out: np.ndarray, info: ParamInfo) -> bool:
        """:meth:`merge_tensor` straight from the stored inputs (the same bits): each band is found by selections
        over |τ_t| computed on the fly (:meth:`~hf_merge.kernels.StoredTies.rank_bands`), then one compiled pass
        trims, rescales, weighs and merges (elect and disjoint merge, or the sum) into ``out``."""
        if not StoredTies.takes(arrays, out) or arrays[0].shape[0] == 0:
            return False
        cfg, stored = self.config, StoredTies(arrays)
        bands = []
        for density, gamma in zip(self.densities, self.gammas):
            bottom, kept, _ = breadcrumbs_counts(stored.numel, density, gamma)
            bands.append((bottom, bottom + kept))
        trim = stored.rank_bands(bands)
        if cfg.rescale_norm == "l1":
            stored.rescale_trim_to_l1(trim)
        scales = self.weights or [1.0] * len(bands)
        mean = cfg.merge_aggregate == "mean"
        if cfg.sign_election:
            majority = 1.0 if cfg.zero_sign == "positive" else None
            counts = stored.merge(trim, scales, self.weights, majority, mean, cfg.scaling, out)
        else:
            counts = stored.masked_sum(trim, scales, masked_sum_divisor(len(bands), self.weights, mean), cfg.scaling,
                                       out)
        return counts is not None


class BreadcrumbsTiesMerger(BreadcrumbsMerger):
    config: BreadcrumbsTiesConfig


register_method(BreadcrumbsConfig, BreadcrumbsMerger)
register_method(BreadcrumbsTiesConfig, BreadcrumbsTiesMerger)
