"""Model cards and one-commit Hub pushes, against the real huggingface_hub client and a local test double.

The Hub is unreachable here: pushes go to :class:`tests.hub_server.HubTestServer` on 127.0.0.1, and offline mode is
lifted only inside the ``hub`` fixture (huggingface_hub reads ``constants.HF_HUB_OFFLINE`` at request time).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import hf_merge
from hf_merge.hub import (
    HubPushError,
    RetryPolicy,
    attach_publishing,
    build_model_card,
    push_folder,
    write_card,
)
from hf_merge.hub.cards import TEMPLATE_DIR
from hf_merge.registry import config_class
from tests import tiny_models
from tests.helpers import run_push_cli
from tests.hub_server import DROP_CONNECTION, HubTestServer

TOKEN = "hf_test"
CARD_METHODS = (
    "average", "task_arithmetic", "ties", "dare", "tsv_m", "tsv_c", "consensus", "tall_masks", "iso_c", "iso_cts",
    "lines", "c2m3", "weight_matching", "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "della",
    "della_linear", "breadcrumbs", "breadcrumbs_ties", "sce", "magmax", "wudi", "regmean", "regmean_plus", "fisher",
    "adamerging",
)


class RecordingSleep:
    """A ``sleep`` that records the requested delays instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def fast_retry(max_attempts: int = 4) -> tuple[RetryPolicy, RecordingSleep]:
    sleep = RecordingSleep()
    return RetryPolicy(max_attempts=max_attempts, initial_delay=0.5, multiplier=2.0, max_delay=1.5, sleep=sleep), sleep


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with HubTestServer(token=TOKEN) as server:
        yield server


def save_with_license(model: torch.nn.Module, folder: Path, license: str | None) -> Path:
    from huggingface_hub import ModelCard, ModelCardData

    model.save_pretrained(folder)
    if license is not None:
        ModelCard.from_template(ModelCardData(license=license), template_str="---\n{{ card_data }}\n---\n").save(
            folder / "README.md"
        )
    return folder


@pytest.fixture(scope="module")
def input_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """A tiny BERT base and two fine-tuned copies saved as local folders, all declaring MIT."""
    root = tmp_path_factory.mktemp("inputs")
    base = tiny_models.tiny_bert()
    base_dir = save_with_license(base, root / "bert-base", "mit")
    tasks = {
        name: save_with_license(tiny_models.finetuned_copy(base, seed), root / f"bert-{name}", "mit")
        for seed, name in enumerate(("sst2", "mnli"), start=1)
    }
    return base_dir, tasks


@pytest.fixture(scope="module")
def merged(input_folders: tuple[Path, dict[str, Path]]) -> torch.nn.Module:
    base_dir, tasks = input_folders
    model = hf_merge.merge(base_dir, tasks, "ties", density=0.5, progress=False)
    return attach_publishing(model)


def card_metadata(text: str | bytes) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard(text.decode() if isinstance(text, bytes) else text).data.to_dict()


# ------------------------------------------------------------------------------------------------ cards
def test_card_front_matter_declares_a_merge_of_its_inputs(input_folders, tmp_path) -> None:
    _, tasks = input_folders
    inputs = {"base": "google-bert/bert-base-uncased", "models": {"sst2": str(tasks["sst2"]), "mnli": None}}
    with pytest.warns(UserWarning, match="no license"):
        card = build_model_card(hf_merge.TiesConfig(density=0.3), inputs, model_class="BertForSequenceClassification")
    card.save(tmp_path / "README.md")
    from huggingface_hub import ModelCard

    data = ModelCard.load(tmp_path / "README.md").data.to_dict()
    assert data["base_model"] == "google-bert/bert-base-uncased"  # Hub ids only: a local folder name is not one
    assert data["base_model_relation"] == "merge"
    assert data["tags"][:3] == ["merge", "hf-merge", "ties"]
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-classification"
    assert "license" not in data
    assert str(tasks["sst2"]) not in card.text  # local paths are not published, only folder names


def test_nested_methods_are_tagged_summarised_and_cited() -> None:
    config = hf_merge.DareConfig(drop_rate=0.9, then=hf_merge.TiesConfig())
    card = build_model_card(config, {"base": None, "models": {}}, license="mit")
    assert card.data.tags == ["merge", "hf-merge", "dare", "ties"]
    for name in ("dare", "ties"):
        assert config_class(name).card.summary in card.text
        assert config_class(name).card.bibtex in card.text


def test_card_body_holds_the_exact_merge_config_as_yaml() -> None:
    config = hf_merge.DareConfig(drop_rate=0.7, then=hf_merge.TaskArithmeticConfig(scaling=0.3), seed=11)
    card = build_model_card(config, {"base": None, "models": {}}, license="mit")
    block = re.search(r"```yaml\n(.*?)```", card.text, re.DOTALL)
    assert block is not None
    assert yaml.safe_load(block.group(1)) == config.to_dict()
    assert hf_merge.MergeConfig.from_dict(yaml.safe_load(block.group(1))) == config


@pytest.mark.parametrize(
    ("licenses", "expected"),
    [(("mit", "mit", "mit"), "mit"), (("mit", "apache-2.0", "mit"), None), (("mit", None, "mit"), None)],
    ids=["all-agree", "disagree", "one-unknown"],
)
def test_license_is_inherited_only_when_every_input_declares_the_same(tmp_path, licenses, expected) -> None:
    folders = []
    for i, license in enumerate(licenses):
        folder = tmp_path / f"model{i}"
        folder.mkdir()
        if license is not None:
            (folder / "README.md").write_text(f"---\nlicense: {license}\n---\n")
        folders.append(str(folder))
    inputs = {"base": folders[0], "models": {"a": folders[1], "b": folders[2]}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        card = build_model_card(hf_merge.TaskArithmeticConfig(scaling=0.5), inputs)
    assert card.data.license == expected
    license_warnings = [w for w in caught if "no license" in str(w.message)]
    assert len(license_warnings) == (0 if expected else 1)
    assert build_model_card(hf_merge.TaskArithmeticConfig(scaling=0.5), inputs, license="other").data.license == "other"


def test_hub_input_license_comes_from_the_local_cache_only() -> None:
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / "models--cached-org--cached-model"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (snapshot / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n")
    inputs = {"base": "cached-org/cached-model", "models": {"t": str(snapshot)}}
    card = build_model_card(hf_merge.TaskArithmeticConfig(scaling=1.0), inputs)
    assert card.data.license == "cc-by-4.0"
    assert card.data.base_model == "cached-org/cached-model"  # the cache snapshot path maps back to its Hub id


def test_eval_results_become_model_index_and_a_table(tmp_path) -> None:
    from huggingface_hub import EvalResult, ModelCard

    results = {"sst2": {"accuracy": 0.875, "f1": 0.81}}
    card = build_model_card(
        hf_merge.TaskArithmeticConfig(scaling=0.4), {"base": None, "models": {}}, license="mit",
        pipeline_tag="text-classification", eval_results=results, model_name="bert-ta",
    )
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md").data
    assert loaded.model_name == "bert-ta"
    assert {(r.dataset_name, r.metric_type, r.metric_value) for r in loaded.eval_results} == {
        ("sst2", "accuracy", 0.875), ("sst2", "f1", 0.81),
    }
    assert "| sst2 | — | accuracy | 0.875 |" in card.text
    explicit = EvalResult(task_type="text-classification", dataset_type="glue", dataset_name="GLUE SST-2",
                          metric_type="accuracy", metric_value=0.9, dataset_split="validation")
    card = build_model_card(hf_merge.TiesConfig(), {"base": None, "models": {}}, license="mit",
                            eval_results=[explicit])
    assert card.data.eval_results[0].dataset_split == "validation"
    assert "| GLUE SST-2 | validation | accuracy | 0.9 |" in card.text


def test_eval_results_by_dataset_need_a_task_type() -> None:
    with pytest.raises(ValueError, match="pipeline_tag"):
        build_model_card(hf_merge.TiesConfig(), {"base": None, "models": {}}, license="mit",
                         eval_results={"sst2": {"accuracy": 0.9}})


def test_bad_card_arguments_are_rejected_by_name() -> None:
    inputs = {"base": None, "models": {}}
    with pytest.raises(ValueError, match="library_name"):
        build_model_card(hf_merge.TiesConfig(), inputs, library_name="keras")
    with pytest.raises(ValueError, match="artifact"):
        build_model_card(hf_merge.TiesConfig(), inputs, artifact="dataset")
    with pytest.raises(TypeError, match="merge_config"):
        build_model_card({"density": 0.2}, inputs)
    with pytest.raises(TypeError, match="models"):
        build_model_card(hf_merge.TiesConfig(), {"base": None, "models": ["a", "b"]})


def test_every_registered_method_has_card_text() -> None:
    from hf_merge.registry import MERGE_METHODS, _load_builtin_methods

    _load_builtin_methods()
    built_in = {name for name, (config_cls, _) in MERGE_METHODS.items()
                if config_cls.__module__.startswith("hf_merge.methods.")}
    assert built_in == set(CARD_METHODS)
    assert all(config_class(name).card is not None for name in built_in)


def test_a_method_without_a_card_is_named_with_the_fallback_text() -> None:
    from hf_merge.hub.cards import method_docs

    doc = method_docs("not_a_registered_method")
    assert doc["title"] == "not_a_registered_method" and doc["bibtex"] is None
    assert "outside hf-merge's built-ins" in doc["summary"]


@pytest.mark.parametrize("name", (*CARD_METHODS, "atm"))
def test_every_method_has_a_summary_and_a_citation(name: str) -> None:
    from hf_merge.training import ATMConfig

    info = ATMConfig.card if name == "atm" else config_class(name).card
    assert len(info.summary.split()) >= 30
    assert info.bibtex.startswith("@") and info.bibtex.count("{") == info.bibtex.count("}")
    assert re.search(r"\byear\s*=\s*\{(19|20)\d\d\}", info.bibtex)  # SLERP (1985) and Karcher (1977) are old
    assert info.paper_url.startswith(("https://arxiv.org/abs/", "https://doi.org/", "https://aclanthology.org/"))


def test_task_bank_card_uses_its_template_and_loading_code() -> None:
    card = build_model_card(
        {"method": "tsv_c"}, {"base": "org/base", "models": {"a": "org/a"}}, license="mit",
        artifact="task_bank", repo_id="me/bank",
    )
    assert (TEMPLATE_DIR / "task_bank.md").is_file()
    assert "task bank" in card.text
    assert 'TaskBank.from_pretrained(snapshot_download("me/bank"))' in card.text
    assert 'bank.load_task("a")' in card.text
    assert card.data.library_name is None
    assert card.data.base_model == ["org/base", "org/a"]


# ------------------------------------------------------------------------------------------------ saving
def test_merged_model_save_pretrained_writes_weights_config_and_card(merged, tmp_path) -> None:
    folder = merged.save_pretrained(tmp_path / "out")
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "merge_config.json", "README.md"} <= names
    assert hf_merge.MergeConfig.from_pretrained(folder) == merged.merge_config
    data = card_metadata((folder / "README.md").read_text())
    assert "base_model" not in data  # every input is a local folder: no Hub id to name
    assert data["license"] == "mit"
    assert data["pipeline_tag"] == "text-classification"
    reloaded = type(merged).from_pretrained(folder)
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)


def test_write_card_reads_the_architecture_of_an_engine_checkpoint(input_folders, tmp_path) -> None:
    base_dir, tasks = input_folders
    config = hf_merge.TaskArithmeticConfig(scaling=0.3)
    out = hf_merge.merge(base_dir, tasks, config, output_dir=tmp_path / "ckpt", progress=False)
    inputs = {"base": str(base_dir), "models": {k: str(v) for k, v in tasks.items()}}
    path = write_card(out, config, inputs)
    data = card_metadata(path.read_text())
    assert data["pipeline_tag"] == "text-classification"
    assert "BertForSequenceClassification.from_pretrained" in path.read_text()


def test_publishing_needs_a_merge_record() -> None:
    with pytest.raises(ValueError, match="merge_config"):
        attach_publishing(tiny_models.tiny_bert())


# ------------------------------------------------------------------------------------------------ pushing
def test_push_to_hub_uploads_model_config_and_card_in_one_commit(hub, merged) -> None:
    from safetensors.torch import load

    info = merged.push_to_hub("me/bert-ties", private=True, token=TOKEN, endpoint=hub.endpoint,
                              retry=fast_retry()[0])
    assert len(hub.commits) == 1
    assert info.commit_url.endswith(hub.commits[0].oid)
    files = hub.files("me/bert-ties")
    assert {"config.json", "model.safetensors", "merge_config.json", "README.md"} <= set(files)
    assert hub.repos["me/bert-ties"].private is True
    data = card_metadata(files["README.md"])
    assert data["base_model_relation"] == "merge" and "ties" in data["tags"] and data["license"] == "mit"
    assert 'from_pretrained("me/bert-ties")' in files["README.md"].decode()
    uploaded = load(files["model.safetensors"])
    for key, value in uploaded.items():
        torch.testing.assert_close(value, merged.state_dict()[key], rtol=0, atol=0)


def test_uploaded_card_loads_with_model_card_load(hub, merged, tmp_path) -> None:
    from huggingface_hub import ModelCard

    merged.push_to_hub("me/card-check", token=TOKEN, endpoint=hub.endpoint, retry=fast_retry()[0],
                       eval_results={"sst2": {"accuracy": 0.5}})
    (tmp_path / "README.md").write_bytes(hub.files("me/card-check")["README.md"])
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model_relation == "merge"
    assert [(r.dataset_name, r.metric_value) for r in card.data.eval_results] == [("sst2", 0.5)]


@pytest.mark.parametrize("fault", [503, 500, DROP_CONNECTION], ids=["503", "500", "connection-reset"])
def test_transient_failure_is_retried_and_commits_exactly_once(hub, tmp_path, fault) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\x00\x01")
    (tmp_path / "README.md").write_text("card")
    retry, sleep = fast_retry()
    hub.fail("commit", fault, times=2)
    push_folder(tmp_path, "me/flaky", token=TOKEN, endpoint=hub.endpoint, retry=retry)
    assert hub.count("commit") == 3
    assert len(hub.commits) == 1
    assert hub.files("me/flaky") == {"weights.bin": b"\x00\x01", "README.md": b"card"}
    assert sleep.delays == [0.5, 1.0]  # exponential backoff


def test_gives_up_after_max_attempts_without_committing(hub, tmp_path) -> None:
    (tmp_path / "a.txt").write_text("a")
    retry, sleep = fast_retry(max_attempts=3)
    hub.fail("commit", 502, times=3)
    with pytest.raises(HubPushError, match="3 time") as excinfo:
        push_folder(tmp_path, "me/down", token=TOKEN, endpoint=hub.endpoint, retry=retry)
    assert excinfo.value.status_code == 502
    assert hub.commits == [] and hub.files("me/down") == {}
    assert sleep.delays == [0.5, 1.0]


def test_forbidden_commit_fails_clearly_without_retrying_or_committing(hub, tmp_path) -> None:
    (tmp_path / "a.txt").write_text("a")
    retry, sleep = fast_retry()
    hub.fail("commit", 403)
    with pytest.raises(HubPushError, match="write access") as excinfo:
        push_folder(tmp_path, "me/not-mine", token=TOKEN, endpoint=hub.endpoint, retry=retry)
    assert excinfo.value.status_code == 403
    assert "Nothing was committed" in str(excinfo.value)
    assert hub.count("commit") == 1 and hub.commits == [] and sleep.delays == []


def test_bad_token_fails_clearly(hub, tmp_path) -> None:
    (tmp_path / "a.txt").write_text("a")
    with pytest.raises(HubPushError, match="credentials") as excinfo:
        push_folder(tmp_path, "me/x", token="hf_wrong", endpoint=hub.endpoint, retry=fast_retry()[0])
    assert excinfo.value.status_code == 401
    assert hub.commits == []


def test_offline_mode_fails_at_once(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("a")
    retry, sleep = fast_retry()
    with pytest.raises(HubPushError, match="offline"):
        push_folder(tmp_path, "me/x", token=TOKEN, endpoint="http://127.0.0.1:9", retry=retry)
    assert sleep.delays == []


def test_revision_is_a_branch_created_from_main(hub, tmp_path) -> None:
    (tmp_path / "a.txt").write_text("v1")
    push_folder(tmp_path, "me/branchy", token=TOKEN, endpoint=hub.endpoint)
    (tmp_path / "a.txt").write_text("v2")
    push_folder(tmp_path, "me/branchy", token=TOKEN, endpoint=hub.endpoint, revision="experiment",
                commit_message="try v2")
    assert hub.files("me/branchy") == {"a.txt": b"v1"}
    assert hub.files("me/branchy", "experiment") == {"a.txt": b"v2"}
    assert [c.summary for c in hub.commits][-1] == "try v2"


def test_hidden_files_are_not_uploaded_and_empty_folders_are_refused(hub, tmp_path) -> None:
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "lock").write_text("x")
    with pytest.raises(ValueError, match="no files"):
        push_folder(tmp_path, "me/empty", token=TOKEN, endpoint=hub.endpoint)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("b")
    push_folder(tmp_path, "me/nested", token=TOKEN, endpoint=hub.endpoint)
    assert hub.files("me/nested") == {"sub/b.txt": b"b"}


def test_retry_policy_validates_and_caps_its_delays() -> None:
    policy = RetryPolicy(initial_delay=1.0, multiplier=3.0, max_delay=5.0)
    assert [policy.delay(k) for k in (1, 2, 3)] == [1.0, 3.0, 5.0]
    for bad in ({"max_attempts": 0}, {"initial_delay": -1.0}, {"multiplier": 0.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            dataclasses.replace(policy, **bad)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_push_publishes_a_merge_folder_and_adds_a_missing_card(hub, input_folders, tmp_path) -> None:
    base_dir, tasks = input_folders
    out = hf_merge.merge(base_dir, tasks, "task_arithmetic", scaling=0.5, output_dir=tmp_path / "m", progress=False)
    (Path(out) / "README.md").unlink(missing_ok=True)  # a folder saved without a card
    code, stdout, _ = run_push_cli(["push", out, "me/cli-merge", "--private", "--token", TOKEN,
                                    "--endpoint", hub.endpoint])
    assert code == 0 and stdout.strip() == f"{hub.endpoint}/me/cli-merge/commit/{hub.commits[0].oid}"
    files = hub.files("me/cli-merge")
    assert {"model.safetensors", "config.json", "merge_config.json", "README.md"} <= set(files)
    assert "task_arithmetic" in card_metadata(files["README.md"])["tags"]
    assert not (Path(out) / "README.md").exists()  # the folder itself is not modified
    assert hub.repos["me/cli-merge"].private is True


def test_cli_push_reports_a_refused_push_on_stderr(hub, tmp_path) -> None:
    (tmp_path / "a.txt").write_text("a")
    hub.fail("commit", 403)
    code, _, stderr = run_push_cli(["push", str(tmp_path), "me/denied", "--token", TOKEN, "--endpoint", hub.endpoint])
    assert code == 1
    assert "push failed" in stderr and "403" in stderr
    assert hub.commits == []


def test_task_banks_and_merged_adapters_are_published_with_their_cards(hub, tmp_path) -> None:
    import copy

    from peft import LoraConfig, get_peft_model

    from tests.tiny_models import finetuned_copy, tiny_bert

    base = tiny_bert()
    bank = hf_merge.compress(base, {"a": finetuned_copy(base, 1), "b": finetuned_copy(base, 2)},
                             hf_merge.TSVCompressConfig())
    bank.push_to_hub("me/bank", token=TOKEN, endpoint=hub.endpoint, retry=fast_retry()[0])
    files = hub.files("me/bank")
    assert "task_bank.json" in files and "tsv_c" in card_metadata(files["README.md"])["tags"]

    adapters = []
    for seed in (1, 2):
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["query"]))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(seed)))
        peft_model.save_pretrained(tmp_path / f"adapter{seed}")
        adapters.append(tmp_path / f"adapter{seed}")
    merged_adapter = hf_merge.merge(base, adapters, "task_arithmetic", scaling=1.0, output="lora", progress=False)
    merged_adapter.push_to_hub("me/adapter", token=TOKEN, endpoint=hub.endpoint, retry=fast_retry()[0])
    files = hub.files("me/adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
    assert card_metadata(files["README.md"])["library_name"] == "peft"
    assert len(hub.commits) == 2
