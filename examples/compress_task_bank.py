"""Store several fine-tuned models in about the space of one or two: a TaskBank (TSV-C or TALL masks).

    python examples/compress_task_bank.py                     # all-MiniLM-L6-v2 experts (cached in benchmarks/.cache)
    python examples/compress_task_bank.py --method tall_masks
    python examples/compress_task_bank.py --tiny              # tiny generated BERT, synthetic tasks (seconds)

``hf_merge.compress(base, experts, config)`` streams the experts once: TSV-C keeps each task's top ⌊r/T⌋ singular
triplets of every matrix; TALL masks keep one multi-task vector plus one bit per parameter and task. The bank is
saved with ``save_pretrained``, reopened with ``TaskBank.from_pretrained``, and every task's model is rebuilt with
``load_task`` and tested with that task's head, next to the uncompressed expert.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _text_bench as tb

METHODS = ("tsv_c", "tall_masks")


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=METHODS, default="tsv_c")
    parser.add_argument("--mask-threshold", type=float, default=0.4, help="TALL-mask λ (paper grid 0.2–0.6)")
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("HF_MERGE_EXAMPLES_TINY") == "1")
    parser.add_argument("--cache-dir", type=Path, default=tb.DEFAULT_CACHE)
    args = parser.parse_args(argv)

    from hf_merge import TaskBank, compress
    from hf_merge.registry import config_class

    base, setups = tb.prepare_experts(tiny=args.tiny, cache_dir=args.cache_dir)
    experts = {name: setup.expert for name, setup in setups.items()}
    options = {"mask_threshold": args.mask_threshold} if args.method == "tall_masks" else {}
    config = config_class(args.method)(**options)
    pad_id = base.tokenizer.pad_token_id

    with tempfile.TemporaryDirectory(prefix="hf_merge_bank_") as tmp:
        bank = compress(base.encoder, experts, config, progress=False)
        bank.save_pretrained(Path(tmp) / "bank")
        reopened = TaskBank.from_pretrained(Path(tmp) / "bank")
        print(f"{reopened}: payload {reopened.payload_nbytes() / 2**20:.1f} MiB + base "
              f"{reopened.base_nbytes() / 2**20:.1f} MiB vs {len(experts)} full models "
              f"{len(experts) * reopened.base_nbytes() / 2**20:.1f} MiB")
        accuracies = {name: tb.accuracy_of(reopened.load_task(name), setups[name].head, setups[name].test, pad_id)
                      for name in reopened.tasks}
    print(f"{'task':<22}{'expert':>8}{'bank':>8}{'normalized':>12}")
    for name, accuracy in accuracies.items():
        expert = setups[name].accuracy["expert"]["test"]
        print(f"{name:<22}{100 * expert:>8.1f}{100 * accuracy:>8.1f}{100 * accuracy / expert:>12.1f}")
    return accuracies


if __name__ == "__main__":
    main()
