"""WUDI-Merging: the properties of the paper's objective and of its Adam route, and the merge through the public API."""

from __future__ import annotations

import math
import re

import pytest
import torch

import hf_merge
from hf_merge.errors import MergeError
from hf_merge.methods import wudi
from hf_merge.methods.wudi import WUDIConfig, WUDIMerger, wudi_solve
from hf_merge.params import ParamInfo, ParamKind, classify_parameters
from tests.tiny_models import finetuned_copy, tiny_gpt2


def _deltas(shape: tuple[int, int], num_tasks: int, seed: int = 0, scale: float = 1.0,
            dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=dtype) * scale for _ in range(num_tasks)]


def literal_loss(merged: torch.Tensor, deltas: list[torch.Tensor]) -> torch.Tensor:
    """Σ_i ‖(τ_m − τ_i) τ_iᵀ‖²_F / ‖τ_i‖²_F, as the paper's code writes it."""
    tvs = torch.stack(deltas)
    norms = tvs.flatten(1).norm(dim=1).square()
    return (((merged.unsqueeze(0) - tvs) @ tvs.transpose(1, 2)).square() / norms[:, None, None]).sum()


def literal_adam(deltas: list[torch.Tensor], steps: int, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The official algorithm: torch.optim.Adam from Σ τ on the literal loss with autograd; the losses of every
    iterate 0 … steps."""
    merged = torch.nn.Parameter(torch.stack(deltas).sum(0))
    optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0)
    losses = []
    for _ in range(steps):
        loss = literal_loss(merged, deltas)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        losses.append(literal_loss(merged, deltas).item())
    return merged.detach(), torch.tensor(losses, dtype=torch.float64)


def normal_equations(deltas: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """M = Σ_i τ_iᵀ τ_i / ‖τ_i‖² and B = Σ_i τ_i τ_iᵀ τ_i / ‖τ_i‖² (∇L = 2 (τ_m M − B))."""
    m = sum(d.T @ d / d.square().sum() for d in deltas)
    b = sum(d @ d.T @ d / d.square().sum() for d in deltas)
    return m, b


def _info(kind: ParamKind, ndim: int, transposed: bool = False, name: str = "layer.w") -> ParamInfo:
    return ParamInfo(name=name, kind=kind, ndim=ndim, transposed=transposed)


def _merge(deltas: list[torch.Tensor], info: ParamInfo, **fields) -> torch.Tensor:
    merger = WUDIMerger(WUDIConfig(**fields))
    return merger.merge_tensor(info.name, torch.zeros_like(deltas[0]), deltas, info)


# ------------------------------------------------------------------------------------------------ the objective
def test_one_task_returns_its_task_vector() -> None:
    """L(τ_1) = 0: Adam started at Σ τ = τ_1 has a zero gradient and never moves."""
    (delta,) = _deltas((12, 8), 1, dtype=torch.float32)
    merged, losses = wudi_solve([delta], steps=300, lr=1e-5)
    assert torch.equal(merged, delta)
    assert torch.equal(losses, torch.zeros(301, dtype=torch.float64))
    assert torch.equal(_merge([delta], _info(ParamKind.LINEAR, 2)), delta)
    reference, _ = literal_adam([delta.double()], steps=20, lr=1e-5)
    assert torch.equal(reference.float(), delta)


def test_the_loss_decreases_over_the_iterations() -> None:
    deltas = _deltas((16, 12), 3, scale=0.01)
    merged, losses = wudi_solve(deltas, steps=200, lr=1e-4)
    assert losses.shape == (201,)
    assert (losses.diff() <= 1e-12 * losses[0]).all()
    assert losses[-1] < 0.5 * losses[0]
    torch.testing.assert_close(losses[-1], literal_loss(merged, deltas), rtol=1e-10, atol=0)
    torch.testing.assert_close(losses[0], literal_loss(sum(deltas), deltas), rtol=1e-12, atol=0)


@pytest.mark.parametrize(("shape", "num_tasks", "steps", "lr"), [((7, 5), 3, 50, 1e-3), ((6, 10), 2, 80, 1e-2)])
def test_the_cheap_gradient_equals_autograd_adam_on_the_literal_loss(shape, num_tasks, steps, lr) -> None:
    """The precomputed-M route takes torch.optim.Adam's iterates on Σ_i ‖(τ_m − τ_i) τ_iᵀ‖² / ‖τ_i‖² (wide and
    tall matrices; float64 to see the agreement to rounding)."""
    deltas = _deltas(shape, num_tasks, seed=3)
    merged, losses = wudi_solve(deltas, steps=steps, lr=lr)
    reference, reference_losses = literal_adam(deltas, steps, lr)
    torch.testing.assert_close(merged, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(losses, reference_losses, rtol=1e-12, atol=1e-12)


def test_the_float32_route_matches_autograd_adam_to_float_tolerance(monkeypatch) -> None:
    """Large matrices are solved in float32 (here every matrix): the official settings on fine-tuning-sized task
    vectors give torch.optim.Adam's result to float32 accuracy."""
    monkeypatch.setattr(wudi, "DOUBLE_PRECISION_FLOPS", 0)
    deltas = _deltas((40, 24), 3, seed=4, scale=1e-3, dtype=torch.float32)
    assert wudi.work_dtype(deltas[0].shape, torch.float32) == torch.float32
    merged, losses = wudi_solve(deltas, steps=300, lr=1e-5)
    reference, reference_losses = literal_adam(deltas, 300, 1e-5)
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, reference, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(losses, reference_losses, rtol=1e-4, atol=0)


def test_the_closed_form_solves_the_normal_equations_and_beats_adam() -> None:
    deltas = _deltas((8, 6), 3, seed=5)
    m, b = normal_equations(deltas)
    exact, (first, last) = wudi_solve(deltas, solver="closed_form")
    torch.testing.assert_close(exact @ m, b, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(last, literal_loss(exact, deltas), rtol=1e-9, atol=0)
    official, official_losses = wudi_solve(deltas)  # 300 steps at lr 1e-5
    assert last <= official_losses[-1] < first
    long, long_losses = wudi_solve(deltas, steps=5000, lr=1e-3)
    assert long_losses[-1] >= last - 1e-9
    assert (long_losses[-1] - last) / (first - last) < 1e-3
    assert (long - exact).norm() < 0.1 * (official - exact).norm()


def test_the_closed_form_of_a_singular_system_is_the_minimiser_nearest_to_the_sum() -> None:
    """T · out < in: M has rank ≤ T · out, and every minimiser differs by rows in M's null space; the one returned lies
    in M's range (like Σ τ) and solves τ_m M = B."""
    deltas = _deltas((2, 9), 3, seed=6)  # rank(M) ≤ 6 < 9
    m, b = normal_equations(deltas)
    exact, (first, last) = wudi_solve(deltas, solver="closed_form")
    torch.testing.assert_close(exact @ m, b, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(exact, b @ torch.linalg.pinv(m, hermitian=True), rtol=1e-8, atol=1e-8)
    assert last < first


def test_zero_task_vectors_are_left_out() -> None:
    one, two = _deltas((10, 6), 2, seed=7)
    zero = torch.zeros_like(one)
    for solver in ("adam", "closed_form"):
        with_zeros, losses = wudi_solve([one, zero, two, zero], steps=50, lr=1e-3, solver=solver)
        without, expected = wudi_solve([one, two], steps=50, lr=1e-3, solver=solver)
        assert torch.isfinite(with_zeros).all() and torch.isfinite(losses).all()
        assert torch.equal(with_zeros, without) and torch.equal(losses, expected)
        alone, _ = wudi_solve([zero, one, zero], steps=50, lr=1e-3, solver=solver)
        assert torch.equal(alone, one)
        nothing, losses = wudi_solve([zero, zero], steps=50, lr=1e-3, solver=solver)
        assert torch.equal(nothing, zero) and not losses.any()


def test_non_finite_intermediate_results_raise_naming_the_tensor(monkeypatch) -> None:
    huge = torch.full((4, 3), 3e38)
    huge[0, 0] = 1e38  # finite inputs whose sum overflows float32
    with pytest.raises(MergeError, match="not finite"):  # solved in float64: the result overflows float32
        wudi_solve([huge, huge], steps=3)
    monkeypatch.setattr(wudi, "DOUBLE_PRECISION_FLOPS", 0)  # solved in float32: Σ τ overflows
    with pytest.raises(MergeError, match="not finite"):
        wudi_solve([huge, huge], steps=3)
    with pytest.raises(MergeError, match=re.escape("tensor 'h.0.mlp.weight'")):
        _merge([huge, huge], _info(ParamKind.LINEAR, 2, name="h.0.mlp.weight"), steps=3)


# ------------------------------------------------------------------------------------------------ the merger
@pytest.mark.parametrize(("kind", "shape"), [(ParamKind.NORM, (8,)), (ParamKind.VECTOR, (8,)),
                                             (ParamKind.EMBEDDING, (16, 8)), (ParamKind.LINEAR, (2, 6, 4)),
                                             (ParamKind.CONV, (4, 3, 3, 3))])
def test_parameters_other_than_linear_weights_are_averaged(kind, shape) -> None:
    deltas = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    merged = _merge(deltas, _info(kind, len(shape)))
    torch.testing.assert_close(merged, torch.stack(deltas).mean(0))


def test_linear_weights_are_optimised() -> None:
    deltas = _deltas((12, 8), 3, seed=8, dtype=torch.float32)
    merger = WUDIMerger(WUDIConfig(steps=40, lr=1e-3))
    merged = merger.merge_tensor("w", torch.zeros(12, 8), deltas, _info(ParamKind.LINEAR, 2))
    expected, losses = wudi_solve(deltas, steps=40, lr=1e-3)
    assert torch.equal(merged, expected)
    assert not torch.allclose(merged, sum(deltas))
    assert merger.statistics() == {"loss_ratio": pytest.approx((losses[-1] / losses[0]).item())}
    assert merger.statistics()["loss_ratio"] < 1


@pytest.mark.parametrize("solver", ["adam", "closed_form"])
def test_a_transposed_conv1d_weight_gives_the_transpose_of_the_untransposed_result(solver) -> None:
    """GPT-2's Conv1D stores (in, out); the objective is over (out, in), so the result is not the WUDI of the stored
    matrix but the transpose of the WUDI of its transpose."""
    deltas = _deltas((10, 6), 3, seed=9, dtype=torch.float32)  # (out, in)
    plain = _merge(deltas, _info(ParamKind.LINEAR, 2), steps=30, lr=1e-3, solver=solver)
    stored = [d.T.contiguous() for d in deltas]  # (in, out)
    transposed = _merge(stored, _info(ParamKind.LINEAR, 2, transposed=True), steps=30, lr=1e-3, solver=solver)
    assert transposed.shape == (6, 10) and transposed.is_contiguous()
    torch.testing.assert_close(transposed, plain.T, rtol=0, atol=0)
    as_stored = _merge(stored, _info(ParamKind.LINEAR, 2), steps=30, lr=1e-3, solver=solver)
    assert not torch.allclose(as_stored, plain.T, atol=1e-4)


# ------------------------------------------------------------------------------------------------ the config
def test_config_defaults_are_the_official_settings_and_round_trip() -> None:
    config = hf_merge.WUDIConfig()
    assert (config.steps, config.lr, config.solver) == (300, 1e-5, "adam")
    assert hf_merge.MergeConfig.from_dict(config.to_dict()) == config
    assert hf_merge.MergeConfig.from_dict({"method": "wudi", "solver": "closed_form"}) == WUDIConfig(
        solver="closed_form")
    assert config.search_space() is None  # no coefficient to tune


@pytest.mark.parametrize(("fields", "error", "field"), [
    ({"steps": -1}, ValueError, "steps"), ({"steps": 2.5}, TypeError, "steps"), ({"steps": True}, TypeError, "steps"),
    ({"lr": 0.0}, ValueError, "lr"), ({"lr": -1e-5}, ValueError, "lr"), ({"lr": math.nan}, ValueError, "lr"),
    ({"lr": math.inf}, ValueError, "lr"), ({"lr": "1e-5"}, TypeError, "lr"),
    ({"solver": "sgd"}, ValueError, "solver"), ({"solver": None}, ValueError, "solver"),
])
def test_bad_config_values_raise_naming_the_field(fields, error, field) -> None:
    with pytest.raises(error, match=rf"^{field} "):
        WUDIConfig(**fields)


def test_config_is_immutable() -> None:
    with pytest.raises(Exception, match="immutable"):
        WUDIConfig().steps = 3


def test_the_card_names_and_cites_the_paper() -> None:
    card = WUDIConfig.card
    assert card.title == "WUDI-Merging" and len(card.summary.split()) >= 30
    assert card.paper_url == "https://arxiv.org/abs/2503.08099"
    assert "Whoever Started the Interference Should End It" in card.bibtex and "year      = {2025}" in card.bibtex
    assert card.bibtex.count("{") == card.bibtex.count("}")


# ------------------------------------------------------------------------------------------------ end to end
def test_merge_through_the_public_api_matches_the_pure_function() -> None:
    """Tiny GPT-2: its Conv1D weights are transposed linear weights, its embeddings, norms and biases averaged."""
    base = tiny_gpt2()
    fts = [finetuned_copy(base, seed) for seed in (1, 2)]
    merged = hf_merge.merge(base, fts, "wudi", steps=5, progress=False)
    infos = classify_parameters(base)
    states = [m.state_dict() for m in (base, *fts)]
    out = merged.state_dict()
    treated = 0
    for key, _ in base.named_parameters():  # tied lm_head.weight is transformer.wte.weight
        theta0, *thetas = (state[key] for state in states)
        deltas = [theta - theta0 for theta in thetas]
        info = infos[key]
        if info.kind == ParamKind.LINEAR and info.ndim == 2:
            matrices = [d.T for d in deltas] if info.transposed else deltas
            update, _ = wudi_solve(matrices, steps=5, lr=1e-5)
            update = update.T if info.transposed else update
            treated += 1
        else:
            update = sum(deltas) / len(deltas)
        torch.testing.assert_close(out[key], theta0 + update, rtol=0, atol=1e-6, msg=key)
    assert treated == 8  # c_attn, c_proj, c_fc, mlp.c_proj of two blocks
    assert any(infos[key].transposed for key in infos)
