"""The merge engine: validate inputs once, then stream tensor by tensor from sources through a method to a sink.

    inputs ──► TensorSource ──► (merger.prepare: statistics passes) ──► merger.merge_tensor per key ──► sink
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .config import MergeConfig
from .io.prefetch import Prefetcher
from .io.sources import SAFE_WEIGHTS_INDEX_NAME, ModelSource, TensorMeta, TensorSource, open_source
from .io.sources_dtypes import numpy_view
from .io.writer import (
    DEFAULT_MAX_SHARD_SIZE,
    OutputBuffers,
    ShardPlan,
    atomic_directory,
    plan_shards,
    write_safetensors_shards,
)
from .kernels import kernels_enabled, linear_combine, takes
from .methods.base import Amendment, Merger, ModelMerger
from .params import ParamInfo, classify_parameters
from .placement import DispatchedOutput, cpu_budget, is_dispatched
from .registry import get_merger, make_config

Inputs = Any  # a PreTrainedModel, a checkpoint path or a state dict
_ARCH_KEYS = ("model_type", "vocab_size")
#: Elements per piece of the fused linear combination: the float32 accumulator plus one piece per input stay in the
#: CPU cache (measured on the 468M-parameter merge benchmark: 2²⁰ about 3× faster than 2¹⁶ and than 2²²).
COMBINE_CHUNK = 1 << 20
_WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
_SKIPPED_FILES = {SAFE_WEIGHTS_INDEX_NAME, "pytorch_model.bin.index.json", "merge_config.json", "README.md"}
_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


class MergeError(ValueError):
    """Inputs that cannot be merged (mismatched keys, shapes, dtypes, architectures, non-finite values)."""


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPE_NAMES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(_DTYPE_NAMES)}.") from None


# --------------------------------------------------------------------------------------------- inputs
def open_tasks(finetuned: Sequence[Inputs] | Mapping[str, Inputs], *, allow_pickle: bool = False) -> dict[str, TensorSource]:
    """``{task_name: source}`` from a sequence (names ``task_0``, ...) or a mapping of inputs.

    A PEFT adapter folder or a ``PeftModel`` counts as a fine-tuned model (base + ΔW); a ``PeftModel`` with several
    adapters contributes one task per adapter (named after the adapter, or ``"<task>.<adapter>"`` in a mapping).
    """
    from .lora import is_adapter_folder, is_peft_model, open_lora

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
    tasks: dict[str, TensorSource] = {}
    for name, value in items:
        label = f"task {name!r}"
        lora = is_peft_model(value) or (isinstance(value, (str, os.PathLike)) and is_adapter_folder(value))
        if not lora:
            tasks[name] = open_source(value, label, allow_pickle=allow_pickle)
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


def memory_to_key(base: TensorSource) -> dict[str, str]:
    """In-memory parameter name (what PEFT adapters use) → the base's key (its checkpoint name); cached per source."""
    cached = getattr(base, "_memory_to_key", None)
    if cached is not None:
        return cached
    mapping = {key: key for key in base.keys()}
    mapping.update({alias: canonical for alias, canonical in base.aliases.items()})
    source = base if isinstance(base, ModelSource) else None
    if source is None and base.folder is not None:
        meta_model = _meta_model_from_folder(base.folder)
        source = ModelSource(meta_model, "meta model") if meta_model is not None else None
    if source is not None:
        mapping.update({memory: key for key, memory in source.memory_names.items() if key in mapping})
    base._memory_to_key = mapping
    return mapping


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

    Raises :class:`MergeError` naming the offending input and tensor. Reads no tensor data.
    """
    base_keys = base.keys()
    metas = {k: base.meta(k) for k in base_keys}
    for task in tasks.values():
        if hasattr(task, "bind"):  # LoRA adapters become base + ΔW
            task.bind(base)
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


def _meta_model_from_folder(folder: Path) -> torch.nn.Module | None:
    """Build the folder's architecture on the meta device (no weights read), for parameter classification."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    import transformers
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.from_pretrained(folder)
    architectures = getattr(config, "architectures", None) or []
    model_cls = getattr(transformers, architectures[0], None) if architectures else None
    if model_cls is None:
        return None
    with init_empty_weights(include_buffers=True):
        return model_cls(config)


def classify_sources(base: TensorSource, tasks: Mapping[str, TensorSource]) -> dict[str, ParamInfo]:
    """Classify the base's tensors, using a model's modules when any input is (or describes) one."""
    model_source = next((s for s in (base, *tasks.values()) if isinstance(s, ModelSource)), None)
    if model_source is None and base.folder is not None:
        meta_model = _meta_model_from_folder(base.folder)
        model_source = ModelSource(meta_model, "meta model") if meta_model is not None else None
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


# --------------------------------------------------------------------------------------------- context
class MergeContext:
    """What a merger sees: float32 base tensors and task vectors on the compute device, one key at a time."""

    def __init__(
        self,
        base: TensorSource,
        tasks: Mapping[str, TensorSource],
        infos: Mapping[str, ParamInfo],
        metas: Mapping[str, TensorMeta],
        *,
        device: torch.device | str | None = None,
        progress: bool = True,
        transforms: tuple[Callable[[str, str, torch.Tensor], torch.Tensor], ...] = (),
        prefetch_depth: int = 1,
        output_dtypes: Mapping[str, torch.dtype] | None = None,
        bounded_memory: bool = False,
    ) -> None:
        self.base = base
        self.tasks = dict(tasks)
        self.task_names = list(self.tasks)
        self.infos = infos
        self.metas = metas
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.progress = progress
        self._transforms = transforms
        self.prefetch_depth = prefetch_depth
        self.merge_keys = [k for k, m in metas.items() if m.dtype.is_floating_point]
        self.output_dtypes = output_dtypes
        self.bounded_memory = bounded_memory

    @property
    def can_merge_in_one_pass(self) -> bool:
        """Whether a merger may merge reading every input once (:attr:`Merger.one_pass`): the engine gave the output
        dtypes, memory is not budgeted (what the pass leaves open is held until its end), the compute device is the
        CPU and every task vector is a plain difference of stored tensors (no transforms, no LoRA factors)."""
        return (
            self.output_dtypes is not None and not self.bounded_memory and self.device.type == "cpu"
            and not self._transforms and not any(hasattr(s, "delta") for s in self.tasks.values())
        )

    def with_transform(self, transform: Callable[[str, str, torch.Tensor], torch.Tensor]) -> MergeContext:
        """A view whose task vectors pass through ``transform(task_name, key, delta)`` (e.g. DARE's drop)."""
        return self._view(transforms=(*self._transforms, transform))

    def nested(self) -> MergeContext:
        """The view a merger wrapped by another one (LiNeS, Consensus) prepares with: it merges tensor by tensor for
        its wrapper, so it never merges in one pass of its own (:attr:`can_merge_in_one_pass` is false)."""
        return self._view(output_dtypes=None)

    def _view(self, **changes: Any) -> MergeContext:
        settings = dict(device=self.device, progress=self.progress, transforms=self._transforms,
                        prefetch_depth=self.prefetch_depth, output_dtypes=self.output_dtypes,
                        bounded_memory=self.bounded_memory)
        return MergeContext(self.base, self.tasks, self.infos, self.metas, **{**settings, **changes})

    def _load(self, source: TensorSource, key: str) -> torch.Tensor:
        tensor = source.get(key).to(self.device, torch.float32)
        # One reduction first: a finite sum proves every entry finite; only a non-finite sum needs the exact check.
        if not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
            raise MergeError(f"{source.label}: tensor {key!r} contains NaN or Inf values.")
        return tensor

    def base_tensor(self, key: str) -> torch.Tensor:
        return self._load(self.base, key)

    def deltas(self, key: str, base: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The task vectors τ_t = θ_t − θ₀ of ``key`` in float32 on the compute device."""
        base = self.base_tensor(key) if base is None else base
        out = []
        for name, source in self.tasks.items():
            if hasattr(source, "delta"):  # LoRA: ΔW straight from the factors
                delta = source.delta(key, base)
                if not torch.isfinite(delta.sum()) and not torch.isfinite(delta).all():
                    raise MergeError(f"{source.label}: the update of {key!r} contains NaN or Inf values.")
            else:
                delta = self._load(source, key) - base  # never in place: _load may return the input's storage
            for transform in self._transforms:
                delta = transform(name, key, delta)
            out.append(delta)
        return out

    def load(self, key: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(θ₀, [τ_t])`` of ``key`` in float32 on the compute device."""
        base = self.base_tensor(key)
        return base, self.deltas(key, base)

    def combine(self, key: str, coefficients: Sequence[float], dtype: torch.dtype,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """θ₀ + Σ_t c_t τ_t of ``key`` as (1 − Σc)·θ₀ + Σ_t c_t θ_t in ``dtype``, on the CPU (into ``out`` if given).

        On a CPU compute device the inputs stream in pieces of :data:`COMBINE_CHUNK` elements through one float32
        accumulator that stays in cache, so each input is read once and the output written once (no full-size
        float32 temporaries). A non-finite piece is traced to the input that holds it.
        """
        weights = [1.0 - sum(coefficients), *coefficients]
        sources = [self.base, *self.tasks.values()]
        if self.device.type != "cpu":
            total = sources[0].get(key).to(self.device, torch.float32) * weights[0]
            for source, weight in zip(sources[1:], weights[1:]):
                total.add_(source.get(key).to(self.device), alpha=weight)
            self.check_finite(total, sources, key)
            return total.to("cpu", dtype) if out is None else out.copy_(total)
        if out is None:
            out = torch.empty(self.metas[key].shape, dtype=dtype)
        flat_out = out.view(-1)
        if len(sources) > 1 and kernels_enabled() and takes([s.meta(key).dtype for s in sources], dtype):
            # one fused compiled loop, reading checkpoint tensors through a mapping: the same bits as below
            arrays = [source.flat_array(key) for source in sources]
            if not linear_combine(arrays, weights, numpy_view(flat_out)):
                self.check_finite(out.float(), sources, key)
            return out
        accumulator = torch.empty(min(flat_out.numel(), COMBINE_CHUNK), dtype=torch.float32)
        start = 0
        for pieces in zip(*(source.iter_chunks(key, COMBINE_CHUNK) for source in sources)):
            acc = accumulator[: pieces[0].numel()]
            acc.copy_(pieces[0]).mul_(weights[0])
            for piece, weight in zip(pieces[1:], weights[1:]):
                acc.add_(piece.to("cpu"), alpha=weight)
            self.check_finite(acc, sources, key, pieces)
            flat_out[start : start + acc.numel()].copy_(acc)
            start += acc.numel()
        return out

    @staticmethod
    def check_finite(result: torch.Tensor, sources: Sequence[TensorSource], key: str,
                     pieces: Sequence[torch.Tensor] | None = None) -> None:
        """A finite sum proves ``result`` finite; otherwise name the input (or its ``pieces``) holding NaN/Inf, or
        report the float32 overflow when every input is finite."""
        if torch.isfinite(result.sum()):
            return
        for index, source in enumerate(sources):
            tensor = source.get(key) if pieces is None else pieces[index]
            if not torch.isfinite(tensor.float()).all():
                raise MergeError(f"{source.label}: tensor {key!r} contains NaN or Inf values.")
        if not torch.isfinite(result).all():
            raise MergeError(f"tensor {key!r}: the inputs are finite but merging them overflows float32.")

    def prefetcher(self, order: list[str], load: Callable[[str], Any] | None = None) -> Prefetcher[Any]:
        """A :class:`Prefetcher` of ``load`` (default :meth:`load`) over ``order``: reads tensor i + 1 while
        tensor i is merged."""
        return Prefetcher(load or self.load, order, depth=self.prefetch_depth)

    def iter_deltas(self, desc: str = "statistics") -> Iterator[tuple[str, torch.Tensor, list[torch.Tensor]]]:
        """Stream ``(key, base, deltas)`` over every floating-point tensor (for statistics passes)."""
        from tqdm.auto import tqdm

        with self.prefetcher(self.merge_keys) as prefetcher:
            for key in tqdm(self.merge_keys, desc=desc, unit="tensor", disable=not self.progress, leave=False):
                base, deltas = prefetcher.get(key)
                yield key, base, deltas


# --------------------------------------------------------------------------------------------- outputs
def _copy_side_files(base: TensorSource, destination: Path, dtype: torch.dtype | None = None) -> None:
    """Config (architecture and dtype updated), generation config and tokenizer files of the base; no weights."""
    model = base.model
    if model is not None and hasattr(model, "config") and hasattr(model.config, "save_pretrained"):
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        if dtype is not None:
            config.dtype = dtype
        config.save_pretrained(destination)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and getattr(model, "can_generate", lambda: False)():
            generation_config.save_pretrained(destination)
    elif base.folder is not None:
        import json
        import shutil

        for item in base.folder.iterdir():
            if item.is_file() and item.name not in _SKIPPED_FILES and not item.name.endswith(_WEIGHT_FILE_SUFFIXES):
                shutil.copy2(item, destination / item.name)
        config_file = destination / "config.json"
        if dtype is not None and config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))
            for key in ("dtype", "torch_dtype"):
                if key in config:
                    config[key] = str(dtype).removeprefix("torch.")
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _load_model_from_folder(folder: Path | None, *, meta: bool = False) -> torch.nn.Module | None:
    """The model a checkpoint folder's ``config.json`` describes (weights loaded, or on meta with ``meta=True``)."""
    if folder is None or not (folder / "config.json").is_file():
        return None
    if meta:
        return _meta_model_from_folder(folder)
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    architectures = getattr(config, "architectures", None) or []
    model_cls = getattr(transformers, architectures[0], None) if architectures else None
    if model_cls is None:
        return None
    return model_cls.from_pretrained(folder)


@dataclasses.dataclass
class Placement:
    """Where the merged model goes: ``device_map`` (a mapping, or ``"auto"`` under ``max_memory``) and the folder
    for ``"disk"`` entries. A base dispatched by Accelerate keeps its own ``hf_device_map`` by default."""

    device_map: Mapping[str, Any] | str | None = None
    max_memory: Mapping[Any, int | str] | None = None
    offload_folder: str | os.PathLike | None = None


def emit(
    base: TensorSource,
    metas: Mapping[str, TensorMeta],
    compute: Callable[[str], torch.Tensor],
    *,
    output_dir: str | os.PathLike | None = None,
    into: torch.nn.Module | None = None,
    placement: Placement | None = None,
    merge_config: MergeConfig | None = None,
    merge_inputs: Mapping[str, Any] | None = None,
    progress: bool = True,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    desc: str = "merging",
    on_order: Callable[[list[str]], None] | None = None,
    state_dict: bool = False,
    amendments: Callable[[], Iterable[Amendment]] | None = None,
) -> Any:
    """Produce every tensor with ``compute`` and deliver them: a folder, a model, or a state dict.

    ``metas`` gives the output shape and dtype of each key; ``on_order`` is told the order in which ``compute``
    will be called (so inputs can be prefetched). ``amendments`` (with ``output_dir`` only) is called once every
    tensor was written, and what it yields is patched into the written files. With ``output_dir`` the result is a
    checkpoint that ``from_pretrained`` loads (returned as a path, with ``merge_config.json`` and a model card);
    with a model base (or ``into``) a new model of the same class (ties kept; placed per ``placement`` or the base's
    Accelerate device map); with a checkpoint-folder base, the model its ``config.json`` describes; otherwise a state
    dict.
    """
    from tqdm.auto import tqdm

    placement = placement or Placement()
    bar = tqdm(total=len(metas), desc=desc, unit="tensor", disable=not progress)

    def produce(key: str) -> torch.Tensor:
        tensor = compute(key)
        bar.update(1)
        return tensor

    try:
        if output_dir is not None:
            plan = plan_shards(metas, max_shard_size=max_shard_size)
            if on_order is not None:
                on_order(plan.order)
            return _emit_folder(base, metas, produce, Path(output_dir), merge_config, merge_inputs, plan, amendments)
        if amendments is not None:
            raise ValueError("amendments= applies to output_dir= only.")
        if on_order is not None:
            on_order(list(metas))
        if state_dict:
            return {key: produce(key) for key in metas}
        device_map = placement.device_map
        if device_map is None and into is None and base.model is not None and is_dispatched(base.model):
            device_map = base.model.hf_device_map
        if device_map is not None:
            template = base.model if base.model is not None else _load_model_from_folder(base.folder, meta=True)
            if template is None:
                raise ValueError("device_map= needs a model base or a checkpoint folder with a config.json.")
            output = DispatchedOutput(
                template, device_map, max_memory=placement.max_memory, offload_folder=placement.offload_folder
            )
            target = _fill_model(output.model, metas, produce, place=output.place)
            target = output.finish()
        else:
            target = into
            if target is None and base.model is not None:
                target = copy.deepcopy(base.model)
            if target is None and base.folder is not None:
                target = _load_model_from_folder(base.folder)
            if target is None:
                out = {key: produce(key) for key in metas}
                for alias, canonical in base.aliases.items():
                    out[alias] = out[canonical]
                return out
            _fill_model(target, metas, produce)
        if merge_config is not None:
            from .hub import attach_publishing

            target.merge_config = merge_config
            target.merge_inputs = dict(merge_inputs or {})
            attach_publishing(target)
        return target
    finally:
        bar.close()


def _emit_folder(
    base: TensorSource,
    metas: Mapping[str, TensorMeta],
    produce: Callable[[str], torch.Tensor],
    output_dir: Path,
    merge_config: MergeConfig | None,
    merge_inputs: Mapping[str, Any] | None,
    plan: ShardPlan,
    amendments: Callable[[], Iterable[Amendment]] | None = None,
) -> str:
    float_dtypes = {m.dtype for m in metas.values() if m.dtype.is_floating_point}
    with atomic_directory(output_dir) as tmp:
        write_safetensors_shards(tmp, metas, produce, plan=plan)
        if amendments is not None:
            plan.patch(tmp, amendments())
        _copy_side_files(base, tmp, dtype=float_dtypes.pop() if len(float_dtypes) == 1 else None)
        if merge_config is not None:
            from .hub import write_card

            merge_config.save_pretrained(tmp)
            write_card(tmp, merge_config, dict(merge_inputs or {}))
    return str(output_dir)


def _fill_model(
    target: torch.nn.Module,
    metas: Mapping[str, TensorMeta],
    produce: Callable[[str], torch.Tensor],
    place: Callable[[str, torch.Tensor], None] | None = None,
) -> torch.nn.Module:
    """Write every produced tensor into ``target`` under its in-memory name (copy, or ``place`` for skeletons)."""
    params = target.state_dict(keep_vars=True)
    memory_names = ModelSource(target).memory_names
    unmapped = [k for k in metas if memory_names.get(k, k) not in params]
    if unmapped:
        raise MergeError(
            f"Cannot place merged tensors {_preview(unmapped)} into a {type(target).__name__} (its weights are "
            "stored converted on disk); pass output_dir= to write a checkpoint instead."
        )
    with torch.no_grad():
        for key in metas:
            tensor = produce(key)
            name = memory_names.get(key, key)
            if place is not None:
                place(name, tensor)
                continue
            destination = params[name]
            if destination.dtype != tensor.dtype:
                destination.data = tensor.to(destination.device)
            else:
                destination.copy_(tensor)
    return target


# --------------------------------------------------------------------------------------------- merge
def merge(
    base: Inputs,
    finetuned: Sequence[Inputs] | Mapping[str, Inputs],
    config: MergeConfig | str,
    *,
    output_dir: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    progress: bool = True,
    allow_pickle: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    compute_device: torch.device | str | None = None,
    device_map: Mapping[str, Any] | str | None = None,
    max_memory: int | str | Mapping[Any, int | str] | None = None,
    offload_folder: str | os.PathLike | None = None,
    output: str = "model",
    rank: int | None = None,
    energy: float | None = None,
    **overrides: Any,
) -> Any:
    """Merge fine-tuned models into one, streaming tensor by tensor.

    Args:
        base: the pre-trained model θ₀ — a ``PreTrainedModel`` (possibly dispatched by Accelerate with a device map,
            offloaded weights included), a local checkpoint folder (single or sharded safetensors) or a state dict.
        finetuned: the fine-tuned models θ_t, a sequence or a ``{task_name: model}`` mapping; kinds may be mixed.
        config: a :class:`~hf_merge.MergeConfig`, or a method name (``"ties"``) with its parameters as keywords.
        output_dir: write a ``from_pretrained``-loadable checkpoint there (atomically) and return its path.
        device: where the arithmetic runs (default CPU), e.g. ``"cuda"`` while inputs stream from disk; tensors move
            there one at a time. ``compute_device`` is a synonym.
        dtype: output dtype of floating-point tensors (default: the base's dtype per tensor).
        progress: show tqdm progress bars.
        allow_pickle: accept ``pytorch_model.bin`` inputs (loaded with ``weights_only=True``).
        max_shard_size: shard size of the written checkpoint.
        device_map: placement of the merged model (an Accelerate device map, or ``"auto"``); a dispatched base's
            ``hf_device_map`` is reused by default. ``"disk"`` entries go to ``offload_folder``.
        max_memory: host-memory budget of the merge (bytes, ``"4GB"``, or an Accelerate ``{"cpu": ..., 0: ...}``
            dict, whose entries also bound ``device_map="auto"``); sets the read-ahead.
        output: ``"model"`` (merged weights) or ``"lora"`` (LoRA inputs only: a merged PEFT adapter, see
            :func:`hf_merge.lora.merge_lora`, saved to ``output_dir`` when given); ``rank``/``energy`` set its ranks.
        **overrides: config fields, e.g. ``scaling=0.3``.

    Returns:
        A new model of the base's class (the base is untouched) for a model base, the model described by the folder's
        ``config.json`` for a folder base, a state dict for a state-dict base, or the output path with ``output_dir``.

    Example:
        >>> merged = hf_merge.merge(base, {"sst2": m1, "mnli": m2}, "ties", density=0.2, scaling=1.0)
    """
    if device is not None and compute_device is not None and torch.device(device) != torch.device(compute_device):
        raise ValueError(f"device={device!r} and compute_device={compute_device!r} disagree; give one.")
    config = make_config(config, **overrides)
    merger = get_merger(config)
    tasks = open_tasks(finetuned, allow_pickle=allow_pickle)
    options = RunOptions(
        output_dir=output_dir, device=device or compute_device, dtype=parse_dtype(dtype), progress=progress,
        max_shard_size=max_shard_size, max_memory=max_memory,
        placement=Placement(
            device_map=device_map, max_memory=max_memory if isinstance(max_memory, Mapping) else None,
            offload_folder=offload_folder,
        ),
    )
    if output not in ("model", "lora"):
        raise ValueError(f"output must be 'model' or 'lora', got {output!r}.")
    if output == "lora":
        from .lora import merge_lora

        adapter = merge_lora(
            open_source(base, "base", allow_pickle=allow_pickle), tasks, config, rank=rank, energy=energy,
            progress=progress,
        )
        return adapter.save_pretrained(output_dir) if output_dir is not None else adapter
    if rank is not None or energy is not None:
        raise ValueError("rank= and energy= apply to output='lora' only.")
    if isinstance(merger, ModelMerger):
        if base is not None:
            raise ValueError(f"Method {config.method!r} merges models without a base: call merge(None, models, ...).")
        return run_model_merger(merger, tasks, options)
    if base is None:
        raise ValueError(f"Method {config.method!r} needs the pre-trained base model θ₀ (base=None given).")
    return run_merger(merger, open_source(base, "base", allow_pickle=allow_pickle), tasks, options)


@dataclasses.dataclass
class RunOptions:
    """How a merge runs and where its result goes (see :func:`merge` for each field)."""

    output_dir: str | os.PathLike | None = None
    into: torch.nn.Module | None = None
    device: torch.device | str | None = None
    dtype: torch.dtype | None = None
    progress: bool = True
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
    max_memory: int | str | Mapping[Any, int | str] | None = None
    placement: Placement = dataclasses.field(default_factory=Placement)
    state_dict: bool = False  # deliver a state dict whatever the base is


def describe_inputs(base: TensorSource | None, tasks: Mapping[str, TensorSource]) -> dict[str, Any]:
    """Where each input came from, for ``merge_config`` records and model cards."""
    return {
        "base": base.origin if base is not None else None,
        "models": {name: source.origin for name, source in tasks.items()},
    }


def _output_metas(metas: Mapping[str, TensorMeta], dtype: torch.dtype | None) -> dict[str, TensorMeta]:
    return {
        k: TensorMeta(m.shape, dtype if dtype is not None and m.dtype.is_floating_point else m.dtype)
        for k, m in metas.items()
    }


def read_ahead_depth(metas: Mapping[str, TensorMeta], num_inputs: int, options: RunOptions) -> int:
    """How many tensors to read ahead while keeping the merge within ``options.max_memory`` (the output needs no
    room of its own: each tensor is written to its shard as it is produced).

    The working set of one tensor is about (inputs + 3) float32 copies of it (base, task vectors, temporaries, the
    output); read-ahead doubles it. Raises :class:`MergeError` when even one tensor's working set does not fit.
    """
    budget = cpu_budget(options.max_memory)
    if budget is None:
        return 1
    floats = {k: m for k, m in metas.items() if m.dtype.is_floating_point}
    if not floats:
        return 0
    largest_key = max(floats, key=lambda k: torch.Size(floats[k].shape).numel())
    largest = torch.Size(floats[largest_key].shape).numel()
    working = (num_inputs + 3) * largest * 4
    if working > budget:
        raise MergeError(
            f"max_memory={budget} bytes is below the ~{working} bytes needed to merge the largest tensor "
            f"{largest_key!r} {floats[largest_key].shape} across {num_inputs} inputs in float32."
        )
    return 1 if 2 * working <= budget // 2 else 0


def run_model_merger(merger: ModelMerger, models: Mapping[str, TensorSource], options: RunOptions) -> Any:
    """Merge models that share no base: the first model is the reference for keys, shapes and output layout."""
    if len(models) < 2:
        raise ValueError(f"Method {merger.config.method!r} needs at least two models, got {len(models)}.")
    first, *_ = models.values()
    metas = validate_sources(first, dict(list(models.items())[1:]), dtype=options.dtype)
    infos = classify_sources(first, models)
    ctx = MergeContext(first, models, infos, metas, device=options.device, progress=options.progress)
    merged = merger.merge_models(ctx)
    out_metas = _output_metas(metas, options.dtype)

    def compute(key: str) -> torch.Tensor:
        if not metas[key].dtype.is_floating_point:
            return first.get(key)
        return merged[key].to("cpu", out_metas[key].dtype)

    return emit(
        first, out_metas, compute,
        output_dir=options.output_dir, placement=options.placement, merge_config=merger.config,
        merge_inputs=describe_inputs(None, models), progress=options.progress,
        max_shard_size=options.max_shard_size, desc=f"merging ({merger.config.method})",
    )


def run_merger(
    merger: Merger, base: TensorSource, tasks: Mapping[str, TensorSource], options: RunOptions | None = None
) -> Any:
    """Validate, run the merger's statistics passes, then stream every tensor to the output."""
    options = options or RunOptions()
    metas = validate_sources(base, tasks, dtype=options.dtype)
    prefetch_depth = read_ahead_depth(metas, len(tasks) + 1, options)
    if merger.uses_param_info:
        infos = classify_sources(base, tasks)
    else:  # elementwise methods ignore the kinds: skip building the architecture
        infos = classify_parameters(base.shapes(), config=base.config)
    out_metas = _output_metas(metas, options.dtype)
    ctx = MergeContext(
        base, tasks, infos, metas, device=options.device, progress=options.progress, prefetch_depth=prefetch_depth,
        output_dtypes={k: m.dtype for k, m in out_metas.items()}, bounded_memory=options.max_memory is not None,
    )
    merger.prepare(ctx)
    coefficients = merger.linear_coefficients()
    one_pass = merger.one_pass
    amendments = None
    # Each output tensor is written as soon as it is produced into a folder: a few reused buffers hold them.
    buffers = OutputBuffers(out_metas, count=prefetch_depth + 1) if options.output_dir is not None else None

    def output(key: str) -> torch.Tensor:
        meta = out_metas[key]
        return buffers.take(key) if buffers is not None else torch.empty(meta.shape, dtype=meta.dtype)

    with contextlib.ExitStack() as prefetchers:  # read-ahead threads, closed however the merge ends
        if one_pass is not None:
            # inputs are mapped, not copied: two tensors ahead keep storage busy while the kernel runs
            inputs = prefetchers.enter_context(Prefetcher(one_pass.load, ctx.merge_keys, depth=2))

            def merge_one(key: str) -> torch.Tensor:
                out = output(key)
                one_pass.merge(key, inputs.get(key), out)
                return out

            if options.output_dir is None:  # in-memory result: every tensor merged and amended, then placed
                from tqdm.auto import tqdm

                held = {key: merge_one(key) for key in tqdm(ctx.merge_keys, desc=f"merging ({merger.config.method})",
                                                            unit="tensor", leave=False, disable=not ctx.progress)}
                for key, index, values in one_pass.amendments():
                    held[key].view(-1)[slice(None) if index is None else index] = values.view(-1)
                load = held.pop
            else:
                load, amendments = merge_one, one_pass.amendments
            prefetcher = prefetchers.enter_context(ctx.prefetcher([], load=load))

            def compute(key: str) -> torch.Tensor:
                return prefetcher.get(key) if metas[key].dtype.is_floating_point else base.get(key)
        elif coefficients is not None and not any(hasattr(t, "delta") for t in tasks.values()):
            # Linear in the task vectors (Task Arithmetic, averaging): one fused accumulation per tensor.
            prefetcher = prefetchers.enter_context(ctx.prefetcher(
                [], load=lambda key: ctx.combine(key, coefficients, out_metas[key].dtype, out=output(key))))

            def compute(key: str) -> torch.Tensor:
                if not metas[key].dtype.is_floating_point:
                    return base.get(key)
                return prefetcher.get(key)
        else:
            prefetcher = prefetchers.enter_context(ctx.prefetcher([]))

            def compute(key: str) -> torch.Tensor:
                if not metas[key].dtype.is_floating_point:
                    return base.get(key)
                theta0, deltas = prefetcher.get(key)
                merged_delta = merger.merge_tensor(key, theta0, deltas, infos[key])
                return (theta0 + merged_delta).to("cpu", out_metas[key].dtype)

        def on_order(order: list[str]) -> None:
            floating = [k for k in order if metas[k].dtype.is_floating_point]
            prefetcher.set_order(floating)
            if one_pass is not None:
                inputs.set_order(floating)

        return emit(
            base, out_metas, compute,
            output_dir=options.output_dir, into=options.into, placement=options.placement,
            merge_config=merger.config, merge_inputs=describe_inputs(base, tasks), progress=options.progress,
            max_shard_size=options.max_shard_size, desc=f"merging ({merger.config.method})",
            state_dict=options.state_dict, on_order=on_order, amendments=amendments,
        )
