"""Layer stacking: a model assembled from layer ranges of others (passthrough, frankenmerges, depth up-scaling;
mergekit's ``slices``).

    hf_merge.stack_layers([("model_a", 0, 6), ("model_b", 2, 8)], output_dir="stacked")   # 12 layers
    hf_merge.stack_layers([("a", 0, 4),
                           {"sources": [("a", 4, 8), ("b", 4, 8)], "method": "slerp", "parameters": {"t": 0.5}},
                           ("b", 8, 12)], output_dir="stacked")

A slice is a range [start, end) of one model's layers, copied as it is (times ``scale``: a number or a
:class:`~hf_merge.Schedule` of ``{filter, value}`` rules, mergekit's ``scale``), or the same number of layers of
several models merged layer by layer with any hf_merge method, as :func:`hf_merge.merge` would merge them (θ₀ is the
slice's ``base``, by default its first source; a schedule spreads over the slice's layers, as mergekit's gradients
do). The layers are renumbered in slice order. The tensors outside the layers come from ``embeddings_from`` when
given, else as in mergekit: those before the layers (embeddings) from the first slice, those after them (final
norm, output head) from the last. Ties are kept. The config is the first slice's model's (``embeddings_from``'s when
given) with ``num_hidden_layers`` and every per-layer setting (``layer_types`` and other per-layer lists,
``mlp_only_layers``, ``max_window_layers``, ``first_k_dense_replace``) following the new stack.

How it runs: every model is a lazy source; a merged slice is a source whose tensors are merged on demand
(:func:`hf_merge.engine.merged_tensors`: validated and prepared before anything is written); the stack is a source
renaming and selecting their tensors, streamed into the output by one engine run of the ``passthrough`` method (its
θ₀ passes through as it is), so a stack gets merge()'s outputs, output-folder rules and record
(``merge_config.json`` holds the :class:`StackConfig`; the card a table of the slices).

One concern in one file (~820 lines): reading slices, renumbering layers and rewriting the config must agree on
every layer index.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .config import MergeConfig, MethodCard, load_json
from .errors import MergeError, warn
from .hub.provenance import describe_origin
from .io.sources import ModelSource, TensorMeta, TensorSource
from .methods.base import Merger
from .params import BLOCK_PATTERN
from .registry import register_method
from .schedules import Schedule

#: Config keys holding the number of layers.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
#: Config keys listing layer indices (Qwen2-MoE's dense layers), remapped to the stack's.
INDEX_LIST_KEYS = ("mlp_only_layers",)
#: Config keys giving a layer count below which layers differ, and the per-layer list that says the same exactly
#: (``None``: none; a stack that one number cannot describe is then refused).
THRESHOLD_KEYS = {"max_window_layers": "layer_types", "first_k_dense_replace": None}
_SLICE_KEYS = ("sources", "base", "merge", "scale")


# ------------------------------------------------------------------------------------------------ the config
@dataclasses.dataclass(kw_only=True)
class StackConfig(MergeConfig):
    """A layer stack (mergekit's ``passthrough`` with ``slices``), as ``merge_config.json`` records it.

    ``slices``, in output order: ``{"sources": [{"model": name, "layer_range": [start, end]}], ...}``
    (``layer_range`` ``None``: every layer). A slice of one source copies its layers, times ``"scale"`` (a number or
    a :class:`~hf_merge.Schedule`; default 1). A slice of several sources (each the same number of layers, each model
    once) merges them with ``"merge"`` (a :class:`~hf_merge.MergeConfig` whose per-task values are keyed by model
    name) around ``"base"``: the model whose layers are θ₀ (the other sources are the tasks), or ``None``: every
    source is a task and the first anchors the arithmetic (mergekit's ``linear``). ``embeddings_from``: the model
    whose tensors outside the layers the stack takes (``None``: the first slice's before the layers, the last
    slice's after them, as mergekit).
    """

    method: str = dataclasses.field(default="passthrough", init=False)
    not_checked: ClassVar[str] = "layer stacks (slices)"
    slices: list[dict[str, Any]]
    embeddings_from: str | None = None

    card: ClassVar[MethodCard] = MethodCard(
        title="Passthrough (layer stacking)",
        summary=(
            "Layer ranges of the input models are stacked into a new model, deeper or shallower than its inputs (a "
            "frankenmerge; depth up-scaling as in SOLAR 10.7B): each range copied as it is, scaled, or merged layer "
            "by layer from several models. The layers are renumbered and the config follows the new stack."
        ),
        bibtex="""@article{kim2023solar,
  title   = {SOLAR 10.7B: Scaling Large Language Models with Simple yet Effective Depth Up-Scaling},
  author  = {Kim, Dahyun and Park, Chanjun and Kim, Sanghoon and others},
  journal = {arXiv preprint arXiv:2312.15166},
  year    = {2023}
}""",
        paper_url="https://arxiv.org/abs/2312.15166",
        template="stacked_model.md",
    )

    def __post_init__(self) -> None:
        if not isinstance(self.slices, Sequence) or isinstance(self.slices, str) or not self.slices:
            raise ValueError(f"slices must be a non-empty list of slices, got {self.slices!r}.")
        self.slices = [_checked_slice(index, entry) for index, entry in enumerate(self.slices)]
        if self.embeddings_from is not None and not (isinstance(self.embeddings_from, str) and self.embeddings_from):
            raise TypeError(f"embeddings_from must be a model name, got {self.embeddings_from!r}.")

    def model_names(self) -> list[str]:
        """Every model the stack reads, in order of first use."""
        names = [source["model"] for entry in self.slices for source in entry["sources"]]
        return list(dict.fromkeys(names + ([self.embeddings_from] if self.embeddings_from else [])))


def _checked_slice(index: int, entry: Any) -> dict[str, Any]:
    where = f"slices[{index}]"
    if not isinstance(entry, Mapping):
        raise TypeError(f"{where} must be a mapping with 'sources', got {entry!r}.")
    unknown = sorted(str(key) for key in set(entry) - set(_SLICE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; a slice has {list(_SLICE_KEYS)}.")
    sources = entry.get("sources")
    if not isinstance(sources, Sequence) or isinstance(sources, str) or not sources:
        raise ValueError(f"{where}: 'sources' must be a non-empty list of {{model, layer_range}}, got {sources!r}.")
    sources = [_checked_source(f"{where}.sources[{j}]", source) for j, source in enumerate(sources)]
    ranges = [source["layer_range"] for source in sources]
    if len({None if r is None else r[1] - r[0] for r in ranges}) > 1:
        counts = ["all" if r is None else r[1] - r[0] for r in ranges]
        raise ValueError(f"{where}: its sources give different numbers of layers {counts}; every source of a slice "
                         "gives the same number, merged layer by layer.")
    models = [source["model"] for source in sources]
    twice = sorted({m for m in models if models.count(m) > 1})
    if twice:
        raise ValueError(f"{where}: model(s) {twice} listed twice; a slice merges each model once.")
    merge, scale = entry.get("merge"), entry.get("scale")
    if len(sources) == 1:
        if merge is not None:
            raise ValueError(f"{where}: one source is copied as it is; merging with {merge.method!r} takes two or "
                             "more sources.")
        if entry.get("base") not in (None, models[0]):
            raise ValueError(f"{where}: base {entry['base']!r} is not its source {models[0]!r}.")
        if scale is None:
            return {"sources": sources}
        if not isinstance(scale, Schedule) and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
            raise TypeError(f"{where}: scale must be a number or a Schedule, got {scale!r}.")
        return {"sources": sources, "scale": scale}
    if not isinstance(merge, MergeConfig):
        raise ValueError(f"{where}: {len(sources)} sources are merged layer by layer: give the method ('merge', a "
                         f"MergeConfig), got {merge!r}.")
    if scale is not None:
        raise ValueError(f"{where}: scale multiplies a copied slice (one source); a merged slice takes its method's "
                         "parameters.")
    base = entry.get("base", models[0])
    if base is not None and base not in models:
        raise ValueError(f"{where}: base {base!r} is none of its sources {models}.")
    return {"sources": sources, "base": base, "merge": merge}


def _checked_source(where: str, source: Any) -> dict[str, Any]:
    if not isinstance(source, Mapping) or set(source) - {"model", "layer_range"} or "model" not in source:
        raise ValueError(f"{where} must be {{model, layer_range}}, got {source!r}.")
    model, layer_range = source["model"], source.get("layer_range")
    if not isinstance(model, str) or not model:
        raise TypeError(f"{where}.model must be a model name, got {model!r}.")
    if layer_range is None:
        return {"model": model, "layer_range": None}
    if (not isinstance(layer_range, Sequence) or isinstance(layer_range, str) or len(layer_range) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in layer_range)):
        raise TypeError(f"{where}.layer_range must be [start, end] (integers), got {layer_range!r}.")
    start, end = layer_range
    if start < 0 or start >= end:
        raise ValueError(f"{where} ({model!r}): layer_range [{start}, {end}] is empty or negative: it takes layers "
                         "start, ..., end - 1, so 0 <= start < end.")
    return {"model": model, "layer_range": [start, end]}


class StackMerger(Merger):
    """The run that writes a stack: θ₀ is the stacked model (each tensor already copied, scaled or merged by its
    slice) and passes through as it is."""

    uses_param_info = False

    def prepare(self, ctx: Any) -> None:
        if ctx.tasks:
            raise ValueError("Method 'passthrough' stacks layers and takes no fine-tuned models: call "
                             "hf_merge.stack_layers(...) (or run a mergekit recipe with slices).")

    def linear_coefficients(self, task_names: Sequence[str]) -> list[float]:
        return [0.0] * len(task_names)

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: Any) -> torch.Tensor:
        return torch.zeros_like(base)


register_method(StackConfig, StackMerger)


# ------------------------------------------------------------------------------------------------ the front door
def stack_layers(
    slices: Sequence[Any],
    output_dir: str | os.PathLike | None = None,
    *,
    embeddings_from: Any = None,
    method: MergeConfig | str | None = None,
    **keywords: Any,
) -> Any:
    """Stack layer ranges of models into a new model, streaming tensor by tensor.

    Args:
        slices: in output order, each ``(model, start, end)`` (layers start, ..., end − 1 copied), or a mapping
            ``{"sources": [(model, start, end), ...], "method": ..., "parameters": {...}, "base": model,
            "scale": ...}``: one source is copied, times ``scale`` (a number, or a :class:`~hf_merge.Schedule` such as
            mergekit's ``[{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]``); several sources (the same number of
            layers each) are merged layer by layer with ``method`` (a method name or a
            :class:`~hf_merge.MergeConfig`; default the ``method`` argument) and its ``parameters``, θ₀ being
            ``base``'s layers (default: the first source; ``None``: every source is a task, the first anchoring the
            arithmetic). A model is a checkpoint folder, a Hub repo id, a ``PreTrainedModel`` or a state dict; a
            string names itself (per-task parameters are keyed by it), other models are named ``model_0``, ... in
            order of first use.
        output_dir: write a ``from_pretrained``-loadable checkpoint there (atomically, as :func:`hf_merge.merge`)
            and return its path; else return the model in memory (a state dict without a transformers config).
        embeddings_from: the model whose tensors outside the layers (embeddings, final norm, head) the stack takes,
            and whose config it has; default: the first slice's before the layers and the last slice's after them,
            as mergekit.
        method: the method of merged slices that name none.
        **keywords: the run options of :func:`hf_merge.merge` (``dtype``, ``progress``, ``max_shard_size``,
            ``overwrite``, ``tokenizer_source``, ``license``, ...), then ``method``'s parameters.

    Example:
        >>> hf_merge.stack_layers([("org/base", 0, 24), ("org/base", 8, 32)], output_dir="solar-style")
    """
    from .options import split_options
    from .registry import make_config

    options = split_options(keywords)
    default = make_config(method, **keywords) if method is not None else None
    if default is None and keywords:
        raise ValueError(f"Unknown option(s) {sorted(keywords)}: give method= for method parameters, or per slice "
                         "'parameters'.")
    config, models = _read_slices(slices, embeddings_from, default)
    return build_stack(config, models, output_dir=output_dir, options=options)


def _read_slices(slices: Sequence[Any], embeddings_from: Any, default: MergeConfig | None
                 ) -> tuple[StackConfig, dict[str, Any]]:
    """The :class:`StackConfig` of :func:`stack_layers`' slices, and ``{name: model}``."""
    from .registry import make_config

    models: dict[str, Any] = {}
    named: dict[int, str] = {}

    def name_of(model: Any) -> str:
        if isinstance(model, (str, os.PathLike)):
            name = os.fspath(model)
        else:
            name = named.setdefault(id(model), f"model_{len(named)}")
        models.setdefault(name, model)
        return name

    def source(where: str, item: Any) -> dict[str, Any]:
        if isinstance(item, Mapping) and "model" in item:  # mergekit's spelling: {model, layer_range}
            return {**item, "model": name_of(item["model"])}
        if isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 3:
            return {"model": name_of(item[0]), "layer_range": [item[1], item[2]]}
        raise TypeError(f"{where} must be (model, start, end), got {item!r}.")

    if isinstance(slices, (str, Mapping)) or not isinstance(slices, Sequence) or not slices:
        raise TypeError(f"slices must be a non-empty list of (model, start, end) or slice mappings, got {slices!r}.")
    entries = []
    for index, item in enumerate(slices):
        where = f"slices[{index}]"
        if not isinstance(item, Mapping):
            entries.append({"sources": [source(where, item)]})
            continue
        unknown = sorted(str(k) for k in set(item) - {"sources", "method", "parameters", "base", "scale"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; a slice has 'sources', 'method', 'parameters', "
                             "'base' and 'scale'.")
        sources = item.get("sources")
        if not isinstance(sources, Sequence) or isinstance(sources, str):
            raise ValueError(f"{where}: 'sources' must be a list of (model, start, end), got {sources!r}.")
        entry: dict[str, Any] = {"sources": [source(f"{where}.sources[{j}]", s) for j, s in enumerate(sources)]}
        if "scale" in item:  # a number, a Schedule, or what makes one (mergekit's rule list, a gradient)
            scale = item["scale"]
            entry["scale"] = Schedule(scale) if isinstance(scale, (list, tuple, Mapping)) else scale
        if "base" in item:
            entry["base"] = None if item["base"] is None else name_of(item["base"])
        if len(sources) > 1 or "method" in item:
            chosen = item.get("method", default)
            if chosen is None:
                raise ValueError(f"{where}: {len(sources)} sources are merged: give its 'method' (or method=).")
            try:
                entry["merge"] = make_config(chosen, **dict(item.get("parameters") or {}))
            except (TypeError, ValueError) as error:
                raise type(error)(f"{where}: {error}") from None
        elif item.get("parameters"):
            raise ValueError(f"{where}: 'parameters' are a merged slice's; a copied slice takes 'scale'.")
        entries.append(entry)
    config = StackConfig(slices=entries, embeddings_from=None if embeddings_from is None else name_of(embeddings_from))
    return config, models


# ------------------------------------------------------------------------------------------------ building a stack
@dataclasses.dataclass(frozen=True)
class _Part:
    """Where one tensor of a renamed source comes from: ``source``'s ``key``, times ``scale`` (``None``: as is)."""

    source: TensorSource
    key: str
    scale: float | None = None


class RenamedSource(TensorSource):
    """Tensors of other sources under new names: a selection of them, renamed, optionally scaled (a layer range
    renumbered, a whole stack). Reads go to the sources (mapped, in chunks) as they are."""

    def __init__(self, parts: Mapping[str, _Part], label: str, *, config: Any = None, folder: Path | None = None,
                 aliases: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.parts, self.label, self._config, self.folder = dict(parts), label, config, folder
        self.aliases = {alias: key for alias, key in (aliases or {}).items() if key in self.parts}

    def keys(self) -> list[str]:
        return list(self.parts)

    def _drop(self, key: str) -> None:
        self.parts.pop(key, None)

    def meta(self, key: str) -> TensorMeta:
        part = self.parts[self.resolve(key)]
        return part.source.meta(part.key)

    def _read(self, key: str) -> torch.Tensor:
        part = self.parts[key]
        tensor = part.source.get(part.key)
        if part.scale is None or not tensor.dtype.is_floating_point:
            return tensor
        return (tensor.float() * part.scale).to(tensor.dtype)

    def _plain(self, key: str) -> _Part | None:
        part = self.parts.get(self.resolve(key))
        return part if part is not None and part.scale is None else None

    def flat_array(self, key: str) -> np.ndarray:
        part = self._plain(key)
        return part.source.flat_array(part.key) if part is not None else super().flat_array(key)

    def read_blocks(self, key: str, starts: Sequence[int], count: int) -> torch.Tensor:
        part = self._plain(key)
        return part.source.read_blocks(part.key, starts, count) if part is not None else super().read_blocks(
            key, starts, count)

    def iter_chunks(self, key: str, chunk_elements: int) -> Iterator[torch.Tensor]:
        part = self._plain(key)
        if part is not None:
            return part.source.iter_chunks(part.key, chunk_elements)
        return super().iter_chunks(key, chunk_elements)

    @property
    def config(self) -> Any:
        return self._config


class _MergedSlice(TensorSource):
    """A merged slice's tensors (its layers numbered from 0, and the tensors outside the layers it gives), merged on
    demand once :meth:`open`."""

    def __init__(self, label: str, plan: Any, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.label, self.plan, self.dtype = label, plan, dtype
        self.aliases = dict(plan.base.aliases)
        self._produce: Any = None

    @contextlib.contextmanager
    def open(self, options: Any) -> Iterator[None]:
        """Validate and prepare the merge (statistics passes); merge tensors while open."""
        from .engine import merged_tensors

        with merged_tensors(self.plan, options) as produce:
            self._produce = produce
            yield

    def keys(self) -> list[str]:
        return self.plan.base.keys()

    def meta(self, key: str) -> TensorMeta:
        meta = self.plan.base.meta(key)
        floating = meta.dtype.is_floating_point and self.dtype is not None
        return TensorMeta(meta.shape, self.dtype) if floating else meta

    def _read(self, key: str) -> torch.Tensor:
        if not self.plan.base.meta(key).dtype.is_floating_point:
            return self.plan.base.get(key)
        return self._produce(key)


@dataclasses.dataclass(frozen=True)
class _Layers:
    """A model's layer stack: its container (``model.layers``), and each layer's tensors by their name after
    ``<container>.<index>.``; ``other``: the tensors outside it, in the model's order."""

    container: str
    rests: tuple[tuple[str, ...], ...]
    other: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.rests)

    def key(self, index: int, rest: str) -> str:
        return f"{self.container}.{index}.{rest}"


def _split(key: str) -> tuple[str, int, str] | None:
    match = BLOCK_PATTERN.search(key)
    if match is None:
        return None
    return key[: match.end(1)].lstrip("."), int(match.group(2)), key[match.end():]


def _layers_of(name: str, source: TensorSource, config: Mapping[str, Any] | None) -> _Layers:
    """The layer stack of model ``name``: the container of the config's number of layers (the only one, without a
    config); raises naming the model when there is none."""
    found: dict[str, dict[int, list[str]]] = {}
    for key in source.keys():
        split = _split(key)
        if split is not None:
            found.setdefault(split[0], {}).setdefault(split[1], []).append(split[2])
    configured = _layer_count(config)[1]
    candidates = [c for c, layers in found.items() if configured is None or max(layers) + 1 == configured]
    if len(candidates) != 1:
        seen = {c: max(layers) + 1 for c, layers in found.items()}
        raise MergeError(f"{source.label}: no recognisable layer stack to slice (layer containers found: "
                         f"{seen or 'none'}; config num_hidden_layers: {configured}): stacking needs one numbered "
                         "stack of layers, e.g. model.layers.0, model.layers.1, ...")
    container = candidates[0]
    layers = found[container]
    missing = [i for i in range(max(layers) + 1) if i not in layers]
    if missing:
        raise MergeError(f"{source.label}: layers {missing} of {container} hold no tensors.")
    other = tuple(k for k in source.keys() if (_split(k) or ("",))[0] != container)
    return _Layers(container, tuple(tuple(layers[i]) for i in range(max(layers) + 1)), other)


def _layer_count(config: Mapping[str, Any] | None) -> tuple[str | None, int | None]:
    """``(key, number of layers)`` of a config."""
    for key in LAYER_COUNT_KEYS:
        value = (config or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return key, value
    return None, None


def _config_of(source: TensorSource) -> dict[str, Any] | None:
    """The model's full config as a dict (derived per-layer settings such as ``layer_types`` included)."""
    config = getattr(source.model, "config", None)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if source.folder is None or not (source.folder / "config.json").is_file():
        return None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(source.folder).to_dict()
    except (ValueError, OSError, KeyError):  # an architecture transformers does not know: the file as it is
        return dict(load_json(source.folder / "config.json"))


def _before_layers(source: TensorSource, layers: _Layers) -> set[str]:
    """The tensors outside the layers that come before them (embeddings), by the architecture's module order; without
    an architecture, the embeddings by name."""
    from .models import meta_model

    order: list[str] = []
    if isinstance(source, ModelSource):
        order = source.keys()
    else:
        model = meta_model(source.folder)
        if model is not None:
            order = ModelSource(model, "meta model").keys()
    first = next((i for i, key in enumerate(order) if (_split(key) or ("",))[0] == layers.container), None)
    position = {key: i for i, key in enumerate(order)}

    def before(key: str) -> bool:
        if first is not None and key in position:
            return position[key] < first
        parts = key.split(".")
        return ("embed" in key and "embed_out" not in key) or (len(parts) > 1 and parts[-2] in ("wte", "wpe"))

    return {key for key in layers.other if before(key)}


def build_stack(config: StackConfig, models: Mapping[str, Any], *, output_dir: str | os.PathLike | None = None,
                options: Any = None) -> Any:
    """Run the stack ``config`` describes, its model names resolved by ``models`` (``{name: model}``: folder, Hub
    repo id, model or state dict): see :func:`stack_layers` (which builds both), with ``options`` a
    :class:`~hf_merge.MergeOptions`."""
    from .engine import Plan, run
    from .inputs import describe_inputs, open_inputs, reconcile_tied_embeddings
    from .io.deltas import DeltaSource
    from .io.publish import check_output_dir
    from .options import MergeOptions
    from .record import MergeRecord
    from .sentence_transformers import SentenceTransformerSource
    from .vocab import reconcile_vocabularies, vocabulary_of

    options = options if options is not None else MergeOptions()
    names = config.model_names()
    unknown = [name for name in names if name not in models]
    if unknown:
        raise ValueError(f"The stack names model(s) {unknown} it was given no model for (models: {sorted(models)}).")
    _, opened = open_inputs(None, {name: models[name] for name in names}, options, base_required=False)
    for name, source in opened.items():
        if isinstance(source, (DeltaSource, SentenceTransformerSource)):
            raise ValueError(f"model {name!r}: {source.label} is not a plain model (LoRA adapters and "
                             "Sentence-Transformers pipelines cannot be stacked).")
        source.label = f"model {name!r}" + (f" ({source.folder})" if source.folder is not None else "")
    if output_dir is not None:  # before any work, as merge() does
        check_output_dir(output_dir, [s.folder for s in opened.values() if s.folder is not None],
                         overwrite=options.overwrite)
    first = config.slices[0]
    layout = config.embeddings_from or (first.get("base") or first["sources"][0]["model"])
    configs = {name: _config_of(source) for name, source in opened.items()}
    layers = _layer_stacks(opened, configs, layout)
    config = config.replace(slices=[_resolved(index, entry, layers) for index, entry in enumerate(config.slices)])
    _check_layers(config, opened, layers, layout, options.dtype)

    others = {name: source for name, source in opened.items() if name != layout}
    reconcile_tied_embeddings(opened[layout], others)
    base, tasks = reconcile_vocabularies(opened[layout], others, options,
                                         references={"base": models[layout], **{n: models[n] for n in names}})
    sources = {layout: base, **tasks}
    record = MergeRecord(_published(config), describe_inputs(None, opened), card=options.card)
    with tempfile.TemporaryDirectory(prefix="hf_merge-stack-") as side, contextlib.ExitStack() as stack:
        out_layers = _output_layers(config)
        out_config = _write_side_files(opened[layout], Path(side),
                                       lambda raw: stacked_config(raw, configs, layout, out_layers))
        parts = _stacked_parts(config, sources, layers, layout, stack, options)
        stacked = RenamedSource(parts, "the layer stack", config=out_config, aliases=base.aliases,
                                folder=Path(side) if any(Path(side).iterdir()) else None)
        stacked.vocabulary = vocabulary_of(base)
        copying = dataclasses.replace(options, device=None)  # the stack's own run copies: on the CPU
        return run(Plan(stacked, {}, StackMerger(config), record), _sink(stacked, options, output_dir, record),
                   copying)


def _layer_stacks(sources: Mapping[str, TensorSource], configs: Mapping[str, dict[str, Any] | None],
                  layout: str) -> dict[str, _Layers]:
    """Every model's layer stack; the models must be of the layout model's architecture."""
    ours = (configs[layout] or {}).get("model_type")
    for name, config in configs.items():
        theirs = (config or {}).get("model_type")
        if ours is not None and theirs is not None and ours != theirs:
            raise MergeError(f"Different architectures: model {layout!r} is {ours!r}, model {name!r} is {theirs!r}.")
    layers = {name: _layers_of(name, source, configs[name]) for name, source in sources.items()}
    for name, found in layers.items():
        if found.container != layers[layout].container:
            raise MergeError(f"model {name!r} keeps its layers in {found.container!r}, model {layout!r} in "
                             f"{layers[layout].container!r}: different architectures cannot be stacked.")
    return layers


def _published(config: StackConfig) -> StackConfig:
    """The config as ``merge_config.json`` and the card record it: a local folder by its folder name (full paths are
    never published, as for every input), a Hub id as it is."""
    def shown(model: Any) -> Any:
        return describe_origin(model)[0] if isinstance(model, str) else model

    slices = [{**entry, "sources": [{**source, "model": shown(source["model"])} for source in entry["sources"]],
               **({"base": shown(entry["base"])} if "base" in entry else {})} for entry in config.slices]
    return config.replace(slices=slices, embeddings_from=shown(config.embeddings_from))


def _resolved(index: int, entry: dict[str, Any], layers: Mapping[str, _Layers]) -> dict[str, Any]:
    """The slice with every layer range explicit (``None``: every layer), checked against its model's layers."""
    sources = []
    for j, source in enumerate(entry["sources"]):
        count = layers[source["model"]].count
        start, end = source["layer_range"] or (0, count)
        if end > count:
            raise ValueError(f"slices[{index}].sources[{j}]: layer_range [{start}, {end}] is out of bounds: model "
                             f"{source['model']!r} has {count} layers (0, ..., {count - 1}).")
        sources.append({"model": source["model"], "layer_range": [start, end]})
    lengths = {s["layer_range"][1] - s["layer_range"][0] for s in sources}
    if len(lengths) > 1:
        raise ValueError(f"slices[{index}]: its sources give different numbers of layers {sorted(lengths)}; every "
                         "source of a slice gives the same number, merged layer by layer.")
    return {**entry, "sources": sources}


def _check_layers(config: StackConfig, sources: Mapping[str, TensorSource], layers: Mapping[str, _Layers],
                  layout: str, dtype: torch.dtype | None) -> None:
    """Every stacked layer's tensors exist, with the shapes (and, without ``dtype``, the dtypes), in the layers of the
    model whose config the stack takes."""
    template: dict[str, set[tuple[tuple[int, ...], torch.dtype]]] = {}
    for index, rests in enumerate(layers[layout].rests):
        for rest in rests:
            meta = sources[layout].meta(layers[layout].key(index, rest))
            template.setdefault(rest, set()).add((meta.shape, meta.dtype))
    for i, entry in enumerate(config.slices):
        for j, source in enumerate(entry["sources"]):
            name, (start, end) = source["model"], source["layer_range"]
            where = f"slices[{i}].sources[{j}] (model {name!r}, layers [{start}, {end}))"
            for index in range(start, end):
                for rest in layers[name].rests[index]:
                    key = layers[name].key(index, rest)
                    meta = sources[name].meta(key)
                    known = template.get(rest)
                    if known is None:
                        raise MergeError(f"{where}: tensor {key!r} has no counterpart in the layers of model "
                                         f"{layout!r}, whose architecture the stack takes.")
                    if meta.shape not in {shape for shape, _ in known}:
                        shapes = sorted({shape for shape, _ in known})
                        raise MergeError(f"{where}: shape mismatch for {key!r}: {meta.shape}, but model {layout!r}'s "
                                         f"layers hold {rest!r} as {', '.join(map(str, shapes))}.")
                    floating = meta.dtype.is_floating_point
                    if meta.dtype not in {d for _, d in known} and not (floating and dtype is not None):
                        raise MergeError(f"{where}: dtype mismatch for {key!r}: {meta.dtype}, but model {layout!r} "
                                         f"holds it as {sorted(str(d) for _, d in known)}"
                                         + (" (pass dtype= to write one dtype)." if floating else "."))


def _stacked_parts(config: StackConfig, sources: Mapping[str, TensorSource], layers: Mapping[str, _Layers],
                   layout: str, stack: contextlib.ExitStack, options: Any) -> dict[str, _Part]:
    """Where each tensor of the stack comes from: each slice's layers renumbered after the previous ones, the
    tensors outside the layers from ``embeddings_from``, else from the first slice (before the layers) and the last
    (after them); merged slices opened on ``stack``."""
    found = layers[layout]
    before = _before_layers(sources[layout], found)
    last = len(config.slices) - 1
    pre: dict[str, _Part] = {}
    body: dict[str, _Part] = {}
    post: dict[str, _Part] = {}
    offset = 0
    for i, entry in enumerate(config.slices):
        giving = {}  # the tensors outside the layers this slice gives, at their position for a scale schedule
        if config.embeddings_from is None:
            giving = {key: 0.0 if key in before else 1.0 for key in found.other
                      if (i == 0 and key in before) or (i == last and key not in before)}
        if "merge" in entry:
            parts = _merged_slice(i, entry, sources, layers, giving, stack, options)
        else:
            parts = _copied_slice(i, entry, sources, layers, giving)
        for key, part in parts.items():
            split = _split(key)
            if split is not None and split[0] == found.container:
                body[found.key(offset + split[1], split[2])] = part
            else:
                (pre if key in before else post)[key] = part
        start, end = entry["sources"][0]["layer_range"]
        offset += end - start
    if config.embeddings_from is not None:
        for key in found.other:
            (pre if key in before else post)[key] = _Part(sources[config.embeddings_from], key)
    for key, part in {**pre, **post}.items():
        ours, theirs = sources[layout].meta(key), part.source.meta(part.key)
        if ours.shape != theirs.shape:
            raise MergeError(f"{part.source.label}: shape mismatch for {key!r}: {theirs.shape}, but model "
                             f"{layout!r} (whose config the stack takes) has {ours.shape}.")
    return {**pre, **body, **post}


def _scale_at(scale: Any, key: str, position: float) -> float | None:
    value = scale.at(key, position) if isinstance(scale, Schedule) else scale
    return None if value is None or value == 1.0 else float(value)


def _copied_slice(index: int, entry: dict[str, Any], sources: Mapping[str, TensorSource],
                  layers: Mapping[str, _Layers], giving: Mapping[str, float]) -> dict[str, _Part]:
    """A copied slice's parts: its layers numbered from 0 and the tensors outside the layers it gives (``giving``,
    at their position), each times its scale (a schedule's position: a layer's j / (n − 1) in the slice)."""
    name, (start, end) = entry["sources"][0]["model"], entry["sources"][0]["layer_range"]
    source, found, scale = sources[name], layers[name], entry.get("scale")
    parts = {}
    for j in range(end - start):
        position = j / (end - start - 1) if end - start > 1 else 1.0
        for rest in found.rests[start + j]:
            key = found.key(start + j, rest)
            parts[found.key(j, rest)] = _Part(source, key, _scale_at(scale, key, position))
    for key, position in giving.items():
        if not source.has(key):
            raise MergeError(f"slices[{index}] (model {name!r}) has no {key!r}, which the stack takes from it.")
        parts[key] = _Part(source, key, _scale_at(scale, key, position))
    return parts


def _merged_slice(index: int, entry: dict[str, Any], sources: Mapping[str, TensorSource],
                  layers: Mapping[str, _Layers], giving: Mapping[str, float], stack: contextlib.ExitStack,
                  options: Any) -> dict[str, _Part]:
    """A merged slice's parts: every source's layers (numbered from 0) and the tensors outside the layers the slice
    gives, as views merged as :func:`hf_merge.merge` would merge them, opened (validated, prepared) on ``stack``."""
    from .engine import Plan
    from .registry import get_merger

    views = {}
    for j, source in enumerate(entry["sources"]):
        name, (start, end) = source["model"], source["layer_range"]
        found, inner = layers[name], sources[name]
        parts = {found.key(i, rest): _Part(inner, found.key(start + i, rest))
                 for i in range(end - start) for rest in found.rests[start + i]}
        for key in giving:
            if not inner.has(key):
                raise MergeError(f"slices[{index}].sources[{j}] (model {name!r}) has no {key!r}, which the stack "
                                 "takes from this slice.")
            parts[key] = _Part(inner, key)
        view_config = _config_dict(inner.config)
        view_config[_layer_count(view_config)[0] or LAYER_COUNT_KEYS[0]] = end - start
        views[name] = RenamedSource(parts, f"slices[{index}].sources[{j}] (model {name!r}, layers [{start}, {end}))",
                                    config=view_config, folder=inner.folder, aliases=inner.aliases)
    base_name = entry.get("base", entry["sources"][0]["model"])
    tasks = {name: view for name, view in views.items() if name != base_name}
    if base_name is None:  # every source a task; the first anchors the arithmetic
        first = entry["sources"][0]["model"]
        base = RenamedSource(views[first].parts, f"{views[first].label} (anchor)", config=views[first].config,
                             folder=views[first].folder, aliases=views[first].aliases)
    else:
        base = views[base_name]
    merged = _MergedSlice(f"slices[{index}] (merged with {entry['merge'].method})",
                          Plan(base, tasks, get_merger(entry["merge"])), options.dtype)
    try:
        stack.enter_context(merged.open(options))
    except (TypeError, ValueError) as error:  # e.g. per-task values naming no source of the slice
        raise type(error)(f"slices[{index}] (merged with {entry['merge'].method}): {error}") from error
    return {key: _Part(merged, key) for key in merged.keys()}


def _config_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    return config.to_dict() if hasattr(config, "to_dict") else {}


# ------------------------------------------------------------------------------------------------ config and output
def _write_side_files(layout: TensorSource, side: Path, config: Any) -> dict[str, Any] | None:
    """The layout model's side files (config, generation config, tokenizer) in ``side``, its ``config.json`` made
    ``config(raw)``, the stack's; return that config (``None`` without one)."""
    from .models import copy_folder_files, save_model_config

    if getattr(getattr(layout.model, "config", None), "save_pretrained", None) is not None:
        save_model_config(layout.model, side)
    elif layout.folder is not None:
        copy_folder_files(layout.folder, side)
    config_file = side / "config.json"
    if not config_file.is_file():
        return None
    stacked = config(load_json(config_file))
    config_file.write_text(json.dumps(stacked, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return stacked


def _output_layers(config: StackConfig) -> list[tuple[str, int]]:
    """``(model, layer)`` of each output layer: the copied layer, or a merged slice's base (or anchor) layer."""
    out_layers = []
    for entry in config.slices:
        model = entry.get("base") or entry["sources"][0]["model"]
        start, end = next(s for s in entry["sources"] if s["model"] == model)["layer_range"]
        out_layers += [(model, index) for index in range(start, end)]
    return out_layers


def stacked_config(raw: Mapping[str, Any], configs: Mapping[str, Mapping[str, Any] | None], layout: str,
                   out_layers: Sequence[tuple[str, int]]) -> dict[str, Any]:
    """The stack's config: ``raw`` (the layout model's ``config.json``) with the number of layers, every per-layer list
    (a key naming layers whose list has one entry per layer, e.g. ``layer_types``), the layer-index lists
    (:data:`INDEX_LIST_KEYS`) and the thresholds (:data:`THRESHOLD_KEYS`) taken from each output layer's model
    (``out_layers``: ``(model, layer)``), as ``configs`` (every model's full config) give them."""
    loaded = configs[layout] or {}
    count_key, count = _layer_count(loaded)
    out = dict(raw)
    out[count_key or LAYER_COUNT_KEYS[0]] = len(out_layers)

    def value(name: str, key: str) -> Any:
        found = (configs[name] or {}).get(key)
        if found is None:
            raise MergeError(f"model {name!r}: its config has no {key!r}, which model {layout!r}'s has.")
        return found

    for key, setting in loaded.items():
        if key in INDEX_LIST_KEYS and isinstance(setting, list):
            out[key] = [j for j, (name, index) in enumerate(out_layers) if index in value(name, key)]
        elif key in THRESHOLD_KEYS and isinstance(setting, int) and not isinstance(setting, bool):
            below = [index < value(name, key) for name, index in out_layers]
            lead = next((j for j, flag in enumerate(below) if not flag), len(below))
            out[key] = lead
            if any(below[lead:]):
                exact = THRESHOLD_KEYS[key]
                problem = (f"{key}: the stack puts layers below their model's {key} after layers above it, which one "
                           "number cannot describe")
                if exact is None or exact not in out:
                    raise ValueError(f"{problem}; reorder the slices.")
                warn(f"{problem}; {exact!r}, which transformers reads, describes every layer exactly.")
        elif ("layer" in key and key not in LAYER_COUNT_KEYS and isinstance(setting, list)
              and count is not None and len(setting) == count):
            entries = []
            for name, index in out_layers:
                found = value(name, key)
                if not isinstance(found, list) or len(found) <= index:
                    raise MergeError(f"model {name!r}: its config's {key!r} has no entry for layer {index}.")
                entries.append(found[index])
            out[key] = entries
    return out


def _sink(stacked: RenamedSource, options: Any, output_dir: str | os.PathLike | None, record: Any) -> Any:
    """A checkpoint folder with ``output_dir``; else a model of the stack's class (built from its config), or a state
    dict without one."""
    from .io.sinks import output_sink
    from .models import architecture_class

    inputs = record.input_folders()
    if output_dir is not None:
        return output_sink(stacked, options, output_dir=output_dir, inputs=inputs)
    model_class = None
    if stacked.folder is not None and (stacked.folder / "config.json").is_file():
        model_config, model_class = architecture_class(stacked.folder)
    if model_class is None:
        return output_sink(stacked, options, state_dict=True)
    return output_sink(stacked, options, into=model_class(model_config).eval(), inputs=inputs)


__all__ = ["INDEX_LIST_KEYS", "LAYER_COUNT_KEYS", "THRESHOLD_KEYS", "RenamedSource", "StackConfig", "StackMerger",
           "build_stack", "stack_layers", "stacked_config"]
