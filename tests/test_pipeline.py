"""The shape of the package: every route runs through one engine call into one sink, under one set of options."""

from __future__ import annotations

import pytest
import torch
import yaml

import hf_merge
from hf_merge import engine
from hf_merge.cli import main
from hf_merge.io import open_source
from hf_merge.tuning import TUNING
from tests.tiny_models import finetuned_copy, logits, tiny_bert


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    base = tiny_bert()
    base.save_pretrained(root / "base")
    for seed in (1, 2):
        finetuned_copy(base, seed).save_pretrained(root / f"ft{seed}")
    return root


@pytest.fixture
def engine_runs(monkeypatch):
    """Every stream through the engine, recorded as the name of the sink it went to."""
    runs: list[str] = []
    original = engine._stream

    def spy(plan, ctx, sink):
        runs.append(type(sink).__name__)
        return original(plan, ctx, sink)

    monkeypatch.setattr(engine, "_stream", spy)
    return runs


def test_every_front_door_streams_through_the_one_engine_run(folders, tmp_path, engine_runs):
    from transformers import BertForSequenceClassification

    from hf_merge.training.merge_step import merge_round

    base, fts = folders / "base", [folders / "ft1", folders / "ft2"]
    hf_merge.merge(base, fts, "ties", output_dir=tmp_path / "merged", progress=False)
    model = BertForSequenceClassification.from_pretrained(base)
    model.merge_with(fts, "task_arithmetic", scaling=0.5, progress=False)
    hf_merge.TaskVector(base, fts[0]).apply_to(base)
    bank = hf_merge.compress(base, {"a": fts[0], "b": fts[1]}, "tsv_c", progress=False)
    bank.load_task("a")
    source = open_source(base)
    state = {key: source.get(key).clone() for key in source.keys()}
    tuned = {k: v + 0.01 for k, v in state.items() if v.is_floating_point()}
    live = {k: v.clone() for k, v in state.items() if v.is_floating_point()}
    merge_round(hf_merge.get_merger(hf_merge.TiesConfig()), live, {k: state[k] for k in live},
                {"a": tuned, "b": tuned}, 0.5, 1, model)
    assert engine_runs == ["FolderSink", "ModelSink", "ModelSink", "BankSink", "ModelSink", "TensorsSink"]


def test_the_search_function_is_not_replaced_by_its_submodule():
    from hf_merge.search import SearchResult

    assert callable(hf_merge.search) and hf_merge.search.__name__ == "search"
    assert SearchResult.__module__ == "hf_merge.search"


@pytest.mark.parametrize(
    ("route", "option"),
    [("folder", "device_map"), ("bank", "dtype"), ("lora", "max_shard_size"), ("state_dict", "offload_folder")],
)
def test_an_output_refuses_by_name_an_option_it_cannot_honour(folders, tmp_path, route, option):
    base, fts = folders / "base", [folders / "ft1", folders / "ft2"]
    values = {"device_map": {"": "cpu"}, "dtype": "bfloat16", "max_shard_size": "1MB", "offload_folder": tmp_path}
    with pytest.raises(ValueError, match=rf"cannot honour the option\(s\) \['{option}'\]"):
        if route == "folder":
            hf_merge.merge(base, fts, "ties", output_dir=tmp_path / "out", progress=False, **{option: values[option]})
        elif route == "bank":
            hf_merge.compress(base, fts, "tsv_c", output_dir=tmp_path / "out", progress=False,
                              **{option: values[option]})
        elif route == "lora":
            from peft import LoraConfig, get_peft_model

            adapter = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"]))
            adapter.save_pretrained(tmp_path / "adapter")
            hf_merge.merge(base, [tmp_path / "adapter"], "task_arithmetic", scaling=1.0, output="lora",
                           progress=False, **{option: values[option]})
        else:
            state = {"w": torch.zeros(3)}
            hf_merge.merge(state, [{"w": torch.ones(3)}], "average", progress=False, **{option: values[option]})
    assert not (tmp_path / "out").exists()


def test_a_small_placement_budget_places_the_result_without_limiting_the_merge(tmp_path):
    base = tiny_bert()
    fts = [finetuned_copy(base, seed) for seed in (1, 2)]
    placed = hf_merge.merge(base, fts, "ties", device_map="auto", max_memory={"cpu": "20KB"},
                            offload_folder=tmp_path / "offload", progress=False)
    assert "disk" in set(placed.hf_device_map.values())  # the result did not fit the budget and was offloaded
    plain = hf_merge.merge(base, fts, "ties", progress=False)
    torch.testing.assert_close(logits("bert", placed), logits("bert", plain), rtol=0, atol=0)


def test_merge_with_accepts_the_keywords_of_merge(folders, tmp_path):
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(folders / "base")
    path = model.merge_with([folders / "ft1", folders / "ft2"], "ties", output_dir=tmp_path / "merged",
                            dtype="bfloat16", max_shard_size="20KB", progress=False)
    assert path == str(tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors.index.json").is_file()  # sharded as asked
    reloaded = BertForSequenceClassification.from_pretrained(path)
    assert reloaded.bert.embeddings.word_embeddings.weight.dtype == torch.bfloat16


def test_the_cli_takes_every_merge_option_as_a_yaml_key(folders, tmp_path, capsys):
    spec = {"method": "ties", "base": str(folders / "base"), "models": [str(folders / "ft1"), str(folders / "ft2")],
            "output": "merged", "max_shard_size": "20KB", "memory_budget": "64MB"}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(spec))
    assert main(["merge", str(tmp_path / "merge.yaml"), "--quiet"]) == 0
    assert (tmp_path / "merged" / "model.safetensors.index.json").is_file()
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**spec, "max_shardsize": "1GB"}))
    assert main(["merge", str(tmp_path / "bad.yaml")]) == 2
    error = capsys.readouterr().err
    assert "unknown key(s) ['max_shardsize']" in error and "'max_shard_size'" in error


def test_the_engine_returns_freed_memory_between_tensors(monkeypatch):
    calls = []
    monkeypatch.setattr(engine, "release_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr(TUNING, "release_every", 1)
    base = {"a": torch.zeros(4), "b": torch.zeros(2, 2), "steps": torch.zeros((), dtype=torch.int64)}
    hf_merge.merge(base, [{k: v + 1 for k, v in base.items()}], "average", progress=False)
    assert len(calls) == 2  # after each floating-point tensor


def test_task_vectors_and_mergers_say_what_they_are(folders):
    vector = 0.5 * hf_merge.TaskVector(folders / "base", folders / "ft1")
    assert repr(vector).startswith("TaskVector(") and "0.5" in repr(vector)
    config = hf_merge.TiesConfig(density=0.3)
    assert repr(hf_merge.get_merger(config)) == f"TiesMerger({config!r})"
    assert repr(config).startswith("TiesConfig(method='ties', density=0.3, scaling=1.0, scope='global'")


def test_a_warning_points_at_the_users_line():
    import warnings

    base = {"w": torch.zeros(3, 2)}
    models = [{"w": torch.ones(3, 2)}, {"w": -torch.ones(3, 2)}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf_merge.merge(base, models, "consensus", k=3, progress=False)  # k > T: a warning
    (warning,) = [w for w in caught if "exceeds the number of tasks" in str(w.message)]
    assert warning.filename == __file__


@pytest.mark.parametrize("method, options", [("ties", {"memory_budget": "1GB"}), ("ties", {}), ("tsv_m", {})])
def test_a_merge_shows_one_progress_bar_and_none_without_progress(monkeypatch, method, options):
    import tqdm.auto

    bars = []
    original = tqdm.auto.tqdm

    def counted(*args, **kwargs):
        bar = original(*args, **kwargs, disable=True)
        bars.append(bar)
        return bar

    monkeypatch.setattr(tqdm.auto, "tqdm", counted)
    generator = torch.Generator().manual_seed(0)
    base = {f"layer{i}.w": torch.randn(6, 5, generator=generator) for i in range(3)}
    models = [{k: v + torch.randn(v.shape, generator=generator) for k, v in base.items()} for _ in range(2)]
    hf_merge.merge(base, models, method, progress=True, **options)  # statistics passes + the merge itself
    assert len(bars) == 1 and bars[0].total >= len(base)
    bars.clear()
    hf_merge.merge(base, models, method, progress=False, **options)
    assert bars == []


@pytest.mark.parametrize("method, route", [("task_arithmetic", "linear"), ("slerp", "Gram"), ("ties", "one pass"),
                                           ("iso_c", "per tensor")])
def test_every_merge_logs_a_one_line_summary_with_its_route(folders, caplog, method, route):
    models = [folders / "ft1"] if method == "slerp" else [folders / "ft1", folders / "ft2"]
    with caplog.at_level("INFO", logger="hf_merge"):
        parameters = {"slerp": {"t": 0.5}, "task_arithmetic": {"scaling": 0.3}}.get(method, {})
        hf_merge.merge(folders / "base", models, method, progress=False, **parameters)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("hf_merge: merged")]
    assert f"merged {len(models) + 1} inputs with {method} ({route} route)" in line and "GB read" in line


def test_the_summary_is_stored_in_merge_config_json_and_skipped_when_loading(folders, tmp_path):
    import json

    out = hf_merge.merge(folders / "base", [folders / "ft1", folders / "ft2"], "task_arithmetic", scaling=0.3,
                         output_dir=tmp_path / "out", progress=False)
    summary = json.loads((tmp_path / "out" / "merge_config.json").read_text())["summary"]
    assert summary["method"] == "task_arithmetic" and summary["route"] == "linear" and summary["inputs"] == 3
    assert summary["tensors"] > 0 and summary["output_bytes"] > 0 and summary["seconds"] >= 0
    assert hf_merge.MergeConfig.from_pretrained(out) == hf_merge.TaskArithmeticConfig(scaling=0.3)


def test_progress_false_silences_transformers_loading_bar_too(folders, capfd, monkeypatch):
    from transformers.utils import logging as transformers_logging

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    transformers_logging.enable_progress_bar()
    capfd.readouterr()
    merged = hf_merge.merge(folders / "base", [folders / "ft1"], "task_arithmetic", scaling=0.3, progress=False)
    assert isinstance(merged, torch.nn.Module)  # a model loaded from the base folder
    captured = capfd.readouterr()
    assert "Loading" not in captured.err and "%|" not in captured.err
    assert transformers_logging.is_progress_bar_enabled()  # put back as it was
    hf_merge.merge(folders / "base", [folders / "ft1"], "task_arithmetic", scaling=0.3, progress=True)
    assert "Loading" in capfd.readouterr().err  # with progress on, the same merge shows it
