"""Merges on a CUDA GPU (``device="cuda"``) equal the CPU's: Task Arithmetic and TIES to float rounding, the subspace
methods (TSV-M, Iso-C: batched ``eigh`` on the GPU, SciPy's LAPACK on the CPU) to float32 accuracy.

Marked ``cuda``: ``pytest -m cuda`` selects them; without a GPU they are skipped with the reason (tests/conftest.py).
``benchmarks/gpu_check.sh`` runs them on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

import hf_merge
from hf_merge.io import open_source
from tests.helpers import rel_error
from tests.tiny_models import finetuned_copy, tiny_bert, tiny_llama

pytestmark = [pytest.mark.cuda, pytest.mark.filterwarnings("ignore:TSV keeps k"),
              pytest.mark.filterwarnings("ignore:The model card")]

CONFIGS = {
    "task_arithmetic": (hf_merge.TaskArithmeticConfig(scaling=0.4), 1e-6),
    "ties": (hf_merge.TiesConfig(density=0.3), 1e-6),
    "tsv_m": (hf_merge.TSVMergeConfig(), 1e-4),
    "iso_c": (hf_merge.IsoCConfig(), 1e-4),
}


@pytest.fixture(scope="module", params=["bert", "llama"])
def models(request):
    torch.manual_seed(0)
    base = {"bert": tiny_bert, "llama": tiny_llama}[request.param]()
    return base, [finetuned_copy(base, seed) for seed in (1, 2, 3)]


def _floats(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_a_merge_on_the_gpu_equals_the_cpu_merge(models, method):
    base, fts = models
    config, tolerance = CONFIGS[method]
    on_gpu = _floats(hf_merge.merge(base, fts, config, device="cuda", progress=False))
    on_cpu = _floats(hf_merge.merge(base, fts, config, device="cpu", progress=False))
    assert on_gpu.keys() == on_cpu.keys()
    for key, value in on_cpu.items():
        delta_gpu, delta_cpu = on_gpu[key] - base.state_dict()[key], value - base.state_dict()[key]
        assert rel_error(on_gpu[key], value) <= tolerance, key
        assert rel_error(delta_gpu, delta_cpu) <= 100 * tolerance, key  # the merged update, not only θ₀ + update


@pytest.mark.parametrize("method", ["tsv_m", "ties", "task_arithmetic"])
def test_a_path_merge_streams_through_the_gpu(tmp_path, method):
    """Inputs read ahead through page-locked memory on a copy stream (overlapping the merge's kernels) give the CPU's
    merge."""
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    for seed in (1, 2):
        finetuned_copy(base, seed).save_pretrained(tmp_path / f"ft{seed}")
    inputs = [tmp_path / "ft1", tmp_path / "ft2"]
    parameters = {"scaling": 0.5} if method == "task_arithmetic" else {}
    out = hf_merge.merge(tmp_path / "base", inputs, method, device="cuda", output_dir=tmp_path / "gpu",
                         progress=False, **parameters)
    expected = open_source(hf_merge.merge(tmp_path / "base", inputs, method, progress=False,
                                          output_dir=tmp_path / "cpu", **parameters))
    written = open_source(out)
    assert set(written.keys()) == set(expected.keys())
    for key in expected.keys():
        if expected.meta(key).dtype.is_floating_point:
            assert rel_error(written.get(key), expected.get(key)) <= 1e-4, key


def test_the_subspace_kernels_on_the_gpu_match_the_cpu():
    from hf_merge.linalg import polar, top_k_svd

    g = torch.Generator().manual_seed(0)
    stack = torch.randn(4, 96, 64, generator=g)
    u, s, v = top_k_svd(stack, 16)
    u_g, s_g, v_g = top_k_svd(stack.cuda(), 16)
    assert u_g.is_cuda and s_g.is_cuda
    torch.testing.assert_close(s_g.cpu(), s, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close((u_g * s_g.unsqueeze(1)) @ v_g.transpose(1, 2), ((u * s.unsqueeze(1)) @ v.transpose(1, 2)).cuda(),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(polar(stack[0].cuda()).cpu(), polar(stack[0]), rtol=1e-4, atol=1e-4)
