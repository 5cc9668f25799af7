"""Task Singular Vectors (Gargiulo et al., CVPR 2025, arXiv 2412.00081): TSV-C (compression) and TSV-M (merging).

Per 2-D parameter (the official rule ``ndim == 2``, embeddings included; names containing an ``exclude`` entry are
averaged), with task matrices Δ_t = U_t S_t V_tᵀ and k = ⌊r · rank_fraction⌋ (official: ⌊r / T⌋):

* TSV-C: Δ̂_t = U_{t,k} S_{t,k} V_{t,k}ᵀ, the rank-k truncation of every task (evaluated with coefficient 1).
* TSV-M: U = [U_{1,k} … U_{T,k}], V = [V_{1,k} … V_{T,k}], s = [s_{1,k}; …; s_{T,k}];
  Δ = α · polar(U) diag(s) polar(V)ᵀ (Eq. 7 of the paper, polar(X) = P Qᵀ from X = P Σ Qᵀ).

Every other floating-point parameter gets the mean of τ_t (TSV-M; scaled by α like the matrices) or keeps its own
τ_t (TSV-C). The top-k factors come from :func:`hf_merge.linalg.top_k_svd` (exact Gram-eigh route) instead of T full
SVDs, and the polar factors from :func:`hf_merge.linalg.polar`.

TSV-M also merges low-rank task matrices Δ_t = P_t Q_t (LoRA) without forming them (:func:`lowrank_tsv_merge`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

from ..config import MergeConfig, MethodCard, SearchSpace, check_fraction, check_number
from ..errors import warn
from ..linalg import polar, top_k_svd
from ..lowrank import LowRank, lowrank_svd, stack_factors
from ..params import ParamInfo
from ..registry import register_method
from ..tensors import TensorMeta
from .base import Merger, TaskCompressor
from .grids import linspace_tail

if TYPE_CHECKING:
    from ..context import MergeContext

#: α's validation grid in the TSV and Iso code: ``linspace(0, 3, 31)[1:]``.
ALPHA_GRID = linspace_tail(3.0, 31)

TSV_BIBTEX = """@inproceedings{gargiulo2025tsv,
  title     = {Task Singular Vectors: Reducing Task Interference in Model Merging},
  author    = {Gargiulo, Antonio Andrea and Crisostomi, Donato and Bucarelli, Maria Sofia and Scardapane, Simone and
               Silvestri, Fabrizio and Rodol{\\`a}, Emanuele},
  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2025}
}"""


def _check_exclude(exclude: Sequence[str]) -> tuple[str, ...]:
    if isinstance(exclude, str) or not all(isinstance(e, str) and e for e in exclude):
        raise TypeError(f"exclude must be a sequence of non-empty name substrings, got {exclude!r}.")
    return tuple(exclude)


def _check_rank_fraction(rank_fraction: float | None) -> None:
    if rank_fraction is not None:
        check_fraction("rank_fraction", rank_fraction, low_open=True)


@dataclasses.dataclass(kw_only=True)
class SubspaceMergeConfig(MergeConfig):
    """Fields of the subspace merges (TSV-M, Iso-C, Iso-CTS): ``scaling`` α (official search
    ``linspace(0, 3, 31)[1:]``; 1.0 is the natural default) and ``exclude``, name substrings of 2-D parameters that
    are averaged instead of SVD-treated (official: ``("text_projection",)``)."""

    scaling: float = 1.0
    exclude: Sequence[str] = ("text_projection",)

    def __post_init__(self) -> None:
        check_number("scaling", self.scaling)
        self.exclude = _check_exclude(self.exclude)

    def search_space(self) -> SearchSpace:
        """α over ``linspace(0, 3, 31)[1:]``; the merged update is α times an update that does not depend on α
        (TSV Eq. 7, Iso Eqs. 4 and 9)."""
        return SearchSpace("scaling", ALPHA_GRID, "linear")


@dataclasses.dataclass(kw_only=True)
class TSVMergeConfig(SubspaceMergeConfig):
    """``scaling`` and ``exclude`` as in :class:`SubspaceMergeConfig`; ``rank_fraction`` the kept fraction of each
    task's rank (``None``: 1/T, the official k = ⌊r/T⌋)."""

    method: str = dataclasses.field(default="tsv_m", init=False)
    rank_fraction: float | None = None

    card: ClassVar[MethodCard] = MethodCard(
        title="Task Singular Vectors — merging (TSV-M)",
        summary=(
            "For every weight matrix, TSV-M keeps the top 1/T of the singular directions of each task's update, "
            "stacks the kept left and right singular vectors of all tasks, and replaces each stack by its closest "
            "orthonormal matrix before recombining them with the kept singular values. Decorrelating the tasks' "
            "subspaces this way reduces interference; non-matrix parameters are averaged."
        ),
        bibtex=TSV_BIBTEX,
        paper_url="https://arxiv.org/abs/2412.00081",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_rank_fraction(self.rank_fraction)


@dataclasses.dataclass(kw_only=True)
class TSVCompressConfig(MergeConfig):
    """``rank_fraction`` as in :class:`TSVMergeConfig` (``None``: k = ⌊r/T⌋), ``exclude`` as there (those tensors
    are stored in full). Used by :func:`hf_merge.compress`; as a merge, ``task`` names the task whose compressed model
    is returned, and ``None`` returns θ₀ + Σ_t Δ̂_t (Task Arithmetic at λ = 1 of the compressed task vectors)."""

    method: str = dataclasses.field(default="tsv_c", init=False)
    rank_fraction: float | None = None
    exclude: Sequence[str] = ("text_projection",)
    task: str | None = None

    card: ClassVar[MethodCard] = MethodCard(
        title="Task Singular Vectors — compression (TSV-C)",
        summary=(
            "TSV-C stores each task's update of every weight matrix as a low-rank approximation made of its top "
            "1/T singular triplets, so that all T tasks together take about the space of one model's update while "
            "each task can be reconstructed almost losslessly. Non-matrix parameters are kept as they are."
        ),
        bibtex=TSV_BIBTEX,
        paper_url="https://arxiv.org/abs/2412.00081",
    )

    def __post_init__(self) -> None:
        _check_rank_fraction(self.rank_fraction)
        self.exclude = _check_exclude(self.exclude)
        if self.task is not None and not isinstance(self.task, str):
            raise TypeError(f"task must be a task name (str) or None, got {self.task!r}.")


def is_svd_treated(info: ParamInfo, exclude: Sequence[str]) -> bool:
    """The official TSV/Iso rule: every 2-D parameter except names containing an ``exclude`` entry."""
    return info.ndim == 2 and not any(pattern in info.name for pattern in exclude)


def task_rank(shape: Sequence[int], num_tasks: int, rank_fraction: float | None) -> int:
    """k = ⌊r / T⌋ (official ``int(r * 1 / T)``) or ⌊r · rank_fraction⌋, with r = min(m, n)."""
    r = min(shape)
    if rank_fraction is None:
        return r // num_tasks
    return int(r * rank_fraction)


def mean_delta(deltas: list[torch.Tensor]) -> torch.Tensor:
    """(1/T) Σ_t τ_t: the treatment of non-matrix parameters."""
    return torch.stack(deltas).mean(dim=0)


def tsv_merge(deltas: list[torch.Tensor], k: int) -> torch.Tensor:
    """TSV-M of one matrix (unscaled): polar([U_{t,k}]_t) diag([s_{t,k}]_t) polar([V_{t,k}]_t)ᵀ.

    Equals the official zero-padded ``u_u @ v_u @ diag(s) @ u_v @ v_v`` (padded columns have s = 0).
    """
    if k == 0:
        return torch.zeros_like(deltas[0])
    u, s, v = top_k_svd(torch.stack(deltas), k)  # (T, m, k), (T, k), (T, n, k)
    u_cat = u.transpose(0, 1).reshape(u.shape[1], -1)  # [U_1 … U_T]
    v_cat = v.transpose(0, 1).reshape(v.shape[1], -1)
    return (polar(u_cat) * s.reshape(-1)) @ polar(v_cat).transpose(0, 1)


def lowrank_mean(parts: Sequence[LowRank], scaling: float) -> LowRank:
    """(α/T) Σ_t P_t Q_t, stacked exactly: the treatment of matrices excluded from the SVD merges, in factors."""
    return stack_factors(parts, [scaling / len(parts)] * len(parts))


def lowrank_tsv_merge(parts: Sequence[LowRank], k: int) -> LowRank:
    """TSV-M from factors: per task the top-k singular triplets of P_t Q_t (its non-zero ones: k_t ≤ rank),
    concatenated, U⊥ = polar([U_t]), V⊥ = polar([V_t]); ΔM = U⊥ diag(s) V⊥ᵀ.

    Components with zero singular value are dropped: a dense SVD fills them with arbitrary null-space vectors.
    """
    us, ss, vs = [], [], []
    for part in parts:
        u, s, v = lowrank_svd(part.P, part.Q)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(v[:, :k])
    u_cat, s_cat, v_cat = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vs, dim=1)
    if s_cat.numel() == 0:
        return LowRank(u_cat, v_cat.transpose(0, 1))
    return LowRank(polar(u_cat) * s_cat, polar(v_cat).transpose(0, 1))


def _warn_rank_zero(keys: list[str], num_tasks: int) -> None:
    if keys:
        warn(
            f"TSV keeps k = ⌊r/T⌋ = 0 singular triplets per task for {len(keys)} matrices with min(m, n) < T = "
            f"{num_tasks} (e.g. {keys[0]!r}); like the reference, their merged task vector is zero. Set "
            "rank_fraction or exclude them to average instead."
        )


class TSVMergeMerger(Merger):
    uses_param_info = False  # only ndim and names decide the SVD treatment
    config: TSVMergeConfig

    def prepare(self, ctx: MergeContext) -> None:
        self.num_tasks = len(ctx.task_names)
        _warn_rank_zero(
            [
                key for key in ctx.merge_keys
                if is_svd_treated(ctx.infos[key], self.config.exclude)
                and task_rank(ctx.metas[key].shape, self.num_tasks, self.config.rank_fraction) == 0
            ],
            self.num_tasks,
        )

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        if is_svd_treated(info, self.config.exclude):
            k = task_rank(deltas[0].shape, len(deltas), self.config.rank_fraction)
            merged = tsv_merge(deltas, k)
        else:
            merged = mean_delta(deltas)
        return merged.mul_(self.config.scaling)

    def merge_lowrank(self, key: str, parts: list[LowRank], info: ParamInfo) -> LowRank:
        """Eq. 7 from the tasks' factors (:func:`lowrank_tsv_merge`, k = ⌊r/T⌋ of the full r = min(m, n)); excluded
        matrices get the mean."""
        if not is_svd_treated(info, self.config.exclude):
            return lowrank_mean(parts, self.config.scaling)
        k = task_rank(parts[0].shape, len(parts), self.config.rank_fraction)
        return lowrank_tsv_merge(parts, k).scaled(self.config.scaling)


class TSVCompressMerger(Merger, TaskCompressor):
    uses_param_info = False  # only ndim and names decide the SVD treatment
    """TSV-C: per matrix, each task keeps its top-k triplets; other tensors keep their full τ_t."""

    config: TSVCompressConfig

    def prepare(self, ctx: MergeContext) -> None:
        self.task_names = list(ctx.task_names)
        if self.config.task is not None and self.config.task not in self.task_names:
            raise ValueError(f"task {self.config.task!r} is not among the tasks {self.task_names}.")
        _warn_rank_zero(
            [
                key for key in ctx.merge_keys
                if is_svd_treated(ctx.infos[key], self.config.exclude)
                and task_rank(ctx.metas[key].shape, len(self.task_names), self.config.rank_fraction) == 0
            ],
            len(self.task_names),
        )

    def _rank(self, shape: Sequence[int], num_tasks: int) -> int:
        return task_rank(shape, num_tasks, self.config.rank_fraction)

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        chosen = range(len(deltas))
        if self.config.task is not None:
            chosen = [self.task_names.index(self.config.task)]
        if not is_svd_treated(info, self.config.exclude):
            return torch.stack([deltas[t] for t in chosen]).sum(dim=0)
        k = self._rank(deltas[0].shape, len(deltas))
        u, s, v = top_k_svd(torch.stack([deltas[t] for t in chosen]), k)
        return torch.einsum("tik,tk,tjk->ij", u, s, v)

    # ------------------------------------------------------------------ TaskCompressor
    def payload_layout(self, key: str, meta: TensorMeta, info: ParamInfo, num_tasks: int) -> dict[str, TensorMeta]:
        if not is_svd_treated(info, self.config.exclude):
            return {f"delta.{t}": TensorMeta(meta.shape, torch.float32) for t in range(num_tasks)}
        m, n = meta.shape
        k = self._rank(meta.shape, num_tasks)
        layout = {}
        for t in range(num_tasks):
            layout[f"U.{t}"] = TensorMeta((m, k), torch.float32)
            layout[f"s.{t}"] = TensorMeta((k,), torch.float32)
            layout[f"V.{t}"] = TensorMeta((n, k), torch.float32)
        return layout

    def encode_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> dict[str, torch.Tensor]:
        if not is_svd_treated(info, self.config.exclude):
            return {f"delta.{t}": delta for t, delta in enumerate(deltas)}
        k = self._rank(deltas[0].shape, len(deltas))
        u, s, v = top_k_svd(torch.stack(deltas), k)
        out = {}
        for t in range(len(deltas)):
            out[f"U.{t}"], out[f"s.{t}"], out[f"V.{t}"] = u[t], s[t], v[t]
        return out

    def decode_tensor(
        self, key: str, task_index: int, payload: Callable[[str], torch.Tensor], meta: TensorMeta, info: ParamInfo
    ) -> torch.Tensor:
        if not is_svd_treated(info, self.config.exclude):
            return payload(f"delta.{task_index}").to(torch.float32)
        u, s, v = (payload(f"{part}.{task_index}").to(torch.float32) for part in ("U", "s", "V"))
        return (u * s) @ v.transpose(0, 1)


register_method(TSVMergeConfig, TSVMergeMerger)
register_method(TSVCompressConfig, TSVCompressMerger)
