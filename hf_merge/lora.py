"""PEFT LoRA adapters as merge inputs, and merged LoRA adapters as outputs — computed in low-rank form.

An adapter module contributes ΔW = s · B A with the adapter's own scaling s (``lora_alpha / r``, or
``lora_alpha / √r`` with ``use_rslora``, per-module ``rank_pattern`` / ``alpha_pattern``), transposed for
``fan_in_fan_out`` layers (GPT-2 ``Conv1D``) and embeddings. Modules an adapter does not target contribute 0;
``modules_to_save`` weights replace the base's (their delta is saved − base).

Every update is kept as factors ΔW = P Q (P: rows × r, Q: r × cols, in the stored weight's layout). For output
``"lora"``, Task Arithmetic, TSV-M and Iso-C / Iso-CTS are computed from the factors — thin QR of the stacked P's
and Qᵀ's and an SVD of the small core — so no rows × cols matrix is formed. Other methods (TIES, DARE, consensus,
...) are elementwise: they are run densely per module by the engine and the merged update is re-factored by a
truncated SVD (documented in :func:`merge_lora`).

Unsupported PEFT features raise with the feature named: DoRA, ``lora_bias``, trained biases (``bias != "none"``),
``target_parameters``, trainable tokens, layer replication, QALoRA, aLoRA, conv LoRA and non-LoRA PEFT types.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .io.sources import TensorMeta, TensorSource
from .linalg import polar

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
LOW_RANK_METHODS = ("task_arithmetic", "average", "tsv_m", "iso_c", "iso_cts")


# --------------------------------------------------------------------------------------------- factors
@dataclasses.dataclass
class LowRank:
    """ΔW = P Q in the stored weight's layout (P: rows × r, Q: r × cols), float32."""

    P: torch.Tensor
    Q: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.P.shape[0], self.Q.shape[1]

    @property
    def rank(self) -> int:
        return self.P.shape[1]

    def dense(self) -> torch.Tensor:
        return self.P @ self.Q

    def scaled(self, factor: float) -> LowRank:
        return LowRank(self.P * factor, self.Q)


def lowrank_svd(P: torch.Tensor, Q: torch.Tensor, tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, s, V) of P Q from its factors: P = Q_P R_P, Qᵀ = Q_Q R_Q, SVD of the r × r core R_P R_Qᵀ.

    Singular triplets below ``tol · s_max`` (the numerical null space) are dropped. Computed in float64.
    """
    if P.shape[1] == 0:
        return P.new_zeros(P.shape[0], 0), P.new_zeros(0), Q.new_zeros(Q.shape[1], 0)
    q_p, r_p = torch.linalg.qr(P.double())
    q_q, r_q = torch.linalg.qr(Q.double().transpose(0, 1))
    u_c, s, v_ch = torch.linalg.svd(r_p @ r_q.transpose(0, 1), full_matrices=False)
    keep = s > tol * s[0] if s.numel() and s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    u, v = q_p @ u_c[:, keep], q_q @ v_ch.transpose(0, 1)[:, keep]
    return u.float(), s[keep].float(), v.float()


def stack_factors(parts: Sequence[LowRank], weights: Sequence[float]) -> LowRank:
    """Σ_t w_t P_t Q_t as one factor pair [w_1 P_1 … w_T P_T] [Q_1; …; Q_T] (exact)."""
    return LowRank(torch.cat([p.P * w for p, w in zip(parts, weights)], dim=1), torch.cat([p.Q for p in parts], dim=0))


def lowrank_tsv_merge(parts: Sequence[LowRank], k: int) -> LowRank:
    """TSV-M from factors: per task the top-k singular triplets of P_t Q_t (its non-zero ones: k_t ≤ rank),
    concatenated, U⊥ = polar([U_t]), V⊥ = polar([V_t]); ΔM = U⊥ diag(s) V⊥ᵀ.

    Components with zero singular value are dropped: a dense SVD fills them with arbitrary null-space vectors.
    """
    us, ss, vs = [], [], []
    for part in parts:
        u, s, v = lowrank_svd(part.P, part.Q)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(v[:, :k])
    u_cat, s_cat, v_cat = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vs, dim=1)
    if s_cat.numel() == 0:
        return LowRank(u_cat, v_cat.transpose(0, 1))
    return LowRank(polar(u_cat) * s_cat, polar(v_cat).transpose(0, 1))


def lowrank_iso_c(parts: Sequence[LowRank], full_rank: int) -> LowRank:
    """Iso-C restricted to the range of M = Σ_t Δ_t: (‖M‖_* / r) U_R V_Rᵀ with r = min(rows, cols).

    Dense Iso-C also gives mean(S) to the null space of a rank-deficient M, whose singular vectors are arbitrary;
    here they are left out (the spec's opt-in deviation, unavoidable in low-rank form).
    """
    total = stack_factors(parts, [1.0] * len(parts))
    u, s, v = lowrank_svd(total.P, total.Q)
    return LowRank(u * (s.sum() / full_rank), v.transpose(0, 1))


def lowrank_iso_cts(parts: Sequence[LowRank], full_rank: int, common_space_fraction: float) -> LowRank:
    """Iso-CTS from factors, restricted to numerical ranges like :func:`lowrank_iso_c`.

    The common space is the top c (≤ rank M) triplets of M = Σ_t Δ_t; each task adds the top p triplets of
    (I − U_c U_cᵀ) Δ_t; the result is mean(s_cat) polar(U_cat) polar(V_cat)ᵀ, the mean taken over the c + T·p slots
    of the dense method (slots beyond a rank count as zeros).
    """
    from .methods.iso import iso_cts_sizes

    common, per_task = iso_cts_sizes(full_rank, len(parts), common_space_fraction)
    total = stack_factors(parts, [1.0] * len(parts))
    u_all, s_all, v_all = lowrank_svd(total.P, total.Q)
    u_c, s_c, v_c = u_all[:, :common], s_all[:common], v_all[:, :common]
    us, ss, vs = [], [], []
    if per_task > 0:
        for part in parts:
            projected = part.P - u_c @ (u_c.transpose(0, 1) @ part.P)
            u, s, v = lowrank_svd(projected, part.Q)
            us.append(u[:, :per_task])
            ss.append(s[:per_task])
            vs.append(v[:, :per_task])
    u_cat = torch.cat([*us, u_c], dim=1)
    v_cat = torch.cat([*vs, v_c], dim=1)
    mean = torch.cat([*ss, s_c]).sum() / (common + len(parts) * per_task)
    return LowRank(polar(u_cat) * mean, polar(v_cat).transpose(0, 1))


def truncate(update: LowRank, rank: int | None = None, energy: float | None = None) -> LowRank:
    """The best rank-k approximation (Eckart–Young) of P Q: k = ``rank``, or the fewest triplets holding an
    ``energy`` fraction of Σ s² (balanced: P = U √s, Q = √s Vᵀ). Neither: the factors unchanged (exact)."""
    if rank is None and energy is None:
        return update
    u, s, v = lowrank_svd(update.P, update.Q)
    k = s.numel()
    if rank is not None:
        k = min(k, rank)
    if energy is not None and s.numel():
        cumulative = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum()
        k = min(k, int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=torch.float64) - 1e-12)) + 1)
    root = s[:k].sqrt()
    return LowRank(u[:, :k] * root, (v[:, :k] * root).transpose(0, 1))


# --------------------------------------------------------------------------------------------- adapters
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
        config = json.loads((folder / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8"))
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
class LoraSource(TensorSource):
    """A LoRA adapter seen as a fine-tuned model θ₀ + ΔW, once bound to the base (:meth:`bind`).

    ``delta(key)`` gives ΔW densely for the engine's methods; ``update(key)`` its factors for low-rank merging.
    """

    def __init__(self, adapter: LoraAdapter) -> None:
        super().__init__()
        self.adapter = adapter
        self.label = adapter.label
        self._base: TensorSource | None = None
        self._updates: dict[str, str] = {}  # base key -> adapter module
        self._replacements: dict[str, str] = {}  # base key -> adapter tensor name

    def bind(self, base: TensorSource) -> None:
        """Map the adapter's module names (the model's in-memory names) to the base's keys and check shapes."""
        from .engine import MergeError, memory_to_key

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
    def bound_base(self) -> TensorSource:
        if self._base is None:
            raise RuntimeError(f"{self.label} is not bound to a base model yet.")
        return self._base

    def keys(self) -> list[str]:
        return self.bound_base.keys()

    def meta(self, key: str) -> TensorMeta:
        return self.bound_base.meta(key)

    @property
    def config(self) -> Any:
        return self.bound_base.config if self._base is not None else None

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

    def delta(self, key: str, base: torch.Tensor) -> torch.Tensor:
        """ΔW (float32, on ``base``'s device): s·BA, saved − base for modules_to_save, or zeros."""
        update = self.update(key)
        if update is not None:
            return update.dense().to(base.device)
        replaced = self.replacement(key)
        if replaced is not None:
            return replaced.to(base.device, torch.float32) - base
        return torch.zeros_like(base)

    def _read(self, key: str) -> torch.Tensor:
        base = self.bound_base.get(key)
        if not base.dtype.is_floating_point:
            return base
        return (base.to(torch.float32) + self.delta(key, base.to(torch.float32))).to(base.dtype)


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


# --------------------------------------------------------------------------------------------- output
@dataclasses.dataclass
class MergedAdapter:
    """A merged LoRA adapter in PEFT format: ``adapter_config`` values and ``adapter_model`` tensors.

    Every module has its own rank (``rank_pattern``) and ``alpha == rank`` (``alpha_pattern``), so its scaling is 1
    and ΔW = B A exactly as merged.
    """

    adapter_config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    merge_config: Any
    merge_inputs: dict[str, Any]

    @property
    def ranks(self) -> dict[str, int]:
        return {re.sub(r"\\(.)", r"\1", k): v for k, v in self.adapter_config["rank_pattern"].items()}

    def lora_config(self) -> Any:
        from peft import LoraConfig

        fields = {f.name for f in dataclasses.fields(LoraConfig)}
        return LoraConfig(**{k: v for k, v in self.adapter_config.items() if k in fields and k != "peft_type"})

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write ``adapter_config.json``, ``adapter_model.safetensors``, ``merge_config.json`` and a model card
        (atomically); ``PeftModel.from_pretrained`` and transformers' ``load_adapter`` load the folder."""
        from safetensors.torch import save_file

        from .hub import write_card
        from .io.writer import atomic_directory

        with atomic_directory(save_directory) as tmp:
            (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(self.adapter_config, indent=2) + "\n", encoding="utf-8")
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
            save_file(tensors, str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
            self.merge_config.save_pretrained(tmp)
            write_card(tmp, self.merge_config, self.merge_inputs, artifact="adapter")
        return str(save_directory)

    def push_to_hub(self, repo_id: str, **push_options: Any) -> Any:
        """Save to a temporary folder and upload it in one commit (see :func:`hf_merge.hub.push_folder`)."""
        import tempfile

        from .hub import push_folder

        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "adapter"
            self.save_pretrained(folder)
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


def _zero_update(rows: int, cols: int) -> LowRank:
    return LowRank(torch.zeros(rows, 0), torch.zeros(0, cols))


def _lowrank_merge(merger: Any, parts: list[LowRank], info: Any) -> LowRank:
    """The merged update of one matrix from the tasks' factors, for the methods with a low-rank form."""
    from .methods.tsv import is_svd_treated, task_rank

    config = merger.config
    rows, cols = parts[0].shape
    if config.method == "task_arithmetic":
        return stack_factors(parts, [config.scaling] * len(parts))
    if config.method == "average":
        total = sum(merger.weights)
        return stack_factors(parts, [w / total for w in merger.weights])
    if not is_svd_treated(info, config.exclude):  # TSV / Iso average the excluded matrices
        return stack_factors(parts, [config.scaling / len(parts)] * len(parts))
    if config.method == "tsv_m":
        k = task_rank((rows, cols), len(parts), config.rank_fraction)
        return lowrank_tsv_merge(parts, k).scaled(config.scaling)
    if config.method == "iso_c":
        return lowrank_iso_c(parts, min(rows, cols)).scaled(config.scaling)
    return lowrank_iso_cts(parts, min(rows, cols), config.common_space_fraction).scaled(config.scaling)


def _dense_to_lowrank(delta: torch.Tensor) -> LowRank:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    keep = s > 1e-6 * s[0] if s.numel() and s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    return LowRank((u[:, keep] * s[keep]).float(), vh[keep].float())


def merge_lora(
    base: TensorSource,
    tasks: Mapping[str, TensorSource],
    config: Any,
    *,
    rank: int | None = None,
    energy: float | None = None,
    progress: bool = True,
) -> MergedAdapter:
    """Merge LoRA adapters into one LoRA adapter.

    Task Arithmetic, averaging, TSV-M and Iso-C / Iso-CTS run on the factors (no rows × cols matrix). Every other
    method is elementwise and runs densely per module through the engine; its merged ΔW is then factored by an SVD.
    Each module's update is finally truncated to ``rank`` triplets, or to the fewest holding an ``energy`` fraction
    of Σ s² (neither: every non-zero triplet, i.e. no approximation). ``modules_to_save`` weights are merged densely
    and saved as ``modules_to_save``.
    """
    from .engine import MergeContext, MergeError, RunOptions, classify_sources, run_merger, validate_sources
    from .registry import get_merger

    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}.")
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}.")
    not_lora = [name for name, source in tasks.items() if not isinstance(source, LoraSource)]
    if not_lora:
        raise MergeError(f"output='lora' needs LoRA adapters as inputs; {not_lora} are full models.")
    merger = get_merger(config)
    metas = validate_sources(base, tasks)
    lora_tasks: dict[str, LoraSource] = dict(tasks)  # type: ignore[arg-type]
    targeted = [k for k in metas if any(t.update(k) is not None for t in lora_tasks.values())]
    replaced = [k for k in metas if any(t.replacement(k) is not None for t in lora_tasks.values())]
    both = sorted(set(targeted) & set(replaced))
    if both:
        raise MergeError(f"{both} are LoRA-targeted in one adapter and saved whole (modules_to_save) in another.")
    if merger.uses_param_info:
        infos = classify_sources(base, tasks)
    else:
        from .params import classify_parameters

        infos = classify_parameters(base.shapes(), config=base.config)
    ctx = MergeContext(base, tasks, infos, metas, progress=progress)
    merged_updates: dict[str, LowRank] = {}
    if merger.config.method in LOW_RANK_METHODS:
        merger.prepare(ctx)
        from tqdm.auto import tqdm

        for key in tqdm(targeted, desc=f"merging LoRA ({merger.config.method})", disable=not progress):
            rows, cols = metas[key].shape
            parts = [t.update(key) or _zero_update(rows, cols) for t in lora_tasks.values()]
            merged_updates[key] = _lowrank_merge(merger, parts, infos[key])
        full_values = {}
        for key in replaced:
            theta0, deltas = ctx.load(key)
            full_values[key] = theta0 + merger.merge_tensor(key, theta0, deltas, infos[key])
    else:  # elementwise methods: the engine merges densely, then each targeted ΔW is factored
        merged = run_merger(merger, base, tasks, RunOptions(progress=progress, state_dict=True))
        for key in targeted:
            merged_updates[key] = _dense_to_lowrank(merged[key].float() - base.get(key).float())
        full_values = {key: merged[key] for key in replaced}

    module_of = {}
    for source in lora_tasks.values():
        for key, module in source._updates.items():
            module_of.setdefault(key, (module, module in source.adapter.embeddings, source._is_transposed(key)))
    first = next(iter(lora_tasks.values())).adapter.config
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    fan_in_fan_out = False
    for key, update in merged_updates.items():
        update = truncate(update, rank, energy)
        if update.rank == 0:
            continue
        module, is_embedding, transposed = module_of[key]
        out_dtype = metas[key].dtype
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
    key_to_memory = {}
    for source in lora_tasks.values():
        for key, name in source._replacements.items():
            key_to_memory.setdefault(key, re.sub(r"\.modules_to_save\.[^.]+\.", ".", name))
    modules_to_save = sorted({key_to_memory[k].rsplit(".", 1)[0] for k in full_values})
    for key, value in full_values.items():
        tensors[_PREFIX + key_to_memory[key]] = value.to(metas[key].dtype)
    if not ranks and not modules_to_save:
        raise MergeError("The merged adapter is empty: every merged update is zero.")
    top_rank = max(ranks.values(), default=1)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": first.get("task_type"),
        "base_model_name_or_path": first.get("base_model_name_or_path"),
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
    from .engine import describe_inputs

    return MergedAdapter(adapter_config, tensors, merger.config, describe_inputs(base, tasks))


def peft_base_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The base weights under a PEFT-wrapped model (LoRA ``base_layer``s and ``original_module``s, no adapters)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = {}
    for name, tensor in inner.state_dict().items():
        if ".lora_" in name or ".modules_to_save." in name or "lora_magnitude_vector" in name:
            continue
        out[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = tensor
    return out


def merge_adapters(
    model: Any,
    adapter_names: Sequence[str],
    config: Any,
    adapter_name: str = "merged",
    *,
    rank: int | None = None,
    energy: float | None = None,
    progress: bool = False,
    **overrides: Any,
) -> Any:
    """Merge adapters already loaded in ``model`` (a ``PeftModel``, or a transformers model with adapters loaded
    through ``load_adapter``) into a new adapter ``adapter_name`` added to the same model — like PEFT's
    ``add_weighted_adapter``, but with any hf_merge method, computed in low-rank form where the method allows.

    Returns the :class:`MergedAdapter` (already loaded into ``model``).
    """
    import tempfile

    from .io.sources import StateDictSource
    from .registry import make_config

    if not hasattr(model, "peft_config"):
        raise TypeError("merge_adapters needs a PeftModel or a transformers model with adapters loaded.")
    if adapter_name in model.peft_config:
        raise ValueError(f"The model already has an adapter named {adapter_name!r}.")
    if len(adapter_names) < 1:
        raise ValueError("adapter_names is empty.")
    base = StateDictSource(peft_base_state_dict(model), "base (under the adapters)")
    tasks = {
        name: LoraSource(LoraAdapter.from_peft_model(model, name, f"adapter {name!r}")) for name in adapter_names
    }
    merged = merge_lora(base, tasks, make_config(config, **overrides), rank=rank, energy=energy, progress=progress)
    with tempfile.TemporaryDirectory() as tmp:
        merged.save_pretrained(Path(tmp) / "adapter")
        if hasattr(model, "base_model"):  # PeftModel
            model.load_adapter(str(Path(tmp) / "adapter"), adapter_name=adapter_name)
        else:  # transformers' PEFT integration
            model.load_adapter(str(Path(tmp) / "adapter"), adapter_name=adapter_name)
    return merged
