"""What a merge leaves behind about itself: ``merge_config.json`` and the model card of a folder output, or the same
record attached to an in-memory model (whose ``save_pretrained``/``push_to_hub`` then write it).

Inputs downloaded from the Hub are recorded in ``merge_config.json`` under ``"inputs"`` (:data:`~hf_merge.config.
INPUTS_KEY`) by repo id and commit, e.g. ``{"base": {"repo_id": "org/base", "commit": "<sha>"}, "models": {"sst2":
{...}}}``; local paths are not (the card names local inputs by folder name only).

The card metadata the user controls (``license=``, ``tags=``, ``base_model={input: hub_id}``; a
:class:`~hf_merge.hub.provenance.CardMetadata`) travels with the record: its ``base_model`` keys are checked against
the inputs when the record is made (before any output is written) and kept keyed by role (``"base"``, task names).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import INPUTS_KEY, SUMMARY_KEY, MergeConfig, write_json
from .hub.provenance import CardMetadata


@dataclasses.dataclass(frozen=True)
class MergeRecord:
    """The merge's config, where its inputs came from (:func:`hf_merge.inputs.describe_inputs`: ``{"base": origin,
    "models": {task: origin}}``, plus ``"hub"`` for Hub inputs), and the kind of artifact (``"model"``, ``"adapter"``
    or ``"task_bank"``) the card describes, and the user's card metadata (``card``)."""

    config: MergeConfig
    inputs: Mapping[str, Any]
    artifact: str = "model"
    card: CardMetadata = dataclasses.field(default_factory=CardMetadata)
    #: The engine's :class:`~hf_merge.summary.MergeSummary` of the run, stored in ``merge_config.json``.
    summary: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.card, CardMetadata):
            raise TypeError(f"card must be a CardMetadata, got {type(self.card).__name__}.")
        object.__setattr__(self, "card", self.card.for_inputs(self.inputs))  # raises naming an unknown input

    def with_card(self, *, license: str | None = None, tags: Any = None, base_model: Any = None) -> MergeRecord:
        """This record with card metadata given later (e.g. at push time), checked against the inputs: ``license``
        replaces the record's, ``tags`` are added, ``base_model`` entries are added (given ones win per input)."""
        extra = CardMetadata(license=license, tags=tags, base_model=base_model).for_inputs(self.inputs)
        card = CardMetadata(license=extra.license if extra.license is not None else self.card.license,
                            tags=(*self.card.tags, *extra.tags), base_model={**self.card.base_model, **extra.base_model})
        return dataclasses.replace(self, card=card)

    def card_options(self) -> dict[str, Any]:
        """The user's card metadata as :func:`hf_merge.hub.build_model_card` keywords."""
        return {"license": self.card.license, "tags": list(self.card.tags), "base_model": dict(self.card.base_model)}

    def adapter_base(self, declared: str | None = None) -> str | None:
        """What a merged adapter's ``adapter_config.json`` names as ``base_model_name_or_path``: the base's Hub id
        when known (mapped by ``base_model``, or a Hub input), else its local folder (absolute), else — for a base in
        memory — what the adapters declare (``declared``)."""
        from .hub.provenance import describe_origin

        if "base" in self.card.base_model:
            return self.card.base_model["base"]
        origin = self.inputs.get("base")
        if origin is None:
            return declared
        name, kind = describe_origin(origin)
        return name if kind == "Hub" else os.path.abspath(os.fspath(origin))

    def input_folders(self) -> list[Path]:
        """The local folders the merge read (its inputs' origins that are folders): an output may not touch them."""
        origins = [self.inputs.get("base"), *dict(self.inputs.get("models") or {}).values()]
        return [Path(origin) for origin in origins if isinstance(origin, str) and os.path.isdir(origin)]

    def write_to(self, folder: Path, **card_options: Any) -> None:
        """Write ``merge_config.json`` (a task bank keeps its config in its manifest) and the model card
        (``card_options``: those of :func:`hf_merge.hub.build_model_card`)."""
        from .hub import write_card

        if self.artifact != "task_bank":
            hub = self.inputs.get("hub")
            record = {**self.config.to_dict(), **({INPUTS_KEY: hub} if hub else {}),
                      **({SUMMARY_KEY: self.summary} if self.summary else {})}
            write_json(folder, self.config.config_file_name, record)
        record = self.with_card(**{k: card_options.pop(k) for k in ("license", "tags", "base_model") if k in card_options})
        if "lora_extraction" in self.summary:  # an adapter extracted from full weights (hf_merge.extract)
            card_options.setdefault("lora_extraction", self.summary["lora_extraction"])
        write_card(folder, self.config, dict(self.inputs), artifact=self.artifact, **record.card_options(),
                   **card_options)

    def attach_to(self, model: Any) -> Any:
        """Record the merge on ``model`` and give it a card-writing ``save_pretrained`` and ``push_to_hub``."""
        from .hub import attach_publishing

        model.merge_config = self.config
        model.merge_inputs = dict(self.inputs)
        model.merge_card = self.card
        return attach_publishing(model)
