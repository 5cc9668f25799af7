"""One progress bar per merge: every pass over the tensors (statistics passes, the merge itself) adds its count to the
bar's total and names itself in its description, so a merge shows a single bar however many passes its method runs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

Item = TypeVar("Item")


class Progress:
    """The bar of one merge (created on first use; nothing is shown when ``enabled`` is false)."""

    def __init__(self, enabled: bool, unit: str = "tensor") -> None:
        self.enabled, self.unit = enabled, unit
        self.bar: Any = None

    def track(self, items: Sequence[Item], desc: str) -> Iterator[Item]:
        """``items`` one by one, each advancing the bar, which shows ``desc`` meanwhile."""
        if not self.enabled:
            yield from items
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=0, unit=self.unit, dynamic_ncols=True)
        self.bar.total += len(items)
        self.bar.set_description(desc, refresh=True)
        for item in items:
            yield item
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

