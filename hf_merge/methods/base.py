"""What a method is: a :class:`Merger` (and, for compression, a :class:`TaskCompressor`) with optional capabilities.

A merger is a thin wrapper around pure tensor functions. The engine owns iteration, dtype upcasting, device
placement, memory and progress; a merger says how the task vectors of one tensor combine (``merge_tensor``) and may
declare, each with a default:

- ``prepare(ctx)``: statistics passes over all task vectors first (e.g. TIES' global magnitude threshold);
- ``linear_coefficients(task_names)``: ``[c_t]`` when the merge is Σ_t c_t τ_t (the engine then runs one fused
  accumulation per tensor, and ATM keeps a running sum);
- ``merge_lowrank(key, parts, info)``: the merged update from the tasks' low-rank factors (LoRA in, LoRA out);
- ``one_pass``: a merge reading every input once (set by ``prepare``).

Its config declares the rest (see :class:`~hf_merge.MergeConfig`): the coefficient search space and the model-card
metadata (:class:`MethodCard`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..tensors import Amendment

if TYPE_CHECKING:
    from ..config import MergeConfig
    from ..context import MergeContext
    from ..lowrank import LowRank
    from ..params import ParamInfo
    from ..tensors import TensorMeta


class Merger(abc.ABC):
    config_class: ClassVar[type[MergeConfig]]
    #: Whether ``merge_tensor`` reads the parameter kinds. When False (elementwise methods) the engine classifies
    #: by names only and skips building the model architecture; methods that route by kind keep it True.
    uses_param_info: ClassVar[bool] = True
    #: Set by ``prepare`` (only where ``ctx.can_merge_in_one_pass``) to merge reading every input once; ``None``:
    #: the engine merges tensor by tensor with ``merge_tensor``.
    one_pass: OnePassMerge | None = None

    def __init__(self, config: MergeConfig) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}.")
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    def prepare(self, ctx: MergeContext) -> None:
        """Statistics pass(es) over ``ctx.iter_deltas()`` before merging; nothing by default."""

    def linear_coefficients(self, task_names: Sequence[str]) -> list[float] | None:
        """``[c_t]`` when the merge is Σ_t c_t τ_t for every tensor, else ``None`` (the default).

        Known from the config and the task names alone (before any data is read). The engine then accumulates
        θ₀ + Σ c_t (θ_t − θ₀) straight from the stored tensors; ``merge_tensor`` must give the same result.
        """
        return None

    @property
    def has_lowrank_form(self) -> bool:
        """Whether :meth:`merge_lowrank` is defined (merges of LoRA inputs into a LoRA output stay in factors)."""
        return type(self).merge_lowrank is not Merger.merge_lowrank

    def merge_lowrank(self, key: str, parts: list[LowRank], info: ParamInfo) -> LowRank:
        """The merged update of one matrix from the tasks' factors ΔW_t = P_t Q_t (after ``prepare``).

        Optional: methods without a low-rank form are run densely and their merged update is factored by an SVD.
        """
        raise TypeError(f"{type(self).__name__} has no low-rank form (has_lowrank_form is False): merge densely.")

    @abc.abstractmethod
    def merge_tensor(
        self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo
    ) -> torch.Tensor:
        """The merged task vector of one tensor (float32), given the float32 base and the T task vectors τ_t."""




class OnePassMerge(abc.ABC):
    """A merge reading every input once: each tensor's provisional output as its inputs stream by, then amendments
    for the entries only the whole pass settles (e.g. TIES' global thresholds). The engine writes each output as
    soon as it is merged and applies the amendments in place before the result is published."""

    @abc.abstractmethod
    def load(self, key: str) -> Any:
        """The inputs of ``key`` for :meth:`merge` (the engine reads them ahead in a background thread)."""

    @abc.abstractmethod
    def merge(self, key: str, inputs: Any, out: torch.Tensor) -> None:
        """Write the provisional output of ``key`` (output dtype and shape, CPU) into ``out``."""

    @abc.abstractmethod
    def amendments(self) -> Iterator[Amendment]:
        """After every floating-point key was merged, in order: the entries to overwrite."""


class ModelMerger(Merger):
    """A method that merges whole models without a shared base (e.g. permutation alignment, C2M3).

    ``hf_merge.merge(None, models, config)`` calls :meth:`merge_models` with every input's source; the result is
    delivered like any merge (model of the first input's class, state dict, or checkpoint folder).
    """

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} merges whole models; call hf_merge.merge(None, models, config).")

    @abc.abstractmethod
    def merge_models(self, ctx: MergeContext) -> dict[str, torch.Tensor]:
        """The merged state dict (float32 or the inputs' dtype) from ``ctx.tasks`` (one source per input model)."""


class TaskCompressor(abc.ABC):
    """A method that stores every task compactly and rebuilds each task vector from what it stored
    (:func:`hf_merge.compress` writes it into a :class:`~hf_merge.TaskBank`)."""

    @abc.abstractmethod
    def payload_layout(self, key: str, meta: TensorMeta, info: ParamInfo, num_tasks: int) -> dict[str, TensorMeta]:
        """``{part: meta}`` of what is stored for tensor ``key`` (shapes known before any data is read)."""

    @abc.abstractmethod
    def encode_tensor(
        self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo
    ) -> dict[str, torch.Tensor]:
        """The stored parts of ``key`` (as laid out by :meth:`payload_layout`) from the float32 task vectors."""

    @abc.abstractmethod
    def decode_tensor(
        self, key: str, task_index: int, payload: Callable[[str], torch.Tensor], meta: TensorMeta, info: ParamInfo
    ) -> torch.Tensor:
        """The reconstructed task vector of task ``task_index`` (float32) from the stored parts (``payload(part)``)."""
