"""Merges split across two CPU processes (torch.distributed, gloo); used by tests/test_distributed.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_merge_script.py \
        --base BASE --tasks T1 T2 T3 --out OUT [--fail-in statistics writing]

Without ``--fail-in``: merges with every method of :func:`configs` into ``OUT/<name>`` (checkpoint folders), recording
the tensors each rank read whole from the inputs (``OUT/reads-rank<r>.json``: ``{name: [key, ...]}``), and an
in-memory model per rank (``OUT/memory-rank<r>.safetensors``). With ``--fail-in``: for each place given, process 1
fails in TIES' statistics pass or while writing its tensors (a full disk), merging into ``OUT/failed-<place>``; each
rank writes what it raised to ``OUT/error-<place>-rank<r>.txt``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def configs() -> dict[str, object]:
    from hf_merge import DareConfig, LinesConfig, TaskArithmeticConfig, TiesConfig, TSVMergeConfig

    return {
        "task_arithmetic": TaskArithmeticConfig(scaling=0.4),
        "ties": TiesConfig(density=0.3, scaling=0.9, scope="global"),
        "tsv_m": TSVMergeConfig(),
        "dare": DareConfig(drop_rate=0.5, then=TiesConfig(density=0.5, scope="global"), seed=7),
        "lines": LinesConfig(inner=TaskArithmeticConfig(scaling=1.0), beta=0.5),
    }


def fail_in(where: str) -> tuple[object, str, object]:
    """Make this process fail where ``where`` says (a disk failing, a bug in a statistics pass); returns what to
    restore: ``(owner, attribute, original)``."""
    if where == "writing":
        from hf_merge.io.writer import PositionedWriter

        def full_disk(self, key, tensor):
            raise OSError(28, "No space left on device")
        owner, name, replacement = PositionedWriter, "put", full_disk
    else:
        from hf_merge.methods import ties_statistics

        def broken(delta):
            raise RuntimeError("statistics pass failed on this process")
        owner, name, replacement = ties_statistics, "bit_halves", broken
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    return owner, name, original


def record_reads() -> dict[str, set[str]]:
    """``{input folder: keys}`` this process reads whole (or in chunks) from checkpoint folders from now on."""
    from hf_merge.io.sources import FolderSource

    reads: dict[str, set[str]] = {}
    for name in ("_read", "flat_array", "iter_chunks"):
        original = getattr(FolderSource, name)

        def logged(self, key, *args, _original=original):
            reads.setdefault(str(self.folder), set()).add(key)
            return _original(self, key, *args)
        setattr(FolderSource, name, logged)
    return reads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", required=True)
    parser.add_argument("--tasks", nargs="+", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--fail-in", nargs="+", choices=["statistics", "writing"], default=[])
    cli = parser.parse_args()

    import torch.distributed as dist
    from safetensors.torch import save_file

    import hf_merge
    from hf_merge import TiesConfig

    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), Path(cli.out)
    options = {"progress": False, "num_threads": 1, "max_shard_size": "40KB"}
    for where in cli.fail_in:
        restore = fail_in(where) if rank == 1 else None
        try:
            hf_merge.merge(cli.base, cli.tasks, TiesConfig(density=0.3, scope="global"),
                           output_dir=out / f"failed-{where}", **options)
            message = "no error"
        except Exception as error:  # what each process raised, for the test to read
            message = f"{type(error).__name__}: {error}"
        (out / f"error-{where}-rank{rank}.txt").write_text(message)
        if restore is not None:
            setattr(*restore)
    if not cli.fail_in:
        import json

        reads, keys_read = record_reads(), {}
        for name, config in configs().items():
            reads.clear()
            hf_merge.merge(cli.base, cli.tasks, config, output_dir=out / name, dtype="bfloat16", **options)
            keys_read[name] = sorted({key for keys in reads.values() for key in keys})
        (out / f"reads-rank{rank}.json").write_text(json.dumps(keys_read))
        model = hf_merge.merge(cli.base, cli.tasks, TiesConfig(density=0.3, scope="global"), progress=False,
                               num_threads=1)
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
                  str(out / f"memory-rank{rank}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
