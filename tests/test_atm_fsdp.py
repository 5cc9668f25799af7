"""ATM under FSDP2 (Accelerate's FSDP plugin): two processes give the parameters of one process with the same global
batch, each rank merging only its own parameter shards; round checkpoints and the final model are full state dicts
that ``from_pretrained`` loads, and resuming from one reproduces the uninterrupted run; what the shard-local merge
cannot do is refused before training.

On CPU (gloo) the script lets Accelerate's FSDP plugin run on MULTI_CPU processes (``enable_fsdp_on_cpu`` in
tests/atm_ddp_script.py: Accelerate 1.16 enables FSDP for accelerator backends only); the ``cuda`` test runs the
same on two GPUs without that shim.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import REPO, accelerate_launch, run_launched

SCRIPT = str(REPO / "tests" / "atm_ddp_script.py")


def _launch_fsdp(result: Path, *extra: str) -> None:
    run_launched(accelerate_launch() + [SCRIPT, "--per-device-batch-size", "4", "--expect-world-size", "2", "--fsdp",
                                        "--result", str(result), *extra], timeout=180, check=True)


def _assert_fsdp_matches_one_process(tmp_path: Path, single: Path, *extra: str) -> None:
    from safetensors.torch import load_file
    from transformers import BertForSequenceClassification

    sharded = tmp_path / "fsdp.safetensors"
    _launch_fsdp(sharded, *extra)  # the script checks that the parameters were DTensor shards and the merge saw shards

    expected, got = load_file(single), load_file(sharded)  # got: from_pretrained of trainer.save_model's output
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-5, rtol=1e-5), name
    last_round = BertForSequenceClassification.from_pretrained(tmp_path / "fsdp_checkpoints" / "checkpoint-2")
    for name, param in last_round.named_parameters():
        assert torch.equal(param.detach(), got[name]), name
    resumed = tmp_path / "resumed.safetensors"  # round 1's checkpoint loaded into the shards, then round 2
    _launch_fsdp(resumed, "--resume-from", str(tmp_path / "fsdp_checkpoints" / "checkpoint-1"), *extra)
    for name, value in load_file(resumed).items():
        assert torch.allclose(value, got[name], atol=1e-6, rtol=0), name  # bitwise equal on CPU


def test_two_process_fsdp_matches_a_single_process_run_with_the_same_global_batch(tmp_path, atm_one_process_result):
    """``accelerate launch`` with two CPU processes, FSDP2 over gloo."""
    _assert_fsdp_matches_one_process(tmp_path, atm_one_process_result)


@pytest.mark.cuda
def test_two_gpu_fsdp_matches_a_single_process_run_with_the_same_global_batch(tmp_path):
    """The same on two GPUs (NCCL), where Accelerate enables its FSDP plugin by itself."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs for two FSDP processes, torch sees {torch.cuda.device_count()}")
    single = tmp_path / "single.safetensors"
    run_launched([sys.executable, SCRIPT, "--per-device-batch-size", "8", "--expect-world-size", "1", "--result",
                  str(single), "--cuda"], timeout=120, check=True)
    _assert_fsdp_matches_one_process(tmp_path, single, "--cuda")


def test_what_a_shard_local_merge_cannot_do_is_refused_under_fsdp():
    import hf_merge
    from hf_merge.training import ATMConfig
    from hf_merge.training.atm import _check_fsdp

    tasks = ["a", "b"]
    fsdp2 = SimpleNamespace(fsdp_version=2, state_dict_type="FULL_STATE_DICT")
    for merge in (hf_merge.TaskArithmeticConfig(scaling=1.0), hf_merge.AverageConfig()):
        _check_fsdp(fsdp2, ATMConfig(rounds=1, steps_per_round=1, merge=merge), tasks, has_task_heads=False, saves=True)
    linear = ATMConfig(rounds=1, steps_per_round=1)
    kept_moments = ATMConfig(rounds=1, steps_per_round=1, reset_optimizer=False)
    _check_fsdp(fsdp2, kept_moments, tasks, has_task_heads=False, saves=False)
    with pytest.raises(ValueError, match="reset_optimizer=False saves .* rank 0's shards only"):
        _check_fsdp(fsdp2, kept_moments, tasks, has_task_heads=False, saves=True)
    with pytest.raises(ValueError, match=r"needs FSDP2 \(fsdp_config=\{'version': 2\}"):
        _check_fsdp(SimpleNamespace(fsdp_version=1, state_dict_type="FULL_STATE_DICT"), linear, tasks, False, saves=True)
    ties = ATMConfig(rounds=1, steps_per_round=1, merge=hf_merge.TiesConfig(density=0.2, scaling=1.0))
    with pytest.raises(ValueError, match=r"merge='ties' needs whole tensors, but under FSDP .* 'ties' under DDP"):
        _check_fsdp(fsdp2, ties, tasks, has_task_heads=False, saves=True)
    with pytest.raises(ValueError, match="task_heads are not supported under FSDP"):
        _check_fsdp(fsdp2, linear, tasks, has_task_heads=True, saves=True)
    with pytest.raises(ValueError, match="state_dict_type='FULL_STATE_DICT' only, not 'SHARDED_STATE_DICT'"):
        _check_fsdp(SimpleNamespace(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT"), linear, tasks, False, saves=True)
