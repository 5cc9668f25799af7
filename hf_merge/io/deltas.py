"""Sources that declare capabilities beyond stored tensors: tasks given as updates of a base.

A :class:`DeltaSource` (a LoRA adapter, a task vector, a task of a task bank) is bound to the run's base by
:func:`hf_merge.inputs.bind_deltas` and then reads as θ₀ + ΔW; the engine asks it for ΔW directly. A
:class:`LowRankSource` also gives its updates of matrices as factors, which a method's low-rank form merges without
forming them.
"""

from __future__ import annotations

import abc
from typing import Any

import torch

from ..lowrank import LowRank
from ..tensors import TensorMeta
from .sources import TensorSource


class DeltaSource(TensorSource):
    """A task given as an update of a base rather than as stored weights (a LoRA adapter, a task vector, a task of a
    task bank). :func:`hf_merge.inputs.bind_deltas` binds it to the run's base before validation; it then reads as
    θ₀ + ΔW and gives ΔW itself through :meth:`delta`."""

    _base: TensorSource | None = None

    def bind(self, base: TensorSource) -> None:
        """Check the update against ``base`` (names, shapes) and read through it from now on."""
        self._base = base

    @property
    def bound_base(self) -> TensorSource:
        if self._base is None:
            raise RuntimeError(f"{self.label} is not bound to a base model yet.")
        return self._base

    def keys(self) -> list[str]:
        return self.bound_base.keys()

    def meta(self, key: str) -> TensorMeta:
        return self.bound_base.meta(key)

    @property
    def config(self) -> Any:
        return self.bound_base.config if self._base is not None else None

    @abc.abstractmethod
    def delta(self, key: str, base: torch.Tensor) -> torch.Tensor:
        """ΔW of ``key`` in float32 on ``base``'s device (``base``: the bound base's tensor in float32)."""

    def _read(self, key: str) -> torch.Tensor:
        base = self.bound_base.get(key)
        if not base.dtype.is_floating_point:
            return base
        return (base.to(torch.float32) + self.delta(key, base.to(torch.float32))).to(base.dtype)


class LowRankSource(DeltaSource):
    """A :class:`DeltaSource` whose updates of matrices come as factors ΔW = P Q (a LoRA adapter): merges into a
    low-rank output stay in factors for methods with a low-rank form."""

    @abc.abstractmethod
    def update(self, key: str) -> LowRank | None:
        """ΔW of ``key`` as factors, or ``None`` when this source does not update ``key`` in low-rank form."""
