"""The ``hf-merge`` command line."""

from __future__ import annotations

import torch
import yaml

from hf_merge.cli import main
from tests.tiny_models import FACTORIES, finetuned_copy


def test_merge_command_writes_a_checkpoint_from_a_yaml_file(tmp_path, capsys):
    base = FACTORIES["bert"]()
    base.save_pretrained(tmp_path / "base")
    for name, seed in (("sst2", 1), ("mnli", 2)):
        finetuned_copy(base, seed).save_pretrained(tmp_path / name)
    spec = {
        "method": "dare",
        "base": "base",
        "models": {"sst2": "sst2", "mnli": "mnli"},
        "parameters": {"drop_rate": 0.5, "then": {"method": "ties", "density": 0.5}},
        "output": "merged",
        "dtype": "bfloat16",
    }
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(spec))
    assert main(["merge", str(tmp_path / "merge.yaml"), "--quiet"]) == 0
    from transformers import BertForSequenceClassification

    merged = BertForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert merged.bert.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    saved = yaml.safe_load((tmp_path / "merged" / "merge_config.json").read_text())
    assert saved["then"]["method"] == "ties" and saved["drop_rate"] == 0.5
    assert capsys.readouterr().out == ""


def test_merge_command_reports_bad_yaml_keys(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"method": "ties", "models": [], "outptu": "x"}))
    assert main(["merge", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown key(s) ['outptu']" in capsys.readouterr().err


def test_methods_command_lists_methods_and_defaults(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "ties" in out and "density=0.2" in out and "scaling=<required>" in out


def _base_and_task(tmp_path):
    base = FACTORIES["gpt2"]()
    base.save_pretrained(tmp_path / "base")
    finetuned_copy(base, 1).save_pretrained(tmp_path / "ft")


def test_out_dir_overrides_the_output_key_and_stands_in_for_it(tmp_path, capsys, monkeypatch):
    _base_and_task(tmp_path)
    spec = {"method": "task_arithmetic", "base": "base", "models": {"ft": "ft"}, "parameters": {"scaling": 0.5},
            "output": "merged"}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(spec))
    assert main(["merge", str(tmp_path / "merge.yaml"), str(tmp_path / "elsewhere"), "--quiet"]) == 0
    assert (tmp_path / "elsewhere" / "config.json").is_file() and not (tmp_path / "merged").exists()
    del spec["output"]
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)  # OUT_DIR is relative to the working directory, not to the YAML file
    assert main(["merge", "merge.yaml", "relative"]) == 0
    assert (tmp_path / "relative" / "config.json").is_file()
    assert "with task_arithmetic into" in capsys.readouterr().out
    assert main(["merge", "merge.yaml"]) == 2
    assert "missing required key 'output'" in capsys.readouterr().err


def test_merge_command_tells_the_two_recipe_schemas_apart(tmp_path, capsys):
    _base_and_task(tmp_path)
    recipe = {"merge_method": "task_arithmetic", "base_model": "base", "models": [{"model": "ft",
                                                                                   "parameters": {"weight": 0.5}}]}
    (tmp_path / "mergekit.yml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "mergekit.yml"), str(tmp_path / "out")]) == 0
    assert "mergekit's task_arithmetic (hf_merge task_arithmetic)" in capsys.readouterr().out
    saved = yaml.safe_load((tmp_path / "out" / "merge_config.json").read_text())
    assert (saved["method"], saved["scaling"], saved["weights"]) == ("task_arithmetic", 1.0, {"ft": 0.5})
    del recipe["merge_method"]
    recipe["merge_methd"] = "task_arithmetic"  # a typo: still told apart by base_model, and named
    (tmp_path / "typo.yml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "typo.yml"), str(tmp_path / "out2")]) == 2
    assert "unknown key(s) ['merge_methd'] (did you mean 'merge_method'?)" in capsys.readouterr().err
    (tmp_path / "neither.yml").write_text(yaml.safe_dump({"models": ["ft"], "output": "x"}))
    assert main(["merge", str(tmp_path / "neither.yml")]) == 2
    assert "'method' (hf_merge's recipe) or 'merge_method' (mergekit's)" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists() and not (tmp_path / "x").exists()
