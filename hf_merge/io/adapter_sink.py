"""LoRA outputs: merged updates written as a PEFT adapter (:class:`MergedAdapter`).

Methods with a low-rank form (``Merger.merge_lowrank``) hand the sink each merged update as factors, so no
rows × cols matrix is formed; every other method runs densely per module and the sink factors its merged ΔW by an
SVD. Each module's update is finally truncated to ``rank`` triplets, or to the fewest holding an ``energy`` fraction
of Σ s² (neither: every non-zero triplet, i.e. no approximation). ``modules_to_save`` weights are merged densely and
saved as ``modules_to_save``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import MergeError
from ..lowrank import LowRank, truncate
from ..tensors import TensorMeta
from .publish import check_output_dir, publish_folder
from .sinks import Sink
from .sources import TensorSource

if TYPE_CHECKING:
    from ..options import MergeOptions
    from ..params import ParamInfo
    from ..record import MergeRecord

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."


@dataclasses.dataclass
class MergedAdapter:
    """A merged LoRA adapter in PEFT format: ``adapter_config`` values and ``adapter_model`` tensors.

    Every module has its own rank (``rank_pattern``) and ``alpha == rank`` (``alpha_pattern``), so its scaling is 1
    and ΔW = B A exactly as merged.

    ``adapter_config["base_model_name_or_path"]`` names the base the adapters were merged onto: its Hub id when known
    (a Hub input, or ``base_model={"base": ...}``), else its local folder, or — for a base in memory — what the
    adapters declared (:meth:`~hf_merge.record.MergeRecord.adapter_base`). ``card`` holds the card metadata given to
    the merge (``license``, ``tags``, ``base_model``); the card lists the base as ``base_model`` with
    ``base_model_relation: adapter``.
    """

    adapter_config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    merge_config: Any
    merge_inputs: dict[str, Any]
    card: Any = None  # hf_merge.hub.provenance.CardMetadata

    def _record(self, license: str | None = None, tags: Any = None, base_model: Any = None) -> MergeRecord:
        """The merge record with the card metadata given now (checked against the inputs; nothing written yet)."""
        from ..record import MergeRecord

        record = MergeRecord(self.merge_config, self.merge_inputs, artifact="adapter",
                             **({"card": self.card} if self.card is not None else {}))
        record = record.with_card(license=license, tags=tags, base_model=base_model)
        if "base" not in record.card.base_model:  # an in-memory base: the Hub id the adapters declare, if one
            declared = record.adapter_base(self.adapter_config.get("base_model_name_or_path"))
            if declared and self.merge_inputs.get("base") is None and _is_hub_id(declared):
                record = record.with_card(base_model={"base": declared})
        return record

    def _config_for(self, record: MergeRecord) -> dict[str, Any]:
        return {**self.adapter_config,
                "base_model_name_or_path": record.adapter_base(self.adapter_config.get("base_model_name_or_path"))}

    @property
    def ranks(self) -> dict[str, int]:
        return {re.sub(r"\\(.)", r"\1", k): v for k, v in self.adapter_config["rank_pattern"].items()}

    def lora_config(self) -> Any:
        from peft import LoraConfig

        fields = {f.name for f in dataclasses.fields(LoraConfig)}
        return LoraConfig(**{k: v for k, v in self.adapter_config.items() if k in fields and k != "peft_type"})

    def save_pretrained(self, save_directory: str | os.PathLike, *, overwrite: bool = False,
                        license: str | None = None, tags: Any = None, base_model: Any = None,
                        repo_id: str | None = None) -> str:
        """Write ``adapter_config.json``, ``adapter_model.safetensors``, ``merge_config.json`` and a model card
        (atomically; an existing folder as :mod:`hf_merge.io.publish` rules); ``PeftModel.from_pretrained`` and
        transformers' ``load_adapter`` load the folder. ``license``, ``tags`` and ``base_model`` add to the card
        metadata given to the merge (``base_model={"base": "org/name"}`` also names the base in
        ``adapter_config.json``)."""
        from safetensors.torch import save_file

        record = self._record(license, tags, base_model)
        with publish_folder(save_directory, record.input_folders(), overwrite=overwrite) as tmp:
            (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(self._config_for(record), indent=2) + "\n",
                                                   encoding="utf-8")
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
            save_file(tensors, str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
            record.write_to(tmp, repo_id=repo_id)
        return str(save_directory)

    def push_to_hub(self, repo_id: str, *, license: str | None = None, tags: Any = None, base_model: Any = None,
                    **push_options: Any) -> Any:
        """Save to a temporary folder and upload it in one commit (see :func:`hf_merge.hub.push_folder`).

        Refused before anything is uploaded when the adapter's base has no Hub id (a local base folder): the pushed
        ``adapter_config.json`` would name a local path that the card's loading code cannot find; pass
        ``base_model={"base": "org/name"}`` (or keyed by the base's path)."""
        import tempfile

        from ..hub import push_folder
        from ..hub.cards import check_publishable

        self._record(license, tags, base_model)  # bad card metadata fails before anything is written
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "adapter"
            self.save_pretrained(folder, license=license, tags=tags, base_model=base_model, repo_id=repo_id)
            check_publishable(folder, self.merge_inputs)
            return push_folder(folder, repo_id, **push_options)

    def to_peft_model(self, model: torch.nn.Module, adapter_name: str = "default") -> Any:
        """``model`` wrapped as a ``PeftModel`` carrying this adapter (``model`` is modified by PEFT)."""
        from peft import get_peft_model, set_peft_model_state_dict

        peft_model = get_peft_model(model, self.lora_config(), adapter_name=adapter_name)
        result = set_peft_model_state_dict(peft_model, self.tensors, adapter_name=adapter_name)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if adapter_name in k or "lora" in k]
        if unexpected:
            raise RuntimeError(f"PEFT did not accept the merged adapter tensors {unexpected[:5]}.")
        return peft_model


def _is_hub_id(reference: str) -> bool:
    from ..hub.provenance import hub_id_problem

    return hub_id_problem(reference) is None and not os.path.exists(reference)


class AdapterSink(Sink):
    """Collects the merged updates of the LoRA-targeted matrices (factors, or dense merged weights it factors) and the
    merged ``modules_to_save`` weights, and builds a :class:`MergedAdapter` (saved to ``output_dir`` when given)."""

    description = "a LoRA adapter (output='lora')"
    unsupported_options = ("device_map", "max_memory", "offload_folder", "max_shard_size")
    takes_lowrank = True

    def __init__(self, base: TensorSource, tasks: Mapping[str, TensorSource], options: MergeOptions, *,
                 rank: int | None = None, energy: float | None = None, output_dir: str | os.PathLike | None = None,
                 inputs: Sequence[Path] = ()) -> None:
        from ..adapters import LoraSource

        if output_dir is not None:
            check_output_dir(output_dir, inputs, overwrite=options.overwrite)  # before any work
        elif options.overwrite:
            options.reject(("overwrite",), f"The output, {self.description} held in memory (no output_dir),")
        self.overwrite = options.overwrite
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"rank must be a positive integer, got {rank!r}.")
        if energy is not None and not 0 < energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {energy!r}.")
        not_lora = [name for name, source in tasks.items() if not isinstance(source, LoraSource)]
        if not_lora:
            raise MergeError(f"output='lora' needs LoRA adapters as inputs; {not_lora} are full models.")
        self.base, self.tasks = base, dict(tasks)
        self.rank, self.energy, self.output_dir = rank, energy, output_dir
        self.updates: dict[str, LowRank] = {}
        self.full_values: dict[str, torch.Tensor] = {}

    def begin(self, metas: Mapping[str, TensorMeta], infos: Mapping[str, ParamInfo], read_ahead: int) -> list[str]:
        """The keys some adapter updates (bound to the base by now): LoRA-targeted and ``modules_to_save`` ones."""
        self.metas = metas
        self.targeted = [k for k in metas if any(t.targeted_module(k) is not None for t in self.tasks.values())]
        self.replaced = [k for k in metas if any(t.saved_name(k) is not None for t in self.tasks.values())]
        both = sorted(set(self.targeted) & set(self.replaced))
        if both:
            raise MergeError(f"{both} are LoRA-targeted in one adapter and saved whole (modules_to_save) in another.")
        return self.targeted + self.replaced

    def put(self, key: str, value: LowRank | torch.Tensor) -> None:
        if key in self.replaced:
            self.full_values[key] = value.to("cpu")
        elif isinstance(value, LowRank):
            self.updates[key] = value.to("cpu")
        else:  # a densely merged weight: its update, factored
            self.updates[key] = LowRank.from_dense(value.float() - self.base.get(key).float())

    def finish(self, record: MergeRecord | None) -> MergedAdapter | str:
        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        fan_in_fan_out = False
        for key, update in self.updates.items():
            update = truncate(update, self.rank, self.energy)
            if update.rank == 0:
                continue
            module, is_embedding, transposed = next(
                layout for t in self.tasks.values() if (layout := t.targeted_module(key)) is not None)
            out_dtype = self.metas[key].dtype
            prefix = f"{_PREFIX}{module}."
            if is_embedding:
                tensors[prefix + "lora_embedding_A"] = update.P.transpose(0, 1).contiguous().to(out_dtype)
                tensors[prefix + "lora_embedding_B"] = update.Q.transpose(0, 1).contiguous().to(out_dtype)
            elif transposed:
                fan_in_fan_out = True
                tensors[prefix + "lora_A.weight"] = update.P.transpose(0, 1).contiguous().to(out_dtype)
                tensors[prefix + "lora_B.weight"] = update.Q.transpose(0, 1).contiguous().to(out_dtype)
            else:
                tensors[prefix + "lora_B.weight"] = update.P.contiguous().to(out_dtype)
                tensors[prefix + "lora_A.weight"] = update.Q.contiguous().to(out_dtype)
            ranks[module] = update.rank
        saved_names = {key: next(name for t in self.tasks.values() if (name := t.saved_name(key)) is not None)
                       for key in self.full_values}
        modules_to_save = sorted({saved_names[k].rsplit(".", 1)[0] for k in self.full_values})
        for key, value in self.full_values.items():
            tensors[_PREFIX + saved_names[key]] = value.to(self.metas[key].dtype)
        if not ranks and not modules_to_save:
            raise MergeError("The merged adapter is empty: every merged update is zero.")
        first = next(iter(self.tasks.values())).adapter.config
        declared = next((t.adapter.config.get("base_model_name_or_path") for t in self.tasks.values()
                         if t.adapter.config.get("base_model_name_or_path")), None)
        top_rank = max(ranks.values(), default=1)
        adapter_config = {
            "peft_type": "LORA",
            "task_type": first.get("task_type"),
            "base_model_name_or_path": record.adapter_base(declared) if record is not None else declared,
            "r": top_rank,
            "lora_alpha": top_rank,
            "rank_pattern": {re.escape(m): r for m, r in ranks.items()},
            "alpha_pattern": {re.escape(m): r for m, r in ranks.items()},
            "target_modules": sorted(ranks),
            "modules_to_save": modules_to_save or None,
            "fan_in_fan_out": fan_in_fan_out,
            "use_rslora": False,
            "use_dora": False,
            "bias": "none",
            "lora_dropout": 0.0,
            "inference_mode": True,
        }
        adapter = MergedAdapter(adapter_config, tensors, record.config if record else None,
                                dict(record.inputs) if record else {}, card=record.card if record else None)
        if self.output_dir is None:
            return adapter
        return adapter.save_pretrained(self.output_dir, overwrite=self.overwrite)
