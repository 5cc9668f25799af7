"""LiNeS: post-training layer scaling (Wang et al. 2025, "LiNeS: Post-training Layer Scaling Prevents Forgetting
and Enhances Model Merging", arXiv 2410.17146).

The task vector of residual block ℓ = 1..L is scaled by λ(ℓ) = α + β (ℓ − 1)/(L − 1) (Eq. 1); parameters outside
the residual blocks (embeddings, final norm, heads) get α. Blocks come from :class:`~hf_merge.ParamInfo`, which
reads them off the tensor names (:data:`hf_merge.params.BLOCK_PATTERN`: ``layers.3.``, ``h.3.``, ``layer.3.``, ...):
``block`` is 0-based, so ℓ = block + 1, and L = ``num_blocks`` of the block's stack (encoder and decoder stacks are
scaled separately, each over its own depth); ``LinesConfig.num_blocks`` overrides L. Tensors outside such names get
α, like the parameters outside the blocks.
A one-block stack (L = 1) gets α.

* Single-task editing (``inner=None``): θ = θ₀ + λ(ℓ) τ for exactly one fine-tuned model; α must be given (the paper
  uses α = λ, β = 1 − λ).
* Multi-task (``inner`` = any merge config): θ = θ₀ + λ(ℓ) τ_merged, where τ_merged is the inner method's merged
  vector *before* scaling — the inner merger runs with every ``scaling`` field (also nested ones, e.g. DARE's
  ``then``) set to 1, so LiNeS' λ(ℓ) replaces the inner α. With ``alpha=None``, α = (‖Σ_t τ_t‖₁ / ‖τ_merged‖₁) / T
  (official ``evaluate``), computed in one streaming statistics pass that runs the inner merge once per tensor (so
  SVD-based inner methods do their factorisations twice); for Task Arithmetic α = 1/T exactly.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

import torch

from ..config import MergeConfig, MethodCard, SearchSpace, check_number
from ..params import ParamInfo
from ..registry import register_method
from .base import Merger, ModelMerger
from .grids import arange, linspace_tail
from .ties import TiesConfig

if TYPE_CHECKING:
    from ..context import MergeContext

#: β's validation grids in the LiNeS code: ``linspace(0, 1, 11)[1:]`` (Task Arithmetic, Consensus inner merges) and
#: ``arange(0.1, 1.6, 0.1)`` for a TIES inner merge.
LINES_GRID = linspace_tail(1.0, 11)
LINES_TIES_GRID = arange(0.1, 1.6, 0.1)


@dataclasses.dataclass(kw_only=True)
class LinesConfig(MergeConfig):
    """``alpha`` α (required without ``inner``; ``None`` with ``inner`` = the official norm-ratio rule), ``beta`` β
    (official grids ``linspace(0, 1, 11)[1:]`` or ``arange(0.1, 1.6, 0.1)`` for TIES), ``num_blocks`` L (default:
    from the model), ``inner`` the multi-task merge whose unscaled vector is layer-scaled."""

    method: str = dataclasses.field(default="lines", init=False)
    alpha: float | None = None
    beta: float = 0.5
    num_blocks: int | None = None
    inner: MergeConfig | None = None

    card: ClassVar[MethodCard] = MethodCard(
        title="LiNeS (Layer-increasing Network Scaling)",
        summary=(
            "LiNeS rescales a task vector (or a merged multi-task vector) with a coefficient that grows linearly "
            "with depth: shallow layers, which hold general features, are moved little from the pre-trained model, "
            "and deep layers, which hold task-specific features, keep more of the update. This limits forgetting "
            "and interference without any training."
        ),
        bibtex="""@inproceedings{wang2025lines,
  title     = {{LiNeS}: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging},
  author    = {Wang, Ke and Dimitriadis, Nikolaos and Favero, Alessandro and Ortiz-Jim{\\'e}nez, Guillermo and
               Fleuret, Fran{\\c{c}}ois and Frossard, Pascal},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2025}
}""",
        paper_url="https://arxiv.org/abs/2410.17146",
    )

    def __post_init__(self) -> None:
        if self.alpha is not None:
            check_number("alpha", self.alpha)
        check_number("beta", self.beta)
        if self.num_blocks is not None and (
            isinstance(self.num_blocks, bool) or not isinstance(self.num_blocks, int) or self.num_blocks < 1
        ):
            raise ValueError(f"num_blocks must be a positive int or None, got {self.num_blocks!r}.")
        if self.inner is None:
            if self.alpha is None:
                raise ValueError("Single-task LiNeS (inner=None) needs alpha; with inner=... alpha=None means the norm rule.")
        elif not isinstance(self.inner, MergeConfig):
            raise TypeError(f"inner must be a MergeConfig (e.g. TaskArithmeticConfig), got {type(self.inner).__name__}.")
        elif isinstance(self.inner, LinesConfig):
            raise ValueError("inner cannot itself be a LinesConfig.")

    def search_space(self) -> SearchSpace:
        """β over the LiNeS code's grid for the inner merge (a wider one for TIES)."""
        grid = LINES_TIES_GRID if isinstance(self.inner, TiesConfig) else LINES_GRID
        return SearchSpace("beta", grid, "affine")

    def coefficient_kind(self, parameter: str) -> str:
        """α and β are affine (Eq. 1: λ(ℓ) = α + β (ℓ − 1)/(L − 1) scales a τ_merged that depends on neither)."""
        return "affine" if parameter in ("alpha", "beta") else "rerun"


def lines_scale(block: int | None, num_blocks: int | None, alpha: float, beta: float) -> float:
    """λ(ℓ) = α + β (ℓ − 1)/(L − 1) for the 0-based ``block`` = ℓ − 1 of a stack of L blocks; α outside blocks."""
    if block is None:
        return alpha
    if num_blocks is None or not 0 <= block < num_blocks:
        raise ValueError(f"block index {block} is outside a stack of {num_blocks} blocks.")
    if num_blocks == 1:
        return alpha
    return alpha + beta * block / (num_blocks - 1)


def with_unit_scaling(config: MergeConfig) -> MergeConfig:
    """A copy of ``config`` whose ``scaling`` fields (nested configs included) are 1: the merge before scaling."""
    changes = {}
    for field in dataclasses.fields(config):
        if not field.init:
            continue
        value = getattr(config, field.name)
        if field.name == "scaling":
            changes["scaling"] = 1.0
        elif isinstance(value, MergeConfig):
            changes[field.name] = with_unit_scaling(value)
    return config.replace(**changes) if changes else config


class LinesMerger(Merger):
    config: LinesConfig

    def __init__(self, config: LinesConfig) -> None:
        super().__init__(config)
        from ..registry import get_merger

        self.inner = get_merger(with_unit_scaling(config.inner)) if config.inner is not None else None
        if isinstance(self.inner, ModelMerger):
            raise TypeError(f"LiNeS needs a base model; inner method {config.inner.method!r} merges without one.")

    @property
    def whole_model_statistics(self) -> bool:
        """α = ‖Σ_t τ_t‖₁ / ‖τ_merged‖₁ / T is taken over the whole model (unless given), as are the inner merge's."""
        return (self.inner is not None and self.config.alpha is None) or bool(
            self.inner is not None and self.inner.whole_model_statistics)

    @property
    def reduces_across_ranks(self) -> bool:
        """α's norms are added in key order across processes; the inner merge must reduce its own statistics."""
        return self.inner is None or self.inner.reduces_across_ranks

    def _num_blocks(self, info: ParamInfo) -> int | None:
        return self.config.num_blocks if self.config.num_blocks is not None else info.num_blocks

    def prepare(self, ctx: MergeContext) -> None:
        for key in ctx.merge_keys:  # fail before any work on a block index the configured L cannot hold
            info = ctx.infos[key]
            if info.block is not None:
                lines_scale(info.block, self._num_blocks(info), 0.0, 0.0)
        num_tasks = len(ctx.task_names)
        if self.inner is None:
            if num_tasks != 1:
                raise ValueError(
                    f"Single-task LiNeS scales one task vector but got {num_tasks} fine-tuned models; pass one model, "
                    "or set inner=... (e.g. TaskArithmeticConfig) to layer-scale a multi-task merge."
                )
            self.alpha = float(self.config.alpha)
            return
        self.inner.prepare(ctx.nested())
        if self.config.alpha is not None:
            self.alpha = float(self.config.alpha)
            return
        task_l1, merged_l1 = {}, {}
        for key, base, deltas in ctx.iter_deltas("LiNeS α (norms)"):
            task_l1[key] = torch.stack(deltas).sum(dim=0).abs().sum(dtype=torch.float64).item()
            merged_l1[key] = self.inner.merge_tensor(key, base, deltas, ctx.infos[key]).abs().sum(
                dtype=torch.float64).item()
        sum_l1, merged_l1 = ctx.ordered_sum(task_l1), ctx.ordered_sum(merged_l1)
        if merged_l1 == 0.0:
            raise ValueError("The inner merge produced an all-zero task vector; LiNeS α = ‖Στ‖₁/‖τ_merged‖₁/T is undefined.")
        self.alpha = sum_l1 / merged_l1 / num_tasks

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        merged = deltas[0].clone() if self.inner is None else self.inner.merge_tensor(key, base, deltas, info)
        return merged.mul_(lines_scale(info.block, self._num_blocks(info), self.alpha, self.config.beta))


register_method(LinesConfig, LinesMerger)
