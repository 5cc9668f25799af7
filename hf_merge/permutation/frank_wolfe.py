"""C2M3: cycle-consistent multi-model merging by Frank–Wolfe (Crisostomi et al., NeurIPS 2024).

Unknowns: for each model A and permutation ℓ a doubly stochastic matrix P_A^ℓ mapping A to a shared universe,
U_A = π_A(W_A) (P applied along every axis the spec names). Pairwise maps factor as P_A P_Bᵀ, so they are cycle
consistent by construction. Objective (all layers and models jointly):

    f(P) = Σ_{A<B} Σ_tensors ⟨U_A, U_B⟩ = ½ Σ_tensors (‖Σ_A U_A‖² − Σ_A ‖U_A‖²),

whose gradient w.r.t. P_A^ℓ is Σ over the tensors on ℓ of (Σ_{B≠A} U_B)(ℓ-axis first) · (W_A with its other axes
mapped)ᵀ: for a matrix U = R W Cᵀ and one pair, ∂/∂R_A = R_B W_B C_Bᵀ C_A W_Aᵀ (the spec's W_A C_A C_Bᵀ W_Bᵀ R_B in
its transposed convention).

Frank–Wolfe: Q = LAP(∇f) per (model, unit) (the linear maximisation oracle over permutations), one global step
t* = argmax_{t∈[0,1]} f((1−t)P + tQ), P ← P + t*(Q − P). Each U_A(t) is a polynomial in t of degree equal to the
number of permuted axes of the tensor (≤ 2 for every built-in spec), so f along the segment is a polynomial of
degree ≤ 4 whose coefficients we expand exactly and maximise analytically (endpoints and real roots of f′) — exact,
where the reference's bounded scalar search stops at xtol = 1e-3. Stop after ``patience`` iterations without an
improvement > ``tol`` over the best value, then project each P to a permutation with a LAP.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .spec import Perms, PermutationSpec, solve_assignment, state_dict_of
from .weight_matching import spec_tensors

Soft = dict[str, torch.Tensor]
INITIALIZATIONS = ("sinkhorn", "identity")


@dataclasses.dataclass
class FrankWolfeResult:
    """``perms[A][name][u]``: the unit of model A at universe position u. ``objective``: f at the initial point and
    after every iteration (never decreasing). ``soft``: the final doubly stochastic matrices before projection."""

    perms: list[Perms]
    objective: list[float]
    soft: list[Soft]
    iterations: int


def map_axis(tensor: torch.Tensor, matrix: torch.Tensor, axis: int) -> torch.Tensor:
    """Apply P along ``axis``: out[.., u, ..] = Σ_i P[u, i] W[.., i, ..] (for P = I[p] this is index_select(p))."""
    return torch.tensordot(matrix, tensor, dims=([1], [axis])).movedim(0, axis)


def to_universe(
    spec: PermutationSpec, key: str, tensor: torch.Tensor, soft: Mapping[str, torch.Tensor], skip: int | None = None
) -> torch.Tensor:
    """U = W with every permuted axis (except ``skip``) mapped by its (soft) permutation."""
    for axis, name in enumerate(spec.axes[key]):
        if name is not None and axis != skip:
            tensor = map_axis(tensor, soft[name], axis)
    return tensor


def objective(
    spec: PermutationSpec, weights: Sequence[Mapping[str, torch.Tensor]], soft: Sequence[Soft]
) -> torch.Tensor:
    """f(P) = Σ_{A<B} Σ_tensors ⟨U_A, U_B⟩, as a (differentiable) scalar tensor."""
    total = torch.zeros((), dtype=torch.float64)
    for key in spec.axes:
        mapped = [to_universe(spec, key, w[key], p) for w, p in zip(weights, soft)]
        summed = torch.stack(mapped).sum(0)
        total = total + 0.5 * (summed.square().sum() - sum(u.square().sum() for u in mapped))
    return total


def objective_and_gradient(
    spec: PermutationSpec, weights: Sequence[Mapping[str, torch.Tensor]], soft: Sequence[Soft]
) -> tuple[float, list[Soft]]:
    """f(P) and ∇f w.r.t. every P_A^ℓ: Σ_{tensors on ℓ} (Σ_{B≠A} U_B)_ℓ · (W_A mapped on its other axes)_ℓᵀ."""
    grads: list[Soft] = [{name: torch.zeros_like(m) for name, m in p.items()} for p in soft]
    value = 0.0
    for key in spec.axes:
        mapped = [to_universe(spec, key, w[key], p) for w, p in zip(weights, soft)]
        summed = torch.stack(mapped).sum(0)
        value += 0.5 * float(summed.square().sum() - sum(u.square().sum() for u in mapped))
        for a, (w, p) in enumerate(zip(weights, soft)):
            partner = summed - mapped[a]
            for axis, name in enumerate(spec.axes[key]):
                if name is None:
                    continue
                other = to_universe(spec, key, w[key], p, skip=axis)
                n = other.shape[axis]
                grads[a][name] += partner.movedim(axis, 0).reshape(n, -1) @ other.movedim(axis, 0).reshape(n, -1).T
    return value, grads


def gradient(spec: PermutationSpec, weights: Sequence[Mapping[str, torch.Tensor]], soft: Sequence[Soft]) -> list[Soft]:
    """∇f w.r.t. every P_A^ℓ (see :func:`objective_and_gradient`)."""
    return objective_and_gradient(spec, weights, soft)[1]


def segment_polynomial(
    spec: PermutationSpec,
    weights: Sequence[Mapping[str, torch.Tensor]],
    soft: Sequence[Soft],
    direction: Sequence[Soft],
) -> np.ndarray:
    """Exact coefficients c (lowest degree first) of f(P + tD) = Σ_j c_j t^j.

    U_A(t) = W ×_k (P_k + t D_k) expands into Σ_j t^j u_{A,j}, where u_{A,j} sums the 2^K products choosing D on
    j of the K permuted axes; then ⟨U_A(t), U_B(t)⟩ = Σ_{i,j} ⟨u_{A,i}, u_{B,j}⟩ t^{i+j}.
    """
    max_axes = max(sum(n is not None for n in v) for v in spec.axes.values())
    coefficients = np.zeros(2 * max_axes + 1)
    for key, names in spec.axes.items():
        permuted = [(axis, name) for axis, name in enumerate(names) if name is not None]
        degree = len(permuted)
        per_model = []
        for w, p, d in zip(weights, soft, direction):
            variants = [(0, w[key])]  # (number of axes mapped by D, partial product), expanded axis by axis
            for axis, name in permuted:
                variants = [
                    item for deg, tensor in variants
                    for item in ((deg, map_axis(tensor, p[name], axis)), (deg + 1, map_axis(tensor, d[name], axis)))
                ]
            terms = [torch.zeros((), dtype=torch.float64) for _ in range(degree + 1)]
            for deg, tensor in variants:
                terms[deg] = terms[deg] + tensor
            per_model.append(terms)
        summed = [sum(model[j] for model in per_model) for j in range(degree + 1)]
        for i in range(degree + 1):
            for j in range(degree + 1):
                cross = float((summed[i] * summed[j]).sum())
                own = sum(float((model[i] * model[j]).sum()) for model in per_model)
                coefficients[i + j] += 0.5 * (cross - own)
    return coefficients


def maximize_on_unit_interval(coefficients: np.ndarray) -> float:
    """argmax_{t∈[0,1]} of the polynomial Σ_j c_j t^j: compare the endpoints and the real critical points inside."""
    polynomial = np.polynomial.Polynomial(coefficients)
    candidates = [0.0, 1.0]
    if len(coefficients) > 2:
        for root in polynomial.deriv().roots():
            if abs(root.imag) < 1e-9 and 0.0 < root.real < 1.0:
                candidates.append(float(root.real))
    values = polynomial(np.array(candidates))
    return candidates[int(np.argmax(values))]


def sinkhorn(matrix: torch.Tensor, *, tol: float = 1e-8, max_iter: int = 1000) -> torch.Tensor:
    """Sinkhorn–Knopp: alternately normalise rows and columns until both sum to 1 within ``tol``."""
    for _ in range(max_iter):
        matrix = matrix / matrix.sum(1, keepdim=True)
        matrix = matrix / matrix.sum(0, keepdim=True)
        if float((matrix.sum(1) - 1).abs().max()) < tol:
            break
    return matrix


def initial_point(sizes: Mapping[str, int], num_models: int, init: str, generator: torch.Generator) -> list[Soft]:
    """``"sinkhorn"``: the barycenter J/n plus U(0, 0.01/n) noise, made doubly stochastic, independently per model
    (breaks the symmetry between models); ``"identity"``: every model's own order."""
    if init not in INITIALIZATIONS:
        raise ValueError(f"init must be one of {list(INITIALIZATIONS)}, got {init!r}.")
    out = []
    for _ in range(num_models):
        soft = {}
        for name, n in sizes.items():
            if init == "identity":
                soft[name] = torch.eye(n, dtype=torch.float64)
            else:
                noise = torch.rand(n, n, generator=generator, dtype=torch.float64) * (0.01 / n)
                soft[name] = sinkhorn(torch.full((n, n), 1.0 / n, dtype=torch.float64) + noise)
        out.append(soft)
    return out


def _as_matrix(perm: torch.Tensor) -> torch.Tensor:
    return torch.eye(len(perm), dtype=torch.float64)[perm]


def project(spec: PermutationSpec, soft: Soft) -> Perms:
    """The permutation nearest to a doubly stochastic P (max ⟨P, Q⟩ over valid permutations, per unit)."""
    out: Perms = {}
    for unit in spec.units():
        out.update(solve_assignment(spec, unit, {name: soft[name] for name in unit}))
    return out


def frank_wolfe_sync(
    models: Sequence[torch.nn.Module | Mapping[str, torch.Tensor]],
    spec: PermutationSpec,
    *,
    max_iter: int = 200,
    init: str = "sinkhorn",
    seed: int = 0,
    tol: float = 1e-6,
    patience: int = 5,
    anchor: bool = True,
) -> FrankWolfeResult:
    """Run C2M3's Frank–Wolfe synchronisation (Crisostomi et al. 2024) and return permutations, objective trace and soft matrices.

    ``anchor=True`` (default) fixes model 0's matrices to the identity, so the universe is model 0's neuron order.
    This removes the gauge freedom P_A → P_A Q of the objective without changing the value of any permutation
    solution, and avoids a failure of the reference iteration (``anchor=False``): from the symmetric Sinkhorn start
    an even number of models can split into groups settling on different gauges, and the iteration stalls at a soft
    point (2 and 4 permuted copies of one MLP were never / rarely recovered; 8/8 with the anchor).
    """
    if len(models) < 2:
        raise ValueError(f"C2M3 needs at least two models, got {len(models)}.")
    if max_iter < 0 or patience < 1:
        raise ValueError(f"max_iter must be >= 0 and patience >= 1, got {max_iter} and {patience}.")
    labels = [f"model {i}" for i in range(len(models))]
    weights, sizes = spec_tensors(spec, [state_dict_of(m, label) for m, label in zip(models, labels)], labels)
    generator = torch.Generator().manual_seed(seed)
    soft = initial_point(sizes, len(models), init, generator)
    if anchor:
        soft[0] = initial_point(sizes, 1, "identity", generator)[0]
    value, grads = objective_and_gradient(spec, weights, soft)
    history = [value]
    best, stalled, iterations = value, 0, 0
    for iterations in range(1, max_iter + 1):
        direction = []
        for index, (p, g) in enumerate(zip(soft, grads)):
            if anchor and index == 0:
                direction.append({name: torch.zeros_like(m) for name, m in p.items()})
                continue
            vertex = project(spec, g)
            direction.append({name: _as_matrix(vertex[name]) - p[name] for name in p})
        step = maximize_on_unit_interval(segment_polynomial(spec, weights, soft, direction))
        if step == 0.0:  # the oracle's vertex does not improve: P is a fixed point of the iteration
            break
        soft = [{name: p[name] + step * d[name] for name in p} for p, d in zip(soft, direction)]
        value, grads = objective_and_gradient(spec, weights, soft)
        history.append(value)
        if value - best > tol:
            best, stalled = value, 0
        else:
            stalled += 1
            if stalled >= patience:
                break
    perms = [project(spec, p) for p in soft]
    return FrankWolfeResult(perms=perms, objective=history, soft=soft, iterations=iterations)


def c2m3(
    models: Sequence[torch.nn.Module | Mapping[str, torch.Tensor]],
    spec: PermutationSpec,
    max_iter: int = 200,
    init: str = "sinkhorn",
    *,
    seed: int = 0,
    tol: float = 1e-6,
    patience: int = 5,
    anchor: bool = True,
) -> list[Perms]:
    """Cycle-consistent permutations of N models to a shared universe (the reference implementation's defaults: 200 iterations, Sinkhorn
    initialisation). ``perms[A]`` maps model A to the universe: ``apply_permutation(spec, perms[A], state_A)``;
    the pairwise map aligning B to A is ``compose_to(perms[A], perms[B])``."""
    return frank_wolfe_sync(
        models, spec, max_iter=max_iter, init=init, seed=seed, tol=tol, patience=patience, anchor=anchor
    ).perms
