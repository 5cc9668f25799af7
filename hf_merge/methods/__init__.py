"""Merge methods: one module per method, each holding its ``*Config`` (with its search space and model-card text),
its pure tensor functions and its ``Merger``; a few helper modules (``grids``, ``ties_statistics``, ``ties_one_pass``)
split what one method needs.

Importing this package imports every module in it, and each method's module registers it with
:func:`hf_merge.registry.register_method` — adding a method is adding one file here.
"""

import importlib
import pkgutil

from .base import Merger, ModelMerger

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Merger", "ModelMerger"]
