"""``MergeOptions``: how a merge runs and where its result is placed, built once by :func:`make_options`.

Every front door (``merge``, ``merge_with``, ``compress``, ``merge_adapters``, ``TaskVector.apply_to``, the CLI) builds
its options here, and every output honours each option or rejects it by name (see the sinks in :mod:`hf_merge.io`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import torch

from .placement import parse_size

_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPE_NAMES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(_DTYPE_NAMES)}.") from None


@dataclasses.dataclass(frozen=True)
class MergeOptions:
    """How a merge runs and where its result goes.

    Attributes:
        device: where the arithmetic runs (default CPU); tensors move there one at a time.
        dtype: output dtype of floating-point tensors (default: the base's dtype per tensor).
        progress: show tqdm progress bars.
        allow_pickle: accept ``pytorch_model.bin`` inputs (loaded with ``weights_only=True``).
        memory_budget: bytes the merge's working set may hold (sets the read-ahead; selects the exact multi-pass
            routes); ``None``: unbounded.
        device_map: placement of the merged model (an Accelerate device map, or ``"auto"``).
        max_memory: Accelerate's per-device placement budget for ``device_map="auto"`` (``{"cpu": "4GB", 0: ...}``);
            it bounds where the *result* goes, not the merge's working set.
        offload_folder: where ``"disk"`` entries of the device map go.
        max_shard_size: shard size of a written checkpoint (``None``: 5GB, the Hub's default).
        overwrite: write into an existing folder this package did not write (the user's files in it are kept;
            see :mod:`hf_merge.io.publish`).
    """

    device: torch.device | None = None
    dtype: torch.dtype | None = None
    progress: bool = True
    allow_pickle: bool = False
    memory_budget: int | None = None
    device_map: Mapping[str, Any] | str | None = None
    max_memory: Mapping[Any, int | str] | None = None
    offload_folder: str | os.PathLike | None = None
    max_shard_size: int | str | None = None
    overwrite: bool = False

    def given(self) -> dict[str, Any]:
        """The options set to something other than their default, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default}

    def reject(self, names: tuple[str, ...], where: str) -> None:
        """Raise naming the options of ``names`` that were given: ``where`` cannot honour them."""
        given = [name for name in names if name in self.given()]
        if given:
            raise ValueError(f"{where} cannot honour the option(s) {given}; leave them out for this output.")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


def make_options(
    *,
    device: torch.device | str | None = None,
    compute_device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    progress: bool = True,
    allow_pickle: bool = False,
    memory_budget: int | str | None = None,
    device_map: Mapping[str, Any] | str | None = None,
    max_memory: int | str | Mapping[Any, int | str] | None = None,
    offload_folder: str | os.PathLike | None = None,
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
) -> MergeOptions:
    """The one way to build :class:`MergeOptions` from user keywords.

    ``compute_device`` is a synonym of ``device``. ``max_memory`` as a number or size string (``"4GB"``) is the
    merge's working-set budget (``memory_budget``); as a dict it is Accelerate's placement budget.
    """
    if device is not None and compute_device is not None and torch.device(device) != torch.device(compute_device):
        raise ValueError(f"device={device!r} and compute_device={compute_device!r} disagree; give one.")
    device = device if device is not None else compute_device
    if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}, but no CUDA device is available (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda is not None}); use device='cpu'.")
    if isinstance(max_memory, Mapping):
        placement_budget = dict(max_memory)
        for size in placement_budget.values():
            parse_size(size)
    else:
        placement_budget = None
        if max_memory is not None:
            if memory_budget is not None:
                raise ValueError("max_memory= (a size) and memory_budget= both set the working-set budget; give one.")
            memory_budget = max_memory
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {progress!r}.")
    for name, flag in (("allow_pickle", allow_pickle), ("overwrite", overwrite)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}.")
    if max_shard_size is not None:
        parse_size(max_shard_size)
    return MergeOptions(
        device=torch.device(device) if device is not None else None,
        dtype=parse_dtype(dtype),
        progress=progress,
        allow_pickle=allow_pickle,
        memory_budget=parse_size(memory_budget) if memory_budget is not None else None,
        device_map=device_map,
        max_memory=placement_budget,
        offload_folder=offload_folder,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
    )


#: The keywords :func:`make_options` takes (every front door accepts these).
OPTION_KEYWORDS = ("device", "compute_device", "dtype", "progress", "allow_pickle", "memory_budget", "device_map",
                   "max_memory", "offload_folder", "max_shard_size", "overwrite")


def split_options(keywords: dict[str, Any], **defaults: Any) -> MergeOptions:
    """The :class:`MergeOptions` of a front door's keywords: the option keywords are taken out of ``keywords`` (what
    remains are method parameters); ``defaults`` apply where the caller gave none."""
    given = {name: keywords.pop(name) for name in OPTION_KEYWORDS if name in keywords}
    return make_options(**{**defaults, **given})
