"""PEFT LoRA adapters as merge inputs: an adapter module contributes ΔW = s · B A, kept as factors.

The scaling s is the adapter's own (``lora_alpha / r``, or ``lora_alpha / √r`` with ``use_rslora``, per-module
``rank_pattern`` / ``alpha_pattern``); ΔW is transposed for ``fan_in_fan_out`` layers (GPT-2 ``Conv1D``) and
embeddings. Modules an adapter does not target contribute 0; ``modules_to_save`` weights replace the base's (their
delta is saved − base).

Unsupported PEFT features raise with the feature named: DoRA, ``lora_bias``, trained biases (``bias != "none"``),
``target_parameters``, trainable tokens, layer replication, QALoRA, aLoRA, conv LoRA and non-LoRA PEFT types.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import load_json
from .errors import MergeError
from .io.deltas import LowRankSource
from .io.sources import TensorSource
from .lowrank import LowRank
from .models import memory_to_key

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
_LORA_EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)$")
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (use_dora=True)",
    "lora_bias": "LoRA biases (lora_bias=True)",
    "use_qalora": "QALoRA (use_qalora=True)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "layer_replication": "layer replication (layer_replication)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
}
def _pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first pattern p with ``(.*\\.)?(p)$`` matching."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


class LoraAdapter:
    """A PEFT LoRA adapter: its ``adapter_config.json`` values and tensors (keys without ``base_model.model.``)."""

    def __init__(self, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], label: str) -> None:
        self.label = label
        self.config = dict(config)
        self._check_supported()
        self.factors_raw: dict[str, dict[str, torch.Tensor]] = {}
        self.embeddings: set[str] = set()
        self.full_tensors: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            name = key.removeprefix(_PREFIX)
            match = _LORA_KEY.match(name) or _LORA_EMBEDDING_KEY.match(name)
            if match is None:
                if ".lora_" in name or "lora_magnitude_vector" in name:
                    raise ValueError(f"{label}: unsupported LoRA tensor {key!r}.")
                self.full_tensors[name] = tensor  # modules_to_save: the module's new weights
                continue
            module, part = match["module"], match["part"]
            if tensor.ndim != 2:
                raise ValueError(f"{label}: LoRA on {module!r} has {tensor.ndim}-D factors (conv LoRA is not supported).")
            if part.startswith("lora_embedding"):
                self.embeddings.add(module)
            self.factors_raw.setdefault(module, {})[part[-1]] = tensor
        for module, parts in self.factors_raw.items():
            if set(parts) != {"A", "B"}:
                raise ValueError(f"{label}: module {module!r} has lora_{'A' if 'A' in parts else 'B'} only.")
            rank = _pattern_value(self.config.get("rank_pattern"), module, self.config.get("r", 8))
            if parts["A"].shape[0] != rank or parts["B"].shape[1] != rank:
                raise ValueError(
                    f"{label}: module {module!r} has rank {parts['A'].shape[0]} (lora_A) / {parts['B'].shape[1]} "
                    f"(lora_B) factors, but its adapter_config gives r={rank}: the scaling α/r would be wrong "
                    "(PEFT refuses this adapter too)."
                )

    def _check_supported(self) -> None:
        peft_type = str(self.config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise ValueError(f"{self.label}: PEFT type {peft_type} is not supported; only LoRA adapters can be merged.")
        for flag, feature in _UNSUPPORTED_FLAGS.items():
            if self.config.get(flag):
                raise ValueError(f"{self.label}: {feature} is not supported by hf_merge's LoRA merging.")
        if self.config.get("bias", "none") != "none":
            raise ValueError(
                f"{self.label}: trained biases (bias={self.config['bias']!r}) are not supported; only bias='none'."
            )

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, label: str = "adapter", *, allow_pickle: bool = False) -> LoraAdapter:
        folder = Path(folder)
        config = load_json(folder / ADAPTER_CONFIG_NAME)
        if not isinstance(config, dict):
            raise ValueError(f"{folder / ADAPTER_CONFIG_NAME}: expected a JSON object.")
        if (folder / ADAPTER_WEIGHTS_NAME).is_file():
            from safetensors.torch import load_file

            tensors = load_file(str(folder / ADAPTER_WEIGHTS_NAME))
        elif (folder / "adapter_model.bin").is_file():
            if not allow_pickle:
                raise ValueError(
                    f"{label} ({folder}): only pickle weights found (adapter_model.bin); pass allow_pickle=True."
                )
            tensors = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"{label} ({folder}): no {ADAPTER_WEIGHTS_NAME} found.")
        return cls(config, tensors, f"{label} ({folder})")

    @classmethod
    def from_peft_model(cls, model: Any, adapter_name: str, label: str = "adapter") -> LoraAdapter:
        """One adapter of a ``PeftModel`` (or of a transformers model with adapters loaded)."""
        if adapter_name not in model.peft_config:
            raise ValueError(f"{label}: no adapter {adapter_name!r}; the model has {sorted(model.peft_config)}.")
        config = {k: getattr(v, "value", v) for k, v in model.peft_config[adapter_name].to_dict().items()}
        if hasattr(model, "get_adapter_state_dict") and not hasattr(model, "base_model"):
            tensors = model.get_adapter_state_dict(adapter_name)
        else:
            from peft import get_peft_model_state_dict

            tensors = get_peft_model_state_dict(model, adapter_name=adapter_name)
        return cls(config, {k: v.detach() for k, v in tensors.items()}, f"{label} (adapter {adapter_name!r})")

    def scaling(self, module: str) -> float:
        rank = _pattern_value(self.config.get("rank_pattern"), module, self.config.get("r", 8))
        alpha = _pattern_value(self.config.get("alpha_pattern"), module, self.config.get("lora_alpha", 8))
        if rank <= 0:
            raise ValueError(f"{self.label}: rank {rank} for module {module!r}.")
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def update(self, module: str, transposed: bool) -> LowRank:
        """ΔW of ``module`` as factors in the stored layout (``transposed`` for Conv1D / fan_in_fan_out)."""
        a, b = (self.factors_raw[module][p].to(torch.float32) for p in ("A", "B"))
        s = self.scaling(module)
        if module in self.embeddings:  # PEFT: ΔW = (B A)ᵀ s, stored (num_embeddings, dim)
            return LowRank(a.transpose(0, 1), b.transpose(0, 1) * s)
        if transposed:  # Conv1D stores (in, out): ΔW = (B A)ᵀ s
            return LowRank(a.transpose(0, 1), b.transpose(0, 1) * s)
        return LowRank(b * s, a)


def is_adapter_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG_NAME).is_file()


def is_peft_model(obj: Any) -> bool:
    return type(obj).__module__.startswith("peft") and hasattr(obj, "peft_config")


# --------------------------------------------------------------------------------------------- as a source
class LoraSource(LowRankSource):
    """A LoRA adapter seen as a fine-tuned model θ₀ + ΔW, once bound to the base (:meth:`bind`).

    ``delta(key)`` gives ΔW densely for the engine's methods; ``update(key)`` its factors for low-rank merging;
    ``replacement(key)`` a ``modules_to_save`` weight.
    """

    def __init__(self, adapter: LoraAdapter) -> None:
        super().__init__()
        self.adapter = adapter
        self.label = adapter.label
        self._updates: dict[str, str] = {}  # base key -> adapter module
        self._replacements: dict[str, str] = {}  # base key -> adapter tensor name

    def bind(self, base: TensorSource) -> None:
        """Map the adapter's module names (the model's in-memory names) to the base's keys and check shapes."""
        names = [f"{m}.weight" for m in self.adapter.factors_raw] + list(self.adapter.full_tensors)
        direct = all(base.has(n) or base.has(re.sub(r"\.modules_to_save\.[^.]+\.", ".", n)) for n in names)
        # In-memory and checkpoint names differ only for converted architectures: build the map only then.
        to_key = _IdentityKeys(base) if direct else memory_to_key(base)
        self._base = base
        self._updates.clear()
        self._replacements.clear()
        for module in self.adapter.factors_raw:
            key = to_key.get(f"{module}.weight")
            if key is None:
                raise MergeError(f"{self.label}: LoRA module {module!r} has no weight in the base model.")
            self._updates[key] = module
            transposed = self._is_transposed(key)
            shape = self.adapter.update(module, transposed).shape
            if tuple(shape) != base.meta(key).shape:
                raise MergeError(
                    f"{self.label}: LoRA update of {key!r} has shape {tuple(shape)}, base has {base.meta(key).shape}."
                )
        for name, tensor in self.adapter.full_tensors.items():
            key = to_key.get(re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)) or to_key.get(name)
            if key is None:
                raise MergeError(f"{self.label}: saved tensor {name!r} has no counterpart in the base model.")
            if tuple(tensor.shape) != base.meta(key).shape:
                raise MergeError(
                    f"{self.label}: saved {name!r} has shape {tuple(tensor.shape)}, base has {base.meta(key).shape}."
                )
            self._replacements[key] = name

    def _is_transposed(self, key: str) -> bool:
        module = self._updates[key]
        return bool(self.adapter.config.get("fan_in_fan_out")) and module not in self.adapter.embeddings

    @property
    def origin(self) -> str | None:
        path = self.adapter.label.rsplit("(", 1)[-1].rstrip(")")
        return path if os.path.isdir(path) else None

    def update(self, key: str) -> LowRank | None:
        """ΔW of ``key`` as factors, or ``None`` when the adapter does not target it."""
        module = self._updates.get(key)
        return None if module is None else self.adapter.update(module, self._is_transposed(key))

    def replacement(self, key: str) -> torch.Tensor | None:
        name = self._replacements.get(key)
        return None if name is None else self.adapter.full_tensors[name]

    def targeted_module(self, key: str) -> tuple[str, bool, bool] | None:
        """``(module, is an embedding, stored transposed)`` of a LoRA-targeted ``key``, else ``None``."""
        module = self._updates.get(key)
        if module is None:
            return None
        return module, module in self.adapter.embeddings, self._is_transposed(key)

    def saved_name(self, key: str) -> str | None:
        """The in-memory name of a ``modules_to_save`` weight replacing ``key`` (without PEFT's wrapper), else
        ``None``."""
        name = self._replacements.get(key)
        return None if name is None else re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)

    def delta(self, key: str, base: torch.Tensor) -> torch.Tensor:
        """ΔW (float32, on ``base``'s device): s·BA, saved − base for modules_to_save, or zeros."""
        update = self.update(key)
        if update is not None:
            return update.dense().to(base.device)
        replaced = self.replacement(key)
        if replaced is not None:
            return replaced.to(base.device, torch.float32) - base
        return torch.zeros_like(base)


class _IdentityKeys:
    """``memory_to_key`` for a base whose checkpoint names are the in-memory names."""

    def __init__(self, base: TensorSource) -> None:
        self._base = base

    def get(self, name: str) -> str | None:
        return self._base.resolve(name) if self._base.has(name) else None


def open_lora(obj: Any, label: str, *, allow_pickle: bool = False) -> list[tuple[str | None, LoraSource]]:
    """LoRA sources of a PEFT adapter folder (one) or a PeftModel (one per adapter, with its name)."""
    if is_peft_model(obj):
        return [(name, LoraSource(LoraAdapter.from_peft_model(obj, name, label))) for name in obj.peft_config]
    return [(None, LoraSource(LoraAdapter.from_folder(obj, label, allow_pickle=allow_pickle)))]




def peft_base_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The base weights under a PEFT-wrapped model (LoRA ``base_layer``s and ``original_module``s, no adapters)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = {}
    for name, tensor in inner.state_dict().items():
        if ".lora_" in name or ".modules_to_save." in name or "lora_magnitude_vector" in name:
            continue
        out[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = tensor
    return out
