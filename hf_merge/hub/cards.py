"""Model cards for merge artifacts, rendered from the Jinja templates in ``hf_merge/model_cards/`` (package data).

The YAML front matter is built with ``huggingface_hub.ModelCardData`` and the card with
``ModelCard.from_template``; nothing here writes YAML metadata by hand. What the card says:

- front matter: ``base_model`` (Hub ids only: those of Hub inputs and those ``base_model={input: hub_id}`` maps
  local or in-memory inputs to; a local folder mapped to nothing is left out with a warning, see
  :mod:`hf_merge.hub.provenance`), ``base_model_relation`` (``merge``; ``adapter`` for a merged LoRA adapter, whose
  ``base_model`` is its base model, not the adapters; ``finetune`` for an ATM-trained model), ``tags`` (``merge``,
  ``hf-merge``, the method names, ``peft`` and ``lora`` for adapters, then the user's ``tags``), ``library_name``,
  ``license`` (the user's, else inherited only when every input's license is known and all agree),
  ``pipeline_tag`` when known (from the model class, or an adapter's PEFT ``task_type``), ``model-index`` when
  evaluation results are given;
- body: what was merged and how, each method's summary and BibTeX, the exact merge config as YAML, the inputs
  table, the evaluation table and how to load the artifact; a method's card may name its own template (a layer
  stack's, ``stacked_model.md``, tabulates its slices from the config, given to templates as ``merge_config``); an
  adapter extracted from full weights (:mod:`hf_merge.extract`) is rendered from ``extracted_adapter.md``: what it was
  extracted from, the ranks and energy kept per kind of module, what was saved whole or left out.

Inputs and their licenses are read offline (:mod:`hf_merge.hub.provenance`). Each method's title, summary and BibTeX
come from its config's :attr:`~hf_merge.MergeConfig.card`.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .provenance import (
    CARD_NAME,
    CardMetadata,
    InputRecord,
    describe_origin,
    hub_id_problem,
    inherited_license,
    input_records,
    published_base_models,
)

#: The templates ship inside the package, so every kind of install (``--user``, ``--target``, a system Python) has them.
TEMPLATE_DIR = Path(str(importlib.resources.files("hf_merge") / "model_cards"))
TEMPLATES = {"model": "merged_model.md", "adapter": "merged_model.md", "task_bank": "task_bank.md",
             "atm": "atm_model.md"}
#: The template of an adapter extracted from full weights (:mod:`hf_merge.extract`).
EXTRACTED_ADAPTER_TEMPLATE = "extracted_adapter.md"
ARTIFACT_LIBRARIES = {"model": "transformers", "adapter": "peft", "task_bank": None, "atm": "transformers"}
#: The Hub's ``base_model_relation`` of each artifact to the models it lists as ``base_model``.
RELATIONS = {"model": "merge", "adapter": "adapter", "task_bank": "merge", "atm": "finetune"}
LIBRARY_NAMES = ("transformers", "peft")
BASE_TAGS = ("merge", "hf-merge")
ADAPTER_TAGS = ("peft", "lora")
ADAPTER_CONFIG_NAME = "adapter_config.json"
#: PEFT ``task_type`` → Hub pipeline tag.
ADAPTER_PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_CLS": "text-classification",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}
# Architecture-name suffix → Hub pipeline tag, for the unambiguous heads.
_PIPELINE_SUFFIXES = (
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForImageClassification", "image-classification"),
    ("ForAudioClassification", "audio-classification"),
    ("ForObjectDetection", "object-detection"),
    ("ForSemanticSegmentation", "image-segmentation"),
)


def infer_pipeline_tag(architecture: str | None) -> str | None:
    """The Hub pipeline tag of a transformers class name when its head determines it (else ``None``)."""
    if not architecture:
        return None
    return next((tag for suffix, tag in _PIPELINE_SUFFIXES if architecture.endswith(suffix)), None)


def adapter_pipeline_tag(task_type: str | None) -> str | None:
    """The Hub pipeline tag of a PEFT ``task_type`` (``"CAUSAL_LM"`` → ``"text-generation"``, ...), else ``None``."""
    return ADAPTER_PIPELINE_TAGS.get(str(task_type).upper()) if task_type else None


def method_names(config: Mapping[str, Any]) -> list[str]:
    """Every method named in a (possibly nested, e.g. DARE → TIES, or a layer stack's slices) merge config dict,
    outermost first."""
    names = [config["method"]] if isinstance(config.get("method"), str) else []
    for value in config.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, Mapping):
                names += [n for n in method_names(item) if n not in names]
    return names


def method_docs(name: str) -> dict[str, Any]:
    """What the card says about method ``name``: its config's :attr:`~hf_merge.MergeConfig.card`, or a line saying it
    is not one of hf-merge's built-ins (a name not registered, or a config without a card)."""
    from ..registry import config_class

    try:
        card = config_class(name).card
    except ValueError:
        card = None
    if card is None:
        return {"name": name, "title": name, "summary": "A method registered outside hf-merge's built-ins.",
                "bibtex": None, "paper_url": None}
    return {"name": name, **dataclasses.asdict(card)}


def _config_dict(merge_config: Any) -> dict[str, Any]:
    from ..config import MergeConfig

    if isinstance(merge_config, MergeConfig):
        return merge_config.to_dict()
    if isinstance(merge_config, Mapping) and isinstance(merge_config.get("method"), str):
        return dict(merge_config)
    raise TypeError(
        f"merge_config must be a MergeConfig or a dict with a 'method' key, got {type(merge_config).__name__}."
    )


def _eval_results(eval_results: Any, pipeline_tag: str | None) -> list[Any]:
    """``EvalResult``s from EvalResults, dicts of EvalResult fields, or ``{dataset: {metric: value}}``."""
    from huggingface_hub import EvalResult

    if isinstance(eval_results, Mapping):
        if pipeline_tag is None:
            raise ValueError(
                "eval_results given as {dataset: {metric: value}} need pipeline_tag=... (the evaluated task type)."
            )
        results = []
        for dataset, metrics in eval_results.items():
            if not isinstance(metrics, Mapping):
                raise TypeError(f"eval_results[{dataset!r}] must map metric names to values, got {metrics!r}.")
            results += [
                EvalResult(task_type=pipeline_tag, dataset_type=str(dataset), dataset_name=str(dataset),
                           metric_type=str(metric), metric_value=value)
                for metric, value in metrics.items()
            ]
        return results
    results = []
    for i, item in enumerate(eval_results):
        if isinstance(item, EvalResult):
            results.append(item)
        elif isinstance(item, Mapping):
            try:
                results.append(EvalResult(**item))
            except TypeError as error:
                raise ValueError(f"eval_results[{i}] is not a valid EvalResult: {error}") from None
        else:
            raise TypeError(f"eval_results[{i}] must be an EvalResult or a dict, got {type(item).__name__}.")
    return results


def _load_snippet(artifact: str, repo_id: str | None, model_class: str | None, tasks: Sequence[str]) -> str:
    where = repo_id or "path/to/this/folder"
    if artifact == "atm":
        cls = model_class or "AutoModel"
        return (
            f"from transformers import {cls}\n\n"
            f'model = {cls}.from_pretrained("{where}")\n\n'
            "# the ATM schedule and its merge step, as hf_merge configs\n"
            "from hf_merge import MergeConfig\nfrom hf_merge.training import ATMConfig\n\n"
            f'atm_config = ATMConfig.from_pretrained("{where}")\n'
            f'merge_config = MergeConfig.from_pretrained("{where}")'
        )
    if artifact == "adapter":
        return f'from peft import AutoPeftModel\n\nmodel = AutoPeftModel.from_pretrained("{where}")'
    if artifact == "task_bank":
        folder = f'snapshot_download("{where}")' if repo_id else f'"{where}"'
        return (
            ("from huggingface_hub import snapshot_download\n" if repo_id else "")
            + "from hf_merge import TaskBank\n\n"
            f"bank = TaskBank.from_pretrained({folder})\n"
            + (f'model = bank.load_task("{tasks[0]}")  # the base plus the reconstructed task vector' if tasks else "")
        ).rstrip("\n")
    cls = model_class or "AutoModel"
    config_file = f'hf_hub_download("{where}", "merge_config.json")' if repo_id else f'"{where}"'
    return (
        f"from transformers import {cls}\n\n"
        f'model = {cls}.from_pretrained("{where}")\n\n'
        "# the merge recipe, as an hf_merge config\n"
        + ("from huggingface_hub import hf_hub_download\n" if repo_id else "")
        + "from hf_merge import MergeConfig\n\n"
        f"merge_config = MergeConfig.from_pretrained({config_file})"
    )


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def build_model_card(
    merge_config: Any,
    merge_inputs: Mapping[str, Any] | None,
    *,
    library_name: str | None = "auto",
    license: str | None = None,
    pipeline_tag: str | None = None,
    eval_results: Any = None,
    model_name: str | None = None,
    repo_id: str | None = None,
    model_class: str | None = None,
    artifact: str = "model",
    load_snippet: str | None = None,
    extra_tags: Sequence[str] = (),
    template_path: str | os.PathLike | None = None,
    tags: Sequence[str] | None = None,
    base_model: Mapping[str, str] | None = None,
    atm_config: Any = None,
    atm_tasks: Sequence[str] = (),
    lora_extraction: Mapping[str, Any] | None = None,
) -> Any:
    """The ``huggingface_hub.ModelCard`` of a merge artifact.

    Args:
        merge_config: the :class:`~hf_merge.MergeConfig` (or its dict) that produced the artifact.
        merge_inputs: ``{"base": origin or None, "models": {task: origin or None}}`` as recorded by the engine.
        library_name: ``"transformers"``, ``"peft"``, ``None`` (artifacts no library loads by itself), or
            ``"auto"``: transformers for models, peft for adapters, none for task banks.
        license: a Hub license id (:data:`~hf_merge.hub.provenance.HUB_LICENSES`); overrides license inheritance
            from the inputs.
        pipeline_tag: the Hub task, e.g. ``"text-classification"``; inferred from ``model_class`` when omitted.
        eval_results: ``huggingface_hub.EvalResult``s, dicts of their fields, or ``{dataset: {metric: value}}``
            (with ``pipeline_tag``); they become the ``model-index`` and the evaluation table.
        model_name: the card's title and ``model-index`` name (default: the repo name or ``<method>-merge``).
        repo_id: where the artifact is published; used in the loading example.
        model_class: the transformers class name, e.g. ``"BertForSequenceClassification"``.
        artifact: ``"model"``, ``"adapter"``, ``"task_bank"`` or ``"atm"`` (a model trained by
            :class:`~hf_merge.training.ATMTrainer`; ``merge_config`` is its merge step, ``atm_config`` the
            :class:`~hf_merge.training.ATMConfig`, ``atm_tasks`` the task names); selects the template, the
            ``base_model_relation`` and the loading example.
        load_snippet: Python code replacing the default loading example.
        extra_tags: more Hub tags (hf-merge's own, e.g. an ATM card's).
        template_path: a Jinja template to use instead of the one in ``hf_merge/model_cards/``.
        tags: the user's Hub tags (a list of strings), added after hf-merge's.
        base_model: ``{input: hub_id}``: the Hub ids of local or in-memory inputs, each named by its path, its task
            name or ``"base"`` (a key naming no input raises ``ValueError``). The card's ``base_model`` lists Hub ids
            only; a local folder without one is left out with a warning.
        lora_extraction: for an adapter extracted from full weights, the record's ``summary["lora_extraction"]``
            (:mod:`hf_merge.extract`): the card is then rendered from ``extracted_adapter.md``, with the ranks and
            energy kept per kind of module; one fine-tune extracted (``source="finetune"``) is not called a merge.

    Example:
        >>> card = build_model_card(TiesConfig(density=0.2), {"base": "bert-base-uncased", "models": {...}})
        >>> card.save("out/README.md")
    """
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    if artifact not in TEMPLATES:
        raise ValueError(f"artifact must be one of {sorted(TEMPLATES)}, got {artifact!r}.")
    if library_name == "auto":
        library_name = ARTIFACT_LIBRARIES[artifact]
    if library_name is not None and library_name not in LIBRARY_NAMES:
        raise ValueError(f"library_name must be one of {list(LIBRARY_NAMES)} or None, got {library_name!r}.")
    config = _config_dict(merge_config)
    methods = method_names(config)
    user = CardMetadata(license=license, tags=tags, base_model=base_model).for_inputs(merge_inputs)
    records = input_records(merge_inputs)
    if "base" in user.base_model and "base" in (merge_inputs or {}) and not any(r.role == "base" for r in records):
        records.insert(0, InputRecord(role="base", name=None, kind="in memory", license=None))  # mapped, in memory
    records, base_models = published_base_models(
        records, user.base_model, roles=("base",) if artifact == "adapter" else None)
    license = user.license if user.license is not None else inherited_license(records)
    pipeline_tag = pipeline_tag or infer_pipeline_tag(model_class)
    results = _eval_results(eval_results, pipeline_tag) if eval_results is not None else []
    extracted = lora_extraction is not None and artifact == "adapter"
    one_finetune = extracted and lora_extraction.get("source") == "finetune"
    default_name = "extracted-lora" if one_finetune else f"{methods[0]}-{'atm' if artifact == 'atm' else 'merge'}"
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else default_name)
    own_tags = ("hf-merge", "atm") if artifact == "atm" else ("hf-merge",) if one_finetune else BASE_TAGS
    card_data = ModelCardData(
        base_model=(base_models[0] if len(base_models) == 1 else base_models) or None,
        base_model_relation=RELATIONS[artifact],
        tags=list(dict.fromkeys([*own_tags, *([] if one_finetune else methods),
                                 *(ADAPTER_TAGS if artifact == "adapter" else ()),
                                 *(("lora-extraction",) if extracted else ()), *extra_tags, *user.tags])),
        library_name=library_name,
        license=license,
        pipeline_tag=pipeline_tag,
        model_name=model_name if results else None,
        eval_results=results or None,
    )
    base = next((r for r in records if r.role == "base"), None)
    tasks = [r for r in records if r.role != "base"]
    own_template = method_docs(methods[0]).get("template") if artifact == "model" else None  # e.g. a layer stack's
    template = EXTRACTED_ADAPTER_TEMPLATE if extracted else own_template or TEMPLATES[artifact]
    path = Path(template_path) if template_path is not None else TEMPLATE_DIR / template
    if not path.is_file():
        raise FileNotFoundError(f"Model card template {path} does not exist.")
    docs = [method_docs(name) for name in methods]
    if artifact == "atm":
        if atm_config is None:
            raise ValueError("artifact='atm' needs atm_config=... (the trainer's ATMConfig).")
        docs.insert(0, {"name": "atm", **dataclasses.asdict(type(atm_config).card)})
    extraction_rows, extraction_bibtex = [], []
    if extracted:
        from ..extract import EXTRACTION_BIBTEX, summarize

        modules = lora_extraction.get("modules") or {}
        extraction_rows = summarize({m: v["rank"] for m, v in modules.items()},
                                    {m: v["energy"] for m, v in modules.items()})
        extraction_bibtex = list(EXTRACTION_BIBTEX)
    return ModelCard.from_template(
        card_data,
        template_path=str(path),
        title=model_name,
        artifact=artifact,
        base=base,
        tasks=tasks,
        inputs=records,
        method_docs=docs,
        atm_config_yaml=yaml.safe_dump(atm_config.to_dict(), sort_keys=False, allow_unicode=True).rstrip("\n")
        if atm_config is not None else None,
        atm_tasks=list(atm_tasks),
        extraction=dict(lora_extraction or {}),
        extraction_rows=extraction_rows,
        extraction_bibtex=extraction_bibtex,
        merge_config=config,
        merge_config_yaml=yaml.safe_dump(config, sort_keys=False, allow_unicode=True).rstrip("\n"),
        eval_rows=[
            {k: _cell(v) for k, v in (("dataset", r.dataset_name), ("split", r.dataset_split or "—"),
                                      ("metric", r.metric_name or r.metric_type), ("value", r.metric_value))}
            for r in results
        ],
        load_snippet=load_snippet or _load_snippet(artifact, repo_id, model_class, [r.role for r in tasks]),
        cell=_cell,
    )


def folder_architecture(folder: Path) -> str | None:
    """The first `architectures` entry of `folder/config.json`, or None."""
    from ..config import load_json

    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    architectures = load_json(config_file).get("architectures") or []
    return architectures[0] if architectures else None


def write_card(
    folder: str | os.PathLike,
    merge_config: Any,
    merge_inputs: Mapping[str, Any] | None,
    **card_options: Any,
) -> Path:
    """Render the card (see :func:`build_model_card`) into ``folder/README.md``; return its path.

    When ``model_class`` is not given it is read from the folder's ``config.json`` (``architectures``), which also
    yields the pipeline tag; an adapter's pipeline tag comes from its ``adapter_config.json`` ``task_type``. Any
    existing README.md is replaced.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Cannot write a model card into {folder}: it is not a folder.")
    artifact = card_options.get("artifact", "model")
    if card_options.get("model_class") is None and artifact in ("model", "atm"):
        card_options["model_class"] = folder_architecture(folder)
    if card_options.get("pipeline_tag") is None and artifact == "adapter" and (folder / ADAPTER_CONFIG_NAME).is_file():
        from ..config import load_json

        card_options["pipeline_tag"] = adapter_pipeline_tag(load_json(folder / ADAPTER_CONFIG_NAME).get("task_type"))
    card = build_model_card(merge_config, merge_inputs, **card_options)
    path = folder / CARD_NAME
    card.save(path)
    return path


def _local_inputs(merge_inputs: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """``(role, absolute path)`` of each input that is a local folder."""
    from .provenance import _input_roles

    return [(role, os.path.abspath(os.fspath(origin))) for role, origin in _input_roles(merge_inputs)
            if origin is not None and describe_origin(origin)[1] == "local folder"]


def check_publishable(folder: str | os.PathLike, merge_inputs: Mapping[str, Any] | None = None, *,
                      files: Mapping[str, bytes] | None = None) -> None:
    """Refuse (``ValueError``, before anything is pushed) a folder whose card would publish a local path.

    Checked: the card's ``base_model`` entries are Hub ids; the card names no local input by its absolute path;
    ``adapter_config.json``'s ``base_model_name_or_path`` (what the card's ``AutoPeftModel`` snippet loads) is a Hub
    id; ``task_bank.json`` references its base by Hub id, not by a local path. ``files`` (``{path_in_repo: bytes}``)
    replace the folder's files of the same name, as in :func:`~hf_merge.hub.push.push_folder`.
    """
    import json

    folder = Path(folder)

    def text(name: str) -> str | None:
        if files is not None and name in files:
            return files[name].decode("utf-8", errors="replace")
        path = folder / name
        return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None

    local = _local_inputs(merge_inputs)
    fix = "pass base_model={input: 'org/name'} (the input's path or task name, and its Hub id)"
    card = text(CARD_NAME)
    if card is not None:
        from huggingface_hub import ModelCard

        listed = ModelCard(card, ignore_metadata_errors=True).data.base_model
        for entry in [listed] if isinstance(listed, str) else list(listed or []):
            problem = hub_id_problem(entry)
            if problem is not None:
                raise ValueError(f"{folder / CARD_NAME}: base_model lists {entry!r}, which is not a Hub id "
                                 f"({problem}); pushing would publish it. Regenerate the card, and {fix}.")
        for role, path in local:
            if path in card:
                raise ValueError(f"{folder / CARD_NAME} names the input {role!r} by its local path {path}; pushing "
                                 f"would publish that path. Regenerate the card, and pass base_model={{{path!r}: "
                                 "'org/name'}} to name it by its Hub id.")
    adapter = text(ADAPTER_CONFIG_NAME)
    if adapter is not None:
        base = json.loads(adapter).get("base_model_name_or_path")
        if base and hub_id_problem(base) is not None:
            role = next((r for r, path in local if path == os.path.abspath(base)), "base")
            raise ValueError(
                f"{ADAPTER_CONFIG_NAME} names the adapter's base (input {role!r}) by the local path {base!r}: "
                "pushing would publish that path, and the card's loading code (AutoPeftModel.from_pretrained) "
                f"would not find the base. Pass base_model={{{base!r}: 'org/name'}} (or {{'base': 'org/name'}}) "
                "with the base's Hub id."
            )
    manifest = text("task_bank.json")
    if manifest is not None:
        entry = json.loads(manifest).get("base") or {}
        if not entry.get("embedded") and entry.get("path"):
            raise ValueError(
                f"task_bank.json references the bank's base by the local path {entry['path']!r}; pushing would "
                "publish that path and the bank would not load from the Hub. Push the bank with "
                f"TaskBank.push_to_hub or hf-merge push --base-model base=org/name, giving the base's Hub id."
            )
