"""Built-in permutation specs: MLP / plain conv chains, BatchNorm ResNets, and BERT / ViT encoders (the architectures C2M3's experiments align).

Residual networks: every tensor that reads or writes one residual stream shares one permutation ("P_res" in the
transformers specs, one per stage in a ResNet, where a ``downsample`` shortcut starts a new stream). Each block's
inner width (ResNet ``conv1`` output, transformer FFN hidden layer) has its own permutation. Attention layers get a
q/k and a v/o permutation tied into a :class:`HeadGroup` (heads move as blocks; dimensions move within heads).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from torch import nn

from .spec import HeadGroup, PermutationSpec

_PARAMETER_FREE_OK = (
    nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Identity, nn.Dropout, nn.MaxPool2d,
    nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten,
)


def mlp_spec(layers: Sequence[str], *, bias: bool = True) -> PermutationSpec:
    """A chain of ``Linear`` layers named ``layers`` (e.g. ``["0", "2", "4"]``): one permutation ``P_<layer>`` per
    hidden layer on the rows of W_ℓ, b_ℓ and the columns of W_{ℓ+1}; input and output are not permuted."""
    if len(layers) < 2:
        raise ValueError(f"An MLP spec needs at least two Linear layers, got {list(layers)}.")
    axes: dict[str, tuple[str | None, ...]] = {}
    previous: str | None = None
    for i, layer in enumerate(layers):
        out = f"P_{layer}" if i < len(layers) - 1 else None
        axes[f"{layer}.weight"] = (out, previous)
        if bias:
            axes[f"{layer}.bias"] = (out,)
        previous = out
    return PermutationSpec(axes)


def sequential_spec(model: nn.Module) -> PermutationSpec:
    """Spec of a feed-forward chain (``nn.Sequential`` of ``Linear``/``Conv``/``BatchNorm`` and parameter-free
    layers, in forward order): each ``Linear``/``Conv`` output except the last gets its own permutation, which the
    following ``BatchNorm`` (weight, bias, running stats) and the next layer's input columns share."""
    weighted = (nn.Linear, nn.Conv1d, nn.Conv2d)
    norms = (nn.BatchNorm1d, nn.BatchNorm2d)
    leaves = [(name, m) for name, m in model.named_modules() if not list(m.children())]
    last_weighted = max((i for i, (_, m) in enumerate(leaves) if isinstance(m, weighted)), default=None)
    if last_weighted is None:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv layer to permute.")
    axes: dict[str, tuple[str | None, ...]] = {}
    current: str | None = None
    current_size: int | None = None
    for i, (name, module) in enumerate(leaves):
        if isinstance(module, weighted):
            fan_in = module.in_features if isinstance(module, nn.Linear) else module.in_channels
            if current is not None and fan_in != current_size:
                raise ValueError(
                    f"Layer {name!r} reads {fan_in} features but the previous layer writes {current_size}; "
                    "sequential_spec needs pooling to the channel count before a Linear layer (or write a spec)."
                )
            out = f"P_{name}" if i < last_weighted else None
            axes[f"{name}.weight"] = (out, current) + (None,) * (module.weight.ndim - 2)
            if module.bias is not None:
                axes[f"{name}.bias"] = (out,)
            current, current_size = out, module.weight.shape[0]
        elif isinstance(module, norms):
            if current is None:
                raise ValueError(f"BatchNorm {name!r} normalises an unpermuted input; sequential_spec cannot place it.")
            axes.update(_batchnorm_axes(name, module, current))
        elif list(module.parameters(recurse=False)) or not isinstance(module, _PARAMETER_FREE_OK):
            raise ValueError(f"sequential_spec does not know how to permute layer {name!r} ({type(module).__name__}).")
    return PermutationSpec(axes)


def _batchnorm_axes(name: str, module: nn.Module, perm: str) -> dict[str, tuple[str | None, ...]]:
    axes: dict[str, tuple[str | None, ...]] = {}
    if module.weight is not None:
        axes[f"{name}.weight"] = (perm,)
        axes[f"{name}.bias"] = (perm,)
    if module.running_mean is not None:
        axes[f"{name}.running_mean"] = (perm,)
        axes[f"{name}.running_var"] = (perm,)
    return axes


def _conv(name: str, out: str | None, inp: str | None) -> dict[str, tuple[str | None, ...]]:
    return {f"{name}.weight": (out, inp, None, None)}


def resnet_spec(model: nn.Module) -> PermutationSpec:
    """Spec of a torchvision-style ResNet of basic blocks (``conv1``, ``bn1``, ``layerN``, ``fc``).

    The stem output and the outputs of all blocks of one stage share the stream permutation; a block with a
    ``downsample`` shortcut starts a new stream permutation (its 1×1 conv reads the old one). Each block's inner
    channels (``conv1``/``bn1`` rows, ``conv2`` columns) get their own permutation. ``fc`` reads the last stream.
    """
    for attr in ("conv1", "bn1", "fc"):
        if not hasattr(model, attr):
            raise ValueError(f"resnet_spec expects a torchvision-style ResNet; {type(model).__name__} has no {attr!r}.")
    axes: dict[str, tuple[str | None, ...]] = {}
    stream = "P_stem"
    axes.update(_conv("conv1", stream, None))
    axes.update(_batchnorm_axes("bn1", model.bn1, stream))
    blocks = [
        (name, m) for name, m in model.named_modules()
        if all(hasattr(m, a) for a in ("conv1", "bn1", "conv2", "bn2")) and name
    ]
    if not blocks:
        raise ValueError(f"resnet_spec found no basic blocks (conv1/bn1/conv2/bn2) in {type(model).__name__}.")
    for name, block in blocks:
        if getattr(block, "conv3", None) is not None:
            raise ValueError(f"resnet_spec supports basic blocks only; {name!r} is a bottleneck block.")
        inner = f"P_{name}.inner"
        out = stream
        if block.downsample is not None:
            out = f"P_{name}.res"
            axes.update(_conv(f"{name}.downsample.0", out, stream))
            axes.update(_batchnorm_axes(f"{name}.downsample.1", block.downsample[1], out))
        axes.update(_conv(f"{name}.conv1", inner, stream))
        axes.update(_batchnorm_axes(f"{name}.bn1", block.bn1, inner))
        axes.update(_conv(f"{name}.conv2", out, inner))
        axes.update(_batchnorm_axes(f"{name}.bn2", block.bn2, out))
        for conv in ("conv1", "conv2"):
            if getattr(block, conv).bias is not None:
                axes[f"{name}.{conv}.bias"] = axes[f"{name}.{conv}.weight"][:1]
        stream = out
    axes["fc.weight"] = (None, stream)
    return PermutationSpec(axes)


# ----------------------------------------------------------------------------------------------- transformers
def _config_get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def _prefix_of(keys: Collection[str], suffix: str, model_name: str) -> str:
    matches = [k[: -len(suffix)] for k in keys if k.endswith(suffix)]
    if len(matches) != 1:
        raise ValueError(f"{model_name} spec: expected one tensor ending in {suffix!r}, found {matches or 'none'}.")
    return matches[0]


def _first_present(keys: Collection[str], candidates: Sequence[str], what: str) -> str:
    for candidate in candidates:
        if f"{candidate}.weight" in keys:
            return candidate
    raise ValueError(f"No {what} found; looked for {[c + '.weight' for c in candidates]}.")


def _linear(axes: dict, keys: Collection[str], name: str, out: str | None, inp: str | None) -> None:
    axes[f"{name}.weight"] = (out, inp)
    if f"{name}.bias" in keys:
        axes[f"{name}.bias"] = (out,)


def _norm(axes: dict, keys: Collection[str], name: str, perm: str) -> None:
    for param in ("weight", "bias"):
        if f"{name}.{param}" in keys:
            axes[f"{name}.{param}"] = (perm,)


def _encoder_layer(
    axes: dict, keys: Collection[str], layer: str, names: Mapping[str, Sequence[str]], index: int
) -> None:
    """One post/pre-LN encoder block reading and writing the stream ``P_res``."""
    qk, vo, ffn = f"P_qk_{index}", f"P_vo_{index}", f"P_ffn_{index}"
    found = {role: _first_present(keys, [f"{layer}.{c}" for c in cands], f"{role} of {layer!r}")
             for role, cands in names.items() if role != "norms"}
    _linear(axes, keys, found["query"], qk, "P_res")
    _linear(axes, keys, found["key"], qk, "P_res")
    _linear(axes, keys, found["value"], vo, "P_res")
    _linear(axes, keys, found["attn_out"], "P_res", vo)
    _linear(axes, keys, found["ffn_in"], ffn, "P_res")
    _linear(axes, keys, found["ffn_out"], "P_res", ffn)
    norms = [f"{layer}.{n}" for n in names["norms"] if f"{layer}.{n}.weight" in keys]
    if len(norms) != 2:
        raise ValueError(f"Expected two LayerNorms in {layer!r}, found {norms}.")
    for norm in norms:
        _norm(axes, keys, norm, "P_res")


_BERT_LAYER = {
    "query": ("attention.self.query",),
    "key": ("attention.self.key",),
    "value": ("attention.self.value",),
    "attn_out": ("attention.output.dense",),
    "ffn_in": ("intermediate.dense",),
    "ffn_out": ("output.dense",),
    "norms": ("attention.output.LayerNorm", "output.LayerNorm"),
}
_VIT_LAYER = {
    "query": ("attention.q_proj", "attention.attention.query"),
    "key": ("attention.k_proj", "attention.attention.key"),
    "value": ("attention.v_proj", "attention.attention.value"),
    "attn_out": ("attention.o_proj", "attention.output.dense"),
    "ffn_in": ("mlp.fc1", "intermediate.dense"),
    "ffn_out": ("mlp.fc2", "output.dense"),
    "norms": ("layernorm_before", "layernorm_after"),
}


def _layer_prefixes(keys: Collection[str], query_suffixes: Sequence[str], model_name: str) -> list[str]:
    alternatives = "|".join(map(re.escape, query_suffixes))
    pattern = re.compile(rf"^(.*\.(?:layer|layers)\.(\d+))\.(?:{alternatives})\.weight$")
    found = {}
    for key in keys:
        match = pattern.match(key)
        if match:
            found[int(match.group(2))] = match.group(1)
    if not found or sorted(found) != list(range(len(found))):
        raise ValueError(f"{model_name} spec: could not find consecutive encoder layers (got indices {sorted(found)}).")
    return [found[i] for i in range(len(found))]


def _heads(config: Any, layers: int) -> tuple[int, ...]:
    heads = _config_get(config, "num_attention_heads")
    if not isinstance(heads, int):
        raise TypeError("The model config has no integer num_attention_heads; cannot build the attention spec.")
    return (heads,) * layers


def _pooler_and_classifier(axes: dict, keys: Collection[str], prefix: str) -> None:
    pooler = f"{prefix}pooler.dense"
    head_input = "P_res"
    if f"{pooler}.weight" in keys:
        _linear(axes, keys, pooler, "P_pool", "P_res")  # tanh(W x + b) is elementwise: its rows get their own perm
        head_input = "P_pool"
    if "classifier.weight" in keys:
        axes["classifier.weight"] = (None, head_input)


def bert_spec(config: Any, keys: Collection[str]) -> PermutationSpec:
    """Spec of a transformers BERT encoder (``BertModel`` / ``BertForSequenceClassification`` / token classification).

    The residual permutation covers the word/position/token-type embedding columns, the embedding LayerNorm, every
    LayerNorm on the stream, the rows of the attention-output and FFN-output dense layers, and the columns of q/k/v
    and the intermediate dense. The pooler reads the stream (columns); its own rows get ``P_pool``, which the
    classifier reads.
    """
    prefix = _prefix_of(keys, "embeddings.word_embeddings.weight", "BERT")
    axes: dict[str, tuple[str | None, ...]] = {}
    for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        if f"{prefix}embeddings.{table}.weight" in keys:
            axes[f"{prefix}embeddings.{table}.weight"] = (None, "P_res")
    _norm(axes, keys, f"{prefix}embeddings.LayerNorm", "P_res")
    layers = _layer_prefixes(keys, _BERT_LAYER["query"], "BERT")
    groups = []
    for index, (layer, heads) in enumerate(zip(layers, _heads(config, len(layers)))):
        _encoder_layer(axes, keys, layer, _BERT_LAYER, index)
        groups.append(HeadGroup((f"P_qk_{index}", f"P_vo_{index}"), heads, (True, True)))
    _pooler_and_classifier(axes, keys, prefix)
    return PermutationSpec(axes, tuple(groups))


def vit_spec(config: Any, keys: Collection[str]) -> PermutationSpec:
    """Spec of a transformers ViT (``ViTModel`` / ``ViTForImageClassification``, either layer naming).

    The residual permutation covers the patch projection's output channels and bias, the cls token, the position
    embeddings (and the mask token), every LayerNorm on the stream including the final one, and the classifier's
    columns; blocks as in :func:`bert_spec`.
    """
    prefix = _prefix_of(keys, "embeddings.patch_embeddings.projection.weight", "ViT")
    axes: dict[str, tuple[str | None, ...]] = {
        f"{prefix}embeddings.patch_embeddings.projection.weight": ("P_res", None, None, None),
    }
    if f"{prefix}embeddings.patch_embeddings.projection.bias" in keys:
        axes[f"{prefix}embeddings.patch_embeddings.projection.bias"] = ("P_res",)
    for token in ("cls_token", "position_embeddings", "mask_token", "distillation_token"):
        if f"{prefix}embeddings.{token}" in keys:
            axes[f"{prefix}embeddings.{token}"] = (None, None, "P_res")
    layers = _layer_prefixes(keys, _VIT_LAYER["query"], "ViT")
    groups = []
    for index, (layer, heads) in enumerate(zip(layers, _heads(config, len(layers)))):
        _encoder_layer(axes, keys, layer, _VIT_LAYER, index)
        groups.append(HeadGroup((f"P_qk_{index}", f"P_vo_{index}"), heads, (True, True)))
    _norm(axes, keys, f"{prefix}layernorm", "P_res")
    _pooler_and_classifier(axes, keys, prefix)
    return PermutationSpec(axes, tuple(groups))


def llama_spec(config: Any, keys: Collection[str]) -> PermutationSpec:
    """Spec of a transformers Llama decoder (rotary, RMSNorm, gated MLP) without grouped-query attention.

    RoPE ties the dimension pairs (i, i + d/2) of q and k to frequencies, so q/k get head-level permutations only
    (``within=False``); v/o also permute dimensions within heads. The residual stream covers the token embedding
    and ``lm_head`` columns, every RMSNorm, o_proj/down_proj rows and q/k/v/gate/up columns. Grouped-query attention
    (fewer kv heads) would tie differently sized axes and is refused.
    """
    heads = _config_get(config, "num_attention_heads")
    kv_heads = _config_get(config, "num_key_value_heads") or heads
    if kv_heads != heads:
        raise ValueError(
            f"llama_spec does not support grouped-query attention ({heads} query heads, {kv_heads} kv heads)."
        )
    prefix = _prefix_of(keys, "embed_tokens.weight", "Llama")
    axes: dict[str, tuple[str | None, ...]] = {f"{prefix}embed_tokens.weight": (None, "P_res")}
    layers = _layer_prefixes(keys, ("self_attn.q_proj",), "Llama")
    groups = []
    for index, (layer, num_heads) in enumerate(zip(layers, _heads(config, len(layers)))):
        qk, vo, ffn = f"P_qk_{index}", f"P_vo_{index}", f"P_ffn_{index}"
        _norm(axes, keys, f"{layer}.input_layernorm", "P_res")
        _linear(axes, keys, f"{layer}.self_attn.q_proj", qk, "P_res")
        _linear(axes, keys, f"{layer}.self_attn.k_proj", qk, "P_res")
        _linear(axes, keys, f"{layer}.self_attn.v_proj", vo, "P_res")
        _linear(axes, keys, f"{layer}.self_attn.o_proj", "P_res", vo)
        _norm(axes, keys, f"{layer}.post_attention_layernorm", "P_res")
        _linear(axes, keys, f"{layer}.mlp.gate_proj", ffn, "P_res")
        _linear(axes, keys, f"{layer}.mlp.up_proj", ffn, "P_res")
        _linear(axes, keys, f"{layer}.mlp.down_proj", "P_res", ffn)
        groups.append(HeadGroup((qk, vo), num_heads, (False, True)))
    _norm(axes, keys, f"{prefix}norm", "P_res")
    if "lm_head.weight" in keys:
        axes["lm_head.weight"] = (None, "P_res")
    return PermutationSpec(axes, tuple(groups))


TRANSFORMER_SPECS = {"bert": bert_spec, "vit": vit_spec, "llama": llama_spec}


def default_spec(
    model: nn.Module | None = None, *, config: Any = None, keys: Collection[str] | None = None
) -> PermutationSpec:
    """The built-in spec for a model: by ``config.model_type`` (BERT, ViT, Llama), else a ResNet of basic blocks, else a
    feed-forward chain. ``config``/``keys`` describe a model given only as a checkpoint or state dict."""
    if model is not None:
        config = getattr(model, "config", config)
        keys = list(model.state_dict()) if keys is None else keys
    model_type = _config_get(config, "model_type") if config is not None else None
    if model_type is not None:
        if model_type not in TRANSFORMER_SPECS:
            raise ValueError(
                f"No built-in permutation spec for model_type {model_type!r} (built-in: {sorted(TRANSFORMER_SPECS)}); "
                "pass spec= in the config."
            )
        return TRANSFORMER_SPECS[model_type](config, keys or [])
    if model is None:
        raise ValueError("Cannot choose a permutation spec for a bare state dict; pass spec= in the config.")
    if all(hasattr(model, a) for a in ("conv1", "bn1", "fc")):
        return resnet_spec(model)
    return sequential_spec(model)
