"""Read tensors from a ``.safetensors`` file with positioned reads instead of a whole-file memory map.

``safetensors.safe_open`` memory-maps the file, so every page a merge touches stays in the process's resident set
until the handle closes: streaming T inputs through a merge would show up as T whole models of RSS. Reading each
tensor with ``os.preadv`` into a fresh buffer keeps resident memory at the tensors actually held. The file layout is
the documented safetensors format: an 8-byte little-endian header length, a JSON header mapping each name to
``{"dtype", "shape", "data_offsets"}``, then the raw little-endian data. Kernels that read a tensor once can map just
that tensor instead (:meth:`SafetensorsFile.map_array`), which saves the copy out of the page cache.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..tensors import SAFETENSORS_DTYPES, numpy_dtype

_MAX_HEADER_BYTES = 100 * 1024 * 1024


def _validate(path: Path) -> None:
    """Let the ``safetensors`` library parse and validate the header (offsets in bounds, contiguous and not
    overlapping, each matching its shape × dtype), as every loader of the file would; the data is then read here."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as error:  # safetensors raises its own SafetensorError
        raise ValueError(f"{path}: invalid safetensors file ({error}).") from None


class SafetensorsFile:
    """Header of one safetensors file, and positioned reads of its tensors."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) != 8:
                raise ValueError(f"{self.path}: not a safetensors file (shorter than 8 bytes).")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER_BYTES:
                raise ValueError(f"{self.path}: not a safetensors file (header length {header_len}).")
            try:
                header = json.loads(fh.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise ValueError(f"{self.path}: corrupt safetensors header ({error}).") from None
        _validate(self.path)
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries: dict[str, dict[str, Any]] = header
        size = self.path.stat().st_size
        for name, entry in header.items():
            if entry.get("dtype") not in SAFETENSORS_DTYPES:
                raise TypeError(f"{self.path}: tensor {name!r} has unsupported dtype {entry.get('dtype')}.")
            start, end = entry["data_offsets"]
            if self._data_start + end > size:
                raise ValueError(f"{self.path}: tensor {name!r} extends past the end of the file (truncated?).")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self._entries[name]["dtype"]]

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` in a fresh CPU buffer (one copy from the page cache)."""
        tensor = torch.empty(self.shape(name), dtype=self.dtype(name))
        start, end = self._entries[name]["data_offsets"]
        if tensor.numel() * tensor.element_size() != end - start:
            raise ValueError(f"{self.path}: tensor {name!r} has {end - start} bytes for shape {self.shape(name)}.")
        self._read_into(name, tensor.view(-1), 0)
        return tensor

    def read_range(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """Elements ``start .. start + out.numel()`` of the flattened tensor ``name`` read into the 1-D ``out``."""
        first, end = self._entries[name]["data_offsets"]
        too_far = first + (start + out.numel()) * out.element_size() > end
        if out.dtype != self.dtype(name) or out.dim() != 1 or start < 0 or too_far:
            raise ValueError(f"{self.path}: range {start}+{out.numel()} is outside tensor {name!r}.")
        return self._read_into(name, out, start)

    def map_array(self, name: str) -> np.ndarray | None:
        """Tensor ``name`` as a flat read-only numpy view of the file, memory-mapped: no copy out of the page cache,
        and the mapping (its resident pages) goes when the array does. Pages are faulted in by whoever reads them (a
        compiled kernel's threads, in parallel and many pages per fault: measured faster than ``MAP_POPULATE`` in
        the read-ahead thread, from the page cache and from storage alike). bfloat16 comes as its uint16 bit
        patterns. ``None`` on big-endian hosts (the data is little-endian)."""
        mapped = self._map(name)
        return None if mapped is None else mapped[0]

    def read_blocks(self, name: str, starts: Sequence[int], count: int) -> np.ndarray | None:
        """Blocks of ``count`` elements of the flat tensor ``name`` from ``starts`` (clipped to it), concatenated in
        a numpy copy (bfloat16 as uint16). Only the pages holding them are read, all requested at once
        (``MADV_WILLNEED`` per block, no read-ahead beyond): a sparse sample costs its own pages even from storage.
        ``None`` on big-endian hosts."""
        mapped = self._map(name)
        if mapped is None:
            return None
        array, mapping, position = mapped
        blocks = [array[start : start + count] for start in starts]
        if mapping is not None and hasattr(mmap, "MADV_WILLNEED"):
            mapping.madvise(mmap.MADV_RANDOM)
            for start, block in zip(starts, blocks):
                begin = position + start * array.itemsize
                aligned = begin - begin % mmap.PAGESIZE
                if block.nbytes:
                    mapping.madvise(mmap.MADV_WILLNEED, aligned, begin - aligned + block.nbytes)
        return np.concatenate(blocks or [array[:0]])

    def _map(self, name: str) -> tuple[np.ndarray, mmap.mmap | None, int] | None:
        """(flat array, its mapping, the byte where the array starts in the mapping); ``None`` on big-endian hosts."""
        if sys.byteorder != "little":
            return None
        array_dtype = numpy_dtype(self.dtype(name))
        first, end = self._entries[name]["data_offsets"]
        offset = self._data_start + first
        aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
        if end == first:
            return np.empty(0, dtype=array_dtype), None, 0
        fd = self._open()
        try:
            mapping = mmap.mmap(fd, offset - aligned + end - first, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ,
                                offset=aligned)
        finally:
            os.close(fd)
        array = np.frombuffer(mapping, dtype=array_dtype, count=(end - first) // array_dtype.itemsize,
                              offset=offset - aligned)
        return array, mapping, offset - aligned

    def _open(self) -> int:
        """A descriptor of the file; a file removed since its header was read (sources read lazily) is named."""
        try:
            return os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path} was removed after it was opened (checkpoints and task banks are "
                                    "read lazily, tensor by tensor: keep their files until the merge ends).") from None

    def _read_into(self, name: str, flat: torch.Tensor, start: int) -> torch.Tensor:
        if flat.numel() == 0:
            return flat
        buffer = flat.view(torch.uint8).numpy()
        offset = self._data_start + self._entries[name]["data_offsets"][0] + start * flat.element_size()
        fd = self._open()
        try:
            view = memoryview(buffer)
            while view.nbytes:
                read = os.preadv(fd, [view], offset)
                if read <= 0:
                    raise OSError(f"{self.path}: unexpected end of file reading {name!r}.")
                view, offset = view[read:], offset + read
        finally:
            os.close(fd)
        if sys.byteorder != "little" and flat.element_size() > 1:
            flat.copy_(flat.view(torch.uint8).view(-1, flat.element_size()).flip(1).view(flat.dtype).view(-1))
        return flat
