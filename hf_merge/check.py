"""A pre-merge check: what a merge would find, before any merge work.

    report = hf_merge.check(base, {"math": "./math", "code": "./code"}, "ties", density=0.5, dtype="bfloat16")
    print(report)              # one screen: inputs, differences, vocabulary, method, estimates, problems
    report.ok                  # False when the merge would be refused (a blocking problem)
    report.to_dict()           # the same as JSON-serialisable data (``hf-merge check RECIPE --json``)

The check opens the inputs as the merge does (:mod:`hf_merge.inputs`: Hub repo ids are resolved the same way) but reads
only headers: ``config.json``, safetensors headers (a LoRA adapter's factors included: their shapes come from its
header, never from its data), tokenizer files (hashed) and ``adapter_config.json``. It writes nothing.

It reports:

- every input: its architecture (``architectures``, ``model_type``), vocabulary size and embedding shape, whether the
  output embedding is tied (``tie_word_embeddings``) and whether it is stored, its dtypes, and, relative to the base,
  its missing and extra tensors and shape mismatches; for a LoRA adapter its targets, rank and alpha;
- the keys of the inputs' ``config.json`` whose values differ;
- the vocabulary: sizes and embedding shapes, whether the tokenizer files differ (by hash), and what each
  ``tokenizer_source`` would do;
- the method: its config built (errors reported, not raised), whether method and inputs go together
  (:func:`hf_merge.engine.check_plan`), per-task values naming the right tasks;
- estimates: the output size (shapes × output dtype), the merge's peak working set (the engine's per-tensor model,
  :func:`hf_merge.engine.read_ahead_depth`) and a time from the bytes read at :data:`ASSUMED_READ_RATE`.

Blocking problems (``errors``) are what the merge would refuse: an input that does not open, missing or extra tensors,
shape mismatches, different vocabularies or architectures, mixed dtypes without an output dtype, an unknown method or
a bad config value, an output folder that would be refused, a ``memory_budget`` below one tensor's working set.
``warnings`` do not block: dtypes converted to the output dtype, a tied base with an untied fine-tune (or the reverse),
tokenizer files that differ, too little free disk space.

One concern in one file (~1000 lines): every check reads the same opened inputs, and the report renders them;
splitting the checks from their rendering would pass the whole state between two modules.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import os
import shutil
import textwrap
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import MergeError
from .io.deltas import DeltaSource
from .io.sources import FolderSource, ModelSource, StateDictSource, TensorSource

#: The disk read rate the time estimate assumes (bytes per second): a SATA SSD or a fast network disk. An NVMe drive
#: reads 2–7 GB/s, inputs already in the page cache faster still; a hard disk or a slow network share 100–200 MB/s.
ASSUMED_READ_RATE = 500 * 10**6

#: Tokenizer files compared between inputs (by SHA-256).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
                   "sentencepiece.bpe.model", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json")

#: ``tokenizer_source`` values and what each would do.
TOKENIZER_SOURCES = {
    "base": "keeps the base's tokenizer and vocabulary; a model whose embedding rows differ is matched to it by token "
            "(its tokens the base lacks are dropped, with a warning)",
    "union": "the base's tokenizer with every model's tokens added; every model's embedding rows are permuted into it "
             "(a token a model lacks gets the only owner's row, else the base's, else the owners' mean)",
    "<model>": "that model's tokenizer and vocabulary (a task name or its reference); the others are matched to it by "
               "token",
}

#: ``config.json`` keys that differ between any two saves and say nothing about the model.
_CONFIG_NOISE = {"_name_or_path", "name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype",
                 "_attn_implementation_autoset", "_attn_implementation"}
#: The width ``str(report)`` wraps its lines at.
_WIDTH = 120
_ERRORS = (ValueError, TypeError, KeyError, OSError, MergeError, RuntimeError)


# ------------------------------------------------------------------------------------------------ the report
@dataclasses.dataclass
class Problem:
    """One finding: ``severity`` ``"error"`` (blocks the merge) or ``"warning"``; ``input`` the input it is about
    (``"base"``, a task name) or ``None``; ``topic`` what it is about (``"inputs"``, ``"keys"``, ``"shapes"``,
    ``"dtypes"``, ``"vocabulary"``, ``"tokenizer"``, ``"ties"``, ``"architecture"``, ``"method"``, ``"options"``,
    ``"memory"``, ``"output"``, ``"recipe"``)."""

    severity: str
    topic: str
    message: str
    input: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class InputReport:
    """What the check found about one input (``name``: ``"base"`` or the task name)."""

    name: str
    reference: str
    kind: str = "missing"
    opened: bool = False
    architectures: list[str] | None = None
    model_type: str | None = None
    vocab_size: int | None = None
    embedding_shape: tuple[int, ...] | None = None
    tie_word_embeddings: bool | None = None
    head_stored: bool | None = None
    dtypes: dict[str, int] = dataclasses.field(default_factory=dict)
    num_tensors: int = 0
    stored_bytes: int | None = None
    missing_keys: list[str] = dataclasses.field(default_factory=list)
    extra_keys: list[str] = dataclasses.field(default_factory=list)
    shape_mismatches: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = dataclasses.field(default_factory=dict)
    tokenizer_files: dict[str, str] = dataclasses.field(default_factory=dict)
    lora: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["embedding_shape"] = list(self.embedding_shape) if self.embedding_shape is not None else None
        out["shape_mismatches"] = {k: [list(a), list(b)] for k, (a, b) in self.shape_mismatches.items()}
        return out


@dataclasses.dataclass
class CheckReport:
    """The result of :func:`check`: ``ok`` is False when a blocking problem was found; ``str(report)`` is one
    readable screen, :meth:`to_dict` the same as JSON-serialisable data."""

    method: str | None = None
    config: dict[str, Any] | None = None
    inputs: list[InputReport] = dataclasses.field(default_factory=list)
    reference: str | None = None
    config_differences: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    tokenizer_source: str = "base"
    estimate: dict[str, Any] = dataclasses.field(default_factory=dict)
    output_dir: str | None = None
    problems: list[Problem] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def error(self, topic: str, message: str, input: str | None = None) -> None:
        self.problems.append(Problem("error", topic, " ".join(str(message).split()), input))

    def warn(self, topic: str, message: str, input: str | None = None) -> None:
        self.problems.append(Problem("warning", topic, " ".join(str(message).split()), input))

    def input(self, name: str) -> InputReport:
        return next(item for item in self.inputs if item.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "method": self.method,
            "config": self.config,
            "reference": self.reference,
            "inputs": [item.to_dict() for item in self.inputs],
            "config_differences": self.config_differences,
            "tokenizer_source": self.tokenizer_source,
            "tokenizer_sources": dict(TOKENIZER_SOURCES),
            "estimate": self.estimate,
            "output_dir": self.output_dir,
            "errors": [p.to_dict() for p in self.errors],
            "warnings": [p.to_dict() for p in self.warnings],
        }

    def __str__(self) -> str:
        return _render(self)


# ------------------------------------------------------------------------------------------------ the check
def check(
    base: Any,
    models: Sequence[Any] | Mapping[str, Any],
    config: Any = None,
    *,
    output_dir: str | os.PathLike | None = None,
    tokenizer_source: str | None = None,
    **options: Any,
) -> CheckReport:
    """Check a merge before running it: the inputs, their differences, the method and the resources it needs.

    Reads only headers (configs, safetensors headers, tokenizer files) and writes nothing; every problem is reported
    in the returned :class:`CheckReport`, none raised.

    Args:
        base: the base θ₀, as :func:`hf_merge.merge` takes it (``None`` for methods that merge whole models).
        models: the fine-tuned models (a sequence, or ``{task_name: model}``), LoRA adapters among them.
        config: a :class:`~hf_merge.MergeConfig`, a method name, a ``{"method": ..., ...}`` dict, or ``None`` to
            check the inputs only.
        output_dir: the output folder the merge would write (checked as the merge checks it: not an input, not a
            folder of the user's without ``overwrite=True``), and its free space.
        tokenizer_source: ``"base"`` (the default: what merge does) or ``"union"`` (mergekit's; not supported yet).
        **options: the run options :func:`hf_merge.merge` takes (``dtype``, ``memory_budget``, ``overwrite``,
            ``allow_pickle``, ``revision``, ...), then config fields.
    """
    return _Checker(output_dir, tokenizer_source).run(base, models, config, options)


class _Checker:
    def __init__(self, output_dir: str | os.PathLike | None, tokenizer_source: str | None) -> None:
        self.report = CheckReport(output_dir=os.fspath(output_dir) if output_dir is not None else None,
                                  tokenizer_source=tokenizer_source or "base")
        self.sources: dict[str, TensorSource] = {}  # every input that opened, by name
        self.failed: set[str] = set()  # the inputs that did not

    # -------------------------------------------------------------------------------------------- top level
    def run(self, base: Any, models: Any, config: Any, keywords: dict[str, Any]) -> CheckReport:
        from .options import MergeOptions, split_options

        report = self.report
        keywords = dict(keywords)
        try:
            self.options = split_options(keywords, progress=False)
        except (ValueError, TypeError) as error:
            report.error("options", error)
            self.options = MergeOptions(progress=False)
        merger = self.method(config, keywords)
        base_source, tasks = self.open(base, models)
        self.tokenizer_source(base, models)
        base_source, tasks = self.reconcile(base_source, tasks, base, models)
        whole_models = merger is not None and _is_model_merger(merger)
        if merger is not None and "base" not in self.failed:
            self.check_plan(merger, base_source, tasks)
        # The reference the others are compared with: the base, or the first model for methods without one.
        if base_source is not None and not whole_models:
            reference_name: str | None = "base"
        elif base is None or whole_models:
            reference_name = next(iter(tasks), None)
        else:
            reference_name = None  # the base did not open: reported, nothing to compare with
        reference = self.sources.get(reference_name) if reference_name is not None else None
        if reference is None or isinstance(reference, DeltaSource):
            return report
        report.reference = reference_name
        others = {name: source for name, source in tasks.items() if name != reference_name}
        others = self.bind(reference, others)
        pair = self.embedding_keys(reference, others)
        self.describe_ties(reference, others, pair)
        self.compare(reference, others)
        self.vocabulary(reference_name, others, pair)
        self.config_differences()
        if merger is not None:
            self.per_task_values(merger, list(tasks))
        num_inputs = len(tasks) + (1 if reference_name == "base" else 0)
        self.estimate(reference, num_inputs, whole_models)
        if report.output_dir is not None:
            self.output(base_source, tasks)
        return report

    def reconcile(self, base_source: TensorSource | None, tasks: dict[str, TensorSource], base: Any, models: Any
                  ) -> tuple[TensorSource | None, dict[str, TensorSource]]:
        """The inputs as the merge sees them after vocabulary reconciliation (embedding rows in the output
        vocabulary; only tokenizer files are read), so shapes are compared as the merge will find them."""
        from .vocab import reconcile_vocabularies

        if base_source is None or self.failed:
            return base_source, tasks
        references = {"base": base, **(dict(models) if isinstance(models, Mapping) else {})}
        try:
            base_source, tasks = reconcile_vocabularies(base_source, tasks, self.options, references=references)
        except _ERRORS as error:
            self.report.error("vocabulary", error)
            return base_source, tasks
        self.sources.update({"base": base_source, **tasks})
        return base_source, tasks

    def tokenizer_source(self, base: Any, models: Any) -> None:
        """``tokenizer_source`` must be ``"base"``, ``"union"`` or an input; ``"union"`` needs every model's
        tokenizer files (:mod:`hf_merge.vocab`)."""
        from .vocab import SOURCES, TOKENIZER_MODEL_FILES, match_input

        report, chosen = self.report, self.report.tokenizer_source
        names = list(self.sources)
        references = {"base": base, **(dict(models) if isinstance(models, Mapping) else {})}
        if chosen not in SOURCES:
            name = match_input(chosen, names, list(self.sources.values()), references)
            if name is None:
                report.error("vocabulary", f"tokenizer_source {chosen!r} names no input of this merge: give 'base', "
                                           f"'union' or one of {names}.")
            return
        if chosen != "union":
            return
        for name, source in self.sources.items():
            if isinstance(source, DeltaSource):
                report.error("vocabulary", f"tokenizer_source 'union' is not supported with model {name!r}, an update "
                                           f"of its base ({_kind(source)}).", name)
            elif source.folder is not None and not any((Path(source.folder) / f).is_file()
                                                       for f in TOKENIZER_MODEL_FILES):
                report.error("vocabulary", f"tokenizer_source 'union' needs every model's tokenizer, but {name!r} has "
                                           f"no tokenizer files ({', '.join(TOKENIZER_MODEL_FILES)}).", name)

    # -------------------------------------------------------------------------------------------- method
    def method(self, config: Any, keywords: dict[str, Any]) -> Any:
        """The merger of ``config`` (and config fields in ``keywords``), or ``None`` with the error reported."""
        from .config import MergeConfig
        from .registry import get_merger, make_config

        report = self.report
        if config is None:
            if keywords:
                report.error("method", f"config fields {sorted(keywords)} given without a method.")
            return None
        try:
            if isinstance(config, Mapping):
                config = MergeConfig.from_dict(config)
            config = make_config(config, **keywords)
            report.method = config.method
            report.config = config.to_dict()
            if config.not_checked is None:
                return get_merger(config)
        except (ValueError, TypeError, KeyError) as error:
            if isinstance(config, MergeConfig):
                report.method = config.method
            elif isinstance(config, Mapping):
                report.method = str(config.get("method"))
            elif isinstance(config, str):
                report.method = config
            report.error("method", f"config: {_message(error)}")
            return None
        raise ValueError(f"hf-merge check and --dry-run do not check {config.not_checked} yet; hf-merge merge "
                         "validates it before writing.")

    def check_plan(self, merger: Any, base: TensorSource | None, tasks: Mapping[str, TensorSource]) -> None:
        from .data import check_data_for
        from .engine import Plan, check_plan

        try:
            check_plan(Plan(base, tasks, merger))
        except (ValueError, TypeError) as error:
            self.report.error("method", error)
        try:
            check_data_for(merger, self.options.data, list(tasks))
        except ValueError as error:
            self.report.error("data", error)

    def per_task_values(self, merger: Any, task_names: list[str]) -> None:
        """Per-task config values (``{task: value}``) must name exactly the tasks; linear methods' weights resolve."""
        from .config import MergeConfig, resolve_per_task

        def walk(config: Any, prefix: str) -> None:
            for field in dataclasses.fields(config):
                value = getattr(config, field.name)
                if isinstance(value, MergeConfig):
                    walk(value, f"{prefix}{field.name}.")
                elif isinstance(value, Mapping):
                    try:
                        resolve_per_task(f"{prefix}{field.name}", value, task_names)
                    except ValueError as error:
                        self.report.error("method", error)

        before = len(self.report.errors)
        walk(merger.config, "")
        if len(self.report.errors) == before:  # the same mismatch, said once
            try:
                merger.coefficients_of(task_names)
            except (ValueError, TypeError) as error:
                self.report.error("method", error)

    # -------------------------------------------------------------------------------------------- inputs
    def open(self, base: Any, models: Any) -> tuple[TensorSource | None, dict[str, TensorSource]]:
        """Open the inputs as the merge does (LoRA adapter folders from their headers); an input that does not open
        is reported and left out."""
        from .inputs import open_base, open_inputs, open_tasks

        report = self.report
        if isinstance(models, Mapping):
            items = [(str(name), value) for name, value in models.items()]
        elif isinstance(models, (str, os.PathLike, torch.nn.Module)) or not isinstance(models, Sequence):
            items = []
            report.error("inputs", "models must be a sequence or a {task_name: model} mapping of models, paths or "
                                   "state dicts.")
        else:
            items = [(f"task_{i}", value) for i, value in enumerate(models)]
        if base is not None:
            report.inputs.append(InputReport("base", _reference(base)))
        for name, value in items:
            report.inputs.append(InputReport(name, _reference(value)))
        given = [(name, self.open_one(name, lambda name=name, value=value: self.header_lora(name, value)))
                 for name, value in items]
        given = [(name, value) for name, value in given if name not in self.failed]
        finetuned = dict(given) if isinstance(models, Mapping) else [value for _, value in given]

        def open_the_base() -> TensorSource | None:
            source = self.open_one("base", lambda: open_base(base, self.options)) if base is not None else None
            if source is not None:
                self.sources["base"] = source
            return source

        if not items:
            if isinstance(models, (Mapping, Sequence)) and not isinstance(models, str):
                report.error("inputs", "models is empty: give at least one fine-tuned model.")
            base_source, tasks = open_the_base(), {}
        else:
            together: Exception | None = None
            if not self.failed:  # as the merge opens them (Hub revisions checked, task names made)
                try:
                    base_source, tasks = open_inputs(base, finetuned, self.options, base_required=False)
                except _ERRORS as error:
                    together = error
                else:
                    if base_source is not None:
                        self.sources["base"] = base_source
            if self.failed or together is not None:  # one by one, to report every input that does not open
                failed_before = set(self.failed)
                base_source, tasks = open_the_base(), {}
                for name, value in given:
                    opened = self.open_one(name, lambda name=name, value=value: open_tasks({name: value},
                                                                                           self.options))
                    tasks.update(opened or {})
                if together is not None and self.failed == failed_before:  # each opens alone, not all together
                    report.error("inputs", together)
        self.sources.update(tasks)
        for name, source in self.sources.items():
            self.describe(name, source)
        report.inputs = [item for item in report.inputs if item.opened or item.name in self.failed]
        return base_source, tasks

    def open_one(self, name: str, opener: Any) -> Any:
        """What ``opener()`` opens, or ``None`` with the error reported (the message names the input: its label)."""
        try:
            return opener()
        except _ERRORS as error:
            self.failed.add(name)
            self.report.error("inputs", _message(error), name)
            return None

    def header_lora(self, name: str, value: Any) -> Any:
        """A local LoRA adapter folder as a source built from its header (factor shapes, no data), else ``value``."""
        from .adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, LoraAdapter, LoraSource, is_adapter_folder
        from .config import load_json
        from .io.safetensors_file import SafetensorsFile

        if not isinstance(value, (str, os.PathLike)) or not os.path.isdir(value) or not is_adapter_folder(value):
            return value
        folder = Path(value)
        weights = folder / ADAPTER_WEIGHTS_NAME
        if not weights.is_file():
            return value  # pickle weights or none: opened (and refused) as the merge opens them
        config = load_json(folder / ADAPTER_CONFIG_NAME)
        if not isinstance(config, dict):
            raise ValueError(f"{folder / ADAPTER_CONFIG_NAME}: expected a JSON object.")
        header = SafetensorsFile(weights)
        tensors = {key: torch.empty(header.shape(key), dtype=header.dtype(key), device="meta") for key in header.keys()}
        return LoraSource(LoraAdapter(config, tensors, f"task {name!r} ({folder})"))

    def describe(self, name: str, source: TensorSource) -> None:
        """Fill in the input's own facts (before it is compared with the base)."""
        from .adapters import LoraSource
        from .inputs import describe_inputs

        item = next((item for item in self.report.inputs if item.name == name), None)
        if item is None:  # one of several adapters of a PeftModel
            item = InputReport(name, "(in memory)")
            self.report.inputs.append(item)
        item.opened = True
        origin = describe_inputs(source, {})["base"]
        if origin is not None:
            item.reference = _display_path(origin)
        item.kind = _kind(source)
        if isinstance(source, LoraSource):
            tensors = {**{f"{m}.{p}": t for m, parts in source.adapter.factors_raw.items() for p, t in parts.items()},
                       **source.adapter.full_tensors}
            item.dtypes = dict(collections.Counter(_dtype_name(t.dtype) for t in tensors.values()))
            item.num_tensors = len(tensors)
            item.stored_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
            item.lora = _lora_summary(source)
            folder = Path(source.origin) if source.origin is not None else None
        elif isinstance(source, DeltaSource):  # an update read through the base: nothing stored to describe
            folder = None
        else:
            metas = [source.meta(key) for key in source.keys()]
            item.dtypes = dict(collections.Counter(_dtype_name(m.dtype) for m in metas))
            item.num_tensors = len(metas)
            item.stored_bytes = (sum(m.nbytes for m in metas)
                                 if isinstance(source, FolderSource) else None)
            folder = source.folder
            config = _flat_config(source)
            if config:
                architectures = config.get("architectures")
                item.architectures = list(architectures) if isinstance(architectures, (list, tuple)) else None
                if item.architectures is None and isinstance(source, ModelSource):  # never saved: its own class
                    item.architectures = [type(source.model).__name__]
                item.model_type = config.get("model_type")
                item.vocab_size = _vocab_size(config)
                tie = config.get("tie_word_embeddings")
                item.tie_word_embeddings = tie if isinstance(tie, bool) else None
        if folder is not None and folder.is_dir():
            item.tokenizer_files = {file: _sha256(folder / file) for file in TOKENIZER_FILES
                                    if (folder / file).is_file()}

    def bind(self, reference: TensorSource, others: dict[str, TensorSource]) -> dict[str, TensorSource]:
        """Bind the updates (LoRA adapters) to the base as the engine does; one that does not fit is reported."""
        from .inputs import bind_deltas

        bound = {}
        for name, source in others.items():
            if not isinstance(source, DeltaSource):
                bound[name] = source
                continue
            if self.report.reference != "base":
                self.report.error("inputs", f"model {name!r} is an update of a base ({_kind(source)}), but the merge "
                                            "has no base to apply it to.", name)
                continue
            try:
                bind_deltas(reference, {name: source})
            except _ERRORS as error:
                self.report.error("inputs", f"model {name!r} does not fit the base: {_message(error)}", name)
                continue
            bound[name] = source
            lora = self.report.input(name).lora
            if lora is not None:  # the base's tensors the adapter updates
                lora["targeted_tensors"] = sorted(key for key in reference.keys()
                                                  if source.targeted_module(key) is not None)
        return bound

    # -------------------------------------------------------------------------------------------- comparisons
    def embedding_keys(self, reference: TensorSource, others: Mapping[str, TensorSource]) -> tuple[str, str] | None:
        from .inputs import tied_embedding_keys

        try:
            return tied_embedding_keys([reference, *others.values()])
        except _ERRORS:  # an architecture transformers cannot build: the ties are not known
            return None

    def describe_ties(self, reference: TensorSource, others: dict[str, TensorSource],
                      pair: tuple[str, str] | None) -> None:
        """Whether each input ties its output embedding (and stores it), and the merge's reconciliation of a tied
        base with untied models or the reverse (as transformers loads them)."""
        from .inputs import reconcile_tied_embeddings

        if pair is None:
            return
        output, embedding = pair
        ref_name = self.report.reference
        ties = {}
        for name, source in {ref_name: reference, **others}.items():
            if isinstance(source, DeltaSource):
                continue
            item = self.report.input(name)
            item.head_stored = output in source.keys()
            ties[name] = source.resolve(output) == embedding or (not source.has(output) and source.has(embedding))
            if source.has(embedding):
                item.embedding_shape = tuple(source.meta(embedding).shape)
        base_ties = ties.get(ref_name)
        ref_type = self.report.input(ref_name).model_type
        for name, tied in ties.items():
            model_type = self.report.input(name).model_type
            if name == ref_name or tied == base_ties or (ref_type and model_type and model_type != ref_type):
                continue  # the same, or another architecture altogether (reported as such)
            if base_ties:
                self.report.warn("ties", f"model {name!r} stores {output!r} separately, but the {_role(ref_name)} ties "
                                         f"it to {embedding!r}: its separate copy is ignored (read through its "
                                         "embeddings), as transformers does when loading it into this architecture.",
                                 name)
            else:
                self.report.warn("ties", f"model {name!r} ties {output!r} to {embedding!r}, but the {_role(ref_name)} "
                                         f"stores it separately: its {embedding!r} is merged into {output!r}.", name)
        with warnings.catch_warnings():  # the same reconciliation, reported above
            warnings.simplefilter("ignore")
            reconcile_tied_embeddings(reference, others)

    def compare(self, reference: TensorSource, others: dict[str, TensorSource]) -> None:
        """Keys, shapes, dtypes and architecture of every model relative to the reference, then the engine's own
        validation (:func:`hf_merge.inputs.validate_sources`) for anything more."""
        from .inputs import validate_sources

        report, dtype = self.report, self.options.dtype
        ref_name = report.reference
        ref_item = report.input(ref_name)
        ref_keys = reference.keys()
        for name, source in others.items():
            item = report.input(name)
            before = len(report.errors)
            if not isinstance(source, DeltaSource):
                if ref_item.model_type and item.model_type and ref_item.model_type != item.model_type:
                    report.error("architecture", f"model {name!r} is a {item.model_type!r} model, the "
                                                 f"{_role(ref_name)} a {ref_item.model_type!r} model.", name)
                elif ref_item.architectures and item.architectures and ref_item.architectures != item.architectures:
                    report.warn("architecture", f"model {name!r} is a {item.architectures} and the {_role(ref_name)} "
                                                f"a {ref_item.architectures}: the output takes the "
                                                f"{_role(ref_name)}'s.", name)
            item.missing_keys = [key for key in ref_keys if not source.has(key)]
            item.extra_keys = [key for key in source.keys() if not reference.has(key)]
            if item.missing_keys:
                report.error("keys", f"model {name!r} lacks {_count(item.missing_keys, 'tensor')} of the "
                                     f"{_role(ref_name)}: {_preview(item.missing_keys)} (every model needs every "
                                     "tensor of the base).", name)
            if item.extra_keys:
                report.error("keys", f"model {name!r} has {_count(item.extra_keys, 'tensor')} the {_role(ref_name)} "
                                     f"lacks: {_preview(item.extra_keys)}.", name)
            differing: dict[tuple[str, str], list[str]] = {}
            for key in ref_keys:
                if not source.has(key):
                    continue
                ours, theirs = reference.meta(key), source.meta(key)
                if ours.shape != theirs.shape:
                    item.shape_mismatches[key] = (tuple(ours.shape), tuple(theirs.shape))
                elif ours.dtype != theirs.dtype:
                    differing.setdefault((_dtype_name(ours.dtype), _dtype_name(theirs.dtype)), []).append(key)
            if item.shape_mismatches:
                shown = "; ".join(f"{key!r} {a} vs {b}" for key, (a, b) in list(item.shape_mismatches.items())[:4])
                more = len(item.shape_mismatches) - 4
                report.error("shapes", f"model {name!r}: {_count(item.shape_mismatches, 'shape mismatch')} with the "
                                       f"{_role(ref_name)}: {shown}{f'; and {more} more' if more > 0 else ''}.", name)
            for (ours, theirs), keys in differing.items():
                floating = _is_float(ours) and _is_float(theirs)
                where = f"{_count(keys, 'tensor')} of model {name!r} are {theirs} where the {_role(ref_name)}'s are " \
                        f"{ours} (e.g. {keys[0]!r})"
                if floating and dtype is not None:
                    report.warn("dtypes", f"{where}: merged in float32 and written as {_dtype_name(dtype)} (dtype).",
                                name)
                elif floating:
                    report.error("dtypes", f"{where}: merge refuses mixed dtypes unless an output dtype is set "
                                           "(dtype=, or 'dtype:' in the recipe).", name)
                else:
                    report.error("dtypes", f"{where}: only floating-point tensors can be converted.", name)
            if len(report.errors) == before and not isinstance(source, DeltaSource):
                try:
                    validate_sources(reference, {name: source}, dtype=dtype)
                except _ERRORS as error:
                    report.error("inputs", error, name)

    def vocabulary(self, ref_name: str, others: Mapping[str, TensorSource], pair: tuple[str, str] | None) -> None:
        report = self.report
        ref = report.input(ref_name)
        sizes = {name: (item.vocab_size, item.embedding_shape) for name in [ref_name, *others]
                 for item in (report.input(name),) if item.lora is None}
        ref_rows = ref.embedding_shape[0] if ref.embedding_shape else ref.vocab_size
        for name, (size, shape) in sizes.items():
            if name == ref_name:
                continue
            rows = shape[0] if shape else size
            size_differs = ref.vocab_size is not None and size is not None and size != ref.vocab_size
            if not size_differs and (ref_rows is None or rows is None or rows == ref_rows):
                continue
            ref_count = ref.vocab_size if ref.vocab_size is not None else ref_rows
            count = size if size is not None else rows
            embeddings = (f" (embeddings {pair[1]!r}: {ref.embedding_shape} vs {shape})"
                          if pair is not None and ref.embedding_shape and shape else "")
            base_would = f"keep the {_role(ref_name)}'s {ref_count} tokens"
            if ref_rows is not None and rows is not None and rows > ref_rows:
                base_would += f" and drop the rows of {name!r}'s tokens it lacks"
            else:
                base_would += f", the rows {name!r} lacks taken from the {_role(ref_name)}"
            message = (f"model {name!r} has a vocabulary of {count} tokens, the {_role(ref_name)} {ref_count}"
                       f"{embeddings}. tokenizer_source 'base' would {base_would}; 'union' merges both vocabularies")
            readable = [n for n in (ref_name, name) if not _tokenizer_readable(self.sources.get(n))]
            if readable:
                report.error("vocabulary", f"{message}; but {', '.join(repr(n) for n in readable)} has no tokenizer "
                                           "files to match the tokens by.", name)
            else:
                report.warn("vocabulary", f"{message}; their rows are matched by token.", name)
        ref_files = ref.tokenizer_files
        for name in others:
            item = report.input(name)
            if not item.tokenizer_files or not ref_files:
                continue
            differ = sorted(file for file in set(ref_files) | set(item.tokenizer_files)
                            if ref_files.get(file) != item.tokenizer_files.get(file))
            if differ and report.tokenizer_source != "base":
                report.warn("tokenizer", f"model {name!r} has tokenizer files that differ from the {_role(ref_name)}'s "
                                         f"({', '.join(differ)}): tokenizer_source {report.tokenizer_source!r} matches "
                                         "their embedding rows by token.", name)
            elif differ:
                report.warn("tokenizer", f"model {name!r} has tokenizer files that differ from the {_role(ref_name)}'s "
                                         f"({', '.join(differ)}): the output gets the {_role(ref_name)}'s; check that "
                                         "token ids mean the same tokens in every model.",
                            name)

    def config_differences(self) -> None:
        """``{key: {input: value}}`` for the ``config.json`` keys whose values differ between the inputs."""
        configs = {name: _flat_config(source) for name, source in self.sources.items()
                   if not isinstance(source, DeltaSource)}
        configs = {name: config for name, config in configs.items() if config}
        if len(configs) < 2:
            return
        keys = sorted({key for config in configs.values() for key in config} - _CONFIG_NOISE)
        missing = object()
        for key in keys:
            values = {name: config.get(key, missing) for name, config in configs.items()}
            if len({repr(v) for v in values.values()}) > 1:
                self.report.config_differences[key] = {name: (None if v is missing else _plain(v))
                                                       for name, v in values.items()}

    # -------------------------------------------------------------------------------------------- resources
    def estimate(self, reference: TensorSource, num_inputs: int, whole_models: bool) -> None:
        """Output size, the engine's working set of the largest tensor and the read-ahead, bytes read and time."""
        from .engine import read_ahead_depth, working_set

        options, report = self.options, self.report
        metas = {key: reference.meta(key) for key in reference.keys()}
        out_dtypes = {key: options.dtype if options.dtype is not None and m.dtype.is_floating_point else m.dtype
                      for key, m in metas.items()}
        output_bytes = sum(math.prod(m.shape) * out_dtypes[key].itemsize for key, m in metas.items())
        names = sorted({_dtype_name(d) for d in out_dtypes.values()})
        read = [item.stored_bytes for item in report.inputs if item.opened and item.stored_bytes is not None]
        bytes_read = sum(read)
        estimate: dict[str, Any] = {
            "output_bytes": output_bytes,
            "output_dtypes": names,
            "num_inputs": num_inputs,
            "bytes_read": bytes_read,
            "in_memory_inputs": [item.name for item in report.inputs if item.opened and item.stored_bytes is None],
            "read_rate": ASSUMED_READ_RATE,
            "read_rate_assumed": True,
            "seconds": bytes_read / ASSUMED_READ_RATE,
        }
        if whole_models:
            estimate["memory_model"] = ("whole-model method: it holds whole models in memory; the engine's per-tensor "
                                        "estimate does not apply")
        else:
            largest_key, working = working_set(metas, num_inputs)
            if largest_key is not None:
                depth = 1
                if options.memory_budget is not None:
                    try:
                        depth = read_ahead_depth(metas, num_inputs, options)
                    except MergeError as error:
                        report.error("memory", error)
                estimate.update({
                    "memory_model": "per tensor: (inputs + 3) × largest tensor × 4 bytes (float32 base, task "
                                    "vectors, temporaries, output), doubled by reading the next tensor ahead",
                    "largest_tensor": largest_key,
                    "largest_shape": list(metas[largest_key].shape),
                    "working_set_bytes": working,
                    "read_ahead_depth": depth,
                    "peak_bytes": working * (1 + depth),
                    "memory_budget": options.memory_budget,
                })
        report.estimate = estimate

    def output(self, base: TensorSource | None, tasks: Mapping[str, TensorSource]) -> None:
        """The output folder, checked by the merge's own rule (no write), and the free space where it would go."""
        from .inputs import describe_inputs
        from .io.publish import OutputFolderError, check_output_dir

        report = self.report
        described = describe_inputs(base, tasks)
        origins = [described.get("base"), *described["models"].values()]
        folders = [origin for origin in origins if isinstance(origin, str) and os.path.isdir(origin)]
        try:
            check_output_dir(report.output_dir, folders, overwrite=self.options.overwrite)
        except OutputFolderError as error:
            report.error("output", error)
        existing = Path(report.output_dir).absolute()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            free = shutil.disk_usage(existing).free
        except OSError:
            return
        report.estimate["free_bytes"] = free
        needed = report.estimate.get("output_bytes", 0)
        if needed > free:
            report.warn("output", f"the output needs about {_size(needed)} but only {_size(free)} is free at "
                                  f"{existing}.")


# ------------------------------------------------------------------------------------------------ helpers
def _is_model_merger(merger: Any) -> bool:
    from .methods.base import ModelMerger

    return isinstance(merger, ModelMerger)


def _lora_summary(source: Any) -> dict[str, Any]:
    adapter = source.adapter
    config = adapter.config
    ranks = sorted({parts["A"].shape[0] for parts in adapter.factors_raw.values()})
    scalings = sorted({round(adapter.scaling(module), 6) for module in adapter.factors_raw})
    targets = config.get("target_modules")
    return {
        "target_modules": sorted(targets) if isinstance(targets, (list, tuple, set)) else targets,
        "r": config.get("r", 8),
        "lora_alpha": config.get("lora_alpha", 8),
        "use_rslora": bool(config.get("use_rslora")),
        "rank_pattern": dict(config.get("rank_pattern") or {}),
        "alpha_pattern": dict(config.get("alpha_pattern") or {}),
        "ranks": ranks,
        "scalings": scalings,
        "modules": sorted(adapter.factors_raw),
        "modules_to_save": list(config.get("modules_to_save") or []),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "base_model_name_or_path": config.get("base_model_name_or_path"),
    }


def _flat_config(source: TensorSource) -> dict[str, Any]:
    config = source.config
    if config is None or isinstance(source, DeltaSource):
        return {}
    if not isinstance(config, Mapping):
        to_dict = getattr(config, "to_dict", None)
        config = to_dict() if callable(to_dict) else {}
    flat: dict[str, Any] = {}

    def walk(value: Mapping[str, Any], prefix: str) -> None:
        for key, item in value.items():
            if isinstance(item, Mapping) and str(key).endswith("_config"):
                walk(item, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = item

    walk(config, "")
    return flat


def _vocab_size(config: Mapping[str, Any]) -> int | None:
    value = config.get("vocab_size")
    if value is None:
        value = next((v for k, v in config.items() if k.endswith(".vocab_size") and k.startswith("text_config")), None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _kind(source: TensorSource) -> str:
    from .adapters import LoraSource

    if isinstance(source, LoraSource):
        return "LoRA adapter"
    if isinstance(source, FolderSource):
        return "checkpoint"
    if isinstance(source, ModelSource):
        return "model"
    if isinstance(source, StateDictSource):
        return "state dict"
    return type(source).__name__


def _reference(value: Any) -> str:
    if isinstance(value, (str, os.PathLike)):
        return _display_path(os.fspath(value))
    if isinstance(value, (torch.nn.Module, Mapping, TensorSource)):
        return "(in memory)"
    return f"<{type(value).__name__}>"


def _display_path(path: str) -> str:
    if not os.path.isabs(path):
        return path
    try:
        relative = os.path.relpath(path)
    except ValueError:
        return path
    return relative if not relative.startswith("..") else path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_float(name: str) -> bool:
    return getattr(torch, name).is_floating_point


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return repr(value)


def _message(error: BaseException) -> str:
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


def _role(name: str | None) -> str:
    return "base" if name == "base" else f"reference model {name!r}"


def _count(items: Any, noun: str) -> str:
    count = items if isinstance(items, int) else len(items)
    plural = noun + ("es" if noun.endswith("ch") else "s")
    return f"{count} {noun if count == 1 else plural}"


def _preview(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(repr(n) for n in list(names)[:limit])
    return f"[{shown}{f', ... ({len(names) - limit} more)' if len(names) > limit else ''}]"


def _size(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f}{unit}" if unit == "B" else f"{count:.1f}".removesuffix(".0") + unit
        count /= 1000
    return f"{count:.1f}TB"  # pragma: no cover


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "under 1 s"
    if seconds < 120:
        return f"~{seconds:.0f} s"
    if seconds < 7200:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"


# ------------------------------------------------------------------------------------------------ rendering
def _render(report: CheckReport) -> str:
    lines = []
    errors, warns = report.errors, report.warnings
    verdict = "OK" if report.ok else "BLOCKED"
    counts = f"{_count(errors, 'error')}, {_count(warns, 'warning')}"
    method = f"method {report.method}" if report.method else "no method"
    lines.append(f"hf-merge check: {verdict} ({counts}); {method}, {_count(report.inputs, 'input')}")
    lines.append("")
    lines.append("Inputs:")
    width = min(max([len(item.name) for item in report.inputs] + [4]), 16)
    for item in report.inputs:
        lines.append(f"  {item.name:<{width}}  {_describe_input(item, report)}")
    if report.config_differences:
        shown = []
        for key, values in list(report.config_differences.items())[:6]:
            ref = values.get(report.reference)
            shown.append(f"{key}: " + ", ".join(f"{name} {value!r}" for name, value in values.items()
                                                if name == report.reference or value != ref))
        more = len(report.config_differences) - len(shown)
        lines.append("Config differences: " + "; ".join(shown) + (f"; and {more} more keys" if more > 0 else ""))
    lines.append(f"Vocabulary: {_describe_vocabulary(report)}")
    if report.config is not None:
        fields = ", ".join(f"{k}={v!r}" for k, v in report.config.items() if k != "method")
        lines.append(f"Method: {report.method} ({_clip(fields, 150)})")
    estimate = report.estimate
    if estimate:
        lines.append(f"Output: {_size(estimate['output_bytes'])} ({'/'.join(estimate['output_dtypes'])})"
                     + (f" into {report.output_dir}" if report.output_dir else "")
                     + (f", {_size(estimate['free_bytes'])} free there" if "free_bytes" in estimate else ""))
        if "peak_bytes" in estimate:
            budget = estimate.get("memory_budget")
            largest = f"{estimate['largest_tensor']!r} {tuple(estimate['largest_shape'])}"
            lines.append(
                f"Memory: peak ~{_size(estimate['peak_bytes'])}: the engine's per-tensor working set, "
                f"({estimate['num_inputs']} inputs + 3) × 4 B × largest tensor {largest} = "
                f"{_size(estimate['working_set_bytes'])}, × {1 + estimate['read_ahead_depth']} with read-ahead"
                + (f" (memory_budget {_size(budget)})" if budget is not None else ""))
        elif "memory_model" in estimate:
            lines.append(f"Memory: {estimate['memory_model']}")
        in_memory = estimate["in_memory_inputs"]
        lines.append(f"Time: reads {_size(estimate['bytes_read'])}"
                     + (f" (plus {', '.join(in_memory)} in memory)" if in_memory else "")
                     + f", {_duration(estimate['seconds'])} at {_size(estimate['read_rate'])}/s (assumed disk rate; "
                       "statistics passes read again)")
    elif report.output_dir:
        lines.append(f"Output: {report.output_dir}")
    for title, problems, mark in (("Errors (the merge would be refused)", errors, "✗"), ("Warnings", warns, "!")):
        if problems:
            lines.append("")
            lines.append(f"{title}:")
            lines.extend(f"  {mark} {problem.message}" for problem in problems)
    return "\n".join(textwrap.fill(line, _WIDTH, subsequent_indent=" " * (len(line) - len(line.lstrip()) + 4),
                                  break_long_words=False, break_on_hyphens=False) if line else line
                     for line in lines)


def _describe_input(item: InputReport, report: CheckReport) -> str:
    if not item.opened:
        return f"{item.reference} (not opened)"
    parts = [item.kind, item.reference]
    if item.lora is not None:
        lora = item.lora
        targets = lora["target_modules"]
        targets = ", ".join(targets) if isinstance(targets, list) else repr(targets)
        rank = f"r={lora['r']}" + (f" (ranks {lora['ranks']})" if lora["ranks"] != [lora["r"]] else "")
        alpha = f"alpha={lora['lora_alpha']}" + (" rsLoRA" if lora["use_rslora"] else "")
        scale = "/".join(f"{s:g}" for s in lora["scalings"])
        parts.append(f"{rank} {alpha} (scale {scale}) on {targets}: {_count(lora['modules'], 'module')}"
                     + (f", saves {', '.join(lora['modules_to_save'])}" if lora["modules_to_save"] else ""))
    else:
        arch = "/".join(item.architectures or [])
        parts.append(f"{arch} ({item.model_type})" if arch and item.model_type else arch or item.model_type or "")
        if item.vocab_size is not None or item.embedding_shape is not None:
            parts.append(f"vocab {item.vocab_size if item.vocab_size is not None else item.embedding_shape[0]}")
        if item.head_stored is not None:
            parts.append(("head stored" + (" (tie_word_embeddings=True)" if item.tie_word_embeddings else ""))
                         if item.head_stored else "tied head")
    parts.append(", ".join(f"{name}×{count}" if len(item.dtypes) > 1 else name for name, count in item.dtypes.items()))
    parts.append(_count(item.num_tensors, "tensor") + (f", {_size(item.stored_bytes)}" if item.stored_bytes is not None
                                                      else ""))
    flags = []
    if item.missing_keys:
        flags.append(f"{len(item.missing_keys)} missing")
    if item.extra_keys:
        flags.append(f"{len(item.extra_keys)} extra")
    if item.shape_mismatches:
        flags.append(f"{len(item.shape_mismatches)} shapes differ")
    if flags:
        parts.append("[" + ", ".join(flags) + "]")
    return ", ".join(part for part in parts[2:] if part).join((f"{parts[0]} {parts[1]}: ", ""))


def _describe_vocabulary(report: CheckReport) -> str:
    sizes = {item.name: item.vocab_size if item.vocab_size is not None else
             (item.embedding_shape[0] if item.embedding_shape else None)
             for item in report.inputs if item.opened and item.lora is None}
    known = {name: size for name, size in sizes.items() if size is not None}
    if not known:
        text = "sizes unknown (no config.json or embeddings)"
    elif len(set(known.values())) == 1:
        text = f"{next(iter(known.values()))} tokens in every model"
    else:
        ref = known.get(report.reference)
        text = "sizes differ: " + ", ".join(f"{name} {size}" for name, size in known.items()
                                            if name == report.reference or size != ref)
    hashed = [item for item in report.inputs if item.tokenizer_files]
    differing = [p.input for p in report.problems if p.topic == "tokenizer"]
    if not hashed:
        text += "; no tokenizer files"
    elif differing:
        text += f"; tokenizer files differ in {', '.join(repr(n) for n in differing)}"
    elif len(hashed) > 1:
        text += "; tokenizer files identical"
    else:
        text += f"; tokenizer files in {hashed[0].name} only"
    if report.tokenizer_source == "base" and len(set(known.values())) <= 1 and not differing:
        return text + f". tokenizer_source 'base': the output gets the {_role(report.reference)}'s tokenizer files"
    return text + "".join(f". tokenizer_source {name!r}{' (chosen)' if name == report.tokenizer_source else ''}: {what}"
                          for name, what in TOKENIZER_SOURCES.items())


def _tokenizer_readable(source: TensorSource | None) -> bool:
    """Whether the merge can read the input's tokenizer: its folder (or an in-memory model's ``name_or_path``) holds
    tokenizer files."""
    from .vocab import has_tokenizer_files

    if source is None:
        return False
    folder = source.folder
    if folder is None and source.model is not None:
        config = getattr(source.model, "config", None)
        folder = getattr(config, "_name_or_path", None) or None
    return folder is not None and os.path.isdir(folder) and has_tokenizer_files(folder)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


__all__ = ["ASSUMED_READ_RATE", "CheckReport", "InputReport", "Problem", "TOKENIZER_FILES", "TOKENIZER_SOURCES",
           "check"]
