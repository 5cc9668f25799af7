"""TIES' exact whole-model statistics, streamed: each task's trim threshold (the top-k % of its task vector over all
parameters) and the global majority sign (of exactly-zero elected sums), without storing any value.

The float32 bit pattern of |τ| is monotone in |τ|, so a histogram of its high 16 bits (exponent and 7 mantissa bits)
locates the bin holding each task's threshold, and one of the low 16 bits inside that bin gives it exactly. Every
statistic is an integer count, summed exactly over the processes of a distributed merge (``ctx.all_sum``).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch

from . import ties

if TYPE_CHECKING:
    from ..context import MergeContext

#: Bins of the high 16 bits of a non-negative float32: exponent + 7 mantissa bits (the sign bit is 0).
HIST_BINS = 1 << 15


def bit_halves(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 16 bits of the float32 pattern of |τ| as zero-copy views.

    For non-negative floats the bit pattern is monotone in the value, so the high half (exponent + 7 mantissa bits)
    is a histogram bin and the low half orders values inside one bin.
    """
    halves = delta.abs().flatten().view(torch.int16)
    high, low = (halves[1::2], halves[0::2]) if sys.byteorder == "little" else (halves[0::2], halves[1::2])
    return high, low


def locate(histogram: torch.Tensor, rank: int) -> tuple[int, int]:
    """``(bin, rank inside it)`` of the ``rank``-th smallest (1-based) counted value of a histogram."""
    cumulative = histogram.cumsum(0)
    b = int(torch.searchsorted(cumulative, torch.tensor(rank)))
    return b, rank - (int(cumulative[b - 1]) if b > 0 else 0)


def from_bits(high: int, low: int) -> float:
    """The non-negative float32 whose high and low 16 bits are these."""
    return float(torch.tensor([(high << 16) | low], dtype=torch.int32).view(torch.float32))


def kth_smallest_across(ctx: MergeContext, values: torch.Tensor, k: int) -> float:
    """The k-th smallest (1-based) of the non-negative float32 ``values`` held by every process of a split merge
    (each its own), exactly: the histograms of their high, then low 16 bits, summed over the processes."""
    high, low = bit_halves(values)
    b, in_bin = locate(ctx.all_sum(torch.bincount(high, minlength=HIST_BINS)), k)
    fine = ctx.all_sum(torch.bincount(low[high == b].to(torch.int32) & 0xFFFF, minlength=1 << 16))
    return from_bits(b, locate(fine, in_bin)[0])


def global_statistics(ctx: MergeContext, densities: list[float], weights: list[float] | None = None,
                      ) -> tuple[list[float], float]:
    """Exact whole-model thresholds (task t keeps ``densities[t]`` of its entries) and majority sign of the task
    vectors ``ctx.iter_deltas()`` (elected on Σ_t w_t τ̂_t, ``weights`` w_t or ``None`` for 1), streamed.

    Pass 1 histograms the high 16 bits of |τ_t|; pass 2 histograms the low 16 bits inside the bin holding each
    task's threshold, and sums the elected signs of the entries no threshold bin can change. When that partial
    sum outweighs the undecided entries the majority sign is settled; otherwise a third pass sums it exactly.
    """
    num_tasks = len(ctx.task_names)
    if all(density >= 1.0 for density in densities):
        return [0.0] * num_tasks, majority_sign(ctx, [0.0] * num_tasks, weights)
    coarse = torch.zeros(num_tasks, HIST_BINS, dtype=torch.int64)
    numel = 0
    for _, _, deltas in ctx.iter_deltas("TIES threshold (1/2)"):
        numel += deltas[0].numel()
        for t, delta in enumerate(deltas):
            coarse[t] += torch.bincount(bit_halves(delta)[0], minlength=HIST_BINS).cpu()
    numel = int(ctx.all_sum(torch.tensor(numel)))
    coarse = ctx.all_sum(coarse)
    bins, ranks_in_bin = [], []
    for t in range(num_tasks):
        rank = ties.threshold_rank(numel, densities[t])
        if rank == 0:  # keeps everything: threshold 0, no bin to refine (-1: every |τ| is above it)
            bins.append(-1)
            ranks_in_bin.append(0)
            continue
        b, in_bin = locate(coarse[t], rank)
        bins.append(b)
        ranks_in_bin.append(in_bin)

    fine = torch.zeros(num_tasks, 1 << 16, dtype=torch.int64)
    decided_mass, undecided = 0, 0
    for _, _, deltas in ctx.iter_deltas("TIES threshold (2/2)"):
        kept_sum = torch.zeros_like(deltas[0])
        ambiguous = torch.zeros(deltas[0].shape, dtype=torch.bool, device=deltas[0].device)
        for t, delta in enumerate(deltas):
            high, low = bit_halves(delta)
            in_bin = high == bins[t]
            fine[t] += torch.bincount(low[in_bin].to(torch.int32) & 0xFFFF, minlength=1 << 16).cpu()
            kept = delta * (high > bins[t]).view_as(delta)
            kept_sum += kept if weights is None else kept * weights[t]
            ambiguous |= in_bin.view_as(delta)
        undecided += int(ambiguous.sum())
        decided_mass += int(torch.sign(kept_sum[~ambiguous]).sum())
    fine = ctx.all_sum(fine)
    decided_mass, undecided = ctx.all_sum(torch.tensor([decided_mass, undecided])).tolist()
    thresholds = [0.0 if bins[t] < 0 else from_bits(bins[t], locate(fine[t], ranks_in_bin[t])[0])
                  for t in range(num_tasks)]
    if abs(decided_mass) > undecided:
        return thresholds, float(1 if decided_mass > 0 else -1)
    return thresholds, majority_sign(ctx, thresholds, weights)


def majority_sign(ctx: MergeContext, thresholds: list[float], weights: list[float] | None = None) -> float:
    """sign(Σ over all entries of γ) for the task vectors trimmed at ``thresholds`` (and weighted), in one streaming
    pass."""
    limits = torch.tensor(thresholds, device=ctx.device).view(-1, 1)
    column = ties.weight_column(weights, limits)
    mass = 0
    for _, _, deltas in ctx.iter_deltas("TIES majority sign"):
        stacked = torch.stack([d.flatten() for d in deltas])
        trimmed = stacked * (stacked.abs() >= limits)
        mass += int(torch.sign((trimmed if column is None else trimmed * column).sum(dim=0)).sum())
    mass = int(ctx.all_sum(torch.tensor(mass)))
    return float(torch.sign(torch.tensor(float(mass))))
