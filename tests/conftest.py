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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` (``pytest -m cuda`` selects them) are skipped, saying why, where torch sees no GPU."""
    if torch.cuda.is_available():
        return
    reason = (f"needs a CUDA GPU: torch {torch.__version__} sees none (CUDA build: {torch.version.cuda is not None}); "
              "run `pytest -m cuda` or benchmarks/gpu_check.sh on a GPU machine")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))
