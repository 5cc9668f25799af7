"""Karcher mean (Karcher 1977; mergekit ``karcher``): the Riemannian center of mass of the task vectors' directions on
the unit sphere, scaled by their mean norm and added to the base model."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, ClassVar

import torch

from ..config import MergeConfig, MethodCard, check_choice, check_number
from ..params import ParamInfo
from ..registry import register_method
from .base import Merger
from .slerp import MERGEKIT_BIBTEX, SPHERE_INPUTS, as_task_vector, check_model_count, sphere_inputs

if TYPE_CHECKING:
    from ..context import MergeContext


@dataclasses.dataclass(kw_only=True)
class KarcherConfig(MergeConfig):
    """``max_iter`` ≥ 1 fixed-point iterations, stopped early once the tangent step is shorter than ``tol`` > 0
    (``tol`` is also the norm below which a task vector counts as zero, as in mergekit).
    ``on``: ``"task_vectors"`` merges the τ_t and adds the result to θ₀; ``"weights"`` merges the models' weights θ_t
    themselves (mergekit without a base model: the base only anchors the arithmetic)."""

    method: str = dataclasses.field(default="karcher", init=False)
    max_iter: int = 10
    tol: float = 1e-5
    on: str = "task_vectors"

    card: ClassVar[MethodCard] = MethodCard(
        title="Karcher mean",
        summary=(
            "The Karcher mean averages the directions of the task vectors on the unit sphere: it is the point that "
            "minimizes the sum of squared geodesic distances to them, found by repeatedly mapping the directions "
            "into the tangent space at the current estimate, averaging there and stepping along the sphere. The "
            "mean direction is scaled by the average task-vector norm and added to the base model."
        ),
        bibtex=MERGEKIT_BIBTEX + """

@article{karcher1977riemannian,
  title   = {Riemannian Center of Mass and Mollifier Smoothing},
  author  = {Karcher, Hermann},
  journal = {Communications on Pure and Applied Mathematics},
  volume  = {30},
  number  = {5},
  pages   = {509--541},
  year    = {1977}
}""",
        paper_url="https://doi.org/10.1002/cpa.3160300502",
    )

    def __post_init__(self) -> None:
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int):
            raise TypeError(f"max_iter must be an int, got {self.max_iter!r}.")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be at least 1, got {self.max_iter!r}.")
        check_number("tol", self.tol)
        if self.tol <= 0:
            raise ValueError(f"tol must be positive, got {self.tol!r}.")
        check_choice("on", self.on, SPHERE_INPUTS)


def karcher_mean(xs: list[torch.Tensor], alphas: list[float], *, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """(Σ_i α_i ‖x_i‖) · u, u the weighted Karcher mean of u_i = x_i / ‖x_i‖ on the unit sphere.

    Start from u = normalize(Σ α_i u_i); repeat: θ_i = arccos⟨u, u_i⟩, T = Σ α_i θ_i / sin θ_i · (u_i − cos θ_i · u)
    (the weighted sum of the log maps; α renormalized over the x_i with ‖x_i‖ > tol), stop when ‖T‖ < tol, else
    u ← cos‖T‖ · u + sin‖T‖ · T / ‖T‖ (the exp map), renormalized. All ‖x_i‖ ≤ tol: zero.
    """
    flat = [x.reshape(-1) for x in xs]
    norms = torch.stack([torch.linalg.vector_norm(x) for x in flat]).tolist()
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    alpha_sum = sum(alphas[i] for i in valid)
    units = [(flat[i], norms[i], alphas[i] / alpha_sum) for i in valid]
    u = torch.zeros_like(flat[0])
    for x, n, a in units:
        u.add_(x, alpha=a / n)
    u_norm = float(torch.linalg.vector_norm(u))
    u = flat[valid[0]] / norms[valid[0]] if u_norm < tol else u.div_(u_norm)
    for _ in range(max_iter):
        tangent = torch.zeros_like(u)
        for x, n, a in units:
            cos = min(max(float(torch.dot(u, x)) / n, -1.0), 1.0)
            theta = math.acos(cos)
            if theta < tol:
                continue
            coefficient = a * theta / math.sin(theta)
            tangent.add_(x, alpha=coefficient / n).sub_(u, alpha=coefficient * cos)
        step = float(torch.linalg.vector_norm(tangent))
        if step < tol:
            break
        u = u.mul_(math.cos(step)).add_(tangent, alpha=math.sin(step) / step)
        u_norm = float(torch.linalg.vector_norm(u))
        if u_norm > tol:
            u.div_(u_norm)
    scale = sum(a * n for a, n in zip(alphas, norms))
    return u.mul_(scale).reshape(xs[0].shape)


class KarcherMerger(Merger):
    uses_param_info = False
    gram_determined = True
    config: KarcherConfig

    def prepare(self, ctx: MergeContext) -> None:
        check_model_count("karcher", len(ctx.task_names), at_least=2)

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        alphas = [1.0 / len(deltas)] * len(deltas)
        on = self.config.on
        merged = karcher_mean(sphere_inputs(on, base, deltas), alphas, max_iter=self.config.max_iter,
                              tol=self.config.tol)
        return as_task_vector(on, base, merged)


register_method(KarcherConfig, KarcherMerger)
