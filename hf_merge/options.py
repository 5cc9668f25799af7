"""``MergeOptions``: how a merge runs and where its result is placed, built once by :func:`make_options`.

Every front door (``merge``, ``merge_with``, ``compress``, ``merge_adapters``, ``TaskVector.apply_to``, the CLI) builds
its options here, and every output honours each option or rejects it by name (see the sinks in :mod:`hf_merge.io`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import torch

from .placement import parse_size

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


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPE_NAMES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(_DTYPE_NAMES)}.") from None


@dataclasses.dataclass(frozen=True)
class MergeOptions:
    """How a merge runs and where its result goes.

    Attributes:
        device: where the arithmetic runs (default CPU); tensors move there one at a time.
        dtype: output dtype of floating-point tensors (default: the base's dtype per tensor).
        progress: show tqdm progress bars.
        allow_pickle: accept ``pytorch_model.bin`` inputs (loaded with ``weights_only=True``).
        memory_budget: bytes the merge's working set may hold (sets the read-ahead; selects the exact multi-pass
            routes); ``None``: unbounded.
        device_map: placement of the merged model (an Accelerate device map, or ``"auto"``).
        max_memory: Accelerate's per-device placement budget for ``device_map="auto"`` (``{"cpu": "4GB", 0: ...}``);
            it bounds where the *result* goes, not the merge's working set.
        offload_folder: where ``"disk"`` entries of the device map go.
        max_shard_size: shard size of a written checkpoint (``None``: 5GB, the Hub's default).
        overwrite: write into an existing folder this package did not write (the user's files in it are kept;
            see :mod:`hf_merge.io.publish`).
        revision: the Hub revision (branch, tag or commit) of inputs given as repo ids: one for all (an input's own
            ``"org/name@rev"`` wins), or ``{reference: revision}`` (see :mod:`hf_merge.hub.resolve`).
        token: the Hub token for downloading inputs (``None``: the stored login, if any).
        cache_dir: the Hugging Face cache inputs are downloaded to (``None``: the default cache).
        license: the model card's license, a Hub license id (``None``: inherited from the inputs when they agree).
        tags: more Hub tags for the model card (a list of strings).
        base_model: ``{input: hub_id}``: the Hub ids the card lists for local or in-memory inputs (named by path,
            task name or ``"base"``); see :class:`~hf_merge.hub.provenance.CardMetadata`.
        tokenizer_source: the output's vocabulary (mergekit's): ``"base"``, ``"union"`` or an input (task name, or
            the path / Hub id it was given as); ``None``: the base's, inputs matched by token only where their
            embedding rows differ. See :mod:`hf_merge.vocab`.
        tokenizer: tokenizers of in-memory inputs (a tokenizer or a folder path for the base, or ``{input: ...}``).
        chat_template: the output tokenizer's chat template: a Jinja template, ``"auto"`` or an input whose
            template to take; ``None``: the tokenizer source's.
        pad_to_multiple_of: pad the output's embedding rows to a multiple of this (mergekit's
            ``tokenizer.pad_to_multiple_of``).
        data: ``{task: TaskData}``, the examples data-aware methods (RegMean, Fisher, AdaMerging) run the models on
            (see :mod:`hf_merge.data`); every other method refuses it.
        num_threads: the CPU threads of the merge: torch's intra-op threads and every BLAS/LAPACK and OpenMP pool
            (SciPy's OpenBLAS included, through ``threadpoolctl``), set for the run and restored afterwards; the
            subspace methods (TSV, Iso) spend them on LAPACK or on independent matrices side by side, per route
            (see :mod:`hf_merge.linalg`). ``None``: ``torch.get_num_threads()`` when the merge starts.
        distributed: split the merge across the processes of ``torch.distributed`` (``torchrun``, ``accelerate
            launch``; see :mod:`hf_merge.distributed`): ``None`` splits it when more than one process is initialised
            and the output can be split (a checkpoint folder, a model, a state dict), else every process merges
            everything; ``True`` requires the split; ``False`` has every process merge everything.
    """

    device: torch.device | None = None
    dtype: torch.dtype | None = None
    progress: bool = True
    allow_pickle: bool = False
    memory_budget: int | None = None
    device_map: Mapping[str, Any] | str | None = None
    max_memory: Mapping[Any, int | str] | None = None
    offload_folder: str | os.PathLike | None = None
    max_shard_size: int | str | None = None
    overwrite: bool = False
    revision: str | Mapping[str, str] | None = None
    token: str | bool | None = dataclasses.field(default=None, repr=False)
    cache_dir: str | os.PathLike | None = None
    license: str | None = None
    tags: tuple[str, ...] = ()
    base_model: Mapping[str, str] | None = None
    tokenizer_source: str | None = None
    tokenizer: Any = dataclasses.field(default=None, repr=False)
    chat_template: str | None = None
    pad_to_multiple_of: int | None = None
    data: Mapping[str, Any] | None = dataclasses.field(default=None, repr=False, compare=False)
    num_threads: int | None = None
    distributed: bool | None = None

    @property
    def card(self) -> Any:
        """The card metadata of these options (a :class:`~hf_merge.hub.provenance.CardMetadata`)."""
        from .hub.provenance import CardMetadata

        return CardMetadata(license=self.license, tags=self.tags, base_model=self.base_model)

    def given(self) -> dict[str, Any]:
        """The options set to something other than their default, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default}

    def reject(self, names: tuple[str, ...], where: str) -> None:
        """Raise naming the options of ``names`` that were given: ``where`` cannot honour them."""
        given = [name for name in names if name in self.given()]
        if given:
            raise ValueError(f"{where} cannot honour the option(s) {given}; leave them out for this output.")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


def make_options(
    *,
    device: torch.device | str | None = None,
    compute_device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    progress: bool = True,
    allow_pickle: bool = False,
    memory_budget: int | str | None = None,
    device_map: Mapping[str, Any] | str | None = None,
    max_memory: int | str | Mapping[Any, int | str] | None = None,
    offload_folder: str | os.PathLike | None = None,
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
    revision: str | Mapping[str, str] | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    license: str | None = None,
    tags: Any = None,
    base_model: Mapping[str, str] | None = None,
    tokenizer_source: str | os.PathLike | None = None,
    tokenizer: Any = None,
    chat_template: str | None = None,
    pad_to_multiple_of: int | None = None,
    data: Mapping[str, Any] | None = None,
    num_threads: int | None = None,
    distributed: bool | None = None,
) -> MergeOptions:
    """The one way to build :class:`MergeOptions` from user keywords.

    ``compute_device`` is a synonym of ``device``. ``max_memory`` as a number or size string (``"4GB"``) is the
    merge's working-set budget (``memory_budget``); as a dict it is Accelerate's placement budget.
    """
    if device is not None and compute_device is not None and torch.device(device) != torch.device(compute_device):
        raise ValueError(f"device={device!r} and compute_device={compute_device!r} disagree; give one.")
    device = device if device is not None else compute_device
    if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}, but no CUDA device is available (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda is not None}); use device='cpu'.")
    if isinstance(max_memory, Mapping):
        placement_budget = dict(max_memory)
        for size in placement_budget.values():
            parse_size(size)
    else:
        placement_budget = None
        if max_memory is not None:
            if memory_budget is not None:
                raise ValueError("max_memory= (a size) and memory_budget= both set the working-set budget; give one.")
            memory_budget = max_memory
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {progress!r}.")
    for name, flag in (("allow_pickle", allow_pickle), ("overwrite", overwrite)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}.")
    if max_shard_size is not None:
        parse_size(max_shard_size)
    revisions = revision.values() if isinstance(revision, Mapping) else [] if revision is None else [revision]
    if not all(isinstance(value, str) and value for value in revisions) or (
            isinstance(revision, Mapping) and not all(isinstance(key, str) and key for key in revision)):
        raise TypeError(f"revision must be a string or a {{reference: revision}} mapping of strings, got {revision!r}.")
    if token is not None and not isinstance(token, (str, bool)):
        raise TypeError(f"token must be a string or a bool, got {type(token).__name__}.")
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir must be a path, got {cache_dir!r}.")
    from .data import task_data_of
    from .hub.provenance import CardMetadata

    card = CardMetadata(license=license, tags=tags, base_model=base_model)  # checked before any work
    if tokenizer_source is not None and not isinstance(tokenizer_source, (str, os.PathLike)):
        raise TypeError(f"tokenizer_source must be 'base', 'union' or an input (a name or path), got "
                        f"{tokenizer_source!r}.")
    if chat_template is not None and not (isinstance(chat_template, str) and chat_template):
        raise TypeError(f"chat_template must be a Jinja template, 'auto' or an input's name, got {chat_template!r}.")
    if pad_to_multiple_of is not None and (isinstance(pad_to_multiple_of, bool) or not isinstance(
            pad_to_multiple_of, int) or pad_to_multiple_of < 1):
        raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}.")
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be True, False or None (split when launched on several processes), got "
                        f"{distributed!r}.")
    if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                    or num_threads < 1):
        raise ValueError(f"num_threads must be a positive integer (or None: torch.get_num_threads()), got "
                         f"{num_threads!r}.")
    return MergeOptions(
        device=torch.device(device) if device is not None else None,
        dtype=parse_dtype(dtype),
        progress=progress,
        allow_pickle=allow_pickle,
        memory_budget=parse_size(memory_budget) if memory_budget is not None else None,
        device_map=device_map,
        max_memory=placement_budget,
        offload_folder=offload_folder,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        revision=dict(revision) if isinstance(revision, Mapping) else revision,
        token=token,
        cache_dir=cache_dir,
        license=card.license,
        tags=card.tags,
        base_model=dict(card.base_model) or None,
        tokenizer_source=os.fspath(tokenizer_source) if tokenizer_source is not None else None,
        tokenizer=tokenizer,
        chat_template=chat_template,
        pad_to_multiple_of=pad_to_multiple_of,
        data=task_data_of(data),
        num_threads=num_threads,
        distributed=distributed,
    )


#: The keywords :func:`make_options` takes (every front door accepts these).
OPTION_KEYWORDS = ("device", "compute_device", "dtype", "progress", "allow_pickle", "memory_budget", "device_map",
                   "max_memory", "offload_folder", "max_shard_size", "overwrite", "revision", "token", "cache_dir",
                   "license", "tags", "base_model", "tokenizer_source", "tokenizer", "chat_template",
                   "pad_to_multiple_of", "data", "num_threads", "distributed")


def split_options(keywords: dict[str, Any], **defaults: Any) -> MergeOptions:
    """The :class:`MergeOptions` of a front door's keywords: the option keywords are taken out of ``keywords`` (what
    remains are method parameters); ``defaults`` apply where the caller gave none."""
    given = {name: keywords.pop(name) for name in OPTION_KEYWORDS if name in keywords}
    return make_options(**{**defaults, **given})
