"""TSV-M, Iso-C, Iso-CTS, Consensus, TALL masks and LiNeS: the properties of the papers' equations."""

from __future__ import annotations

import pytest
import torch

import hf_merge
from hf_merge.methods.iso import iso_cts_sizes
from hf_merge.methods.lines import lines_scale
from tests import tiny_models
from tests.helpers import rel_error


def _state(seed: int, shapes: dict[str, tuple[int, ...]], scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=generator) * scale for k, s in shapes.items()}


SHAPES = {"layer.0.w": (24, 16), "layer.0.b": (24,), "layer.1.w": (16, 40), "head.text_projection": (16, 8)}


def _tasks(num_tasks: int, shapes=SHAPES) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    base = _state(100, shapes)
    tasks = {}
    for t in range(num_tasks):
        delta = _state(t, shapes, scale=0.1)
        tasks[f"t{t}"] = {k: base[k] + delta[k] for k in shapes}
    return base, tasks


def _deltas(base, tasks, key):
    return [task[key] - base[key] for task in tasks.values()]


def _polar64(x: torch.Tensor) -> torch.Tensor:
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def reference_tsv_m(deltas: list[torch.Tensor]) -> torch.Tensor:
    """The official algorithm with full float64 SVDs."""
    k = min(deltas[0].shape) // len(deltas)
    us, ss, vs = [], [], []
    for delta in deltas:
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vh[:k].T)
    return (_polar64(torch.cat(us, 1)) * torch.cat(ss)) @ _polar64(torch.cat(vs, 1)).T


def reference_iso_cts(deltas: list[torch.Tensor], fraction: float) -> torch.Tensor:
    total = torch.stack(deltas).double().sum(0)
    c, p = iso_cts_sizes(min(total.shape), len(deltas), fraction)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    us, ss, vs = [u[:, :c]], [s[:c]], [vh[:c].T]
    for delta in deltas:
        residual = delta.double() - u[:, :c] @ (u[:, :c].T @ delta.double())
        ut, st, vht = torch.linalg.svd(residual, full_matrices=False)
        us.append(ut[:, :p]), ss.append(st[:p]), vs.append(vht[:p].T)
    return torch.cat(ss).mean() * _polar64(torch.cat(us, 1)) @ _polar64(torch.cat(vs, 1)).T


# ----------------------------------------------------------------------------------------------------- TSV
def test_tsv_m_with_one_task_at_full_rank_is_task_arithmetic() -> None:
    base, tasks = _tasks(1)
    tsv = hf_merge.merge(base, tasks, hf_merge.TSVMergeConfig(rank_fraction=1.0), progress=False)
    ta = hf_merge.merge(base, tasks, "task_arithmetic", scaling=1.0, progress=False)
    for key in base:
        assert torch.allclose(tsv[key], ta[key], atol=1e-5), key


def test_tsv_m_of_tasks_with_orthogonal_subspaces_is_the_sum_of_their_tsv_c() -> None:
    m, n, num_tasks, k = 24, 12, 3, 4  # r = 12: each task lives in its own rank-4 block of both spaces
    left, _ = torch.linalg.qr(torch.randn(m, m))
    right, _ = torch.linalg.qr(torch.randn(n, n))
    base = {"w": torch.zeros(m, n)}
    tasks = {}
    for t in range(num_tasks):
        block = slice(t * k, (t + 1) * k)
        spectrum = torch.linspace(3.0, 1.0, k) * (t + 1)
        tasks[f"t{t}"] = {"w": (left[:, block] * spectrum) @ right[:, block].T}
    merged = hf_merge.merge(base, tasks, hf_merge.TSVMergeConfig(), progress=False)["w"]
    compressed_sum = hf_merge.merge(base, tasks, hf_merge.TSVCompressConfig(), progress=False)["w"]
    assert rel_error(merged, compressed_sum) < 1e-4


def test_tsv_m_matches_the_reference_algorithm_and_averages_other_tensors() -> None:
    base, tasks = _tasks(3)
    merged = hf_merge.merge(base, tasks, hf_merge.TSVMergeConfig(scaling=0.7), progress=False)
    for key in ("layer.0.w", "layer.1.w"):
        expected = base[key].double() + 0.7 * reference_tsv_m(_deltas(base, tasks, key))
        assert rel_error(merged[key], expected) < 1e-4, key
    for key in ("layer.0.b", "head.text_projection"):  # 1-D, and the 2-D name excluded by default
        expected = base[key] + 0.7 * torch.stack(_deltas(base, tasks, key)).mean(0)
        assert torch.allclose(merged[key], expected, atol=1e-6), key


def test_tsv_m_is_invariant_to_flipping_a_singular_pair() -> None:
    base, tasks = _tasks(2, {"w": (20, 10)})
    delta = tasks["t0"]["w"] - base["w"]
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    u[:, 0], vh[0] = -u[:, 0], -vh[0]
    flipped = {**tasks, "t0": {"w": base["w"] + ((u * s) @ vh).float()}}
    a = hf_merge.merge(base, tasks, "tsv_m", progress=False)["w"]
    b = hf_merge.merge(base, flipped, "tsv_m", progress=False)["w"]
    assert rel_error(a - base["w"], b - base["w"]) < 1e-4


# ----------------------------------------------------------------------------------------------------- Iso
def test_iso_c_output_has_a_flat_spectrum_at_the_mean_singular_value_of_the_sum() -> None:
    base, tasks = _tasks(3)
    merged = hf_merge.merge(base, tasks, hf_merge.IsoCConfig(), progress=False)
    for key in ("layer.0.w", "layer.1.w"):
        total = torch.stack(_deltas(base, tasks, key)).sum(0).double()
        spectrum = torch.linalg.svdvals(merged[key].double() - base[key].double())
        expected = torch.linalg.svdvals(total).mean()
        assert torch.allclose(spectrum, expected.expand_as(spectrum), rtol=1e-4), key
        u, _, vh = torch.linalg.svd(total, full_matrices=False)
        assert rel_error(merged[key] - base[key], expected * u @ vh) < 1e-4  # same singular vectors as Σ_t Δ_t
    expected_bias = base["layer.0.b"] + torch.stack(_deltas(base, tasks, "layer.0.b")).mean(0)
    assert torch.allclose(merged["layer.0.b"], expected_bias, atol=1e-6)


@pytest.mark.parametrize(
    "rank, num_tasks, fraction, expected",
    [(768, 8, 0.8, (616, 19)), (10, 4, 0.8, (10, 0)), (30, 4, 0.8, (22, 2)), (1024, 8, 0.8, (816, 26))],
)
def test_iso_cts_sizes_round_half_to_even(rank, num_tasks, fraction, expected) -> None:
    # (10, 4): (10 − 8)/4 = 0.5 rounds to 0; (30, 4): (30 − 24)/4 = 1.5 rounds to 2.
    assert iso_cts_sizes(rank, num_tasks, fraction) == expected


def test_iso_cts_matches_the_reference_algorithm_with_a_flat_spectrum() -> None:
    base, tasks = _tasks(3, {"w": (48, 40), "v": (30, 64)})
    merged = hf_merge.merge(base, tasks, hf_merge.IsoCTSConfig(common_space_fraction=0.5), progress=False)
    for key in ("w", "v"):
        expected = reference_iso_cts(_deltas(base, tasks, key), 0.5)
        assert rel_error(merged[key] - base[key], expected) < 1e-4, key
        spectrum = torch.linalg.svdvals(merged[key].double() - base[key].double())
        assert spectrum.max() / spectrum.min() < 1 + 1e-4


def test_iso_cts_without_task_subspaces_is_iso_c() -> None:
    base, tasks = _tasks(4, {"w": (10, 12)})  # r = 10, T = 4: c = 10, p = 0
    cts = hf_merge.merge(base, tasks, hf_merge.IsoCTSConfig(), progress=False)["w"]
    iso = hf_merge.merge(base, tasks, hf_merge.IsoCConfig(), progress=False)["w"]
    assert rel_error(cts - base["w"], iso - base["w"]) < 1e-5


# ----------------------------------------------------------------------------------------------------- TALL / Consensus
def test_consensus_with_k_zero_is_task_arithmetic_and_with_k_above_t_is_the_base() -> None:
    base, tasks = _tasks(3)
    ta = hf_merge.merge(base, tasks, "task_arithmetic", scaling=0.4, progress=False)
    all_kept = hf_merge.merge(base, tasks, hf_merge.ConsensusConfig(k=0, scaling=0.4), progress=False)
    none_kept = hf_merge.merge(base, tasks, hf_merge.ConsensusConfig(k=4, scaling=0.4), progress=False)
    for key in base:
        assert torch.allclose(all_kept[key], ta[key]) and torch.equal(none_kept[key], base[key]), key


def test_tall_mask_comparison_is_strict_and_consensus_counts_at_least_k() -> None:
    base = {"w": torch.zeros(4)}
    tasks = {"a": {"w": torch.tensor([1.0, 3.0, 3.0, 0.1])}, "b": {"w": torch.tensor([2.0, 3.0, 0.1, 0.1])}}
    # λ = 0.5, τ_MTL = [3, 6, 3.1, 0.2]. Entry 0: task a ties (|1| = 0.5·|3 − 1|), so only b keeps it.
    # Entry 1: both keep; entry 2: only a; entry 3: both.
    one = hf_merge.merge(base, tasks, hf_merge.ConsensusConfig(k=1, mask_threshold=0.5), progress=False)["w"]
    two = hf_merge.merge(base, tasks, hf_merge.ConsensusConfig(k=2, mask_threshold=0.5), progress=False)["w"]
    assert torch.allclose(one, torch.tensor([3.0, 6.0, 3.1, 0.2]))
    assert torch.allclose(two, torch.tensor([0.0, 6.0, 0.0, 0.2])) and two[0] == 0 and two[2] == 0


def test_tall_mask_model_is_base_plus_masked_multitask_vector_with_per_task_lambda() -> None:
    base, tasks = _tasks(3)
    thresholds = {"t0": 0.2, "t1": 0.5, "t2": 0.4}
    out = hf_merge.merge(base, tasks, hf_merge.TallMaskConfig(mask_threshold=thresholds, task="t1"), progress=False)
    for key in base:
        deltas = _deltas(base, tasks, key)
        mtl = torch.stack(deltas).sum(0)
        mask = deltas[1].abs() > 0.5 * (mtl - deltas[1]).abs()
        assert torch.allclose(out[key], base[key] + mtl * mask, atol=1e-6), key


def test_consensus_on_ties_uses_the_ties_dis_sum_multitask_vector() -> None:
    base, tasks = _tasks(3)
    dis_sum = hf_merge.merge(base, tasks, hf_merge.TiesConfig(density=0.2, aggregate="sum"), progress=False)
    kept = hf_merge.merge(base, tasks, hf_merge.ConsensusConfig(k=0, base="ties"), progress=False)
    for key in base:
        assert torch.allclose(kept[key], dis_sum[key], atol=1e-6), key


def test_tall_masks_merge_needs_a_task_and_thresholds_must_name_the_tasks() -> None:
    base, tasks = _tasks(2)
    with pytest.raises(ValueError, match="one model per task"):
        hf_merge.merge(base, tasks, hf_merge.TallMaskConfig(), progress=False)
    with pytest.raises(ValueError, match="mask_threshold"):
        hf_merge.merge(base, tasks, hf_merge.ConsensusConfig(mask_threshold={"t0": 0.3, "x": 0.3}), progress=False)


# ----------------------------------------------------------------------------------------------------- LiNeS
def _block_scales(model, alpha, beta, num_blocks=None):
    infos = hf_merge.classify_parameters(model)
    return {k: lines_scale(i.block, num_blocks or i.num_blocks, alpha, beta) for k, i in infos.items()}


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_lines_single_task_scales_block_l_by_exactly_lambda_l(name) -> None:
    base = tiny_models.FACTORIES[name]()
    finetuned = tiny_models.finetuned_copy(base, seed=1)
    edited = base.merge_with([finetuned], hf_merge.LinesConfig(alpha=0.3, beta=0.7), progress=False)
    scales = _block_scales(base, 0.3, 0.7)
    b, f, e = base.state_dict(), finetuned.state_dict(), edited.state_dict()
    assert {scales[k] for k in b if "layer" in k or ".h." in k} == {0.3, 1.0}  # first and last of 2 blocks
    for key in b:
        if b[key].is_floating_point():
            assert torch.allclose(e[key], b[key] + scales[key] * (f[key] - b[key]), atol=1e-6), key


def test_lines_multitask_alpha_is_one_over_t_for_task_arithmetic_and_num_blocks_overrides_l() -> None:
    base = tiny_models.tiny_bert()
    models = [tiny_models.finetuned_copy(base, seed=s) for s in range(3)]
    config = hf_merge.LinesConfig(beta=0.6, num_blocks=4, inner=hf_merge.TaskArithmeticConfig(scaling=0.9))
    merged = hf_merge.merge(base, models, config, progress=False).state_dict()
    scales = _block_scales(base, 1 / 3, 0.6, num_blocks=4)
    b = base.state_dict()
    for key in b:
        if b[key].is_floating_point():
            total = sum(m.state_dict()[key] - b[key] for m in models)
            assert torch.allclose(merged[key], b[key] + scales[key] * total, atol=1e-5), key


def test_lines_rejects_several_models_without_inner_and_blocks_beyond_num_blocks() -> None:
    base = tiny_models.tiny_bert()
    models = [tiny_models.finetuned_copy(base, seed=s) for s in range(2)]
    with pytest.raises(ValueError, match="Single-task"):
        hf_merge.merge(base, models, hf_merge.LinesConfig(alpha=1.0), progress=False)
    with pytest.raises(ValueError, match="outside a stack of 1 blocks"):
        hf_merge.merge(base, models[:1], hf_merge.LinesConfig(alpha=1.0, num_blocks=1), progress=False)


def test_lines_norm_rule_wraps_a_subspace_method() -> None:
    base, tasks = _tasks(3, {"layers.0.w": (16, 12), "layers.1.w": (16, 12), "head.w": (6, 12)})
    config = hf_merge.LinesConfig(beta=0.5, inner=hf_merge.TSVMergeConfig(scaling=3.0))
    merged = hf_merge.merge(base, tasks, config, progress=False)
    inner = hf_merge.merge(base, tasks, hf_merge.TSVMergeConfig(scaling=1.0), progress=False)
    sum_l1 = sum(torch.stack(_deltas(base, tasks, k)).sum(0).abs().sum() for k in base)
    merged_l1 = sum((inner[k] - base[k]).abs().sum() for k in base)
    alpha = (sum_l1 / merged_l1 / 3).item()
    for key, block in (("head.w", None), ("layers.0.w", 0), ("layers.1.w", 1)):
        scale = lines_scale(block, 2, alpha, 0.5)
        assert torch.allclose(merged[key], base[key] + scale * (inner[key] - base[key]), atol=1e-5), key


# ----------------------------------------------------------------------------------------------------- API
METHODS = {
    "tsv_m": hf_merge.TSVMergeConfig(),
    "tsv_c": hf_merge.TSVCompressConfig(task="task_1"),
    "iso_c": hf_merge.IsoCConfig(scaling=0.5),
    "iso_cts": hf_merge.IsoCTSConfig(),
    "consensus": hf_merge.ConsensusConfig(scaling=0.5),
    "tall_masks": hf_merge.TallMaskConfig(task="task_0"),
    "lines": hf_merge.LinesConfig(inner=hf_merge.IsoCConfig()),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_merges_real_models_through_merge_with(method) -> None:
    base = tiny_models.tiny_gpt2()
    models = [tiny_models.finetuned_copy(base, seed=s) for s in range(2)]
    merged = base.merge_with(models, METHODS[method], progress=False)
    assert type(merged) is type(base) and merged is not base
    assert merged.lm_head.weight.data_ptr() == merged.transformer.wte.weight.data_ptr()  # ties kept
    out = tiny_models.logits("gpt2", merged)
    assert torch.isfinite(out).all() and not torch.allclose(out, tiny_models.logits("gpt2", base))
    assert merged.merge_config == METHODS[method]


def test_bfloat16_inputs_give_bfloat16_outputs() -> None:
    base, tasks = _tasks(2)
    base16 = {k: v.bfloat16() for k, v in base.items()}
    tasks16 = {n: {k: v.bfloat16() for k, v in t.items()} for n, t in tasks.items()}
    for config in (hf_merge.TSVMergeConfig(), hf_merge.IsoCTSConfig()):
        merged = hf_merge.merge(base16, tasks16, config, progress=False)
        assert all(v.dtype == torch.bfloat16 for v in merged.values())


@pytest.mark.parametrize(
    "build",
    [
        lambda: hf_merge.TSVMergeConfig(scaling="1"),
        lambda: hf_merge.TSVMergeConfig(rank_fraction=0.0),
        lambda: hf_merge.TSVMergeConfig(rank_fraction=1.5),
        lambda: hf_merge.TSVMergeConfig(exclude="text_projection"),
        lambda: hf_merge.TSVCompressConfig(rank_fraction=-0.1),
        lambda: hf_merge.TSVCompressConfig(task=3),
        lambda: hf_merge.ConsensusConfig(k=-1),
        lambda: hf_merge.ConsensusConfig(k=1.5),
        lambda: hf_merge.ConsensusConfig(mask_threshold=-0.2),
        lambda: hf_merge.ConsensusConfig(mask_threshold={}),
        lambda: hf_merge.ConsensusConfig(base="dare"),
        lambda: hf_merge.TallMaskConfig(mask_threshold={"a": "x"}),
        lambda: hf_merge.IsoCConfig(scaling=None),
        lambda: hf_merge.IsoCTSConfig(common_space_fraction=0.0),
        lambda: hf_merge.IsoCTSConfig(common_space_fraction=1.2),
        lambda: hf_merge.LinesConfig(),
        lambda: hf_merge.LinesConfig(alpha=1.0, beta="a"),
        lambda: hf_merge.LinesConfig(alpha=1.0, num_blocks=0),
        lambda: hf_merge.LinesConfig(inner="task_arithmetic"),
        lambda: hf_merge.LinesConfig(inner=hf_merge.LinesConfig(alpha=1.0)),
    ],
)
def test_every_config_validates_its_values(build) -> None:
    with pytest.raises((TypeError, ValueError)):
        build()


def test_configs_round_trip_through_merge_config_json(tmp_path) -> None:
    config = hf_merge.LinesConfig(inner=hf_merge.ConsensusConfig(mask_threshold={"a": 0.3, "b": 0.5}, base="ties"))
    config.save_pretrained(tmp_path)
    assert hf_merge.MergeConfig.from_pretrained(tmp_path) == config


def test_lines_with_unit_scaling_around_global_ties_is_global_ties() -> None:
    base, tasks = _tasks(3)
    ties = hf_merge.TiesConfig(density=0.3)
    plain = hf_merge.merge(base, tasks, ties, progress=False)
    wrapped = hf_merge.merge(base, tasks, hf_merge.LinesConfig(alpha=1.0, beta=0.0, inner=ties), progress=False)
    for key in base:
        assert torch.equal(wrapped[key], plain[key]), key
