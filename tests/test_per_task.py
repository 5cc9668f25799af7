"""Per-model parameters: methods that weigh or sparsify task vectors take one value per task, as a sequence in input
order or a ``{task_name: value}`` mapping (mergekit's per-model ``parameters``)."""

from __future__ import annotations

import pytest
import torch

import hf_merge


def _inputs(values=(1.0, 2.0, -3.0)) -> tuple[dict, dict]:
    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(20, 30, generator=generator)}
    tasks = {f"t{i}": {"w": base["w"] + value * torch.randn(20, 30, generator=generator)}
             for i, value in enumerate(values)}
    return base, tasks


def test_task_arithmetic_weights_per_task_in_order_or_by_name():
    base, tasks = _inputs()
    deltas = [tasks[name]["w"] - base["w"] for name in tasks]
    expected = base["w"] + 0.5 * (0.2 * deltas[0] + 1.0 * deltas[1] + 3.0 * deltas[2])
    by_order = hf_merge.merge(base, tasks, "task_arithmetic", scaling=0.5, weights=[0.2, 1.0, 3.0], progress=False)
    by_name = hf_merge.merge(base, tasks, "task_arithmetic", scaling=0.5, weights={"t2": 3.0, "t0": 0.2, "t1": 1.0},
                             progress=False)
    torch.testing.assert_close(by_order["w"], expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(by_order["w"], by_name["w"])


def test_equal_weights_are_plain_task_arithmetic():
    base, tasks = _inputs()
    plain = hf_merge.merge(base, tasks, "task_arithmetic", scaling=0.3, progress=False)
    weighted = hf_merge.merge(base, tasks, "task_arithmetic", scaling=0.3, weights=[1.0, 1.0, 1.0], progress=False)
    assert torch.equal(plain["w"], weighted["w"])


def test_dare_drop_rate_per_task():
    base, tasks = _inputs()
    merged = hf_merge.merge(base, tasks, "dare", drop_rate={"t0": 0.0, "t1": 0.9, "t2": 0.5},
                            then=hf_merge.TaskArithmeticConfig(scaling=1.0), progress=False)
    from hf_merge.methods.dare import dare_drop, mask_seed

    expected = base["w"].clone()
    for name, rate in (("t0", 0.0), ("t1", 0.9), ("t2", 0.5)):
        expected += dare_drop(tasks[name]["w"] - base["w"], rate, mask_seed(0, name, "w"))
    torch.testing.assert_close(merged["w"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["della", "della_linear", "breadcrumbs", "breadcrumbs_ties"])
def test_density_per_task_equals_merging_each_task_at_its_own_density(method):
    base, tasks = _inputs()
    densities = {"t0": 0.2, "t1": 0.5, "t2": 0.8}
    merged = hf_merge.merge(base, tasks, method, density=densities, progress=False)
    uniform = hf_merge.merge(base, tasks, method, density=0.5, progress=False)
    assert not torch.equal(merged["w"], uniform["w"])
    if method == "breadcrumbs":  # a sum: each task's masked vector on its own
        from hf_merge.methods.breadcrumbs import breadcrumbs_mask

        expected = base["w"] + sum(
            (tasks[n]["w"] - base["w"]) * breadcrumbs_mask(tasks[n]["w"] - base["w"], d, 0.01) for n, d in densities.items())
        torch.testing.assert_close(merged["w"], expected, rtol=1e-5, atol=1e-5)


def test_per_task_values_round_trip_through_merge_config_json(tmp_path):
    config = hf_merge.DellaConfig(density={"sst2": 0.3, "mnli": 0.6})
    config.save_pretrained(tmp_path)
    assert hf_merge.MergeConfig.from_pretrained(tmp_path) == config
    listed = hf_merge.TaskArithmeticConfig(scaling=1.0, weights=[0.5, 2.0])
    listed.save_pretrained(tmp_path / "ta")
    assert hf_merge.MergeConfig.from_pretrained(tmp_path / "ta") == listed


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("task_arithmetic", {"scaling": 1.0, "weights": [1.0, float("nan"), 1.0]}, r"weights\[1\] must be a finite"),
        ("task_arithmetic", {"scaling": 1.0, "weights": []}, "weights is an empty list"),
        ("dare", {"drop_rate": {"t0": 1.0}, "then": hf_merge.TaskArithmeticConfig(scaling=1.0)},
         r"drop_rate\['t0'\] must be in"),
        ("della", {"density": [0.5, 0.99]}, r"density\[1\]=0.99"),
        ("breadcrumbs", {"density": {"t0": 0.995}}, r"density\['t0'\]=0.995"),
    ],
)
def test_bad_per_task_values_are_refused_naming_the_entry(method, params, message):
    with pytest.raises((ValueError, TypeError), match=message):
        hf_merge.get_merger(method, **params)


@pytest.mark.parametrize(
    ("value", "message"),
    [([1.0, 2.0], r"weights has 2 values for 3 tasks"), ({"t0": 1.0, "x": 1.0, "t2": 1.0},
                                                         r"weights gives values for the tasks \['t0', 't2', 'x'\]")],
)
def test_per_task_values_must_match_the_tasks(value, message):
    base, tasks = _inputs()
    with pytest.raises(ValueError, match=message):
        hf_merge.merge(base, tasks, "task_arithmetic", scaling=1.0, weights=value, progress=False)


def _ties_per_task_reference(base, fts, densities, scaling=1.0):
    """The reference's whole-model TIES with task t trimmed to its own density."""
    from hf_merge.methods.ties import disjoint_merge

    keys = list(base)
    flat = torch.stack([torch.cat([(ft[k] - base[k]).flatten() for k in keys]) for ft in fts])
    d = flat.shape[1]
    kth = torch.stack([flat[t].abs().kthvalue(d - int(d * density)).values if density < 1 else torch.tensor(0.0)
                       for t, density in enumerate(densities)]).view(-1, 1)
    trimmed = flat * (flat.abs() >= kth)
    signs = torch.sign(trimmed.sum(0))
    signs[signs == 0] = torch.sign(signs.sum())
    merged = disjoint_merge(trimmed, signs) * scaling
    out, offset = {}, 0
    for k in keys:
        out[k] = base[k] + merged[offset:offset + base[k].numel()].view_as(base[k])
        offset += base[k].numel()
    return out


@pytest.mark.parametrize("densities", [[0.1, 0.5, 0.9], [0.3, 1.0, 0.6]])
def test_global_ties_density_per_task_is_the_exact_whole_model_trim(densities):
    generator = torch.Generator().manual_seed(3)
    base = {"a": torch.randn(30, 20, generator=generator), "b": torch.randn(50, generator=generator)}
    fts = [{k: v + torch.randn(v.shape, generator=generator) for k, v in base.items()} for _ in range(3)]
    merged = hf_merge.merge(base, fts, "ties", density=densities, progress=False)
    expected = _ties_per_task_reference(base, fts, densities)
    for key in base:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-6, atol=1e-6)


def test_ties_with_equal_per_task_densities_is_the_single_density_merge():
    base, tasks = _inputs()
    single = hf_merge.merge(base, tasks, "ties", density=0.3, progress=False)
    listed = hf_merge.merge(base, tasks, "ties", density=[0.3, 0.3, 0.3], progress=False)
    assert torch.equal(single["w"], listed["w"])
