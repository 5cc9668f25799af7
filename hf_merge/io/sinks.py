"""Where a merge's tensors go: one small :class:`Sink` protocol for every output.

The engine asks a sink which keys it wants and in what order (:meth:`Sink.begin`), hands it each merged tensor
(:meth:`Sink.put`, into :meth:`Sink.buffer` where it offers one), amendments the whole pass settles
(:meth:`Sink.amend`, for sinks that can patch what they hold), then :meth:`Sink.finish` with the merge's record, or
:meth:`Sink.abort`. Only folder sinks touch the file system, through :func:`hf_merge.io.publish.publish_folder`.

Here: checkpoint folders, in-memory models, models dispatched by Accelerate, state dicts, and live tensors updated
in place (ATM). Task banks (:mod:`hf_merge.bank`) and PEFT adapters (:mod:`hf_merge.io.adapter_sink`) have their own.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import dataclasses
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..distributed import SINGLE, Ranks
from ..errors import MergeError
from ..tensors import Amendment, TensorMeta
from .publish import check_output_dir, publish_folder
from .sources import ModelSource, TensorSource
from .writer import DEFAULT_MAX_SHARD_SIZE, OutputBuffers, PositionedWriter, ShardWriter, plan_shards

if TYPE_CHECKING:
    from ..options import MergeOptions
    from ..params import ParamInfo
    from ..record import MergeRecord



class Sink(abc.ABC):
    """One output of a merge."""

    #: What the output is, in error messages.
    description: ClassVar[str] = "this output"
    #: Options this output cannot honour; a run given any of them raises naming it.
    unsupported_options: ClassVar[tuple[str, ...]] = ()
    #: Whether :meth:`amend` patches tensors already put (else the engine holds outputs until they are settled).
    amends_in_place: ClassVar[bool] = False
    #: Whether :meth:`put` also takes a :class:`~hf_merge.lowrank.LowRank` update (merges stay in factors).
    takes_lowrank: ClassVar[bool] = False
    #: Whether :meth:`put` takes a compressor's encoded parts ``{part: tensor}`` instead of merged tensors.
    takes_encoded: ClassVar[bool] = False

    def check_options(self, options: MergeOptions) -> None:
        options.reject(self.unsupported_options, f"The output, {self.description},")

    def begin(self, metas: Mapping[str, TensorMeta], infos: Mapping[str, ParamInfo], read_ahead: int) -> list[str]:
        """The keys wanted, in the order they will be put (``metas``: output shapes and dtypes)."""
        self.metas = metas
        return list(metas)

    def buffer(self, key: str) -> torch.Tensor:
        """Where the output of ``key`` may be written (a fresh tensor unless the sink reuses buffers)."""
        meta = self.metas[key]
        return torch.empty(meta.shape, dtype=meta.dtype)

    @abc.abstractmethod
    def put(self, key: str, value: Any) -> None:
        """Take the output of ``key``."""

    def amend(self, amendments: Iterable[Amendment]) -> None:
        raise TypeError(f"{type(self).__name__} does not patch tensors it was given.")

    @abc.abstractmethod
    def finish(self, record: MergeRecord | None) -> Any:
        """Complete the output (recording the merge where it keeps records) and return the result."""

    def abort(self, error: BaseException) -> None:
        """Drop whatever was written: the run failed with ``error``."""

    @property
    def splits_across_ranks(self) -> bool:
        """Whether :meth:`split` is defined."""
        return type(self).split is not Sink.split

    def split(self, ranks: Ranks, owners: Mapping[str, int]) -> Sink:
        """Optional: the sink of this process's share of a merge split across processes (:mod:`hf_merge.distributed`),
        which is put only the keys ``owners`` gives its rank."""
        raise TypeError(f"The output, {self.description}, cannot be split across processes.")


class GatheredSink(Sink):
    """An in-memory output of a merge split across processes: this process's tensors are held until the end, then
    each tensor goes from the process that merged it to every process (one broadcast per tensor, in the output's
    order), so that every process returns the whole result."""

    def __init__(self, inner: Sink, ranks: Ranks, owners: Mapping[str, int]) -> None:
        self.inner, self.ranks, self.owners = inner, ranks, owners
        self.description = inner.description
        self.held: dict[str, torch.Tensor] = {}

    def begin(self, metas: Mapping[str, TensorMeta], infos: Mapping[str, ParamInfo], read_ahead: int) -> list[str]:
        self.metas = metas
        self.order = self.inner.begin(metas, infos, read_ahead)
        return self.order

    def put(self, key: str, value: torch.Tensor) -> None:
        self.held[key] = value

    def finish(self, record: MergeRecord | None) -> Any:
        for key in self.order:
            meta, owner = self.metas[key], self.owners[key]
            mine = owner == self.ranks.rank
            value = self.held.pop(key).contiguous() if mine else torch.empty(meta.shape, dtype=meta.dtype)
            self.ranks.broadcast(value, owner)
            self.inner.put(key, value)
        return self.inner.finish(record)

    def abort(self, error: BaseException) -> None:
        self.held.clear()
        self.inner.abort(error)


class FolderSink(Sink):
    """A ``from_pretrained``-loadable checkpoint folder: sharded safetensors streamed tensor by tensor (entries the
    pass settles late patched in place), the base's side files, ``merge_config.json`` and the card; published
    atomically. Returns the folder's path."""

    description = "a checkpoint folder (output_dir=...)"
    unsupported_options = ("device_map", "max_memory", "offload_folder")
    amends_in_place = True
    #: The processes writing the folder: each writes its own tensors into the planned shard files (the same files,
    #: bytes and index as one process writes); rank 0 makes and publishes the folder.
    ranks: Ranks = SINGLE

    def __init__(self, output_dir: str | Path, base: TensorSource, options: MergeOptions,
                 inputs: Sequence[Path] = ()) -> None:
        check_output_dir(output_dir, inputs, overwrite=options.overwrite)  # before any work
        self.output_dir, self.inputs, self.overwrite = output_dir, list(inputs), options.overwrite
        self.base = base
        self.max_shard_size = options.max_shard_size or DEFAULT_MAX_SHARD_SIZE
        self._stack = contextlib.ExitStack()

    def split(self, ranks: Ranks, owners: Mapping[str, int]) -> Sink:
        self.ranks = ranks
        return self

    def begin(self, metas: Mapping[str, TensorMeta], infos: Mapping[str, ParamInfo], read_ahead: int) -> list[str]:
        self.metas = metas
        self.plan = plan_shards(metas, max_shard_size=self.max_shard_size)
        ranks = self.ranks
        if ranks.rank == 0:
            self.staging = self._stack.enter_context(publish_folder(self.output_dir, self.inputs,
                                                                    overwrite=self.overwrite))
        if not ranks.split:
            self.writer: ShardWriter | PositionedWriter = ShardWriter(self.staging, self.plan)
        else:
            if ranks.rank == 0:
                self.plan.allocate(self.staging)
            self.staging = Path(ranks.gather(str(self.staging) if ranks.rank == 0 else None)[0])
            if not self.staging.is_dir():
                raise MergeError(f"Process {ranks.rank} cannot see the folder {str(self.staging)!r} that process 0 "
                                 f"made for {str(self.output_dir)!r}: a merge split across machines needs an output "
                                 "folder on a file system they share.")
            self.writer = PositionedWriter(self.staging, self.plan)
        # each tensor is written as soon as it is produced: a few reused buffers hold the outputs
        self.buffers = OutputBuffers(metas, count=read_ahead + 1)
        return self.plan.order

    def buffer(self, key: str) -> torch.Tensor:
        return self.buffers.take(key)

    def put(self, key: str, value: torch.Tensor) -> None:
        self.writer.put(key, value)

    def amend(self, amendments: Iterable[Amendment]) -> None:
        self.plan.patch(self.staging, amendments)

    def finish(self, record: MergeRecord | None) -> str:
        from ..models import copy_side_files

        self.writer.close()
        self.ranks.sync()  # every process's tensors are in the files
        if self.ranks.rank == 0:
            if self.ranks.split:
                self.plan.write_index(self.staging)
            float_dtypes = {m.dtype for m in self.metas.values() if m.dtype.is_floating_point}
            copy_side_files(self.base, self.staging, dtype=float_dtypes.pop() if len(float_dtypes) == 1 else None)
            if record is not None:
                record.write_to(self.staging)
            self._stack.close()  # publish: the staging folder is renamed into place
        self.ranks.sync()  # published, or process 0's failure raised on every process
        return str(self.output_dir)

    def abort(self, error: BaseException) -> None:
        if hasattr(self, "writer"):
            self.writer.abort()
        self._stack.__exit__(type(error), error, error.__traceback__)


class StateDictSink(Sink):
    """A ``{key: tensor}`` dict (tied aliases included under every name)."""

    description = "a state dict"
    unsupported_options = ("device_map", "max_memory", "offload_folder", "max_shard_size", "overwrite",
                           "license", "tags", "base_model")  # no card to carry them

    def __init__(self, aliases: Mapping[str, str] | None = None) -> None:
        self.aliases = dict(aliases or {})
        self.tensors: dict[str, torch.Tensor] = {}

    def put(self, key: str, value: torch.Tensor) -> None:
        self.tensors[key] = value

    def split(self, ranks: Ranks, owners: Mapping[str, int]) -> Sink:
        return GatheredSink(self, ranks, owners)

    def finish(self, record: MergeRecord | None) -> dict[str, torch.Tensor]:
        for alias, canonical in self.aliases.items():
            self.tensors[alias] = self.tensors[canonical]
        return self.tensors


class ModelSink(Sink):
    """A model of the base's class (ties kept): each merged tensor copied into ``model`` under its in-memory name
    (``memory_names``: key → that name where they differ; by default those of ``ModelSource(model)``).

    Checkpoint tensors that transformers converts on loading (Mixtral's per-expert ``w1``/``w2``/``w3`` fused into
    3-D ``experts.gate_up_proj`` / ``down_proj``) are put in together: the parts of one parameter are held until all
    have arrived, converted by transformers' loading converters, copied in, and dropped."""

    description = "an in-memory model"
    unsupported_options = ("device_map", "max_memory", "offload_folder", "max_shard_size", "overwrite")
    #: The merge's :class:`~hf_merge.vocab.VocabularyPlan`: an output tokenizer it builds is attached to the model as
    #: ``hf_merge_tokenizer``.
    vocabulary: Any = None

    def __init__(self, model: torch.nn.Module, memory_names: Mapping[str, str] | None = None) -> None:
        self.model = model
        self.params = model.state_dict(keep_vars=True)
        self.memory_names = dict(memory_names) if memory_names is not None else ModelSource(model).memory_names
        self.conversions: dict[str, _Conversion] = {}  # key → the conversion it is a part of

    def begin(self, metas: Mapping[str, TensorMeta], infos: Mapping[str, ParamInfo], read_ahead: int) -> list[str]:
        """Every key placed (directly or through a conversion checked on meta tensors) before anything is written;
        the parts of one conversion put one after the other."""
        converted = [k for k in metas if self.memory_names.get(k, k) not in self.params]
        conversions, unplaced = _plan_conversions(self.model, converted, metas, self.params)
        if unplaced:
            shown = ", ".join(repr(k) for k in unplaced[:8])
            raise MergeError(
                f"Cannot place merged tensors [{shown}{', ...' if len(unplaced) > 8 else ''}] ({len(unplaced)}) into "
                f"a {type(self.model).__name__}: no parameter takes them, by name or through transformers' weight "
                "conversion; pass output_dir= to write a checkpoint instead."
            )
        self.conversions = {key: conversion for conversion in conversions for key in conversion.patterns}
        self.metas = metas
        order: list[str] = []
        started: set[str] = set()
        for key in metas:
            conversion = self.conversions.get(key)
            if conversion is None:
                order.append(key)
            elif conversion.target not in started:
                started.add(conversion.target)
                order.extend(conversion.patterns)
        return order

    def split(self, ranks: Ranks, owners: Mapping[str, int]) -> Sink:
        return GatheredSink(self, ranks, owners)

    def put(self, key: str, value: torch.Tensor) -> None:
        conversion = self.conversions.get(key)
        if conversion is None:
            self._place(self.memory_names.get(key, key), value)
            return
        conversion.parts[key] = value
        if len(conversion.parts) == len(conversion.patterns):
            for name, tensor in conversion.convert(self.model, conversion.parts).items():
                self._place(name, tensor)
            conversion.parts.clear()

    def _place(self, name: str, value: torch.Tensor) -> None:
        """Copy ``value`` into the model's tensor ``name`` (in place; a merge in another dtype replaces its data)."""
        destination = self.params[name]
        with torch.no_grad():
            if destination.dtype != value.dtype:
                destination.data = value.to(destination.device)
            else:
                destination.copy_(value)

    def finish(self, record: MergeRecord | None) -> torch.nn.Module:
        if self.vocabulary is not None and self.vocabulary.tokenizer is not None:
            self.model.hf_merge_tokenizer = self.vocabulary.tokenizer
        return record.attach_to(self.model) if record is not None else self.model


@dataclasses.dataclass
class _Conversion:
    """Checkpoint keys that one of transformers' ``WeightConverter`` turns into in-memory tensors together (the
    experts of one layer into a fused parameter): ``target``, the first tensor it makes; ``patterns``, each key's
    source pattern, keys in transformers' loading order; ``parts``, the merged tensors put so far."""

    target: str
    converter: Any
    patterns: dict[str, str] = dataclasses.field(default_factory=dict)
    parts: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def convert(self, model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The in-memory tensors made from ``tensors`` (one per key), by name."""
        converter = copy.deepcopy(self.converter)
        for key, pattern in self.patterns.items():
            converter.add_tensor(self.target, key, pattern, tensors[key])
        made = converter.convert(self.target, model=model, config=model.config)
        return {name: value[0] if isinstance(value, list) else value for name, value in made.items()}


def _plan_conversions(model: torch.nn.Module, keys: Sequence[str], metas: Mapping[str, TensorMeta],
                      params: Mapping[str, torch.Tensor]) -> tuple[list[_Conversion], list[str]]:
    """The conversions that place ``keys`` into ``params`` the way ``from_pretrained`` loads them (each tried on
    meta tensors: it must make tensors of the parameters' names and shapes), and the keys none places."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return [], list(keys)
    if not keys or not isinstance(model, PreTrainedModel):
        return [], list(keys)
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    transforms = _weight_conversions(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    converter_of = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    by_target: dict[str, _Conversion] = {}
    unplaced: list[str] = []
    for key in sorted(keys, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, params)
        if pattern is None or target not in params:
            unplaced.append(key)
            continue
        by_target.setdefault(target, _Conversion(target, converter_of[pattern])).patterns[key] = pattern
    conversions = []
    for conversion in by_target.values():
        try:
            made = conversion.convert(model, {k: torch.empty(metas[k].shape, dtype=metas[k].dtype, device="meta")
                                              for k in conversion.patterns})
        except Exception:  # an op that fails on these shapes (transformers raises many kinds): unplaced
            made = None
        if made is not None and all(name in params and made[name].shape == params[name].shape for name in made):
            conversions.append(conversion)
        else:
            unplaced.extend(conversion.patterns)
    return conversions, unplaced


def _weight_conversions(model: Any) -> list[Any]:
    """The weight transforms between ``model``'s checkpoint and in-memory names: those it was loaded with, else its
    class's (as ``transformers.core_model_loading.revert_weight_conversion`` chooses them when saving)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    loaded = getattr(model, "_weight_conversions", None)
    if loaded is not None:
        return copy.deepcopy(loaded)
    return [t for t in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(t, PrefixChange)]


class DispatchedSink(ModelSink):
    """A model built empty and filled tensor by tensor onto the devices of an Accelerate device map (``"disk"``
    entries offloaded), then dispatched; never materialised whole in CPU memory. Nothing is built before
    :meth:`begin` (a run refused during validation leaves no offload folder behind)."""

    description = "a model placed by Accelerate (device_map=...)"
    unsupported_options = ("max_shard_size", "overwrite")

    def __init__(self, template: torch.nn.Module, options: MergeOptions, device_map: Any) -> None:
        self.template, self.options, self.device_map = template, options, device_map

    def begin(self, metas: Mapping[str, TensorMeta], infos: Mapping[str, ParamInfo], read_ahead: int) -> list[str]:
        from ..placement import DispatchedOutput

        self.output = DispatchedOutput(self.template, self.device_map, max_memory=self.options.max_memory,
                                       offload_folder=self.options.offload_folder)
        super().__init__(self.output.model)
        return super().begin(metas, infos, read_ahead)

    def _place(self, name: str, value: torch.Tensor) -> None:
        self.output.place(name, value)

    def finish(self, record: MergeRecord | None) -> torch.nn.Module:
        self.model = self.output.finish()
        return super().finish(record)

    def abort(self, error: BaseException) -> None:
        output = getattr(self, "output", None)
        if output is not None and output.owns_offload_folder:  # a temporary folder of ours: nothing else is there
            shutil.rmtree(output.offload_folder, ignore_errors=True)


class TensorsSink(Sink):
    """Live tensors updated in place (``{key: tensor}``, e.g. a model being trained), each cast to its own dtype."""

    description = "the live tensors of a model being trained"
    unsupported_options = ("device_map", "max_memory", "offload_folder", "max_shard_size", "dtype", "overwrite",
                           "license", "tags", "base_model")  # no card to carry them

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def put(self, key: str, value: torch.Tensor) -> None:
        self.tensors[key].copy_(value.to(self.tensors[key].dtype))

    def finish(self, record: MergeRecord | None) -> Mapping[str, torch.Tensor]:
        return self.tensors


def output_sink(base: TensorSource, options: MergeOptions, *, output_dir: str | Path | None = None,
                into: torch.nn.Module | None = None, state_dict: bool = False, inputs: Sequence[Path] = ()) -> Sink:
    """The sink of a merge's weights: a folder with ``output_dir``; else ``into``; else a model of the base's class
    (placed per ``device_map``, or the base's own Accelerate device map); else a state dict. ``inputs``: the folders
    a folder output may not touch. A Sentence-Transformers base gives a folder in its layout, or a model of its
    class (:mod:`hf_merge.sentence_transformers`)."""
    from ..models import load_model_from_folder
    from ..placement import is_dispatched
    from ..sentence_transformers import SentenceTransformerFolderSink, SentenceTransformerSource, model_sink
    from ..vocab import vocabulary_of

    pipeline = isinstance(base, SentenceTransformerSource)
    if output_dir is not None:
        if into is not None:
            raise ValueError("Give output_dir= or an in-memory target (inplace=True), not both.")
        return (SentenceTransformerFolderSink if pipeline else FolderSink)(output_dir, base, options, inputs)
    if state_dict:
        return StateDictSink(base.aliases)
    if pipeline:
        return model_sink(base, options, into)
    device_map = options.device_map
    if device_map is None and into is None and base.model is not None and is_dispatched(base.model):
        device_map = base.model.hf_device_map
    plan = vocabulary_of(base)
    rows = plan.rows if plan is not None else None
    if device_map is not None:
        if into is not None:
            raise ValueError("device_map= places a new model; it cannot update a model in place (inplace=True).")
        if rows is not None:
            raise ValueError(f"device_map= with a vocabulary of another size ({rows} embedding rows, tokenizer_source "
                             f"{plan.source!r}) is not supported yet: write a checkpoint (output_dir=) and load it "
                             "with device_map.")
        template = base.model if base.model is not None else load_model_from_folder(base.folder, meta=True)
        if template is None:
            raise ValueError("device_map= needs a model base or a checkpoint folder with a config.json.")
        return DispatchedSink(template, options, device_map)
    target = into
    if target is None and base.model is not None:
        target = copy.deepcopy(base.model)
    if target is None and base.folder is not None:
        target = load_model_from_folder(base.folder, progress=options.progress)
    if target is None:
        return StateDictSink(base.aliases)
    if rows is not None:
        _resize_vocabulary(target, rows)
    sink = ModelSink(target)
    sink.vocabulary = plan
    return sink


def _resize_vocabulary(model: torch.nn.Module, rows: int) -> None:
    """Give an in-memory output the merge's number of embedding rows (their values are all overwritten)."""
    resize = getattr(model, "resize_token_embeddings", None)
    if resize is None:
        raise ValueError(f"The merge's vocabulary has {rows} embedding rows; a {type(model).__name__} cannot be "
                         "resized to it: write a checkpoint (output_dir=) instead.")
    resize(rows, mean_resizing=False)
