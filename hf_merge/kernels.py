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
"""

from __future__ import annotations

import dataclasses
import functools
import logging
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
    """The compiled kernel ``name`` of :mod:`hf_merge._numba_kernels`; the first one this machine has never compiled
    is announced (numba compiles on first use, then loads from its on-disk cache)."""
    from . import _numba_kernels

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
    from ._numba_kernels import KERNEL_CHUNK

    kernel = _kernel("linear_combine")

    nonfinite = np.zeros(-(-out.shape[0] // KERNEL_CHUNK), dtype=np.int64)
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
        from ._numba_kernels import KERNEL_CHUNK

        elect_mass = _kernel("elect_mass")
        arrays = tuple(_read_only(d.numpy()) for d in deltas)
        mass = np.zeros(max(1, -(-arrays[0].shape[0] // KERNEL_CHUNK)), dtype=np.int64)
        with _LAUNCH_LOCK:
            elect_mass(arrays, *_trim_arrays(thresholds, cuts, scales), mass)
        return float(np.sign(mass.sum()))

    def __call__(self, deltas: Sequence[torch.Tensor], thresholds: Sequence[float], cuts: Sequence[int],
                 scales: Sequence[float], weights: Sequence[float] | None, majority: float, mean: bool) -> torch.Tensor:
        elect_merge = _kernel("elect_merge")
        arrays = tuple(_read_only(d.numpy()) for d in deltas)
        out = np.empty(arrays[0].shape[0], dtype=np.float32)
        weight_array = np.asarray(weights if weights is not None else [1.0] * len(deltas), dtype=np.float32)
        with _LAUNCH_LOCK:
            elect_merge(arrays, *_trim_arrays(thresholds, cuts, scales), weight_array, weights is not None,
                        np.float32(majority), mean, out)
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
    from ._numba_kernels import KERNEL_CHUNK

    kernel = _kernel("gram")

    size = len(arrays)
    partials = np.zeros((max(1, -(-arrays[0].shape[0] // KERNEL_CHUNK)), size, size), dtype=np.float64)
    with _LAUNCH_LOCK:
        kernel(_read_only(arrays[0]), tuple(_read_only(a) for a in arrays[1:]), partials)
    return partials.sum(axis=0)


def finite_limit(out: np.ndarray) -> np.float32:
    """The bound below which a float32 |x| stays finite once stored in ``out``'s dtype: ∞ for float32; for bfloat16
    (uint16 bits) the midpoint between its largest finite value and ∞ (0x7F7F8000), which rounds to ∞ (to even)."""
    if out.dtype == np.uint16:
        return np.array([0x7F7F8000], dtype=np.uint32).view(np.float32)[0]
    return np.float32(np.inf)


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
