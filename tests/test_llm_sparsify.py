"""Model Stock, DELLA, Model Breadcrumbs, SCE and MagMax: hand-computed cases, seeded masks, the merge API."""

from __future__ import annotations

import math
import re

import pytest
import torch

import hf_merge
from hf_merge.config import MergeConfig
from hf_merge.methods.breadcrumbs import (
    BreadcrumbsConfig,
    BreadcrumbsTiesConfig,
    breadcrumbs_counts,
    breadcrumbs_mask,
)
from hf_merge.methods.dare import mask_seed
from hf_merge.methods.della import (
    DellaConfig,
    DellaLinearConfig,
    magprune,
    magprune_keep_probabilities,
    masked_merge,
)
from hf_merge.methods.magmax import MagMaxConfig, magmax
from hf_merge.methods.model_stock import ModelStockConfig, mean_pairwise_cosine, model_stock, model_stock_ratio
from hf_merge.methods.sce import SCEConfig, sce, sce_select, sce_weights
from hf_merge.methods.ties import disjoint_merge, elect_signs
from hf_merge.registry import config_class
from hf_merge.tuning import TUNING
from tests.tiny_models import finetuned_copy, tiny_bert

METHODS = {
    "model_stock": {},
    "della": {"density": 0.5},
    "della_linear": {"density": 0.5},
    "breadcrumbs": {"density": 0.3},
    "breadcrumbs_ties": {"density": 0.3},
    "sce": {"select_topk": 0.5},
    "magmax": {"scaling": 0.5},
}


def merge_dicts(base: dict, fts, config, **keywords) -> dict:
    return hf_merge.merge(base, fts, config, progress=False, **keywords)


def random_tasks(shape, count=3, seed=0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(count)]


# ------------------------------------------------------------------------------------------ Model Stock
def test_model_stock_of_orthogonal_task_vectors_is_the_base():
    deltas = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])]
    assert mean_pairwise_cosine(deltas).item() == 0.0
    assert torch.equal(model_stock(deltas), torch.zeros(3))
    base = {"w": torch.tensor([0.5, -1.0, 2.0])}
    merged = merge_dicts(base, [{"w": base["w"] + d} for d in deltas], "model_stock")
    torch.testing.assert_close(merged["w"], base["w"], rtol=0, atol=1e-7)


def test_model_stock_of_identical_task_vectors_is_their_mean():
    delta = torch.tensor([0.3, -1.2, 0.7, 2.0])
    torch.testing.assert_close(model_stock_ratio(mean_pairwise_cosine([delta, delta, delta]), 3),
                               torch.ones(1, 1))
    torch.testing.assert_close(model_stock([delta, delta, delta]), delta)
    base = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    merged = merge_dicts(base, [{"w": base["w"] + delta}] * 2, "model_stock")
    torch.testing.assert_close(merged["w"], base["w"] + delta)


def test_model_stock_ratio_from_known_cosines():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])  # cos = 1/√2
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    torch.testing.assert_close(model_stock([a, b]), t * torch.tensor([1.0, 0.5]))
    # k = 3: the mean of the pairwise cosines (0, 1/√2, 1/√2), t = 3c / (1 + 2c)
    x, y, z = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([2.0, 2.0])
    c3 = 2 * c / 3
    torch.testing.assert_close(mean_pairwise_cosine([x, y, z]), torch.tensor([[c3]]))
    t3 = 3 * c3 / (1 + 2 * c3)
    torch.testing.assert_close(model_stock([x, y, z]), t3 * torch.tensor([1.0, 1.0]))


def test_model_stock_filter_wise_gives_one_ratio_per_row():
    a = torch.tensor([[1.0, 0.0], [1.0, 2.0]])
    b = torch.tensor([[0.0, 3.0], [1.0, 2.0]])  # row 0 orthogonal (t = 0), row 1 identical (t = 1)
    torch.testing.assert_close(model_stock([a, b], filter_wise=True), torch.tensor([[0.0, 0.0], [1.0, 2.0]]))
    whole = model_stock([a, b])  # one cosine for the tensor: 5 / (√6 · √14)
    c = 5 / math.sqrt(6 * 14)
    torch.testing.assert_close(whole, (2 * c / (1 + c)) * (a + b) / 2)
    base = {"w": torch.zeros(2, 2)}
    merged = merge_dicts(base, [{"w": a}, {"w": b}], "model_stock", filter_wise=True)
    torch.testing.assert_close(merged["w"], torch.tensor([[0.0, 0.0], [1.0, 2.0]]))


def test_model_stock_handles_zero_and_cancelling_task_vectors_without_nan():
    v = torch.tensor([1.0, 2.0])
    assert torch.equal(model_stock([torch.zeros(2), v]), torch.zeros(2))  # cos 0 with a zero task vector
    assert torch.equal(model_stock([torch.zeros(2), torch.zeros(2)]), torch.zeros(2))
    assert torch.equal(model_stock([v, -v]), torch.zeros(2))  # 1 + (k − 1) cos θ = 0: t = 0, not inf
    rows = model_stock([torch.zeros(3, 2), torch.ones(3, 2)], filter_wise=True)
    assert torch.isfinite(rows).all() and torch.equal(rows, torch.zeros(3, 2))


def test_model_stock_refuses_fewer_than_two_models():
    with pytest.raises(ValueError, match="at least two"):
        merge_dicts({"w": torch.zeros(2)}, [{"w": torch.ones(2)}], "model_stock")
    with pytest.raises(ValueError, match="at least two"):
        model_stock([torch.ones(2)])
    with pytest.raises(TypeError, match="filter_wise"):
        ModelStockConfig(filter_wise="yes")


# ------------------------------------------------------------------------------------------ DELLA
def test_della_keep_probabilities_follow_the_magnitude_rank_of_each_row():
    delta = torch.tensor([[0.3, -0.1, 0.5, 0.2, -0.4], [-5.0, 4.0, 3.0, -2.0, 1.0]])
    p = magprune_keep_probabilities(delta, density=0.5, epsilon=0.2)
    # ranks by |τ| within each row: row 0 → (2, 0, 4, 1, 3), row 1 → (4, 3, 2, 1, 0); p = 0.3 + 0.4 · rank / 4
    torch.testing.assert_close(p, torch.tensor([[0.5, 0.3, 0.7, 0.4, 0.6], [0.7, 0.6, 0.5, 0.4, 0.3]]))
    # 1-D tensors are one row, one-entry rows keep with p = density
    torch.testing.assert_close(magprune_keep_probabilities(torch.tensor([2.0, -1.0, 3.0]), 0.5, 0.1),
                               torch.tensor([0.5, 0.4, 0.6]))
    torch.testing.assert_close(magprune_keep_probabilities(torch.randn(4, 1), 0.3, 0.1), torch.full((4, 1), 0.3))
    torch.testing.assert_close(magprune_keep_probabilities(torch.tensor(2.0), 0.3, 0.1), torch.tensor(0.3))


def test_della_keep_rate_per_rank_bucket_matches_p_and_survivors_are_exactly_rescaled():
    delta = torch.randn(100, 2000, generator=torch.Generator().manual_seed(7))
    density, epsilon = 0.4, 0.15
    dropped = magprune(delta, density, epsilon, seed=11)
    p = magprune_keep_probabilities(delta, density, epsilon)
    kept = dropped != 0
    assert torch.equal(dropped[kept], delta[kept] / p[kept])  # rescaled by exactly 1/p
    assert torch.equal(dropped[~kept], torch.zeros(int((~kept).sum())))
    ranks = delta.abs().argsort(dim=1).argsort(dim=1)  # 0 = smallest |τ| of the row
    bucket = ranks * 10 // delta.shape[1]
    for b in range(10):
        in_bucket = bucket == b
        expected = (density - epsilon) + 2 * epsilon * (ranks[in_bucket].float().mean() / (delta.shape[1] - 1))
        assert abs(kept[in_bucket].float().mean().item() - expected.item()) < 0.015, b
    assert abs(kept.float().mean().item() - density) < 0.01


def test_della_masks_are_seeded_and_unbiased():
    delta = torch.randn(50, 40)
    assert torch.equal(magprune(delta, 0.5, 0.1, seed=3), magprune(delta, 0.5, 0.1, seed=3))
    assert not torch.equal(magprune(delta, 0.5, 0.1, seed=3), magprune(delta, 0.5, 0.1, seed=4))
    mean = torch.stack([magprune(delta, 0.5, 0.2, seed=s) for s in range(300)]).mean(0)
    assert (mean - delta).abs().mean() < 0.08 * delta.abs().mean()


def test_della_masks_do_not_depend_on_tensor_order_and_match_the_pure_functions():
    gen = torch.Generator().manual_seed(2)
    base = {f"t{i}": torch.zeros(6, 20) for i in range(4)}
    fts = {n: {k: torch.randn(6, 20, generator=gen) for k in base} for n in ("a", "b", "c")}
    config = DellaConfig(density=0.5, epsilon=0.2, seed=5, scaling=1.5)
    merged = merge_dicts(base, fts, config)
    reordered = merge_dicts(dict(reversed(base.items())), {n: dict(reversed(sd.items())) for n, sd in fts.items()},
                            config)
    for key in base:
        assert torch.equal(merged[key], reordered[key])
    dropped = [magprune(fts[n]["t2"], 0.5, 0.2, mask_seed(5, n, "t2")) for n in fts]
    stack = torch.stack(dropped)
    torch.testing.assert_close(merged["t2"], 1.5 * disjoint_merge(stack, elect_signs(stack)))


def test_della_linear_differs_from_della_only_by_sign_election():
    gen = torch.Generator().manual_seed(3)
    base = {"w": torch.zeros(8, 30)}
    fts = {n: {"w": torch.randn(8, 30, generator=gen)} for n in ("x", "y")}
    linear = merge_dicts(base, fts, "della_linear", density=0.6, epsilon=0.1, seed=1, scaling=0.7)["w"]
    elected = merge_dicts(base, fts, "della", density=0.6, epsilon=0.1, seed=1, scaling=0.7)["w"]
    dropped = [magprune(fts[n]["w"], 0.6, 0.1, mask_seed(1, n, "w")) for n in fts]
    torch.testing.assert_close(linear, 0.7 * (dropped[0] + dropped[1]))
    torch.testing.assert_close(elected, masked_merge(dropped, None, DellaConfig(density=0.6, scaling=0.7)))
    stack = torch.stack(dropped)
    torch.testing.assert_close(elected, 0.7 * disjoint_merge(stack, elect_signs(stack)))
    assert not torch.allclose(linear, elected)
    unelected = merge_dicts(base, fts, "della", density=0.6, epsilon=0.1, seed=1, scaling=0.7, sign_election=False)
    assert torch.equal(unelected["w"], linear)
    assert DellaLinearConfig(density=0.5).sign_election is False and DellaConfig(density=0.5).sign_election is True


def test_masked_merge_in_chunks_equals_the_ties_functions(monkeypatch):
    deltas = random_tasks((37, 11), count=3, seed=4)
    deltas[0][0, :5] = 0.0
    deltas[1][0, :5] = 0.0
    deltas[2][0, :5] = 0.0
    stack = torch.stack(deltas)
    expected = disjoint_merge(stack, elect_signs(stack))
    monkeypatch.setattr(TUNING, "ties_chunk", 13)
    torch.testing.assert_close(masked_merge(deltas, None, DellaConfig(density=0.5)), expected)
    p = magprune_keep_probabilities(deltas[0], 0.5, 0.1)
    monkeypatch.setattr(TUNING, "ties_chunk", 1 << 22)
    assert torch.equal(p, magprune_keep_probabilities(deltas[0], 0.5, 0.1))


# ------------------------------------------------------------------------------------------ Breadcrumbs
def test_breadcrumbs_keeps_exactly_the_middle_band():
    gen = torch.Generator().manual_seed(0)
    magnitudes = torch.randperm(100, generator=gen).float() + 1  # 1 … 100, distinct
    signs = torch.where(torch.rand(100, generator=gen) < 0.5, -1.0, 1.0)
    delta = (magnitudes * signs).reshape(10, 10)
    assert breadcrumbs_counts(100, 0.3, 0.1) == (60, 30, 10)
    mask = breadcrumbs_mask(delta, density=0.3, gamma=0.1)
    assert int(mask.sum()) == 30
    kept = sorted(delta[mask].abs().tolist())
    assert kept == [float(v) for v in range(61, 91)]  # bottom 60 and top 10 dropped
    # γ = 0 on a small tensor keeps the top ⌊density · n⌋ (mergekit's slice would keep nothing)
    small = torch.tensor([0.1, -0.5, 0.3, 0.9, -0.2, 0.7, 0.4, -0.6, 0.8, 0.05])
    assert small[breadcrumbs_mask(small, 0.3, 0.0)].tolist() == pytest.approx([0.9, 0.7, 0.8])


def test_breadcrumbs_is_masked_task_arithmetic_and_breadcrumbs_ties_adds_sign_election():
    deltas = random_tasks((20, 10), count=3, seed=5)
    base = {"w": torch.randn(20, 10)}
    fts = [{"w": base["w"] + d} for d in deltas]
    masked = [d * breadcrumbs_mask(d, 0.4, 0.05) for d in deltas]
    summed = merge_dicts(base, fts, "breadcrumbs", density=0.4, gamma=0.05, scaling=0.5)["w"]
    torch.testing.assert_close(summed, base["w"] + 0.5 * sum(masked), rtol=1e-6, atol=1e-6)
    stack = torch.stack(masked)
    ties = merge_dicts(base, fts, "breadcrumbs_ties", density=0.4, gamma=0.05, scaling=0.5)["w"]
    torch.testing.assert_close(ties, base["w"] + 0.5 * disjoint_merge(stack, elect_signs(stack)), rtol=1e-6,
                               atol=1e-6)
    torch.testing.assert_close(masked_merge(masked, None, BreadcrumbsTiesConfig(density=0.4, scaling=0.5)),
                               0.5 * disjoint_merge(stack, elect_signs(stack)))
    assert BreadcrumbsTiesConfig(density=0.4).sign_election is True
    assert BreadcrumbsConfig(density=0.4).sign_election is False


# ------------------------------------------------------------------------------------------ SCE
SCE_TASKS = [torch.tensor([1.0, 2.0, -1.0, 0.0, 2.0]), torch.tensor([3.0, -3.0, -2.0, 0.0, 1.0])]


def test_sce_without_selection_by_hand():
    # w = (1+4+1+0+4, 9+9+4+0+1) / 33 = (10, 23) / 33; elected signs (+, −, −, ·, +)
    assert sce_weights(SCE_TASKS) == pytest.approx([10 / 33, 23 / 33])
    expected = torch.tensor([(10 * 1 + 23 * 3) / 33, -3.0, (10 * -1 + 23 * -2) / 33, 0.0, (10 * 2 + 23 * 1) / 33])
    torch.testing.assert_close(sce(SCE_TASKS, 1.0), expected)
    base = {"w": torch.ones(5)}
    merged = merge_dicts(base, [{"w": 1 + t} for t in SCE_TASKS], "sce")
    torch.testing.assert_close(merged["w"], 1 + expected)


def test_sce_with_half_of_the_varying_positions_selected_by_hand():
    # variances (1, 6.25, 0.25, 0, 0.25): 4 non-zero, ⌊0.5 · 4⌋ = 2 → positions 0 and 1
    assert sce_select(SCE_TASKS, 0.5).tolist() == [True, True, False, False, False]
    assert sce_select(SCE_TASKS, 1.0) is None
    # selected (1, 2, 0, 0, 0) and (3, −3, 0, 0, 0): w = (5, 18) / 23; signs (+, −)
    expected = torch.tensor([(5 * 1 + 18 * 3) / 23, -3.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(sce(SCE_TASKS, 0.5), expected)
    merged = merge_dicts({"w": torch.zeros(5)}, [{"w": t} for t in SCE_TASKS], "sce", select_topk=0.5)
    torch.testing.assert_close(merged["w"], expected)


def test_sce_edge_cases_are_finite(monkeypatch):
    assert torch.equal(sce([torch.zeros(4), torch.zeros(4)], 0.5), torch.zeros(4))  # nothing varies
    assert sce_weights([torch.zeros(3), torch.zeros(3)]) == [0.5, 0.5]
    deltas = random_tasks((9, 7), count=4, seed=6)
    whole = sce(deltas, 0.3)
    monkeypatch.setattr(TUNING, "ties_chunk", 5)
    torch.testing.assert_close(sce(deltas, 0.3), whole)
    assert torch.isfinite(whole).all()


# ------------------------------------------------------------------------------------------ MagMax
def test_magmax_picks_the_largest_magnitude_entry_with_its_sign(monkeypatch):
    deltas = [torch.tensor([1.0, -5.0, 2.0, -3.0]), torch.tensor([-2.0, 4.0, 2.0, 3.0]),
              torch.tensor([0.5, 1.0, -2.5, 0.0])]
    torch.testing.assert_close(magmax(deltas), torch.tensor([-2.0, -5.0, -2.5, -3.0]))  # tie at 3: the first
    torch.testing.assert_close(magmax(deltas, 0.5), torch.tensor([-1.0, -2.5, -1.25, -1.5]))
    monkeypatch.setattr(TUNING, "ties_chunk", 3)
    torch.testing.assert_close(magmax(deltas), torch.tensor([-2.0, -5.0, -2.5, -3.0]))
    base = {"w": torch.ones(4)}
    merged = merge_dicts(base, [{"w": 1 + d} for d in deltas], "magmax", scaling=0.5)
    torch.testing.assert_close(merged["w"], torch.tensor([0.0, -1.5, -0.25, -0.5]))


# ------------------------------------------------------------------------------------------ all methods
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_merges_state_dicts_and_a_tiny_transformers_model(name):
    base = tiny_bert()
    fts = [finetuned_copy(base, seed) for seed in (1, 2, 3)]
    merged = hf_merge.merge(base, fts, name, progress=False, **METHODS[name])
    from_dicts = hf_merge.merge(base.state_dict(), [m.state_dict() for m in fts], name, progress=False,
                                **METHODS[name])
    state = merged.state_dict()
    moved = 0
    for key, value in base.state_dict().items():
        assert torch.isfinite(state[key].float()).all(), key
        torch.testing.assert_close(state[key], from_dicts[key], rtol=0, atol=0)
        moved += not torch.equal(state[key], value)
    assert moved > 0


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_config_round_trips_and_has_a_card(name):
    config = config_class(name)(**METHODS[name])
    assert MergeConfig.from_dict(config.to_dict()) == config
    card = type(config).card
    assert len(card.summary.split()) >= 30
    assert re.search(r"year\s*=\s*\{20\d\d\}", card.bibtex)
    assert card.paper_url.startswith("https://arxiv.org/abs/")
    space = config.search_space()
    if name in ("model_stock", "sce"):
        assert space is None
    else:
        assert space.parameter == "scaling" and space.kind == "linear" and len(space.values) > 5


@pytest.mark.parametrize(
    ("name", "kwargs", "field"),
    [
        ("della", {"density": 0.0}, "density"),
        ("della", {"density": 1.2}, "density"),
        ("della", {"density": 0.1, "epsilon": 0.15}, "epsilon"),
        ("della_linear", {"density": 0.9, "epsilon": 0.15}, "epsilon"),
        ("della", {"density": 0.5, "seed": 1.5}, "seed"),
        ("breadcrumbs", {"density": 0.0}, "density"),
        ("breadcrumbs", {"density": 1.2}, "density"),
        ("breadcrumbs", {"density": 0.95, "gamma": 0.1}, "gamma"),
        ("breadcrumbs_ties", {"density": 0.5, "gamma": 1.0}, "gamma"),
        ("sce", {"select_topk": 0.0}, "select_topk"),
        ("sce", {"select_topk": 1.5}, "select_topk"),
        ("magmax", {"scaling": float("nan")}, "scaling"),
    ],
)
def test_bad_values_are_refused_naming_the_field(name, kwargs, field):
    with pytest.raises((ValueError, TypeError), match=field):
        config_class(name)(**kwargs)
    with pytest.raises((ValueError, TypeError), match=field):
        merge_dicts({"w": torch.zeros(3)}, [{"w": torch.ones(3)}, {"w": -torch.ones(3)}], name, **kwargs)


def test_configs_build_by_name_and_class():
    assert hf_merge.get_merger("della_linear", density=0.5).config == DellaLinearConfig(density=0.5)
    assert hf_merge.get_merger("sce").config == SCEConfig()
    assert hf_merge.get_merger("magmax").config == MagMaxConfig()
    assert hf_merge.get_merger(DellaLinearConfig(density=0.3)).config.method == "della_linear"
