"""Read tensors from a ``.safetensors`` file with positioned reads instead of a memory map.

``safetensors.safe_open`` memory-maps the file, so every page a merge touches stays in the process's resident set
until the handle closes: streaming T inputs through a merge would show up as T whole models of RSS. Reading each
tensor with ``os.preadv`` into a fresh buffer keeps resident memory at the tensors actually held. The file layout is
the documented safetensors format: an 8-byte little-endian header length, a JSON header mapping each name to
``{"dtype", "shape", "data_offsets"}``, then the raw little-endian data.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

import torch

from .sources_dtypes import SAFETENSORS_DTYPES

_MAX_HEADER_BYTES = 100 * 1024 * 1024


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
        entry = self._entries[name]
        start, end = entry["data_offsets"]
        tensor = torch.empty(self.shape(name), dtype=self.dtype(name))
        if end == start:
            return tensor
        buffer = tensor.view(-1).view(torch.uint8).numpy()
        if buffer.nbytes != end - start:
            raise ValueError(f"{self.path}: tensor {name!r} has {end - start} bytes for shape {self.shape(name)}.")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            offset, view = self._data_start + start, memoryview(buffer)
            while view.nbytes:
                read = os.preadv(fd, [view], offset)
                if read <= 0:
                    raise OSError(f"{self.path}: unexpected end of file reading {name!r}.")
                view, offset = view[read:], offset + read
        finally:
            os.close(fd)
        if sys.byteorder != "little" and tensor.element_size() > 1:
            tensor = tensor.view(torch.uint8).view(-1, tensor.element_size()).flip(1).view(tensor.dtype)
        return tensor
