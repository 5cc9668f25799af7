"""Validation search of a merge method's coefficient over its papers' grid.

``search(base, finetuned, config, evaluate_fn)`` scores every grid value of one coefficient with ``evaluate_fn`` and
returns the best. Each method's config says which coefficient its papers search, over which grid
(:meth:`~hf_merge.MergeConfig.search_space`), and how the merged model depends on a coefficient
(:meth:`~hf_merge.MergeConfig.coefficient_kind`); the search runs as few merges as that dependence allows:

* ``"linear"``: θ(c) = θ₀ + c·Δ with Δ the merged task vector at c = 1 — one streamed merge for the whole grid;
* ``"affine"``: θ(c) = θ(0) + c·(θ(1) − θ(0)) — two merges;
* ``"per_task"``: ``evaluate_fn`` is a ``{task: fn}`` mapping and task t's value maximises fn_t on task t's model
  (the config with ``task=t``), one merge per task and grid value;
* ``"rerun"`` (any other coefficient, e.g. TIES ``density``): one merge per grid value.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .config import MergeConfig
from .registry import make_config

EvaluateFn = Callable[[Any], float]


@dataclasses.dataclass
class SearchResult:
    """Outcome of :func:`search`.

    ``scores`` lists ``(value, score)`` for every grid value in order (for a per-task search, value is
    ``(task, value)``); ``best_value`` is the first value reaching ``best_score`` (``{task: value}`` per task);
    ``best_config`` is ``config`` with the coefficient set to it; ``merges`` counts the merge passes that ran.
    """

    method: str
    parameter: str
    best_config: MergeConfig
    best_value: Any
    best_score: float
    scores: list[tuple[Any, float]]
    merges: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "parameter": self.parameter,
            "best_value": self.best_value,
            "best_score": self.best_score,
            "best_config": self.best_config.to_dict(),
            "scores": [[value if not isinstance(value, tuple) else list(value), score] for value, score in self.scores],
            "merges": self.merges,
        }


def default_grid(config: MergeConfig) -> tuple[str, tuple[Any, ...]]:
    """The papers' ``(coefficient, grid)`` for ``config``'s method, from its :meth:`~hf_merge.MergeConfig.search_space`
    (e.g. DARE searches its ``then`` merge's coefficient as ``"then.scaling"``)."""
    space = config.search_space()
    if space is None:
        raise ValueError(
            f"Method {config.method!r} has no coefficient searched in its papers; pass grid={{'<field>': [values]}} to "
            "search one of its fields."
        )
    return space.parameter, tuple(space.values)


def _get_field(config: MergeConfig, path: str) -> Any:
    value: Any = config
    for part in path.split("."):
        if not isinstance(value, MergeConfig) or part not in {f.name for f in dataclasses.fields(value) if f.init}:
            raise ValueError(f"{type(config).__name__} has no coefficient {path!r} (no field {part!r}).")
        value = getattr(value, part)
    return value


def _set_field(config: MergeConfig, path: str, value: Any) -> MergeConfig:
    """A copy of ``config`` with the (dotted, nested-config) field ``path`` set to ``value``, validated."""
    _get_field(config, path)
    head, _, rest = path.partition(".")
    if not rest:
        return config.replace(**{head: value})
    return config.replace(**{head: _set_field(getattr(config, head), rest, value)})


def _resolve_grid(
    config: MergeConfig, grid: Mapping[str, Sequence[float]] | Sequence[float] | None
) -> tuple[str, tuple[Any, ...]]:
    if grid is None:
        parameter, values = default_grid(config)
    elif isinstance(grid, Mapping):
        if len(grid) != 1:
            raise ValueError(f"grid must name exactly one coefficient, e.g. {{'scaling': [0.1, 0.2]}}; got {list(grid)}.")
        (parameter, values), = grid.items()
        _get_field(config, parameter)
    else:
        parameter, _ = default_grid(config)
        values = grid
    if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__iter__"):
        raise TypeError(f"The grid of {parameter!r} must be a sequence of values, got {values!r}.")
    values = tuple(values)
    if not values:
        raise ValueError(f"The grid of {parameter!r} is empty.")
    return parameter, values


def _state_dict(result: Any) -> dict[str, torch.Tensor]:
    if isinstance(result, torch.nn.Module):
        return dict(result.state_dict())
    if isinstance(result, Mapping):
        return dict(result)
    raise TypeError(f"Expected a model or a state dict from the merge, got {type(result).__name__}.")


def _base_state(base: Any, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """θ₀ in the key space of a merge result ``like`` (a model's state dict or a state dict)."""
    if isinstance(base, torch.nn.Module):
        state = dict(base.state_dict())
    elif isinstance(base, Mapping):
        state = dict(base)
    else:
        from .io.sources import open_source
        from .models import load_model_from_folder

        model = load_model_from_folder(Path(os.fspath(base)))
        if model is not None:
            state = dict(model.state_dict())
        else:
            source = open_source(base, "base")
            state = {key: source.get(key) for key in like if source.has(key)}
    missing = sorted(set(like) - set(state))
    if missing:
        raise ValueError(f"The base lacks tensors of the merged model, e.g. {missing[0]!r}.")
    return state


class _AffinePath:
    """Forms θ(c) = anchor + c·direction in one reusable output (a model updated in place, or a fresh state dict).

    The direction is float32; each θ(c) is rounded once to the base's dtype per tensor, like a direct merge at c."""

    def __init__(self, anchor: Mapping[str, torch.Tensor], point_at_one: Mapping[str, torch.Tensor], template: Any,
                 dtypes: Mapping[str, torch.dtype]):
        self.anchor = anchor
        self.dtypes = dtypes
        self.direction = {
            key: value.to(torch.float32) - anchor[key].to(torch.float32)
            for key, value in point_at_one.items()
            if value.dtype.is_floating_point
        }
        self.template = template if isinstance(template, torch.nn.Module) else None

    def at(self, value: float) -> Any:
        state = {}
        for key, anchor in self.anchor.items():
            if key in self.direction:
                state[key] = (anchor.to(torch.float32) + value * self.direction[key]).to(self.dtypes[key])
            else:
                state[key] = anchor
        if self.template is None:
            return state
        self.template.load_state_dict(state)
        return self.template


def _score(evaluate_fn: EvaluateFn | Mapping[str, EvaluateFn], candidate: Any) -> float:
    """evaluate_fn(candidate), or the mean over a ``{task: fn}`` mapping; must be a finite number."""
    if isinstance(evaluate_fn, Mapping):
        scores = [_score(fn, candidate) for fn in evaluate_fn.values()]
        return sum(scores) / len(scores)
    score = evaluate_fn(candidate)
    if isinstance(score, torch.Tensor):
        score = score.item()
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise ValueError(f"evaluate_fn must return a finite number (higher is better), got {score!r}.")
    return float(score)


def _best(scores: Sequence[tuple[Any, float]]) -> tuple[Any, float]:
    """The first (value, score) with the highest score (ties go to the earlier grid value)."""
    best_value, best_score = scores[0]
    for value, score in scores[1:]:
        if score > best_score:
            best_value, best_score = value, score
    return best_value, best_score


def search(
    base: Any,
    finetuned: Sequence[Any] | Mapping[str, Any],
    config: MergeConfig | str,
    evaluate_fn: EvaluateFn | Mapping[str, EvaluateFn],
    grid: Mapping[str, Sequence[float]] | Sequence[float] | None = None,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> SearchResult:
    """Pick ``config``'s coefficient on validation data: the grid value whose merge scores highest.

    Args:
        base: the pre-trained θ₀ (model, checkpoint folder or state dict), as for :func:`hf_merge.merge`.
        finetuned: the fine-tuned models (a ``{task: model}`` mapping is required for the TALL-mask λ).
        config: the merge config (or method name); its other fields stay as given.
        evaluate_fn: ``fn(model_or_state_dict) -> float``, higher is better. It receives what ``merge`` returns for
            this base (a model for a model or folder base, a state dict for a state-dict base); the same model object
            may be reused across grid points, so read it, don't keep it. A ``{task: fn}`` mapping scores the mean
            (and is required for the per-task TALL-mask λ).
        grid: ``None`` for the papers' grid (:meth:`~hf_merge.MergeConfig.search_space`), a sequence of values for the
            method's default coefficient, or ``{"field": values}`` for another field (dotted for nested configs, e.g.
            ``"then.scaling"``).
        device, progress: as for :func:`hf_merge.merge`.

    Returns:
        A :class:`SearchResult` with the best config, best score and every ``(value, score)``.

    Example:
        >>> result = hf_merge.search(base, experts, hf_merge.TaskArithmeticConfig(scaling=1.0), val_accuracy)
        >>> merged = hf_merge.merge(base, experts, result.best_config)
    """
    from tqdm.auto import tqdm

    from .api import merge

    config = make_config(config)
    parameter, values = _resolve_grid(config, grid)
    kind = config.coefficient_kind(parameter)
    if kind == "per_task":
        return _search_per_task(base, finetuned, config, evaluate_fn, parameter, values, device, progress)

    def run(cfg: MergeConfig, dtype: torch.dtype | None = None) -> Any:
        return merge(base, finetuned, cfg, device=device, dtype=dtype, progress=False)

    scores: list[tuple[Any, float]] = []
    bar = tqdm(values, desc=f"search {config.method}.{parameter}", unit="value", disable=not progress, leave=False)
    if kind in ("linear", "affine"):
        # float32 merges, so that a bf16/fp16 base does not round the direction before it is scaled
        at_one = run(_set_field(config, parameter, 1.0), torch.float32)
        state_at_one = _state_dict(at_one)
        base_state = _base_state(base, state_at_one)
        if kind == "linear":
            anchor, merges = base_state, 1
        else:
            anchor, merges = _state_dict(run(_set_field(config, parameter, 0.0), torch.float32)), 2
        path = _AffinePath(anchor, state_at_one, at_one, {k: v.dtype for k, v in base_state.items()})
        for value in bar:
            _set_field(config, parameter, value)  # validates the value like a real merge would
            scores.append((value, _score(evaluate_fn, path.at(float(value)))))
    else:
        merges = 0
        for value in bar:
            scores.append((value, _score(evaluate_fn, run(_set_field(config, parameter, value)))))
            merges += 1
    bar.close()
    best_value, best_score = _best(scores)
    return SearchResult(
        method=config.method, parameter=parameter, best_config=_set_field(config, parameter, best_value),
        best_value=best_value, best_score=best_score, scores=scores, merges=merges,
    )


def _search_per_task(
    base: Any,
    finetuned: Sequence[Any] | Mapping[str, Any],
    config: MergeConfig,
    evaluate_fn: EvaluateFn | Mapping[str, EvaluateFn],
    parameter: str,
    values: tuple[Any, ...],
    device: torch.device | str | None,
    progress: bool,
) -> SearchResult:
    """Task t's value maximises evaluate_fn[t] on task t's model (the config with ``task=t``, e.g. TALL masks' θ₀ +
    m_t(λ) ⊙ τ_MTL); the score is the mean over tasks."""
    from tqdm.auto import tqdm

    from .api import merge

    if not isinstance(finetuned, Mapping) or not isinstance(evaluate_fn, Mapping):
        raise TypeError(
            f"The {config.method} {parameter!r} is chosen per task: pass finetuned and evaluate_fn as "
            "{task: ...} mappings with the same task names."
        )
    if set(finetuned) != set(evaluate_fn):
        raise ValueError(f"evaluate_fn has tasks {sorted(evaluate_fn)} but finetuned has {sorted(finetuned)}.")
    scores: list[tuple[Any, float]] = []
    chosen: dict[str, Any] = {}
    task_best: list[float] = []
    bar = tqdm(total=len(finetuned) * len(values), desc=f"search {config.method}.{parameter}", unit="merge",
               disable=not progress, leave=False)
    for task in finetuned:
        task_scores = []
        for value in values:
            candidate = merge(base, finetuned, _set_field(config.replace(task=task), parameter, value),
                              device=device, progress=False)
            task_scores.append((value, _score(evaluate_fn[task], candidate)))
            bar.update(1)
        scores.extend(((task, value), score) for value, score in task_scores)
        chosen[task], best = _best(task_scores)
        task_best.append(best)
    bar.close()
    return SearchResult(
        method=config.method, parameter=parameter, best_config=_set_field(config, parameter, dict(chosen)),
        best_value=chosen, best_score=sum(task_best) / len(task_best), scores=scores, merges=len(scores),
    )
