"""Permutation symmetry: specs, Git Re-Basin weight matching, C2M3 (cycle-consistent Frank–Wolfe) and REPAIR."""

from .frank_wolfe import FrankWolfeResult, c2m3, frank_wolfe_sync
from .merging import align_to_first, average_states, merge_permuted
from .models import MLP, ResNet
from .repair import default_repair_layers, repair
from .spec import (
    HeadGroup,
    PermutationSpec,
    apply_permutation,
    compose_to,
    invert,
    random_permutations,
    solve_assignment,
    validate_spec,
)
from .specs import bert_spec, default_spec, llama_spec, mlp_spec, resnet_spec, sequential_spec, vit_spec
from .weight_matching import weight_matching

__all__ = [
    "MLP",
    "FrankWolfeResult",
    "HeadGroup",
    "PermutationSpec",
    "ResNet",
    "align_to_first",
    "apply_permutation",
    "average_states",
    "bert_spec",
    "c2m3",
    "compose_to",
    "default_repair_layers",
    "default_spec",
    "frank_wolfe_sync",
    "invert",
    "llama_spec",
    "merge_permuted",
    "mlp_spec",
    "random_permutations",
    "repair",
    "resnet_spec",
    "sequential_spec",
    "solve_assignment",
    "validate_spec",
    "vit_spec",
    "weight_matching",
]
