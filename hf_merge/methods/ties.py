"""TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

1. Trim: τ̂_t = τ_t ⊙ [|τ_t| ≥ kthvalue(|τ_t|, d − ⌊d·k⌋)] — the reference's inclusive threshold, which keeps
   ⌊d·k⌋ + 1 entries (more on ties), over the whole model (``scope="global"``) or per tensor (``"tensor"``).
2. Elect: γ = sign(Σ_t τ̂_t); entries whose sum is exactly 0 take the majority sign sign(Σ γ) of the scope.
3. Disjoint merge: τ = Σ_{t∈A} τ̂_t / max(|A|, 1) with A = {t : sign(τ̂_t) = γ, τ̂_t ≠ 0} (``aggregate="sum"`` omits
   the division), and θ = θ₀ + λ τ.

Global scope streams: the exact per-task threshold is found without a tasks × parameters matrix, from histograms
of the float32 bit patterns of |τ_t| (monotone in |τ_t|): one of the high 16 bits, then one of the low 16 bits inside
the bin holding the threshold; the global majority sign comes from the second pass when it is settled there, else
from a third.
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from ..config import MergeConfig, check_choice, check_fraction, check_number
from ..params import ParamInfo
from ..registry import register_method
from .base import Merger

_HIST_BINS = 1 << 15  # high 16 bits of a non-negative float32: exponent + 7 mantissa bits
_CHUNK = 1 << 22  # elements per chunk of the elementwise merge


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


def _bit_halves(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 16 bits of the float32 pattern of |τ| as zero-copy views.

    For non-negative floats the bit pattern is monotone in the value, so the high half (exponent + 7 mantissa bits)
    is a histogram bin and the low half orders values inside one bin.
    """
    halves = delta.abs().flatten().view(torch.int16)
    high, low = (halves[1::2], halves[0::2]) if sys.byteorder == "little" else (halves[0::2], halves[1::2])
    return high, low


class TiesMerger(Merger):
    uses_param_info = False
    config: TiesConfig

    def prepare(self, ctx) -> None:
        self.thresholds: list[float] | None = None
        self.majority_sign: float | None = None
        if self.config.scope == "global":
            self.thresholds, self.majority_sign = self._global_statistics(ctx)

    def _global_statistics(self, ctx) -> tuple[list[float], float]:
        """Exact whole-model thresholds and majority sign, streamed; no values are stored.

        Pass 1 histograms the high 16 bits of |τ_t|; pass 2 histograms the low 16 bits inside the bin holding each
        task's threshold, and sums the elected signs of the entries no threshold bin can change. When that partial
        sum outweighs the undecided entries the majority sign is settled; otherwise a third pass sums it exactly.
        """
        num_tasks = len(ctx.task_names)
        if self.config.density >= 1.0:
            return [0.0] * num_tasks, self._majority_sign(ctx, [0.0] * num_tasks)
        coarse = torch.zeros(num_tasks, _HIST_BINS, dtype=torch.int64)
        numel = 0
        for _, _, deltas in ctx.iter_deltas("TIES threshold (1/2)"):
            numel += deltas[0].numel()
            for t, delta in enumerate(deltas):
                coarse[t] += torch.bincount(_bit_halves(delta)[0], minlength=_HIST_BINS).cpu()
        rank = threshold_rank(numel, self.config.density)
        bins, ranks_in_bin = [], []
        for t in range(num_tasks):
            cumulative = coarse[t].cumsum(0)
            b = int(torch.searchsorted(cumulative, torch.tensor(rank)))
            bins.append(b)
            ranks_in_bin.append(rank - (int(cumulative[b - 1]) if b > 0 else 0))

        fine = torch.zeros(num_tasks, 1 << 16, dtype=torch.int64)
        decided_mass, undecided = 0, 0
        for _, _, deltas in ctx.iter_deltas("TIES threshold (2/2)"):
            kept_sum = torch.zeros_like(deltas[0])
            ambiguous = torch.zeros(deltas[0].shape, dtype=torch.bool, device=deltas[0].device)
            for t, delta in enumerate(deltas):
                high, low = _bit_halves(delta)
                in_bin = high == bins[t]
                fine[t] += torch.bincount(low[in_bin].to(torch.int32) & 0xFFFF, minlength=1 << 16).cpu()
                kept_sum += delta * (high > bins[t]).view_as(delta)
                ambiguous |= in_bin.view_as(delta)
            undecided += int(ambiguous.sum())
            decided_mass += int(torch.sign(kept_sum[~ambiguous]).sum())
        thresholds = []
        for t in range(num_tasks):
            low = int(torch.searchsorted(fine[t].cumsum(0), torch.tensor(ranks_in_bin[t])))
            bits = torch.tensor([(bins[t] << 16) | low], dtype=torch.int32)
            thresholds.append(float(bits.view(torch.float32)))
        if abs(decided_mass) > undecided:
            return thresholds, float(1 if decided_mass > 0 else -1)
        return thresholds, self._majority_sign(ctx, thresholds)

    @staticmethod
    def _majority_sign(ctx, thresholds: list[float]) -> float:
        """sign(Σ over all entries of γ) for the trimmed task vectors, in one streaming pass."""
        limits = torch.tensor(thresholds, device=ctx.device).view(-1, 1)
        mass = 0
        for _, _, deltas in ctx.iter_deltas("TIES majority sign"):
            stacked = torch.stack([d.flatten() for d in deltas])
            mass += int(torch.sign((stacked * (stacked.abs() >= limits)).sum(dim=0)).sum())
        return float(torch.sign(torch.tensor(float(mass))))

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        if self.thresholds is not None:
            thresholds = self.thresholds
        else:
            thresholds = [trim_threshold(d, self.config.density) for d in deltas]
        flat = [d.reshape(-1) for d in deltas]
        chunks = [slice(i, i + _CHUNK) for i in range(0, flat[0].numel(), _CHUNK)]

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
