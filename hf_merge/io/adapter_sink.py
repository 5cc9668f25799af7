"""LoRA outputs: merged updates written as a PEFT adapter (:class:`MergedAdapter`).

Methods with a low-rank form (``Merger.merge_lowrank``) hand the sink each merged update as factors, so no
rows × cols matrix is formed; every other method runs densely per module and the sink factors its merged ΔW by an
SVD. Each module's update is finally truncated to ``rank`` triplets, or to the fewest holding an ``energy`` fraction
of Σ s² (neither: every non-zero triplet, i.e. no approximation). ``modules_to_save`` weights are merged densely and
saved as ``modules_to_save``.

Full fine-tuned models as inputs: the merged weights stream by densely and each module's (merged − base) is extracted
as it arrives, by truncated SVD to ``rank`` or ``energy`` (:mod:`hf_merge.extract`, as :func:`hf_merge.extract_lora`).
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
from ..extract import LoraExtraction, Target, adapter_rank
from ..linalg import EigensolveOrder
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

    ``r`` is the most common module rank; modules of another rank are listed in ``rank_pattern``, and ``alpha ==
    rank`` everywhere (``alpha_pattern``), so every scaling is 1 and ΔW = B A exactly as merged.

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
    #: The run's summary, kept in ``merge_config.json`` (an extraction's per-module ranks under ``lora_extraction``).
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)

    def _record(self, license: str | None = None, tags: Any = None, base_model: Any = None) -> MergeRecord:
        """The merge record with the card metadata given now (checked against the inputs; nothing written yet)."""
        from ..record import MergeRecord

        record = MergeRecord(self.merge_config, self.merge_inputs, artifact="adapter", summary=dict(self.summary),
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
        """The rank of every target module (``r``, or its ``rank_pattern`` entry)."""
        from ..adapters import _pattern_value

        config = self.adapter_config
        return {m: _pattern_value(config["rank_pattern"], m, config["r"]) for m in config["target_modules"]}

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
    merged ``modules_to_save`` weights, and builds a :class:`MergedAdapter` (saved to ``output_dir`` when given).

    With full fine-tuned models among the inputs (or an ``extraction`` given, as :func:`hf_merge.extract_lora` does)
    the adapter is extracted from (merged − base) per module as it streams by (:mod:`hf_merge.extract`): what to
    factor, save or leave out is planned from the architecture, and ``rank=``/``energy=`` (exactly one) set the
    ranks."""

    description = "a LoRA adapter (output='lora')"
    unsupported_options = ("device_map", "max_memory", "offload_folder", "max_shard_size")
    takes_lowrank = True

    def __init__(self, base: TensorSource, tasks: Mapping[str, TensorSource], options: MergeOptions, *,
                 rank: int | None = None, energy: float | None = None, output_dir: str | os.PathLike | None = None,
                 inputs: Sequence[Path] = (), extraction: LoraExtraction | None = None) -> None:
        from ..adapters import LoraSource

        if extraction is None and not all(isinstance(source, LoraSource) for source in tasks.values()):
            try:
                extraction = LoraExtraction(rank=rank, energy=energy)
            except ValueError as error:
                raise ValueError(f"output='lora' of full fine-tuned models extracts a LoRA adapter of (merged − base) "
                                 f"by truncated SVD: {error}") from None
        elif extraction is None:
            if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
                raise ValueError(f"rank must be a positive integer, got {rank!r}.")
            if energy is not None and not 0 < energy <= 1:
                raise ValueError(f"energy must be in (0, 1], got {energy!r}.")
        if output_dir is not None:
            check_output_dir(output_dir, inputs, overwrite=options.overwrite)  # before any work
        elif options.overwrite:
            options.reject(("overwrite",), f"The output, {self.description} held in memory (no output_dir),")
        self.overwrite = options.overwrite
        self.base, self.tasks = base, dict(tasks)
        self.rank, self.energy, self.output_dir = rank, energy, output_dir
        self.extraction, self.device = extraction, options.device
        self.eigensolves = EigensolveOrder()  # carried from module to module of one extraction
        self.updates: dict[str, LowRank] = {}
        self.full_values: dict[str, torch.Tensor] = {}
        self.energy_kept: dict[str, float] = {}
        self.dropped: list[str] = []

    def begin(self, metas: Mapping[str, TensorMeta], infos: Mapping[str, ParamInfo], read_ahead: int) -> list[str]:
        """The keys the adapter holds (bound to the base by now): those the adapters target or save whole, or — for
        an extraction — those its plan reads."""
        self.metas = metas
        if self.extraction is not None:
            self.plan = self.extraction.plan(self.base, self.tasks, metas)
            self.layout, self.saved_names = dict(self.plan.lora), dict(self.plan.saved)
            return self.plan.wanted(list(metas))
        self.layout, self.saved_names = {}, {}
        for key in metas:
            for task in self.tasks.values():
                if key not in self.layout and (layout := task.targeted_module(key)) is not None:
                    self.layout[key] = Target(*layout)
                if key not in self.saved_names and (name := task.saved_name(key)) is not None:
                    self.saved_names[key] = name
        both = sorted(set(self.layout) & set(self.saved_names))
        if both:
            raise MergeError(f"{both} are LoRA-targeted in one adapter and saved whole (modules_to_save) in another.")
        return list(self.layout) + list(self.saved_names)

    def put(self, key: str, value: LowRank | torch.Tensor) -> None:
        if key not in self.layout:  # saved whole (an extraction: only if changed), or a change LoRA cannot hold
            changed = self.extraction is None or not torch.equal(value, self.base.get(key).to(value.dtype))
            if changed and key in self.saved_names:
                self.full_values[key] = value.to("cpu")
            elif changed:
                self.dropped.append(key)
            return
        update = value.to("cpu") if isinstance(value, LowRank) else value.float() - self.base.get(key).float()
        if self.extraction is not None:
            update, self.energy_kept[key] = self.extraction.factor(self.layout[key].module, update, self.device,
                                                                   self.eigensolves)
        elif isinstance(update, LowRank):
            update = truncate(update, self.rank, self.energy)
        else:  # a densely merged weight: its update, factored exactly, then truncated
            update = truncate(LowRank.from_dense(update), self.rank, self.energy)
        self.updates[key] = update.to("cpu")

    def finish(self, record: MergeRecord | None) -> MergedAdapter | str:
        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        kept: dict[str, float] = {}
        tied = self.plan.tied if self.extraction is not None else {}
        for key, update in self.updates.items():
            if update.rank == 0:
                continue
            # a tied output module (rows × dim, like the table it repeats) takes the same factors: B = P, A = Q
            for target in [self.layout[key], *([Target(tied[key].rpartition(".")[0])] if key in tied else [])]:
                _write_factors(tensors, target, update, self.metas[key].dtype)
                ranks[target.module] = update.rank
                if key in self.energy_kept:
                    kept[target.module] = self.energy_kept[key]
        saved = {self.saved_names[k]: v.to(self.metas[k].dtype) for k, v in self.full_values.items()}
        saved.update({tied[k]: saved[self.saved_names[k]].clone() for k in self.full_values if k in tied})
        tensors.update({_PREFIX + name: value for name, value in saved.items()})
        modules_to_save = _outermost({name.rpartition(".")[0] for name in saved})
        if not ranks and not modules_to_save:
            raise MergeError("The merged adapter is empty: every merged update is zero.")
        if self.extraction is not None:
            task_type = _task_type(self.base)
            declared = None
        else:
            first = next(iter(self.tasks.values())).adapter.config
            task_type = first.get("task_type")
            declared = next((t.adapter.config.get("base_model_name_or_path") for t in self.tasks.values()
                             if t.adapter.config.get("base_model_name_or_path")), None)
        top_rank = adapter_rank(ranks)
        differing = {re.escape(m): r for m, r in ranks.items() if r != top_rank}
        adapter_config = {
            "peft_type": "LORA",
            "task_type": task_type,
            "base_model_name_or_path": record.adapter_base(declared) if record is not None else declared,
            "r": top_rank,
            "lora_alpha": top_rank,
            "rank_pattern": differing,
            "alpha_pattern": differing,
            "target_modules": sorted(ranks),
            "modules_to_save": modules_to_save or None,
            "fan_in_fan_out": any(self.layout[k].transposed for k in self.updates if self.updates[k].rank),
            "use_rslora": False,
            "use_dora": False,
            "bias": "none",
            "lora_dropout": 0.0,
            "inference_mode": True,
        }
        if self.extraction is not None:
            summary = self._extraction_summary(ranks, kept, modules_to_save)
            if record is not None:
                record.summary["lora_extraction"] = summary
        adapter = MergedAdapter(adapter_config, tensors, record.config if record else None,
                                dict(record.inputs) if record else {}, card=record.card if record else None,
                                summary=dict(record.summary) if record else {})
        if self.output_dir is None:
            return adapter
        return adapter.save_pretrained(self.output_dir, overwrite=self.overwrite)

    def _extraction_summary(self, ranks: Mapping[str, int], kept: Mapping[str, float], modules_to_save: list[str]
                            ) -> dict[str, Any]:
        """What the extraction kept, per module, and what it left out (warning about changes LoRA cannot hold)."""
        from ..errors import warn

        if self.dropped:
            shown = ", ".join(self.dropped[:8]) + (", ..." if len(self.dropped) > 8 else "")
            warn(f"The adapter cannot hold the changes of {len(self.dropped)} tensor(s), which are left out: {shown} "
                 "(biases of LoRA-extracted modules, or weights PEFT cannot wrap in LoRA layers).")
        tied = [self.plan.tied[k] for k in self.updates if k in self.plan.tied and self.updates[k].rank]
        if tied:
            warn(f"{tied[0]} is tied to the input embedding: the adapter gives it the embedding's LoRA factors, which "
                 "PEFT applies correctly, but merge_and_unload() would add the update twice to the shared weight "
                 "(PEFT issue 2777). Extract with embeddings='save' to merge the adapter into the weights.")
        return {
            **self.extraction.to_dict(),
            "modules": {m: {"rank": r, "energy": round(kept[m], 6)} for m, r in ranks.items()},
            "modules_to_save": modules_to_save,
            "unchanged": sorted(self.layout[k].module for k, u in self.updates.items() if u.rank == 0),
            "left_out": self.plan.left_out,
            "dropped": list(self.dropped),
        }


def _write_factors(tensors: dict[str, torch.Tensor], target: Target, update: LowRank, dtype: torch.dtype) -> None:
    """PEFT's tensors of one module from ΔW = P Q in the stored layout: ``B A`` for a Linear; (B A)ᵀ for a
    ``fan_in_fan_out`` Conv1D and for an embedding table (``lora_embedding_A/B``)."""
    prefix = f"{_PREFIX}{target.module}."
    if target.embedding:
        tensors[prefix + "lora_embedding_A"] = update.P.transpose(0, 1).contiguous().to(dtype)
        tensors[prefix + "lora_embedding_B"] = update.Q.transpose(0, 1).contiguous().to(dtype)
    elif target.transposed:
        tensors[prefix + "lora_A.weight"] = update.P.transpose(0, 1).contiguous().to(dtype)
        tensors[prefix + "lora_B.weight"] = update.Q.transpose(0, 1).contiguous().to(dtype)
    else:
        tensors[prefix + "lora_B.weight"] = update.P.contiguous().to(dtype)
        tensors[prefix + "lora_A.weight"] = update.Q.contiguous().to(dtype)


def _outermost(modules: set[str]) -> list[str]:
    """The modules no other one of which contains them (PEFT saves a module with everything inside it)."""
    return sorted(m for m in modules if not any(m.startswith(f"{other}.") for other in modules))


def _task_type(base: TensorSource) -> str | None:
    """PEFT's ``task_type`` of an adapter extracted from full models: ``CAUSAL_LM`` for a causal LM base (its class,
    or ``architectures`` in its config), else none — PEFT's classification task types add the head to
    ``modules_to_save`` on loading and then expect its weights whole."""
    config = base.config
    names = getattr(config, "architectures", None) if not isinstance(config, Mapping) else config.get("architectures")
    name = type(base.model).__name__ if base.model is not None else (names or [None])[0]
    return "CAUSAL_LM" if name and name.endswith(("ForCausalLM", "LMHeadModel")) else None
