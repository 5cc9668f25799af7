"""Git Re-Basin weight matching (Ainsworth et al. 2023), the pairwise baseline of C2M3 (Sec. 3.2 of the Git Re-Basin paper, "matching weights").

Maximise Σ_tensors ⟨W_A, π(W_B)⟩ over the permutations π of a :class:`PermutationSpec` by coordinate ascent: visit
the permutations in random order; for one permutation with the others fixed the objective is linear,
⟨S, P⟩ with S = Σ_{tensors on its axis} W_A (axis first, flattened) · π_others(W_B)ᵀ, and the best P is a linear
assignment. Stop after a sweep without improvement > 1e-12.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .spec import (
    Perms,
    PermutationSpec,
    apply_permutation,
    identity_permutations,
    solve_assignment,
    state_dict_of,
)


def spec_tensors(
    spec: PermutationSpec, models: list[Mapping[str, torch.Tensor]], labels: list[str]
) -> tuple[list[dict[str, torch.Tensor]], dict[str, int]]:
    """The spec's tensors of every model in float64, after checking all models against the spec and each other."""
    sizes = spec.perm_sizes({k: v.shape for k, v in models[0].items()})
    out = []
    for state, label in zip(models, labels):
        for key in spec.axes:
            if key not in state:
                raise ValueError(f"{label} has no tensor {key!r}, which the permutation spec lists.")
            if tuple(state[key].shape) != tuple(models[0][key].shape):
                raise ValueError(
                    f"Shape mismatch for {key!r}: {labels[0]} has {tuple(models[0][key].shape)}, "
                    f"{label} has {tuple(state[key].shape)}."
                )
            if not state[key].is_floating_point():
                raise ValueError(f"{label}: tensor {key!r} listed in the permutation spec is not floating point.")
        out.append({key: state[key].detach().to(torch.float64) for key in spec.axes})
    return out, sizes


def _flatten_axis(tensor: torch.Tensor, axis: int) -> torch.Tensor:
    return tensor.movedim(axis, 0).reshape(tensor.shape[axis], -1)


def similarity(
    spec: PermutationSpec,
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    perms: Mapping[str, torch.Tensor],
    name: str,
) -> torch.Tensor:
    """S[u, i] = Σ_{(key, axis) of ``name``} ⟨unit u of W_A, unit i of W_B with its other axes permuted⟩."""
    total = None
    for key, axis in spec.perm_axes()[name]:
        other = b[key]
        for other_axis, other_name in enumerate(spec.axes[key]):
            if other_name is not None and other_axis != axis:
                other = other.index_select(other_axis, perms[other_name])
        term = _flatten_axis(a[key], axis) @ _flatten_axis(other, axis).T
        total = term if total is None else total + term
    return total


def _value(scores: torch.Tensor, perm: torch.Tensor) -> float:
    return float(scores[torch.arange(len(perm)), perm].sum())


def weight_matching(
    model_a: torch.nn.Module | Mapping[str, torch.Tensor],
    model_b: torch.nn.Module | Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    *,
    max_iter: int = 100,
    seed: int = 0,
) -> Perms:
    """Permutations aligning model B to model A (Ainsworth et al. 2023, Sec. 3.2).

    Returns ``{perm_name: index}`` such that ``apply_permutation(spec, perms, state_dict_b)`` is B in A's neuron order.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}.")
    (a, b), sizes = spec_tensors(spec, [state_dict_of(model_a, "model_a"), state_dict_of(model_b, "model_b")],
                                 ["model_a", "model_b"])
    perms = identity_permutations(sizes)
    units = spec.units()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(max_iter):
        improved = False
        for index in torch.randperm(len(units), generator=generator).tolist():
            unit = units[index]
            scores = {name: similarity(spec, a, b, perms, name) for name in unit}
            candidate = solve_assignment(spec, unit, scores)
            gain = sum(_value(scores[n], candidate[n]) - _value(scores[n], perms[n]) for n in unit)
            if gain > 1e-12:
                perms.update(candidate)
                improved = True
        if not improved:
            break
    return perms


def matching_objective(
    spec: PermutationSpec, model_a: Mapping[str, torch.Tensor], model_b: Mapping[str, torch.Tensor], perms: Perms
) -> float:
    """Σ over the spec's tensors of ⟨W_A, π(W_B)⟩."""
    aligned = apply_permutation(spec, perms, model_b)
    return float(sum((model_a[k].double() * aligned[k].double()).sum() for k in spec.axes))
