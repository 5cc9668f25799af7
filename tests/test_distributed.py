"""Merges split across processes: two CPU processes over gloo (``torchrun``) give the bytes one process writes, and
a process that fails stops every process and leaves nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import hf_merge
from hf_merge import TiesConfig

from .helpers import REPO, accelerate_launch, run_launched
from .tiny_models import finetuned_copy, tiny_llama

SCRIPT = REPO / "tests" / "distributed_merge_script.py"
sys.path.insert(0, str(REPO / "tests"))
from distributed_merge_script import configs  # noqa: E402

OPTIONS = {"progress": False, "num_threads": 1, "max_shard_size": "40KB"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[str, list[str]]:
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    base = tiny_llama()
    base.save_pretrained(root / "base")
    tasks = []
    for seed in (1, 2, 3):
        finetuned_copy(base, seed).save_pretrained(root / f"task{seed}")
        tasks.append(str(root / f"task{seed}"))
    return str(root / "base"), tasks


#: Two CPU processes from each launcher (gloo).
LAUNCHERS = {
    "torchrun": lambda: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    "accelerate": accelerate_launch,
}


def _launch(*argv: str, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    return run_launched([*LAUNCHERS[launcher](), *argv], capture_output=True, text=True)


def _weights(folder: Path) -> dict[str, bytes]:
    """Every safetensors shard and index of a checkpoint folder, byte for byte."""
    files = sorted(p for p in folder.iterdir() if p.name.endswith((".safetensors", ".safetensors.index.json")))
    return {p.name: p.read_bytes() for p in files}


def test_two_processes_write_the_bytes_one_process_writes(checkpoints, tmp_path):
    base, tasks = checkpoints
    run = _launch(str(SCRIPT), "--base", base, "--tasks", *tasks, "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    for name, config in configs().items():
        single = hf_merge.merge(base, tasks, config, output_dir=tmp_path / "single" / name, dtype="bfloat16",
                                distributed=False, **OPTIONS)
        expected, got = _weights(Path(single)), _weights(tmp_path / name)
        assert len(expected) > 2 and got == expected, name  # sharded: several files and the index
        summary = json.loads((tmp_path / name / "merge_config.json").read_text())["summary"]
        shares = summary["rank_input_bytes"]
        assert len(shares) == 2 and sum(shares) == summary["input_bytes"]
        assert max(shares) < 0.6 * summary["input_bytes"], shares  # size-balanced
        if name == "ties":  # split, global TIES still reads every input once
            assert summary["route"] == "one pass"
        # each process read only its own tensors (besides global TIES's 1/1024 sample): disjoint, together all
        reads = [set(json.loads((tmp_path / f"reads-rank{r}.json").read_text())[name]) for r in (0, 1)]
        assert reads[0] and reads[1] and not reads[0] & reads[1], name
        assert reads[0] | reads[1] == set(json.loads((Path(single) / "model.safetensors.index.json").read_text())[
            "weight_map"]), name
    expected = hf_merge.merge(base, tasks, TiesConfig(density=0.3, scope="global"), progress=False,
                              num_threads=1).state_dict()
    from safetensors.torch import load_file

    for rank in (0, 1):  # an in-memory result: the whole model on every process
        got = load_file(str(tmp_path / f"memory-rank{rank}.safetensors"))
        for key, value in got.items():
            assert torch.equal(value, expected[key]), (rank, key)


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_a_launcher_runs_the_cli_merge_split(checkpoints, tmp_path, launcher):
    base, tasks = checkpoints
    recipe = {"method": "ties", "base": base, "models": tasks, "output": str(tmp_path / "ignored"),
              "parameters": {"density": 0.3, "scope": "global"}, "max_shard_size": "40KB"}
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    run = _launch("-m", "hf_merge", "merge", str(tmp_path / "recipe.yml"), str(tmp_path / "merged"),
                    launcher=launcher)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("Merged 3 model(s) with ties") == 1  # reported once, by rank 0
    single = hf_merge.merge(base, tasks, TiesConfig(density=0.3, scope="global"), output_dir=tmp_path / "single",
                            distributed=False, progress=False, max_shard_size="40KB")
    assert _weights(tmp_path / "merged") == _weights(Path(single))
    assert not (tmp_path / "ignored").exists()


def test_a_failing_process_stops_every_process_and_leaves_nothing(checkpoints, tmp_path):
    base, tasks = checkpoints
    out = tmp_path / "out"
    out.mkdir()
    places = {"statistics": "statistics pass failed", "writing": "No space left on device"}
    run = _launch(str(SCRIPT), "--base", base, "--tasks", *tasks, "--out", str(out), "--fail-in", *places)
    assert run.returncode == 0, run.stderr[-3000:]
    for where, cause in places.items():  # process 1 fails in TIES' statistics pass, or writing (a full disk)
        assert cause in (out / f"error-{where}-rank1.txt").read_text()
        assert (out / f"error-{where}-rank0.txt").read_text().startswith("RankFailed: process 1 of 2 failed")
    assert sorted(p.name for p in out.iterdir()) == sorted(f"error-{where}-rank{r}.txt" for where in places
                                                           for r in (0, 1))  # no folder, no staging left


def test_tensors_are_split_by_size_the_same_way_on_every_process():
    from hf_merge.distributed import split_keys
    from hf_merge.tensors import TensorMeta

    metas = {f"layer{i}": TensorMeta((100 * (i % 7 + 1), 64), torch.bfloat16) for i in range(40)}
    metas["embed"] = TensorMeta((3000, 64), torch.bfloat16)
    owners = split_keys(metas, 3)
    assert list(owners) == list(metas) and owners == split_keys(dict(metas), 3)
    loads = [sum(metas[k].nbytes for k, rank in owners.items() if rank == r) for r in range(3)]
    assert max(loads) - min(loads) <= max(m.nbytes for m in metas.values())  # within one tensor of each other
    assert set(split_keys(metas, 1).values()) == {0}


@pytest.mark.parametrize("k", [1, 17, 500, 999, 1000])
def test_the_selection_split_across_processes_is_the_exact_kth_smallest(k):
    """What the processes of a split one-pass TIES sum (bit histograms) selects the exact k-th smallest |τ|."""
    from hf_merge.methods.ties_statistics import kth_smallest_across
    from hf_merge.tensors import kth_smallest

    values = torch.randn(1000, generator=torch.Generator().manual_seed(k)).abs()
    values[::7] = values[3]  # shared values, as bf16 task vectors have

    class OneProcess:  # the sums of a single process
        @staticmethod
        def all_sum(tensor: torch.Tensor) -> torch.Tensor:
            return tensor

    assert kth_smallest_across(OneProcess(), values, k) == kth_smallest(values, k)
