"""Global-scope TIES reading every input once (the route :class:`~hf_merge.methods.ties.TiesMerger` takes where the
engine allows it: no memory budget, CPU, plain checkpoints/models).

1. a sample of 1/1024 of every tensor (evenly spaced blocks) brackets each task's threshold: lo_t < thr_t ≤ hi_t, with
   hi_t and lo_t values of the sample (so a threshold on a value shared by many entries, common with bf16 task
   vectors, sits at hi_t and leaves none of them undecided);
2. one pass merges every tensor in cache-sized pieces, and the engine writes each as it comes: |τ_t| ≥ hi_t is
   kept, |τ_t| ≤ lo_t trimmed; it counts the entries at and above hi_t; entries with an |τ_t| strictly inside a
   bracket are kept aside with their inputs, and entries whose elected sum is exactly 0 (common with bf16 task
   vectors) take the majority sign +1, their result for -1 kept aside;
3. the counts and the kept-aside |τ_t| give each exact threshold (verifying the brackets), which finish the kept-aside
   entries with the exact majority sign: amendments the engine writes in place into the written (not yet published)
   files. On a merge split across processes every process samples the whole model (the same brackets), merges its
   own tensors, and the counts, the majority mass and the selection among the kept-aside |τ_t| are summed over the
   processes (:func:`~hf_merge.methods.ties_statistics.kth_smallest_across`). A missed bracket, or an exact majority sign of 0, amends every tensor with the exact streaming passes
   (:mod:`hf_merge.methods.ties_statistics`).

Step 2 runs as one fused compiled loop (:func:`hf_merge.kernels.fused_ties_one_pass`) where the kernels are available
and take the inputs' and output's dtypes; otherwise as torch ops on cache-sized pieces. Both give the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..kernels import fused_ties_one_pass
from ..tensors import check_output_finite, kth_smallest, numpy_view, tensor_copy
from ..tuning import TUNING
from . import ties
from .base import Amendment, OnePassMerge
from .ties_statistics import kth_smallest_across

if TYPE_CHECKING:
    from ..context import MergeContext
    from .ties import TiesConfig

#: Half-width of a threshold bracket, in sample ranks: this many binomial standard deviations of the sample quantile
#: (allowing for blocks of correlated entries), and at least this fraction of the sample.
BRACKET_SIGMAS, BRACKET_MIN_FRACTION = 12.0, 0.0025
#: The one pass is skipped when a bracket would leave more than this fraction of the entries, and more than this
#: many entries, undecided (they are held with their inputs until the thresholds are known).
MAX_OPEN_FRACTION, MAX_OPEN_ALWAYS = 0.04, 1 << 22


#: ``(key, flat indices, θ₀, τ)`` of the entries the one pass left open, in float32.
OpenEntries = list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]


class OnePassTies(OnePassMerge):
    """Global-scope TIES reading every input once (see the module docstring): :meth:`bracket` samples, :meth:`merge`
    writes each tensor's provisional output, :meth:`amendments` finishes the entries left open."""

    def __init__(self, ctx: MergeContext, config: TiesConfig,
                 exact_outputs: Callable[[MergeContext], Iterator[tuple[str, torch.Tensor]]], density: float) -> None:
        self.ctx, self.config, self.exact_outputs = ctx, config, exact_outputs
        self.sources = [ctx.base, *ctx.tasks.values()]
        # every key of the model, also on a split merge (each process samples them all: the same brackets everywhere)
        self.numel = {k: math.prod(ctx.metas[k].shape) for k in ctx.all_keys}
        total = sum(self.numel.values())
        self.rank = ties.threshold_rank(total, density)
        self.keep = total - self.rank + 1  # the threshold is the keep-th largest |τ_t|
        self.settled: bool | None = None  # after the amendments: whether the one pass settled every entry
        self.kept_fraction: float | None = None  # after settled amendments: the fraction of |τ_t| at or above thr_t

    def bracket(self) -> bool:
        """Bracket each task's threshold from a sample; ``False`` when a bracket would leave too many entries
        undecided (then the exact streaming passes are the better route)."""
        num_tasks = len(self.sources) - 1
        if self.rank == 0:  # density 1: everything is kept, only the majority sign is open
            self.low = self.high = torch.full((num_tasks, 1), -1.0)
        else:
            brackets = self._brackets()
            if brackets is None:
                return False
            self.low, self.high = brackets
        self.at_or_above = torch.zeros(num_tasks, dtype=torch.int64)
        self.strictly_above = torch.zeros(num_tasks, dtype=torch.int64)
        self.open_entries: OpenEntries = []
        self.if_negative: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (key, flat indices, outputs if M = -1)
        self.decided_mass = 0
        self.kernel = fused_ties_one_pass(num_tasks, self.low.view(-1).tolist(), self.high.view(-1).tolist(),
                                          self.config.scaling, self.config.aggregate == "mean", TUNING.ties_kernel_block)
        self.compiled: set[str] = set()  # the keys the compiled kernel merges
        if self.kernel is not None:
            self.compiled = {k for k in self.ctx.merge_keys
                             if self.kernel.accepts([s.meta(k).dtype for s in self.sources], self.ctx.output_dtypes[k])}
        return True

    def _brackets(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(lo_t, hi_t) with lo_t < thr_t ≤ hi_t expected, from a 1/1024 sample of every tensor; ``None`` when a
        bracket would leave too many entries undecided."""
        samples: list[list[torch.Tensor]] = [[] for _ in self.sources[1:]]
        sample_block, sample_every = TUNING.ties_sample_block, TUNING.ties_sample_every
        stride = sample_block * sample_every
        for key in self.ctx.tracker.track(self.ctx.all_keys, "TIES threshold sample"):
            n = self.numel[key]
            if n < stride:  # small tensor: every sample_every-th entry
                pieces = [s.read_blocks(key, [0], n)[::sample_every].float() for s in self.sources]
            else:
                starts = range(0, n - sample_block + 1, stride)
                pieces = [s.read_blocks(key, starts, sample_block).float() for s in self.sources]
            for t, piece in enumerate(pieces[1:]):
                magnitude = (piece - pieces[0]).abs()
                samples[t].append(magnitude[torch.isfinite(magnitude)])
        low, high = [], []
        total = sum(self.numel.values())
        for values in samples:
            values = torch.cat(values).numpy()
            count = values.size
            position = self.keep / total * count  # descending rank of the threshold in the sample
            spread = BRACKET_SIGMAS * math.sqrt(max(position * (1 - position / max(count, 1)), 1.0))
            half = max(spread, BRACKET_MIN_FRACTION * count, 16.0)
            top, bottom = math.floor(position - half), math.ceil(position + half)  # descending ranks, 1-based
            # ascending 0-based positions of the two bracket ends; one np.partition selects both (~3× faster than
            # two torch.kthvalue calls)
            ends = [count - rank for rank in (top, bottom) if 1 <= rank <= count]
            ordered = np.partition(values, ends) if ends else values
            hi = float(ordered[count - top]) if 1 <= top <= count else math.inf
            lo = -1.0  # nothing trimmed by the bracket alone
            if 1 <= bottom <= count:
                left = ordered[: count - bottom]  # every value ≤ the bottom end; the largest one below it is lo
                below = left[left < ordered[count - bottom]]
                lo = float(below.max()) if below.size else -1.0
            undecided = int(np.count_nonzero((values > lo) & (values < hi))) / max(count, 1)  # estimated fraction
            if undecided * total > max(MAX_OPEN_FRACTION * total, MAX_OPEN_ALWAYS):
                return None
            low.append(lo)
            high.append(hi)
        return torch.tensor(low).view(-1, 1), torch.tensor(high).view(-1, 1)

    def load(self, key: str) -> list[torch.Tensor] | list[np.ndarray]:
        """Arrays for the kernel (checkpoint tensors mapped, not copied), else flat tensors."""
        if key in self.compiled:
            return [source.flat_array(key) for source in self.sources]
        return [source.get(key).reshape(-1) for source in self.sources]

    def merge(self, key: str, inputs: list[torch.Tensor] | list[np.ndarray], out: torch.Tensor) -> None:
        """``key`` merged into ``out`` with the entries inside a bracket provisionally trimmed; records what the
        amendments need."""
        flat_out = out.view(-1)
        if key in self.compiled:
            self._merge_compiled(key, inputs, flat_out)
        else:
            piece = TUNING.ties_piece
            for start in range(0, self.numel[key], piece):
                pieces = [r[start : start + piece] for r in inputs]
                flat_out[start : start + pieces[0].numel()] = self._merge_piece(key, start, pieces)

    def _merge_compiled(self, key: str, arrays: Sequence[np.ndarray], flat_out: torch.Tensor) -> None:
        """The fused kernel's version of the :meth:`_merge_piece` loop over one tensor (same bits); ``arrays`` are
        the flat inputs (:meth:`~hf_merge.io.TensorSource.flat_array`)."""
        out = numpy_view(flat_out)
        block_size = self.kernel.block
        for start in range(0, self.numel[key], block_size):
            end = start + block_size
            block = self.kernel(arrays[0][start:end], tuple(a[start:end] for a in arrays[1:]), out[start:end], start)
            if block is None:  # a non-finite kept sum or result: the torch route raises, naming the input holding
                # NaN/Inf, or the overflow
                pieces = [tensor_copy(a[start:end], s.meta(key).dtype) for a, s in zip(arrays, self.sources)]
                flat_out[start : start + pieces[0].numel()] = self._merge_piece(key, start, pieces)
                continue
            self.at_or_above += torch.from_numpy(block.at_or_above)
            self.strictly_above += torch.from_numpy(block.strictly_above)
            self.decided_mass += block.decided_mass
            if block.open_index.size:
                values = torch.from_numpy(block.open_values)
                self.open_entries.append((key, torch.from_numpy(block.open_index), values[0], values[1:]))
            if block.zero_index.size:
                negative = torch.from_numpy(block.zero_negative).view(flat_out.dtype)
                self.if_negative.append((key, torch.from_numpy(block.zero_index), negative))

    def _deltas(self, key: str, pieces: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 θ₀ and (T, n) task vectors of one piece, after checking the inputs are finite."""
        base = pieces[0].to("cpu", torch.float32)
        deltas = torch.empty((len(pieces) - 1, base.numel()), dtype=torch.float32)
        for row, piece in zip(deltas, pieces[1:]):
            row.copy_(piece)
        deltas.sub_(base)
        self.ctx.check_finite(deltas, self.sources, key, pieces)
        return base, deltas

    def _merge_piece(self, key: str, start: int, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
        """One piece merged with |τ_t| ≥ hi_t kept and the rest trimmed, and an exactly-zero elected sum taking the
        majority sign +1; records what the final step needs. Masks are float 0/1 tensors (boolean ones are several
        times slower on the CPU)."""
        base, deltas = self._deltas(key, pieces)
        magnitude = deltas.abs()
        versus_high = torch.sign(magnitude - self.high)  # -1 below hi_t, 0 at it, +1 above
        kept = (versus_high + 1).clamp_(max=1)
        self.at_or_above += kept.sum(dim=1).to(torch.int64)
        self.strictly_above += versus_high.clamp(min=0).sum(dim=1).to(torch.int64)
        inside = torch.sign(magnitude - self.low).clamp_(min=0).mul_(versus_high.neg_().clamp_(min=0)).amax(dim=0)
        open_index = inside.nonzero().squeeze(1)  # an |τ_t| strictly inside its bracket: finished at the end
        if open_index.numel():
            self.open_entries.append((key, start + open_index, base[open_index], deltas[:, open_index]))
        trimmed = deltas.mul_(kept)
        signs = torch.sign(trimmed.sum(dim=0))
        self.decided_mass += int(signs.sum()) - int(signs[open_index].sum())
        # An elected sum of exactly 0 with a non-zero τ̂_t takes the majority sign: +1 now, the -1 result kept aside.
        zero_sum = (1 - signs.abs()).mul_(torch.sign(trimmed.abs().sum(dim=0))).mul_(1 - inside)
        zero_index = zero_sum.nonzero().squeeze(1)
        if zero_index.numel():
            negative = ties.disjoint_merge(trimmed[:, zero_index], -torch.ones(zero_index.numel()), self.config.aggregate)
            negative = (base[zero_index] + negative.mul_(self.config.scaling)).to(self.ctx.output_dtypes[key])
            self.if_negative.append((key, start + zero_index, negative))
        merged = ties.disjoint_merge(trimmed, signs.add_(zero_sum), self.config.aggregate)
        result = base + merged.mul_(self.config.scaling)
        self.ctx.check_finite(result, self.sources, key, pieces)  # a merge overflowing float32 is an error
        return check_output_finite(key, result.to(self.ctx.output_dtypes[key]), result)

    def _thresholds(self, open_entries: OpenEntries) -> list[float] | None:
        """Each task's exact threshold from the counts at and above hi_t and the |τ_t| strictly inside its bracket
        (all among the open entries); ``None`` if a threshold lies outside its bracket."""
        if self.rank == 0:
            return [0.0] * (len(self.sources) - 1)
        ctx = self.ctx
        self.at_or_above, self.strictly_above = ctx.all_sum(self.at_or_above), ctx.all_sum(self.strictly_above)
        thresholds = []
        for t in range(len(self.sources) - 1):
            if int(self.strictly_above[t]) < self.keep <= int(self.at_or_above[t]):
                thresholds.append(self.high[t, 0].item())  # the threshold is hi_t itself
                continue
            low, high = self.low[t, 0].item(), self.high[t, 0].item()
            parts = [m[(m > low) & (m < high)] for *_, deltas in open_entries for m in (deltas[t].abs(),)]
            values = torch.cat(parts) if parts else torch.empty(0)
            count = int(ctx.all_sum(torch.tensor(values.numel())))
            position = self.keep - int(self.at_or_above[t])  # descending rank of the threshold among those inside
            if not 1 <= position <= count:
                return None
            thresholds.append(kth_smallest(values, count - position + 1) if ctx.owned is None
                              else kth_smallest_across(ctx, values, count - position + 1))
        return thresholds

    def amendments(self) -> Iterator[Amendment]:
        """The open entries merged with the exact thresholds, and the cancelling entries' results for a majority sign
        of −1. Where a threshold missed its bracket, or the majority sign is exactly 0 (the one case not prepared
        for), every output comes again from the exact streaming passes."""
        thresholds = self._thresholds(self.open_entries)
        majority = 0.0
        if thresholds is not None:
            limits = torch.tensor(thresholds).view(-1, 1)
            trimmed = [deltas * (deltas.abs() >= limits) for *_, deltas in self.open_entries]
            mass = self.decided_mass + sum(int(torch.sign(t.sum(dim=0)).sum()) for t in trimmed)
            majority = float(torch.sign(self.ctx.all_sum(torch.tensor(mass)).double()))
            if self.rank:  # kept: at or above hi_t (counted in the pass), or open and at or above thr_t
                kept = self.at_or_above + self.ctx.all_sum(sum(
                    (((m >= limits) & (m < self.high)).sum(dim=1) for *_, deltas in self.open_entries
                     for m in (deltas.abs(),)), torch.zeros(len(thresholds), dtype=torch.int64)))
                self.kept_fraction = float(kept.sum()) / (len(thresholds) * sum(self.numel.values()))
        self.settled = majority != 0
        if not self.settled:
            for key, values in self.exact_outputs(self.ctx):
                yield key, None, values
            return
        if majority < 0:
            yield from self.if_negative
        for (key, index, base, _), kept in zip(self.open_entries, trimmed):
            merged = ties.disjoint_merge(kept, ties.elect_signs(kept, majority), self.config.aggregate)
            yield key, index, (base + merged.mul_(self.config.scaling)).to(self.ctx.output_dtypes[key])
