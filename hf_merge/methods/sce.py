"""SCE merging (Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models", arXiv 2408.07990): Select, Calculate,
Erase — per tensor, on the task vectors ("fusion vectors") τ_t of T target models of one pivot θ₀.

1. Select: the ⌊τ_sel · V⌋ positions with the largest variance of τ_t across the models (population variance), V the
   number of positions whose variance is non-zero, τ_sel = ``select_topk`` (1 = every position, no selection). The
   other positions are zeroed in every task vector (τ̂_t). Ties of variance go by position.
2. Calculate: one weight per model and tensor from the selected entries, w_t = Σ τ̂_t² / Σ_s Σ τ̂_s² (the ratio of the
   models' mean squared updates over the selected positions); all-zero task vectors give uniform weights 1/T.
3. Erase: TIES' sign election by mass, γ = sign(Σ_t τ̂_t) (:func:`~hf_merge.methods.ties.elect_signs`; exact zeros
   take the tensor's majority sign), and only entries with sign(τ̂_t) = γ are kept.

The merged task vector is Σ_t w_t τ̂_t / Σ_t w_t over the kept entries (0 where no entry is kept): θ = θ₀ + that.

Where this follows the paper and where the implementations depart:

* mergekit's ``sce`` does the same three steps (V counts non-zero variances, the weights are Σ τ̂²/numel per model,
  normalised), with two departures, each an option: its election gives +1 to exact zeros of Σ_t τ̂_t
  (``zero_sign="positive"``; here the tensor's majority sign, TIES), and ``epsilon=1e-6``: it falls back to uniform
  weights when Σ_t mean(τ̂_t²) < 1e-6 (here only when it is 0) — common for LLM fine-tunes, whose |τ| ~ 1e-3 — and
  divides by max(Σ_{t kept} w_t, 1e-6).
* The FuseChat authors' own mergekit fork uses the selection only to compute the weights and then erases and combines
  the *unselected* task vectors τ_t at every position; mergekit and the paper's description (here) merge only the
  selected positions, leaving the others at θ₀.

Everything runs in chunks of the flattened tensor (bounded temporaries for embedding-sized tensors); the variance
ranking and the weights need the whole tensor first. Without a selection (``select_topk`` = 1) a checkpoint on the CPU
is merged straight from its stored tensors (:meth:`SCEMerger.merge_stored`): one compiled read sums each Σ τ_t², a
second elects and merges, with the same bits as the float32 route.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch

from ..config import MergeConfig, MethodCard, check_choice, check_fraction, check_number
from ..kernels import StoredTies, fused_elect_merge
from ..params import ParamInfo
from ..registry import register_method
from ..tuning import TUNING
from .base import Merger
from .ties import ZERO_SIGNS, elected_chunks, largest_rule, trim_mask


@dataclasses.dataclass(kw_only=True)
class SCEConfig(MergeConfig):
    """``select_topk``: the fraction τ of positions (among those whose task vectors differ) kept by variance across
    the models; 1.0 (the default) selects every position. FuseChat's recipe uses 0.1. mergekit's options:
    ``zero_sign`` of an exactly-zero Σ_t τ̂_t ("majority" or "positive") and ``epsilon`` (mergekit 1e-6; 0 here):
    w_t = 1/T when Σ_t mean(τ̂_t²) < ε, and τ = Σ_A w_t τ̂_t / max(Σ_A w_t, ε)."""

    method: str = dataclasses.field(default="sce", init=False)
    select_topk: float = 1.0
    zero_sign: str = "majority"
    epsilon: float = 0.0

    card: ClassVar[MethodCard] = MethodCard(
        title="SCE (Select, Calculate, Erase)",
        summary=(
            "SCE is the merging step of FuseChat. For every weight matrix it first selects the positions where the "
            "models' updates differ most (highest variance across the task vectors), then calculates one merging "
            "weight per model from the size of its selected updates (its share of the summed squared updates), and "
            "finally erases the entries whose sign disagrees with the elected majority sign. The remaining updates are "
            "combined as a weighted average and added to the pivot model, without any coefficient to tune."
        ),
        bibtex="""@article{wan2024fusechat,
  title   = {{FuseChat}: Knowledge Fusion of Chat Models},
  author  = {Wan, Fanqi and Zhong, Longguang and Yang, Ziyi and Chen, Ruijun and Quan, Xiaojun},
  journal = {arXiv preprint arXiv:2408.07990},
  year    = {2024}
}""",
        paper_url="https://arxiv.org/abs/2408.07990",
    )

    def __post_init__(self) -> None:
        check_fraction("select_topk", self.select_topk, low_open=True)
        check_choice("zero_sign", self.zero_sign, ZERO_SIGNS)
        check_number("epsilon", self.epsilon)
        if self.epsilon < 0:
            raise ValueError(f"epsilon must be at least 0, got {self.epsilon!r}.")


def _chunks(numel: int) -> list[slice]:
    size = TUNING.ties_chunk
    return [slice(i, i + size) for i in range(0, numel, size)]


def population_variance(values: list[torch.Tensor]) -> torch.Tensor:
    """Σ_t (x_t − mean)² / T across the tensors, elementwise: Welford's recurrence in float64, rounded once — the bits
    of ``torch.stack(values).var(dim=0, unbiased=False)`` (which mergekit's SCE ranks by), without its slow strided
    reduction."""
    mean = values[0].double()
    m2 = torch.zeros_like(mean)
    for count, value in enumerate(values[1:], start=2):
        x = value.double()
        delta = x - mean
        mean += delta / count
        m2 += delta * (x - mean)
    return (m2 / len(values)).to(values[0].dtype)


def sce_select(deltas: list[torch.Tensor], select_topk: float) -> torch.Tensor | None:
    """SCE's Select step (Wan et al. 2024): a bool mask of the ⌊τ · V⌋ positions of largest variance of τ_t across
    models (V = non-zero variances; ties by position), or ``None`` (every position) when τ ≥ 1."""
    if select_topk >= 1:
        return None
    flat = [d.reshape(-1) for d in deltas]
    variance = torch.empty_like(flat[0])
    for chunk in _chunks(flat[0].numel()):
        variance[chunk] = population_variance([f[chunk] for f in flat])
    count = int(select_topk * int(torch.count_nonzero(variance)))
    return trim_mask(variance, largest_rule(variance, count)).view_as(deltas[0])


def sce_weights(selected: list[torch.Tensor], epsilon: float = 0.0) -> list[float]:
    """SCE's Calculate step (Wan et al. 2024): w_t = Σ τ̂_t² / Σ_s Σ τ̂_s² over the selected task vectors τ̂_t (squares
    summed in float64), uniform 1/T when they are all zero or when Σ_t mean(τ̂_t²) < ``epsilon``."""
    return weights_from_squares([_sum_of_squares(s) for s in selected], selected[0].numel(), epsilon)


def _sum_of_squares(tensor: torch.Tensor) -> float:
    """Σ x² in float64, chunk by chunk (no float64 copy of the whole tensor)."""
    total = 0.0
    for part in tensor.reshape(-1).split(TUNING.ties_chunk):
        part = part.double()
        total += float(torch.dot(part, part))
    return total


def weights_from_squares(squares: Sequence[float], numel: int, epsilon: float = 0.0) -> list[float]:
    """:func:`sce_weights` from the tasks' Σ τ̂_t²."""
    total = sum(squares)
    if total == 0 or total / max(numel, 1) < epsilon:
        return [1.0 / len(squares)] * len(squares)
    return [sq / total for sq in squares]


def sce(deltas: list[torch.Tensor], select_topk: float = 1.0, zero_sign: str = "majority",
        epsilon: float = 0.0) -> torch.Tensor:
    """Σ_t w_t τ̂_t / max(Σ_t w_t, ε) over the entries agreeing with γ = sign(Σ_t τ̂_t) (SCE's Erase step and weighted
    combination, Wan et al. 2024; 0 where none agrees); τ̂_t the selected task vectors, w_t from :func:`sce_weights`."""
    mask = sce_select(deltas, select_topk)
    selected = deltas if mask is None else [d * mask for d in deltas]
    weight_list = sce_weights(selected, epsilon)
    flat = [s.reshape(-1) for s in selected]
    fused = fused_elect_merge(flat)
    if fused is not None:
        n, ones = flat[0].numel(), [1.0] * len(flat)
        thresholds, cuts = [0.0] * len(flat), [n] * len(flat)
        majority = 1.0 if zero_sign == "positive" else fused.majority(flat, thresholds, cuts, ones)
        out = fused(flat, thresholds, cuts, ones, weight_list, majority, True, weigh_values=True, floor=epsilon)
        return out.view_as(deltas[0])
    weights = torch.tensor(weight_list, dtype=deltas[0].dtype, device=deltas[0].device).unsqueeze(1)
    out = torch.empty(deltas[0].numel(), dtype=deltas[0].dtype, device=deltas[0].device)
    for chunk, part, signs in elected_chunks(selected, zero_sign=zero_sign):
        kept = torch.sign((part * signs).clamp_(min=0)).mul_(weights)  # w_t on kept entries
        divisor = kept.sum(dim=0).clamp_(min=epsilon)
        out[chunk] = (part * kept).sum(dim=0) / torch.where(divisor > 0, divisor, torch.ones_like(divisor))
    return out.view_as(deltas[0])


class SCEMerger(Merger):
    uses_param_info = False
    config: SCEConfig

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        cfg = self.config
        return sce(deltas, cfg.select_topk, cfg.zero_sign, cfg.epsilon)

    @property
    def reads_stored(self) -> bool:
        """Where every position is selected (``select_topk`` ≥ 1): the selection needs the whole tensor's variances."""
        return self.config.select_topk >= 1

    def merge_stored(self, key: str, arrays: Sequence[np.ndarray], out: np.ndarray, info: ParamInfo) -> bool:
        """:meth:`merge_tensor` plus θ₀ straight from the stored inputs (the same bits): one compiled read for the
        weights' Σ τ_t², one for the elect-and-merge."""
        cfg = self.config
        if not self.reads_stored or not StoredTies.takes(arrays, out):
            return False
        stored = StoredTies(arrays)
        tasks, n = len(stored.tasks), stored.numel
        weights = weights_from_squares(stored.squares().tolist(), n, cfg.epsilon)
        counts = stored.merge([(0.0, n)] * tasks, [1.0] * tasks, weights,
                              1.0 if cfg.zero_sign == "positive" else None, True, 1.0, out, weigh_values=True,
                              floor=cfg.epsilon)
        return counts is not None


register_method(SCEConfig, SCEMerger)
