"""Multi-SLERP (mergekit ``multislerp``): a weighted spherical average of N ≥ 2 task vectors, added to the base model.

Unit vectors u_i = x_i / (‖x_i‖ + ε), mean direction m = normalize(Σ w_i u_i), tangent vectors at m, their weighted
sum mapped back to the sphere with the exponential map and rescaled by Σ w_i ‖x_i‖ — mergekit's algorithm step by step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

from ..config import MergeConfig, MethodCard, check_choice, check_number
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
    sphere_inputs,
)

if TYPE_CHECKING:
    from ..context import MergeContext


@dataclasses.dataclass(kw_only=True)
class MultiSlerpConfig(MergeConfig):
    """``weights``: ``None`` (equal), one non-negative weight per model, or ``{task_name: weight}``;
    ``normalize_weights`` divides them by their sum; ``eps`` > 0 guards the divisions.
    ``on``: ``"task_vectors"`` merges the τ_t and adds the result to θ₀; ``"weights"`` merges the models' weights θ_t
    themselves (mergekit without a base model: the base only anchors the arithmetic)."""

    method: str = dataclasses.field(default="multislerp", init=False)
    weights: Sequence[float] | Mapping[str, float] | None = None
    normalize_weights: bool = True
    eps: float = 1e-8
    on: str = "task_vectors"

    card: ClassVar[MethodCard] = MethodCard(
        title="Multi-SLERP",
        summary=(
            "Multi-SLERP extends spherical interpolation from two models to any number of them. Each task vector is "
            "projected onto the unit sphere, the weighted mean direction is found, the unit vectors are mapped into "
            "the tangent space at that direction and averaged there, and the average is mapped back onto the sphere "
            "and scaled by the weighted mean of the original norms before being added to the base model."
        ),
        bibtex=MERGEKIT_BIBTEX,
        paper_url=MERGEKIT_URL,
    )

    def __post_init__(self) -> None:
        if self.weights is not None:
            check_weights("weights", self.weights)
        if not isinstance(self.normalize_weights, bool):
            raise TypeError(f"normalize_weights must be a bool, got {self.normalize_weights!r}.")
        check_number("eps", self.eps)
        if self.eps <= 0:
            raise ValueError(f"eps must be positive, got {self.eps!r}.")
        check_choice("on", self.on, SPHERE_INPUTS)


def multislerp(xs: list[torch.Tensor], weights: Sequence[float], *, normalize_weights: bool = True,
               eps: float = 1e-8) -> torch.Tensor:
    """Barycentric SLERP on the sphere, as mergekit computes it.

    u_i = x_i / (‖x_i‖ + ε); m = M / ‖M‖ with M = Σ w_i u_i; tangent T = Σ w_i (u_i − ⟨u_i, m⟩ m) (mergekit projects
    onto the tangent space at m rather than taking the log map); r = exp_m(T) = cos(‖T‖ + ε) m + sin(‖T‖ + ε) /
    (‖T‖ + ε) · T; result = (Σ w_i ‖x_i‖) r. Because m is the direction of M itself, T vanishes up to rounding and r is
    m: the result is the normalized weighted mean of the unit vectors, scaled by the weighted mean norm.
    If M vanishes: two inputs are interpolated linearly, Σ w_i x_i; all-zero inputs give zero; otherwise ValueError.
    """
    total = sum(weights)
    w = [float(x) / total for x in weights] if normalize_weights else [float(x) for x in weights]
    flat = [x.reshape(-1) for x in xs]
    norms = torch.stack([torch.linalg.vector_norm(x) for x in flat]).tolist()
    mean = torch.zeros_like(flat[0])
    for x, n, wi in zip(flat, norms, w):
        mean.add_(x, alpha=wi / (n + eps))
    mean_norm = float(torch.linalg.vector_norm(mean))
    scale = sum(wi * n for wi, n in zip(w, norms))
    if mean_norm < eps:
        if len(xs) == 2:  # mergekit's fallback
            return (xs[0] * w[0]).add_(xs[1], alpha=w[1])
        if scale == 0.0:
            return torch.zeros_like(xs[0])
        raise ValueError("the weighted sum of the unit task vectors is zero (antipodal vectors whose weights cancel); "
                         "try other weights.")
    m = mean / mean_norm
    along = sum(wi * float(torch.dot(x, m)) / (n + eps) for x, n, wi in zip(flat, norms, w))
    tangent = mean.sub_(m, alpha=along)  # Σ w_i u_i − Σ w_i ⟨u_i, m⟩ m
    step = float(torch.linalg.vector_norm(tangent)) + eps
    result = m.mul_(math.cos(step)).add_(tangent, alpha=math.sin(step) / step)
    return result.mul_(scale).reshape(xs[0].shape)


class MultiSlerpMerger(Merger):
    uses_param_info = False
    gram_determined = True
    config: MultiSlerpConfig

    def prepare(self, ctx: MergeContext) -> None:
        check_model_count("multislerp", len(ctx.task_names), at_least=2)
        self.weights = resolve_weights(self.config.weights, ctx.task_names)

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        check_model_count("multislerp", len(deltas), at_least=2)
        try:
            on = self.config.on
            merged = multislerp(sphere_inputs(on, base, deltas), self.weights,
                                normalize_weights=self.config.normalize_weights, eps=self.config.eps)
            return as_task_vector(on, base, merged)
        except ValueError as error:
            raise ValueError(f"multislerp, tensor {key!r}: {error}") from None


register_method(MultiSlerpConfig, MultiSlerpMerger)
