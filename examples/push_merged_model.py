"""Merge two tiny generated models and publish the merge with its model card.

    python examples/push_merged_model.py                                   # save locally; offline, a few seconds
    python examples/push_merged_model.py --output merged/                  # ... into a chosen folder
    python examples/push_merged_model.py --repo-id me/tiny-bert-merge      # push to the Hub in one commit
    python examples/push_merged_model.py --repo-id me/m --endpoint http://127.0.0.1:8080   # another Hub endpoint

The inputs are a tiny randomly initialised BERT classifier (the "pre-trained" base) and two "fine-tuned" copies
(the base plus seeded noise), saved as local folders that declare the Apache-2.0 license, so the card inherits it.
The card's evaluation table holds a measured number: how often the merged model predicts the same class as each
fine-tuned model on random token sequences. Pushing needs network access (unset HF_HUB_OFFLINE) and a write token.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

TASKS = ("sst2", "mnli")


def make_inputs(workdir: Path) -> tuple[Path, dict[str, Path]]:
    """Save a tiny base model and one noisy "fine-tuned" copy per task as checkpoint folders with a license."""
    from huggingface_hub import ModelCard, ModelCardData
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(
        BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=64, num_labels=3)
    ).eval()
    folders = {"base": workdir / "tiny-bert-base", **{task: workdir / f"tiny-bert-{task}" for task in TASKS}}
    for seed, (name, folder) in enumerate(folders.items()):
        model = base
        if name != "base":
            model = BertForSequenceClassification(base.config).eval()
            model.load_state_dict(base.state_dict())
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for param in model.parameters():
                    param.add_(torch.randn(param.shape, generator=generator) * 0.02)
        model.save_pretrained(folder)
        card = ModelCard.from_template(ModelCardData(license="apache-2.0", library_name="transformers"),
                                       template_str="---\n{{ card_data }}\n---\n\n# " + folder.name + "\n")
        card.save(folder / "README.md")
    return folders.pop("base"), folders


def agreement(merged: torch.nn.Module, folder: Path, num_sequences: int = 64) -> float:
    """Fraction of random token sequences on which ``merged`` predicts the same class as the model in ``folder``."""
    from transformers import BertForSequenceClassification

    expert = BertForSequenceClassification.from_pretrained(folder).eval()
    tokens = torch.randint(0, 128, (num_sequences, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        same = merged(input_ids=tokens).logits.argmax(-1) == expert(input_ids=tokens).logits.argmax(-1)
    return round(same.float().mean().item(), 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=None, help="folder to save into (default: a new temporary folder)")
    parser.add_argument("--repo-id", default=None, help="push to this Hub repo instead of only saving locally")
    parser.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in token / HF_TOKEN)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    args = parser.parse_args(argv)

    import hf_merge
    from hf_merge.hub import push_merged_model, save_merged_model

    with tempfile.TemporaryDirectory(prefix="hf_merge_example_") as workdir:
        base_dir, task_dirs = make_inputs(Path(workdir))
        merged = hf_merge.merge(base_dir, task_dirs, "task_arithmetic", scaling=0.5, progress=False)
        eval_results = {f"{task}-random-tokens": {"agreement": agreement(merged, task_dirs[task])} for task in TASKS}
        card_options = {"eval_results": eval_results, "model_name": "tiny-bert-task-arithmetic"}
        if args.repo_id:
            info = push_merged_model(merged, args.repo_id, endpoint=args.endpoint, token=args.token,
                                     private=True if args.private else None, **card_options)
            print(f"Pushed {merged.merge_config.method} merge to {args.repo_id}: {info.commit_url}")
            return 0
        output = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="hf_merge_merged_"))
        save_merged_model(merged, output, **card_options)
    print(f"Saved {merged.merge_config.method} merge to {output}:")
    for path in sorted(output.iterdir()):
        print(f"  {path.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
