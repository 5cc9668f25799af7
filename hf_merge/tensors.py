"""Tensor metadata shared by every layer: shape and dtype without data, safetensors dtype names, and numpy views of
tensors (bfloat16 as its uint16 bit patterns)."""

import math
from dataclasses import dataclass

import numpy as np
import torch

from .kernels import Selected, select_kth


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of a tensor, known without reading its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype holding ``dtype``'s bytes: itself, or the unsigned integer of its width for the float types
    numpy lacks (bfloat16 as uint16, float8 as uint8)."""
    if dtype == torch.bfloat16:
        return np.dtype(np.uint16)
    if dtype.is_floating_point and dtype.itemsize == 1:
        return np.dtype(np.uint8)
    return torch.empty(0, dtype=dtype).numpy().dtype


def numpy_view(tensor: torch.Tensor) -> np.ndarray:
    """A zero-copy numpy view of a CPU tensor: bfloat16 as its uint16 bit patterns."""
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    if tensor.dtype.is_floating_point and tensor.dtype.itemsize == 1:
        return tensor.view(torch.uint8).numpy()
    return tensor.numpy()


def tensor_copy(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``dtype`` holding a copy of ``array`` (the inverse of :func:`numpy_view`)."""
    return torch.from_numpy(np.array(array)).view(dtype)


#: ``(key, flat indices or None for the whole tensor, values in the output dtype)``: entries of an output tensor to
#: overwrite once a whole pass has settled them (see ``OnePassMerge.amendments`` and ``Sink.amend``).
Amendment = tuple[str, torch.Tensor | None, torch.Tensor]


def check_output_finite(key: str, tensor: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
    """``tensor`` (merged values already cast to the output dtype), or :class:`~hf_merge.MergeError` naming ``key``
    when a value is not finite there: the merge overflowed the output dtype (inputs are checked as they are read).
    float8 casts saturate instead of overflowing, so for them the float32 ``values`` before the cast are compared
    with the largest finite value."""
    small = tensor.is_floating_point() and tensor.dtype.itemsize == 1  # float8
    wide = tensor.float() if small else tensor
    saturated = small and values is not None and bool((values.abs() > torch.finfo(tensor.dtype).max).any())
    if tensor.is_floating_point() and (saturated or not torch.isfinite(wide).all()):
        from .errors import MergeError

        name = str(tensor.dtype).removeprefix("torch.")
        raise MergeError(
            f"tensor {key!r}: merged values overflow {name} (largest finite {torch.finfo(tensor.dtype).max:.4g}); "
            "write a wider dtype (dtype='float32') or check the method's coefficients."
        )
    return tensor


def kth_smallest(values: torch.Tensor, k: int, *, scratch: bool = False, absolute: bool = False) -> float:
    """The k-th smallest (1-based) entry of ``values`` (any shape, finite; of |values| for ``absolute``): the compiled
    radix selection for float32 on the CPU (:func:`hf_merge.kernels.select_kth`), else numpy's introselect on the CPU
    (an order of magnitude faster than ``torch.kthvalue``, which sorts), ``torch.kthvalue`` elsewhere. ``scratch``:
    ``values`` is a temporary the selection may reorder in place (no copy)."""
    return select(values, k, scratch=scratch, absolute=absolute).value


def select(values: torch.Tensor, k: int, *, scratch: bool = False, absolute: bool = False) -> Selected:
    """:func:`kth_smallest` with how many entries are strictly smaller and how many equal it."""
    flat = values.reshape(-1)
    if flat.device.type == "cpu" and flat.dtype == torch.float32 and flat.is_contiguous():
        selected = select_kth(flat.detach().numpy(), k, absolute)
        if selected is not None:
            return selected
    if absolute:
        flat, scratch = flat.abs(), True
    if flat.device.type != "cpu":
        value = flat.kthvalue(k).values.item()
    else:
        array = flat.detach().numpy()
        if scratch and flat.is_contiguous():
            array.partition(k - 1)
            value = float(array[k - 1])
        else:
            value = float(np.partition(array, k - 1)[k - 1])
    return Selected(value, int((flat < value).sum()), int((flat == value).sum()))


def stable_rank_band(values: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Bool mask of the entries whose rank in the stable ascending order of ``values`` (flattened; equal values by
    position) lies in [start, stop) — what ``argsort(values, stable=True)[start:stop]`` selects, from two selections
    instead of a sort."""
    flat = values.reshape(-1)
    if stop <= start:
        return torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    low, high = select(flat, start + 1), select(flat, stop)
    mask = (flat >= low.value) & (flat <= high.value)
    for bound in {low.value: low, high.value: high}.values():
        # equal entries hold the ranks below, below + 1, ... by position
        if bound.below >= start and bound.below + bound.equal <= stop:
            continue  # every equal entry is inside the band
        equal = (flat == bound.value).nonzero().squeeze(1)
        ranks = bound.below + torch.arange(equal.numel(), device=flat.device)
        mask[equal] = (ranks >= start) & (ranks < stop)
    return mask.view_as(values)
