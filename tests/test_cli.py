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
