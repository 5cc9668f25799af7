"""Data for data-aware merges (RegMean, Fisher, AdaMerging): ``merge(base, experts, config, data={task: examples})``.

A task's examples are a ``datasets.Dataset`` (tokenised, with ``input_ids``, or raw text in a ``text`` column with a
tokenizer taken from the inputs), a ``torch.utils.data.DataLoader`` of dict batches, or a list of strings; wrap them
in :class:`TaskData` to give a tokenizer, the text and label columns, or the function that turns the model's outputs
into the task's logits (e.g. a task head on a bare encoder). Labels are read by Fisher merging only.

:class:`TaskModels` builds the forward passes the methods run: the model's architecture (from an in-memory base, or
the base folder's ``config.json``) with any weights assigned, on the merge's compute device.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .io.deltas import DeltaSource
from .io.sources import ModelSource, TensorSource

#: Columns a tokenised example may carry into the model (``label`` is renamed ``labels``).
MODEL_INPUT_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values", "position_ids")
TEXT_COLUMNS = ("text", "sentence", "content")
LogitsFn = Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class TaskData:
    """One task's examples for a data-aware merge.

    Args:
        examples: a ``datasets.Dataset`` (tokenised, or with a text column), a ``DataLoader`` of dict batches, or a
            list of strings.
        logits: ``fn(outputs, batch) -> logits`` of the task, ``(batch, classes)`` or ``(batch, tokens, classes)``;
            default: ``outputs.logits``. Give it for models without a task head (e.g. a task's linear head on the
            pooled output of a bare encoder).
        tokenizer: tokenizes raw text (default: the task's own checkpoint folder's tokenizer, else the base's).
        max_length: truncation length of raw text.
        text_column: the column holding raw text (default: the first of ``text``, ``sentence``, ``content``).
        label_column: the column holding labels (read by Fisher merging only).
    """

    examples: Any
    logits: LogitsFn | None = None
    tokenizer: Any = None
    max_length: int = 128
    text_column: str | None = None
    label_column: str = "label"

    def __post_init__(self) -> None:
        if isinstance(self.examples, (str, bytes)) or self.examples is None:
            raise TypeError(f"TaskData.examples must be a Dataset, a DataLoader or a list of strings, got "
                            f"{type(self.examples).__name__}.")
        if self.logits is not None and not callable(self.logits):
            raise TypeError(f"TaskData.logits must be a function (outputs, batch) -> logits, got {self.logits!r}.")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 1:
            raise ValueError(f"TaskData.max_length must be a positive integer, got {self.max_length!r}.")


def task_data_of(data: Mapping[str, Any] | None) -> dict[str, TaskData] | None:
    """``{task: TaskData}`` of what ``merge(data=...)`` was given (checked before any work)."""
    if data is None:
        return None
    if not isinstance(data, Mapping) or not all(isinstance(name, str) for name in data):
        raise TypeError(f"data must be a {{task_name: examples}} mapping, got {type(data).__name__}.")
    return {name: value if isinstance(value, TaskData) else TaskData(value) for name, value in data.items()}


def check_task_data(data: Mapping[str, TaskData] | None, task_names: Sequence[str], method: str) -> dict[str, TaskData]:
    """The data of every task of a data-aware ``method``: refuse a missing task or data for an unknown one."""
    if data is None:
        raise ValueError(f"Method {method!r} learns from data: give data={{task: examples}} for the tasks "
                         f"{list(task_names)}.")
    missing = [name for name in task_names if name not in data]
    if missing:
        raise ValueError(f"Method {method!r} needs data for every task; none was given for {missing} (data has "
                         f"{sorted(data)}).")
    unknown = sorted(set(data) - set(task_names))
    if unknown:
        raise ValueError(f"data names tasks {unknown} that are not among the inputs {list(task_names)}.")
    return {name: data[name] for name in task_names}


#: File suffixes :func:`load_examples` reads with ``datasets.load_dataset`` (the builder of each).
_DATASET_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_examples(path: str | os.PathLike) -> Any:
    """A task's examples from a file or folder (what the CLI's ``data: {task: path}`` names): a folder written by
    ``Dataset.save_to_disk``, a ``.json``/``.jsonl``/``.csv``/``.parquet`` file (one example per row), or a ``.txt``
    file (one example per line)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data: {path} does not exist (expected a saved dataset folder or a data file).")
    if path.is_dir():
        import datasets

        return datasets.load_from_disk(str(path))
    if path.suffix == ".txt":
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix in _DATASET_BUILDERS:
        import datasets

        return datasets.load_dataset(_DATASET_BUILDERS[path.suffix], data_files=str(path), split="train")
    raise ValueError(f"data: cannot read {path} (use a saved dataset folder, or a .txt, "
                     f"{', '.join(_DATASET_BUILDERS)} file).")


def check_data_for(merger: Any, data: Mapping[str, TaskData] | None, task_names: Sequence[str]) -> None:
    """Refuse data for a method that uses none, and a data-aware method without data for every task."""
    method = merger.config.method
    if getattr(merger, "uses_data", False):
        check_task_data(data, task_names, method)
    elif data is not None:
        from .registry import data_aware_methods

        raise ValueError(f"Method {method!r} uses no data; data= is for the data-aware methods "
                         f"({', '.join(data_aware_methods())}).")


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early (its inputs were captured)."""


def _tokenizer_of(source: TensorSource) -> Any:
    folder = source.folder
    if folder is None or not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json",
                                                                            "vocab.txt")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


class TaskModels:
    """The forward passes of a data-aware merge: the inputs' architecture with given weights, and each task's batches.

    ``weights(task)`` are θ_t's float32 tensors (LoRA inputs: θ₀ + ΔW); ``build(weights)`` the architecture with those
    tensors assigned, in eval mode on ``device``; ``batches(task, ...)`` the task's examples as dict batches there.
    """

    def __init__(self, base: TensorSource, tasks: Mapping[str, TensorSource], data: Mapping[str, TaskData],
                 device: torch.device, method: str) -> None:
        self.base, self.tasks, self.data, self.device, self.method = base, dict(tasks), dict(data), device, method
        self.template = self._template()
        self._tokenizers: dict[str, Any] = {}

    def _template(self) -> torch.nn.Module:
        if isinstance(self.base, ModelSource):
            return self.base.model
        from .models import meta_model

        model = meta_model(self.base.folder)
        if model is None:
            raise ValueError(f"Method {self.method!r} runs the model on each task's data, which needs its "
                             f"architecture: give the base as a model, or as a folder whose config.json names a "
                             f"transformers class ({self.base.label} has neither).")
        return model

    def key_of(self, name: str) -> str:
        """The input key of the model's parameter or buffer ``name`` (they differ for in-memory renamed weights)."""
        if isinstance(self.base, ModelSource):
            return {memory: key for key, memory in self.base.memory_names.items()}.get(name, name)
        return name

    def weights(self, task: str, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """θ_t's float32 tensors (all floating-point keys, or ``keys``) on the CPU."""
        source = self.tasks[task]
        keys = keys if keys is not None else [k for k in self.base.keys() if self.base.meta(k).dtype.is_floating_point]
        out = {}
        for key in keys:
            if isinstance(source, DeltaSource):
                base = self.base.get(key).float()
                out[key] = base + source.delta(key, base).float()
            else:
                out[key] = source.get(key).float()
        return out

    def build(self, weights: Callable[[str], torch.Tensor], device: torch.device | str | None = None) -> torch.nn.Module:
        """The architecture with ``weights(key)`` (float32) assigned to every floating-point parameter and buffer, in
        eval mode on ``device`` (default: the compute device), with gradients off."""
        model = _empty_copy(self.template)
        state, assigned = {}, set()
        for name, tensor in model.state_dict().items():
            key = self.key_of(name)
            if tensor.is_floating_point() and self.base.has(key) and self.base.resolve(key) not in assigned:
                key = self.base.resolve(key)  # a tied copy (e.g. lm_head) is tied again below
                assigned.add(key)
                state[name] = weights(key).to(torch.float32, copy=True)  # never the inputs' own storage
        model.load_state_dict(state, strict=False, assign=True)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        missing = [name for name, p in model.named_parameters() if p.device.type == "meta"]
        if missing:
            raise ValueError(f"Method {self.method!r}: the model's parameter(s) {missing[:4]} have no tensor in the "
                             f"inputs ({self.base.label}).")
        if getattr(getattr(model, "config", None), "use_cache", None):
            model.config.use_cache = False
        return model.to(self.device if device is None else device).eval().requires_grad_(False)

    def tokenizer(self, task: str) -> Any:
        if task not in self._tokenizers:
            given = self.data[task].tokenizer
            tokenizer = given if given is not None else (_tokenizer_of(self.tasks[task]) or _tokenizer_of(self.base))
            if tokenizer is None:
                raise ValueError(f"The data of task {task!r} is raw text, but no tokenizer was found in its checkpoint "
                                 f"or the base's: give TaskData(examples, tokenizer=...) or tokenised examples.")
            self._tokenizers[task] = tokenizer
        return self._tokenizers[task]

    def batches(self, task: str, batch_size: int, limit: int, *, labels: bool = False) -> Iterator[dict[str, Any]]:
        """Task ``task``'s first ``limit`` examples in dict batches of at most ``batch_size`` (a DataLoader's own
        batches split where larger) on the compute device, with ``labels`` when asked and present."""
        seen = 0
        for batch in self._raw_batches(task, batch_size):
            size = _batch_size(batch, task)
            for start in range(0, size, batch_size):
                if seen >= limit:
                    return
                take = min(batch_size, size - start, limit - seen)
                yield {k: (v[start:start + take].to(self.device) if isinstance(v, torch.Tensor) else v)
                       for k, v in batch.items() if k in MODEL_INPUT_COLUMNS or (labels and k == "labels")}
                seen += take
        if seen == 0:
            raise ValueError(f"The data of task {task!r} holds no examples.")

    def _raw_batches(self, task: str, batch_size: int) -> Iterator[dict[str, Any]]:
        spec = self.data[task]
        examples = spec.examples
        if isinstance(examples, torch.utils.data.DataLoader):
            for batch in examples:
                if not isinstance(batch, Mapping):
                    raise TypeError(f"The DataLoader of task {task!r} yields {type(batch).__name__}; data-aware "
                                    "merges need dict batches (input_ids, attention_mask, ...).")
                batch = dict(batch)
                if spec.label_column in batch and "labels" not in batch:
                    batch["labels"] = batch.pop(spec.label_column)
                yield batch
            return
        if isinstance(examples, Sequence) and all(isinstance(text, str) for text in examples):
            rows: Any = [{"text": text} for text in examples]
            columns = ["text"]
        elif hasattr(examples, "column_names") and hasattr(examples, "__getitem__"):
            rows, columns = examples, list(examples.column_names)
        else:
            raise TypeError(f"The data of task {task!r} is a {type(examples).__name__}; give a datasets.Dataset, a "
                            "DataLoader of dict batches or a list of strings.")
        text_column = spec.text_column or next((c for c in TEXT_COLUMNS if c in columns), None)
        if "input_ids" not in columns and text_column not in columns:
            raise ValueError(f"The data of task {task!r} has neither input_ids nor a text column (columns: {columns}; "
                             f"set TaskData(text_column=...)).")
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            if isinstance(chunk, Mapping):  # a Dataset slice: {column: [values]}
                chunk = [dict(zip(chunk, values)) for values in zip(*chunk.values())]
            yield self._collate(task, chunk, text_column)

    def _collate(self, task: str, rows: list[dict[str, Any]], text_column: str | None) -> dict[str, Any]:
        spec = self.data[task]
        if "input_ids" in rows[0]:
            tokenizer = self.data[task].tokenizer
            pad_id = getattr(tokenizer, "pad_token_id", None) or 0
            batch = _pad([row["input_ids"] for row in rows], pad_id)
            batch["attention_mask"] = _pad([row.get("attention_mask", [1] * len(row["input_ids"])) for row in rows],
                                           0)["input_ids"]
            if "token_type_ids" in rows[0]:
                batch["token_type_ids"] = _pad([row["token_type_ids"] for row in rows], 0)["input_ids"]
        else:
            tokenizer = self.tokenizer(task)
            batch = dict(tokenizer([row[text_column] for row in rows], padding=True, truncation=True,
                                   max_length=spec.max_length, return_tensors="pt"))
        if spec.label_column in rows[0]:
            batch["labels"] = torch.as_tensor([row[spec.label_column] for row in rows])
        return batch

    def logits(self, task: str, outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
        """The task's logits (float32) from the model's ``outputs`` on ``batch``."""
        fn = self.data[task].logits
        if fn is not None:
            return fn(outputs, batch).float()
        logits = getattr(outputs, "logits", None)
        if logits is None:
            raise ValueError(f"The model gives no logits on task {task!r} ({type(outputs).__name__}); give "
                             "TaskData(examples, logits=fn) mapping its outputs to the task's logits.")
        return logits.float()

    def log_likelihood(self, task: str, model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        """Σ log p(y | x) over ``batch``: y the labels (through the model's own loss when it computes one, so that a
        causal LM shifts its labels itself), or the model's own predictions (argmax) without labels."""
        labels = batch.get("labels")
        inputs = model_inputs(batch)
        if labels is not None and self.data[task].logits is None:
            outputs = model(**inputs, labels=labels)
            if getattr(outputs, "loss", None) is not None:
                return -outputs.loss * _count(labels)
        else:
            outputs = model(**inputs)
        logits = self.logits(task, outputs, batch)
        targets = logits.argmax(dim=-1) if labels is None else labels.to(logits.device)
        log_probs = torch.log_softmax(logits, dim=-1)
        picked = log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        keep = targets != -100
        mask = token_mask(batch, logits.shape)
        if mask is not None:
            keep = keep & mask
        return picked[keep].sum()

    def entropy(self, task: str, outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
        """The mean Shannon entropy of the task's predictions (over examples, and real tokens for token logits)."""
        logits = self.logits(task, outputs, batch)
        log_probs = torch.log_softmax(logits, dim=-1)
        entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
        mask = token_mask(batch, logits.shape)
        return entropy[mask].mean() if mask is not None else entropy.mean()


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch without its labels (what the model is called with)."""
    return {k: v for k, v in batch.items() if k != "labels"}


def _count(labels: torch.Tensor) -> int:
    return int((labels != -100).sum()) if labels.ndim > 1 else int(labels.numel())


def _empty_copy(template: torch.nn.Module) -> torch.nn.Module:
    """A new module of ``template``'s architecture with its parameters on the meta device (buffers built): a
    transformers model from its config, any other module by a deep copy."""
    if hasattr(type(template), "_from_config") and hasattr(template, "config"):
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            return type(template)._from_config(template.config)
    return copy.deepcopy(template)


def _pad(sequences: list[Any], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(s) for s in sequences)
    out = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        out[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
    return {"input_ids": out}


def _batch_size(batch: Mapping[str, Any], task: str) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    raise ValueError(f"A batch of task {task!r} holds no tensors.")


def token_mask(batch: Mapping[str, Any], shape: torch.Size) -> torch.Tensor | None:
    """The ``(batch, tokens)`` boolean mask of real (not padding) tokens for a per-token activation of ``shape``
    ``(batch, tokens, features)``, when the batch has an attention mask of that leading shape; ``None`` otherwise (a
    per-example ``(batch, classes)`` tensor is never masked, whatever its width)."""
    mask = batch.get("attention_mask")
    if (isinstance(mask, torch.Tensor) and mask.ndim == 2 and len(shape) == 3
            and tuple(shape[:2]) == tuple(mask.shape)):
        return mask.bool()
    return None


@contextlib.contextmanager
def capture_inputs(module: torch.nn.Module) -> Iterator[list[tuple[tuple[Any, ...], dict[str, Any]]]]:
    """Record the positional and keyword arguments of each call of ``module`` and end that forward pass there (the
    caller catches :class:`StopForward`, see :func:`run_until`)."""
    captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def hook(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((args, kwargs))
        raise _StopForward

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def run_until(model: torch.nn.Module, batch: Mapping[str, Any]) -> None:
    """Run ``model`` on ``batch`` until a :func:`capture_inputs` hook ends the pass."""
    with contextlib.suppress(_StopForward):
        model(**model_inputs(batch))


__all__ = ["TaskData", "TaskModels", "capture_inputs", "check_data_for", "check_task_data", "load_examples", "model_inputs", "run_until",
           "task_data_of", "token_mask"]
