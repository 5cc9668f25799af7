"""ATM on a tiny BERT with two synthetic tasks, single-process or under DDP or FSDP (CPU, gloo); used by
tests/test_atm.py and tests/test_atm_fsdp.py.

Run directly for one process, or with two CPU processes:

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no tests/atm_ddp_script.py --per-device-batch-size 4 --expect-world-size 2 --result out.safetensors

(``TrainingArguments(use_cpu=True)`` makes Accelerate pick the MULTI_CPU/gloo backend for the torchrun-launched
processes; ``--cuda`` gives each process a GPU instead.) ``--fsdp`` shards the model with FSDP2 through Accelerate's
FSDP plugin (``TrainingArguments(fsdp=True, fsdp_config={"version": 2, ...})``) and takes the result from the full
state dict that ``trainer.save_model`` writes. Rank 0 writes the final parameters to ``--result``; the global batch is
``per_device_batch_size × world_size``, so ``--per-device-batch-size 8`` on one process sees the same batches as
``--per-device-batch-size 4`` on two.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from hf_merge.training import ATMTrainer


class TokenClassificationTask(torch.utils.data.Dataset):
    """Random token sequences with a label that is a deterministic function of the tokens (learnable)."""

    def __init__(self, seed: int, size: int, num_labels: int = 3, length: int = 6, vocab: int = 64) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(0, vocab, (size, length), generator=generator)
        self.labels = (self.input_ids[:, 0] + seed) % num_labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


def enable_fsdp_on_cpu() -> None:
    """Let Accelerate run its FSDP plugin on CPU processes (gloo).

    Accelerate (1.16) switches to FSDP only for accelerator distributed types (MULTI_GPU, MULTI_XPU, ...): with
    ``use_cpu=True`` it keeps MULTI_CPU and silently trains with DDP instead. torch's FSDP2 (``fully_shard``) runs on
    gloo (FSDP1 refuses: "FSDP needs a non-CPU accelerator device"), so this marks the state FSDP whenever a
    plugin was given; everything else (sharding, optimizer, full state dicts) is Accelerate's and transformers' code.
    """
    from accelerate.state import AcceleratorState, DistributedType

    original = AcceleratorState.__init__

    def __init__(self: AcceleratorState, *args: object, fsdp_plugin: object = None, **kwargs: object) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None:
            self.fsdp_plugin = fsdp_plugin
        # a later AcceleratorState() copies PartialState's MULTI_CPU over the shared state again
        if self.distributed_type == DistributedType.MULTI_CPU and getattr(self, "fsdp_plugin", None) is not None:
            self.distributed_type = DistributedType.FSDP

    AcceleratorState.__init__ = __init__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-device-batch-size", type=int, required=True)
    parser.add_argument("--expect-world-size", type=int, required=True)
    parser.add_argument("--result", required=True, help="safetensors file for the final parameters (rank 0)")
    parser.add_argument("--output-dir", default=None, help="checkpoints (default: next to --result)")
    parser.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (Accelerate's FSDP plugin)")
    parser.add_argument("--cuda", action="store_true", help="one GPU per process (default: CPU processes, gloo)")
    parser.add_argument("--resume-from", default=None, help="a round checkpoint to continue from")
    cli = parser.parse_args()
    if cli.fsdp and not cli.cuda:
        enable_fsdp_on_cpu()

    from safetensors.torch import save_file
    from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

    from hf_merge.training import ATMConfig, ATMTrainer

    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                   max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0)
    )
    tasks = {
        f"task_{i}": (TokenClassificationTask(seed=i, size=16), TokenClassificationTask(seed=100 + i, size=8))
        for i in range(2)
    }
    args = TrainingArguments(
        output_dir=cli.output_dir or os.path.splitext(cli.result)[0] + "_checkpoints",
        use_cpu=not cli.cuda,
        per_device_train_batch_size=cli.per_device_batch_size,
        per_device_eval_batch_size=4,
        learning_rate=1e-2,
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=7,
        # BERT's classification loss is a per-batch mean that ignores num_items_in_batch; token averaging across
        # devices would multiply it by the world size (a transformers behaviour for any Trainer, not ATM's).
        average_tokens_across_devices=False,
        **({"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"],
                                           "state_dict_type": "FULL_STATE_DICT"}} if cli.fsdp else {}),
    )
    trainer = ATMTrainer(
        model, args, task_datasets=tasks, atm_config=ATMConfig(rounds=2, steps_per_round=2)
    )
    if trainer.args.world_size != cli.expect_world_size:
        raise SystemExit(f"expected {cli.expect_world_size} processes, running on {trainer.args.world_size}")
    trainer.train(resume_from_checkpoint=cli.resume_from)
    evaluations = [entry for entry in trainer.state.log_history if "eval_task_1_loss" in entry]
    if [entry["atm_round"] for entry in evaluations] != [1, 2]:
        raise SystemExit(f"expected one evaluation per round, got {evaluations}")
    model = trainer.model
    if cli.fsdp:
        check_sharded(trainer)
        final = os.path.splitext(cli.result)[0] + "_model"
        trainer.save_model(final)  # the full state dict, written by rank 0
        trainer.accelerator.wait_for_everyone()
        model = BertForSequenceClassification.from_pretrained(final)
    if trainer.args.process_index == 0:
        state = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters()}
        save_file(state, cli.result)
    print(f"rank {trainer.args.process_index}/{trainer.args.world_size} done, {trainer.state.global_step} steps")


def check_sharded(trainer: ATMTrainer) -> None:
    """The parameters were trained and merged as FSDP2 shards: DTensors, of which ATM's merge sees this rank's part."""
    from torch.distributed.tensor import DTensor

    if not trainer.is_fsdp_enabled:
        raise SystemExit(f"FSDP is not enabled (distributed type {trainer.accelerator.distributed_type})")
    merged = trainer._merged_tensors()  # reshards the root module, which the last evaluation left unsharded
    params = dict(trainer.model.named_parameters())
    if not all(isinstance(p, DTensor) for p in params.values()):
        raise SystemExit("expected FSDP2 DTensor parameters")
    local, full = sum(t.numel() for t in merged.values()), sum(params[name].numel() for name in merged)
    if trainer.args.world_size > 1 and not local < full:
        raise SystemExit(f"the merge sees {local} of {full} elements on one rank, not a shard")
    print(f"rank {trainer.args.process_index}: merge over {local} of {full} elements (its shards)")


if __name__ == "__main__":
    main()
