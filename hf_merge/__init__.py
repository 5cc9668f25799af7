"""hf_merge: model merging for the Hugging Face ecosystem, with a PEFT-style API.

Public names are imported lazily (PEP 562) so that ``import hf_merge`` stays fast; transformers, peft and accelerate
are imported only by the code paths that need them. Importing hf_merge attaches ``PreTrainedModel.merge_with``
(see :mod:`hf_merge.integration`).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from .integration import install as _install_merge_with

__version__ = "0.1.0"

_EXPORTS = {
    "merge": "api",
    "compress": "api",
    "merge_adapters": "api",
    "extract_lora": "extract",
    "MergeError": "errors",
    "MergeContext": "context",
    "MergeOptions": "options",
    "TaskData": "data",
    "MethodCard": "config",
    "SearchSpace": "config",
    "MergeConfig": "config",
    "Schedule": "schedules",
    "read_recipe": "mergekit",
    "stack_layers": "stack",
    "MERGE_METHODS": "registry",
    "get_merger": "registry",
    "register_method": "registry",
    "Merger": "methods.base",
    "AverageConfig": "methods.average",
    "TaskArithmeticConfig": "methods.task_arithmetic",
    "TiesConfig": "methods.ties",
    "DareConfig": "methods.dare",
    "TaskVector": "task_vector",
    "ParamKind": "params",
    "ParamInfo": "params",
    "classify_parameters": "params",
    "merge_with": "integration",
    "ATMConfig": "training.config",
    "ATMTrainer": "training.atm",
    "PermutationSpec": "permutation",
    "validate_spec": "permutation",
    "weight_matching": "permutation",
    "c2m3": "permutation",
    "repair": "permutation",
    "search": "search",
    "check": "check",
    "CheckReport": "check",
    "SearchResult": "search",
    "TaskBank": "bank",
    "TaskCompressor": "methods.base",
    "MergedAdapter": "io.adapter_sink",
    "assemble_moe": "moe",
    "read_moe_recipe": "moe",
    "MoEConfig": "moe",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        if name == "MERGE_METHODS":
            importlib.import_module(".methods", __name__)
        value = getattr(module, name)
    elif name.endswith("Config"):  # every registered method's config, e.g. hf_merge.TSVMergeConfig
        from .registry import MERGE_METHODS, _load_builtin_methods

        _load_builtin_methods()
        value = next((cfg for cfg, _ in MERGE_METHODS.values() if cfg.__name__ == name), None)
        if value is None:
            raise AttributeError(f"module 'hf_merge' has no attribute {name!r}")
    else:
        raise AttributeError(f"module 'hf_merge' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


class _Package(types.ModuleType):
    """``hf_merge.search`` is the function: importing the submodule of the same name (``from hf_merge.search import
    SearchResult``) does not rebind it to the module, which stays in ``sys.modules``."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
_install_merge_with()
