"""Bad inputs fail with a clear error that names the culprit, and leave no output folder behind."""

from __future__ import annotations

import pytest
import torch

import hf_merge
from hf_merge import MergeError
from tests.tiny_models import FACTORIES, finetuned_copy


def _no_output(tmp_path) -> None:
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temporary folder left behind"


def _merge_to(tmp_path, base, finetuned, config="task_arithmetic", **kwargs):
    kwargs.setdefault("scaling", 1.0) if config == "task_arithmetic" else None
    return hf_merge.merge(base, finetuned, config, output_dir=tmp_path / "out", progress=False, **kwargs)


def test_missing_and_extra_tensors_are_listed(tmp_path):
    base = {"a": torch.zeros(2), "b": torch.zeros(2)}
    with pytest.raises(MergeError, match=r"task 'task_0'.*missing \['b'\].*extra \['c'\]"):
        _merge_to(tmp_path, base, [{"a": torch.ones(2), "c": torch.ones(2)}])
    _no_output(tmp_path)


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    base = {"layer.weight": torch.zeros(4, 3)}
    with pytest.raises(MergeError, match=r"'layer.weight'.*\(4, 3\).*\(3, 4\)"):
        _merge_to(tmp_path, base, {"math": {"layer.weight": torch.zeros(3, 4)}})
    _no_output(tmp_path)


def test_dtype_mismatch_names_the_tensor_unless_an_output_dtype_is_chosen(tmp_path):
    base = {"w": torch.zeros(4)}
    finetuned = [{"w": torch.ones(4, dtype=torch.bfloat16)}]
    with pytest.raises(MergeError, match=r"dtype mismatch for 'w'.*float32.*bfloat16"):
        _merge_to(tmp_path, base, finetuned)
    _no_output(tmp_path)
    merged = hf_merge.merge(base, finetuned, "task_arithmetic", scaling=1.0, dtype="float32", progress=False)
    assert torch.equal(merged["w"], torch.ones(4))


def test_different_architectures_are_refused(tmp_path):
    bert = FACTORIES["bert"]()
    gpt2 = FACTORIES["gpt2"]()
    with pytest.raises(MergeError, match=r"model_type='bert'.*'gpt2'"):
        _merge_to(tmp_path, bert, [gpt2])
    _no_output(tmp_path)
    from transformers import BertConfig, BertForSequenceClassification

    cfg = bert.config.to_dict() | {"vocab_size": 256}
    bigger_vocab = BertForSequenceClassification(BertConfig(**cfg))
    with pytest.raises(MergeError, match=r"embedding rows differ \(the base 128, input 'task_0' 256\).*no tokenizer"):
        _merge_to(tmp_path, bert, [bigger_vocab])
    _no_output(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_name_the_input_and_tensor(tmp_path, bad):
    base = {f"t{i}": torch.zeros(3) for i in range(4)}
    finetuned = {k: torch.ones(3) for k in base}
    finetuned["t3"] = torch.tensor([0.0, bad, 0.0])
    with pytest.raises(MergeError, match=r"task 'math'.*'t3'.*NaN or Inf"):
        _merge_to(tmp_path, base, {"math": finetuned})
    _no_output(tmp_path)
    with pytest.raises(MergeError, match=r"'t3'.*NaN or Inf"):  # global TIES: found while merging
        _merge_to(tmp_path, base, {"math": finetuned}, config="ties")
    _no_output(tmp_path)


def test_pickle_checkpoints_need_allow_pickle(tmp_path):
    base = FACTORIES["bert"]()
    base.save_pretrained(tmp_path / "base")
    finetuned = finetuned_copy(base, 1)
    (tmp_path / "pickled").mkdir()
    torch.save(finetuned.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pickled.*pytorch_model\.bin.*allow_pickle=True"):
        _merge_to(tmp_path, tmp_path / "base", [tmp_path / "pickled"])
    _no_output(tmp_path)
    merged = hf_merge.merge(tmp_path / "base", [tmp_path / "pickled"], "task_arithmetic", scaling=1.0,
                            allow_pickle=True, progress=False)
    for key, value in finetuned.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[key], value, rtol=0, atol=1e-6)


def test_missing_checkpoint_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"task 'task_0'.*nowhere"):
        _merge_to(tmp_path, {"w": torch.zeros(1)}, [tmp_path / "nowhere"])
    _no_output(tmp_path)


def test_a_failing_merge_keeps_an_existing_output_folder_intact(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "previous.txt").write_text("keep me")
    with pytest.raises(MergeError):
        _merge_to(tmp_path, {"w": torch.zeros(2)}, [{"w": torch.tensor([0.0, float("nan")])}], overwrite=True)
    assert (tmp_path / "out" / "previous.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("ties", {"density": 0.0}, "density"),
        ("ties", {"density": 1.5}, "density"),
        ("ties", {"scope": "layer"}, "scope"),
        ("ties", {"aggregate": "max"}, "aggregate"),
        ("ties", {"scaling": "big"}, "scaling"),
        ("dare", {"drop_rate": 1.0, "then": hf_merge.TaskArithmeticConfig(scaling=1.0)}, "drop_rate"),
        ("dare", {"drop_rate": -0.1, "then": hf_merge.TaskArithmeticConfig(scaling=1.0)}, "drop_rate"),
        ("dare", {"drop_rate": 0.5, "then": "ties"}, "then"),
        ("average", {"weights": [1.0, -1.0]}, "weights"),
        ("average", {"weights": [0.0, 0.0]}, "weights"),
    ],
)
def test_invalid_config_values_are_refused(method, params, message):
    with pytest.raises((ValueError, TypeError), match=message):
        hf_merge.get_merger(method, **params)


def test_task_arithmetic_needs_an_explicit_scaling():
    with pytest.raises(TypeError, match="scaling"):
        hf_merge.TaskArithmeticConfig()


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"Unknown merge method 'frankenmerge'.*'ties'"):
        hf_merge.merge({"w": torch.zeros(1)}, [{"w": torch.zeros(1)}], "frankenmerge")


def test_average_weights_must_match_the_models():
    with pytest.raises(ValueError, match="2 weights given for 3 models"):
        hf_merge.merge({"w": torch.zeros(1)}, [{"w": torch.zeros(1)}] * 3, "average", weights=[1, 2], progress=False)


def test_non_finite_value_in_a_later_piece_of_a_checkpoint_names_the_input(monkeypatch, tmp_path):
    from safetensors.torch import save_file

    from hf_merge.tuning import TUNING

    monkeypatch.setattr(TUNING, "combine_chunk", 4)
    poisoned = torch.ones(3, 5)
    poisoned[2, 4] = float("nan")  # in the fourth piece of four elements
    for name, state in {"base": {"w": torch.zeros(3, 5)}, "ok": {"w": torch.ones(3, 5)}, "bad": {"w": poisoned}}.items():
        (tmp_path / name).mkdir()
        save_file(state, tmp_path / name / "model.safetensors")
    with pytest.raises(MergeError, match=r"bad.*'w'.*NaN or Inf"):
        hf_merge.merge(tmp_path / "base", [tmp_path / "ok", tmp_path / "bad"], "task_arithmetic", scaling=0.5,
                       output_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
