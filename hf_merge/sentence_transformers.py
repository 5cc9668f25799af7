"""Sentence-Transformers models (``SentenceTransformer``, ``CrossEncoder``, any modular ``sentence_transformers``
model) as merge inputs and outputs.

A Sentence-Transformers model is a pipeline of modules listed in ``modules.json``: a Transformer module (a
transformers model, saved at the folder's root, or in a subfolder such as ``0_Transformer`` in older layouts) and
others (``1_Pooling``, ``2_Dense`` with weights of its own, ``3_Normalize``, ...), each in its folder with its config.
Here it is one tensor source whose keys are:

- the Transformer module's checkpoint keys, unprefixed (``encoder.layer.0.attention.self.query.weight``): the keys a
  plain transformers model of that architecture has, so the two can be merged together;
- every other module's weights under ``"<module name>.<key>"`` (``2.linear.weight``): the module's name in
  ``modules.json``, which is also its name inside the model object.

Every module's weights are merged (Transformer and Dense alike). A folder output gets the base's layout: each module's
merged weights in its folder, and the base's ``modules.json``, ``config_sentence_transformers.json``, module configs
(``sentence_bert_config.json``, pooling config, ...) and tokenizer files, so ``SentenceTransformer(path)`` (or
``CrossEncoder(path)``) loads it with the base's modules. An in-memory output is a new model of the base's class.

Folders are read and written without importing ``sentence_transformers`` (pure file handling); it is imported only to
build an in-memory output from a folder base.

Mixing kinds: folders and model objects mix freely. With a plain transformers model of the Transformer module's
architecture, only the Transformer weights can differ: under a Sentence-Transformers base, a plain fine-tune counts
as the base's pipeline with its own Transformer weights (its update of the other modules is zero) and the output is a
Sentence-Transformers model; under a plain base, a Sentence-Transformers fine-tune contributes its Transformer
weights only (a warning names the weighted modules left out) and the output is a plain model like the base.
Fine-tunes must have the base's module list (names and types) and kind of model; module configs are the base's.

One concern in one file (~550 lines): reading, matching and writing Sentence-Transformers module layouts.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .config import load_json
from .errors import MergeError, warn
from .io.publish import publish_folder
from .io.sinks import FolderSink, ModelSink, Sink
from .io.sources import (
    PICKLE_WEIGHTS_NAMES,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    FolderSource,
    ModelSource,
    StateDictSource,
    TensorMeta,
    TensorSource,
)
from .io.writer import OutputBuffers, ShardPlan, ShardWriter, plan_shards

if TYPE_CHECKING:
    from .options import MergeOptions
    from .params import ParamInfo
    from .tensors import Amendment

MODULES_FILE = "modules.json"
MODEL_CONFIG_FILE = "config_sentence_transformers.json"
_WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, *PICKLE_WEIGHTS_NAMES)
#: Module types that store nothing: ``sentence_transformers`` builds them without reading their folder, which
#: published models often omit (all-MiniLM-L6-v2 lists ``2_Normalize`` and ships no such folder).
_FILELESS_MODULES = frozenset({"Normalize"})
#: Module types that cannot be built without their weights file.
_WEIGHTED_MODULES = frozenset({"Dense", "LayerNorm", "LSTM", "CNN", "WordEmbeddings", "WordWeights",
                               "StaticEmbedding", "WeightedLayerPooling"})
#: Module types that hold sub-modules in sub-folders of their own (not supported).
_NESTED_MODULES = frozenset({"Router", "Asym"})


# ------------------------------------------------------------------------------------------------- the pipeline
@dataclasses.dataclass(frozen=True)
class PipelineModule:
    """One module of a Sentence-Transformers model, as ``modules.json`` lists it: its ``name`` (``"2"``), class
    reference ``type``, folder ``path`` relative to the model (``""`` for the root), whether it is the Transformer
    module (its keys are unprefixed), and whether it has weights."""

    name: str
    type: str
    path: str
    transformer: bool = False
    weighted: bool = False

    @property
    def kind(self) -> str:
        """The class name (``"Dense"``), the same whatever module path ``type`` spells it with."""
        return self.type.rsplit(".", 1)[-1]

    @property
    def prefix(self) -> str:
        return "" if self.transformer else f"{self.name}."

    def describe(self) -> str:
        return f"{self.name} {self.kind}"


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """The modules of a Sentence-Transformers model and its kind (``"SentenceTransformer"``, ``"CrossEncoder"``)."""

    model_type: str
    modules: tuple[PipelineModule, ...]

    @property
    def transformer(self) -> PipelineModule | None:
        return next((module for module in self.modules if module.transformer), None)

    def signature(self) -> tuple[Any, ...]:
        return self.model_type, tuple((module.name, module.kind) for module in self.modules)

    def describe(self) -> str:
        return f"{self.model_type} [{', '.join(module.describe() for module in self.modules)}]"

    def module_of(self, key: str) -> PipelineModule:
        """The module holding ``key``."""
        for module in self.modules:
            if not module.transformer and key.startswith(module.prefix):
                return module
        transformer = self.transformer
        if transformer is None:
            raise KeyError(f"No module of this {self.model_type} holds {key!r}.")
        return transformer

    def layout(self, keys: Iterable[str]) -> dict[str, dict[str, str]]:
        """``{module folder: {key: name stored in that folder's weights}}`` for a folder output, in module order."""
        out: dict[str, dict[str, str]] = {module.path: {} for module in self.modules if module.weighted}
        for key in keys:
            module = self.module_of(key)
            out.setdefault(module.path, {})[key] = key[len(module.prefix):]
        return {path: names for path, names in out.items() if names}


class SentenceTransformerSource:
    """What every Sentence-Transformers source has besides the tensors: its :class:`Pipeline`, and the source of its
    Transformer module alone (``None`` for a model without one, e.g. static embeddings)."""

    label: str
    pipeline: Pipeline
    transformer: TensorSource | None

    def transformer_only(self) -> TensorSource:
        """This model read as its Transformer module only (a plain transformers model)."""
        if self.transformer is None:
            raise MergeError(f"{self.label} has no Transformer module, so it cannot be merged with a plain "
                             "transformers model.")
        return self.transformer


def is_sentence_transformers_folder(path: Any) -> bool:
    return isinstance(path, (str, os.PathLike)) and (Path(path) / MODULES_FILE).is_file()


def is_sentence_transformers_model(obj: Any) -> bool:
    """Whether ``obj`` is a ``sentence_transformers`` model object (checked by its class, no import)."""
    return isinstance(obj, torch.nn.Module) and type(obj).__module__.split(".")[0] == "sentence_transformers"


def open_sentence_transformer(value: Any, label: str, *, allow_pickle: bool = False) -> TensorSource | None:
    """A source for a Sentence-Transformers model object or folder; ``None`` for any other input."""
    if isinstance(value, SentenceTransformerSource):
        return value  # type: ignore[return-value]
    if is_sentence_transformers_model(value):
        return SentenceTransformerModelSource(value, label)
    if is_sentence_transformers_folder(value):
        return SentenceTransformerFolderSource(value, label, allow_pickle=allow_pickle)
    return None


# ----------------------------------------------------------------------------------------------------- sources
class CompositeSource(TensorSource):
    """Tensors gathered from other sources: ``{key: (source, key there)}``. Reads, shapes and fast paths are theirs."""

    def __init__(self, parts: Mapping[str, tuple[TensorSource, str]], label: str, *, folder: Path | None = None,
                 model: Any = None, config: Any = None) -> None:
        super().__init__()
        self._parts = dict(parts)
        self.label, self.folder, self.model, self._config = label, folder, model, config

    @property
    def config(self) -> Any:
        return self._config

    def keys(self) -> list[str]:
        return list(self._parts)

    def _drop(self, key: str) -> None:
        self._parts.pop(key, None)

    def _part(self, key: str) -> tuple[TensorSource, str]:
        resolved = self.resolve(key)
        if resolved not in self._key_set:
            raise KeyError(f"{self.label} has no tensor {key!r}.")
        return self._parts[resolved]

    def meta(self, key: str) -> TensorMeta:
        source, inner = self._part(key)
        return source.meta(inner)

    def _read(self, key: str) -> torch.Tensor:
        source, inner = self._parts[key]
        return source.get(inner)

    def flat_array(self, key: str) -> np.ndarray:
        source, inner = self._part(key)
        return source.flat_array(inner)

    def read_blocks(self, key: str, starts: Sequence[int], count: int) -> torch.Tensor:
        source, inner = self._part(key)
        return source.read_blocks(inner, starts, count)

    def iter_chunks(self, key: str, chunk_elements: int) -> Iterator[torch.Tensor]:
        source, inner = self._part(key)
        return source.iter_chunks(inner, chunk_elements)


def _has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _WEIGHT_FILES)


class SentenceTransformerFolderSource(SentenceTransformerSource, CompositeSource):
    """A saved Sentence-Transformers model: ``modules.json`` and its modules' folders, each weighted module read
    lazily from its own checkpoint (see the module docstring for the keys). No ``sentence_transformers`` import."""

    def __init__(self, path: str | os.PathLike, label: str = "checkpoint", *, allow_pickle: bool = False) -> None:
        folder = Path(path)
        full_label = f"{label} ({folder})"
        self.pipeline = _folder_pipeline(folder, full_label)
        parts: dict[str, tuple[TensorSource, str]] = {}
        self.transformer = None
        for module in self.pipeline.modules:
            if not module.weighted:
                continue
            source = FolderSource(folder / module.path, f"{label}, module {module.describe()}",
                                  allow_pickle=allow_pickle)
            if module.transformer:
                self.transformer = CompositeSource({k: (source, k) for k in source.keys()}, full_label, folder=folder,
                                                   config=source.config)
            for key in source.keys():
                if module.transformer and any(key.startswith(m.prefix) for m in self.pipeline.modules
                                              if not m.transformer):
                    raise MergeError(f"{full_label}: the Transformer's tensor {key!r} has the name prefix of another "
                                     "module; these keys cannot be told apart.")
                parts[module.prefix + key] = (source, key)
        config = self.transformer.config if self.transformer is not None else None
        CompositeSource.__init__(self, parts, full_label, folder=folder, config=config)


def _folder_pipeline(folder: Path, label: str) -> Pipeline:
    """The pipeline ``modules.json`` describes, each module's folder checked (missing, nested, without weights)."""
    entries = load_json(folder / MODULES_FILE)
    if not isinstance(entries, list) or not entries or not all(
            isinstance(e, dict) and all(isinstance(e.get(k), str) for k in ("name", "path", "type")) for e in entries):
        raise ValueError(f"{label}: {MODULES_FILE} must be a non-empty list of {{\"name\", \"path\", \"type\"}} "
                         "entries (a Sentence-Transformers modules list).")
    model_config = load_json(folder / MODEL_CONFIG_FILE) if (folder / MODEL_CONFIG_FILE).is_file() else {}
    model_type = model_config.get("model_type") if isinstance(model_config, dict) else None
    modules: list[PipelineModule] = []
    for entry in entries:
        name, path, type_ref = entry["name"], entry["path"], entry["type"]
        module = PipelineModule(name, type_ref, path)
        where = f"{label}: {MODULES_FILE} lists module {module.describe()!r} in {path!r}"
        if Path(path).is_absolute() or ".." in Path(path).parts:
            raise ValueError(f"{where}, which is not a folder inside the model.")
        module_folder = folder / path
        if module.kind in _NESTED_MODULES:
            raise MergeError(f"{where}: {module.kind} modules (sub-modules in sub-folders) are not supported.")
        if not module_folder.is_dir():
            if module.kind in _FILELESS_MODULES:
                modules.append(module)
                continue
            raise MergeError(f"{where}, but the folder {module_folder} does not exist: the model is incomplete.")
        weighted = _has_weights(module_folder)
        if not weighted and module.kind in _WEIGHTED_MODULES:
            raise MergeError(f"{where}, but {module_folder} has no weights ({SAFE_WEIGHTS_NAME}).")
        module_config = module_folder / "config.json"
        transformer = (weighted and not any(m.transformer for m in modules) and module_config.is_file()
                       and "model_type" in (load_json(module_config) or {}))
        modules.append(dataclasses.replace(module, transformer=transformer, weighted=weighted))
    return Pipeline(model_type or "SentenceTransformer", tuple(modules))


class SentenceTransformerModelSource(SentenceTransformerSource, ModelSource):
    """A ``SentenceTransformer`` / ``CrossEncoder`` object (its tensors, no copies). ``memory_names`` maps each key to
    the model's own parameter name (``0.model.encoder...``, ``2.linear.weight``)."""

    def __init__(self, model: torch.nn.Module, label: str = "model") -> None:
        if not isinstance(model, torch.nn.Sequential):
            raise TypeError(f"{label}: this {type(model).__name__} is not a modular Sentence-Transformers model "
                            "(a CrossEncoder of older sentence-transformers versions is not); pass its transformers model "
                            "instead.")
        TensorSource.__init__(self)
        self.label, self.model = f"{label} ({type(model).__name__})", model
        self.pipeline = _model_pipeline(model)
        memory_name = {id(module): name for name, module in model.named_modules()}
        self._tensors = {}
        self.transformer = None
        for module_info, module in zip(self.pipeline.modules, model._modules.values()):
            if module_info.transformer:
                auto_model = _auto_model(module)
                inner = ModelSource(auto_model, label)
                prefix = memory_name[id(auto_model)]
                self.transformer = inner
                self._tensors.update(inner._tensors)
                self.aliases.update(inner.aliases)
                self.memory_names.update({k: f"{prefix}.{inner.memory_names.get(k, k)}" for k in inner._tensors})
            elif module_info.weighted:
                inner = StateDictSource(module.state_dict(), label)
                self._tensors.update({module_info.prefix + k: t for k, t in inner._tensors.items()})
                self.aliases.update({module_info.prefix + a: module_info.prefix + k for a, k in inner.aliases.items()})
        self.memory_names.update({k: k for k in self._tensors if k not in self.memory_names})

    @property
    def config(self) -> Any:
        return self.transformer.config if self.transformer is not None else None


def _auto_model(module: torch.nn.Module) -> Any:
    from transformers import PreTrainedModel

    auto_model = getattr(module, "auto_model", None)
    return auto_model if isinstance(auto_model, PreTrainedModel) else None


def _model_pipeline(model: torch.nn.Module) -> Pipeline:
    """The pipeline of a model object, with the module folders ``save`` gives them (the first module at the root
    when it saves there, else ``<index>_<class>``)."""
    modules = []
    for index, (name, module) in enumerate(model._modules.items()):
        kind = type(module).__name__
        if kind in _NESTED_MODULES:
            raise MergeError(f"Module {name!r} is a {kind} (sub-modules saved in sub-folders): not supported.")
        transformer = _auto_model(module) is not None and not any(m.transformer for m in modules)
        in_root = index == 0 and getattr(module, "save_in_root", transformer)
        modules.append(PipelineModule(str(name), f"{type(module).__module__}.{kind}",
                                      "" if in_root else f"{index}_{kind}", transformer=transformer,
                                      weighted=transformer or bool(module.state_dict())))
    model_type = getattr(model, "model_type", None)
    return Pipeline(model_type if isinstance(model_type, str) else type(model).__name__, tuple(modules))


# --------------------------------------------------------------------------------------------------- matching
def match_pipelines(base: TensorSource | None, tasks: Mapping[str, TensorSource]) -> dict[str, TensorSource]:
    """The tasks as the base reads them (see the module docstring, "Mixing kinds"): Sentence-Transformers fine-tunes
    must have the base's pipeline (else :class:`MergeError` naming both module lists); plain fine-tunes under a
    Sentence-Transformers base are completed with the base's other modules; Sentence-Transformers fine-tunes under a
    plain base are read as their Transformer module. Without a base, the first task is the reference."""
    from .io.deltas import DeltaSource

    reference = base if base is not None else next(iter(tasks.values()), None)
    if not any(isinstance(s, SentenceTransformerSource) for s in (reference, *tasks.values())):
        return dict(tasks)
    matched: dict[str, TensorSource] = {}
    for name, task in tasks.items():
        if isinstance(task, DeltaSource) or task is reference:
            matched[name] = task
        elif isinstance(reference, SentenceTransformerSource):
            if isinstance(task, SentenceTransformerSource):
                if task.pipeline.signature() != reference.pipeline.signature():
                    raise MergeError(
                        f"{task.label} has the modules {task.pipeline.describe()}, but {reference.label} has "
                        f"{reference.pipeline.describe()}: fine-tuned models must have the base's module list."
                    )
                matched[name] = task
            else:
                matched[name] = _with_modules_of(task, reference)
        elif isinstance(task, SentenceTransformerSource):
            left_out = [m.describe() for m in task.pipeline.modules if m.weighted and not m.transformer]
            if left_out:
                warn(f"{task.label} is a {task.pipeline.model_type} but the base is a plain transformers model: only "
                     f"its Transformer weights are merged (the weights of its modules {left_out} are left out) and "
                     "the output is a plain model like the base.")
            matched[name] = task.transformer_only()
        else:
            matched[name] = task
    return matched


def _with_modules_of(task: TensorSource, base: SentenceTransformerSource) -> TensorSource:
    """A plain transformers fine-tune read as ``base``'s pipeline: its own tensors (the Transformer module's), and the
    base's for every other module (an update of zero there)."""
    assert isinstance(base, TensorSource)
    parts = {key: (task, key) for key in task.keys()}
    for key in base.keys():
        if base.pipeline.module_of(key).transformer or task.has(key):
            continue
        parts[key] = (base, key)
    composite = CompositeSource(parts, task.label, folder=task.folder, model=task.model, config=task.config)
    composite.aliases.update(task.aliases)
    composite.memory_names.update(task.memory_names)
    return composite


# ------------------------------------------------------------------------------------------------------- outputs
class SentenceTransformerFolderSink(FolderSink):
    """A Sentence-Transformers folder in the base's layout: each module's merged weights streamed into its own
    folder (sharded safetensors), the base's configs and tokenizer files, ``merge_config.json`` and the card;
    published atomically. Returns the folder's path."""

    description = "a Sentence-Transformers folder (output_dir=...)"
    split = Sink.split  # one writer per module folder: not split across processes

    def begin(self, metas: Mapping[str, TensorMeta], infos: Mapping[str, ParamInfo], read_ahead: int) -> list[str]:
        self.metas = metas
        self.staging = self._stack.enter_context(publish_folder(self.output_dir, self.inputs,
                                                                overwrite=self.overwrite))
        self.parts: list[tuple[Path, ShardPlan]] = []
        self.route: dict[str, tuple[int, str]] = {}
        writers = []
        for path, names in self.base.pipeline.layout(metas).items():
            folder = self.staging / path
            folder.mkdir(parents=True, exist_ok=True)
            plan = plan_shards({stored: metas[key] for key, stored in names.items()},
                               max_shard_size=self.max_shard_size)
            self.route.update({key: (len(self.parts), stored) for key, stored in names.items()})
            self.parts.append((folder, plan))
            writers.append(ShardWriter(folder, plan))
        self.writer = _Writers(writers)
        self.buffers = OutputBuffers(metas, count=read_ahead + 1)
        key_of = {(part, stored): key for key, (part, stored) in self.route.items()}
        return [key_of[part, stored] for part, (_, plan) in enumerate(self.parts) for stored in plan.order]

    def put(self, key: str, value: torch.Tensor) -> None:
        part, stored = self.route[key]
        self.writer.writers[part].put(stored, value)

    def amend(self, amendments: Iterable[Amendment]) -> None:
        grouped: dict[int, list[Amendment]] = {}
        for key, index, values in amendments:
            part, stored = self.route[key]
            grouped.setdefault(part, []).append((stored, index, values))
        for part, items in grouped.items():
            folder, plan = self.parts[part]
            plan.patch(folder, items)


class _Writers:
    """The writers of a multi-folder output, closed or aborted together."""

    def __init__(self, writers: list[ShardWriter]) -> None:
        self.writers = writers

    def close(self) -> None:
        for writer in self.writers:
            writer.close()

    def abort(self) -> None:
        for writer in self.writers:
            writer.abort()


def model_sink(base: TensorSource, options: MergeOptions, into: torch.nn.Module | None = None) -> ModelSink:
    """The in-memory output of a Sentence-Transformers base: ``into``, else a copy of the base model object, else the
    base folder loaded with its ``sentence_transformers`` class (``SentenceTransformer``, ``CrossEncoder``, ...)."""
    assert isinstance(base, SentenceTransformerSource)
    if options.device_map is not None:
        raise ValueError("device_map= places a transformers model; a Sentence-Transformers output is built whole: "
                         "leave device_map unset, or pass output_dir= and load the folder as you wish.")
    target = into
    if target is None and base.model is not None:
        target = copy.deepcopy(base.model)
    if target is None:
        target = load_pipeline(base.folder, base.pipeline.model_type)
    names = SentenceTransformerModelSource(target, "output").memory_names
    return ModelSink(target, memory_names=names)


def load_pipeline(folder: Path, model_type: str = "SentenceTransformer") -> torch.nn.Module:
    """The model a Sentence-Transformers folder holds, as an object of its class (on the CPU)."""
    try:
        import sentence_transformers
    except ImportError as error:
        raise ImportError(
            f"{folder} is a Sentence-Transformers model: building it in memory needs the sentence-transformers "
            "package (pip install sentence-transformers), or pass output_dir= to write the merged folder without it."
        ) from error
    model_class = getattr(sentence_transformers, model_type, None) or sentence_transformers.SentenceTransformer
    return model_class(str(folder), device="cpu", local_files_only=True)


def write_pipeline_files(base: TensorSource, destination: Path, dtype: torch.dtype | None = None) -> None:
    """Everything but the weights of a Sentence-Transformers output: ``modules.json``,
    ``config_sentence_transformers.json``, each module's config and the Transformer's config (``dtype`` recorded) and
    tokenizer files, from the base folder (copied) or the base object (written as its ``save`` would)."""
    from .models import copy_folder_files

    assert isinstance(base, SentenceTransformerSource)
    if base.model is None:
        copy_folder_files(base.folder, destination, dtype=dtype if _transformer_path(base) == "" else None)
        for module in base.pipeline.modules:
            source = base.folder / module.path
            if module.path and source.is_dir():
                copy_folder_files(source, destination / module.path, dtype=dtype if module.transformer else None)
        return
    _write_model_files(base.model, base.pipeline, destination, dtype)


def _transformer_path(base: SentenceTransformerSource) -> str | None:
    transformer = base.pipeline.transformer
    return transformer.path if transformer is not None else None


def _write_model_files(model: Any, pipeline: Pipeline, destination: Path, dtype: torch.dtype | None) -> None:
    from .models import copy_folder_files, save_model_config

    get_config = getattr(model, "_get_model_config", None)
    model_config = get_config() if callable(get_config) else {"prompts": getattr(model, "prompts", {}),
                                                              "default_prompt_name": None}
    (destination / MODEL_CONFIG_FILE).write_text(json.dumps(model_config, indent=2, sort_keys=True), encoding="utf-8")
    module_kwargs = getattr(model, "module_kwargs", None) or {}
    entries = []
    for index, (info, module) in enumerate(zip(pipeline.modules, model._modules.values())):
        entry: dict[str, Any] = {"idx": index, "name": info.name, "path": info.path, "type": info.type}
        if module_kwargs.get(info.name):
            entry["kwargs"] = module_kwargs[info.name]
        entries.append(entry)
        folder = destination / info.path
        folder.mkdir(parents=True, exist_ok=True)
        if info.transformer:  # its config, tokenizer and module config; not its weights
            save_model_config(_auto_model(module), folder, dtype)
            processor = getattr(module, "processor", None) or getattr(module, "tokenizer", None)
            if processor is not None:
                processor.save_pretrained(str(folder))
            config_file = getattr(module, "config_file_name", "sentence_bert_config.json")
            (folder / config_file).write_text(json.dumps(module.get_config_dict(), indent=4), encoding="utf-8")
        else:  # small modules: saved as they save themselves, their weights dropped (the merged ones are written)
            with tempfile.TemporaryDirectory(prefix="hf_merge_st_module_") as tmp:
                try:
                    module.save(tmp, safe_serialization=True)
                except TypeError:
                    module.save(tmp)
                copy_folder_files(Path(tmp), folder)
    (destination / MODULES_FILE).write_text(json.dumps(entries, indent=2), encoding="utf-8")


__all__ = [
    "CompositeSource",
    "Pipeline",
    "PipelineModule",
    "SentenceTransformerFolderSink",
    "SentenceTransformerFolderSource",
    "SentenceTransformerModelSource",
    "SentenceTransformerSource",
    "is_sentence_transformers_folder",
    "is_sentence_transformers_model",
    "match_pipelines",
    "open_sentence_transformer",
]
