"""Inputs of a merge: open them as tensor sources, bind updates to the base, validate, classify.

- :func:`open_inputs` (:func:`open_base` / :func:`open_tasks`): models, checkpoint folders, Hub repo ids, state dicts,
  PEFT adapters and Sentence-Transformers models (:mod:`hf_merge.sentence_transformers`) as sources. A string that
  is not an existing local path but a repo id (``org/name``, ``org/name@revision``) is downloaded first
  (:mod:`hf_merge.hub.resolve`, with the options' ``revision``, ``token`` and ``cache_dir``).
- :func:`bind_deltas`: tasks given as updates of a base (LoRA adapters, task vectors, task-bank tasks) are bound to
  the run's base: an explicit step, before validation.
- :func:`validate_sources`: pure checks (architecture, keys, ties, shapes, dtypes) naming the offending input.
- :func:`classify_sources`: the kind and block of every tensor (:mod:`hf_merge.params`).
- :func:`describe_inputs`: where each input came from (Hub inputs by repo id and commit), for the record and card.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .adapters import is_adapter_folder, is_peft_model, open_lora
from .errors import MergeError, warn
from .hub.resolve import cached_repo, resolve_model, split_revision
from .io.deltas import DeltaSource
from .io.sources import ModelSource, TensorMeta, TensorSource, open_source
from .models import meta_model
from .options import MergeOptions
from .params import ParamInfo, classify_parameters
from .sentence_transformers import match_pipelines, open_sentence_transformer

Inputs = Any  # a PreTrainedModel, a checkpoint path, a Hub repo id or a state dict
_ARCH_KEYS = ("model_type", "vocab_size")


class _Resolver:
    """Resolves string references with the options' Hub settings, and remembers which ``{reference: revision}``
    entries were used (an unused one is a typo: :meth:`check_revisions`)."""

    def __init__(self, options: MergeOptions) -> None:
        self.options = options
        self.used: set[str] = set()

    def __call__(self, value: Any, label: str) -> tuple[Any, str]:
        """``(what to open, label)``: the input itself, or the local folder of a Hub repo id."""
        if not isinstance(value, str) or os.path.exists(value):
            return value, label
        options = self.options
        try:
            resolved = resolve_model(value, revision=self._revision(value), token=options.token,
                                     cache_dir=options.cache_dir, allow_pickle=options.allow_pickle)
        except (OSError, ValueError) as error:
            raise type(error)(f"{label}: {error}") from error.__cause__
        return resolved.folder, f"{label} from {resolved.repo_id}"

    def _revision(self, reference: str) -> str | None:
        revision = self.options.revision
        if not isinstance(revision, Mapping):
            return None if split_revision(reference)[1] is not None else revision
        key = next((k for k in (reference, split_revision(reference)[0]) if k in revision), None)
        if key is None:
            return None
        self.used.add(key)
        return revision[key]

    def check_revisions(self) -> None:
        revision = self.options.revision
        unused = sorted(set(revision) - self.used) if isinstance(revision, Mapping) else []
        if unused:
            raise ValueError(f"revision= names {unused}, which are not Hub repo ids among this merge's inputs.")


def open_inputs(base: Inputs | None, finetuned: Sequence[Inputs] | Mapping[str, Inputs],
                options: MergeOptions | None = None, *, base_required: bool = True
                ) -> tuple[TensorSource | None, dict[str, TensorSource]]:
    """``(base source, {task_name: source})`` (see :func:`open_base`, :func:`open_tasks`); ``base`` may be ``None``
    unless ``base_required``. A ``{reference: revision}`` entry of ``options.revision`` naming no Hub input raises.
    Sentence-Transformers tasks are matched to the base (:func:`~hf_merge.sentence_transformers.match_pipelines`:
    same module list, or a plain transformers model on either side)."""
    resolver = _Resolver(options or MergeOptions())
    base_source = _open_base(base, resolver) if base is not None or base_required else None
    tasks = match_pipelines(base_source, _open_tasks(finetuned, resolver))
    resolver.check_revisions()
    return base_source, tasks


def open_base(base: Inputs, options: MergeOptions | None = None) -> TensorSource:
    return _open_base(base, _Resolver(options or MergeOptions()))


def _open_base(base: Inputs, resolve: _Resolver) -> TensorSource:
    value, label = resolve(base, "base")
    return _open_one(value, label, allow_pickle=resolve.options.allow_pickle)


def _open_one(value: Any, label: str, *, allow_pickle: bool) -> TensorSource:
    """One model as a source: a Sentence-Transformers model or folder (:mod:`hf_merge.sentence_transformers`), else
    a model, checkpoint folder or state dict (:func:`~hf_merge.io.sources.open_source`)."""
    source = open_sentence_transformer(value, label, allow_pickle=allow_pickle)
    return source if source is not None else open_source(value, label, allow_pickle=allow_pickle)


def open_tasks(finetuned: Sequence[Inputs] | Mapping[str, Inputs], options: MergeOptions | None = None
               ) -> dict[str, TensorSource]:
    """``{task_name: source}`` from a sequence (names ``task_0``, ...) or a mapping of inputs.

    A PEFT adapter (folder, Hub repo or ``PeftModel``) counts as a fine-tuned model (base + ΔW); a ``PeftModel`` with
    several adapters contributes one task per adapter (named after the adapter, or ``"<task>.<adapter>"`` in a
    mapping).
    """
    return _open_tasks(finetuned, _Resolver(options or MergeOptions()))


def _open_tasks(finetuned: Sequence[Inputs] | Mapping[str, Inputs], resolve: _Resolver) -> dict[str, TensorSource]:
    if isinstance(finetuned, Mapping):
        items = [(str(name), value) for name, value in finetuned.items()]
        named = True
    elif isinstance(finetuned, (str, os.PathLike, torch.nn.Module)) or not isinstance(finetuned, Sequence):
        raise TypeError("finetuned must be a sequence or a {task_name: model} mapping of models, paths or state dicts.")
    else:
        items = [(f"task_{i}", value) for i, value in enumerate(finetuned)]
        named = False
    if not items:
        raise ValueError("finetuned is empty: give at least one fine-tuned model.")
    allow_pickle = resolve.options.allow_pickle
    tasks: dict[str, TensorSource] = {}
    for name, given in items:
        value, label = resolve(given, f"task {name!r}")
        lora = is_peft_model(value) or (isinstance(value, (str, os.PathLike)) and is_adapter_folder(value))
        if not lora:
            tasks[name] = _open_one(value, label, allow_pickle=allow_pickle)
            continue
        adapters = open_lora(value, label, allow_pickle=allow_pickle)
        for adapter_name, source in adapters:
            if adapter_name is None or len(adapters) == 1 and named:
                task_name = name
            else:
                task_name = f"{name}.{adapter_name}" if named else adapter_name
            if task_name in tasks:
                raise ValueError(f"Two inputs are both named {task_name!r}; pass a mapping with distinct names.")
            tasks[task_name] = source
    return tasks


def open_pair(base: Inputs, finetuned: Inputs, *, allow_pickle: bool = False
              ) -> tuple[TensorSource, TensorSource, dict[str, TensorMeta]]:
    """``(base, finetuned, base metas)``: one fine-tuned model opened and validated against its base."""
    resolve = _Resolver(MergeOptions(allow_pickle=allow_pickle))
    base_source = _open_base(base, resolve)
    value, label = resolve(finetuned, "finetuned")
    tasks = match_pipelines(base_source, {"finetuned": _open_one(value, label, allow_pickle=allow_pickle)})
    return base_source, tasks["finetuned"], validate_sources(base_source, tasks)


def tied_embedding_keys(sources: Sequence[TensorSource]) -> tuple[str, str] | None:
    """``(output embedding key, input embedding key)`` of the architecture (e.g. ``lm_head.weight`` and
    ``model.embed_tokens.weight``), from the first source that is, or whose folder describes, a transformers model."""
    for source in sources:
        model = source.model if isinstance(source, ModelSource) else meta_model(source.folder)
        if model is None or not hasattr(model, "get_output_embeddings"):
            continue
        try:
            output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
        except NotImplementedError:  # a composite model (e.g. CLIP) that does not name one vocabulary's embeddings
            return None
        if output is None or embedding is None:
            return None
        names = {id(module): name for name, module in model.named_modules()}
        memory = {source.memory_names.get(k, k): k for k in source.keys()} if isinstance(source, ModelSource) else {}
        keys = [f"{names[id(module)]}.weight" for module in (output, embedding)]
        return memory.get(keys[0], keys[0]), memory.get(keys[1], keys[1])
    return None


def reconcile_tied_embeddings(base: TensorSource, tasks: Mapping[str, TensorSource]) -> None:
    """Tie or untie every task's output embedding as the base does, as transformers does when it loads a checkpoint
    into the base's architecture: a task storing the output embedding separately under a tied base is read through
    its input embedding (its separate copy is ignored, with a warning), and a tied task under an untied base gives its
    input embedding as its output embedding. Nothing is read; only sources whose keys differ from the base's are
    looked at."""
    differing = [task for task in tasks.values() if set(task.keys()) != set(base.keys())]
    if not differing:
        return
    pair = tied_embedding_keys([base, *tasks.values()])
    if pair is None:
        return
    output, embedding = pair
    base_ties = base.resolve(output) == embedding or (not base.has(output) and base.has(embedding))
    for task in differing:
        if base_ties and output in task.keys():
            warn(f"{task.label} stores {output!r} separately, but the base ties it to {embedding!r}: its "
                          "separate copy is ignored, as transformers ignores it when loading into this architecture.")
            task.tie(output, embedding)
        elif not base_ties and not task.has(output) and task.has(embedding):
            task.aliases[output] = embedding


def bind_deltas(base: TensorSource, tasks: Mapping[str, TensorSource]) -> None:
    """Bind every task given as an update of a base to ``base`` (it checks its names and shapes against it)."""
    for task in tasks.values():
        if isinstance(task, DeltaSource):
            task.bind(base)


def _config_value(config: Any, key: str) -> Any:
    if config is None:
        return None
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


def validate_sources(
    base: TensorSource, tasks: Mapping[str, TensorSource], *, dtype: torch.dtype | None = None
) -> dict[str, TensorMeta]:
    """Check that every task matches the base (architecture, keys, shapes, dtypes); return the base's metadata.

    Raises :class:`MergeError` naming the offending input and tensor. Reads no tensor data and changes nothing:
    :class:`~hf_merge.io.DeltaSource` tasks must be bound first (:func:`bind_deltas`).
    """
    base_keys = base.keys()
    metas = {k: base.meta(k) for k in base_keys}
    for name, task in tasks.items():
        for arch_key in _ARCH_KEYS:
            a, b = _config_value(base.config, arch_key), _config_value(task.config, arch_key)
            if a is not None and b is not None and a != b:
                raise MergeError(f"Different architectures: base has {arch_key}={a!r}, {task.label} has {b!r}.")
        missing = [k for k in base_keys if not task.has(k)]
        extra = [k for k in task.keys() if not base.has(k)]
        if missing or extra:
            raise MergeError(
                f"{task.label} does not have the base's tensors: missing {_preview(missing)}, extra {_preview(extra)}."
            )
        for key in task.keys():
            if base.resolve(key) != key:
                raise MergeError(
                    f"{task.label} stores {key!r} separately, but in the base it is tied to {base.resolve(key)!r}."
                )
        for key in base_keys:
            ours, theirs = metas[key], task.meta(key)
            if ours.shape != theirs.shape:
                raise MergeError(f"Shape mismatch for {key!r}: base {ours.shape} vs {task.label} {theirs.shape}.")
            if ours.dtype != theirs.dtype:
                same_kind = ours.dtype.is_floating_point and theirs.dtype.is_floating_point
                if not (same_kind and dtype is not None):
                    raise MergeError(
                        f"dtype mismatch for {key!r}: base {ours.dtype} vs {task.label} {theirs.dtype}"
                        + (" (pass dtype= to merge in float32 and write one dtype)." if same_kind else ".")
                    )
    return metas


def _preview(names: list[str], limit: int = 8) -> str:
    if not names:
        return "none"
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)})"


def classify_sources(
    base: TensorSource, tasks: Mapping[str, TensorSource], *, architecture: torch.nn.Module | None = None
) -> dict[str, ParamInfo]:
    """Classify the base's tensors, using a model's modules: ``architecture``, else any input that is a model, else
    the model the base folder's ``config.json`` describes (built on the meta device); else by names."""
    if architecture is not None:
        model_source = ModelSource(architecture, "architecture")
    else:
        model_source = next((s for s in (base, *tasks.values()) if isinstance(s, ModelSource)), None)
    if model_source is None:
        model = meta_model(base.folder)
        model_source = ModelSource(model, "meta model") if model is not None else None
    if model_source is None:
        return classify_parameters(base.shapes(), config=base.config)
    memory_names = model_source.memory_names
    by_memory_name = classify_parameters(
        {memory_names.get(k, k): shape for k, shape in base.shapes().items()},
        model=model_source.model, config=base.config or model_source.config,
    )
    return {
        key: dataclasses.replace(by_memory_name[memory_names.get(key, key)], name=key) for key in base.keys()
    }


def _origin(source: TensorSource | None) -> tuple[str | None, dict[str, str] | None]:
    """``(origin, Hub entry)``: a Hub input (a folder of the Hugging Face cache) by repo id, with its commit."""
    origin = source.origin if source is not None else None
    repo = cached_repo(origin)
    return (origin, None) if repo is None else (repo[0], {"repo_id": repo[0], "commit": repo[1]})


def describe_inputs(base: TensorSource | None, tasks: Mapping[str, TensorSource]) -> dict[str, Any]:
    """Where each input came from, for ``merge_config`` records and model cards: ``{"base": origin, "models":
    {task: origin}}`` (an origin is a Hub repo id, a local path, or ``None`` in memory) and, when some came from the
    Hub, ``"hub": {"base": {"repo_id", "commit"}, "models": {task: {"repo_id", "commit"}}}`` for those."""
    base_origin, base_hub = _origin(base)
    models = {name: _origin(source) for name, source in tasks.items()}
    described: dict[str, Any] = {"base": base_origin, "models": {name: origin for name, (origin, _) in models.items()}}
    hub_models = {name: entry for name, (_, entry) in models.items() if entry is not None}
    if base_hub is not None or hub_models:
        described["hub"] = {**({"base": base_hub} if base_hub is not None else {}), "models": hub_models}
    return described
