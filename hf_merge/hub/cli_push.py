"""``hf-merge push DIR REPO_ID [--private] [--revision REV] [--license ID] [--tag TAG ...] [--base-model INPUT=ID ...]``:
publish a saved merge folder in one commit.

If ``DIR`` has a ``merge_config.json`` but no ``README.md`` (e.g. written by an older hf-merge), a model card is
rendered from the config (and the Hub inputs it records) and added to the commit. ``--license``, ``--tag`` and
``--base-model`` set the card's metadata in the pushed ``README.md``: the license replaces the card's, tags are
added, and ``--base-model INPUT=HUB_ID`` lists an input of the card's inputs table (named by task name, ``base``, its
folder name or a path to it) by its Hub id — for a merged adapter or a task bank, ``--base-model base=org/name`` also
names the base by that id in the pushed ``adapter_config.json`` / ``task_bank.json``. ``DIR`` itself is never
modified. The push is refused, before anything is uploaded, when the card (or adapter config, or task-bank manifest)
would publish a local path (:func:`~hf_merge.hub.cards.check_publishable`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
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
    parser.add_argument("--license", default=None,
                        help="the card's license, a Hub license id (e.g. apache-2.0, mit; 'other' for any other)")
    parser.add_argument("--tag", dest="tags", action="append", default=None, metavar="TAG",
                        help="a tag to add to the card (repeat for several)")
    parser.add_argument("--base-model", dest="base_model", action="append", default=None, metavar="INPUT=HUB_ID",
                        help="list an input (task name, 'base', folder name or path) by its Hub id in the card's "
                             "base_model (repeat for several)")
    parser.set_defaults(func=push_command)
    return parser


def parse_base_model(items: Sequence[str] | None) -> dict[str, str]:
    """``{input: hub_id}`` of ``--base-model INPUT=HUB_ID`` arguments."""
    mapping: dict[str, str] = {}
    for item in items or ():
        key, equals, value = item.rpartition("=")
        if not equals or not key or not value:
            raise ValueError(f"--base-model {item!r}: expected INPUT=HUB_ID, e.g. base=google-bert/bert-base-uncased.")
        mapping[key] = value
    return mapping


def card_inputs(text: str) -> list[tuple[str, str | None, str]]:
    """``(role, name, kind)`` of each row of the inputs table of a card hf-merge wrote (empty if it has none)."""
    rows: list[tuple[str, str | None, str]] = []
    match = re.search(r"^## (?:Inputs|Starting model)\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    if match is None:
        return rows
    for line in match.group(1).splitlines():
        if not line.startswith("|") or line.startswith(("| Role", "|---", "|-")):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) < 3:
            continue
        name = cells[1].split(" (on the Hub: ", 1)[0]
        rows.append((cells[0], None if name == "—" else name, cells[2]))
    return rows


def _resolve(base_model: Mapping[str, str], rows: Sequence[tuple[str, str | None, str]], card: Path) -> dict[str, str]:
    """``{role: hub_id}``: each key names one row by role, by its name, or by a path ending in a local row's name."""
    from .provenance import check_base_model

    resolved: dict[str, str] = {}
    for key, hub_id in check_base_model(base_model).items():
        matches = [role for role, _, _ in rows if role == key] or [
            role for role, name, kind in rows
            if name is not None and (key == name or (kind == "local folder" and Path(key.rstrip("/\\")).name == name))
        ]
        if len(matches) != 1:
            listed = ", ".join(f"{role} ({name or 'in memory'})" for role, name, _ in rows) or "none"
            raise ValueError(f"--base-model {key}={hub_id}: {key!r} names {'no' if not matches else 'several'} "
                             f"input(s) of the card {card} (its inputs: {listed}).")
        resolved[matches[0]] = hub_id
    return resolved


def _recorded_inputs(directory: Path) -> dict[str, Any]:
    """The Hub inputs a ``merge_config.json`` records, as ``{"base": repo_id, "models": {task: repo_id}}``."""
    from ..config import CONFIG_NAME, INPUTS_KEY, load_json

    recorded = load_json(directory / CONFIG_NAME).get(INPUTS_KEY) or {}
    base = recorded.get("base") or {}
    return {"base": base.get("repo_id"), "models": {t: e.get("repo_id") for t, e in (recorded.get("models") or {}).items()}}


def card_files(directory: Path, repo_id: str, *, license: str | None = None, tags: Sequence[str] | None = None,
               base_model: Mapping[str, str] | None = None) -> dict[str, bytes]:
    """The files the push adds to or replaces in ``directory``'s: a card when it lacks one, the card with the given
    metadata, and the adapter config / task-bank manifest naming the base by Hub id. Everything is checked here,
    before anything is uploaded."""
    from ..config import CONFIG_NAME, MergeConfig
    from .cards import ADAPTER_CONFIG_NAME, CARD_NAME, build_model_card, check_publishable, folder_architecture
    from .provenance import check_license, check_tags

    check_license(license)
    tags = list(check_tags(tags))
    base_model = dict(base_model or {})
    adapter = (directory / ADAPTER_CONFIG_NAME).is_file()
    bank = (directory / "task_bank.json").is_file()
    files: dict[str, bytes] = {}
    if (directory / CARD_NAME).is_file():
        from huggingface_hub import ModelCard

        card = ModelCard.load(directory / CARD_NAME)
        mapped = _resolve(base_model, card_inputs(card.text), directory / CARD_NAME)
        if license is not None:
            card.data.license = license
            card.text = re.sub(r"^(?:License of this (?P<a>\w+): `[^`\n]*`\.|No license is declared for this (?P<b>\w+) "
                               r"because[^\n]*)$", lambda m: f"License of this {m['a'] or m['b']}: `{license}`.",
                               card.text, flags=re.M)
        if tags:
            card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *tags]))
        if mapped:
            listed = card.data.base_model
            listed = [listed] if isinstance(listed, str) else list(listed or [])
            if adapter:
                listed = [mapped["base"]] if "base" in mapped else listed
            else:
                listed = list(dict.fromkeys([*listed, *mapped.values()]))
            card.data.base_model = listed[0] if len(listed) == 1 else listed
        if license is not None or tags or mapped:
            files[CARD_NAME] = str(card).encode("utf-8")
    elif (directory / CONFIG_NAME).is_file():
        from .provenance import CardMetadata

        inputs = _recorded_inputs(directory)
        mapped = dict(CardMetadata(base_model=base_model).for_inputs(inputs).base_model)
        card = build_model_card(
            MergeConfig.from_pretrained(directory), inputs,
            model_class=None if adapter else folder_architecture(directory), repo_id=repo_id,
            artifact="adapter" if adapter else "model", license=license, tags=tags, base_model=mapped,
        )
        files[CARD_NAME] = str(card).encode("utf-8")
    elif license is not None or tags or base_model:
        raise ValueError(f"{directory} has neither a {CARD_NAME} nor a {CONFIG_NAME}: --license, --tag and "
                         "--base-model set the metadata of an hf-merge model card.")
    else:
        mapped = {}
    if adapter and "base" in mapped:
        config = json.loads((directory / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = mapped["base"]
        files[ADAPTER_CONFIG_NAME] = (json.dumps(config, indent=2) + "\n").encode("utf-8")
    if bank:
        files.update(_published_manifest(directory, mapped.get("base")))
    check_publishable(directory, files=files)
    return files


def _published_manifest(directory: Path, mapped: str | None) -> dict[str, bytes]:
    """``task_bank.json`` naming a base that is not embedded by Hub id (mapped, or the Hub snapshot it came from)."""
    from .resolve import cached_repo

    manifest = json.loads((directory / "task_bank.json").read_text(encoding="utf-8"))
    entry = manifest.get("base") or {}
    if entry.get("embedded") or not entry.get("path"):
        return {}
    repo = cached_repo(entry["path"])
    hub_id = mapped or (f"{repo[0]}@{repo[1]}" if repo is not None else None)
    if hub_id is None:
        raise ValueError(
            f"{directory / 'task_bank.json'} references the bank's base by the local path {entry['path']!r}: pushing "
            "would publish that path and the bank would not load from the Hub. Pass --base-model "
            f"base=org/name (or {entry['path']}=org/name) with the base's Hub id; it is checked against the bank's "
            "fingerprint when the bank is loaded."
        )
    manifest["base"] = {**entry, "path": None, "repo_id": hub_id}
    return {"task_bank.json": (json.dumps(manifest, indent=2) + "\n").encode("utf-8")}


def push_command(args: argparse.Namespace) -> int:
    """Run ``hf-merge push``; print the commit URL. Returns 0, or 1 when the Hub refused (message on stderr)."""
    from .push import push_folder

    directory = Path(args.directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a folder.")
    extra_files = card_files(directory, args.repo_id, license=getattr(args, "license", None),
                             tags=getattr(args, "tags", None), base_model=parse_base_model(getattr(args, "base_model", None)))
    try:
        info = push_folder(
            directory, args.repo_id,
            private=True if args.private else None, token=args.token, revision=args.revision,
            commit_message=args.commit_message, create_pr=args.create_pr, endpoint=args.endpoint,
            extra_files=extra_files,
        )
    except HubPushError as error:
        print(f"hf-merge: push failed: {error}", file=sys.stderr)
        return 1
    print(getattr(info, "pr_url", None) or info.commit_url)
    return 0


__all__ = ["add_push_parser", "card_files", "card_inputs", "parse_base_model", "push_command"]
