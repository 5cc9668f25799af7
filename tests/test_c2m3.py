"""C2M3 (Frank–Wolfe synchronisation, spec §9), the permutation mergers, and REPAIR (spec §10)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import hf_merge
from hf_merge.permutation import (
    MLP,
    apply_permutation,
    c2m3,
    compose_to,
    default_repair_layers,
    default_spec,
    frank_wolfe_sync,
    invert,
    mlp_spec,
    random_permutations,
    repair,
)
from hf_merge.permutation.frank_wolfe import (
    _as_matrix,
    gradient,
    initial_point,
    maximize_on_unit_interval,
    objective,
    project,
    segment_polynomial,
)
from hf_merge.permutation.repair import layer_statistics
from hf_merge.permutation.spec import state_dict_of
from tests import tiny_models
from tests.helpers import BUILT_IN_MODELS, permuted_copy, randomized_resnet


def independent_mlps(count: int, widths=(6, 10, 8, 3)) -> list[MLP]:
    out = []
    for seed in range(count):
        torch.manual_seed(100 + seed)
        out.append(MLP(list(widths)).eval())
    return out


def spec_weights(spec, models):
    return [{k: state_dict_of(m)[k].double() for k in spec.axes} for m in models]


@pytest.mark.parametrize("name", sorted(BUILT_IN_MODELS))
def test_merging_permuted_copies_gives_the_original_back(name: str) -> None:
    model = BUILT_IN_MODELS[name]()
    copies = [model] + [permuted_copy(model, seed) for seed in (11, 12)]
    merged = hf_merge.merge(None, copies, hf_merge.C2M3Config(), progress=False)
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[key], tensor, rtol=0, atol=1e-6, msg=key)


def test_weight_matching_method_merges_permuted_copies_back_to_the_original() -> None:
    model = randomized_resnet()
    copies = [model, permuted_copy(model, 3), permuted_copy(model, 4)]
    merged = hf_merge.merge(None, copies, "weight_matching", progress=False)
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[key], tensor, rtol=0, atol=1e-6, msg=key)


def test_state_dict_inputs_need_a_spec_and_merge_with_one() -> None:
    model = MLP([6, 10, 8, 3])
    states = [model.state_dict(), permuted_copy(model, 5).state_dict(), permuted_copy(model, 6).state_dict()]
    with pytest.raises(ValueError, match="spec="):
        hf_merge.merge(None, states, "c2m3", progress=False)
    merged = hf_merge.merge(None, states, "c2m3", spec=mlp_spec(["0", "2", "4"]), progress=False)
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(merged[key], tensor, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("count", "anchor"), [(2, True), (4, True), (3, False)])
def test_c2m3_recovers_permuted_copies_anchored_and_reference(count: int, anchor: bool) -> None:
    model = MLP([10, 24, 20, 16, 3])
    copies = [model] + [permuted_copy(model, seed) for seed in range(20, 19 + count)]
    merged = hf_merge.merge(None, copies, hf_merge.C2M3Config(anchor=anchor), progress=False)
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[key], tensor, rtol=0, atol=1e-6, msg=key)


def test_pairwise_maps_are_cycle_consistent() -> None:
    models = independent_mlps(3)
    spec = default_spec(models[0])
    perms = c2m3(models, spec, max_iter=30)
    pair = {(a, b): compose_to(perms[a], perms[b]) for a in range(3) for b in range(3)}
    for name in spec.perm_names:
        assert torch.equal(pair[(0, 0)][name], torch.arange(len(perms[0][name])))
        # P_AB · P_BC = P_AC: aligning C to B and then B to A equals aligning C to A directly.
        assert torch.equal(pair[(1, 2)][name][pair[(0, 1)][name]], pair[(0, 2)][name])
        assert torch.equal(pair[(1, 0)][name], invert(pair[(0, 1)][name]))


@pytest.mark.parametrize("anchor", [True, False])
@pytest.mark.parametrize("make", [lambda: independent_mlps(4), lambda: [randomized_resnet() for _ in range(3)]])
def test_frank_wolfe_objective_never_decreases(make, anchor: bool) -> None:
    models = make()
    result = frank_wolfe_sync(models, default_spec(models[0]), max_iter=25, anchor=anchor)
    trace = np.array(result.objective)
    assert len(trace) >= 2
    assert (np.diff(trace) >= -1e-9 * abs(trace).max()).all()
    assert trace[-1] > trace[0]


def test_exact_line_search_matches_a_dense_grid_search() -> None:
    models = independent_mlps(3)
    spec = default_spec(models[0])
    weights = spec_weights(spec, models)
    sizes = spec.perm_sizes({k: v.shape for k, v in weights[0].items()})
    for trial in range(5):
        generator = torch.Generator().manual_seed(trial)
        soft = initial_point(sizes, 3, "sinkhorn", generator)
        target = [random_permutations(spec, sizes, generator) for _ in range(3)]
        direction = [{n: _as_matrix(q[n]) - p[n] for n in p} for p, q in zip(soft, target)]
        coefficients = segment_polynomial(spec, weights, soft, direction)
        grid = np.linspace(0, 1, 2001)
        along = [float(objective(spec, weights, [{n: p[n] + t * d[n] for n in p} for p, d in zip(soft, direction)]))
                 for t in grid[::100]]
        np.testing.assert_allclose(np.polynomial.polynomial.polyval(grid[::100], coefficients), along, rtol=1e-10)
        step = maximize_on_unit_interval(coefficients)
        best_on_grid = np.polynomial.polynomial.polyval(grid, coefficients).max()
        assert np.polynomial.polynomial.polyval(step, coefficients) >= best_on_grid - 1e-9 * abs(best_on_grid)


def test_line_search_finds_an_interior_maximum() -> None:
    # -(t - 0.3)^2 (t - 2)^2 has its maximum on [0, 1] at t = 0.3
    coefficients = np.polynomial.polynomial.polyfromroots([0.3, 0.3, 2.0, 2.0]) * -1
    assert maximize_on_unit_interval(coefficients) == pytest.approx(0.3, abs=1e-6)


@pytest.mark.parametrize("make", [lambda: independent_mlps(3), lambda: [tiny_models.tiny_bert() for _ in range(2)]])
def test_gradient_matches_autograd(make) -> None:
    models = make()
    spec = default_spec(models[0])
    weights = spec_weights(spec, models)
    sizes = spec.perm_sizes({k: v.shape for k, v in weights[0].items()})
    soft = initial_point(sizes, len(models), "sinkhorn", torch.Generator().manual_seed(0))
    leaves = [{n: m.clone().requires_grad_(True) for n, m in p.items()} for p in soft]
    objective(spec, weights, leaves).backward()
    for analytic, leaf in zip(gradient(spec, weights, soft), leaves):
        for name in leaf:
            torch.testing.assert_close(analytic[name], leaf[name].grad, rtol=1e-9, atol=1e-9)


def test_final_permutations_are_valid_structured_permutations() -> None:
    models = [tiny_models.tiny_vit(), tiny_models.tiny_vit()]
    spec = default_spec(models[0])
    result = frank_wolfe_sync(models, spec, max_iter=5)
    for perms, soft in zip(result.perms, result.soft):
        projected = project(spec, soft)
        assert all(torch.equal(perms[n], projected[n]) for n in perms)
        merged = copy.deepcopy(models[0])
        merged.load_state_dict(apply_permutation(spec, perms, models[0].state_dict()))
        torch.testing.assert_close(tiny_models.logits("vit", merged), tiny_models.logits("vit", models[0]))


def test_config_validates_and_does_not_serialise_runtime_objects() -> None:
    with pytest.raises(ValueError, match="init"):
        hf_merge.C2M3Config(init="random")
    with pytest.raises(ValueError, match="max_iter"):
        hf_merge.C2M3Config(max_iter=-1)
    with pytest.raises(TypeError, match="spec"):
        hf_merge.WeightMatchingConfig(spec={"0.weight": ("P", None)})
    config = hf_merge.C2M3Config(max_iter=50, spec=mlp_spec(["0", "2"]), repair=[torch.zeros(2, 3)])
    data = config.to_dict()
    assert "spec" not in data and "repair" not in data
    assert hf_merge.MergeConfig.from_dict(data) == hf_merge.C2M3Config(max_iter=50)


# ----------------------------------------------------------------------------------------------- REPAIR
def test_repair_full_batch_hits_the_goal_statistics_mlp() -> None:
    models = independent_mlps(3)
    batch = torch.randn(256, 6, generator=torch.Generator().manual_seed(0))
    merged = copy.deepcopy(models[0])
    merged.load_state_dict(hf_merge.permutation.average_states([m.state_dict() for m in models]))
    layers = default_repair_layers(merged)
    assert layers == ["0", "2"]
    goals = [layer_statistics(m, layers, [batch])[0] for m in models]
    before = layer_statistics(merged, layers, [batch])[0]
    repair(merged, models, [batch], eps=0.0)
    after = layer_statistics(merged, layers, [batch])[0]
    for name in layers:
        goal_mean = sum(g[name][0] for g in goals) / 3
        goal_var = sum(g[name][1] for g in goals) / 3
        assert not torch.allclose(before[name][1], goal_var, rtol=1e-3)
        torch.testing.assert_close(after[name][0], goal_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(after[name][1], goal_var, rtol=1e-5, atol=1e-6)


def test_repair_full_batch_hits_the_goal_statistics_batchnorm_resnet() -> None:
    models = [randomized_resnet() for _ in range(2)]
    images = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    loader = [(images, torch.zeros(32))]
    merged = copy.deepcopy(models[0])
    merged.load_state_dict(hf_merge.permutation.average_states([m.state_dict() for m in models]))
    layers = default_repair_layers(merged)
    assert all(isinstance(dict(merged.named_modules())[n], torch.nn.BatchNorm2d) for n in layers)
    goals = [layer_statistics(m, layers, loader)[0] for m in models]
    repair(merged, models, loader, eps=0.0)
    after = layer_statistics(merged, layers, loader)[0]
    for name in layers:
        torch.testing.assert_close(after[name][0], (goals[0][name][0] + goals[1][name][0]) / 2, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(after[name][1], (goals[0][name][1] + goals[1][name][1]) / 2, rtol=1e-4, atol=1e-4)


def test_merge_with_repair_matches_the_aligned_endpoints_statistics() -> None:
    models = independent_mlps(3)
    batch = torch.randn(128, 6, generator=torch.Generator().manual_seed(2))
    merged = hf_merge.merge(None, models, hf_merge.C2M3Config(max_iter=20, repair=[batch]), progress=False)
    spec = default_spec(models[0])
    permutations = c2m3(models, spec, max_iter=20)  # deterministic: the same permutations the merge used
    aligned = []
    for model, perms in zip(models, permutations):
        endpoint = copy.deepcopy(models[0])
        endpoint.load_state_dict(apply_permutation(spec, compose_to(permutations[0], perms), model.state_dict()))
        aligned.append(endpoint)
    goals = [layer_statistics(m, ["0", "2"], [batch])[0] for m in aligned]
    after = layer_statistics(merged, ["0", "2"], [batch])[0]
    for name in ("0", "2"):
        torch.testing.assert_close(after[name][0], sum(g[name][0] for g in goals) / 3, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(after[name][1], sum(g[name][1] for g in goals) / 3, rtol=1e-4, atol=1e-4)


def test_repair_refuses_transformers_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="transformer REPAIR is not supported"):
        default_repair_layers(tiny_models.tiny_bert())
    models = [tiny_models.tiny_bert(), tiny_models.tiny_bert()]
    with pytest.raises(ValueError, match="transformer REPAIR is not supported"):
        hf_merge.merge(None, models, "c2m3", repair=[{"input_ids": torch.zeros(2, 4, dtype=torch.long)}])


def test_repair_needs_a_module_for_the_first_input() -> None:
    model = MLP([6, 10, 8, 3])
    states = [model.state_dict(), permuted_copy(model, 1).state_dict()]
    with pytest.raises(TypeError, match="nn.Module"):
        hf_merge.merge(None, states, "c2m3", spec=mlp_spec(["0", "2", "4"]), repair=[torch.zeros(4, 6)], progress=False)
