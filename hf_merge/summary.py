"""The one-screen summary of a merge: what was merged, by which route, how much was read and written, how long it
took. The engine fills it in; it is logged (and printed with progress bars on) and stored in ``merge_config.json``."""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from collections.abc import Mapping
from typing import Any

from .tensors import TensorMeta

logger = logging.getLogger("hf_merge")


@dataclasses.dataclass
class MergeSummary:
    """``route``: how the engine merged (``"one pass"``, ``"Gram"``, ``"linear"``, ``"low rank"``, ``"per tensor"``,
    ``"encoded"``, ``"whole models"``); ``input_bytes``: the stored size of every input; ``output_bytes``: of the
    output; ``seconds``: wall time from the start of the run to the sink's last tensor."""

    method: str
    inputs: int
    tensors: int
    input_bytes: int
    output_bytes: int
    route: str = ""
    seconds: float = 0.0
    #: The vocabulary the output has when the inputs' were reconciled: ``{"tokenizer_source", "rows"}``.
    vocabulary: dict[str, Any] | None = None
    #: What the method measured (:meth:`~hf_merge.methods.base.Merger.statistics`), e.g. TIES' kept fraction.
    statistics: dict[str, float] | None = None
    #: On a merge split across processes: the bytes of the inputs each rank read, by rank.
    rank_input_bytes: list[int] | None = None
    started: float = dataclasses.field(default_factory=time.perf_counter, repr=False)

    @classmethod
    def of(cls, method: str, inputs: int, metas: Mapping[str, TensorMeta],
           out_metas: Mapping[str, TensorMeta]) -> MergeSummary:
        return cls(method, inputs, len(metas), inputs * sum(m.nbytes for m in metas.values()),
                   sum(m.nbytes for m in out_metas.values()))

    def split(self, world_size: int, owners: Mapping[str, int], metas: Mapping[str, TensorMeta]) -> None:
        """The merge runs on ``world_size`` processes, rank ``owners[key]`` merging ``key``."""
        per_rank = [0] * world_size
        for key, rank in owners.items():
            per_rank[rank] += metas[key].nbytes * self.inputs
        self.rank_input_bytes = per_rank

    def finish(self, route: str) -> None:
        self.route, self.seconds = route, time.perf_counter() - self.started

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "inputs": self.inputs, "tensors": self.tensors, "route": self.route,
                "input_bytes": self.input_bytes, "output_bytes": self.output_bytes,
                "seconds": round(self.seconds, 3), **({"vocabulary": self.vocabulary} if self.vocabulary else {}),
                **({"statistics": self.statistics} if self.statistics else {}),
                **({"rank_input_bytes": self.rank_input_bytes} if self.rank_input_bytes else {})}

    def __str__(self) -> str:
        rate = self.input_bytes / self.seconds / 1e9 if self.seconds > 0 else math.inf
        return (f"hf_merge: merged {self.inputs} inputs with {self.method} ({self.route} route): {self.tensors} tensors, "
                f"{self.input_bytes / 1e9:.2f} GB read, {self.output_bytes / 1e9:.2f} GB written, "
                f"{self.seconds:.1f} s ({rate:.2f} GB/s of input)"
                + (f" on {len(self.rank_input_bytes)} processes (the largest share "
                   f"{max(self.rank_input_bytes) / 1e9:.2f} GB)" if self.rank_input_bytes else "")
                + "".join(f"; {name.replace('_', ' ')} {value:.4g}" for name, value in (self.statistics or {}).items()))

    def report(self, progress: bool) -> None:
        """Log the summary; also print it (to stderr) when progress bars are on."""
        logger.info(str(self))
        if progress:
            print(str(self), file=sys.stderr)
