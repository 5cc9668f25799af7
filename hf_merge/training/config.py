"""``ATMConfig``: the schedule of Alternating Tuning and Merging (Zhou et al. 2024, arXiv 2411.03055).

ATM is a training procedure, not a merge method: it is not registered in :data:`hf_merge.MERGE_METHODS` and cannot be
passed to :func:`hf_merge.merge`. It serialises like a :class:`~hf_merge.MergeConfig` (``to_dict``/``from_dict``,
``save_pretrained``/``from_pretrained``) into ``atm_config.json``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

from ..config import MergeConfig, MethodCard, SerializableConfig, check_number

ATM_CONFIG_NAME = "atm_config.json"


def _default_merge() -> MergeConfig:
    from ..methods.task_arithmetic import TaskArithmeticConfig

    return TaskArithmeticConfig(scaling=1.0)


@dataclasses.dataclass(kw_only=True)
class ATMConfig(SerializableConfig):
    """How many rounds of ATM to run, the fine-tuning budget per (round, task), and how task vectors are merged.

    Every round k fine-tunes a copy of the current model θ^{k−1} on each task t, forms τ_t^k = θ_t^k − θ^{k−1}, merges
    them with ``merge`` and sets θ^k = θ^{k−1} + α · merged (Zhou et al. 2024).

    Args:
        rounds: K, the number of tune-then-merge rounds (≥ 1).
        steps_per_round: optimizer steps per task per round. Exactly one of this and ``epochs_per_round``.
        epochs_per_round: epochs (may be fractional, e.g. ``0.5``) of each task's data per round.
        scaling: α. ``None`` means 1/T (gradient descent on the mean task loss); 1 means the summed loss.
        merge: how the T task vectors of a round combine, any base-relative merge config (default
            ``TaskArithmeticConfig(scaling=1.0)``, i.e. Σ_t τ_t). Methods without a base (permutation alignment) are
            rejected.
        reset_optimizer: ``True`` (default): a fresh optimizer for every (round, task), as ATM's reference setting does (AdamW
            moments from a previous base are stale). ``False``: each task keeps its optimizer moments from one round to
            the next (T optimizer states are held in memory and saved in checkpoints). The learning-rate schedule
            always spans one (round, task) budget.

    Example:
        >>> ATMConfig(rounds=4, epochs_per_round=0.25)                       # α = 1/T, Task Arithmetic sum
        >>> ATMConfig(rounds=3, steps_per_round=50, merge=TiesConfig(density=0.2, scaling=1.0), scaling=0.5)
    """

    config_file_name: ClassVar[str] = ATM_CONFIG_NAME
    card: ClassVar[MethodCard] = MethodCard(
        title="ATM (Alternating Tuning and Merging)",
        summary=(
            "ATM treats merging as one step of an iterative procedure: in every round each task fine-tunes a copy "
            "of the current merged model for a small budget, the resulting task vectors (relative to the current "
            "model) are merged, and the merge becomes the next round's starting point. Since a task vector after "
            "one full-batch gradient step is the negative task gradient, ATM approximates multi-task training "
            "without pooling the tasks' data."
        ),
        bibtex="""@article{zhou2024atm,
  title   = {{ATM}: Improving Model Merging by Alternating Tuning and Merging},
  author  = {Zhou, Luca and Solombrino, Daniele and Crisostomi, Donato and Bucarelli, Maria Sofia and
             Silvestri, Fabrizio and Rodol{\\`a}, Emanuele},
  journal = {arXiv preprint arXiv:2411.03055},
  year    = {2024}
}""",
        paper_url="https://arxiv.org/abs/2411.03055",
    )

    rounds: int
    steps_per_round: int | None = None
    epochs_per_round: float | None = None
    scaling: float | None = None
    merge: MergeConfig = dataclasses.field(default_factory=_default_merge)
    reset_optimizer: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int):
            raise TypeError(f"rounds must be a positive integer, got {self.rounds!r}.")
        if self.rounds < 1:
            raise ValueError(f"rounds must be a positive integer, got {self.rounds!r}.")
        if (self.steps_per_round is None) == (self.epochs_per_round is None):
            raise ValueError(
                "Give exactly one of steps_per_round and epochs_per_round "
                f"(got steps_per_round={self.steps_per_round!r}, epochs_per_round={self.epochs_per_round!r})."
            )
        if self.steps_per_round is not None:
            if isinstance(self.steps_per_round, bool) or not isinstance(self.steps_per_round, int):
                raise TypeError(f"steps_per_round must be a positive integer, got {self.steps_per_round!r}.")
            if self.steps_per_round < 1:
                raise ValueError(f"steps_per_round must be a positive integer, got {self.steps_per_round!r}.")
        if self.epochs_per_round is not None:
            check_number("epochs_per_round", self.epochs_per_round)
            if self.epochs_per_round <= 0:
                raise ValueError(f"epochs_per_round must be > 0, got {self.epochs_per_round!r}.")
        if self.scaling is not None:
            check_number("scaling", self.scaling)
        if isinstance(self.merge, Mapping):
            self.merge = MergeConfig.from_dict(self.merge)
        if not isinstance(self.merge, MergeConfig):
            raise TypeError(f"merge must be a MergeConfig (e.g. TaskArithmeticConfig), got {type(self.merge).__name__}.")
        from ..methods.base import ModelMerger
        from ..registry import get_merger

        if get_merger(self.merge).uses_data:
            raise ValueError(f"merge={self.merge.method!r} learns from data; ATM merges each round's task vectors "
                             "without data: use a data-free method (task_arithmetic, ties, tsv_m, ...).")
        if isinstance(get_merger(self.merge), ModelMerger):
            raise ValueError(  # noqa: TRY004 (a method of the wrong kind, not a wrong type)
                f"merge={self.merge.method!r} merges models without a shared base; ATM merges task vectors relative "
                "to the current model, so it needs a base-relative method (task_arithmetic, ties, dare, ...)."
            )
        if not isinstance(self.reset_optimizer, bool):
            raise TypeError(f"reset_optimizer must be a bool, got {self.reset_optimizer!r}.")

    def scaling_for(self, num_tasks: int) -> float:
        """α for ``num_tasks`` tasks: the configured value, or 1/T when ``scaling`` is ``None``."""
        if num_tasks < 1:
            raise ValueError(f"ATM needs at least one task, got {num_tasks}.")
        return 1.0 / num_tasks if self.scaling is None else float(self.scaling)
