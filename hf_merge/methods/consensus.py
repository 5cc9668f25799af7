"""TALL masks and Consensus merging (Wang et al. 2024, "Localizing Task Information for Improved Model Merging").

* Multi-task vector τ_MTL: the unscaled Task Arithmetic sum Σ_t τ_t (``base="task_arithmetic"``), or the TIES
  disjoint *sum* with k = 20 % over the whole model (``base="ties"``), as in the official code.
* TALL mask of task t (Eq. 3): m_t = 1[|τ_t| > λ_t |τ_MTL − τ_t|] — strict ``>``, λ_t per task.
* TALL-mask model of task t: θ₀ + m_t ⊙ τ_MTL.
* Consensus mask (Eq. 5): c = 1[Σ_t m_t ≥ k]; Consensus merging: θ = θ₀ + α (c ⊙ τ_MTL). k = 0 is the plain
  multi-task merge, k > T gives θ₀. With ``base="ties"`` the mask is applied to the TIES multi-task vector that
  defined the masks (so every parameter goes through one streaming pass after the TIES threshold passes).

All parameters are treated elementwise, one tensor at a time; TALL masks are stored bit-packed (N bits per task) by
:func:`hf_merge.compress`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import torch

from ..bank import TaskCompressor
from ..config import MergeConfig, check_choice, check_number
from ..io.sources import TensorMeta
from ..params import ParamInfo
from ..registry import register_method
from .base import Merger
from .task_arithmetic import task_arithmetic
from .ties import TiesConfig, TiesMerger

MTL_BASES = ("task_arithmetic", "ties")
TIES_DENSITY = 0.2  # the official TALL / Consensus TIES multi-task vector: top-20 % dis-sum
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def _check_mask_threshold(value: float | Mapping[str, float]) -> None:
    values = list(value.values()) if isinstance(value, Mapping) else [value]
    if isinstance(value, Mapping) and not value:
        raise ValueError("mask_threshold mapping is empty; give one λ per task or a single number.")
    for item in values:
        check_number("mask_threshold", item)
        if item < 0:
            raise ValueError(f"mask_threshold (TALL λ) must be ≥ 0, got {item!r}.")


@dataclasses.dataclass(kw_only=True)
class TallMaskConfig(MergeConfig):
    """``mask_threshold`` λ (a number or ``{task: λ}``; official per-task choice from {0.2, …, 0.6}), ``base`` the
    multi-task vector ("task_arithmetic" or "ties"). Used by :func:`hf_merge.compress`; as a merge, ``task`` names
    the task whose TALL-mask model θ₀ + m_t ⊙ τ_MTL is returned."""

    method: str = dataclasses.field(default="tall_masks", init=False)
    mask_threshold: float | Mapping[str, float] = 0.4
    base: str = "task_arithmetic"
    task: str | None = None

    def __post_init__(self) -> None:
        _check_mask_threshold(self.mask_threshold)
        check_choice("base", self.base, MTL_BASES)
        if self.task is not None and not isinstance(self.task, str):
            raise TypeError(f"task must be a task name (str) or None, got {self.task!r}.")


@dataclasses.dataclass(kw_only=True)
class ConsensusConfig(MergeConfig):
    """``k`` the minimum number of tasks whose TALL mask keeps a weight (official ``prun_thre_k`` = 2),
    ``mask_threshold`` the TALL λ (number or ``{task: λ}``), ``scaling`` α (tuned like Task Arithmetic), ``base``
    the multi-task vector ("task_arithmetic" or "ties")."""

    method: str = dataclasses.field(default="consensus", init=False)
    k: int = 2
    mask_threshold: float | Mapping[str, float] = 0.4
    scaling: float = 1.0
    base: str = "task_arithmetic"

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ValueError(f"k must be a non-negative int, got {self.k!r}.")
        _check_mask_threshold(self.mask_threshold)
        check_number("scaling", self.scaling)
        check_choice("base", self.base, MTL_BASES)


def tall_masks(deltas: list[torch.Tensor], multitask: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """m_t = |τ_t| > λ_t |τ_MTL − τ_t| for every task: a (T, ...) boolean stack (strict comparison)."""
    return torch.stack([d.abs() > lam * (multitask - d).abs() for d, lam in zip(deltas, thresholds)])


def consensus_mask(masks: torch.Tensor, k: int) -> torch.Tensor:
    """c = 1[Σ_t m_t ≥ k] from a (T, ...) stack of TALL masks."""
    return masks.sum(dim=0) >= k


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as ⌈N/8⌉ bytes (most significant bit first, like ``numpy.packbits``)."""
    bits = mask.flatten().to("cpu", torch.uint8)
    padded = torch.nn.functional.pad(bits, (0, (-bits.numel()) % 8))
    return (padded.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: the boolean tensor of ``shape``."""
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != (numel + 7) // 8:
        raise ValueError(f"packed mask has {packed.numel()} {packed.dtype} values; {shape} needs {(numel + 7) // 8} uint8.")
    bits = (packed.unsqueeze(1) & _BIT_WEIGHTS.to(packed.device)) != 0
    return bits.flatten()[:numel].view(shape)


class _MaskedMultiTask(Merger):
    """Shared machinery: the multi-task vector τ_MTL and the per-task thresholds λ_t."""

    config: TallMaskConfig | ConsensusConfig

    def prepare(self, ctx) -> None:
        self.task_names = list(ctx.task_names)
        threshold = self.config.mask_threshold
        if isinstance(threshold, Mapping):
            if set(threshold) != set(self.task_names):
                raise ValueError(
                    f"mask_threshold gives λ for tasks {sorted(threshold)}, but the tasks are {self.task_names}."
                )
            self.thresholds = [float(threshold[name]) for name in self.task_names]
        else:
            self.thresholds = [float(threshold)] * len(self.task_names)
        self.ties: TiesMerger | None = None
        if self.config.base == "ties":
            self.ties = TiesMerger(TiesConfig(density=TIES_DENSITY, scaling=1.0, scope="global", aggregate="sum"))
            self.ties.prepare(ctx.nested())

    def multitask_vector(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        """τ_MTL of one tensor: Σ_t τ_t, or the global TIES dis-sum (k = 20 %)."""
        if self.ties is not None:
            return self.ties.merge_tensor(key, base, deltas, info)
        return task_arithmetic(deltas, 1.0)


class ConsensusMerger(_MaskedMultiTask):
    config: ConsensusConfig

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        multitask = self.multitask_vector(key, base, deltas, info)
        keep = consensus_mask(tall_masks(deltas, multitask, self.thresholds), self.config.k)
        return (multitask * keep).mul_(self.config.scaling)


class TallMaskMerger(_MaskedMultiTask, TaskCompressor):
    config: TallMaskConfig

    def prepare(self, ctx) -> None:
        super().prepare(ctx)
        if self.config.task is not None and self.config.task not in self.task_names:
            raise ValueError(f"task {self.config.task!r} is not among the tasks {self.task_names}.")

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        if self.config.task is None:
            raise ValueError(
                "tall_masks builds one model per task: set TallMaskConfig(task=...) to merge one of them, or use "
                "hf_merge.compress(base, models, TallMaskConfig(...)) to store them all in a TaskBank."
            )
        t = self.task_names.index(self.config.task)
        multitask = self.multitask_vector(key, base, deltas, info)
        mask = deltas[t].abs() > self.thresholds[t] * (multitask - deltas[t]).abs()
        return multitask * mask

    # ------------------------------------------------------------------ TaskCompressor
    def payload_layout(self, key: str, meta: TensorMeta, info: ParamInfo, num_tasks: int) -> dict[str, TensorMeta]:
        packed = TensorMeta(((math.prod(meta.shape) + 7) // 8,), torch.uint8)
        return {"multitask": TensorMeta(meta.shape, torch.float32), **{f"mask.{t}": packed for t in range(num_tasks)}}

    def encode_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> dict[str, torch.Tensor]:
        multitask = self.multitask_vector(key, base, deltas, info)
        masks = tall_masks(deltas, multitask, self.thresholds)
        return {"multitask": multitask, **{f"mask.{t}": pack_mask(mask) for t, mask in enumerate(masks)}}

    def decode_tensor(
        self, key: str, task_index: int, payload: Callable[[str], torch.Tensor], meta: TensorMeta, info: ParamInfo
    ) -> torch.Tensor:
        multitask = payload("multitask").to(torch.float32)
        mask = unpack_mask(payload(f"mask.{task_index}"), tuple(meta.shape))
        return multitask * mask.to(multitask.device)


register_method(ConsensusConfig, ConsensusMerger)
register_method(TallMaskConfig, TallMaskMerger)
