"""Merge tiny generated BERT "experts" with several methods and print what was merged.

Runs offline in seconds: the base is a tiny BERT built from a config, the experts are seeded perturbations of it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

import hf_merge


def make_experts(folder: Path, tasks: list[str]) -> tuple[Path, dict[str, Path]]:
    config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    base = BertForSequenceClassification(config)
    base.save_pretrained(folder / "base")
    experts = {}
    for i, task in enumerate(tasks):
        expert = BertForSequenceClassification.from_pretrained(folder / "base")
        generator = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for param in expert.parameters():
                param.add_(0.02 * torch.randn(param.shape, generator=generator))
        expert.save_pretrained(folder / task)
        experts[task] = folder / task
    return folder / "base", experts


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base, experts = make_experts(Path(tmp), ["sentiment", "topic", "intent"])
        configs = [
            hf_merge.AverageConfig(),
            hf_merge.TaskArithmeticConfig(scaling=0.4),
            hf_merge.TiesConfig(density=0.2, scaling=1.0),
            hf_merge.DareConfig(drop_rate=0.9, then=hf_merge.TaskArithmeticConfig(scaling=0.4)),
        ]
        print(f"base: {base.name}, experts: {', '.join(experts)}")
        print(f"{'method':<16} {'output':<22} {'‖θ − θ₀‖₂':>10}")
        base_state = BertForSequenceClassification.from_pretrained(base).state_dict()
        for config in configs:
            out = hf_merge.merge(base, experts, config, output_dir=Path(tmp) / config.method, progress=False)
            merged = BertForSequenceClassification.from_pretrained(out).state_dict()
            distance = sum((merged[k].double() - base_state[k].double()).pow(2).sum() for k in merged).sqrt()
            print(f"{config.method:<16} {Path(out).name + '/':<22} {float(distance):>10.4f}")


if __name__ == "__main__":
    main()
