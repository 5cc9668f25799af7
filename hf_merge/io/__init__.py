"""Streaming input/output: lazy tensor sources, sharded safetensors writing, the output sinks and folder publishing."""

from ..tensors import TensorMeta
from .deltas import DeltaSource, LowRankSource
from .publish import publish_folder
from .sinks import Sink
from .sources import FolderSource, ModelSource, StateDictSource, TensorSource, open_source
from .writer import write_safetensors_shards

__all__ = [
    "DeltaSource",
    "FolderSource",
    "LowRankSource",
    "ModelSource",
    "Sink",
    "StateDictSource",
    "TensorMeta",
    "TensorSource",
    "open_source",
    "publish_folder",
    "write_safetensors_shards",
]
