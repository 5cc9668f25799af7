"""ATM's merge step: θ^k = θ^{k−1} + α · merge(τ_1^k, …, τ_T^k) (Zhou et al. 2024), into the live model.

A merge linear in the task vectors (``Merger.linear_coefficients``) keeps a running sum of c_t τ_t while the tasks
are fine-tuned (about three models in memory); any other merge runs once per round through the engine on the T
fine-tuned states (T + 2 models). The running sum is elementwise: under FSDP the trainer passes each rank's shards of
the parameters and the ranks merge them independently.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..engine import Plan, run
from ..io.sinks import TensorsSink
from ..io.sources import StateDictSource
from ..methods.base import Merger
from ..options import make_options

if TYPE_CHECKING:
    from ..context import MergeContext
    from ..params import ParamInfo


def merge_round(
    merger: Merger,
    live: dict[str, torch.Tensor],
    base: dict[str, torch.Tensor],
    task_states: dict[str, dict[str, torch.Tensor]],
    alpha: float,
    round_index: int,
    architecture: torch.nn.Module,
) -> None:
    """θ^k = θ^{k−1} + α · merged task vector: one engine run into the live tensors (``architecture`` classifies
    the parameters)."""
    sources = {
        task: StateDictSource(state, f"ATM round {round_index} model fine-tuned on {task!r}")
        for task, state in task_states.items()
    }
    plan = Plan(StateDictSource(base, f"ATM round {round_index} start model"), sources,
                _ScaledUpdate(merger, alpha), architecture=architecture)
    run(plan, TensorsSink(live), make_options(device=next(iter(live.values())).device, progress=False))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision weights (their deltas fall below the bf16 ulp), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def accumulate_task_vector(
    running_sum: dict[str, torch.Tensor], live: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
    coefficient: float, common: float | None,
) -> str | None:
    """running_sum += c_t τ_t with τ_t = θ_t − θ^{k−1} (just τ_t when every c_t is ``common``), in the accumulation
    dtype. Returns the name of the first tensor whose τ_t holds NaN/Inf (the sum is then left incomplete), else
    ``None``."""
    for name, total in running_sum.items():
        delta = live[name].to(total.dtype) - base[name].to(total.dtype)
        if not torch.isfinite(delta).all():
            return name
        total.add_(delta, alpha=1.0 if common is not None else coefficient)
    return None


def apply_running_sum(
    live: dict[str, torch.Tensor],
    base: dict[str, torch.Tensor],
    running_sum: dict[str, torch.Tensor],
    common: float,
    alpha: float,
) -> None:
    """θ^k = θ^{k−1} + α · c Σ_t τ_t (or α Σ_t c_t τ_t), rounded once to the model's dtype."""
    for name, total in running_sum.items():
        merged = base[name].to(total.dtype) + (alpha * common) * total
        live[name].copy_(merged.to(live[name].dtype))


class _ScaledUpdate(Merger):
    """The merged task vector of ``inner`` times α (ATM's outer step size), merged tensor by tensor."""

    def __init__(self, inner: Merger, alpha: float) -> None:
        self.inner, self.alpha, self.config = inner, alpha, inner.config

    def prepare(self, ctx: MergeContext) -> None:
        self.inner.prepare(ctx.nested())  # tensor by tensor: never the inner method's one-pass route

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        return self.inner.merge_tensor(key, base, deltas, info).mul_(self.alpha)
