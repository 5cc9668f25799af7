"""Where a merge's inputs come from and what license they declare, read offline for the model card.

Each input is known by its *origin* (``merge_inputs`` as recorded by the engine: a Hub id, a local path, or ``None``
for in-memory weights):

- a Hub id is listed as is; its license is read from the local Hugging Face cache only
  (``try_to_load_from_cache(repo_id, "README.md")``) — the Hub itself is never contacted;
- a folder inside the Hugging Face cache (``.../models--org--name/snapshots/<sha>``) is listed as ``org/name``;
- any other local folder is listed under its folder name (full paths are not published); its license is read from
  the folder's ``README.md`` front matter;
- in-memory inputs have no name and no known license.

What the card *publishes* as ``base_model`` are Hub ids only (:func:`published_base_models`): those of Hub inputs, and
those the user maps local or in-memory inputs to (:class:`CardMetadata` ``base_model={input: hub_id}``). A local
folder that maps to nothing is left out of ``base_model`` with a warning naming it — a folder name is not a Hub id.
:func:`publishing_problem` refuses a folder whose card (or adapter config) would publish a local path.

The user's card metadata (:class:`CardMetadata`) is checked here, before anything is written:

- ``license``: one of the Hub's license identifiers (:data:`HUB_LICENSES`, the table of
  https://huggingface.co/docs/hub/repositories-licenses; huggingface_hub ships no list). Any other license:
  ``license="other"``;
- ``tags``: a list of non-empty strings without line breaks;
- ``base_model``: ``{input: hub_id}`` where ``input`` is a task name, ``"base"``, or the path of an input (as given,
  the same folder by another path, or — for relative paths, e.g. in a YAML recipe — the trailing components of one
  input's path), and ``hub_id`` a valid Hub repo id.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import warn

CARD_NAME = "README.md"
_HF_CACHE_SNAPSHOT = re.compile(r"(?:^|/)models--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")


#: The Hub's license identifiers (https://huggingface.co/docs/hub/repositories-licenses). huggingface_hub has no
#: offline list and the Hub validates cards only online, so this table is the rule: a license outside it is refused
#: with a pointer to ``license="other"``.
HUB_LICENSES = frozenset({
    "apache-2.0", "mit", "openrail", "bigscience-openrail-m", "creativeml-openrail-m", "bigscience-bloom-rail-1.0",
    "bigcode-openrail-m", "afl-3.0", "artistic-2.0", "bsl-1.0", "bsd", "bsd-2-clause", "bsd-3-clause",
    "bsd-3-clause-clear", "c-uda", "cc", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0", "cc-by-sa-3.0",
    "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0", "cc-by-nc-nd-3.0",
    "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0", "cdla-sharing-1.0",
    "cdla-permissive-1.0", "cdla-permissive-2.0", "wtfpl", "ecl-2.0", "epl-1.0", "epl-2.0", "etalab-2.0", "eupl-1.1",
    "agpl-3.0", "gfdl", "gpl", "gpl-2.0", "gpl-3.0", "lgpl", "lgpl-2.1", "lgpl-3.0", "isc", "lppl-1.3c", "ms-pl",
    "mpl-2.0", "odc-by", "odbl", "openrail++", "osl-3.0", "postgresql", "ofl-1.1", "ncsa", "unlicense", "zlib", "pddl",
    "lgpl-lr", "deepfloyd-if-license", "llama2", "llama3", "llama3.1", "llama3.2", "llama3.3", "gemma", "unknown",
    "other",
})
#: ``base_model_relation`` values the Hub knows.
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")


def check_license(license: Any) -> str | None:
    """``license`` if it is ``None`` or one of :data:`HUB_LICENSES`; else ``ValueError`` naming it."""
    if license is None:
        return None
    if not isinstance(license, str):
        raise TypeError(f"license must be a Hub license identifier (a string such as 'apache-2.0'), got {license!r}.")
    if license not in HUB_LICENSES:
        from ..config import did_you_mean

        hint = (f" (Hub license ids are lower-case: {license.lower()!r})" if license.lower() in HUB_LICENSES
                else did_you_mean([license], HUB_LICENSES))
        raise ValueError(
            f"license={license!r} is not a Hub license identifier{hint}. Use one of the ids listed at "
            "https://huggingface.co/docs/hub/repositories-licenses (e.g. 'apache-2.0', 'mit', 'cc-by-4.0'), or "
            "license='other' for any other license."
        )
    return license


def check_tags(tags: Any) -> tuple[str, ...]:
    """``tags`` (a list or tuple of non-empty, single-line strings) as a tuple; ``TypeError``/``ValueError`` naming
    the offending value otherwise (a bare string is refused: it is not a list)."""
    if tags is None:
        return ()
    if isinstance(tags, (str, bytes)) or not isinstance(tags, (list, tuple)):
        raise TypeError(f"tags must be a list of strings, got {tags!r}"
                        + (f"; for one tag write tags=[{tags!r}]." if isinstance(tags, str) else "."))
    for tag in tags:
        if not isinstance(tag, str):
            raise TypeError(f"tags must be a list of strings; {tag!r} in {list(tags)!r} is a {type(tag).__name__}.")
        if not tag.strip() or "\n" in tag or "\r" in tag:
            raise ValueError(f"tags must be non-empty single-line strings; got {tag!r}.")
    return tuple(dict.fromkeys(tags))


def check_base_model(base_model: Any) -> dict[str, str]:
    """``{input: hub_id}`` with string keys and valid Hub repo ids as values; errors name the offending entry."""
    if base_model is None:
        return {}
    if not isinstance(base_model, Mapping):
        raise TypeError(
            f"base_model must map inputs (a path, a task name or 'base') to Hub ids, e.g. "
            f"{{'path/to/bert': 'google-bert/bert-base-uncased'}}; got {base_model!r}."
        )
    checked = {}
    for key, value in base_model.items():
        if not isinstance(key, (str, os.PathLike)) or not os.fspath(key):
            raise TypeError(f"base_model keys name inputs (a path, a task name or 'base'); got {key!r}.")
        problem = hub_id_problem(value)
        if problem is not None:
            raise ValueError(f"base_model[{os.fspath(key)!r}] = {value!r} is not a Hub repo id ({problem}); give the "
                             "input's id on the Hub, e.g. 'org/name'.")
        checked[os.fspath(key)] = value
    return checked


def hub_id_problem(value: Any) -> str | None:
    """Why ``value`` is not a Hub model id to publish (``None`` when it is one): a local path never is."""
    from .resolve import repo_id_problem

    if not isinstance(value, str):
        return f"not a string but a {type(value).__name__}"
    if os.path.isabs(value) or value.startswith(("~", ".")) or "\\" in value:
        return "it is a local path"
    return repo_id_problem(value)


@dataclasses.dataclass(frozen=True)
class CardMetadata:
    """Card metadata the user controls: ``license`` (a Hub license id; ``None``: inherited from the inputs when they
    agree), extra ``tags``, and ``base_model``, ``{input: hub_id}`` naming the Hub ids of local or in-memory inputs.
    Validated on construction (see the module docstring)."""

    license: str | None = None
    tags: tuple[str, ...] = ()
    base_model: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        check_license(self.license)
        object.__setattr__(self, "tags", check_tags(self.tags))
        object.__setattr__(self, "base_model", check_base_model(self.base_model))

    def for_inputs(self, merge_inputs: Mapping[str, Any] | None) -> CardMetadata:
        """This metadata with ``base_model`` keyed by input role (``"base"`` or the task name), every key checked to
        name one of ``merge_inputs``; ``ValueError`` naming a key that names none (or several)."""
        if not self.base_model:
            return self
        return dataclasses.replace(self, base_model=resolve_base_model(self.base_model, merge_inputs))


def _input_roles(merge_inputs: Mapping[str, Any] | None) -> list[tuple[str, Any]]:
    merge_inputs = merge_inputs or {}
    roles = [("base", merge_inputs.get("base"))] if "base" in merge_inputs else []
    return roles + [(str(task), origin) for task, origin in dict(merge_inputs.get("models") or {}).items()]


def _same_path(key: str, origin: Any) -> bool:
    if not isinstance(origin, (str, os.PathLike)) or not os.fspath(origin):
        return False
    origin = os.fspath(origin)
    if key == origin:
        return True
    if os.path.exists(key) and os.path.exists(origin):
        return os.path.realpath(key) == os.path.realpath(origin)
    if os.path.isabs(key):
        return False
    key_parts = [p for p in Path(key).parts if p not in (".", "")]
    origin_parts = Path(origin.rstrip("/\\")).parts
    return bool(key_parts) and ".." not in key_parts and list(origin_parts[-len(key_parts):]) == key_parts


def resolve_base_model(base_model: Mapping[str, str], merge_inputs: Mapping[str, Any] | None) -> dict[str, str]:
    """``{role: hub_id}`` of a ``{input: hub_id}`` mapping: an input is named by its role (``"base"``, a task name) or
    its path (see :func:`_same_path`). Raises ``ValueError`` naming a key that names no input, or several."""
    roles = _input_roles(merge_inputs)
    resolved: dict[str, str] = {}
    for key, hub_id in check_base_model(base_model).items():
        by_role = [role for role, _ in roles if role == key]
        matches = by_role or list(dict.fromkeys(role for role, origin in roles if _same_path(key, origin)))
        if len(matches) != 1:
            described = ", ".join(f"{role} ({origin})" if origin else f"{role} (in memory)" for role, origin in roles)
            reason = "names no input of this merge" if not matches else f"names several inputs ({matches})"
            raise ValueError(f"base_model[{key!r}] {reason}; name an input by task name, 'base', or its path. The "
                             f"inputs are: {described or 'none recorded'}.")
        if matches[0] in resolved and resolved[matches[0]] != hub_id:
            raise ValueError(f"base_model maps the input {matches[0]!r} twice, to {resolved[matches[0]]!r} and "
                             f"{hub_id!r}; give one.")
        resolved[matches[0]] = hub_id
    return resolved


@dataclasses.dataclass(frozen=True)
class InputRecord:
    """One merge input as the card shows it."""

    role: str  # "base" or the task name
    name: str | None  # Hub id or local name; None for in-memory weights
    kind: str  # "Hub", "local folder" or "in memory"
    license: str | None
    hub_id: str | None = None  # the Hub id the card publishes for it: its own, or the one base_model maps it to
    origin: str | None = None  # the local path of a local folder (never published)


def describe_origin(origin: str | os.PathLike | None) -> tuple[str | None, str]:
    """``(name, kind)`` of an input origin: a Hub id, a local folder's name, or ``(None, "in memory")``."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if origin is None or str(origin) == "":
        return None, "in memory"
    text = os.fspath(origin).replace(os.sep, "/")
    cached = _HF_CACHE_SNAPSHOT.search(text)
    if cached:
        return f"{cached['owner']}/{cached['name']}", "Hub"
    if not Path(origin).exists():
        try:
            validate_repo_id(text)
            return text, "Hub"
        except HFValidationError:
            pass
    return Path(text.rstrip("/")).name or text, "local folder"


def input_license(origin: str | os.PathLike | None) -> str | None:
    """The license an input declares, from local files only (see the module docstring); ``None`` if unknown."""
    name, kind = describe_origin(origin)
    if name is None:
        return None
    readme: str | os.PathLike | None = None
    if kind == "Hub" and not Path(os.fspath(origin)).exists():
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, CARD_NAME)
        readme = found if isinstance(found, str) else None
    elif Path(os.fspath(origin)).is_dir():
        readme = Path(origin) / CARD_NAME
    if readme is None or not Path(readme).is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        license_ = ModelCard.load(readme, ignore_metadata_errors=True).data.license
    except (ValueError, OSError) as error:
        warn(f"Could not read the license of {name} from {readme}: {error}")
        return None
    return license_ if isinstance(license_, str) and license_ else None


def input_records(merge_inputs: Mapping[str, Any] | None) -> list[InputRecord]:
    """The base (when the merge had one) and every task model, in order.

    Only the ``"base"`` and ``"models"`` entries are read; other entries (e.g. ``task_bank_task``, which a task bank
    records for a task it rebuilt) are not inputs and are left out of the card.
    """
    merge_inputs = merge_inputs or {}
    if not isinstance(merge_inputs, Mapping):
        raise TypeError(f"merge_inputs must be a mapping with 'base' and 'models', got {type(merge_inputs).__name__}.")
    models = merge_inputs.get("models") or {}
    if not isinstance(models, Mapping):
        raise TypeError(f"merge_inputs['models'] must map task names to origins, got {type(models).__name__}.")
    records = []
    if merge_inputs.get("base") is not None:
        records.append(_record("base", merge_inputs["base"]))
    records += [_record(str(task), origin) for task, origin in models.items()]
    return records


def _record(role: str, origin: Any) -> InputRecord:
    name, kind = describe_origin(origin)
    local = os.fspath(origin) if kind == "local folder" else None
    return InputRecord(role=role, name=name, kind=kind, license=input_license(origin),
                       hub_id=name if kind == "Hub" else None, origin=local)


def published_base_models(records: Sequence[InputRecord], base_model: Mapping[str, str] | None = None, *,
                          roles: Sequence[str] | None = None) -> tuple[list[InputRecord], list[str]]:
    """``(records with hub_id set from the role-keyed base_model, the Hub ids the card publishes)``, for the inputs
    of ``roles`` (all when ``None``). A local folder without a Hub id is left out with a warning naming it."""
    base_model = dict(base_model or {})
    records = [dataclasses.replace(r, hub_id=base_model[r.role]) if r.role in base_model else r for r in records]
    published, omitted = [], []
    for r in records:
        if roles is not None and r.role not in roles:
            continue
        if r.hub_id is not None:
            published.append(r.hub_id)
        elif r.kind == "local folder":
            omitted.append(r)
    if omitted:
        names = ", ".join(f"{r.role} ({r.origin or r.name})" for r in omitted)
        example = ", ".join(f"{r.role!r}: 'org/name'" for r in omitted)
        warn(
            f"The model card's base_model leaves out {names}: a local folder is not a Hub id. Pass "
            f"base_model={{{example}}} (or key them by path) to list them by their Hub ids.",
            UserWarning)
    return records, list(dict.fromkeys(published))


def inherited_license(records: Sequence[InputRecord]) -> str | None:
    """The inputs' common license; ``None`` with a warning when one is unknown or they disagree."""
    if not records:
        return None
    licenses = {r.license for r in records}
    if len(licenses) == 1 and None not in licenses:
        return licenses.pop()
    unknown = [r.name or f"{r.role} (in memory)" for r in records if r.license is None]
    known = sorted({r.license for r in records if r.license is not None})
    reason = f"unknown for {unknown}" if unknown else f"the inputs disagree ({known})"
    warn(
        f"The model card has no license: the inputs' license is {reason}. Pass license=... to set one.",
        UserWarning)
    return None
