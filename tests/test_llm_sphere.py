"""SLERP, NuSLERP, Multi-SLERP and the Karcher mean: hand-computed cases and the properties of the formulas."""

from __future__ import annotations

import math

import pytest
import torch

import hf_merge
from hf_merge.methods.karcher import KarcherConfig, karcher_mean
from hf_merge.methods.multislerp import MultiSlerpConfig, multislerp
from hf_merge.methods.nuslerp import NuSlerpConfig, nuslerp
from hf_merge.methods.slerp import SlerpConfig, slerp
from hf_merge.registry import config_class
from tests.tiny_models import finetuned_copy, tiny_bert

SHAPES = {"layer.w": (6, 5), "layer.b": (6,), "head.w": (3, 6)}


def _state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=generator) * scale for k, s in SHAPES.items()}


def _models(n: int) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    base = _state(100)
    return base, [{k: base[k] + d for k, d in _state(i, 0.1).items()} for i in range(n)]


def ref_slerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """Shoemake's formula in float64, written out independently."""
    a, b = v0.double().flatten(), v1.double().flatten()
    cos = float(a @ b / (a.norm() * b.norm()))
    if abs(cos) > 0.9995:
        out = (1 - t) * a + t * b
    else:
        omega = math.acos(cos)
        out = math.sin((1 - t) * omega) / math.sin(omega) * a + math.sin(t * omega) / math.sin(omega) * b
    return out.reshape(v0.shape)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------- SLERP
def test_slerp_of_orthogonal_vectors_at_half_is_the_scaled_sum() -> None:
    e0, e1 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    close(slerp(e0, e1, 0.5), (e0 + e1) / math.sqrt(2), 1e-7)
    # unnormalized inputs: Ω = π/2 still, both coefficients sin(π/4) / sin(π/2) = 1/√2 on the raw vectors
    close(slerp(2 * e0, 3 * e1, 0.5), (2 * e0 + 3 * e1) / math.sqrt(2), 1e-7)
    # t = 1/3: coefficients sin(π/3) and sin(π/6)
    close(slerp(e0, e1, 1 / 3), math.sin(math.pi / 3) * e0 + math.sin(math.pi / 6) * e1, 1e-6)


def test_slerp_endpoints_give_the_base_and_the_other_model() -> None:
    base, (other,) = _models(1)
    at0 = hf_merge.merge(base, [other], "slerp", t=0.0, progress=False)
    at1 = hf_merge.merge(base, [other], "slerp", t=1.0, progress=False)
    for key in SHAPES:
        close(at0[key], base[key], 1e-6)
        close(at1[key], other[key], 1e-6)


def test_slerp_merges_the_weights_not_the_task_vectors() -> None:
    base, (other,) = _models(1)
    other = {**other, "head.w": -3 * base["head.w"] + 0.5 * other["head.w"]}  # a wide angle on one tensor
    merged = hf_merge.merge(base, [other], hf_merge.MergeConfig.from_dict({"method": "slerp", "t": 0.3}),
                            progress=False)
    for key in SHAPES:
        close(merged[key], ref_slerp(base[key], other[key], 0.3))


def test_nearly_colinear_and_zero_inputs_interpolate_linearly() -> None:
    v0 = torch.tensor([1.0, 2.0, -1.0, 0.5])
    near = 3 * (v0 + 0.01 * torch.tensor([2.0, -1.0, 0.0, 0.0]))  # cos ≈ 0.99996 > 0.9995
    for v1 in (near, -2 * v0, torch.zeros(4)):
        close(slerp(v0, v1, 0.25), 0.75 * v0 + 0.25 * v1, 1e-7)
    close(slerp(torch.zeros(4), v0, 0.25), 0.25 * v0, 1e-7)
    assert torch.equal(slerp(v0, -v0, 0.5), torch.zeros(4))  # antiparallel: |cos| counts


def test_slerp_keeps_the_norm_of_equal_norm_inputs() -> None:
    generator = torch.Generator().manual_seed(0)
    v0, v1 = torch.randn(2, 7, 9, generator=generator)
    v1 = v1 * v0.norm() / v1.norm()
    for t in (0.1, 0.37, 0.5, 0.9):
        out = slerp(v0, v1, t)
        assert out.shape == v0.shape
        assert abs(out.norm().item() / v0.norm().item() - 1) < 1e-5
        close(out, ref_slerp(v0, v1, t))


def test_slerp_refuses_anything_but_one_finetuned_model() -> None:
    base, models = _models(2)
    with pytest.raises(ValueError, match=r"slerp needs exactly 1 fine-tuned model.*got 2.*nuslerp"):
        hf_merge.merge(base, models, "slerp", t=0.5, progress=False)
    with pytest.raises(ValueError, match=r"t must be in \[0, 1\], got 1.5"):
        SlerpConfig(t=1.5)
    with pytest.raises(TypeError, match="missing.*'t'"):
        SlerpConfig()


# ------------------------------------------------------------------------------------------------- NuSLERP
def test_nuslerp_is_slerp_of_the_task_vectors_at_w2_over_the_sum() -> None:
    base, (a, b) = _models(2)
    merged = hf_merge.merge(base, [a, b], "nuslerp", weights=[1.0, 3.0], progress=False)
    named = hf_merge.merge(base, {"x": a, "y": b}, "nuslerp", weights={"y": 3.0, "x": 1.0}, progress=False)
    for key in SHAPES:
        expected = base[key] + ref_slerp(a[key] - base[key], b[key] - base[key], 0.75)
        close(merged[key], expected)
        close(named[key], merged[key], 1e-7)


def test_nuslerp_row_wise_and_column_wise_slerp_each_vector() -> None:
    generator = torch.Generator().manual_seed(1)
    v0, v1 = torch.randn(2, 4, 6, generator=generator)
    whole = nuslerp(v0, v1, 0.3)
    rows = nuslerp(v0, v1, 0.3, flatten=False)  # each W[i, :] (vectors along the last dim)
    along0 = nuslerp(v0, v1, 0.3, flatten=False, row_wise=True)  # mergekit's row_wise: vectors along dim 0
    close(whole, ref_slerp(v0, v1, 0.3))
    for i in range(4):
        close(rows[i], ref_slerp(v0[i], v1[i], 0.3))
    for j in range(6):
        close(along0[:, j], ref_slerp(v0[:, j], v1[:, j], 0.3))
    assert (whole - rows).abs().max() > 1e-3 and (rows - along0).abs().max() > 1e-3
    assert along0.is_contiguous()
    # a vector is one vector whichever way; equal rows in a row-wise merge keep their norms
    close(nuslerp(v0[0], v1[0], 0.3, flatten=False, row_wise=True), rows[0])
    same_norm = v1 * (v0.norm(dim=1, keepdim=True) / v1.norm(dim=1, keepdim=True))
    close(nuslerp(v0, same_norm, 0.6, flatten=False).norm(dim=1), v0.norm(dim=1))


def test_nuslerp_interpolates_linearly_only_for_colinear_or_zero_task_vectors() -> None:
    v0 = torch.tensor([1.0, 2.0, -1.0, 0.5])
    near = 3 * (v0 + 0.01 * torch.tensor([2.0, -1.0, 0.0, 0.0]))  # SLERP would lerp here; NuSLERP does not
    omega = math.acos(float(v0 @ near / (v0.norm() * near.norm())))
    expected = (math.sin(0.75 * omega) * v0 + math.sin(0.25 * omega) * near) / math.sin(omega)
    close(nuslerp(v0, near, 0.25), expected, 1e-6)
    close(nuslerp(v0, 2 * v0, 0.25), 1.25 * v0, 1e-7)
    close(nuslerp(v0, torch.zeros(4), 0.25), 0.75 * v0, 1e-7)


def test_nuslerp_refuses_bad_weights_and_model_counts() -> None:
    with pytest.raises(ValueError, match="weights must be non-negative, got -1"):
        NuSlerpConfig(weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="weights must hold 2 weights, got 3"):
        NuSlerpConfig(weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="weights must not all be zero"):
        NuSlerpConfig(weights=[0, 0])
    with pytest.raises(ValueError, match=r"weights\[1\] must be a finite number"):
        NuSlerpConfig(weights=[1.0, float("nan")])
    with pytest.raises(TypeError, match="flatten must be a bool"):
        NuSlerpConfig(weights=[1, 1], flatten="no")
    base, models = _models(3)
    with pytest.raises(ValueError, match="nuslerp needs exactly 2 fine-tuned model.*got 3"):
        hf_merge.merge(base, models, "nuslerp", weights=[1, 1], progress=False)
    with pytest.raises(ValueError, match=r"weights are given for tasks \['a', 'z'\]"):
        hf_merge.merge(base, {"a": models[0], "b": models[1]}, "nuslerp", weights={"a": 1, "z": 1}, progress=False)


# ------------------------------------------------------------------------------------------------- Multi-SLERP
def test_multislerp_of_two_equal_norm_vectors_with_equal_weights_is_the_slerp_midpoint() -> None:
    generator = torch.Generator().manual_seed(2)
    x0, x1 = torch.randn(2, 5, 8, generator=generator)
    x1 = x1 * x0.norm() / x1.norm()
    close(multislerp([x0, x1], [1.0, 1.0]), slerp(x0, x1, 0.5))
    close(multislerp([x0, x1], [0.2, 0.2]), slerp(x0, x1, 0.5))  # normalized weights: only the ratio counts


def test_multislerp_is_the_normalized_weighted_mean_direction_times_the_mean_norm() -> None:
    """mergekit projects onto the tangent space at m = normalize(Σ w_i u_i): the tangent sum vanishes, so the result
    is m · Σ w_i ‖x_i‖ (with raw weights when ``normalize_weights`` is off)."""
    generator = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 6, generator=generator) * s for s in (0.5, 1.0, 2.0)]
    for weights, normalize in (([1.0, 2.0, 3.0], True), ([0.5, 0.25, 1.0], False)):
        w = [x / sum(weights) for x in weights] if normalize else weights
        direction = sum(wi * x / x.norm() for wi, x in zip(w, xs))
        expected = direction / direction.norm() * sum(wi * x.norm() for wi, x in zip(w, xs))
        close(multislerp(xs, weights, normalize_weights=normalize), expected)


def test_multislerp_merges_task_vectors_and_handles_zero_ones() -> None:
    base, models = _models(3)
    models[1]["layer.b"] = base["layer.b"].clone()  # one task left this tensor alone
    for m in models:
        m["head.w"] = base["head.w"].clone()  # no task changed it
    merged = hf_merge.merge(base, models, "multislerp", weights=[1.0, 1.0, 2.0], progress=False)
    close(merged["head.w"], base["head.w"], 0)
    for key in ("layer.w", "layer.b"):
        deltas = [m[key] - base[key] for m in models]
        close(merged[key], base[key] + multislerp(deltas, [0.25, 0.25, 0.5]))
    # antipodal pair with equal weights: mergekit interpolates linearly
    x = torch.tensor([1.0, -2.0, 0.5])
    close(multislerp([x, -x], [1.0, 1.0]), torch.zeros(3), 1e-7)
    with pytest.raises(ValueError, match="weighted sum of the unit task vectors is zero"):
        multislerp([x, -x, x, -x], [1.0] * 4)


def test_multislerp_refuses_bad_values() -> None:
    for eps in (0, -1e-8):
        with pytest.raises(ValueError, match="eps must be positive"):
            MultiSlerpConfig(eps=eps)
    with pytest.raises(ValueError, match="weights must be non-negative, got -0.5"):
        MultiSlerpConfig(weights=[1.0, -0.5])
    with pytest.raises(TypeError, match="weights must be a sequence"):
        MultiSlerpConfig(weights="12")
    base, models = _models(2)
    with pytest.raises(ValueError, match="multislerp needs at least 2 fine-tuned model.*got 1"):
        hf_merge.merge(base, models[:1], "multislerp", progress=False)
    with pytest.raises(ValueError, match="3 weights given for 2 models"):
        hf_merge.merge(base, models, "multislerp", weights=[1, 1, 1], progress=False)


# ------------------------------------------------------------------------------------------------- Karcher mean
def _tangent_sum(u: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
    """(1/N) Σ_i log_u(x̂_i) = (1/N) Σ_i θ_i / sin θ_i · (x̂_i − cos θ_i · u), in float64."""
    u = u.double().flatten() / u.double().norm()
    total = torch.zeros_like(u)
    for x in xs:
        unit = x.double().flatten() / x.double().norm()
        cos = float(unit @ u)
        theta = math.acos(max(-1.0, min(1.0, cos)))
        total += theta / math.sin(theta) * (unit - cos * u) if theta > 0 else 0
    return total / len(xs)


def test_karcher_mean_of_two_unit_vectors_is_the_slerp_midpoint() -> None:
    generator = torch.Generator().manual_seed(4)
    a, b = (v / v.norm() for v in torch.randn(2, 12, generator=generator))
    close(karcher_mean([a, b], [0.5, 0.5]), slerp(a, b, 0.5), 1e-6)
    # unequal norms: the direction is still the midpoint, the length the mean norm
    close(karcher_mean([2 * a, 4 * b], [0.5, 0.5]), 3 * slerp(a, b, 0.5), 1e-6)


def test_karcher_mean_converges_to_a_fixed_point() -> None:
    xs = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.4, 2.0, 0.0]), torch.tensor([0.0, 0.0, 3.0]),
          torch.tensor([0.5, -0.5, 0.3])]
    alphas = [0.25] * 4
    start = sum(x / x.norm() for x in xs)
    assert _tangent_sum(start, xs).norm() > 0.04  # the first guess (normalized Euclidean mean) is not the answer
    assert _tangent_sum(karcher_mean(xs, alphas, max_iter=1), xs).norm() > 1e-3
    mean = karcher_mean(xs, alphas)
    assert _tangent_sum(mean, xs).norm() < 1e-5  # stopped once the step ‖T‖ fell below tol
    assert abs(mean.norm().item() - sum(x.norm().item() for x in xs) / 4) < 1e-6
    tight = karcher_mean(xs, alphas, max_iter=50, tol=1e-7)
    assert _tangent_sum(tight, xs).norm() < 1e-6
    close(tight, mean, 1e-5)


def test_karcher_merges_task_vectors_with_equal_weights() -> None:
    base, models = _models(3)
    models[0]["layer.b"] = base["layer.b"].clone()  # a zero task vector still counts in the mean norm
    merged = hf_merge.merge(base, models, "karcher", max_iter=20, progress=False)
    for key in SHAPES:
        deltas = [m[key] - base[key] for m in models]
        close(merged[key], base[key] + karcher_mean(deltas, [1 / 3] * 3, max_iter=20))
    deltas = [m["layer.b"] - base["layer.b"] for m in models]
    assert abs((merged["layer.b"] - base["layer.b"]).norm() - sum(d.norm() for d in deltas) / 3) < 1e-5
    assert _tangent_sum(merged["layer.b"] - base["layer.b"], deltas[1:]).norm() < 1e-5


def test_karcher_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="max_iter must be at least 1, got 0"):
        KarcherConfig(max_iter=0)
    with pytest.raises(TypeError, match="max_iter must be an int"):
        KarcherConfig(max_iter=2.5)
    with pytest.raises(ValueError, match="tol must be positive"):
        KarcherConfig(tol=0.0)
    base, models = _models(1)
    with pytest.raises(ValueError, match="karcher needs at least 2 fine-tuned model.*got 1"):
        hf_merge.merge(base, models, "karcher", progress=False)


# ------------------------------------------------------------------------------------------------- all four
CONFIGS = {
    "slerp": SlerpConfig(t=0.4),
    "nuslerp": NuSlerpConfig(weights=[2.0, 1.0], flatten=False, row_wise=True),
    "multislerp": MultiSlerpConfig(weights=[1.0, 2.0, 1.0]),
    "karcher": KarcherConfig(max_iter=5),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_method_merges_a_tiny_transformers_model(name: str) -> None:
    base = tiny_bert()
    count = {"slerp": 1, "nuslerp": 2}.get(name, 3)
    models = [finetuned_copy(base, seed) for seed in range(count)]
    config = CONFIGS[name]
    merged = hf_merge.merge(base, models, config, progress=False)
    assert type(merged) is type(base)
    merged_state, base_state = merged.state_dict(), base.state_dict()
    key = "bert.encoder.layer.0.attention.self.query.weight"
    deltas = [m.state_dict()[key] - base_state[key] for m in models]
    expected = {
        "slerp": lambda: slerp(base_state[key], base_state[key] + deltas[0], 0.4) - base_state[key],
        "nuslerp": lambda: nuslerp(deltas[0], deltas[1], 1 / 3, flatten=False, row_wise=True),
        "multislerp": lambda: multislerp(deltas, [1.0, 2.0, 1.0]),
        "karcher": lambda: karcher_mean(deltas, [1 / 3] * 3, max_iter=5),
    }[name]()
    close(merged_state[key], base_state[key] + expected)
    assert all(torch.isfinite(v).all() for v in merged_state.values() if v.is_floating_point())
    # the config round-trips, and the card says what the method does
    assert hf_merge.MergeConfig.from_dict(config.to_dict()) == config
    assert config_class(name) is type(config) and len(type(config).card.summary.split()) >= 30
    assert type(config).card.bibtex and type(config).card.paper_url
