"""The PEFT-style API: configs, registry, TaskVector, merge_with, parameter classifier, import time."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import hf_merge
from hf_merge import ParamKind, TaskVector
from tests.tiny_models import FACTORIES, finetuned_copy


# ------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize(
    "config",
    [
        hf_merge.AverageConfig(weights={"a": 1.0, "b": 2.0}),
        hf_merge.TaskArithmeticConfig(scaling=0.3),
        hf_merge.TiesConfig(density=0.1, scope="tensor", aggregate="sum"),
        hf_merge.DareConfig(drop_rate=0.9, seed=7, then=hf_merge.TiesConfig(density=0.5)),
    ],
)
def test_configs_round_trip_through_dict_and_merge_config_json(config, tmp_path):
    assert hf_merge.MergeConfig.from_dict(config.to_dict()) == config
    config.save_pretrained(tmp_path)
    assert (tmp_path / "merge_config.json").is_file()
    assert hf_merge.MergeConfig.from_pretrained(tmp_path) == config
    assert type(config).from_pretrained(tmp_path) == config


def test_config_from_dict_rejects_unknown_parameters():
    with pytest.raises(ValueError, match=r"Unknown parameter\(s\) \['dens'\] for method 'ties'"):
        hf_merge.MergeConfig.from_dict({"method": "ties", "dens": 0.2})


def test_registry_maps_every_method_name_to_config_and_merger():
    for name in ("average", "task_arithmetic", "ties", "dare"):
        config_cls, merger_cls = hf_merge.MERGE_METHODS[name]
        assert config_cls.method_name() == name
        assert merger_cls.config_class is config_cls


def test_get_merger_accepts_a_name_with_overrides_or_a_config():
    merger = hf_merge.get_merger("ties", density=0.5)
    assert merger.config == hf_merge.TiesConfig(density=0.5)
    assert hf_merge.get_merger(hf_merge.TiesConfig(), scaling=2.0).config.scaling == 2.0


def test_overrides_are_validated_like_the_config():
    with pytest.raises(ValueError, match="density"):
        hf_merge.merge({"w": torch.zeros(1)}, [{"w": torch.ones(1)}], hf_merge.TiesConfig(), density=2.0)


# ------------------------------------------------------------------------------------------ TaskVector
def test_task_vector_arithmetic_matches_the_tensors(tmp_path):
    base = FACTORIES["bert"]()
    a, b = finetuned_copy(base, 1), finetuned_copy(base, 2)
    b.save_pretrained(tmp_path / "b")
    tv_a, tv_b = TaskVector(base, a), TaskVector(base, tmp_path / "b")  # model and folder inputs
    key = "bert.encoder.layer.0.attention.self.query.weight"
    delta_a = a.state_dict()[key] - base.state_dict()[key]
    delta_b = b.state_dict()[key] - base.state_dict()[key]
    torch.testing.assert_close((tv_a + tv_b)[key], delta_a + delta_b)
    torch.testing.assert_close((tv_a - tv_b)[key], delta_a - delta_b)
    torch.testing.assert_close((0.5 * tv_a)[key], 0.5 * delta_a)
    torch.testing.assert_close((-tv_a)[key], -delta_a)
    torch.testing.assert_close(sum([tv_a, tv_b])[key], delta_a + delta_b)


def test_task_vector_applied_with_unit_scaling_recovers_the_finetuned_model():
    base = FACTORIES["gpt2"]()
    finetuned = finetuned_copy(base, 3)
    restored = TaskVector(base, finetuned).apply_to(base)
    for key, value in finetuned.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value, rtol=0, atol=1e-6)
    assert restored is not base


def test_sum_of_task_vectors_applied_equals_task_arithmetic():
    base = FACTORIES["llama"]()
    fts = [finetuned_copy(base, s) for s in (1, 2, 3)]
    via_vectors = sum(TaskVector(base, f) for f in fts).apply_to(base, scaling=0.3)
    via_merge = hf_merge.merge(base, fts, "task_arithmetic", scaling=0.3, progress=False)
    for key, value in via_merge.state_dict().items():
        torch.testing.assert_close(via_vectors.state_dict()[key], value, rtol=0, atol=1e-6)


def test_task_vector_refuses_mismatched_models():
    with pytest.raises(ValueError, match="Shape mismatch"):
        TaskVector({"w": torch.zeros(2)}, {"w": torch.zeros(3)})


# ------------------------------------------------------------------------------------------ merge_with
def test_merge_with_is_attached_to_every_pretrained_model():
    from transformers import PreTrainedModel

    assert PreTrainedModel.merge_with is hf_merge.merge_with
    base = FACTORIES["vit"]()
    fts = {"a": finetuned_copy(base, 1), "b": finetuned_copy(base, 2)}
    merged = base.merge_with(fts, hf_merge.TiesConfig(density=0.5), progress=False)
    expected = hf_merge.merge(base, fts, hf_merge.TiesConfig(density=0.5), progress=False)
    for key, value in expected.state_dict().items():
        assert torch.equal(merged.state_dict()[key], value)


def test_merge_with_a_separate_base_treats_self_as_a_finetuned_model():
    base = FACTORIES["bert"]()
    a, b = finetuned_copy(base, 1), finetuned_copy(base, 2)
    merged = a.merge_with([b], "average", base=base, progress=False)
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, (a.state_dict()[key] + b.state_dict()[key]) / 2)


def test_merge_with_attaches_when_transformers_is_imported_after_hf_merge():
    code = (
        "import sys, hf_merge; assert 'transformers.modeling_utils' not in sys.modules; "
        "import transformers; assert transformers.PreTrainedModel.merge_with is hf_merge.merge_with"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_is_lazy_and_does_not_pull_heavy_libraries():
    code = (
        "import sys, hf_merge; heavy = [m for m in ('transformers', 'peft', 'accelerate', 'evaluate', 'torch') "
        "if m in sys.modules]; assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------ classifier
def test_classifier_reads_kinds_and_blocks_from_the_modules():
    infos = hf_merge.classify_parameters(FACTORIES["gpt2"]())
    c_attn = infos["transformer.h.1.attn.c_attn.weight"]
    assert c_attn.kind is ParamKind.LINEAR and c_attn.transposed and (c_attn.block, c_attn.num_blocks) == (1, 2)
    assert infos["transformer.wte.weight"].kind is ParamKind.EMBEDDING
    assert infos["transformer.h.0.ln_1.weight"].kind is ParamKind.NORM
    assert infos["transformer.h.0.attn.c_attn.bias"].kind is ParamKind.VECTOR
    assert infos["transformer.ln_f.weight"].block is None

    llama = hf_merge.classify_parameters(FACTORIES["llama"]())
    assert llama["model.layers.0.input_layernorm.weight"].kind is ParamKind.NORM  # LlamaRMSNorm
    assert llama["model.layers.1.mlp.down_proj.weight"].kind is ParamKind.LINEAR
    assert not llama["model.layers.1.mlp.down_proj.weight"].transposed


def test_classifier_works_on_a_bare_state_dict():
    shapes = {
        "encoder.layers.0.fc.weight": ((4, 4), torch.float32),
        "encoder.layers.3.norm.weight": ((4,), torch.float32),
        "encoder.layers.3.fc.bias": ((4,), torch.float32),
        "embed_tokens.weight": ((10, 4), torch.float32),
        "conv.weight": ((4, 3, 3, 3), torch.float32),
        "counter": ((), torch.int64),
    }
    infos = hf_merge.classify_parameters(shapes, config={"num_hidden_layers": 6})
    assert infos["encoder.layers.0.fc.weight"].kind is ParamKind.LINEAR
    assert infos["encoder.layers.3.norm.weight"].kind is ParamKind.NORM
    assert infos["encoder.layers.3.fc.bias"].kind is ParamKind.VECTOR
    assert infos["embed_tokens.weight"].kind is ParamKind.EMBEDDING
    assert infos["conv.weight"].kind is ParamKind.CONV
    assert infos["counter"].kind is ParamKind.BUFFER
    assert infos["encoder.layers.3.fc.bias"].num_blocks == 6


def test_block_parsing_ignores_other_integer_components():
    shapes = {"model.layers.3.mlp.experts.0.w1.weight": ((4, 4), torch.float32)}
    info = hf_merge.classify_parameters(shapes)["model.layers.3.mlp.experts.0.w1.weight"]
    assert info.block == 3 and info.stack == "model.layers"


def test_checkpoint_folders_are_classified_from_their_architecture(tmp_path):
    model = FACTORIES["vit"]()
    model.save_pretrained(tmp_path / "vit")
    from hf_merge.inputs import classify_sources
    from hf_merge.io import open_source

    infos = classify_sources(open_source(tmp_path / "vit"), {})
    query = "vit.encoder.layer.1.attention.attention.query.weight"  # the on-disk name
    assert infos[query].kind is ParamKind.LINEAR and infos[query].block == 1 and infos[query].num_blocks == 2
    assert infos["vit.embeddings.patch_embeddings.projection.weight"].kind is ParamKind.CONV
