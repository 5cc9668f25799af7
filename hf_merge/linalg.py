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

Threads: :func:`cpu_threads` puts torch's intra-op pool and every BLAS/LAPACK/OpenMP pool that ``threadpoolctl``
sees (SciPy's and NumPy's OpenBLAS included, which ``torch.set_num_threads`` does not reach) at one count for the
length of a merge (``MergeOptions.num_threads``). Within it each CPU route spends the threads where they pay
(:data:`LAPACK_THREADS`): torch's matrix products (Gram matrices, projections) use them all; the independent top-k
eigensolves of a batch run side by side, one thread each; the polar factor's eigendecomposition goes through torch's
threaded LAPACK; SciPy's OpenBLAS otherwise runs single-threaded, so that its spin-waiting workers never compete with
torch's pool for the cores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

import torch

from .tuning import TUNING


@contextlib.contextmanager
def cpu_threads(num_threads: int | None) -> Iterator[int]:
    """Run the block with ``num_threads`` CPU threads (``None``: ``torch.get_num_threads()``) in torch's intra-op pool
    and in every BLAS/LAPACK and OpenMP pool ``threadpoolctl`` finds (SciPy is imported first, so that its OpenBLAS
    is among them); every setting is restored on exit. Yields the thread count."""
    import scipy.linalg  # noqa: F401  (loads SciPy's OpenBLAS before the limits are set)
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    threads = previous if num_threads is None else num_threads
    with threadpool_limits(limits=threads):
        torch.set_num_threads(threads)
        try:
            yield threads
        finally:
            torch.set_num_threads(previous)


#: How each CPU route spends the run's threads on its LAPACK calls (SciPy's OpenBLAS):
#:
#: * ``"batch"`` (``top_k`` only): the independent eigensolves of a batch (the T task matrices of TSV, Iso-CTS's
#:   residuals) run side by side, one thread each, on min(threads, batch) threads (``syevr`` called through
#:   :mod:`scipy.linalg.cython_lapack` without the GIL);
#: * ``"torch"`` (``polar`` only): with more than one thread, the full eigendecomposition through
#:   ``torch.linalg.eigh`` (torch's LAPACK, threaded by torch's own pool), the condition probe single-threaded;
#:   with one, as ``1``;
#: * ``1``: single-threaded LAPACK, the threads staying with torch's matrix products around the call (OpenBLAS's
#:   pool and torch's OpenMP pool then never compete for cores: an OpenBLAS worker spin-waits after each call);
#: * ``"all"``: SciPy's LAPACK gets every thread.
#:
#: Chosen from ``benchmarks/bench_subspace.py --threads`` (``benchmarks/results/subspace_threads.md``).
LAPACK_THREADS: dict[str, int | str] = {"top_k": "batch", "polar": "torch"}

_CONTROLLER = None

#: Below this Gram size an eigensolve costs less than handing it to a thread: the batch runs one by one.
_BATCH_MIN_SIZE = 128


def _lapack_threads(threads: int) -> contextlib.AbstractContextManager:
    """SciPy's (and NumPy's) BLAS/LAPACK at ``threads`` for the block, when that is below the run's count."""
    global _CONTROLLER
    if threads >= torch.get_num_threads():
        return contextlib.nullcontext()
    if _CONTROLLER is None:
        import scipy.linalg  # noqa: F401
        from threadpoolctl import ThreadpoolController

        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=threads, user_api="blas")


def _route_threads(route: str) -> int:
    policy = LAPACK_THREADS[route]
    return torch.get_num_threads() if policy == "all" else 1


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
        batch = (LAPACK_THREADS["top_k"] == "batch" and k < n and n >= _BATCH_MIN_SIZE
                 and _syevr(grams.dtype) is not None)
        workers = min(torch.get_num_threads(), len(grams)) if batch else 1
        with _lapack_threads(_route_threads("top_k")):
            if workers > 1:
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(workers, thread_name_prefix="hf_merge-eigh") as pool:
                    pairs = list(pool.map(lambda gram: _syevr_top(gram, k), grams))
            else:
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
    with _lapack_threads(_route_threads("polar")):
        likely = _likely_well_conditioned(gram)
        in_torch = LAPACK_THREADS["polar"] == "torch" and torch.get_num_threads() > 1
        values, vectors = (torch.linalg.eigh(gram) if in_torch else _eigh(gram)) if likely else (None, None)
    if likely:
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


_SYEVR: dict = {}


def _syevr(dtype: torch.dtype):
    """LAPACK's ``ssyevr``/``dsyevr`` from :mod:`scipy.linalg.cython_lapack` (SciPy's OpenBLAS) as a ctypes function,
    or ``None`` where SciPy does not export it: ctypes releases the GIL for the call, so that eigensolves in several
    Python threads run side by side (SciPy's own wrappers hold it)."""
    if dtype not in _SYEVR:
        import ctypes

        try:
            from scipy.linalg import cython_lapack

            capsule = cython_lapack.__pyx_capi__["ssyevr" if dtype == torch.float32 else "dsyevr"]
            api = type(ctypes.pythonapi)(ctypes.pythonapi._name, handle=ctypes.pythonapi._handle)  # own prototypes
            api.PyCapsule_GetName.restype, api.PyCapsule_GetName.argtypes = ctypes.c_char_p, [ctypes.py_object]
            api.PyCapsule_GetPointer.restype = ctypes.c_void_p
            api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
            address = api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))
            _SYEVR[dtype] = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 21)(address)
        except (ImportError, AttributeError, KeyError, OSError, ValueError):
            _SYEVR[dtype] = None
    return _SYEVR[dtype]


def _syevr_top(gram: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top`` largest eigenpairs (ascending) of a symmetric CPU matrix (float32 or float64), as
    :func:`_eigh` with ``top`` computes them (LAPACK ``syevr``, lower triangle), without holding the GIL."""
    import ctypes

    import numpy as np

    n = gram.shape[-1]
    dtype = np.float32 if gram.dtype == torch.float32 else np.float64
    real = ctypes.c_float if dtype == np.float32 else ctypes.c_double
    a = np.array(gram.numpy(), dtype=dtype, order="F")  # overwritten by syevr
    w = np.empty(n, dtype)
    z = np.empty((n, top), dtype, order="F")
    support = np.empty(2 * max(top, 1), np.int32)
    found, info = ctypes.c_int(0), ctypes.c_int(0)
    work, iwork = np.empty(1, dtype), np.empty(1, np.int32)

    def call(lwork: int, liwork: int) -> None:
        def integer(value: int):
            return ctypes.byref(ctypes.c_int(value))

        def pointer(array):
            return array.ctypes.data_as(ctypes.c_void_p)

        zero = ctypes.byref(real(0.0))
        _syevr(gram.dtype)(b"V", b"I", b"L", integer(n), pointer(a), integer(n), zero, zero, integer(n - top + 1),
                           integer(n), zero, ctypes.byref(found), pointer(w), pointer(z), integer(n), pointer(support),
                           pointer(work), integer(lwork), pointer(iwork), integer(liwork), ctypes.byref(info))

    call(-1, -1)  # workspace query
    work, iwork = np.empty(max(1, int(work[0])), dtype), np.empty(max(1, int(iwork[0])), np.int32)
    call(work.shape[0], iwork.shape[0])
    if info.value != 0 or found.value != top:
        raise np.linalg.LinAlgError(f"syevr failed (info {info.value}, {found.value} of {top} eigenpairs).")
    return torch.from_numpy(w[:top]), torch.from_numpy(z)


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
