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
import json
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
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
    #: Whether ``prepare`` runs the models on the tasks' data (``merge(data=...)``, :meth:`MergeContext.task_models`);
    #: the engine refuses data given to a method that does not.
    uses_data: ClassVar[bool] = False

    def __init__(self, config: MergeConfig) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}.")
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    def prepare(self, ctx: MergeContext) -> None:
        """Statistics pass(es) over ``ctx.iter_deltas()`` before merging; nothing by default. Whatever it measures
        must be the same on every process of a distributed merge (see :attr:`reduces_across_ranks`)."""

    def linear_coefficients(self, task_names: Sequence[str]) -> list[float] | None:
        """``[c_t]`` when the merge is Σ_t c_t τ_t for every tensor, else ``None`` (the default).

        Known from the config and the task names alone (before any data is read). The engine then accumulates
        θ₀ + Σ c_t (θ_t − θ₀) straight from the stored tensors; ``merge_tensor`` must give the same result.
        """
        return None

    def coefficients_of(self, task_names: Sequence[str]) -> Callable[[str], list[float]] | None:
        """``key → [c_t]`` when the merge is linear in the task vectors of every tensor (after ``prepare``), else
        ``None``: :meth:`linear_coefficients` for every tensor unless the coefficients vary over the model."""
        coefficients = self.linear_coefficients(task_names)
        return None if coefficients is None else (lambda key: coefficients)

    @property
    def gram_determined(self) -> bool:
        """Whether ``merge_tensor`` returns a combination of θ₀ and the τ_t whose coefficients depend only on their
        inner products (rotation-equivariant, e.g. SLERP, Model Stock). The engine then runs ``merge_tensor`` on each
        tensor's (T + 1)-dimensional Gram coordinates and streams the combination from the stored inputs (one fused
        read for the Gram matrix, one for the combination), never materialising float32 copies."""
        return False

    @property
    def whole_model_statistics(self) -> bool:
        """Whether ``prepare`` takes statistics over every tensor of the model (e.g. TIES' global threshold): such a
        method cannot give different tensors different configs (a schedule)."""
        return False

    @property
    def reduces_across_ranks(self) -> bool:
        """Whether ``prepare`` reduces what its statistics passes measure across the processes of a distributed merge
        (:meth:`MergeContext.all_sum`, :meth:`MergeContext.ordered_sum`): it is then given only this process's keys.
        ``False`` (the default): every process's ``prepare`` sees every key (correct for any method; the
        statistics are read once per process)."""
        return False

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

    @property
    def reads_stored(self) -> bool:
        """Whether :meth:`merge_stored` is defined."""
        return type(self).merge_stored is not Merger.merge_stored

    def merge_stored(self, key: str, arrays: Sequence[np.ndarray], out: np.ndarray, info: ParamInfo) -> bool:
        """Optional: θ₀ + the merged task vector of ``key`` written into ``out`` (the flat output, bfloat16 bits or
        float32) straight from the stored inputs' flat arrays [x_0, x_1, ..., x_T] (mapped, bfloat16 bits or
        float32) by compiled passes, with no float32 copies; returns whether it did. ``False`` sends the tensor
        through ``merge_tensor`` (which must give the same result), also where an input holds NaN/Inf or the result
        overflows, so that route names the cause."""
        return False

    def statistics(self) -> dict[str, float] | None:
        """Optional: what the method measured over the merge (e.g. TIES' kept fraction), for the merge summary."""
        return None


class ScheduledMerger(Merger):
    """Carries out a config holding :class:`~hf_merge.Schedule` values: each tensor is merged by the method's own
    merger built on that tensor's plain config (:meth:`~hf_merge.MergeConfig.resolved`), one per distinct config,
    each prepared on the tensors it merges. The method itself never sees a schedule."""

    def __init__(self, config: MergeConfig, merger_class: type[Merger]) -> None:
        if issubclass(merger_class, ModelMerger):
            raise ValueError(f"Method {config.method!r} merges whole models; schedules apply to methods that merge "
                             "tensor by tensor from a base.")
        self.config = config
        self.merger_class = merger_class
        self.uses_param_info = merger_class.uses_param_info  # type: ignore[misc]
        self.uses_data = merger_class.uses_data  # type: ignore[misc]
        self.by_key: dict[str, Merger] = {}

    def prepare(self, ctx: MergeContext) -> None:
        groups: dict[str, tuple[Merger, list[str]]] = {}
        for key in ctx.merge_keys:
            config = self.config.resolved(ctx.infos[key])
            signature = json.dumps(config.to_dict(), sort_keys=True, default=repr)
            if signature not in groups:
                groups[signature] = (self.merger_class(config), [])
            groups[signature][1].append(key)
        mergers = [merger for merger, _ in groups.values()]
        if len(mergers) > 1 and any(merger.whole_model_statistics for merger in mergers):
            raise ValueError(
                f"Method {self.config.method!r} with these parameters takes statistics over the whole model (e.g. TIES "
                f"scope='global'), but the schedule gives its tensors {len(mergers)} different configs; use per-tensor "
                "statistics (TIES scope='tensor', as mergekit does) or constant values.")
        for merger, keys in groups.values():
            merger.prepare(ctx.restricted(keys))
            self.by_key.update(dict.fromkeys(keys, merger))

    def coefficients_of(self, task_names: Sequence[str]) -> Callable[[str], list[float]] | None:
        per_merger = {id(m): m.coefficients_of(task_names) for m in self.by_key.values()}
        if any(of is None for of in per_merger.values()):
            return None
        return lambda key: per_merger[id(self.by_key[key])](key)

    @property
    def has_lowrank_form(self) -> bool:
        return self.merger_class.merge_lowrank is not Merger.merge_lowrank

    @property
    def gram_determined(self) -> bool:
        return bool(self.by_key) and all(merger.gram_determined for merger in self.by_key.values())

    def merge_lowrank(self, key: str, parts: list[LowRank], info: ParamInfo) -> LowRank:
        return self.by_key[key].merge_lowrank(key, parts, info)

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        return self.by_key[key].merge_tensor(key, base, deltas, info)

    @property
    def reads_stored(self) -> bool:
        return self.merger_class.merge_stored is not Merger.merge_stored

    def merge_stored(self, key: str, arrays: Sequence[np.ndarray], out: np.ndarray, info: ParamInfo) -> bool:
        return self.by_key[key].merge_stored(key, arrays, out, info)


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
