"""DELLA (Deep, Bhardwaj & Poria 2024, "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based
Sampling", arXiv 2406.11617): Drop (MagPrune), Elect, fuse.

1. Drop (MagPrune). Per row of each task vector (the tensor viewed as ``(shape[0], -1)``; 0-/1-D tensors are one row
   of n entries), the entries are ranked by |τ| in ascending order, r ∈ {0, …, n − 1} (equal magnitudes by position),
   and normalised, r̂ = r / (n − 1) — the largest magnitude gets 1. Entry keep probabilities
   p = (density − ε) + 2ε · r̂ span [density − ε, density + ε] (mean ``density``; a one-entry row gets p = density).
   A Bernoulli(p) mask keeps an entry, and the survivors are rescaled by 1/p, so E[τ'] = τ and survivors equal τ / p
   exactly. The mask is drawn on the CPU from a generator seeded by (seed, task name, tensor name) as in DARE
   (:func:`~hf_merge.methods.dare.mask_seed`), so it depends neither on tensor order, device nor parallelism.
2. Elect and fuse (``sign_election=True``, ``della``): TIES' sign election γ = sign(Σ_t w_t τ'_t) and disjoint mean
   Σ_{t∈A} w_t τ'_t / Σ_{t∈A} w_t over the agreeing entries (:func:`~hf_merge.methods.ties.elect_signs`,
   :func:`~hf_merge.methods.ties.disjoint_merge`; w_t = ``weights``, default 1). Without it (``della_linear``): the
   sum Σ_t w_t τ'_t.
3. θ = θ₀ + λ · (merged τ), λ = ``scaling``.

Where this follows the paper and where mergekit (``della``/``della_linear``) departs — each departure an option:

* ε is the half-width of the keep-probability window, as in the authors' code (``epsilon = window_size / 2``) and
  mergekit; density ± ε must lie in (0, 1) (the authors' code only prints a warning, mergekit raises the same).
  ``density`` 1 leaves that task's vector whole, as mergekit does.
* Rescaling is by 1/p per entry (the paper's MagPrune and the authors' code). mergekit's ``rescale`` instead rescales
  the masked tensor to the L1 norm of the unmasked one (``rescale_norm="l1"``); its ``rescale: false`` is
  ``rescale=False``.
* Rows: ``(shape[0], -1)``. mergekit and the authors' code rank along dimension 1 of the tensor as stored (the same
  for 2-D weights; for ≥ 3-D tensors their rows are the vectors along dimension 1). Their rank normalisation divides
  by zero for one-entry rows (NaN probabilities); here such a row keeps with p = density. Their random masks come from
  the global torch generator, so results depend on tensor order; here they are seeded per task and tensor.
* Sign election: exact zeros of Σ_t w_t τ'_t take the tensor's majority sign (TIES); mergekit elects +1
  (``zero_sign="positive"``). mergekit's ``normalize`` is ``aggregate``: ``della`` defaults to the disjoint mean,
  ``della_linear`` to the sum (``aggregate="mean"`` there divides by Σ_t w_t).

From plain checkpoints on the CPU (bfloat16 or float32) :meth:`DellaMerger.merge_stored` gives the same bits as the
float32 reference below without float32 copies: one fused pass over the rows (rank, draw, rescale, weigh, elect and
merge; the tensor's majority sign settled in the same pass), one more for mergekit's L1 rescale
(:meth:`~hf_merge.kernels.StoredTies.magprune_merge`). The L1 factors are float64 sums in another order than torch's:
equal to ~1e-15 relative, so the float32 factor (and every result) is the same unless it lies that close to a
rounding boundary of float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from ..config import (
    MergeConfig,
    MethodCard,
    PerTask,
    SearchSpace,
    check_choice,
    check_fraction,
    check_number,
    per_task_items,
    resolve_per_task,
)
from ..kernels import StoredTies, counter_uniforms, fused_magprune
from ..params import ParamInfo
from ..registry import register_method
from ..tuning import TUNING
from .base import Merger
from .dare import mask_seed
from .task_arithmetic import TASK_ARITHMETIC_GRID
from .ties import (
    TIES_GRID,
    ZERO_SIGNS,
    Weights,
    check_rescale_norm,
    check_weights,
    l1_factor,
    resolve_weights,
    sign_elected_merge,
)

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
    """Fields of the sparsify-then-merge methods (DELLA, Breadcrumbs): ``scaling`` λ of the merged task vector,
    ``sign_election`` (TIES' elect + disjoint merge of the masked task vectors, else their sum) and mergekit's
    options: ``weights`` w_t per task (None: 1), ``aggregate`` ("mean": ÷ Σ w_t over the agreeing entries with sign
    election, over all tasks without; "sum"; None: "mean" with sign election, "sum" without — the papers),
    ``zero_sign`` of an exactly-zero Σ_t w_t τ_t ("majority" or mergekit's "positive") and ``rescale_norm``
    (None: the method's own; "l1": each masked τ_t scaled to ‖τ_t‖₁, mergekit's ``rescale``)."""

    scaling: float = 1.0
    sign_election: bool = True
    weights: Weights = None
    aggregate: str | None = None
    zero_sign: str = "majority"
    rescale_norm: str | None = None

    def __post_init__(self) -> None:
        check_number("scaling", self.scaling)
        if not isinstance(self.sign_election, bool):
            raise TypeError(f"sign_election must be a bool, got {self.sign_election!r}.")
        check_weights(self.weights)
        if self.aggregate is not None:
            check_choice("aggregate", self.aggregate, ("mean", "sum"))
        check_choice("zero_sign", self.zero_sign, ZERO_SIGNS)
        if self.zero_sign != "majority" and not self.sign_election:
            raise ValueError(f"zero_sign={self.zero_sign!r} is the sign of sign election; sign_election is False.")
        check_rescale_norm(self.rescale_norm)

    @property
    def merge_aggregate(self) -> str:
        """``aggregate``, or the papers' choice: the disjoint mean with sign election, the sum without."""
        return self.aggregate or ("mean" if self.sign_election else "sum")

    def search_space(self) -> SearchSpace:
        """λ: the masks do not depend on it, so the merge is linear in λ. With sign election (a disjoint mean) TIES'
        grid 0.8–2.5, without it (a sum) Task Arithmetic's ``linspace(0, 1, 31)[1:]``; the papers tune λ on
        validation data but these grids are this package's choice."""
        return SearchSpace("scaling", TIES_GRID if self.sign_election else TASK_ARITHMETIC_GRID, "linear")


def paired(first: str, a: PerTask, second: str, b: PerTask) -> list[tuple[tuple[str, Any], tuple[str, Any]]]:
    """``((label, value), (label, value))`` of two per-task fields for the same task, as far as known without the task
    names: a single value pairs with every value, two lists by position, two mappings by task; a list and a mapping
    pair only once resolved against the task names (then call this with two mappings)."""
    per_task = (Mapping, list, tuple)
    if not isinstance(a, per_task) or not isinstance(b, per_task):
        return [(x, y) for x in per_task_items(first, a) for y in per_task_items(second, b)]
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return [((f"{first}[{task!r}]", a[task]), (f"{second}[{task!r}]", b[task])) for task in a if task in b]
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        return []
    return list(zip(per_task_items(first, a), per_task_items(second, b)))


@dataclasses.dataclass(kw_only=True)
class DellaConfig(MaskedMergeConfig):
    """``density`` is the mean keep probability (per task possible; 1 keeps the task whole), ``epsilon`` ε the
    half-width of the keep-probability window (per task possible; density ± ε within (0, 1)), ``seed`` of the masks,
    ``rescale`` the survivors (by 1/p, the paper's MagPrune; by L1 norm with ``rescale_norm="l1"``, mergekit's);
    the rest as in :class:`MaskedMergeConfig`."""

    method: str = dataclasses.field(default="della", init=False)
    density: float | Sequence[float] | Mapping[str, float]
    epsilon: float | Sequence[float] | Mapping[str, float] = 0.15
    seed: int = 0
    rescale: bool = True

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
        for label, epsilon in per_task_items("epsilon", self.epsilon):
            check_fraction(label, epsilon, high_open=True)
        for label, density in per_task_items("density", self.density):
            check_fraction(label, density, low_open=True)
        self.check_windows(self.density, self.epsilon)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}.")
        if not isinstance(self.rescale, bool):
            raise TypeError(f"rescale must be a bool, got {self.rescale!r}.")
        if self.rescale_norm is not None and not self.rescale:
            raise ValueError(f"rescale_norm={self.rescale_norm!r} chooses how to rescale; rescale is False.")

    @staticmethod
    def check_windows(density: PerTask, epsilon: PerTask) -> None:
        """Raise unless density ± ε lies within (0, 1) for every task with density < 1."""
        for (d_label, d), (e_label, e) in paired("density", density, "epsilon", epsilon):
            if d < 1 and (d - e <= 0 or d + e >= 1):
                raise ValueError(f"epsilon must keep the keep probabilities density ± epsilon within (0, 1), got "
                                 f"{d_label}={d!r}, {e_label}={e!r}.")


@dataclasses.dataclass(kw_only=True)
class DellaLinearConfig(DellaConfig):
    """DELLA without sign election: λ Σ_t w_t MagPrune(τ_t) (mergekit's ``della_linear``)."""

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


def magprune(delta: torch.Tensor, density: float, epsilon: float, seed: int, *, rescale: bool = True,
             rescale_norm: str | None = None) -> torch.Tensor:
    """m ⊙ τ / p with m ~ Bernoulli(p), p from :func:`magprune_keep_probabilities` (Deep et al. 2024, MagPrune: drop,
    then rescale the survivors by 1/p); m ⊙ τ · ‖τ‖₁/‖m ⊙ τ‖₁ with ``rescale_norm="l1"`` (mergekit), m ⊙ τ without
    ``rescale``; τ itself for density ≥ 1. The uniforms come from ``seed`` (:func:`hf_merge.kernels.counter_uniforms`): keep where u < p."""
    if density >= 1:
        return delta
    divide = rescale and rescale_norm is None
    fused = fused_magprune(_rows(delta), density, epsilon, seed, divide) if delta.numel() else None
    if fused is not None:
        fused = fused.view_as(delta)
        return fused if divide or not rescale else fused.mul_(l1_factor(delta, fused))
    probabilities = magprune_keep_probabilities(delta, density, epsilon)
    keep = counter_uniforms(seed, delta.shape).to(delta.device) < probabilities
    if rescale and rescale_norm is None:
        return torch.where(keep, delta / probabilities, torch.zeros_like(delta))
    masked = torch.where(keep, delta, torch.zeros_like(delta))
    return masked.mul_(l1_factor(delta, masked)) if rescale else masked


def masked_merge(masked: list[torch.Tensor], weights: list[float] | None, config: MaskedMergeConfig) -> torch.Tensor:
    """λ · merge of the masked task vectors τ'_t (DELLA's Elect and Fuse, Breadcrumbs' sum): with sign election TIES'
    γ = sign(Σ_t w_t τ'_t) and Σ_{t∈A} w_t τ'_t (÷ Σ_{t∈A} w_t for "mean"), else Σ_t w_t τ'_t (÷ Σ_t w_t for "mean",
    1 when |Σ_t w_t| < 1e-8, as mergekit). Elected in chunks, the tensor's majority sign computed first."""
    aggregate = config.merge_aggregate
    if not config.sign_election:
        total = torch.zeros_like(masked[0])
        for t, delta in enumerate(masked):
            total.add_(delta if weights is None else delta * weights[t])
        if aggregate == "mean":
            total /= masked_sum_divisor(len(masked), weights, True)
        return total.mul_(config.scaling)
    majority = 1.0 if config.zero_sign == "positive" else None
    out = sign_elected_merge([m.reshape(-1) for m in masked], None, weights, weights, majority, aggregate)
    return out.view_as(masked[0]).mul_(config.scaling)


def masked_sum_divisor(num_tasks: int, weights: list[float] | None, mean: bool) -> float:
    """The divisor of the masked sum: Σ_t w_t (T without weights) for "mean", 1 when that is below 1e-8 in magnitude
    (as mergekit) or for "sum"."""
    if not mean:
        return 1.0
    divisor = float(num_tasks) if weights is None else sum(weights)
    return divisor if abs(divisor) >= 1e-8 else 1.0


class DellaMerger(Merger):
    uses_param_info = False
    config: DellaConfig

    def prepare(self, ctx: MergeContext) -> None:
        cfg, names = self.config, ctx.task_names
        self.task_names = names
        self.densities = dict(zip(names, resolve_per_task("density", cfg.density, names)))
        self.epsilons = dict(zip(names, resolve_per_task("epsilon", cfg.epsilon, names)))
        cfg.check_windows(self.densities, self.epsilons)
        self.weights = resolve_weights(cfg.weights, names)
        self.shapes = {key: ctx.metas[key].shape for key in ctx.merge_keys if key in ctx.metas}

    def _drop(self, task: str, key: str, delta: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        return magprune(delta, self.densities[task], self.epsilons[task], mask_seed(cfg.seed, task, key),
                        rescale=cfg.rescale, rescale_norm=cfg.rescale_norm)

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        dropped = [self._drop(task, key, delta) for task, delta in zip(self.task_names, deltas)]
        return masked_merge(dropped, self.weights, self.config)

    def merge_stored(self, key: str, arrays: Sequence[np.ndarray], out: np.ndarray, info: ParamInfo) -> bool:
        """:meth:`merge_tensor` straight from the stored inputs (the same bits): one compiled pass over the rows ranks
        each τ_t's row, draws the masks, rescales, weighs and merges (elect and disjoint merge, or the sum) into
        ``out``, with the tensor's majority sign settled in the same pass; mergekit's L1 rescale takes one more."""
        shape = self.shapes.get(key)
        if shape is None or not StoredTies.takes(arrays, out) or arrays[0].shape[0] == 0:
            return False
        cfg, names, stored = self.config, self.task_names, StoredTies(arrays)
        row_length = stored.numel // shape[0] if len(shape) >= 2 else stored.numel
        rescale = (cfg.rescale_norm or "divide") if cfg.rescale else None
        scales = self.weights or [1.0] * len(names)
        mean = cfg.merge_aggregate == "mean"
        counts = stored.magprune_merge(
            row_length, [self.densities[t] for t in names], [self.epsilons[t] for t in names],
            [mask_seed(cfg.seed, t, key) for t in names], rescale, scales, self.weights, cfg.sign_election,
            1.0 if cfg.zero_sign == "positive" else None, mean, masked_sum_divisor(len(names), self.weights, mean),
            cfg.scaling, out)
        return counts is not None


class DellaLinearMerger(DellaMerger):
    config: DellaLinearConfig


register_method(DellaConfig, DellaMerger)
register_method(DellaLinearConfig, DellaLinearMerger)
