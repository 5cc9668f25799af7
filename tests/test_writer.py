"""Streaming IO: the checkpoint writer and its in-place amendments, sparse block reads, and the read-ahead the engine
builds on."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

import hf_merge
from hf_merge.io import TensorMeta, write_safetensors_shards
from hf_merge.io.prefetch import Prefetcher
from hf_merge.io.safetensors_file import SafetensorsFile
from hf_merge.io.writer import OutputBuffers


def _mixed_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(300, 64, generator=gen).to(torch.bfloat16),
        "proj.weight": torch.randn(64, 64, generator=gen),
        "half": torch.randn(33, generator=gen).half(),
        "steps": torch.arange(5),
        "mask": torch.tensor([True, False, True]),
        "fp8": torch.randn(7, generator=gen).to(torch.float8_e4m3fn),
        "empty": torch.empty(0, 3),
    }


def _metas(tensors: dict[str, torch.Tensor]) -> dict[str, TensorMeta]:
    return {k: TensorMeta(tuple(v.shape), v.dtype) for k, v in tensors.items()}


def test_streamed_shards_are_safetensors_files_with_the_hub_grouping_and_aligned_tensors(tmp_path):
    from huggingface_hub import split_torch_state_dict_into_shards

    tensors = _mixed_tensors()
    plan = write_safetensors_shards(tmp_path, _metas(tensors), tensors.__getitem__, max_shard_size="20KB")
    loaded = {}
    for shard in plan.shards:
        loaded |= load_file(tmp_path / shard.filename)  # the safetensors library validates header and offsets
    assert set(loaded) == set(tensors)
    for key, tensor in tensors.items():
        assert loaded[key].dtype == tensor.dtype and loaded[key].shape == tensor.shape, key
        assert torch.equal(loaded[key].view(torch.uint8), tensor.view(torch.uint8)), key
    hub = split_torch_state_dict_into_shards(tensors, max_shard_size="20KB")
    assert {s.filename: set(s.keys) for s in plan.shards} == {f: set(k) for f, k in hub.filename_to_tensors.items()}
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == hub.tensor_to_filename
    for shard in plan.shards:  # every tensor starts at a multiple of its element size
        for key in shard.keys:
            assert shard.offsets[key] % tensors[key].element_size() == 0, key
        assert SafetensorsFile(tmp_path / shard.filename).metadata == {"format": "pt"}


def test_each_tensor_reaches_its_file_before_the_next_is_computed(tmp_path):
    tensors = {f"w{i}": torch.full((256,), float(i)) for i in range(4)}
    plan_sizes = []

    def compute(key: str) -> torch.Tensor:
        files = list(tmp_path.glob("*.safetensors"))
        plan_sizes.append(files[0].stat().st_size if files else 0)
        return tensors[key]

    plan = write_safetensors_shards(tmp_path, _metas(tensors), compute)
    header = len(plan.shards[0].header)
    assert plan_sizes == [header + 1024 * i for i in range(4)]  # nothing held back: one tensor in memory at a time


def test_amendments_overwrite_entries_and_whole_tensors_in_place(tmp_path):
    tensors = _mixed_tensors()
    plan = write_safetensors_shards(tmp_path, _metas(tensors), tensors.__getitem__, max_shard_size="20KB")
    new_proj = torch.zeros(64, 64)
    plan.patch(tmp_path, [
        ("embed.weight", torch.tensor([0, 5, 19199]), torch.tensor([1.0, -2.0, 3.0]).to(torch.bfloat16)),
        ("proj.weight", None, new_proj),
    ])
    loaded = {}
    for shard in plan.shards:
        loaded |= load_file(tmp_path / shard.filename)
    expected = tensors["embed.weight"].clone().view(-1)
    expected[[0, 5, 19199]] = torch.tensor([1.0, -2.0, 3.0]).to(torch.bfloat16)
    assert torch.equal(loaded["embed.weight"].view(-1), expected)
    assert torch.equal(loaded["proj.weight"], new_proj)
    assert torch.equal(loaded["half"], tensors["half"])
    with pytest.raises(ValueError, match="'proj.weight'.*float32"):
        plan.patch(tmp_path, [("proj.weight", torch.tensor([1]), torch.tensor([1.0], dtype=torch.float64))])


def test_a_tensor_that_comes_out_wrong_is_named_and_nothing_more_is_computed(tmp_path):
    tensors = {"a": torch.zeros(3), "b": torch.zeros(4), "c": torch.zeros(5)}
    asked = []

    def compute(key: str) -> torch.Tensor:
        asked.append(key)
        return torch.zeros(2) if key == "b" else tensors[key]

    with pytest.raises(RuntimeError, match=r"'b' came out as \(2,\)"):
        write_safetensors_shards(tmp_path, _metas(tensors), compute)
    assert asked == ["a", "b"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sampled_blocks_are_the_slices_of_the_stored_tensor(tmp_path, dtype):
    from safetensors.torch import save_file

    tensor = torch.randn(5000, generator=torch.Generator().manual_seed(1)).to(dtype)
    save_file({"w": tensor, "empty": torch.empty(0, dtype=dtype)}, tmp_path / "model.safetensors")
    handle = SafetensorsFile(tmp_path / "model.safetensors")
    starts = [0, 1000, 4090, 4999]  # blocks across page boundaries, and ones clipped at the end
    blocks = torch.from_numpy(handle.read_blocks("w", starts, 20)).view(dtype)
    assert torch.equal(blocks, torch.cat([tensor[start : start + 20] for start in starts]))
    assert handle.read_blocks("empty", [0], 20).size == 0


def test_prefetched_loads_run_one_at_a_time_in_request_order():
    running, order, overlaps = [], [], []
    lock = threading.Lock()

    def load(key: str) -> str:
        with lock:
            overlaps.append(len(running))
            running.append(key)
        time.sleep(0.01)
        with lock:
            running.remove(key)
            order.append(key)
        return key.upper()

    keys = [f"k{i}" for i in range(6)]
    with Prefetcher(load, keys, depth=2) as prefetcher:
        assert [prefetcher.get(key) for key in keys] == [key.upper() for key in keys]
    assert order == keys and set(overlaps) == {0}  # a stateful load (one-pass TIES) never runs concurrently


@pytest.mark.parametrize("config", [hf_merge.TiesConfig(density=0.3), hf_merge.TaskArithmeticConfig(scaling=0.4)])
def test_a_path_merge_holds_a_few_reused_output_buffers_not_the_output(tmp_path, monkeypatch, config):
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(3)
    base = {f"layer{i}.weight": torch.randn(40, 30, generator=gen).to(torch.bfloat16) for i in range(6)}
    folders = []
    for index in range(3):
        state = {k: (v.float() + 0.01 * index * torch.randn(v.shape, generator=gen)).to(torch.bfloat16)
                 for k, v in base.items()}
        folders.append(tmp_path / f"in{index}")
        folders[-1].mkdir()
        save_file(state, folders[-1] / "model.safetensors")
    storages = set()
    original_take = OutputBuffers.take
    monkeypatch.setattr(OutputBuffers, "take", lambda self, key: storages.add(
        (out := original_take(self, key)).untyped_storage().data_ptr()) or out)
    hf_merge.merge(folders[0], folders[1:], config, output_dir=tmp_path / "out", progress=False)
    assert 1 <= len(storages) <= 2  # the tensor being written and the one being merged
    in_memory = hf_merge.merge({k: load_file(f / "model.safetensors")[k] for f in folders[:1] for k in base},
                               [load_file(f / "model.safetensors") for f in folders[1:]], config, progress=False)
    written = load_file(tmp_path / "out" / "model.safetensors")
    for key in base:
        assert torch.equal(written[key], in_memory[key]), key
