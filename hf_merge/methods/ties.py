"""TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

1. Trim: τ̂_t = τ_t ⊙ [|τ_t| ≥ kthvalue(|τ_t|, d − ⌊d·k⌋)] — the reference's inclusive threshold, which keeps
   ⌊d·k⌋ + 1 entries (more on ties), over the whole model (``scope="global"``) or per tensor (``"tensor"``).
2. Elect: γ = sign(Σ_t τ̂_t); entries whose sum is exactly 0 take the majority sign sign(Σ γ) of the scope.
3. Disjoint merge: τ = Σ_{t∈A} τ̂_t / max(|A|, 1) with A = {t : sign(τ̂_t) = γ, τ̂_t ≠ 0} (``aggregate="sum"`` omits
   the division), and θ = θ₀ + λ τ.

Global scope streams: the exact per-task threshold is found without a tasks × parameters matrix, by a histogram
of the float32 bit patterns of |τ_t| (monotone in |τ_t|) and an exact selection inside the one bin holding it.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import MergeConfig, check_choice, check_fraction, check_number
from ..params import ParamInfo
from ..registry import register_method
from .base import Merger

_HIST_SHIFT = 16  # 2**15 bins over the non-negative float32 bit patterns (exponent + 7 mantissa bits)
_HIST_BINS = 1 << (31 - _HIST_SHIFT)


@dataclasses.dataclass(kw_only=True)
class TiesConfig(MergeConfig):
    """``density`` is the kept fraction k (official default 0.2), ``scaling`` λ (1.0 is the paper's no-validation
    default; official grid 0.8–2.5), ``scope`` "global" (official) or "tensor", ``aggregate`` "mean" or "sum"."""

    method: str = dataclasses.field(default="ties", init=False)
    density: float = 0.2
    scaling: float = 1.0
    scope: str = "global"
    aggregate: str = "mean"

    def __post_init__(self) -> None:
        check_fraction("density", self.density, low_open=True)
        check_number("scaling", self.scaling)
        check_choice("scope", self.scope, ("global", "tensor"))
        check_choice("aggregate", self.aggregate, ("mean", "sum"))


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
    """Σ_{t∈A} τ̂_t (divided by max(|A|, 1) for "mean"), A = tasks agreeing with γ and non-zero."""
    agree = (torch.sign(trimmed) == signs) & (trimmed != 0)
    total = (trimmed * agree).sum(dim=0)
    if aggregate == "mean":
        total = total / agree.sum(dim=0).clamp(min=1)
    return total


def _magnitude_bins(delta: torch.Tensor) -> torch.Tensor:
    """Histogram bin of every |τ|: the top bits of its float32 pattern (monotone in |τ|)."""
    return (delta.abs().view(torch.int32) >> _HIST_SHIFT).flatten().long()


class TiesMerger(Merger):
    config: TiesConfig

    def prepare(self, ctx) -> None:
        self.thresholds: list[float] | None = None
        self.majority_sign: float | None = None
        if self.config.scope == "global":
            self.thresholds, self.majority_sign = self._global_statistics(ctx)

    def _global_statistics(self, ctx) -> tuple[list[float], float]:
        """Exact global thresholds and majority sign in two streaming passes."""
        num_tasks = len(ctx.task_names)
        density = self.config.density
        # Pass 1: histogram of |τ_t| per task.
        counts = torch.zeros(num_tasks, _HIST_BINS, dtype=torch.int64)
        numel = 0
        if density < 1.0:
            for _, _, deltas in ctx.iter_deltas("TIES threshold (1/2)"):
                numel += deltas[0].numel()
                for t, delta in enumerate(deltas):
                    counts[t] += torch.bincount(_magnitude_bins(delta).cpu(), minlength=_HIST_BINS)
        threshold_bins, ranks_in_bin = [], []
        for t in range(num_tasks):
            rank = threshold_rank(numel, density) if density < 1.0 else 0
            if rank == 0:
                threshold_bins.append(-1)  # keep everything
                ranks_in_bin.append(0)
                continue
            cumulative = counts[t].cumsum(0)
            b = int(torch.searchsorted(cumulative, torch.tensor(rank)))
            threshold_bins.append(b)
            ranks_in_bin.append(rank - (int(cumulative[b - 1]) if b > 0 else 0))

        # Pass 2: exact selection inside the threshold bin; sign mass of the elements decided without it.
        in_bin: list[list[torch.Tensor]] = [[] for _ in range(num_tasks)]
        undecided: list[torch.Tensor] = []
        sign_mass = 0
        for _, _, deltas in ctx.iter_deltas("TIES threshold (2/2)"):
            stacked = torch.stack([d.flatten() for d in deltas])
            bins = stacked.abs().view(torch.int32) >> _HIST_SHIFT
            bin_of_task = torch.tensor(threshold_bins, dtype=torch.int32, device=stacked.device).unsqueeze(1)
            ambiguous = bins == bin_of_task
            for t in range(num_tasks):
                if threshold_bins[t] >= 0:
                    in_bin[t].append(stacked[t][ambiguous[t]].abs().cpu())
            any_ambiguous = ambiguous.any(dim=0)
            decided = stacked[:, ~any_ambiguous]
            kept = decided * (bins[:, ~any_ambiguous] > bin_of_task)
            sign_mass += int(torch.sign(kept.sum(dim=0)).sum())
            undecided.append(stacked[:, any_ambiguous].cpu())
        thresholds = []
        for t in range(num_tasks):
            if threshold_bins[t] < 0:
                thresholds.append(0.0)
            else:
                thresholds.append(torch.cat(in_bin[t]).kthvalue(ranks_in_bin[t]).values.item())
        if undecided:
            rest = torch.cat(undecided, dim=1)
            limits = torch.tensor(thresholds).unsqueeze(1)
            sign_mass += int(torch.sign((rest * (rest.abs() >= limits)).sum(dim=0)).sum())
        return thresholds, float(torch.sign(torch.tensor(float(sign_mass))))

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        if self.thresholds is not None:
            thresholds = self.thresholds
        else:
            thresholds = [trim_threshold(d, self.config.density) for d in deltas]
        trimmed = torch.stack([d * (d.abs() >= thr) for d, thr in zip(deltas, thresholds)])
        signs = elect_signs(trimmed, self.majority_sign)
        return disjoint_merge(trimmed, signs, self.config.aggregate).mul_(self.config.scaling)


register_method(TiesConfig, TiesMerger)
