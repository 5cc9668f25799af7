"""WUDI-Merging (Cheng, Xiong, Wei, Zhu & Yuan, "Whoever Started the Interference Should End It: Guiding Data-Free
Model Merging via Task Vectors", ICML 2025, arXiv 2503.08099).

Per linear weight, with task vectors τ_i (out × in, the input dimension on the right), the merged task vector τ_m
minimises the paper's data-free interference objective (its layer-wise optimisation problem, Sec. 3)::

    L(τ_m) = Σ_i ‖(τ_m − τ_i) τ_iᵀ‖²_F / ‖τ_i‖²_F

The rows of τ_i approximately span task i's inputs to the layer, so (τ_m − τ_i) τ_iᵀ measures how the merged layer
answers task i's inputs differently from task i's own layer. Like the paper's code, τ_m starts at Σ_i τ_i and takes
``steps`` Adam steps (official: 300 at lr 1e-5, betas (0.9, 0.999), eps 1e-8, no weight decay); the result is added
to θ₀ unscaled. Every other parameter gets the mean (1/T) Σ_i τ_i.

L is quadratic. With M = Σ_i τ_iᵀ τ_i / ‖τ_i‖²_F (in × in) and B = Σ_i τ_i τ_iᵀ τ_i / ‖τ_i‖²_F (out × in),
∇L(τ_m) = 2 (τ_m M − B). :func:`wudi_solve` precomputes M and R₀ = Σ_i (Σ_j τ_j − τ_i) τ_iᵀ τ_i / ‖τ_i‖²_F
(= ∇L(Σ τ) / 2, formed without the cancellation of X M − B) once per matrix, and runs Adam on D = τ_m − Σ_i τ_i with
∇ = 2 (D M + R₀): one (out × in) @ (in × in) product per step instead of the 2T products of out × out × in of
autograd on the literal loss, and the same Adam iterates up to rounding. The loss is tracked for free:
L(Σ τ + D) = L(Σ τ) + ⟨D M + 2 R₀, D⟩.

``solver="closed_form"`` (not in the paper) returns the exact minimiser instead: ∇L = 0 ⇔ τ_m M = B. M is symmetric
positive semi-definite and may be singular (T · out < in, or dependent task vectors); of all solutions the one
nearest to Σ_i τ_i is taken, τ_m = Σ_i τ_i − R₀ M⁺, with M⁺ the pseudo-inverse on M's numerical range (eigenvalues
above in · eps · λ_max). Σ_i τ_i lies in that range, so this is also the minimum-norm solution B M⁺.

Where this follows the paper and where implementations depart:

* Which weights: the official ViT code optimises OpenCLIP's ``attn.in_proj_weight``, ``attn.out_proj.weight``,
  ``mlp.c_fc.weight`` and ``mlp.c_proj.weight``; FusionBench's port optimises every 2-D tensor not listed in
  ``exclude_keys`` (embeddings included) and averages the rest; its LLM ports commonly exclude embeddings and
  ``lm_head``. Here: every 2-D linear weight (:attr:`~hf_merge.ParamKind.LINEAR`, output heads included), GPT-2's
  ``Conv1D`` weights transposed to (out, in) first; embeddings, norms, biases and 3-D expert stacks are averaged.
* Adam: the official settings are the defaults (the RoBERTa code used lr 2e-5). Adam's elementwise steps of about
  ``lr`` make 300 steps move each entry by at most ~3e-3: the official route stops far from the minimiser, which is
  part of the method (``closed_form`` is offered for comparison, not as the paper's result).
* Precision: matrices with out · in² ≤ 2²⁷ (and float64 inputs) are solved in float64, larger ones in float32 (the
  official code runs float32 on the GPU).
* A zero task vector (‖τ_i‖ = 0) contributes nothing to L and is left out of M and R₀ (the literal loss divides
  0 by 0). With at most one non-zero task vector Σ_i τ_i is already a minimiser (L = 0) and is returned as it is.
* The method is deterministic: no seed, no data.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import ClassVar

import torch

from ..config import MergeConfig, MethodCard, check_choice, check_positive, check_positive_int
from ..errors import MergeError
from ..params import ParamInfo, ParamKind
from ..registry import register_method
from .base import Merger

#: The solvers of :class:`WUDIConfig`: the paper's Adam iterations, or the exact minimiser.
WUDI_SOLVERS = ("adam", "closed_form")
#: torch.optim.Adam's defaults, which the official code uses.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
#: Matrices with out · in² at most this are solved in float64 (the per-step product is then cheap anyway).
DOUBLE_PRECISION_FLOPS = 2**27

WUDI_BIBTEX = """@inproceedings{cheng2025whoever,
  title     = {Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via Task Vectors},
  author    = {Cheng, Runxi and Xiong, Feng and Wei, Yongxian and Zhu, Wanyun and Yuan, Chun},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2025}
}"""


@dataclasses.dataclass(kw_only=True)
class WUDIConfig(MergeConfig):
    """``steps`` Adam steps at learning rate ``lr`` per linear weight (official: 300 at 1e-5), or with
    ``solver="closed_form"`` the exact minimiser of the WUDI objective (``steps`` and ``lr`` then unused). WUDI has no
    scaling coefficient: the merged task vector is added to θ₀ as it is."""

    method: str = dataclasses.field(default="wudi", init=False)
    steps: int = 300
    lr: float = 1e-5
    solver: str = "adam"

    card: ClassVar[MethodCard] = MethodCard(
        title="WUDI-Merging",
        summary=(
            "WUDI-Merging (Whoever started the interference should end it) merges linear layers without data. The "
            "rows of a layer's task vector approximately span the inputs the layer saw during fine-tuning, so the "
            "task vectors themselves measure how much the merged layer disturbs each task: for every weight matrix "
            "the merged update, started at the sum of the task vectors, is optimised with a few hundred Adam steps "
            "to minimise Σ_i ‖(τ_m − τ_i) τ_iᵀ‖² / ‖τ_i‖². Other parameters are averaged; no coefficient is tuned."
        ),
        bibtex=WUDI_BIBTEX,
        paper_url="https://arxiv.org/abs/2503.08099",
    )

    def __post_init__(self) -> None:
        check_positive_int("steps", self.steps, minimum=0)
        check_positive("lr", self.lr)
        check_choice("solver", self.solver, WUDI_SOLVERS)


def is_wudi_treated(info: ParamInfo) -> bool:
    """Whether WUDI optimises the tensor: a 2-D linear weight (the rest is averaged)."""
    return info.kind == ParamKind.LINEAR and info.ndim == 2


def mean_delta(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """(1/T) Σ_t τ_t: the treatment of every parameter that is not a linear weight."""
    total = torch.zeros_like(deltas[0])
    for delta in deltas:
        total.add_(delta)
    return total.div_(len(deltas))


def work_dtype(shape: Sequence[int], dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs and small matrices (out · in² ≤ :data:`DOUBLE_PRECISION_FLOPS`), else float32."""
    out, inn = shape
    return torch.float64 if dtype == torch.float64 or out * inn * inn <= DOUBLE_PRECISION_FLOPS else torch.float32


@dataclasses.dataclass
class _Quadratic:
    """L(X₀ + D) = L₀ + ⟨D M + 2 R₀, D⟩ around X₀ = Σ_i τ_i; ∇L(X₀ + D) = 2 (D M + R₀)."""

    x0: torch.Tensor  # Σ_i τ_i (out × in)
    m: torch.Tensor | None  # Σ_i τ_iᵀ τ_i / ‖τ_i‖² (in × in); None with at most one non-zero task vector
    r0: torch.Tensor | None  # Σ_i (X₀ − τ_i) τ_iᵀ τ_i / ‖τ_i‖² (out × in)
    l0: torch.Tensor  # L(X₀), 0-d

    def loss(self, d: torch.Tensor, half_grad: torch.Tensor) -> torch.Tensor:
        """L(X₀ + D) = L₀ + ⟨(D M + R₀) + R₀, D⟩ from D and ``half_grad`` = D M + R₀ (0-d, float64)."""
        assert self.r0 is not None
        flat = d.reshape(-1)
        return self.l0 + torch.dot(half_grad.reshape(-1), flat).double() + torch.dot(self.r0.reshape(-1), flat).double()


def _quadratic(deltas: Sequence[torch.Tensor], dtype: torch.dtype) -> _Quadratic:
    """M, R₀ and L(Σ τ) of the WUDI objective, zero task vectors left out (their term of L is zero)."""
    matrices = [delta.to(dtype) for delta in deltas]
    x0 = torch.zeros_like(matrices[0])
    for matrix in matrices:
        x0.add_(matrix)
    norms = torch.stack([torch.linalg.vector_norm(m, dtype=torch.float64) for m in matrices]).tolist()
    kept = [(matrix, norm) for matrix, norm in zip(matrices, norms) if norm > 0]
    l0 = torch.zeros((), dtype=torch.float64, device=x0.device)
    if len(kept) <= 1:
        return _Quadratic(x0, None, None, l0)
    inn = x0.shape[1]
    m = torch.zeros(inn, inn, dtype=dtype, device=x0.device)
    r0 = torch.zeros_like(x0)
    for matrix, norm in kept:
        root = math.sqrt(norm)  # τ / ‖τ‖ in two divisions: ‖τ‖ itself may exceed float32's range
        unit = matrix.div(root).div_(root)
        gram = unit.T @ unit  # τᵀτ / ‖τ‖²
        m.add_(gram)
        residual = x0 - matrix
        term = residual @ gram
        r0.add_(term)
        l0 += torch.dot(term.reshape(-1), residual.reshape(-1)).double()  # ‖(X₀ − τ) τᵀ‖² / ‖τ‖²
    if not (torch.isfinite(r0).all() and torch.isfinite(l0)):
        raise MergeError("WUDI's normal equations are not finite (the task vectors' products overflow).")
    return _Quadratic(x0, m, r0, l0)


def _adam(q: _Quadratic, steps: int, lr: float, trace: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``steps`` steps of torch.optim.Adam (default betas and eps) on D from 0, with ∇ = 2 (D M + R₀); returns
    X₀ + D and the losses L(X_k) (every k with ``trace``, else the first and the last)."""
    assert q.m is not None and q.r0 is not None
    beta1, beta2 = ADAM_BETAS
    d = torch.zeros_like(q.x0)
    exp_avg = torch.zeros_like(d)
    exp_avg_sq = torch.zeros_like(d)
    grad = torch.empty_like(d)
    losses = [q.l0]
    for step in range(1, steps + 1):
        torch.addmm(q.r0, d, q.m, out=grad)  # D M + R₀ = ∇L / 2
        if trace and step > 1:
            losses.append(q.loss(d, grad))
        grad.mul_(2)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1**step)
        denominator = torch.sqrt(exp_avg_sq, out=grad).div_((1 - beta2**step) ** 0.5).add_(ADAM_EPS)
        d.addcdiv_(exp_avg, denominator, value=-step_size)
    if steps > 0:
        losses.append(q.loss(d, torch.addmm(q.r0, d, q.m)))
    return d.add_(q.x0), losses


def _closed_form(q: _Quadratic) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """X₀ − R₀ M⁺ (M⁺ on the eigenvalues above in · eps · λ_max) and the losses [L(X₀), L(X*)]."""
    assert q.m is not None and q.r0 is not None
    values, vectors = torch.linalg.eigh(q.m)
    cutoff = values[-1].clamp_min(0) * q.m.shape[0] * torch.finfo(q.m.dtype).eps
    keep = values > cutoff
    values, vectors = values[keep], vectors[:, keep]
    d = ((q.r0 @ vectors) / values).mul_(-1) @ vectors.T
    return q.x0 + d, [q.l0, q.loss(d, torch.addmm(q.r0, d, q.m))]


def wudi_solve(
    deltas: Sequence[torch.Tensor],
    steps: int = 300,
    lr: float = 1e-5,
    *,
    solver: str = "adam",
    trace: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The WUDI merged task vector of one linear weight from its task vectors τ_i (each out × in, input dimension
    on the right) and the objective L(τ_m) = Σ_i ‖(τ_m − τ_i) τ_iᵀ‖²_F / ‖τ_i‖²_F along the way.

    ``solver="adam"``: ``steps`` torch.optim.Adam steps (default betas/eps) at learning rate ``lr`` from Σ_i τ_i, as
    in the paper's code, with the gradient 2 (τ_m M − B) from precomputed M and R₀ (see the module docstring).
    ``solver="closed_form"``: the minimiser nearest to Σ_i τ_i, Σ_i τ_i − R₀ M⁺.

    Returns ``(τ_m, losses)``: τ_m in the deltas' dtype, on their device; ``losses`` a float64 CPU tensor of
    L(τ_m) at every Adam iterate k = 0 … ``steps`` (with ``trace``; else the first and the last — one value for
    ``steps=0``; for the closed form [L(Σ τ), L(τ_m)]). Non-finite intermediate results raise
    :class:`~hf_merge.MergeError`.
    """
    if not deltas:
        raise ValueError("wudi_solve needs at least one task vector.")
    shape = deltas[0].shape
    if len(shape) != 2 or any(delta.shape != shape for delta in deltas):
        raise ValueError(f"wudi_solve needs 2-D task vectors of one shape, got {[tuple(d.shape) for d in deltas]}.")
    check_choice("solver", solver, WUDI_SOLVERS)
    q = _quadratic(deltas, work_dtype(shape, deltas[0].dtype))
    if q.m is None:  # at most one non-zero task vector: L(Σ τ) = 0 is the minimum and the gradient there is zero
        count = (steps + 1 if trace else min(steps + 1, 2)) if solver == "adam" else 2
        merged, losses = q.x0, [q.l0] * count
    elif solver == "closed_form":
        merged, losses = _closed_form(q)
    else:
        merged, losses = _adam(q, steps, lr, trace)
    merged = merged.to(deltas[0].dtype)
    if not torch.isfinite(merged).all():
        raise MergeError(f"WUDI's merged task vector is not finite in {deltas[0].dtype} (it overflows).")
    return merged, torch.stack(losses).cpu()


class WUDIMerger(Merger):
    config: WUDIConfig

    def __init__(self, config: MergeConfig) -> None:
        super().__init__(config)
        self._loss_ratios: list[float] = []

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        if not (is_wudi_treated(info) and deltas[0].ndim == 2):
            return mean_delta(deltas)
        matrices = [delta.T for delta in deltas] if info.transposed else deltas  # (in, out) Conv1D → (out, in)
        try:
            merged, losses = wudi_solve(matrices, self.config.steps, self.config.lr, solver=self.config.solver,
                                        trace=False)
        except MergeError as error:
            raise MergeError(f"tensor {key!r}: {error}") from None
        first, last = losses[0].item(), losses[-1].item()
        if first > 0:
            self._loss_ratios.append(last / first)
        return merged.T.contiguous() if info.transposed else merged

    def statistics(self) -> dict[str, float] | None:
        """``loss_ratio``: the mean over the optimised matrices of L(τ_m) / L(Σ τ), the fraction of the WUDI
        objective left (matrices with L(Σ τ) = 0, e.g. a single task, are not counted)."""
        if not self._loss_ratios:
            return None
        return {"loss_ratio": sum(self._loss_ratios) / len(self._loss_ratios)}


register_method(WUDIConfig, WUDIMerger)
