"""mergekit recipes run unchanged: ``hf-merge merge RECIPE.yml OUT_DIR`` and :func:`hf_merge.mergekit.read_recipe`.

Each supported ``merge_method`` is checked for the MergeConfig it becomes; the merges whose arithmetic mergekit fixes
without randomness (linear, task_arithmetic, ties, slerp with a per-filter gradient, model_stock, breadcrumbs_ties,
sce, nuslerp) are also compared, tensor by tensor, with small hand-written references of mergekit's formulas, and so are
``slices`` recipes (layer stacks: passthrough with a scale filter, slerp per slice). The fault rows assert that each
refused recipe names the offending key, parameter or path, and that nothing was written.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hf_merge.cli import main
from hf_merge.config import MergeConfig
from hf_merge.mergekit import MERGEKIT_KEYS, METHODS, read_recipe
from hf_merge.registry import config_class
from hf_merge.schedules import Schedule
from tests.tiny_models import finetuned_copy

LAYERS = 4
MODELS = ("base", "m1", "m2", "m3")


def _tiny_llama() -> torch.nn.Module:
    """Four blocks (so a gradient has interior points), untied head (the head sits at the end of the model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                    tie_word_embeddings=False)
    ).eval()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """A base and three "fine-tuned" copies saved as checkpoint folders; the base has a tokenizer file."""
    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    base = _tiny_llama()
    base.save_pretrained(root / "base")
    (root / "base" / "tokenizer_config.json").write_text('{"model_max_length": 32}\n')
    for seed, name in enumerate(MODELS[1:], start=1):
        finetuned_copy(base, seed).save_pretrained(root / name)
    return {name: root / name for name in MODELS}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.fixture(scope="module")
def states(zoo) -> dict[str, dict[str, torch.Tensor]]:
    return {name: _weights(folder) for name, folder in zoo.items()}


@pytest.fixture
def refs(zoo, tmp_path) -> dict[str, str]:
    """Model references relative to the recipe's folder (``tmp_path``), as a recipe would write them."""
    return {name: os.path.relpath(folder, tmp_path) for name, folder in zoo.items()}


@pytest.fixture
def run(tmp_path, capsys):
    """Write ``recipe`` to ``tmp_path/recipe.yml`` and run ``hf-merge merge recipe.yml tmp_path/out``; return the exit
    code, the output folder and stderr."""

    def run(recipe: dict, *args: str, out: bool = True) -> tuple[int, Path, str]:
        path = tmp_path / "recipe.yml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        output = tmp_path / "out"
        code = main(["merge", str(path), *([str(output)] if out else []), "--quiet", *args])
        return code, output, capsys.readouterr().err

    return run


def _model(refs: dict[str, str], name: str, **parameters) -> dict:
    return {"model": refs[name], **({"parameters": parameters} if parameters else {})}


def _assert_close(out: Path, expected: dict[str, torch.Tensor], atol: float) -> None:
    merged = _weights(out)
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        assert merged[key].dtype == value.dtype, key
        assert torch.allclose(merged[key], value, atol=atol, rtol=0), (key, (merged[key] - value).abs().max())


def _loadable(out: Path) -> None:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------------------- mergekit's formulas
def _position(key: str) -> float:
    """mergekit's t of a block's tensor: block i of L at i / (L − 1). (Outside the blocks the embeddings take t = 0;
    the final norm and head take t = 0 in mergekit 0.1.5 and t = 1 in older versions and in hf_merge: the tests give
    them constant values.)"""
    return int(key.split(".layers.")[1].split(".")[0]) / (LAYERS - 1)


def _gradient(points: list[float], t: float) -> float:
    scaled = t * (len(points) - 1)
    low = int(scaled)
    high = min(len(points) - 1, low + 1)
    return (1 - (scaled - low)) * points[low] + (scaled - low) * points[high]


def _linear(states: list[dict], weights: list[float]) -> dict[str, torch.Tensor]:
    return {k: sum(w * s[k] for s, w in zip(states, weights)) / sum(weights) for k in states[0]}


def _task_arithmetic(base: dict, fts: list[dict], weights: list[float], lam: float) -> dict[str, torch.Tensor]:
    return {k: base[k] + lam * sum(w * (ft[k] - base[k]) for ft, w in zip(fts, weights)) for k in base}


def _ties(base: dict, fts: list[dict], weights: list[float], densities: list[float], lam: float) -> dict:
    """mergekit's GTA with magnitude sparsification and sum consensus, per tensor, normalize: true."""
    out = {}
    for key, b in base.items():
        trimmed = []
        for ft, density in zip(fts, densities):
            tau = (ft[key] - b).flatten()
            mask = torch.zeros_like(tau)
            mask[torch.argsort(tau.abs(), descending=True)[:int(density * tau.numel())]] = 1
            trimmed.append(tau * mask)
        w = torch.tensor(weights).unsqueeze(1)
        weighted = torch.stack(trimmed) * w
        majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
        agree = (weighted.sign() == majority).float()
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1
        out[key] = b + (lam * (weighted * agree).sum(0) / divisor).view_as(b)
    return out


def _slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    a, b = v0.double(), v1.double()
    dot = float((a / a.norm()).flatten() @ (b / b.norm()).flatten())
    if abs(dot) > 0.9995:
        res = (1 - t) * a + t * b
    else:
        theta = math.acos(dot)
        res = math.sin(theta * (1 - t)) / math.sin(theta) * a + math.sin(theta * t) / math.sin(theta) * b
    return res.float()


def _model_stock(base: dict, fts: list[dict]) -> dict[str, torch.Tensor]:
    out = {}
    n = len(fts)
    for key, b in base.items():
        offsets = [(ft[key] - b).flatten() for ft in fts]
        cosines = [(offsets[i] @ offsets[j]) / (offsets[i].norm() * offsets[j].norm()).clamp(min=1e-6)
                   for i in range(n) for j in range(i + 1, n)]
        cos = torch.stack(cosines).clamp(-1, 1).mean()
        t = n * cos / (1 + (n - 1) * cos)
        out[key] = t * sum(ft[key] for ft in fts) / n + (1 - t) * b
    return out


def _breadcrumbs(base: dict, fts: list[dict], weights: list[float], densities: list[float], gamma: float) -> dict:
    """mergekit's breadcrumbs_ties: magnitude_outliers masks (per tensor), sum consensus, normalize: false."""
    out = {}
    for key, b in base.items():
        masked = []
        for ft, density in zip(fts, densities):
            tau = (ft[key] - b).flatten()
            n = tau.numel()
            n_top = int(gamma * n)
            n_bottom = n - int(density * n) - n_top
            mask = torch.zeros_like(tau)
            mask[torch.sort(tau.abs()).indices[n_bottom:-n_top]] = 1
            masked.append(tau * mask)
        weighted = torch.stack(masked) * torch.tensor(weights).unsqueeze(1)
        majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
        out[key] = b + (weighted * (weighted.sign() == majority)).sum(0).view_as(b)
    return out


def _sce(base: dict, fts: list[dict], select_topk: float) -> dict[str, torch.Tensor]:
    out = {}
    for key, b in base.items():
        tvs = torch.stack([(ft[key] - b).flatten() for ft in fts])
        variance = tvs.var(dim=0, unbiased=False)
        keep = torch.zeros_like(variance)
        keep[torch.topk(variance.abs(), int(torch.count_nonzero(variance) * select_topk)).indices] = 1
        tvs = tvs * keep
        majority = torch.where(tvs.sum(0) >= 0, 1.0, -1.0)
        weights = (tvs ** 2).mean(dim=1)
        weights = (weights / weights.sum()).unsqueeze(1) * (tvs.sign() == majority)
        out[key] = b + ((tvs * weights).sum(0) / weights.sum(0).clamp(min=1e-6)).view_as(b)
    return out


def _nuslerp_row_wise(base: dict, fts: list[dict], weights: list[float]) -> dict[str, torch.Tensor]:
    """mergekit's nuslerp with a base, ``nuslerp_flatten: false``, ``nuslerp_row_wise: true`` (vectors along dim 0)."""
    t = weights[1] / sum(weights)
    out = {}
    for key, b in base.items():
        v0, v1 = fts[0][key] - b, fts[1][key] - b
        if v0.dim() > 1:
            v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
        u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
        u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
        theta = torch.acos((u0 * u1).sum(-1, keepdim=True).clamp(-1, 1))
        res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
        out[key] = b + (res.transpose(0, -1) if v0.dim() > 1 else res)
    return out


# ----------------------------------------------------------------------------------------- merges checked numerically
def test_linear_is_the_normalized_weighted_average_with_the_base_as_one_more_input(run, refs, states, zoo, tmp_path):
    recipe = {"merge_method": "linear", "base_model": refs["base"],
              "models": [_model(refs, "m1", weight=1.0), _model(refs, "m2", weight=3.0)],
              "parameters": {"weight": 0.5}, "dtype": "float32"}
    code, out, err = run(recipe)
    assert code == 0, err
    config = read_recipe(tmp_path / "recipe.yml").config
    # mergekit's linear gathers the base_model too; it takes the global weight (0.5) as it is not listed
    assert config == config_class("average")(weights={refs["m1"]: 1.0, refs["m2"]: 3.0, refs["base"]: 0.5})
    _assert_close(out, _linear([states["m1"], states["m2"], states["base"]], [1.0, 3.0, 0.5]), atol=1e-6)
    _loadable(out)
    assert (out / "tokenizer_config.json").is_file()  # the base's tokenizer files (tokenizer_source: base)


def test_a_per_model_weight_gradient_varies_over_the_layers(run, refs, states):
    gradient = [0.0, 2.0, 1.0]
    weight = [{"filter": "layers.", "value": gradient}, {"value": 0.5}]  # the blocks, then the rest
    recipe = {"merge_method": "linear", "models": [_model(refs, "m1", weight=weight), _model(refs, "m2", weight=1.0)]}
    code, out, err = run(recipe)
    assert code == 0, err
    expected = {}
    for key in states["m1"]:
        w1 = _gradient(gradient, _position(key)) if ".layers." in key else 0.5
        expected[key] = (w1 * states["m1"][key] + states["m2"][key]) / (w1 + 1.0)
    _assert_close(out, expected, atol=1e-6)


def test_linear_without_normalize_is_the_weighted_sum_when_the_weights_sum_to_one(run, refs, states):
    recipe = {"merge_method": "linear", "models": [_model(refs, "m1", weight=0.25), _model(refs, "m2", weight=0.75)],
              "parameters": {"normalize": False}, "out_dtype": "bfloat16"}
    code, out, err = run(recipe)
    assert code == 0, err
    expected = {k: v.to(torch.bfloat16) for k, v in _linear([states["m1"], states["m2"]], [0.25, 0.75]).items()}
    _assert_close(out, expected, atol=1e-2)  # out_dtype: the output is written in bfloat16


def test_task_arithmetic_scales_the_weighted_sum_of_task_vectors_by_lambda(run, refs, states, tmp_path):
    recipe = {"merge_method": "task_arithmetic", "base_model": refs["base"],
              "models": [_model(refs, "m1", weight=1.0), _model(refs, "m2", weight=-0.5)],
              "parameters": {"lambda": 0.7, "int8_mask": True}}
    code, out, err = run(recipe)
    assert code == 0, err
    assert read_recipe(tmp_path / "recipe.yml").config == config_class("task_arithmetic")(
        scaling=0.7, weights={refs["m1"]: 1.0, refs["m2"]: -0.5})
    _assert_close(out, _task_arithmetic(states["base"], [states["m1"], states["m2"]], [1.0, -0.5], 0.7), atol=1e-6)


def test_task_arithmetic_normalize_divides_by_the_sum_of_the_weights(refs, tmp_path):
    recipe = {"merge_method": "task_arithmetic", "base_model": refs["base"],
              "models": [_model(refs, "m1", weight=1.0), _model(refs, "m2", weight=3.0)],
              "parameters": {"lambda": 2.0, "normalize": True}}
    assert read_recipe(recipe, root=tmp_path).config == config_class("task_arithmetic")(
        scaling=0.5, weights={refs["m1"]: 1.0, refs["m2"]: 3.0})


def test_ties_with_weights_follows_mergekit_per_tensor(run, refs, states, tmp_path):
    recipe = {"merge_method": "ties", "base_model": refs["base"],
              "models": [_model(refs, "base"),  # the base listed among the models is θ₀, not a task
                         _model(refs, "m1", weight=1.0, density=0.5),
                         _model(refs, "m2", weight=0.5, density=0.7)],
              "parameters": {"lambda": 1.2, "int8_mask": True}, "dtype": "bfloat16", "out_dtype": "float32"}
    code, out, err = run(recipe)
    assert code == 0, err
    recipe_read = read_recipe(tmp_path / "recipe.yml")
    assert list(recipe_read.models) == [refs["m1"], refs["m2"]]
    assert recipe_read.options == {"dtype": "float32"}  # out_dtype wins; hf_merge computes in float32 anyway
    assert recipe_read.config == config_class("ties")(
        density={refs["m1"]: 0.5, refs["m2"]: 0.7}, weights={refs["m1"]: 1.0, refs["m2"]: 0.5}, scaling=1.2,
        scope="tensor", trim="topk", zero_sign="positive", aggregate="mean", rescale_norm=None)
    expected = _ties(states["base"], [states["m1"], states["m2"]], [1.0, 0.5], [0.5, 0.7], 1.2)
    _assert_close(out, expected, atol=1e-6)


def _karcher(tensors: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """mergekit's weighted Karcher mean on the sphere (uniform α), in float64, scaled by the mean norm."""
    flat = [t.double().flatten() for t in tensors]
    norms = [float(f.norm()) for f in flat]
    units = [f / n for f, n in zip(flat, norms)]
    alpha = 1.0 / len(flat)
    mean = sum(alpha * u for u in units)
    mean = mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in units:
            dot = float(torch.clamp(mean @ u, -1.0, 1.0))
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent += alpha * theta / math.sin(theta) * (u - dot * mean)
        step = float(tangent.norm())
        if step < tol:
            break
        mean = math.cos(step) * mean + math.sin(step) * tangent / step
        mean = mean / mean.norm()
    return (sum(alpha * n for n in norms) * mean).reshape(tensors[0].shape).to(tensors[0].dtype)


def test_karcher_averages_the_models_weights_with_the_base_model_as_one_more_input(run, refs, states):
    recipe = {"merge_method": "karcher", "base_model": refs["base"], "models": [_model(refs, "m1"),
                                                                                _model(refs, "m2")]}
    code, out, err = run(recipe)
    assert code == 0, err
    expected = {key: _karcher([states[name][key] for name in ("m1", "m2", "base")]) for key in states["base"]}
    _assert_close(out, expected, atol=2e-6)


def test_nuslerp_without_a_base_model_interpolates_the_two_models_weights(run, refs, states, tmp_path):
    from hf_merge.methods.nuslerp import NUSLERP_DOT_THRESHOLD
    from hf_merge.methods.slerp import slerp

    recipe = {"merge_method": "nuslerp", "models": [_model(refs, "m1", weight=1.0), _model(refs, "m2", weight=3.0)]}
    assert read_recipe(recipe, root=tmp_path).config.on == "weights"
    code, out, err = run(recipe)
    assert code == 0, err
    # mergekit: t = w2 / (w1 + w2) on the raw weights, linear only where they are colinear (sin Ω ≈ 0)
    expected = {key: slerp(states["m1"][key], states["m2"][key], 0.75, dot_threshold=NUSLERP_DOT_THRESHOLD)
                for key in states["base"]}
    _assert_close(out, expected, atol=2e-6)


def test_slerp_with_a_gradient_per_filter(run, refs, states, tmp_path):
    t = [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"filter": "mlp", "value": [1.0, 0.3, 0.0]},
         {"value": 0.4}]
    recipe = {"merge_method": "slerp", "base_model": refs["base"],
              "models": [_model(refs, "base"), _model(refs, "m1")], "parameters": {"t": t}}
    code, out, err = run(recipe)
    assert code == 0, err
    assert read_recipe(tmp_path / "recipe.yml").config == config_class("slerp")(t=Schedule(t))
    expected = {}
    for key, base in states["base"].items():
        points = next((r["value"] for r in t if r.get("filter") is None or r["filter"] in key))
        value = _gradient(points, _position(key)) if isinstance(points, list) else points
        expected[key] = _slerp(value, base, states["m1"][key])
    _assert_close(out, expected, atol=2e-6)


def test_model_stock(run, refs, states, tmp_path):
    recipe = {"merge_method": "model_stock", "base_model": refs["base"],
              "models": [_model(refs, "m1"), _model(refs, "m2"), _model(refs, "m3")]}
    code, out, err = run(recipe)
    assert code == 0, err
    assert read_recipe(tmp_path / "recipe.yml").config == config_class("model_stock")(filter_wise=False)
    _assert_close(out, _model_stock(states["base"], [states["m1"], states["m2"], states["m3"]]), atol=1e-5)


def test_breadcrumbs_ties_follows_mergekit(run, refs, states):
    recipe = {"merge_method": "breadcrumbs_ties", "base_model": refs["base"],
              "models": [_model(refs, "m1", weight=1.0, density=0.6), _model(refs, "m2", weight=0.5, density=0.8)],
              "parameters": {"gamma": 0.1}}  # ⌊γ n⌋ ≥ 1 for every tensor (mergekit drops the whole task vector at 0)
    code, out, err = run(recipe)
    assert code == 0, err
    _assert_close(out, _breadcrumbs(states["base"], [states["m1"], states["m2"]], [1.0, 0.5], [0.6, 0.8], 0.1),
                  atol=1e-6)


def test_sce_follows_mergekit(run, refs, states):
    recipe = {"merge_method": "sce", "base_model": refs["base"],
              "models": [_model(refs, "m1"), _model(refs, "m2"), _model(refs, "m3")],
              "parameters": {"select_topk": 0.5}}
    code, out, err = run(recipe)
    assert code == 0, err
    _assert_close(out, _sce(states["base"], [states["m1"], states["m2"], states["m3"]], 0.5), atol=1e-6)


def test_nuslerp_row_wise_follows_mergekit(run, refs, states):
    recipe = {"merge_method": "nuslerp", "base_model": refs["base"],
              "models": [_model(refs, "m1", weight=1.0), _model(refs, "m2", weight=3.0)],
              "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}}
    code, out, err = run(recipe)
    assert code == 0, err
    _assert_close(out, _nuslerp_row_wise(states["base"], [states["m1"], states["m2"]], [1.0, 3.0]), atol=1e-6)


# ----------------------------------------------------------------------------------------- every other method
def _other_methods(refs: dict[str, str]) -> dict[str, tuple[dict, MergeConfig]]:
    """``{merge_method: (recipe, the hf_merge config it must become)}``."""
    r1, r2 = refs["m1"], refs["m2"]
    two = [_model(refs, "m1", weight=1.0, density=0.6), _model(refs, "m2", weight=0.5, density=0.8)]
    base = {"base_model": refs["base"]}
    ties, ta, dare = config_class("ties"), config_class("task_arithmetic"), config_class("dare")
    weights = {r1: 1.0, r2: 0.5}
    return {
        "dare_ties": ({"merge_method": "dare_ties", **base, "models": two, "parameters": {"lambda": 0.9}},
                      dare(drop_rate={r1: 1 - 0.6, r2: 1 - 0.8}, rescale=True, rescale_norm="l1",
                           then=ties(scope="tensor", density=1.0, weights=weights, scaling=0.9, zero_sign="positive",
                                     aggregate="sum"))),
        "dare_linear": ({"merge_method": "dare_linear", **base, "models": two, "parameters": {"rescale": False}},
                        dare(drop_rate={r1: 1 - 0.6, r2: 1 - 0.8}, rescale=False, rescale_norm=None,
                             then=ta(weights=weights, scaling=1.0))),
        "breadcrumbs": ({"merge_method": "breadcrumbs", **base,
                         "models": [_model(refs, "m1", weight=1.0, density=0.6, gamma=0.05),
                                    _model(refs, "m2", weight=0.5, density=1.0)],
                         "parameters": {"normalize": True}},
                        config_class("breadcrumbs")(density={r1: 0.6, r2: 1.0}, gamma={r1: 0.05, r2: 0.0},
                                                    weights=weights, scaling=1.0, aggregate="mean",
                                                    rescale_norm=None)),
        "breadcrumbs_ties": ({"merge_method": "breadcrumbs_ties", **base, "models": two,
                              "parameters": {"gamma": 0.02, "rescale": True}},
                             config_class("breadcrumbs_ties")(density={r1: 0.6, r2: 0.8}, gamma={r1: 0.02, r2: 0.02},
                                                              weights=weights, scaling=1.0, aggregate="sum",
                                                              zero_sign="positive", rescale_norm="l1")),
        "della": ({"merge_method": "della", **base, "models": two, "parameters": {"epsilon": 0.1, "lambda": 1.1}},
                  config_class("della")(density={r1: 0.6, r2: 0.8}, epsilon={r1: 0.1, r2: 0.1}, weights=weights,
                                        scaling=1.1, aggregate="mean", zero_sign="positive", rescale=True,
                                        rescale_norm="l1")),
        "della_linear": ({"merge_method": "della_linear", **base, "models": two, "parameters": {"normalize": True}},
                         config_class("della_linear")(density={r1: 0.6, r2: 0.8}, epsilon={r1: 0.15, r2: 0.15},
                                                      weights=weights, scaling=1.0, aggregate="mean", rescale=True,
                                                      rescale_norm="l1")),
        "sce": ({"merge_method": "sce", **base, "models": [_model(refs, "m1"), _model(refs, "m2")],
                 "parameters": {"select_topk": 0.5, "int8_mask": True}},
                config_class("sce")(select_topk=0.5, zero_sign="positive", epsilon=1e-6)),
        "nuslerp": ({"merge_method": "nuslerp", **base,
                     "models": [_model(refs, "m1", weight=1.0), _model(refs, "m2", weight=3.0)],
                     "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
                    config_class("nuslerp")(weights={r1: 1.0, r2: 3.0}, flatten=False, row_wise=True)),
        "multislerp": ({"merge_method": "multislerp", **base,
                        "models": [_model(refs, "m1", weight=1.0), _model(refs, "m2", weight=2.0),
                                   _model(refs, "m3", weight=[0.5, 1.0])]},
                       config_class("multislerp")(weights={r1: 1.0, r2: 2.0, refs["m3"]: Schedule([0.5, 1.0])},
                                                  normalize_weights=True, eps=1e-8)),
    }


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
                                    "della_linear", "sce", "nuslerp", "multislerp"])
def test_every_other_method_becomes_its_hf_merge_config_and_runs(method, run, refs, tmp_path):
    recipe, expected = _other_methods(refs)[method]
    code, out, err = run(recipe)
    assert code == 0, err
    assert read_recipe(tmp_path / "recipe.yml").config == expected
    assert MergeConfig.from_dict(json.loads((out / "merge_config.json").read_text())) == expected
    _loadable(out)


def test_every_listed_method_is_covered():
    covered = {"linear", "task_arithmetic", "ties", "slerp", "model_stock", "karcher"} | set(_other_methods(
        {name: name for name in MODELS}))
    assert covered == set(METHODS)


# ----------------------------------------------------------------------------------------- parameter settings
def test_per_model_rules_fall_back_to_the_global_setting_then_to_the_default(refs, tmp_path):
    recipe = {"merge_method": "ties", "base_model": refs["base"],
              "models": [_model(refs, "m1", weight=1.0, density=[{"filter": "mlp", "value": 0.5}]),
                         _model(refs, "m2", weight=[0.2, 1.0])],
              "parameters": {"density": [{"filter": "self_attn", "value": [0.2, 0.4]}], "lambda": [{"value": 0.9}]}}
    config = read_recipe(recipe, root=tmp_path).config
    assert config.density == {
        refs["m1"]: Schedule([{"filter": "mlp", "value": 0.5}, {"filter": "self_attn", "value": [0.2, 0.4]},
                              {"value": 1.0}]),  # the model's rules, the global rules, mergekit's default 1.0
        refs["m2"]: Schedule([{"filter": "self_attn", "value": [0.2, 0.4]}, {"value": 1.0}]),
    }
    assert config.weights == {refs["m1"]: 1.0, refs["m2"]: Schedule([0.2, 1.0])}  # a gradient over the layers
    assert config.scaling == 0.9  # a catch-all rule with one value is a plain number
    recipe = {"merge_method": "multislerp", "base_model": refs["base"],
              "models": [_model(refs, "m1", weight=1.0), _model(refs, "m2", weight="2e0")],
              "parameters": {"eps": "1e-6"}}  # YAML reads 1e-6 (no dot) as a string; mergekit takes it as a number
    config = read_recipe(recipe, root=tmp_path).config
    assert (config.eps, config.weights) == (1e-6, {refs["m1"]: 1.0, refs["m2"]: 2.0})


def test_mergeconfig_from_mergekit_and_read_recipe_of_a_dict_agree(refs, tmp_path):
    recipe = {"merge_method": "task_arithmetic", "base_model": refs["base"],
              "models": [_model(refs, "m1", weight=1.0)], "parameters": {"lambda": 0.5}}
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    from_file = read_recipe(tmp_path / "recipe.yml", output="merged")
    assert MergeConfig.from_mergekit(tmp_path / "recipe.yml") == from_file.config
    assert read_recipe(recipe, root=tmp_path).config == from_file.config
    assert from_file.base == str((tmp_path / refs["base"]).resolve())
    assert from_file.models == {refs["m1"]: str((tmp_path / refs["m1"]).resolve())}
    assert from_file.output == str(Path("merged").resolve()) and from_file.merge_method == "task_arithmetic"
    assert set(MERGEKIT_KEYS) >= set(recipe)


# ----------------------------------------------------------------------------------------- slices (layer stacks)
def _layer(key: str) -> int:
    return int(key.split(".layers.")[1].split(".")[0])


def _renumbered(key: str, layer: int) -> str:
    head, tail = key.split(".layers.")
    return f"{head}.layers.{layer}.{tail.split('.', 1)[1]}"


def test_passthrough_slices_stack_layer_ranges_with_a_scale_filter(run, refs, states, tmp_path):
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": refs["base"], "layer_range": [0, 3]}]},
        {"sources": [{"model": refs["m1"], "layer_range": [1, 4],
                      "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]}}]}]}
    code, out, err = run(recipe)
    assert code == 0, err
    expected = {}
    for key, value in states["base"].items():  # layers 0-2 of the base, then 1-3 of m1; norm and head from m1
        if ".layers." not in key:
            expected[key] = value if "embed_tokens" in key else states["m1"][key]
        elif _layer(key) < 3:
            expected[key] = value
    for key, value in states["m1"].items():
        if ".layers." in key and _layer(key) >= 1:
            expected[_renumbered(key, _layer(key) + 2)] = value * 0.0 if "o_proj" in key else value
    _assert_close(out, expected, atol=0)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    assert isinstance(MergeConfig.from_pretrained(out), config_class("passthrough"))
    _loadable(out)


def test_slerp_slices_merge_each_slice_with_its_own_gradient(run, refs, states):
    """mergekit: a gradient spans each slice (t = k / (n − 1) for its k-th of n layers); the embeddings come from
    the first slice (t = 0), the final norm and head from the last (here a constant t)."""
    recipe = {"merge_method": "slerp", "base_model": refs["base"], "parameters": {"t": 0.25}, "slices": [
        {"sources": [{"model": refs["base"], "layer_range": [0, 2]}, {"model": refs["m1"], "layer_range": [0, 2]}],
         "parameters": {"t": [0.0, 1.0]}},
        {"sources": [{"model": refs["base"], "layer_range": [2, 4]}, {"model": refs["m1"], "layer_range": [2, 4]}]}]}
    code, out, err = run(recipe)
    assert code == 0, err
    expected = {}
    for key, base in states["base"].items():
        if ".layers." in key:
            t = float(_layer(key)) if _layer(key) < 2 else 0.25
        else:
            t = 0.0 if "embed_tokens" in key else 0.25
        expected[key] = _slerp(t, base, states["m1"][key])
    _assert_close(out, expected, atol=2e-6)


def test_passthrough_of_one_model_writes_it_in_another_dtype(run, refs, states):
    code, out, err = run({"merge_method": "passthrough", "models": [{"model": refs["m2"]}], "dtype": "bfloat16"})
    assert code == 0, err
    _assert_close(out, {k: v.to(torch.bfloat16) for k, v in states["m2"].items()}, atol=0)


# ----------------------------------------------------------------------------------------- faults
def _fault_rows():
    def models(refs):
        return [_model(refs, "m1", weight=1.0), _model(refs, "m2", weight=1.0)]

    def linear(refs, **extra):
        return {"merge_method": "linear", "models": models(refs), **extra}

    def with_base(method, refs, **extra):
        return {"merge_method": method, "base_model": refs["base"], "models": models(refs), **extra}

    def src(refs, name, start, end, **parameters):
        return {"model": refs[name], "layer_range": [start, end], **({"parameters": parameters} if parameters else {})}

    def passthrough(*slices):
        return {"merge_method": "passthrough", "slices": [{"sources": sources} for sources in slices]}

    def slerp_slices(refs, sources):
        return {"merge_method": "slerp", "base_model": refs["base"], "parameters": {"t": 0.5},
                "slices": [{"sources": sources}]}

    return {
        "unknown-key": (lambda r: linear(r, tokenizer_sorce="base"),
                        ["'tokenizer_sorce'", "did you mean 'tokenizer_source'"]),
        "output-key": (lambda r: linear(r, output="merged"), ["'output'", "OUT_DIR"]),
        "slices-passthrough-two-sources": (lambda r: passthrough([src(r, "m1", 0, 2), src(r, "m2", 0, 2)]),
                                           ["slices[0]", "one source per slice"]),
        "slices-and-models": (lambda r: {**passthrough([src(r, "m1", 0, 2)]), "models": models(r)},
                              ["models or slices, not both"]),
        "slices-empty-range": (lambda r: passthrough([src(r, "m1", 2, 2)]), ["slices[0].sources[0]", "[2, 2]"]),
        "slices-out-of-bounds": (lambda r: passthrough([src(r, "m1", 0, 2)], [src(r, "m2", 2, 9)]),
                                 ["slices[1].sources[0]", "out of bounds", f"{LAYERS} layers"]),
        "slices-different-lengths": (lambda r: slerp_slices(r, [src(r, "base", 0, 2), src(r, "m1", 0, 3)]),
                                     ["slices[0]", "different numbers of layers"]),
        "slices-base-not-a-source": (lambda r: slerp_slices(r, [src(r, "m1", 0, 2), src(r, "m2", 0, 2)]),
                                     ["slices[0]", "base_model", "none of the slice's sources"]),
        "slices-scale-in-slerp": (lambda r: slerp_slices(r, [src(r, "base", 0, 2), src(r, "m1", 0, 2, scale=0.5)]),
                                  ["slices[0].sources[1].parameters", "'scale'"]),
        "slices-residual-weight": (lambda r: {**passthrough([src(r, "m1", 0, 2)]), "slices": [
            {"sources": [src(r, "m1", 0, 2)], "residual_weight": 0.5}]}, ["residual_weight", "not supported yet"]),
        "modules": (lambda r: {"merge_method": "linear", "modules": {"text": {"models": models(r)}}},
                    ["'modules'", "not supported yet"]),
        "tokenizer-union-without-tokenizers": (lambda r: linear(r, tokenizer_source="union"),
                                               ["tokenizer_source 'union'", "has no tokenizer files"]),
        "tokenizer-model-without-tokenizer": (lambda r: linear(r, tokenizer_source=r["m1"]),
                                              ["tokenizer_source", "has no tokenizer"]),
        "tokenizer-base-without-tokenizer": (lambda r: linear(r, tokenizer={"source": "base"}),
                                             ["tokenizer_source 'base'", "no tokenizer"]),
        "chat-template-without-tokenizer": (lambda r: linear(r, chat_template="chatml"),
                                            ["chat_template", "no tokenizer files"]),
        "unknown-method": (lambda r: {**linear(r), "merge_method": "tie"}, ["'tie'", "did you mean 'ties'"]),
        "passthrough-two-models": (lambda r: {**linear(r), "merge_method": "passthrough"},
                                   ["'passthrough'", "give one, or slices"]),
        "missing-model": (lambda r: {**linear(r), "models": [_model(r, "m1", weight=1.0),
                                                             {"model": "nowhere", "parameters": {"weight": 1.0}}]},
                          ["'nowhere'", "not a local path"]),  # tried as a Hub repo id too (offline here)
        "hub-id-not-cached": (lambda r: with_base("task_arithmetic", r, base_model="meta-llama/Llama-3.2-1B"),
                              ["'meta-llama/Llama-3.2-1B'", "cache"]),
        "lora-reference": (lambda r: {**linear(r), "models": [_model(r, "m1", weight=1.0),
                                                              {"model": "org/model+org/lora", "parameters": {
                                                                  "weight": 1.0}}]},
                           ["models[1].model", "'model+lora'", "not supported yet"]),
        "unknown-parameter": (lambda r: with_base("ties", r, parameters={"densty": 0.5}),
                              ["parameters", "'densty'", "did you mean 'density'"]),
        "global-parameter-per-model": (
            lambda r: {"merge_method": "slerp", "base_model": r["base"], "models": [_model(r, "m1", t=0.5)]},
            ["models[0].parameters", "'t'", "global"]),
        "missing-weight": (lambda r: {"merge_method": "linear", "models": [{"model": r["m1"]}, {"model": r["m2"]}]},
                           ["models[0].parameters", "'weight'", "required"]),
        "rules-without-catch-all": (
            lambda r: {**linear(r), "models": [_model(r, "m1", weight=[{"filter": "mlp", "value": 1.0}]),
                                               _model(r, "m2", weight=1.0)]},
            ["models[0].parameters.weight", "no value for tensors"]),
        "linear-not-normalized": (lambda r: linear(r, parameters={"normalize": False}),
                                  ["normalize: false", "not supported yet"]),
        "nuslerp-base-listed": (lambda r: {**with_base("nuslerp", r), "models": [
            _model(r, "base", weight=1.0), *models(r)]}, ["base_model", "distinct"]),
        "slerp-two-models": (lambda r: {"merge_method": "slerp", "base_model": r["base"], "parameters": {"t": 0.5},
                                        "models": [{"model": r["m1"]}, {"model": r["m2"]}]}, ["'slerp'", "exactly 1"]),
        "duplicate-model": (lambda r: {**linear(r), "models": [*models(r), _model(r, "m1", weight=2.0)]},
                            ["models[2]", "listed twice"]),
        "bad-dtype": (lambda r: linear(r, dtype="float8"), ["dtype", "'float8'"]),
        "both-schemas": (lambda r: linear(r, method="ties"), ["'method'", "'merge_method'"]),
        "out-of-range": (lambda r: with_base("ties", r, parameters={"density": 1.5}),
                         ["'ties'", "density", "1.5"]),
    }


FAULTS = _fault_rows()


@pytest.mark.parametrize("row", sorted(FAULTS))
def test_a_refused_recipe_names_the_culprit_and_writes_nothing(row, run, refs, tmp_path):
    build, expected = FAULTS[row]
    code, out, err = run(build(refs))
    assert code == 2
    for text in expected:
        assert text in err, (text, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yml"]  # no output folder, no staging folder


def test_a_mergekit_recipe_needs_the_output_folder(run, refs, tmp_path):
    code, _, err = run({"merge_method": "linear", "models": [_model(refs, "m1", weight=1.0)]}, out=False)
    assert code == 2 and "OUT_DIR" in err and "recipe.yml" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yml"]
