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
from typing import TYPE_CHECKING, ClassVar

import torch

from ..config import MergeConfig, MethodCard, SearchSpace, check_choice, check_number
from ..errors import warn
from ..params import ParamInfo
from ..registry import register_method
from ..tensors import TensorMeta
from .base import Merger, TaskCompressor
from .task_arithmetic import TASK_ARITHMETIC_GRID, task_arithmetic
from .ties import TiesConfig, TiesMerger

if TYPE_CHECKING:
    from ..context import MergeContext

MTL_BASES = ("task_arithmetic", "ties")
TIES_DENSITY = 0.2  # the official TALL / Consensus TIES multi-task vector: top-20 % dis-sum
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
#: The TALL λ_t grid of the official code, chosen per task.
TALL_GRID = (0.2, 0.3, 0.4, 0.5, 0.6)

TALL_BIBTEX = """@inproceedings{wang2024localizing,
  title     = {Localizing Task Information for Improved Model Merging and Compression},
  author    = {Wang, Ke and Dimitriadis, Nikolaos and Ortiz-Jim{\\'e}nez, Guillermo and Fleuret, Fran{\\c{c}}ois and
               Frossard, Pascal},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2024}
}"""


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

    card: ClassVar[MethodCard] = MethodCard(
        title="TALL masks",
        summary=(
            "TALL masks localise each task's information inside a single multi-task vector: the mask of task t "
            "keeps the entries where the task's own vector dominates its distance to the multi-task vector. "
            "Applying a task's binary mask to the shared multi-task vector recovers most of the task's fine-tuned "
            "accuracy, so T tasks are stored as one vector plus T bit masks."
        ),
        bibtex=TALL_BIBTEX,
        paper_url="https://arxiv.org/abs/2405.07813",
    )

    def __post_init__(self) -> None:
        _check_mask_threshold(self.mask_threshold)
        check_choice("base", self.base, MTL_BASES)
        if self.task is not None and not isinstance(self.task, str):
            raise TypeError(f"task must be a task name (str) or None, got {self.task!r}.")

    def search_space(self) -> SearchSpace:
        """λ_t from {0.2, …, 0.6}, chosen per task on that task's TALL-mask model (the config's ``task``)."""
        return SearchSpace("mask_threshold", TALL_GRID, "per_task")


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

    card: ClassVar[MethodCard] = MethodCard(
        title="Consensus merging",
        summary=(
            "A per-task TALL mask marks the parameters that are important for that task relative to the multi-task "
            "vector. Consensus merging keeps only the parameters that at least k tasks mark as important, removing "
            "'selfish' weights (useful to one task only) and 'catastrophic' weights (useful to none), then adds the "
            "masked sum of task vectors to the pre-trained model."
        ),
        bibtex=TALL_BIBTEX,
        paper_url="https://arxiv.org/abs/2405.07813",
    )

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ValueError(f"k must be a non-negative int, got {self.k!r}.")
        _check_mask_threshold(self.mask_threshold)
        check_number("scaling", self.scaling)
        check_choice("base", self.base, MTL_BASES)

    def search_space(self) -> SearchSpace:
        """α over Task Arithmetic's grid; the masks do not depend on α, so θ₀ + α (c ⊙ τ_MTL) is linear in it."""
        return SearchSpace("scaling", TASK_ARITHMETIC_GRID, "linear")


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

    def prepare(self, ctx: MergeContext) -> None:
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

    @property
    def whole_model_statistics(self) -> bool:
        """τ_MTL from TIES takes its trim thresholds over the whole model."""
        return self.config.base == "ties"

    @property
    def reduces_across_ranks(self) -> bool:
        """TIES' statistics are reduced across processes; a sum has none."""
        return True

    def multitask_vector(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        """τ_MTL of one tensor: Σ_t τ_t, or the global TIES dis-sum (k = 20 %)."""
        if self.ties is not None:
            return self.ties.merge_tensor(key, base, deltas, info)
        return task_arithmetic(deltas, 1.0)


class ConsensusMerger(_MaskedMultiTask):
    config: ConsensusConfig

    def prepare(self, ctx: MergeContext) -> None:
        super().prepare(ctx)
        if self.config.k > len(self.task_names):
            warn(
                f"Consensus k={self.config.k} exceeds the number of tasks ({len(self.task_names)}): no weight can be "
                "kept by k tasks, so the merge returns the base model unchanged. Use k ≤ T (the paper uses k = 2)."
            )

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        multitask = self.multitask_vector(key, base, deltas, info)
        keep = consensus_mask(tall_masks(deltas, multitask, self.thresholds), self.config.k)
        return (multitask * keep).mul_(self.config.scaling)


class TallMaskMerger(_MaskedMultiTask, TaskCompressor):
    config: TallMaskConfig

    def prepare(self, ctx: MergeContext) -> None:
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
