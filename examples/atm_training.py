"""Alternating Tuning and Merging (ATM) on a tiny BERT with three synthetic classification tasks, offline, on CPU.

Each task labels random token sequences by a different rule on the first token, so the tasks compete for the same
features. ATM alternates: fine-tune the current model on every
task for a short budget, merge the task vectors (Task Arithmetic, α = 1/T), repeat. The script compares the merged
model of a one-shot Task Arithmetic merge (each task fine-tuned once for the whole budget from θ₀) with ATM at the same
total number of steps, then writes the ATM model with ``save_model``.

    python examples/atm_training.py --output-dir /tmp/atm-example

Runs in well under a minute on two CPU cores. Resume an interrupted run with ``--resume``.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


RULES = {
    "mod3": lambda token: token % 3,
    "range": lambda token: token // 16,
    "block": lambda token: (token // 4) % 3,
}


class RuleTask(torch.utils.data.Dataset):
    """Sequences of 8 random tokens out of 48; the label (one of 3) is ``rule(first token)``."""

    def __init__(self, rule: str, size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(0, 48, (size, 8), generator=generator)
        self.labels = RULES[rule](self.input_ids[:, 0])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


def tiny_bert() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(
        BertConfig(vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   max_position_embeddings=16, num_labels=3)
    )


def accuracy(model: torch.nn.Module, task: RuleTask) -> float:
    model.eval()
    with torch.no_grad():
        predictions = model(input_ids=task.input_ids).logits.argmax(-1)
    return (predictions == task.labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="atm-example")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps-per-round", type=int, default=10)
    parser.add_argument("--resume", action="store_true", help="continue from the last round checkpoint")
    cli = parser.parse_args()

    import transformers
    from transformers import Trainer, TrainingArguments

    import hf_merge
    from hf_merge.training import ATMConfig, ATMTrainer

    transformers.utils.logging.disable_progress_bar()
    tasks = {
        rule: (RuleTask(rule, 256, seed=index), RuleTask(rule, 128, seed=100 + index))
        for index, rule in enumerate(RULES)
    }
    base = tiny_bert()

    def arguments(output_dir: str, **overrides) -> TrainingArguments:
        settings = {
            "output_dir": output_dir, "use_cpu": True, "per_device_train_batch_size": 32,
            "per_device_eval_batch_size": 128, "learning_rate": 3e-3, "warmup_steps": 0, "report_to": "none",
            "logging_strategy": "no", "save_strategy": "no", "disable_tqdm": True, "seed": 0,
        }
        settings.update(overrides)
        return TrainingArguments(**settings)

    # Baseline: fine-tune θ₀ on each task for the whole budget, then one Task Arithmetic merge with λ = 1/T.
    total_steps = cli.rounds * cli.steps_per_round
    fine_tuned = {}
    for name, (train, _) in tasks.items():
        model = copy.deepcopy(base)
        Trainer(model, arguments(os.path.join(cli.output_dir, "baseline", name), max_steps=total_steps),
                train_dataset=train).train()
        fine_tuned[name] = model
    task_arithmetic = hf_merge.merge(base, fine_tuned, hf_merge.TaskArithmeticConfig(scaling=1 / len(tasks)),
                                     progress=False)

    # ATM: the same number of steps per task, split into rounds with a merge after each.
    trainer = ATMTrainer(
        copy.deepcopy(base),
        arguments(cli.output_dir, eval_strategy="epoch", save_strategy="epoch", save_total_limit=2),
        task_datasets=tasks,
        atm_config=ATMConfig(rounds=cli.rounds, steps_per_round=cli.steps_per_round),  # α = 1/T
    )
    trainer.train(resume_from_checkpoint=True if cli.resume else None)
    trainer.save_model(os.path.join(cli.output_dir, "final"))

    print(f"{'task':<8} {'fine-tuned':>10} {'TA merge':>9} {'ATM':>6}")
    for name, (_, evaluation) in tasks.items():
        print(f"{name:<8} {accuracy(fine_tuned[name], evaluation):>10.3f} "
              f"{accuracy(task_arithmetic, evaluation):>9.3f} {accuracy(trainer.model, evaluation):>6.3f}")
    for name in tasks:
        per_round = [e[f"eval_{name}_loss"] for e in trainer.state.log_history if f"eval_{name}_loss" in e]
        print(f"ATM eval loss per round ({name}):", [round(loss, 3) for loss in per_round])
    print(f"ATM model written to {os.path.join(cli.output_dir, 'final')}")


if __name__ == "__main__":
    main()
