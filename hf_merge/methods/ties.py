"""TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

1. Trim: τ̂_t = τ_t ⊙ [|τ_t| ≥ kthvalue(|τ_t|, d − ⌊d·k⌋)] — the reference's inclusive threshold, which keeps
   ⌊d·k⌋ + 1 entries (more on ties), over the whole model (``scope="global"``) or per tensor (``"tensor"``).
2. Elect: γ = sign(Σ_t τ̂_t); entries whose sum is exactly 0 take the majority sign sign(Σ γ) of the scope.
3. Disjoint merge: τ = Σ_{t∈A} τ̂_t / max(|A|, 1) with A = {t : sign(τ̂_t) = γ, τ̂_t ≠ 0} (``aggregate="sum"`` omits
   the division), and θ = θ₀ + λ τ.

Global scope never materialises a tasks × parameters matrix. Where the engine allows a one-pass merge (the default:
no ``max_memory`` budget, CPU, plain checkpoints/models) it reads the inputs **once** (:class:`OnePassTies`):

1. a sample of 1/1024 of every tensor (evenly spaced blocks) brackets each task's threshold: lo_t < thr_t ≤ hi_t, with
   hi_t and lo_t values of the sample (so a threshold on a value shared by many entries, common with bf16 task
   vectors, sits at hi_t and leaves none of them undecided);
2. one pass merges every tensor in cache-sized pieces, and the engine writes each as it comes: |τ_t| ≥ hi_t is
   kept, |τ_t| ≤ lo_t trimmed; it counts the entries at and above hi_t; entries with an |τ_t| strictly inside a
   bracket are kept aside with their inputs, and entries whose elected sum is exactly 0 (common with bf16 task
   vectors) take the majority sign +1, their result for -1 kept aside;
3. the counts and the kept-aside |τ_t| give each exact threshold (verifying the brackets), which finish the kept-aside
   entries with the exact majority sign: amendments the engine writes in place into the written (not yet published)
   files. A missed bracket, or an exact majority sign of 0, amends every tensor with the passes below.

Step 2 runs as one fused compiled loop (:class:`hf_merge.kernels.TiesOnePassKernel`, numba) when the ``fast`` extra is
installed and the inputs and output are bfloat16/float32; otherwise as torch ops on cache-sized pieces. Both give the
same bits.

Otherwise (a memory budget, DARE in front, LoRA inputs, an accelerator) it streams the exact threshold from
histograms of the float32 bit patterns of |τ_t| (monotone in |τ_t|): one of the high 16 bits, then one of the low 16
bits inside the bin holding the threshold; the global majority sign comes from the second pass when it is settled
there, else from a third; then a merge pass.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..config import MergeConfig, check_choice, check_fraction, check_number
from ..io.sources_dtypes import numpy_view, tensor_copy
from ..kernels import TiesOnePassKernel, kernels_enabled, takes
from ..params import ParamInfo
from ..placement import release_freed_memory
from ..registry import register_method
from .base import Amendment, Merger, OnePassMerge

_HIST_BINS = 1 << 15  # high 16 bits of a non-negative float32: exponent + 7 mantissa bits
_CHUNK = 1 << 22  # elements per chunk of the elementwise merge
_PIECE = 1 << 17  # elements per piece of the one-pass merge (T + 1 pieces and temporaries stay in L3)
_KERNEL_BLOCK = 1 << 20  # elements per call of the compiled one-pass kernel (bounds its scratch buffers)
_RELEASE_EVERY = 256 << 20  # input bytes between returns of freed memory to the OS in the one pass
#: The bracketing sample: one block of 1024 elements in 1024 (~0.5M values per task of a 0.5B model: brackets
#: leaving ~3K entries open on the merge benchmark, against ~1.4K for a 4× denser sample that takes twice as long).
_SAMPLE_BLOCK, _SAMPLE_EVERY = 1024, 1024
#: Half-width of a threshold bracket, in sample ranks: this many binomial standard deviations of the sample quantile
#: (allowing for blocks of correlated entries), and at least this fraction of the sample.
_BRACKET_SIGMAS, _BRACKET_MIN_FRACTION = 12.0, 0.0025
#: The one pass is skipped when a bracket would leave more than this fraction of the entries, and more than this
#: many entries, undecided (they are held with their inputs until the thresholds are known).
_MAX_OPEN_FRACTION, _MAX_OPEN_ALWAYS = 0.04, 1 << 22


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
    """Σ_{t∈A} τ̂_t (divided by max(|A|, 1) for "mean"), A = tasks agreeing with γ and non-zero (τ̂_t·γ > 0).

    Float arithmetic only (boolean masks are several times slower on the CPU): max(τ̂_t·γ, 0) is |τ̂_t| on A and 0
    elsewhere, and Σ_A τ̂_t = γ·Σ_A |τ̂_t| exactly (rounding is symmetric in sign).
    """
    agreeing = (trimmed * signs).clamp_(min=0)
    total = agreeing.sum(dim=0).mul_(signs)
    if aggregate == "mean":
        total = total / torch.sign(agreeing).sum(dim=0).clamp_(min=1)
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
        self.one_pass = None
        if self.config.scope == "global":
            if ctx.can_merge_in_one_pass:
                one_pass = OnePassTies(ctx, self.config, self._exact_outputs)
                if one_pass.bracket():
                    self.one_pass = one_pass
                    return
            self.thresholds, self.majority_sign = self._global_statistics(ctx)

    def _exact_outputs(self, ctx) -> Iterator[tuple[str, torch.Tensor]]:
        """Every output tensor from the exact streaming passes (the one pass's fallback)."""
        self.thresholds, self.majority_sign = self._global_statistics(ctx)
        for key, base, deltas in ctx.iter_deltas("merging (ties)"):
            merged = base + self.merge_tensor(key, base, deltas, ctx.infos[key])
            yield key, merged.to("cpu", ctx.output_dtypes[key])

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


#: ``(key, flat indices, θ₀, τ)`` of the entries the one pass left open, in float32.
OpenEntries = list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]


class OnePassTies(OnePassMerge):
    """Global-scope TIES reading every input once (see the module docstring): :meth:`bracket` samples, :meth:`merge`
    writes each tensor's provisional output, :meth:`amendments` finishes the entries left open."""

    def __init__(self, ctx, config: TiesConfig,
                 exact_outputs: Callable[[Any], Iterator[tuple[str, torch.Tensor]]]) -> None:
        self.ctx, self.config, self.exact_outputs = ctx, config, exact_outputs
        self.sources = [ctx.base, *ctx.tasks.values()]
        self.numel = {k: math.prod(ctx.metas[k].shape) for k in ctx.merge_keys}
        total = sum(self.numel.values())
        self.rank = threshold_rank(total, config.density)
        self.keep = total - self.rank + 1  # the threshold is the keep-th largest |τ_t|
        self.settled: bool | None = None  # after the amendments: whether the one pass settled every entry

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
        self.kernel, self.compiled = None, set()  # the keys the compiled kernel merges
        if kernels_enabled():
            self.kernel = TiesOnePassKernel(num_tasks, self.low.view(-1).tolist(), self.high.view(-1).tolist(),
                                            self.config.scaling, self.config.aggregate == "mean", _KERNEL_BLOCK)
            self.compiled = {k for k in self.ctx.merge_keys
                             if takes([s.meta(k).dtype for s in self.sources], self.ctx.output_dtypes[k])}
        self.since_release = 0
        return True

    def _brackets(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(lo_t, hi_t) with lo_t < thr_t ≤ hi_t expected, from a 1/1024 sample of every tensor; ``None`` when a
        bracket would leave too many entries undecided."""
        from tqdm.auto import tqdm

        samples: list[list[torch.Tensor]] = [[] for _ in self.sources[1:]]
        stride = _SAMPLE_BLOCK * _SAMPLE_EVERY
        for key in tqdm(self.ctx.merge_keys, desc="TIES threshold sample", unit="tensor", leave=False,
                        disable=not self.ctx.progress):
            n = self.numel[key]
            if n < stride:  # small tensor: every _SAMPLE_EVERY-th entry
                pieces = [s.read_blocks(key, [0], n)[::_SAMPLE_EVERY].float() for s in self.sources]
            else:
                starts = range(0, n - _SAMPLE_BLOCK + 1, stride)
                pieces = [s.read_blocks(key, starts, _SAMPLE_BLOCK).float() for s in self.sources]
            for t, piece in enumerate(pieces[1:]):
                magnitude = (piece - pieces[0]).abs()
                samples[t].append(magnitude[torch.isfinite(magnitude)])
        low, high = [], []
        total = sum(self.numel.values())
        for values in samples:
            values = torch.cat(values).numpy()
            count = values.size
            position = self.keep / total * count  # descending rank of the threshold in the sample
            spread = _BRACKET_SIGMAS * math.sqrt(max(position * (1 - position / max(count, 1)), 1.0))
            half = max(spread, _BRACKET_MIN_FRACTION * count, 16.0)
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
            if undecided * total > max(_MAX_OPEN_FRACTION * total, _MAX_OPEN_ALWAYS):
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
            for start in range(0, self.numel[key], _PIECE):
                pieces = [r[start : start + _PIECE] for r in inputs]
                flat_out[start : start + pieces[0].numel()] = self._merge_piece(key, start, pieces)
        self.since_release += sum(r.nbytes for r in inputs)
        if self.since_release > _RELEASE_EVERY:
            release_freed_memory()
            self.since_release = 0

    def _merge_compiled(self, key: str, arrays: Sequence[np.ndarray], flat_out: torch.Tensor) -> None:
        """The fused kernel's version of the :meth:`_merge_piece` loop over one tensor (same bits); ``arrays`` are
        the flat inputs (:meth:`~hf_merge.io.TensorSource.flat_array`)."""
        out = numpy_view(flat_out)
        for start in range(0, self.numel[key], _KERNEL_BLOCK):
            end = start + _KERNEL_BLOCK
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
            negative = disjoint_merge(trimmed[:, zero_index], -torch.ones(zero_index.numel()), self.config.aggregate)
            negative = (base[zero_index] + negative.mul_(self.config.scaling)).to(self.ctx.output_dtypes[key])
            self.if_negative.append((key, start + zero_index, negative))
        merged = disjoint_merge(trimmed, signs.add_(zero_sum), self.config.aggregate)
        result = base + merged.mul_(self.config.scaling)
        self.ctx.check_finite(result, self.sources, key, pieces)  # a merge overflowing float32 is an error
        return result.to(self.ctx.output_dtypes[key])

    def _thresholds(self, open_entries: OpenEntries) -> list[float] | None:
        """Each task's exact threshold from the counts at and above hi_t and the |τ_t| strictly inside its bracket
        (all among the open entries); ``None`` if a threshold lies outside its bracket."""
        if self.rank == 0:
            return [0.0] * (len(self.sources) - 1)
        thresholds = []
        for t in range(len(self.sources) - 1):
            if int(self.strictly_above[t]) < self.keep <= int(self.at_or_above[t]):
                thresholds.append(self.high[t, 0].item())  # the threshold is hi_t itself
                continue
            low, high = self.low[t, 0].item(), self.high[t, 0].item()
            parts = [m[(m > low) & (m < high)] for *_, deltas in open_entries for m in (deltas[t].abs(),)]
            values = torch.cat(parts) if parts else torch.empty(0)
            position = self.keep - int(self.at_or_above[t])  # descending rank of the threshold among those inside
            if not 1 <= position <= values.numel():
                return None
            thresholds.append(values.kthvalue(values.numel() - position + 1).values.item())
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
            majority = float(torch.sign(torch.tensor(float(mass))))
        self.settled = majority != 0
        if not self.settled:
            for key, values in self.exact_outputs(self.ctx):
                yield key, None, values
            return
        if majority < 0:
            yield from self.if_negative
        for (key, index, base, _), kept in zip(self.open_entries, trimmed):
            merged = disjoint_merge(kept, elect_signs(kept, majority), self.config.aggregate)
            yield key, index, (base + merged.mul_(self.config.scaling)).to(self.ctx.output_dtypes[key])


register_method(TiesConfig, TiesMerger)
