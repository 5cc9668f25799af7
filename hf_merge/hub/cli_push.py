"""``hf-merge push DIR REPO_ID [--private] [--revision REV]``: publish a saved merge folder in one commit.

If ``DIR`` has a ``merge_config.json`` but no ``README.md`` (e.g. written by an older hf-merge), a model card is
rendered from the config and added to the commit; ``DIR`` itself is never modified.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .push import HubPushError


def add_push_parser(commands: Any) -> argparse.ArgumentParser:
    """Register the ``push`` sub-command on an ``add_subparsers()`` object; return its parser."""
    parser = commands.add_parser("push", help="upload a merged model folder to the Hugging Face Hub (one commit)")
    parser.add_argument("directory", help="folder written by hf-merge (merge output_dir or save_pretrained)")
    parser.add_argument("repo_id", help="target repo, e.g. me/bert-ties-merge (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo as private (if it does not exist)")
    parser.add_argument("--revision", default=None, help="branch to commit to (created from main if missing)")
    parser.add_argument("--commit-message", default=None, help="commit title")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in token / HF_TOKEN)")
    parser.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    parser.set_defaults(func=push_command)
    return parser


def _card_if_missing(directory: Path, repo_id: str) -> dict[str, bytes]:
    from ..config import CONFIG_NAME, MergeConfig
    from .cards import CARD_NAME, build_model_card, folder_architecture

    if (directory / CARD_NAME).is_file() or not (directory / CONFIG_NAME).is_file():
        return {}
    card = build_model_card(
        MergeConfig.from_pretrained(directory), None, model_class=folder_architecture(directory), repo_id=repo_id
    )
    return {CARD_NAME: str(card).encode("utf-8")}


def push_command(args: argparse.Namespace) -> int:
    """Run ``hf-merge push``; print the commit URL. Returns 0, or 1 when the Hub refused (message on stderr)."""
    from .push import push_folder

    directory = Path(args.directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a folder.")
    try:
        info = push_folder(
            directory, args.repo_id,
            private=True if args.private else None, token=args.token, revision=args.revision,
            commit_message=args.commit_message, create_pr=args.create_pr, endpoint=args.endpoint,
            extra_files=_card_if_missing(directory, args.repo_id),
        )
    except HubPushError as error:
        print(f"hf-merge: push failed: {error}", file=sys.stderr)
        return 1
    print(getattr(info, "pr_url", None) or info.commit_url)
    return 0
