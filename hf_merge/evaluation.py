"""Classification metrics for judging merges, in plain torch, plus local ``evaluate``-compatible metric modules.

* :func:`accuracy`, :func:`f1_score`, :func:`confusion_matrix` take predicted and true class indices (sequences,
  numpy arrays or tensors).
* :func:`normalized_accuracy` (merged / fine-tuned expert, the multi-task merging papers' headline number) and
  :func:`retained_gain` ((merged − base) / (expert − base), the share of the fine-tuning gain the merge keeps).
* :func:`evaluate_classifier` runs a classifier over batches and returns accuracy and macro F1;
  :func:`compute_classification_metrics` is a ``transformers.Trainer`` ``compute_metrics`` callback.
* :func:`metric_path` / :func:`load_metric`: the metric modules shipped in ``hf_merge/metrics`` (``merge_accuracy``,
  ``merge_f1``), loadable offline with ``evaluate.load(metric_path("merge_accuracy"))``. ``evaluate`` is optional and
  imported only by :func:`load_metric`; the Hub's ``evaluate.load("accuracy")`` is never used.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

METRICS_DIR = Path(__file__).resolve().parent / "metrics"
F1_AVERAGES = ("macro", "micro", "weighted")


def _as_labels(values: Any, name: str) -> torch.Tensor:
    """A 1-D int64 tensor of class indices from a sequence, numpy array or tensor."""
    tensor = values.detach().cpu() if isinstance(values, torch.Tensor) else torch.as_tensor(values)
    if tensor.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of class indices, got shape {tuple(tensor.shape)}.")
    if tensor.is_floating_point():
        if not torch.equal(tensor, tensor.round()):
            raise ValueError(f"{name} must hold integer class indices; got non-integer values (pass argmax of logits).")
    elif tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"{name} must hold integer class indices, got dtype {tensor.dtype}.")
    tensor = tensor.to(torch.int64)
    if tensor.numel() and int(tensor.min()) < 0:
        raise ValueError(f"{name} holds a negative class index {int(tensor.min())}.")
    return tensor


def _pair(predictions: Any, references: Any) -> tuple[torch.Tensor, torch.Tensor]:
    preds, refs = _as_labels(predictions, "predictions"), _as_labels(references, "references")
    if preds.numel() != refs.numel():
        raise ValueError(f"predictions has {preds.numel()} entries but references has {refs.numel()}.")
    if preds.numel() == 0:
        raise ValueError("predictions and references are empty: a metric needs at least one example.")
    return preds, refs


def accuracy(predictions: Any, references: Any) -> float:
    """Fraction of predictions equal to the reference class."""
    preds, refs = _pair(predictions, references)
    return float((preds == refs).to(torch.float64).mean())


def confusion_matrix(predictions: Any, references: Any, num_classes: int | None = None) -> torch.Tensor:
    """``C[i, j]`` = number of examples of true class i predicted as class j (int64, num_classes × num_classes)."""
    preds, refs = _pair(predictions, references)
    seen = int(torch.maximum(preds.max(), refs.max())) + 1
    if num_classes is None:
        num_classes = seen
    elif seen > num_classes:
        raise ValueError(f"A class index {seen - 1} is out of range for num_classes={num_classes}.")
    flat = refs * num_classes + preds
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def f1_score(predictions: Any, references: Any, *, average: str = "macro", num_classes: int | None = None) -> float:
    """F1 = 2PR/(P+R) per class, averaged: ``macro`` (unweighted over classes present in predictions or references),
    ``weighted`` (by class support) or ``micro`` (equals accuracy for single-label classification)."""
    if average not in F1_AVERAGES:
        raise ValueError(f"average must be one of {list(F1_AVERAGES)}, got {average!r}.")
    matrix = confusion_matrix(predictions, references, num_classes).to(torch.float64)
    true_pos = matrix.diag()
    predicted, actual = matrix.sum(dim=0), matrix.sum(dim=1)
    if average == "micro":
        return float(true_pos.sum() / matrix.sum())
    denominator = predicted + actual
    per_class = torch.where(denominator > 0, 2 * true_pos / denominator.clamp(min=1), torch.zeros_like(true_pos))
    if average == "weighted":
        return float((per_class * actual).sum() / actual.sum())
    present = denominator > 0
    return float(per_class[present].mean())


def normalized_accuracy(merged: float, finetuned: float) -> float:
    """merged / fine-tuned accuracy of the same task (the TSV / Iso papers' "normalized accuracy")."""
    if finetuned <= 0:
        raise ValueError(f"The fine-tuned accuracy must be positive to normalize by it, got {finetuned!r}.")
    return merged / finetuned


def retained_gain(merged: float, finetuned: float, base: float) -> float:
    """(merged − base) / (fine-tuned − base): 1 keeps the whole fine-tuning gain, 0 is no better than the base."""
    gain = finetuned - base
    if gain == 0:
        raise ValueError(f"Fine-tuning did not change the accuracy ({finetuned!r} = base): the retained gain is undefined.")
    return (merged - base) / gain


def _logits_of(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    logits = getattr(output, "logits", None)
    if logits is None:
        raise TypeError(f"The model returned a {type(output).__name__} without logits; return a tensor or .logits.")
    return logits


@torch.no_grad()
def evaluate_classifier(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    label_key: str = "labels",
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Accuracy and macro F1 of ``model`` over ``batches`` (dicts of model inputs plus ``label_key``).

    The model is called with every other key of each batch, in eval mode, and its logits' argmax is the prediction.
    """
    was_training = model.training
    model.eval()
    predictions, references = [], []
    try:
        for batch in batches:
            if label_key not in batch:
                raise KeyError(f"A batch has no {label_key!r} entry; its keys are {sorted(batch)}.")
            inputs = {k: (v.to(device) if device is not None else v) for k, v in batch.items() if k != label_key}
            predictions.append(_logits_of(model(**inputs)).argmax(dim=-1).cpu())
            references.append(torch.as_tensor(batch[label_key]).cpu())
    finally:
        model.train(was_training)
    if not predictions:
        raise ValueError("batches is empty: nothing to evaluate.")
    preds, refs = torch.cat(predictions), torch.cat(references)
    return {"accuracy": accuracy(preds, refs), "f1": f1_score(preds, refs)}


def compute_classification_metrics(eval_prediction: Any) -> dict[str, float]:
    """A ``transformers.Trainer`` ``compute_metrics``: accuracy and macro F1 from ``(logits, label_ids)``."""
    logits, labels = eval_prediction[0], eval_prediction[1]
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    predictions = torch.as_tensor(logits).argmax(dim=-1)
    return {"accuracy": accuracy(predictions, labels), "f1": f1_score(predictions, labels)}


def available_metrics() -> list[str]:
    """Names of the metric modules shipped with hf_merge."""
    return sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def metric_path(name: str) -> str:
    """Local folder of a shipped metric module, for ``evaluate.load(metric_path("merge_accuracy"))``."""
    folder = METRICS_DIR / name
    if not (folder / f"{name}.py").is_file():
        raise ValueError(f"No shipped metric {name!r}; available: {available_metrics()}.")
    return str(folder)


def load_metric(name: str, **kwargs: Any) -> Any:
    """``evaluate.load`` of a shipped metric module (works offline). Needs the optional ``evaluate`` package."""
    path = metric_path(name)
    try:
        import evaluate
    except ImportError as error:
        raise ImportError(
            "load_metric needs the optional 'evaluate' package (pip install evaluate); the plain functions "
            "hf_merge.evaluation.accuracy / f1_score need nothing extra."
        ) from error
    return evaluate.load(path, **kwargs)
