"""LoRA adapters as merge inputs and outputs."""

from __future__ import annotations

import copy

import pytest
import torch

import hf_merge
from hf_merge.inputs import open_tasks
from hf_merge.io import open_source
from hf_merge.lowrank import LowRank, lowrank_svd, truncate
from hf_merge.methods.iso import iso_cts, lowrank_iso_c, lowrank_iso_cts
from hf_merge.methods.tsv import lowrank_tsv_merge, tsv_merge
from tests.helpers import rel_error
from tests.tiny_models import logits, tiny_bert, tiny_gpt2


def _randomize_lora(peft_model, seed: int) -> None:
    """Trained-looking adapters: LoRA B starts at zero in PEFT, so give every LoRA factor random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def _adapter(base, tmp_path, name, seed, **lora_kwargs):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**lora_kwargs))
    _randomize_lora(peft_model, seed)
    peft_model.save_pretrained(tmp_path / name)
    return peft_model, tmp_path / name


def _merged_reference(peft_model) -> dict[str, torch.Tensor]:
    source = open_source(copy.deepcopy(peft_model).merge_and_unload())
    return {k: source.get(k) for k in source.keys()}


# ------------------------------------------------------------------------------------------- ΔW from adapters
@pytest.mark.parametrize(
    "lora_kwargs",
    [
        dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
        dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], use_rslora=True),
        dict(r=4, lora_alpha=16, target_modules=["query", "key", "word_embeddings"],
             rank_pattern={"layer.1.attention.self.query": 2}, alpha_pattern={"key": 3}),
        dict(r=2, lora_alpha=4, target_modules=["query"], modules_to_save=["classifier"]),
    ],
    ids=["plain", "rslora", "rank_alpha_patterns_embedding", "modules_to_save"],
)
def test_adapter_deltas_match_peft_merge_and_unload(tmp_path, lora_kwargs):
    base = tiny_bert()
    peft_model, folder = _adapter(base, tmp_path, "adapter", 1, **lora_kwargs)
    merged = hf_merge.merge(base, [folder], "task_arithmetic", scaling=1.0, progress=False)
    for key, value in _merged_reference(peft_model).items():
        torch.testing.assert_close(open_source(merged).get(key), value, rtol=0, atol=1e-6)
    from_model = hf_merge.merge(base, [peft_model], "task_arithmetic", scaling=1.0, progress=False)
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(from_model.state_dict()[key], value, rtol=0, atol=0)


def test_fan_in_fan_out_conv1d_adapter_matches_peft(tmp_path):
    base = tiny_gpt2()
    peft_model, folder = _adapter(base, tmp_path, "gpt2", 2, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                  fan_in_fan_out=True)
    merged = hf_merge.merge(base, [folder], "task_arithmetic", scaling=1.0, progress=False)
    for key, value in _merged_reference(peft_model).items():
        torch.testing.assert_close(open_source(merged).get(key), value, rtol=0, atol=1e-6)


def test_adapters_with_different_targets_merge_with_zero_deltas_elsewhere(tmp_path):
    base = tiny_bert()
    a, folder_a = _adapter(base, tmp_path, "a", 1, r=4, target_modules=["query"])
    b, folder_b = _adapter(base, tmp_path, "b", 2, r=4, target_modules=["value"])
    merged = hf_merge.merge(base, {"a": folder_a, "b": folder_b}, "task_arithmetic", scaling=1.0, progress=False)
    ref_a, ref_b, ref_base = _merged_reference(a), _merged_reference(b), open_source(base)
    for key in ref_a:
        expected = ref_a[key] + ref_b[key] - ref_base.get(key)
        torch.testing.assert_close(open_source(merged).get(key), expected, rtol=0, atol=1e-6)


def test_a_peft_model_with_several_adapters_contributes_one_task_each(tmp_path):
    from peft import LoraConfig

    base = tiny_bert()
    peft_model, _ = _adapter(base, tmp_path, "first", 1, r=4, target_modules=["query"])
    peft_model.add_adapter("second", LoraConfig(r=2, target_modules=["value"]))
    _randomize_lora(peft_model, 3)
    tasks = open_tasks([peft_model])
    assert sorted(tasks) == ["default", "second"]


@pytest.mark.parametrize(
    ("lora_kwargs", "feature"),
    [
        (dict(r=4, target_modules=["query"], use_dora=True), "DoRA"),
        (dict(r=4, target_modules=["query"], lora_bias=True), "lora_bias"),
        (dict(r=4, target_modules=["query"], bias="all"), "bias='all'"),
    ],
)
def test_unsupported_adapter_features_raise_with_the_feature_named(tmp_path, lora_kwargs, feature):
    base = tiny_bert()
    _, folder = _adapter(base, tmp_path, "bad", 1, **lora_kwargs)
    with pytest.raises(ValueError, match=feature):
        hf_merge.merge(base, [folder], "task_arithmetic", scaling=1.0, progress=False)


def test_non_lora_peft_types_are_refused(tmp_path):
    from peft import IA3Config, get_peft_model

    base = tiny_bert()
    ia3 = get_peft_model(copy.deepcopy(base), IA3Config(target_modules=["query", "output.dense"],
                                                       feedforward_modules=["output.dense"]))
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(ValueError, match="PEFT type IA3 is not supported"):
        hf_merge.merge(base, [tmp_path / "ia3"], "task_arithmetic", scaling=1.0, progress=False)


# ------------------------------------------------------------------------------------------- low-rank algebra
def _random_parts(rows, cols, ranks, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [LowRank(torch.randn(rows, r, generator=generator), torch.randn(r, cols, generator=generator))
            for r in ranks]


def test_lowrank_svd_reconstructs_the_product():
    (part,) = _random_parts(40, 30, [6])
    u, s, v = lowrank_svd(part.P, part.Q)
    assert s.numel() == 6
    assert rel_error((u * s) @ v.T, part.dense()) < 1e-5
    torch.testing.assert_close(u.T @ u, torch.eye(6), atol=1e-5, rtol=0)


def test_lowrank_tsv_merge_equals_the_dense_method():
    parts = _random_parts(48, 40, [8, 8, 8])
    k = 6  # ≤ every adapter's rank: the dense top-k is well defined
    dense = tsv_merge([p.dense() for p in parts], k)
    assert rel_error(lowrank_tsv_merge(parts, k).dense(), dense) < 1e-5


def test_lowrank_iso_c_equals_dense_iso_c_restricted_to_the_range():
    parts = _random_parts(36, 30, [4, 4, 4])
    total = sum(p.dense() for p in parts).double()
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    rank = 12
    expected = (s.sum() / 30) * u[:, :rank] @ vh[:rank]
    assert rel_error(lowrank_iso_c(parts, 30).dense().double(), expected) < 1e-5


def test_lowrank_iso_cts_equals_dense_iso_cts_when_well_defined():
    parts = _random_parts(24, 24, [8, 8, 8])  # Σ ranks = 24: M has full rank, the dense method is well defined
    dense = iso_cts([p.dense() for p in parts], 0.8)
    assert rel_error(lowrank_iso_cts(parts, 24, 0.8).dense(), dense) < 1e-5


def test_task_arithmetic_in_factors_is_exact_and_truncation_is_eckart_young():
    parts = _random_parts(32, 20, [4, 4])
    merged = truncate(LowRank(torch.cat([0.5 * p.P for p in parts], 1), torch.cat([p.Q for p in parts])))
    dense = 0.5 * (parts[0].dense() + parts[1].dense())
    assert merged.rank == 8 and rel_error(merged.dense(), dense) < 1e-5
    u, s, vh = torch.linalg.svd(dense.double())
    best3 = (u[:, :3] * s[:3]) @ vh[:3]
    assert rel_error(truncate(merged, rank=3).dense().double(), best3) < 1e-5
    energy = truncate(merged, energy=0.9)
    kept = (s[: energy.rank] ** 2).sum() / (s**2).sum()
    assert kept >= 0.9 and (energy.rank == 1 or (s[: energy.rank - 1] ** 2).sum() / (s**2).sum() < 0.9)


# ------------------------------------------------------------------------------------------- adapters out
@pytest.mark.parametrize("method", ["task_arithmetic", "average", "tsv_m", "ties"])
def test_merged_adapter_reloads_in_peft_with_the_logits_of_the_merged_model(tmp_path, method):
    from peft import PeftModel

    base = tiny_bert()
    folders = [_adapter(base, tmp_path, f"a{i}", i, r=4, lora_alpha=8, target_modules=["query", "value"])[1]
               for i in range(3)]
    params = {"task_arithmetic": {"scaling": 0.5}, "tsv_m": {"rank_fraction": 0.125}}.get(method, {})
    out = hf_merge.merge(base, folders, method, output="lora", output_dir=tmp_path / "merged", progress=False,
                         **params)
    merged_model = hf_merge.merge(base, folders, method, progress=False, **params)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    torch.testing.assert_close(logits("bert", reloaded), logits("bert", merged_model), rtol=1e-4, atol=1e-5)
    assert hf_merge.MergeConfig.from_pretrained(out).method == method


def test_merge_adapters_adds_a_merged_adapter_like_add_weighted_adapter(tmp_path):
    from peft import LoraConfig

    base = tiny_bert()
    peft_model, _ = _adapter(base, tmp_path, "x", 1, r=4, lora_alpha=8, target_modules=["query", "value"])
    peft_model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    _randomize_lora(peft_model, 5)
    expected = hf_merge.merge(base, [peft_model], "task_arithmetic", scaling=1.0, progress=False)  # both adapters
    merged = hf_merge.merge_adapters(peft_model, ["default", "other"], "task_arithmetic", scaling=1.0,
                                     adapter_name="merged")
    assert "merged" in peft_model.peft_config and max(merged.ranks.values()) == 8
    peft_model.set_adapter("merged")
    torch.testing.assert_close(logits("bert", peft_model.eval()), logits("bert", expected), rtol=1e-4, atol=1e-5)


def test_rank_option_truncates_every_module(tmp_path):
    base = tiny_bert()
    folders = [_adapter(base, tmp_path, f"a{i}", i, r=4, target_modules=["query"])[1] for i in range(3)]
    adapter = hf_merge.merge(base, folders, "task_arithmetic", scaling=1.0, output="lora", rank=5, progress=False)
    assert set(adapter.ranks.values()) == {5}
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        hf_merge.merge(base, folders, "task_arithmetic", scaling=1.0, output="lora", rank=0, progress=False)


def test_lora_output_of_full_models_needs_a_rank_or_an_energy(tmp_path):
    base = tiny_bert()  # full models are extracted (tests/test_extract_lora.py): a rank or an energy is required
    with pytest.raises(ValueError, match="output='lora' of full fine-tuned models"):
        hf_merge.merge(base, [copy.deepcopy(base)], "task_arithmetic", scaling=1.0, output="lora", progress=False)


def test_merged_adapter_loads_with_transformers_load_adapter(tmp_path):
    base = tiny_bert()
    folders = [_adapter(base, tmp_path, f"a{i}", i, r=4, target_modules=["query", "value"])[1] for i in range(2)]
    out = hf_merge.merge(base, folders, "task_arithmetic", scaling=0.7, output="lora", output_dir=tmp_path / "m",
                         progress=False)
    model = copy.deepcopy(base)
    model.load_adapter(str(out), adapter_name="merged")
    expected = hf_merge.merge(base, folders, "task_arithmetic", scaling=0.7, progress=False)
    torch.testing.assert_close(logits("bert", model.eval()), logits("bert", expected), rtol=1e-4, atol=1e-5)
