"""TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

1. Trim: τ̂_t = τ_t ⊙ [|τ_t| ≥ kthvalue(|τ_t|, d − ⌊d·k⌋)] — the reference's inclusive threshold, which keeps
   ⌊d·k⌋ + 1 entries (more on ties), over the whole model (``scope="global"``) or per tensor (``"tensor"``).
2. Elect: γ = sign(Σ_t τ̂_t); entries whose sum is exactly 0 take the majority sign sign(Σ γ) of the scope.
3. Disjoint merge: τ = Σ_{t∈A} τ̂_t / max(|A|, 1) with A = {t : sign(τ̂_t) = γ, τ̂_t ≠ 0} (``aggregate="sum"`` omits
   the division), and θ = θ₀ + λ τ.

Global scope never materialises a tasks × parameters matrix. Where the engine allows a one-pass merge (the default:
no ``max_memory`` budget, CPU, plain checkpoints/models) it reads the inputs **once**
(:class:`~hf_merge.methods.ties_one_pass.OnePassTies`: sampled threshold brackets, a provisional merge, amendments).
Otherwise (a memory budget, DARE in front, LoRA inputs, an accelerator) it streams the exact thresholds and majority
sign first (:func:`~hf_merge.methods.ties_statistics.global_statistics`: histograms of the float32 bit patterns of
|τ_t|), then merges tensor by tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

from ..config import (
    MergeConfig,
    MethodCard,
    SearchSpace,
    check_choice,
    check_fraction,
    check_number,
    per_task_items,
    resolve_per_task,
)
from ..params import ParamInfo
from ..registry import register_method
from ..tuning import TUNING
from .base import Merger
from .grids import arange
from .ties_one_pass import OnePassTies, OpenEntries
from .ties_statistics import global_statistics

if TYPE_CHECKING:
    from ..context import MergeContext

__all__ = [
    "TIES_GRID", "OnePassTies", "OpenEntries", "TiesConfig", "TiesMerger", "disjoint_merge", "elect_signs",
    "threshold_rank", "trim_threshold",
]

#: λ's validation grid in the TIES code: 0.8 .. 2.5 in steps of 0.1.
TIES_GRID = arange(0.8, 2.55, 0.1)


@dataclasses.dataclass(kw_only=True)
class TiesConfig(MergeConfig):
    """``density`` is the kept fraction k (official default 0.2), ``scaling`` λ (1.0 is the paper's no-validation
    default; official grid 0.8–2.5), ``scope`` "global" (official) or "tensor", ``aggregate`` "mean" or "sum"."""

    method: str = dataclasses.field(default="ties", init=False)
    density: float | Sequence[float] | Mapping[str, float] = 0.2
    scaling: float = 1.0
    scope: str = "global"
    aggregate: str = "mean"

    card: ClassVar[MethodCard] = MethodCard(
        title="TIES-Merging",
        summary=(
            "TIES reduces interference between task vectors in three steps: it trims each task vector to its "
            "largest-magnitude entries (the rest are reset to zero), elects a sign for every parameter from the "
            "summed trimmed vectors, and averages only the entries that agree with the elected sign (a disjoint "
            "mean). The result is scaled and added to the pre-trained model."
        ),
        bibtex="""@inproceedings{yadav2023ties,
  title     = {{TIES}-Merging: Resolving Interference When Merging Models},
  author    = {Yadav, Prateek and Tam, Derek and Choshen, Leshem and Raffel, Colin and Bansal, Mohit},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2023}
}""",
        paper_url="https://arxiv.org/abs/2306.01708",
    )

    def __post_init__(self) -> None:
        for label, density in per_task_items("density", self.density):
            check_fraction(label, density, low_open=True)
        check_number("scaling", self.scaling)
        check_choice("scope", self.scope, ("global", "tensor"))
        check_choice("aggregate", self.aggregate, ("mean", "sum"))

    def search_space(self) -> SearchSpace:
        """λ over ``arange(0.8, 2.55, 0.1)``; the thresholds and signs do not depend on λ, so the merge is linear."""
        return SearchSpace("scaling", TIES_GRID, "linear")


def threshold_rank(numel: int, density: float) -> int:
    """1-based rank of the trim threshold among the sorted |τ| (0 means keep everything)."""
    return 0 if density >= 1.0 else numel - int(numel * density)


def trim_threshold(delta: torch.Tensor, density: float) -> float:
    """Threshold of one tensor: the (d − ⌊d·k⌋)-th smallest |τ|, kept inclusively."""
    rank = threshold_rank(delta.numel(), density)
    if rank == 0:
        return 0.0
    return delta.abs().flatten().kthvalue(rank).values.item()


def elect_signs(trimmed: torch.Tensor, majority_sign: float | None = None) -> torch.Tensor:
    """γ = sign(Σ_t τ̂_t) over a (T, ...) stack; exact zeros take ``majority_sign`` (default: of this tensor)."""
    signs = torch.sign(trimmed.sum(dim=0))
    if majority_sign is None:
        majority_sign = float(torch.sign(signs.sum()))
    return torch.where(signs == 0, torch.full_like(signs, majority_sign), signs)


def disjoint_merge(trimmed: torch.Tensor, signs: torch.Tensor, aggregate: str = "mean") -> torch.Tensor:
    """Σ_{t∈A} τ̂_t (divided by max(|A|, 1) for "mean"), A = tasks agreeing with γ and non-zero (τ̂_t·γ > 0).

    Float arithmetic only (boolean masks are several times slower on the CPU): max(τ̂_t·γ, 0) is |τ̂_t| on A and 0
    elsewhere, and Σ_A τ̂_t = γ·Σ_A |τ̂_t| exactly (rounding is symmetric in sign).
    """
    agreeing = (trimmed * signs).clamp_(min=0)
    total = agreeing.sum(dim=0).mul_(signs)
    if aggregate == "mean":
        total = total / torch.sign(agreeing).sum(dim=0).clamp_(min=1)
    return total


def elected_chunks(deltas: list[torch.Tensor]) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """``(chunk, (T, n) task vectors, γ)`` over cache-sized chunks of the flattened tensors (TIES steps 2–3 for
    methods that elect signs on already-sparsified task vectors): γ = sign(Σ_t τ_t), exact zeros taking the tensor's
    majority sign, which is summed over every chunk first, so chunked results equal unchunked ones."""
    flat = [delta.reshape(-1) for delta in deltas]
    chunks = [slice(i, i + TUNING.ties_chunk) for i in range(0, flat[0].numel(), TUNING.ties_chunk)]

    def stacked(chunk: slice) -> torch.Tensor:
        return torch.stack([f[chunk] for f in flat])

    mass = sum(float(torch.sign(stacked(chunk).sum(dim=0)).sum()) for chunk in chunks)
    majority = float(torch.sign(torch.tensor(mass)))
    for chunk in chunks:
        part = stacked(chunk)
        yield chunk, part, elect_signs(part, majority)


class TiesMerger(Merger):
    uses_param_info = False
    config: TiesConfig

    def prepare(self, ctx: MergeContext) -> None:
        self.thresholds: list[float] | None = None
        self.majority_sign: float | None = None
        self.one_pass = None
        self.densities = [float(d) for d in resolve_per_task("density", self.config.density, ctx.task_names)]
        if self.config.scope == "global":
            if ctx.can_merge_in_one_pass and len(set(self.densities)) == 1:  # one keep count: the one-pass route
                one_pass = OnePassTies(ctx, self.config, self._exact_outputs, self.densities[0])
                if one_pass.bracket():
                    self.one_pass = one_pass
                    return
            self.thresholds, self.majority_sign = global_statistics(ctx, self.densities)

    def _exact_outputs(self, ctx: MergeContext) -> Iterator[tuple[str, torch.Tensor]]:
        """Every output tensor from the exact streaming passes (the one pass's fallback)."""
        self.thresholds, self.majority_sign = global_statistics(ctx, self.densities)
        for key, base, deltas in ctx.iter_deltas("merging (ties)"):
            merged = base + self.merge_tensor(key, base, deltas, ctx.infos[key])
            yield key, merged.to("cpu", ctx.output_dtypes[key])

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        if self.thresholds is not None:
            thresholds = self.thresholds
        else:
            thresholds = [trim_threshold(d, density) for d, density in zip(deltas, self.densities)]
        flat = [d.reshape(-1) for d in deltas]
        chunk_size = TUNING.ties_chunk
        chunks = [slice(i, i + chunk_size) for i in range(0, flat[0].numel(), chunk_size)]

        def trimmed(chunk: slice) -> torch.Tensor:
            return torch.stack([d[chunk] * (d[chunk].abs() >= thr) for d, thr in zip(flat, thresholds)])

        majority = self.majority_sign
        if majority is None:  # tensor scope: the majority sign of this tensor, summed chunk by chunk
            mass = sum(float(torch.sign(trimmed(chunk).sum(dim=0)).sum()) for chunk in chunks)
            majority = float(torch.sign(torch.tensor(mass)))
        out = torch.empty_like(flat[0])
        for chunk in chunks:  # elementwise from here: bounded temporaries for embedding-sized tensors
            part = trimmed(chunk)
            out[chunk] = disjoint_merge(part, elect_signs(part, majority), self.config.aggregate)
        return out.view_as(deltas[0]).mul_(self.config.scaling)


register_method(TiesConfig, TiesMerger)
