"""Validation grids as the papers' code writes them (``numpy.linspace``/``arange``), rounded to 10 decimals so that
grid values carry no float drift. Each method's config names its own grid (:meth:`~hf_merge.MergeConfig.search_space`).
"""

from __future__ import annotations

import math


def linspace_tail(stop: float, num: int) -> tuple[float, ...]:
    """``linspace(0, stop, num)[1:]`` rounded to 10 decimals (a paper's grid without the zero)."""
    return tuple(round(stop * i / (num - 1), 10) for i in range(1, num))


def arange(start: float, stop: float, step: float) -> tuple[float, ...]:
    """``arange(start, stop, step)`` with decimal rounding (no float drift in the grid values)."""
    count = math.floor((stop - start) / step + 1e-9) + 1
    values = tuple(round(start + i * step, 10) for i in range(count))
    return tuple(v for v in values if v < stop - 1e-12)
