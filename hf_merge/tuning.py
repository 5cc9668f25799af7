"""Tuning constants of the streaming routes, in one object that tests (and experts) set.

The streaming values were measured on the 468M-parameter merge benchmark (``benchmarks/bench_merge_io.py``) and
change no result, only how work is split (the routes give the same bits for any value); the linear-algebra
thresholds choose between exact routes, each within the tested error bound.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Tuning:
    #: Elements per piece of the fused linear combination: the float32 accumulator plus one piece per input stay in
    #: the CPU cache (2²⁰ about 3× faster than 2¹⁶ and than 2²²).
    combine_chunk: int = 1 << 20
    #: Elements per piece of the linear combination on a GPU: each input's piece crosses to it once (page-locked, on
    #: a copy stream), large enough that kernel launches do not dominate, small enough that an embedding's inputs
    #: never all sit in GPU memory at once (not tuned: no GPU was available).
    device_chunk: int = 1 << 24
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
    #: Top-k SVD (:func:`hf_merge.linalg.top_k_svd`): λ_k/λ_1 of the Gram matrix above which its float32
    #: eigendecomposition is accurate (≤ 5e-6 measured), and above which the float64 one is; below both, a full SVD.
    eigh_fast_min_ratio: float = 1e-3
    eigh_double_min_ratio: float = 1e-10
    #: Polar factor (:func:`hf_merge.linalg.polar`): λ_min/λ_max of AᵀA above which the float32 Gram route is used
    #: (error ≲ κ·eps ≈ 1e-5); the Cholesky 1-norm rcond estimate of AᵀA (measured ≤ 20× below λ_min/λ_max) from
    #: which that route is tried; the error estimate (an upper bound, measured) up to which the float32 SVD's polar
    #: factor is kept before a float64 SVD.
    polar_fast_min_ratio: float = 1e-2
    polar_probe_min_rcond: float = 1e-4
    svd_polar_max_error: float = 1e-4


#: The values in force. Tests change them with ``monkeypatch.setattr(TUNING, "combine_chunk", 7)``.
TUNING = Tuning()
