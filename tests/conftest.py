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


@pytest.fixture(scope="session")
def atm_one_process_result(tmp_path_factory: pytest.TempPathFactory):
    """ATM on one process with a global batch of 8 (tests/atm_ddp_script.py): what two DDP or FSDP processes with a
    per-device batch of 4 must give."""
    import sys

    from tests.helpers import REPO, run_launched

    result = tmp_path_factory.mktemp("atm_one_process") / "single.safetensors"
    run_launched([sys.executable, str(REPO / "tests" / "atm_ddp_script.py"), "--per-device-batch-size", "8",
                  "--expect-world-size", "1", "--result", str(result)], timeout=120, check=True)
    return result


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
