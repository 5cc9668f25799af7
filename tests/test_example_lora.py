"""Smoke test: the LoRA merging example runs offline end to end on a tiny model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "merge_lora_adapters.py"


def test_merge_lora_adapters_example_runs_on_a_tiny_model():
    done = subprocess.run([sys.executable, str(EXAMPLE), "--tiny"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "adapter_model.safetensors" in done.stdout and "max |adapter − full model|" in done.stdout
