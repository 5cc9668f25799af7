"""The linear-algebra kernels equal the exact full-SVD results, on every precision route."""

from __future__ import annotations

import pytest
import torch

from hf_merge import linalg
from hf_merge.linalg import polar, polar_with_singular_values, top_k_svd
from hf_merge.tuning import TUNING
from tests.helpers import rel_error


def _with_spectrum(m: int, n: int, singular_values: torch.Tensor, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    r = min(m, n)
    left, _ = torch.linalg.qr(torch.randn(m, r, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(n, r, generator=generator, dtype=torch.float64))
    return ((left * singular_values.to(torch.float64)) @ right.T).float()


def _spectra(r: int) -> dict[str, torch.Tensor]:
    i = torch.arange(1, r + 1, dtype=torch.float64)
    return {
        "decaying": i ** -0.5,
        "ill_conditioned": 10.0 ** (-8 * (i - 1) / (r - 1)),
        "low_rank_plus_noise": torch.where(i <= 4, 10 * i ** -0.3, 1e-4 * i ** -0.5),
        "rank_deficient": torch.where(i <= 6, i ** -0.5, torch.zeros_like(i)),
    }


def _truncation(matrix: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


ROUTES = {
    "auto": {},
    "float64_gram": {"eigh_fast_min_ratio": 2.0},
    "full_svd": {"eigh_fast_min_ratio": 2.0, "eigh_double_min_ratio": 2.0},
}


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("spectrum", sorted(_spectra(8)))
@pytest.mark.parametrize("shape", [(96, 40), (40, 96), (48, 48)])
def test_top_k_svd_equals_truncated_full_svd(monkeypatch, route, spectrum, shape) -> None:
    for name, value in ROUTES[route].items():
        monkeypatch.setattr(TUNING, name, value)
    matrix = _with_spectrum(*shape, _spectra(min(shape))[spectrum])
    k = 10
    u, s, v = top_k_svd(matrix, k)
    assert u.shape == (shape[0], k) and s.shape == (k,) and v.shape == (shape[1], k)
    assert rel_error((u * s) @ v.T, _truncation(matrix, k)) < 1e-4
    exact = torch.linalg.svdvals(matrix.double())[:k]
    assert torch.allclose(s.double(), exact, rtol=1e-4, atol=1e-6 * exact[0].item())
    assert torch.allclose(u.T @ u, torch.eye(k), atol=1e-4)
    assert torch.allclose(v.T @ v, torch.eye(k), atol=1e-4)


def test_batched_top_k_svd_equals_one_matrix_at_a_time() -> None:
    batch = torch.stack([_with_spectrum(50, 30, _spectra(30)[name], seed=i) for i, name in enumerate(_spectra(30))])
    u, s, v = top_k_svd(batch, 7)
    for i, matrix in enumerate(batch):
        assert rel_error((u[i] * s[i]) @ v[i].T, _truncation(matrix, 7)) < 1e-4


def test_top_k_svd_of_zero_matrix_and_k_zero() -> None:
    u, s, v = top_k_svd(torch.zeros(6, 4), 3)
    assert torch.equal(s, torch.zeros(3)) and torch.allclose(u.T @ u, torch.eye(3), atol=1e-6)
    u, s, v = top_k_svd(torch.randn(6, 4), 0)
    assert u.shape == (6, 0) and s.shape == (0,) and v.shape == (4, 0)


POLAR_ROUTES = {
    "auto": {},
    "float32_svd": {"polar_fast_min_ratio": 2.0},
    "float64_svd": {"polar_fast_min_ratio": 2.0, "svd_polar_max_error": -1.0},
}


@pytest.mark.parametrize("route", sorted(POLAR_ROUTES))
@pytest.mark.parametrize("condition", [1.0, 1e2, 1e5])
@pytest.mark.parametrize("shape", [(80, 30), (30, 80), (40, 40)])
def test_polar_equals_svd_polar(monkeypatch, route, condition, shape) -> None:
    for name, value in POLAR_ROUTES[route].items():
        monkeypatch.setattr(TUNING, name, value)
    r = min(shape)
    matrix = _with_spectrum(*shape, torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), r))
    p, qh = torch.linalg.svd(matrix.double(), full_matrices=False)[::2]
    exact = p @ qh
    assert rel_error(polar(matrix), exact) < 1e-4
    factor, singular_values = polar_with_singular_values(matrix)
    assert rel_error(factor, exact) < 1e-4
    assert torch.allclose(singular_values.double(), torch.linalg.svdvals(matrix.double()), rtol=1e-4, atol=1e-7)


def test_polar_of_rank_deficient_matrix_is_orthonormal_and_reproduces_the_range() -> None:
    matrix = _with_spectrum(60, 20, _spectra(20)["rank_deficient"])
    factor = polar(matrix)
    assert torch.allclose(factor.T @ factor, torch.eye(20), atol=1e-5)
    # On the range of A the polar factor is unique: polar(A) Aᵀ A-part equals (AAᵀ)^{1/2}, i.e. Pᵀ A is PSD.
    h = factor.T.double() @ matrix.double()
    assert torch.allclose(h, h.T, atol=1e-5) and torch.linalg.eigvalsh(h).min() > -1e-5


def test_orthogonalized_factors_are_orthonormal() -> None:
    stacked = torch.stack([_with_spectrum(64, 48, _spectra(48)["decaying"], seed=s) for s in range(4)])
    u, _, v = top_k_svd(stacked, 12)
    for factors in (u, v):
        concatenated = factors.transpose(0, 1).reshape(factors.shape[1], -1)
        orthogonal = polar(concatenated)
        assert torch.allclose(orthogonal.T @ orthogonal, torch.eye(48), atol=1e-5)


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: top_k_svd(torch.randn(5), 1), ValueError),
        (lambda: top_k_svd(torch.ones(3, 3, dtype=torch.int64), 1), TypeError),
        (lambda: top_k_svd(torch.randn(4, 3), 4), ValueError),
        (lambda: top_k_svd(torch.randn(4, 3), -1), ValueError),
        (lambda: polar(torch.randn(2, 2, 2)), ValueError),
        (lambda: polar([[1.0]]), TypeError),
    ],
)
def test_bad_inputs_raise(call, error) -> None:
    with pytest.raises(error):
        call()


@pytest.mark.parametrize("condition", [1e2, 1e3, 1e4, 1e6])
@pytest.mark.parametrize("shape", [(200, 200), (400, 200)])
def test_float32_svd_polar_error_estimate_bounds_the_error(condition, shape) -> None:
    """The estimate that decides whether the float32 SVD's polar factor is kept is not below its actual error."""
    matrix = _with_spectrum(*shape, torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), 200),
                            seed=3)
    p, s, qh = torch.linalg.svd(matrix, full_matrices=False)
    p64, qh64 = torch.linalg.svd(matrix.double(), full_matrices=False)[::2]
    assert rel_error(p @ qh, p64 @ qh64) <= linalg._svd_polar_error(s, shape[0])


def test_polar_skips_the_gram_route_for_an_ill_conditioned_matrix(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(linalg, "_eigh", lambda gram: calls.append(gram) or pytest.fail("Gram route tried"))
    matrix = _with_spectrum(64, 64, torch.logspace(0, -4, 64))
    p64, qh64 = torch.linalg.svd(matrix.double(), full_matrices=False)[::2]
    assert rel_error(polar(matrix), p64 @ qh64) < 1e-4 and not calls


def test_the_eigensolve_order_moves_to_float64_for_ill_conditioned_runs_and_back():
    from hf_merge.linalg import EigensolveOrder, top_k_svd

    generator = torch.Generator().manual_seed(11)
    u, _ = torch.linalg.qr(torch.randn(300, 120, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(120, 120, generator=generator, dtype=torch.float64))
    decaying = ((u * 0.7 ** torch.arange(120, dtype=torch.float64)) @ v.T).float()  # σ_8²/σ_1² ≈ 7e-3, σ_20²… < 1e-3
    flat = torch.randn(300, 120, generator=generator)
    order = EigensolveOrder()
    for matrix, double_first in [(flat, False), (decaying, True), (decaying, True), (flat, False)]:
        reference = torch.linalg.svd(matrix.double(), full_matrices=False)
        u_k, s_k, v_k = top_k_svd(matrix, 24, order)
        assert order.double_first is double_first
        torch.testing.assert_close(s_k.double(), reference.S[:24], rtol=1e-5, atol=1e-6 * reference.S[0].item())
        approximation = (u_k * s_k) @ v_k.T
        best = (reference.U[:, :24] * reference.S[:24]) @ reference.Vh[:24]
        torch.testing.assert_close(approximation.double(), best, rtol=0, atol=1e-5 * reference.S[0].item())
