"""Training procedures built on merging: ATM (Alternating Tuning and Merging).

``ATMConfig`` imports without transformers; ``ATMTrainer`` (a ``transformers.Trainer``) imports it on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"ATMConfig": "config", "ATMTrainer": "atm"}

__all__ = ["ATMConfig", "ATMTrainer"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hf_merge.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
