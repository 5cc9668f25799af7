"""Compressed multi-task checkpoints: a :class:`TaskBank` stores T fine-tuned models in about the size of one or two.

``compress(base, {task: finetuned}, config)`` streams tensor by tensor through a :class:`TaskCompressor` method —
TSV-C (per-task top-k singular triplets of every matrix, :class:`~hf_merge.TSVCompressConfig`) or TALL masks (one
multi-task vector plus one bit per parameter and task, :class:`~hf_merge.TallMaskConfig`) — and returns a bank from
which ``bank.load_task(name)`` rebuilds each task's model.

On disk (written atomically)::

    bank_dir/
      task_bank.json              manifest: method config, task names, base reference, base tensor shapes/dtypes and
                                  a fingerprint of the base's data
      payload/model*.safetensors  the compressed tensors, named "<tensor>::<part>" (e.g. "...q_proj.weight::U.3"); the
                                  task names, in the order of the parts' indices, are in each file's metadata
      base/                       the base checkpoint, only when the base was not given as a folder (else its path)

Integrity: :meth:`TaskBank.from_pretrained` refuses a bank whose base changed since it was written (shapes, dtypes
and the fingerprint of sampled bytes of every tensor), whose manifest lists the tasks in another order than its
payload, and a payload value that is not finite when a task is rebuilt. It reads the payload lazily, tensor by
tensor: keep the folder until the bank is no longer used (a removed file is named in the error).

Publishing (:meth:`TaskBank.push_to_hub`): a bank whose base is not embedded is pushed with its base named by Hub id
(``"base": {"path": null, "repo_id": "org/name[@commit]"}`` in the pushed manifest) — never by a local path. A base
that came from the Hub is named by its repo id and commit; a local base folder needs ``base_model={"base":
"org/name"}`` (or keyed by its path), else the push is refused. :meth:`TaskBank.from_pretrained` downloads such a
base and checks it against the bank's fingerprint.

One concern in one file (~480 lines): the bank's format, its writer (sink) and its reader share the manifest and
its integrity checks.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import load_json
from .errors import MergeError, warn
from .io.deltas import DeltaSource
from .io.publish import check_output_dir, publish_folder
from .io.sinks import Sink
from .io.sources import FolderSource, StateDictSource, TensorSource
from .io.writer import ShardWriter, plan_shards, write_safetensors_shards
from .methods.base import TaskCompressor
from .record import MergeRecord
from .tensors import SAFETENSORS_DTYPES, TensorMeta

if TYPE_CHECKING:
    from .config import MergeConfig
    from .options import MergeOptions
    from .params import ParamInfo

BANK_MANIFEST = "task_bank.json"
BANK_FORMAT = "hf_merge.task_bank"
BANK_VERSION = 2
_TASKS_METADATA = "hf_merge_tasks"
_FINGERPRINT_BLOCKS, _FINGERPRINT_BLOCK = 16, 256
PAYLOAD_DIR = "payload"
BASE_DIR = "base"
_SEPARATOR = "::"
_DTYPE_TO_NAME = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_BANK_FILES = (BANK_MANIFEST, f"{PAYLOAD_DIR}/*", f"{BASE_DIR}/*", "README.md")


def _nbytes(meta: TensorMeta) -> int:
    numel = 1
    for size in meta.shape:
        numel *= size
    return numel * torch.empty((), dtype=meta.dtype).element_size()


class TaskBank:
    """T task models stored as a shared base plus a compressed payload; see :func:`compress`.

    Example:
        >>> bank = hf_merge.compress(base, {"sst2": m1, "mnli": m2}, hf_merge.TSVCompressConfig())
        >>> bank.save_pretrained("bank/")
        >>> sst2 = hf_merge.TaskBank.from_pretrained("bank/").load_task("sst2")
    """

    #: The card metadata given to :func:`compress` (``license``, ``tags``, ``base_model``), role-keyed; ``None``
    #: for a bank opened from disk.
    card: Any = None

    def __init__(
        self,
        config: MergeConfig,
        tasks: Sequence[str],
        base: TensorSource,
        payload: TensorSource,
        *,
        base_embedded: bool,
    ) -> None:
        from .inputs import classify_sources
        from .registry import get_merger

        self.config = config
        self._tasks = list(tasks)
        self.base = base
        self.payload = payload
        self._base_embedded = base_embedded
        self._compressor = get_merger(config)
        if not isinstance(self._compressor, TaskCompressor):
            raise TypeError(f"Method {config.method!r} cannot build a TaskBank (it is not a TaskCompressor).")
        self.metas = {k: base.meta(k) for k in base.keys()}  # noqa: SIM118 (a TensorSource, not a dict)
        self.infos = classify_sources(base, {})
        self.layout = _payload_layout(self._compressor, self.metas, self.infos, len(self._tasks))
        missing = [name for name in self.layout if not payload.has(name)]
        if missing:
            raise ValueError(f"Task bank payload lacks {len(missing)} tensor(s), e.g. {missing[0]!r}.")
        for name, meta in self.layout.items():
            stored = payload.meta(name)
            if stored != meta:
                raise ValueError(
                    f"Task bank payload tensor {name!r} is {stored.shape} {stored.dtype}, expected {meta.shape} {meta.dtype}."
                )

    # ------------------------------------------------------------------ access
    @property
    def tasks(self) -> list[str]:
        """The task names, in the order they were given to :func:`compress`."""
        return list(self._tasks)

    def __repr__(self) -> str:
        return f"TaskBank(method={self.config.method!r}, tasks={self._tasks}, storage_ratio={self.storage_ratio():.3f})"

    def task_delta(self, name: str, key: str) -> torch.Tensor:
        """The reconstructed task vector τ̂ of task ``name`` for tensor ``key`` (float32)."""
        index = self._task_index(name)
        if key not in self.metas or not self.metas[key].dtype.is_floating_point:
            raise KeyError(f"The bank has no floating-point tensor {key!r}.")
        delta = self._compressor.decode_tensor(
            key, index, lambda part: self.payload.get(f"{key}{_SEPARATOR}{part}"),
            self.metas[key], self.infos[key],
        )
        if not torch.isfinite(delta).all():
            raise MergeError(f"{self.payload.label}: the stored parts of {key!r} rebuild task {name!r} with NaN or Inf "
                             "values (a corrupt payload).")
        return delta

    def _task_index(self, name: str) -> int:
        if name not in self._tasks:
            raise KeyError(f"Unknown task {name!r}; the bank holds {self._tasks}.")
        return self._tasks.index(name)

    def load_task(self, name: str, *, output_dir: str | os.PathLike | None = None, progress: bool = False,
                  overwrite: bool = False) -> Any:
        """Rebuild task ``name``: θ₀ + τ̂_name, cast to the base's dtypes.

        Returns a new model of the base's class for a model base (or a folder base with a ``config.json``), a state
        dict for a state-dict base, or the path of a ``from_pretrained``-loadable checkpoint with ``output_dir``.
        """
        from .engine import Plan, run
        from .io.sinks import output_sink
        from .methods.task_arithmetic import TaskArithmeticConfig, TaskArithmeticMerger
        from .options import make_options

        self._task_index(name)
        options = make_options(progress=progress, overwrite=overwrite)
        plan = Plan(self.base, {name: _BankTask(self, name)}, TaskArithmeticMerger(TaskArithmeticConfig(scaling=1.0)),
                    record=MergeRecord(self.config, {"task_bank_task": name}))
        return run(plan, output_sink(self.base, options, output_dir=output_dir, inputs=self.folders()), options)

    def folders(self) -> list[Path]:
        """The folders this bank reads: its base's and, for a bank opened from disk, its own (outputs may not touch
        them)."""
        return [folder for folder in (self.base.folder, self.payload.folder) if folder is not None]

    # ------------------------------------------------------------------ size
    def payload_nbytes(self) -> int:
        return sum(_nbytes(meta) for meta in self.layout.values())

    def base_nbytes(self) -> int:
        return sum(_nbytes(meta) for meta in self.metas.values())

    def storage_ratio(self, *, include_base: bool = True) -> float:
        """Bytes of the bank (payload, plus the base it needs when ``include_base``) over T full checkpoints."""
        stored = self.payload_nbytes() + (self.base_nbytes() if include_base else 0)
        return stored / (len(self._tasks) * self.base_nbytes())

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, save_directory: str | os.PathLike, *, max_shard_size: int | str = "5GB",
                        overwrite: bool = False, license: str | None = None, tags: Any = None,
                        base_model: Any = None) -> str:
        """Write the bank into ``save_directory`` atomically (see the module docstring for the layout, and
        :mod:`hf_merge.io.publish` for the rules of an existing folder and ``overwrite``). ``license``, ``tags`` and
        ``base_model`` (``{input: hub_id}``) set the card's metadata, added to what :func:`compress` was given."""
        card = self._card_record(license, tags, base_model).card  # checked before anything is written
        target = Path(save_directory).absolute()
        with publish_folder(target, self.folders(), overwrite=overwrite) as tmp:
            (tmp / PAYLOAD_DIR).mkdir()
            write_safetensors_shards(tmp / PAYLOAD_DIR, self.layout, self.payload.get, max_shard_size=max_shard_size,
                                     metadata=_tasks_metadata(self._tasks))
            _finish_bank(tmp, self.config, self._tasks, self.base, self.metas, embed_base=self._base_embedded,
                         max_shard_size=max_shard_size, card=card)
        return str(target)

    def _card_record(self, license: str | None = None, tags: Any = None, base_model: Any = None) -> MergeRecord:
        record = MergeRecord(self.config, _bank_inputs(self.base, self._tasks), artifact="task_bank",
                             **({"card": self.card} if self.card is not None else {}))
        return record.with_card(license=license, tags=tags, base_model=base_model)

    def published_base(self, base_model: Any = None) -> str | None:
        """How the pushed manifest names a base that is not embedded: a Hub base by ``"repo_id@commit"``, a local
        base folder by the Hub id ``base_model`` maps it to (``None`` for an embedded base). Raises ``ValueError``
        naming the base's path when it has no Hub id: pushing would publish that local path."""
        if self._base_embedded:
            return None
        from .hub.resolve import cached_repo

        mapped = self._card_record(base_model=base_model).card.base_model.get("base")
        if mapped is not None:
            return mapped
        repo = cached_repo(self.base.folder)
        if repo is not None:
            return f"{repo[0]}@{repo[1]}"
        path = str(self.base.folder.absolute())
        raise ValueError(
            f"This task bank stores its base by the local path {path}: pushing it would publish that path in "
            f"task_bank.json (and in no way the base itself), so the bank would not load from the Hub. Pass "
            f"base_model={{{path!r}: 'org/name'}} (or {{'base': 'org/name'}}) with the base's Hub id — it is checked "
            "against the bank's fingerprint when the bank is loaded — or compress from the base's Hub id, or from a "
            "model in memory (the base is then embedded in the bank)."
        )

    def push_to_hub(self, repo_id: str, *, license: str | None = None, tags: Any = None, base_model: Any = None,
                    **push_options: Any) -> Any:
        """Save the bank to a temporary folder and upload it in one commit (see :func:`hf_merge.hub.push_folder`).

        ``license``, ``tags`` and ``base_model`` set the card's metadata. A base that is not embedded is published
        by its Hub id (see :meth:`published_base`, which refuses a local base folder without one), never by a local
        path; nothing is uploaded when a check fails.
        """
        import tempfile

        from .hub import push_folder
        from .hub.cards import check_publishable

        self._card_record(license, tags, base_model)  # bad card metadata fails before anything is written
        hub_base = self.published_base(base_model)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "bank"
            self.save_pretrained(folder, license=license, tags=tags, base_model=base_model)
            if hub_base is not None:
                manifest = load_json(folder / BANK_MANIFEST)
                manifest["base"] = {**manifest["base"], "path": None, "repo_id": hub_base}
                (folder / BANK_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            check_publishable(folder, _bank_inputs(self.base, self._tasks))
            return push_folder(folder, repo_id, **push_options)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, revision: str | None = None,
                        token: str | bool | None = None, cache_dir: str | os.PathLike | None = None) -> TaskBank:
        """Open a bank written by :meth:`save_pretrained` or ``compress(..., output_dir=...)`` (tensors read lazily):
        a local folder, or a Hub repo id (``"org/name"``, ``"org/name@revision"``; downloaded into ``cache_dir``). A
        base stored by path that is a Hub snapshot missing here is downloaded at its recorded commit."""
        from .config import MergeConfig
        from .hub.resolve import cached_repo, resolve_folder, resolve_model

        folder = resolve_folder(directory, _BANK_FILES, revision=revision, token=token, cache_dir=cache_dir).folder
        manifest_path = folder / BANK_MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"No {BANK_MANIFEST} in {folder}: not a task bank folder.")
        manifest = load_json(manifest_path)
        if not isinstance(manifest, dict) or manifest.get("format") != BANK_FORMAT or manifest.get("version") not in (
                1, BANK_VERSION):
            found = (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else (None, None)
            raise ValueError(f"{manifest_path} has format {found[0]!r} version {found[1]!r}; expected "
                             f"{BANK_FORMAT!r} version {BANK_VERSION}.")
        try:
            config = MergeConfig.from_dict(manifest["config"])
            tasks, base_entry = list(manifest["tasks"]), manifest["base"]
            embedded = bool(base_entry["embedded"])
            hub_base = None if embedded or base_entry.get("path") else base_entry.get("repo_id")  # a pushed bank
            base_path = folder / BASE_DIR if embedded else Path(base_entry["path"]) if hub_base is None else None
            tensors = dict(base_entry["tensors"])
        except (KeyError, TypeError) as error:
            raise ValueError(f"{manifest_path}: a malformed task-bank manifest ({type(error).__name__}: {error}).") from None
        if hub_base is not None:
            base_path = resolve_model(hub_base, token=token, cache_dir=cache_dir).folder
        repo = cached_repo(base_path)
        if not base_path.exists() and repo is not None:
            base_path = resolve_model(repo[0], revision=repo[1], token=token, cache_dir=cache_dir).folder
        if not base_path.exists():
            raise FileNotFoundError(
                f"The bank's base checkpoint {base_path} does not exist (the bank stores only its path)."
            )
        base = FolderSource(base_path, "task bank base")
        for key, entry in tensors.items():
            if not base.has(key):
                raise ValueError(f"The bank's base {base_path} has no tensor {key!r}; was it changed since compress?")
            meta = base.meta(key)
            if list(meta.shape) != entry["shape"] or _DTYPE_TO_NAME[meta.dtype] != entry["dtype"]:
                raise ValueError(
                    f"The bank's base {base_path} has {key!r} as {meta.shape} {meta.dtype}, but the bank was built "
                    f"for {tuple(entry['shape'])} {entry['dtype']}."
                )
        payload = FolderSource(folder / PAYLOAD_DIR, "task bank payload")
        if manifest["version"] == 1:
            warn(f"{manifest_path}: a version-1 task bank carries no integrity data (base fingerprint, task "
                          "names with the payload); save it again to add them.")
        else:
            if base_fingerprint(base) != base_entry.get("fingerprint"):
                raise ValueError(f"The bank's base {base_path} changed since the bank was written (its data no longer "
                                 "matches the fingerprint in task_bank.json): rebuilding tasks on it would be wrong.")
            for name, metadata in payload.file_metadata().items():
                stored = json.loads(metadata.get(_TASKS_METADATA, "null"))
                if stored != tasks:
                    raise ValueError(f"{manifest_path} lists the tasks {tasks}, but the payload {name} holds {stored}: "
                                     "the manifest was edited; restore the task order or compress again.")
        return cls(config, tasks, base, payload, base_embedded=embedded)


def _payload_layout(
    compressor: TaskCompressor, metas: Mapping[str, TensorMeta], infos: Mapping[str, ParamInfo], num_tasks: int
) -> dict[str, TensorMeta]:
    layout: dict[str, TensorMeta] = {}
    for key, meta in metas.items():
        if meta.dtype.is_floating_point:
            for part, part_meta in compressor.payload_layout(key, meta, infos[key], num_tasks).items():
                layout[f"{key}{_SEPARATOR}{part}"] = part_meta
    return layout


def _finish_bank(
    folder: Path,
    config: MergeConfig,
    tasks: Sequence[str],
    base: TensorSource,
    metas: Mapping[str, TensorMeta],
    *,
    embed_base: bool,
    max_shard_size: int | str,
    card: Any = None,
) -> None:
    """Everything of a bank folder but its payload: the embedded base (or its path), the manifest and the card
    (``card``: the user's :class:`~hf_merge.hub.provenance.CardMetadata`)."""
    if embed_base:
        (folder / BASE_DIR).mkdir()
        write_safetensors_shards(folder / BASE_DIR, metas, base.get, max_shard_size=max_shard_size)
        model_config = getattr(base.model, "config", None)
        if model_config is not None and hasattr(model_config, "save_pretrained"):
            model_config = copy.deepcopy(model_config)
            model_config.architectures = [type(base.model).__name__]  # so the rebuilt task is a model of this class
            model_config.save_pretrained(folder / BASE_DIR)
        elif base.folder is not None and (base.folder / "config.json").is_file():
            (folder / BASE_DIR / "config.json").write_bytes((base.folder / "config.json").read_bytes())
        base_path = None
    else:
        base_path = str(base.folder.absolute())
    manifest = {
        "format": BANK_FORMAT,
        "version": BANK_VERSION,
        "config": config.to_dict(),
        "tasks": list(tasks),
        "base": {
            "embedded": embed_base,
            "path": base_path,
            "tensors": {k: {"shape": list(m.shape), "dtype": _DTYPE_TO_NAME[m.dtype]} for k, m in metas.items()},
            "fingerprint": base_fingerprint(base),
        },
    }
    (folder / BANK_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    MergeRecord(config, _bank_inputs(base, tasks), artifact="task_bank",
                **({"card": card} if card is not None else {})).write_to(folder)


def _bank_inputs(base: TensorSource, tasks: Sequence[str]) -> dict[str, Any]:
    """What a bank's card knows of its inputs: the base's origin and the task names."""
    return {"base": base.origin, "models": dict.fromkeys(tasks)}


def base_fingerprint(base: TensorSource) -> str:
    """A hash of every base tensor's name, shape, dtype and :data:`_FINGERPRINT_BLOCKS` evenly spaced blocks of its
    data: changes when the base is replaced or modified (e.g. fine-tuned), without reading the whole checkpoint."""
    digest = hashlib.blake2b(digest_size=16)
    for key in sorted(base.keys()):  # sorted: a folder lists tensors in file order, a model in module order
        meta = base.meta(key)
        numel = math.prod(meta.shape)
        step = max(numel // _FINGERPRINT_BLOCKS, 1)
        starts = list(range(0, numel, step))[:_FINGERPRINT_BLOCKS]
        digest.update(f"{key}\x00{meta.shape}\x00{meta.dtype}\x00".encode())
        if numel:
            blocks = base.read_blocks(key, starts, min(_FINGERPRINT_BLOCK, numel)).contiguous()
            digest.update(blocks.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _tasks_metadata(tasks: Sequence[str]) -> dict[str, str]:
    """Safetensors metadata binding a payload to its task names, in the order of the parts' task indices."""
    return {_TASKS_METADATA: json.dumps(list(tasks))}


class _BankTask(DeltaSource):
    """Task ``name`` of a bank as an update of its base: τ̂ decoded per tensor."""

    def __init__(self, bank: TaskBank, name: str) -> None:
        super().__init__()
        self.bank, self.name = bank, name
        self.label = f"task bank task {name!r}"

    def delta(self, key: str, base: torch.Tensor) -> torch.Tensor:
        return self.bank.task_delta(self.name, key).to(base.device)


class BankSink(Sink):
    """Takes a compressor's encoded parts per tensor and builds a :class:`TaskBank`: streamed into ``output_dir``
    (payload shards written as parts arrive, in the shard plan's order) and opened from there, or held in memory."""

    description = "a task bank"
    unsupported_options = ("device_map", "max_memory", "offload_folder", "dtype")
    takes_encoded = True

    def __init__(self, compressor: TaskCompressor, base: TensorSource, tasks: Sequence[str], options: MergeOptions, *,
                 output_dir: str | os.PathLike | None = None, inputs: Sequence[Path] = (), card: Any = None) -> None:
        self.compressor, self.base, self.tasks = compressor, base, list(tasks)
        self.card = card  # the card metadata given to compress (role-keyed)
        self.output_dir = Path(output_dir).absolute() if output_dir is not None else None
        if self.output_dir is not None:
            check_output_dir(self.output_dir, inputs, overwrite=options.overwrite)  # before any work
        elif options.overwrite:
            options.reject(("overwrite",), f"The output, {self.description} held in memory (no output_dir),")
        self.inputs, self.overwrite = list(inputs), options.overwrite
        self.max_shard_size = options.max_shard_size or "5GB"
        self.embed_base = base.folder is None or base.model is not None
        self._stack = contextlib.ExitStack()
        self.pending: dict[str, torch.Tensor] = {}

    def begin(self, metas: Mapping[str, TensorMeta], infos: Mapping[str, ParamInfo], read_ahead: int) -> list[str]:
        self.metas = metas
        self.layout = _payload_layout(self.compressor, metas, infos, len(self.tasks))
        if self.output_dir is None:
            return [k for k, m in metas.items() if m.dtype.is_floating_point]
        self.plan = plan_shards(self.layout, max_shard_size=self.max_shard_size, metadata=_tasks_metadata(self.tasks))
        self.staging = self._stack.enter_context(publish_folder(self.output_dir, self.inputs,
                                                                overwrite=self.overwrite))
        (self.staging / PAYLOAD_DIR).mkdir()
        self.writer = ShardWriter(self.staging / PAYLOAD_DIR, self.plan)
        self.names = iter(self.plan.order)
        self.next_name = next(self.names, None)
        return list(dict.fromkeys(name.rsplit(_SEPARATOR, 1)[0] for name in self.plan.order))

    def put(self, key: str, value: Mapping[str, torch.Tensor]) -> None:
        for part, tensor in value.items():
            name = f"{key}{_SEPARATOR}{part}"
            self.pending[name] = tensor.to("cpu", self.layout[name].dtype).contiguous().clone()
        if self.output_dir is None:
            return
        while self.next_name is not None and self.next_name in self.pending:  # written in the plan's order
            self.writer.put(self.next_name, self.pending.pop(self.next_name))
            self.next_name = next(self.names, None)

    def finish(self, record: MergeRecord | None) -> TaskBank:
        config = self.compressor.config
        if self.output_dir is None:
            bank = TaskBank(config, self.tasks, self.base, StateDictSource(self.pending, "task bank payload"),
                            base_embedded=self.embed_base)
        else:
            self.writer.close()
            _finish_bank(self.staging, config, self.tasks, self.base, self.metas, embed_base=self.embed_base,
                         max_shard_size=self.max_shard_size, card=self.card)
            self._stack.close()
            bank = TaskBank.from_pretrained(self.output_dir)
        bank.card = self.card
        return bank

    def abort(self, error: BaseException) -> None:
        if hasattr(self, "writer"):
            self.writer.abort()
        self._stack.__exit__(type(error), error, error.__traceback__)
