"""Saving and publishing merged transformers models with their merge config and model card.

The engine records ``model.merge_config`` (a :class:`~hf_merge.MergeConfig`) and ``model.merge_inputs``
(``{"base": origin or None, "models": {task: origin or None}}``) on the model that :func:`hf_merge.merge` returns,
and :func:`attach_publishing` gives that one model instance a ``save_pretrained`` which also writes
``merge_config.json`` and ``README.md``, and a ``push_to_hub`` that publishes all of it in one commit.

Card metadata given to :func:`hf_merge.merge` (``license``, ``tags``, ``base_model``) is kept on the model
(``model.merge_card``); ``save_pretrained``/``push_to_hub`` take the same keywords (``license`` replaces, ``tags`` and
``base_model`` entries are added). A push refuses, before anything is uploaded, a card that would publish a local
path (:func:`~hf_merge.hub.cards.check_publishable`).
"""

from __future__ import annotations

import os
import tempfile
import types
from pathlib import Path
from typing import Any

from .push import RetryPolicy, push_folder

_CARD_OPTIONS = ("license", "tags", "base_model", "pipeline_tag", "eval_results", "model_name", "overwrite")


def _merge_record(model: Any) -> tuple[Any, Any]:
    merge_config = getattr(model, "merge_config", None)
    if merge_config is None:
        raise ValueError(
            f"This {type(model).__name__} has no merge_config: only models returned by hf_merge.merge carry the "
            "record needed for a merge card."
        )
    return merge_config, getattr(model, "merge_inputs", None) or {}


def _record_of(model: Any, license: str | None, tags: Any, base_model: Any) -> Any:
    """The model's :class:`~hf_merge.record.MergeRecord` with the card metadata given now (checked here, before
    anything is written)."""
    from ..record import MergeRecord

    merge_config, merge_inputs = _merge_record(model)
    card = getattr(model, "merge_card", None)
    record = MergeRecord(merge_config, merge_inputs, **({"card": card} if card is not None else {}))
    return record.with_card(license=license, tags=tags, base_model=base_model)


def save_merged_model(
    model: Any,
    save_directory: str | os.PathLike,
    *,
    license: str | None = None,
    tags: Any = None,
    base_model: Any = None,
    pipeline_tag: str | None = None,
    eval_results: Any = None,
    model_name: str | None = None,
    repo_id: str | None = None,
    overwrite: bool = False,
    **save_kwargs: Any,
) -> Path:
    """Write the model (its class's ``save_pretrained``), ``merge_config.json`` and the model card, published as one
    folder (:func:`hf_merge.io.publish.publish_folder`, whose rules ``overwrite`` follows); return the folder.

    ``save_kwargs`` go to transformers' ``save_pretrained`` (e.g. ``max_shard_size``, ``safe_serialization``); the
    card options are those of :func:`hf_merge.hub.cards.build_model_card` (``license``, ``tags`` and ``base_model``
    add to what was given to :func:`hf_merge.merge`).
    """
    from ..io.publish import publish_folder

    record = _record_of(model, license, tags, base_model)
    folder = Path(save_directory)
    with publish_folder(folder, record.input_folders(), overwrite=overwrite) as staging:
        type(model).save_pretrained(model, staging, **save_kwargs)
        record.write_to(
            staging, library_name="transformers", model_class=type(model).__name__,
            pipeline_tag=pipeline_tag, eval_results=eval_results, model_name=model_name, repo_id=repo_id,
        )
    return folder


def push_merged_model(
    model: Any,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
    retry: RetryPolicy | None = None,
    license: str | None = None,
    tags: Any = None,
    base_model: Any = None,
    pipeline_tag: str | None = None,
    eval_results: Any = None,
    model_name: str | None = None,
    max_shard_size: int | str = "5GB",
) -> Any:
    """Save the merged model, its config and card to a temporary folder and push them in one commit.

    ``license`` (a Hub license id), ``tags`` (a list of strings) and ``base_model`` (``{input: hub_id}``) set the
    card's metadata (see :func:`save_merged_model`); they are checked, and the card is refused if it would publish a
    local path, before anything is uploaded. Returns the ``huggingface_hub.CommitInfo``; raises
    :class:`~hf_merge.hub.push.HubPushError` when nothing could be committed.
    """
    from .cards import check_publishable

    merge_config, merge_inputs = _merge_record(model)
    _record_of(model, license, tags, base_model)  # bad card metadata fails before the model is written
    with tempfile.TemporaryDirectory(prefix="hf_merge_push_") as tmp:
        save_merged_model(
            model, tmp, license=license, tags=tags, base_model=base_model, pipeline_tag=pipeline_tag,
            eval_results=eval_results, model_name=model_name, repo_id=repo_id, max_shard_size=max_shard_size,
        )
        check_publishable(tmp, merge_inputs)
        return push_folder(
            tmp, repo_id, private=private, token=token, revision=revision,
            commit_message=commit_message or f"Upload {merge_config.method} merge made with hf-merge",
            create_pr=create_pr, endpoint=endpoint, retry=retry,
        )


def _bound_save_pretrained(self: Any, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
    """``save_pretrained`` of a merged model: weights, config, ``merge_config.json`` and the model card.

    ``push_to_hub=True`` (with ``repo_id``, ``private``, ``token``, ``commit_message``, ``revision``, ``create_pr``)
    pushes the saved folder in one commit afterwards, like transformers does.
    """
    push = kwargs.pop("push_to_hub", False)
    push_options = {k: kwargs.pop(k) for k in ("private", "token", "commit_message", "revision", "create_pr",
                                               "endpoint", "retry") if k in kwargs}
    repo_id = kwargs.pop("repo_id", None) or (Path(save_directory).absolute().name if push else None)
    card_options = {k: kwargs.pop(k) for k in _CARD_OPTIONS if k in kwargs}
    folder = save_merged_model(self, save_directory, repo_id=repo_id, **card_options, **kwargs)
    if push:
        from .cards import check_publishable

        check_publishable(folder, _merge_record(self)[1])
        push_folder(folder, repo_id, **push_options)
    return folder


def attach_publishing(model: Any) -> Any:
    """Give this merged model instance a card-writing ``save_pretrained`` and a one-commit ``push_to_hub``.

    Only the instance changes (its class is untouched); it must carry ``merge_config``. Returns the model.

    Example:
        >>> merged = attach_publishing(hf_merge.merge(base, tasks, "ties"))
        >>> merged.save_pretrained("out/merged")          # + merge_config.json + README.md
        >>> merged.push_to_hub("me/bert-ties", private=True)
    """
    _merge_record(model)
    model.save_pretrained = types.MethodType(_bound_save_pretrained, model)
    model.push_to_hub = types.MethodType(push_merged_model, model)
    return model
