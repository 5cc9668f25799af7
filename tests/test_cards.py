"""Card metadata users control (``license=``, ``tags=``, ``base_model={input: hub_id}``) on ``merge``, the YAML recipe,
``push_to_hub`` and ``hf-merge push``; merged-adapter, task-bank and ATM cards; and the Hub's metadata rules.

Every generated card is checked offline with huggingface_hub's own parsers (``metadata_load``, ``ModelCard``,
``ModelCardData`` round trip) and against the Hub's model-card fields (:func:`assert_valid_card`): the Hub's own
validation (``ModelCard.validate``) needs the network. Pushes go to :class:`tests.hub_server.HubTestServer`.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import hf_merge
from hf_merge.hub import build_model_card
from hf_merge.hub.cards import ADAPTER_PIPELINE_TAGS, adapter_pipeline_tag, check_publishable
from hf_merge.hub.cli_push import card_inputs
from hf_merge.hub.provenance import BASE_MODEL_RELATIONS, HUB_LICENSES, CardMetadata
from tests import tiny_models
from tests.helpers import run_push_cli
from tests.hub_server import HubTestServer

TOKEN = "hf_test"
BERT = "google-bert/bert-base-uncased"
#: The model-card metadata fields of the Hub's spec (https://huggingface.co/docs/hub/model-cards#model-card-metadata,
#: huggingface_hub's ModelCardData) that hf-merge may write.
HUB_CARD_FIELDS = {
    "language", "license", "license_name", "license_link", "library_name", "tags", "datasets", "metrics",
    "base_model", "base_model_relation", "pipeline_tag", "model-index", "new_version", "inference", "widget",
}
PIPELINE_TAGS = {"text-classification", "token-classification", "question-answering", "fill-mask", "text-generation",
                 "text2text-generation", "feature-extraction", "image-classification"}


# ------------------------------------------------------------------------------------------------ helpers
def assert_valid_card(text: str | bytes, tmp_path: Path) -> dict[str, Any]:
    """The card's metadata, after checking it with huggingface_hub's offline parsers and the Hub's field rules."""
    from huggingface_hub import ModelCard, ModelCardData
    from huggingface_hub.repocard import metadata_load
    from huggingface_hub.utils import validate_repo_id

    text = text.decode("utf-8") if isinstance(text, bytes) else text
    path = tmp_path / "card_check" / "README.md"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text, encoding="utf-8")
    metadata = metadata_load(path)
    assert isinstance(metadata, dict) and metadata
    ModelCard(text)  # strict parse: a bad model-index raises
    assert ModelCardData(**copy.deepcopy(metadata)).to_dict() == metadata  # round trip through the Hub's own class
    assert set(metadata) <= HUB_CARD_FIELDS, set(metadata) - HUB_CARD_FIELDS
    if "license" in metadata:
        assert metadata["license"] in HUB_LICENSES
    assert isinstance(metadata.get("tags", []), list) and all(isinstance(t, str) and t for t in metadata.get("tags", []))
    base_models = metadata.get("base_model", [])
    for base in [base_models] if isinstance(base_models, str) else base_models:
        validate_repo_id(base)
        assert not os.path.isabs(base) and not Path(base).exists(), base
    if "base_model_relation" in metadata:
        assert metadata["base_model_relation"] in BASE_MODEL_RELATIONS
    assert metadata.get("library_name", "transformers") in {"transformers", "peft"}
    assert metadata.get("pipeline_tag", "text-classification") in PIPELINE_TAGS
    return metadata


def save_with_license(model: torch.nn.Module, folder: Path, license: str | None = "mit") -> Path:
    model.save_pretrained(folder)
    if license is not None:
        (folder / "README.md").write_text(f"---\nlicense: {license}\n---\n")
    return folder


def make_adapter(base: torch.nn.Module, folder: Path, seed: int, task_type: str | None = "SEQ_CLS") -> Path:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["query"], task_type=task_type))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """A tiny BERT base and two fine-tuned copies as local folders, all declaring MIT."""
    root = tmp_path_factory.mktemp("card_inputs")
    base = tiny_models.tiny_bert()
    base_dir = save_with_license(base, root / "bert-base")
    tasks = {name: save_with_license(tiny_models.finetuned_copy(base, seed), root / f"bert-{name}")
             for seed, name in enumerate(("sst2", "mnli"), start=1)}
    return base_dir, tasks


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A tiny BERT base folder and two SEQ_CLS LoRA adapters of it."""
    root = tmp_path_factory.mktemp("card_adapters")
    base = tiny_models.tiny_bert()
    base_dir = save_with_license(base, root / "bert-base")
    return base_dir, [make_adapter(base, root / f"adapter{seed}", seed) for seed in (1, 2)]


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with HubTestServer(token=TOKEN) as server:
        yield server


def readme(folder: str | Path) -> str:
    return (Path(folder) / "README.md").read_text(encoding="utf-8")




def no_local_paths(text: str | bytes, *paths: Path) -> bool:
    text = text.decode("utf-8") if isinstance(text, bytes) else text
    return not any(str(path) in text for path in paths)


# ------------------------------------------------------------------------------------------------ merged models
def test_merge_keywords_set_license_tags_and_base_model_of_the_card(inputs, tmp_path) -> None:
    base_dir, tasks = inputs
    with pytest.warns(UserWarning, match=r"base_model leaves out mnli .*bert-mnli.*local folder is not a Hub id"):
        out = hf_merge.merge(base_dir, tasks, "ties", density=0.5, output_dir=tmp_path / "out", progress=False,
                             license="apache-2.0", tags=["my-tag", "glue"],
                             base_model={str(base_dir): BERT, "sst2": "me/bert-sst2"})
    metadata = assert_valid_card(readme(out), tmp_path)
    assert metadata["license"] == "apache-2.0"  # the user's, over the inputs' MIT
    assert metadata["tags"] == ["merge", "hf-merge", "ties", "my-tag", "glue"]
    assert metadata["base_model"] == [BERT, "me/bert-sst2"]  # mnli maps to nothing: left out, not its folder name
    assert metadata["base_model_relation"] == "merge"
    assert no_local_paths(readme(out), base_dir, *tasks.values())
    assert f"bert-base (on the Hub: `{BERT}`)" in readme(out)  # the inputs table says which id it was published as


def test_an_unmapped_local_folder_is_left_out_of_base_model_with_a_warning_naming_it(inputs, tmp_path) -> None:
    base_dir, tasks = inputs
    with pytest.warns(UserWarning, match="local folder is not a Hub id") as caught:
        card = build_model_card(hf_merge.TiesConfig(), {"base": str(base_dir), "models": {k: str(v) for k, v in
                                                                                           tasks.items()}})
    message = next(str(w.message) for w in caught if "Hub id" in str(w.message))
    assert all(name in message for name in ("base", "sst2", "mnli", str(base_dir)))
    assert "base_model=" in message
    metadata = assert_valid_card(str(card), tmp_path)
    assert "base_model" not in metadata and metadata["base_model_relation"] == "merge"
    assert "bert-base" not in json.dumps(metadata)  # a folder name is not published as if it were a Hub id


def test_hub_inputs_are_listed_by_repo_id_without_a_mapping(tmp_path) -> None:
    from huggingface_hub import constants

    snapshot = Path(constants.HF_HUB_CACHE) / "models--org--ft" / "snapshots" / ("b" * 40)
    snapshot.mkdir(parents=True)
    merge_inputs = {"base": "org/base", "models": {"a": str(snapshot), "b": None},
                    "hub": {"base": {"repo_id": "org/base", "commit": "c" * 40}}}
    card = build_model_card(hf_merge.TaskArithmeticConfig(scaling=0.5), merge_inputs, license="mit",
                            base_model={"b": "org/in-memory-b"})
    metadata = assert_valid_card(str(card), tmp_path)
    assert metadata["base_model"] == ["org/base", "org/ft", "org/in-memory-b"]


def test_base_model_keys_name_inputs_by_path_task_name_or_trailing_path(inputs) -> None:
    base_dir, tasks = inputs
    merge_inputs = {"base": str(base_dir), "models": {k: str(v) for k, v in tasks.items()}}
    for key in (str(base_dir), "base", "bert-base", f"{base_dir.parent.name}/bert-base", f"{base_dir}/"):
        assert CardMetadata(base_model={key: BERT}).for_inputs(merge_inputs).base_model == {"base": BERT}, key
    assert CardMetadata(base_model={"mnli": "me/m"}).for_inputs(merge_inputs).base_model == {"mnli": "me/m"}


def test_yaml_recipe_keys_set_the_card_metadata(inputs, tmp_path) -> None:
    import yaml

    from hf_merge.cli import main

    base_dir, tasks = inputs
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "method": "task_arithmetic", "parameters": {"scaling": 0.5}, "base": str(base_dir),
        "models": {name: str(path) for name, path in tasks.items()}, "output": "merged",
        "license": "cc-by-4.0", "tags": ["yaml-tag"],
        "base_model": {"bert-base": BERT, "sst2": "me/sst2", "mnli": "me/mnli"},  # relative key: the folder name
    }, sort_keys=False))
    assert main(["merge", str(recipe), "--quiet"]) == 0
    metadata = assert_valid_card(readme(tmp_path / "merged"), tmp_path)
    assert metadata["license"] == "cc-by-4.0"
    assert metadata["tags"][-1] == "yaml-tag"
    assert metadata["base_model"] == [BERT, "me/sst2", "me/mnli"]


def test_save_pretrained_adds_to_the_metadata_given_to_merge(inputs, tmp_path) -> None:
    base_dir, tasks = inputs
    merged = hf_merge.merge(base_dir, tasks, "ties", density=0.5, progress=False, tags=["from-merge"],
                            base_model={"base": BERT, "sst2": "me/sst2", "mnli": "me/mnli"})
    folder = merged.save_pretrained(tmp_path / "saved", license="mit", tags=["from-save"],
                                    base_model={"mnli": "me/mnli-v2"})
    metadata = assert_valid_card(readme(folder), tmp_path)
    assert metadata["license"] == "mit" and metadata["tags"][-2:] == ["from-merge", "from-save"]
    assert metadata["base_model"] == [BERT, "me/sst2", "me/mnli-v2"]  # given later wins per input


def test_push_to_hub_publishes_license_tags_and_base_model(hub, inputs, tmp_path) -> None:
    base_dir, tasks = inputs
    merged = hf_merge.merge(base_dir, tasks, "ties", density=0.5, progress=False, license="apache-2.0",
                            base_model={"base": BERT})
    with pytest.warns(UserWarning, match="leaves out"):  # the tasks stay local folders
        merged.push_to_hub("me/bert-ties", token=TOKEN, endpoint=hub.endpoint, tags=["pushed"],
                           base_model={str(tasks["sst2"]): "me/sst2"})
    assert len(hub.commits) == 1
    files = hub.files("me/bert-ties")
    metadata = assert_valid_card(files["README.md"], tmp_path)
    assert metadata["license"] == "apache-2.0"
    assert "pushed" in metadata["tags"] and "ties" in metadata["tags"]
    assert metadata["base_model"] == [BERT, "me/sst2"]
    assert all(no_local_paths(files[name], base_dir, *tasks.values()) for name in ("README.md", "merge_config.json"))


def test_cli_push_sets_the_metadata_of_the_pushed_card(hub, inputs, tmp_path) -> None:
    base_dir, tasks = inputs
    with pytest.warns(UserWarning, match="leaves out"):
        out = hf_merge.merge(base_dir, tasks, "task_arithmetic", scaling=0.5, output_dir=tmp_path / "m",
                             progress=False)
    before = readme(out)
    code, stdout, _ = run_push_cli(["push", out, "me/cli-card", "--token", TOKEN, "--endpoint", hub.endpoint,
                                    "--license", "apache-2.0", "--tag", "one", "--tag", "two",
                                    "--base-model", f"base={BERT}", "--base-model", f"{tasks['mnli']}=me/mnli"])
    assert code == 0 and stdout.strip().endswith(hub.commits[0].oid)
    pushed = hub.files("me/cli-card")["README.md"].decode()
    metadata = assert_valid_card(pushed, tmp_path)
    assert metadata["license"] == "apache-2.0" and metadata["tags"][-2:] == ["one", "two"]
    assert metadata["base_model"] == [BERT, "me/mnli"]
    assert "License of this merge: `apache-2.0`." in pushed  # the body says it too
    assert readme(out) == before  # the folder itself is not modified
    assert [row[0] for row in card_inputs(before)] == ["base", "sst2", "mnli"]


# ------------------------------------------------------------------------------------------------ fault rows
BAD_METADATA = [
    pytest.param({"license": "MIT"}, ValueError, r"license='MIT' is not a Hub license identifier.*'mit'",
                 id="license-upper-case"),
    pytest.param({"license": "apache2"}, ValueError, r"license='apache2' is not a Hub license.*license='other'",
                 id="license-unknown"),
    pytest.param({"license": 3}, TypeError, r"license must be a Hub license identifier.*3", id="license-not-str"),
    pytest.param({"tags": "merge"}, TypeError, r"tags must be a list of strings, got 'merge'", id="tags-a-string"),
    pytest.param({"tags": ["ok", 7]}, TypeError, r"tags must be a list of strings; 7", id="tags-not-strings"),
    pytest.param({"tags": ["a\nb"]}, ValueError, r"single-line strings.*'a\\nb'", id="tags-multiline"),
    pytest.param({"base_model": {"no-such-input": BERT}}, ValueError,
                 r"base_model\['no-such-input'\] names no input of this merge", id="base-model-unknown-input"),
    pytest.param({"base_model": {"sst2": "/home/me/models/sst2"}}, ValueError,
                 r"base_model\['sst2'\] = '/home/me/models/sst2' is not a Hub repo id \(it is a local path\)",
                 id="base-model-local-path"),
    pytest.param({"base_model": [BERT]}, TypeError, r"base_model must map inputs", id="base-model-not-a-mapping"),
]


@pytest.mark.parametrize(("metadata", "error", "message"), BAD_METADATA)
def test_bad_card_metadata_fails_merge_before_anything_is_written(inputs, tmp_path, metadata, error, message) -> None:
    base_dir, tasks = inputs
    with pytest.raises(error, match=message):
        hf_merge.merge(base_dir, tasks, "ties", output_dir=tmp_path / "out", progress=False, **metadata)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("metadata", "error", "message"), BAD_METADATA)
def test_bad_card_metadata_fails_push_before_anything_is_pushed(hub, inputs, metadata, error, message) -> None:
    base_dir, tasks = inputs
    merged = hf_merge.merge(base_dir, tasks, "ties", progress=False, base_model={"base": BERT})
    with pytest.raises(error, match=message):
        merged.push_to_hub("me/refused", token=TOKEN, endpoint=hub.endpoint, **metadata)
    assert hub.commits == [] and "me/refused" not in hub.repos


@pytest.mark.parametrize(("argv", "message"), [
    (["--license", "Apache-2.0"], "not a Hub license identifier"),
    (["--base-model", "nothing=org/x"], "'nothing' names no input"),
    (["--base-model", "base"], "expected INPUT=HUB_ID"),
    (["--base-model", "base=./local/dir"], "is not a Hub repo id"),
], ids=["license", "unknown-input", "no-equals", "local-path"])
def test_bad_cli_push_metadata_fails_before_anything_is_pushed(hub, inputs, tmp_path, argv, message) -> None:
    base_dir, tasks = inputs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = hf_merge.merge(base_dir, tasks, "ties", output_dir=tmp_path / "m", progress=False)
    with pytest.raises(ValueError, match=message):
        run_push_cli(["push", out, "me/refused", "--token", TOKEN, "--endpoint", hub.endpoint, *argv])
    assert hub.commits == [] and "me/refused" not in hub.repos


def test_a_card_that_would_publish_a_local_path_is_refused(inputs, tmp_path) -> None:
    base_dir, tasks = inputs
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "README.md").write_text(f"---\nbase_model: {base_dir}\n---\n# x\n")
    with pytest.raises(ValueError, match=r"base_model lists .*bert-base.*not a Hub id \(it is a local path\)"):
        check_publishable(folder)
    (folder / "README.md").write_text(f"---\nlicense: mit\n---\nMade from {tasks['sst2']}.\n")
    with pytest.raises(ValueError, match=r"names the input 'sst2' by its local path .*base_model="):
        check_publishable(folder, {"base": str(base_dir), "models": {k: str(v) for k, v in tasks.items()}})


# ------------------------------------------------------------------------------------------------ adapters
@pytest.mark.parametrize(("task_type", "tag"), sorted(ADAPTER_PIPELINE_TAGS.items()))
def test_adapter_task_types_map_to_hub_pipeline_tags(task_type, tag) -> None:
    assert adapter_pipeline_tag(task_type) == tag
    assert adapter_pipeline_tag(None) is None


def test_merged_adapter_card_names_its_base_with_the_adapter_relation(adapters, tmp_path) -> None:
    base_dir, adapter_dirs = adapters
    out = hf_merge.merge(base_dir, adapter_dirs, "task_arithmetic", scaling=1.0, output="lora", progress=False,
                         output_dir=tmp_path / "adapter", base_model={"base": BERT}, tags=["my-adapter"])
    metadata = assert_valid_card(readme(out), tmp_path)
    assert metadata["base_model"] == BERT  # the base, not the adapters
    assert metadata["base_model_relation"] == "adapter"
    assert metadata["pipeline_tag"] == "text-classification"  # SEQ_CLS
    assert metadata["library_name"] == "peft"
    assert {"peft", "lora", "merge", "hf-merge", "task_arithmetic", "my-adapter"} <= set(metadata["tags"])
    config = json.loads((Path(out) / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == BERT  # so AutoPeftModel.from_pretrained in the card finds the base
    assert 'AutoPeftModel.from_pretrained("path/to/this/folder")' in readme(out)


def test_an_adapter_on_a_local_base_without_hub_id_is_not_pushed(hub, adapters, tmp_path) -> None:
    base_dir, adapter_dirs = adapters
    with pytest.warns(UserWarning, match=r"leaves out base"):
        merged = hf_merge.merge(base_dir, adapter_dirs, "task_arithmetic", scaling=1.0, output="lora",
                                progress=False)
        merged.save_pretrained(tmp_path / "local")
    assert json.loads((tmp_path / "local" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        base_dir.absolute())  # loads locally
    with pytest.raises(ValueError, match=r"adapter_config.json names the adapter's base .*local path.*base_model="):
        merged.push_to_hub("me/adapter", token=TOKEN, endpoint=hub.endpoint)
    assert hub.commits == []
    merged.push_to_hub("me/adapter", token=TOKEN, endpoint=hub.endpoint, base_model={str(base_dir): BERT})
    files = hub.files("me/adapter")
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == BERT
    metadata = assert_valid_card(files["README.md"], tmp_path)
    assert metadata["base_model"] == BERT and metadata["base_model_relation"] == "adapter"
    assert all(no_local_paths(data, base_dir) for name, data in files.items() if name.endswith((".json", ".md")))


def test_cli_push_names_an_adapters_base_by_hub_id(hub, adapters, tmp_path) -> None:
    base_dir, adapter_dirs = adapters
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = hf_merge.merge(base_dir, adapter_dirs, "ties", output="lora", progress=False,
                             output_dir=tmp_path / "adapter")
    with pytest.raises(ValueError, match="adapter_config.json names the adapter's base"):
        run_push_cli(["push", out, "me/a", "--token", TOKEN, "--endpoint", hub.endpoint])
    code, _, _ = run_push_cli(["push", out, "me/a", "--token", TOKEN, "--endpoint", hub.endpoint,
                               "--base-model", f"base={BERT}"])
    assert code == 0 and len(hub.commits) == 1
    files = hub.files("me/a")
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == BERT
    assert assert_valid_card(files["README.md"], tmp_path)["base_model"] == BERT


def test_merge_adapters_card_uses_the_hub_id_the_adapters_declare(tmp_path) -> None:
    from peft import LoraConfig, get_peft_model

    base = tiny_models.tiny_bert()
    base.config._name_or_path = base.name_or_path = BERT  # as if loaded with from_pretrained(BERT)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    merged = hf_merge.merge_adapters(model, ["a", "b"], "task_arithmetic", scaling=1.0, license="apache-2.0")
    folder = merged.save_pretrained(tmp_path / "merged")
    metadata = assert_valid_card(readme(folder), tmp_path)
    assert metadata["base_model"] == BERT and metadata["base_model_relation"] == "adapter"
    assert metadata["license"] == "apache-2.0" and metadata["pipeline_tag"] == "text-classification"
    assert json.loads((Path(folder) / "adapter_config.json").read_text())["base_model_name_or_path"] == BERT


# ------------------------------------------------------------------------------------------------ task banks
def test_a_task_bank_on_a_local_base_is_pushed_only_with_its_hub_id(hub, inputs, tmp_path, monkeypatch) -> None:
    base_dir, tasks = inputs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bank = hf_merge.compress(base_dir, tasks, "tall_masks", progress=False, license="mit", tags=["bank"])
    with pytest.raises(ValueError, match=r"stores its base by the local path .*bert-base.*base_model="):
        bank.push_to_hub("me/bank", token=TOKEN, endpoint=hub.endpoint)
    assert hub.commits == [] and "me/bank" not in hub.repos
    bank.push_to_hub("me/bank", token=TOKEN, endpoint=hub.endpoint, base_model={str(base_dir): "org/bert-base"})
    files = hub.files("me/bank")
    manifest = json.loads(files["task_bank.json"])
    assert manifest["base"]["path"] is None and manifest["base"]["repo_id"] == "org/bert-base"
    metadata = assert_valid_card(files["README.md"], tmp_path)
    assert metadata["base_model"] == "org/bert-base" and metadata["license"] == "mit" and "bank" in metadata["tags"]
    assert all(no_local_paths(data, base_dir) for name, data in files.items() if name.endswith((".json", ".md")))

    hub.publish("org/bert-base", base_dir)  # the base on the Hub: the pushed bank loads from there
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    loaded = hf_merge.TaskBank.from_pretrained("me/bank", cache_dir=tmp_path / "cache")
    assert loaded.tasks == ["sst2", "mnli"]
    for key, value in bank.load_task("sst2").state_dict().items():
        torch.testing.assert_close(loaded.load_task("sst2").state_dict()[key], value, rtol=0, atol=0)


def test_task_bank_card_names_an_in_memory_base_by_the_given_hub_id(tmp_path) -> None:
    base = tiny_models.tiny_bert()
    tasks = {"a": tiny_models.finetuned_copy(base, 1), "b": tiny_models.finetuned_copy(base, 2)}
    bank = hf_merge.compress(base, tasks, "tsv_c", progress=False, output_dir=tmp_path / "bank",
                             base_model={"base": BERT}, license="apache-2.0")
    metadata = assert_valid_card(readme(tmp_path / "bank"), tmp_path)
    assert metadata["base_model"] == BERT and metadata["license"] == "apache-2.0"
    assert bank.card.base_model == {"base": BERT}


# ------------------------------------------------------------------------------------------------ ATM
def test_atm_save_model_writes_a_card_and_both_configs(tmp_path) -> None:
    from hf_merge.training import ATMConfig, ATMTrainer
    from tests.test_atm import synthetic_tasks, tiny_classifier, training_args

    model = tiny_classifier()
    model.config._name_or_path = BERT
    atm_config = ATMConfig(rounds=1, steps_per_round=1, merge=hf_merge.TiesConfig(density=0.5, scaling=1.0))
    trainer = ATMTrainer(model, training_args(tmp_path / "run"), task_datasets=synthetic_tasks(2), atm_config=atm_config)
    trainer.train()
    with pytest.raises(ValueError, match="not a Hub license identifier"):
        trainer.save_model(str(tmp_path / "bad"), license="MIT-ish")
    assert not (tmp_path / "bad").exists()
    trainer.save_model(str(tmp_path / "atm"), license="apache-2.0", tags=["atm-run"])
    folder = tmp_path / "atm"
    assert hf_merge.MergeConfig.from_pretrained(folder) == atm_config.merge
    assert ATMConfig.from_pretrained(folder) == atm_config
    metadata = assert_valid_card(readme(folder), tmp_path)
    assert metadata["base_model"] == BERT and metadata["base_model_relation"] == "finetune"
    assert metadata["tags"] == ["hf-merge", "atm", "ties", "atm-run"]
    assert metadata["license"] == "apache-2.0" and metadata["library_name"] == "transformers"
    text = readme(folder)
    assert "`task_0`, `task_1`" in text and "density: 0.5" in text and "rounds: 1" in text
    assert 'ATMConfig.from_pretrained("path/to/this/folder")' in text
