"""The numba kernels behind :mod:`hf_merge.kernels` (imported only when they run: importing numba costs ~0.3 s).

Compiled on first use and cached on disk by numba (``cache=True``).
"""

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic, overload

#: Elements per parallel work item of a kernel (its own slice of every scratch buffer).
KERNEL_CHUNK = 1 << 14



@intrinsic
def bits_to_float32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return types.float32(types.uint32), codegen


@intrinsic
def float32_to_bits(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))

    return types.uint32(types.float32), codegen


def load(array, index):
    """``array[index]`` as float32, bfloat16 coming as its uint16 bit pattern (compiled: the overload below)."""
    if array.dtype == np.uint16:
        return (np.uint32(array[index]) << np.uint32(16)).view(np.float32)
    return np.float32(array[index])


def store(array, index, value):
    """``array[index] = value`` (float32), rounded to nearest even into bfloat16 bits for a uint16 array."""
    if array.dtype == np.uint16:
        bits = int(np.float32(value).view(np.uint32))
        array[index] = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    else:
        array[index] = value


@overload(load, inline="always")
def _load(array, index):
    if array.dtype == types.uint16:  # bfloat16: the high half of a float32
        return lambda array, index: bits_to_float32(np.uint32(array[index]) << np.uint32(16))
    return lambda array, index: np.float32(array[index])


@overload(store, inline="always")
def _store(array, index, value):
    if array.dtype == types.uint16:  # float32 → bfloat16, round to nearest even (finite values)

        def store_bf16(array, index, value):
            bits = float32_to_bits(value)
            array[index] = np.uint16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
                                     >> np.uint32(16))

        return store_bf16

    def store_f32(array, index, value):
        array[index] = value

    return store_f32


SEGMENT = 1024  # entries per inner loop; inner loops index per-segment views from 0 (an index with an offset
# makes numba emit negative-index wraparound, which stops LLVM vectorising: measured 10× slower)


@numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
def ties_one_pass(base, tasks, out, offset, low, high, scaling, mean, limit, counts, open_index, open_values,
                  zero_index, zero_negative):
    """One block of one-pass TIES (see :class:`hf_merge.kernels.TiesOnePassKernel`); chunk c of ``counts`` gets
    [at-or-above per task, strictly-above per task, decided mass, #open, #zero-sum, #non-finite kept sums or results] and its
    open and zero-sum entries go to the buffers' slots from c·KERNEL_CHUNK on."""
    n = base.shape[0]
    num_tasks = len(tasks)
    zero32, one32 = np.float32(0.0), np.float32(1.0)
    for chunk in numba.prange(counts.shape[0]):
        begin, end = chunk * KERNEL_CHUNK, min(n, (chunk + 1) * KERNEL_CHUNK)
        kept = np.empty((num_tasks, SEGMENT), np.float32)
        theta0 = np.empty(SEGMENT, np.float32)
        kept_sum = np.empty(SEGMENT, np.float32)
        elected = np.empty(SEGMENT, np.float32)
        agreed = np.empty(SEGMENT, np.float32)
        agreeing = np.empty(SEGMENT, np.float32)
        is_open = np.empty(SEGMENT, np.uint8)
        any_kept = np.empty(SEGMENT, np.uint8)
        set_aside = np.empty(SEGMENT, np.uint8)
        aside_index = np.empty(SEGMENT, np.int32)
        counts[chunk, :] = 0
        opened, zeros, mass, nonfinite = 0, 0, 0, 0
        for start in range(begin, end, SEGMENT):
            size = min(SEGMENT, end - start)
            base_part, out_part = base[start : start + size], out[start : start + size]
            for j in range(size):
                theta0[j] = load(base_part, j)
                kept_sum[j] = zero32
                agreed[j] = zero32
                agreeing[j] = zero32
                is_open[j] = 0
                any_kept[j] = 0
            # every loop over j below is branch-free, so it vectorises
            for t in range(num_tasks):  # trim: kept[t] = τ_t where |τ_t| ≥ hi_t; open where lo_t < |τ_t| < hi_t
                task, hi, lo, row = tasks[t][start : start + size], high[t], low[t], kept[t]
                at_or_above, above = 0, 0
                for j in range(size):
                    delta = load(task, j) - theta0[j]
                    magnitude = abs(delta)
                    keep = not (magnitude < hi)  # also NaN: a non-finite τ_t reaches the kept sum, checked there
                    value = delta if keep else zero32
                    row[j] = value
                    kept_sum[j] += value
                    at_or_above += keep
                    above += magnitude > hi
                    is_open[j] |= (magnitude > lo) & (not keep)
                    any_kept[j] |= value != zero32
                counts[chunk, t] += at_or_above
                counts[chunk, num_tasks + t] += above
            segment_mass, found, bad = 0, 0, 0
            for j in range(size):  # elect: γ = sign(Σ kept), an exact 0 taking +1
                total = kept_sum[j]
                bad += not (abs(total) < np.inf)  # NaN/Inf in an input, or a kept sum overflowing float32
                sign = one32 if total > zero32 else (-one32 if total < zero32 else zero32)
                segment_mass += int(sign) * (1 - is_open[j])
                elected[j] = one32 if sign == zero32 else sign
                # set aside: open, or an exact cancellation of kept values (then its result for γ = −1 is needed)
                set_aside[j] = is_open[j] | ((sign == zero32) & any_kept[j])
                found += set_aside[j]
            mass += segment_mass
            for t in range(num_tasks):  # disjoint: the kept τ_t agreeing with γ
                row = kept[t]
                for j in range(size):
                    value = row[j] * elected[j]
                    positive = value > zero32
                    agreed[j] += value if positive else zero32
                    agreeing[j] += one32 if positive else zero32
            if mean:
                for j in range(size):
                    result = theta0[j] + (agreed[j] * elected[j] / max(agreeing[j], one32)) * scaling
                    bad += not (abs(result) < limit)  # a merge overflowing float32 or the output dtype
                    store(out_part, j, result)
            else:
                for j in range(size):
                    result = theta0[j] + (agreed[j] * elected[j]) * scaling
                    bad += not (abs(result) < limit)
                    store(out_part, j, result)
            nonfinite += bad
            if found == 0:
                continue
            aside = 0  # the set-aside positions, compacted without a branch per entry (measured 13% faster)
            for j in range(size):
                aside_index[aside] = j
                aside += set_aside[j]
            for i in range(aside):
                j = aside_index[i]
                if is_open[j]:
                    slot = begin + opened
                    open_index[0, slot] = offset + start + j
                    open_values[0, slot] = theta0[j]
                    opened += 1
                    for t in range(num_tasks):
                        open_values[t + 1, slot] = load(tasks[t], start + j) - theta0[j]
                    continue
                negative, count = zero32, zero32  # exact cancellation: the result for γ = −1
                for t in range(num_tasks):
                    value = -kept[t, j]
                    if value > zero32:
                        negative += value
                        count += one32
                merged = -negative / max(count, one32) if mean else -negative
                slot = begin + zeros
                zero_index[0, slot] = offset + start + j
                store(zero_negative[0], slot, theta0[j] + merged * scaling)
                zeros += 1
        counts[chunk, 2 * num_tasks] = mass
        counts[chunk, 2 * num_tasks + 1] = opened
        counts[chunk, 2 * num_tasks + 2] = zeros
        counts[chunk, 2 * num_tasks + 3] = nonfinite


@numba.njit(nogil=True, cache=True, boundscheck=False)
def gather_regions(buffer, counts):
    """The filled heads of the chunks' regions of a (rows, n) buffer (chunk c filled ``counts[c]`` columns from
    c·KERNEL_CHUNK on), concatenated in chunk order."""
    out = np.empty((buffer.shape[0], counts.sum()), buffer.dtype)
    position = 0
    for chunk in range(counts.shape[0]):
        size = counts[chunk]
        if size:
            out[:, position : position + size] = buffer[:, chunk * KERNEL_CHUNK : chunk * KERNEL_CHUNK + size]
            position += size
    return out


@intrinsic
def fused_multiply_add(typingctx, a, b, c):
    """a·b + c rounded once (LLVM's fma), as torch's vectorised ``add_(other, alpha=w)`` computes it."""

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False, fastmath={"reassoc", "contract"})
def gram(first, others, partials):
    """``partials[c]`` = the float64 Gram matrix of [x_0, τ_1, ..., τ_T] over chunk c, with τ_t = x_t − x_0 rounded
    to float32 (every product is exact in float64; the chunks' sums are added by the caller)."""
    n = first.shape[0]
    size = len(others) + 1
    for chunk in numba.prange(partials.shape[0]):
        begin, end = chunk * KERNEL_CHUNK, min(n, (chunk + 1) * KERNEL_CHUNK)
        vectors = np.empty((size, SEGMENT), np.float64)
        sums = np.zeros((size, size), np.float64)
        for start in range(begin, end, SEGMENT):
            length = min(SEGMENT, end - start)
            base = first[start : start + length]
            for j in range(length):
                vectors[0, j] = load(base, j)
            for t in range(len(others)):
                part = others[t][start : start + length]
                for j in range(length):
                    vectors[t + 1, j] = np.float32(load(part, j) - load(base, j))
            for a in range(size):
                for b in range(a, size):
                    total = 0.0
                    for j in range(length):
                        total += vectors[a, j] * vectors[b, j]
                    sums[a, b] += total
        for a in range(size):
            for b in range(a, size):
                partials[chunk, a, b] = sums[a, b]
                partials[chunk, b, a] = sums[a, b]


@numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
def linear_combine(first, others, scale, weights, out, limit, nonfinite):
    """out = s·x_0 + Σ_t w_t·(x_t − x_0) in float32 (s = 1: x_0 itself): the difference rounded to float32, then one
    fused multiply-add per term, in input order (the torch route of ``MergeContext.combine``), cast to the output dtype;
    ``nonfinite[c]`` counts chunk c's results that are not finite once cast (``|x| < limit`` is, see
    :func:`hf_merge.kernels.finite_limit`)."""
    n = first.shape[0]
    for chunk in numba.prange(nonfinite.shape[0]):
        begin, end = chunk * KERNEL_CHUNK, min(n, (chunk + 1) * KERNEL_CHUNK)
        accumulator = np.empty(SEGMENT, np.float32)
        bad = 0
        for start in range(begin, end, SEGMENT):
            size = min(SEGMENT, end - start)
            base, out_part = first[start : start + size], out[start : start + size]
            for j in range(size):
                accumulator[j] = scale * load(base, j)
            for t in range(len(others)):
                part, weight = others[t][start : start + size], weights[t]
                for j in range(size):
                    difference = load(part, j) - load(base, j)
                    accumulator[j] = fused_multiply_add(difference, weight, accumulator[j])
            for j in range(size):
                bad += not (abs(accumulator[j]) < limit)
                store(out_part, j, accumulator[j])
        nonfinite[chunk] = bad


@numba.njit(inline="always")
def _elected_segment(deltas, begin, size, thresholds, cuts, scales, values, elected):
    """values[t, j] = w_t τ_t[begin + j] where task t keeps the entry (|τ| above its threshold, or at it up to
    position ``cuts[t]``), else 0; elected[j] = Σ_t values[t, j] (in task order)."""
    for j in range(size):
        elected[j] = np.float32(0.0)
    for t in range(len(deltas)):
        part, threshold, cut, scale = deltas[t][begin : begin + size], thresholds[t], cuts[t] - begin, scales[t]
        for j in range(size):
            magnitude = abs(part[j])
            keep = (magnitude > threshold) | ((magnitude == threshold) & (j <= cut))
            values[t, j] = part[j] * scale if keep else np.float32(0.0)
            elected[j] += values[t, j]


@numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
def elect_mass(deltas, thresholds, cuts, scales, mass):
    """``mass[c]`` = Σ_j sign(Σ_t w_t τ̂_t[j]) over chunk c (the tensor's majority sign is the sign of the total)."""
    n = deltas[0].shape[0]
    for chunk in numba.prange(mass.shape[0]):
        values = np.empty((len(deltas), SEGMENT), np.float32)
        elected = np.empty(SEGMENT, np.float32)
        total = 0
        for begin in range(chunk * KERNEL_CHUNK, min(n, (chunk + 1) * KERNEL_CHUNK), SEGMENT):
            size = min(SEGMENT, n - begin)
            _elected_segment(deltas, begin, size, thresholds, cuts, scales, values, elected)
            for j in range(size):
                total += (elected[j] > 0) - (elected[j] < 0)
        mass[chunk] = total


@numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
def elect_merge(deltas, thresholds, cuts, scales, weights, weighted, majority, mean, out):
    """TIES' elect and disjoint merge of trimmed, weighted task vectors v_t = w_t τ̂_t, fused: γ = sign(Σ_t v_t) (an
    exact 0 takes ``majority``), out = Σ_{t∈A} v_t over A = {t : v_t γ > 0}, divided for ``mean`` by Σ_{t∈A} w_t
    (``weighted``; 1 when 0) or by max(|A|, 1) — the float32 operations of ``ties.disjoint_merge`` in its order."""
    n = out.shape[0]
    for chunk in numba.prange(-(-n // KERNEL_CHUNK)):
        values = np.empty((len(deltas), SEGMENT), np.float32)
        elected = np.empty(SEGMENT, np.float32)
        total = np.empty(SEGMENT, np.float32)
        divisor = np.empty(SEGMENT, np.float32)
        for begin in range(chunk * KERNEL_CHUNK, min(n, (chunk + 1) * KERNEL_CHUNK), SEGMENT):
            size = min(SEGMENT, n - begin)
            _elected_segment(deltas, begin, size, thresholds, cuts, scales, values, elected)
            for j in range(size):
                sign = np.float32((elected[j] > 0) - (elected[j] < 0))
                elected[j] = sign if sign != 0 else majority
                total[j] = np.float32(0.0)
                divisor[j] = np.float32(0.0)
            for t in range(len(deltas)):
                weight = weights[t] if weighted else np.float32(1.0)
                for j in range(size):
                    agreeing = values[t, j] * elected[j]
                    total[j] += agreeing if agreeing > 0 else np.float32(0.0)
                    divisor[j] += weight if agreeing > 0 else np.float32(0.0)
            part = out[begin : begin + size]
            for j in range(size):
                result = total[j] * elected[j]
                if mean:
                    if weighted:
                        result = result / (divisor[j] if divisor[j] != 0 else np.float32(1.0))
                    else:
                        result = result / max(divisor[j], np.float32(1.0))
                part[j] = result
