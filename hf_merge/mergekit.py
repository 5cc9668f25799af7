"""mergekit recipes: run a mergekit merge configuration (its YAML schema, unchanged) with hf_merge's methods.

    recipe = read_recipe("recipe.yml")          # or a dict of the same keys
    hf_merge.merge(recipe.base, recipe.models, recipe.config, output_dir="out", **recipe.options,
                   **recipe.vocabulary)
    recipe.merge("out")                         # the same in one call

The keys are mergekit's: ``merge_method``, ``base_model``, ``models: [{model, parameters}]``, ``parameters``,
``dtype``, ``out_dtype``, ``tokenizer_source``, ``tokenizer``, ``chat_template``, ``slices``, ``modules``.
:data:`METHODS` maps every supported ``merge_method`` to an hf_merge method: which of its fields each mergekit
parameter sets (all renames are in that one table), with mergekit's defaults where they differ from the papers.

Parameter values are mergekit's: a number, a list of numbers (a gradient over the layers) or a list of
``{filter, value}`` rules (first match wins; no filter or ``"*"`` matches every tensor). Gradients and rules become a
:class:`~hf_merge.schedules.Schedule`. Precedence is mergekit's: a model's own ``parameters``, then the global
``parameters``, then the method's default; a model's rule list without a catch-all rule falls back to the global
setting and then the default, as in mergekit (built as one schedule). Per-model values (``weight``, ``density``,
``gamma``, ``epsilon``) become per-task values keyed by task name (the model reference as written); global ones
(``lambda``, ``t``, ``normalize``, ...) become config fields.

Departures from mergekit (also in the README, "Coming from mergekit"):

* hf_merge computes in float32 whatever ``dtype`` says (mergekit's ``dtype`` is its compute dtype); the output dtype
  is ``out_dtype``, else ``dtype``, else the base's.
* ``slices`` (``passthrough``, or any method per slice) become a layer stack (:mod:`hf_merge.stack`): the recipe's
  ``config`` is a :class:`~hf_merge.stack.StackConfig`, ``base`` is ``None`` and ``models`` holds every model;
  ``passthrough`` with ``models`` copies its one model. A slice's parameters resolve from its source's, then the
  slice's, then the global ones; its θ₀ is the slice's ``base_model``, else the top-level one (one of its sources).
  The stack's config and tokenizer are the first slice's model's (mergekit: the ``base_model``'s when given).
* Not supported yet, each refused naming the key: ``modules`` and a slice's ``residual_weight``. Model references are
  local folders or Hub repo ids (``org/name@revision``); ``model+lora`` references come later. ``linear`` with
  ``normalize: false`` is refused unless the weights sum to 1.
* Vocabularies (:mod:`hf_merge.vocab`): ``tokenizer_source`` (``base``, ``union`` or a model reference) and
  ``tokenizer: {source, tokens, pad_to_multiple_of}`` (``source`` defaults to ``union``, as in mergekit; ``tokens``,
  the per-token overrides, become ``tokenizer={"tokens": ...}`` with task names) become
  :attr:`MergekitRecipe.vocabulary`; ``chat_template`` takes a Jinja template, ``auto``, a built-in template name
  (``alpaca``, ``chatml``, ``exaone``, ``llama3``, ``mistral``) or a model reference (whose template is taken; a name
  that is both a built-in's and a model's is refused). Without these keys token ids are assumed to mean the same
  tokens in every model, as in mergekit. Departures: an input whose tokenizer cannot be loaded is an error where
  mergekit assumes the base's (for ``union``, for a named source, and for an input with another number of embedding
  rows), and padding rows beyond the tokenizer's length are kept where an input has them (mergekit sets every one to
  the mean row).
* mergekit's ``karcher``, and ``nuslerp`` and ``multislerp`` without a ``base_model``, merge the models' raw weights:
  they become ``on="weights"`` (the base_model, when given, is one more input of ``karcher``, as in mergekit).
* Unknown parameter names, and global-only parameters given per model (mergekit ignores both silently), are errors.
  So are a model listed twice (mergekit merges it once, with the last entry's parameters) and, for ``nuslerp``, the
  base listed among the two models it interpolates.
* A gradient gives the tensors after the last block (final norm, head) its last point (:mod:`hf_merge.schedules`);
  mergekit 0.1.5 gives them its first point, older versions the last.
* Random masks (DARE, DELLA) are drawn from hf_merge's seeded generators, not torch's global stream.

One concern in one file (~800 lines): mergekit's schema, its parameter resolution and the one mapping table.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import MergeConfig, did_you_mean

#: The top-level keys of a mergekit recipe.
MERGEKIT_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
                 "tokenizer", "chat_template", "slices", "modules")

#: Keys hf_merge cannot honour yet, with why: each raises when given.
NOT_SUPPORTED_KEYS = {
    "modules": "per-module merges (mergekit's modules, for multimodal models) are not hf_merge's yet",
}

#: mergekit methods hf_merge does not run (yet), with why.
NOT_SUPPORTED_METHODS = {
    "nearswap": "nearswap is not an hf_merge method yet",
    "arcee_fusion": "arcee_fusion is not an hf_merge method yet",
}

_REQUIRED = object()

#: The method that stacks layer slices as they are (:mod:`hf_merge.stack`).
PASSTHROUGH = "passthrough"


def _aggregate(normalize: bool) -> dict[str, Any]:
    return {"aggregate": "mean" if normalize else "sum"}


def _l1(rescale: bool) -> dict[str, Any]:
    """mergekit's ``rescale: true``: rescale the masked task vector to the unmasked one's L1 norm."""
    return {"rescale_norm": "l1" if rescale else None}


def _l1_or_none(rescale: bool) -> dict[str, Any]:
    """``rescale`` for DARE and DELLA, whose native rescaling (1/p) mergekit replaces by the L1 norm."""
    return {"rescale": True, "rescale_norm": "l1"} if rescale else {"rescale": False, "rescale_norm": None}


@dataclasses.dataclass(frozen=True)
class Param:
    """One mergekit parameter of a method: the hf_merge field it sets (``"then.scaling"``: a field of the nested
    config; ``None``: accepted, no numeric effect), or a function of a flag giving several fields; mergekit's default;
    whether it is set per model (a per-task value) or globally; and its kind (``float``, or ``bool`` for flags)."""

    to: str | Callable[[Any], dict[str, Any]] | None
    default: Any = _REQUIRED
    per_model: bool = False
    kind: type = float
    #: An affine map applied to the value (and to every point of a schedule), e.g. density → drop rate 1 − d.
    convert: Callable[[float], float] | None = None


@dataclasses.dataclass(frozen=True)
class Method:
    """How a mergekit ``merge_method`` runs in hf_merge: the hf_merge ``target`` method, its parameters, fields
    mergekit fixes, what the base model is (``"required"``: θ₀, skipped if also listed in ``models``; ``"input"``:
    one more input of the average, as mergekit's ``linear`` takes it; ``"distinct"``: θ₀, and listing it in
    ``models`` is an error, as in mergekit's ``nuslerp``), and how many other models it takes."""

    target: str
    params: Mapping[str, Param]
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    base: str = "required"
    models: tuple[int, int | None] = (1, None)


def _task_vector_params(*, normalize: bool, rescale: bool, normalize_to: Any = _aggregate,
                        rescale_to: Any = _l1, then: str = "", **extra: Param) -> dict[str, Param]:
    """The parameters of mergekit's generalized task arithmetic (``GeneralizedTaskArithmeticMerge``): per model
    ``weight`` (required) and ``density`` (1.0), globally ``lambda`` (1.0), ``normalize``, ``rescale`` (defaults per
    method) and ``int8_mask`` (a memory option: no numeric effect)."""
    return {
        "weight": Param(f"{then}weights", per_model=True),
        "density": Param("density", 1.0, per_model=True),
        "lambda": Param(f"{then}scaling", 1.0),
        "normalize": Param(normalize_to, normalize, kind=bool),
        "rescale": Param(rescale_to, rescale, kind=bool),
        "int8_mask": Param(None, False, kind=bool),
        **extra,
    }


def _then_aggregate(normalize: bool) -> dict[str, Any]:
    return {"then.aggregate": "mean" if normalize else "sum"}


#: A pseudo-field: ``normalize`` of the methods without an hf_merge field for it (linear, task_arithmetic,
#: dare_linear), where it divides by Σ_t w_t (see :meth:`_Reader.config`).
_DIVIDE_BY_WEIGHTS = "<divide by the sum of the weights>"


def _drop_rate(density: float) -> float:
    """DARE's drop rate p from mergekit's kept fraction: p = 1 − density."""
    return 1.0 - density


#: Every supported mergekit method and how it maps to hf_merge (all renames of parameters are here).
METHODS: dict[str, Method] = {
    "linear": Method("average", {"weight": Param("weights", per_model=True),
                                 "normalize": Param(_DIVIDE_BY_WEIGHTS, True, kind=bool)}, base="input"),
    "task_arithmetic": Method("task_arithmetic", _task_vector_params(
        normalize=False, rescale=False, normalize_to=_DIVIDE_BY_WEIGHTS, rescale_to=None,
        density=Param(None, 1.0, per_model=True))),
    "ties": Method("ties", _task_vector_params(normalize=True, rescale=False),
                   fixed={"scope": "tensor", "trim": "topk", "zero_sign": "positive"}),
    "dare_ties": Method("dare", _task_vector_params(
        normalize=False, rescale=True, normalize_to=_then_aggregate, rescale_to=_l1_or_none, then="then.",
        density=Param("drop_rate", 1.0, per_model=True, convert=_drop_rate)),
        fixed={"then.method": "ties", "then.scope": "tensor", "then.density": 1.0, "then.zero_sign": "positive"}),
    "dare_linear": Method("dare", _task_vector_params(
        normalize=False, rescale=True, normalize_to=_DIVIDE_BY_WEIGHTS, rescale_to=_l1_or_none, then="then.",
        density=Param("drop_rate", 1.0, per_model=True, convert=_drop_rate)),
        fixed={"then.method": "task_arithmetic"}),
    "breadcrumbs": Method("breadcrumbs", _task_vector_params(
        normalize=False, rescale=False, gamma=Param("gamma", 0.01, per_model=True))),
    "breadcrumbs_ties": Method("breadcrumbs_ties", _task_vector_params(
        normalize=False, rescale=False, gamma=Param("gamma", 0.01, per_model=True)),
        fixed={"zero_sign": "positive"}),
    "della": Method("della", _task_vector_params(
        normalize=True, rescale=True, rescale_to=_l1_or_none, epsilon=Param("epsilon", 0.15, per_model=True)),
        fixed={"zero_sign": "positive"}),
    "della_linear": Method("della_linear", _task_vector_params(
        normalize=False, rescale=True, rescale_to=_l1_or_none, epsilon=Param("epsilon", 0.15, per_model=True))),
    "sce": Method("sce", {"select_topk": Param("select_topk", 1.0), "int8_mask": Param(None, False, kind=bool)},
                  fixed={"zero_sign": "positive", "epsilon": 1e-6}),
    "slerp": Method("slerp", {"t": Param("t")}, models=(1, 1)),
    "nuslerp": Method("nuslerp", {"weight": Param("weights", per_model=True),
                                  "nuslerp_flatten": Param("flatten", True, kind=bool),
                                  "nuslerp_row_wise": Param("row_wise", False, kind=bool)},
                      base="distinct", models=(2, 2)),
    "multislerp": Method("multislerp", {"weight": Param("weights", per_model=True),
                                        "normalize_weights": Param("normalize_weights", True, kind=bool),
                                        "eps": Param("eps", 1e-8)}, models=(2, None)),
    "model_stock": Method("model_stock", {"filter_wise": Param("filter_wise", False, kind=bool)}, models=(2, None)),
    "karcher": Method("karcher", {"max_iter": Param("max_iter", 10, kind=int), "tol": Param("tol", 1e-5)},
                      fixed={"on": "weights"}, base="input", models=(2, None)),
}

#: ``passthrough``'s one parameter: ``scale``, multiplying the copied tensors (mergekit's default: none, i.e. 1).
_PASSTHROUGH_PARAMS = Method(PASSTHROUGH, {"scale": Param("scale", 1.0, per_model=True)}, models=(0, 0))

#: Methods that merge task vectors around the base_model, and the models' raw weights without one (mergekit's nuslerp
#: and multislerp): without a base_model they take ``on="weights"``, the first model anchoring the arithmetic.
_WEIGHTS_WITHOUT_BASE = ("nuslerp", "multislerp")


@dataclasses.dataclass(frozen=True)
class MergekitRecipe:
    """A mergekit recipe read for hf_merge.

    Attributes:
        base: θ₀ for :func:`hf_merge.merge` (``base_model``; for ``linear`` without one, the first model, which only
            anchors the arithmetic: a normalized average does not depend on it); ``None`` for a layer stack.
        models: ``{task_name: folder}`` of the models merged into it, the task name being the model reference as
            written in the recipe (a layer stack's: every model its slices name).
        config: the hf_merge :class:`~hf_merge.MergeConfig` (a layer stack's :class:`~hf_merge.stack.StackConfig`).
        options: :class:`~hf_merge.MergeOptions` fields the recipe sets (``dtype``: ``out_dtype``, else ``dtype``).
        vocabulary: the vocabulary options the recipe sets (``tokenizer_source``: ``"base"``, ``"union"`` or a task
            name; ``chat_template``; ``pad_to_multiple_of``; ``tokenizer``: ``{"tokens": ...}``, the per-token
            overrides in mergekit's schema with task names), keywords of :func:`hf_merge.merge` too.
        output: the output folder, when one was given to :func:`read_recipe` (mergekit recipes have no output key).
        merge_method: mergekit's method name, as written.
    """

    base: str | None
    models: dict[str, str]
    config: MergeConfig
    options: dict[str, Any]
    output: str | None = None
    merge_method: str = ""
    vocabulary: dict[str, Any] = dataclasses.field(default_factory=dict)

    def merge(self, output_dir: str | os.PathLike | None = None, **keywords: Any) -> Any:
        """Run the recipe: :func:`hf_merge.merge` with its base, models, config and options (a layer stack:
        :func:`hf_merge.stack.build_stack`; ``keywords`` add or override options); into ``output_dir`` (default:
        :attr:`output`; neither: in memory)."""
        from .api import merge
        from .stack import StackConfig, build_stack

        output = output_dir if output_dir is not None else self.output
        keywords = {**self.options, **self.vocabulary, **keywords}
        if isinstance(self.config, StackConfig):
            from .options import split_options

            options = split_options(keywords)
            if keywords:
                raise ValueError(f"Unknown option(s) {sorted(keywords)} for a layer stack.")
            return build_stack(self.config, self.models, output_dir=output, options=options)
        return merge(self.base, self.models, self.config, output_dir=output, **keywords)


def load_yaml(path: str | os.PathLike) -> Any:
    """The content of a YAML file; a missing file or malformed YAML raises naming the file (and the line)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Merge config {path} does not exist.")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{path}: not valid YAML{at}: {problem}.") from None


def is_mergekit_recipe(data: Any) -> bool:
    """Whether a parsed recipe uses mergekit's schema rather than hf_merge's: it has ``merge_method``, or, lacking
    both ``merge_method`` and hf_merge's ``method``, a key only mergekit has (``base_model``, ...)."""
    if not isinstance(data, Mapping) or "method" in data:
        return False
    return "merge_method" in data or bool(set(data) & (set(MERGEKIT_KEYS) - _SHARED_KEYS))


#: Keys both schemas have.
_SHARED_KEYS = {"models", "parameters", "dtype"}


def read_recipe(recipe: str | os.PathLike | Mapping[str, Any], *, output: str | os.PathLike | None = None,
                root: str | os.PathLike | None = None) -> MergekitRecipe:
    """Read a mergekit recipe: a YAML file (relative model paths are resolved against its folder) or a dict of the
    same keys (paths resolved against ``root``, default the working directory). ``output``: the output folder
    (relative to the working directory). Everything is checked here, before any tensor is read: an unknown or
    unsupported key or parameter, an unknown method or a missing model folder raises ``ValueError`` naming it.

    Example:
        >>> recipe = read_recipe("ties.yml")
        >>> recipe.config          # TiesConfig(density={'./math': 0.5, ...}, weights=..., scope='tensor', ...)
        >>> recipe.merge("merged")
    """
    if isinstance(recipe, Mapping):
        data, folder, where = recipe, Path(root) if root is not None else Path.cwd(), "mergekit recipe"
    else:
        path = Path(recipe)
        data, folder, where = load_yaml(path), path.parent, str(path)
    return recipe_from_dict(data, root=folder, where=where, output=output)


def recipe_from_dict(data: Any, *, root: str | os.PathLike, where: str = "mergekit recipe",
                     output: str | os.PathLike | None = None) -> MergekitRecipe:
    """:func:`read_recipe` of an already parsed recipe; ``where`` prefixes the error messages."""
    return _Reader(data, Path(root), where).read(output)


class _Reader:
    def __init__(self, data: Any, root: Path, where: str) -> None:
        self.data, self.root, self.where = data, root, where

    def fail(self, message: str) -> ValueError:
        return ValueError(f"{self.where}: {message}")

    # ------------------------------------------------------------------------------------------------ top level
    def read(self, output: str | os.PathLike | None) -> MergekitRecipe:
        data = self.data
        if not isinstance(data, Mapping):
            raise self.fail(f"expected a mapping with mergekit's keys {list(MERGEKIT_KEYS)}.")
        unknown = sorted(str(key) for key in set(data) - set(MERGEKIT_KEYS))
        if unknown:
            hint = (" (a mergekit recipe has no output key: give the output folder, `hf-merge merge RECIPE OUT_DIR`)"
                    if "output" in unknown else did_you_mean(unknown, MERGEKIT_KEYS))
            raise self.fail(f"unknown key(s) {unknown}{hint}; mergekit's keys are {list(MERGEKIT_KEYS)}.")
        for key, why in NOT_SUPPORTED_KEYS.items():
            if data.get(key) is not None:
                raise self.fail(f"{key!r} is not supported yet: {why}.")
        name = data.get("merge_method")
        if name is None:
            raise self.fail(f"missing required key 'merge_method' (one of {sorted(METHODS)}).")
        if not isinstance(name, str):
            raise self.fail(f"merge_method must be a method name, got {name!r}.")
        if name in NOT_SUPPORTED_METHODS:
            raise self.fail(f"merge_method {name!r} is not supported yet: {NOT_SUPPORTED_METHODS[name]}.")
        if name not in METHODS and name != PASSTHROUGH:
            known = sorted({*METHODS, PASSTHROUGH, *NOT_SUPPORTED_METHODS})
            raise self.fail(f"unknown merge_method {name!r}{did_you_mean(name, known)}; supported: "
                            f"{sorted({*METHODS, PASSTHROUGH})}.")
        options = self.options()
        if data.get("slices") is not None or name == PASSTHROUGH:
            return self.stack(name, options, output)
        method = METHODS[name]
        base_ref = data.get("base_model")
        if base_ref is None and name in _WEIGHTS_WITHOUT_BASE:
            method = dataclasses.replace(method, base="input", fixed={**method.fixed, "on": "weights"})
        if base_ref is None and method.base != "input":
            raise self.fail(f"merge_method {name!r} needs a base_model.")
        base = self.folder(base_ref, "base_model") if base_ref is not None else None
        entries = self.model_entries(data.get("models"))
        global_params = self.parameters(data.get("parameters"), "parameters")
        self.check_names(name, method, global_params, "parameters", per_model=False)
        for index, (ref, params) in enumerate(entries):
            self.check_names(name, method, params, f"models[{index}].parameters", per_model=True)
        inputs = self.inputs(name, method, entries, base_ref)
        models = {ref: self.folder(ref, label.partition(".parameters")[0].replace("]", "].model", 1))
                  for ref, label, _ in inputs}
        if base is None:  # linear without a base: the first model anchors the (normalized) arithmetic
            base = next(iter(models.values()))
        config = self.config(name, method, [(global_params, "parameters")], inputs)
        vocabulary = self.vocabulary(base_ref, list(models))
        if output is not None:
            output = str(Path(output).expanduser().resolve())
        return MergekitRecipe(base=base, models=models, config=config, options=options, output=output,
                              merge_method=name, vocabulary=vocabulary)

    # ------------------------------------------------------------------------------------------------ slices
    def stack(self, name: str, options: dict[str, Any], output: str | os.PathLike | None) -> MergekitRecipe:
        """A recipe with ``slices`` (or ``passthrough`` of one model): a layer stack (:mod:`hf_merge.stack`) whose
        slices are copied (``passthrough``, one source each, times ``scale``) or merged with ``name``."""
        from .stack import StackConfig

        data = self.data
        if data.get("slices") is not None and data.get("models") is not None:
            raise self.fail("give models or slices, not both (mergekit takes exactly one of them).")
        method = _PASSTHROUGH_PARAMS if name == PASSTHROUGH else METHODS[name]
        if name in _WEIGHTS_WITHOUT_BASE and data.get("base_model") is None:
            method = dataclasses.replace(method, base="input", fixed={**method.fixed, "on": "weights"})
        global_params = self.parameters(data.get("parameters"), "parameters")
        self.check_names(name, method, global_params, "parameters", per_model=False)
        base_ref = data.get("base_model")
        if base_ref is not None:
            self.folder(base_ref, "base_model")
        if data.get("slices") is None:  # passthrough of whole models: one model, every layer
            entries = self.model_entries(data.get("models"))
            if len(entries) != 1:
                raise self.fail(f"merge_method 'passthrough' copies one model's layers (or slices of several): got "
                                f"{len(entries)} models; give one, or slices.")
            ref, params = entries[0]
            raw = [{"sources": [{"model": ref, "layer_range": None, **({"parameters": params} if params else {})}]}]
        else:
            raw = data["slices"]
            if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
                raise self.fail(f"slices must be a non-empty list of {{sources: [{{model, layer_range}}]}}, got "
                                f"{raw!r}.")
        models: dict[str, str] = {}
        slices = [self.stack_slice(index, entry, name, method, global_params, base_ref, models)
                  for index, entry in enumerate(raw)]
        try:
            config = StackConfig(slices=slices)
        except (TypeError, ValueError) as error:
            raise self.fail(str(error)) from None
        if output is not None:
            output = str(Path(output).expanduser().resolve())
        return MergekitRecipe(base=None, models=models, config=config, options=options, output=output,
                              merge_method=name, vocabulary=self.vocabulary(None, list(models)))

    def stack_slice(self, index: int, entry: Any, name: str, method: Method, global_params: Mapping[str, Any],
                    base_ref: str | None, models: dict[str, str]) -> dict[str, Any]:
        """One slice of a :class:`~hf_merge.stack.StackConfig`; its models' folders are added to ``models``.
        Parameters resolve as in mergekit: a source's own, then the slice's, then the global ones."""
        where = f"slices[{index}]"
        if not isinstance(entry, Mapping) or "sources" not in entry:
            raise self.fail(f"{where} must be a mapping with 'sources' (and optionally 'parameters', 'base_model'), "
                            f"got {entry!r}.")
        if entry.get("residual_weight") is not None:
            raise self.fail(f"{where}: 'residual_weight' is not supported yet.")
        unknown = sorted(str(key) for key in set(entry) - {"sources", "parameters", "base_model", "residual_weight"})
        if unknown:
            raise self.fail(f"{where}: unknown key(s) {unknown}; a slice has 'sources', 'parameters' and "
                            "'base_model'.")
        sources = entry["sources"]
        if not isinstance(sources, Sequence) or isinstance(sources, str) or not sources:
            raise self.fail(f"{where}.sources must be a non-empty list of {{model, layer_range, parameters}}, got "
                            f"{sources!r}.")
        slice_params = self.parameters(entry.get("parameters"), f"{where}.parameters")
        self.check_names(name, method, slice_params, f"{where}.parameters", per_model=False)
        picked = []
        for j, source in enumerate(sources):
            label = f"{where}.sources[{j}]"
            if not isinstance(source, Mapping) or "model" not in source or "layer_range" not in source:
                raise self.fail(f"{label} must be a mapping with 'model' and 'layer_range' (and optionally "
                                f"'parameters'), got {source!r}.")
            unknown = sorted(str(key) for key in set(source) - {"model", "layer_range", "parameters"})
            if unknown:
                raise self.fail(f"{label}: unknown key(s) {unknown}; a source has 'model', 'layer_range' and "
                                "'parameters'.")
            ref = source["model"]
            models[ref] = self.folder(ref, f"{label}.model")
            params = self.parameters(source.get("parameters"), f"{label}.parameters")
            self.check_names(name, method, params, f"{label}.parameters", per_model=True)
            picked.append((ref, source["layer_range"], params, f"{label}.parameters"))
        stacked = [{"model": ref, "layer_range": layer_range} for ref, layer_range, _, _ in picked]
        levels = [(slice_params, f"{where}.parameters"), (global_params, "parameters")]
        if name == PASSTHROUGH:
            if len(picked) != 1:
                raise self.fail(f"{where}: merge_method 'passthrough' copies one source per slice, got {len(picked)} "
                                "(a merge of several takes a merge_method that merges).")
            _, _, params, label = picked[0]
            chain = [(params.get("scale"), label), *((level.get("scale"), at) for level, at in levels)]
            scale = self.value("scale", method.params["scale"], chain)
            return {"sources": stacked, **({} if scale == 1.0 else {"scale": scale})}
        refs = [ref for ref, _, _, _ in picked]
        base = entry.get("base_model", base_ref)
        if method.base == "input":  # every source is merged (the first anchors the arithmetic)
            base = None
        elif base is None:
            raise self.fail(f"{where}: merge_method {name!r} needs a base_model (top-level or the slice's), one of "
                            "the slice's sources.")
        elif base not in refs:
            raise self.fail(f"{where}: the base_model {base!r} is none of the slice's sources {refs} (its layers are "
                            "taken from the slice, as in mergekit).")
        inputs = [(ref, label, params) for ref, _, params, label in picked if ref != base]
        self.check_count(name, method, [ref for ref, _, _ in inputs], f"{where}: ")
        return {"sources": stacked, "base": base, "merge": self.config(name, method, levels, inputs)}

    def vocabulary(self, base_ref: str | None, refs: list[str]) -> dict[str, Any]:
        """``tokenizer_source`` / ``tokenizer`` / ``chat_template`` as :func:`hf_merge.merge` keywords: a model
        reference becomes its task name (the reference as written; the ``base_model`` becomes ``"base"``)."""
        from .vocab import TOKENIZER_KEYS, chat_template_names

        data, vocabulary = self.data, {}
        source = data.get("tokenizer_source")
        tokenizer = data.get("tokenizer")
        if tokenizer is not None:
            if source is not None:
                raise self.fail("give tokenizer_source or tokenizer.source, not both.")
            if not isinstance(tokenizer, Mapping):
                raise self.fail(f"tokenizer must be a mapping with keys {list(TOKENIZER_KEYS)}, got {tokenizer!r}.")
            unknown = sorted(str(key) for key in set(tokenizer) - set(TOKENIZER_KEYS))
            if unknown:
                raise self.fail(f"tokenizer: unknown key(s) {unknown}{did_you_mean(unknown, TOKENIZER_KEYS)}; its keys "
                                f"are {list(TOKENIZER_KEYS)}.")
            if tokenizer.get("tokens"):
                vocabulary["tokenizer"] = {"tokens": self.token_overrides(tokenizer["tokens"], base_ref, refs)}
            source = tokenizer.get("source", "union")
            multiple = tokenizer.get("pad_to_multiple_of")
            if multiple is not None:
                if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
                    raise self.fail(f"tokenizer.pad_to_multiple_of must be a positive integer, got {multiple!r}.")
                vocabulary["pad_to_multiple_of"] = multiple
        if source is not None:
            vocabulary["tokenizer_source"] = self.model_or(source, "tokenizer_source", base_ref, refs, ("base", "union"))
        template = data.get("chat_template")
        if template is not None:
            if not isinstance(template, str) or not template.strip():
                raise self.fail(f"chat_template must be a Jinja template, 'auto', a built-in template name or a model "
                                f"reference, got {template!r}.")
            if "{" not in template and template != "auto":
                builtin, model = template in chat_template_names(), template in refs or template == base_ref
                if builtin and model:
                    raise self.fail(f"chat_template {template!r} names both a model and the built-in template "
                                    f"{template!r}: give the built-in's Jinja text, or write that model's reference "
                                    f"another way in both places (e.g. ./{template}).")
                if not builtin and not model:
                    raise self.fail(f"chat_template {template!r} is neither a Jinja template, 'auto', a built-in "
                                    f"template {chat_template_names()} nor a model of the recipe (base_model "
                                    f"{base_ref!r}, models {refs}).")
                if model:
                    template = "base" if template == base_ref else template
            vocabulary["chat_template"] = template
        return vocabulary

    def token_overrides(self, tokens: Any, base_ref: str | None, refs: list[str]) -> dict[str, Any]:
        """``tokenizer.tokens`` checked, in mergekit's schema with each model reference made its task name."""
        from .vocab import token_overrides

        def task_name(value: Any) -> str | None:
            return "base" if value == base_ref else value if value in refs else None

        try:
            overrides = token_overrides(tokens, task_name, ([base_ref] if base_ref is not None else []) + refs)
        except ValueError as error:
            raise self.fail(str(error)) from None
        return {token: override.as_config() for token, override in overrides.items()}

    def model_or(self, value: Any, key: str, base_ref: str | None, refs: list[str], words: tuple[str, ...]) -> str:
        """``value`` when it is one of ``words``, else the task name of the model it references."""
        if value in words:
            return value
        if not isinstance(value, str):
            raise self.fail(f"{key} must be one of {list(words)} or a model reference, got {value!r}.")
        if value == base_ref:
            return "base"
        if value in refs:
            return value
        raise self.fail(f"{key} {value!r} is not {' or '.join(repr(w) for w in words)} and names no model of the "
                        f"recipe (base_model {base_ref!r}, models {refs}).")

    def options(self) -> dict[str, Any]:
        """``dtype`` of the output: ``out_dtype``, else ``dtype`` (mergekit computes in ``dtype``; hf_merge always
        computes in float32)."""
        from .options import parse_dtype

        for key in ("out_dtype", "dtype"):
            value = self.data.get(key)
            if value is not None:
                try:
                    parse_dtype(value)
                except ValueError as error:
                    raise self.fail(f"{key}: {error}") from None
        dtype = self.data.get("out_dtype") or self.data.get("dtype")
        return {"dtype": dtype} if dtype is not None else {}

    def folder(self, ref: Any, label: str) -> str:
        """The model a reference names: a local folder (relative to the recipe's folder), or a Hub repo id
        (``org/name`` or ``org/name@revision``), passed on as written and downloaded when the merge runs."""
        from .hub.resolve import repo_id_problem, split_revision

        if not isinstance(ref, str) or not ref:
            raise self.fail(f"{label} must be a model folder or Hub repo id (a string), got {ref!r}; mergekit's "
                            "structured model references (LoRA) are not supported yet.")
        path = Path(ref).expanduser()
        path = (path if path.is_absolute() else self.root / path).resolve()
        if path.is_dir():
            return str(path)
        if "+" in ref:
            raise self.fail(f"{label} {ref!r}: mergekit's 'model+lora' references are not supported yet.")
        problem = repo_id_problem(split_revision(ref)[0])
        if problem is not None:
            raise self.fail(f"{label} {ref!r}: no such local folder ({path}), and not a Hub repo id ({problem}).")
        return ref

    def model_entries(self, models: Any) -> list[tuple[str, dict[str, Any]]]:
        """``[(reference, parameters)]`` of ``models``, in order; a reference listed twice is refused."""
        if not isinstance(models, Sequence) or isinstance(models, str) or not models:
            raise self.fail(f"models must be a non-empty list of {{model: ..., parameters: ...}} entries, got "
                            f"{models!r}.")
        entries: list[tuple[str, dict[str, Any]]] = []
        for index, entry in enumerate(models):
            label = f"models[{index}]"
            if not isinstance(entry, Mapping) or "model" not in entry:
                raise self.fail(f"{label} must be a mapping with a 'model' key (and optionally 'parameters'), got "
                                f"{entry!r}.")
            unknown = sorted(str(key) for key in set(entry) - {"model", "parameters"})
            if unknown:
                raise self.fail(f"{label}: unknown key(s) {unknown}{did_you_mean(unknown, ['model', 'parameters'])}; "
                                "an entry has 'model' and 'parameters'.")
            ref = entry["model"]
            if not isinstance(ref, str):
                self.folder(ref, f"{label}.model")  # raises
            if any(ref == seen for seen, _ in entries):
                raise self.fail(f"{label}: model {ref!r} is listed twice (mergekit would merge it once, with the last "
                                "entry's parameters); list each model once.")
            entries.append((ref, self.parameters(entry.get("parameters"), f"{label}.parameters")))
        return entries

    def parameters(self, params: Any, label: str) -> dict[str, Any]:
        if params is None:
            return {}
        if not isinstance(params, Mapping):
            raise self.fail(f"{label} must be a mapping of parameter names to values, got {params!r}.")
        return {str(key): value for key, value in params.items()}

    def check_names(self, name: str, method: Method, params: Mapping[str, Any], label: str, *,
                    per_model: bool) -> None:
        """Unknown parameters, and global-only ones given per model, raise (mergekit ignores both)."""
        unknown = sorted(set(params) - set(method.params))
        if unknown:
            raise self.fail(f"{label}: unknown parameter(s) {unknown} for merge_method {name!r}"
                            f"{did_you_mean(unknown, method.params)}; its parameters are {sorted(method.params)}.")
        if per_model:
            misplaced = sorted(key for key in params if not method.params[key].per_model)
            if misplaced:
                raise self.fail(f"{label}: {misplaced} of merge_method {name!r} are global parameters (mergekit reads "
                                "them from the top-level parameters only and ignores them per model); move them "
                                "there.")

    def inputs(self, name: str, method: Method, entries: list[tuple[str, dict[str, Any]]],
               base_ref: str | None) -> list[tuple[str, str, dict[str, Any]]]:
        """``[(reference, label, parameters)]`` of the models merged into the base, as mergekit takes
        them: the base listed in ``models`` is skipped (it is θ₀), except for ``linear``, which averages the base like
        any model (added when not listed), and ``nuslerp``, which refuses it."""
        inputs = [(ref, f"models[{index}].parameters", params) for index, (ref, params) in enumerate(entries)]
        listed = [ref for ref, _ in entries]
        if base_ref is not None:
            if method.base == "input":
                if base_ref not in listed:
                    inputs.append((base_ref, f"base_model (an input of {name}'s average, not listed in models)", {}))
            elif base_ref in listed:
                if method.base == "distinct":
                    raise self.fail(f"merge_method {name!r}: the base_model {base_ref!r} is also listed in models; "
                                    "list only the two models nuslerp interpolates (the base_model must be distinct "
                                    "from them, as mergekit's nuslerp requires).")
                inputs = [item for item in inputs if item[0] != base_ref]
        self.check_count(name, method, [ref for ref, _, _ in inputs])
        return inputs

    def check_count(self, name: str, method: Method, refs: list[str], where: str = "") -> None:
        """``refs``, the models merged into the base, are as many as ``method`` takes."""
        low, high = method.models
        if len(refs) < low or (high is not None and len(refs) > high):
            need = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
            raise self.fail(f"{where}merge_method {name!r} takes {need} model(s) besides the base_model, got "
                            f"{len(refs)}: {refs}.")

    # ------------------------------------------------------------------------------------------------ parameters
    def config(self, name: str, method: Method, levels: list[tuple[Mapping[str, Any], str]],
               inputs: list[tuple[str, str, dict[str, Any]]]) -> MergeConfig:
        """The hf_merge config: every parameter resolved (model, then each of ``levels``: ``[(parameters, label)]``,
        e.g. a slice's then the global ones, then default), renamed and converted as :data:`METHODS` says, then built
        and validated."""
        from .registry import config_class

        fields: dict[str, Any] = {}
        for param_name, param in method.params.items():
            chain = [(level.get(param_name), label) for level, label in levels]
            if param.per_model:
                value: Any = {ref: self.value(param_name, param, [(params.get(param_name), label), *chain])
                              for ref, label, params in inputs}
            else:
                value = self.value(param_name, param, chain)
            if callable(param.to):
                fields.update(param.to(value))
            elif param.to is not None:
                fields[param.to] = value
        fields.update(method.fixed)
        divide = fields.pop(_DIVIDE_BY_WEIGHTS, False)
        if name == "linear":
            if not divide:  # Σ_t w_t θ_t: the average when the weights sum to 1
                self.check_weights_sum_to_one(fields["weights"])
        elif divide:
            self.divide_by_weights(fields, "then." if name == "dare_linear" else "")
        if name in ("breadcrumbs", "breadcrumbs_ties"):  # mergekit keeps a task with density ≥ 1 whole
            fields["gamma"] = {ref: 0.0 if _plain(fields["density"][ref]) and fields["density"][ref] >= 1 else gamma
                               for ref, gamma in fields["gamma"].items()}
        nested = {key.partition(".")[2]: fields.pop(key) for key in [k for k in fields if k.startswith("then.")]}
        try:
            if nested:
                fields["then"] = config_class(nested.pop("method"))(**nested)
            return config_class(method.target)(**fields)
        except (TypeError, ValueError) as error:
            raise self.fail(f"merge_method {name!r} (hf_merge {method.target!r}): {error}") from None

    def value(self, name: str, param: Param, chain: list[tuple[Any, str]]) -> Any:
        """The value of parameter ``name``: from the first setting of ``chain`` that gives one (a rule list without a
        catch-all rule falls back to the next setting, as in mergekit), else mergekit's default. A number, a flag, or
        a :class:`~hf_merge.schedules.Schedule` for gradients and filters."""
        rules: list[tuple[str | None, list[float]]] = []
        labels: list[str] = []
        for setting, label in chain:
            if setting is None:
                continue
            labels.append(f"{label}.{name}")
            if param.kind is not float:  # flags: one value, no rules
                return self.flag(name, param, setting, labels[-1])
            rules.extend(self.rules(setting, labels[-1]))
            if any(filter_ is None for filter_, _ in rules):
                break
        else:
            if param.default is _REQUIRED:
                if not rules:
                    where = "per model or in the global parameters" if param.per_model else "in the global parameters"
                    raise self.fail(f"{chain[0][1]}: {name!r} is required ({where}).")
                raise self.fail(f"{' / '.join(labels)}: {name!r} has no value for tensors that match none of its "
                                "filters; add a rule without a filter (or a global value).")
            rules.append((None, [param.default]))
        if len(rules) == 1 and len(rules[0][1]) == 1:
            return self.flag(name, param, rules[0][1][0], " / ".join(labels) or "default")
        from .schedules import Schedule

        try:
            return Schedule([{**({"filter": f} if f is not None else {}),
                              "value": [_converted(param, p) for p in points]} for f, points in rules])
        except (TypeError, ValueError) as error:
            raise self.fail(f"{' / '.join(labels)}: {error}") from None

    def flag(self, name: str, param: Param, value: Any, label: str) -> Any:
        if param.kind is bool and isinstance(value, bool):
            return value
        if param.kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if param.kind is float and _is_number(_number(value)):
            return _converted(param, _number(value))
        raise self.fail(f"{label}: {name} must be a {param.kind.__name__}, got {value!r}.")

    def rules(self, setting: Any, label: str) -> list[tuple[str | None, list[float]]]:
        """mergekit's ParameterSetting as ``[(filter or None, points)]``: a number, a gradient (list of numbers), one
        ``{filter, value}`` rule or a list of them."""
        if isinstance(setting, Mapping):
            setting = [setting]
        setting = _number(setting)
        if isinstance(setting, list) and not all(isinstance(item, Mapping) for item in setting):
            setting = [_number(item) for item in setting]
        if _is_number(setting):
            return [(None, [setting])]
        if isinstance(setting, Sequence) and not isinstance(setting, str) and setting:
            if all(_is_number(item) for item in setting):
                return [(None, list(setting))]
            if all(isinstance(item, Mapping) for item in setting):
                rules = []
                for index, rule in enumerate(setting):
                    unknown = sorted(str(key) for key in set(rule) - {"filter", "value"})
                    if unknown or "value" not in rule:
                        raise self.fail(f"{label}[{index}]: a rule has a 'value' and optionally a 'filter', got "
                                        f"{dict(rule)!r}.")
                    filter_ = rule.get("filter")
                    if filter_ is not None and not isinstance(filter_, str):
                        raise self.fail(f"{label}[{index}]: filter must be a string, got {filter_!r}.")
                    value = _number(rule["value"])
                    points = [_number(p) for p in value] if isinstance(value, list) else [value]
                    if not (isinstance(points, list) and points and all(_is_number(p) for p in points)):
                        raise self.fail(f"{label}[{index}]: value must be a number or a list of numbers, got "
                                        f"{value!r}.")
                    rules.append((None if filter_ in (None, "*") else filter_, list(points)))
                return rules
        raise self.fail(f"{label} must be a number, a list of numbers (a gradient over the layers) or a list of "
                        f"{{filter, value}} rules, got {setting!r}.")

    # ------------------------------------------------------------------------------------------------ normalize
    def check_weights_sum_to_one(self, weights: Mapping[str, Any]) -> None:
        """``linear`` with ``normalize: false`` is Σ_t w_t θ_t: the average when the weights sum to 1 (else refused)."""
        values = list(weights.values())
        if all(_plain(w) for w in values) and math.isclose(sum(values), 1.0, rel_tol=0, abs_tol=1e-9):
            return
        raise self.fail("merge_method 'linear' with normalize: false (Σ w_t θ_t, not divided by Σ w_t) is not supported "
                        f"yet unless the weights are numbers summing to 1, got {dict(weights)!r}; use normalize: true "
                        "(the default).")

    def divide_by_weights(self, fields: dict[str, Any], prefix: str) -> None:
        """``normalize: true`` without sign election: the merged task vector is divided by Σ_t w_t (mergekit leaves
        sums below 1e-8 undivided); hf_merge's scaling λ becomes λ / Σ_t w_t."""
        weights = list(fields[f"{prefix}weights"].values())
        if not all(_plain(w) for w in weights):
            raise self.fail("normalize: true with per-tensor weights (gradients or filters) is not supported yet: "
                            "give numbers, or normalize the weights yourself.")
        total = sum(weights)
        if abs(total) < 1e-8:
            return
        scaling = fields[f"{prefix}scaling"]
        fields[f"{prefix}scaling"] = scaling / total if _plain(scaling) else _scaled(scaling, 1.0 / total)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: Any) -> Any:
    """``value``, or the float a numeric string spells: YAML reads ``1e-8`` (no dot) as a string, and mergekit takes
    it as a number for numeric parameters."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _plain(value: Any) -> bool:
    return _is_number(value)


def _converted(param: Param, value: Any) -> Any:
    return param.convert(value) if param.convert is not None else value


def _scaled(schedule: Any, factor: float) -> Any:
    """A schedule with every point times ``factor`` (interpolation commutes with scaling)."""
    from .schedules import Schedule

    return Schedule([{**({"filter": f} if f is not None else {}), "value": [p * factor for p in points]}
                     for f, points in schedule.rules])


__all__ = ["MERGEKIT_KEYS", "METHODS", "MergekitRecipe", "Method", "Param", "is_mergekit_recipe", "load_yaml",
           "read_recipe", "recipe_from_dict"]
