"""Low-rank algebra: updates kept as factors ΔW = P Q, never formed as rows × cols matrices.

Used by LoRA inputs (each adapter module is s · B A), by the methods' low-rank forms (``Merger.merge_lowrank``) and by
LoRA outputs (merged updates truncated to a rank or an energy fraction, Eckart–Young).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch


@dataclasses.dataclass
class LowRank:
    """ΔW = P Q in the stored weight's layout (P: rows × r, Q: r × cols), float32."""

    P: torch.Tensor
    Q: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.P.shape[0], self.Q.shape[1]

    @property
    def rank(self) -> int:
        return self.P.shape[1]

    def dense(self) -> torch.Tensor:
        return self.P @ self.Q

    def scaled(self, factor: float) -> LowRank:
        return LowRank(self.P * factor, self.Q)

    def to(self, device: torch.device | str) -> LowRank:
        return LowRank(self.P.to(device), self.Q.to(device))

    @classmethod
    def zero(cls, rows: int, cols: int) -> LowRank:
        """The rank-0 update of a rows × cols matrix (a module an adapter does not target)."""
        return cls(torch.zeros(rows, 0), torch.zeros(0, cols))

    @classmethod
    def from_dense(cls, delta: torch.Tensor, tol: float = 1e-6) -> LowRank:
        """Every singular triplet of ``delta`` above ``tol · s_max`` (float64 SVD): exact up to the null space."""
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        keep = _numerical_range(s, tol)
        return cls((u[:, keep] * s[keep]).float(), vh[keep].float())


def _numerical_range(s: torch.Tensor, tol: float) -> torch.Tensor:
    return s > tol * s[0] if s.numel() and s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)


def lowrank_svd(P: torch.Tensor, Q: torch.Tensor, tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, s, V) of P Q from its factors: P = Q_P R_P, Qᵀ = Q_Q R_Q, SVD of the r × r core R_P R_Qᵀ.

    Singular triplets below ``tol · s_max`` (the numerical null space) are dropped. Computed in float64.
    """
    if P.shape[1] == 0:
        return P.new_zeros(P.shape[0], 0), P.new_zeros(0), Q.new_zeros(Q.shape[1], 0)
    q_p, r_p = torch.linalg.qr(P.double())
    q_q, r_q = torch.linalg.qr(Q.double().transpose(0, 1))
    u_c, s, v_ch = torch.linalg.svd(r_p @ r_q.transpose(0, 1), full_matrices=False)
    keep = _numerical_range(s, tol)
    u, v = q_p @ u_c[:, keep], q_q @ v_ch.transpose(0, 1)[:, keep]
    return u.float(), s[keep].float(), v.float()


def stack_factors(parts: Sequence[LowRank], weights: Sequence[float]) -> LowRank:
    """Σ_t w_t P_t Q_t as one factor pair [w_1 P_1 … w_T P_T] [Q_1; …; Q_T] (exact)."""
    return LowRank(torch.cat([p.P * w for p, w in zip(parts, weights)], dim=1), torch.cat([p.Q for p in parts], dim=0))


def truncate(update: LowRank, rank: int | None = None, energy: float | None = None) -> LowRank:
    """The best rank-k approximation (Eckart–Young) of P Q: k = ``rank``, or the fewest triplets holding an
    ``energy`` fraction of Σ s² (balanced: P = U √s, Q = √s Vᵀ). Neither: the factors unchanged (exact)."""
    if rank is None and energy is None:
        return update
    u, s, v = lowrank_svd(update.P, update.Q)
    k = s.numel()
    if rank is not None:
        k = min(k, rank)
    if energy is not None and s.numel():
        cumulative = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum()
        k = min(k, int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=torch.float64) - 1e-12)) + 1)
    root = s[:k].sqrt()
    return LowRank(u[:, :k] * root, (v[:, :k] * root).transpose(0, 1))
