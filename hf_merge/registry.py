"""Method registry: method name -> (config class, merger class), like PEFT's ``PeftType`` mappings.

Adding a method is one file in ``hf_merge/methods/`` plus one :func:`register_method` call in it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import MergeConfig
    from .methods.base import Merger

MERGE_METHODS: dict[str, tuple[type[MergeConfig], type[Merger]]] = {}


def register_method(config_cls: type[MergeConfig], merger_cls: type[Merger]) -> None:
    """Register ``config_cls`` (whose ``method`` default is the name) with its ``merger_cls``."""
    name = config_cls.method_name()
    if not name:
        raise ValueError(f"{config_cls.__name__} has no method name.")
    MERGE_METHODS[name] = (config_cls, merger_cls)
    merger_cls.config_class = config_cls


def _load_builtin_methods() -> None:
    from . import methods, stack  # noqa: F401  (importing them registers every built-in method; stack: passthrough)


def data_aware_methods() -> list[str]:
    """The registered methods whose merger runs the models on the tasks' data (``Merger.uses_data``)."""
    _load_builtin_methods()
    return sorted(name for name, (_, merger_cls) in MERGE_METHODS.items() if getattr(merger_cls, "uses_data", False))


def config_class(method: str) -> type[MergeConfig]:
    _load_builtin_methods()
    try:
        return MERGE_METHODS[method][0]
    except KeyError:
        from .config import did_you_mean

        raise ValueError(f"Unknown merge method {method!r}{did_you_mean(method, MERGE_METHODS)}; "
                         f"available: {sorted(MERGE_METHODS)}.") from None


def make_config(config: MergeConfig | str, **overrides: Any) -> MergeConfig:
    """A config instance from a config or a method name, with keyword overrides applied and validated."""
    from .config import MergeConfig

    if isinstance(config, str):
        config_cls = config_class(config)
    elif isinstance(config, MergeConfig):
        config_cls = type(config)
    else:
        raise TypeError(f"config must be a MergeConfig or a method name, got {type(config).__name__}.")
    MergeConfig._check_keys(config_cls, overrides,
                            f"Unknown parameter(s) {{unknown}} for method {config_cls.method_name()!r}")
    if isinstance(config, str):
        return config_cls(**overrides)
    return config.replace(**overrides) if overrides else config


def get_merger(config: MergeConfig | str, **overrides: Any) -> Merger:
    """The :class:`~hf_merge.methods.base.Merger` that carries out ``config``."""
    config = make_config(config, **overrides)
    _load_builtin_methods()
    merger_class = MERGE_METHODS[config.method][1]
    if config.has_schedules():  # resolved per tensor by the engine; the method sees plain configs only
        from .methods.base import ScheduledMerger

        return ScheduledMerger(config, merger_class)
    return merger_class(config)
