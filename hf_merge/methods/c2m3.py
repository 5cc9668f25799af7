"""C2M3 (Crisostomi et al., NeurIPS 2024, arXiv 2405.17897): cycle-consistent multi-model merging.

All models are matched jointly to a shared universe by the paper's Frank–Wolfe optimisation of the permutations,
merged by averaging there (expressed in the first model's neuron order), and optionally REPAIRed on data (Jordan et
al. 2023, "REPAIR: REnormalizing Permuted Activations for Interpolation Repair"). Also hosts
:class:`PermutationMerger`, the shared machinery of permutation-based mergers (permutation-spec selection, alignment,
averaging, REPAIR).
"""

from __future__ import annotations

import abc
import copy
import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..config import MergeConfig, MethodCard, check_choice, check_number
from ..errors import MergeError
from ..permutation.frank_wolfe import INITIALIZATIONS, frank_wolfe_sync
from ..permutation.merging import merge_permuted
from ..permutation.repair import default_repair_layers
from ..permutation.repair import repair as repair_model
from ..permutation.spec import Perms, PermutationSpec, validate_spec
from ..permutation.specs import default_spec
from ..registry import register_method
from .base import ModelMerger

if TYPE_CHECKING:
    from ..context import MergeContext

# Runtime objects a config may carry but never serialises: a custom spec and REPAIR's dataloader.
_RUNTIME_FIELDS = ("spec", "repair")


@dataclasses.dataclass(kw_only=True)
class PermutationMergeConfig(MergeConfig):
    """Fields shared by permutation-based methods.

    ``repair``: a re-iterable dataloader (tensors, ``(inputs, labels)`` or dicts) to REPAIR the merged model with,
    or ``None``. ``repair_max_batches`` limits each REPAIR pass. ``spec``: a
    :class:`~hf_merge.permutation.PermutationSpec` for custom models or state dicts (default: chosen from the first
    model). ``spec`` and ``repair`` are runtime objects and are not written to ``merge_config.json``.
    """

    repair: Any = None
    repair_max_batches: int | None = None
    spec: PermutationSpec | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.spec is not None and not isinstance(self.spec, PermutationSpec):
            raise TypeError(f"spec must be a PermutationSpec, got {type(self.spec).__name__}.")
        if self.repair is not None and not hasattr(self.repair, "__iter__"):
            raise TypeError(f"repair must be an iterable dataloader or None, got {type(self.repair).__name__}.")
        if self.repair_max_batches is not None and (
            not isinstance(self.repair_max_batches, int) or self.repair_max_batches < 1
        ):
            raise ValueError(f"repair_max_batches must be a positive integer or None, got {self.repair_max_batches!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an integer, got {self.seed!r}.")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for name in _RUNTIME_FIELDS:
            out.pop(name, None)
        return out


@dataclasses.dataclass(kw_only=True)
class C2M3Config(PermutationMergeConfig):
    """``max_iter`` Frank–Wolfe iterations (official merger default 200), ``init`` "sinkhorn" (official) or
    "identity", early stop after ``patience`` iterations without improvement > ``tol``. ``anchor=True`` (default)
    fixes the first model's permutations to the identity, removing the objective's gauge freedom (see
    :func:`hf_merge.permutation.frank_wolfe_sync`); ``anchor=False`` is the reference implementation's iteration."""

    method: str = dataclasses.field(default="c2m3", init=False)
    max_iter: int = 200
    init: str = "sinkhorn"
    tol: float = 1e-6
    patience: int = 5
    anchor: bool = True

    card: ClassVar[MethodCard] = MethodCard(
        title="C2M3 (Cycle-Consistent Multi-Model Merging)",
        summary=(
            "C2M3 aligns the hidden units of several independently trained models before averaging them. Each "
            "model gets one permutation per layer into a shared 'universe' space, so the map between any two models "
            "is a composition through the universe and all maps are cycle-consistent by construction. The "
            "permutations are optimised jointly with Frank–Wolfe; the aligned models are averaged and their "
            "activation statistics repaired."
        ),
        bibtex="""@inproceedings{crisostomi2024c2m3,
  title     = {{C$^2$M$^3$}: Cycle-Consistent Multi-Model Merging},
  author    = {Crisostomi, Donato and Fumero, Marco and Baieri, Daniele and Bernard, Florian and
               Rodol{\\`a}, Emanuele},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2024}
}""",
        paper_url="https://arxiv.org/abs/2405.17897",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.anchor, bool):
            raise TypeError(f"anchor must be a bool, got {self.anchor!r}.")
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or self.max_iter < 0:
            raise ValueError(f"max_iter must be a non-negative integer, got {self.max_iter!r}.")
        check_choice("init", self.init, INITIALIZATIONS)
        check_number("tol", self.tol)
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"patience must be a positive integer, got {self.patience!r}.")


class PermutationMerger(ModelMerger):
    """Align every model to the first with :meth:`find_permutations`, average, and optionally REPAIR.

    After a merge, ``permutations`` holds the universe permutations of every model (``{name: index}`` per model).
    """

    config: PermutationMergeConfig

    @abc.abstractmethod
    def find_permutations(self, states: list[dict[str, torch.Tensor]], spec: PermutationSpec) -> list[Perms]:
        """Universe permutations of every model (model A → universe)."""

    def merge_models(self, ctx: MergeContext) -> dict[str, torch.Tensor]:
        if self.config.repair is not None:  # fail before the matching if REPAIR cannot run
            if not isinstance(ctx.base.model, torch.nn.Module):
                raise TypeError("REPAIR runs forward passes: give the first model as an nn.Module, not a state dict.")
            default_repair_layers(ctx.base.model)
        spec = self.config.spec or self._default_spec(ctx)
        # A spec for a custom module (given, or the default chain/ResNet one) is checked to be a symmetry of it; the
        # built-in transformers specs are per architecture and tested there.
        if isinstance(ctx.base.model, torch.nn.Module) and ctx.base.config is None:
            try:
                validate_spec(ctx.base.model, spec)
            except ValueError as error:
                given = "The given spec" if self.config.spec is not None else "The default permutation spec"
                raise ValueError(f"{given} does not describe {type(ctx.base.model).__name__}'s symmetries ({error}); "
                                 "pass spec= a PermutationSpec built for this architecture.") from None
        states = [{key: self._load(ctx, name, key) for key in ctx.merge_keys} for name in ctx.task_names]
        self.permutations = self.find_permutations(states, spec)
        merged, aligned = merge_permuted(spec, states, self.permutations)
        if self.config.repair is not None:
            merged = self._repair(ctx, merged, aligned)
        return merged

    @staticmethod
    def _load(ctx: MergeContext, name: str, key: str) -> torch.Tensor:
        tensor = ctx.tasks[name].get(key).to("cpu", torch.float32)
        if not torch.isfinite(tensor).all():
            raise MergeError(f"{ctx.tasks[name].label}: tensor {key!r} contains NaN or Inf values.")
        return tensor

    @staticmethod
    def _default_spec(ctx: MergeContext) -> PermutationSpec:
        # A transformers model's tensors are named as save_pretrained writes them (the sources' keys), which can
        # differ from its in-memory names, so its spec is built from the config and those keys.
        if ctx.base.config is not None:
            return default_spec(config=ctx.base.config, keys=list(ctx.metas))
        if isinstance(ctx.base.model, torch.nn.Module):
            return default_spec(ctx.base.model)
        raise ValueError(
            "Cannot choose a permutation spec for state-dict inputs: pass spec= in the config "
            "(e.g. hf_merge.permutation.mlp_spec([...]))."
        )

    def _repair(self, ctx: MergeContext, merged: dict[str, torch.Tensor], aligned: list[dict[str, torch.Tensor]]) -> dict:
        template = ctx.base.model
        merged_model = self._with_weights(template, merged)
        endpoints = [self._with_weights(template, state) for state in aligned]
        repair_model(merged_model, endpoints, self.config.repair, max_batches=self.config.repair_max_batches)
        repaired = merged_model.state_dict()
        return {key: repaired[key].detach() for key in merged}


    @staticmethod
    def _with_weights(template: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        model = copy.deepcopy(template).float()
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"REPAIR: the merged tensors {unexpected[:5]} are not parameters of the first model.")
        return model


class C2M3Merger(PermutationMerger):
    config: C2M3Config

    def find_permutations(self, states: list[dict[str, torch.Tensor]], spec: PermutationSpec) -> list[Perms]:
        result = frank_wolfe_sync(
            states, spec, max_iter=self.config.max_iter, init=self.config.init, seed=self.config.seed,
            tol=self.config.tol, patience=self.config.patience, anchor=self.config.anchor,
        )
        self.objective = result.objective
        return result.perms


register_method(C2M3Config, C2M3Merger)
