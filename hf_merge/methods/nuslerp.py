"""NuSLERP (mergekit ``nuslerp``): SLERP of two task vectors, t = w₂ / (w₁ + w₂), added to the base model.

Per whole tensor (``flatten``, the default) or per vector along one dimension, with mergekit's choice of dimension:
``row_wise=True`` takes the vectors along dim 0, ``row_wise=False`` those along the last dim.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

from ..config import MergeConfig, MethodCard, check_choice
from ..params import ParamInfo
from ..registry import register_method
from .base import Merger
from .slerp import (
    MERGEKIT_BIBTEX,
    MERGEKIT_URL,
    SPHERE_INPUTS,
    as_task_vector,
    check_model_count,
    check_weights,
    resolve_weights,
    slerp,
    slerp_rows,
    sphere_inputs,
)

if TYPE_CHECKING:
    from ..context import MergeContext

#: mergekit's NuSLERP interpolates linearly only where sin Ω ≤ 1e-8, i.e. where cos Ω rounds to ±1 in float32.
NUSLERP_DOT_THRESHOLD = 1.0 - 2.0**-24


@dataclasses.dataclass(kw_only=True)
class NuSlerpConfig(MergeConfig):
    """``weights``: (w₁, w₂) for the two fine-tuned models (or ``{task_name: weight}``), non-negative, not both zero.
    ``flatten``: one SLERP per tensor; else one per vector, along dim 0 (``row_wise=True``, mergekit's
    ``nuslerp_row_wise``: the columns W[:, j] of a (out, in) matrix) or along the last dim (``row_wise=False``: the rows
    W[i, :]). As in mergekit, ``row_wise`` only matters with ``flatten=False``.
    ``on``: ``"task_vectors"`` merges the τ_t and adds the result to θ₀; ``"weights"`` merges the models' weights θ_t
    themselves (mergekit without a base model: the base only anchors the arithmetic)."""

    method: str = dataclasses.field(default="nuslerp", init=False)
    weights: Sequence[float] | Mapping[str, float]
    flatten: bool = True
    row_wise: bool = False
    on: str = "task_vectors"

    card: ClassVar[MethodCard] = MethodCard(
        title="NuSLERP",
        summary=(
            "NuSLERP is mergekit's reworked SLERP for exactly two fine-tuned models. Each model gets a relative "
            "weight and the interpolation point is t = w₂ / (w₁ + w₂). With a base model it interpolates the two "
            "task vectors on the sphere and adds the result to the base weights; tensors can be treated as single "
            "vectors or interpolated one row or column at a time."
        ),
        bibtex=MERGEKIT_BIBTEX,
        paper_url=MERGEKIT_URL,
    )

    def __post_init__(self) -> None:
        check_weights("weights", self.weights, count=2)
        for name in ("flatten", "row_wise"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}.")
        check_choice("on", self.on, SPHERE_INPUTS)


def nuslerp(v0: torch.Tensor, v1: torch.Tensor, t: float, *, flatten: bool = True,
            row_wise: bool = False) -> torch.Tensor:
    """SLERP(v₀, v₁; t) of whole tensors (``flatten``) or of each vector along dim 0 (``row_wise``) or the last dim;
    linear only where the vectors are colinear (sin Ω ≈ 0) or one is zero."""
    if flatten or v0.dim() < 2:
        return slerp(v0, v1, t, dot_threshold=NUSLERP_DOT_THRESHOLD)
    if not row_wise:
        return slerp_rows(v0, v1, t, dot_threshold=NUSLERP_DOT_THRESHOLD)
    out = slerp_rows(v0.transpose(0, -1), v1.transpose(0, -1), t, dot_threshold=NUSLERP_DOT_THRESHOLD)
    return out.transpose(0, -1).contiguous()


class NuSlerpMerger(Merger):
    uses_param_info = False
    config: NuSlerpConfig

    @property
    def gram_determined(self) -> bool:
        return self.config.flatten  # whole tensors; per row it is not

    def prepare(self, ctx: MergeContext) -> None:
        check_model_count("nuslerp", len(ctx.task_names), exactly=2)
        w1, w2 = resolve_weights(self.config.weights, ctx.task_names)
        self.t = w2 / (w1 + w2)

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        check_model_count("nuslerp", len(deltas), exactly=2)
        first, second = sphere_inputs(self.config.on, base, deltas)
        merged = nuslerp(first, second, self.t, flatten=self.config.flatten, row_wise=self.config.row_wise)
        return as_task_vector(self.config.on, base, merged)


register_method(NuSlerpConfig, NuSlerpMerger)
