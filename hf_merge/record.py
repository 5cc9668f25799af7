"""What a merge leaves behind about itself: ``merge_config.json`` and the model card of a folder output, or the same
record attached to an in-memory model (whose ``save_pretrained``/``push_to_hub`` then write it)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import MergeConfig


@dataclasses.dataclass(frozen=True)
class MergeRecord:
    """The merge's config, where its inputs came from (``{"base": origin, "models": {task: origin}}``), and the kind
    of artifact (``"model"``, ``"adapter"`` or ``"task_bank"``) the card describes."""

    config: MergeConfig
    inputs: Mapping[str, Any]
    artifact: str = "model"

    def input_folders(self) -> list[Path]:
        """The local folders the merge read (its inputs' origins that are folders): an output may not touch them."""
        origins = [self.inputs.get("base"), *dict(self.inputs.get("models") or {}).values()]
        return [Path(origin) for origin in origins if isinstance(origin, str) and os.path.isdir(origin)]

    def write_to(self, folder: Path, **card_options: Any) -> None:
        """Write ``merge_config.json`` (a task bank keeps its config in its manifest) and the model card
        (``card_options``: those of :func:`hf_merge.hub.build_model_card`)."""
        from .hub import write_card

        if self.artifact != "task_bank":
            self.config.save_pretrained(folder)
        write_card(folder, self.config, dict(self.inputs), artifact=self.artifact, **card_options)

    def attach_to(self, model: Any) -> Any:
        """Record the merge on ``model`` and give it a card-writing ``save_pretrained`` and ``push_to_hub``."""
        from .hub import attach_publishing

        model.merge_config = self.config
        model.merge_inputs = dict(self.inputs)
        return attach_publishing(model)
