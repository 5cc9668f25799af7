"""Tuning constants of the streaming routes, in one object that tests (and experts) set.

Each value was measured on the 468M-parameter merge benchmark (``benchmarks/bench_merge_io.py``); none changes a
result, only how work is split: the routes give the same bits for any value.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Tuning:
    #: Elements per piece of the fused linear combination: the float32 accumulator plus one piece per input stay in
    #: the CPU cache (2²⁰ about 3× faster than 2¹⁶ and than 2²²).
    combine_chunk: int = 1 << 20
    #: Elements per chunk of TIES' elementwise merge (bounds temporaries for embedding-sized tensors).
    ties_chunk: int = 1 << 22
    #: Elements per piece of the one-pass TIES torch route (T + 1 pieces and temporaries stay in L3).
    ties_piece: int = 1 << 17
    #: Elements per call of the compiled one-pass TIES kernel (bounds its scratch buffers).
    ties_kernel_block: int = 1 << 20
    #: TIES' bracketing sample: one block of ``ties_sample_block`` elements in every ``ties_sample_every`` blocks
    #: (~0.5M values per task of a 0.5B model leave ~3K entries open; a 4× denser sample takes twice as long).
    ties_sample_block: int = 1024
    ties_sample_every: int = 1024
    #: Input bytes the engine streams between returns of freed memory to the operating system (glibc malloc_trim).
    release_every: int = 256 << 20


#: The values in force. Tests change them with ``monkeypatch.setattr(TUNING, "combine_chunk", 7)``.
TUNING = Tuning()
