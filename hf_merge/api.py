"""The front door: every merge, compression and adapter merge starts here.

Each function opens the inputs as sources, builds one :class:`~hf_merge.options.MergeOptions`, picks the sink for the
requested output and calls :func:`hf_merge.engine.run` once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .config import MergeConfig
from .engine import Plan, check_plan, run
from .inputs import Inputs, describe_inputs, open_inputs
from .io.sinks import Sink, output_sink
from .io.sources import TensorSource
from .options import MergeOptions, split_options
from .record import MergeRecord
from .registry import get_merger, make_config
from .vocab import VOCABULARY_OPTIONS, reconcile_vocabularies

OUTPUTS = ("model", "lora")


def merge(
    base: Inputs,
    finetuned: Sequence[Inputs] | Mapping[str, Inputs],
    config: MergeConfig | str,
    *,
    output_dir: str | os.PathLike | None = None,
    output: str = "model",
    rank: int | None = None,
    energy: float | None = None,
    into: torch.nn.Module | None = None,
    **keywords: Any,
) -> Any:
    """Merge fine-tuned models into one, streaming tensor by tensor.

    Args:
        base: the pre-trained model θ₀ — a ``PreTrainedModel`` (possibly dispatched by Accelerate with a device map,
            offloaded weights included), a local checkpoint folder (single or sharded safetensors), a Hub repo id
            (``"org/name"``, ``"org/name@revision"``; downloaded, see :mod:`hf_merge.hub.resolve`) or a state dict;
            ``None`` for methods that merge whole models (C2M3, weight matching).
        finetuned: the fine-tuned models θ_t, a sequence or a ``{task_name: model}`` mapping; kinds may be mixed. A
            PEFT adapter (folder, Hub repo id or ``PeftModel``) counts as θ₀ + ΔW.
        config: a :class:`~hf_merge.MergeConfig`, or a method name (``"ties"``) with its parameters as keywords.
        output_dir: write a ``from_pretrained``-loadable checkpoint there (atomically) and return its path.
        output: ``"model"`` (merged weights) or ``"lora"`` (a merged PEFT adapter, :class:`~hf_merge.MergedAdapter`,
            saved to ``output_dir`` when given; ``rank``/``energy`` set its ranks). LoRA inputs are merged as factors;
            with full models among the inputs the adapter holds (merged − base) per module, extracted by truncated SVD
            as :func:`hf_merge.extract_lora` does, and exactly one of ``rank``/``energy`` is required.
        into: an existing model to write the merged weights into (what ``merge_with(..., inplace=True)`` uses).
        **keywords: the run options (:class:`~hf_merge.MergeOptions`, built by :func:`~hf_merge.options.make_options`):
            ``device`` (where the arithmetic runs, e.g. ``"cuda"`` while inputs stream from disk; ``compute_device``
            is a synonym), ``dtype`` (output dtype of floating-point tensors), ``progress``, ``allow_pickle``,
            ``memory_budget`` (bytes or ``"4GB"`` the merge's working set may hold; ``max_memory`` given as a size
            means the same), ``max_memory`` (as a dict, Accelerate's placement budget for ``device_map="auto"``),
            ``device_map`` (placement of the merged model; a dispatched base's ``hf_device_map`` is reused by
            default), ``offload_folder`` (for ``"disk"`` entries), ``max_shard_size`` (default 5GB), and for Hub
            inputs ``revision`` (one, or ``{reference: revision}``), ``token`` and ``cache_dir``; for the model card
            ``license`` (a Hub license id), ``tags`` (a list of strings) and ``base_model`` (``{input: hub_id}``, an
            input named by path or task name: the Hub ids the card lists for local inputs). An output that cannot
            honour an option raises naming it. Vocabularies (:mod:`hf_merge.vocab`, mergekit's semantics):
            ``tokenizer_source`` (``"base"``, ``"union"`` or an input), ``tokenizer`` (tokenizers of in-memory
            inputs), ``chat_template`` (a Jinja template, ``"auto"`` or an input) and ``pad_to_multiple_of``. Every
            other keyword is a config field, e.g. ``scaling=0.3``.

    Returns:
        A new model of the base's class (the base is untouched) for a model base, the model described by the folder's
        ``config.json`` for a folder base, a state dict for a state-dict base, or the output path with ``output_dir``.

    Example:
        >>> merged = hf_merge.merge(base, {"sst2": m1, "mnli": m2}, "ties", density=0.2, scaling=1.0)
    """
    options = split_options(keywords)
    config = make_config(config, **keywords)
    merger = get_merger(config)
    base_source, tasks = open_inputs(base, finetuned, options, base_required=False)
    base_source, tasks = reconcile_vocabularies(base_source, tasks, options, references={
        "base": base, **(finetuned if isinstance(finetuned, Mapping) else {f"task_{i}": m for i, m in enumerate(finetuned)})})
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {list(OUTPUTS)}, got {output!r}.")
    if output != "lora" and (rank is not None or energy is not None):
        raise ValueError("rank= and energy= apply to output='lora' only.")
    record = MergeRecord(config, describe_inputs(base_source, tasks), artifact="adapter" if output == "lora" else "model",
                         card=options.card)
    plan = Plan(base_source, tasks, merger, record)
    check_plan(plan)
    layout_source = base_source if base_source is not None else next(iter(tasks.values()))
    if output == "lora":
        from .io.adapter_sink import AdapterSink

        if into is not None:
            raise ValueError("into= receives merged weights; output='lora' builds an adapter.")
        if base_source is None:
            raise ValueError(f"output='lora' merges LoRA adapters onto their base: give base (method {config.method!r}).")
        sink: Sink = AdapterSink(base_source, tasks, options, rank=rank, energy=energy, output_dir=output_dir,
                                 inputs=record.input_folders())
    else:
        sink = output_sink(layout_source, options, output_dir=output_dir, into=into, inputs=record.input_folders())
    return run(plan, sink, options)


def compress(
    base: Inputs,
    finetuned: Sequence[Inputs] | Mapping[str, Inputs],
    config: MergeConfig | str,
    *,
    output_dir: str | os.PathLike | None = None,
    **keywords: Any,
) -> Any:
    """Compress T fine-tuned models into a :class:`~hf_merge.TaskBank` (TSV-C factors or TALL masks), streaming per
    tensor.

    Args:
        base: the pre-trained θ₀ (model, checkpoint folder or state dict). A folder base is referenced by path;
            other bases are stored in the bank when it is saved.
        finetuned: ``{task_name: model}`` (or a sequence, named ``task_0``, ...).
        config: :class:`~hf_merge.TSVCompressConfig` or :class:`~hf_merge.TallMaskConfig` (or their method names).
        output_dir: write the bank there atomically while compressing (nothing is held in memory) and return it
            opened from disk; otherwise the bank is held in memory until :meth:`TaskBank.save_pretrained`.
        **keywords: the options :func:`merge` takes (``device``, ``progress``, ``allow_pickle``, ``max_shard_size``,
            ...; an output that cannot honour one raises naming it), then config fields.

    Example:
        >>> bank = hf_merge.compress(base, {"sst2": m1, "mnli": m2}, hf_merge.TallMaskConfig(mask_threshold=0.4))
        >>> bank.storage_ratio(), bank.load_task("mnli")
    """
    from .bank import BankSink
    from .methods.base import TaskCompressor

    options = split_options(keywords)
    config = make_config(config, **keywords)
    if config.has_schedules():
        raise ValueError(f"compress stores every task with one {config.method!r} config; a Schedule varies a value "
                         "over the model, which only merge() resolves: give constant values.")
    compressor = get_merger(config)
    if not isinstance(compressor, TaskCompressor):
        raise TypeError(
            f"compress needs a TSVCompressConfig or TallMaskConfig (a TaskCompressor method), got {config.method!r}."
        )
    if getattr(config, "task", None) is not None:
        raise ValueError("config.task selects one task for merge(); compress stores every task, so leave it None.")
    options.reject(VOCABULARY_OPTIONS, "compress (a task bank keeps the base's vocabulary)")
    base_source, tasks = open_inputs(base, finetuned, options)
    record = MergeRecord(config, describe_inputs(base_source, tasks), artifact="task_bank", card=options.card)
    sink = BankSink(compressor, base_source, list(tasks), options, output_dir=output_dir,
                    inputs=record.input_folders(), card=record.card)
    return run(Plan(base_source, tasks, compressor), sink, options)


def merge_adapters(
    model: Any,
    adapter_names: Sequence[str],
    config: MergeConfig | str,
    adapter_name: str = "merged",
    *,
    rank: int | None = None,
    energy: float | None = None,
    **keywords: Any,
) -> Any:
    """Merge adapters already loaded in ``model`` (a ``PeftModel``, or a transformers model with adapters loaded
    through ``load_adapter``) into a new adapter ``adapter_name`` added to the same model — like PEFT's
    ``add_weighted_adapter``, but with any hf_merge method, computed in low-rank form where the method allows.

    ``keywords``: run options (as for :func:`merge`; progress bars are off by default here), then config fields.
    Returns the :class:`~hf_merge.MergedAdapter` (already loaded into ``model``).
    """
    import tempfile
    from pathlib import Path

    from .adapters import LoraAdapter, LoraSource, peft_base_state_dict
    from .io.adapter_sink import AdapterSink
    from .io.sources import StateDictSource

    if not hasattr(model, "peft_config"):
        raise TypeError("merge_adapters needs a PeftModel or a transformers model with adapters loaded.")
    if adapter_name in model.peft_config:
        raise ValueError(f"The model already has an adapter named {adapter_name!r}.")
    if len(adapter_names) < 1:
        raise ValueError("adapter_names is empty.")
    options = split_options(keywords, progress=False)
    options.reject(("revision", "token", "cache_dir"), "merge_adapters (its adapters are already loaded)")
    options.reject(VOCABULARY_OPTIONS, "merge_adapters (adapters keep their base's vocabulary)")
    config = make_config(config, **keywords)
    base = StateDictSource(peft_base_state_dict(model), "base (under the adapters)")
    tasks: dict[str, TensorSource] = {
        name: LoraSource(LoraAdapter.from_peft_model(model, name, f"adapter {name!r}")) for name in adapter_names
    }
    record = MergeRecord(config, describe_inputs(base, tasks), artifact="adapter", card=options.card)
    merged = run(Plan(base, tasks, get_merger(config), record), AdapterSink(base, tasks, options, rank=rank,
                                                                            energy=energy), options)
    with tempfile.TemporaryDirectory() as tmp:
        merged.save_pretrained(Path(tmp) / "adapter")
        model.load_adapter(str(Path(tmp) / "adapter"), adapter_name=adapter_name)
    return merged


__all__ = ["OUTPUTS", "MergeOptions", "compress", "merge", "merge_adapters"]
