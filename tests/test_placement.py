"""Accelerate placement: dispatched/offloaded inputs, placed outputs, compute device, memory budget."""

from __future__ import annotations

import pytest
import torch

import hf_merge
from hf_merge import MergeError
from hf_merge.io import open_source
from tests.tiny_models import finetuned_copy, logits, tiny_llama

CPU_AND_DISK = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "disk",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


def _tensors(model_or_dict) -> dict[str, torch.Tensor]:
    """Every tensor under its checkpoint name, loaded from wherever it lives (offloaded ones included)."""
    source = open_source(model_or_dict)
    return {k: source.get(k) for k in source.keys()}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("placement")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    for seed in (1, 2, 3):
        finetuned_copy(base, seed).save_pretrained(root / f"ft{seed}")
    return root


def _dispatched(path, offload_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, device_map=CPU_AND_DISK, offload_folder=str(offload_dir)).eval()


@pytest.mark.parametrize(
    "config",
    [hf_merge.TaskArithmeticConfig(scaling=0.4), hf_merge.TiesConfig(density=0.3), "tsv_m"],
    ids=["task_arithmetic", "ties", "tsv_m"],
)
def test_offloaded_models_merge_to_the_tensors_of_the_materialized_merge(checkpoints, tmp_path, config):
    from transformers import LlamaForCausalLM

    materialized = [LlamaForCausalLM.from_pretrained(checkpoints / n) for n in ("base", "ft1", "ft2", "ft3")]
    expected = _tensors(hf_merge.merge(materialized[0], materialized[1:], config, progress=False))
    dispatched = [_dispatched(checkpoints / n, tmp_path / f"offload-{n}") for n in ("base", "ft1", "ft2", "ft3")]
    assert any(p.device.type == "meta" for p in dispatched[0].parameters())  # really offloaded

    merged = hf_merge.merge(dispatched[0], dispatched[1:], config, offload_folder=tmp_path / "out-offload",
                            progress=False)
    assert merged.hf_device_map == dispatched[0].hf_device_map  # placed like the base
    assert merged.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # still offloaded to disk
    got = _tensors(merged)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    reference = hf_merge.merge(materialized[0], materialized[1:], config, progress=False)
    torch.testing.assert_close(logits("llama", merged), logits("llama", reference), rtol=0, atol=0)


def test_offloaded_inputs_stream_to_a_checkpoint(checkpoints, tmp_path):
    base = _dispatched(checkpoints / "base", tmp_path / "o1")
    finetuned = [_dispatched(checkpoints / "ft1", tmp_path / "o2"), checkpoints / "ft2"]
    path = hf_merge.merge(base, finetuned, "task_arithmetic", scaling=0.5, output_dir=tmp_path / "out", progress=False)
    expected = hf_merge.merge(checkpoints / "base", [checkpoints / "ft1", checkpoints / "ft2"], "task_arithmetic",
                              scaling=0.5, progress=False)
    got = _tensors(open_source(path))
    for key, value in _tensors(expected).items():
        assert torch.equal(got[key], value), key


def test_device_map_auto_places_the_merged_model_under_max_memory(checkpoints):
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(checkpoints / "base")
    fts = [LlamaForCausalLM.from_pretrained(checkpoints / n) for n in ("ft1", "ft2")]
    placed = hf_merge.merge(base, fts, "ties", device_map="auto", max_memory={"cpu": "1GB"}, progress=False)
    assert set(placed.hf_device_map.values()) == {"cpu"}
    plain = hf_merge.merge(base, fts, "ties", progress=False)
    torch.testing.assert_close(logits("llama", placed), logits("llama", plain), rtol=0, atol=0)


def test_a_memory_budget_below_one_model_still_completes_a_path_merge(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    deep = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=8,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    deep.save_pretrained(tmp_path / "base")
    inputs = []
    for seed in (1, 2, 3):
        finetuned_copy(deep, seed).save_pretrained(tmp_path / f"ft{seed}")
        inputs.append(tmp_path / f"ft{seed}")
    model_bytes = sum(t.numel() * t.element_size() for t in _tensors(open_source(tmp_path / "base")).values())
    budget = model_bytes // 2
    path = hf_merge.merge(tmp_path / "base", inputs, "ties", output_dir=tmp_path / "small", max_memory=budget,
                          progress=False)
    unconstrained = _tensors(hf_merge.merge(tmp_path / "base", inputs, "ties", progress=False))
    constrained = _tensors(open_source(path))
    for key, value in unconstrained.items():
        assert torch.equal(constrained[key], value), key


def test_a_memory_budget_too_small_for_one_tensor_is_refused_up_front(checkpoints, tmp_path):
    with pytest.raises(MergeError, match=r"max_memory=1000 bytes.*largest tensor 'model.embed_tokens.weight'"):
        hf_merge.merge(checkpoints / "base", [checkpoints / "ft1"], "ties", output_dir=tmp_path / "x",
                       max_memory="1KB", progress=False)
    assert not (tmp_path / "x").exists()


def test_compute_device_is_a_synonym_of_device(checkpoints):
    base = {"w": torch.zeros(3)}
    merged = hf_merge.merge(base, [{"w": torch.ones(3)}], "task_arithmetic", scaling=1.0, compute_device="cpu",
                            progress=False)
    assert torch.equal(merged["w"], torch.ones(3))
    with pytest.raises(ValueError, match="disagree"):
        hf_merge.merge(base, [base], "task_arithmetic", scaling=1.0, device="cpu", compute_device="meta")


@pytest.mark.cuda
def test_arithmetic_on_the_gpu_matches_the_cpu(checkpoints):
    inputs = [checkpoints / "ft1", checkpoints / "ft2"]
    for config in (hf_merge.TaskArithmeticConfig(scaling=0.4), hf_merge.TiesConfig(density=0.3)):
        on_gpu = hf_merge.merge(checkpoints / "base", inputs, config, device="cuda", progress=False)
        on_cpu = hf_merge.merge(checkpoints / "base", inputs, config, progress=False)
        for key, value in _tensors(on_cpu).items():
            torch.testing.assert_close(_tensors(on_gpu)[key], value, rtol=1e-6, atol=1e-7)
