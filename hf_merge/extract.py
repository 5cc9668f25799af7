"""LoRA extraction from full fine-tunes: the update ΔW = W_ft − W₀ of every linear module as LoRA factors.

LoRA (Hu et al. 2021, eq. 3) writes a fine-tuned weight as W = W₀ + B A with B: d × r and A: r × k. Given a full
fine-tune, the best rank-r factors in Frobenius (and spectral) norm come from the truncated SVD of ΔW (Eckart–Young
1936): ΔW ≈ U_r S_r V_rᵀ, and the factors are balanced, B = U_r √S_r, A = √S_r V_rᵀ, with ``lora_alpha = r`` so PEFT's
scaling α/r is 1. The SVD runs through :func:`hf_merge.linalg.top_k_svd` (Gram-matrix eigensolves with exact
fallbacks); ``energy`` picks per module the smallest r with Σ_{i≤r} σ_i² ≥ energy · Σ_i σ_i².

    adapter = hf_merge.extract_lora(base, finetuned, rank=16, output_dir="adapter/")

An extraction is the engine's run of Task Arithmetic with λ = 1 on the one fine-tune (the merged weights are the
fine-tune's) into :class:`~hf_merge.io.adapter_sink.AdapterSink`, which factors each module's (merged − base) as it
streams by; ``merge(..., output="lora")`` of full models is the same with the merge's method. What goes where:

- **LoRA factors**: the weights of ``Linear`` and GPT-2 ``Conv1D`` modules (``fan_in_fan_out``; classified by
  :mod:`hf_merge.params`), all or those ``targets`` names; embedding tables with ``embeddings="lora"`` (PEFT's
  ``lora_embedding_A/B``). A module whose update is exactly zero gets no factors.
- **modules_to_save**: embedding tables with ``embeddings="save"``, and every module holding no linear or embedding
  weight whose parameters changed (norms, convolutions, learned tokens): saved whole, so reproduced exactly.
- **left out, with a warning naming them**: what PEFT cannot hold beside LoRA factors — changed biases of the
  LoRA-targeted modules (PEFT's ``lora_bias`` would, but hf_merge does not read such adapters back), and linear
  weights of modules that are not ``Linear``/``Conv1D`` (e.g. fused mixture-of-experts stacks).
- **left out on request**: linear modules outside ``targets``, embeddings with ``embeddings="skip"``.

An output embedding tied to the input embedding (Llama with ``tie_word_embeddings``, GPT-2) follows it: the same
factors as LoRA on the output module, or the module saved too. Each module's kept rank and energy fraction are
recorded in ``merge_config.json`` (``summary.lora_extraction``) and summarised on the model card.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .lowrank import LowRank, truncate

if TYPE_CHECKING:
    from .inputs import Inputs
    from .io.adapter_sink import MergedAdapter
    from .io.sources import TensorSource
    from .linalg import EigensolveOrder
    from .tensors import TensorMeta

EMBEDDING_MODES = ("lora", "save", "skip")
#: Where an extraction's update came from: one fine-tune (:func:`extract_lora`) or a merge (``output="lora"``).
SOURCES = ("finetune", "merge")
#: What an extracted adapter's card cites: LoRA and the Eckart–Young theorem.
EXTRACTION_BIBTEX = ("""@inproceedings{hu2022lora,
  title     = {{LoRA}: Low-Rank Adaptation of Large Language Models},
  author    = {Hu, Edward J. and Shen, Yelong and Wallis, Phillip and Allen-Zhu, Zeyuan and Li, Yuanzhi and
               Wang, Shean and Wang, Lu and Chen, Weizhu},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2022},
  note      = {arXiv:2106.09685 (2021)}
}""", """@article{eckart1936approximation,
  title   = {The approximation of one matrix by another of lower rank},
  author  = {Eckart, Carl and Young, Gale},
  journal = {Psychometrika},
  volume  = {1},
  number  = {3},
  pages   = {211--218},
  year    = {1936}
}""")
_GRAM_ROWS = 4096  # rows per float64 block when the Gram matrix of a large ΔW is accumulated


@dataclasses.dataclass(frozen=True)
class Target:
    """How PEFT holds one LoRA-extracted weight: the in-memory ``module`` name, whether it is an embedding table
    (``lora_embedding_A/B``) and whether the weight is stored transposed (GPT-2 ``Conv1D``, ``fan_in_fan_out``)."""

    module: str
    embedding: bool = False
    transposed: bool = False


@dataclasses.dataclass
class ExtractionPlan:
    """Which base keys an extraction reads and what becomes of each (see the module docstring).

    ``lora``: key → :class:`Target`; ``saved``: key → in-memory name, saved (under ``modules_to_save``) if changed;
    ``dropped``: keys left out with a warning if changed; ``left_out``: modules not extracted on request;
    ``tied``: embedding key → the in-memory name of the output module tied to it."""

    lora: dict[str, Target]
    saved: dict[str, str]
    dropped: list[str]
    left_out: list[str]
    tied: dict[str, str]

    def wanted(self, order: Sequence[str]) -> list[str]:
        keys = set(self.lora) | set(self.saved) | set(self.dropped)
        return [key for key in order if key in keys]


@dataclasses.dataclass(frozen=True)
class LoraExtraction:
    """What to extract: exactly one of ``rank`` (an int, or ``{module pattern: rank}`` matched like PEFT's
    ``rank_pattern``, first match wins, every target must match one) and ``energy`` (in (0, 1]); ``targets`` (PEFT's
    ``target_modules`` rule: names a module path ends with, or one regex the whole path matches; ``None``: every
    linear module); ``embeddings`` (``"lora"``, ``"save"`` or ``"skip"``); ``source`` (what the card names: one
    ``"finetune"`` or a ``"merge"``)."""

    rank: int | Mapping[str, int] | None = None
    energy: float | None = None
    targets: Sequence[str] | str | None = None
    embeddings: str = "lora"
    source: str = "merge"

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.energy is None):
            raise ValueError("Give exactly one of rank= (LoRA rank, an int or {module pattern: rank}) and energy= "
                             f"(fraction of Σσ² kept per module); got rank={self.rank!r}, energy={self.energy!r}.")
        ranks = self.rank.items() if isinstance(self.rank, Mapping) else [("rank", self.rank)]
        if self.rank is not None and (not ranks or any(
                isinstance(r, bool) or not isinstance(r, int) or r < 1 for _, r in ranks)):
            raise ValueError(f"rank must be a positive integer or a {{module pattern: positive integer}} mapping, "
                             f"got {self.rank!r}.")
        if isinstance(self.rank, Mapping):
            object.__setattr__(self, "rank", dict(self.rank))
            for pattern in self.rank:
                _compile("rank", pattern)
        if self.energy is not None and (isinstance(self.energy, bool) or not isinstance(self.energy, (int, float))
                                        or not 0 < self.energy <= 1):
            raise ValueError(f"energy must be a number in (0, 1], got {self.energy!r}.")
        if isinstance(self.targets, str):
            _compile("targets", self.targets)
        elif self.targets is not None:
            if isinstance(self.targets, (bytes, Mapping)) or not isinstance(self.targets, Sequence) or not all(
                    isinstance(t, str) and t for t in self.targets) or not self.targets:
                raise ValueError(f"targets must be a regex string or a non-empty list of module names, got "
                                 f"{self.targets!r}.")
            object.__setattr__(self, "targets", tuple(self.targets))
        if self.embeddings not in EMBEDDING_MODES:
            raise ValueError(f"embeddings must be one of {list(EMBEDDING_MODES)}, got {self.embeddings!r}.")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {list(SOURCES)}, got {self.source!r}.")

    def to_dict(self) -> dict[str, Any]:
        targets = list(self.targets) if isinstance(self.targets, tuple) else self.targets
        return {"rank": self.rank, "energy": self.energy, "targets": targets, "embeddings": self.embeddings,
                "source": self.source}

    def targeted(self, module: str) -> bool:
        """Whether ``targets`` selects the linear module ``module`` (PEFT's ``target_modules`` rule)."""
        if self.targets is None:
            return True
        if isinstance(self.targets, str):
            return re.fullmatch(self.targets, module) is not None
        return any(_named(module, t) for t in self.targets)

    def rank_of(self, module: str) -> int | None:
        """The rank asked for ``module`` (``None`` with ``energy``); a mapping no pattern of which matches raises."""
        from .adapters import _pattern_value

        if not isinstance(self.rank, Mapping):
            return self.rank
        rank = _pattern_value(self.rank, module, None)
        if rank is not None:
            return rank
        raise ValueError(f"rank gives no rank for module {module!r}: none of the patterns {list(self.rank)} matches "
                         "it. Add a pattern (e.g. '.*' last, for every other module) or narrow targets=.")

    def plan(self, base: TensorSource, tasks: Mapping[str, TensorSource],
             metas: Mapping[str, TensorMeta]) -> ExtractionPlan:
        """Sort the base's floating-point keys (see :class:`ExtractionPlan`); raises when ``targets`` or a ``rank``
        mapping leaves something unmatched — before any tensor is read."""
        from .inputs import classify_sources, tied_embedding_keys
        from .io.sources import ModelSource
        from .models import meta_model
        from .params import ParamKind

        infos = classify_sources(base, tasks)
        model_source = next((s for s in (base, *tasks.values()) if isinstance(s, ModelSource)), None)
        if model_source is None and (model := meta_model(base.folder)) is not None:
            model_source = ModelSource(model, "architecture")
        memory = model_source.memory_names if model_source is not None else {}
        modules = dict(model_source.model.named_modules()) if model_source is not None else None

        def role(key: str) -> tuple[str, Target | None]:
            """``("lora" | "embedding" | "unsupported" | "other", target)`` of a weight key by its module's type (by
            its :class:`~hf_merge.params.ParamKind` when no model describes the architecture)."""
            info, name = infos[key], memory.get(key, key)
            module, _, param = name.rpartition(".")
            if info.kind not in (ParamKind.LINEAR, ParamKind.EMBEDDING) or param != "weight" or info.ndim != 2:
                return ("unsupported" if info.kind is ParamKind.LINEAR else "other"), None
            if modules is not None:
                layer = modules.get(module)
                if isinstance(layer, torch.nn.Embedding):
                    return "embedding", Target(module, embedding=True)
                if not _is_linear(layer):
                    return ("unsupported" if info.kind is ParamKind.LINEAR else "other"), None
            if info.kind is ParamKind.EMBEDDING:
                return "embedding", Target(module, embedding=True)
            return "lora", Target(module, transposed=info.transposed)

        floating = [key for key, meta in metas.items() if meta.dtype.is_floating_point]
        roles = {key: role(key) for key in floating}
        lora: dict[str, Target] = {}
        owners: dict[str, str] = {}  # module → what becomes of its weight: "lora", "save", "drop" or "skip"
        left_out: list[str] = []
        for key, (kind, target) in roles.items():
            if kind == "lora" and self.targeted(target.module):
                lora[key], owners[target.module] = target, "lora"
            elif kind == "lora":
                left_out.append(target.module)
                owners[target.module] = "skip"
            elif kind == "embedding":
                owners[target.module] = self.embeddings
                if self.embeddings == "lora":
                    lora[key] = target
                elif self.embeddings == "skip":
                    left_out.append(target.module)
            elif kind == "unsupported":
                owners[_module_of(memory.get(key, key))] = "drop"
        if self.targets is not None:
            self._check_targets([target.module for kind, target in roles.values() if kind == "lora"])
        for target in lora.values():
            self.rank_of(target.module)  # a rank mapping must cover every target
        saved: dict[str, str] = {}
        dropped: list[str] = []
        holders = [m for m, owner in owners.items() if owner != "save"]
        for key, (kind, target) in roles.items():
            if key in lora:
                continue
            name = memory.get(key, key)
            module = _module_of(name)
            owner = owners.get(module, "save")
            if owner == "skip":
                continue
            inside = any(holder.startswith(f"{module}.") for holder in holders) or module == ""
            if owner == "save" and not inside:
                saved[key] = name
            else:  # a bias of a LoRA module, a weight PEFT cannot hold, or a parameter of a module wrapping those
                dropped.append(key)
        tied: dict[str, str] = {}
        pair = tied_embedding_keys([base, *tasks.values()])
        if pair is not None:
            output, embedding = pair
            is_tied = base.resolve(output) == embedding or (not base.has(output) and base.has(embedding))
            if is_tied and embedding in metas and (embedding in lora or embedding in saved):
                tied[embedding] = memory.get(output, output)
        return ExtractionPlan(lora, saved, dropped, sorted(set(left_out)), tied)

    def _check_targets(self, linear_modules: list[str]) -> None:
        """``targets`` must select some linear module; with names, each name must."""
        if isinstance(self.targets, str):
            if not any(self.targeted(m) for m in linear_modules):
                raise ValueError(f"targets={self.targets!r} matches no linear module of the model (modules are named "
                                 f"like {linear_modules[:3]}).")
            return
        unmatched = [t for t in self.targets if not any(_named(m, t) for m in linear_modules)]
        if unmatched:
            kinds = sorted({m.rsplit(".", 1)[-1] for m in linear_modules})
            raise ValueError(f"targets {unmatched} match no linear module of the model; its linear modules end "
                             f"with {kinds}.")

    def factor(self, module: str, update: torch.Tensor | LowRank, device: torch.device | None = None,
               order: EigensolveOrder | None = None) -> tuple[LowRank, float]:
        """``(factors, energy fraction kept)`` of one module's update in the stored layout: the truncated SVD of a
        dense ΔW (:func:`truncated_factors`, ``order`` carried over the run's modules), or the Eckart–Young
        truncation of an update given as factors."""
        if isinstance(update, LowRank):
            kept = truncate(update, self.rank_of(module), self.energy)
            total = _squared_norm(update)
            return kept, min(_squared_norm(kept) / total, 1.0) if total else 1.0
        return truncated_factors(update.to(device) if device is not None else update, self.rank_of(module),
                                 self.energy, order)


def _squared_norm(update: LowRank) -> float:
    """‖P Q‖_F² = tr((PᵀP)(Q Qᵀ)), from the r × r Gram matrices of the factors."""
    p, q = update.P.double(), update.Q.double()
    return float(((p.transpose(0, 1) @ p) * (q @ q.transpose(0, 1))).sum())


def _is_linear(module: torch.nn.Module | None) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        Conv1D = ()  # type: ignore[assignment]
    return isinstance(module, (torch.nn.Linear, Conv1D))


def _named(module: str, name: str) -> bool:
    """PEFT's ``target_modules`` rule for a list entry: the module path is ``name`` or ends with ``.name``."""
    return module == name or module.endswith(f".{name}")


def _module_of(name: str) -> str:
    return name.rpartition(".")[0]


def _compile(parameter: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f"{parameter}: {pattern!r} is not a valid regular expression ({error}).") from None


def squared_singular_values(delta: torch.Tensor) -> torch.Tensor:
    """σ_i² of ``delta`` in descending order (float64): the eigenvalues of the float64 Gram matrix of its smaller
    side, accumulated in row blocks (no float64 copy of ``delta``)."""
    work = delta if delta.shape[0] >= delta.shape[1] else delta.transpose(0, 1)
    gram = torch.zeros(work.shape[1], work.shape[1], dtype=torch.float64, device=work.device)
    for rows in work.split(_GRAM_ROWS):
        block = rows.double()
        gram.addmm_(block.transpose(0, 1), block)
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.0)


def energy_rank(delta: torch.Tensor, energy: float) -> int:
    """The smallest r with Σ_{i≤r} σ_i² ≥ ``energy`` · Σ_i σ_i² (0 for a zero matrix)."""
    squares = squared_singular_values(delta)
    total = float(squares.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(squares, 0) / total
    return min(int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=torch.float64))) + 1,
               squares.numel())


def truncated_factors(delta: torch.Tensor, rank: int | None = None, energy: float | None = None,
                      order: EigensolveOrder | None = None) -> tuple[LowRank, float]:
    """``(LowRank(B, A), energy fraction kept)``: ΔW ≈ U_r S_r V_rᵀ (Eckart–Young), B = U_r √S_r, A = √S_r V_rᵀ
    (Hu et al. 2021, eq. 3 with scaling 1), r = ``rank`` (at most min(m, n)) or :func:`energy_rank`; float32 factors
    on ``delta``'s device through :func:`hf_merge.linalg.top_k_svd` (``order``: its eigensolve order over a run).
    A zero ΔW gives rank 0."""
    from .linalg import top_k_svd

    delta = delta.to(torch.float32)
    if not delta.any():  # an unchanged module
        return LowRank.zero(*delta.shape), 1.0
    total = float(torch.linalg.vector_norm(delta)) ** 2
    u, s, v = top_k_svd(delta, min(rank, *delta.shape) if rank is not None else energy_rank(delta, energy), order)
    root = s.sqrt()
    return LowRank(u * root, (v * root).transpose(0, 1)), min(float(s.double().square().sum()) / total, 1.0)


def extract_lora(
    base: Inputs,
    finetuned: Inputs,
    rank: int | Mapping[str, int] | None = None,
    energy: float | None = None,
    targets: Sequence[str] | str | None = None,
    embeddings: str = "lora",
    output_dir: str | os.PathLike | None = None,
    **options: Any,
) -> MergedAdapter | str:
    """Extract a PEFT LoRA adapter from a full fine-tune: per linear module ΔW = W_ft − W₀ ≈ B A by its truncated
    SVD (the Eckart–Young optimum at that rank; LoRA's W₀ + B A, Hu et al. 2021), streamed tensor by tensor.

    Args:
        base: the pre-trained model W₀ — anything :func:`hf_merge.merge` accepts as a base (model, checkpoint folder,
            Hub id, state dict).
        finetuned: the full fine-tune of ``base`` (same kinds; a PEFT adapter is re-extracted at the new rank).
        rank: the LoRA rank of every module (capped at min(rows, cols)), or ``{module pattern: rank}`` (PEFT's
            ``rank_pattern`` matching, first match wins; e.g. ``{"q_proj": 32, ".*": 8}``). Modules whose rank
            differs from the adapter's ``r`` (the most common) are written to ``rank_pattern``/``alpha_pattern``.
        energy: instead of ``rank``: per module, the smallest rank keeping this fraction of Σσ² (in (0, 1]).
        targets: the linear modules to extract (PEFT's ``target_modules``: names a module path ends with, e.g.
            ``["q_proj", "v_proj"]``, or one regex the whole path matches); ``None``: every ``Linear``/``Conv1D``.
        embeddings: embedding tables as LoRA embedding factors (``"lora"``), saved whole (``"save"``,
            ``modules_to_save``) or left out (``"skip"``).
        output_dir: write the adapter there (``adapter_config.json``, ``adapter_model.safetensors``,
            ``merge_config.json``, model card; atomically; a non-empty folder hf_merge did not write is refused
            unless ``overwrite=True``) and return its path; otherwise return the
            :class:`~hf_merge.MergedAdapter` (``save_pretrained``, ``push_to_hub``, ``to_peft_model``).
        **options: run options of :func:`hf_merge.merge` (``device`` for the SVDs, ``dtype`` of the factors,
            ``progress``, ``overwrite``, ``allow_pickle``, Hub ``revision``/``token``/``cache_dir``, card ``license``,
            ``tags``, ``base_model``).

    Changed norms and other modules without a linear or embedding weight go to ``modules_to_save``; changed biases of
    extracted modules cannot be held by LoRA and are left out with a warning naming them (see :mod:`hf_merge.extract`).

    Example:
        >>> hf_merge.extract_lora("meta-llama/Llama-3.2-1B", "my-finetune/", rank=32, output_dir="adapter/")
    """
    from .engine import Plan, run
    from .inputs import describe_inputs, open_inputs
    from .io.adapter_sink import AdapterSink
    from .methods.task_arithmetic import TaskArithmeticConfig
    from .options import split_options
    from .record import MergeRecord
    from .registry import get_merger
    from .vocab import VOCABULARY_OPTIONS

    extraction = LoraExtraction(rank=rank, energy=energy, targets=targets, embeddings=embeddings, source="finetune")
    run_options = split_options(options)
    if options:
        raise TypeError(f"extract_lora() got unexpected keyword argument(s) {sorted(options)}.")
    run_options.reject(VOCABULARY_OPTIONS, "extract_lora (the adapter keeps the base's vocabulary)")
    base_source, tasks = open_inputs(base, {"finetuned": finetuned}, run_options)
    config = TaskArithmeticConfig(scaling=1.0)  # θ₀ + 1·(θ_ft − θ₀): the merged weights are the fine-tune's
    record = MergeRecord(config, describe_inputs(base_source, tasks), artifact="adapter", card=run_options.card)
    sink = AdapterSink(base_source, tasks, run_options, output_dir=output_dir, inputs=record.input_folders(),
                       extraction=extraction)
    return run(Plan(base_source, tasks, get_merger(config), record), sink, run_options)


def summarize(ranks: Mapping[str, int], energies: Mapping[str, float]) -> list[dict[str, Any]]:
    """Per kind of module (its name with the block indices as ``*``: ``model.layers.*.self_attn.q_proj``): how many
    were extracted, the range of their ranks, and the least and mean energy fraction kept — the model card's table."""
    groups: dict[str, list[str]] = {}
    for module in ranks:
        groups.setdefault(re.sub(r"(^|\.)\d+(?=\.)", r"\1*", module), []).append(module)
    rows = []
    for name, members in groups.items():
        kept = [energies[m] for m in members]
        low, high = min(ranks[m] for m in members), max(ranks[m] for m in members)
        rows.append({"modules": name, "count": len(members), "rank": str(low) if low == high else f"{low}–{high}",
                     "min_energy": round(min(kept), 6), "mean_energy": round(math.fsum(kept) / len(kept), 6)})
    return rows


def adapter_rank(ranks: Mapping[str, int]) -> int:
    """The adapter's ``r``: the most common module rank (the largest among equally common ones)."""
    counts = Counter(ranks.values())
    return max(counts, key=lambda r: (counts[r], r)) if counts else 1


__all__ = ["EMBEDDING_MODES", "EXTRACTION_BIBTEX", "ExtractionPlan", "LoraExtraction", "Target", "adapter_rank", "energy_rank",
           "extract_lora", "squared_singular_values", "summarize", "truncated_factors"]
