"""REPAIR (Jordan et al. 2023): renormalise a merged network's activations to its endpoints' statistics.

For every repaired layer (a hidden ``Linear``/``Conv`` output of an MLP or CNN, or a ``BatchNorm`` output) and every
channel, the goal is μ* = mean_A μ_A and σ*² = mean_A σ_A² over the endpoints A, already aligned to the merged
model's neuron order (weighted means for a point on an interpolation path). Layers are corrected in forward order:
a ``BatchNorm``'s running statistics are first re-estimated on the data (cumulative average, ``momentum=None``),
then the merged layer's output statistics (μ, σ², unbiased) are measured and the correction fused into the layer:
W' = W·g, b' = (b − μ)·g + μ* with g = √(σ*² + eps)/√(σ² + eps). Transformer (LayerNorm) networks are not supported.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d)
_BATCHNORM = nn.modules.batchnorm._BatchNorm
_UNSUPPORTED = (nn.LayerNorm, nn.MultiheadAttention, nn.GroupNorm)


def default_repair_layers(model: nn.Module) -> list[str]:
    """The layers REPAIR corrects: every BatchNorm if the network has any, else every Linear/Conv but the last."""
    if getattr(model, "config", None) is not None or any(isinstance(m, _UNSUPPORTED) for m in model.modules()):
        raise ValueError(
            f"REPAIR supports MLP and BatchNorm networks; {type(model).__name__} has LayerNorm/attention layers "
            "(transformer REPAIR is not supported)."
        )
    norms = [name for name, m in model.named_modules() if isinstance(m, _BATCHNORM)]
    if norms:
        return norms
    weighted = [name for name, m in model.named_modules() if isinstance(m, _WEIGHTED)]
    if len(weighted) < 2:
        raise ValueError(f"{type(model).__name__} has no hidden Linear/Conv layer to repair.")
    return weighted[:-1]


def _forward_batches(model: torch.nn.Module, dataloader: Any, device: torch.device, max_batches: int | None) -> None:
    """Run the model on the loader's batches (the first ``max_batches``) without gradients."""
    with torch.no_grad():
        for index, batch in enumerate(dataloader):
            if max_batches is not None and index >= max_batches:
                break
            _call(model, batch, device)


def _call(model: nn.Module, batch: Any, device: torch.device) -> None:
    if isinstance(batch, torch.Tensor):
        model(batch.to(device))
    elif isinstance(batch, Mapping):
        model(**{k: v.to(device) for k, v in batch.items() if k not in ("labels", "label")})
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        model(batch[0].to(device))
    else:
        raise TypeError(
            f"REPAIR dataloader batches must be tensors, (inputs, labels) pairs or dicts, got {type(batch)}."
        )


def _channels_first(module: nn.Module, output: torch.Tensor) -> torch.Tensor:
    """The output as (channels, samples): Linear features are the last axis, conv/BatchNorm channels axis 1."""
    if isinstance(module, nn.Linear):
        return output.reshape(-1, output.shape[-1]).T
    return output.movedim(1, 0).reshape(output.shape[1], -1)


def layer_statistics(
    model: nn.Module, layers: Sequence[str], dataloader: Iterable[Any], max_batches: int | None = None
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """Per-channel output mean and unbiased variance of ``layers`` over the data (eval mode, float64), and the order
    in which the layers ran."""
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise ValueError(f"REPAIR layers {missing} are not modules of {type(model).__name__}.")
    sums: dict[str, list[Any]] = {}
    order: list[str] = []

    def hook(name: str):
        def record(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            values = _channels_first(module, output.detach()).to(torch.float64)
            if name not in sums:
                sums[name] = [0, 0.0, 0.0]
                order.append(name)
            entry = sums[name]
            entry[0] += values.shape[1]
            entry[1] = entry[1] + values.sum(1)
            entry[2] = entry[2] + values.square().sum(1)
        return record

    handles = [modules[name].register_forward_hook(hook(name)) for name in layers]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        _forward_batches(model, dataloader, device, max_batches)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    stats = {}
    for name in layers:
        if name not in sums:
            raise ValueError(f"REPAIR layer {name!r} did not run in the forward pass (or the dataloader is empty).")
        count, total, squares = sums[name]
        if count < 2:
            raise ValueError(f"REPAIR needs at least two samples per channel of {name!r}, got {count}.")
        mean = total / count
        stats[name] = (mean, (squares - count * mean.square()) / (count - 1))
    return stats, order


def _reset_batchnorm(
    model: nn.Module, module: nn.Module, dataloader: Iterable[Any], max_batches: int | None
) -> None:
    """Re-estimate one BatchNorm's running statistics on the data (cumulative average, as REPAIR's reference code resets and re-estimates them)."""
    momentum = module.momentum
    module.reset_running_stats()
    module.momentum = None
    device = next(model.parameters()).device
    model.eval()
    module.train()
    try:
        _forward_batches(model, dataloader, device, max_batches)
    finally:
        module.eval()
        module.momentum = momentum


def repair(
    merged_model: nn.Module,
    models: Sequence[nn.Module],
    dataloader: Iterable[Any],
    layers: Sequence[str] | None = None,
    *,
    eps: float = 1e-5,
    max_batches: int | None = None,
    weights: Sequence[float] | None = None,
) -> nn.Module:
    """REPAIR ``merged_model`` in place (and return it).

    Args:
        merged_model: the merged network (weights in the same neuron order as ``models``).
        models: the endpoints, **aligned** to the merged model's neuron order (e.g. the aligned models of a
            permutation merge); their statistics define the goals.
        dataloader: re-iterable batches (tensors, ``(inputs, labels)`` pairs or dicts of model inputs).
        layers: module names to correct (default :func:`default_repair_layers`).
        eps: ε of the fused correction.
        max_batches: use only the first batches of each pass.
        weights: goal weights w_A (default uniform): μ* = Σ w_A μ_A, σ*² = Σ w_A σ_A², e.g. (1 − α, α) for a point
            on an interpolation path.
    """
    if not models:
        raise ValueError("REPAIR needs the endpoint models whose statistics the merged model should match.")
    weights = [1.0 / len(models)] * len(models) if weights is None else [float(w) for w in weights]
    if len(weights) != len(models) or any(w < 0 for w in weights) or abs(sum(weights) - 1) > 1e-6:
        raise ValueError(f"weights must be {len(models)} non-negative numbers summing to 1, got {weights}.")
    layers = list(layers) if layers is not None else default_repair_layers(merged_model)
    modules = dict(merged_model.named_modules())
    for name in layers:
        module = modules.get(name)
        if not isinstance(module, (*_WEIGHTED, _BATCHNORM)):
            raise TypeError(f"REPAIR layer {name!r} must be a Linear, Conv or BatchNorm module, got {type(module)}.")
        if module.bias is None:
            raise ValueError(f"REPAIR layer {name!r} has no bias to carry the corrected mean.")
    goal_mean: dict[str, torch.Tensor] = {}
    goal_var: dict[str, torch.Tensor] = {}
    order: list[str] = []
    for model, weight in zip(models, weights):
        stats, order = layer_statistics(model, layers, dataloader, max_batches)
        for name, (mean, var) in stats.items():
            goal_mean[name] = goal_mean.get(name, 0) + weight * mean
            goal_var[name] = goal_var.get(name, 0) + weight * var
    for name in order:
        module = modules[name]
        if isinstance(module, _BATCHNORM):
            _reset_batchnorm(merged_model, module, dataloader, max_batches)
        stats, _ = layer_statistics(merged_model, [name], dataloader, max_batches)
        mean, var = stats[name]
        gain = torch.sqrt(goal_var[name] + eps) / torch.sqrt(var + eps)
        with torch.no_grad():
            shape = (-1,) + (1,) * (module.weight.ndim - 1)
            module.weight.mul_(gain.view(shape).to(module.weight.dtype))
            module.bias.copy_(((module.bias.double() - mean) * gain + goal_mean[name]).to(module.bias.dtype))
    return merged_model
