"""Streaming input/output: lazy tensor sources and atomic sharded safetensors writing."""

from .sources import FolderSource, ModelSource, StateDictSource, TensorMeta, TensorSource, open_source
from .writer import atomic_directory, write_safetensors_shards

__all__ = [
    "FolderSource",
    "ModelSource",
    "StateDictSource",
    "TensorMeta",
    "TensorSource",
    "atomic_directory",
    "open_source",
    "write_safetensors_shards",
]
