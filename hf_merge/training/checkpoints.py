"""ATM's round checkpoints: ``checkpoint-<round>`` folders that ``ATMTrainer.train(resume_from_checkpoint=...)``
continues from, to the same result as an uninterrupted run.

A round checkpoint holds what ``Trainer.save_model`` writes, ``atm_config.json``, the task heads
(``task_heads.safetensors``), the trainer state, the tasks' optimizer moments when they are kept across rounds, and
``atm_state.json`` — written last, so its presence marks a complete checkpoint. Under FSDP the model is written from
the full state dict (rank 0) and read back into each rank's shards.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from ..config import load_json

ATM_STATE_NAME = "atm_state.json"
TASK_HEADS_NAME = "task_heads.safetensors"
OPTIMIZER_STATES_NAME = "atm_optimizer_states.pt"
_HEAD_KEY_SEPARATOR = "@"  # "<parameter name>@<task>": parameter names never contain "@"


class RoundCheckpoints:
    """Saving and resuming of :class:`~hf_merge.training.atm.ATMTrainer` (mixed in before ``transformers.Trainer``;
    it reads the trainer's ``args``, ``atm_config``, ``task_datasets``, ``task_heads`` and round bookkeeping)."""

    args: Any
    atm_config: Any
    is_fsdp_enabled: bool
    model: torch.nn.Module
    task_datasets: dict[str, Any]
    task_heads: dict[str, torch.nn.Module] | None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model`` plus ``task_heads.safetensors`` (with task heads) and ``atm_config.json``."""
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        self.atm_config.save_pretrained(output_dir)
        if self.task_heads is not None:
            from safetensors.torch import save_file

            tensors = {
                f"{name}{_HEAD_KEY_SEPARATOR}{task}": tensor.detach().cpu().contiguous()
                for task, head in self.task_heads.items()
                for name, tensor in head.state_dict().items()
            }
            save_file(tensors, os.path.join(output_dir, TASK_HEADS_NAME), metadata={"format": "pt"})

    def _save_round_checkpoint(self, round_index: int) -> None:
        folder = os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{round_index}")
        self.save_model(folder, _internal_call=True)
        if self.args.should_save:
            if not self.atm_config.reset_optimizer:
                torch.save(self._optimizer_states, os.path.join(folder, OPTIMIZER_STATES_NAME))
            self.state.save_to_json(os.path.join(folder, "trainer_state.json"))
            record = {
                "completed_rounds": round_index,
                "global_step": self._steps_done,
                "tasks": list(self.task_datasets),
                "atm_config": self.atm_config.to_dict(),
            }
            with open(os.path.join(folder, ATM_STATE_NAME), "w", encoding="utf-8") as fh:  # written last: complete
                json.dump(record, fh, indent=2)
            self._rotate_round_checkpoints()
        self.accelerator.wait_for_everyone()
        self.control = self.callback_handler.on_save(self.args, self.state, self.control)

    def _rotate_round_checkpoints(self) -> None:
        limit = self.args.save_total_limit
        if not limit or limit <= 0:
            return
        prefix = f"{PREFIX_CHECKPOINT_DIR}-"
        rounds = sorted(
            int(entry.name[len(prefix):])
            for entry in os.scandir(self.args.output_dir)
            if entry.is_dir() and entry.name.startswith(prefix) and entry.name[len(prefix):].isdigit()
        )
        for round_index in rounds[:-limit]:
            shutil.rmtree(os.path.join(self.args.output_dir, f"{prefix}{round_index}"), ignore_errors=True)

    def _load_round_checkpoint(self, checkpoint: str | bool) -> int:
        """Restore the model, heads, optimizer moments and log history of a round checkpoint; return its round."""
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
            if checkpoint is None:
                raise ValueError(f"No checkpoint-<round> folder found in output_dir {self.args.output_dir!r}.")
        checkpoint = os.fspath(checkpoint)
        record_path = os.path.join(checkpoint, ATM_STATE_NAME)
        if not os.path.isfile(record_path):
            raise FileNotFoundError(
                f"{checkpoint!r} is not a complete ATM round checkpoint (no {ATM_STATE_NAME}); "
                "resume from a folder written by ATMTrainer."
            )
        record = load_json(record_path)
        tasks = list(self.task_datasets)
        if record["tasks"] != tasks:
            raise ValueError(f"Checkpoint {checkpoint!r} was trained on tasks {record['tasks']}, this trainer has {tasks}.")
        saved_config = {k: v for k, v in record["atm_config"].items() if k != "rounds"}
        ours = {k: v for k, v in self.atm_config.to_dict().items() if k != "rounds"}
        if saved_config != ours:
            raise ValueError(
                f"Checkpoint {checkpoint!r} used ATM settings {saved_config}, which differ from {ours} "
                "(only rounds may change on resume)."
            )
        completed = int(record["completed_rounds"])
        if completed > self.atm_config.rounds:
            raise ValueError(
                f"Checkpoint {checkpoint!r} has {completed} completed rounds, more than rounds={self.atm_config.rounds}."
            )
        if self.is_fsdp_enabled:
            self._load_into_shards(checkpoint)
        else:
            self._load_from_checkpoint(checkpoint)
        if self.task_heads is not None:
            self._load_task_heads(os.path.join(checkpoint, TASK_HEADS_NAME))
        self._optimizer_states = {}
        if not self.atm_config.reset_optimizer:
            states_path = os.path.join(checkpoint, OPTIMIZER_STATES_NAME)
            if os.path.isfile(states_path):
                self._optimizer_states = torch.load(states_path, map_location=self.args.device, weights_only=True)
        self._steps_done = int(record["global_step"])
        self._history = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json")).log_history
        return completed

    def _load_into_shards(self, checkpoint: str) -> None:
        """Under FSDP: copy the checkpoint's full weights (``save_model``'s safetensors, written from the full state
        dict) into this rank's shards of the model, one tensor at a time (``Trainer._load_from_checkpoint`` reads
        Accelerate's own FSDP checkpoint files instead)."""
        from safetensors import safe_open
        from torch.distributed.tensor import DTensor, distribute_tensor

        index = os.path.join(checkpoint, SAFE_WEIGHTS_INDEX_NAME)
        files = sorted(set(load_json(index)["weight_map"].values())) if os.path.isfile(index) else [SAFE_WEIGHTS_NAME]
        targets = self.model.state_dict(keep_vars=True)
        loaded: set[int] = set()
        for file in files:
            with safe_open(os.path.join(checkpoint, file), "pt") as reader, torch.no_grad():
                for key in reader.keys():  # the same order on every rank; no collective
                    target = targets.get(key)
                    if target is None:
                        raise ValueError(f"Checkpoint {checkpoint!r} holds {key!r}, which the model does not have.")
                    full = reader.get_tensor(key).to(target.dtype)
                    if isinstance(target, DTensor):
                        shard = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
                        target.to_local().copy_(shard.to_local())
                    else:
                        target.copy_(full)
                    loaded.add(id(target))
        missing = [name for name, target in targets.items() if id(target) not in loaded]  # tied copies count once
        if missing:
            raise ValueError(f"Checkpoint {checkpoint!r} lacks the model's {missing[:6]}.")

    def _load_task_heads(self, path: str) -> None:
        from safetensors.torch import load_file

        if not os.path.isfile(path):
            raise FileNotFoundError(f"The checkpoint has no {TASK_HEADS_NAME} at {path!r}, but this trainer has task heads.")
        per_task: dict[str, dict[str, torch.Tensor]] = {task: {} for task in self.task_heads}
        for key, tensor in load_file(path, device=str(self.args.device)).items():
            name, _, task = key.partition(_HEAD_KEY_SEPARATOR)
            if task not in per_task:
                raise ValueError(f"{path!r} holds a head for unknown task {task!r}; tasks are {list(per_task)}.")
            per_task[task][name] = tensor
        for task, head in self.task_heads.items():
            head.load_state_dict(per_task[task])
