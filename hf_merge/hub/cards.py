"""Model cards for merge artifacts, rendered from the Jinja templates in ``hf_merge/model_cards/`` (package data).

The YAML front matter is built with ``huggingface_hub.ModelCardData`` and the card with
``ModelCard.from_template``; nothing here writes YAML metadata by hand. What the card says:

- front matter: ``base_model`` (every input that has a Hub id or a local name), ``base_model_relation: merge``,
  ``tags`` (``merge``, ``hf-merge``, the method names), ``library_name``, ``license`` (inherited only when every
  input's license is known and all agree), ``pipeline_tag`` when known, ``model-index`` when evaluation results
  are given;
- body: what was merged and how, each method's summary and BibTeX, the exact merge config as YAML, the inputs
  table, the evaluation table and how to load the artifact.

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

from .provenance import CARD_NAME, inherited_license, input_records

#: The templates ship inside the package, so every kind of install (``--user``, ``--target``, a system Python) has them.
TEMPLATE_DIR = Path(str(importlib.resources.files("hf_merge") / "model_cards"))
TEMPLATES = {"model": "merged_model.md", "adapter": "merged_model.md", "task_bank": "task_bank.md"}
ARTIFACT_LIBRARIES = {"model": "transformers", "adapter": "peft", "task_bank": None}
LIBRARY_NAMES = ("transformers", "peft")
BASE_TAGS = ("merge", "hf-merge")
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


def method_names(config: Mapping[str, Any]) -> list[str]:
    """Every method named in a (possibly nested, e.g. DARE → TIES) merge config dict, outermost first."""
    names = [config["method"]] if isinstance(config.get("method"), str) else []
    for value in config.values():
        if isinstance(value, Mapping):
            names += [n for n in method_names(value) if n not in names]
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
) -> Any:
    """The ``huggingface_hub.ModelCard`` of a merge artifact.

    Args:
        merge_config: the :class:`~hf_merge.MergeConfig` (or its dict) that produced the artifact.
        merge_inputs: ``{"base": origin or None, "models": {task: origin or None}}`` as recorded by the engine.
        library_name: ``"transformers"``, ``"peft"``, ``None`` (artifacts no library loads by itself), or
            ``"auto"``: transformers for models, peft for adapters, none for task banks.
        license: overrides license inheritance from the inputs.
        pipeline_tag: the Hub task, e.g. ``"text-classification"``; inferred from ``model_class`` when omitted.
        eval_results: ``huggingface_hub.EvalResult``s, dicts of their fields, or ``{dataset: {metric: value}}``
            (with ``pipeline_tag``); they become the ``model-index`` and the evaluation table.
        model_name: the card's title and ``model-index`` name (default: the repo name or ``<method>-merge``).
        repo_id: where the artifact is published; used in the loading example.
        model_class: the transformers class name, e.g. ``"BertForSequenceClassification"``.
        artifact: ``"model"``, ``"adapter"`` or ``"task_bank"``; selects the template and loading example.
        load_snippet: Python code replacing the default loading example.
        extra_tags: more Hub tags.
        template_path: a Jinja template to use instead of the one in ``hf_merge/model_cards/``.

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
    records = input_records(merge_inputs)
    if license is None:
        license = inherited_license(records)
    pipeline_tag = pipeline_tag or infer_pipeline_tag(model_class)
    results = _eval_results(eval_results, pipeline_tag) if eval_results is not None else []
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else f"{methods[0]}-merge")
    base_models = list(dict.fromkeys(r.name for r in records if r.name is not None))
    card_data = ModelCardData(
        base_model=(base_models[0] if len(base_models) == 1 else base_models) or None,
        base_model_relation="merge",
        tags=list(dict.fromkeys([*BASE_TAGS, *methods, *extra_tags])),
        library_name=library_name,
        license=license,
        pipeline_tag=pipeline_tag,
        model_name=model_name if results else None,
        eval_results=results or None,
    )
    base = next((r for r in records if r.role == "base"), None)
    tasks = [r for r in records if r.role != "base"]
    path = Path(template_path) if template_path is not None else TEMPLATE_DIR / TEMPLATES[artifact]
    if not path.is_file():
        raise FileNotFoundError(f"Model card template {path} does not exist.")
    return ModelCard.from_template(
        card_data,
        template_path=str(path),
        title=model_name,
        artifact=artifact,
        base=base,
        tasks=tasks,
        inputs=records,
        method_docs=[method_docs(name) for name in methods],
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
    yields the pipeline tag. Any existing README.md is replaced.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Cannot write a model card into {folder}: it is not a folder.")
    if card_options.get("model_class") is None and card_options.get("artifact", "model") == "model":
        card_options["model_class"] = folder_architecture(folder)
    card = build_model_card(merge_config, merge_inputs, **card_options)
    path = folder / CARD_NAME
    card.save(path)
    return path
