"""Permutation specs and pairwise weight matching (Git Re-Basin, spec §8)."""

from __future__ import annotations

import itertools

import pytest
import torch

from hf_merge.permutation import (
    MLP,
    HeadGroup,
    PermutationSpec,
    apply_permutation,
    default_spec,
    mlp_spec,
    random_permutations,
    solve_assignment,
    validate_spec,
    weight_matching,
)
from hf_merge.permutation.spec import state_dict_of
from hf_merge.permutation.weight_matching import matching_objective
from tests import tiny_models
from tests.helpers import BUILT_IN_MODELS, permuted_copy, tiny_llama_without_gqa


@pytest.mark.parametrize("name", sorted(BUILT_IN_MODELS))
def test_every_built_in_spec_is_a_symmetry_of_its_model(name: str) -> None:
    model = BUILT_IN_MODELS[name]()
    assert validate_spec(model, default_spec(model)) < 1e-4


@pytest.mark.parametrize("name", sorted(BUILT_IN_MODELS))
def test_permuted_copy_really_has_different_weights(name: str) -> None:
    model = BUILT_IN_MODELS[name]()
    spec = default_spec(model)
    moved = permuted_copy(model, seed=1).state_dict()
    assert any(not torch.equal(moved[k], model.state_dict()[k]) for k in spec.axes)


def test_validate_spec_rejects_a_spec_that_forgets_a_tensor() -> None:
    model = MLP([6, 12, 10, 3]).eval()
    spec = default_spec(model)
    broken = PermutationSpec({k: v for k, v in spec.axes.items() if k != "2.weight"})
    with pytest.raises(ValueError, match="does not describe a symmetry"):
        validate_spec(model, broken)


def test_rotary_models_get_no_within_head_query_key_permutation() -> None:
    model = tiny_llama_without_gqa(tie_word_embeddings=False)
    spec = default_spec(model)
    assert validate_spec(model, spec) < 1e-4
    assert all(group.within == (False, True) for group in spec.head_groups)
    within_qk = PermutationSpec(spec.axes, tuple(HeadGroup(g.perms, g.num_heads, (True, True)) for g in spec.head_groups))
    with pytest.raises(ValueError, match="does not describe a symmetry"):
        validate_spec(model, within_qk)


def test_llama_spec_refuses_grouped_query_attention() -> None:
    with pytest.raises(ValueError, match="grouped-query attention"):
        default_spec(tiny_models.tiny_llama())


def test_bert_residual_stream_covers_embeddings_norms_and_pooler_columns() -> None:
    model = tiny_models.tiny_bert()
    spec = default_spec(model)
    assert spec.axes["bert.embeddings.word_embeddings.weight"] == (None, "P_res")
    assert spec.axes["bert.embeddings.LayerNorm.weight"] == ("P_res",)
    assert spec.axes["bert.encoder.layer.1.output.LayerNorm.bias"] == ("P_res",)
    assert spec.axes["bert.pooler.dense.weight"] == ("P_pool", "P_res")
    assert spec.axes["classifier.weight"] == (None, "P_pool")
    assert spec.axes["bert.encoder.layer.0.attention.self.key.weight"] == ("P_qk_0", "P_res")
    assert spec.axes["bert.encoder.layer.0.attention.output.dense.weight"] == ("P_res", "P_vo_0")


def test_head_group_permutations_move_whole_heads_with_one_shared_head_order() -> None:
    spec = PermutationSpec({"q": ("qk",), "v": ("vo",)}, (HeadGroup(("qk", "vo"), num_heads=3, within=(True, False)),))
    perms = random_permutations(spec, {"qk": 12, "vo": 12}, torch.Generator().manual_seed(3))
    qk_heads = (perms["qk"] // 4).reshape(3, 4)
    vo = perms["vo"].reshape(3, 4)
    assert (qk_heads == qk_heads[:, :1]).all()  # every head's dims come from one source head
    assert torch.equal(qk_heads[:, 0], vo[:, 0] // 4)  # q/k and v/o share the head order
    assert torch.equal(vo - vo[:, :1], torch.arange(4).expand(3, 4))  # within=False keeps the dims in order


def test_head_group_assignment_is_the_exact_optimum_over_structured_permutations() -> None:
    spec = PermutationSpec({"q": ("qk",), "v": ("vo",)}, (HeadGroup(("qk", "vo"), num_heads=2, within=(True, True)),))
    generator = torch.Generator().manual_seed(0)
    scores = {"qk": torch.randn(6, 6, generator=generator), "vo": torch.randn(6, 6, generator=generator)}

    def value(perms: dict[str, torch.Tensor]) -> float:
        return sum(float(scores[n][torch.arange(6), perms[n]].sum()) for n in scores)

    best = -float("inf")
    for heads in itertools.permutations(range(2)):
        for inner in itertools.product(itertools.permutations(range(3)), repeat=4):
            qk = torch.tensor([h * 3 + i for head, h in enumerate(heads) for i in inner[head]])
            vo = torch.tensor([h * 3 + i for head, h in enumerate(heads) for i in inner[2 + head]])
            best = max(best, value({"qk": qk, "vo": vo}))
    assert value(solve_assignment(spec, ("qk", "vo"), scores)) == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("name", sorted(BUILT_IN_MODELS))
def test_weight_matching_recovers_a_permuted_copy_exactly(name: str) -> None:
    model = BUILT_IN_MODELS[name]()
    spec = default_spec(model)
    shuffled = permuted_copy(model, seed=2)
    perms = weight_matching(model, shuffled, spec)
    aligned = apply_permutation(spec, perms, state_dict_of(shuffled))
    for key, tensor in state_dict_of(model).items():
        assert torch.equal(aligned[key], tensor), key


def test_weight_matching_never_does_worse_than_no_alignment() -> None:
    spec = mlp_spec(["0", "2", "4"])
    a, b = MLP([8, 16, 16, 4]).state_dict(), MLP([8, 16, 16, 4]).state_dict()
    sizes = spec.perm_sizes({k: v.shape for k, v in a.items()})
    identity = {n: torch.arange(s) for n, s in sizes.items()}
    perms = weight_matching(a, b, spec)
    assert matching_objective(spec, a, b, perms) >= matching_objective(spec, a, b, identity)
    assert all(sorted(p.tolist()) == list(range(sizes[n])) for n, p in perms.items())


def test_spec_errors_name_the_offending_tensor() -> None:
    shapes = {"0.weight": (4, 3), "0.bias": (4,), "2.weight": (2, 5)}
    with pytest.raises(ValueError, match="'2.weight'"):
        PermutationSpec({"0.weight": ("P", None), "2.weight": (None, "P")}).perm_sizes(shapes)
    with pytest.raises(ValueError, match="'0.bias'"):
        PermutationSpec({"0.bias": ("P", None)}).perm_sizes(shapes)
    with pytest.raises(ValueError, match="'missing.weight'"):
        PermutationSpec({"missing.weight": ("P", None)}).perm_sizes(shapes)
    with pytest.raises(ValueError, match="multiple of 3 heads"):
        PermutationSpec({"0.weight": ("P", None)}, (HeadGroup(("P",), 3, (True,)),)).perm_sizes(shapes)
