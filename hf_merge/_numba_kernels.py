"""The numba kernels behind :mod:`hf_merge.kernels` (imported only when they run: importing numba costs ~0.3 s).

Compiled on first use and cached on disk by numba (``cache=True``).

One concern in one file (~1100 lines): the compiled loops, which share the bfloat16 load/store overloads, the
order keys and the counter-based random stream (numba compiles a module's kernels against one another).
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
def elect_merge(deltas, thresholds, cuts, scales, weights, weighted, weigh_values, floor, majority, mean, out):
    """TIES' elect and disjoint merge of trimmed, scaled task vectors v_t = s_t τ̂_t, fused: γ = sign(Σ_t v_t) (an
    exact 0 takes ``majority``), out = Σ_{t∈A} v_t (Σ_{t∈A} w_t v_t for ``weigh_values``) over A = {t : v_t γ > 0},
    divided for ``mean`` by max(Σ_{t∈A} w_t, ``floor``) (``weighted``; 1 when 0) or by max(|A|, 1) — the float32
    operations of ``ties.disjoint_merge`` (and of SCE's weighted merge) in their order."""
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
                factor = weight if weigh_values else np.float32(1.0)
                for j in range(size):
                    agreeing = values[t, j] * elected[j]
                    total[j] += agreeing * factor if agreeing > 0 else np.float32(0.0)
                    divisor[j] += weight if agreeing > 0 else np.float32(0.0)
            part = out[begin : begin + size]
            for j in range(size):
                result = total[j] * elected[j]
                if mean:
                    if weighted:
                        bound = max(divisor[j], floor)
                        result = result / (bound if bound != 0 else np.float32(1.0))
                    else:
                        result = result / max(divisor[j], np.float32(1.0))
                part[j] = result


@numba.njit(inline="always")
def order_key(value, absolute):
    """A uint32 whose unsigned order is the float32 order of ``value`` (of |value| when ``absolute``; −0 as +0)."""
    bits = float32_to_bits(value)
    if absolute or bits == np.uint32(0x80000000):
        return (bits & np.uint32(0x7FFFFFFF)) | np.uint32(0x80000000)
    if bits >> np.uint32(31):
        return ~bits
    return bits | np.uint32(0x80000000)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _digit_counts(values, absolute, prefix_mask, prefix, shift, counts):
    digit_mask = np.uint32(counts.shape[0] - 1)
    for i in range(values.shape[0]):
        key = order_key(values[i], absolute)
        counts[(key >> shift) & digit_mask] += (key & prefix_mask) == prefix


@numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
def key_histogram(values, absolute, prefix_mask, prefix, shift, counts):
    """``counts[p, d]`` = how many of part p's entries have ``order_key & prefix_mask == prefix`` and digit
    ``(order_key >> shift) % counts.shape[1] == d`` (``values`` split into ``counts.shape[0]`` contiguous parts;
    ``counts`` zeroed by the caller): one pass of a most-significant-digit radix selection. (Each part runs a
    separately compiled serial loop: inlined into the parallel loop it compiles measured several times slower.)"""
    n = values.shape[0]
    parts = counts.shape[0]
    per = -(-n // parts)
    for p in numba.prange(parts):
        _digit_counts(values[p * per : min(n, (p + 1) * per)], absolute, prefix_mask, prefix, shift, counts[p])


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _stable_row_order(row, ranks):
    """``ranks[j]`` = the position of |row[j]| in the stable ascending order of the row's magnitudes (equal magnitudes
    by position), as float32 (see ``_stable_row_order_into``)."""
    n = row.shape[0]
    _stable_row_order_into(row, ranks, (np.empty(n, np.uint64), np.empty(n, np.uint64), np.empty((4, 256), np.int64)))


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _stable_row_order_into(row, ranks, scratch):
    """``ranks[j]`` = the position of |row[j]| in the stable ascending order of the row's magnitudes (equal magnitudes
    by position), as float32: a least-significant-digit radix sort of the magnitude bits, 8 bits a pass, of items
    (magnitude bits << 32 | position); the four digit histograms are counted in one read, and passes whose digit is
    the same for the whole row are skipped. ``scratch``: two uint64 buffers of (at least) the row's length and a
    (4, 256) int64 one."""
    n = row.shape[0]
    items, spare, counts = scratch
    items, spare = items[:n], spare[:n]
    counts[:, :] = 0
    low_byte = np.uint32(255)
    for j in range(n):
        key = float32_to_bits(row[j]) & np.uint32(0x7FFFFFFF)
        items[j] = (np.uint64(key) << np.uint64(32)) | np.uint64(j)
        counts[0, key & low_byte] += 1
        counts[1, (key >> np.uint32(8)) & low_byte] += 1
        counts[2, (key >> np.uint32(16)) & low_byte] += 1
        counts[3, key >> np.uint32(24)] += 1
    for d in range(4):
        digit_counts = counts[d]
        if digit_counts.max() == n:
            continue
        total = 0
        for b in range(256):
            count = digit_counts[b]
            digit_counts[b] = total
            total += count
        shift = np.uint64(32 + 8 * d)
        for j in range(n):
            item = items[j]
            digit = (item >> shift) & np.uint64(255)
            slot = digit_counts[digit]
            digit_counts[digit] = slot + 1
            spare[slot] = item
        items, spare = spare, items
    for position in range(n):
        ranks[items[position] & np.uint64(0xFFFFFFFF)] = np.float32(position)


@numba.njit(inline="always")
def mix64(x):
    """splitmix64's finaliser (Steele et al. 2014): a bijective avalanche of a uint64."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
def counter_uniforms(seed, out):
    """``out[i]`` = the top 24 bits of mix64(seed + (i + 1)·φ) · 2⁻²⁴: uniforms in [0, 1) on a 2⁻²⁴ grid, the same
    for an index whatever the tensor's chunking or thread count (a counter-based generator)."""
    n = out.shape[0]
    golden = np.uint64(0x9E3779B97F4A7C15)
    scale = np.float32(1.0 / 16777216.0)
    for chunk in numba.prange(-(-n // KERNEL_CHUNK)):
        for i in range(chunk * KERNEL_CHUNK, min(n, (chunk + 1) * KERNEL_CHUNK)):
            x = mix64(seed + np.uint64(i + 1) * golden)
            out[i] = np.float32(x >> np.uint64(40)) * scale


@numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
def magmax(deltas, out):
    """out[j] = τ_{t*}[j], t* the first task of largest |τ_t[j]|."""
    n = out.shape[0]
    for chunk in numba.prange(-(-n // KERNEL_CHUNK)):
        for begin in range(chunk * KERNEL_CHUNK, min(n, (chunk + 1) * KERNEL_CHUNK), SEGMENT):
            size = min(SEGMENT, n - begin)
            part = out[begin : begin + size]
            first = deltas[0][begin : begin + size]
            for j in range(size):
                part[j] = first[j]
            for t in range(1, len(deltas)):
                other = deltas[t][begin : begin + size]
                for j in range(size):
                    part[j] = other[j] if abs(other[j]) > abs(part[j]) else part[j]


@numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
def stored_magmax(base, tasks, scaling, out, limit, nonfinite):
    """out = x_0 + λ·τ_{t*} with τ_t = x_t − x_0 and t* the first task of largest |τ_t| (:func:`magmax`), stored in
    ``out``'s dtype; ``nonfinite[c]`` counts chunk c's non-finite τ_t and results not finite once stored."""
    n = base.shape[0]
    for chunk in numba.prange(nonfinite.shape[0]):
        begin, end = chunk * KERNEL_CHUNK, min(n, (chunk + 1) * KERNEL_CHUNK)
        theta0 = np.empty(SEGMENT, np.float32)
        best = np.empty(SEGMENT, np.float32)
        bad = 0
        for start in range(begin, end, SEGMENT):
            size = min(SEGMENT, end - start)
            base_part, first = base[start : start + size], tasks[0][start : start + size]
            for j in range(size):
                theta0[j] = load(base_part, j)
                best[j] = load(first, j) - theta0[j]
                bad += not (abs(best[j]) < np.inf)
            for t in range(1, len(tasks)):
                part = tasks[t][start : start + size]
                for j in range(size):
                    delta = load(part, j) - theta0[j]
                    bad += not (abs(delta) < np.inf)
                    best[j] = delta if abs(delta) > abs(best[j]) else best[j]
            out_part = out[start : start + size]
            for j in range(size):
                result = theta0[j] + best[j] * scaling
                bad += not (abs(result) < limit)
                store(out_part, j, result)
        nonfinite[chunk] = bad


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _count_equal(values, absolute, low, high, counts):
    for i in range(values.shape[0]):
        value = abs(values[i]) if absolute else values[i]
        counts[0] += value == low
        counts[1] += value == high


@numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
def equal_counts(values, absolute, low, high, counts):
    """``counts[p]`` = how many of part p's entries (magnitudes for ``absolute``) equal ``low`` and ``high``."""
    n = values.shape[0]
    parts = counts.shape[0]
    per = -(-n // parts)
    for p in numba.prange(parts):
        counts[p, :] = 0
        _count_equal(values[p * per : min(n, (p + 1) * per)], absolute, low, high, counts[p])


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _band_part(values, out, absolute, low, high, first_rank, start, stop):
    zero = np.float32(0.0)
    for i in range(values.shape[0]):  # vectorised: the entries strictly inside
        value = values[i]
        key = abs(value) if absolute else value
        out[i] = value if (key > low) & (key < high) else zero
    low_rank, high_rank = first_rank[0], first_rank[1]
    for i in range(values.shape[0]):  # the few equal to a bound, by position
        value = values[i]
        key = abs(value) if absolute else value
        if key == low:
            if (low_rank >= start) & (low_rank < stop):
                out[i] = value
            low_rank += 1
        elif key == high:
            if (high_rank >= start) & (high_rank < stop):
                out[i] = value
            high_rank += 1


@numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
def band(values, absolute, low, high, first_ranks, start, stop, out):
    """out = values where the rank of the entry (of its magnitude for ``absolute``) in the stable ascending order
    lies in [start, stop), else 0: entries strictly between ``low`` and ``high`` are inside, equal ones take
    consecutive ranks by position from ``first_ranks[p]`` (for ``low``, then ``high``) in part p."""
    n = values.shape[0]
    parts = first_ranks.shape[0]
    per = -(-n // parts)
    for p in numba.prange(parts):
        begin, end = p * per, min(n, (p + 1) * per)
        _band_part(values[begin:end], out[begin:end], absolute, low, high, first_ranks[p], start, stop)


@numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
def load_task_vectors(first, others, base_out, deltas_out, nonfinite):
    """base_out = x_0 and deltas_out[t] = x_t − x_0 in float32 (the torch route's ``x_t.float() − x_0.float()``);
    ``nonfinite[c]`` counts chunk c's entries where an input is NaN or ±Inf."""
    n = first.shape[0]
    for chunk in numba.prange(nonfinite.shape[0]):
        bad = 0
        for begin in range(chunk * KERNEL_CHUNK, min(n, (chunk + 1) * KERNEL_CHUNK), SEGMENT):
            size = min(SEGMENT, n - begin)
            base, out = first[begin : begin + size], base_out[begin : begin + size]
            for j in range(size):
                out[j] = load(base, j)
                bad += not (abs(out[j]) < np.inf)
            for t in range(len(others)):
                part, row = others[t][begin : begin + size], deltas_out[t, begin : begin + size]
                for j in range(size):
                    value = load(part, j)
                    bad += not (abs(value) < np.inf)
                    row[j] = value - out[j]
        nonfinite[chunk] = bad


@numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
def add_store(base, update, out, limit, nonfinite):
    """out = base + update (float32) stored in ``out``'s dtype; ``nonfinite[c]`` counts chunk c's results that are not
    finite once stored."""
    n = out.shape[0]
    for chunk in numba.prange(nonfinite.shape[0]):
        bad = 0
        for begin in range(chunk * KERNEL_CHUNK, min(n, (chunk + 1) * KERNEL_CHUNK), SEGMENT):
            size = min(SEGMENT, n - begin)
            base_part, update_part, out_part = base[begin : begin + size], update[begin : begin + size], out[begin : begin + size]
            for j in range(size):
                result = base_part[j] + update_part[j]
                bad += not (abs(result) < limit)
                store(out_part, j, result)
        nonfinite[chunk] = bad


# ------------------------------------------------------------------ TIES-family merges read straight from the stored inputs
@numba.njit(inline="always")
def uniform(seed, index):
    """Entry ``index`` of :func:`counter_uniforms`'s stream for ``seed``."""
    x = mix64(seed + np.uint64(index + 1) * np.uint64(0x9E3779B97F4A7C15))
    return np.float32(x >> np.uint64(40)) * np.float32(1.0 / 16777216.0)


@numba.njit(inline="always")
def _sparsified_row(part, theta0, begin, size, t, drop, out):
    """out[j] = DARE's ((m ⊙ τ_t) / divisor) · factor (m = 1 where u ≥ rate; τ_t itself when rate is 0) of the
    entries begin + j; ``drop`` = (rates, seeds, divisors, factors)."""
    rates, seeds, divisors, factors = drop
    rate, seed, divisor, factor = rates[t], seeds[t], divisors[t], factors[t]
    if rate > np.float32(0.0):
        for j in range(size):
            delta = load(part, j) - theta0[j]
            kept = delta if uniform(seed, begin + j) >= rate else delta * np.float32(0.0)
            out[j] = (kept / divisor) * factor
    else:
        for j in range(size):
            out[j] = load(part, j) - theta0[j]


def trim_row(trim, t, begin, size, row, scale, values, elected):
    """values[j] = s_t · row[j] where task t's trim keeps entry begin + j, else 0; elected[j] += values[j]. ``trim``
    is TIES' (thresholds, cuts) — keep |τ̂| above the threshold, or at it up to position ``cut`` — or a rank band
    (lows, firsts, highs, lasts, factors) — keep low < |τ̂| < high, |τ̂| = low from position ``first`` on and
    |τ̂| = high up to position ``last``, then scaled by ``factor`` before s_t (Breadcrumbs' band and its L1 rescale).
    A non-finite |τ̂| is kept by both, so that it reaches the elected sum and the caller's finiteness check.
    (Compiled: the overload below, chosen by the length of ``trim``.)"""


@overload(trim_row, inline="always")
def _trim_row(trim, t, begin, size, row, scale, values, elected):
    if len(trim) == 2:

        def ties_trim(trim, t, begin, size, row, scale, values, elected):
            thresholds, cuts = trim
            threshold, cut = thresholds[t], cuts[t] - begin
            for j in range(size):
                magnitude = abs(row[j])
                keep = (magnitude > threshold) | ((magnitude == threshold) & (j <= cut)) | (magnitude != magnitude)
                values[j] = row[j] * scale if keep else np.float32(0.0)
                elected[j] += values[j]

        return ties_trim

    def band_trim(trim, t, begin, size, row, scale, values, elected):
        lows, firsts, highs, lasts, factors = trim
        low, first, high, last, factor = lows[t], firsts[t] - begin, highs[t], lasts[t] - begin, factors[t]
        for j in range(size):
            magnitude = abs(row[j])
            keep = ((((magnitude > low) | ((magnitude == low) & (j >= first)))
                     & ((magnitude < high) | ((magnitude == high) & (j <= last))))
                    | (not (magnitude < np.float32(np.inf))))
            values[j] = (row[j] * factor) * scale if keep else np.float32(0.0)
            elected[j] += values[j]

    return band_trim


@numba.njit(inline="always")
def _stored_segment(base, tasks, begin, size, drop, trim, scales, theta0, row, values, elected):
    """theta0 = x_0; values[t] = s_t τ̂_t where τ̂_t (the sparsified τ_t) passes the trim (:func:`trim_row`), else 0;
    elected = Σ_t values[t] (in task order, from 0)."""
    base_part = base[begin : begin + size]
    for j in range(size):
        theta0[j] = load(base_part, j)
        elected[j] = np.float32(0.0)
    for t in range(len(tasks)):
        _sparsified_row(tasks[t][begin : begin + size], theta0, begin, size, t, drop, row)
        trim_row(trim, t, begin, size, row, scales[t], values[t], elected)


@numba.njit(inline="always")
def _elect_store(values, elected, theta0, size, weights, weighted, weigh_values, floor, majority, mean, scaling,
                 out_part, negative_part, limit, total, divisor, negative_total, negative_divisor, conflict, zero,
                 counts_row):
    """θ₀ + λ · TIES' elect and disjoint merge of the weighted values (rows of ``values``, their sum in ``elected``)
    stored into ``out_part``: γ = sign(Σ_t v_t), an exact 0 taking ``majority``; Σ_{t∈A} v_t over A = {t : v_t γ > 0},
    divided for ``mean`` by max(Σ_{t∈A} w_t, ``floor``) (``weighted``; 1 when 0) or by max(|A|, 1) — the float32
    operations of ``ties.disjoint_merge``; ``weigh_values``: Σ_{t∈A} w_t v_t above the division (SCE). ``majority``
    NaN (not known yet): exact zeros take +1 in ``out_part`` and −1 in ``negative_part`` (the other entries alike in
    both), and ``counts_row[-1]`` gets Σ_j sign(Σ_t v_t[j]).
    ``counts_row``: [kept entries per task (v_t ≠ 0), entries where a kept v_t disagrees with γ, results not finite
    once stored, mass]."""
    num_tasks = values.shape[0]
    both = majority != majority
    provisional = majority if not both else np.float32(1.0)
    bad, conflicts, mass = 0, 0, 0
    for j in range(size):
        bad += not (abs(elected[j]) < np.inf)  # NaN/Inf in an input, or a sum overflowing float32
        sign = np.float32((elected[j] > 0) - (elected[j] < 0))
        mass += (elected[j] > 0) - (elected[j] < 0)
        zero[j] = sign == 0
        elected[j] = sign if sign != 0 else provisional
        total[j] = np.float32(0.0)
        divisor[j] = np.float32(0.0)
        negative_total[j] = np.float32(0.0)
        negative_divisor[j] = np.float32(0.0)
        conflict[j] = 0
    for t in range(num_tasks):
        weight = weights[t] if weighted else np.float32(1.0)
        factor = weight if weigh_values else np.float32(1.0)
        row = values[t]
        kept = 0
        for j in range(size):
            agreeing = row[j] * elected[j]
            total[j] += agreeing * factor if agreeing > 0 else np.float32(0.0)
            divisor[j] += weight if agreeing > 0 else np.float32(0.0)
            kept += row[j] != 0
            conflict[j] |= agreeing < 0
        counts_row[t] += kept
        if both:  # the disjoint sums for γ = −1 (used where Σ_t v_t is exactly 0)
            for j in range(size):
                opposed = -row[j]
                negative_total[j] += opposed * factor if opposed > 0 else np.float32(0.0)
                negative_divisor[j] += weight if opposed > 0 else np.float32(0.0)
    for j in range(size):
        result = total[j] * elected[j]
        if mean:
            if weighted:
                bound = max(divisor[j], floor)
                result = result / (bound if bound != 0 else np.float32(1.0))
            else:
                result = result / max(divisor[j], np.float32(1.0))
        result = theta0[j] + result * scaling
        bad += not (abs(result) < limit)
        conflicts += conflict[j]
        store(out_part, j, result)
    if both:
        for j in range(size):
            other = negative_total[j] * np.float32(-1.0)
            if mean:
                if weighted:
                    bound = max(negative_divisor[j], floor)
                    other = other / (bound if bound != 0 else np.float32(1.0))
                else:
                    other = other / max(negative_divisor[j], np.float32(1.0))
            other = theta0[j] + other * scaling
            bad += not (abs(other) < limit)
            store(negative_part, j, other)
        for j in range(size):  # where the sign was elected, the same result
            if not zero[j]:
                negative_part[j] = out_part[j]
    counts_row[num_tasks] += conflicts
    counts_row[num_tasks + 1] += bad
    counts_row[num_tasks + 2] += mass


@numba.njit(inline="always")
def _sum_store(elected, theta0, size, divisor, scaling, out_part, limit):
    """out = θ₀ + (Σ_t v_t / divisor) · λ stored in ``out``'s dtype (``masked_merge`` without sign election; divisor 1
    for the sum); returns how many results are not finite once stored."""
    bad = 0
    for j in range(size):
        result = theta0[j] + (elected[j] / divisor) * scaling
        bad += not (abs(result) < limit)
        store(out_part, j, result)
    return bad


@numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
def stored_elect_merge(base, tasks, drop, trim, scales, weights, weighted, weigh_values, floor, majority, mean, scaling,
                       out, negative, limit, counts):
    """θ₀ + λ · TIES' elect and disjoint merge of v_t = s_t τ̂_t (see ``_elect_store``) stored in ``out``'s dtype,
    τ̂_t from the stored inputs; chunk c's ``counts`` row: [kept entries per task (v_t ≠ 0), entries where a kept
    v_t disagrees with γ, results not finite once stored, mass]. ``majority`` NaN: exact zeros of the elected sum take
    +1 in ``out`` and −1 in ``negative`` (shaped like ``out``), for the caller to choose once the mass is known."""
    n = base.shape[0]
    num_tasks = len(tasks)
    both = majority != majority
    for chunk in numba.prange(counts.shape[0]):
        theta0 = np.empty(SEGMENT, np.float32)
        row = np.empty(SEGMENT, np.float32)
        values = np.empty((num_tasks, SEGMENT), np.float32)
        elected = np.empty(SEGMENT, np.float32)
        total = np.empty(SEGMENT, np.float32)
        divisor = np.empty(SEGMENT, np.float32)
        negative_total = np.empty(SEGMENT, np.float32)
        negative_divisor = np.empty(SEGMENT, np.float32)
        conflict = np.empty(SEGMENT, np.uint8)
        zero = np.empty(SEGMENT, np.uint8)
        counts[chunk, :] = 0
        for begin in range(chunk * KERNEL_CHUNK, min(n, (chunk + 1) * KERNEL_CHUNK), SEGMENT):
            size = min(SEGMENT, n - begin)
            _stored_segment(base, tasks, begin, size, drop, trim, scales, theta0, row, values, elected)
            negative_part = negative[begin : begin + size] if both else negative[:0]
            _elect_store(values, elected, theta0, size, weights, weighted, weigh_values, floor, majority, mean, scaling,
                         out[begin : begin + size], negative_part, limit, total, divisor, negative_total,
                         negative_divisor, conflict, zero, counts[chunk])


@numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
def stored_masked_sum(base, tasks, drop, trim, scales, divisor, scaling, out, limit, counts):
    """θ₀ + λ · (Σ_t v_t) / divisor, v_t = s_t τ̂_t summed in task order from 0 (``masked_merge`` without sign
    election), stored in ``out``'s dtype; chunk c's ``counts`` row as :func:`stored_elect_merge`'s (no conflicts,
    no mass)."""
    n = base.shape[0]
    num_tasks = len(tasks)
    for chunk in numba.prange(counts.shape[0]):
        theta0 = np.empty(SEGMENT, np.float32)
        row = np.empty(SEGMENT, np.float32)
        values = np.empty((num_tasks, SEGMENT), np.float32)
        elected = np.empty(SEGMENT, np.float32)
        counts[chunk, :] = 0
        for begin in range(chunk * KERNEL_CHUNK, min(n, (chunk + 1) * KERNEL_CHUNK), SEGMENT):
            size = min(SEGMENT, n - begin)
            _stored_segment(base, tasks, begin, size, drop, trim, scales, theta0, row, values, elected)
            for t in range(num_tasks):
                kept = 0
                for j in range(size):
                    kept += values[t, j] != 0
                counts[chunk, t] += kept
            counts[chunk, num_tasks + 1] += _sum_store(elected, theta0, size, divisor, scaling,
                                                       out[begin : begin + size], limit)


@numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
def stored_trim_l1_norms(base, tasks, drop, trim, norms):
    """``norms[c, t]`` = (‖τ̂_t‖₁, ‖trimmed τ̂_t‖₁) over chunk c in float64 (``trim`` with factors 1: mergekit's L1
    rescale of a masked task vector)."""
    n = base.shape[0]
    num_tasks = len(tasks)
    ones = np.ones(num_tasks, np.float32)
    for chunk in numba.prange(norms.shape[0]):
        theta0 = np.empty(SEGMENT, np.float32)
        row = np.empty(SEGMENT, np.float32)
        kept = np.empty(SEGMENT, np.float32)
        elected = np.empty(SEGMENT, np.float32)
        full_norms = np.zeros(num_tasks, np.float64)
        kept_norms = np.zeros(num_tasks, np.float64)
        for begin in range(chunk * KERNEL_CHUNK, min(n, (chunk + 1) * KERNEL_CHUNK), SEGMENT):
            size = min(SEGMENT, n - begin)
            base_part = base[begin : begin + size]
            for j in range(size):
                theta0[j] = load(base_part, j)
            for t in range(num_tasks):
                _sparsified_row(tasks[t][begin : begin + size], theta0, begin, size, t, drop, row)
                trim_row(trim, t, begin, size, row, ones[t], kept, elected)
                full, inside = 0.0, 0.0
                for j in range(size):
                    full += abs(row[j])
                    inside += abs(kept[j])
                full_norms[t] += full
                kept_norms[t] += inside
        for t in range(num_tasks):
            norms[chunk, t, 0] = full_norms[t]
            norms[chunk, t, 1] = kept_norms[t]


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _stored_digit_counts(base, task, drop, t, prefix_mask, prefix, shift, counts, begin):
    digit_mask = np.uint32(counts.shape[0] - 1)
    theta0 = np.empty(SEGMENT, np.float32)
    row = np.empty(SEGMENT, np.float32)
    n = base.shape[0]
    for start in range(0, n, SEGMENT):
        size = min(SEGMENT, n - start)
        base_part = base[start : start + size]
        for j in range(size):
            theta0[j] = load(base_part, j)
        _sparsified_row(task[start : start + size], theta0, begin + start, size, t, drop, row)
        for j in range(size):
            key = order_key(row[j], True)
            counts[(key >> shift) & digit_mask] += (key & prefix_mask) == prefix


@numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
def stored_key_histogram(base, task, drop, t, prefix_mask, prefix, shift, counts):
    """:func:`key_histogram` of |τ̂_t| computed from the stored inputs (see ``_sparsified_row``)."""
    n = base.shape[0]
    parts = counts.shape[0]
    per = -(-n // parts)
    for p in numba.prange(parts):
        begin, end = p * per, min(n, (p + 1) * per)
        _stored_digit_counts(base[begin:end], task[begin:end], drop, t, prefix_mask, prefix, shift, counts[p], begin)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def stored_equal_position(base, task, drop, t, value, nth, begin, end):
    """The position of the ``nth`` (1-based) entry with |τ̂_t| == ``value`` among the entries [begin, end), or −1."""
    theta0 = np.empty(SEGMENT, np.float32)
    row = np.empty(SEGMENT, np.float32)
    seen = 0
    for start in range(begin, end, SEGMENT):
        size = min(SEGMENT, end - start)
        base_part = base[start : start + size]
        for j in range(size):
            theta0[j] = load(base_part, j)
        _sparsified_row(task[start : start + size], theta0, start, size, t, drop, row)
        for j in range(size):
            if abs(row[j]) == value:
                seen += 1
                if seen == nth:
                    return start + j
    return -1


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _equal_counts_part(base, tasks, drop, query_tasks, values, begin, end, counts):
    theta0 = np.empty(SEGMENT, np.float32)
    row = np.empty(SEGMENT, np.float32)
    for start in range(begin, end, SEGMENT):
        size = min(SEGMENT, end - start)
        base_part = base[start : start + size]
        for j in range(size):
            theta0[j] = load(base_part, j)
        previous = -1
        for q in range(query_tasks.shape[0]):
            t = query_tasks[q]
            if t != previous:
                _sparsified_row(tasks[t][start : start + size], theta0, start, size, t, drop, row)
                previous = t
            value, equal = values[q], 0
            for j in range(size):
                equal += abs(row[j]) == value
            counts[q] += equal


@numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
def stored_equal_counts(base, tasks, drop, query_tasks, values, counts):
    """``counts[p, q]`` = how many of part p's entries have |τ̂_t| == ``values[q]``, t = ``query_tasks[q]`` (queries
    grouped by task; parts as in :func:`key_histogram`)."""
    n = base.shape[0]
    parts = counts.shape[0]
    per = -(-n // parts)
    for p in numba.prange(parts):
        counts[p, :] = 0
        _equal_counts_part(base, tasks, drop, query_tasks, values, p * per, min(n, (p + 1) * per), counts[p])


@numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False, fastmath={"reassoc", "contract"})
def stored_squares(base, tasks, squares):
    """``squares[c, t]`` = Σ τ_t² over chunk c in float64 (τ_t = x_t − x_0 in float32: every square exact)."""
    n = base.shape[0]
    for chunk in numba.prange(squares.shape[0]):
        begin, end = chunk * KERNEL_CHUNK, min(n, (chunk + 1) * KERNEL_CHUNK)
        for t in range(len(tasks)):
            total = 0.0
            for start in range(begin, end, SEGMENT):
                size = min(SEGMENT, end - start)
                base_part, part = base[start : start + size], tasks[t][start : start + size]
                for j in range(size):
                    delta = np.float64(load(part, j) - load(base_part, j))
                    total += delta * delta
            squares[chunk, t] = total


@numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
def stored_l1_norms(base, tasks, drop, norms):
    """``norms[c, t]`` = (‖τ_t‖₁, ‖m ⊙ τ_t‖₁) over chunk c in float64, m DARE's keep mask (``drop`` with divisors
    and factors 1)."""
    n = base.shape[0]
    rates, seeds = drop[0], drop[1]
    for chunk in numba.prange(norms.shape[0]):
        for t in range(len(tasks)):
            full, kept = 0.0, 0.0
            task, rate, seed = tasks[t], rates[t], seeds[t]
            for i in range(chunk * KERNEL_CHUNK, min(n, (chunk + 1) * KERNEL_CHUNK)):
                magnitude = abs(load(task, i) - load(base, i))
                full += magnitude
                kept += magnitude if uniform(seed, i) >= rate else 0.0
            norms[chunk, t, 0] = full
            norms[chunk, t, 1] = kept


@numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
def stored_sample(base, tasks, drop, stride, out):
    """out[t, s] = |τ̂_t| at position s·stride (see ``_sparsified_row``; the drop at the entry's own position)."""
    rates, seeds, divisors, factors = drop
    for s in numba.prange(out.shape[1]):
        i = s * stride
        theta0 = load(base, i)
        for t in range(len(tasks)):
            delta = load(tasks[t], i) - theta0
            if rates[t] > np.float32(0.0):
                kept = delta if uniform(seeds[t], i) >= rates[t] else delta * np.float32(0.0)
                delta = (kept / divisors[t]) * factors[t]
            out[t, s] = abs(delta)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _bracket_part(base, tasks, drop, query_tasks, low, high, begin, end, counts, buffer, segments):
    theta0 = np.empty(SEGMENT, np.float32)
    row = np.empty(SEGMENT, np.float32)
    capacity = buffer.shape[1]
    for start in range(begin, end, SEGMENT):
        size = min(SEGMENT, end - start)
        segment = start // SEGMENT
        base_part = base[start : start + size]
        for j in range(size):
            theta0[j] = load(base_part, j)
        previous = -1
        for q in range(query_tasks.shape[0]):
            t = query_tasks[q]
            if t != previous:
                _sparsified_row(tasks[t][start : start + size], theta0, start, size, t, drop, row)
                previous = t
            lo, hi, target = low[q], high[q], buffer[q]
            below, at_low, at_high, inside = 0, 0, 0, 0
            for j in range(size):  # counting (vectorised)
                magnitude = abs(row[j])
                below += magnitude < lo
                at_low += magnitude == lo
                at_high += magnitude == hi
                inside += (magnitude > lo) & (magnitude < hi)
            if inside:  # gathering the few inside (a narrow bracket: the branch is mostly not taken)
                gathered = counts[q, 2]
                for j in range(size):
                    magnitude = abs(row[j])
                    if (magnitude > lo) & (magnitude < hi):
                        target[min(gathered, capacity - 1)] = magnitude
                        gathered += 1
            counts[q, 0] += below
            counts[q, 1] += at_low
            counts[q, 2] += inside
            counts[q, 3] += at_high
            segments[q, 0, segment] = at_low
            segments[q, 1, segment] = at_high


@numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
def stored_bracket(base, tasks, drop, query_tasks, low, high, counts, buffers, segments):
    """One read of every input: for part p and query q (of task t = ``query_tasks[q]``, queries grouped by task),
    ``counts[p, q]`` = (#|τ̂_t| < low_q, #|τ̂_t| = low_q, #low_q < |τ̂_t| < high_q, #|τ̂_t| = high_q) and the first
    ``buffers.shape[2]`` of those strictly inside in ``buffers[p, q]``, in order; ``segments[q]`` = (#|τ̂_t| = low_q,
    #|τ̂_t| = high_q) per ``SEGMENT`` entries (parts: contiguous, whole segments)."""
    n = base.shape[0]
    parts = counts.shape[0]
    per = -(-(-(-n // parts)) // SEGMENT) * SEGMENT
    for p in numba.prange(parts):
        begin, end = min(n, p * per), min(n, (p + 1) * per)
        counts[p, :, :] = 0
        _bracket_part(base, tasks, drop, query_tasks, low, high, begin, end, counts[p], buffers[p], segments)


@numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
def magprune_rows(rows, low, span, seed, divide, out):
    """DELLA's MagPrune of each row: p = low + span · r / (n − 1) (r the stable ascending rank of |τ| in the row),
    u from :func:`counter_uniforms`' stream at the entry's flat index, out = τ / p (``divide``) or τ where u < p,
    else 0 — the float32 operations of ``della.magprune``."""
    num_rows, n = rows.shape
    last = np.float32(n - 1)
    for r in numba.prange(num_rows):
        ranks = np.empty(n, np.float32)
        row, target = rows[r], out[r]
        _stable_row_order(row, ranks)
        for j in range(n):
            p = low + span * (ranks[j] / last)
            keep = uniform(seed, r * n + j) < p
            value = row[j] / p if divide else row[j]
            target[j] = value if keep else np.float32(0.0)


# ------------------------------------------------------------------ DELLA's MagPrune read straight from the stored inputs
@numba.njit(inline="always")
def _magprune_values(row, offset, t, prune, divide, scale, scratch, ranks, values, elected):
    """values[j] = s_t · MagPrune(τ_t)[j] of one row (entries offset + j of the tensor; see :func:`magprune_rows`;
    then times the task's L1 factor), or s_t τ_t[j] for a task kept whole; elected[j] += values[j]. ``prune`` =
    (lows, spans, densities, seeds, whole, factors) per task; a one-entry row keeps with p = density."""
    lows, spans, densities, seeds, whole, factors = prune
    n = row.shape[0]
    if whole[t]:
        for j in range(n):
            values[j] = row[j] * scale
            elected[j] += values[j]
        return
    low, span, seed, factor = lows[t], spans[t], seeds[t], factors[t]
    if n > 1:
        _stable_row_order_into(row, ranks, scratch)
        last = np.float32(n - 1)
        for j in range(n):
            p = low + span * (ranks[j] / last)
            keep = uniform(seed, offset + j) < p
            value = row[j] / p if divide else row[j]
            values[j] = ((value if keep else np.float32(0.0)) * factor) * scale
            elected[j] += values[j]
    else:
        p = densities[t]
        keep = uniform(seed, offset) < p
        value = row[0] / p if divide else row[0]
        values[0] = ((value if keep else np.float32(0.0)) * factor) * scale
        elected[0] += values[0]


@numba.njit(inline="always")
def _task_row(task, theta0, offset, row):
    """row = x_t − x_0 over one row (x_0 in ``theta0``); returns how many entries are not finite."""
    part = task[offset : offset + row.shape[0]]
    bad = 0
    for j in range(row.shape[0]):
        row[j] = load(part, j) - theta0[j]
        bad += not (abs(row[j]) < np.inf)
    return bad


@numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
def stored_magprune_merge(base, tasks, n, prune, divide, scales, weights, weighted, elect, majority, mean, divisor,
                          scaling, out, negative, limit, counts):
    """θ₀ + λ · the merge of v_t = s_t MagPrune(τ_t) (``_magprune_values``) over rows of ``n`` entries, τ_t from the
    stored inputs: with ``elect`` TIES' elect and disjoint merge (``_elect_store``; ``majority`` NaN: both results, see
    :func:`stored_elect_merge`), else (Σ_t v_t) / divisor (``_sum_store``); stored in ``out``'s dtype. Block b of
    rows has ``counts[b]`` = [kept entries per task, sign conflicts, entries not finite (inputs or results), mass]."""
    num_tasks = len(tasks)
    num_rows = base.shape[0] // n
    per = -(-num_rows // counts.shape[0])
    both = elect and majority != majority
    for block in numba.prange(counts.shape[0]):
        theta0 = np.empty(n, np.float32)
        row = np.empty(n, np.float32)
        ranks = np.empty(n, np.float32)
        values = np.empty((num_tasks, n), np.float32)
        elected = np.empty(n, np.float32)
        total = np.empty(n, np.float32)
        divisors = np.empty(n, np.float32)
        negative_total = np.empty(n, np.float32)
        negative_divisor = np.empty(n, np.float32)
        conflict = np.empty(n, np.uint8)
        zero = np.empty(n, np.uint8)
        scratch = (np.empty(n, np.uint64), np.empty(n, np.uint64), np.empty((4, 256), np.int64))
        counts[block, :] = 0
        for r in range(block * per, min(num_rows, (block + 1) * per)):
            offset = r * n
            base_part = base[offset : offset + n]
            for j in range(n):
                theta0[j] = load(base_part, j)
                elected[j] = np.float32(0.0)
            bad = 0
            for t in range(num_tasks):
                bad += _task_row(tasks[t], theta0, offset, row)
                _magprune_values(row, offset, t, prune, divide, scales[t], scratch, ranks, values[t], elected)
            out_part = out[offset : offset + n]
            if elect:
                negative_part = negative[offset : offset + n] if both else negative[:0]
                _elect_store(values, elected, theta0, n, weights, weighted, False, np.float32(-np.inf), majority,
                             mean, scaling, out_part, negative_part, limit, total, divisors, negative_total,
                             negative_divisor, conflict, zero, counts[block])
            else:
                for t in range(num_tasks):
                    kept = 0
                    for j in range(n):
                        kept += values[t, j] != 0
                    counts[block, t] += kept
                bad += _sum_store(elected, theta0, n, divisor, scaling, out_part, limit)
            counts[block, num_tasks + 1] += bad


@numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
def stored_magprune_norms(base, tasks, n, prune, norms):
    """``norms[b, t]`` = (‖τ_t‖₁, ‖m_t ⊙ τ_t‖₁) in float64 over block b of rows, m_t MagPrune's keep mask (``prune``
    with factors 1): mergekit's L1 rescale of DELLA's masked task vectors."""
    num_tasks = len(tasks)
    num_rows = base.shape[0] // n
    per = -(-num_rows // norms.shape[0])
    for block in numba.prange(norms.shape[0]):
        theta0 = np.empty(n, np.float32)
        row = np.empty(n, np.float32)
        ranks = np.empty(n, np.float32)
        kept = np.empty(n, np.float32)
        elected = np.zeros(n, np.float32)
        scratch = (np.empty(n, np.uint64), np.empty(n, np.uint64), np.empty((4, 256), np.int64))
        full_norms = np.zeros(num_tasks, np.float64)
        kept_norms = np.zeros(num_tasks, np.float64)
        for r in range(block * per, min(num_rows, (block + 1) * per)):
            offset = r * n
            base_part = base[offset : offset + n]
            for j in range(n):
                theta0[j] = load(base_part, j)
            for t in range(num_tasks):
                _task_row(tasks[t], theta0, offset, row)
                _magprune_values(row, offset, t, prune, False, np.float32(1.0), scratch, ranks, kept, elected)
                full, inside = 0.0, 0.0
                for j in range(n):
                    full += abs(row[j])
                    inside += abs(kept[j])
                full_norms[t] += full
                kept_norms[t] += inside
        for t in range(num_tasks):
            norms[block, t, 0] = full_norms[t]
            norms[block, t, 1] = kept_norms[t]
