"""Git Re-Basin weight matching (Ainsworth et al., ICLR 2023, Sec. 3.2) as an N-model merge: every model is matched
pairwise to the first (the reference), then the aligned models are averaged (and optionally REPAIRed)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..config import MethodCard
from ..permutation.spec import Perms, PermutationSpec, identity_permutations
from ..permutation.weight_matching import weight_matching
from ..registry import register_method
from .c2m3 import PermutationMergeConfig, PermutationMerger


@dataclasses.dataclass(kw_only=True)
class WeightMatchingConfig(PermutationMergeConfig):
    """``max_iter`` coordinate-ascent sweeps (official matcher default 100)."""

    method: str = dataclasses.field(default="weight_matching", init=False)
    max_iter: int = 100

    card: ClassVar[MethodCard] = MethodCard(
        title="Weight matching (Git Re-Basin)",
        summary=(
            "Networks are equivalent up to permutations of their hidden units. Weight matching finds, layer by "
            "layer, the permutation of one model's units that best aligns its weights with a reference model "
            "(coordinate ascent over linear assignment problems); once aligned, the two models can be averaged with "
            "far less loss than naive averaging."
        ),
        bibtex="""@inproceedings{ainsworth2023rebasin,
  title     = {Git Re-Basin: Merging Models modulo Permutation Symmetries},
  author    = {Ainsworth, Samuel K. and Hayase, Jonathan and Srinivasa, Siddhartha},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2023}
}""",
        paper_url="https://arxiv.org/abs/2209.04836",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {self.max_iter!r}.")


class WeightMatchingMerger(PermutationMerger):
    config: WeightMatchingConfig

    def find_permutations(self, states: list[dict[str, torch.Tensor]], spec: PermutationSpec) -> list[Perms]:
        reference = states[0]
        sizes = spec.perm_sizes({k: v.shape for k, v in reference.items()})
        return [identity_permutations(sizes)] + [
            weight_matching(reference, state, spec, max_iter=self.config.max_iter, seed=self.config.seed)
            for state in states[1:]
        ]


register_method(WeightMatchingConfig, WeightMatchingMerger)
