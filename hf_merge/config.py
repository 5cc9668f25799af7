"""PEFT-style merge configurations.

Every merge method has one ``*Config`` dataclass. It carries a ``method`` field naming the method, validates
its values in ``__post_init__``, and round-trips through ``merge_config.json`` with
``save_pretrained``/``from_pretrained`` — the same shape as ``peft.LoraConfig``. A config also declares what its
method offers around the merge itself: the coefficient search space (:meth:`MergeConfig.search_space`) and the
model-card metadata (:attr:`MergeConfig.card`).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .params import ParamInfo

CONFIG_NAME = "merge_config.json"
#: The ``merge_config.json`` entry in which a merge records its Hub inputs (:mod:`hf_merge.record`); not a config field.
INPUTS_KEY = "inputs"
#: Where ``merge_config.json`` keeps the merge's one-screen summary (route, sizes, time), next to the config.
SUMMARY_KEY = "summary"
#: What ``merge_config.json`` holds besides the config (skipped when a config is read back).
RECORD_KEYS = (INPUTS_KEY, SUMMARY_KEY)
#: How a merged model depends on a searched coefficient c: ``"linear"`` θ(c) = θ₀ + c·Δ (one merge for a whole grid),
#: ``"affine"`` θ(c) = θ(0) + c·(θ(1) − θ(0)) (two merges), ``"per_task"`` chosen per task on that task's model, or
#: ``"rerun"`` (one merge per grid value).
COEFFICIENT_KINDS = ("linear", "affine", "per_task", "rerun")


@dataclasses.dataclass(frozen=True)
class MethodCard:
    """What a model card says about a method: its name, a paragraph on what it does, how to cite it, and the card
    template of its models in ``hf_merge/model_cards/`` (``None``: the merged-model template)."""

    title: str
    summary: str
    bibtex: str | None = None
    paper_url: str | None = None
    template: str | None = None


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """A coefficient to choose on validation data: the (dotted, for nested configs) ``parameter``, the paper's grid
    ``values`` and the ``kind`` of dependence (one of :data:`COEFFICIENT_KINDS`)."""

    parameter: str
    values: tuple[Any, ...]
    kind: str = "rerun"

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, COEFFICIENT_KINDS)


class _BuiltOnce(type):
    """Marks every instance as built once its ``__init__`` (and ``__post_init__``) returned: from then on it is
    immutable."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        from .schedules import contains_schedule, probes

        if not any(contains_schedule(value) for value in (*args, *kwargs.values())):
            instance = super().__call__(*args, **kwargs)
        else:  # validated at every point of every schedule; the instance then holds the schedules themselves
            values = dict(inspect.signature(cls.__init__).bind(None, *args, **kwargs).arguments)
            values.pop(next(iter(values)))  # self
            scheduled = {name: value for name, value in values.items() if contains_schedule(value)}
            for probe in probes(values):
                instance = super().__call__(**probe)
            instance = copy.copy(instance)
            for name, value in scheduled.items():
                object.__setattr__(instance, name, value)
        object.__setattr__(instance, "_built", True)
        return instance


class SerializableConfig(metaclass=_BuiltOnce):
    """``to_dict``/``from_dict``, ``save_pretrained``/``from_pretrained`` and ``replace`` for config dataclasses;
    nested configs become nested dicts. Subclasses name their file in ``config_file_name``.

    Every value is checked when it is set: a NaN or ±inf anywhere in a field is refused, naming the field. A built
    config is immutable (:meth:`replace` makes a validated copy), so what was validated is what runs.
    """

    config_file_name: ClassVar[str] = CONFIG_NAME

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_built", False):
            raise dataclasses.FrozenInstanceError(
                f"{type(self).__name__} is immutable once built; use config.replace({name}=...) for a changed copy."
            )
        _check_finite(name, value)
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"{type(self).__name__} is immutable; cannot delete {name!r}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-serialisable dict; nested configs become nested dicts."""
        return {f.name: _to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @staticmethod
    def _check_keys(target: type, data: Mapping[str, Any], unknown_message: str) -> None:
        """Raise ``unknown_message`` (formatted with ``unknown``), a "did you mean" and the valid names for keys
        ``target`` lacks."""
        names = {f.name for f in dataclasses.fields(target) if f.init}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{unknown_message.format(unknown=unknown)}{did_you_mean(unknown, names)}; "
                             f"valid parameters: {sorted(names)}.")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        cls._check_keys(cls, data, f"Unknown {cls.__name__} parameter(s) {{unknown}}")
        return cls(**{k: _from_plain(v) for k, v in data.items()})

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write the config file into ``save_directory`` (created if needed); return the file path."""
        return write_json(save_directory, self.config_file_name, self.to_dict())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, revision: str | None = None,
                        token: str | bool | None = None, cache_dir: str | os.PathLike | None = None) -> Any:
        """Read the config file from a folder (or the file itself), or from a Hub repo id (``"org/name"``,
        ``"org/name@revision"``; only that file is downloaded, into ``cache_dir``). A merge's record of its inputs
        in the file, and its summary, are skipped."""
        data = read_json(directory, cls.config_file_name, revision=revision, token=token, cache_dir=cache_dir)
        return cls.from_dict({k: v for k, v in data.items() if k not in RECORD_KEYS})

    def replace(self, **overrides: Any) -> Any:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **overrides)


@dataclasses.dataclass(kw_only=True)
class MergeConfig(SerializableConfig):
    """Base class of every merge method's configuration.

    Subclasses declare ``method: str = dataclasses.field(default="<name>", init=False)`` and register
    themselves with :func:`hf_merge.register_method`.
    """

    method: str = dataclasses.field(default="", init=False)
    #: The model card's description of the method (``None``: the card names the method only).
    card: ClassVar[MethodCard | None] = None
    #: What :func:`hf_merge.check` cannot check yet in this method's merges, e.g. "layer stacks (slices)" (it then
    #: refuses); ``None``: it checks them.
    not_checked: ClassVar[str | None] = None

    def search_space(self) -> SearchSpace | None:
        """The coefficient the method's papers choose on validation data, with their grid (``None``: none)."""
        return None

    def coefficient_kind(self, parameter: str) -> str:
        """How the merge depends on the (dotted) field ``parameter``; ``"rerun"`` unless the method says more."""
        space = self.search_space()
        return space.kind if space is not None and space.parameter == parameter else "rerun"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MergeConfig:
        """Build the config named by ``data["method"]`` (nested configs are built recursively)."""
        from .registry import config_class

        data = {k: v for k, v in data.items() if k not in RECORD_KEYS}  # a merge_config.json's record of the run
        method = data.pop("method", None)
        if method is None:
            if cls is MergeConfig:
                raise ValueError("A merge config dict needs a 'method' key, e.g. {'method': 'ties', ...}.")
            target = cls
        else:
            target = config_class(method)
            if cls is not MergeConfig and not issubclass(target, cls):
                raise ValueError(f"Config dict names method {method!r}, which is not a {cls.__name__}.")
        cls._check_keys(target, data, f"Unknown parameter(s) {{unknown}} for method {target.method_name()!r}")
        return target(**{k: _from_plain(v) for k, v in data.items()})

    @classmethod
    def method_name(cls) -> str:
        return next(f.default for f in dataclasses.fields(cls) if f.name == "method")

    @classmethod
    def from_mergekit(cls, recipe: str | os.PathLike | Mapping[str, Any]) -> MergeConfig:
        """The config of a mergekit recipe (a YAML path or its dict); :func:`hf_merge.read_recipe` gives the models,
        the base and the options too."""
        from .mergekit import read_recipe

        return read_recipe(recipe).config

    def has_schedules(self) -> bool:
        """Whether a field (or a nested config's field) holds a :class:`~hf_merge.Schedule`."""
        from .schedules import contains_schedule

        return any(value.has_schedules() if isinstance(value, MergeConfig) else contains_schedule(value)
                   for value in (getattr(self, f.name) for f in dataclasses.fields(self) if f.init))

    def resolved(self, info: ParamInfo) -> MergeConfig:
        """The plain config of one tensor: every schedule replaced by its value for ``info`` (itself when it has no
        schedules). A value out of range for this tensor raises, naming the tensor."""
        from .schedules import contains_schedule, position, resolve

        changes = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, MergeConfig):
                if value.has_schedules():
                    changes[f.name] = value.resolved(info)
            elif f.init and contains_schedule(value):
                changes[f.name] = resolve(value, info.name, position(info))
        if not changes:
            return self
        try:
            return self.replace(**changes)
        except (TypeError, ValueError) as error:
            raise type(error)(f"tensor {info.name!r}: {error}") from None


def did_you_mean(unknown: list[str] | str, known: Iterable[str]) -> str:
    """`` (did you mean 'ties'?)`` for the closest known name of each unknown one, or ``""``."""
    import difflib

    known = list(known)
    guesses = [match for name in ([unknown] if isinstance(unknown, str) else unknown)
               for match in difflib.get_close_matches(name, known, n=1, cutoff=0.6)]
    return f" (did you mean {', '.join(repr(g) for g in dict.fromkeys(guesses))}?)" if guesses else ""


def write_json(directory: str | os.PathLike, filename: str, data: Mapping[str, Any]) -> str:
    """Write ``data`` as ``directory/filename`` (folder created if needed); return the file path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, filename)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    return path


def read_json(directory: str | os.PathLike, filename: str, *, revision: str | None = None,
              token: str | bool | None = None, cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read ``directory/filename`` (or ``directory`` itself when it is the file); a ``directory`` that is no local
    path but a Hub repo id is downloaded (see :func:`hf_merge.hub.resolve.resolve_folder`)."""
    from .hub.resolve import resolve_folder

    resolved = resolve_folder(directory, [filename], revision=revision, token=token, cache_dir=cache_dir)
    path = os.fspath(resolved.folder)
    if os.path.isdir(path) or resolved.repo_id is not None:
        path = os.path.join(path, filename)
    if not os.path.isfile(path):
        where = f"the Hub repo {resolved.repo_id} (commit {resolved.commit})" if resolved.repo_id else repr(path)
        raise FileNotFoundError(f"No {filename} found at {where}.")
    data = load_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}.")
    return data


def load_json(path: str | os.PathLike) -> Any:
    """The JSON content of ``path``; a malformed file raises ``ValueError`` naming it, the line and the column."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as error:
        raise ValueError(f"{os.fspath(path)}: malformed JSON at line {error.lineno}, column {error.colno} "
                         f"({error.msg}).") from None
    except UnicodeDecodeError:
        raise ValueError(f"{os.fspath(path)}: not a UTF-8 JSON file.") from None


def _to_plain(value: Any) -> Any:
    from .schedules import Schedule

    if isinstance(value, MergeConfig):
        return value.to_dict()
    if isinstance(value, Schedule):
        return value.to_plain()
    if isinstance(value, Mapping):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _from_plain(value: Any) -> Any:
    """Nested configs (a mapping with ``method``) and schedules (``{"schedule": [rules]}``) rebuilt, at any depth."""
    from .schedules import Schedule

    if isinstance(value, Mapping):
        if "method" in value:
            return MergeConfig.from_dict(value)
        rules = value.get("schedule")
        if len(value) == 1 and isinstance(rules, list) and rules and all(isinstance(r, Mapping) for r in rules):
            return Schedule(rules)
        return {k: _from_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------- validation helpers
def check_fraction(name: str, value: float, *, low_open: bool = False, high_open: bool = False) -> None:
    """Raise unless ``value`` lies in [0, 1] (with optionally open ends)."""
    check_number(name, value)
    too_low = value <= 0 if low_open else value < 0
    too_high = value >= 1 if high_open else value > 1
    if too_low or too_high:
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ValueError(f"{name} must be in {interval}, got {value!r}.")


def check_number(name: str, value: Any) -> None:
    """Raise unless ``value`` is a finite real number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}.")
    _check_finite(name, value)


def _check_finite(name: str, value: Any) -> None:
    """Raise naming ``name`` for a NaN or ±inf anywhere in ``value`` (numbers, and inside lists and mappings)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_finite(f"{name}[{key!r}]", item)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_finite(f"{name}[{index}]", item)


#: A value given once for every task, or per task: a sequence in input order or a ``{task_name: value}`` mapping.
PerTask = Any


def per_task_items(name: str, value: PerTask) -> list[tuple[str, Any]]:
    """``[(label, item)]`` of a per-task value (``[(name, value)]`` for a single value), for checking each item."""
    if isinstance(value, Mapping):
        if not value:
            raise ValueError(f"{name} is an empty mapping; give one value per task (or a single value).")
        if not all(isinstance(task, str) for task in value):
            raise TypeError(f"{name}: a per-task mapping is keyed by task names (str), got {list(value)!r}.")
        return [(f"{name}[{task!r}]", item) for task, item in value.items()]
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{name} is an empty list; give one value per task (or a single value).")
        return [(f"{name}[{index}]", item) for index, item in enumerate(value)]
    return [(name, value)]


def resolve_per_task(name: str, value: PerTask, task_names: Sequence[str]) -> list[Any]:
    """One value per task, in the order of ``task_names``: a single value repeated, a sequence of exactly T values,
    or a mapping with exactly the task names as keys."""
    if isinstance(value, Mapping):
        if set(value) != set(task_names):
            raise ValueError(f"{name} gives values for the tasks {sorted(value)}, but the tasks are {list(task_names)}.")
        return [value[task] for task in task_names]
    if isinstance(value, (list, tuple)):
        if len(value) != len(task_names):
            raise ValueError(f"{name} has {len(value)} values for {len(task_names)} tasks {list(task_names)}.")
        return list(value)
    return [value] * len(task_names)


def check_positive(name: str, value: Any, why: str = "") -> None:
    """Raise unless ``value`` is a finite number > 0 (``why`` is added to the message)."""
    check_number(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0{f' ({why})' if why else ''}, got {value!r}.")


def check_positive_int(name: str, value: Any, *, minimum: int = 1) -> None:
    """Raise unless ``value`` is an integer (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}.")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}.")
