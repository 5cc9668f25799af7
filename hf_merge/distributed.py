"""Merges split across processes: ``torchrun -m hf_merge merge ...``, ``accelerate launch -m hf_merge merge ...``, or
``hf_merge.merge(...)`` in a script where ``torch.distributed`` is initialised.

Each rank merges a disjoint, size-balanced set of output tensors (:func:`split_keys`) and reads only those from the
inputs. Whole-model statistics (TIES' thresholds and majority sign, LiNeS α) are reduced with collectives
(:class:`Ranks`), exactly: integer counts are summed, float sums are added in the single-process key order, so the
result is bit-identical to a one-process merge. The collectives run on a gloo group (CPU tensors), also next to NCCL.

Every collective starts with an exchange of each rank's status; a rank that fails takes part in that exchange once
with its error (:meth:`Ranks.fail`), and every other rank raises :class:`RankFailed` at its next collective: no rank
waits for one that is gone, and the output is aborted everywhere.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import MergeError
from .tensors import TensorMeta


class RankFailed(MergeError):
    """Another process of a distributed merge failed; this one stopped too."""


@dataclasses.dataclass
class Ranks:
    """The processes of one merge: this one's ``rank`` among ``world_size``, and the gloo ``group`` of the merge's
    collectives (``None``: the default group). One process (the default) makes every collective the identity."""

    rank: int = 0
    world_size: int = 1
    group: Any = None
    #: Set once this process reported a failure (or a collective broke): no further collective is entered.
    stopped: bool = False

    @property
    def split(self) -> bool:
        return self.world_size > 1

    def _exchange_status(self, error: BaseException | None) -> None:
        """Every rank's status; raise :class:`RankFailed` naming the first other rank that failed."""
        import torch.distributed as dist

        statuses: list[str | None] = [None] * self.world_size
        mine = None if error is None else f"{type(error).__name__}: {error}"
        try:
            dist.all_gather_object(statuses, mine, group=self.group)
        except Exception:
            self.stopped = True
            raise
        failed = [(rank, status) for rank, status in enumerate(statuses) if status is not None and rank != self.rank]
        if failed and error is None:
            self.stopped = True
            rank, status = failed[0]
            raise RankFailed(f"process {rank} of {self.world_size} failed ({status}); this one (rank {self.rank}) "
                             "stopped and wrote nothing.")

    def _collective(self) -> None:
        if self.stopped:
            raise RankFailed(f"rank {self.rank} already stopped: no further collective.")
        self._exchange_status(None)

    def sync(self) -> None:
        """Wait for every rank (a barrier that also learns of any rank's failure)."""
        if self.split:
            self._collective()

    def fail(self, error: BaseException) -> None:
        """Tell the other ranks this one failed with ``error`` (once; not for a failure learnt from them)."""
        if not self.split or self.stopped or isinstance(error, RankFailed):
            return
        self.stopped = True
        try:
            self._exchange_status(error)
        except Exception:  # the group itself broke: the other ranks see their collective fail
            pass

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Σ over ranks of ``tensor`` (exact for integer tensors), on ``tensor``'s device."""
        if not self.split:
            return tensor
        import torch.distributed as dist

        self._collective()
        total = tensor.detach().to("cpu", copy=True)
        dist.all_reduce(total, group=self.group)
        return total.to(tensor.device)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), by rank."""
        if not self.split:
            return [value]
        import torch.distributed as dist

        self._collective()
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.group)
        return values

    def broadcast(self, tensor: torch.Tensor, source: int) -> None:
        """``tensor`` (CPU) of rank ``source`` into ``tensor`` on every rank."""
        if not self.split:
            return
        import torch.distributed as dist

        self._collective()
        if tensor.numel():  # as bytes: any dtype
            dist.broadcast(tensor.view(-1).view(torch.uint8), src=_global_rank(self.group, source), group=self.group)

    def ordered_sum(self, values: Mapping[str, float], order: Sequence[str]) -> float:
        """Σ of every rank's ``{key: value}``, added one by one in ``order`` (the bits a single process gets)."""
        merged: dict[str, float] = {}
        for part in self.gather(dict(values)):
            merged.update(part)
        total = 0.0
        for key in order:
            total += merged[key]
        return total

    def combined_statistics(self, statistics: dict[str, float] | None, elements: int) -> dict[str, float] | None:
        """The merge's statistics from each rank's (fractions over the ``elements`` it merged): the same on every
        rank, or each name's mean over the ranks weighted by their elements."""
        if not self.split:
            return statistics
        parts = self.gather((statistics, elements))
        reported = [(s, n) for s, n in parts if s]
        if not reported:
            return None
        if all(s == reported[0][0] for s, _ in reported):
            return reported[0][0]
        names = dict.fromkeys(name for s, _ in reported for name in s)
        return {name: sum(s[name] * n for s, n in reported if name in s)
                / max(sum(n for s, n in reported if name in s), 1) for name in names}


#: One process: every collective is the identity.
SINGLE = Ranks()


def _global_rank(group: Any, rank: int) -> int:
    import torch.distributed as dist

    return rank if group is None else dist.get_global_rank(group, rank)


_GLOO_GROUPS: dict[int, Any] = {}


def _merge_group() -> Any:
    """The group of the merge's CPU collectives: the default one when it runs gloo, else a gloo group made once."""
    import torch.distributed as dist

    default = dist.group.WORLD
    if dist.get_backend() == "gloo":
        return None
    if id(default) not in _GLOO_GROUPS:
        _GLOO_GROUPS[id(default)] = dist.new_group(backend="gloo")
    return _GLOO_GROUPS[id(default)]


def ranks_for(option: bool | None, output_splits: bool, output: str) -> Ranks:
    """The processes a merge is split across: every process of an initialised ``torch.distributed`` unless
    ``option`` is ``False``, or the output cannot be split (then each process merges everything; ``option=True``
    raises instead)."""
    if option is False:
        return SINGLE
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    if not initialised or dist.get_world_size() == 1:
        if option:
            raise ValueError("distributed=True, but torch.distributed is not initialised with more than one process: "
                             "launch with torchrun or accelerate launch (or init_process_group first).")
        return SINGLE
    if not output_splits:
        if option:
            raise ValueError(f"{output} cannot be split across processes (distributed=True); write a checkpoint "
                             "folder or an in-memory model, or pass distributed=False.")
        return SINGLE
    return Ranks(dist.get_rank(), dist.get_world_size(), _merge_group())


def split_keys(metas: Mapping[str, TensorMeta], world_size: int) -> dict[str, int]:
    """``{key: rank}``: each tensor to the least loaded rank, largest first (ties: the lower rank), so every rank
    reads and writes about 1/N of the bytes."""
    loads = [0] * world_size
    owners: dict[str, int] = {}
    for key in sorted(metas, key=lambda k: -metas[k].nbytes):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[key] = rank
        loads[rank] += metas[key].nbytes
    return {key: owners[key] for key in metas}


def init_from_environment() -> bool:
    """Initialise ``torch.distributed`` from a launcher's environment (``WORLD_SIZE`` > 1, as ``torchrun`` and
    ``accelerate launch`` set it) when nothing did yet: gloo for CPU tensors, NCCL for CUDA ones where torch has
    CUDA. Returns whether it initialised the group (the caller then destroys it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True
