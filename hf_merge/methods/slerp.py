"""SLERP (Shoemake 1985; mergekit ``slerp``): spherical interpolation between the base model's weights and one other's.

θ = sin((1 − t)Ω)/sin Ω · θ₀ + sin(tΩ)/sin Ω · θ₁, cos Ω = ⟨θ₀/‖θ₀‖, θ₁/‖θ₁‖⟩ per flattened tensor; a linear
interpolation where the two are nearly colinear (|cos Ω| > 0.9995) or one is zero. This module also holds the sphere
helpers NuSLERP, Multi-SLERP and the Karcher mean share (:func:`slerp_rows`, the weight checks, mergekit's citation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

from ..config import MergeConfig, MethodCard, check_fraction, check_number
from ..params import ParamInfo
from ..registry import register_method
from .base import Merger

if TYPE_CHECKING:
    from ..context import MergeContext

#: |cos Ω| above which SLERP falls back to linear interpolation (mergekit's ``DOT_THRESHOLD``).
DOT_THRESHOLD = 0.9995
#: A norm at or below this counts as zero (no direction): SLERP then interpolates linearly.
NORM_EPS = 1e-8

MERGEKIT_BIBTEX = """@inproceedings{goddard2024mergekit,
  title     = {Arcee's {MergeKit}: A Toolkit for Merging Large Language Models},
  author    = {Goddard, Charles and Siriwardhana, Shamane and Ehghaghi, Malikeh and Meyers, Luke and
               Karpukhin, Vladimir and Benedict, Brian and McQuade, Mark and Solawetz, Jacob},
  booktitle = {Proceedings of the 2024 Conference on Empirical Methods in Natural Language Processing:
               Industry Track},
  pages     = {477--485},
  year      = {2024}
}"""
MERGEKIT_URL = "https://aclanthology.org/2024.emnlp-industry.36"


@dataclasses.dataclass(kw_only=True)
class SlerpConfig(MergeConfig):
    """``t`` ∈ [0, 1]: 0 gives the base model, 1 the other model. Needs exactly one fine-tuned model."""

    method: str = dataclasses.field(default="slerp", init=False)
    t: float

    card: ClassVar[MethodCard] = MethodCard(
        title="SLERP (spherical linear interpolation)",
        summary=(
            "SLERP moves from the base model's weights to a second model's weights along the arc of a great circle "
            "rather than along a straight line. For every tensor the angle Ω between the two flattened weight "
            "vectors sets the coefficients sin((1 − t)Ω)/sin Ω and sin(tΩ)/sin Ω, so equal-norm inputs keep their "
            "norm along the path; nearly colinear tensors are interpolated linearly instead."
        ),
        bibtex="""@inproceedings{shoemake1985animating,
  title     = {Animating Rotation with Quaternion Curves},
  author    = {Shoemake, Ken},
  booktitle = {Proceedings of the 12th Annual Conference on Computer Graphics and Interactive Techniques
               (SIGGRAPH)},
  pages     = {245--254},
  year      = {1985}
}""",
        paper_url="https://doi.org/10.1145/325165.325242",
    )

    def __post_init__(self) -> None:
        check_fraction("t", self.t)


def slerp_rows(v0: torch.Tensor, v1: torch.Tensor, t: float, *, dot_threshold: float = DOT_THRESHOLD) -> torch.Tensor:
    """SLERP of each vector along the last dimension: sin((1 − t)Ω)/sin Ω · v₀ + sin(tΩ)/sin Ω · v₁ with
    cos Ω = ⟨v̂₀, v̂₁⟩ on the unnormalized v₀, v₁; (1 − t)v₀ + t v₁ where |cos Ω| > ``dot_threshold`` or a norm is zero.
    """
    n0 = torch.linalg.vector_norm(v0, dim=-1, keepdim=True)
    n1 = torch.linalg.vector_norm(v1, dim=-1, keepdim=True)
    degenerate = (n0 <= NORM_EPS) | (n1 <= NORM_EPS)
    cos = (torch.linalg.vecdot(v0, v1, dim=-1).unsqueeze(-1) / torch.where(degenerate, 1.0, n0 * n1)).clamp_(-1, 1)
    linear = degenerate | (cos.abs() > dot_threshold)
    omega = torch.acos(torch.where(linear, 0.0, cos))
    sin_omega = torch.where(linear, 1.0, torch.sin(omega))
    c0 = torch.where(linear, 1.0 - t, torch.sin((1.0 - t) * omega) / sin_omega)
    c1 = torch.where(linear, t, torch.sin(t * omega) / sin_omega)
    return v0 * c0 + v1 * c1


def slerp(v0: torch.Tensor, v1: torch.Tensor, t: float, *, dot_threshold: float = DOT_THRESHOLD) -> torch.Tensor:
    """Shoemake's SLERP of two tensors taken as whole (flattened) vectors; see :func:`slerp_rows`."""
    return slerp_rows(v0.reshape(1, -1), v1.reshape(1, -1), t, dot_threshold=dot_threshold).reshape(v0.shape)


def check_weights(name: str, weights: Sequence[float] | Mapping[str, float], count: int | None = None) -> None:
    """Raise naming ``name`` unless ``weights`` (a sequence or a ``{task: weight}`` mapping) holds non-negative numbers
    (``count`` of them, when given) that do not all vanish."""
    if isinstance(weights, (str, bytes)) or not isinstance(weights, (Sequence, Mapping)):
        raise TypeError(f"{name} must be a sequence of numbers or a {{task_name: weight}} mapping, got {weights!r}.")
    values = list(weights.values()) if isinstance(weights, Mapping) else list(weights)
    if count is not None and len(values) != count:
        raise ValueError(f"{name} must hold {count} weights, got {len(values)}.")
    for value in values:
        check_number(name, value)
        if value < 0:
            raise ValueError(f"{name} must be non-negative, got {value!r}.")
    if sum(values) <= 0:
        raise ValueError(f"{name} must not all be zero, got {weights!r}.")


def resolve_weights(weights: Sequence[float] | Mapping[str, float] | None, task_names: Sequence[str]) -> list[float]:
    """w_t for ``task_names`` in order (1 each for ``None``), checked against the models actually given."""
    if weights is None:
        return [1.0] * len(task_names)
    if isinstance(weights, Mapping):
        if set(weights) != set(task_names):
            raise ValueError(f"weights are given for tasks {sorted(weights)} but the models are {list(task_names)}.")
        return [float(weights[name]) for name in task_names]
    if len(weights) != len(task_names):
        raise ValueError(f"{len(weights)} weights given for {len(task_names)} models.")
    return [float(w) for w in weights]


#: What the SLERP family merges: the task vectors τ_t around the base (added back to it), or the models' weights θ_t
#: themselves (mergekit without a base model; the base then only anchors the arithmetic).
SPHERE_INPUTS = ("task_vectors", "weights")


def sphere_inputs(on: str, base: torch.Tensor, deltas: list[torch.Tensor]) -> list[torch.Tensor]:
    """The vectors a SLERP-family method merges: the τ_t, or the θ_t = θ₀ + τ_t (``on="weights"``)."""
    return deltas if on == "task_vectors" else [base + delta for delta in deltas]


def as_task_vector(on: str, base: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
    """The merged task vector from what a SLERP-family method returned for :func:`sphere_inputs`."""
    return merged if on == "task_vectors" else merged.sub_(base)


def check_model_count(method: str, count: int, *, exactly: int | None = None, at_least: int | None = None,
                      extra: str = "") -> None:
    """Raise a ``ValueError`` naming the number of fine-tuned models when it is not what ``method`` needs."""
    if (exactly is not None and count != exactly) or (at_least is not None and count < at_least):
        need = f"exactly {exactly}" if exactly is not None else f"at least {at_least}"
        raise ValueError(f"{method} needs {need} fine-tuned model(s) besides the base, got {count}.{extra}")


class SlerpMerger(Merger):
    uses_param_info = False
    gram_determined = True
    config: SlerpConfig

    def prepare(self, ctx: MergeContext) -> None:
        check_model_count("slerp", len(ctx.task_names), exactly=1,
                          extra=" It interpolates the base and one other model; for two fine-tuned models use nuslerp, "
                                "for more multislerp or karcher.")

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        check_model_count("slerp", len(deltas), exactly=1)
        return slerp(base, base + deltas[0], self.config.t).sub_(base)


register_method(SlerpConfig, SlerpMerger)
