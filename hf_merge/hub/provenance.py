"""Where a merge's inputs come from and what license they declare, read offline for the model card.

Each input is known by its *origin* (``merge_inputs`` as recorded by the engine: a Hub id, a local path, or ``None``
for in-memory weights):

- a Hub id is listed as is; its license is read from the local Hugging Face cache only
  (``try_to_load_from_cache(repo_id, "README.md")``) — the Hub itself is never contacted;
- a folder inside the Hugging Face cache (``.../models--org--name/snapshots/<sha>``) is listed as ``org/name``;
- any other local folder is listed under its folder name (full paths are not published); its license is read from
  the folder's ``README.md`` front matter;
- in-memory inputs have no name and no known license.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CARD_NAME = "README.md"
_HF_CACHE_SNAPSHOT = re.compile(r"(?:^|/)models--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")


@dataclasses.dataclass(frozen=True)
class InputRecord:
    """One merge input as the card shows it."""

    role: str  # "base" or the task name
    name: str | None  # Hub id or local name; None for in-memory weights
    kind: str  # "Hub", "local folder" or "in memory"
    license: str | None


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
        warnings.warn(f"Could not read the license of {name} from {readme}: {error}", stacklevel=3)
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
    return InputRecord(role=role, name=name, kind=kind, license=input_license(origin))


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
    warnings.warn(
        f"The model card has no license: the inputs' license is {reason}. Pass license=... to set one.",
        UserWarning,
        stacklevel=3,
    )
    return None
