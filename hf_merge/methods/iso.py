"""Iso-C and Iso-CTS (Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging", arXiv 2502.04959).

Per 2-D parameter (official rule ``ndim == 2``; names containing an ``exclude`` entry are averaged), with the
task-arithmetic sum M = Σ_t Δ_t = U S Vᵀ (thin SVD, r = min(m, n)):

* Iso-C (Eq. 4): Δ = α · mean(S) · U Vᵀ = α (‖M‖_* / r) polar(M) — the spectrum of M flattened to its mean.
* Iso-CTS (Eqs. 6–9): the common subspace is the top-c triplets of M; every task adds the top-p triplets of its
  residual (I − U_c U_cᵀ) Δ_t (only the left space is projected out); with U_cat = [U_1,p … U_T,p, U_c],
  V_cat likewise and s_cat the concatenated singular values, Δ = α · mean(s_cat) · polar(U_cat) polar(V_cat)ᵀ.
  Sizes: c = ⌊f r⌋, then c ← r − round((r − c)/T)·T with Python's half-to-even ``round``, and p = (r − c)/T
  (r = 768, T = 8, f = 0.8 gives c = 616, p = 19; p = 0 reduces Iso-CTS to Iso-C).

Other floating-point parameters get the mean of τ_t, scaled by α. Factorisations go through
:mod:`hf_merge.linalg` (exact Gram-eigh routes).

Rank-deficient M (e.g. LoRA deltas, untouched embedding rows) makes Iso-C assign mean(S) to arbitrary null-space
directions, as in the reference; the result then depends on the SVD driver. The low-rank forms
(:func:`lowrank_iso_c`, :func:`lowrank_iso_cts`, for LoRA task matrices Δ_t = P_t Q_t) leave the null space out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch

from ..config import MethodCard, check_fraction
from ..linalg import polar, polar_with_singular_values, top_k_svd
from ..lowrank import LowRank, lowrank_svd, stack_factors
from ..params import ParamInfo
from ..registry import register_method
from .base import Merger
from .tsv import SubspaceMergeConfig, is_svd_treated, lowrank_mean, mean_delta

ISO_BIBTEX = """@inproceedings{marczak2025notask,
  title     = {No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces},
  author    = {Marczak, Daniel and Magistri, Simone and Cygert, Sebastian and Twardowski, Bart{\\l}omiej and
               Bagdanov, Andrew D. and van de Weijer, Joost},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2025}
}"""


@dataclasses.dataclass(kw_only=True)
class IsoCConfig(SubspaceMergeConfig):
    """``scaling`` α and ``exclude`` as in :class:`~hf_merge.methods.tsv.SubspaceMergeConfig`."""

    method: str = dataclasses.field(default="iso_c", init=False)

    card: ClassVar[MethodCard] = MethodCard(
        title="Isotropic merging in the common subspace (Iso-C)",
        summary=(
            "Iso-C takes the Task Arithmetic sum of the task updates of each weight matrix and flattens its "
            "singular-value spectrum: all singular values are replaced by their mean while the singular vectors are "
            "kept. An isotropic spectrum stops a few dominant directions from drowning out the tasks that live in "
            "weaker ones."
        ),
        bibtex=ISO_BIBTEX,
        paper_url="https://arxiv.org/abs/2502.04959",
    )



@dataclasses.dataclass(kw_only=True)
class IsoCTSConfig(SubspaceMergeConfig):
    """``scaling`` α and ``exclude`` as in :class:`~hf_merge.methods.tsv.SubspaceMergeConfig`,
    ``common_space_fraction`` f ∈ (0, 1] of the rank given to the common subspace (official 0.8)."""

    method: str = dataclasses.field(default="iso_cts", init=False)
    common_space_fraction: float = 0.8

    card: ClassVar[MethodCard] = MethodCard(
        title="Isotropic merging in common and task-specific subspaces (Iso-CTS)",
        summary=(
            "Iso-CTS extends Iso-C: it keeps most of the merged matrix's dimensions for the subspace the tasks "
            "share, fills the remaining dimensions with each task's most important directions that fall outside that "
            "common subspace, orthogonalises the combined bases and gives every direction the same singular value."
        ),
        bibtex=ISO_BIBTEX,
        paper_url="https://arxiv.org/abs/2502.04959",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("common_space_fraction", self.common_space_fraction, low_open=True)


def iso_c(deltas: list[torch.Tensor]) -> torch.Tensor:
    """mean(S) · U Vᵀ of M = Σ_t Δ_t (unscaled Iso-C of one matrix)."""
    total = torch.stack(deltas).sum(dim=0)
    polar_factor, singular_values = polar_with_singular_values(total)
    return polar_factor.mul_(singular_values.mean())


def iso_cts_sizes(rank: int, num_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(c, p): common-subspace size and per-task size, as the official code rounds them (half-to-even)."""
    common = int(rank * common_space_fraction)
    common = rank - round((rank - common) / num_tasks) * num_tasks
    return common, (rank - common) // num_tasks


def iso_cts(deltas: list[torch.Tensor], common_space_fraction: float) -> torch.Tensor:
    """mean(s_cat) · polar(U_cat) polar(V_cat)ᵀ (unscaled Iso-CTS of one matrix)."""
    stacked = torch.stack(deltas)
    total = stacked.sum(dim=0)
    common, per_task = iso_cts_sizes(min(total.shape), len(deltas), common_space_fraction)
    u_c, s_c, v_c = top_k_svd(total, common)
    if per_task == 0:
        return (u_c @ v_c.transpose(0, 1)).mul_(s_c.mean())
    residuals = stacked - u_c @ (u_c.transpose(0, 1) @ stacked)  # (I − U_c U_cᵀ) Δ_t
    u_t, s_t, v_t = top_k_svd(residuals, per_task)
    u_cat = torch.cat([*u_t, u_c], dim=1)
    v_cat = torch.cat([*v_t, v_c], dim=1)
    mean = torch.cat([s_t.reshape(-1), s_c]).mean()
    return (polar(u_cat) @ polar(v_cat).transpose(0, 1)).mul_(mean)


def lowrank_iso_c(parts: Sequence[LowRank], full_rank: int) -> LowRank:
    """Iso-C restricted to the range of M = Σ_t Δ_t: (‖M‖_* / r) U_R V_Rᵀ with r = min(rows, cols).

    Dense Iso-C also gives mean(S) to the null space of a rank-deficient M, whose singular vectors are arbitrary;
    here they are left out (unavoidable in low-rank form).
    """
    total = stack_factors(parts, [1.0] * len(parts))
    u, s, v = lowrank_svd(total.P, total.Q)
    return LowRank(u * (s.sum() / full_rank), v.transpose(0, 1))


def lowrank_iso_cts(parts: Sequence[LowRank], full_rank: int, common_space_fraction: float) -> LowRank:
    """Iso-CTS from factors, restricted to numerical ranges like :func:`lowrank_iso_c`.

    The common space is the top c (≤ rank M) triplets of M = Σ_t Δ_t; each task adds the top p triplets of
    (I − U_c U_cᵀ) Δ_t; the result is mean(s_cat) polar(U_cat) polar(V_cat)ᵀ, the mean taken over the c + T·p slots
    of the dense method (slots beyond a rank count as zeros).
    """
    common, per_task = iso_cts_sizes(full_rank, len(parts), common_space_fraction)
    total = stack_factors(parts, [1.0] * len(parts))
    u_all, s_all, v_all = lowrank_svd(total.P, total.Q)
    u_c, s_c, v_c = u_all[:, :common], s_all[:common], v_all[:, :common]
    us, ss, vs = [], [], []
    if per_task > 0:
        for part in parts:
            projected = part.P - u_c @ (u_c.transpose(0, 1) @ part.P)
            u, s, v = lowrank_svd(projected, part.Q)
            us.append(u[:, :per_task])
            ss.append(s[:per_task])
            vs.append(v[:, :per_task])
    u_cat = torch.cat([*us, u_c], dim=1)
    v_cat = torch.cat([*vs, v_c], dim=1)
    mean = torch.cat([*ss, s_c]).sum() / (common + len(parts) * per_task)
    return LowRank(polar(u_cat) * mean, polar(v_cat).transpose(0, 1))


class IsoCMerger(Merger):
    uses_param_info = False  # only ndim and names decide the SVD treatment
    config: IsoCConfig

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        merged = iso_c(deltas) if is_svd_treated(info, self.config.exclude) else mean_delta(deltas)
        return merged.mul_(self.config.scaling)

    def merge_lowrank(self, key: str, parts: list[LowRank], info: ParamInfo) -> LowRank:
        """Eq. 4 from the tasks' factors (:func:`lowrank_iso_c`); excluded matrices get the mean."""
        if not is_svd_treated(info, self.config.exclude):
            return lowrank_mean(parts, self.config.scaling)
        return lowrank_iso_c(parts, min(parts[0].shape)).scaled(self.config.scaling)


class IsoCTSMerger(Merger):
    uses_param_info = False  # only ndim and names decide the SVD treatment
    config: IsoCTSConfig

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        if is_svd_treated(info, self.config.exclude):
            merged = iso_cts(deltas, self.config.common_space_fraction)
        else:
            merged = mean_delta(deltas)
        return merged.mul_(self.config.scaling)

    def merge_lowrank(self, key: str, parts: list[LowRank], info: ParamInfo) -> LowRank:
        """Eqs. 6–9 from the tasks' factors (:func:`lowrank_iso_cts`); excluded matrices get the mean."""
        if not is_svd_treated(info, self.config.exclude):
            return lowrank_mean(parts, self.config.scaling)
        return lowrank_iso_cts(parts, min(parts[0].shape), self.config.common_space_fraction).scaled(self.config.scaling)


register_method(IsoCConfig, IsoCMerger)
register_method(IsoCTSConfig, IsoCTSMerger)
