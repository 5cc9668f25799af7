"""The seam of the fast routes: compiled CPU kernels (numba, the optional ``fast`` extra) for the elementwise hot
loops torch cannot fuse — one-pass global TIES, the linear combination of Task Arithmetic / averaging, and the Gram
matrix of a tensor's inputs (for merges determined by it, e.g. SLERP).

Callers ask :func:`fused_linear_combine` or :func:`fused_ties_one_pass` for a kernel and get ``None`` when the torch
route runs; they never test availability or dtypes themselves.

A chain of torch ops makes one pass over memory per op; a fused loop reads each input once and keeps every
intermediate in registers. Each kernel here has a torch twin computing the same bits (same float32 operations in the
same order, round-to-nearest-even casts), and tests compare them. Kernels run when numba is importable and the
environment does not set ``HF_MERGE_KERNELS=0``; the inputs they take are bfloat16 (as uint16 bit patterns) and
float32 arrays, anything else keeps the torch route.

One concern in one file (~850 lines): the Python side of every compiled kernel — the dtype gate, the scratch
buffers and the launch lock they share.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)
#: One parallel kernel at a time: numba's fallback threading layer (workqueue) is not thread-safe.
_LAUNCH_LOCK = threading.Lock()
_KERNEL_DTYPES = (torch.bfloat16, torch.float32)
#: ``(flat input arrays [base, tasks...], one weight per task, flat output array, base scale) -> whether every result
#: is finite``.
LinearCombine = Callable[[Sequence[np.ndarray], Sequence[float], np.ndarray, float], bool]


def kernels_enabled() -> bool:
    """Whether the compiled kernels will be used: numba importable and ``HF_MERGE_KERNELS`` not "0"."""
    if os.environ.get("HF_MERGE_KERNELS", "1") == "0":
        return False
    return _numba_available()


@functools.cache
def _numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _kernel(name: str) -> Any:
    """The compiled kernel ``name`` of :mod:`hf_merge._numba_kernels`, for a launch from this thread with the run's
    CPU threads (``torch.get_num_threads()``, set by :func:`hf_merge.linalg.cpu_threads`; numba's count is per
    thread); the first one this machine has never compiled is announced (numba compiles on first use, then loads
    from its on-disk cache)."""
    import numba

    from . import _numba_kernels

    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
    kernel = getattr(_numba_kernels, name)
    if not kernel.signatures and not _cached_on_disk(kernel):
        _announce_compile()
    return kernel


def _cached_on_disk(kernel: Any) -> bool:
    index = getattr(getattr(getattr(kernel, "_cache", None), "_cache_file", None), "_index_path", None)
    return index is None or os.path.exists(index)


@functools.cache
def _announce_compile() -> None:
    logger.warning("compiling merge kernels (once per machine)…")


def _takes(input_dtypes: Sequence[torch.dtype], output_dtype: torch.dtype) -> bool:
    """Whether the kernels take these inputs (the first, then one dtype for all others) and output: each bfloat16 or
    float32. Inputs and outputs are flat numpy arrays (:func:`hf_merge.tensors.numpy_view`)."""
    return (len(set(input_dtypes[1:])) <= 1 and output_dtype in _KERNEL_DTYPES
            and all(dtype in _KERNEL_DTYPES for dtype in input_dtypes))


def fused_linear_combine(input_dtypes: Sequence[torch.dtype], output_dtype: torch.dtype) -> LinearCombine | None:
    """The compiled linear combination for inputs of ``input_dtypes`` (base first) into ``output_dtype``, or ``None``
    when the torch route runs (kernels off, or dtypes the kernel does not take)."""
    return _linear_combine if kernels_enabled() and _takes(input_dtypes, output_dtype) else None


def fused_ties_one_pass(num_tasks: int, low: Sequence[float], high: Sequence[float], scaling: float, mean: bool,
                        block: int) -> TiesOnePassKernel | None:
    """The compiled one-pass TIES kernel for these brackets, or ``None`` when the torch route runs; it merges the
    tensors whose dtypes :meth:`TiesOnePassKernel.accepts`."""
    if not kernels_enabled():
        return None
    return TiesOnePassKernel(num_tasks, low, high, scaling, mean, block)


def _linear_combine(arrays: Sequence[np.ndarray], weights: Sequence[float], out: np.ndarray,
                    base_scale: float = 1.0) -> bool:
    """out = s·x_0 + Σ_t w_t·(x_t − x_0) over flat kernel arrays (x_0 any kernel dtype, the others one dtype; one
    weight per x_t), accumulated in float32 in input order, the difference rounded to float32 and then one fused
    multiply-add per term: the bits of torch's ``acc.add_(x_t − x_0, alpha=w_t)``. Returns whether every result is
    finite."""
    kernel = _kernel("linear_combine")

    nonfinite = np.zeros(_chunks(out.shape[0]), dtype=np.int64)
    with _LAUNCH_LOCK:
        kernel(_read_only(arrays[0]), tuple(_read_only(a) for a in arrays[1:]), np.float32(base_scale),
               np.asarray(weights, dtype=np.float32), out, finite_limit(out), nonfinite)
    return not nonfinite.any()


def fused_elect_merge(deltas: Sequence[torch.Tensor]) -> ElectMerge | None:
    """The compiled TIES elect-and-merge of float32 CPU task vectors (:class:`ElectMerge`), or ``None`` when the torch
    route runs."""
    if not kernels_enabled() or not all(d.dtype == torch.float32 and d.device.type == "cpu" for d in deltas):
        return None
    return ElectMerge()


class ElectMerge:
    """Fused TIES steps on flat float32 task vectors: trim (|τ_t| above its threshold, or at it up to a position),
    weight, elect the sign and take the disjoint mean or sum in one pass (``_numba_kernels.elect_merge``), and the
    tensor's majority sign in another (``_numba_kernels.elect_mass``)."""

    def majority(self, deltas: Sequence[torch.Tensor], thresholds: Sequence[float], cuts: Sequence[int],
                 scales: Sequence[float]) -> float:
        """sign(Σ_j sign(Σ_t w_t τ̂_t[j])) over the tensor."""
        elect_mass = _kernel("elect_mass")
        arrays = tuple(_read_only(d.numpy()) for d in deltas)
        mass = np.zeros(_chunks(arrays[0].shape[0]), dtype=np.int64)
        with _LAUNCH_LOCK:
            elect_mass(arrays, *_trim_arrays(thresholds, cuts, scales), mass)
        return float(np.sign(mass.sum()))

    def __call__(self, deltas: Sequence[torch.Tensor], thresholds: Sequence[float], cuts: Sequence[int],
                 scales: Sequence[float], weights: Sequence[float] | None, majority: float, mean: bool,
                 weigh_values: bool = False, floor: float = -math.inf) -> torch.Tensor:
        elect_merge = _kernel("elect_merge")
        arrays = tuple(_read_only(d.numpy()) for d in deltas)
        out = np.empty(arrays[0].shape[0], dtype=np.float32)
        weight_array = np.asarray(weights if weights is not None else [1.0] * len(deltas), dtype=np.float32)
        with _LAUNCH_LOCK:
            elect_merge(arrays, *_trim_arrays(thresholds, cuts, scales), weight_array, weights is not None,
                        weigh_values, np.float32(floor), np.float32(majority), mean, out)
        return torch.from_numpy(out)


def _trim_arrays(thresholds: Sequence[float], cuts: Sequence[int],
                 scales: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.asarray(thresholds, dtype=np.float32), np.asarray(cuts, dtype=np.int64),
            np.asarray(scales, dtype=np.float32))


def fused_gram(input_dtypes: Sequence[torch.dtype]) -> Callable[[Sequence[np.ndarray]], np.ndarray] | None:
    """The compiled Gram matrix of [x_0, τ_1, ..., τ_T] (float64, τ_t = x_t − x_0 in float32) for inputs of
    ``input_dtypes`` (base first), or ``None`` when the torch route runs."""
    return _gram if kernels_enabled() and _takes(input_dtypes, torch.float32) else None


def _gram(arrays: Sequence[np.ndarray]) -> np.ndarray:
    kernel = _kernel("gram")

    size = len(arrays)
    partials = np.zeros((_chunks(arrays[0].shape[0]), size, size), dtype=np.float64)
    with _LAUNCH_LOCK:
        kernel(_read_only(arrays[0]), tuple(_read_only(a) for a in arrays[1:]), partials)
    return partials.sum(axis=0)


def finite_limit(out: np.ndarray) -> np.float32:
    """The bound below which a float32 |x| stays finite once stored in ``out``'s dtype: ∞ for float32; for bfloat16
    (uint16 bits) the midpoint between its largest finite value and ∞ (0x7F7F8000), which rounds to ∞ (to even)."""
    if out.dtype == np.uint16:
        return np.array([0x7F7F8000], dtype=np.uint32).view(np.float32)[0]
    return np.float32(np.inf)


def _chunks(n: int) -> int:
    """How many ``KERNEL_CHUNK``-sized work items the compiled kernels split ``n`` elements into (at least one)."""
    from ._numba_kernels import KERNEL_CHUNK

    return max(1, -(-n // KERNEL_CHUNK))


def _read_only(array: np.ndarray) -> np.ndarray:
    """A read-only view: inputs from memory and from file mappings then have one numba type (one compilation, and a
    homogeneous tuple the kernels can index)."""
    view = array.view()
    view.flags.writeable = False
    return view


@dataclasses.dataclass
class TiesBlock:
    """What the one-pass TIES kernel reports for one block besides the merged values it wrote.

    ``open_index``/``open_values``: entries with some |τ_t| strictly inside its bracket, with their float32
    [θ₀, τ_1, ..., τ_T] (rows); ``zero_index``/``zero_negative``: entries whose elected sum is exactly 0 (written
    with the majority sign +1) and their result for the majority sign −1, in the output's kernel dtype.
    """

    at_or_above: np.ndarray
    strictly_above: np.ndarray
    decided_mass: int
    open_index: np.ndarray
    open_values: np.ndarray
    zero_index: np.ndarray
    zero_negative: np.ndarray


class TiesOnePassKernel:
    """Fused one-pass TIES over blocks of flat inputs (the loop of ``OnePassTies._merge_piece``, same bits).

    Per entry: τ_t = θ_t − θ₀; kept if |τ_t| ≥ hi_t; open if some unkept |τ_t| > lo_t; γ = sign(Σ kept τ_t)
    (an exact 0 with a non-zero kept τ_t takes +1 and its −1 result is reported); disjoint mean (or sum) of the kept
    τ_t agreeing with γ, times λ, added to θ₀ and cast to the output dtype.
    """

    def __init__(self, num_tasks: int, low: Sequence[float], high: Sequence[float], scaling: float, mean: bool,
                 block: int) -> None:
        from ._numba_kernels import KERNEL_CHUNK

        self.low = np.asarray(low, dtype=np.float32)
        self.high = np.asarray(high, dtype=np.float32)
        self.scaling, self.mean, self.block = np.float32(scaling), mean, block
        self.counts = np.zeros((-(-block // KERNEL_CHUNK), 2 * num_tasks + 4), dtype=np.int64)
        self.open_index = np.empty((1, block), dtype=np.int64)
        self.open_values = np.empty((num_tasks + 1, block), dtype=np.float32)
        self.zero_index = np.empty((1, block), dtype=np.int64)
        self.zero_negative: dict[np.dtype, np.ndarray] = {}  # per output dtype

    @staticmethod
    def accepts(input_dtypes: Sequence[torch.dtype], output_dtype: torch.dtype) -> bool:
        """Whether this kernel merges inputs of ``input_dtypes`` (base first) into ``output_dtype``."""
        return _takes(input_dtypes, output_dtype)

    def __call__(self, base: np.ndarray, tasks: tuple[np.ndarray, ...], out: np.ndarray,
                 offset: int = 0) -> TiesBlock | None:
        """Merge one block (``len(base) ≤ block``) into ``out``; reported indices are ``offset`` + positions in the
        block. ``None`` if an input holds NaN or Inf, or the merge overflows float32."""
        from ._numba_kernels import KERNEL_CHUNK, gather_regions

        ties_one_pass = _kernel("ties_one_pass")

        counts = self.counts[: -(-base.shape[0] // KERNEL_CHUNK)]
        if out.dtype not in self.zero_negative:
            self.zero_negative[out.dtype] = np.empty((1, self.block), dtype=out.dtype)
        zero_negative = self.zero_negative[out.dtype]
        with _LAUNCH_LOCK:
            ties_one_pass(_read_only(base), tuple(_read_only(a) for a in tasks), out, offset, self.low, self.high,
                          self.scaling, self.mean, finite_limit(out), counts, self.open_index, self.open_values,
                          self.zero_index, zero_negative)
        num_tasks = len(tasks)
        if counts[:, 2 * num_tasks + 3].any():
            return None
        opened, zeros = counts[:, 2 * num_tasks + 1], counts[:, 2 * num_tasks + 2]
        return TiesBlock(
            at_or_above=counts[:, :num_tasks].sum(axis=0),
            strictly_above=counts[:, num_tasks : 2 * num_tasks].sum(axis=0),
            decided_mass=int(counts[:, 2 * num_tasks].sum()),
            open_index=gather_regions(self.open_index, opened)[0],
            open_values=gather_regions(self.open_values, opened),
            zero_index=gather_regions(self.zero_index, zeros)[0],
            zero_negative=gather_regions(zero_negative, zeros)[0],
        )


@dataclasses.dataclass(frozen=True)
class Selected:
    """The k-th smallest entry of an array (``value``), how many entries are strictly smaller (``below``) and how many
    equal it (``equal``)."""

    value: float
    below: int
    equal: int


#: The digits of the radix selection, most significant first: (shift, bits) of a 32-bit order key.
_SELECT_DIGITS = ((16, 16), (0, 16))


def _num_parts() -> int:
    """Contiguous parts a counting kernel splits its input into: one per numba thread."""
    import numba

    return numba.get_num_threads()


def select_kth(values: np.ndarray, k: int, absolute: bool = False) -> Selected | None:
    """The k-th smallest (1-based) of the finite flat float32 ``values`` (of their magnitudes for ``absolute``): an
    exact most-significant-digit radix selection on the entries' order keys (bits whose unsigned order is the float
    order), three parallel counting passes with cache-resident histograms; ``None`` when the compiled kernels do not
    run."""
    if not kernels_enabled() or values.dtype != np.float32 or not 1 <= k <= values.shape[0]:
        return None
    histogram, array = _kernel("key_histogram"), _read_only(values)
    return _radix_select(k, lambda prefix_mask, prefix, shift, counts: histogram(array, absolute, prefix_mask,
                                                                                 prefix, shift, counts))


def _radix_select(k: int, histogram: Callable[[np.uint32, np.uint32, np.uint32, np.ndarray], None]) -> Selected:
    """The k-th smallest entry by its order key, from ``histogram(prefix_mask, prefix, shift, counts)`` filling the
    per-part digit counts of the entries whose key matches the prefix (a ``key_histogram`` kernel)."""
    prefix_mask, prefix, below, equal = 0, 0, 0, 0
    for shift, bits in _SELECT_DIGITS:
        counts = np.zeros((_num_parts(), 1 << bits), dtype=np.int64)
        with _LAUNCH_LOCK:
            histogram(np.uint32(prefix_mask), np.uint32(prefix), np.uint32(shift), counts)
        cumulative = np.cumsum(counts.sum(axis=0))
        digit = int(np.searchsorted(cumulative, k - below))
        below += int(cumulative[digit - 1]) if digit else 0
        equal = int(cumulative[digit]) - (int(cumulative[digit - 1]) if digit else 0)
        prefix |= digit << shift
        prefix_mask |= ((1 << bits) - 1) << shift
    bits = prefix & 0x7FFFFFFF if prefix >> 31 else ~prefix & 0xFFFFFFFF  # the order key back to float bits
    return Selected(float(np.array([bits], dtype=np.uint32).view(np.float32)[0]), below, equal)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
#: Entries per piece of the numpy uniforms (8-byte temporaries).
_UNIFORMS_PIECE = 1 << 20


def counter_uniforms(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """Float32 uniforms in [0, 1) on a 2⁻²⁴ grid, entry i = the top 24 bits of splitmix64's finaliser of
    seed + (i + 1)·φ (mod 2⁶⁴) · 2⁻²⁴ (Steele et al. 2014): a counter-based stream, the same bits from the compiled
    kernel and from numpy, whatever the chunking or thread count."""
    numel = int(np.prod(shape, dtype=np.int64))
    out = np.empty(numel, dtype=np.float32)
    seed64 = np.uint64(seed % (1 << 64))
    if kernels_enabled():
        with _LAUNCH_LOCK:
            _kernel("counter_uniforms")(seed64, out)
    else:  # numpy, in pieces: bounded uint64 temporaries
        for start in range(0, numel, _UNIFORMS_PIECE):
            stop = min(numel, start + _UNIFORMS_PIECE)
            with np.errstate(over="ignore"):
                x = seed64 + np.arange(start + 1, stop + 1, dtype=np.uint64) * _GOLDEN
                x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
                x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
                x ^= x >> np.uint64(31)
            out[start:stop] = (x >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / 16777216.0)
    return torch.from_numpy(out).view(tuple(shape))


def fused_magmax(deltas: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """τ_{t*}[j], t* the first task of largest |τ_t[j]|, over flat float32 CPU task vectors in one compiled pass, or
    ``None`` for the torch route."""
    if not kernels_enabled() or not all(d.dtype == torch.float32 and d.device.type == "cpu" for d in deltas):
        return None
    out = np.empty(deltas[0].numel(), dtype=np.float32)
    with _LAUNCH_LOCK:
        _kernel("magmax")(tuple(_read_only(d.reshape(-1).numpy()) for d in deltas), out)
    return torch.from_numpy(out)


def stored_magmax(arrays: Sequence[np.ndarray], scaling: float, out: np.ndarray) -> bool:
    """x_0 + λ·τ_{t*} (MagMax, :func:`fused_magmax`'s selection) written into ``out`` straight from the stored flat
    inputs [x_0, x_1, ..., x_T] in one compiled pass; ``False`` (nothing to rely on in ``out``) where the kernels do
    not take them, or an input or a result is not finite (the float32 route then names the cause)."""
    if not StoredTies.takes(arrays, out):
        return False
    nonfinite = np.zeros(_chunks(out.shape[0]), dtype=np.int64)
    with _LAUNCH_LOCK:
        _kernel("stored_magmax")(_read_only(arrays[0]), tuple(_read_only(a) for a in arrays[1:]), np.float32(scaling),
                                 out, finite_limit(out), nonfinite)
    return not nonfinite.any()


def fused_rank_band(values: torch.Tensor, start: int, stop: int, absolute: bool = False) -> torch.Tensor | None:
    """``values`` where the entry's rank in the stable ascending order of the flat float32 CPU ``values`` (of their
    magnitudes for ``absolute``; equal ones by position) lies in [start, stop), else 0 — two radix selections and two
    parallel passes; ``None`` for the torch route."""
    flat = values.reshape(-1)
    if not kernels_enabled() or flat.dtype != torch.float32 or flat.device.type != "cpu" or not 0 <= start < stop:
        return None
    array = _read_only(flat.contiguous().numpy())
    low, high = select_kth(array, start + 1, absolute), select_kth(array, stop, absolute)
    counts = np.zeros((_num_parts(), 2), dtype=np.int64)
    with _LAUNCH_LOCK:
        _kernel("equal_counts")(array, absolute, np.float32(low.value), np.float32(high.value), counts)
    first_ranks = np.empty_like(counts)
    first_ranks[:, 0] = low.below + np.cumsum(counts[:, 0]) - counts[:, 0]
    first_ranks[:, 1] = high.below + np.cumsum(counts[:, 1]) - counts[:, 1]
    out = np.empty(array.shape[0], dtype=np.float32)
    with _LAUNCH_LOCK:
        _kernel("band")(array, absolute, np.float32(low.value), np.float32(high.value), first_ranks, start, stop, out)
    return torch.from_numpy(out).view(values.shape)


def _kernel_arrays(arrays: Sequence[np.ndarray]) -> bool:
    """Whether the kernels take these flat arrays: bfloat16 bits (uint16) or float32, all after the first alike."""
    return (all(a.dtype in (np.uint16, np.float32) for a in arrays) and len({a.dtype for a in arrays[1:]}) <= 1)


def fused_load_task_vectors(arrays: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(θ₀, (T, n) τ)`` in float32 from flat kernel arrays [x_0, x_1, ..., x_T] (τ_t = x_t − x_0) in one compiled
    pass, or ``None`` when the torch route runs (kernels off, other dtypes, or an input holding NaN/Inf, which the
    torch route then names)."""
    if not kernels_enabled() or len(arrays) < 2 or not _kernel_arrays(arrays):
        return None
    n = arrays[0].shape[0]
    base = np.empty(n, dtype=np.float32)
    deltas = np.empty((len(arrays) - 1, n), dtype=np.float32)
    nonfinite = np.zeros(_chunks(n), dtype=np.int64)
    with _LAUNCH_LOCK:
        _kernel("load_task_vectors")(_read_only(arrays[0]), tuple(_read_only(a) for a in arrays[1:]), base, deltas,
                                     nonfinite)
    if nonfinite.any():
        return None
    return torch.from_numpy(base), torch.from_numpy(deltas)


def fused_add_store(base: torch.Tensor, update: torch.Tensor, out: torch.Tensor) -> bool | None:
    """out = θ₀ + u (float32 CPU tensors) cast once into ``out`` (bfloat16 or float32) in one compiled pass: whether
    every result is finite there, or ``None`` when the torch route runs."""
    if (not kernels_enabled() or out.dtype not in _KERNEL_DTYPES or base.dtype != torch.float32
            or update.dtype != torch.float32 or base.device.type != "cpu" or update.device.type != "cpu"
            or not (base.is_contiguous() and update.is_contiguous() and out.is_contiguous())):
        return None
    from .tensors import numpy_view

    flat_out = numpy_view(out.view(-1))
    nonfinite = np.zeros(_chunks(flat_out.shape[0]), dtype=np.int64)
    with _LAUNCH_LOCK:
        _kernel("add_store")(_read_only(base.view(-1).numpy()), _read_only(update.view(-1).numpy()), flat_out,
                             finite_limit(flat_out), nonfinite)
    return not nonfinite.any()


@dataclasses.dataclass
class StoredTiesCounts:
    """What :meth:`StoredTies.merge` counted over one tensor: entries each task kept (non-zero after its sparsifying
    and trim), entries where a kept value disagreed with the elected sign, and the tensor's size."""

    kept: np.ndarray
    conflicts: int
    numel: int


class StoredTies:
    """TIES-family merges of one tensor straight from its stored inputs (flat kernel arrays [x_0, x_1, ..., x_T]):
    DARE's drop (m ~ Bernoulli(1 − rate) from :func:`counter_uniforms`' stream, rescaled by 1/divisor and a factor),
    the trim (TIES' threshold, or Breadcrumbs' rank band: :meth:`rank_bands`), the sign election and the disjoint
    merge or the plain sum — and DELLA's MagPrune row by row (:meth:`magprune_merge`) — each a compiled pass over the
    mapped inputs computing τ_t = x_t − x_0 on the fly, no float32 copies. The same bits as the float32 route.

    Where the tensor's own majority sign elects the exact zeros of Σ_t v_t, the merge pass writes the results for both
    signs and keeps those of the sign its mass turns out to have (:func:`_elected`): no separate statistics pass."""

    def __init__(self, arrays: Sequence[np.ndarray], rates: Sequence[float] | None = None,
                 seeds: Sequence[int] | None = None, divisors: Sequence[float] | None = None) -> None:
        tasks = len(arrays) - 1
        self.base = _read_only(arrays[0])
        self.tasks = tuple(_read_only(a) for a in arrays[1:])
        self.numel = int(self.base.shape[0])
        self.rates = np.asarray(rates if rates is not None else [0.0] * tasks, dtype=np.float32)
        self.seeds = np.asarray([s % (1 << 64) for s in (seeds if seeds is not None else [0] * tasks)], dtype=np.uint64)
        self.divisors = np.asarray(divisors if divisors is not None else [1.0] * tasks, dtype=np.float32)
        self.factors = np.ones(tasks, dtype=np.float32)
        #: What the selections leave for :meth:`equal_positions`: ``{(t, value): #|τ̂_t| == value per SEGMENT
        #: entries}`` from the brackets, and a small tensor's |τ̂_t| (rows).
        self._equal_segments: dict[tuple[int, float], np.ndarray] = {}
        self._magnitudes: np.ndarray | None = None

    @staticmethod
    def takes(arrays: Sequence[np.ndarray], out: np.ndarray) -> bool:
        """Whether the kernels run on these flat input arrays and output array."""
        return kernels_enabled() and len(arrays) > 1 and _kernel_arrays(arrays) and out.dtype in (np.uint16,
                                                                                                   np.float32)

    @property
    def _drop(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.rates, self.seeds, self.divisors, self.factors

    def rescale_to_l1(self) -> None:
        """mergekit's ``rescale``: each dropped τ̂_t scaled by ‖τ_t‖₁/‖m ⊙ τ_t‖₁ (1 when either is below 1e-7)
        instead of 1/divisor."""
        norms = np.zeros((_chunks(self.numel), len(self.tasks), 2), dtype=np.float64)
        with _LAUNCH_LOCK:
            _kernel("stored_l1_norms")(self.base, self.tasks, self._drop, norms)
        totals = norms.sum(axis=0)
        self.divisors[:] = 1.0
        for t, (before, after) in enumerate(totals):
            self.factors[t] = 1.0 if before < 1e-7 or after < 1e-7 else before / after

    def squares(self) -> np.ndarray:
        """Σ τ_t² of every task in float64 (one compiled read of the inputs)."""
        squares = np.zeros((_chunks(self.numel), len(self.tasks)), dtype=np.float64)
        with _LAUNCH_LOCK:
            _kernel("stored_squares")(self.base, self.tasks, squares)
        return squares.sum(axis=0)

    def select(self, t: int, k: int) -> Selected:
        """The k-th smallest |τ̂_t| (see :func:`select_kth`)."""
        histogram = _kernel("stored_key_histogram")
        return _radix_select(k, lambda prefix_mask, prefix, shift, counts: histogram(
            self.base, self.tasks[t], self._drop, t, prefix_mask, prefix, shift, counts))

    def select_all(self, ranks: Sequence[int]) -> list[Selected | None]:
        """The ``ranks[t]``-th smallest |τ̂_t| of every task (``None`` for a rank 0): :meth:`select_queries`."""
        found = self.select_queries([(t, k) for t, k in enumerate(ranks) if k > 0])
        return [found.get((t, k)) if k > 0 else None for t, k in enumerate(ranks)]

    def select_queries(self, queries: Sequence[tuple[int, int]]) -> dict[tuple[int, int], Selected]:
        """``{(t, k): the k-th smallest |τ̂_t|}`` for queries with k ≥ 1 (several per task possible), in one read of
        the inputs where a strided sample brackets each rank (every entry inside the bracket gathered, the rank then
        selected exactly among them), by :meth:`select` for a query whose bracket missed."""
        queries = sorted(set(queries))
        found: dict[tuple[int, int], Selected] = {}
        if self.numel >= _BRACKET_MIN_NUMEL and queries:
            found = self._bracketed(queries)
        elif queries:  # a small tensor: its |τ̂_t| in memory (the radix passes' fixed costs would dominate)
            found = self._in_memory(queries)
        return {(t, k): found.get((t, k)) or self.select(t, k) for t, k in queries}

    def _in_memory(self, queries: Sequence[tuple[int, int]]) -> dict[tuple[int, int], Selected]:
        magnitudes = np.empty((len(self.tasks), self.numel), dtype=np.float32)
        with _LAUNCH_LOCK:
            _kernel("stored_sample")(self.base, self.tasks, self._drop, 1, magnitudes)
        self._magnitudes = magnitudes
        found = {}
        for t, k in queries:
            values = magnitudes[t]
            value = np.partition(values, k - 1)[k - 1]
            found[(t, k)] = Selected(float(value), int((values < value).sum()), int((values == value).sum()))
        return found

    def _bracketed(self, queries: Sequence[tuple[int, int]]) -> dict[tuple[int, int], Selected]:
        n, tasks = self.numel, len(self.tasks)
        stride = max(1, n // min(max(_BRACKET_SAMPLE, n // 64), _BRACKET_SAMPLE_MAX))
        sample = np.empty((tasks, n // stride), dtype=np.float32)
        with _LAUNCH_LOCK:
            _kernel("stored_sample")(self.base, self.tasks, self._drop, stride, sample)
        size = sample.shape[1]
        count = len(queries)
        low, high = np.zeros(count, dtype=np.float32), np.full(count, np.inf, dtype=np.float32)
        spans = []
        ends: dict[int, list[tuple[int, int, int]]] = {}  # task → (query, 0 low / 1 high, sample position)
        for q, (t, k) in enumerate(queries):
            fraction = min(max(k / n, 0.0), 1.0)
            margin = 6.0 * math.sqrt(size * fraction * (1.0 - fraction)) + 16
            first, last = math.floor(fraction * size - margin), math.ceil(fraction * size + margin)
            if first > 0:
                ends.setdefault(t, []).append((q, 0, first))
            if last < size - 1:
                ends.setdefault(t, []).append((q, 1, last))
            spans.append((min(last, size) - max(first, 0)) / size)
        for t, wanted in ends.items():  # the sample's order statistics at the bracket ends (no full sort)
            ordered = np.partition(sample[t], sorted({position for *_, position in wanted}))
            for q, end, position in wanted:
                (low if end == 0 else high)[q] = ordered[position]
        capacity = int(2 * max(spans) * n / _num_parts()) + 4096
        counts = np.zeros((_num_parts(), count, 4), dtype=np.int64)
        buffers = np.empty((_num_parts(), count, capacity), dtype=np.float32)
        query_tasks = np.asarray([t for t, _ in queries], dtype=np.int64)
        from ._numba_kernels import SEGMENT

        segments = np.zeros((count, 2, max(1, -(-n // SEGMENT))), dtype=np.int32)
        with _LAUNCH_LOCK:
            _kernel("stored_bracket")(self.base, self.tasks, self._drop, query_tasks, low, high, counts, buffers,
                                      segments)
        found = {}
        for q, (t, k) in enumerate(queries):
            below, at_low, inside, at_high = (int(c) for c in counts[:, q, :].sum(axis=0))
            if below < k <= below + at_low:  # the lower end itself (common: differences of bfloat16 weights are coarse)
                found[(t, k)] = Selected(float(low[q]), below, at_low)
                self._equal_segments[(t, float(low[q]))] = segments[q, 0]
            elif low[q] < high[q] and below + at_low + inside < k <= below + at_low + inside + at_high:  # the upper end
                found[(t, k)] = Selected(float(high[q]), below + at_low + inside, at_high)
                self._equal_segments[(t, float(high[q]))] = segments[q, 1]
            elif below + at_low < k <= below + at_low + inside and (counts[:, q, 2] < capacity).all():
                values = np.concatenate([buffers[p, q, : counts[p, q, 2]] for p in range(counts.shape[0])])
                rank = k - below - at_low - 1
                value = np.partition(values, rank)[rank]
                found[(t, k)] = Selected(float(value), below + at_low + int((values < value).sum()),
                                         int((values == value).sum()))
            # otherwise the bracket missed the rank, or more entries were inside than gathered: the radix selection
        return found

    def equal_positions(self, queries: Sequence[tuple[int, float, int]]) -> list[int]:
        """For each query (t, value, nth): the position of the nth (1-based) entry with |τ̂_t| == value (−1 if there
        are fewer): from what the selections left (a small tensor's magnitudes, or a bracket's counts per segment, then
        a scan of the one segment that holds it), else one parallel counting read of the inputs and a scan of the part
        that holds it."""
        if not queries:
            return []
        from ._numba_kernels import SEGMENT

        positions = [-1] * len(queries)
        scan = _kernel("stored_equal_position")
        counted = []
        for q, (t, value, nth) in enumerate(queries):
            if self._magnitudes is not None:  # a small tensor's magnitudes, in memory
                at = np.flatnonzero(self._magnitudes[t] == np.float32(value))
                positions[q] = int(at[nth - 1]) if 1 <= nth <= at.shape[0] else -1
                continue
            segments = self._equal_segments.get((t, float(value)))
            if segments is None:
                counted.append(q)
                continue
            cumulative = np.cumsum(segments, dtype=np.int64)
            segment = int(np.searchsorted(cumulative, nth))
            if 1 <= nth and segment < segments.shape[0]:  # scan the one segment that holds it
                before = int(cumulative[segment - 1]) if segment else 0
                positions[q] = int(scan(self.base, self.tasks[t], self._drop, t, np.float32(value), nth - before,
                                        segment * SEGMENT, min(self.numel, (segment + 1) * SEGMENT)))
        if not counted:
            return positions
        order = sorted(counted, key=lambda q: queries[q][0])
        parts = _num_parts()
        counts = np.zeros((parts, len(order)), dtype=np.int64)
        with _LAUNCH_LOCK:  # per-part counts the selections did not leave, then a scan of the part holding each
            _kernel("stored_equal_counts")(self.base, self.tasks, self._drop,
                                           np.asarray([queries[q][0] for q in order], dtype=np.int64),
                                           np.asarray([queries[q][1] for q in order], dtype=np.float32), counts)
        per = -(-self.numel // parts)
        for i, q in enumerate(order):
            t, value, nth = queries[q]
            cumulative = np.cumsum(counts[:, i])
            part = int(np.searchsorted(cumulative, nth))
            if 1 <= nth and part < parts:
                before = int(cumulative[part - 1]) if part else 0
                positions[q] = int(scan(self.base, self.tasks[t], self._drop, t, np.float32(value), nth - before,
                                        part * per, min(self.numel, (part + 1) * per)))
        return positions

    def threshold_rules(self, densities: Sequence[float]) -> list[tuple[float, int]]:
        """TIES' inclusive thresholds: the (n − ⌊d_t n⌋)-th smallest |τ̂_t| (keep all for d_t ≥ 1)."""
        n = self.numel
        selected = self.select_all([0 if d >= 1.0 else n - int(n * d) for d in densities])
        return [(0.0 if s is None else s.value, n) for s in selected]

    def largest_rules(self, densities: Sequence[float]) -> list[tuple[float, int]]:
        """:func:`hf_merge.methods.ties.largest_rule` of every |τ̂_t|: exactly the ⌊d_t n⌋ largest (all for
        d_t ≥ 1), equal ones by position."""
        n = self.numel
        keeps = [n if d >= 1.0 else int(d * n) for d in densities]
        selected = self.select_all([1 if keep >= n else (0 if keep <= 0 else n - keep + 1) for keep in keeps])
        return [self._largest_rule(t, keep, s) for t, (keep, s) in enumerate(zip(keeps, selected))]

    def _largest_rule(self, t: int, keep: int, selected: Selected | None) -> tuple[float, int]:
        n = self.numel
        if keep >= n:
            return (0.0 if n == 0 else selected.value), n
        if keep <= 0:
            return math.inf, -1
        at_value = keep - (n - selected.below - selected.equal)
        if at_value == selected.equal:
            return selected.value, n
        if at_value <= 0:
            return selected.value, -1
        return selected.value, self.equal_positions([(t, selected.value, at_value)])[0]

    def merge(self, rules: Trim, scales: Sequence[float], weights: Sequence[float] | None,
              majority: float | None, mean: bool, scaling: float, out: np.ndarray, weigh_values: bool = False,
              floor: float = -math.inf) -> StoredTiesCounts | None:
        """θ₀ + λ · the elect-and-merge written into ``out``; ``None`` when a result is not finite there (or an input
        held NaN/Inf): the float32 route then names the cause. ``rules``: TIES' (threshold, cut) per task or a
        :meth:`rank_bands` trim. ``majority`` ``None``: the tensor's own majority sign, decided in the same pass (exact
        zeros of the elected sum merged for both signs). ``weigh_values`` (SCE): Σ_{t∈A} w_t v_t above the division,
        which is by max(Σ_{t∈A} w_t, ``floor``)."""
        tasks = len(self.tasks)
        weight_array = np.asarray(weights if weights is not None else [1.0] * tasks, dtype=np.float32)

        def run(majority: float, negative: np.ndarray) -> np.ndarray:
            counts = np.zeros((_chunks(self.numel), tasks + 3), dtype=np.int64)
            with _LAUNCH_LOCK:
                _kernel("stored_elect_merge")(self.base, self.tasks, self._drop, _trim_arrays_of(rules),
                                              np.asarray(scales, dtype=np.float32), weight_array, weights is not None,
                                              weigh_values, np.float32(floor), np.float32(majority), mean,
                                              np.float32(scaling), out, negative, finite_limit(out), counts)
            return counts

        return _elected(run, majority, tasks, self.numel, out)

    def masked_sum(self, trim: Trim, scales: Sequence[float], divisor: float, scaling: float,
                   out: np.ndarray) -> StoredTiesCounts | None:
        """θ₀ + λ · (Σ_t s_t τ̂_t) / divisor (the trimmed task vectors summed in task order) written into ``out``;
        ``None`` when a result is not finite there (or an input held NaN/Inf)."""
        tasks = len(self.tasks)
        counts = np.zeros((_chunks(self.numel), tasks + 3), dtype=np.int64)
        with _LAUNCH_LOCK:
            _kernel("stored_masked_sum")(self.base, self.tasks, self._drop, _trim_arrays_of(trim),
                                         np.asarray(scales, dtype=np.float32), np.float32(divisor),
                                         np.float32(scaling), out, finite_limit(out), counts)
        return _finish(counts, tasks, self.numel)

    def rank_bands(self, bands: Sequence[tuple[int, int]]) -> BandTrim:
        """The trim keeping, of every task, the entries whose rank in the stable ascending order of |τ̂_t| (equal
        magnitudes by position) lies in ``bands[t]`` = [start, stop) — what ``argsort(|τ̂_t|, stable=True)[start:stop]``
        selects: two selections per task (one read of the inputs where the sampled brackets hold), and where equal
        magnitudes straddle a bound, the position where the band begins or ends among them (one more read)."""
        n, tasks = self.numel, len(self.tasks)
        lows, highs = np.full(tasks, np.inf, dtype=np.float32), np.full(tasks, -1.0, dtype=np.float32)
        firsts, lasts = np.full(tasks, n, dtype=np.int64), np.full(tasks, -1, dtype=np.int64)
        selected = self.select_queries([(t, k) for t, (start, stop) in enumerate(bands) if start < stop
                                        for k in (start + 1, stop)])
        positions = []  # (task, bound: 0 low / 1 high, value, nth)
        for t, (start, stop) in enumerate(bands):
            if start >= stop:
                continue  # nothing kept
            low, high = selected[(t, start + 1)], selected[(t, stop)]
            lows[t], highs[t] = low.value, high.value
            firsts[t], lasts[t] = -1, n
            if start > low.below:  # equal ones rank below, below + 1, ... by position: the band starts among them
                positions.append((t, 0, low.value, start - low.below + 1))
            if stop - high.below < high.equal:  # and ends among them
                positions.append((t, 1, high.value, stop - high.below))
        found = self.equal_positions([(t, value, nth) for t, _, value, nth in positions])
        for (t, bound, _, _), position in zip(positions, found):
            if position < 0:
                raise RuntimeError("rank band: an equal entry counted was not found")  # (not reached)
            if bound == 0:
                firsts[t] = position
            else:
                lasts[t] = position
        return BandTrim(lows, firsts, highs, lasts, np.ones(tasks, dtype=np.float32))

    def rescale_trim_to_l1(self, trim: BandTrim) -> None:
        """mergekit's ``rescale`` after a trim: each trimmed τ̂_t scaled by ‖τ̂_t‖₁/‖m_t ⊙ τ̂_t‖₁ (1 when either is
        below 1e-7; float64 sums) — the band's factors."""
        norms = np.zeros((_chunks(self.numel), len(self.tasks), 2), dtype=np.float64)
        unscaled = dataclasses.replace(trim, factors=np.ones_like(trim.factors))
        with _LAUNCH_LOCK:
            _kernel("stored_trim_l1_norms")(self.base, self.tasks, self._drop, unscaled.arrays(), norms)
        trim.factors[:] = [_l1_factor(before, after) for before, after in norms.sum(axis=0)]

    def magprune_merge(self, row_length: int, densities: Sequence[float], epsilons: Sequence[float],
                       seeds: Sequence[int], rescale: str | None, scales: Sequence[float],
                       weights: Sequence[float] | None, elect: bool, majority: float | None, mean: bool,
                       divisor: float, scaling: float, out: np.ndarray) -> StoredTiesCounts | None:
        """DELLA from the stored inputs, rows of ``row_length`` entries: MagPrune of every τ_t (density ≥ 1 keeps it
        whole; ``rescale`` "divide" by p, "l1" to the unmasked L1 norm — one more read — or ``None``), then θ₀ + λ ·
        TIES' elect and disjoint merge of v_t = s_t τ'_t (``elect``; ``majority`` ``None``: the tensor's own, decided
        in the same pass) or (Σ_t v_t) / divisor, written into ``out``; ``None`` when a result or an input is not
        finite."""
        tasks, n = len(self.tasks), row_length
        num_rows = self.numel // n
        blocks = max(1, -(-num_rows // max(1, _MAGPRUNE_BLOCK // n)))
        whole = np.asarray([d >= 1.0 for d in densities], dtype=np.bool_)
        prune = (np.asarray([d - e for d, e in zip(densities, epsilons)], dtype=np.float32),
                 np.asarray([2 * e for e in epsilons], dtype=np.float32),
                 np.asarray(densities, dtype=np.float32),
                 np.asarray([s % (1 << 64) for s in seeds], dtype=np.uint64), whole,
                 np.ones(tasks, dtype=np.float32))
        if rescale == "l1":
            norms = np.zeros((blocks, tasks, 2), dtype=np.float64)
            with _LAUNCH_LOCK:
                _kernel("stored_magprune_norms")(self.base, self.tasks, n, prune, norms)
            prune[5][:] = [1.0 if whole[t] else _l1_factor(before, after)
                           for t, (before, after) in enumerate(norms.sum(axis=0))]
        weight_array = np.asarray(weights if weights is not None else [1.0] * tasks, dtype=np.float32)

        def run(majority: float, negative: np.ndarray) -> np.ndarray:
            counts = np.zeros((blocks, tasks + 3), dtype=np.int64)
            with _LAUNCH_LOCK:
                _kernel("stored_magprune_merge")(self.base, self.tasks, n, prune, rescale == "divide",
                                                 np.asarray(scales, dtype=np.float32), weight_array,
                                                 weights is not None, elect, np.float32(majority), mean,
                                                 np.float32(divisor), np.float32(scaling), out, negative,
                                                 finite_limit(out), counts)
            return counts

        if not elect:
            return _finish(run(1.0, out[:0]), tasks, self.numel)
        return _elected(run, majority, tasks, self.numel, out)


@dataclasses.dataclass
class BandTrim:
    """A rank-band trim per task (:meth:`StoredTies.rank_bands`): keep low < |τ̂| < high, |τ̂| = low from position
    ``first`` on, |τ̂| = high up to position ``last``; kept entries scaled by ``factor`` (an L1 rescale)."""

    lows: np.ndarray
    firsts: np.ndarray
    highs: np.ndarray
    lasts: np.ndarray
    factors: np.ndarray

    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.lows, self.firsts, self.highs, self.lasts, self.factors


#: A trim of :class:`StoredTies`: TIES' (threshold, cut) per task, or a rank band.
Trim = Sequence[tuple[float, int]] | BandTrim


def _trim_arrays_of(trim: Trim) -> tuple[np.ndarray, ...]:
    return trim.arrays() if isinstance(trim, BandTrim) else _rule_arrays(trim)


def _l1_factor(before: float, after: float) -> float:
    """``ties.l1_factor`` from the two norms: before/after, or 1 when either is below 1e-7."""
    return 1.0 if before < 1e-7 or after < 1e-7 else before / after


def _finish(counts: np.ndarray, tasks: int, numel: int) -> StoredTiesCounts | None:
    """What a stored merge counted, or ``None`` if a result (or an input) was not finite."""
    totals = counts.sum(axis=0)
    if totals[tasks + 1]:
        return None
    return StoredTiesCounts(totals[:tasks], int(totals[tasks]), numel)


_SCRATCH = threading.local()


def _scratch_like(out: np.ndarray) -> np.ndarray:
    """An uninitialised flat array like ``out`` in a buffer this thread reuses from tensor to tensor (the read-ahead
    thread's buffers go with it when the merge ends): no fresh pages to fault in for every tensor."""
    buffer = getattr(_SCRATCH, "buffer", None)
    if buffer is None or buffer.nbytes < out.nbytes:
        buffer = _SCRATCH.buffer = np.empty(out.nbytes, dtype=np.uint8)
    return buffer[: out.nbytes].view(out.dtype)


def _elected(run: Callable[[float, np.ndarray], np.ndarray], majority: float | None, tasks: int, numel: int,
             out: np.ndarray) -> StoredTiesCounts | None:
    """An elect-and-merge kernel ``run(majority, negative) -> counts`` carried out with ``majority``, or for ``None``
    with the tensor's own majority sign in one pass: the kernel writes the results for +1 into ``out`` and those for
    −1 into ``negative``, whose results are taken where the tensor's mass turns out negative; a mass of exactly 0
    (the majority sign 0, as the float32 route elects it) runs the kernel again with it."""
    if majority is not None:
        return _finish(run(majority, out[:0]), tasks, numel)
    negative = _scratch_like(out)
    counts = run(math.nan, negative)
    mass = int(counts[:, tasks + 2].sum())
    if mass < 0 and not counts[:, tasks + 1].any():
        np.copyto(out, negative)
    elif mass == 0:
        counts = run(0.0, out[:0])
    return _finish(counts, tasks, numel)


#: Entries per block of rows of the stored MagPrune (a parallel work item).
_MAGPRUNE_BLOCK = 1 << 14


#: Tensors smaller than this are selected by the radix passes alone; larger ones first try a sampled bracket.
_BRACKET_MIN_NUMEL = 1 << 16
#: The smallest and the largest strided sample a bracket is estimated from (1/64 of the tensor in between).
_BRACKET_SAMPLE, _BRACKET_SAMPLE_MAX = 1 << 12, 1 << 20


def _rule_arrays(rules: Sequence[tuple[float, int]]) -> tuple[np.ndarray, np.ndarray]:
    return (np.asarray([rule[0] for rule in rules], dtype=np.float32),
            np.asarray([rule[1] for rule in rules], dtype=np.int64))


def fused_magprune(rows: torch.Tensor, density: float, epsilon: float, seed: int, divide: bool) -> torch.Tensor | None:
    """DELLA's MagPrune of a 2-D float32 CPU tensor, row by row in one compiled pass (ranks, keep probabilities,
    :func:`counter_uniforms`' draws, the drop and the 1/p rescale with ``divide``), or ``None`` for the torch route."""
    if (not kernels_enabled() or rows.dtype != torch.float32 or rows.device.type != "cpu" or rows.dim() != 2
            or rows.shape[1] < 2):
        return None
    out = np.empty(tuple(rows.shape), dtype=np.float32)
    with _LAUNCH_LOCK:
        _kernel("magprune_rows")(_read_only(rows.contiguous().numpy()), np.float32(density - epsilon),
                                 np.float32(2 * epsilon), np.uint64(seed % (1 << 64)), divide, out)
    return torch.from_numpy(out)
