"""Merge fine-tuned checkpoints with hf_merge: pick the coefficient on validation data, write the merge, reload it.

    python examples/merge_finetuned_models.py                 # all-MiniLM-L6-v2 experts (cached in benchmarks/.cache)
    python examples/merge_finetuned_models.py --method ties
    python examples/merge_finetuned_models.py --tiny          # tiny generated BERT, synthetic tasks (seconds)

Steps: save the base and each fine-tuned expert as ordinary ``save_pretrained`` folders; let ``hf_merge.search``
choose the method's coefficient (λ or α) on the validation splits — one streamed merge serves the whole grid when the
merge is linear in it; write the merge at that value as a checkpoint folder with ``hf_merge.merge(...,
output_dir=...)``; reload it with ``AutoModel.from_pretrained`` and report test accuracy per task.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _text_bench as tb


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="task_arithmetic",
                        help="a method with a searched coefficient: task_arithmetic, ties, tsv_m, iso_c, iso_cts, ...")
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("HF_MERGE_EXAMPLES_TINY") == "1")
    parser.add_argument("--cache-dir", type=Path, default=tb.DEFAULT_CACHE)
    parser.add_argument("--output", type=Path, help="where to write the merged checkpoint (default: a temp folder)")
    args = parser.parse_args(argv)

    from transformers import AutoModel

    import hf_merge
    from hf_merge.registry import config_class
    from hf_merge.search import search

    base, setups = tb.prepare_experts(tiny=args.tiny, cache_dir=args.cache_dir)
    pad_id = base.tokenizer.pad_token_id

    with tempfile.TemporaryDirectory(prefix="hf_merge_example_") as tmp:
        work = Path(tmp)
        base.encoder.save_pretrained(work / "base")  # the inputs as checkpoint folders: merged lazily, per tensor
        experts = {}
        for name, setup in setups.items():
            setup.expert.save_pretrained(work / name)
            experts[name] = work / name

        def validation_accuracy(encoder) -> float:
            scores = tb.score_encoder(encoder, setups, "validation", pad_id)
            return sum(scores.values()) / len(scores)

        config_cls = config_class(args.method)  # a clear error names the registered methods
        config = config_cls(scaling=1.0) if args.method == "task_arithmetic" else config_cls()
        found = search(work / "base", experts, config, validation_accuracy, grid=_short_grid(config.method),
                       progress=True)
        print(f"{config.method}: {found.parameter} = {found.best_value} (validation accuracy "
              f"{100 * found.best_score:.1f}%, {found.merges} merge pass(es) for {len(found.scores)} grid values)")

        output = args.output or work / "merged"
        hf_merge.merge(work / "base", experts, found.best_config, output_dir=output, progress=False)
        merged = AutoModel.from_pretrained(output).eval()
        accuracies = tb.score_encoder(merged, setups, "test", pad_id)
    print(f"{'task':<22}{'base':>8}{'expert':>8}{'merged':>8}")
    for name, accuracy in accuracies.items():
        reference = setups[name].accuracy
        print(f"{name:<22}{100 * reference['base']['test']:>8.1f}{100 * reference['expert']['test']:>8.1f}"
              f"{100 * accuracy:>8.1f}")
    return accuracies


def _short_grid(method: str) -> list[float] | None:
    """A few points of the papers' range per method (the full grids: each config's search_space())."""
    return {"task_arithmetic": [0.2, 0.4, 0.6, 0.8, 1.0], "ties": [0.8, 1.2, 1.6, 2.0],
            "consensus": [0.2, 0.4, 0.6, 0.8, 1.0]}.get(method, [0.5, 1.0, 1.5, 2.0, 3.0])


if __name__ == "__main__":
    main()
