"""ATM on a tiny BERT with two synthetic tasks, single-process or under DDP (CPU, gloo); used by tests/test_atm.py.

Run directly for one process, or with two CPU processes:

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no tests/atm_ddp_script.py --per-device-batch-size 4 --expect-world-size 2 --result out.safetensors

(``TrainingArguments(use_cpu=True)`` makes Accelerate pick the MULTI_CPU/gloo backend for the torchrun-launched
processes.) Rank 0 writes the final parameters to ``--result``; the global batch is
``per_device_batch_size × world_size``, so ``--per-device-batch-size 8`` on one process sees the same batches as
``--per-device-batch-size 4`` on two.
"""

from __future__ import annotations

import argparse
import os

import torch


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-device-batch-size", type=int, required=True)
    parser.add_argument("--expect-world-size", type=int, required=True)
    parser.add_argument("--result", required=True, help="safetensors file for the final parameters (rank 0)")
    parser.add_argument("--output-dir", default=None, help="checkpoints (default: next to --result)")
    cli = parser.parse_args()

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
        use_cpu=True,
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
    )
    trainer = ATMTrainer(
        model, args, task_datasets=tasks, atm_config=ATMConfig(rounds=2, steps_per_round=2)
    )
    if trainer.args.world_size != cli.expect_world_size:
        raise SystemExit(f"expected {cli.expect_world_size} processes, running on {trainer.args.world_size}")
    trainer.train()
    evaluations = [entry for entry in trainer.state.log_history if "eval_task_1_loss" in entry]
    if [entry["atm_round"] for entry in evaluations] != [1, 2]:
        raise SystemExit(f"expected one evaluation per round, got {evaluations}")
    if trainer.args.process_index == 0:
        state = {name: p.detach().cpu().contiguous() for name, p in trainer.model.named_parameters()}
        save_file(state, cli.result)
    print(f"rank {trainer.args.process_index}/{trainer.args.world_size} done, {trainer.state.global_step} steps")


if __name__ == "__main__":
    main()
