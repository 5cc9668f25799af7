"""Streaming, atomic checkpoint writing.

Tensors are produced one at a time by a callback and written shard by shard with the layout that
``huggingface_hub.split_torch_state_dict_into_shards`` plans (planned on meta tensors, so nothing is materialised
early). Everything goes into a temporary sibling folder that is renamed into place only when complete: a failed merge
leaves no output folder behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from .sources import SAFE_WEIGHTS_INDEX_NAME, TensorMeta

DEFAULT_MAX_SHARD_SIZE = "5GB"


@contextlib.contextmanager
def atomic_directory(output_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``output_dir``; on success it replaces ``output_dir`` in one rename.

    On any exception the temporary folder is removed and an existing ``output_dir`` is left untouched.
    """
    target = Path(output_dir).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def plan_shards(
    metas: Mapping[str, TensorMeta],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    filename_pattern: str = "model{suffix}.safetensors",
):
    """The shard layout ``huggingface_hub.split_torch_state_dict_into_shards`` gives, planned on meta tensors."""
    from huggingface_hub import split_torch_state_dict_into_shards

    planned = {k: torch.empty(m.shape, dtype=m.dtype, device="meta") for k, m in metas.items()}
    return split_torch_state_dict_into_shards(planned, filename_pattern=filename_pattern, max_shard_size=max_shard_size)


def write_safetensors_shards(
    folder: str | os.PathLike,
    metas: Mapping[str, TensorMeta],
    compute: Callable[[str], torch.Tensor],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    filename_pattern: str = "model{suffix}.safetensors",
) -> list[str]:
    """Write the tensors named in ``metas`` (produced by ``compute``) as sharded safetensors; return the file names.

    Peak memory is one shard plus whatever ``compute`` holds for one tensor.
    """
    from safetensors.torch import save_file

    split = plan_shards(metas, max_shard_size=max_shard_size, filename_pattern=filename_pattern)
    folder = Path(folder)
    for filename, keys in split.filename_to_tensors.items():
        shard = {}
        for key in keys:
            tensor = compute(key)
            expected = metas[key]
            if tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
                raise RuntimeError(
                    f"Tensor {key!r} came out as {tuple(tensor.shape)} {tensor.dtype}, "
                    f"expected {expected.shape} {expected.dtype}."
                )
            shard[key] = tensor.detach().to("cpu").contiguous()
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename}
        index_name = filename_pattern.format(suffix="") + ".index.json"
        if filename_pattern == "model{suffix}.safetensors":
            index_name = SAFE_WEIGHTS_INDEX_NAME
        (folder / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return list(split.filename_to_tensors)
