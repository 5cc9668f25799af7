"""Mixture-of-Experts assembly from dense fine-tunes, as mergekit-moe builds it (``mergekit/moe/``).

    hf_merge.assemble_moe("base", {"code": "code-ft", "math": "math-ft"},
                          prompts={"code": ["def fib(n):"], "math": ["Solve 3x + 2 = 11."]}, output_dir="moe")
    hf_merge.read_moe_recipe("moe.yml").assemble("moe")    # mergekit-moe's YAML schema

The output is a sparse MoE (Mixtral: Jiang et al. 2024, "Mixtral of Experts", arXiv:2401.04088; Qwen2-MoE;
Qwen3-MoE) whose attention, norms, embeddings and LM head are the base's, and whose experts in every layer are the
fine-tuned models' MLPs (gate/up/down projections), one expert per model. Each layer's router ("gate") gets one row
per expert, from :data:`GATE_MODES` (mergekit's ``get_gate_params``):

- ``hidden`` (= ``hidden_last``): the base model's hidden state at the layer's input (``hidden_states[layer]``) at
  the last token of each positive prompt, averaged over the prompts, minus the same for the negative prompts,
  normalised to unit length; ``hidden_avg`` averages over each prompt's tokens instead of taking the last one;
- ``cheap_embed``: the sum of the prompts' token embeddings, normalised, minus the same for the negatives,
  normalised again; the same row in every layer;
- ``random``: standard normal entries; ``uniform_random``: U(−1/√d, 1/√d), ``nn.Linear``'s initialisation; seeded.

Prompts are tokenized as mergekit does: the tokenizer's BOS token text prepended, no other special tokens, left
padding. Supported outputs (:data:`ARCHITECTURES`), by the dense base's ``model_type``: ``mixtral`` (llama, mistral),
``qwen2_moe`` (llama, mistral, qwen2; exactly one shared expert, as mergekit requires, with a sigmoid gate whose row
comes from the shared expert's prompts like the others) and ``qwen3_moe`` (qwen3). The tensors are written under the
checkpoint names transformers 5 loads for that class, checked against the class built on the meta device, and
streamed one at a time from the inputs (only the ``hidden`` modes load the base model, once, to run the prompts).

Departures from mergekit-moe: the output keeps the base's sliding-window attention (mergekit drops it for Mixtral
and Qwen2-MoE); ``hidden_avg`` averages over each prompt's tokens, not its padding; random gates come from a
generator seeded by ``seed``; experts' ``noise_scale`` / ``residual_scale`` are refused (not supported yet); an
expert whose tensors differ in shape from the base's anywhere is refused, naming the tensor.

One concern in one file (~780 lines): the output architecture's names, the gates from prompts and the streamed
expert tensors must agree on every layer and expert index.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .config import CONFIG_NAME, INPUTS_KEY, SerializableConfig, check_choice, did_you_mean, write_json
from .errors import MergeError, warn
from .io.sources import TensorMeta, TensorSource

GATE_MODES = ("hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random")
#: The modes that read prompts (and need a tokenizer).
PROMPT_MODES = ("hidden", "hidden_last", "hidden_avg", "cheap_embed")
#: The input name of the shared expert (Qwen2-MoE), in ``prompts`` and in the card.
SHARED_EXPERT = "shared_expert"
EMBEDDINGS = "model.embed_tokens.weight"
_DENSE_MLP = "model.layers.{layer}.mlp.{proj}.weight"
_PROMPT_BATCH = 16
#: Above this condition number a layer's router rows are nearly dependent (mergekit's ``warn_degenerate_gates``).
_DEGENERATE_CONDITION = 5.0
#: Options an MoE assembly cannot honour.
_UNSUPPORTED_OPTIONS = ("memory_budget", "device_map", "max_memory", "offload_folder", "tokenizer_source",
                        "chat_template", "pad_to_multiple_of")


@dataclasses.dataclass(frozen=True)
class MoEArchitecture:
    """One output architecture: its transformers classes, the dense ``model_type`` s it takes, and the checkpoint
    names (templates in ``layer``, ``expert``, ``proj``) of its experts (``projections``: its projection name → the
    dense MLP's), router, and shared expert with its gate, if it has one."""

    name: str
    model_class: str
    config_class: str
    inputs: tuple[str, ...]
    expert: str
    projections: Mapping[str, str]
    router: str
    shared: str | None = None
    shared_gate: str | None = None


_QWEN_PROJECTIONS = {p: p for p in ("gate_proj", "up_proj", "down_proj")}
ARCHITECTURES = {
    "mixtral": MoEArchitecture(
        "mixtral", "MixtralForCausalLM", "MixtralConfig", ("llama", "mistral"),
        "model.layers.{layer}.block_sparse_moe.experts.{expert}.{proj}.weight",
        {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}, "model.layers.{layer}.block_sparse_moe.gate.weight"),
    "qwen2_moe": MoEArchitecture(
        "qwen2_moe", "Qwen2MoeForCausalLM", "Qwen2MoeConfig", ("llama", "mistral", "qwen2"),
        "model.layers.{layer}.mlp.experts.{expert}.{proj}.weight", _QWEN_PROJECTIONS, "model.layers.{layer}.mlp.gate.weight",
        shared="model.layers.{layer}.mlp.shared_expert.{proj}.weight",
        shared_gate="model.layers.{layer}.mlp.shared_expert_gate.weight"),
    "qwen3_moe": MoEArchitecture(
        "qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeConfig", ("qwen3",),
        "model.layers.{layer}.mlp.experts.{expert}.{proj}.weight", _QWEN_PROJECTIONS,
        "model.layers.{layer}.mlp.gate.weight"),
}


def _supported() -> str:
    return "; ".join(f"{a.name} (from {', '.join(a.inputs)})" for a in ARCHITECTURES.values())


def _prompt_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"{what} must be a list of strings, got {value!r}.")
    return list(value)


@dataclasses.dataclass(kw_only=True)
class MoEConfig(SerializableConfig):
    """What an MoE assembly does, saved as ``merge_config.json``: the experts by name with their prompts
    (``{name: {"positive_prompts": [...], "negative_prompts": [...]}}``), the gate mode, the experts each token is
    routed to, the output architecture (``None``: chosen from the base, see :func:`assemble_moe`), the shared
    expert's prompts (``None``: no shared expert) and the seed of the random gate modes."""

    method: str = dataclasses.field(default="moe", init=False)
    experts: dict[str, dict[str, list[str]]]
    gate_mode: str = "hidden"
    experts_per_token: int = 2
    architecture: str | None = None
    shared_expert: dict[str, list[str]] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("gate_mode", self.gate_mode, GATE_MODES)
        if self.architecture is not None and self.architecture not in ARCHITECTURES:
            raise ValueError(f"Unknown MoE architecture {self.architecture!r}{did_you_mean(self.architecture, ARCHITECTURES)}"
                             f"; supported: {_supported()}.")
        if not isinstance(self.experts, Mapping) or not self.experts:
            raise ValueError("experts is empty: an MoE needs at least one expert model.")
        self.experts = {str(name): self._prompts(entry, f"expert {name!r}") for name, entry in self.experts.items()}
        for reserved in ("base", SHARED_EXPERT):
            if reserved in self.experts:
                raise ValueError(f"An expert may not be named {reserved!r} (it names the {reserved.replace('_', ' ')}).")
        if self.shared_expert is not None:
            self.shared_expert = self._prompts(self.shared_expert, "the shared expert")
        k = self.experts_per_token
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"experts_per_token must be an integer >= 1, got {k!r}.")
        if k > len(self.experts):
            raise ValueError(f"experts_per_token={k} but there are only {len(self.experts)} experts "
                             f"{list(self.experts)}: give at least as many experts as experts_per_token.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an integer, got {self.seed!r}.")
        if self.gate_mode in PROMPT_MODES:
            entries = {**self.experts, **({SHARED_EXPERT: self.shared_expert} if self.shared_expert is not None else {})}
            for name, entry in entries.items():
                if not entry["positive_prompts"]:
                    raise ValueError(f"gate_mode={self.gate_mode!r} routes by prompts, but the {name!r} expert has no "
                                     f"positive prompts: give prompts={{{name!r}: [...]}} (or gate_mode='random').")
            rows = [(tuple(e["positive_prompts"]), tuple(e["negative_prompts"])) for e in self.experts.values()]
            if len(rows) > 1 and len(set(rows)) == 1:
                raise ValueError("Every expert has the same prompts: the routers could not tell them apart. Give each "
                                 "expert prompts of what it should receive.")

    @staticmethod
    def _prompts(entry: Any, what: str) -> dict[str, list[str]]:
        if not isinstance(entry, Mapping) or set(entry) - {"positive_prompts", "negative_prompts"}:
            raise ValueError(f"{what}: expected {{'positive_prompts': [...], 'negative_prompts': [...]}}, got {entry!r}.")
        return {key: _prompt_list(entry.get(key), f"{what}'s {key}") for key in ("positive_prompts", "negative_prompts")}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MoEConfig:
        data = dict(data)
        method = data.pop("method", "moe")
        if method != "moe":
            raise ValueError(f"Not an MoE assembly record: method is {method!r}, expected 'moe'.")
        return super().from_dict(data)


def _entry(prompts: Mapping[str, Any] | None, negatives: Mapping[str, Any] | None, name: str) -> dict[str, Any]:
    return {"positive_prompts": (prompts or {}).get(name), "negative_prompts": (negatives or {}).get(name)}


def assemble_moe(
    base: Any,
    experts: Sequence[Any] | Mapping[str, Any],
    gate_mode: str = "hidden",
    prompts: Mapping[str, Sequence[str]] | None = None,
    negative_prompts: Mapping[str, Sequence[str]] | None = None,
    experts_per_token: int = 2,
    architecture: str | None = None,
    shared_expert: Any = None,
    output_dir: str | os.PathLike | None = None,
    tokenizer: Any = None,
    seed: int = 0,
    **options: Any,
) -> Any:
    """Assemble a sparse Mixture-of-Experts model from dense fine-tunes of one base (mergekit-moe's method).

    Args:
        base: the dense base (a ``PreTrainedModel``, a checkpoint folder or a Hub repo id) of ``model_type`` llama,
            mistral, qwen2 or qwen3: it gives the attention, norms, embeddings and LM head.
        experts: the fine-tuned models, ``{name: model}`` (or a sequence, named ``expert_0``, ...), each the base's
            architecture with the same shapes; expert i of every layer is model i's MLP.
        gate_mode: how the routers are initialised (:data:`GATE_MODES`, see the module docstring).
        prompts / negative_prompts: ``{expert name: [prompt, ...]}``, what each expert should (not) receive; the
            shared expert's under ``"shared_expert"``. Needed for the prompt modes.
        experts_per_token: how many experts each token is routed to (mergekit's default 2).
        architecture: ``"mixtral"``, ``"qwen2_moe"`` or ``"qwen3_moe"``; ``None`` chooses as mergekit does: Mixtral
            for a llama or mistral base, Qwen2-MoE for a qwen2 base or when a shared expert is given, Qwen3-MoE for
            a qwen3 base.
        shared_expert: the model whose MLP becomes Qwen2-MoE's shared expert (applied to every token, scaled by a
            sigmoid gate initialised like the routers).
        output_dir: write the checkpoint (sharded safetensors, config, the base's tokenizer and generation config,
            ``merge_config.json`` and a model card) there atomically and return its path; ``None`` returns the model.
        tokenizer: tokenizes the prompts (a tokenizer or a folder; default the base folder's) and is saved with the
            output.
        seed: the seed of the ``random`` and ``uniform_random`` gates.
        **options: ``device`` (where a base read from a folder runs the prompts; an in-memory base runs where it
            is), ``dtype`` (of the output; default the base's),
            ``progress``, ``allow_pickle``, ``max_shard_size``, ``overwrite``, ``revision``/``token``/``cache_dir``
            (Hub inputs) and the card's ``license``, ``tags``, ``base_model`` (``{input: hub_id}``, inputs named by
            expert name, ``"base"``, ``"shared_expert"`` or path).

    Example:
        >>> hf_merge.assemble_moe("llama", {"code": "llama-code", "math": "llama-math"}, prompts={...},
        ...                       output_dir="llama-2x-moe")
    """
    if isinstance(experts, Mapping):
        models = {str(name): model for name, model in experts.items()}
    elif isinstance(experts, Sequence) and not isinstance(experts, (str, bytes)):
        models = {f"expert_{i}": model for i, model in enumerate(experts)}
    else:
        raise TypeError(f"experts must be a {{name: model}} mapping or a sequence of models, got {type(experts).__name__}.")
    for what, given in (("prompts", prompts), ("negative_prompts", negative_prompts)):
        if given is not None and not isinstance(given, Mapping):
            raise TypeError(f"{what} must map expert names to lists of prompts, got {type(given).__name__}.")
        unknown = sorted(set(given or {}) - set(models) - ({SHARED_EXPERT} if shared_expert is not None else set()))
        if unknown:
            raise ValueError(f"{what} names {unknown}, which are not experts of this MoE ({list(models)}"
                             f"{' or ' + repr(SHARED_EXPERT) if shared_expert is not None else ''}).")
    config = MoEConfig(
        experts={name: _entry(prompts, negative_prompts, name) for name in models}, gate_mode=gate_mode,
        experts_per_token=experts_per_token, architecture=architecture, seed=seed,
        shared_expert=_entry(prompts, negative_prompts, SHARED_EXPERT) if shared_expert is not None else None)
    return _assemble(base, models, shared_expert, config, output_dir, tokenizer, options)


def _assemble(base: Any, models: Mapping[str, Any], shared_expert: Any, config: MoEConfig,
              output_dir: str | os.PathLike | None, tokenizer: Any, keywords: dict[str, Any]) -> Any:
    """Open and check the inputs, plan every output tensor, check the output folder, then compute the routers and
    write (into ``output_dir``, published atomically, or a temporary folder the returned model is loaded from)."""
    from .inputs import bind_deltas, describe_inputs, open_inputs, reconcile_tied_embeddings, validate_sources
    from .io.publish import check_output_dir, publish_folder
    from .options import split_options
    from .progress import Progress

    options = split_options(keywords)
    if keywords:
        raise TypeError(f"Unknown keyword argument(s) {sorted(keywords)} for an MoE assembly.")
    options.reject(_UNSUPPORTED_OPTIONS, "An MoE assembly")
    inputs = {**models, **({SHARED_EXPERT: shared_expert} if shared_expert is not None else {})}
    base_source, sources = open_inputs(base, inputs, options)
    reconcile_tied_embeddings(base_source, sources)
    bind_deltas(base_source, sources)
    base_config = _base_config(base_source)
    arch = _architecture(config.architecture, base_config.model_type, shared_expert is not None)
    config = config.replace(architecture=arch.name)
    dtype = options.dtype or base_source.meta(EMBEDDINGS).dtype
    validate_sources(base_source, sources, dtype=dtype)
    out_config = _output_config(arch, base_config, base_source, config, dtype)
    copies, routers, metas = _plan(arch, out_config, base_source, sources, list(models), dtype)
    described = describe_inputs(base_source, sources)
    card = options.card.for_inputs(described)  # a base_model= key naming no input fails here
    folders = [Path(origin) for origin in (described["base"], *described["models"].values())
               if isinstance(origin, str) and os.path.isdir(origin)]
    if output_dir is not None:
        check_output_dir(output_dir, folders, overwrite=options.overwrite)
    given_tokenizer = _load_tokenizer(tokenizer, "tokenizer=") if tokenizer is not None else None
    prompt_tokenizer = None
    if config.gate_mode in PROMPT_MODES:
        prompt_tokenizer = given_tokenizer or _base_tokenizer(base_source, config.gate_mode)
    entries = [*config.experts.values(), *([config.shared_expert] if config.shared_expert is not None else [])]
    with Progress(options.progress, unit="step") as progress:
        gates = gate_vectors(config.gate_mode, [(e["positive_prompts"], e["negative_prompts"]) for e in entries],
                             base=base_source, config=base_config, tokenizer=prompt_tokenizer, seed=config.seed,
                             device=options.device, progress=progress)
        _warn_degenerate(gates[:, : len(models)])
        computed = {key: gates[layer, rows].to(dtype) for key, (layer, rows) in routers.items()}

        def tensor(key: str) -> torch.Tensor:
            if key in computed:
                return computed[key]
            source, name = copies[key]
            value = source.get(name)
            return value.to(dtype) if value.is_floating_point() else value

        def write(folder: Path) -> None:
            _write_checkpoint(folder, metas, tensor, max_shard_size=options.max_shard_size, progress=progress,
                              description=f"Writing the {arch.model_class}")
            _write_side_files(folder, base_source, out_config, given_tokenizer)

        if output_dir is None:
            from transformers import AutoModelForCausalLM

            with tempfile.TemporaryDirectory(prefix="hf_merge_moe_") as folder:
                write(Path(folder))
                return AutoModelForCausalLM.from_pretrained(folder)
        with publish_folder(output_dir, folders, overwrite=options.overwrite) as staging:
            write(staging)
            hub = described.get("hub")
            write_json(staging, CONFIG_NAME, {**config.to_dict(), **({INPUTS_KEY: hub} if hub else {})})
            write_moe_card(staging, config, described, card=card, model_class=arch.model_class)
    return str(output_dir)


def _write_checkpoint(folder: Path, metas: Mapping[str, TensorMeta], tensor: Any, *, max_shard_size: int | str | None,
                      progress: Any, description: str) -> None:
    """Sharded safetensors of ``metas``, each tensor made by ``tensor(key)`` and written at once (one held at a
    time)."""
    from .io.writer import DEFAULT_MAX_SHARD_SIZE, ShardWriter, plan_shards

    plan = plan_shards(metas, max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE)
    writer = ShardWriter(folder, plan)
    try:
        for key in progress.track(plan.order, description):
            writer.put(key, tensor(key))
        writer.close()
    finally:
        writer.abort()


def _write_side_files(folder: Path, base: TensorSource, out_config: Any, tokenizer: Any) -> None:
    """The base's generation config and tokenizer files, the MoE's ``config.json``, and ``tokenizer`` if given."""
    from .models import copy_side_files

    copy_side_files(base, folder)  # its config.json is replaced just below
    out_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


# ------------------------------------------------------------------------------------------------ architecture
def _base_config(base: TensorSource) -> Any:
    """The base's transformers config: an in-memory model's, or its folder's ``config.json``."""
    if base.model is not None and hasattr(base.model, "config"):
        return base.model.config
    if base.folder is not None and (Path(base.folder) / "config.json").is_file():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(base.folder)
    raise ValueError(f"{base.label}: an MoE is assembled from a transformers model or a checkpoint folder with a "
                     "config.json (its config describes the architecture); a bare state dict has none.")


def _architecture(name: str | None, model_type: str, shared: bool) -> MoEArchitecture:
    """The output architecture: ``name``, or the one mergekit chooses for the base's ``model_type``."""
    if name is None:
        candidates = [a for a in ARCHITECTURES.values() if model_type in a.inputs]
        if not candidates:
            raise MergeError(f"No MoE architecture is assembled from a {model_type!r} base; supported: {_supported()}.")
        name = next((a.name for a in candidates if (a.shared is not None) == shared), candidates[0].name)
    arch = ARCHITECTURES[name]
    if model_type not in arch.inputs:
        raise MergeError(f"A {arch.name} MoE is assembled from {', '.join(arch.inputs)} models; the base is "
                         f"{model_type!r}. Supported: {_supported()}.")
    if shared and arch.shared is None:
        raise ValueError(f"A {arch.name} MoE has no shared expert; shared_expert= needs architecture='qwen2_moe'.")
    if not shared and arch.shared is not None:
        raise ValueError(f"A {arch.name} MoE has a shared expert (mergekit-moe requires exactly one): give "
                         "shared_expert=<model> (and its prompts under 'shared_expert').")
    return arch


def _attention_windows(config: Any) -> list[int | None]:
    """The sliding window of each of the base's layers (``None``: full attention)."""
    window = getattr(config, "sliding_window", None) or None
    types = getattr(config, "layer_types", None)
    if types is None:
        return [window] * config.num_hidden_layers
    return [window if kind == "sliding_attention" else None for kind in types]


def _output_config(arch: MoEArchitecture, base_config: Any, base: TensorSource, config: MoEConfig,
                   dtype: torch.dtype) -> Any:
    """The MoE config: every field of the base's config that the MoE class has, then the MoE's own (mergekit's
    values: every layer sparse, top-k probabilities renormalised, experts as wide as the base's MLP)."""
    import transformers

    config_class = getattr(transformers, arch.config_class)
    fields = {f.name for f in dataclasses.fields(config_class)} - {"architectures", "dtype", "transformers_version"}
    values = {key: value for key, value in base_config.to_dict().items() if key in fields}
    windows = _attention_windows(base_config)
    sizes = {w for w in windows if w is not None}
    if len(sizes) > 1:
        raise MergeError(f"The base's layers use different sliding windows {sorted(sizes)}; an MoE takes one.")
    if len(set(windows)) > 1 and arch.name != "qwen2_moe":
        raise MergeError(f"The base uses sliding-window attention in some layers only; a {arch.model_class} applies "
                         "one window to every layer.")
    window = next(iter(sizes), None)
    values.update(num_experts_per_tok=config.experts_per_token, sliding_window=window)
    if arch.name == "mixtral":
        values.update(num_local_experts=len(config.experts))
    else:
        values.update(num_experts=len(config.experts), moe_intermediate_size=base_config.intermediate_size,
                      decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                      use_sliding_window=window is not None)
    if arch.name == "qwen2_moe":
        values.update(shared_expert_intermediate_size=base_config.intermediate_size,
                      qkv_bias=base.has("model.layers.0.self_attn.q_proj.bias"), max_window_layers=len(windows),
                      layer_types=["sliding_attention" if w is not None else "full_attention" for w in windows])
    out = config_class(**values)
    head_dim = getattr(base_config, "head_dim", None)
    if head_dim is not None:
        out.head_dim = head_dim  # Qwen2-MoE reads it when present, as its attention does
    out.architectures = [arch.model_class]
    out.dtype = dtype
    return out


def _plan(arch: MoEArchitecture, out_config: Any, base: TensorSource, sources: Mapping[str, TensorSource],
          experts: Sequence[str], dtype: torch.dtype
          ) -> tuple[dict[str, tuple[TensorSource, str]], dict[str, tuple[int, slice]], dict[str, TensorMeta]]:
    """``(copies, routers, metas)``: each output tensor copied from ``(source, key)``, each router ``key → (layer,
    gate rows)``, and the output's tensors (floating point ones in ``dtype``), read from the MoE class built on the
    meta device. Every output tensor must have a source of its shape and every tensor of the base a place;
    otherwise ``MergeError`` naming them."""
    import transformers

    from .io.sources import ModelSource

    with torch.device("meta"):
        model = getattr(transformers, arch.model_class)(out_config)
    layout = ModelSource(model, arch.model_class)
    metas = {key: TensorMeta(meta.shape, dtype if meta.dtype.is_floating_point else meta.dtype)
             for key in layout.keys() for meta in (layout.meta(key),)}
    copies: dict[str, tuple[TensorSource, str]] = {}
    routers: dict[str, tuple[int, slice]] = {}
    dense: set[str] = set()
    count = len(experts)
    for layer in range(out_config.num_hidden_layers):
        routers[arch.router.format(layer=layer)] = (layer, slice(0, count))
        for proj, dense_proj in arch.projections.items():
            key = _DENSE_MLP.format(layer=layer, proj=dense_proj)
            dense.add(key)
            for index, name in enumerate(experts):
                copies[arch.expert.format(layer=layer, expert=index, proj=proj)] = (sources[name], key)
            if arch.shared is not None:
                copies[arch.shared.format(layer=layer, proj=dense_proj)] = (sources[SHARED_EXPERT], key)
        if arch.shared_gate is not None:
            routers[arch.shared_gate.format(layer=layer)] = (layer, slice(count, count + 1))
    missing_mlp = sorted(key for key in dense if not base.has(key))
    if missing_mlp:
        raise MergeError(f"{base.label} has no {_preview(missing_mlp)}: an MoE expert is a Llama-style MLP "
                         "(gate_proj, up_proj, down_proj without biases).")
    copies.update({key: (base, key) for key in base.keys() if key not in dense})
    planned = set(copies) | set(routers)
    missing = [key for key in metas if key not in planned]
    if missing:
        raise MergeError(f"A {arch.model_class} needs {_preview(missing)}, which the base does not have.")
    unplaced = [key for key in planned if key not in metas]
    if unplaced:
        raise MergeError(f"{_preview(sorted(unplaced))} of the inputs have no place in a {arch.model_class} (it has no "
                         "such parameter, e.g. an attention output or MLP bias); this base cannot become that MoE.")
    for key, (source, name) in copies.items():
        shape, wanted = source.meta(name).shape, metas[key].shape
        if shape != wanted:
            raise MergeError(f"{source.label}: {name!r} has shape {shape}, but the {arch.model_class}'s {key!r} needs "
                             f"{wanted}.")
    return copies, routers, metas


def _preview(keys: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)})"


# ------------------------------------------------------------------------------------------------ routers
def _load_tokenizer(value: Any, where: str) -> Any:
    if isinstance(value, (str, os.PathLike)):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(value)
        except Exception as error:  # transformers raises many kinds for a folder it cannot read
            raise ValueError(f"Cannot load the tokenizer given as {where} from {value}: {error}") from None
    if not callable(value) or not hasattr(value, "save_pretrained"):
        raise TypeError(f"{where} must be a tokenizer or a folder path, got {type(value).__name__}.")
    return value


def _base_tokenizer(base: TensorSource, gate_mode: str) -> Any:
    """The tokenizer of the base's folder (an in-memory model's ``name_or_path`` folder)."""
    from .vocab import has_tokenizer_files

    folder = base.folder
    if folder is None and base.model is not None:
        folder = getattr(base.model.config, "_name_or_path", None) or None
    if folder is None or not os.path.isdir(folder) or not has_tokenizer_files(folder):
        raise ValueError(f"gate_mode={gate_mode!r} tokenizes the experts' prompts, but {base.label} has no tokenizer "
                         "files: give tokenizer= (a tokenizer or a folder), or use gate_mode='random'.")
    return _load_tokenizer(folder, "the base's tokenizer")


def _tokenize(prompts: Sequence[str], tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input ids, attention mask)``, left-padded, of each prompt with the BOS token's text prepended and no other
    special tokens (mergekit's ``tokenize_prompts``)."""
    prefix = tokenizer.bos_token or ""
    encoded = [list(tokenizer(prefix + prompt, add_special_tokens=False)["input_ids"]) for prompt in prompts]
    empty = [prompt for prompt, ids in zip(prompts, encoded) if not ids]
    if empty:
        raise ValueError(f"The prompt {empty[0]!r} has no tokens.")
    width = max(len(ids) for ids in encoded)
    ids = torch.tensor([[ids[0]] * (width - len(ids)) + ids for ids in encoded])  # padding is masked out
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
    return ids, mask


def _hidden_mean(model: Any, prompts: Sequence[str], tokenizer: Any, *, last: bool) -> torch.Tensor:
    """``(layers, hidden)``: the mean over ``prompts`` of each layer's input hidden state at the last token
    (``last``), or averaged over the prompt's tokens."""
    device = next(model.parameters()).device
    layers = model.config.num_hidden_layers
    total = torch.zeros(())
    for start in range(0, len(prompts), _PROMPT_BATCH):
        ids, mask = _tokenize(prompts[start : start + _PROMPT_BATCH], tokenizer)
        with torch.no_grad():
            output = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
        states = torch.stack(output.hidden_states[:layers]).float().cpu()  # (layers, batch, tokens, hidden)
        if last:
            picked = states[:, :, -1]
        else:
            weights = mask.to(states.dtype)[None, :, :, None]
            picked = (states * weights).sum(2) / weights.sum(2)
        total = total + picked.sum(1)
    return total / len(prompts)


def gate_vectors(mode: str, rows: Sequence[tuple[Sequence[str], Sequence[str]]], *, base: TensorSource | None,
                 config: Any, tokenizer: Any = None, seed: int = 0, device: torch.device | None = None,
                 progress: Any = None) -> torch.Tensor:
    """The router rows, ``(layers, len(rows), hidden)`` float32: one per ``(positive prompts, negative prompts)``
    row, by ``mode`` (:data:`GATE_MODES`; mergekit's ``get_gate_params``). ``hidden`` modes run the base model (an
    in-memory one where it is, a folder's loaded once, onto ``device``)."""
    from .progress import Progress

    check_choice("gate_mode", mode, GATE_MODES)
    layers, hidden = config.num_hidden_layers, config.hidden_size
    shape = (layers, len(rows), hidden)
    generator = torch.Generator().manual_seed(seed)
    if mode == "random":
        return torch.randn(shape, generator=generator)
    if mode == "uniform_random":
        bound = hidden ** -0.5
        return (torch.rand(shape, generator=generator) * 2 - 1) * bound
    if mode == "cheap_embed":
        table = base.get(EMBEDDINGS).float()

        def summary(prompts: Sequence[str]) -> torch.Tensor:
            ids, mask = _tokenize(prompts, tokenizer)
            total = (table[ids] * mask[..., None]).sum((0, 1))
            return (total / total.norm().clamp(min=1e-8)).expand(layers, hidden)
    else:
        model, restore = _prompt_model(base, device)

        def summary(prompts: Sequence[str]) -> torch.Tensor:
            return _hidden_mean(model, prompts, tokenizer, last=mode != "hidden_avg")
    progress = progress or Progress(False)
    vectors = []
    try:
        for positive, negative in progress.track(list(rows), "Running the experts' prompts"):
            vector = summary(positive)
            if negative:
                vector = vector - summary(negative)
            vectors.append(vector / vector.norm(dim=-1, keepdim=True).clamp(min=1e-8))
    finally:
        if mode != "cheap_embed":
            restore()
    return torch.stack(vectors, dim=1)


def _prompt_model(base: TensorSource, device: torch.device | None) -> tuple[Any, Any]:
    """``(the base model in eval mode, a function undoing that)``: an in-memory base as it is, where it is; a
    folder's loaded (once, dropped after) onto ``device``."""
    from .models import load_model_from_folder

    model = base.model
    if model is not None and hasattr(model, "config"):
        training = model.training
        model.eval()
        return model, lambda: model.train(training)
    model = load_model_from_folder(base.folder, progress=False) if base.folder is not None else None
    if model is None:
        raise ValueError(f"The hidden gate modes run the base model, but {base.label} is not a transformers model or "
                         "a folder whose config.json names one; use gate_mode='cheap_embed' or 'random'.")
    return model.to(device or "cpu").eval(), lambda: None


def _warn_degenerate(gates: torch.Tensor) -> None:
    """Warn when a layer's router rows are nearly linearly dependent (mergekit's ``warn_degenerate_gates``)."""
    if gates.shape[1] < 2:
        return
    layers = [layer for layer in range(gates.shape[0]) if torch.linalg.cond(gates[layer]) > _DEGENERATE_CONDITION]
    if layers:
        warn(f"The routers of layer(s) {layers} have nearly dependent rows (condition number above "
             f"{_DEGENERATE_CONDITION}): the experts' prompts look alike to the base, so some experts will seldom be "
             "chosen. Give more distinct prompts.")


# ------------------------------------------------------------------------------------------------ model card
GATE_SUMMARIES = {
    "hidden": "Each expert's router row is the base model's hidden state at the layer's input, at the last token of "
              "its positive prompts (averaged over the prompts), minus the same for its negative prompts, normalised.",
    "hidden_avg": "Each expert's router row is the base model's hidden state at the layer's input, averaged over the "
                  "tokens and then the prompts of its positive prompts, minus the same for its negative prompts, "
                  "normalised.",
    "cheap_embed": "Each expert's router row is the normalised sum of its positive prompts' token embeddings minus "
                   "the same for its negative prompts, normalised; the same row in every layer.",
    "random": "The routers are random (standard normal), for training afterwards.",
    "uniform_random": "The routers are random (uniform, as nn.Linear initialises them), for training afterwards.",
}
GATE_SUMMARIES["hidden_last"] = GATE_SUMMARIES["hidden"]
MIXTRAL_BIBTEX = """@article{jiang2024mixtral,
  title   = {Mixtral of Experts},
  author  = {Jiang, Albert Q. and Sablayrolles, Alexandre and Roux, Antoine and Mensch, Arthur and Savary, Blanche and
             Bamford, Chris and Chaplot, Devendra Singh and de las Casas, Diego and Hanna, Emma Bou and others},
  journal = {arXiv preprint arXiv:2401.04088},
  year    = {2024}
}"""


def write_moe_card(folder: str | os.PathLike, config: MoEConfig, inputs: Mapping[str, Any], *, card: Any = None,
                   model_class: str | None = None, repo_id: str | None = None) -> Path:
    """Render ``hf_merge/model_cards/moe.md`` into ``folder/README.md``: the experts table (source, license,
    prompt counts), gate mode, ``experts_per_token``, architecture and the exact config; front matter as every
    hf-merge card (:mod:`hf_merge.hub.provenance`: Hub ids only in ``base_model``, license inherited when the inputs
    agree, ``card``: the user's :class:`~hf_merge.hub.provenance.CardMetadata`)."""
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    from .hub.cards import BASE_TAGS, TEMPLATE_DIR, _cell
    from .hub.provenance import CARD_NAME, CardMetadata, inherited_license, input_records, published_base_models
    from .methods.slerp import MERGEKIT_BIBTEX

    card = (card or CardMetadata()).for_inputs(inputs)
    records, base_models = published_base_models(input_records(inputs), card.base_model)
    license = card.license if card.license is not None else inherited_license(records)
    model_class = model_class or ARCHITECTURES[config.architecture].model_class
    entries = {**config.experts, **({SHARED_EXPERT: config.shared_expert} if config.shared_expert is not None else {})}
    rows = [{"record": r, "positive": len(entries[r.role]["positive_prompts"]) if r.role in entries else None,
             "negative": len(entries[r.role]["negative_prompts"]) if r.role in entries else None} for r in records]
    where = repo_id or "path/to/this/folder"
    data = ModelCardData(
        base_model=(base_models[0] if len(base_models) == 1 else base_models) or None, base_model_relation="merge",
        tags=list(dict.fromkeys([*BASE_TAGS, "moe", "mixture-of-experts", "mergekit-moe", *card.tags])),
        library_name="transformers", license=license, pipeline_tag="text-generation")
    rendered = ModelCard.from_template(
        data, template_path=str(TEMPLATE_DIR / "moe.md"), title=repo_id.split("/")[-1] if repo_id else
        f"{len(config.experts)}-expert {model_class.removesuffix('ForCausalLM')}", model_class=model_class, config=config, rows=rows,
        base=next((r for r in records if r.role == "base"), None), gate_summary=GATE_SUMMARIES[config.gate_mode],
        config_yaml=yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True).rstrip("\n"),
        load_snippet=f'from transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained('
                     f'"{where}")', mixtral_bibtex=MIXTRAL_BIBTEX, mergekit_bibtex=MERGEKIT_BIBTEX, cell=_cell)
    path = Path(folder) / CARD_NAME
    rendered.save(path)
    return path


# ------------------------------------------------------------------------------------------------ recipes
#: The keys of a mergekit-moe recipe, and of each of its experts.
MOE_RECIPE_KEYS = ("base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture")
EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")
#: mergekit-moe's ``architecture`` values (it matches its output names by prefix: "Mixtral", "Qwen MoE", "Qwen3 MoE").
_RECIPE_ARCHITECTURES = {"mixtral": "mixtral", "qwen": None, "qwen moe": "qwen2_moe", "qwen2_moe": "qwen2_moe",
                         "qwen3": "qwen3_moe", "qwen3 moe": "qwen3_moe", "qwen3_moe": "qwen3_moe"}


def is_moe_recipe(data: Any) -> bool:
    """Whether a parsed YAML recipe is mergekit-moe's: it has ``experts`` and neither ``merge_method`` (mergekit's
    merge schema) nor ``method`` (hf_merge's)."""
    return isinstance(data, Mapping) and "experts" in data and "merge_method" not in data and "method" not in data


@dataclasses.dataclass(frozen=True)
class MoERecipe:
    """A mergekit-moe recipe read for hf_merge: the ``base`` and ``experts`` (``{name: folder or Hub id}``, the name
    being the ``source_model`` as written, ``#2``, ... appended to a repeated one), the ``shared_expert``, the
    :class:`MoEConfig` and the options it sets (``dtype``)."""

    base: str
    experts: dict[str, str]
    config: MoEConfig
    shared_expert: str | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def assemble(self, output_dir: str | os.PathLike | None = None, *, tokenizer: Any = None, **options: Any) -> Any:
        """Run the recipe (:func:`assemble_moe`); ``options`` add to or override the recipe's."""
        return _assemble(self.base, self.experts, self.shared_expert, self.config, output_dir, tokenizer,
                         {**self.options, **options})


def read_moe_recipe(recipe: str | os.PathLike | Mapping[str, Any], *, root: str | os.PathLike | None = None
                    ) -> MoERecipe:
    """Read a mergekit-moe recipe (a YAML file, whose relative model paths are resolved against its folder, or a
    dict of the same keys, resolved against ``root``, default the working directory). Everything is checked here,
    before any model is read: an unknown key, a bad value or an unsupported setting raises ``ValueError`` naming it.

    Example:
        >>> read_moe_recipe("moe.yml").assemble("out")
    """
    from .mergekit import _Reader, load_yaml

    if isinstance(recipe, Mapping):
        data, folder, where = recipe, Path(root) if root is not None else Path.cwd(), "mergekit-moe recipe"
    else:
        data, folder, where = load_yaml(recipe), Path(recipe).parent, str(recipe)
    references = _Reader(data, folder, where)  # mergekit's model references: local folders or Hub repo ids

    def fail(message: str) -> ValueError:
        return ValueError(f"{where}: {message}")

    def keys(entry: Any, allowed: Sequence[str], label: str) -> None:
        if not isinstance(entry, Mapping):
            raise fail(f"{label} must be a mapping with keys {list(allowed)}, got {entry!r}.")
        unknown = sorted(str(key) for key in set(entry) - set(allowed))
        if unknown:
            raise fail(f"{label}: unknown key(s) {unknown}{did_you_mean(unknown, allowed)}; its keys are {list(allowed)}.")

    def expert(entry: Any, label: str) -> tuple[str, dict[str, Any]]:
        keys(entry, EXPERT_KEYS, label)
        for key in ("noise_scale", "residual_scale"):
            if entry.get(key) is not None:
                raise fail(f"{label}.{key} is not supported yet.")
        if "source_model" not in entry:
            raise fail(f"{label} needs a source_model.")
        try:
            prompts = {key: _prompt_list(entry.get(key), f"{label}.{key}") for key in ("positive_prompts",
                                                                                     "negative_prompts")}
        except TypeError as error:
            raise fail(str(error)) from None
        return references.folder(entry["source_model"], f"{label}.source_model"), prompts

    keys(data, MOE_RECIPE_KEYS, "the recipe")
    if data.get("base_model") is None:
        raise fail("missing required key 'base_model'.")
    entries = data.get("experts")
    if not isinstance(entries, Sequence) or isinstance(entries, str) or not entries:
        raise fail(f"experts must be a non-empty list of {{source_model, positive_prompts, ...}}, got {entries!r}.")
    experts: dict[str, str] = {}
    prompts: dict[str, dict[str, Any]] = {}
    for index, entry in enumerate(entries):
        reference, entry_prompts = expert(entry, f"experts[{index}]")
        name = str(entry["source_model"])
        name = next(f"{name}#{n}" for n in range(2, len(entries) + 2) if f"{name}#{n}" not in experts) \
            if name in experts else name
        experts[name], prompts[name] = reference, entry_prompts
    shared = data.get("shared_experts") or []
    if not isinstance(shared, Sequence) or isinstance(shared, str) or len(shared) > 1:
        raise fail(f"shared_experts must be a list of one expert (a Qwen2-MoE has one shared expert), got {shared!r}.")
    shared_model, shared_prompts = expert(shared[0], "shared_experts[0]") if shared else (None, None)
    architecture = data.get("architecture")
    if architecture is not None:
        label = str(architecture).lower()
        if label not in _RECIPE_ARCHITECTURES:
            raise fail(f"architecture {architecture!r} is not supported; supported: {sorted(_RECIPE_ARCHITECTURES)} "
                       f"(hf_merge builds {_supported()}).")
        architecture = _RECIPE_ARCHITECTURES[label] or ("qwen2_moe" if shared else "qwen3_moe")
    options = references.options()  # dtype, checked
    fields = {"gate_mode": data.get("gate_mode", "hidden"), "experts_per_token": data.get("experts_per_token", 2)}
    try:
        config = MoEConfig(experts=prompts, architecture=architecture, shared_expert=shared_prompts, **fields)
    except (TypeError, ValueError) as error:
        raise fail(str(error)) from None
    return MoERecipe(base=references.folder(data["base_model"], "base_model"), experts=experts, config=config,
                     shared_expert=shared_model, options=options)


def run_moe_recipe(path: str | os.PathLike, output_dir: str | os.PathLike, **options: Any) -> str:
    """``hf-merge merge MOE_RECIPE.yml OUT_DIR``: read a mergekit-moe recipe and assemble it into ``output_dir``
    (``options``: those of :func:`assemble_moe`, e.g. ``progress``, ``overwrite``); return the output path."""
    return read_moe_recipe(path).assemble(output_dir, **options)


__all__ = ["ARCHITECTURES", "GATE_MODES", "MoEArchitecture", "MoEConfig", "MoERecipe", "assemble_moe", "gate_vectors",
           "is_moe_recipe", "read_moe_recipe", "run_moe_recipe", "write_moe_card"]
