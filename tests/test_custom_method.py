"""A method defined outside hf-merge owns everything about itself: registered from one file, it gets its model-card
text, its validation grid (searched with one merge, being linear) and its fast routes without any change to hf-merge."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import pytest
import torch

import hf_merge
from hf_merge.config import MethodCard, SearchSpace
from hf_merge.hub import build_model_card
from hf_merge.lowrank import LowRank, stack_factors
from hf_merge.methods.base import Merger
from hf_merge.params import ParamInfo
from hf_merge.registry import MERGE_METHODS
from tests.tiny_models import finetuned_copy, tiny_bert

GRID = (0.25, 0.5, 0.75, 1.5)


@dataclasses.dataclass(kw_only=True)
class ScaledMeanConfig(hf_merge.MergeConfig):
    """θ₀ + s · (1/T) Σ_t τ_t."""

    method: str = dataclasses.field(default="my_scaled_mean", init=False)
    scaling: float = 1.0

    card: ClassVar[MethodCard] = MethodCard(
        title="Scaled mean (a third-party method)",
        summary="The mean of the task vectors, scaled by s and added to the pre-trained model: a test method.",
        bibtex="@misc{scaledmean2025,\n  title = {A Scaled Mean},\n  year  = {2025}\n}",
        paper_url="https://example.org/scaled-mean",
    )

    def search_space(self) -> SearchSpace:
        return SearchSpace("scaling", GRID, "linear")


class ScaledMeanMerger(Merger):
    uses_param_info = False
    config: ScaledMeanConfig

    def linear_coefficients(self, task_names: Sequence[str]) -> list[float]:
        return [self.config.scaling / len(task_names)] * len(task_names)

    def merge_lowrank(self, key: str, parts: list[LowRank], info: ParamInfo) -> LowRank:
        return stack_factors(parts, [self.config.scaling / len(parts)] * len(parts))

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        return torch.stack(deltas).mean(dim=0).mul_(self.config.scaling)


@pytest.fixture(autouse=True)
def registered():
    """The method registered for each test, and removed after it so that other tests see only the built-ins."""
    hf_merge.register_method(ScaledMeanConfig, ScaledMeanMerger)
    yield
    MERGE_METHODS.pop("my_scaled_mean", None)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    base = tiny_bert()
    return base, {f"task{i}": finetuned_copy(base, seed=i + 1) for i in range(3)}


def _floats(model_or_state) -> dict[str, torch.Tensor]:
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    return {k: v for k, v in state.items() if v.is_floating_point()}


def _by_hand(base, experts, scaling: float) -> dict[str, torch.Tensor]:
    """θ₀ + s · (1/T) Σ_t (θ_t − θ₀), in float64."""
    theta0 = {k: v.double() for k, v in _floats(base).items()}
    states = [_floats(m) for m in experts.values()]
    return {k: v + scaling * sum(s[k].double() - v for s in states) / len(states) for k, v in theta0.items()}


def test_the_card_cites_the_methods_own_text():
    config = ScaledMeanConfig(scaling=0.5)
    card = build_model_card(config, {"base": None, "models": {}}, license="mit")
    assert "my_scaled_mean" in card.data.tags
    assert ScaledMeanConfig.card.title in card.text
    assert ScaledMeanConfig.card.summary in card.text
    assert ScaledMeanConfig.card.bibtex in card.text


def test_the_config_round_trips_through_its_registered_name():
    config = hf_merge.MergeConfig.from_dict({"method": "my_scaled_mean", "scaling": 0.25})
    assert config == ScaledMeanConfig(scaling=0.25)
    assert isinstance(hf_merge.get_merger(config), ScaledMeanMerger)


def test_search_uses_its_grid_and_one_merge(models, monkeypatch):
    import hf_merge.api

    base, experts = models
    merges = []
    original_merge = hf_merge.api.merge
    monkeypatch.setattr(hf_merge.api, "merge", lambda *args, **kwargs: merges.append(args[2]) or
                        original_merge(*args, **kwargs))
    target = {k: v.float() for k, v in _by_hand(base, experts, 0.75).items()}

    def score(candidate) -> float:
        state = _floats(candidate)
        return -sum(float((state[k].double() - target[k].double()).pow(2).sum()) for k in target)

    result = hf_merge.search(base, experts, ScaledMeanConfig(), score, progress=False)
    assert result.parameter == "scaling" and [value for value, _ in result.scores] == list(GRID)
    assert result.merges == 1 and len(merges) == 1  # linear: one merge at scaling 1 serves the whole grid
    assert merges[0] == ScaledMeanConfig(scaling=1.0)
    assert result.best_value == 0.75 and result.best_config == ScaledMeanConfig(scaling=0.75)


def test_the_merge_equals_the_math_by_hand(models):
    base, experts = models
    merged = _floats(hf_merge.merge(base, experts, ScaledMeanConfig(scaling=0.6), progress=False))
    expected = _by_hand(base, experts, 0.6)
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(merged[key].double(), value, rtol=1e-5, atol=1e-6, msg=key)


def test_the_low_rank_form_and_the_linear_coefficients_agree_with_merge_tensor():
    merger = hf_merge.get_merger(ScaledMeanConfig(scaling=0.6))
    assert merger.has_lowrank_form
    generator = torch.Generator().manual_seed(0)
    parts = [LowRank(torch.randn(12, 2, generator=generator), torch.randn(2, 9, generator=generator))
             for _ in range(3)]
    info = hf_merge.ParamInfo(name="w", kind=next(iter(hf_merge.ParamKind)), ndim=2)
    dense = merger.merge_tensor("w", torch.zeros(12, 9), [p.dense() for p in parts], info)
    torch.testing.assert_close(merger.merge_lowrank("w", parts, info).dense(), dense)
    coefficients = merger.linear_coefficients(["a", "b", "c"])
    torch.testing.assert_close(sum(c * p.dense() for c, p in zip(coefficients, parts)), dense)


def test_a_lora_output_runs_in_the_methods_own_low_rank_form(tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    base = tiny_bert()
    generator = torch.Generator().manual_seed(3)
    adapters, updates = [], []
    for i in range(2):
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=2, target_modules=["query"]))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        peft_model.save_pretrained(tmp_path / f"adapter{i}")
        adapters.append(tmp_path / f"adapter{i}")
        layer = peft_model.base_model.model.bert.encoder.layer[0].attention.self.query
        updates.append(layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
    calls = []
    original = ScaledMeanMerger.merge_lowrank
    monkeypatch.setattr(ScaledMeanMerger, "merge_lowrank",
                        lambda self, key, parts, info: calls.append(key) or original(self, key, parts, info))
    merged = hf_merge.merge(base, adapters, ScaledMeanConfig(scaling=0.6), output="lora", progress=False)
    assert len(calls) == 2  # the query matrix of each of the 2 layers, merged in factors (no dense ΔW, no SVD)
    prefix = "base_model.model.bert.encoder.layer.0.attention.self.query."
    got = merged.tensors[prefix + "lora_B.weight"].double() @ merged.tensors[prefix + "lora_A.weight"].double()
    expected = 0.6 * (updates[0] + updates[1]).double() / 2
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-7)
    assert merged.merge_config == ScaledMeanConfig(scaling=0.6)
