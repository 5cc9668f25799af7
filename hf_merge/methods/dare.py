"""DARE (Yu et al. 2024): drop and rescale task vectors before another merge.

τ'_t = (1 − m_t) ⊙ τ_t / (1 − p), m_t ~ Bernoulli(p) i.i.d. (1 = dropped; the paper's drop and rescale), then Task
Arithmetic or TIES on τ'. The mask is sampled on the CPU from a generator seeded by (seed, task name, tensor name),
so the result does not depend on shard order, device or parallelism. E[τ'] = τ, and survivors equal τ / (1 − p)
exactly.

mergekit (``dare_linear``/``dare_ties``, keep probability = its ``density`` = 1 − p) instead rescales the dropped
vector to the L1 norm of the undropped one, τ' = (1 − m) ⊙ τ · ‖τ‖₁/‖(1 − m) ⊙ τ‖₁: ``rescale_norm="l1"``. Its random
stream cannot be reproduced; the kept fraction and the rescale factor's definition are the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from ..config import MergeConfig, MethodCard, SearchSpace, check_fraction, per_task_items, resolve_per_task
from ..kernels import StoredTies, counter_uniforms
from ..params import ParamInfo
from ..registry import register_method
from .base import Merger
from .task_arithmetic import TaskArithmeticConfig
from .ties import TiesConfig, TiesMerger, check_rescale_norm, l1_factor

if TYPE_CHECKING:
    from ..context import MergeContext


@dataclasses.dataclass(kw_only=True)
class DareConfig(MergeConfig):
    """``drop_rate`` p ∈ [0, 1) (0.9 is the paper's headline for LLM deltas; one value, or per task as a sequence in
    input order or a ``{task_name: p}`` mapping), ``rescale`` the survivors (by 1/(1−p), the paper's; by
    ‖τ‖₁/‖(1 − m) ⊙ τ‖₁ with ``rescale_norm="l1"``, mergekit's ``rescale``), ``seed`` of the masks, ``then`` the
    merge applied to the dropped task vectors (Task Arithmetic or TIES, each with per-task ``weights``)."""

    method: str = dataclasses.field(default="dare", init=False)
    drop_rate: float | Sequence[float] | Mapping[str, float]
    then: TaskArithmeticConfig | TiesConfig
    rescale: bool = True
    seed: int = 0
    rescale_norm: str | None = None

    card: ClassVar[MethodCard] = MethodCard(
        title="DARE (Drop And REscale)",
        summary=(
            "DARE is a preprocessing step for task vectors: it drops each delta parameter at random with "
            "probability p and rescales the survivors by 1/(1 − p), which keeps the expected task vector unchanged. "
            "Fine-tuning deltas are highly redundant, so even large drop rates barely hurt each model while "
            "sparsifying the vectors before they are merged with Task Arithmetic or TIES."
        ),
        bibtex="""@inproceedings{yu2024dare,
  title     = {Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch},
  author    = {Yu, Le and Yu, Bowen and Yu, Haiyang and Huang, Fei and Li, Yongbin},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2024}
}""",
        paper_url="https://arxiv.org/abs/2311.03099",
    )

    def __post_init__(self) -> None:
        for label, rate in per_task_items("drop_rate", self.drop_rate):
            check_fraction(label, rate, high_open=True)
        if not isinstance(self.then, (TaskArithmeticConfig, TiesConfig)):
            raise TypeError(
                f"then must be a TaskArithmeticConfig or TiesConfig, got {type(self.then).__name__}."
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}.")
        if not isinstance(self.rescale, bool):
            raise TypeError(f"rescale must be a bool, got {self.rescale!r}.")
        check_rescale_norm(self.rescale_norm)
        if self.rescale_norm is not None and not self.rescale:
            raise ValueError(f"rescale_norm={self.rescale_norm!r} chooses how to rescale; rescale is False.")

    def search_space(self) -> SearchSpace | None:
        """The ``then`` merge's coefficient and grid (e.g. ``then.scaling``): the masks do not depend on it."""
        inner = self.then.search_space()
        if inner is None:
            return None
        return SearchSpace(f"then.{inner.parameter}", inner.values, inner.kind)

    def coefficient_kind(self, parameter: str) -> str:
        """A ``then.<field>`` is as linear as it is for the ``then`` merge: the drop comes first and does not depend
        on it (DARE's ``drop_rate`` and ``seed`` themselves are "rerun")."""
        head, _, rest = parameter.partition(".")
        return self.then.coefficient_kind(rest) if head == "then" and rest else "rerun"


def mask_seed(seed: int, task: str, key: str) -> int:
    """A 63-bit generator seed from (seed, task, tensor name), stable across processes and machines."""
    digest = hashlib.blake2b(f"{seed}\x00{task}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def dare_drop(delta: torch.Tensor, drop_rate: float, seed: int, *, rescale: bool = True,
              rescale_norm: str | None = None) -> torch.Tensor:
    """(1 − m) ⊙ τ [/ (1 − p), or · ‖τ‖₁/‖(1 − m) ⊙ τ‖₁ for ``rescale_norm="l1"``] with m ~ Bernoulli(p) drawn on the
    CPU from ``seed`` by a counter-based generator (:func:`hf_merge.kernels.counter_uniforms`; float32
    arithmetic)."""
    if drop_rate == 0.0:
        return delta
    keep = counter_uniforms(seed, delta.shape) >= drop_rate
    kept = delta * keep.to(delta.device)
    if not rescale:
        return kept
    return kept.mul_(l1_factor(delta, kept)) if rescale_norm == "l1" else kept.div_(1.0 - drop_rate)


class DareMerger(Merger):
    uses_param_info = False
    config: DareConfig

    def __init__(self, config: DareConfig) -> None:
        super().__init__(config)
        from ..registry import get_merger

        self.inner = get_merger(config.then)

    @property
    def whole_model_statistics(self) -> bool:
        return self.inner.whole_model_statistics

    @property
    def reduces_across_ranks(self) -> bool:
        return self.inner.reduces_across_ranks

    def _drop(self, task: str, key: str, delta: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        return dare_drop(delta, self.drop_rates[task], mask_seed(cfg.seed, task, key), rescale=cfg.rescale,
                         rescale_norm=cfg.rescale_norm)

    def prepare(self, ctx: MergeContext) -> None:
        self.task_names = ctx.task_names
        self.drop_rates = dict(zip(ctx.task_names, resolve_per_task("drop_rate", self.config.drop_rate,
                                                                    ctx.task_names)))
        self.inner.prepare(ctx.with_transform(self._drop))

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        dropped = [self._drop(task, key, delta) for task, delta in zip(self.task_names, deltas)]
        return self.inner.merge_tensor(key, base, dropped, info)

    def merge_stored(self, key: str, arrays: Sequence[np.ndarray], out: np.ndarray, info: ParamInfo) -> bool:
        """DARE then TIES straight from the stored inputs: the drop is drawn inside TIES' compiled passes."""
        if (not isinstance(self.inner, TiesMerger) or self.inner.config.rescale_norm is not None
                or not StoredTies.takes(arrays, out)):
            return False
        cfg = self.config
        rates = [self.drop_rates[task] for task in self.task_names]
        stored = StoredTies(arrays, rates, [mask_seed(cfg.seed, task, key) for task in self.task_names],
                            [1.0 - rate if cfg.rescale else 1.0 for rate in rates])
        if cfg.rescale and cfg.rescale_norm == "l1":
            stored.rescale_to_l1()
        return self.inner.merge_sparsified(stored, out)

    def statistics(self) -> dict[str, float] | None:
        return self.inner.statistics()


register_method(DareConfig, DareMerger)
