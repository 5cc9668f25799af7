"""TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

1. Trim: τ̂_t = τ_t ⊙ [|τ_t| ≥ kthvalue(|τ_t|, d − ⌊d·k⌋)] — the reference's inclusive threshold, which keeps
   ⌊d·k⌋ + 1 entries (more on ties), over the whole model (``scope="global"``) or per tensor (``"tensor"``).
2. Elect: γ = sign(Σ_t w_t τ̂_t); entries whose sum is exactly 0 take the majority sign sign(Σ γ) of the scope.
3. Disjoint merge: τ = Σ_{t∈A} w_t τ̂_t / Σ_{t∈A} w_t with A = {t : sign(w_t τ̂_t) = γ, τ̂_t ≠ 0} (a divisor of 0
   counts as 1; ``aggregate="sum"`` omits the division), and θ = θ₀ + λ τ. The per-task ``weights`` w_t (mergekit's
   per-model ``weight``) default to 1, which gives the paper's disjoint mean over |A|.

mergekit's ``ties`` (per tensor) departs in three places, each an option: it keeps exactly ⌊d·k⌋ entries
(``trim="topk"``), elects +1 where Σ_t w_t τ̂_t = 0 (``zero_sign="positive"``) and, with ``rescale: true``, scales
each τ̂_t to the L1 norm of τ_t (``rescale_norm="l1"``). Its ``normalize`` is ``aggregate`` ("mean"/"sum").

Global scope never materialises a tasks × parameters matrix. Where the engine allows a one-pass merge (the default:
no ``max_memory`` budget, CPU, plain checkpoints/models, unit weights, the majority sign) it reads the inputs
**once** (:class:`~hf_merge.methods.ties_one_pass.OnePassTies`: sampled threshold brackets, a provisional merge,
amendments). Otherwise (a memory budget, DARE in front, LoRA inputs, an accelerator, weights) it streams the exact
thresholds and majority sign first (:func:`~hf_merge.methods.ties_statistics.global_statistics`: histograms of the
float32 bit patterns of |τ_t|), then merges tensor by tensor.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from ..config import (
    MergeConfig,
    MethodCard,
    SearchSpace,
    check_choice,
    check_fraction,
    check_number,
    per_task_items,
    resolve_per_task,
)
from ..kernels import StoredTies, fused_elect_merge
from ..params import ParamInfo
from ..registry import register_method
from ..tensors import kth_smallest, select
from ..tuning import TUNING
from .base import Merger
from .grids import arange
from .ties_one_pass import OnePassTies, OpenEntries
from .ties_statistics import global_statistics

if TYPE_CHECKING:
    from ..context import MergeContext

__all__ = [
    "TIES_GRID", "OnePassTies", "OpenEntries", "TiesConfig", "TiesMerger", "disjoint_merge", "elect_signs",
    "l1_factor", "largest_rule", "sign_elected_merge", "threshold_rank", "trim_mask", "trim_rule", "trim_threshold",
]

#: λ's validation grid in the TIES code: 0.8 .. 2.5 in steps of 0.1.
TIES_GRID = arange(0.8, 2.55, 0.1)
#: Signs for an exactly-zero elected sum: the scope's majority sign (TIES reference) or +1 (mergekit).
ZERO_SIGNS = ("majority", "positive")
#: mergekit skips its L1 rescale when either norm is below this.
L1_RESCALE_EPS = 1e-7

#: Per-task weights: ``None`` (1 for every task), a sequence in input order or a ``{task_name: weight}`` mapping.
Weights = Sequence[float] | Mapping[str, float] | None


def check_weights(weights: Weights) -> None:
    """Raise naming the entry unless ``weights`` is ``None`` or finite numbers, one value or per task."""
    if weights is not None:
        for label, weight in per_task_items("weights", weights):
            check_number(label, weight)


def resolve_weights(weights: Weights, task_names: Sequence[str]) -> list[float] | None:
    """One weight per task, or ``None`` when every weight is 1 (the unweighted formulas, bit for bit)."""
    if weights is None:
        return None
    resolved = [float(w) for w in resolve_per_task("weights", weights, task_names)]
    return None if all(w == 1.0 for w in resolved) else resolved


def check_rescale_norm(rescale_norm: str | None) -> None:
    if rescale_norm is not None:
        check_choice("rescale_norm", rescale_norm, ("l1",))


@dataclasses.dataclass(kw_only=True)
class TiesConfig(MergeConfig):
    """``density`` is the kept fraction k (official default 0.2; one value or per task), ``scaling`` λ (1.0 is the
    paper's no-validation default; official grid 0.8–2.5), ``scope`` "global" (official) or "tensor",
    ``aggregate`` "mean" (the paper's disjoint mean, step 3) or "sum" — mergekit's ``normalize``.

    mergekit's options: ``weights`` w_t per task (None: 1), τ = Σ_A w_t τ̂_t / Σ_A w_t with γ = sign(Σ_t w_t τ̂_t);
    ``trim`` "threshold" (the reference's |τ| ≥ (n − ⌊k·n⌋)-th smallest of n: ⌊k·n⌋ + 1 kept, more on equal
    magnitudes) or "topk" (mergekit: exactly the ⌊k·n⌋ largest |τ|, equal magnitudes by position); ``zero_sign`` of
    Σ_t w_t τ̂_t = 0, "majority" (the scope's) or "positive" (mergekit); ``rescale_norm`` None or "l1" (mergekit's
    ``rescale``: τ̂_t ‖τ_t‖₁/‖τ̂_t‖₁). "topk" and "l1" are per tensor (``scope="tensor"``), as mergekit is."""

    method: str = dataclasses.field(default="ties", init=False)
    density: float | Sequence[float] | Mapping[str, float] = 0.2
    scaling: float = 1.0
    scope: str = "global"
    aggregate: str = "mean"
    weights: Weights = None
    trim: str = "threshold"
    zero_sign: str = "majority"
    rescale_norm: str | None = None

    card: ClassVar[MethodCard] = MethodCard(
        title="TIES-Merging",
        summary=(
            "TIES reduces interference between task vectors in three steps: it trims each task vector to its "
            "largest-magnitude entries (the rest are reset to zero), elects a sign for every parameter from the "
            "summed trimmed vectors, and averages only the entries that agree with the elected sign (a disjoint "
            "mean). The result is scaled and added to the pre-trained model."
        ),
        bibtex="""@inproceedings{yadav2023ties,
  title     = {{TIES}-Merging: Resolving Interference When Merging Models},
  author    = {Yadav, Prateek and Tam, Derek and Choshen, Leshem and Raffel, Colin and Bansal, Mohit},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2023}
}""",
        paper_url="https://arxiv.org/abs/2306.01708",
    )

    def __post_init__(self) -> None:
        for label, density in per_task_items("density", self.density):
            check_fraction(label, density, low_open=True)
        check_number("scaling", self.scaling)
        check_choice("scope", self.scope, ("global", "tensor"))
        check_choice("aggregate", self.aggregate, ("mean", "sum"))
        check_weights(self.weights)
        check_choice("trim", self.trim, ("threshold", "topk"))
        check_choice("zero_sign", self.zero_sign, ZERO_SIGNS)
        check_rescale_norm(self.rescale_norm)
        for name, value, default in (("trim", self.trim, "threshold"), ("rescale_norm", self.rescale_norm, None)):
            if value != default and self.scope != "tensor":
                raise ValueError(f"{name}={value!r} is per tensor (mergekit's TIES); it needs scope='tensor'.")

    def search_space(self) -> SearchSpace:
        """λ over ``arange(0.8, 2.55, 0.1)``; the thresholds and signs do not depend on λ, so the merge is linear."""
        return SearchSpace("scaling", TIES_GRID, "linear")


def threshold_rank(numel: int, density: float) -> int:
    """1-based rank of the trim threshold among the sorted |τ| (0 means keep everything)."""
    return 0 if density >= 1.0 else numel - int(numel * density)


def trim_threshold(delta: torch.Tensor, density: float) -> float:
    """Threshold of one tensor: the (d − ⌊d·k⌋)-th smallest |τ|, kept inclusively."""
    rank = threshold_rank(delta.numel(), density)
    if rank == 0:
        return 0.0
    return kth_smallest(delta, rank, absolute=True)


def trim_rule(flat: torch.Tensor, density: float, trim: str = "threshold") -> tuple[float, int]:
    """``(threshold, cut)`` of one task's trim: keep |τ[j]| > threshold, and |τ[j]| = threshold where j ≤ cut.

    ``"threshold"``: the reference's inclusive threshold (cut = n: every equal entry); ``"topk"``: exactly the ⌊k·n⌋
    largest |τ| (all for k ≥ 1), equal magnitudes by position — mergekit's ``magnitude`` sparsification.
    """
    n = flat.numel()
    if trim == "threshold":
        return trim_threshold(flat, density), n
    return largest_rule(flat.abs(), n if density >= 1.0 else int(density * n))


def largest_rule(values: torch.Tensor, keep: int) -> tuple[float, int]:
    """``(threshold, cut)`` selecting exactly the ``keep`` largest of the non-negative flat ``values``, equal values
    by position (what ``argsort(values, descending=True, stable=True)[:keep]`` selects), without sorting."""
    n = values.numel()
    if keep >= n:
        return 0.0 if n == 0 else kth_smallest(values, 1), n
    if keep <= 0:
        return math.inf, -1
    selected = select(values, n - keep + 1)  # the keep-th largest
    at_value = keep - (n - selected.below - selected.equal)  # how many equal ones are kept, the first by position
    if at_value == selected.equal:
        return selected.value, n
    equal = (values == selected.value).nonzero().squeeze(1)
    return selected.value, (int(equal[at_value - 1]) if at_value > 0 else -1)


def trim_mask(flat: torch.Tensor, rule: tuple[float, int], start: int = 0) -> torch.Tensor:
    """The bool mask of :func:`trim_rule`'s ``(threshold, cut)`` on ``flat`` (entries ``start`` onwards)."""
    threshold, cut = rule
    magnitude = flat.abs()
    if cut >= start + flat.numel() - 1:
        return magnitude >= threshold
    positions = torch.arange(start, start + flat.numel(), device=flat.device)
    return (magnitude > threshold) | ((magnitude == threshold) & (positions <= cut))


def l1_factor(delta: torch.Tensor, masked: torch.Tensor) -> float:
    """‖τ‖₁ / ‖m ⊙ τ‖₁ (sums in float64), or 1 when either norm is below 1e-7: mergekit's ``rescale``, which scales
    a masked task vector back to the L1 norm of the unmasked one."""
    before, after = delta.abs().sum(dtype=torch.float64), masked.abs().sum(dtype=torch.float64)
    if before < L1_RESCALE_EPS or after < L1_RESCALE_EPS:
        return 1.0
    return float(before / after)


def elect_signs(trimmed: torch.Tensor, majority_sign: float | None = None) -> torch.Tensor:
    """γ = sign(Σ_t τ̂_t) over a (T, ...) stack; exact zeros take ``majority_sign`` (default: of this tensor)."""
    signs = torch.sign(trimmed.sum(dim=0))
    if majority_sign is None:
        majority_sign = float(torch.sign(signs.sum()))
    return torch.where(signs == 0, torch.full_like(signs, majority_sign), signs)


def disjoint_merge(trimmed: torch.Tensor, signs: torch.Tensor, aggregate: str = "mean",
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_{t∈A} τ̂_t (for "mean" divided by Σ_{t∈A} w_t, 1 if that is 0), A = tasks agreeing with γ and non-zero
    (τ̂_t·γ > 0); ``trimmed`` already weighted, ``weights`` a (T, 1) column (``None``: 1, i.e. |A|).

    Float arithmetic only (boolean masks are several times slower on the CPU): max(τ̂_t·γ, 0) is |τ̂_t| on A and 0
    elsewhere, and Σ_A τ̂_t = γ·Σ_A |τ̂_t| exactly (rounding is symmetric in sign).
    """
    agreeing = (trimmed * signs).clamp_(min=0)
    total = agreeing.sum(dim=0).mul_(signs)
    if aggregate == "mean":
        kept = torch.sign(agreeing)
        if weights is None:
            divisor = kept.sum(dim=0).clamp_(min=1)
        else:
            divisor = kept.mul_(weights).sum(dim=0)
            divisor[divisor == 0] = 1
        total = total / divisor
    return total


def _chunks(numel: int) -> list[slice]:
    return [slice(i, i + TUNING.ties_chunk) for i in range(0, numel, TUNING.ties_chunk)]


def weight_column(weights: list[float] | None, like: torch.Tensor) -> torch.Tensor | None:
    """The weights as a (T, 1) column in ``like``'s dtype and device (``None`` stays ``None``)."""
    return None if weights is None else torch.tensor(weights, dtype=like.dtype, device=like.device).view(-1, 1)


def elected_chunks(deltas: list[torch.Tensor], weights: torch.Tensor | None = None, zero_sign: str = "majority",
                   ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """``(chunk, (T, n) weighted task vectors w_t τ_t, γ)`` over cache-sized chunks of the flattened tensors (TIES
    steps 2–3 for methods that elect signs on already-sparsified task vectors): γ = sign(Σ_t w_t τ_t), exact zeros
    taking +1 (``zero_sign="positive"``) or the tensor's majority sign, which is summed over every chunk first, so
    chunked results equal unchunked ones. ``weights`` a (T, 1) column or ``None`` (1)."""
    flat = [delta.reshape(-1) for delta in deltas]
    chunks = _chunks(flat[0].numel())

    def stacked(chunk: slice) -> torch.Tensor:
        part = torch.stack([f[chunk] for f in flat])
        return part if weights is None else part.mul_(weights)

    majority = 1.0
    if zero_sign == "majority":
        mass = sum(float(torch.sign(stacked(chunk).sum(dim=0)).sum()) for chunk in chunks)
        majority = float(torch.sign(torch.tensor(mass)))
    for chunk in chunks:
        part = stacked(chunk)
        yield chunk, part, elect_signs(part, majority)


def sign_elected_merge(flat: list[torch.Tensor], rules: list[tuple[float, int]] | None = None,
                       scales: list[float] | None = None, weights: list[float] | None = None,
                       majority: float | None = None, aggregate: str = "mean") -> torch.Tensor:
    """TIES steps 2–3 on flat float32 task vectors, trimmed by ``rules`` (:func:`trim_rule`; ``None`` keeps all) and
    scaled by ``scales`` (``None``: 1): v_t = s_t τ̂_t, γ = sign(Σ_t v_t) (exact zeros take ``majority``, by default the
    tensor's: sign Σ_j γ_j), Σ_{t∈A} v_t divided for "mean" by Σ_{t∈A} w_t (``weights``; ``None``: |A|). One fused
    compiled pass (:func:`hf_merge.kernels.fused_elect_merge`) where available, else torch in chunks."""
    n = flat[0].numel()
    rules = rules if rules is not None else [(0.0, n)] * len(flat)
    scales = scales if scales is not None else [1.0] * len(flat)
    fused = fused_elect_merge(flat)
    if fused is not None:
        thresholds, cuts = [rule[0] for rule in rules], [rule[1] for rule in rules]
        if majority is None:
            majority = fused.majority(flat, thresholds, cuts, scales)
        return fused(flat, thresholds, cuts, scales, weights, majority, aggregate == "mean")
    column, weight = weight_column(scales, flat[0]), weight_column(weights, flat[0])

    def trimmed(chunk: slice) -> torch.Tensor:
        part = torch.stack([f[chunk] * trim_mask(f[chunk], rule, chunk.start) for f, rule in zip(flat, rules)])
        return part.mul_(column)

    chunks = _chunks(n)
    if majority is None:  # the majority sign of this tensor, summed chunk by chunk
        mass = sum(float(torch.sign(trimmed(chunk).sum(dim=0)).sum()) for chunk in chunks)
        majority = float(torch.sign(torch.tensor(mass)))
    out = torch.empty_like(flat[0])
    for chunk in chunks:  # elementwise from here: bounded temporaries for embedding-sized tensors
        part = trimmed(chunk)
        out[chunk] = disjoint_merge(part, elect_signs(part, majority), aggregate, weight)
    return out


class TiesMerger(Merger):
    uses_param_info = False
    config: TiesConfig

    @property
    def whole_model_statistics(self) -> bool:
        """Global scope trims at whole-model thresholds and elects with the whole model's majority sign."""
        return self.config.scope == "global"

    @property
    def reduces_across_ranks(self) -> bool:
        """The global thresholds and majority sign are integer counts summed over the processes."""
        return True

    def prepare(self, ctx: MergeContext) -> None:
        self.thresholds: list[float] | None = None
        self.majority_sign: float | None = None
        self.one_pass = None
        cfg = self.config
        self.densities = [float(d) for d in resolve_per_task("density", cfg.density, ctx.task_names)]
        self.weights = resolve_weights(cfg.weights, ctx.task_names)
        self._kept, self._conflicts, self._entries = np.zeros(len(ctx.task_names), dtype=np.int64), 0, 0
        if cfg.scope == "global":
            # one keep count, unit weights, the majority sign: the one-pass route
            if (ctx.can_merge_in_one_pass and len(set(self.densities)) == 1 and self.weights is None
                    and cfg.zero_sign == "majority"):
                one_pass = OnePassTies(ctx, cfg, self._exact_outputs, self.densities[0])
                if one_pass.bracket():
                    self.one_pass = one_pass
                    return
            self._global_statistics(ctx)

    def _global_statistics(self, ctx: MergeContext) -> None:
        self.thresholds, self.majority_sign = global_statistics(ctx, self.densities, self.weights)
        if self.config.zero_sign == "positive":
            self.majority_sign = 1.0

    def _exact_outputs(self, ctx: MergeContext) -> Iterator[tuple[str, torch.Tensor]]:
        """Every output tensor from the exact streaming passes (the one pass's fallback)."""
        self._global_statistics(ctx)
        for key, base, deltas in ctx.iter_deltas("merging (ties)"):
            merged = base + self.merge_tensor(key, base, deltas, ctx.infos[key])
            yield key, merged.to("cpu", ctx.output_dtypes[key])

    def merge_stored(self, key: str, arrays: Sequence[np.ndarray], out: np.ndarray, info: ParamInfo) -> bool:
        if self.config.rescale_norm is not None or not StoredTies.takes(arrays, out):
            return False
        return self.merge_sparsified(StoredTies(arrays), out)

    def merge_sparsified(self, stored: StoredTies, out: np.ndarray) -> bool:
        """:meth:`merge_tensor` of the task vectors ``stored`` gives (also DARE's dropped ones) into ``out``, counting
        what each task kept and the sign conflicts."""
        cfg, n = self.config, stored.numel
        if self.thresholds is not None:
            rules = [(threshold, n) for threshold in self.thresholds]
        elif cfg.trim == "threshold":
            rules = stored.threshold_rules(self.densities)
        else:
            rules = stored.largest_rules(self.densities)
        scales = self.weights or [1.0] * len(rules)
        majority = 1.0 if cfg.zero_sign == "positive" else self.majority_sign
        counts = stored.merge(rules, scales, self.weights, majority, cfg.aggregate == "mean", cfg.scaling, out)
        if counts is None:
            return False
        self._kept += counts.kept
        self._conflicts += counts.conflicts
        self._entries += counts.numel
        return True

    def statistics(self) -> dict[str, float] | None:
        """The fraction of task-vector entries kept (after any sparsifying and the trim) and the fraction of entries
        where a kept value disagreed with the elected sign, over the tensors merged from the stored inputs; for the
        global one pass, the kept fraction."""
        if self.one_pass is not None:
            kept = self.one_pass.kept_fraction
            return None if kept is None else {"kept_fraction": kept}
        if not self._entries:
            return None
        return {"kept_fraction": float(self._kept.sum()) / (len(self._kept) * self._entries),
                "sign_conflict_rate": self._conflicts / self._entries}

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        cfg = self.config
        flat = [d.reshape(-1) for d in deltas]
        if self.thresholds is not None:  # global scope: the whole model's thresholds
            rules = [(threshold, flat[0].numel()) for threshold in self.thresholds]
        else:
            rules = [trim_rule(f, density, cfg.trim) for f, density in zip(flat, self.densities)]
        scales = self.weights
        if cfg.rescale_norm == "l1":  # w_t ‖τ_t‖₁/‖τ̂_t‖₁ (tensor scope: the masks are of this tensor)
            scales = [w * l1_factor(f, f * trim_mask(f, rule))
                      for f, rule, w in zip(flat, rules, self.weights or [1.0] * len(flat))]
        majority = 1.0 if cfg.zero_sign == "positive" else self.majority_sign
        out = sign_elected_merge(flat, rules, scales, self.weights, majority, cfg.aggregate)
        return out.view_as(deltas[0]).mul_(cfg.scaling)


register_method(TiesConfig, TiesMerger)
