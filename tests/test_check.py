"""The pre-merge check: ``hf_merge.check.check``, ``hf-merge check`` and ``hf-merge merge --dry-run``."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from hf_merge.check import check
from hf_merge.cli import main
from hf_merge.engine import read_ahead_depth, working_set
from hf_merge.errors import MergeError
from hf_merge.options import MergeOptions
from tests.tiny_models import finetuned_copy, tiny_llama


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tied tiny Llama base and two fine-tunes, saved once for the module (tests copy what they change)."""
    root = tmp_path_factory.mktemp("check_models")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    for name, seed in (("ft1", 1), ("ft2", 2)):
        finetuned_copy(base, seed).save_pretrained(root / name)
    return root, base


def _flat(text: str) -> str:
    """``text`` with its line wrapping undone (the report wraps long lines)."""
    return " ".join(text.split())


def _edited_copy(root, name, tmp_path, edit):
    """A copy of checkpoint ``root/name`` whose state dict ``edit`` changed."""
    folder = tmp_path / f"{name}_edited"
    shutil.copytree(root / name, folder)
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _recipe(tmp_path, models, method="ties", name="recipe.yaml", **extra):
    spec = {"method": method, "base": "base", "models": models, "parameters": {"density": 0.5}, **extra}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


# ------------------------------------------------------------------------------------------------ a clean check
def test_clean_check_passes_and_reports_inputs_and_estimates(models, tmp_path, capsys):
    root, _ = models
    report = check(root / "base", {"a": str(root / "ft1"), "b": str(root / "ft2")}, "ties", density=0.5,
                   output_dir=tmp_path / "out")
    assert report.ok and not report.problems, str(report)
    base = report.input("base")
    assert (base.kind, base.architectures, base.model_type, base.vocab_size) == (
        "checkpoint", ["LlamaForCausalLM"], "llama", 128)
    assert base.tie_word_embeddings is True and base.head_stored is False and base.embedding_shape == (128, 32)
    assert base.dtypes == {"float32": base.num_tensors}
    assert report.input("a").missing_keys == [] and report.input("a").shape_mismatches == {}
    estimate = report.estimate
    assert estimate["output_bytes"] == base.stored_bytes  # float32 in, float32 out
    assert estimate["largest_tensor"] == "model.embed_tokens.weight"
    assert estimate["working_set_bytes"] == (3 + 3) * 128 * 32 * 4 and estimate["peak_bytes"] == 2 * (6 * 128 * 32 * 4)
    assert estimate["bytes_read"] == 3 * base.stored_bytes and estimate["read_rate_assumed"]
    text = _flat(str(report))
    assert text.startswith("hf-merge check: OK") and "LlamaForCausalLM (llama)" in text and "peak" in text
    assert not (tmp_path / "out").exists()
    json.dumps(report.to_dict())  # JSON-serialisable

    path = _recipe(root, {"a": "ft1", "b": "ft2"}, name="clean.yaml")
    assert main(["check", str(path)]) == 0
    assert "hf-merge check: OK" in capsys.readouterr().out
    assert main(["check", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and data["method"] == "ties" and data["errors"] == []
    assert [item["name"] for item in data["inputs"]] == ["base", "a", "b"]


def test_engine_working_set_is_the_budget_read_ahead_depth_enforces(models):
    root, base = models
    from hf_merge.io import open_source

    source = open_source(str(root / "base"))
    metas = {key: source.meta(key) for key in source.keys()}
    _, working = working_set(metas, 3)
    assert read_ahead_depth(metas, 3, MergeOptions(memory_budget=working)) == 0
    with pytest.raises(MergeError):
        read_ahead_depth(metas, 3, MergeOptions(memory_budget=working - 1))


# ------------------------------------------------------------------------------------------------ blocking problems
def _missing_key(root, tmp_path):
    folder = _edited_copy(root, "ft1", tmp_path, lambda state: state.pop("model.layers.1.mlp.up_proj.weight"))
    return {"models": {"ft": str(folder)}}, "'model.layers.1.mlp.up_proj.weight'"


def _shape_mismatch(root, tmp_path):
    def edit(state):
        state["model.norm.weight"] = torch.ones(33)

    return {"models": {"ft": str(_edited_copy(root, "ft1", tmp_path, edit))}}, "'model.norm.weight' (32,) vs (33,)"


def _vocab_size(root, tmp_path):
    from transformers import LlamaForCausalLM

    config = copy.deepcopy(LlamaForCausalLM.config_class.from_pretrained(root / "base"))
    config.vocab_size = 130
    LlamaForCausalLM(config).save_pretrained(tmp_path / "big_vocab")
    return {"models": {"ft": str(tmp_path / "big_vocab")}}, "vocabulary of 130 tokens, the base 128"


def _bad_config(root, tmp_path):
    return {"models": {"ft": str(root / "ft1")}, "parameters": {"density": 2.0}}, "density must be in (0, 1]"


def _missing_input(root, tmp_path):
    return {"models": {"ft": str(root / "ft1"), "gone": str(tmp_path / "no_such_model")}}, "no_such_model"


@pytest.mark.parametrize("problem", [_missing_key, _shape_mismatch, _vocab_size, _bad_config, _missing_input],
                         ids=["missing_key", "shape_mismatch", "vocab_size", "bad_config", "missing_input"])
def test_blocking_problems_are_named_and_fail_the_command(models, tmp_path, capsys, problem):
    root, _ = models
    given, named = problem(root, tmp_path)
    parameters = given.get("parameters", {"density": 0.5})
    report = check(str(root / "base"), given["models"], {"method": "ties", **parameters})
    assert not report.ok
    assert any(named in error.message for error in report.errors), str(report)
    assert "BLOCKED" in str(report) and named in _flat(str(report))

    spec = {"method": "ties", "base": str(root / "base"), "models": given["models"], "parameters": parameters}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(spec))
    assert main(["check", str(tmp_path / "recipe.yaml")]) == 1
    assert named in _flat(capsys.readouterr().out)


def test_other_blocking_problems(models, tmp_path):
    root, _ = models
    inputs = {"a": str(root / "ft1")}
    assert "Unknown merge method 'tise'" in check(root / "base", inputs, "tise").errors[0].message
    small = check(root / "base", inputs, "ties", memory_budget="1KB")
    assert [e.topic for e in small.errors] == ["memory"] and "largest tensor" in small.errors[0].message
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    taken = check(root / "base", inputs, "ties", output_dir=tmp_path / "taken")
    assert [e.topic for e in taken.errors] == ["output"] and "notes.txt" in taken.errors[0].message
    assert check(root / "base", inputs, "ties", output_dir=tmp_path / "taken", overwrite=True).ok
    weights = check(root / "base", inputs, "task_arithmetic", scaling=1.0, weights={"b": 1.0})
    assert "weights" in weights.errors[0].message and "'a'" in weights.errors[0].message
    whole = check(root / "base", inputs, "weight_matching")
    assert not whole.ok and "without a base" in whole.errors[0].message


def test_mixed_dtypes_block_without_an_output_dtype(models, tmp_path):
    root, base = models
    finetuned_copy(base, 3).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    report = check(root / "base", {"half": str(tmp_path / "bf16")}, "ties")
    assert [e.topic for e in report.errors] == ["dtypes"] and "bfloat16" in report.errors[0].message


# ------------------------------------------------------------------------------------------------ warnings
def test_warnings_do_not_fail_the_command(models, tmp_path, capsys):
    root, base = models
    from transformers import LlamaForCausalLM

    finetuned_copy(base, 3).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    config = copy.deepcopy(base.config)
    config.tie_word_embeddings = False
    untied = LlamaForCausalLM(config)
    state = finetuned_copy(base, 4).state_dict()
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    untied.load_state_dict(state)
    untied.save_pretrained(tmp_path / "untied")
    shutil.copytree(root / "base", tmp_path / "base")
    shutil.copytree(root / "ft1", tmp_path / "tok")
    (tmp_path / "base" / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    (tmp_path / "tok" / "tokenizer.json").write_text('{"model": {"vocab": {"b": 0}}}')
    models_ = {"half": "bf16", "untied": "untied", "tok": "tok"}
    path = _recipe(tmp_path, models_, dtype="bfloat16")

    assert main(["check", str(path)]) == 0
    out = _flat(capsys.readouterr().out)
    report = check(str(tmp_path / "base"), {k: str(tmp_path / v) for k, v in models_.items()}, "ties", density=0.5,
                   dtype="bfloat16")
    assert report.ok, str(report)
    topics = {(w.topic, w.input) for w in report.warnings}
    assert topics == {("dtypes", "half"), ("ties", "untied"), ("tokenizer", "tok")}
    assert report.input("untied").head_stored is True and report.input("untied").tie_word_embeddings is False
    assert report.config_differences["tie_word_embeddings"]["untied"] is False
    assert report.estimate["output_dtypes"] == ["bfloat16"]
    for text in ("written as bfloat16", "'lm_head.weight' separately", "tokenizer files that differ", "OK"):
        assert text in out


# ------------------------------------------------------------------------------------------------ LoRA inputs
def test_lora_adapter_input_shows_targets_rank_and_alpha(models, tmp_path):
    from peft import LoraConfig, get_peft_model

    root, base = models
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                                rank_pattern={"v_proj": 2}))
    peft_model.save_pretrained(tmp_path / "adapter")
    report = check(root / "base", {"full": str(root / "ft1"), "style": str(tmp_path / "adapter")}, "ties")
    assert report.ok, str(report)
    lora = report.input("style").lora
    assert report.input("style").kind == "LoRA adapter"
    assert (lora["target_modules"], lora["r"], lora["lora_alpha"], lora["ranks"]) == (["q_proj", "v_proj"], 4, 16,
                                                                                      [2, 4])
    assert lora["targeted_tensors"] == sorted(f"model.layers.{i}.self_attn.{m}_proj.weight" for i in (0, 1)
                                              for m in "qv")
    text = _flat(str(report))
    assert "r=4" in text and "alpha=16" in text and "q_proj, v_proj" in text


def test_lora_adapter_that_does_not_fit_the_base_is_blocking(models, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    root, base = models
    config = copy.deepcopy(base.config)
    config.hidden_size, config.intermediate_size = 64, 128
    other = LlamaForCausalLM(config)
    get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    report = check(root / "base", {"style": str(tmp_path / "adapter")}, "task_arithmetic", scaling=1.0)
    assert not report.ok and "q_proj" in report.errors[0].message

    get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "dora")
    config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    report = check(root / "base", {"a": str(root / "ft1"), "dora": str(tmp_path / "dora")}, "ties")
    assert [(e.topic, e.input) for e in report.errors] == [("inputs", "dora")] and "DoRA" in report.errors[0].message
    assert report.input("a").opened and report.estimate  # the other inputs are still checked


# ------------------------------------------------------------------------------------------------ reads no data
def test_nothing_reads_tensor_data(models, tmp_path, monkeypatch):
    import safetensors.torch
    from peft import LoraConfig, get_peft_model

    from hf_merge.io.safetensors_file import SafetensorsFile
    from hf_merge.io.sources import FolderSource, TensorSource

    root, base = models
    get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")

    def refuse(*args, **kwargs):
        raise AssertionError("tensor data read")

    for owner, name in ((TensorSource, "get"), (FolderSource, "_read"), (FolderSource, "flat_array"),
                        (FolderSource, "iter_chunks"), (FolderSource, "read_blocks"), (SafetensorsFile, "read"),
                        (SafetensorsFile, "read_range"), (SafetensorsFile, "map_array"),
                        (safetensors.torch, "load_file")):
        monkeypatch.setattr(owner, name, refuse)
    report = check(root / "base", {"a": str(root / "ft1"), "lora": str(tmp_path / "lora")}, "ties",
                   output_dir=tmp_path / "out")
    assert report.ok, str(report)
    assert report.input("lora").lora["r"] == 2
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ the CLI
def test_dry_run_writes_nothing(models, tmp_path, capsys):
    root, _ = models
    out = tmp_path / "merged"
    path = _recipe(tmp_path, {"a": str(root / "ft1")}, base=str(root / "base"), output="merged")
    assert main(["merge", str(path), "--dry-run"]) == 0
    assert "hf-merge check: OK" in capsys.readouterr().out and not out.exists()
    bad = _recipe(tmp_path, {"a": str(root / "ft1"), "b": str(tmp_path / "missing")}, base=str(root / "base"),
                  name="bad.yaml", output="merged")
    assert main(["merge", str(bad), "--dry-run"]) == 1
    assert "missing" in capsys.readouterr().out and not out.exists()
    recipe = {"merge_method": "ties", "base_model": str(root / "base"),
              "models": [{"model": str(root / "ft1"), "parameters": {"weight": 1.0, "density": 0.5}}]}
    (tmp_path / "mergekit.yml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "mergekit.yml"), str(out), "--dry-run"]) == 0
    assert not out.exists()
    assert main(["merge", str(tmp_path / "mergekit.yml"), "--dry-run"]) == 2  # as merge: OUT_DIR required
    assert "give the output folder" in capsys.readouterr().err


def test_mergekit_recipes_are_checked(models, tmp_path, capsys):
    root, _ = models
    recipe = {"merge_method": "dare_ties", "base_model": str(root / "base"), "dtype": "bfloat16",
              "models": [{"model": str(root / "ft1"), "parameters": {"weight": 0.5, "density": 0.5}},
                         {"model": str(root / "ft2"), "parameters": {"weight": 0.5, "density": 0.7}}]}
    (tmp_path / "ok.yml").write_text(yaml.safe_dump(recipe))
    assert main(["check", str(tmp_path / "ok.yml"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["method"] == "dare" and data["estimate"]["output_dtypes"] == ["bfloat16"]
    assert sorted(item["name"] for item in data["inputs"]) == sorted(["base", str(root / "ft1"), str(root / "ft2")])

    union = {**recipe, "tokenizer_source": "union"}
    (tmp_path / "union.yml").write_text(yaml.safe_dump(union))
    assert main(["check", str(tmp_path / "union.yml")]) == 1
    out = _flat(capsys.readouterr().out)
    assert "tokenizer_source 'union'" in out and "no tokenizer files" in out and "Method: dare" in out

    gone = {**recipe, "models": [*recipe["models"], {"model": "./gone", "parameters": {"weight": 1.0}}]}
    (tmp_path / "gone.yml").write_text(yaml.safe_dump(gone))
    assert main(["check", str(tmp_path / "gone.yml")]) == 1
    assert "'./gone': no such local folder" in _flat(capsys.readouterr().out)


def test_recipes_that_cannot_be_read_are_usage_errors(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"method": "ties", "models": ["a"], "outptu": "x"}))
    assert main(["check", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown key(s) ['outptu']" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "none.yaml")]) == 2
