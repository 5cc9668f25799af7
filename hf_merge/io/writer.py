"""Streaming checkpoint writing.

Tensors are produced one at a time by a callback and written straight into their shard file as they come: the shard
grouping is the one ``huggingface_hub.split_torch_state_dict_into_shards`` plans (from shapes and dtypes, nothing is
materialised) and each shard's safetensors header is written first, since shapes and dtypes give every
offset. Peak memory is the tensor being written, never a whole shard. Written tensors can be amended in place
(:meth:`ShardPlan.patch`) before the folder is published (:func:`hf_merge.io.publish.publish_folder`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..tensors import SAFETENSORS_DTYPES, TensorMeta
from .sources import SAFE_WEIGHTS_INDEX_NAME

DEFAULT_MAX_SHARD_SIZE = "5GB"
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class Shard:
    """One safetensors file of a plan: its tensors in file order, its encoded header and where each tensor's bytes
    start in the file."""

    filename: str
    keys: tuple[str, ...]
    header: bytes  # 8-byte length + JSON, padded to a multiple of 8 bytes
    offsets: dict[str, int]


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    shards: tuple[Shard, ...]
    metas: Mapping[str, TensorMeta]
    index: dict | None  # the ``*.safetensors.index.json`` content when sharded
    index_name: str

    @property
    def order(self) -> list[str]:
        """Every key, in the order the tensors are written."""
        return [key for shard in self.shards for key in shard.keys]

    def patch(self, folder: str | os.PathLike,
              amendments: Iterable[tuple[str, torch.Tensor | None, torch.Tensor]]) -> None:
        """Overwrite entries of the written tensors in place: ``(key, flat indices or None for the whole tensor,
        values in the tensor's dtype)``. The folder must hold this plan's files; each is mapped once."""
        where = {key: (shard.filename, shard.offsets[key]) for shard in self.shards for key in shard.keys}
        mapped: dict[str, np.memmap] = {}
        try:
            for key, index, values in amendments:
                meta = self.metas[key]
                size = math.prod(meta.shape)
                wanted = (size,) if index is None else tuple(index.shape)
                if values.dtype != meta.dtype or tuple(values.reshape(-1).shape) != wanted:
                    raise ValueError(f"Amendment of {key!r}: {tuple(values.shape)} {values.dtype} values for "
                                     f"{wanted[0]} entries of a {meta.shape} {meta.dtype} tensor.")
                filename, offset = where[key]
                if filename not in mapped:
                    mapped[filename] = np.memmap(Path(folder) / filename, dtype=np.uint8, mode="r+")
                entry = np.dtype((np.void, meta.dtype.itemsize))  # any dtype, byte for byte
                stored = mapped[filename][offset : offset + size * meta.dtype.itemsize].view(entry)
                if index is None:
                    stored[:] = _stored_bytes(values).view(entry)
                else:
                    stored[index.numpy()] = _stored_bytes(values).view(entry)
        finally:
            mapped.clear()  # unmapped: the pages stay in the page cache, written back like any write


    def allocate(self, folder: str | os.PathLike) -> None:
        """Create every shard file of the plan in ``folder`` at its full size, headers written and the blocks
        allocated (the tensors' bytes are then written in place, in any order: :class:`PositionedWriter`; writes
        into a sparse file are several times slower)."""
        for shard in self.shards:
            size = len(shard.header) + sum(self.metas[key].nbytes for key in shard.keys)
            with open(Path(folder) / shard.filename, "wb") as fh:
                _write_all(fh, memoryview(shard.header))
                try:
                    os.posix_fallocate(fh.fileno(), 0, size)
                except (AttributeError, OSError):  # no fallocate here (macOS, some file systems): a sparse file
                    fh.truncate(size)

    def write_index(self, folder: str | os.PathLike) -> None:
        """The ``*.safetensors.index.json`` of a sharded plan (nothing for one file)."""
        if self.index is not None:
            (Path(folder) / self.index_name).write_text(
                json.dumps(self.index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def plan_shards(
    metas: Mapping[str, TensorMeta],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    filename_pattern: str = "model{suffix}.safetensors",
    metadata: Mapping[str, str] | None = None,
) -> ShardPlan:
    """The shard grouping ``huggingface_hub.split_torch_state_dict_into_shards`` gives (its factory, sizing each
    tensor from its meta: nothing is materialised), with each shard's header. Inside a shard, tensors go by
    decreasing element size, then name (as the safetensors writer orders them), so every tensor's bytes are aligned
    to its element size."""
    from huggingface_hub.serialization import split_state_dict_into_shards_factory

    split = split_state_dict_into_shards_factory(
        dict(metas), get_storage_size=lambda meta: meta.nbytes,
        filename_pattern=filename_pattern, max_shard_size=max_shard_size,
    )
    shards = []
    for filename, keys in split.filename_to_tensors.items():
        keys = sorted(keys, key=lambda k: (-metas[k].dtype.itemsize, k))
        entries: dict[str, dict] = {"__metadata__": {"format": "pt", **(metadata or {})}}
        position = 0
        for key in keys:
            meta = metas[key]
            if meta.dtype not in _DTYPE_NAMES:
                raise TypeError(f"Tensor {key!r}: dtype {meta.dtype} cannot be stored in safetensors.")
            size = meta.nbytes
            entries[key] = {"dtype": _DTYPE_NAMES[meta.dtype], "shape": list(meta.shape),
                            "data_offsets": [position, position + size]}
            position += size
        encoded = json.dumps(entries, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        header = struct.pack("<Q", len(encoded)) + encoded
        offsets = {key: len(header) + entries[key]["data_offsets"][0] for key in keys}
        shards.append(Shard(filename, tuple(keys), header, offsets))
    index = None
    if split.is_sharded:
        index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename}
    index_name = filename_pattern.format(suffix="") + ".index.json"
    if filename_pattern == "model{suffix}.safetensors":
        index_name = SAFE_WEIGHTS_INDEX_NAME
    return ShardPlan(tuple(shards), dict(metas), index, index_name)


class ShardWriter:
    """Writes the tensors of a :class:`ShardPlan` into ``folder`` as they come (:meth:`put`, in
    :attr:`ShardPlan.order`): each tensor's bytes go to its file at once, so the caller may reuse its buffer.
    :meth:`close` writes the index (when sharded)."""

    def __init__(self, folder: str | os.PathLike, plan: ShardPlan) -> None:
        self.folder, self.plan = Path(folder), plan
        self._order = iter([(shard, key) for shard in plan.shards for key in shard.keys])
        self._shard: Shard | None = None
        self._file: Any = None
        self._advance()

    def _advance(self) -> None:
        """Move to the next expected tensor, opening its shard (header written) when it starts a new one."""
        self._next = next(self._order, (None, None))
        shard = self._next[0]
        if shard is not None and shard is not self._shard:
            self._close_file()
            self._shard = shard
            self._file = open(self.folder / shard.filename, "wb", buffering=0)  # noqa: SIM115 (closed in close())
            _write_all(self._file, memoryview(shard.header))

    def put(self, key: str, tensor: torch.Tensor) -> None:
        expected_key = self._next[1]
        if key != expected_key:
            raise RuntimeError(f"Tensor {key!r} came out of order: the shard plan expects {expected_key!r} next.")
        expected = self.plan.metas[key]
        if tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise RuntimeError(
                f"Tensor {key!r} came out as {tuple(tensor.shape)} {tensor.dtype}, "
                f"expected {expected.shape} {expected.dtype}."
            )
        if tensor.numel():
            _write_all(self._file, memoryview(_stored_bytes(tensor)))
        self._advance()

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Close the last file; write the empty shards left and the index. Every tensor must have been put."""
        self._close_file()
        if self._next[1] is not None:
            raise RuntimeError(f"The shard plan still expects tensor {self._next[1]!r}.")
        self.plan.write_index(self.folder)

    def abort(self) -> None:
        self._close_file()


class PositionedWriter:
    """Writes tensors of a :class:`ShardPlan` whose files exist at full size (:meth:`ShardPlan.allocate`) at their
    offsets, in any order: each process of a split merge writes its own tensors into the shared files."""

    def __init__(self, folder: str | os.PathLike, plan: ShardPlan) -> None:
        self.folder, self.plan = Path(folder), plan
        self._where = {key: (shard.filename, shard.offsets[key]) for shard in plan.shards for key in shard.keys}
        self._files: dict[str, int] = {}

    def put(self, key: str, tensor: torch.Tensor) -> None:
        expected = self.plan.metas[key]
        if tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise RuntimeError(f"Tensor {key!r} came out as {tuple(tensor.shape)} {tensor.dtype}, "
                               f"expected {expected.shape} {expected.dtype}.")
        filename, offset = self._where[key]
        if filename not in self._files:
            self._files[filename] = os.open(self.folder / filename, os.O_WRONLY)
        view = memoryview(_stored_bytes(tensor))
        while view.nbytes:
            written = os.pwrite(self._files[filename], view, offset)
            view, offset = view[written:], offset + written

    def close(self) -> None:
        while self._files:
            os.close(self._files.popitem()[1])

    abort = close


def write_safetensors_shards(
    folder: str | os.PathLike,
    metas: Mapping[str, TensorMeta],
    compute: Callable[[str], torch.Tensor],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    filename_pattern: str = "model{suffix}.safetensors",
    plan: ShardPlan | None = None,
    metadata: Mapping[str, str] | None = None,
) -> ShardPlan:
    """Write the tensors named in ``metas``, produced by ``compute`` in :attr:`ShardPlan.order`, as sharded
    safetensors (plus the index when sharded); return the plan (``plan``: one :func:`plan_shards` made already).

    Each tensor's bytes go to its file as soon as ``compute`` returns it (``compute`` may reuse its buffers after
    that): peak memory is whatever ``compute`` holds for one tensor.
    """
    plan = plan or plan_shards(metas, max_shard_size=max_shard_size, filename_pattern=filename_pattern,
                               metadata=metadata)
    writer = ShardWriter(folder, plan)
    try:
        for key in plan.order:
            writer.put(key, compute(key))
        writer.close()
    finally:
        writer.abort()
    return plan


def _write_all(fh, view: memoryview) -> None:
    while view.nbytes:
        written = fh.write(view)
        view = view[written:]


def _stored_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The bytes safetensors stores for ``tensor`` (little-endian), as a uint8 array: a view of a contiguous CPU
    tensor on little-endian hosts."""
    raw = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
    size = tensor.element_size()
    return raw if sys.byteorder == "little" or size == 1 else raw.reshape(-1, size)[:, ::-1].reshape(-1)


class OutputBuffers:
    """``count`` reused buffers, handed out in turn, for output tensors that are written out as soon as they are
    produced (at most ``count`` alive at once): no fresh memory per tensor. Each is sized for the largest tensor."""

    def __init__(self, metas: Mapping[str, TensorMeta], count: int) -> None:
        self.metas = metas
        self._capacity = max((m.nbytes for m in metas.values()), default=0)
        self._buffers: list[torch.Tensor | None] = [None] * count
        self._next = 0

    def take(self, key: str) -> torch.Tensor:
        """The next buffer, as an uninitialised tensor of ``key``'s shape and dtype."""
        meta = self.metas[key]
        slot, self._next = self._next, (self._next + 1) % len(self._buffers)
        if self._buffers[slot] is None:
            self._buffers[slot] = torch.empty(self._capacity, dtype=torch.uint8)
        size = meta.nbytes
        return self._buffers[slot][:size].view(meta.dtype).view(meta.shape)
