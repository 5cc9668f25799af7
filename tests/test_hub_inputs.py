"""Hub repo ids as merge inputs, task banks and configs, downloaded with the real huggingface_hub client.

The Hub is unreachable here: downloads go to :class:`tests.hub_server.HubTestServer` on 127.0.0.1 (``HF_ENDPOINT``
points at it), and offline mode is lifted only while a server runs. Every download goes to a cache folder of the test
(``cache_dir=``), so no test sees another's cache.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_merge
from hf_merge.hub.resolve import MODEL_FILES, cached_repo, resolve_model
from tests.helpers import assert_same_state, state_of
from tests.hub_server import HubTestServer
from tests.test_faults import leftovers, snapshot
from tests.tiny_models import finetuned_copy, tiny_bert

pytestmark = pytest.mark.filterwarnings("ignore:The model card has no license")  # the test inputs declare none
TOKEN = "hf_test"
TASK_ARITHMETIC = {"config": "task_arithmetic", "scaling": 0.5, "progress": False}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Local checkpoints: a tiny BERT base, fine-tuned copies and a LoRA adapter of it."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("checkpoints")
    base = tiny_bert()
    base.save_pretrained(root / "base")
    for seed, name in ((1, "ft1"), (2, "ft2"), (3, "ft2_main")):
        finetuned_copy(base, seed).save_pretrained(root / name)
    adapter = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]))
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    adapter.save_pretrained(root / "lora")
    return {path.name: path for path in root.iterdir()}


@contextlib.contextmanager
def online_hub(monkeypatch: pytest.MonkeyPatch, folders: dict[str, Path]) -> Iterator[HubTestServer]:
    """A running test Hub with the checkpoints published (``org/ft2``: ``main`` and branch ``v1`` differ), offline
    mode lifted and ``HF_ENDPOINT`` pointing at it."""
    import huggingface_hub.constants

    with HubTestServer(token=TOKEN) as server, monkeypatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        patch.setenv("HF_ENDPOINT", server.endpoint)
        for repo_id, folder in (("org/base", "base"), ("org/ft1", "ft1"), ("org/ft2", "ft2_main"), ("org/lora", "lora")):
            server.publish(repo_id, folders[folder])
        server.publish("org/ft2", folders["ft2"], revision="v1")
        server.publish("org/private", folders["ft1"], private=True)
        yield server


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, folders: dict[str, Path]) -> Iterator[HubTestServer]:
    with online_hub(monkeypatch, folders) as server:
        yield server


def head(hub: HubTestServer, repo_id: str, revision: str = "main") -> str:
    return hub.repos[repo_id].heads[revision]


def merge(base: Any, models: Any, out: Path, **options: Any) -> Path:
    return Path(hf_merge.merge(base, models, output_dir=out, **{**TASK_ARITHMETIC, **options}))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def record(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "merge_config.json").read_text())


def card_base_models(folder: Path) -> Any:
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md").data.base_model


# ------------------------------------------------------------------------------------------------- merges
def test_a_merge_of_repo_ids_equals_the_merge_of_local_folders_and_records_them(hub, folders, tmp_path) -> None:
    cache = tmp_path / "cache"
    out = merge("org/base", ["org/ft1", "org/ft2@v1"], tmp_path / "hub", cache_dir=cache, token=TOKEN)
    local = merge(folders["base"], [folders["ft1"], folders["ft2"]], tmp_path / "local")
    assert_same_state(weights(out), weights(local))
    assert record(out)["inputs"] == {
        "base": {"repo_id": "org/base", "commit": head(hub, "org/base")},
        "models": {"task_0": {"repo_id": "org/ft1", "commit": head(hub, "org/ft1")},
                   "task_1": {"repo_id": "org/ft2", "commit": head(hub, "org/ft2", "v1")}},
    }
    assert "inputs" not in record(local)  # local paths are not recorded
    assert hf_merge.MergeConfig.from_pretrained(out) == hf_merge.TaskArithmeticConfig(scaling=0.5)
    assert card_base_models(out) == ["org/base", "org/ft1", "org/ft2"]
    assert (out / "config.json").is_file()  # the base's side files came with it
    assert cached_repo(cache / "models--org--ft2" / "snapshots" / head(hub, "org/ft2", "v1")) == (
        "org/ft2", head(hub, "org/ft2", "v1"))


@pytest.mark.parametrize("schema", ["hf_merge", "mergekit"])
def test_both_recipe_schemas_take_repo_ids_from_the_command_line(hub, folders, tmp_path, monkeypatch, schema) -> None:
    import yaml

    from hf_merge.cli import main

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    if schema == "hf_merge":
        recipe = {"method": "task_arithmetic", "base": "org/base", "models": ["org/ft1", "org/ft2@v1"],
                  "parameters": {"scaling": 0.5}, "cache_dir": "cache"}
    else:
        recipe = {"merge_method": "task_arithmetic", "base_model": "org/base", "parameters": {"lambda": 0.5},
                  "models": [{"model": "org/ft1", "parameters": {"weight": 1.0}},
                             {"model": "org/ft2@v1", "parameters": {"weight": 1.0}}]}
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "recipe.yml"), str(tmp_path / "out"), "--quiet"]) == 0
    local = merge(folders["base"], [folders["ft1"], folders["ft2"]], tmp_path / "local")
    assert_same_state(weights(tmp_path / "out"), weights(local))
    if schema == "hf_merge":  # cache_dir is a path option, relative to the recipe
        assert (tmp_path / "cache" / "models--org--ft1").is_dir()


def test_repo_ids_mix_with_local_paths_and_take_revisions_from_the_options(hub, folders, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    by_option = merge("org/base", {"a": "org/ft1", "b": "org/ft2"}, tmp_path / "option", cache_dir=cache,
                      revision={"org/ft2": "v1"})
    monkeypatch.chdir(folders["ft2"].parent)
    mixed = merge("org/base", {"a": "org/ft1", "b": "./ft2"}, tmp_path / "mixed", cache_dir=cache)
    main = merge("org/base", {"a": "org/ft1", "b": "org/ft2"}, tmp_path / "main", cache_dir=cache)
    assert_same_state(weights(by_option), weights(mixed))
    assert not torch.equal(weights(main)["classifier.weight"], weights(mixed)["classifier.weight"])
    assert record(by_option)["inputs"]["models"]["b"]["commit"] == head(hub, "org/ft2", "v1")
    assert list(record(mixed)["inputs"]["models"]) == ["a"]
    assert card_base_models(mixed) == ["org/base", "org/ft1"]  # the local folder is no Hub id
    pinned = merge("org/base", {"a": "org/ft1", "b": f"org/ft2@{head(hub, 'org/ft2', 'v1')}"}, tmp_path / "pinned",
                   cache_dir=cache, revision="main")  # one revision for all; an input's own wins
    assert_same_state(weights(pinned), weights(mixed))


def test_a_lora_adapter_repo_id_is_a_fine_tuned_input(hub, folders, tmp_path) -> None:
    merged = hf_merge.merge("org/base", ["org/lora"], "task_arithmetic", scaling=1.0, progress=False,
                            cache_dir=tmp_path / "cache")
    expected = hf_merge.merge(folders["base"], [folders["lora"]], "task_arithmetic", scaling=1.0, progress=False)
    assert_same_state(state_of(merged), state_of(expected))
    assert merged.merge_inputs["hub"]["models"]["task_0"] == {"repo_id": "org/lora", "commit": head(hub, "org/lora")}
    assert merged.merge_inputs["models"] == {"task_0": "org/lora"}


def test_a_private_repo_needs_the_token(hub, folders, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"task 'task_0'.*'org/private'.*no repo org/private .*token="):
        merge("org/base", ["org/private"], tmp_path / "out", cache_dir=tmp_path / "cache")
    out = merge("org/base", ["org/private"], tmp_path / "out", cache_dir=tmp_path / "cache", token=TOKEN)
    assert_same_state(weights(out), weights(merge(folders["base"], [folders["ft1"]], tmp_path / "local")))


def test_a_populated_cache_serves_an_offline_merge_with_no_server(folders, tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants

    cache = tmp_path / "cache"
    references = ("org/base", ["org/ft1", "org/ft2@v1"])
    with online_hub(monkeypatch, folders) as hub:
        online = merge(*references, tmp_path / "online", cache_dir=cache)
        endpoint = hub.endpoint
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)  # nothing listens there any more
    offline = merge(*references, tmp_path / "offline", cache_dir=cache)
    assert_same_state(weights(offline), weights(online))
    assert {**record(offline), "summary": None} == {**record(online), "summary": None}  # the run's time differs
    with pytest.raises(FileNotFoundError, match=r"task 'task_0'.*HF_HUB_OFFLINE is set and org/ft1@v1 is not"):
        merge("org/base", ["org/ft1@v1"], tmp_path / "missing", cache_dir=cache)


def test_a_local_folder_named_like_a_repo_id_stays_local(hub, folders, tmp_path, monkeypatch) -> None:
    shutil.copytree(folders["ft2"], tmp_path / "org" / "ft1")
    monkeypatch.chdir(tmp_path)
    out = merge(folders["base"], ["org/ft1"], tmp_path / "out", cache_dir=tmp_path / "cache")
    assert_same_state(weights(out), weights(merge(folders["base"], [folders["ft2"]], tmp_path / "local")))
    assert hub.requests == []


# ------------------------------------------------------------------------------------------ what is downloaded
def test_only_what_a_merge_reads_is_downloaded(hub, folders, tmp_path) -> None:
    extra = {"pytorch_model.bin": b"pickle", "onnx/model.onnx": b"onnx", "train.py": b"print()", "modules.json": b"[]",
             "1_Pooling/config.json": b"{}", "tokenizer.json": b"{}", "vocab.txt": b"a\n", "README.md": b"# card\n",
             "consolidated.safetensors": b"duplicate weights", "2_Dense/model.safetensors": b"dense weights",
             "2_Dense/config.json": b"{}", "onnx/model_quantized.onnx": b"onnx"}
    hub.publish("org/full", {**{p.name: p.read_bytes() for p in folders["base"].iterdir()}, **extra})
    resolved = resolve_model("org/full", cache_dir=tmp_path / "cache")
    assert (resolved.repo_id, resolved.commit) == ("org/full", head(hub, "org/full"))
    files = sorted(p.relative_to(resolved.folder).as_posix() for p in resolved.folder.rglob("*") if p.is_file())
    assert files == ["1_Pooling/config.json", "2_Dense/config.json", "2_Dense/model.safetensors", "README.md",
                     "config.json", "model.safetensors", "modules.json", "tokenizer.json", "vocab.txt"]
    assert "*/model.safetensors" in MODEL_FILES  # a Sentence-Transformers module's own weights


def test_pickle_weights_are_fetched_only_when_allowed(hub, folders, tmp_path) -> None:
    state = load_file(folders["ft1"] / "model.safetensors")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(state, pickled / "pytorch_model.bin")
    (pickled / "config.json").write_bytes((folders["ft1"] / "config.json").read_bytes())
    hub.publish("org/pickled", pickled)
    with pytest.raises(ValueError, match=r"'org/pickled'.*only pickle weights \(pytorch_model.bin\).*allow_pickle"):
        resolve_model("org/pickled", cache_dir=tmp_path / "cache")
    out = merge("org/base", ["org/pickled"], tmp_path / "out", cache_dir=tmp_path / "cache", allow_pickle=True)
    assert_same_state(weights(out), weights(merge(folders["base"], [folders["ft1"]], tmp_path / "local")))


def test_shards_an_index_names_are_fetched_whatever_their_names(hub, folders, tmp_path) -> None:
    state = load_file(folders["ft1"] / "model.safetensors")
    keys = sorted(state)
    parts = {"part-a.safetensors": keys[: len(keys) // 2], "part-b.safetensors": keys[len(keys) // 2:]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name, part in parts.items():
        save_file({k: state[k].contiguous() for k in part}, sharded / name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, part in parts.items() for k in part}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    (sharded / "config.json").write_bytes((folders["ft1"] / "config.json").read_bytes())
    hub.publish("org/sharded", sharded)
    out = merge("org/base", ["org/sharded"], tmp_path / "out", cache_dir=tmp_path / "cache")
    assert_same_state(weights(out), weights(merge(folders["base"], [folders["ft1"]], tmp_path / "local")))


# --------------------------------------------------------------------------------- banks and configs by repo id
def test_task_bank_from_pretrained_by_repo_id_downloads_the_bank_and_its_hub_base(hub, folders, tmp_path) -> None:
    first_cache, cache = tmp_path / "first-cache", tmp_path / "cache"
    bank = hf_merge.compress("org/base", {"a": "org/ft1", "b": "org/ft2@v1"}, "tall_masks", progress=False,
                             output_dir=tmp_path / "bank", cache_dir=first_cache)
    expected = state_of(bank.load_task("b"))
    hub.publish("org/bank", tmp_path / "bank", revision="v2")
    shutil.rmtree(first_cache)  # the bank references its base by the snapshot it was compressed from
    downloaded = hf_merge.TaskBank.from_pretrained("org/bank", revision="v2", cache_dir=cache)
    assert downloaded.tasks == ["a", "b"] and downloaded.config == bank.config
    assert_same_state(state_of(downloaded.load_task("b")), expected)
    assert (cache / "models--org--base" / "snapshots" / head(hub, "org/base")).is_dir()


def test_merge_config_from_pretrained_by_repo_id(hub, folders, tmp_path) -> None:
    out = merge("org/base", ["org/ft1"], tmp_path / "out", cache_dir=tmp_path / "cache", scaling=0.3)
    hub.publish("org/merged", out, revision="v1")
    expected = hf_merge.TaskArithmeticConfig(scaling=0.3)
    assert hf_merge.MergeConfig.from_pretrained("org/merged", revision="v1", cache_dir=tmp_path / "c1") == expected
    assert hf_merge.MergeConfig.from_pretrained("org/merged@v1", cache_dir=tmp_path / "c2") == expected
    assert sorted(p.name for p in (tmp_path / "c2").rglob("snapshots/*/*")) == ["merge_config.json"]


# ------------------------------------------------------------------------------------------------ fault rows
@dataclasses.dataclass
class HubFault:
    """One row of the fault matrix (as in tests/test_faults.py) for Hub inputs: ``setup(tmp, hub, cache) -> action``;
    the action raises ``error`` matching ``message`` and changes nothing under ``tmp``."""

    name: str
    setup: Callable[[Path, HubTestServer, Path], Callable[[], Any]]
    error: type[BaseException]
    message: str


def _merging(*models: str, **options: Any) -> Callable[[Path, HubTestServer, Path], Callable[[], Any]]:
    def setup(tmp: Path, hub: HubTestServer, cache: Path) -> Callable[[], Any]:
        return lambda: merge("org/base", list(models), tmp / "out", **{"cache_dir": cache, **options})
    return setup


def _failing_hub(tmp: Path, hub: HubTestServer, cache: Path) -> Callable[[], Any]:
    hub.fail("info", 503)
    return _merging("org/ft1")(tmp, hub, cache)


def _offline(tmp: Path, hub: HubTestServer, cache: Path) -> Callable[[], Any]:
    import huggingface_hub.constants

    def run() -> None:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
            merge("org/base", ["org/ft1"], tmp / "out", cache_dir=cache)

    return run


def _pickled(tmp: Path, hub: HubTestServer, cache: Path) -> Callable[[], Any]:
    hub.publish("org/pickled", {"config.json": b"{}", "pytorch_model.bin": b"pickle"})
    return _merging("org/pickled")(tmp, hub, cache)


def _local_config(tmp: Path, hub: HubTestServer, cache: Path) -> Callable[[], Any]:
    hf_merge.TaskArithmeticConfig(scaling=0.5).save_pretrained(tmp / "cfg")
    return lambda: hf_merge.MergeConfig.from_pretrained(str(tmp / "cfg"), revision="v1")


def _merge_adapters(tmp: Path, hub: HubTestServer, cache: Path) -> Callable[[], Any]:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"]))
    return lambda: hf_merge.merge_adapters(model, ["default"], "task_arithmetic", scaling=1.0, revision="v1")


HUB_FAULTS = [
    HubFault("Hub repo that does not exist", _merging("org/nope"), FileNotFoundError,
             r"task 'task_0': 'org/nope' is not a local path \(no such file or folder: .*\), and as a Hub repo id: no "
             r"repo org/nope on http://127\.0\.0\.1"),
    HubFault("Hub revision that does not exist", _merging("org/ft1@v9"), FileNotFoundError,
             r"task 'task_0': 'org/ft1@v9' is not a local path .* the repo org/ft1 .* has no revision 'v9'"),
    HubFault("private Hub repo without a token", _merging("org/private"), FileNotFoundError,
             r"no repo org/private .*\(a private repo needs token=\)"),
    HubFault("wrong Hub token", _merging("org/ft1", token="hf_wrong"), OSError,
             r"base: 'org/base' .*as a Hub repo id: downloading org/base from .* failed: .*401"),
    HubFault("Hub answering 503", _failing_hub, FileNotFoundError,
             r"base: 'org/base' .*the Hub \(http://127\.0\.0\.1:\d+\) could not be reached \(HfHubHTTPError: Server "
             r"error '503 Service Unavailable'.*\) and org/base is not \(completely\) in the cache"),
    HubFault("Hub repo not cached while offline", _offline, FileNotFoundError,
             r"base: 'org/base' .*HF_HUB_OFFLINE is set and org/base is not \(completely\) in the cache .*; download "
             r"it once online or unset HF_HUB_OFFLINE"),
    HubFault("neither a local path nor a repo id", _merging("./nowhere/model"), FileNotFoundError,
             r"task 'task_0': './nowhere/model': no such local file or folder .* not tried as a Hub repo id"),
    HubFault("revision naming no input", _merging("org/ft1", revision={"org/ft-1": "v1"}), ValueError,
             r"revision= names \['org/ft-1'\], which are not Hub repo ids among this merge's inputs"),
    HubFault("conflicting revisions", _merging("org/ft2@v1", revision={"org/ft2": "main"}), ValueError,
             r"'org/ft2@v1' names revision 'v1', but revision='main' was given for it"),
    HubFault("malformed revision option", _merging("org/ft1", revision=["v1"]), TypeError,
             r"revision must be a string or a \{reference: revision\} mapping"),
    HubFault("pickle-only Hub repo without allow_pickle", _pickled, ValueError,
             r"the Hub repo org/pickled has only pickle weights \(pytorch_model.bin\).*allow_pickle=True"),
    HubFault("Hub repo without merge_config.json",
             lambda tmp, hub, cache: lambda: hf_merge.MergeConfig.from_pretrained("org/base", cache_dir=cache),
             FileNotFoundError, r"No merge_config.json found at the Hub repo org/base \(commit [0-9a-f]{40}\)"),
    HubFault("Hub repo that is not a task bank",
             lambda tmp, hub, cache: lambda: hf_merge.TaskBank.from_pretrained("org/base", cache_dir=cache),
             FileNotFoundError, r"No task_bank.json in .*models--org--base.*: not a task bank folder"),
    HubFault("revision for a local path", _local_config, ValueError, r"revision='v1' applies to Hub repo ids; .*cfg"),
    HubFault("Hub options for merge_adapters", _merge_adapters, ValueError,
             r"merge_adapters \(its adapters are already loaded\) cannot honour the option\(s\) \['revision'\]"),
]


@pytest.mark.parametrize("fault", HUB_FAULTS, ids=lambda fault: fault.name)
def test_hub_fault(fault: HubFault, hub: HubTestServer, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
                   ) -> None:
    action = fault.setup(tmp_path, hub, tmp_path_factory.mktemp("cache"))
    before = snapshot(tmp_path, None)
    with pytest.raises(fault.error, match=fault.message):
        action()
    assert snapshot(tmp_path, None) == before, "a refused run changed something"
    assert leftovers(tmp_path) == [], "temporary entries left behind"


def test_every_hub_fault_row_has_a_distinct_name() -> None:
    names = [fault.name for fault in HUB_FAULTS]
    assert len(names) == len(set(names))
