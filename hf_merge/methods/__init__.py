"""Merge methods: one module per method, each holding its ``*Config``, its pure tensor functions and its ``Merger``.

Importing this package imports every module in it, and each module registers its method with
:func:`hf_merge.registry.register_method` — adding a method is adding one file here.
"""

import importlib
import pkgutil

from .base import Merger, ModelMerger

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Merger", "ModelMerger"]
