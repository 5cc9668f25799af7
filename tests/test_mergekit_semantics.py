"""mergekit's generalized task arithmetic as explicit options (issue 17): per-task weights before sign election,
weighted normalisation, mergekit's keep count, +1 for exactly-zero sums, L1 rescaling, SCE's epsilons. Each option
is pinned by small hand-computed tensors, and the mapped configs are compared with a small reference of mergekit's
algorithm written here (``mergekit/merge_methods/generalized_task_arithmetic.py``, ``mergekit/sparsify.py``)."""

from __future__ import annotations

import pytest
import torch

import hf_merge
from hf_merge.config import MergeConfig
from hf_merge.methods.breadcrumbs import BreadcrumbsConfig, BreadcrumbsTiesConfig
from hf_merge.methods.dare import DareConfig, dare_drop
from hf_merge.methods.della import DellaConfig, DellaLinearConfig, magprune
from hf_merge.methods.sce import SCEConfig, sce, sce_weights
from hf_merge.methods.task_arithmetic import TaskArithmeticConfig
from hf_merge.methods.ties import TiesConfig, trim_mask, trim_rule
from hf_merge.registry import config_class


def merge(tasks: dict[str, torch.Tensor], config, base: torch.Tensor | None = None) -> torch.Tensor:
    """θ₀ + merged τ for one tensor "w" (θ₀ = 0 unless given)."""
    base = torch.zeros_like(next(iter(tasks.values()))) if base is None else base
    fts = {name: {"w": base + tau} for name, tau in tasks.items()}
    return hf_merge.merge({"w": base}, fts, config, progress=False)["w"]


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=1e-6, atol=1e-7)


# Two tasks where the weights (2, 1) flip the elected sign of entry 0: Σ w τ = (1, −3, 7, 2, 1, −1), unweighted
# Σ τ = (−1, −1, 4, 2, 0, 0).
WEIGHTED = {"a": torch.tensor([2.0, -2.0, 3.0, 0.0, 1.0, -1.0]), "b": torch.tensor([-3.0, 1.0, 1.0, 2.0, -1.0, 1.0])}
# agreeing weighted entries: e0 a (4), e1 a (−4), e2 a, b (6 + 1), e3 b (2; a is 0), e4 a (2), e5 a (−2)
WEIGHTED_SUM = [4.0, -4.0, 7.0, 2.0, 2.0, -2.0]
WEIGHTED_MEAN = [4 / 2, -4 / 2, 7 / 3, 2 / 1, 2 / 2, -2 / 2]  # ÷ Σ w over the agreeing tasks


# ------------------------------------------------------------------------------------------ weights
@pytest.mark.parametrize("aggregate, expected", [("sum", WEIGHTED_SUM), ("mean", WEIGHTED_MEAN)])
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_ties_weights_come_before_sign_election_and_weigh_the_normalisation(aggregate, expected, scope):
    config = TiesConfig(density=1.0, scope=scope, aggregate=aggregate, weights={"b": 1.0, "a": 2.0}, scaling=0.5)
    close(merge(WEIGHTED, config), [0.5 * v for v in expected])
    in_order = config.replace(weights=[2.0, 1.0])
    close(merge(WEIGHTED, in_order), [0.5 * v for v in expected])


def test_unit_weights_are_the_unweighted_merge_bit_for_bit():
    generator = torch.Generator().manual_seed(1)
    base = {"a": torch.randn(40, 30, generator=generator), "b": torch.randn(70, generator=generator)}
    fts = [{k: v + torch.randn(v.shape, generator=generator) for k, v in base.items()} for _ in range(3)]
    for config in (TiesConfig(density=0.3), TiesConfig(density=0.3, scope="tensor"), DellaConfig(density=0.5),
                   BreadcrumbsTiesConfig(density=0.5), BreadcrumbsConfig(density=0.5, aggregate="mean")):
        plain = hf_merge.merge(base, fts, config, progress=False)
        weighted = hf_merge.merge(base, fts, config.replace(weights=[1.0, 1.0, 1.0]), progress=False)
        for key in base:
            assert torch.equal(plain[key], weighted[key]), (config.method, key)


def test_global_ties_with_weights_is_the_whole_model_reference():
    generator = torch.Generator().manual_seed(2)
    base = {"a": torch.randn(20, 15, generator=generator), "b": torch.randn(45, generator=generator)}
    fts = [{k: v + torch.randn(v.shape, generator=generator) for k, v in base.items()} for _ in range(3)]
    weights, density = [0.5, 2.0, -1.0], 0.4
    merged = hf_merge.merge(base, fts, "ties", density=density, weights=weights, progress=False)
    flat = torch.stack([torch.cat([(ft[k] - base[k]).flatten() for k in base]) for ft in fts])
    n = flat.shape[1]
    kth = flat.abs().kthvalue(n - int(n * density), dim=1, keepdim=True).values  # the reference's threshold
    trimmed = flat * (flat.abs() >= kth) * torch.tensor(weights).view(-1, 1)
    signs = torch.sign(trimmed.sum(0))
    signs[signs == 0] = torch.sign(signs.sum())
    agree = (torch.sign(trimmed) == signs) & (trimmed != 0)
    divisor = (agree * torch.tensor(weights).view(-1, 1)).sum(0)
    expected = (trimmed * agree).sum(0) / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    offset = 0
    for key in base:
        size = base[key].numel()
        torch.testing.assert_close(merged[key], base[key] + expected[offset:offset + size].view_as(base[key]),
                                   rtol=1e-6, atol=1e-6)
        offset += size


def test_della_and_breadcrumbs_ties_take_weights_before_election():
    # density 1 (DELLA: no pruning, mergekit's density ≥ 1) and γ = 0 leave the task vectors whole
    close(merge(WEIGHTED, DellaConfig(density=1.0, weights=[2.0, 1.0], scaling=2.0)), [2 * v for v in WEIGHTED_MEAN])
    crumbs = BreadcrumbsTiesConfig(density=1.0, gamma=0.0, weights=[2.0, 1.0], aggregate="sum")
    close(merge(WEIGHTED, crumbs), WEIGHTED_SUM)


def test_without_sign_election_mean_divides_by_the_sum_of_all_weights():
    a, b = WEIGHTED["a"], WEIGHTED["b"]
    expected_mean = [(2 * x + y) / 3 for x, y in zip(a.tolist(), b.tolist())]
    close(merge(WEIGHTED, BreadcrumbsConfig(density=1.0, gamma=0.0, weights=[2.0, 1.0], aggregate="mean")),
          expected_mean)
    close(merge(WEIGHTED, BreadcrumbsConfig(density=1.0, gamma=0.0, weights=[2.0, 1.0])),  # the paper's sum
          [2 * x + y for x, y in zip(a.tolist(), b.tolist())])
    # Σ w = 0: mergekit divides by 1 instead
    close(merge(WEIGHTED, DellaLinearConfig(density=1.0, weights=[1.0, -1.0], aggregate="mean")),
          [x - y for x, y in zip(a.tolist(), b.tolist())])


def test_a_negative_weight_votes_with_the_flipped_task_vector():
    # mergekit multiplies before electing: −τ_b = (3, −1, −1, 1, −1) agrees with τ_a except at e2, where τ_a wins
    tasks = {"a": torch.tensor([2.0, -2.0, 3.0, 1.0, -1.0]), "b": torch.tensor([-3.0, 1.0, 1.0, -1.0, 1.0])}
    config = TiesConfig(density=1.0, scope="tensor", weights=[1.0, -1.0], aggregate="sum")
    close(merge(tasks, config), [5.0, -3.0, 3.0, 2.0, -2.0])


def test_dare_then_weighted_ties_without_dropping():
    then = TiesConfig(density=1.0, scope="tensor", weights=[2.0, 1.0], zero_sign="positive", aggregate="sum")
    close(merge(WEIGHTED, DareConfig(drop_rate=0.0, then=then, rescale_norm="l1")), WEIGHTED_SUM)


# ------------------------------------------------------------------------------------------ exactly-zero sums
# Σ τ = (0, 0, 3, −4, −3): the tensor's majority sign is −1 (one + against two −).
CANCELLING = {"a": torch.tensor([1.0, -1.0, 2.0, -3.0, -2.0]), "b": torch.tensor([-1.0, 1.0, 1.0, -1.0, -1.0])}
MAJORITY = [-1.0, -1.0, 1.5, -2.0, -1.5]  # e0: b's −1, e1: a's −1
POSITIVE = [1.0, 1.0, 1.5, -2.0, -1.5]  # e0: a's +1, e1: b's +1


@pytest.mark.parametrize("zero_sign, expected", [("majority", MAJORITY), ("positive", POSITIVE)])
def test_the_sign_of_an_exactly_zero_sum(zero_sign, expected):
    for config in (TiesConfig(density=1.0, scope="tensor", zero_sign=zero_sign),
                   TiesConfig(density=1.0, zero_sign=zero_sign),
                   DellaConfig(density=1.0, zero_sign=zero_sign),
                   BreadcrumbsTiesConfig(density=1.0, gamma=0.0, zero_sign=zero_sign)):
        close(merge(CANCELLING, config), expected)


def test_sce_zero_sign():
    tasks = [torch.tensor([1.0, -1.0, -2.0, -1.0]), torch.tensor([-1.0, 1.0, -1.0, -1.0])]
    # Σ τ = (0, 0, −3, −2): majority −1; w = (7, 4) / 11
    close(sce(tasks), [-1.0, -1.0, (7 * -2 + 4 * -1) / 11, -1.0])
    close(sce(tasks, zero_sign="positive"), [1.0, 1.0, (7 * -2 + 4 * -1) / 11, -1.0])


# ------------------------------------------------------------------------------------------ keep count
TEN = torch.tensor([0.5, -4.0, 3.0, -1.0, 2.0, 0.1, -6.0, 0.2, 1.5, -2.5])


def test_topk_keeps_exactly_floor_density_n_and_threshold_one_more():
    # topk: ⌊0.3 · 10⌋ = 3 largest |τ| (6, 4, 3); threshold: |τ| ≥ 7th smallest (2.5), 4 entries
    close(merge({"a": TEN}, TiesConfig(density=0.3, scope="tensor", trim="topk")),
          [0, -4.0, 3.0, 0, 0, 0, -6.0, 0, 0, 0])
    close(merge({"a": TEN}, TiesConfig(density=0.3, scope="tensor")), [0, -4.0, 3.0, 0, 0, 0, -6.0, 0, 0, -2.5])


def test_topk_breaks_equal_magnitudes_by_position_and_rounds_like_mergekit():
    def topk_mask(flat: torch.Tensor, density: float) -> torch.Tensor:
        return trim_mask(flat, trim_rule(flat, density, "topk"))

    assert topk_mask(torch.tensor([3.0, -3.0, 1.0, 3.0, 0.5]), 0.4).tolist() == [True, True, False, False, False]
    assert int(topk_mask(torch.randn(100), 0.29).sum()) == 28  # int(0.29 · 100) = int(28.999999999999996)
    assert int(topk_mask(torch.randn(10), 0.05).sum()) == 0  # mergekit refuses a keep count of 0
    assert bool(topk_mask(torch.randn(7), 1.0).all())


# ------------------------------------------------------------------------------------------ L1 rescale
def test_l1_rescale_by_hand():
    # TIES topk keeps (−4, 3, −6): ‖τ‖₁ = 20.8, kept 13 → × 1.6
    close(merge({"a": TEN}, TiesConfig(density=0.3, scope="tensor", trim="topk", rescale_norm="l1")),
          [0, -6.4, 4.8, 0, 0, 0, -9.6, 0, 0, 0])
    # Breadcrumbs γ = 0.2 drops 10, density 0.4 keeps (3, −4): ‖τ‖₁ = 20, kept 7 → × 20/7
    tau = torch.tensor([1.0, -2.0, 3.0, -4.0, 10.0])
    close(merge({"a": tau}, BreadcrumbsConfig(density=0.4, gamma=0.2, rescale_norm="l1")),
          [0, 0, 60 / 7, -80 / 7, 0])
    close(merge({"a": tau}, BreadcrumbsConfig(density=0.4, gamma=0.2)), [0, 0, 3.0, -4.0, 0])


@pytest.mark.parametrize("drop", ["dare", "della"])
def test_l1_rescale_of_random_masks_keeps_the_l1_norm(drop):
    tau = torch.randn(50, 40, generator=torch.Generator().manual_seed(4))
    if drop == "dare":
        dropped = dare_drop(tau, 0.7, seed=3, rescale_norm="l1")
        unscaled = dare_drop(tau, 0.7, seed=3, rescale=False)
    else:
        dropped = magprune(tau, 0.3, 0.1, seed=3, rescale_norm="l1")
        unscaled = magprune(tau, 0.3, 0.1, seed=3, rescale=False)
    keep = unscaled != 0
    assert torch.equal(unscaled, tau * keep)  # without rescale the survivors are τ itself
    factor = tau.abs().sum() / (tau * keep).abs().sum()
    torch.testing.assert_close(dropped, tau * keep * factor)
    torch.testing.assert_close(dropped.abs().sum(), tau.abs().sum())
    tiny = torch.full((5,), 1e-9)  # both L1 norms below 1e-7: mergekit leaves the masked vector unscaled
    if drop == "dare":
        assert torch.equal(dare_drop(tiny, 0.5, seed=1, rescale_norm="l1"), dare_drop(tiny, 0.5, seed=1, rescale=False))
    else:
        assert torch.equal(magprune(tiny, 0.5, 0.1, seed=1, rescale_norm="l1"),
                           magprune(tiny, 0.5, 0.1, seed=1, rescale=False))


def test_della_density_one_keeps_the_task_whole_next_to_pruned_tasks():
    tau = torch.randn(6, 8)
    assert torch.equal(magprune(tau, 1.0, 0.15, seed=0), tau)
    config = DellaLinearConfig(density={"a": 1.0, "b": 0.5}, epsilon={"a": 0.15, "b": 0.3})
    other = torch.randn(6, 8)
    merged = merge({"a": tau, "b": other}, config)
    from hf_merge.methods.dare import mask_seed

    torch.testing.assert_close(merged, tau + magprune(other, 0.5, 0.3, mask_seed(0, "b", "w")))


# ------------------------------------------------------------------------------------------ SCE epsilons
def test_sce_epsilon_falls_back_to_uniform_weights_for_small_updates():
    tasks = [1e-4 * torch.tensor([1.0, 2.0, -1.0, 0.0, 2.0]), 1e-4 * torch.tensor([3.0, -3.0, -2.0, 0.0, 1.0])]
    # Σ_t mean(τ²) = (10 + 23) / 5 · 1e-8 < 1e-6: w = (½, ½)
    assert sce_weights(tasks, 1e-6) == [0.5, 0.5]
    close(sce(tasks, epsilon=1e-6), [2e-4, -3e-4, -1.5e-4, 0.0, 1.5e-4])
    close(sce(tasks), [(10 * 1e-4 + 23 * 3e-4) / 33, -3e-4, (10 * -1e-4 + 23 * -2e-4) / 33, 0.0,
                       (10 * 2e-4 + 23 * 1e-4) / 33])


def test_sce_epsilon_floors_the_kept_weight_sum():
    tasks = [torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([5e-4, -5e-4, 5e-4, -5e-4])]
    w1, w2 = 2 / (2 + 1e-6), 1e-6 / (2 + 1e-6)  # w2 < 1e-6
    first = (w1 * 1.0 + w2 * 5e-4) / (w1 + w2)
    close(sce(tasks), [first, 1.0, 5e-4, -5e-4])  # a lone kept entry is itself
    close(sce(tasks, epsilon=1e-6), [first, 1.0, 5e-4 * w2 / 1e-6, -5e-4 * w2 / 1e-6])  # mergekit's clamp(min=1e-6)
    close(merge({"a": tasks[0], "b": tasks[1]}, SCEConfig(epsilon=1e-6)), [first, 1.0, 5e-4 * w2 / 1e-6,
                                                                             -5e-4 * w2 / 1e-6])


# ------------------------------------------------------------------------------------------ mergekit reference
def mergekit_gta(base: torch.Tensor, tvs: list[torch.Tensor], weights: list[float], densities: list[float], *,
                 sparsification: str | None, consensus: bool, normalize: bool, rescale: bool = False,
                 lam: float = 1.0, gamma: float = 0.01) -> torch.Tensor:
    """mergekit's GTATask.execute for one tensor with its deterministic sparsifiers (magnitude, magnitude_outliers)."""
    sparsified = []
    for tv, density in zip(tvs, densities):
        if sparsification is not None and density < 1:
            n = tv.numel()
            mask = torch.zeros(n)
            if sparsification == "magnitude":
                mask[torch.argsort(tv.abs().view(-1), descending=True, stable=True)[:int(density * n)]] = 1
            else:
                target, n_top = int(density * n), int(gamma * n)
                n_bot = n - target - n_top
                mask[torch.argsort(tv.abs().view(-1), stable=True)[n_bot:-n_top]] = 1
            masked = tv * mask.view_as(tv)
            if rescale:
                before, after = tv.abs().sum(), masked.abs().sum()
                if before >= 1e-7 and after >= 1e-7:
                    masked = masked * (before / after)
            tv = masked
        sparsified.append(tv)
    deltas = torch.stack(sparsified)
    w = torch.tensor(weights).view(-1, *([1] * base.dim()))
    weighted = deltas * w
    if consensus:
        majority = (weighted.sum(0) >= 0).float() * 2 - 1
        mask = (weighted.sign() == majority).float()
        mixed, divisor = (weighted * mask).sum(0), (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = weighted.sum(0), w.sum(0).expand_as(base).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return base + mixed * lam


def _recipe_inputs() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """θ₀ with integer entries and dyadic task vectors (exact subtraction), with exactly cancelling entries:
    w_a τ_a + w_b τ_b = 0 and τ_c = 0 on the first column for weights (1, 0.5, 2)."""
    generator = torch.Generator().manual_seed(5)
    base = torch.randint(-4, 5, (12, 10), generator=generator).float()
    tvs = [torch.round(torch.randn(12, 10, generator=generator) * 256) / 256 for _ in range(3)]
    tvs[1][:, 0] = -2 * tvs[0][:, 0]
    tvs[2][:, 0] = 0.0
    return base, dict(zip("abc", tvs))


WEIGHTS, DENSITIES = [1.0, 0.5, 2.0], [0.3, 0.6, 0.5]
PER_TASK_WEIGHTS, PER_TASK_DENSITIES = dict(zip("abc", WEIGHTS)), dict(zip("abc", DENSITIES))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("rescale", [False, True])
def test_mergekit_ties_recipe(normalize, rescale):
    base, tasks = _recipe_inputs()
    config = TiesConfig(scope="tensor", density=PER_TASK_DENSITIES, weights=PER_TASK_WEIGHTS, scaling=0.7,
                        trim="topk", zero_sign="positive", aggregate="mean" if normalize else "sum",
                        rescale_norm="l1" if rescale else None)
    expected = mergekit_gta(base, list(tasks.values()), WEIGHTS, DENSITIES, sparsification="magnitude",
                            consensus=True, normalize=normalize, rescale=rescale, lam=0.7)
    torch.testing.assert_close(merge(tasks, config, base), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("rescale", [False, True])
def test_mergekit_breadcrumbs_recipes(ties, normalize, rescale):
    base, tasks = _recipe_inputs()
    cls = BreadcrumbsTiesConfig if ties else BreadcrumbsConfig
    extra = {"zero_sign": "positive"} if ties else {}
    config = cls(density=PER_TASK_DENSITIES, gamma=0.1, weights=PER_TASK_WEIGHTS, scaling=1.3,
                 aggregate="mean" if normalize else "sum", rescale_norm="l1" if rescale else None, **extra)
    expected = mergekit_gta(base, list(tasks.values()), WEIGHTS, DENSITIES, sparsification="magnitude_outliers",
                            consensus=ties, normalize=normalize, rescale=rescale, lam=1.3, gamma=0.1)
    torch.testing.assert_close(merge(tasks, config, base), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
def test_mergekit_della_and_dare_recipes_at_density_one(normalize):
    base, tasks = _recipe_inputs()
    aggregate = "mean" if normalize else "sum"
    elected = mergekit_gta(base, list(tasks.values()), WEIGHTS, [1.0] * 3, sparsification=None, consensus=True,
                           normalize=normalize, lam=0.9)
    della = DellaConfig(density=1.0, weights=WEIGHTS, scaling=0.9, zero_sign="positive", aggregate=aggregate,
                        rescale_norm="l1")
    torch.testing.assert_close(merge(tasks, della, base), elected, rtol=1e-6, atol=1e-6)
    then = TiesConfig(scope="tensor", density=1.0, weights=WEIGHTS, scaling=0.9, zero_sign="positive",
                      aggregate=aggregate, trim="topk")
    dare = DareConfig(drop_rate=0.0, then=then, rescale_norm="l1")
    torch.testing.assert_close(merge(tasks, dare, base), elected, rtol=1e-6, atol=1e-6)
    linear = mergekit_gta(base, list(tasks.values()), WEIGHTS, [1.0] * 3, sparsification=None, consensus=False,
                          normalize=normalize, lam=0.9)
    della_linear = DellaLinearConfig(density=1.0, weights=WEIGHTS, scaling=0.9, aggregate=aggregate)
    torch.testing.assert_close(merge(tasks, della_linear, base), linear, rtol=1e-6, atol=1e-6)
    if not normalize:
        dare_linear = DareConfig(drop_rate=0.0, then=TaskArithmeticConfig(scaling=0.9, weights=WEIGHTS))
        torch.testing.assert_close(merge(tasks, dare_linear, base), linear, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ validation
def _then() -> TaskArithmeticConfig:
    return TaskArithmeticConfig(scaling=1.0)


@pytest.mark.parametrize(
    ("name", "kwargs", "field"),
    [
        ("ties", {"weights": [1.0, float("nan")]}, r"weights\[1\]"),
        ("ties", {"weights": {"a": "x"}}, r"weights\['a'\]"),
        ("ties", {"weights": []}, "weights"),
        ("ties", {"weights": True}, "weights"),
        ("ties", {"trim": "top_k", "scope": "tensor"}, "trim"),
        ("ties", {"trim": "topk"}, "trim"),  # per tensor only
        ("ties", {"zero_sign": "plus"}, "zero_sign"),
        ("ties", {"rescale_norm": "l2", "scope": "tensor"}, "rescale_norm"),
        ("ties", {"rescale_norm": "l1"}, "rescale_norm"),  # per tensor only
        ("dare", {"drop_rate": 0.5, "then": _then(), "rescale_norm": "L1"}, "rescale_norm"),
        ("dare", {"drop_rate": 0.5, "then": _then(), "rescale": False, "rescale_norm": "l1"}, "rescale_norm"),
        ("dare", {"drop_rate": 0.5, "then": _then(), "rescale": "yes"}, "rescale"),
        ("della", {"density": 0.5, "aggregate": "avg"}, "aggregate"),
        ("della", {"density": 0.5, "rescale": False, "rescale_norm": "l1"}, "rescale_norm"),
        ("della", {"density": 0.5, "rescale": 1}, "rescale"),
        ("della", {"density": 0.5, "epsilon": [0.1, -0.1]}, r"epsilon\[1\]"),
        ("della", {"density": {"a": 0.5, "b": 0.9}, "epsilon": {"a": 0.1, "b": 0.15}}, r"epsilon\['b'\]"),
        ("della", {"density": [0.5, 0.2], "epsilon": [0.1, 0.2]}, r"density\[1\]=0.2, epsilon\[1\]=0.2"),
        ("della", {"density": 0.5, "weights": [float("inf")]}, r"weights\[0\]"),
        ("della_linear", {"density": 0.5, "zero_sign": "positive"}, "zero_sign"),
        ("breadcrumbs", {"density": 0.5, "gamma": [0.1, 0.6]}, r"gamma\[1\]"),
        ("breadcrumbs", {"density": 0.5, "gamma": -0.1}, "gamma"),
        ("breadcrumbs", {"density": 1.0}, "gamma"),  # mergekit's density 1 keeps everything: give γ = 0
        ("breadcrumbs", {"density": 0.3, "weights": {"a": float("nan")}}, r"weights\['a'\]"),
        ("breadcrumbs_ties", {"density": 0.5, "zero_sign": "negative"}, "zero_sign"),
        ("breadcrumbs_ties", {"density": 0.5, "aggregate": "max"}, "aggregate"),
        ("sce", {"epsilon": -1e-6}, "epsilon"),
        ("sce", {"epsilon": float("nan")}, "epsilon"),
        ("sce", {"zero_sign": "pos"}, "zero_sign"),
    ],
)
def test_bad_values_are_refused_naming_the_field(name, kwargs, field):
    with pytest.raises((ValueError, TypeError), match=field):
        config_class(name)(**kwargs)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("ties", {"density": 1.0, "weights": {"x": 1.0, "b": 1.0}}, "weights"),
        ("ties", {"density": 1.0, "weights": [1.0, 2.0, 3.0]}, "weights"),
        ("della", {"density": [0.5, 0.9], "epsilon": {"a": 0.1, "b": 0.15}}, r"density\['b'\]=0.9, epsilon\['b'\]"),
        ("breadcrumbs", {"density": {"a": 0.5, "b": 0.95}, "gamma": [0.1, 0.1]}, r"gamma\['b'\]=0.1"),
    ],
)
def test_per_task_values_are_checked_against_the_tasks_at_merge_time(name, kwargs, message):
    config_class(name)(**kwargs)  # a list and a mapping pair only once the task names are known
    with pytest.raises(ValueError, match=message):
        merge(WEIGHTED, config_class(name)(**kwargs))


@pytest.mark.parametrize("config", [
    TiesConfig(scope="tensor", density={"a": 0.3}, weights={"a": 0.5}, trim="topk", zero_sign="positive",
               rescale_norm="l1", aggregate="sum"),
    DareConfig(drop_rate=0.5, then=TiesConfig(scope="tensor", density=1.0, weights=[1.0, 2.0]), rescale_norm="l1"),
    DellaConfig(density=[1.0, 0.4], epsilon=[0.15, 0.2], weights=[1.0, 2.0], zero_sign="positive", aggregate="sum",
                rescale_norm="l1"),
    DellaLinearConfig(density=0.5, rescale=False),
    BreadcrumbsTiesConfig(density=[0.5, 1.0], gamma=[0.01, 0.0], weights={"a": 1.0, "b": -1.0}, rescale_norm="l1"),
    SCEConfig(zero_sign="positive", epsilon=1e-6),
])
def test_the_new_options_round_trip(config):
    assert MergeConfig.from_dict(config.to_dict()) == config
