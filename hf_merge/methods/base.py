"""The :class:`Merger` interface every method implements.

A merger is a thin wrapper around pure tensor functions. The engine owns iteration, dtype upcasting, device
placement and progress; a merger only says how the task vectors of one tensor combine (``merge_tensor``) and may run
statistics passes over all task vectors first (``prepare``), e.g. TIES' global magnitude threshold.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from ..config import MergeConfig
    from ..engine import MergeContext
    from ..params import ParamInfo


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

    def prepare(self, ctx: MergeContext) -> None:
        """Statistics pass(es) over ``ctx.iter_deltas()`` before merging; nothing by default."""

    def linear_coefficients(self) -> list[float] | None:
        """``[c_t]`` when the merge is Σ_t c_t τ_t for every tensor (after ``prepare``), else ``None``.

        The engine then accumulates (1 − Σc)·θ₀ + Σ c_t θ_t straight from the stored tensors, skipping the
        per-task task vectors; ``merge_tensor`` must give the same result.
        """
        return None

    @abc.abstractmethod
    def merge_tensor(
        self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo
    ) -> torch.Tensor:
        """The merged task vector of one tensor (float32), given the float32 base and the T task vectors τ_t."""


#: ``(key, flat indices or None for the whole tensor, values in the output dtype)``: entries to overwrite.
Amendment = tuple[str, torch.Tensor | None, torch.Tensor]


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
