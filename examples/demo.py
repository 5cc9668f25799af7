"""Demo: merge real fine-tuned text classifiers, offline, on 2 CPU cores.

    python examples/demo.py            # all-MiniLM-L6-v2 experts for 3 tasks (≤ 10 min fresh, ≤ 1 min cached)
    python examples/demo.py --search   # also pick each coefficient on the validation splits (a few minutes more)
    python examples/demo.py --tiny     # tiny generated BERT on synthetic tasks (seconds; CI smoke test)

Fine-tunes one expert encoder per task (a frozen linear head per task, trained on the base encoder; experts are
cached in benchmarks/.cache/), merges the three encoders with Task Arithmetic, TIES, TSV-M, Iso-CTS and Consensus
(those registered), and prints each task's test accuracy with the merged encoder and the task's own head.
Needs the benchmark extra (``pip install -e '.[bench]'``) unless ``--tiny`` (or ``HF_MERGE_EXAMPLES_TINY=1``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _text_bench as tb


def demo_configs():
    """The merges shown, at the papers' no-validation defaults (TA λ = 0.4 is the middle of TA's usual 0.3–0.5)."""
    import hf_merge

    wanted = [
        ("task_arithmetic", {"scaling": 0.4}),
        ("ties", {"density": 0.2, "scaling": 1.0}),
        ("tsv_m", {"scaling": 1.0}),
        ("iso_cts", {"scaling": 1.0}),
        ("consensus", {"k": 2, "scaling": 0.4}),
    ]
    return [hf_merge.MERGE_METHODS[name][0](**kwargs) for name, kwargs in wanted if name in hf_merge.MERGE_METHODS]


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description="Merge real fine-tuned text classifiers offline.")
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("HF_MERGE_EXAMPLES_TINY") == "1")
    parser.add_argument("--search", action="store_true", help="choose each coefficient on validation data")
    parser.add_argument("--cache-dir", type=Path, default=tb.DEFAULT_CACHE)
    args = parser.parse_args(argv)

    from tqdm.auto import tqdm

    import hf_merge
    from hf_merge.search import search

    started = time.perf_counter()
    base = tb.load_base(tiny=args.tiny)
    tasks = tb.task_table(None if args.tiny else tb.EXAMPLE_TASKS, tiny=args.tiny)
    budget = tb.TINY_BUDGET if args.tiny else tb.EXAMPLE_BUDGET
    configs = demo_configs()
    bar = tqdm(total=len(tasks) + len(configs), desc="demo", unit="step")
    setups = {}
    for name, task in tasks.items():
        bar.set_postfix_str(f"expert {name}")
        setups[name] = tb.prepare_task(base, task, budget, "full", cache_dir=args.cache_dir, progress=False,
                                       log=bar.write)
        bar.update(1)
    experts = {name: s.expert for name, s in setups.items()}
    pad_id = base.tokenizer.pad_token_id
    rows = {
        "base encoder + heads": {n: s.accuracy["base"]["test"] for n, s in setups.items()},
        "fine-tuned experts": {n: s.accuracy["expert"]["test"] for n, s in setups.items()},
    }
    for config in configs:
        bar.set_postfix_str(config.method)
        if args.search:
            def validation(encoder):
                scores = tb.score_encoder(encoder, setups, "validation", pad_id)
                return sum(scores.values()) / len(scores)

            config = search(base.encoder, experts, config, validation, progress=False).best_config
        merged = hf_merge.merge(base.encoder, experts, config, progress=False)
        rows[f"{config.method} ({_coefficient(config)})"] = tb.score_encoder(merged, setups, "test", pad_id)
        bar.update(1)
    bar.close()

    names = list(tasks)
    print(f"\n{base.model_id}: test accuracy (%) per task, each with its own head; "
          f"normalized = merged / expert ({time.perf_counter() - started:.0f} s)")
    print(f"{'model':<32}" + "".join(f"{n[:18]:>20}" for n in names) + f"{'mean':>8}{'normalized':>12}")
    for label, accuracies in rows.items():
        normalized = sum(accuracies[n] / rows["fine-tuned experts"][n] for n in names) / len(names)
        mean = sum(accuracies.values()) / len(names)
        print(f"{label:<32}" + "".join(f"{100 * accuracies[n]:>20.1f}" for n in names)
              + f"{100 * mean:>8.1f}{100 * normalized:>12.1f}")
    return rows


def _coefficient(config) -> str:
    for field in ("scaling", "beta"):
        if hasattr(config, field):
            return f"{field}={getattr(config, field):g}"
    return "default"


if __name__ == "__main__":
    main()
