"""What a merger sees: the validated inputs of one merge, read one tensor at a time in float32 on the compute device.

The engine builds one :class:`MergeContext` per run (from :mod:`hf_merge.inputs`); methods read base tensors and task
vectors through it, in their statistics passes (:meth:`MergeContext.iter_deltas`) and per tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from .data import TaskData, TaskModels, check_task_data
from .distributed import SINGLE, Ranks
from .errors import MergeError
from .io.deltas import DeltaSource
from .io.prefetch import Prefetcher
from .io.sources import TensorSource
from .kernels import fused_gram, fused_linear_combine, fused_load_task_vectors
from .params import ParamInfo
from .progress import Progress
from .tensors import TensorMeta, check_output_finite, numpy_view
from .tuning import TUNING


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
        merge_keys: Sequence[str] | None = None,
        tracker: Progress | None = None,
        data: Mapping[str, TaskData] | None = None,
        ranks: Ranks = SINGLE,
        owners: Mapping[str, int] | None = None,
    ) -> None:
        self.base = base
        self.tasks = dict(tasks)
        self.task_names = list(self.tasks)
        self.infos = infos
        self.metas = metas
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.progress = progress
        #: The merge's one progress bar, shared by every pass (and every view of this context).
        self.tracker = tracker if tracker is not None else Progress(progress)
        self._transforms = transforms
        self.prefetch_depth = prefetch_depth
        #: Every key the statistics passes cover, across all processes of a distributed merge.
        self.all_keys = (list(merge_keys) if merge_keys is not None
                         else [k for k, m in metas.items() if m.dtype.is_floating_point])
        #: The processes the merge is split across and ``{key: rank}`` of who merges what (``None``: this process
        #: merges every key); :attr:`owned`: this process's keys. The statistics passes then read only those, and
        #: reduce what they measure with :meth:`all_sum` and :meth:`ordered_sum`
        #: (see :attr:`~hf_merge.methods.base.Merger.reduces_across_ranks`).
        self.ranks, self.owners = ranks, owners
        self.owned = None if owners is None else frozenset(k for k, rank in owners.items() if rank == ranks.rank)
        #: The keys this process's statistics passes cover (:meth:`iter_deltas`).
        self.merge_keys = self.all_keys if self.owned is None else [k for k in self.all_keys if k in self.owned]
        self.output_dtypes = output_dtypes
        self.bounded_memory = bounded_memory
        #: ``{task: TaskData}`` given to the merge (``merge(data=...)``), for data-aware methods.
        self.data = data
        self._copy_stream: torch.cuda.Stream | None = None  # host-to-GPU copies (made on first use)

    @property
    def plain_differences(self) -> bool:
        """Whether every task vector is a plain difference of stored tensors computed on the CPU (no transforms, no
        LoRA factors): the stored inputs' flat arrays then give them (see :meth:`Merger.merge_stored`)."""
        return (self.device.type == "cpu" and not self._transforms
                and not any(isinstance(s, DeltaSource) for s in self.tasks.values()))

    @property
    def can_merge_in_one_pass(self) -> bool:
        """Whether a merger may merge reading every input once (:attr:`Merger.one_pass`): the engine gave the output
        dtypes, memory is not budgeted (what the pass leaves open is held until its end), the compute device is the
        CPU, every task vector is a plain difference of stored tensors (no transforms, no LoRA factors), and on a merge
        split across processes the merger reduces its statistics (:attr:`owned` is set)."""
        return (self.output_dtypes is not None and not self.bounded_memory and self.plain_differences
                and (self.owned is not None or not self.ranks.split))

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Σ over the processes of a statistic ``tensor`` counted on this one's keys (exact for integers); itself
        when the statistics passes cover every key."""
        return tensor if self.owned is None else self.ranks.sum(tensor)

    def ordered_sum(self, values: Mapping[str, float]) -> float:
        """Σ of a per-key float statistic (``{key: value}`` over :attr:`merge_keys`), added in the key order of a
        one-process merge whatever the split: the same bits."""
        if self.owned is not None:
            return self.ranks.ordered_sum(values, self.all_keys)
        total = 0.0
        for key in self.all_keys:
            total += values[key]
        return total

    def with_transform(self, transform: Callable[[str, str, torch.Tensor], torch.Tensor]) -> MergeContext:
        """A view whose task vectors pass through ``transform(task_name, key, delta)`` (e.g. DARE's drop)."""
        return self._view(transforms=(*self._transforms, transform))

    def nested(self) -> MergeContext:
        """The view a merger wrapped by another one (LiNeS, Consensus) prepares with: it merges tensor by tensor for
        its wrapper, so it never merges in one pass of its own (:attr:`can_merge_in_one_pass` is false)."""
        return self._view(output_dtypes=None)

    def unsplit(self) -> MergeContext:
        """A view whose statistics passes cover every key, also on a split run (each process reads them all)."""
        return self._view(owners=None)

    def restricted(self, keys: Sequence[str]) -> MergeContext:
        """A :meth:`nested` view whose statistics passes (:meth:`iter_deltas`) cover ``keys`` only."""
        return self._view(output_dtypes=None, merge_keys=keys)

    def _view(self, **changes: Any) -> MergeContext:
        settings = dict(device=self.device, progress=self.progress, transforms=self._transforms,
                        prefetch_depth=self.prefetch_depth, output_dtypes=self.output_dtypes,
                        bounded_memory=self.bounded_memory, merge_keys=self.all_keys, tracker=self.tracker,
                        data=self.data, ranks=self.ranks, owners=self.owners)
        return MergeContext(self.base, self.tasks, self.infos, self.metas, **{**settings, **changes})

    def task_models(self, method: str) -> TaskModels:
        """The forward passes of a data-aware ``method`` over every task's data (refused when a task has none)."""
        return TaskModels(self.base, self.tasks, check_task_data(self.data, self.task_names, method), self.device,
                          method)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A CPU tensor on the compute device in float32. To a CUDA device it goes through page-locked memory on a
        copy stream of its own, so that the read-ahead thread's copies overlap the merge's kernels on the default
        stream; the copy is complete on return, and the memory is recorded as used by the default stream (the
        caching allocator then never hands it to a later copy while a kernel still reads it)."""
        if self.device.type != "cuda":
            return tensor.to(self.device, torch.float32)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        pinned = tensor.pin_memory()
        with torch.cuda.stream(self._copy_stream):
            moved = pinned.to(self.device, non_blocking=True).float()
        self._copy_stream.synchronize()
        moved.record_stream(torch.cuda.default_stream(self.device))
        return moved

    def _load(self, source: TensorSource, key: str) -> torch.Tensor:
        tensor = self._to_device(source.get(key))
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
            if isinstance(source, DeltaSource):  # e.g. LoRA: ΔW straight from the factors
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
        """``(θ₀, [τ_t])`` of ``key`` in float32 on the compute device: plain differences of stored tensors on the CPU
        in one compiled pass (:func:`hf_merge.kernels.fused_load_task_vectors`) where it runs."""
        if self.tasks and self.plain_differences:
            fused = fused_load_task_vectors([s.flat_array(key) for s in (self.base, *self.tasks.values())])
            if fused is not None:
                shape = self.metas[key].shape
                base, deltas = fused
                return base.view(shape), [delta.view(shape) for delta in deltas]
        base = self.base_tensor(key)
        return base, self.deltas(key, base)

    def gram(self, key: str) -> torch.Tensor:
        """The float64 Gram matrix of [θ₀, τ_1, ..., τ_T] of ``key`` (τ_t = θ_t − θ₀ rounded to float32), in one read of
        each input: the compiled kernel (:func:`hf_merge.kernels.fused_gram`) on the CPU, else chunk by chunk."""
        sources = [self.base, *self.tasks.values()]
        fused = fused_gram([s.meta(key).dtype for s in sources]) if self.device.type == "cpu" else None
        if fused is not None:
            return torch.from_numpy(fused([source.flat_array(key) for source in sources]))
        total = torch.zeros(len(sources), len(sources), dtype=torch.float64, device=self.device)
        for pieces in zip(*(source.iter_chunks(key, TUNING.combine_chunk) for source in sources)):
            base = self._to_device(pieces[0])
            rows = torch.stack([base, *(self._to_device(piece) - base for piece in pieces[1:])])
            rows = rows.double()
            total += rows @ rows.T
        return total.cpu()

    def combine(self, key: str, coefficients: Sequence[float], dtype: torch.dtype,
                out: torch.Tensor | None = None, base_scale: float = 1.0) -> torch.Tensor:
        """s·θ₀ + Σ_t c_t (θ_t − θ₀) of ``key`` in ``dtype`` (s = 1 by default), on the CPU (into ``out`` if given): each
        difference rounded to float32, then one fused multiply-add per task, in input order.

        The inputs stream in pieces of :attr:`~hf_merge.tuning.Tuning.combine_chunk` elements (on a GPU,
        :attr:`~hf_merge.tuning.Tuning.device_chunk`, each piece crossing once) through one float32 accumulator on the
        compute device, so each input is read once and the output written once (no full-size float32 temporaries);
        on the CPU the compiled kernel (:func:`hf_merge.kernels.fused_linear_combine`) gives the same bits. A
        non-finite piece is traced to the input that holds it.
        """
        sources = [self.base, *self.tasks.values()]
        on_cpu = self.device.type == "cpu"
        if out is None:
            out = torch.empty(self.metas[key].shape, dtype=dtype)
        flat_out = out.view(-1)
        fused = (fused_linear_combine([s.meta(key).dtype for s in sources], dtype)
                 if on_cpu and len(sources) > 1 else None)
        if fused is not None:
            # one fused compiled loop, reading checkpoint tensors through a mapping: the same bits as below
            arrays = [source.flat_array(key) for source in sources]
            if fused(arrays, list(coefficients), numpy_view(flat_out), base_scale):
                return out
            # a non-finite result: the torch route below names the input holding NaN/Inf, or the overflow
        chunk = TUNING.combine_chunk if on_cpu else TUNING.device_chunk
        size = min(flat_out.numel(), chunk)
        accumulator, base_buffer, difference_buffer = (torch.empty(size, dtype=torch.float32, device=self.device)
                                                       for _ in range(3))
        start = 0
        for pieces in zip(*(source.iter_chunks(key, chunk) for source in sources)):
            n = pieces[0].numel()
            acc, base, difference = accumulator[:n], base_buffer[:n], difference_buffer[:n]
            on_device = pieces if on_cpu else [self._to_device(piece) for piece in pieces]
            base.copy_(on_device[0])
            acc.copy_(base)
            if base_scale != 1.0:
                acc.mul_(base_scale)
            for piece, weight in zip(on_device[1:], coefficients):
                acc.add_(torch.sub(difference.copy_(piece), base, out=difference), alpha=weight)
            self.check_finite(acc, sources, key, pieces)
            check_output_finite(key, flat_out[start : start + n].copy_(acc), acc)
            start += n
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
        with self.prefetcher(self.merge_keys) as prefetcher:
            for key in self.tracker.track(self.merge_keys, desc):
                base, deltas = prefetcher.get(key)
                yield key, base, deltas
