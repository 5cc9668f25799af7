"""Test configuration: offline Hugging Face libraries, a private HF_HOME, and tiny real models.

The environment variables are set before any HF library is imported (pytest imports conftest first).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="hf_merge_test_home_")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HOME"] = _HF_HOME
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import tiny_models  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=sorted(tiny_models.FACTORIES))
def architecture(request: pytest.FixtureRequest) -> str:
    """Every tiny architecture: BERT, GPT-2 (Conv1D), Llama (tied embeddings), ViT."""
    return request.param
