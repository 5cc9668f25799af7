"""The Gram route: merges determined by inner products (SLERP family, Model Stock) run on each tensor's Gram
coordinates and stream one fused combination; they must equal the same method run on the full tensors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import hf_merge
from hf_merge.errors import MergeError
from hf_merge.linalg import gram_coordinates
from hf_merge.methods.karcher import KarcherConfig, KarcherMerger
from hf_merge.methods.model_stock import ModelStockConfig, ModelStockMerger
from hf_merge.methods.multislerp import MultiSlerpConfig, MultiSlerpMerger
from hf_merge.methods.nuslerp import NuSlerpConfig, NuSlerpMerger
from hf_merge.methods.slerp import SlerpConfig, SlerpMerger

SHAPES = {"model.layers.0.mlp.up_proj.weight": (48, 40), "model.layers.0.input_layernorm.weight": (40,),
          "model.layers.1.mlp.up_proj.weight": (48, 40), "lm_head.weight": (64, 40)}
CASES = [
    (SlerpConfig(t=0.3), SlerpMerger, 1),
    (NuSlerpConfig(weights=[1.0, 3.0]), NuSlerpMerger, 2),
    (MultiSlerpConfig(weights=[1.0, 2.0, 0.5]), MultiSlerpMerger, 3),
    (KarcherConfig(), KarcherMerger, 3),
    (ModelStockConfig(), ModelStockMerger, 3),
]
IDS = [config.method for config, _, _ in CASES]


def _inputs(num_tasks: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=generator) for k, s in SHAPES.items()}
    tasks = [{k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
             for _ in range(num_tasks)]
    # rank-deficient and degenerate tensors: an untouched layer (every τ_t = 0) and equal task vectors
    for task in tasks:
        task["model.layers.1.mlp.up_proj.weight"] = base["model.layers.1.mlp.up_proj.weight"].clone()
        task["lm_head.weight"] = tasks[0]["lm_head.weight"]
    cast = lambda state: {k: v.to(dtype) for k, v in state.items()}  # noqa: E731
    return cast(base), [cast(task) for task in tasks]


def _direct(monkeypatch, merger_class, merge):
    with monkeypatch.context() as patch:
        patch.setattr(merger_class, "gram_determined", False)
        return merge()


@pytest.mark.parametrize("config, merger_class, num_tasks", CASES, ids=IDS)
def test_the_gram_route_equals_the_method_on_full_float32_tensors(monkeypatch, config, merger_class, num_tasks):
    base, tasks = _inputs(num_tasks, torch.float32)
    merge = lambda: hf_merge.merge(base, tasks, config, progress=False)  # noqa: E731
    assert merger_class(config).gram_determined
    direct, fast = _direct(monkeypatch, merger_class, merge), merge()
    for key in SHAPES:
        torch.testing.assert_close(fast[key], direct[key], rtol=2e-5, atol=2e-6, msg=key)


@pytest.mark.parametrize("config, merger_class, num_tasks", CASES, ids=IDS)
def test_the_gram_route_on_bfloat16_checkpoints_is_within_one_bfloat16_ulp(tmp_path, monkeypatch, config,
                                                                         merger_class, num_tasks):
    base, tasks = _inputs(num_tasks, torch.bfloat16)
    folders = []
    for index, state in enumerate([base, *tasks]):
        folder = tmp_path / f"model{index}"
        folder.mkdir()
        save_file(state, folder / "model.safetensors")
        folders.append(str(folder))
    merge = lambda: hf_merge.merge(folders[0], folders[1:], config, progress=False)  # noqa: E731
    direct, fast = _direct(monkeypatch, merger_class, merge), merge()
    for key in SHAPES:
        assert fast[key].dtype == torch.bfloat16
        ulp = torch.finfo(torch.bfloat16).eps * direct[key].float().abs().clamp_min(1e-30)
        assert ((fast[key].float() - direct[key].float()).abs() <= ulp).all(), key


def test_the_gram_kernel_and_the_torch_route_give_the_float64_gram_matrix(tmp_path, monkeypatch):
    base, tasks = _inputs(3, torch.bfloat16)
    key = "model.layers.0.mlp.up_proj.weight"
    rows = torch.stack([base[key].double().flatten()]
                       + [(t[key].float() - base[key].float()).double().flatten() for t in tasks])
    expected = rows @ rows.T
    from hf_merge.context import MergeContext
    from hf_merge.inputs import open_base, open_tasks
    from hf_merge.params import classify_parameters
    from hf_merge.tensors import TensorMeta

    metas = {k: TensorMeta(v.shape, v.dtype) for k, v in base.items()}
    context = MergeContext(open_base(base), open_tasks(tasks), classify_parameters(
        {k: (v.shape, v.dtype) for k, v in base.items()}), metas)
    for kernels in ("1", "0"):
        monkeypatch.setenv("HF_MERGE_KERNELS", kernels)
        torch.testing.assert_close(context.gram(key), expected, rtol=1e-12, atol=1e-9)


def test_gram_coordinates_reproduce_the_gram_matrix_and_map_coordinates_back_to_coefficients():
    generator = torch.Generator().manual_seed(3)
    vectors = torch.randn(4, 50, generator=generator, dtype=torch.float64)
    vectors[3] = vectors[1] - 2 * vectors[2]  # rank 3
    gram = vectors @ vectors.T
    coordinates, back = gram_coordinates(gram)
    assert coordinates.shape == (3, 4)
    torch.testing.assert_close(coordinates.T @ coordinates, gram)
    target = 0.3 * vectors[0] - 1.2 * vectors[3]
    target_coordinates = coordinates @ torch.tensor([0.3, 0.0, 0.0, -1.2], dtype=torch.float64)
    torch.testing.assert_close((back @ target_coordinates) @ vectors, target)
    assert gram_coordinates(torch.zeros(3, 3, dtype=torch.float64))[0].shape == (0, 3)


def test_a_nan_in_an_input_is_traced_to_that_input_on_the_gram_route(tmp_path):
    base, tasks = _inputs(2, torch.float32)
    tasks[1]["model.layers.0.mlp.up_proj.weight"][3, 4] = float("nan")
    with pytest.raises(MergeError, match="model.layers.0.mlp.up_proj.weight"):
        hf_merge.merge(base, tasks, NuSlerpConfig(weights=[1.0, 1.0]), progress=False)


def test_methods_that_depend_on_rows_keep_the_per_tensor_route():
    assert not ModelStockMerger(ModelStockConfig(filter_wise=True)).gram_determined
    assert not NuSlerpMerger(NuSlerpConfig(weights=[1.0, 1.0], flatten=False)).gram_determined
