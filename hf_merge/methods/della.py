"""DELLA (Deep, Bhardwaj & Poria 2024, "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based
Sampling", arXiv 2406.11617): Drop (MagPrune), Elect, fuse.

1. Drop (MagPrune). Per row of each task vector (the tensor viewed as ``(shape[0], -1)``; 0-/1-D tensors are one row
   of n entries), the entries are ranked by |τ| in ascending order, r ∈ {0, …, n − 1} (equal magnitudes by position),
   and normalised, r̂ = r / (n − 1) — the largest magnitude gets 1. Entry keep probabilities
   p = (density − ε) + 2ε · r̂ span [density − ε, density + ε] (mean ``density``; a one-entry row gets p = density).
   A Bernoulli(p) mask keeps an entry, and the survivors are rescaled by 1/p, so E[τ'] = τ and survivors equal τ / p
   exactly. The mask is drawn on the CPU from a generator seeded by (seed, task name, tensor name) as in DARE
   (:func:`~hf_merge.methods.dare.mask_seed`), so it depends neither on tensor order, device nor parallelism.
2. Elect and fuse (``sign_election=True``, ``della``): TIES' sign election γ = sign(Σ_t τ'_t) and disjoint mean over
   the agreeing entries (:func:`~hf_merge.methods.ties.elect_signs`, :func:`~hf_merge.methods.ties.disjoint_merge`).
   Without it (``della_linear``): the sum Σ_t τ'_t.
3. θ = θ₀ + λ · (merged τ), λ = ``scaling``.

Where this follows the paper and where mergekit (``della``/``della_linear``) departs:

* ε is the half-width of the keep-probability window, as in the authors' code (``epsilon = window_size / 2``) and
  mergekit; density ± ε must lie in (0, 1) (the authors' code only prints a warning, mergekit raises the same).
* Rescaling is by 1/p per entry (the paper's MagPrune and the authors' code). mergekit's ``rescale`` instead rescales
  the masked tensor to the L1 norm of the unmasked one (``rescale_norm``), which is not the paper's estimator.
* Rows: ``(shape[0], -1)``. mergekit and the authors' code rank along dimension 1 of the tensor as stored (the same
  for 2-D weights; for ≥ 3-D tensors their rows are the vectors along dimension 1). Their rank normalisation divides
  by zero for one-entry rows (NaN probabilities); here such a row keeps with p = density. Their random masks come from
  the global torch generator, so results depend on tensor order; here they are seeded per task and tensor.
* Sign election: TIES' election on the summed dropped vectors, with exact zeros of the sum taking the tensor's
  majority sign (mergekit elects +1 there), then the disjoint mean — what mergekit's ``della`` (``normalize: true``
  with unit weights) computes. ``della_linear`` is the plain sum (mergekit: ``normalize: false``); mergekit also
  multiplies by per-model ``weight``s, which the native path does not have.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

from ..config import (
    MergeConfig,
    MethodCard,
    SearchSpace,
    check_fraction,
    check_number,
    per_task_items,
    resolve_per_task,
)
from ..params import ParamInfo
from ..registry import register_method
from ..tuning import TUNING
from .base import Merger
from .dare import mask_seed
from .task_arithmetic import TASK_ARITHMETIC_GRID, task_arithmetic
from .ties import TIES_GRID, disjoint_merge, elected_chunks

if TYPE_CHECKING:
    from ..context import MergeContext

DELLA_BIBTEX = """@article{deep2024della,
  title   = {{DELLA}-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling},
  author  = {Deep, Pala Tej and Bhardwaj, Rishabh and Poria, Soujanya},
  journal = {arXiv preprint arXiv:2406.11617},
  year    = {2024}
}"""


@dataclasses.dataclass(kw_only=True)
class MaskedMergeConfig(MergeConfig):
    """Fields of the sparsify-then-merge methods (DELLA, Breadcrumbs): ``scaling`` λ of the merged task vector and
    ``sign_election``, TIES' elect + disjoint mean of the masked task vectors (else their sum)."""

    scaling: float = 1.0
    sign_election: bool = True

    def __post_init__(self) -> None:
        check_number("scaling", self.scaling)
        if not isinstance(self.sign_election, bool):
            raise TypeError(f"sign_election must be a bool, got {self.sign_election!r}.")

    def search_space(self) -> SearchSpace:
        """λ: the masks do not depend on it, so the merge is linear in λ. With sign election (a disjoint mean) TIES'
        grid 0.8–2.5, without it (a sum) Task Arithmetic's ``linspace(0, 1, 31)[1:]``; the papers tune λ on
        validation data but these grids are this package's choice."""
        return SearchSpace("scaling", TIES_GRID if self.sign_election else TASK_ARITHMETIC_GRID, "linear")


@dataclasses.dataclass(kw_only=True)
class DellaConfig(MaskedMergeConfig):
    """``density`` is the mean keep probability (one value, or per task), ``epsilon`` ε the half-width of the
    keep-probability window (density ± ε within (0, 1)), ``seed`` of the masks; ``scaling`` and ``sign_election``
    as in :class:`MaskedMergeConfig`."""

    method: str = dataclasses.field(default="della", init=False)
    density: float | Sequence[float] | Mapping[str, float]
    epsilon: float = 0.15
    seed: int = 0

    card: ClassVar[MethodCard] = MethodCard(
        title="DELLA-Merging",
        summary=(
            "DELLA sparsifies every task vector with MagPrune before merging: within each row the entries are ranked "
            "by magnitude and dropped at random, with keep probabilities that grow linearly with the rank around the "
            "chosen density, so large changes are more likely to survive. Survivors are divided by their keep "
            "probability, which keeps each task vector unbiased. The dropped vectors are then combined with TIES' "
            "sign election and disjoint mean (or summed, in the linear variant) and scaled by λ."
        ),
        bibtex=DELLA_BIBTEX,
        paper_url="https://arxiv.org/abs/2406.11617",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("epsilon", self.epsilon, high_open=True)
        for label, density in per_task_items("density", self.density):
            check_fraction(label, density, low_open=True, high_open=True)
            if density - self.epsilon <= 0 or density + self.epsilon >= 1:
                raise ValueError(f"epsilon must keep the keep probabilities density ± epsilon within (0, 1), got "
                                 f"{label}={density!r}, epsilon={self.epsilon!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}.")


@dataclasses.dataclass(kw_only=True)
class DellaLinearConfig(DellaConfig):
    """DELLA without sign election: λ Σ_t MagPrune(τ_t) (mergekit's ``della_linear``)."""

    method: str = dataclasses.field(default="della_linear", init=False)
    sign_election: bool = False

    card: ClassVar[MethodCard] = MethodCard(
        title="DELLA-Merging (linear)",
        summary=(
            "The linear variant of DELLA: every task vector is sparsified with MagPrune, which drops entries at random "
            "with keep probabilities rising with their magnitude rank within each row and divides the survivors by "
            "their keep probability, and the dropped task vectors are then simply summed, without sign election, "
            "scaled by λ and added to the pre-trained model."
        ),
        bibtex=DELLA_BIBTEX,
        paper_url="https://arxiv.org/abs/2406.11617",
    )


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """``(shape[0], -1)`` for ≥ 2-D tensors, one row for 0-/1-D ones."""
    return tensor.reshape(tensor.shape[0], -1) if tensor.dim() >= 2 else tensor.reshape(1, -1)


def magprune_keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """MagPrune's keep probabilities p = (density − ε) + 2ε · r / (n − 1) (Deep et al. 2024, the Drop step), r the
    ascending rank of |τ| within the row (stable: equal magnitudes by position), n the row length; p = density for a
    one-entry row. Rows are ranked in chunks (bounded temporaries for embedding-sized tensors)."""
    if delta.numel() == 0:
        return torch.empty_like(delta)
    rows = _rows(delta)
    num_rows, n = rows.shape
    if n == 1:
        return torch.full_like(delta, density)
    probabilities = torch.empty_like(rows)
    chunk_rows = max(1, TUNING.ties_chunk // n)
    positions = torch.arange(n, dtype=rows.dtype, device=rows.device)
    for start in range(0, num_rows, chunk_rows):
        block = rows[start:start + chunk_rows].abs()
        order = torch.argsort(block, dim=1, stable=True)
        ranks = torch.empty_like(block).scatter_(1, order, positions.expand_as(block))
        rank_norm = ranks / (n - 1)
        probabilities[start:start + chunk_rows] = (density - epsilon) + (2 * epsilon) * rank_norm
    return probabilities.view_as(delta)


def magprune(delta: torch.Tensor, density: float, epsilon: float, seed: int) -> torch.Tensor:
    """m ⊙ τ / p with m ~ Bernoulli(p), p from :func:`magprune_keep_probabilities` (Deep et al. 2024, MagPrune: drop,
    then rescale the survivors by 1/p). The uniforms are drawn on the CPU from ``seed``: keep where u < p."""
    probabilities = magprune_keep_probabilities(delta, density, epsilon)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    keep = torch.rand(delta.shape, generator=generator).to(delta.device) < probabilities
    return torch.where(keep, delta / probabilities, torch.zeros_like(delta))


def sign_elected_mean(deltas: list[torch.Tensor]) -> torch.Tensor:
    """TIES' elect + disjoint mean over T task vectors (Yadav et al. 2023, steps 2–3): γ = sign(Σ_t τ_t), exact zeros
    taking the tensor's majority sign, then the mean of the entries agreeing with γ. Merged in chunks with the
    tensor's majority sign computed first, so the result equals the unchunked one."""
    out = torch.empty(deltas[0].numel(), dtype=deltas[0].dtype, device=deltas[0].device)
    for chunk, part, signs in elected_chunks(deltas):
        out[chunk] = disjoint_merge(part, signs, "mean")
    return out.view_as(deltas[0])


def della_merge(dropped: list[torch.Tensor], sign_election: bool, scaling: float) -> torch.Tensor:
    """λ · elect + disjoint mean of the dropped vectors (DELLA's Elect and Fuse steps), or λ Σ_t τ'_t without sign
    election (``della_linear``)."""
    if not sign_election:
        return task_arithmetic(dropped, scaling)
    return sign_elected_mean(dropped).mul_(scaling)


class DellaMerger(Merger):
    uses_param_info = False
    config: DellaConfig

    def prepare(self, ctx: MergeContext) -> None:
        self.task_names = ctx.task_names
        self.densities = dict(zip(ctx.task_names, resolve_per_task("density", self.config.density, ctx.task_names)))

    def _drop(self, task: str, key: str, delta: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        return magprune(delta, self.densities[task], cfg.epsilon, mask_seed(cfg.seed, task, key))

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        dropped = [self._drop(task, key, delta) for task, delta in zip(self.task_names, deltas)]
        return della_merge(dropped, self.config.sign_election, self.config.scaling)


class DellaLinearMerger(DellaMerger):
    config: DellaLinearConfig


register_method(DellaConfig, DellaMerger)
register_method(DellaLinearConfig, DellaLinearMerger)
