"""hf_merge.evaluation (metrics in plain torch, local evaluate modules) and hf_merge.search (coefficient search)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hf_merge
from hf_merge import evaluation
from hf_merge.search import SearchResult, default_grid, search
from tests.helpers import state_of
from tests.tiny_models import finetuned_copy, tiny_bert


# ------------------------------------------------------------------------------------------------ evaluation
def test_accuracy_counts_matches_for_lists_arrays_and_tensors():
    preds, refs = [0, 1, 1, 2], [0, 1, 0, 2]
    assert evaluation.accuracy(preds, refs) == 0.75
    assert evaluation.accuracy(np.array(preds), torch.tensor(refs)) == 0.75


def test_macro_f1_averages_per_class_f1():
    # class 0: P=1, R=1/2 -> 2/3; class 1: P=1/2, R=1 -> 2/3; class 2: 1.
    f1 = evaluation.f1_score([0, 1, 1, 2], [0, 1, 0, 2])
    assert f1 == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_micro_f1_equals_accuracy_and_weighted_uses_support():
    generator = torch.Generator().manual_seed(0)
    preds, refs = torch.randint(0, 4, (200,), generator=generator), torch.randint(0, 4, (200,), generator=generator)
    assert evaluation.f1_score(preds, refs, average="micro") == pytest.approx(evaluation.accuracy(preds, refs))
    assert evaluation.f1_score([0, 0, 0, 1], [0, 0, 0, 0], average="weighted") == pytest.approx(2 * 0.75 / 1.75)


def test_confusion_matrix_rows_are_true_classes():
    matrix = evaluation.confusion_matrix([0, 1, 1], [0, 0, 1], num_classes=3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]


@pytest.mark.parametrize(
    ("preds", "refs", "error"),
    [
        ([0, 1], [0], ValueError),  # length mismatch
        ([[0, 1]], [[0, 1]], ValueError),  # not 1-D
        ([0.5, 1.0], [0, 1], ValueError),  # probabilities instead of classes
        ([-1, 0], [0, 0], ValueError),  # negative class
        ([], [], ValueError),  # empty
    ],
)
def test_metrics_reject_malformed_labels(preds, refs, error):
    with pytest.raises(error):
        evaluation.accuracy(preds, refs)


def test_normalized_accuracy_and_retained_gain():
    assert evaluation.normalized_accuracy(0.45, 0.9) == pytest.approx(0.5)
    assert evaluation.retained_gain(merged=0.85, finetuned=0.9, base=0.8) == pytest.approx(0.5)
    assert evaluation.retained_gain(merged=0.7, finetuned=0.9, base=0.8) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="undefined"):
        evaluation.retained_gain(0.8, 0.8, 0.8)
    with pytest.raises(ValueError, match="positive"):
        evaluation.normalized_accuracy(0.5, 0.0)


def test_evaluate_classifier_matches_argmax_of_the_model():
    model = tiny_bert()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (12, 8), generator=generator)
    labels = torch.randint(0, 3, (12,), generator=generator)
    batches = [{"input_ids": ids[:6], "labels": labels[:6]}, {"input_ids": ids[6:], "labels": labels[6:]}]
    with torch.no_grad():
        expected = (model(input_ids=ids).logits.argmax(-1) == labels).float().mean().item()
    assert evaluation.evaluate_classifier(model, batches)["accuracy"] == pytest.approx(expected)
    with pytest.raises(KeyError, match="labels"):
        evaluation.evaluate_classifier(model, [{"input_ids": ids}])


def test_trainer_compute_metrics_takes_logits_and_labels():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    assert evaluation.compute_classification_metrics((logits, np.array([0, 1, 1])))["accuracy"] == pytest.approx(2 / 3)


def test_shipped_metric_modules_load_offline_with_evaluate():
    pytest.importorskip("evaluate", reason="the optional 'evaluate' package is not installed")
    assert {"merge_accuracy", "merge_f1"} <= set(evaluation.available_metrics())
    accuracy = evaluation.load_metric("merge_accuracy")
    assert accuracy.compute(predictions=[0, 1, 1], references=[0, 1, 0]) == {"accuracy": pytest.approx(2 / 3)}
    f1 = evaluation.load_metric("merge_f1")
    assert f1.compute(predictions=[0, 1, 1, 2], references=[0, 1, 0, 2])["f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    with pytest.raises(ValueError, match="available"):
        evaluation.metric_path("accuracy")


# ------------------------------------------------------------------------------------------------ search
@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    base = tiny_bert()
    return base, {f"task{i}": finetuned_copy(base, seed=i + 1) for i in range(3)}


def distance_to(target):
    """evaluate_fn: minus the squared distance to a target state dict (maximal exactly at the target)."""
    target = state_of(target)

    def score(candidate) -> float:
        state = state_of(candidate)
        return -sum(float((state[k].double() - target[k].double()).pow(2).sum())
                    for k in target if target[k].is_floating_point())

    return score


@pytest.mark.parametrize(
    ("config", "parameter"),
    [
        (hf_merge.TaskArithmeticConfig(scaling=1.0), "scaling"),
        (hf_merge.TiesConfig(density=0.3), "scaling"),
        (hf_merge.DareConfig(drop_rate=0.5, then=hf_merge.TaskArithmeticConfig(scaling=1.0)), "then.scaling"),
    ],
)
def test_linear_coefficients_need_one_merge_and_match_brute_force(models, config, parameter):
    base, experts = models
    grid = [0.2, 0.5, 0.9]
    result = search(base, experts, config, distance_to(base), grid={parameter: grid}, progress=False)
    assert result.merges == 1
    for value, score in result.scores:
        head, _, rest = parameter.partition(".")
        brute_config = config.replace(**{head: getattr(config, head).replace(scaling=value) if rest else value})
        brute = hf_merge.merge(base, experts, brute_config, progress=False)
        assert score == pytest.approx(distance_to(base)(brute), rel=1e-5, abs=1e-9)


def test_search_finds_the_grid_value_that_produced_the_target(models):
    base, experts = models
    target = hf_merge.merge(base, experts, hf_merge.TSVMergeConfig(scaling=0.7), progress=False)
    result = search(base, experts, hf_merge.TSVMergeConfig(), distance_to(target), progress=False)
    assert isinstance(result, SearchResult)
    assert result.parameter == "scaling" and result.best_value == pytest.approx(0.7)
    assert result.best_config.scaling == pytest.approx(0.7)
    assert [v for v, _ in result.scores] == list(hf_merge.TSVMergeConfig().search_space().values)
    assert result.best_score == max(score for _, score in result.scores) == pytest.approx(0.0, abs=1e-6)


def test_lines_beta_is_affine_two_merges_match_brute_force(models):
    base, experts = models
    config = hf_merge.LinesConfig(inner=hf_merge.TaskArithmeticConfig(scaling=1.0))
    target = hf_merge.merge(base, experts, config.replace(beta=0.4), progress=False)
    result = search(base, experts, config, distance_to(target), grid=[0.2, 0.4, 0.8], progress=False)
    assert result.merges == 2
    assert result.best_value == 0.4 and result.best_score == pytest.approx(0.0, abs=1e-6)


def test_nonlinear_coefficient_merges_once_per_value_and_state_dict_base_gives_state_dicts(models):
    base, experts = models
    base_state = dict(base.state_dict())
    seen = []

    def score(candidate) -> float:
        seen.append(type(candidate))
        return distance_to(base_state)(candidate)

    result = search(base_state, {k: dict(m.state_dict()) for k, m in experts.items()}, hf_merge.TiesConfig(),
                    score, grid={"density": [0.1, 0.5]}, progress=False)
    assert result.merges == 2 and set(seen) == {dict}
    assert result.best_config.density == result.best_value


def test_tall_mask_threshold_is_chosen_per_task(models):
    base, experts = models
    targets = {task: hf_merge.merge(base, experts, hf_merge.TallMaskConfig(task=task, mask_threshold=lam),
                                    progress=False)
               for task, lam in zip(experts, (0.2, 0.4, 0.6))}
    result = search(base, experts, hf_merge.TallMaskConfig(), {t: distance_to(m) for t, m in targets.items()},
                    grid=[0.2, 0.4, 0.6], progress=False)
    assert result.best_value == {"task0": 0.2, "task1": 0.4, "task2": 0.6}
    assert result.best_config.mask_threshold == result.best_value and result.best_config.task is None
    assert len(result.scores) == 9 and result.to_dict()["scores"][0][0] == ["task0", 0.2]
    with pytest.raises(TypeError, match="per task"):
        search(base, experts, hf_merge.TallMaskConfig(), distance_to(base), progress=False)


def test_search_reports_bad_grids_and_scores(models):
    base, experts = models
    ta = hf_merge.TaskArithmeticConfig(scaling=1.0)
    with pytest.raises(ValueError, match="no coefficient"):
        search(base, experts, hf_merge.AverageConfig(), distance_to(base), progress=False)
    with pytest.raises(ValueError, match="no coefficient 'lambda'"):
        search(base, experts, ta, distance_to(base), grid={"lambda": [0.1]}, progress=False)
    with pytest.raises(ValueError, match="empty"):
        search(base, experts, ta, distance_to(base), grid=[], progress=False)
    with pytest.raises(ValueError, match="finite number"):
        search(base, experts, ta, lambda model: float("nan"), grid=[0.5], progress=False)
    with pytest.raises(ValueError, match="density"):
        search(base, experts, hf_merge.TiesConfig(), distance_to(base), grid={"density": [1.5]}, progress=False)


def test_default_grids_are_the_papers():
    assert default_grid(hf_merge.TaskArithmeticConfig(scaling=1.0)) == ("scaling", tuple(round(i / 30, 10) for i in range(1, 31)))
    parameter, ties = default_grid(hf_merge.TiesConfig())
    assert parameter == "scaling" and ties[0] == 0.8 and ties[-1] == 2.5 and len(ties) == 18
    assert default_grid(hf_merge.IsoCTSConfig())[1][-1] == 3.0
    lines_ties = default_grid(hf_merge.LinesConfig(inner=hf_merge.TiesConfig()))
    assert lines_ties[1][0] == 0.1 and lines_ties[1][-1] == 1.5 and len(lines_ties[1]) == 15
    dare = default_grid(hf_merge.DareConfig(drop_rate=0.5, then=hf_merge.TiesConfig()))
    assert dare[0] == "then.scaling" and dare[1] == ties


def test_configs_declare_how_the_merge_depends_on_a_coefficient():
    assert hf_merge.TaskArithmeticConfig(scaling=1.0).search_space().kind == "linear"
    assert hf_merge.TiesConfig().coefficient_kind("scaling") == "linear"
    assert hf_merge.TiesConfig().coefficient_kind("density") == "rerun"
    lines = hf_merge.LinesConfig(alpha=0.5)
    assert lines.coefficient_kind("beta") == lines.coefficient_kind("alpha") == "affine"
    dare = hf_merge.DareConfig(drop_rate=0.5, then=hf_merge.TiesConfig())
    assert dare.coefficient_kind("then.scaling") == "linear"
    assert dare.coefficient_kind("then.density") == dare.coefficient_kind("drop_rate") == "rerun"
    assert hf_merge.TallMaskConfig().search_space().kind == "per_task"
    assert hf_merge.AverageConfig().search_space() is None
    with pytest.raises(ValueError, match="no coefficient"):
        default_grid(hf_merge.AverageConfig())


def test_bfloat16_base_candidates_keep_the_base_dtype_and_match_direct_merges(models):
    base, experts = models
    base_bf16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in base.state_dict().items()}
    experts_bf16 = {name: {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in m.state_dict().items()}
                    for name, m in experts.items()}
    candidates = {}

    def record(candidate) -> float:
        candidates[len(candidates)] = {k: v.clone() for k, v in candidate.items()}
        return 0.0

    search(base_bf16, experts_bf16, hf_merge.TaskArithmeticConfig(scaling=1.0), record, grid=[0.3], progress=False)
    direct = hf_merge.merge(base_bf16, experts_bf16, hf_merge.TaskArithmeticConfig(scaling=0.3), progress=False)
    for key, tensor in candidates[0].items():
        assert tensor.dtype == direct[key].dtype, key
        if tensor.is_floating_point():  # rounded to bf16 once, like the direct merge: within one bf16 ulp
            torch.testing.assert_close(tensor.float(), direct[key].float(), rtol=2**-7, atol=1e-6)
