"""Merging a ~3B-parameter model under a fixed memory budget (not a test).

Generates a Llama-style checkpoint of about 2.7B parameters (hidden 2560, 32 layers, bf16, sharded) plus 4
fine-tuned variants — about 27 GB on disk, more than this machine's RAM — and runs a path → path Task Arithmetic
merge with ``max_memory`` (default 4GB) next to the I/O floor, reporting wall time and peak RSS. The inputs do not
fit in the page cache, so each run starts with them evicted (read from storage).
Results: ``benchmarks/results/big_merge.json``.

    python benchmarks/bench_big_merge.py [--max-memory 4GB]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent

if __name__ == "__main__":
    extra = sys.argv[1:]
    if not any(a.startswith("--max-memory") for a in extra):
        extra += ["--max-memory", "4GB"]
    cmd = [
        sys.executable, str(ROOT / "bench_merge_io.py"),
        "--hidden", "2560", "--intermediate", "6912", "--layers", "32", "--vocab", "32000", "--tasks", "4",
        "--workdir", str(ROOT / ".work" / "big_merge"), "--runs", "floor,floor_mapped,ta", "--cache", "cold",
        "--name", "big_merge.json", *extra,
    ]
    sys.exit(subprocess.call(cmd))
