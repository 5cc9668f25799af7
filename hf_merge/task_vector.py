"""Task vectors τ = θ_ft − θ₀ (Ilharco et al. 2023) with lazy arithmetic.

A :class:`TaskVector` is a linear combination Σ_i c_i (θ_i − θ₀_i) over sources; nothing is read until a tensor is
asked for, and tensors are read one key at a time from the inputs' files when the inputs are paths.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch

from .errors import MergeError
from .inputs import open_pair
from .io.deltas import DeltaSource
from .io.sources import TensorMeta, TensorSource, open_source


class TaskVector:
    """τ = θ_ft − θ₀ of any input kind (``PreTrainedModel``, checkpoint folder, state dict).

    Supports ``tv1 + tv2``, ``tv1 - tv2``, ``-tv``, ``c * tv``, ``sum([...])`` and :meth:`apply_to`. Integer and
    bool buffers are not part of a task vector; they are copied from the base when applied.

    Example:
        >>> tv = TaskVector(base, finetuned)
        >>> edited = (0.5 * tv).apply_to(base)
    """

    def __init__(self, base: Any, finetuned: Any, *, allow_pickle: bool = False) -> None:
        base_src, ft_src, metas = open_pair(base, finetuned, allow_pickle=allow_pickle)
        self._metas = {k: m for k, m in metas.items() if m.dtype.is_floating_point}
        self._terms: list[tuple[float, TensorSource, TensorSource]] = [(1.0, base_src, ft_src)]

    @classmethod
    def _combine(cls, metas: dict[str, TensorMeta], terms: list[tuple[float, TensorSource, TensorSource]]) -> TaskVector:
        out = cls.__new__(cls)
        out._metas = metas
        out._terms = terms
        return out

    # ------------------------------------------------------------------ access
    def keys(self) -> list[str]:
        return list(self._metas)

    def __len__(self) -> int:
        return len(self._metas)

    def __contains__(self, key: object) -> bool:
        return key in self._metas

    def __getitem__(self, key: str) -> torch.Tensor:
        """τ[key] in float32."""
        if key not in self._metas:
            raise KeyError(f"Task vector has no tensor {key!r}.")
        total = torch.zeros(self._metas[key].shape, dtype=torch.float32)
        for coef, base, finetuned in self._terms:
            diff = finetuned.get(key).to(torch.float32) - base.get(key).to(torch.float32)
            total.add_(diff, alpha=coef)
        return total

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self._metas:
            yield key, self[key]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All of τ materialised in float32."""
        return dict(self.items())

    def norm(self) -> float:
        """‖τ‖₂ over all tensors (streamed)."""
        return float(sum(float(t.double().pow(2).sum()) for _, t in self.items()) ** 0.5)

    # ------------------------------------------------------------------ arithmetic
    def _check_compatible(self, other: TaskVector) -> None:
        if set(self._metas) != set(other._metas):
            raise ValueError(f"Task vectors have different tensors: {sorted(set(self._metas) ^ set(other._metas))[:8]}.")
        for key, meta in self._metas.items():
            if other._metas[key].shape != meta.shape:
                raise ValueError(f"Shape mismatch for {key!r}: {meta.shape} vs {other._metas[key].shape}.")

    def __add__(self, other: Any) -> TaskVector:
        if isinstance(other, (int, float)) and other == 0:  # sum([...]) starts from 0
            return self
        if not isinstance(other, TaskVector):
            return NotImplemented
        self._check_compatible(other)
        return TaskVector._combine(self._metas, self._terms + other._terms)

    __radd__ = __add__

    def __neg__(self) -> TaskVector:
        return self * -1.0

    def __sub__(self, other: TaskVector) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        return self + (-other)

    def __mul__(self, scalar: float) -> TaskVector:
        if isinstance(scalar, bool) or not isinstance(scalar, (int, float)):
            return NotImplemented
        return TaskVector._combine(self._metas, [(c * scalar, b, f) for c, b, f in self._terms])

    __rmul__ = __mul__

    # ------------------------------------------------------------------ application
    def apply_to(
        self,
        base: Any,
        scaling: float = 1.0,
        *,
        output_dir: str | os.PathLike | None = None,
        dtype: torch.dtype | str | None = None,
        progress: bool = False,
        num_threads: int | None = None,
    ) -> Any:
        """θ₀ + scaling · τ, computed in float32 and cast once to the base's dtype (or ``dtype``), on ``num_threads``
        CPU threads (default: torch's setting).

        Returns a new model for a model base (the base is untouched), a state dict for a state-dict base, or the
        path of a written checkpoint with ``output_dir``.
        """
        from .engine import Plan, run
        from .io.sinks import output_sink
        from .methods.task_arithmetic import TaskArithmeticConfig, TaskArithmeticMerger
        from .options import make_options

        options = make_options(dtype=dtype, progress=progress, num_threads=num_threads)
        source = open_source(base, "base")
        plan = Plan(source, {"task_vector": _TaskVectorUpdate(self)},
                    TaskArithmeticMerger(TaskArithmeticConfig(scaling=scaling)))
        return run(plan, output_sink(source, options, output_dir=output_dir), options)

    def __repr__(self) -> str:
        terms = " + ".join(f"{c:g}·({f.label} − {b.label})" for c, b, f in self._terms)
        return f"TaskVector({len(self._metas)} tensors: {terms})"


class _TaskVectorUpdate(DeltaSource):
    """A task vector as an update of the base it is applied to (validated against it when bound)."""

    label = "task vector"

    def __init__(self, vector: TaskVector) -> None:
        super().__init__()
        self.vector = vector

    def bind(self, base: TensorSource) -> None:
        missing = [k for k in self.vector.keys() if not base.has(k)]
        if missing:
            raise MergeError(f"The base lacks tensors of the task vector: {missing[:8]}.")
        for key, meta in self.vector._metas.items():
            if base.meta(base.resolve(key)).shape != meta.shape:
                raise MergeError(f"Shape mismatch for {key!r}: base {base.meta(base.resolve(key)).shape} vs {meta.shape}.")
        super().bind(base)

    def delta(self, key: str, base: torch.Tensor) -> torch.Tensor:
        if key not in self.vector:
            return torch.zeros_like(base)
        return self.vector[key].to(base.device)
