"""MagMax (Marczak, Twardowski, Trzciński & Cygert 2024, "MagMax: Leveraging Model Merging for Seamless Continual
Learning", ECCV 2024, arXiv 2407.06322).

Per parameter, the task vector entry of largest magnitude is kept with its sign:
τ_MagMax[j] = τ_{t*}[j], t* = argmax_t |τ_t[j]| (equal magnitudes: the first task in input order), and
θ = θ₀ + λ τ_MagMax (λ = ``scaling``). In the paper the task vectors come from sequential fine-tuning (each task
starts from the previous model, every τ_t measured from the pre-trained θ₀); the merge itself is this rule, whatever
produced the models.

Where this follows the paper and where implementations depart:

* λ: the paper's code (``merge_max_abs`` applied with ``scaling_coef=0.5``) fixes λ = 0.5 and keeps
  ``linspace(0, 1, 21)[1:]`` as its search grid; FusionBench's configs default to 0.5 as well. The default here is
  λ = 1 (the selected entries unscaled), with the paper's grid as the search space — pass ``scaling=0.5`` for the
  paper's setting.
* Equal magnitudes (|τ_s| = |τ_t|, e.g. opposite signs): the first task in input order wins here; the paper's code
  (``torch.where(|τ_t| >= |max|, τ_t, max)`` task after task) keeps the last one.
* mergekit has no MagMax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch

from ..config import MergeConfig, MethodCard, SearchSpace, check_number
from ..kernels import fused_magmax, stored_magmax
from ..params import ParamInfo
from ..registry import register_method
from ..tuning import TUNING
from .base import Merger
from .grids import linspace_tail

#: λ's search grid in the MagMax code: ``linspace(0, 1, 21)[1:]`` (its experiments fix λ = 0.5).
MAGMAX_GRID = linspace_tail(1.0, 21)


@dataclasses.dataclass(kw_only=True)
class MagMaxConfig(MergeConfig):
    """``scaling`` λ applied to the max-magnitude task vector (the paper's experiments use 0.5)."""

    method: str = dataclasses.field(default="magmax", init=False)
    scaling: float = 1.0

    card: ClassVar[MethodCard] = MethodCard(
        title="MagMax",
        summary=(
            "MagMax merges task vectors by keeping, for every parameter, the single change of largest magnitude "
            "among all fine-tuned models, sign included, instead of averaging or summing them. It was proposed for "
            "continual learning, where models fine-tuned one task after another are merged into one that retains "
            "every task; the selected vector is scaled by λ and added to the pre-trained model."
        ),
        bibtex="""@inproceedings{marczak2024magmax,
  title     = {{MagMax}: Leveraging Model Merging for Seamless Continual Learning},
  author    = {Marczak, Daniel and Twardowski, Bart{\\l}omiej and Trzci{\\'n}ski, Tomasz and Cygert, Sebastian},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2024}
}""",
        paper_url="https://arxiv.org/abs/2407.06322",
    )

    def __post_init__(self) -> None:
        check_number("scaling", self.scaling)

    def search_space(self) -> SearchSpace:
        """λ over the MagMax code's ``linspace(0, 1, 21)[1:]``; the selection does not depend on λ, so the merge is
        linear in it."""
        return SearchSpace("scaling", MAGMAX_GRID, "linear")


def magmax(deltas: list[torch.Tensor], scaling: float = 1.0) -> torch.Tensor:
    """λ τ_{t*}[j] with t* = argmax_t |τ_t[j]| per entry, the first task on ties (Marczak et al. 2024, the MagMax
    merge); one compiled pass where available, else torch in chunks over the flattened tensor."""
    flat = [d.reshape(-1) for d in deltas]
    fused = fused_magmax(flat)
    if fused is not None:
        return fused.view_as(deltas[0]).mul_(scaling)
    out = torch.empty_like(flat[0])
    size = TUNING.ties_chunk
    for start in range(0, out.numel(), size):
        chunk = slice(start, start + size)
        best = flat[0][chunk].clone()
        best_magnitude = best.abs()
        for f in flat[1:]:  # a strictly larger |τ| replaces the best so far: the first maximal task wins ties
            magnitude = f[chunk].abs()
            larger = magnitude > best_magnitude
            best = torch.where(larger, f[chunk], best)
            best_magnitude = torch.where(larger, magnitude, best_magnitude)
        out[chunk] = best
    return out.view_as(deltas[0]).mul_(scaling)


class MagMaxMerger(Merger):
    uses_param_info = False
    config: MagMaxConfig

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        return magmax(deltas, self.config.scaling)

    def merge_stored(self, key: str, arrays: Sequence[np.ndarray], out: np.ndarray, info: ParamInfo) -> bool:
        """:meth:`merge_tensor` plus θ₀ in one compiled read of the stored inputs (the same bits)."""
        return stored_magmax(arrays, self.config.scaling, out)


register_method(MagMaxConfig, MagMaxMerger)
