"""Exact linear-algebra kernels of the subspace merge methods (TSV, Iso): top-k SVD and polar factor.

The reference implementations run a full thin SVD of every m×n task matrix although they keep only its top
k = r/T triplets, and orthogonalise with further full SVDs. The kernels here return the same results (up to the
sign/order freedom of singular vectors, which the methods' outputs do not depend on) more cheaply:

* :func:`top_k_svd` — eigendecomposition of the Gram matrix of the smaller side (AᵀA, n×n, when m ≥ n),
  computing only its top-k eigenpairs (LAPACK ``syevr`` through SciPy on the CPU, batched ``eigh`` on GPUs).
  Then V = top-k eigenvectors, W = A V, s = ‖W_i‖ and U = W / s. Recomputing s from ‖A v_i‖ (instead of √λ_i)
  makes s accurate to second order in the eigenvector error and U columns exactly unit norm.
  Precision tiers, from the cheapest: float32 Gram + float32 eigh, used for k ≤ r/4 and accepted when
  λ_k ≥ 1e-3 λ_1 (measured error ≤ 5e-6 relative to a float64 SVD; for Iso-CTS's common space, k ≈ 0.8 r, it
  measured up to 1.7e-4, hence the k bound); float64 Gram + float64 eigh, accepted when λ_k ≥ 1e-10 λ_1; otherwise the
  full float32 SVD (rank-deficient or extremely ill-conditioned matrices, where the top-k factors are not unique).
* :func:`polar` — polar(A) = A (AᵀA)^{-1/2} from the float32 eigendecomposition of the small Gram matrix when it is
  well conditioned (checked first by a cheap Cholesky condition estimate), else the reference's float32 SVD when
  its first-order error estimate is small, else a float64 SVD (rank-deficient or extremely ill-conditioned A, where
  the polar factor may not be unique). For square ill-conditioned matrices nothing exact is cheaper than the SVD.

Inputs are upcast to float32; outputs are float32 on the input's device.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .tuning import TUNING


def _check_matrix(name: str, tensor: torch.Tensor, batched: bool = False) -> None:
    expected = (3,) if batched else (2,)
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}.")
    if tensor.ndim not in expected:
        raise ValueError(f"{name} must be a {expected[0]}-D tensor, got shape {tuple(tensor.shape)}.")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {tensor.dtype}.")


def _top_eigh(grams: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs (descending) of a batch of symmetric matrices, in their dtype, on their device."""
    n = grams.shape[-1]
    if grams.device.type == "cpu":
        pairs = [_eigh(gram, top=k) for gram in grams]
        return torch.stack([w.flip(0) for w, _ in pairs]), torch.stack([q.flip(1) for _, q in pairs])
    w, q = torch.linalg.eigh(grams)
    return w[..., n - k :].flip(-1), q[..., n - k :].flip(-1)


@dataclasses.dataclass
class EigensolveOrder:
    """Which Gram eigensolve :func:`top_k_svd` tries first over a run of similar matrices (e.g. the modules of one
    LoRA extraction): float64 first once a matrix's float32 solve was refused for its conditioning, float32 again
    once a float64 solve shows float32 would have been accepted. Every result stays the truncated SVD to float32
    accuracy; a matrix float32 would have served may get the (more accurate) float64 answer."""

    double_first: bool = False


def top_k_svd(matrix: torch.Tensor, k: int, order: EigensolveOrder | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k singular triplets (U_k, s_k, V_k) of a matrix (m×n) or a batch of matrices (B×m×n).

    Returns float32 tensors with U_k: (…, m, k), s_k: (…, k) in descending order and V_k: (…, n, k), such that
    U_k diag(s_k) V_kᵀ is the best rank-k approximation (Eckart–Young), equal to the truncated full SVD. ``order``
    carries which eigensolve to try first from one call to the next (:class:`EigensolveOrder`).
    """
    if not isinstance(matrix, torch.Tensor):
        raise TypeError(f"matrix must be a torch.Tensor, got {type(matrix).__name__}.")
    batched = matrix.ndim == 3
    _check_matrix("matrix", matrix, batched=batched)
    stack = (matrix if batched else matrix.unsqueeze(0)).to(torch.float32)
    m, n = stack.shape[-2:]
    r = min(m, n)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= r:
        raise ValueError(f"k must be an int in [0, min(m, n)] = [0, {r}] for shape {tuple(matrix.shape)}, got {k!r}.")
    wide = m < n
    work = stack.transpose(-2, -1) if wide else stack  # (B, rows, cols) with rows ≥ cols
    batch, rows, cols = work.shape
    left = torch.zeros(batch, rows, k, dtype=torch.float32, device=stack.device)
    values = torch.zeros(batch, k, dtype=torch.float32, device=stack.device)
    right = torch.zeros(batch, cols, k, dtype=torch.float32, device=stack.device)
    pending = list(range(batch)) if k > 0 else []
    tiers = [(torch.float64, TUNING.eigh_double_min_ratio)]
    if k <= r // 4:  # float32 Gram eigenpairs lose accuracy deep into the spectrum (Iso-CTS's common space)
        tiers.insert(1 if order is not None and order.double_first else 0, (torch.float32, TUNING.eigh_fast_min_ratio))
    for dtype, min_ratio in tiers:
        if not pending:
            break
        chosen = work[pending].to(dtype)
        eigenvalues, eigenvectors = _top_eigh(chosen.transpose(-2, -1) @ chosen, k)
        accepted, still = [], []
        for i, index in enumerate(pending):
            top, kth = eigenvalues[i, 0].item(), eigenvalues[i, -1].item()
            (accepted if top > 0 and kth >= min_ratio * top else still).append((i, index))
            if order is not None and len(tiers) > 1:  # would float32 be (or was it) accepted for this matrix?
                order.double_first = not (top > 0 and kth >= TUNING.eigh_fast_min_ratio * top)
        if accepted:
            rows_in, rows_out = [i for i, _ in accepted], [index for _, index in accepted]
            v = eigenvectors[rows_in].to(device=stack.device, dtype=torch.float32)
            projected = work[rows_out] @ v  # U diag(s)
            norms = torch.linalg.vector_norm(projected, dim=-2)
            right[rows_out] = v
            values[rows_out] = norms
            left[rows_out] = projected / norms.unsqueeze(-2)
        pending = [index for _, index in still]
    for index in pending:  # rank-deficient or extremely ill-conditioned: the reference's full SVD
        u, s, vh = torch.linalg.svd(work[index], full_matrices=False)
        left[index], values[index], right[index] = u[:, :k], s[:k], vh[:k].transpose(0, 1)
    u_k, v_k = (right, left) if wide else (left, right)
    if not batched:
        return u_k[0], values[0], v_k[0]
    return u_k, values, v_k


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """polar(A) = P Qᵀ for the thin SVD A = P Σ Qᵀ: the closest matrix with orthonormal columns (rows if m < n).

    See :func:`polar_with_singular_values` for the routes. Returns float32.
    """
    return polar_with_singular_values(matrix)[0]


def polar_with_singular_values(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(polar(A), singular values of A in descending order), both float32, from one factorisation.

    Routes, from the cheapest: A Q Λ^{-1/2} Qᵀ from the float32 eigendecomposition AᵀA = Q Λ Qᵀ of the smaller side,
    when λ_min/λ_max ≥ 1e-2 (error ≲ κ·eps, e.g. stacked nearly orthogonal task bases; tried only when a Cholesky
    condition estimate of AᵀA, ~1/5 of the eigendecomposition's cost, makes that likely); otherwise the float32 SVD
    (the reference's route), kept when its first-order error estimate (an upper bound) is ≤ 1e-4; otherwise (rank
    deficient or extremely ill conditioned, where the polar factor is not unique) a float64 SVD.
    """
    _check_matrix("matrix", matrix)
    work = matrix.to(torch.float32)
    m, n = work.shape
    if m < n:
        p, s = polar_with_singular_values(work.transpose(0, 1))
        return p.transpose(0, 1), s
    if n == 0:
        return work.clone(), work.new_zeros(0)
    gram = work.transpose(0, 1) @ work
    if _likely_well_conditioned(gram):
        values, vectors = _eigh(gram)
        top, bottom = values[-1].item(), values[0].item()
        if top > 0 and bottom >= TUNING.polar_fast_min_ratio * top:
            singular = values.sqrt()
            inverse_sqrt = (vectors * singular.reciprocal()) @ vectors.transpose(0, 1)  # (AᵀA)^{-1/2}, n × n
            return work @ inverse_sqrt, singular.flip(0)
    p, s, qh = torch.linalg.svd(work, full_matrices=False)
    if _svd_polar_error(s, m) <= TUNING.svd_polar_max_error:
        return p @ qh, s
    p, s, qh = torch.linalg.svd(work.to(torch.float64), full_matrices=False)
    return (p @ qh).to(torch.float32), s.to(torch.float32)


def _likely_well_conditioned(gram: torch.Tensor) -> bool:
    """Whether the float32 Gram route of :func:`polar_with_singular_values` is worth trying: on the CPU, LAPACK's
    Cholesky factorisation and 1-norm reciprocal condition estimate (spotrf + spocon) say rcond ≥ 1e-4; elsewhere
    always (batched eigendecompositions are cheap on accelerators)."""
    if gram.device.type != "cpu":
        return True
    from scipy.linalg import lapack

    array = gram.numpy()
    factor, info = lapack.spotrf(array)
    if info != 0:
        return False
    rcond, info = lapack.spocon(factor, float(abs(array).sum(axis=0).max()))
    return info == 0 and rcond >= TUNING.polar_probe_min_rcond


def _svd_polar_error(singular_values: torch.Tensor, rows: int) -> float:
    """Estimated relative Frobenius error of P Qᵀ from a float32 SVD of a rows × n matrix (rows ≥ n), to first order
    in a backward error of eps·s_1 per entry in the singular bases: pair (i, j) of the skew part moves by
    2/(s_i + s_j) and, for rows > n, each direction i of the range part by 1/s_i. Measured 4–100× above the actual
    error on spectra with κ from 1 to 1e5 (tests/test_linalg.py checks it bounds the error)."""
    s = singular_values.to(torch.float64)
    n = s.numel()
    if n == 0 or s[-1] <= 0:
        return math.inf
    inverse_squares = s.reciprocal().square().sum()
    pairs = (2.0 / (s[:, None] + s[None, :])).square().sum() - inverse_squares  # i ≠ j
    total = pairs + (rows - n) * inverse_squares
    return (torch.finfo(torch.float32).eps * s[0] * (total / n).sqrt()).item()


def _eigh(gram: torch.Tensor, top: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending eigenpairs of a symmetric matrix, in its dtype; with ``top``, only the ``top`` largest. On the CPU
    through SciPy: LAPACK's subset solver (syevr) for some, divide-and-conquer (syevd) for all."""
    n = gram.shape[-1]
    some = top is not None and top < n
    if gram.device.type == "cpu":
        import scipy.linalg

        subset = {"subset_by_index": [n - top, n - 1], "driver": "evr"} if some else {"driver": "evd"}
        w, q = scipy.linalg.eigh(gram.numpy(), check_finite=False, **subset)
        return torch.from_numpy(w), torch.from_numpy(q)
    w, q = torch.linalg.eigh(gram)
    return (w[n - top :], q[:, n - top :]) if some else (w, q)


def gram_coordinates(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates of n vectors in an orthonormal basis of their span, from their float64 Gram matrix G = XᵀX alone.

    With G = V Λ Vᵀ (numerically zero eigenvalues, λ ≤ 1e-14 λ_max, dropped): the coordinates are C = Λ^{1/2} Vᵀ
    (column i is vector i, CᵀC = G) and ``back`` = V Λ^{-1/2} turns the coordinates y of a vector of the span into
    coefficients c with y = C c, i.e. the vector is Σ_i c_i x_i. Returns ``(C, back)``; r = 0 for all-zero vectors.
    """
    values, vectors = torch.linalg.eigh(gram.double())
    keep = values > values[-1].clamp_min(0.0) * 1e-14
    values, vectors = values[keep], vectors[:, keep]
    root = values.sqrt()
    return root[:, None] * vectors.T, vectors / root
