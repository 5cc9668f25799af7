"""Schedules: a config value that varies over the model (mergekit's gradients and filters), resolved per tensor."""

from __future__ import annotations

import json

import pytest
import torch

import hf_merge
from hf_merge import Schedule, TaskArithmeticConfig, TiesConfig
from hf_merge.config import MergeConfig
from hf_merge.methods.breadcrumbs import BreadcrumbsConfig
from hf_merge.methods.slerp import SlerpConfig
from hf_merge.params import classify_parameters
from hf_merge.schedules import interpolate, position
from tests.helpers import ties_reference

LAYERS = 5


def _shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (16, 8)}
    for i in range(LAYERS):
        shapes[f"model.layers.{i}.self_attn.q_proj.weight"] = (8, 8)
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = (12, 8)
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (8,)
    shapes["model.norm.weight"] = (8,)
    shapes["lm_head.weight"] = (16, 8)
    return shapes


def _models(n: int) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=generator) for k, s in _shapes().items()}
    return base, [{k: v + 0.1 * torch.randn(v.shape, generator=generator) for k, v in base.items()} for _ in range(n)]


def _infos() -> dict[str, hf_merge.ParamInfo]:
    return classify_parameters({k: (s, torch.float32) for k, s in _shapes().items()})


# ----------------------------------------------------------------------------------------- the value of a schedule
def test_a_gradient_spreads_its_points_evenly_over_the_blocks_like_mergekit():
    infos = _infos()
    gradient = Schedule([0.0, 0.5, 1.0])
    values = [gradient.at(f"model.layers.{i}.mlp.up_proj.weight", position(infos[f"model.layers.{i}.mlp.up_proj.weight"]))
              for i in range(LAYERS)]
    assert values == [0.0, 0.25, 0.5, 0.75, 1.0]
    # mergekit: x = i / (L − 1), i0 = ⌊x (n − 1)⌋, linear between points i0 and i0 + 1
    assert interpolate([0.2, 0.9, 0.4, 0.1], 0.5) == pytest.approx(0.5 * 0.9 + 0.5 * 0.4)
    assert interpolate([3.0], 0.7) == 3.0


def test_tensors_outside_the_blocks_take_the_first_point_like_mergekit():
    infos = _infos()
    assert position(infos["model.embed_tokens.weight"]) == 0.0
    assert position(infos["model.norm.weight"]) == 0.0
    assert position(infos["lm_head.weight"]) == 0.0


def test_the_first_matching_filter_wins_and_the_default_takes_the_rest():
    schedule = Schedule({"self_attn": [0.0, 1.0], "mlp": 0.7}, default=0.5)
    assert schedule.at("model.layers.4.self_attn.q_proj.weight", 1.0) == 1.0
    assert schedule.at("model.layers.4.mlp.up_proj.weight", 1.0) == 0.7
    assert schedule.at("lm_head.weight", 1.0) == 0.5
    # mergekit's rule list, with "*" as the catch-all, is the same schedule
    assert Schedule([{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.7},
                     {"filter": "*", "value": 0.5}]) == schedule


@pytest.mark.parametrize("build, message", [
    (lambda: Schedule({"self_attn": 0.3}), "default"),
    (lambda: Schedule([{"value": 0.5}, {"filter": "mlp", "value": 0.7}]), "never apply"),
    (lambda: Schedule([0.1, float("nan")]), "finite"),
    (lambda: Schedule([]), "empty"),
    (lambda: Schedule([0.1, True]), "number"),
    (lambda: Schedule([{"filter": "mlp"}]), "'value'"),
    (lambda: Schedule([{"filter": "mlp", "value": 1, "weight": 2}]), "'value'"),
], ids=["no-catch-all", "unreachable-rule", "nan", "empty", "bool", "rule-without-value", "rule-unknown-key"])
def test_a_malformed_schedule_is_refused(build, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build()


# ----------------------------------------------------------------------------------------- configs holding schedules
@pytest.mark.parametrize("build, field", [
    (lambda: SlerpConfig(t=Schedule([0.0, 1.5])), "t"),
    (lambda: TiesConfig(density=Schedule([0.2, 0.0])), "density"),
    (lambda: TiesConfig(density={"a": Schedule([0.2, 1.2]), "b": 0.5}), "density"),
    (lambda: BreadcrumbsConfig(density=Schedule([0.5, 0.995]), gamma=0.01), "gamma"),
], ids=["t-above-1", "density-0", "per-task-density", "density-plus-gamma"])
def test_every_point_of_a_schedule_is_validated_like_a_plain_value(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_a_config_with_schedules_round_trips_through_merge_config_json(tmp_path):
    config = TaskArithmeticConfig(scaling=Schedule({"self_attn": [0.2, 1.0]}, default=0.6),
                                  weights={"math": Schedule([0.0, 1.0]), "code": 0.5})
    config.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "merge_config.json").read_text())
    assert stored["scaling"] == {"schedule": [{"filter": "self_attn", "value": [0.2, 1.0]}, {"value": 0.6}]}
    assert MergeConfig.from_pretrained(tmp_path) == config
    assert config.has_schedules() and not TaskArithmeticConfig(scaling=0.3).has_schedules()


def test_a_config_is_resolved_to_plain_values_per_tensor():
    infos = _infos()
    config = TaskArithmeticConfig(scaling=1.0, weights={"math": Schedule([0.0, 1.0]), "code": 0.5})
    resolved = config.resolved(infos["model.layers.1.mlp.up_proj.weight"])
    assert resolved.weights == {"math": 0.25, "code": 0.5} and not resolved.has_schedules()
    assert config.resolved(infos["model.embed_tokens.weight"]).weights == {"math": 0.0, "code": 0.5}


# ----------------------------------------------------------------------------------------- merges with schedules
def test_task_arithmetic_with_a_scaling_gradient_scales_each_block_by_its_own_value():
    base, (first, second) = _models(2)
    infos = _infos()
    schedule = Schedule({"self_attn": [0.0, 1.0]}, default=0.5)
    merged = hf_merge.merge(base, [first, second], TaskArithmeticConfig(scaling=schedule), progress=False)
    for key in base:
        scale = schedule.at(key, position(infos[key]))
        expected = base[key] + scale * ((first[key] - base[key]) + (second[key] - base[key]))
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6, msg=key)


def test_a_per_task_gradient_weighs_each_task_by_its_own_schedule():
    base, (first, second) = _models(2)
    infos = _infos()
    config = TaskArithmeticConfig(scaling=1.0, weights={"a": Schedule([1.0, 0.0]), "b": 0.25})
    merged = hf_merge.merge(base, {"a": first, "b": second}, config, progress=False)
    for key in base:
        weight = 1.0 - position(infos[key])
        expected = base[key] + weight * (first[key] - base[key]) + 0.25 * (second[key] - base[key])
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6, msg=key)


def test_slerp_with_per_filter_gradients_equals_slerp_of_each_tensor_at_its_own_t():
    from hf_merge.methods.slerp import slerp

    base, (other,) = _models(1)
    infos = _infos()
    schedule = Schedule([{"filter": "self_attn", "value": [0, 0.5, 1]}, {"filter": "mlp", "value": [1, 0.5, 0]},
                         {"value": 0.5}])
    merged = hf_merge.merge(base, [other], SlerpConfig(t=schedule), progress=False)
    for key in base:
        t = schedule.at(key, position(infos[key]))
        torch.testing.assert_close(merged[key], slerp(base[key], other[key], t), rtol=0, atol=1e-6, msg=key)


def test_ties_per_tensor_with_a_density_gradient_trims_each_tensor_at_its_own_density():
    base, fts = _models(3)
    infos = _infos()
    schedule = Schedule([0.2, 0.8])
    merged = hf_merge.merge(base, fts, TiesConfig(density=schedule, scope="tensor"), progress=False)
    for key in base:
        density = schedule.at(key, position(infos[key]))
        expected = ties_reference({key: base[key]}, [{key: ft[key]} for ft in fts], density, 1.0)[key]
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6, msg=key)


def test_global_ties_refuses_a_schedule_that_splits_its_whole_model_statistics():
    base, fts = _models(2)
    with pytest.raises(ValueError, match="scope='tensor'"):
        hf_merge.merge(base, fts, TiesConfig(density=Schedule([0.2, 0.8])), progress=False)


def test_a_scheduled_merge_records_its_schedule_in_the_output_folder_and_card(tmp_path):
    from tests.tiny_models import finetuned_copy, tiny_llama

    model = tiny_llama()
    base_dir, ft_dir = tmp_path / "base", tmp_path / "ft"
    model.save_pretrained(base_dir)
    finetuned_copy(model, 1).save_pretrained(ft_dir)
    config = SlerpConfig(t=Schedule({"self_attn": [0.0, 1.0]}, default=0.5))
    out = hf_merge.merge(str(base_dir), [str(ft_dir)], config, output_dir=tmp_path / "out", progress=False)
    assert MergeConfig.from_pretrained(out) == config
    assert "self_attn" in (tmp_path / "out" / "README.md").read_text()


def test_compress_and_whole_model_methods_refuse_schedules():
    base, fts = _models(2)
    with pytest.raises(ValueError, match="Schedule"):
        hf_merge.compress(base, fts, "tsv_c", rank_fraction=Schedule([0.1, 0.2]))
    with pytest.raises(ValueError, match="whole models"):
        hf_merge.get_merger("weight_matching", max_iter=Schedule([1, 2]))

