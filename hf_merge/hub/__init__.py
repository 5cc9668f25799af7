"""Publishing merge artifacts: model cards from the ``hf_merge/model_cards/`` templates and one-commit pushes to the Hub.

- :func:`build_model_card` / :func:`write_card` — the card of a merged model, adapter or task bank.
- :func:`push_folder` — upload a folder to a Hub repo in a single commit, retrying transient failures.
- :func:`save_merged_model` / :func:`push_merged_model` / :func:`attach_publishing` — merged transformers models.

huggingface_hub is imported only when a card is built or a push runs.
"""

from __future__ import annotations

from .cards import build_model_card, infer_pipeline_tag, write_card
from .merged_model import attach_publishing, push_merged_model, save_merged_model
from .push import HubPushError, RetryPolicy, push_folder

__all__ = [
    "HubPushError",
    "RetryPolicy",
    "attach_publishing",
    "build_model_card",
    "infer_pipeline_tag",
    "push_folder",
    "push_merged_model",
    "save_merged_model",
    "write_card",
]
