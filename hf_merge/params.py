"""Public parameter classifier: what each tensor of a model is, and which residual block it belongs to.

Methods read this instead of parsing names themselves: LiNeS scales by ``block``/``num_blocks``, C2M3 needs
``transposed`` for GPT-2's ``Conv1D``, methods with ``uses_param_info`` route by ``kind``.

- Kinds come from the model's modules (``Linear``, ``Conv1D``, ``Embedding``, norms, ...) when a model, or a config
  that builds one on the meta device, is available; otherwise from the names and ``ndim`` of a bare state dict.
- Blocks always come from the tensor's name: the first ``<container>.<index>.`` matching :data:`BLOCK_PATTERN`
  (``model.layers.3.``, ``transformer.h.3.``, ``encoder.layer.3.``, ``blocks.3.``, ``resblocks.3.``); the block
  count of a container is the largest index seen plus one, or the config's ``num_hidden_layers`` when the model has
  a single container. A model whose blocks are named otherwise gets ``block=None`` everywhere.
- Mixture-of-experts weights are ``LINEAR`` whether stored per expert (2-D, ``experts.3.w1.weight``) or as one fused
  3-D tensor ``(experts, out, in)`` (transformers 5's ``experts.gate_up_proj``; ``transposed`` when stored
  ``(experts, in, out)``); their per-expert biases are ``VECTOR``.
- ``fused`` counts the projections that one weight concatenates (:data:`FUSED_PROJECTIONS`: ``qkv_proj`` 3,
  ``gate_up_proj`` 2, ...), read off the tensor's name.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

# Containers that hold the residual blocks of a transformer: ``model.layers.3.``, ``transformer.h.3.``,
# ``encoder.layer.3.``, ``blocks.3.``, ``resblocks.3.``.
BLOCK_PATTERN = re.compile(r"(?:^|\.)(layers|layer|h|blocks|block|resblocks)\.(\d+)\.")
_NUM_LAYER_ATTRS = ("num_hidden_layers", "n_layer", "num_layers")

#: Module (or parameter) names of weights that concatenate several projections along their output dimension, and how
#: many: Phi-3 ``qkv_proj`` / ``gate_up_proj``, GPT-2 ``c_attn``, GPT-NeoX / Falcon / BLOOM ``query_key_value``, ViT-style
#: ``qkv`` (Qwen2-VL's vision tower), MPT / ModernBERT ``Wqkv``, Baichuan ``W_pack``, fused MoE
#: ``experts.gate_up_proj`` (and its ``gate_up_proj_bias``). Matched lower-cased; ``nn.MultiheadAttention``'s
#: ``in_proj_weight`` / ``in_proj_bias`` count 3 too (a module named ``in_proj``, as in Mamba, is not listed).
FUSED_PROJECTIONS: dict[str, int] = {
    "qkv_proj": 3, "qkv": 3, "c_attn": 3, "query_key_value": 3, "wqkv": 3, "w_pack": 3, "gate_up_proj": 2,
}


class ParamKind(str, enum.Enum):
    LINEAR = "linear"  # 2-D weight of a Linear / Conv1D layer, or a 3-D stack of MoE expert matrices
    EMBEDDING = "embedding"  # lookup table (token / position embeddings) or a learned token (ViT ``cls_token``)
    CONV = "conv"  # weights of ConvNd (ndim >= 3)
    NORM = "norm"  # weight / bias of LayerNorm, RMSNorm, BatchNorm, GroupNorm
    VECTOR = "vector"  # biases and other 1-D / 0-D float parameters
    BUFFER = "buffer"  # registered buffers (running stats, position ids, ...)


@dataclass(frozen=True)
class ParamInfo:
    """What one tensor of a model is.

    ``block`` is the 0-based index of the residual block that holds the tensor (``None`` outside the blocks) and
    ``num_blocks`` the number of blocks in its stack; ``stack`` names the container (``"model.layers"``), so that
    encoder and decoder stacks of encoder-decoder models are numbered separately. ``transposed`` marks weights stored
    (in, out) such as GPT-2's ``Conv1D``.

    ``fused`` is the number of projections a weight (and its bias) concatenates along the output dimension (dim 0, or
    the last dim when ``transposed``; for a 3-D expert stack the same dims after the expert one), e.g. 3 for Phi-3's
    ``qkv_proj``, 2 for ``gate_up_proj``; ``None`` for a single projection. The parts need not be equal
    (grouped-query attention: q has more rows than k and v) nor contiguous (GPT-NeoX interleaves them per head), so
    the split points belong to the architecture; ``fused`` only says that one matrix holds several.
    """

    name: str
    kind: ParamKind
    ndim: int
    block: int | None = None
    num_blocks: int | None = None
    stack: str | None = None
    transposed: bool = False
    fused: int | None = None


def _block_of(name: str) -> tuple[str | None, int | None]:
    match = BLOCK_PATTERN.search(name)
    if match is None:
        return None, None
    return name[: match.end(1)].lstrip("."), int(match.group(2))


def _num_layers_from_config(config: Any) -> int | None:
    if config is None:
        return None
    get = config.get if isinstance(config, Mapping) else (lambda k: getattr(config, k, None))
    for attr in _NUM_LAYER_ATTRS:
        value = get(attr)
        if isinstance(value, int):
            return value
    return None


def _leaf(name: str) -> tuple[str, str]:
    """``(module, parameter)``: the last two components of a lower-cased tensor name."""
    parts = name.lower().rsplit(".", 2)
    return (parts[-2] if len(parts) >= 2 else ""), parts[-1]


def _fused_of(name: str) -> int | None:
    """How many projections the tensor ``name`` concatenates (:data:`FUSED_PROJECTIONS`), or ``None``."""
    module, param = _leaf(name)
    if param in ("in_proj_weight", "in_proj_bias"):  # nn.MultiheadAttention
        return 3
    projection = module if param in ("weight", "bias") else param.removesuffix("_bias")
    if projection == "c_attn" and "crossattention" in name.lower():  # GPT-2 cross-attention: k and v only
        return 2
    return FUSED_PROJECTIONS.get(projection)


def _is_learned_token(param: str) -> bool:
    """A parameter held directly (no lookup module) that is an embedding: ``cls_token``, ``position_embeddings``,
    ``class_embedding``, ``register_tokens``, ..."""
    return ("embed" in param and not param.endswith("scale")) or param.endswith(("token", "tokens"))


def _kind_from_name(name: str, tensor_ndim: int, is_float: bool) -> ParamKind:
    lowered = name.lower()
    if not is_float or any(s in lowered for s in ("running_mean", "running_var", "position_ids", "num_batches")):
        return ParamKind.BUFFER
    module, param = _leaf(name)
    if param not in ("weight", "bias") and tensor_ndim >= 1 and _is_learned_token(param):
        return ParamKind.EMBEDDING
    if param.endswith("bias") and tensor_ndim <= 2 and not any(s in module for s in ("norm", "ln", "bn")):
        return ParamKind.VECTOR  # biases, also 2-D ones: per-expert biases, BART's ``final_logits_bias`` (1, vocab)
    if tensor_ndim >= 3:
        return ParamKind.LINEAR if "experts" in lowered else ParamKind.CONV
    if tensor_ndim == 2:
        if module in ("shared", "relative_attention_bias"):  # T5 / BART shared embeddings, T5 relative positions
            return ParamKind.EMBEDDING
        if any(s in lowered for s in ("embed", "wte.", "wpe.", "embeddings")) and not any(
            s in lowered for s in ("proj", "embed_out")  # projections; GPT-NeoX's output head ``embed_out``
        ):
            return ParamKind.EMBEDDING
        return ParamKind.LINEAR
    if any(s in module for s in ("norm", "ln", "bn")):
        return ParamKind.NORM
    return ParamKind.VECTOR


def _kinds_from_modules(model: torch.nn.Module) -> dict[str, tuple[ParamKind, bool]]:
    """Kind and ``transposed`` flag of every parameter and buffer, read off the module types."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        Conv1D = ()  # type: ignore[assignment]
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._NormBase)
    out: dict[str, tuple[ParamKind, bool]] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        is_norm = isinstance(module, norm_types) or "norm" in type(module).__name__.lower()
        for pname, param in module.named_parameters(recurse=False):
            if isinstance(module, Conv1D) and pname == "weight":
                kind, transposed = ParamKind.LINEAR, True
            elif isinstance(module, torch.nn.Linear) and pname == "weight":
                kind, transposed = ParamKind.LINEAR, False
            elif isinstance(module, torch.nn.Embedding) and pname == "weight":
                kind, transposed = ParamKind.EMBEDDING, False
            elif isinstance(module, torch.nn.modules.conv._ConvNd) and pname == "weight":
                kind, transposed = ParamKind.CONV, False
            elif is_norm:
                kind, transposed = ParamKind.NORM, False
            elif hasattr(module, "is_transposed") and param.ndim == 3:  # transformers' fused MoE experts module
                kind, transposed = ParamKind.LINEAR, bool(module.is_transposed)
            else:
                kind, transposed = _kind_from_name(prefix + pname, param.ndim, param.is_floating_point()), False
            out.setdefault(prefix + pname, (kind, transposed))
        for bname, _ in module.named_buffers(recurse=False):
            out.setdefault(prefix + bname, (ParamKind.BUFFER, False))
    return out


def classify_parameters(
    shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]] | torch.nn.Module,
    *,
    model: torch.nn.Module | None = None,
    config: Any = None,
) -> dict[str, ParamInfo]:
    """Classify every tensor of a model.

    Args:
        shapes: ``{name: (shape, dtype)}`` of the tensors to classify, or a model (its state dict is used).
        model: a model (possibly on the meta device) whose modules decide the kinds; ``None`` for a bare state dict.
        config: the model config (object or dict), used for the number of blocks (``num_hidden_layers``).

    Returns:
        ``{name: ParamInfo}`` in the order of ``shapes``.
    """
    if isinstance(shapes, torch.nn.Module):
        model = shapes if model is None else model
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in shapes.state_dict().items()}
    if config is None and model is not None:
        config = getattr(model, "config", None)
    module_kinds = _kinds_from_modules(model) if model is not None else {}

    stacks: dict[str, int] = {}
    for name in shapes:
        stack, block = _block_of(name)
        if stack is not None:
            stacks[stack] = max(stacks.get(stack, 0), block + 1)
    configured = _num_layers_from_config(config)
    if configured is not None and len(stacks) == 1:
        (only,) = stacks
        stacks[only] = max(stacks[only], configured)

    infos: dict[str, ParamInfo] = {}
    for name, (shape, dtype) in shapes.items():
        ndim = len(shape)
        if name in module_kinds:
            kind, transposed = module_kinds[name]
        else:
            kind, transposed = _kind_from_name(name, ndim, dtype.is_floating_point), False
        stack, block = _block_of(name)
        infos[name] = ParamInfo(
            name=name,
            kind=kind,
            ndim=ndim,
            block=block,
            num_blocks=stacks.get(stack) if stack is not None else None,
            stack=stack,
            transposed=transposed,
            fused=_fused_of(name) if kind in (ParamKind.LINEAR, ParamKind.VECTOR) else None,
        )
    return infos
