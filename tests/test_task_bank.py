"""TaskBank: compressed multi-task checkpoints that rebuild every task (TSV-C factors, bit-packed TALL masks)."""

from __future__ import annotations

import json

import pytest
import torch

import hf_merge
from hf_merge import TaskBank, compress
from hf_merge.methods.consensus import pack_mask, unpack_mask
from tests import tiny_models
from tests.helpers import assert_same_state


def _models(num_tasks: int = 3):
    base = tiny_models.tiny_bert()
    return base, {f"task{t}": tiny_models.finetuned_copy(base, seed=t) for t in range(num_tasks)}


def test_full_rank_tsv_c_bank_reproduces_every_finetuned_model() -> None:
    base, models = _models()
    bank = compress(base, models, hf_merge.TSVCompressConfig(rank_fraction=1.0), progress=False)
    assert bank.tasks == list(models)
    for name, model in models.items():
        rebuilt = bank.load_task(name)
        assert type(rebuilt) is type(base)
        assert_same_state(rebuilt.state_dict(), model.state_dict(), atol=1e-5)
        assert torch.allclose(tiny_models.logits("bert", rebuilt), tiny_models.logits("bert", model), atol=1e-4)


def test_default_tsv_c_bank_holds_each_task_at_rank_r_over_t_and_saves_round_trip(tmp_path) -> None:
    base, models = _models(3)
    with pytest.warns(UserWarning, match="token_type_embeddings"):  # 2×32: k = ⌊2/3⌋ = 0, as in the reference
        bank = compress(base, models, hf_merge.TSVCompressConfig(), progress=False)
    key = "bert.encoder.layer.0.attention.self.query.weight"  # 32×32: k = ⌊32/3⌋ = 10
    delta = models["task1"].state_dict()[key] - base.state_dict()[key]
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    assert torch.allclose(bank.task_delta("task1", key).double(), (u[:, :10] * s[:10]) @ vh[:10], atol=1e-5)
    with pytest.warns(UserWarning, match="token_type_embeddings"):
        same_as_merge = hf_merge.merge(base, models, hf_merge.TSVCompressConfig(task="task1"), progress=False)
    assert_same_state(bank.load_task("task1").state_dict(), same_as_merge.state_dict(), atol=1e-5)

    path = bank.save_pretrained(tmp_path / "bank")
    assert (tmp_path / "bank" / "base" / "config.json").is_file()  # an in-memory base is stored in the bank
    reloaded = TaskBank.from_pretrained(path)
    assert reloaded.tasks == bank.tasks and reloaded.config == bank.config
    rebuilt = reloaded.load_task("task2")
    assert type(rebuilt) is type(base)
    assert_same_state(rebuilt.state_dict(), bank.load_task("task2").state_dict(), atol=0)
    assert bank.storage_ratio() < 1.0 and reloaded.storage_ratio() == bank.storage_ratio()


def test_tall_mask_bank_stores_one_bit_per_weight_and_task_and_rebuilds_masked_models(tmp_path) -> None:
    base, models = _models(4)
    config = hf_merge.TallMaskConfig(mask_threshold={"task0": 0.3, "task1": 0.4, "task2": 0.5, "task3": 0.6})
    bank = compress(base, models, config, progress=False, output_dir=tmp_path / "bank")
    numel = {k: v.numel() for k, v in base.state_dict().items() if v.is_floating_point()}
    masks = {n: m for n, m in bank.layout.items() if "::mask." in n}
    assert len(masks) == 4 * len(numel)
    for name, meta in masks.items():
        assert meta.dtype == torch.uint8 and meta.shape == ((numel[name.split("::")[0]] + 7) // 8,)
    for name in models:
        expected = hf_merge.merge(base, models, config.replace(task=name), progress=False)
        assert_same_state(bank.load_task(name).state_dict(), expected.state_dict(), atol=1e-6)
    total = sum(numel.values()) * 4
    expected_ratio = (total + sum((n + 7) // 8 for n in numel.values()) * 4 + total) / (4 * total)
    assert bank.storage_ratio() == pytest.approx(expected_ratio, rel=1e-3)  # τ_MTL + 4 bit masks + base


def test_state_dict_banks_return_state_dicts_and_folder_bases_are_referenced_by_path(tmp_path) -> None:
    base = {"w": torch.randn(8, 6), "b": torch.randn(6), "step": torch.tensor(3)}
    tasks = {f"t{i}": {"w": base["w"] + 0.1 * torch.randn(8, 6), "b": base["b"] + 1, "step": torch.tensor(3)}
             for i in range(2)}
    bank = compress(base, tasks, "tsv_c", rank_fraction=1.0, progress=False)
    rebuilt = bank.load_task("t1")
    assert isinstance(rebuilt, dict)
    assert_same_state(rebuilt, tasks["t1"], atol=1e-5)

    model_base, models = _models(2)
    model_base.save_pretrained(tmp_path / "base")
    folder_bank = compress(str(tmp_path / "base"), models, hf_merge.TSVCompressConfig(rank_fraction=1.0), progress=False)
    folder_bank.save_pretrained(tmp_path / "bank")
    manifest = json.loads((tmp_path / "bank" / "task_bank.json").read_text())
    assert manifest["base"]["path"] == str((tmp_path / "base").absolute())
    assert not (tmp_path / "bank" / "base").exists()
    rebuilt = TaskBank.from_pretrained(tmp_path / "bank").load_task("task0", output_dir=tmp_path / "task0")
    reloaded = type(model_base).from_pretrained(rebuilt)
    assert_same_state(reloaded.state_dict(), models["task0"].state_dict(), atol=1e-5)


def test_bank_errors_name_what_is_wrong(tmp_path) -> None:
    base, models = _models(2)
    with pytest.raises(TypeError, match="TSVCompressConfig or TallMaskConfig"):
        compress(base, models, hf_merge.TSVMergeConfig(), progress=False)
    with pytest.raises(ValueError, match="compress stores every task"):
        compress(base, models, hf_merge.TallMaskConfig(task="task0"), progress=False)
    bank = compress(base, models, hf_merge.TallMaskConfig(), progress=False)
    with pytest.raises(KeyError, match="Unknown task"):
        bank.load_task("nope")
    with pytest.raises(FileNotFoundError, match="task_bank.json"):
        TaskBank.from_pretrained(tmp_path)
    base.save_pretrained(tmp_path / "base")
    compress(str(tmp_path / "base"), models, "tall_masks", progress=False, output_dir=tmp_path / "bank")
    (tmp_path / "base" / "model.safetensors").rename(tmp_path / "moved.safetensors")
    with pytest.raises(FileNotFoundError):
        TaskBank.from_pretrained(tmp_path / "bank")


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5, 7)])
def test_packed_masks_round_trip(shape) -> None:
    mask = torch.rand(shape) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_mask(packed, shape), mask)
    import numpy as np

    assert torch.equal(packed, torch.from_numpy(np.packbits(mask.flatten().numpy())))
