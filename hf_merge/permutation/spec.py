"""Permutation specs: which tensor axes share which permutation of hidden units.

A hidden unit (an MLP neuron, a conv channel, a residual-stream feature, an attention head dimension) can be
renumbered without changing the function a network computes, provided every tensor axis that indexes that unit is
renumbered the same way. A :class:`PermutationSpec` names those permutations and lists, for each tensor, the
permutation acting on each of its axes (``None`` for an axis that is never permuted).

Index convention (as in Git Re-Basin, Ainsworth et al. 2023): a permutation is an index tensor ``p`` with P = I[p], so P W = W[p]; permuting axis ``k``
of a tensor by ``p`` is ``W.index_select(k, p)``. Position ``u`` of the permuted tensor holds unit ``p[u]``.

Attention heads: a :class:`HeadGroup` ties permutations that share one head-level permutation (heads move as whole
blocks of ``head_dim`` rows), each with its own within-head permutation — the q/k permutation (qᵀk is invariant)
and the v/o permutation of one attention layer. Rotary models allow no within-head q/k permutation
(``within=False``). :func:`solve_assignment` solves the linear assignment problem over exactly these structured
permutations, which is what weight matching and the Frank–Wolfe oracle need.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

Perms = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class HeadGroup:
    """Permutations ``perms`` (each of size ``num_heads · head_dim``) that share one head-level permutation.

    ``within[i]`` says whether ``perms[i]`` may also permute the dimensions inside each head (``False`` for the q/k
    permutation of a rotary model).
    """

    perms: tuple[str, ...]
    num_heads: int
    within: tuple[bool, ...]

    def __post_init__(self) -> None:
        if not self.perms:
            raise ValueError("A HeadGroup needs at least one permutation name.")
        if len(self.within) != len(self.perms):
            raise ValueError(
                f"HeadGroup {self.perms}: within has {len(self.within)} flags for {len(self.perms)} perms."
            )
        if self.num_heads < 1:
            raise ValueError(f"HeadGroup {self.perms}: num_heads must be >= 1, got {self.num_heads}.")


@dataclasses.dataclass
class PermutationSpec:
    """``axes[key]`` is one entry per axis of tensor ``key``: a permutation name or ``None``.

    Tensors of the model that are not listed are never permuted (e.g. the output layer's bias).
    """

    axes: dict[str, tuple[str | None, ...]]
    head_groups: tuple[HeadGroup, ...] = ()

    def __post_init__(self) -> None:
        self.axes = {key: tuple(value) for key, value in self.axes.items()}
        grouped: dict[str, HeadGroup] = {}
        for group in self.head_groups:
            for name in group.perms:
                if name in grouped:
                    raise ValueError(f"Permutation {name!r} is in two head groups.")
                if name not in self.perm_names:
                    raise ValueError(f"Head group names permutation {name!r}, which no tensor axis uses.")
                grouped[name] = group
        self._group_of = grouped

    @property
    def perm_names(self) -> list[str]:
        """Every permutation name, in order of first use."""
        names: dict[str, None] = {}
        for value in self.axes.values():
            for name in value:
                if name is not None:
                    names.setdefault(name)
        return list(names)

    def perm_axes(self) -> dict[str, list[tuple[str, int]]]:
        """``{perm: [(key, axis), ...]}``: every tensor axis each permutation acts on."""
        out: dict[str, list[tuple[str, int]]] = {name: [] for name in self.perm_names}
        for key, value in self.axes.items():
            for axis, name in enumerate(value):
                if name is not None:
                    out[name].append((key, axis))
        return out

    def units(self) -> list[tuple[str, ...]]:
        """Independent assignment problems: each head group, and each permutation outside head groups."""
        out: list[tuple[str, ...]] = []
        seen: set[str] = set()
        for name in self.perm_names:
            if name in seen:
                continue
            group = self._group_of.get(name)
            members = group.perms if group is not None else (name,)
            seen.update(members)
            out.append(members)
        return out

    def head_group(self, name: str) -> HeadGroup | None:
        return self._group_of.get(name)

    def perm_sizes(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
        """Size of every permutation, checking the spec against a model's ``{key: shape}``.

        Raises ``ValueError`` naming the tensor when a key is missing, an axis count is wrong, two axes sharing a
        permutation disagree in size, or a head group's size is not a multiple of its number of heads.
        """
        sizes: dict[str, int] = {}
        where: dict[str, str] = {}
        for key, value in self.axes.items():
            if key not in shapes:
                raise ValueError(f"Permutation spec lists tensor {key!r}, which the model does not have.")
            shape = tuple(shapes[key])
            if len(value) != len(shape):
                raise ValueError(
                    f"Permutation spec gives {len(value)} axes for tensor {key!r}, whose shape is {shape}."
                )
            for axis, name in enumerate(value):
                if name is None:
                    continue
                if name in sizes and sizes[name] != shape[axis]:
                    raise ValueError(
                        f"Permutation {name!r} acts on axis {axis} of {key!r} (size {shape[axis]}) and on "
                        f"{where[name]} (size {sizes[name]})."
                    )
                sizes.setdefault(name, shape[axis])
                where.setdefault(name, f"axis {axis} of {key!r}")
        for group in self.head_groups:
            for name in group.perms:
                if sizes[name] % group.num_heads:
                    raise ValueError(
                        f"Permutation {name!r} has size {sizes[name]}, not a multiple of {group.num_heads} heads."
                    )
        return sizes


# ----------------------------------------------------------------------------------------------- applying
def state_dict_of(model: torch.nn.Module | Mapping[str, torch.Tensor], label: str = "model") -> dict[str, torch.Tensor]:
    """The ``{key: tensor}`` of an ``nn.Module`` or a state dict (detached, no copies)."""
    if isinstance(model, torch.nn.Module):
        return {k: v.detach() for k, v in model.state_dict().items()}
    if isinstance(model, Mapping):
        for key, value in model.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{label}: entry {key!r} is a {type(value).__name__}, not a torch.Tensor.")
        return dict(model)
    raise TypeError(f"{label}: expected an nn.Module or a state dict, got {type(model).__name__}.")


def apply_permutation(
    spec: PermutationSpec, perms: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Permute every listed axis: ``W.index_select(axis, perms[name])``; unlisted tensors are returned unchanged."""
    out = dict(state)
    for key, value in spec.axes.items():
        tensor = state[key]
        for axis, name in enumerate(value):
            if name is not None:
                tensor = tensor.index_select(axis, perms[name].to(tensor.device))
        out[key] = tensor
    return out


def invert(perm: torch.Tensor) -> torch.Tensor:
    """The inverse index permutation: ``invert(p)[p[u]] = u``."""
    return torch.argsort(perm)


def compose_to(perms_a: Mapping[str, torch.Tensor], perms_b: Mapping[str, torch.Tensor]) -> Perms:
    """Pairwise map from universe permutations: the permutation that aligns model B to model A.

    With ``perms_x[name][u]`` the unit of model X at universe position u, unit i of A corresponds to B's unit
    ``perms_b[invert(perms_a)[i]]`` — the factorisation P_AB = P_A P_Bᵀ of C2M3 (Crisostomi et al. 2024), cycle-consistent by construction.
    """
    return {name: perms_b[name][invert(perms_a[name])] for name in perms_a}


def identity_permutations(sizes: Mapping[str, int]) -> Perms:
    return {name: torch.arange(size) for name, size in sizes.items()}


def random_permutations(spec: PermutationSpec, sizes: Mapping[str, int], generator: torch.Generator) -> Perms:
    """A uniformly random valid permutation per unit (head groups: random head order and within-head orders)."""
    out: Perms = {}
    for unit in spec.units():
        group = spec.head_group(unit[0])
        if group is None:
            out[unit[0]] = torch.randperm(sizes[unit[0]], generator=generator)
            continue
        head_order = torch.randperm(group.num_heads, generator=generator)
        for name, within in zip(group.perms, group.within):
            head_dim = sizes[name] // group.num_heads
            pieces = []
            for source_head in head_order.tolist():
                inner = torch.randperm(head_dim, generator=generator) if within else torch.arange(head_dim)
                pieces.append(source_head * head_dim + inner)
            out[name] = torch.cat(pieces)
    return out


# ----------------------------------------------------------------------------------------------- assignment
def _lap(scores: torch.Tensor) -> tuple[torch.Tensor, float]:
    """argmax_q Σ_u S[u, q[u]] over permutations (Hungarian, ``scipy.optimize.linear_sum_assignment``)."""
    from scipy.optimize import linear_sum_assignment

    matrix = scores.detach().to("cpu", torch.float64).numpy()
    rows, cols = linear_sum_assignment(matrix, maximize=True)
    return torch.as_tensor(cols, dtype=torch.long), float(matrix[rows, cols].sum())


def solve_assignment(spec: PermutationSpec, unit: Sequence[str], scores: Mapping[str, torch.Tensor]) -> Perms:
    """Maximise Σ_name Σ_u S_name[u, q_name[u]] over the valid permutations of one unit.

    A plain permutation is one Hungarian solve. A head group is solved exactly: for every pair (head h, source head
    h') the best within-head assignment of each member (or the diagonal when ``within`` is false) gives a head score;
    a Hungarian solve over heads then picks the head permutation, and each member's permutation is the composition
    of the head permutation with the chosen within-head assignments.
    """
    group = spec.head_group(unit[0])
    if group is None:
        return {unit[0]: _lap(scores[unit[0]])[0]}
    heads = group.num_heads
    head_scores = torch.zeros(heads, heads, dtype=torch.float64)
    inner: dict[tuple[str, int, int], torch.Tensor] = {}
    for name, within in zip(group.perms, group.within):
        matrix = scores[name].detach().to("cpu", torch.float64)
        head_dim = matrix.shape[0] // heads
        blocks = matrix.reshape(heads, head_dim, heads, head_dim).permute(0, 2, 1, 3)
        for h in range(heads):
            for g in range(heads):
                if within:
                    order, value = _lap(blocks[h, g])
                else:
                    order, value = torch.arange(head_dim), float(blocks[h, g].diagonal().sum())
                inner[(name, h, g)] = order
                head_scores[h, g] += value
    head_order, _ = _lap(head_scores)
    out: Perms = {}
    for name in group.perms:
        head_dim = scores[name].shape[0] // heads
        out[name] = torch.cat([g * head_dim + inner[(name, h, g)] for h, g in enumerate(head_order.tolist())])
    return out


# ----------------------------------------------------------------------------------------------- validation
def example_inputs(model: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor] | torch.Tensor:
    """Inputs for a forward pass: token ids (with padding) or pixels for transformers models, else a random batch
    shaped for the first ``Linear``/``Conv2d`` layer."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "vocab_size") and not hasattr(config, "image_size"):
        input_ids = torch.randint(0, config.vocab_size, (3, 9), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, -3:] = 0
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if getattr(config, "type_vocab_size", 0) > 1:
            inputs["token_type_ids"] = torch.randint(0, config.type_vocab_size, (3, 9), generator=generator)
        return inputs
    if config is not None and hasattr(config, "image_size"):
        size = config.image_size
        return {"pixel_values": torch.randn(3, getattr(config, "num_channels", 3), size, size, generator=generator)}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            return torch.randn(8, module.in_features, generator=generator)
        if isinstance(module, torch.nn.Conv2d):
            return torch.randn(4, module.in_channels, 12, 12, generator=generator)
    raise ValueError(f"Cannot build example inputs for {type(model).__name__}; pass inputs= to validate_spec.")


def _forward(model: torch.nn.Module, inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def validate_spec(
    model: torch.nn.Module,
    spec: PermutationSpec,
    inputs: Any = None,
    *,
    seed: int = 0,
    trials: int = 2,
    rtol: float = 1e-4,
) -> float:
    """Check that ``spec`` describes symmetries of ``model``: random permutations must leave the outputs unchanged.

    Applies ``trials`` random valid permutations to a copy of the model and compares its outputs on ``inputs``
    (default: :func:`example_inputs`) with the original's. Returns the largest relative difference; raises
    ``ValueError`` if it exceeds ``rtol`` (the spec misses or misplaces a permutation).
    """
    generator = torch.Generator().manual_seed(seed)
    model = model.eval()
    state = state_dict_of(model)
    sizes = spec.perm_sizes({k: v.shape for k, v in state.items()})
    if inputs is None:
        inputs = example_inputs(model, generator)
    reference = _forward(model, inputs)
    scale = reference.abs().max().clamp_min(1e-12)
    worst = 0.0
    for _ in range(trials):
        perms = random_permutations(spec, sizes, generator)
        permuted = copy.deepcopy(model)
        permuted.load_state_dict(apply_permutation(spec, perms, state))
        worst = max(worst, float((_forward(permuted, inputs) - reference).abs().max() / scale))
    if worst > rtol:
        raise ValueError(
            f"Permutation spec does not describe a symmetry of {type(model).__name__}: permuting changed the "
            f"outputs by {worst:.3g} (relative), more than rtol={rtol}."
        )
    return worst

