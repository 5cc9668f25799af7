"""Overlap reading with merging: load the inputs of the next tensor in a background thread.

Reads (``os.preadv``) and torch kernels release the GIL, so while the main thread merges (or writes) tensor i, one
worker reads (or merges) tensor i + 1. Extra memory is ``depth`` tensors per input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")


class Prefetcher(Generic[T]):
    """``get(key)`` returns ``load(key)``, loading the next ``depth`` keys of ``order`` ahead of time."""

    def __init__(self, load: Callable[[str], T], order: Sequence[str] = (), depth: int = 1) -> None:
        self._load = load
        self._depth = depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_merge-prefetch")
        self._pending: dict[str, Future[T]] = {}
        self.set_order(order)

    def set_order(self, order: Sequence[str]) -> None:
        self._order = list(order)
        self._position = {key: i for i, key in enumerate(self._order)}

    def get(self, key: str) -> T:
        """``load(key)``; every load runs on the one worker thread, in request order, so loads never overlap."""
        future = self._pending.pop(key, None)
        if future is None:
            future = self._pool.submit(self._load, key)
        index = self._position.get(key)
        if index is not None:
            for upcoming in self._order[index + 1 : index + 1 + self._depth]:
                if upcoming not in self._pending:
                    self._pending[upcoming] = self._pool.submit(self._load, upcoming)
        return future.result()

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
