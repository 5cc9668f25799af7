"""Smoke tests of examples/push_merged_model.py: it runs offline with no arguments, and pushes with --repo-id."""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hub_server import HubTestServer

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = REPO_ROOT / "examples" / "push_merged_model.py"


def test_example_runs_offline_with_no_arguments(tmp_path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(EXAMPLE)], check=False, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    match = re.search(r"Saved task_arithmetic merge to (.+):", result.stdout)
    assert match, result.stdout
    folder = Path(match.group(1))
    assert folder.is_relative_to(tmp_path)
    assert {"config.json", "model.safetensors", "merge_config.json", "README.md"} <= {p.name for p in folder.iterdir()}
    from huggingface_hub import ModelCard

    data = ModelCard.load(folder / "README.md").data
    assert data.license == "apache-2.0"  # inherited from the three inputs
    assert data.base_model is None  # local inputs: no Hub ids (base_model={...} names them)
    assert {r.dataset_name for r in data.eval_results} == {"sst2-random-tokens", "mnli-random-tokens"}
    assert all(0.0 <= r.metric_value <= 1.0 for r in data.eval_results)


def test_example_pushes_to_the_given_endpoint(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    example = runpy.run_path(str(EXAMPLE), run_name="push_merged_model_example")
    with HubTestServer(token="hf_test") as hub:
        code = example["main"](["--repo-id", "me/tiny-merge", "--endpoint", hub.endpoint, "--token", "hf_test"])
        assert code == 0
        assert len(hub.commits) == 1
        files = hub.files("me/tiny-merge")
    assert {"config.json", "model.safetensors", "merge_config.json", "README.md"} <= set(files)
    assert "Pushed task_arithmetic merge to me/tiny-merge" in capsys.readouterr().out
