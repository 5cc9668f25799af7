"""Hub repo ids wherever a model path is accepted: a reference is resolved to a local folder once, here.

- A string naming an existing local file or folder stays local; a ``pathlib.Path`` is always local.
- Any other string that is a valid repo id (``org/name`` or ``name``, optionally ``org/name@revision``) is
  downloaded with ``huggingface_hub.snapshot_download`` into the Hugging Face cache (``cache_dir``), fetching only
  what a merge reads: safetensors weights (and their index), configs, tokenizer and processor files, the generation
  config, PEFT adapter files, a Sentence-Transformers ``modules.json`` and its modules' configs, and the card. Pickle
  weights (``pytorch_model.bin``, ``adapter_model.bin``) are fetched only with ``allow_pickle=True`` and only when the
  repo has no safetensors weights.
- ``HF_HUB_OFFLINE=1`` resolves from the cache alone; ``HF_ENDPOINT`` is read at call time.
- An error names the reference and says how it was tried (as a local path, as a Hub repo id).

A folder inside the cache (``.../models--org--name/snapshots/<commit>``) is recognised as that repo at that commit
(:func:`cached_repo`): merge records and cards name it by repo id.

huggingface_hub is imported only when a reference goes to the Hub.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: What a merge reads from a model or adapter repo (``huggingface_hub`` allow patterns, matched with fnmatch).
MODEL_FILES = (
    "config.json", "generation_config.json", "README.md",
    "model.safetensors", "model.safetensors.index.json", "model-*.safetensors",
    "adapter_config.json", "adapter_model.safetensors",
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
    "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json",
    "modules.json", "config_sentence_transformers.json", "sentence_bert_config.json",
    # Sentence-Transformers modules in subfolders (0_Transformer/, 1_Pooling/, 2_Dense/...): configs, weights, tokenizer
    "*/*.json", "*/model.safetensors", "*/vocab.txt", "*/merges.txt", "*/spiece.model", "*/sentencepiece.bpe.model",
)
#: Pickle weights, fetched only with ``allow_pickle=True`` from a repo without safetensors weights.
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin", "adapter_model.bin")
_SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_CACHED_SNAPSHOT = re.compile(r"(?:^|/)models--(?P<repo>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})/?$")


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """A reference resolved to a local ``folder`` (or file); ``repo_id`` and ``commit`` when it came from the Hub
    (both ``None`` for a local path)."""

    folder: Path
    repo_id: str | None = None
    commit: str | None = None


def split_revision(reference: str) -> tuple[str, str | None]:
    """``("org/name", "rev")`` of ``"org/name@rev"``; ``(reference, None)`` without ``@``."""
    name, at, revision = reference.partition("@")
    return (name, revision) if at else (reference, None)


def repo_id_problem(name: str) -> str | None:
    """Why ``name`` is not a valid Hub repo id (``None`` when it is one)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.count("/") > 1:
        return "a repo id has at most one '/'"
    try:
        validate_repo_id(name)
    except HFValidationError as error:
        return str(error).split("\n")[0]
    return None


def cached_repo(folder: str | os.PathLike | None) -> tuple[str, str] | None:
    """``(repo_id, commit)`` of a snapshot folder of the Hugging Face cache, else ``None``."""
    if folder is None:
        return None
    match = _CACHED_SNAPSHOT.search(os.fspath(folder).replace(os.sep, "/"))
    return (match["repo"].replace("--", "/"), match["commit"]) if match else None


def resolve_model(
    reference: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_pickle: bool = False,
) -> ResolvedModel:
    """The local folder of a model or adapter reference: a local path as is, a Hub repo id downloaded (see the module
    docstring for what is fetched).

    ``revision`` (branch, tag or commit) applies to a repo id; ``"org/name@rev"`` gives it inline (both: they must
    agree). ``token`` and ``cache_dir`` are huggingface_hub's. Raises ``FileNotFoundError`` naming the reference when
    it is neither an existing path nor a repo (or revision) on the Hub or, offline, in the cache; ``PermissionError``
    for a gated repo; ``ValueError`` for conflicting revisions or a repo with only pickle weights without
    ``allow_pickle``.
    """
    folder = resolve_folder(reference, MODEL_FILES, revision=revision, token=token, cache_dir=cache_dir)
    if folder.repo_id is None:
        return folder
    fetch = dict(repo_id=folder.repo_id, revision=folder.commit, token=token, cache_dir=cache_dir)
    if not any((folder.folder / name).is_file() for name in _SAFE_WEIGHTS):
        pickles = _listed(folder, PICKLE_FILES)
        if pickles and not allow_pickle:
            raise ValueError(f"{reference!r}: the Hub repo {folder.repo_id} has only pickle weights ({pickles[0]}). "
                             "Loading pickle files can execute arbitrary code; pass allow_pickle=True to use them.")
        if allow_pickle and pickles != []:
            _download(reference, patterns=PICKLE_FILES, **fetch)
    shards = _missing_shards(folder.folder)
    if shards:
        _download(reference, patterns=shards, **fetch)
    return folder


def resolve_folder(
    reference: str | os.PathLike,
    patterns: Sequence[str],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> ResolvedModel:
    """:func:`resolve_model` for any artifact: a local path as is, or the repo's files matching ``patterns`` (e.g.
    ``["merge_config.json"]``, or a task bank's files)."""
    if not isinstance(reference, (str, os.PathLike)):
        raise TypeError(f"Expected a local path or a Hub repo id, got {type(reference).__name__}.")
    if not isinstance(reference, str) or os.path.exists(reference):
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repo ids; {os.fspath(reference)!r} is a local path.")
        return ResolvedModel(Path(reference))
    name, inline = split_revision(reference)
    problem = "no revision after '@'" if inline == "" else repo_id_problem(name)
    if problem is not None:
        raise FileNotFoundError(f"{reference!r}: no such local file or folder ({os.path.abspath(reference)}), and not "
                                f"tried as a Hub repo id ({problem}).")
    if inline is not None and revision is not None and inline != revision:
        raise ValueError(f"{reference!r} names revision {inline!r}, but revision={revision!r} was given for it.")
    folder = _download(reference, repo_id=name, revision=inline or revision, token=token, cache_dir=cache_dir,
                       patterns=patterns)
    return ResolvedModel(folder, name, folder.name)


def _download(reference: str, *, repo_id: str, revision: str | None, token: str | bool | None,
              cache_dir: str | os.PathLike | None, patterns: Sequence[str]) -> Path:
    """``snapshot_download`` of ``patterns``; its errors become ones naming ``reference``."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    at = f"{repo_id}@{revision}" if revision is not None else repo_id
    tried = (f"{reference!r} is not a local path (no such file or folder: {os.path.abspath(reference)}), and as a "
             "Hub repo id")
    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                      allow_patterns=list(patterns), endpoint=endpoint))
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{tried}: the repo {repo_id} on {endpoint} has no revision {revision!r}.") from None
    except GatedRepoError:
        raise PermissionError(f"{tried}: {repo_id} on {endpoint} is gated; accept its conditions on the Hub and pass "
                              "token= (or log in).") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{tried}: no repo {repo_id} on {endpoint} (a private repo needs token=).") from None
    except LocalEntryNotFoundError as error:
        cache = cache_dir if cache_dir is not None else constants.HF_HUB_CACHE
        if constants.is_offline_mode():
            raise FileNotFoundError(f"{tried}: HF_HUB_OFFLINE is set and {at} is not (completely) in the cache "
                                    f"{cache}; download it once online or unset HF_HUB_OFFLINE.") from None
        cause = error.__cause__ or error
        reason = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
        raise FileNotFoundError(f"{tried}: the Hub ({endpoint}) could not be reached ({reason}) and {at} is not "
                                f"(completely) in the cache {cache}.") from error
    except HfHubHTTPError as error:
        raise OSError(f"{tried}: downloading {at} from {endpoint} failed: {error}") from error


def _listed(folder: ResolvedModel, patterns: Sequence[str]) -> list[str] | None:
    """The repo's files matching ``patterns``, from the tree listing snapshot_download cached (``None``: no listing
    cached)."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    try:
        files = get_cached_repo_tree(folder.repo_id, revision=folder.commit, cache_dir=_cache_root(folder.folder))
    except CachedRepoTreeNotFoundError:
        return None
    return list(filter_repo_objects([f.path for f in files], allow_patterns=list(patterns)))


def _cache_root(snapshot: Path) -> Path:
    return snapshot.parent.parent.parent  # <cache>/models--org--name/snapshots/<commit>


def _missing_shards(folder: Path) -> list[str]:
    """Weight files an index in ``folder`` names that are not there (shards not named ``model-*``)."""
    from ..config import load_json

    missing: list[str] = []
    for name in _INDEXES:
        index = folder / name
        if index.is_file():
            content = load_json(index)
            weight_map: Any = content.get("weight_map") if isinstance(content, dict) else None
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: expected a JSON object with a 'weight_map' object.")
            missing += [shard for shard in dict.fromkeys(weight_map.values()) if not (folder / shard).is_file()]
    return missing


__all__ = ["MODEL_FILES", "PICKLE_FILES", "ResolvedModel", "cached_repo", "resolve_folder", "resolve_model",
           "split_revision"]
