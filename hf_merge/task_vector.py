"""Task vectors τ = θ_ft − θ₀ (Ilharco et al. 2023) with lazy arithmetic.

A :class:`TaskVector` is a linear combination Σ_i c_i (θ_i − θ₀_i) over sources; nothing is read until a tensor is
asked for, and tensors are read one key at a time from the inputs' files when the inputs are paths.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch

from .engine import emit, parse_dtype, validate_sources
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
        base_src = open_source(base, "base", allow_pickle=allow_pickle)
        ft_src = open_source(finetuned, "finetuned", allow_pickle=allow_pickle)
        metas = validate_sources(base_src, {"finetuned": ft_src})
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
    ) -> Any:
        """θ₀ + scaling · τ, computed in float32 and cast once to the base's dtype (or ``dtype``).

        Returns a new model for a model base (the base is untouched), a state dict for a state-dict base, or the
        path of a written checkpoint with ``output_dir``.
        """
        source = open_source(base, "base")
        metas = {k: source.meta(k) for k in source.keys()}
        missing = [k for k in self._metas if not source.has(k)]
        if missing:
            raise ValueError(f"The base lacks tensors of the task vector: {missing[:8]}.")
        for key, meta in self._metas.items():
            if metas[source.resolve(key)].shape != meta.shape:
                raise ValueError(f"Shape mismatch for {key!r}: base {metas[source.resolve(key)].shape} vs {meta.shape}.")
        out_dtype = parse_dtype(dtype)
        out_metas = {
            k: TensorMeta(m.shape, out_dtype if out_dtype is not None and m.dtype.is_floating_point else m.dtype)
            for k, m in metas.items()
        }

        def compute(key: str) -> torch.Tensor:
            tensor = source.get(key)
            if key not in self._metas:
                return tensor.to(out_metas[key].dtype)
            merged = tensor.to(torch.float32) + scaling * self[key]
            return merged.to(out_metas[key].dtype)

        return emit(source, out_metas, compute, output_dir=output_dir, progress=progress, desc="applying task vector")
