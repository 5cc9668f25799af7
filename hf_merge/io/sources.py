"""Lazy tensor sources: one interface over in-memory models, state dicts and checkpoint folders.

A source answers ``keys()``, ``meta(key)`` (shape and dtype without reading data) and ``get(key)``. Folder sources
read each shard's header once and a tensor only when it is asked for (positioned reads, see
:mod:`hf_merge.io.safetensors_file`), so a merge holds one tensor per input at a time, never whole models.

Tied weights (``lm_head.weight`` sharing storage with ``embed_tokens.weight``) appear once in ``keys()``, under the
first name in state-dict order — the name ``save_pretrained`` keeps — and the other names resolve to it as aliases.

(About 430 lines: the three kinds of stored tensors — state dicts, in-memory models, checkpoint folders with their
index and pickle rules — share one contract and one alias mechanism, which is clearest read in one place; sources
that hold updates rather than tensors live in :mod:`hf_merge.io.deltas`.)
"""

from __future__ import annotations

import abc
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import load_json
from ..errors import warn
from ..tensors import SAFETENSORS_DTYPES, TensorMeta, numpy_view
from .safetensors_file import SafetensorsFile

__all__ = ["SAFETENSORS_DTYPES", "FolderSource", "ModelSource", "StateDictSource", "TensorMeta", "TensorSource",
           "open_source"]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_WEIGHTS_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")



class TensorSource(abc.ABC):
    """Base class of all sources. ``label`` names the input in error messages."""

    label: str = "input"
    model: Any = None  # the PreTrainedModel behind the source, if any
    folder: Path | None = None  # the checkpoint folder behind the source, if any

    @property
    def origin(self) -> str | None:
        """Where the weights come from: a Hub id or local path (``name_or_path``), or ``None`` for a state dict."""
        if self.folder is not None:
            return str(self.folder)
        name = getattr(getattr(self.model, "config", None), "_name_or_path", None) or getattr(
            getattr(self.model, "config", None), "name_or_path", None
        )
        return str(name) if name else None

    def __init__(self) -> None:
        self.aliases: dict[str, str] = {}
        self.memory_names: dict[str, str] = {}  # key -> name of the same tensor in ``self.model``, where they differ

    @abc.abstractmethod
    def keys(self) -> list[str]:
        """Canonical tensor names (tied aliases excluded), in storage order."""

    @abc.abstractmethod
    def meta(self, key: str) -> TensorMeta:
        """Shape and dtype of ``key`` without reading its data."""

    @abc.abstractmethod
    def _read(self, key: str) -> torch.Tensor:
        """The tensor stored under the canonical name ``key``."""

    @property
    def config(self) -> Any:
        """The model config (a ``PretrainedConfig`` or a ``config.json`` dict), or ``None``."""
        return None

    def resolve(self, key: str) -> str:
        return self.aliases.get(key, key)

    def tie(self, alias: str, canonical: str) -> None:
        """Read ``alias`` as ``canonical`` from now on (a separately stored ``alias`` is no longer listed or read), as
        transformers does when it loads weights into an architecture that ties them."""
        self._drop(alias)
        self.aliases[alias] = canonical
        self.__dict__.pop("_cached_key_set", None)

    def _drop(self, key: str) -> None:
        """Stop listing ``key`` (see :meth:`tie`)."""

    def has(self, key: str) -> bool:
        return self.resolve(key) in self._key_set

    def get(self, key: str) -> torch.Tensor:
        resolved = self.resolve(key)
        if resolved not in self._key_set:
            raise KeyError(f"{self.label} has no tensor {key!r}.")
        return self._read(resolved)

    def flat_array(self, key: str) -> np.ndarray:
        """The flattened tensor ``key`` as a numpy array (bfloat16 as uint16 bit patterns) for one read: a view of
        an in-memory tensor, or a read-only mapping of just that tensor from a safetensors file (no copy)."""
        return numpy_view(self.get(key).reshape(-1))

    def read_blocks(self, key: str, starts: Sequence[int], count: int) -> torch.Tensor:
        """Blocks of ``count`` elements of the flattened tensor ``key`` starting at ``starts``, concatenated (1-D)."""
        flat = self.get(key).reshape(-1)
        return torch.cat([flat[start : start + count] for start in starts])

    def iter_chunks(self, key: str, chunk_elements: int) -> Iterator[torch.Tensor]:
        """The flattened tensor ``key`` in consecutive 1-D pieces of ``chunk_elements`` (the last may be shorter).

        A piece is only valid until the next one is requested: sources reading from files reuse one buffer.
        """
        flat = self.get(key).reshape(-1)
        for start in range(0, flat.numel(), chunk_elements):
            yield flat[start : start + chunk_elements]

    @property
    def _key_set(self) -> set[str]:
        cached = getattr(self, "_cached_key_set", None)
        if cached is None:
            cached = self._cached_key_set = set(self.keys())
        return cached

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {k: (m.shape, m.dtype) for k in self.keys() for m in (self.meta(k),)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label})"


def _storage_key(t: torch.Tensor) -> tuple[Any, ...] | None:
    if t.device.type == "meta" or t.numel() == 0:
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


class StateDictSource(TensorSource):
    """A ``{name: tensor}`` mapping. Entries that share storage (tied weights) are listed once."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], label: str = "state dict") -> None:
        super().__init__()
        self.label = label
        self._tensors: dict[str, torch.Tensor] = {}
        seen: dict[tuple[Any, ...], str] = {}
        for name, tensor in state_dict.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{label}: entry {name!r} is a {type(tensor).__name__}, not a torch.Tensor.")
            storage = _storage_key(tensor)
            if storage is not None and storage in seen:
                self.aliases[name] = seen[storage]
                continue
            if storage is not None:
                seen[storage] = name
            self._tensors[name] = tensor

    def keys(self) -> list[str]:
        return list(self._tensors)

    def _drop(self, key: str) -> None:
        self._tensors.pop(key, None)

    def meta(self, key: str) -> TensorMeta:
        t = self._tensors[self.resolve(key)]
        return TensorMeta(tuple(t.shape), t.dtype)

    def _read(self, key: str) -> torch.Tensor:
        return self._tensors[key].detach()


class ModelSource(StateDictSource):
    """An in-memory ``torch.nn.Module`` / ``transformers.PreTrainedModel`` (its state dict, without copies).

    For a ``PreTrainedModel`` the keys are the names ``save_pretrained`` writes: tied copies are dropped with
    transformers' own ``remove_tied_weights_from_state_dict`` and renamed weights (transformers 5 loads some
    architectures, e.g. ViT, under new in-memory names) are mapped back with ``revert_weight_conversion``. So a model
    and its saved folder expose the same keys and can be merged together. ``memory_names`` maps each key to the
    model's own parameter name.
    """

    def __init__(self, model: torch.nn.Module, label: str = "model") -> None:
        full = model.state_dict()
        serialized = _serialized_state_dict(model, full)
        super().__init__(serialized, label=f"{label} ({type(model).__name__})")
        self.model = model
        memory_name_of = {id(tensor): name for name, tensor in full.items()}
        self.memory_names = {k: memory_name_of[id(t)] for k, t in serialized.items() if id(t) in memory_name_of}
        kept_storage = {_storage_key(t): k for k, t in serialized.items() if _storage_key(t) is not None}
        for name, tensor in full.items():
            if name not in self.memory_names.values() and _storage_key(tensor) in kept_storage:
                self.aliases[name] = kept_storage[_storage_key(tensor)]

    def _read(self, key: str) -> torch.Tensor:
        tensor = self._tensors[key]
        if tensor.device.type != "meta":
            return tensor.detach()
        from ..placement import read_tensor  # offloaded by Accelerate: load through its hook

        return read_tensor(self.model, self.memory_names.get(key, key), tensor)

    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)


def _serialized_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict under the names (and tie choices) that ``save_pretrained`` writes."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return dict(state_dict)
    if not isinstance(model, PreTrainedModel):
        return dict(state_dict)
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    return dict(revert_weight_conversion(model, remove_tied_weights_from_state_dict(dict(state_dict), model)))


class FolderSource(TensorSource):
    """A local checkpoint: a folder with ``model.safetensors`` or a sharded index, or a single ``.safetensors`` file.

    Pickle checkpoints (``pytorch_model.bin``) are refused unless ``allow_pickle=True`` (then read with
    ``torch.load(weights_only=True)``).
    """

    def __init__(self, path: str | os.PathLike, label: str = "checkpoint", *, allow_pickle: bool = False) -> None:
        super().__init__()
        path = Path(path)
        self.label = f"{label} ({path})"
        self._handles: dict[Path, Any] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self._config: dict[str, Any] | None = None
        self._key_to_file: dict[str, Path] = {}
        if path.is_file():
            if path.suffix != ".safetensors":
                raise ValueError(f"{self.label}: expected a folder or a .safetensors file.")
            self.folder = path.parent
            self._index_shards({path: None})
        elif path.is_dir():
            self.folder = path
            self._find_weight_files(path, allow_pickle)
        else:
            raise FileNotFoundError(f"{label}: {path} does not exist (expected a checkpoint folder).")
        config_path = self.folder / "config.json"
        if config_path.is_file() and path.is_dir():
            self._config = load_json(config_path)
            if not isinstance(self._config, dict):
                raise ValueError(f"{config_path}: expected a JSON object.")

    def _index_shards(self, files: Mapping[Path, None], weight_map: Mapping[str, str] | None = None,
                      index: Path | None = None) -> None:
        """Key → file: every key of the files, or, with an index, each key from the shard the index names (a stale
        copy of a tensor in another shard is not read). An index naming a key its shard lacks is refused."""
        self._files = dict(files)
        if weight_map is None:
            for file in self._files:
                for key in self._file_keys(file):
                    self._key_to_file.setdefault(key, file)
            return
        shard_keys = {file: set(self._file_keys(file)) for file in self._files}
        for key, name in weight_map.items():
            file = self.folder / name
            if key not in shard_keys[file]:
                raise ValueError(f"{self.label}: {index.name} puts tensor {key!r} in {name}, which does not hold it "
                                 "(the index contradicts the shards).")
            self._key_to_file[key] = file

    def _find_weight_files(self, folder: Path, allow_pickle: bool) -> None:
        index = folder / SAFE_WEIGHTS_INDEX_NAME
        single = folder / SAFE_WEIGHTS_NAME
        if index.is_file() and single.is_file():  # as transformers: the complete single file wins over an index
            warn(f"{self.label}: both {SAFE_WEIGHTS_NAME} and {index.name} are present; reading "
                          f"{SAFE_WEIGHTS_NAME} (the index is ignored, as transformers does).")
        elif index.is_file():
            weight_map = _weight_map(index)
            files = dict.fromkeys(folder / name for name in dict.fromkeys(weight_map.values()))
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{self.label}: shard(s) listed in {index.name} are missing: {missing}.")
            return self._index_shards(files, weight_map, index)
        if single.is_file():
            return self._index_shards({single: None})
        pickled = [folder / name for name in PICKLE_WEIGHTS_NAMES if (folder / name).is_file()]
        if pickled:
            if not allow_pickle:
                raise ValueError(
                    f"{self.label}: only pickle weights found ({pickled[0].name}). Loading pickle files can execute "
                    "arbitrary code; convert the checkpoint to safetensors or pass allow_pickle=True."
                )
            if pickled[0].name.endswith(".json"):
                weight_map = _weight_map(pickled[0])
                files = dict.fromkeys(folder / name for name in dict.fromkeys(weight_map.values()))
                return self._index_shards(files, weight_map, pickled[0])
            return self._index_shards({pickled[0]: None})
        raise FileNotFoundError(
            f"{self.label}: no weights found (looked for {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME}"
            f"{', ' + ', '.join(PICKLE_WEIGHTS_NAMES)})."
        )

    def _handle(self, file: Path) -> Any:
        if file.suffix == ".bin":
            if file not in self._pickled:
                self._pickled[file] = _load_pickle(file)
            return self._pickled[file]
        if file not in self._handles:
            self._handles[file] = SafetensorsFile(file)
        return self._handles[file]

    def _file_keys(self, file: Path) -> list[str]:
        handle = self._handle(file)
        return list(handle.keys())

    def keys(self) -> list[str]:
        return list(self._key_to_file)

    def _drop(self, key: str) -> None:
        self._key_to_file.pop(key, None)

    def meta(self, key: str) -> TensorMeta:
        key = self.resolve(key)
        handle = self._handle(self._key_to_file[key])
        if isinstance(handle, dict):
            t = handle[key]
            return TensorMeta(tuple(t.shape), t.dtype)
        return TensorMeta(handle.shape(key), handle.dtype(key))

    def _read(self, key: str) -> torch.Tensor:
        handle = self._handle(self._key_to_file[key])
        return handle[key] if isinstance(handle, dict) else handle.read(key)

    def _safetensors_handle(self, key: str) -> tuple[str, SafetensorsFile | None]:
        resolved = self.resolve(key)
        handle = self._handle(self._key_to_file[resolved]) if resolved in self._key_set else None
        return resolved, handle if isinstance(handle, SafetensorsFile) else None

    def flat_array(self, key: str) -> np.ndarray:
        resolved, handle = self._safetensors_handle(key)
        mapped = None if handle is None else handle.map_array(resolved)
        return super().flat_array(key) if mapped is None else mapped

    def read_blocks(self, key: str, starts: Sequence[int], count: int) -> torch.Tensor:
        resolved, handle = self._safetensors_handle(key)
        if handle is None:
            return super().read_blocks(key, starts, count)
        blocks = handle.read_blocks(resolved, starts, count)  # only the pages holding the blocks are read
        if blocks is not None:
            return torch.from_numpy(blocks).view(handle.dtype(resolved))
        numel = math.prod(handle.shape(resolved))
        sizes = [max(0, min(count, numel - start)) for start in starts]
        out = torch.empty(sum(sizes), dtype=handle.dtype(resolved))
        for start, piece in zip(starts, out.split(sizes)):
            handle.read_range(resolved, start, piece)
        return out

    def iter_chunks(self, key: str, chunk_elements: int) -> Iterator[torch.Tensor]:
        resolved, handle = self._safetensors_handle(key)
        if handle is None:
            yield from super().iter_chunks(key, chunk_elements)
            return
        mapped = handle.map_array(resolved)
        if mapped is not None:  # pieces of the mapping: read in place, no copy out of the page cache
            flat = _read_only_tensor(mapped, handle.dtype(resolved))
            for start in range(0, flat.numel(), chunk_elements):
                yield flat[start : start + chunk_elements]
            return
        numel = math.prod(handle.shape(resolved))
        buffer = torch.empty(min(numel, chunk_elements), dtype=handle.dtype(resolved))
        for start in range(0, numel, chunk_elements):
            yield handle.read_range(resolved, start, buffer[: min(chunk_elements, numel - start)])

    @property
    def config(self) -> dict[str, Any] | None:
        return self._config

    def file_metadata(self) -> dict[str, dict[str, str]]:
        """``{file name: its safetensors header metadata}`` of every safetensors file read."""
        return {file.name: handle.metadata for file in self._files
                if isinstance(handle := self._handle(file), SafetensorsFile)}


def _weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index, checked: ``{tensor name: shard file name}``."""
    content = load_json(index)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in weight_map.items()):
        raise ValueError(f"{index}: no valid 'weight_map' ({{tensor name: shard file}}) in the index.")
    bad = [name for name in weight_map.values() if Path(name).name != name]
    if bad:
        raise ValueError(f"{index}: shard names must be file names in the folder, got {bad[0]!r}.")
    return weight_map


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    """A ``pytorch_model.bin`` state dict, loaded with ``weights_only=True``: memory-mapped when it is a zip archive,
    read whole when it is the legacy (pre-1.6) format, which cannot be mapped."""
    import zipfile

    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as error:  # torch raises several types for corrupt or unsafe pickles
        raise ValueError(f"{file}: cannot be loaded as a weights-only PyTorch checkpoint ({error}).") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file}: not a state dict of tensors.")
    return state


def open_source(obj: Any, label: str = "input", *, allow_pickle: bool = False) -> TensorSource:
    """Wrap a model, checkpoint path, state dict (or an existing source) as a :class:`TensorSource`."""
    if isinstance(obj, TensorSource):
        return obj
    if type(obj).__module__.startswith("peft") and hasattr(obj, "peft_config"):
        raise TypeError(
            f"{label}: a PeftModel is not a plain model; pass its adapters as fine-tuned inputs, or use "
            "hf_merge.merge_adapters(peft_model, [...]) to merge adapters into a new one."
        )
    if isinstance(obj, torch.nn.Module):
        return ModelSource(obj, label)
    if isinstance(obj, (str, os.PathLike)):
        return FolderSource(obj, label, allow_pickle=allow_pickle)
    if isinstance(obj, Mapping):
        return StateDictSource(obj, label)
    raise TypeError(
        f"{label}: expected a PreTrainedModel, a checkpoint folder path or a state dict, got {type(obj).__name__}."
    )


def _read_only_tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A tensor view of a read-only array (a file mapping), for code that only reads it."""
    with warnings.catch_warnings():  # torch warns that writing to it would be undefined: nothing here writes
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array).view(dtype)
