"""``ATMTrainer``: Alternating Tuning and Merging (Zhou et al. 2024, arXiv 2411.03055) on ``transformers.Trainer``.

θ⁰ is the model given to the trainer, or — ATM as refinement of a merge (the paper's second application) —
``init_from``: a merged model's weights, or a merge (e.g. TSV-M) of ``init_experts`` with the given model as its base,
computed when the trainer is built. Round k = 1..K, for every task t: fine-tune θ^{k−1} on D_t for the per-round
budget (fresh optimizer and scheduler, seed ``args.seed + (k−1)·T + t``), take τ_t^k = θ_t^k − θ^{k−1}, restore θ^{k−1}.
Then θ^k = θ^{k−1} + α · merge(τ_1^k, …, τ_T^k) (:mod:`hf_merge.training.merge_step`). With one full-batch SGD step
per task and α = 1 this is gradient descent on Σ_t L_t; α = 1/T gives the mean loss.

Each (round, task) fine-tune is one call of the inner :meth:`transformers.Trainer.train` with the user's
``TrainingArguments`` (optimizer, scheduler, batch size, logging, ``report_to``), except that saving and evaluation
happen at round boundaries: after every round the trainer evaluates every task that has an evaluation set (when
``args.eval_strategy != "no"``) and writes ``checkpoint-<round>`` (when ``args.save_strategy != "no"``), which
``train(resume_from_checkpoint=...)`` continues from, to the same result as an uninterrupted run.

Memory: with a merge linear in the task vectors (Task Arithmetic, the default, or averaging) the trainer holds the
model, a copy of θ^{k−1} and a running sum of task vectors (float32, or float64 for float64 models): about three
models. Any other merge method keeps the T fine-tuned models of the round (plus θ^{k−1}) until the round's merge:
T + 2 models.

Distributed: under DDP every rank holds the whole model and merges it. Under FSDP2 (Accelerate's FSDP plugin,
``fsdp_config={"version": 2}``) every rank keeps θ^{k−1} and the running sum of its own parameter shards and merges
them in place — nothing is gathered — so the merge must be linear in the task vectors (Task Arithmetic, averaging);
other merges, task heads and FSDP1 are refused when the trainer is built, and saving needs full state dicts.

One concern in one file (~700 lines): ``ATMTrainer`` overrides the ``Trainer`` hooks one round of ATM touches — loss,
prediction, evaluation, logging, optimizer creation, training — and they share its per-(round, task) state, as do
resumption and the starting point θ⁰ (``init_from``, the helpers at the end); the merge step and the round
checkpoints live in their own modules.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import transformers
from torch import nn
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import (
    IntervalStrategy,
    SaveStrategy,
    TrainOutput,
    enable_full_determinism,
    get_last_checkpoint,
    set_seed,
)

from ..config import MergeConfig, load_json
from ..errors import MergeError
from ..registry import get_merger
from .checkpoints import RoundCheckpoints
from .config import ATMConfig
from .merge_step import accumulate_task_vector, accumulation_dtype, apply_running_sum, merge_round

LossFn = Callable[[nn.Module, dict[str, Any]], "torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]"]
#: What θ⁰ was made from (``ATMTrainer.init_record``), saved next to the model and in every round checkpoint.
INIT_RECORD_NAME = "atm_init.json"


class ATMTrainer(RoundCheckpoints, transformers.Trainer):
    """A :class:`transformers.Trainer` that runs ATM over several tasks.

    Args:
        model: the shared model θ⁰ (a ``PreTrainedModel`` or any module the ``Trainer`` accepts); with ``init_from``,
            the model whose weights θ⁰ replaces (in place), and with a merge config the base θ₀ of that merge.
        args: ``TrainingArguments``. Optimizer, learning rate and its schedule, batch size, gradient accumulation,
            logging and ``report_to`` apply to every (round, task) fine-tune; the schedule spans one such budget.
            Any ``eval_strategy``/``save_strategy`` other than ``"no"`` means "at every round boundary";
            ``save_total_limit`` keeps the newest round checkpoints.
        task_datasets: ``{task: train_dataset}`` or ``{task: (train_dataset, eval_dataset_or_None)}``.
        atm_config: the :class:`ATMConfig` (rounds, per-round budget, α, merge method).
        init_from: where θ⁰ comes from when ATM refines a merge instead of starting from ``model``'s weights:

            - merged weights: a model (``PreTrainedModel``/``nn.Module``), a state dict or a local checkpoint folder
              (``save_pretrained`` output) with exactly ``model``'s tensors (names and shapes; with ``task_heads`` the
              model's own head may be left out) — copied into ``model``;
            - a merge: a :class:`~hf_merge.MergeConfig`, a method name (``"tsv_m"``) or a config dict
              (``{"method": "ties", "density": 0.2}``, as in ``merge_config.json``), applied to ``init_experts`` with
              ``model`` as the base: ``hf_merge.merge(model, init_experts, config)`` written into ``model`` (default
              run options: arithmetic on the CPU; compute the merge yourself to pass others).

            θ⁰ is set when the trainer is built (``trainer.evaluate()`` before ``train()`` scores it) and recorded in
            :attr:`init_record` (saved as ``atm_init.json`` with the model and in every round checkpoint). Resuming
            from a round checkpoint loads the checkpoint's weights over θ⁰ (so ``init_from`` may be left out then; if
            given, it must be of the kind — and for a merge, the config — that the checkpoint records).
        init_experts: ``{name: model, checkpoint folder, Hub id or state dict}``, the fine-tuned models of an
            ``init_from`` merge (required with a merge, rejected without one). They need not be named like the tasks.
        compute_loss_fns: optional ``{task: fn(model, inputs) -> loss or (loss, logits)}``; tasks without one use the
            ``Trainer``'s loss (the model's ``loss`` output). ``fn`` must call ``model`` (it may be the DDP-wrapped
            model) rather than a saved reference. Returning ``(loss, logits)`` makes logits available to
            ``compute_metrics`` during evaluation. Set ``remove_unused_columns=False`` if ``fn`` reads extra columns.
        task_heads: optional ``{task: module}``, one per task: while task t is trained or evaluated, the model's
            submodule at ``head_attribute`` is replaced by task t's head. Heads are task-specific: each is trained on
            its own task only, is not merged, is saved in ``task_heads.safetensors`` next to the model, and the
            model's own module is put back afterwards. Use :meth:`task_context` to run the model with a task's head.
        head_attribute: dotted path of the replaced submodule (default ``"classifier"``).
        **trainer_kwargs: passed to ``transformers.Trainer`` (``data_collator``, ``processing_class``,
            ``compute_metrics``, ``callbacks``, ...). ``train_dataset``/``eval_dataset`` come from ``task_datasets``;
            ``model_init`` and pre-built ``optimizers`` are not accepted (every fine-tune builds a fresh optimizer;
            ``optimizer_cls_and_kwargs`` is fine).

    Example:
        >>> trainer = ATMTrainer(model, TrainingArguments("out", learning_rate=5e-5, save_strategy="epoch"),
        ...                      task_datasets={"sst2": (sst2_train, sst2_val), "mnli": (mnli_train, mnli_val)},
        ...                      atm_config=ATMConfig(rounds=4, epochs_per_round=0.25))
        >>> trainer.train()                       # or trainer.train(resume_from_checkpoint=True)
        >>> trainer.save_model("atm-model")
    """

    def __init__(
        self,
        model: nn.Module,
        args: transformers.TrainingArguments | None = None,
        *,
        task_datasets: Mapping[str, Any],
        atm_config: ATMConfig,
        init_from: Any = None,
        init_experts: Mapping[str, Any] | None = None,
        compute_loss_fns: Mapping[str, LossFn] | None = None,
        task_heads: Mapping[str, nn.Module] | None = None,
        head_attribute: str = "classifier",
        **trainer_kwargs: Any,
    ) -> None:
        for name in ("train_dataset", "eval_dataset"):
            if trainer_kwargs.get(name) is not None:
                raise ValueError(f"ATMTrainer takes its datasets from task_datasets; do not pass {name}.")
            trainer_kwargs.pop(name, None)
        if trainer_kwargs.get("model_init") is not None:
            raise ValueError("ATMTrainer needs a model instance (model_init is not supported).")
        optimizers = trainer_kwargs.get("optimizers", (None, None))
        if any(part is not None for part in optimizers):
            raise ValueError(
                "ATMTrainer builds a fresh optimizer for every (round, task); pass optimizer_cls_and_kwargs "
                "or TrainingArguments.optim instead of optimizers."
            )
        if model is None:
            raise ValueError("ATMTrainer needs a model.")
        if not isinstance(atm_config, ATMConfig):
            raise TypeError(f"atm_config must be an ATMConfig, got {type(atm_config).__name__}.")
        self.atm_config = atm_config
        self.task_datasets = _normalise_task_datasets(task_datasets)
        tasks = list(self.task_datasets)
        self._loss_fns = dict(compute_loss_fns or {})
        unknown = sorted(set(self._loss_fns) - set(tasks))
        if unknown:
            raise ValueError(f"compute_loss_fns names unknown task(s) {unknown}; tasks are {tasks}.")
        for task, fn in self._loss_fns.items():
            if not callable(fn):
                raise TypeError(f"compute_loss_fns[{task!r}] is not callable.")
        self.head_attribute = head_attribute
        self.task_heads: nn.ModuleDict | None = None
        if task_heads is not None:
            if set(task_heads) != set(tasks):
                raise ValueError(
                    f"task_heads must give one head per task: tasks {tasks}, heads for {sorted(task_heads)}."
                )
            _resolve_attribute(model, head_attribute)  # fails early with a clear message
            for task, head in task_heads.items():
                if not isinstance(head, nn.Module):
                    raise TypeError(f"task_heads[{task!r}] must be an nn.Module, got {type(head).__name__}.")
            self.task_heads = nn.ModuleDict({task: task_heads[task] for task in tasks})
        if args is not None and args.load_best_model_at_end:
            raise ValueError("load_best_model_at_end is not supported by ATMTrainer (rounds are merged, not selected).")
        # θ⁰: every argument and (for merged weights) every name and shape is checked before anything is built
        init_merge = _init_merge_config(init_from, init_experts)
        init_weights = None
        if init_from is not None and init_merge is None:
            optional = self.head_attribute + "." if self.task_heads is not None else None
            init_weights = _open_init_weights(init_from, model, optional)

        eval_sets = {task: ev for task, (_, ev) in self.task_datasets.items() if ev is not None}
        super().__init__(
            model=model,
            args=args,
            train_dataset=self.task_datasets[tasks[0]][0],
            eval_dataset=eval_sets or None,
            **trainer_kwargs,
        )
        if self.is_fsdp_enabled:
            _check_fsdp(self.accelerator.state.fsdp_plugin, atm_config, tasks, self.task_heads is not None,
                        saves=self.args.save_strategy != SaveStrategy.NO)
        if self.task_heads is not None:
            self.task_heads.to(self.args.device)
        #: What θ⁰ was made from: ``None`` (the given model), or ``{"init_from": "model" | "checkpoint" |
        #: "state_dict" | "merge", ...}`` with the merge config and its inputs' origins for a merge.
        self.init_record: dict[str, Any] | None = None
        if init_merge is not None:
            self.init_record = _merge_into(self.model, init_experts, init_merge, progress=not self.args.disable_tqdm)
        elif init_weights is not None:
            self.init_record = _load_init_weights(self.model, *init_weights)
        self._current_task: str | None = None
        self._atm_position: tuple[int, int | None] | None = None  # (round, task index) tagged onto logs
        self._in_fine_tune = False
        self._steps_done = 0
        self._history: list[dict[str, Any]] = []
        self._optimizer_states: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------------------------------ task context
    @contextlib.contextmanager
    def task_context(self, task: str) -> Iterator[None]:
        """Within this block the model carries ``task``'s head (if any) and losses use ``task``'s loss function."""
        if task not in self.task_datasets:
            raise KeyError(f"Unknown task {task!r}; tasks are {list(self.task_datasets)}.")
        previous_task = self._current_task
        self._current_task = task
        parent = original = None
        if self.task_heads is not None:
            parent, attribute = _resolve_attribute(self.model, self.head_attribute)
            original = getattr(parent, attribute)
            setattr(parent, attribute, self.task_heads[task])
        try:
            yield
        finally:
            if parent is not None:
                setattr(parent, attribute, original)
            self._current_task = previous_task

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        loss_fn = self._loss_fns.get(self._current_task) if self._current_task is not None else None
        if loss_fn is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, logits = _split_loss(loss_fn(model, inputs), self._current_task)
        return (loss, {"logits": logits}) if return_outputs else loss

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        loss_fn = self._loss_fns.get(self._current_task) if self._current_task is not None else None
        if loss_fn is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get("labels")
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, logits = _split_loss(loss_fn(model, inputs), self._current_task)
        if prediction_loss_only or logits is None:
            return loss.detach().mean(), None, None
        return loss.detach().mean(), logits.detach(), None if labels is None else labels.detach()

    # ------------------------------------------------------------------------------------------ evaluation, logging
    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Without ``eval_dataset``: evaluate every task on its evaluation set with its head and loss, returning
        metrics named ``{metric_key_prefix}_{task}_{metric}``. With ``eval_dataset``: the plain ``Trainer`` evaluation
        (wrap it in :meth:`task_context` to use a task's head and loss)."""
        if eval_dataset is not None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        metrics: dict[str, float] = {}
        for task, (_, task_eval) in self.task_datasets.items():
            if task_eval is None:
                continue
            with self.task_context(task):
                metrics.update(super().evaluate(task_eval, ignore_keys, f"{metric_key_prefix}_{task}"))
        if not metrics:
            raise ValueError("No task has an evaluation dataset: give task_datasets={task: (train, eval)}.")
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """``Trainer.log`` with steps counted across all fine-tunes and the ATM round (and task index) attached."""
        if self._atm_position is not None:
            round_index, task_index = self._atm_position
            logs = {**logs, "atm_round": round_index}
            if task_index is not None:
                logs["atm_task_index"] = task_index
        if not self._in_fine_tune:
            super().log(logs, start_time)
            return
        inner_step = self.state.global_step
        self.state.global_step = inner_step + self._steps_done
        try:
            super().log(logs, start_time)
        finally:
            self.state.global_step = inner_step

    # ------------------------------------------------------------------------------------------ the ATM loop
    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ) -> TrainOutput:
        """Run ``atm_config.rounds`` rounds of tune-then-merge (from the last completed round when resuming).

        Returns a ``TrainOutput`` whose ``global_step`` counts optimizer steps over all fine-tunes and whose
        ``training_loss`` is their step-weighted mean loss (this call only).
        """
        if trial is not None:
            raise ValueError("Hyper-parameter search is not supported by ATMTrainer.")
        if kwargs:
            raise TypeError(f"ATMTrainer.train() got unexpected keyword arguments {sorted(kwargs)}.")
        start_time = time.time()
        user_args = self.args
        tasks = list(self.task_datasets)
        alpha = self.atm_config.scaling_for(len(tasks))
        merger = get_merger(self.atm_config.merge)
        # a merge linear in the task vectors keeps a running sum instead of the T fine-tuned models
        coefficients = merger.linear_coefficients(tasks)

        if self.is_fsdp_enabled:
            self._shard_model()  # θ⁰ and a round checkpoint's weights go into the shards the fine-tunes train
        if resume_from_checkpoint is not None and resume_from_checkpoint is not False:
            first_round = self._load_round_checkpoint(resume_from_checkpoint) + 1
        else:
            first_round = 1
            self._steps_done = 0
            self._history = []
            self._optimizer_states = {}
        self.state = self._outer_state()

        loss_sum, loss_steps = 0.0, 0
        for round_index in range(first_round, self.atm_config.rounds + 1):
            base = {name: tensor.detach().clone() for name, tensor in self._merged_tensors().items()}
            running_sum = None
            # equal coefficients (Task Arithmetic's λ) multiply the sum once, after it is accumulated
            common = coefficients[0] if coefficients and len(set(coefficients)) == 1 else None
            task_states: dict[str, dict[str, torch.Tensor]] = {}
            if coefficients is not None:
                running_sum = {name: torch.zeros_like(t, dtype=accumulation_dtype(t.dtype)) for name, t in base.items()}
            for task_index, task in enumerate(tasks):
                output = self._fine_tune(user_args, round_index, task_index, task, ignore_keys_for_eval)
                loss_sum += output.training_loss * output.global_step
                loss_steps += output.global_step
                # fetched anew after every fine-tune: distributed wrapping may give parameters new storage
                live = self._merged_tensors()
                with torch.no_grad():
                    if running_sum is not None:
                        bad = accumulate_task_vector(running_sum, live, base, coefficients[task_index], common)
                        if self._on_any_rank(bad is not None):
                            where = repr(bad) if bad is not None else "a parameter shard of another rank"
                            raise MergeError(f"ATM round {round_index}, task {task!r}: fine-tuning produced NaN/Inf "
                                             f"in {where} (lower the learning rate?).")
                    else:
                        task_states[task] = {name: tensor.detach().clone() for name, tensor in live.items()}
                    for name, tensor in live.items():
                        tensor.copy_(base[name])
            live = self._merged_tensors()
            with torch.no_grad():
                if running_sum is not None:
                    apply_running_sum(live, base, running_sum, common if common is not None else 1.0, alpha)
                else:
                    merge_round(merger, live, base, task_states, alpha, round_index, self.model)
            del base, live, running_sum, task_states

            self.state = self._outer_state()
            self._atm_position = (round_index, None)
            try:
                if user_args.eval_strategy != IntervalStrategy.NO and any(
                    ev is not None for _, ev in self.task_datasets.values()
                ):
                    self.evaluate(ignore_keys=ignore_keys_for_eval)
                if user_args.save_strategy != SaveStrategy.NO:
                    self._save_round_checkpoint(round_index)
            finally:
                self._atm_position = None

        train_loss = loss_sum / loss_steps if loss_steps else 0.0
        metrics = {
            "train_runtime": round(time.time() - start_time, 4),
            "train_loss": train_loss,
            "atm_rounds": self.atm_config.rounds,
        }
        self.state = self._outer_state()
        self.log(metrics)
        self.is_in_train = False
        return TrainOutput(self._steps_done, train_loss, metrics)

    def _fine_tune(
        self,
        user_args: transformers.TrainingArguments,
        round_index: int,
        task_index: int,
        task: str,
        ignore_keys_for_eval: list[str] | None,
    ) -> TrainOutput:
        """One inner ``Trainer.train()`` of the shared model on ``task`` for the per-round budget."""
        offset = (round_index - 1) * len(self.task_datasets) + task_index
        seed = user_args.seed + offset
        args = copy.copy(user_args)
        args.seed = seed
        if self.atm_config.steps_per_round is not None:
            args.max_steps = self.atm_config.steps_per_round
        else:
            args.max_steps = -1
            args.num_train_epochs = self.atm_config.epochs_per_round
        args.eval_strategy = IntervalStrategy.NO
        args.save_strategy = SaveStrategy.NO
        args.eval_on_start = False
        args.load_best_model_at_end = False
        args.push_to_hub = False
        dataloader_config = getattr(self.accelerator, "dataloader_config", None)
        user_data_seed = getattr(dataloader_config, "data_seed", None)

        self.args = args
        self.train_dataset = self.task_datasets[task][0]
        self.optimizer, self.lr_scheduler = None, None
        self.model_wrapped = self.model  # re-wrap (DDP) every fine-tune: the head may have changed
        if user_data_seed is not None:
            dataloader_config.data_seed = user_args.data_seed + offset
        self._atm_position = (round_index, task_index)
        self._in_fine_tune = True
        try:
            with self.task_context(task):
                enable_full_determinism(seed) if args.full_determinism else set_seed(seed)
                output = super().train(ignore_keys_for_eval=ignore_keys_for_eval)
                if not self.atm_config.reset_optimizer:
                    self._optimizer_states[task] = copy.deepcopy(self.optimizer.state_dict()["state"])
        finally:
            self._in_fine_tune = False
            self._atm_position = None
            self.args = user_args
            if user_data_seed is not None:
                dataloader_config.data_seed = user_data_seed
        self._steps_done += output.global_step
        self._history.extend(self.state.log_history)
        return output

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The ``Trainer``'s optimizer; with ``reset_optimizer=False`` the task's moments from its previous round."""
        optimizer = super().create_optimizer(model)
        saved = self._optimizer_states.get(self._current_task) if self._current_task is not None else None
        if saved is not None and not self.atm_config.reset_optimizer:
            state = optimizer.state_dict()
            state["state"] = copy.deepcopy(saved)
            optimizer.load_state_dict(state)
        return optimizer

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False, *,
                   license: str | None = None, tags: Any = None, base_model: Any = None) -> None:
        """``Trainer.save_model`` (plus the task heads and ``atm_config.json``), ``merge_config.json`` (the merge
        step of every round, a :class:`~hf_merge.MergeConfig`), ``atm_init.json`` (what θ⁰ was made from, when
        ``init_from`` was given: :attr:`init_record`) and a model card (``README.md``) naming the starting model, the
        tasks, the ATM schedule and the merge config. ``license`` (a Hub license id), ``tags`` and
        ``base_model`` (``{"base": "org/name"}``: the starting model's Hub id when it was loaded from a local folder)
        set the card's metadata; they are checked before anything is written."""
        from ..hub.provenance import CardMetadata

        card = CardMetadata(license=license, tags=tags, base_model=base_model)
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        config = getattr(model, "config", None)
        origin = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None) or None
        inputs = {"base": str(origin) if origin else None, "models": {}}
        card = card.for_inputs(inputs)  # a base_model key naming no input fails here
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        from ..hub.cards import write_card

        self.atm_config.merge.save_pretrained(output_dir)
        if self.init_record is not None:
            with open(os.path.join(output_dir, INIT_RECORD_NAME), "w", encoding="utf-8") as fh:
                json.dump(self.init_record, fh, indent=2)
        write_card(output_dir, self.atm_config.merge, inputs, artifact="atm", atm_config=self.atm_config,
                   atm_tasks=list(self.task_datasets), license=card.license, tags=list(card.tags),
                   base_model=dict(card.base_model))

    def _load_round_checkpoint(self, checkpoint: str | bool) -> int:
        """Check that the checkpoint started from the θ⁰ this trainer was given (if it was given one), restore it
        (:class:`RoundCheckpoints`), and adopt its record of θ⁰."""
        folder = get_last_checkpoint(self.args.output_dir) if checkpoint is True else checkpoint
        saved = None
        if folder is not None and os.path.isfile(os.path.join(folder, INIT_RECORD_NAME)):
            saved = load_json(os.path.join(folder, INIT_RECORD_NAME))
        if self.init_record is not None and _init_identity(saved) != _init_identity(self.init_record):
            raise ValueError(
                f"Checkpoint {os.fspath(folder)!r} started from {_init_identity(saved)}, but this trainer's init_from "
                f"is {_init_identity(self.init_record)}; resume without init_from (the checkpoint's weights are "
                "loaded over θ⁰ anyway) or with the one the run started from."
            )
        completed = super()._load_round_checkpoint(checkpoint)
        self.init_record = saved  # what this run's θ⁰ was (equal to ours, when we were given one)
        return completed

    def _merged_tensors(self) -> dict[str, torch.Tensor]:
        """The live tensors ATM merges: trainable parameters and floating-point buffers of the shared model (tied
        parameters once; task heads and frozen parameters excluded, as they do not change). Under FSDP: this rank's
        shards of the parameters (the merge is elementwise), with every module resharded first."""
        head_prefix = self.head_attribute + "." if self.task_heads is not None else None
        sharded = self.is_fsdp_enabled
        if sharded:
            self._shard_model()
        tensors: dict[str, torch.Tensor] = {}
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                tensors[name] = _local_shard(param.data) if sharded else param.data
        for name, buffer in self.model.named_buffers():
            if buffer.is_floating_point():
                tensors[name] = buffer.data
        if head_prefix is not None:
            tensors = {name: t for name, t in tensors.items() if not name.startswith(head_prefix)}
        if not tensors:
            raise ValueError("The model has no trainable floating-point parameters for ATM to merge.")
        return tensors

    def _shard_model(self) -> None:
        """Under FSDP: shard the model as the ``Trainer``'s evaluation does (``accelerator.prepare``, which leaves a
        sharded model as it is when the fine-tunes prepare it again), and reshard the modules a forward (evaluation)
        left unsharded, so that the parameters are this rank's shards."""
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(self.model, FSDPModule):
            self.model = self.model_wrapped = self.accelerator.prepare(self.model)
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def _on_any_rank(self, flag: bool) -> bool:
        """``flag`` on this rank or, under FSDP (where ranks hold different shards), on any rank."""
        if not self.is_fsdp_enabled:
            return flag
        value = torch.tensor([int(flag)], device=self.args.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def _outer_state(self) -> TrainerState:
        """The state callbacks see between fine-tunes: steps over all fine-tunes, the whole log history."""
        state = TrainerState()
        state.global_step = self._steps_done
        state.epoch = None  # epochs are per (round, task) fine-tune; rounds are logged as atm_round
        state.log_history = self._history
        state.is_local_process_zero = self.is_local_process_zero()
        state.is_world_process_zero = self.is_world_process_zero()
        return state


# ---------------------------------------------------------------------------------------------- helpers
def _check_fsdp(plugin: Any, atm_config: ATMConfig, tasks: list[str], has_task_heads: bool, *, saves: bool) -> None:
    """Under FSDP every rank merges its own shards of the parameters in place: that needs FSDP2, a merge linear in
    the task vectors and no task heads; saving needs full state dicts, and round checkpoints no optimizer moments
    (rank 0 writes them, and it holds its shards' moments only)."""
    if getattr(plugin, "fsdp_version", 1) != 2:
        raise ValueError("ATMTrainer under FSDP needs FSDP2 (fsdp_config={'version': 2}, transformers' default): it "
                         "merges the DTensor shards of fully_shard in place; FSDP1's flat parameters are not supported.")
    method = atm_config.merge.method
    if get_merger(atm_config.merge).linear_coefficients(tasks) is None:
        raise ValueError(
            f"merge={method!r} needs whole tensors, but under FSDP ATMTrainer merges each rank's parameter shards in "
            "place, which only a merge linear in the task vectors allows (task_arithmetic, average); use one of "
            f"those under FSDP, or {method!r} under DDP."
        )
    if has_task_heads:
        raise ValueError("task_heads are not supported under FSDP: a head swapped into the sharded model would not be "
                         "sharded (nor its gradients reduced) with it; train with DDP, or give each task its own "
                         "compute_loss_fns on one shared head.")
    if "FULL_STATE_DICT" not in str(plugin.state_dict_type):
        raise ValueError(f"ATMTrainer under FSDP saves round checkpoints and the model with Trainer.save_model, which "
                         f"writes weights for fsdp_config state_dict_type='FULL_STATE_DICT' only, not "
                         f"{plugin.state_dict_type!r}.")
    if saves and not atm_config.reset_optimizer:
        raise ValueError("reset_optimizer=False saves each task's optimizer moments in the round checkpoints, which "
                         "under FSDP would hold rank 0's shards only: use reset_optimizer=True (ATM's default) or "
                         "save_strategy='no' under FSDP.")


def _local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 parameter (a ``DTensor``; it shares the parameter's storage), or the tensor
    itself when it is not sharded."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _normalise_task_datasets(task_datasets: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    if not isinstance(task_datasets, Mapping) or not task_datasets:
        raise ValueError("task_datasets must be a non-empty {task: train_dataset or (train, eval)} mapping.")
    out: dict[str, tuple[Any, Any]] = {}
    for task, value in task_datasets.items():
        if not isinstance(task, str) or not task:
            raise TypeError(f"Task names must be non-empty strings, got {task!r}.")
        train, evaluation = value if isinstance(value, tuple) else (value, None)
        if isinstance(value, tuple) and len(value) != 2:
            raise ValueError(f"task_datasets[{task!r}] must be a dataset or a (train, eval) pair.")
        if train is None:
            raise ValueError(f"task_datasets[{task!r}] has no training dataset.")
        out[task] = (train, evaluation)
    return out


def _resolve_attribute(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the submodule at dotted ``path``."""
    parent_path, _, attribute = path.rpartition(".")
    try:
        parent = model.get_submodule(parent_path)
        parent.get_submodule(attribute)
    except AttributeError as error:
        raise ValueError(f"head_attribute={path!r}: the model has no submodule at that path ({error}).") from None
    return parent, attribute


def _split_loss(result: Any, task: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    loss, logits = result if isinstance(result, tuple) else (result, None)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"compute_loss_fns[{task!r}] must return a scalar loss tensor (or (loss, logits)).")
    return loss, logits


# ---------------------------------------------------------------------------------------------- θ⁰ (init_from)
_MERGE_RECORD_ATTRIBUTES = ("merge_config", "merge_inputs", "merge_card", "save_pretrained", "push_to_hub")


def _init_merge_config(init_from: Any, init_experts: Mapping[str, Any] | None) -> MergeConfig | None:
    """The merge config ``init_from`` names (``None`` for merged weights or no ``init_from``), with the
    ``init_experts`` pairing and the types checked."""
    from ..registry import make_config

    if isinstance(init_from, MergeConfig):
        config = init_from
    elif isinstance(init_from, Mapping) and isinstance(init_from.get("method"), str):
        config = MergeConfig.from_dict(init_from)
    elif isinstance(init_from, str) and not os.path.exists(init_from):
        try:
            config = make_config(init_from)
        except ValueError as error:
            raise ValueError(f"init_from={init_from!r} is neither an existing checkpoint folder nor a merge method: "
                             f"{error}") from None
        except TypeError as error:  # a method with required fields
            raise TypeError(f"init_from={init_from!r}: {error}; give the method's fields in a config dict "
                            f"({{'method': {init_from!r}, ...}}) or a MergeConfig.") from None
    elif init_from is None or isinstance(init_from, (nn.Module, Mapping, str, os.PathLike)):
        config = None
    else:
        raise TypeError(
            "init_from must be a model, a state dict or a checkpoint folder (merged weights), or a MergeConfig, "
            f"a merge method name or a merge config dict (a merge of init_experts), got {type(init_from).__name__}."
        )
    if config is None and init_experts is not None:
        given = ("missing" if init_from is None else "a model" if isinstance(init_from, nn.Module)
                 else "a state dict" if isinstance(init_from, Mapping) else "a checkpoint folder")
        raise ValueError(
            "init_experts are merged by the merge config given as init_from (e.g. init_from=hf_merge.TSVMergeConfig()"
            f" or 'tsv_m'); init_from is {given} (merged weights, nothing to merge)."
        )
    if config is not None:
        if init_experts is None:
            raise ValueError(f"init_from={config.method!r} merges init_experts into the model (its base): give "
                             "init_experts={name: fine-tuned model or checkpoint folder}.")
        if not isinstance(init_experts, Mapping) or not init_experts:
            raise TypeError("init_experts must be a non-empty {name: model, checkpoint folder or state dict} mapping, "
                            f"got {type(init_experts).__name__}.")
    return config


def _open_init_weights(init_from: Any, model: nn.Module, optional_prefix: str | None) -> tuple[Any, ...]:
    """``(source, [(model tensor, source key, its TensorMeta in the model)], kind, in_memory_names)`` for merged
    weights, after checking that they
    hold exactly the model's tensors with the model's shapes (keys under ``optional_prefix`` may be missing).

    Names are matched as checkpoints store them (``save_pretrained``'s names, tied copies once; what a model, a folder
    and most state dicts give), or — for a state dict with every one of them — as ``model.state_dict()`` names them
    (which differ where transformers converts weights on loading, e.g. Mixtral's fused experts)."""
    from ..io.sources import ModelSource, TensorMeta, open_source

    kind = "model" if isinstance(init_from, nn.Module) else "state_dict" if isinstance(init_from, Mapping) else "checkpoint"
    if kind == "checkpoint" and not os.path.isdir(init_from) and not os.fspath(init_from).endswith(".safetensors"):
        raise FileNotFoundError(f"init_from={os.fspath(init_from)!r} is not a checkpoint folder.")
    source = open_source(init_from, "init_from")
    own = model.state_dict()
    in_memory = kind == "state_dict" and all(
        name in init_from for name in own if optional_prefix is None or not name.startswith(optional_prefix))
    target = None if in_memory else ModelSource(model, "the model")
    expected = {name: TensorMeta(tuple(t.shape), t.dtype) for name, t in own.items()} if in_memory else {
        key: target.meta(key) for key in target.keys()}
    pairs: list[tuple[str, str, Any]] = []
    problems: list[str] = []
    used: set[str] = set()
    for key, meta in expected.items():
        shape = tuple(meta.shape)
        name = key if in_memory else target.memory_names.get(key, key)
        found = next((k for k in (key, name) if source.has(k)), None)
        if found is None:
            if optional_prefix is None or not name.startswith(optional_prefix):
                problems.append(f"{key!r} (shape {shape}) is missing")
            continue
        used.add(source.resolve(found))
        given = tuple(source.meta(found).shape)
        if given != shape:
            problems.append(f"{key!r} has shape {given}, the model's is {shape}")
            continue
        pairs.append((key, found, meta))
    tied = set() if in_memory else set(target.aliases)  # the model's tied copies, which the source may store too
    problems += [f"{key!r} (shape {tuple(source.meta(key).shape)}) is not a tensor of the model"
                 for key in source.keys() if key not in used and key not in tied]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise ValueError(f"init_from ({source.label}) does not match the model ({type(model).__name__}): {shown}.")
    return source, pairs, kind, in_memory


@torch.no_grad()
def _load_init_weights(model: nn.Module, source: Any, pairs: list[tuple[str, str, Any]], kind: str,
                       in_memory: bool) -> dict[str, Any]:
    """Copy the checked tensors into ``model`` one at a time, in the model's dtypes (checkpoint names are placed as
    a merge's output is: :class:`~hf_merge.io.sinks.ModelSink`, transformers' weight conversions included); the
    record of where they came from."""
    from ..io.sinks import ModelSink

    if in_memory:
        state = model.state_dict(keep_vars=True)
        for name, key, _ in pairs:
            state[name].copy_(source.get(key))
    else:
        sink = ModelSink(model)
        found = {key: (source_key, meta) for key, source_key, meta in pairs}
        for key in sink.begin({key: meta for key, (_, meta) in found.items()}, {}, 0):
            source_key, meta = found[key]
            sink.put(key, source.get(source_key).to(meta.dtype))
    record: dict[str, Any] = {"init_from": kind}
    if kind == "model":
        record["model_class"] = type(source.model).__name__
    if source.origin is not None:
        record["origin"] = _origin_name(source.origin)
    return record


def _merge_into(model: nn.Module, experts: Mapping[str, Any], config: MergeConfig, *, progress: bool
                ) -> dict[str, Any]:
    """θ⁰ = ``hf_merge.merge(model, experts, config)``, written into ``model`` (which keeps its own methods: the
    merge's record — config, inputs by Hub id or folder name, Hub commits — is returned instead of being attached to
    it)."""
    from ..api import merge

    kept = {name: model.__dict__[name] for name in _MERGE_RECORD_ATTRIBUTES if name in model.__dict__}
    try:
        merge(model, dict(experts), config, into=model, progress=progress)
        inputs = dict(getattr(model, "merge_inputs", None) or {})
    except Exception as error:
        if hasattr(error, "add_note"):
            error.add_note(f"(while merging init_experts into the model with init_from={config.method!r})")
        raise
    finally:
        for name in _MERGE_RECORD_ATTRIBUTES:
            model.__dict__.pop(name, None)
        model.__dict__.update(kept)
    record = {"init_from": "merge", "merge_config": config.to_dict(), "base": _origin_name(inputs.get("base")),
              "experts": {name: _origin_name(origin) for name, origin in dict(inputs.get("models") or {}).items()}}
    return {**record, **({"hub": inputs["hub"]} if inputs.get("hub") else {})}


def _origin_name(origin: Any) -> str | None:
    """A Hub id, a local folder's name (local paths are not recorded, as in ``merge_config.json``) or ``None``."""
    from ..hub.provenance import describe_origin

    return describe_origin(origin)[0]


def _init_identity(record: Mapping[str, Any] | None) -> str:
    """What a resumed run must agree on: the kind of θ⁰ and, for a merge, its config (paths may move)."""
    if record is None:
        return "the model given to the trainer"
    if record.get("init_from") == "merge":
        return f"a merge with {json.dumps(record.get('merge_config'), sort_keys=True)}"
    return f"{record.get('init_from')} weights"
