"""Model-folder helpers: the transformers class a ``config.json`` names, that model built on the meta device (cached),
or loaded, and the side files (config, generation config, tokenizer) a merged checkpoint carries over from its base."""

from __future__ import annotations

import copy
import functools
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from .config import load_json
from .io.publish import MARKER
from .io.sources import SAFE_WEIGHTS_INDEX_NAME, TensorSource

_WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
_SKIPPED_FILES = {SAFE_WEIGHTS_INDEX_NAME, "pytorch_model.bin.index.json", "merge_config.json", "README.md", MARKER}


def architecture_class(folder: Path) -> tuple[Any, type | None]:
    """``(config, model class)`` of a checkpoint folder: the transformers class its first ``architectures`` entry
    names (``None`` when there is no such class)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    architectures = getattr(config, "architectures", None) or []
    return config, getattr(transformers, architectures[0], None) if architectures else None


@functools.lru_cache(maxsize=8)
def _meta_model(folder: str, config_mtime: float) -> torch.nn.Module | None:
    from accelerate import init_empty_weights

    config, model_cls = architecture_class(Path(folder))
    if model_cls is None:
        return None
    with init_empty_weights(include_buffers=True):
        return model_cls(config)


def meta_model(folder: Path | None) -> torch.nn.Module | None:
    """The folder's architecture built on the meta device (no weights read), cached per folder and ``config.json``
    version; ``None`` without a ``config.json`` naming a transformers class."""
    config_file = folder / "config.json" if folder is not None else None
    if config_file is None or not config_file.is_file():
        return None
    return _meta_model(str(folder.resolve()), config_file.stat().st_mtime)


def load_model_from_folder(folder: Path | None, *, meta: bool = False, progress: bool = True) -> torch.nn.Module | None:
    """The model a checkpoint folder's ``config.json`` describes (weights loaded, or on meta with ``meta=True``);
    ``progress=False`` silences transformers' loading bar."""
    if meta:
        return meta_model(folder)
    if folder is None or not (folder / "config.json").is_file():
        return None
    _, model_cls = architecture_class(folder)
    if model_cls is None:
        return None
    from transformers.utils import logging as transformers_logging

    if progress or not transformers_logging.is_progress_bar_enabled():
        return model_cls.from_pretrained(folder)
    transformers_logging.disable_progress_bar()
    try:
        return model_cls.from_pretrained(folder)
    finally:
        transformers_logging.enable_progress_bar()


def copy_side_files(base: TensorSource, destination: Path, dtype: torch.dtype | None = None) -> None:
    """Config (architecture and dtype updated), generation config and tokenizer files of the base; no weights. A
    Sentence-Transformers base also gives its ``modules.json``, model config and every module's folder (configs,
    tokenizer; see :func:`hf_merge.sentence_transformers.write_pipeline_files`). The merge's vocabulary plan
    (:func:`hf_merge.vocab.reconcile_vocabularies`) replaces the tokenizer files and sets ``vocab_size``; an in-memory
    base gets its tokenizer (``tokenizer=``, or its ``name_or_path`` folder's) this way."""
    from .sentence_transformers import SentenceTransformerSource, write_pipeline_files
    from .vocab import vocabulary_of

    model = base.model
    if isinstance(base, SentenceTransformerSource):
        write_pipeline_files(base, destination, dtype)
    elif model is not None and hasattr(model, "config") and hasattr(model.config, "save_pretrained"):
        save_model_config(model, destination, dtype)
    elif base.folder is not None:
        copy_folder_files(base.folder, destination, dtype)
    plan = vocabulary_of(base)
    if plan is not None:
        plan.write(destination)


def save_model_config(model: Any, destination: Path, dtype: torch.dtype | None = None) -> None:
    """A transformers model's config (its class as ``architectures``, ``dtype`` recorded) and generation config."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(destination)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and getattr(model, "can_generate", lambda: False)():
        generation_config.save_pretrained(destination)


def copy_folder_files(folder: Path, destination: Path, dtype: torch.dtype | None = None) -> None:
    """The files of ``folder`` that are not weights, indexes, merge records or cards (sub-folders are not copied),
    with ``dtype`` recorded in its ``config.json``."""
    destination.mkdir(parents=True, exist_ok=True)
    for item in folder.iterdir():
        if item.is_file() and item.name not in _SKIPPED_FILES and not item.name.endswith(_WEIGHT_FILE_SUFFIXES):
            shutil.copy2(item, destination / item.name)
    config_file = destination / "config.json"
    if dtype is not None and config_file.is_file():
        config = load_json(config_file)
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = str(dtype).removeprefix("torch.")
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def memory_to_key(base: TensorSource) -> dict[str, str]:
    """In-memory parameter name (what PEFT adapters use) → the base's key (its checkpoint name)."""
    from .io.sources import ModelSource

    mapping = {key: key for key in base.keys()}
    mapping.update(base.aliases)
    source = base if isinstance(base, ModelSource) else None
    if source is None:
        model = meta_model(base.folder)
        source = ModelSource(model, "meta model") if model is not None else None
    if source is not None:
        mapping.update({memory: key for key, memory in source.memory_names.items() if key in mapping})
    return mapping
