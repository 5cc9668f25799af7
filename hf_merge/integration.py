"""``PreTrainedModel.merge_with``: merging from the model object, attached when hf_merge is imported.

``import hf_merge`` sets ``transformers.PreTrainedModel.merge_with`` to :func:`merge_with` — at once when
transformers' modeling module is already imported, otherwise by a one-shot import hook that attaches it right after
``transformers.modeling_utils`` is first imported (so ``import hf_merge`` stays fast and does not import transformers).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Mapping, Sequence
from typing import Any

_TARGET_MODULE = "transformers.modeling_utils"


def merge_with(
    self: Any,
    others: Sequence[Any] | Mapping[str, Any] | Any,
    config_or_method: Any,
    *,
    base: Any = None,
    inplace: bool = False,
    **kwargs: Any,
) -> Any:
    """Merge this model with ``others`` (models, checkpoint folders, state dicts or adapters).

    This model is the pre-trained base θ₀ unless ``base`` is given, in which case this model is the first
    fine-tuned model and ``others`` the rest. Returns a new merged model, or this model updated in place with
    ``inplace=True``. Every keyword of :func:`hf_merge.merge` is accepted (method parameters, ``device``,
    ``output_dir``, ``output``, ``rank``, ...).

    Example:
        >>> merged = base_model.merge_with({"sst2": m1, "mnli": m2}, "task_arithmetic", scaling=0.3)
    """
    from .api import merge

    if not isinstance(others, (Sequence, Mapping)) or isinstance(others, str):
        others = [others]
    if base is not None:
        if isinstance(others, Mapping):
            raise TypeError("With base=..., pass the other models as a sequence, not a mapping.")
        base_input, finetuned = base, [self, *others]
    else:
        base_input, finetuned = self, others
    into = self if inplace and base is None else None
    if inplace and base is not None:
        raise ValueError("inplace=True updates the base model; with base=... this model is a fine-tuned input.")
    return merge(base_input, finetuned, config_or_method, into=into, **kwargs)


def _attach(module: Any) -> None:
    module.PreTrainedModel.merge_with = merge_with


class _AttachAfterImport(importlib.abc.MetaPathFinder):
    """Finds ``transformers.modeling_utils`` through the other finders and attaches ``merge_with`` after it loads."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _TARGET_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_attach(module: Any) -> None:
            exec_module(module)
            _attach(module)

        loader.exec_module = exec_and_attach  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Attach ``merge_with`` now, or as soon as transformers' modeling module is imported."""
    module = sys.modules.get(_TARGET_MODULE)
    if module is not None and hasattr(module, "PreTrainedModel"):
        _attach(module)
    elif not any(isinstance(f, _AttachAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AttachAfterImport())
