"""Averaging aligned models: the merge step shared by weight matching and C2M3."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .spec import Perms, PermutationSpec, apply_permutation, compose_to


def align_to_first(
    spec: PermutationSpec, states: Sequence[Mapping[str, torch.Tensor]], perms: Sequence[Perms]
) -> list[dict[str, torch.Tensor]]:
    """Every model in the neuron order of the first one, given universe permutations ``perms[A]`` (model A → universe).

    Model A is permuted by the pairwise map P_0A = P_0 P_Aᵀ (:func:`compose_to`), so the result is the universe
    average expressed in model 0's order — any order is functionally equivalent, and a merge of permuted copies of
    one model gives that model back unchanged.
    """
    if len(states) != len(perms):
        raise ValueError(f"{len(states)} models but {len(perms)} sets of permutations.")
    return [apply_permutation(spec, compose_to(perms[0], p), s) for s, p in zip(states, perms)]


def average_states(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Mean of the floating-point tensors (accumulated in float32 or wider, returned in the first model's dtype);
    other tensors (e.g. ``num_batches_tracked``) are taken from the first model."""
    out: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            out[key] = first
            continue
        accumulator = torch.promote_types(first.dtype, torch.float32)
        total = sum(s[key].to(accumulator) for s in states)
        out[key] = (total / len(states)).to(first.dtype)
    return out


def merge_permuted(
    spec: PermutationSpec, states: Sequence[Mapping[str, torch.Tensor]], perms: Sequence[Perms]
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """(merged state dict, aligned state dicts): the average in the universe (C2M3, Crisostomi et al. 2024: ``average_in_universe``)."""
    aligned = align_to_first(spec, states, perms)
    return average_states(aligned), aligned
