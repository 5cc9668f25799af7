"""Data-aware merging (RegMean, RegMean++, Fisher, AdaMerging) through ``merge(..., data={task: examples})``: each
method against its closed form or reference computed independently, and every bad input refused by name."""

from __future__ import annotations

import copy

import pytest
import torch

import hf_merge
from hf_merge.data import TaskData
from hf_merge.methods.fisher import fisher_merge
from hf_merge.methods.regmean import regmean, regularized_gram
from tests.tiny_models import finetuned_copy, tiny_bert

QUERY = "bert.encoder.layer.{}.attention.self.query.weight"


def _examples(seed: int, count: int = 12, length: int = 10, pad: bool = True) -> list[dict[str, torch.Tensor]]:
    """Tokenised examples; with ``pad`` every other one ends in padding (attention mask 0)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(count):
        ids = torch.randint(4, 128, (length,), generator=generator)
        mask = torch.ones(length, dtype=torch.long)
        if pad and index % 2:
            ids[length // 2:], mask[length // 2:] = 0, 0
        rows.append({"input_ids": ids, "attention_mask": mask, "label": torch.tensor(index % 3)})
    return rows


def _loader(seed: int, **kwargs: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(_examples(seed, **kwargs), batch_size=4)


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
    torch.manual_seed(0)
    base = tiny_bert()
    return base, {"a": finetuned_copy(base, 1, 0.05), "b": finetuned_copy(base, 2, 0.05)}


@pytest.fixture(scope="module")
def data() -> dict[str, torch.utils.data.DataLoader]:
    return {"a": _loader(10), "b": _loader(11)}


def _input_grams(model: torch.nn.Module, examples: list[dict[str, torch.Tensor]], keys: list[str]) -> dict[str, torch.Tensor]:
    """Reference: XᵀX / n (float64, real tokens only) of each linear layer's inputs over a full forward of ``model``."""
    grams = {key: torch.zeros(0) for key in keys}
    counts = dict.fromkeys(keys, 0)
    modules = dict(model.named_modules())
    current: dict[str, torch.Tensor] = {}

    def hook(key: str):
        def record(_module, inputs, _output):
            rows = inputs[0][current["mask"].bool()].double()
            grams[key] = rows.T @ rows if counts[key] == 0 else grams[key] + rows.T @ rows
            counts[key] += rows.shape[0]
        return record

    handles = [modules[key.removesuffix(".weight")].register_forward_hook(hook(key)) for key in keys]
    with torch.no_grad():
        for example in examples:
            current["mask"] = example["attention_mask"][None]
            model(input_ids=example["input_ids"][None], attention_mask=example["attention_mask"][None])
    for handle in handles:
        handle.remove()
    return {key: grams[key] / counts[key] for key in keys}


def _linear_keys(model: torch.nn.Module, block: int) -> list[str]:
    return [f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and f"encoder.layer.{block}." in name]


class TestRegMean:
    def test_each_linear_layer_equals_the_closed_form_on_the_tasks_own_inputs(self, models, data) -> None:
        base, experts = models
        merged = hf_merge.merge(base, experts, "regmean", alpha=0.9, data=data, progress=False).state_dict()
        for block in (0, 1):
            keys = _linear_keys(base, block)
            grams = {task: _input_grams(model, _examples(seed), keys)
                     for (task, model), seed in zip(experts.items(), (10, 11))}
            for key in keys:
                deltas = [model.state_dict()[key].double() - base.state_dict()[key].double() for model in experts.values()]
                expected = base.state_dict()[key].double() + regmean(deltas, [grams[t][key] for t in experts], 0.9)
                torch.testing.assert_close(merged[key].double(), expected, rtol=1e-5, atol=1e-6)

    def test_other_parameters_are_averaged(self, models, data) -> None:
        base, experts = models
        merged = hf_merge.merge(base, experts, "regmean", data=data, progress=False).state_dict()
        for key in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.output.LayerNorm.weight",
                    "bert.encoder.layer.1.attention.self.query.bias", "classifier.weight"):
            expected = (experts["a"].state_dict()[key] + experts["b"].state_dict()[key]) / 2
            torch.testing.assert_close(merged[key], expected, rtol=1e-5, atol=1e-6)

    def test_regmean_plus_fits_each_block_on_the_merged_blocks_outputs(self, models, data) -> None:
        """The last block's layers: Gram matrices of task i's block run on what the merged layers before it give."""
        base, experts = models
        merged_model = hf_merge.merge(base, experts, "regmean_plus", alpha=0.95, data=data, progress=False)
        merged = merged_model.state_dict()
        keys = _linear_keys(base, 1)
        grams = {}
        for (task, model), seed in zip(experts.items(), (10, 11)):
            hybrid = copy.deepcopy(merged_model)
            block = {k: v for k, v in model.state_dict().items() if ".layer.1." in k}
            hybrid.load_state_dict(block, strict=False)
            grams[task] = _input_grams(hybrid, _examples(seed), keys)
        for key in keys:
            deltas = [model.state_dict()[key].double() - base.state_dict()[key].double() for model in experts.values()]
            expected = base.state_dict()[key].double() + regmean(deltas, [grams[t][key] for t in experts], 0.95)
            torch.testing.assert_close(merged[key].double(), expected, rtol=1e-5, atol=1e-6)
        plain = hf_merge.merge(base, experts, "regmean", alpha=0.95, data=data, progress=False).state_dict()
        assert not torch.allclose(plain[QUERY.format(1)], merged[QUERY.format(1)])

    def test_identical_gram_matrices_give_the_average(self) -> None:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(40, 6, generator=generator, dtype=torch.float64)
        gram = x.T @ x / 40
        deltas = [torch.randn(5, 6, generator=generator, dtype=torch.float64) for _ in range(3)]
        torch.testing.assert_close(regmean(deltas, [gram] * 3, 0.95), sum(deltas) / 3)

    def test_alpha_zero_is_a_diagonal_weighted_average(self) -> None:
        generator = torch.Generator().manual_seed(1)
        grams = [(lambda x: x.T @ x)(torch.randn(30, 4, generator=generator, dtype=torch.float64)) for _ in range(2)]
        deltas = [torch.randn(3, 4, generator=generator, dtype=torch.float64) for _ in range(2)]
        weights = [gram.diagonal() for gram in grams]
        expected = (deltas[0] * weights[0] + deltas[1] * weights[1]) / (weights[0] + weights[1])
        torch.testing.assert_close(regmean(deltas, grams, 0.0), expected)
        torch.testing.assert_close(regularized_gram(grams[0], 0.0), torch.diag(weights[0]))

    def test_a_singular_gram_sum_is_solved_with_a_reported_ridge(self) -> None:
        gram = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64))  # the third input is always zero
        deltas = [torch.ones(2, 3, dtype=torch.float64)] * 2
        result = regmean(deltas, [gram, gram], 1.0)
        assert torch.isfinite(result).all()
        torch.testing.assert_close(result[:, :2], torch.ones(2, 2, dtype=torch.float64))


class TestFisher:
    def test_equal_fishers_give_the_average(self) -> None:
        deltas = [torch.randn(4, 5) for _ in range(3)]
        fisher = torch.rand(4, 5) + 0.1
        torch.testing.assert_close(fisher_merge(deltas, [fisher] * 3, 1e-6), sum(deltas) / 3)

    def test_the_merge_weighs_by_per_example_squared_gradients(self, models, data) -> None:
        base, experts = models
        merged = hf_merge.merge(base, experts, "fisher", num_examples=6, normalize=False, data=data,
                                progress=False).state_dict()
        key = QUERY.format(0)
        fishers = []
        for model, seed in zip(experts.values(), (10, 11)):
            model = copy.deepcopy(model)
            param = dict(model.named_parameters())[key]
            total = torch.zeros_like(param)
            for example in _examples(seed)[:6]:
                model.zero_grad()
                out = model(input_ids=example["input_ids"][None], attention_mask=example["attention_mask"][None],
                            labels=example["label"][None])
                (-out.loss).backward()
                total += param.grad.square()
            fishers.append(total / 6)
        deltas = [model.state_dict()[key] - base.state_dict()[key] for model in experts.values()]
        torch.testing.assert_close(merged[key], base.state_dict()[key] + fisher_merge(deltas, fishers, 1e-6),
                                   rtol=1e-4, atol=1e-6)


class TestAdaMerging:
    @pytest.mark.parametrize("granularity", ["task", "layer"])
    def test_entropy_decreases_and_the_merge_is_task_arithmetic_with_the_learned_coefficients(
            self, models, data, granularity) -> None:
        base, experts = models
        merger = hf_merge.get_merger(hf_merge.AdaMergingConfig(granularity=granularity, steps=25, lr=0.05))
        from hf_merge.engine import Plan, run
        from hf_merge.inputs import open_inputs
        from hf_merge.io.sinks import output_sink
        from hf_merge.options import make_options

        options = make_options(progress=False, data=data)
        base_source, tasks = open_inputs(base, experts, options)
        merged = run(Plan(base_source, tasks, merger), output_sink(base_source, options), options).state_dict()
        entropies = merger.entropies
        assert len(entropies) == 25 and entropies[-1] < entropies[0]
        assert torch.isfinite(merger.coefficients).all()
        assert merger.coefficients.shape == (2, 1 if granularity == "task" else 3)  # blocks 0, 1 and the rest
        for key in (QUERY.format(0), QUERY.format(1), "bert.embeddings.word_embeddings.weight"):
            coefficients = merger.by_key[key]
            expected = base.state_dict()[key] + sum(c * (m.state_dict()[key] - base.state_dict()[key])
                                                    for c, m in zip(coefficients, experts.values()))
            torch.testing.assert_close(merged[key], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["regmean", "regmean_plus", "fisher", "adamerging"])
def test_the_inputs_are_left_untouched(models, data, method) -> None:
    base, experts = models
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in {"base": base, **experts}.items()}
    keywords = {"steps": 2} if method == "adamerging" else {"num_examples": 4}
    hf_merge.merge(base, experts, method, data=data, progress=False, **keywords)
    for name, model in {"base": base, **experts}.items():
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[name][key]), (name, key)


def _folders_with_tokenizer(tmp_path) -> tuple[dict[str, object], object]:
    """Tiny BERT base and two fine-tunes saved with a word-level tokenizer: ``({name: folder}, tokenizer)``."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as token_models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "red", "green", "blue"])}
    backend = Tokenizer(token_models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    base = tiny_bert()
    folders = {}
    for name, model in {"base": base, "a": finetuned_copy(base, 1), "b": finetuned_copy(base, 2)}.items():
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        folders[name] = tmp_path / name
    return folders, tokenizer


def test_the_cli_reads_data_files_named_in_the_recipe(tmp_path, capsys) -> None:
    import datasets
    import yaml
    from safetensors.torch import load_file

    from hf_merge.cli import main

    folders, _ = _folders_with_tokenizer(tmp_path)
    texts = ["red green", "blue", "green green blue red"]
    (tmp_path / "a.txt").write_text("\n".join(texts))
    datasets.Dataset.from_dict({"text": texts[::-1]}).save_to_disk(str(tmp_path / "b_data"))
    recipe = {"method": "regmean", "base": "base", "models": {"a": "a", "b": "b"},
              "data": {"a": "a.txt", "b": "b_data"}}
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "recipe.yml"), str(tmp_path / "out"), "--quiet"]) == 0
    from_cli = load_file(tmp_path / "out" / "model.safetensors")
    direct = hf_merge.merge(folders["base"], {"a": folders["a"], "b": folders["b"]}, "regmean",
                            data={"a": texts, "b": texts[::-1]}, progress=False).state_dict()
    torch.testing.assert_close(from_cli[QUERY.format(1)], direct[QUERY.format(1)])
    recipe["data"]["b"] = "missing.jsonl"
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "recipe.yml"), str(tmp_path / "out2"), "--quiet"]) != 0
    assert "missing.jsonl does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


def test_raw_text_is_tokenised_with_the_checkpoint_tokenizer(tmp_path) -> None:
    folders, tokenizer = _folders_with_tokenizer(tmp_path)
    texts = ["red green", "blue", "green green blue red"]
    from_folders = hf_merge.merge(folders["base"], {"a": folders["a"], "b": folders["b"]}, "regmean",
                                  data={"a": texts, "b": texts[::-1]}, progress=False).state_dict()
    encoded = {task: [dict(tokenizer(text)) for text in rows] for task, rows in (("a", texts), ("b", texts[::-1]))}
    import datasets

    tokenised = {task: datasets.Dataset.from_list(rows) for task, rows in encoded.items()}
    from_dataset = hf_merge.merge(folders["base"], {"a": folders["a"], "b": folders["b"]}, "regmean",
                                  data={t: TaskData(d, tokenizer=tokenizer) for t, d in tokenised.items()},
                                  progress=False).state_dict()
    for key in (QUERY.format(0), QUERY.format(1)):
        torch.testing.assert_close(from_folders[key], from_dataset[key])


class TestFaults:
    def test_a_task_without_data_is_named(self, models, data) -> None:
        base, experts = models
        with pytest.raises(ValueError, match=r"no(ne)? .*\['b'\]"):
            hf_merge.merge(base, experts, "regmean", data={"a": data["a"]}, progress=False)

    def test_no_data_at_all_is_refused(self, models) -> None:
        base, experts = models
        with pytest.raises(ValueError, match="learns from data"):
            hf_merge.merge(base, experts, "fisher", progress=False)

    def test_data_for_an_unknown_task_is_refused(self, models, data) -> None:
        base, experts = models
        with pytest.raises(ValueError, match=r"\['c'\]"):
            hf_merge.merge(base, experts, "regmean", data={**data, "c": data["a"]}, progress=False)

    def test_data_for_a_method_that_uses_none_is_refused(self, models, data) -> None:
        base, experts = models
        with pytest.raises(ValueError, match="'task_arithmetic' uses no data"):
            hf_merge.merge(base, experts, "task_arithmetic", scaling=0.5, data=data, progress=False)

    def test_raw_text_without_a_tokenizer_is_refused(self, models) -> None:
        base, experts = models
        with pytest.raises(ValueError, match="task 'a' is raw text, but no tokenizer"):
            hf_merge.merge(base, experts, "regmean", data={"a": ["x"], "b": ["y"]}, progress=False)

    def test_a_model_without_logits_needs_a_logits_function(self, data) -> None:
        from transformers import BertConfig, BertModel

        base = BertModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64))
        experts = {"a": finetuned_copy(base, 1), "b": finetuned_copy(base, 2)}
        with pytest.raises(ValueError, match="no logits on task 'a'"):
            hf_merge.merge(base, experts, "adamerging", steps=1, data=data, progress=False)
        head = torch.nn.Linear(32, 3)
        pooled = {t: TaskData(d, logits=lambda out, batch: head(out.last_hidden_state[:, 0])) for t, d in data.items()}
        assert hf_merge.merge(base, experts, "adamerging", steps=1, data=pooled, progress=False) is not None

    def test_empty_data_is_refused(self, models) -> None:
        base, experts = models
        with pytest.raises(ValueError, match="task 'a' holds no examples"):
            hf_merge.merge(base, experts, "regmean", data={"a": [], "b": ["x"]}, progress=False)

    @pytest.mark.parametrize(("method", "field", "value", "error"), [
        ("regmean", "alpha", 1.5, ValueError), ("regmean", "alpha", float("nan"), ValueError),
        ("regmean", "num_examples", 0, ValueError), ("regmean", "batch_size", 2.5, TypeError),
        ("regmean_plus", "alpha", -0.1, ValueError),
        ("fisher", "floor", 0.0, ValueError), ("fisher", "normalize", "yes", TypeError),
        ("fisher", "num_examples", True, TypeError),
        ("adamerging", "granularity", "block", ValueError), ("adamerging", "lr", 0.0, ValueError),
        ("adamerging", "steps", -1, ValueError), ("adamerging", "init", float("inf"), ValueError),
    ])
    def test_config_values_are_validated(self, method, field, value, error) -> None:
        with pytest.raises(error, match=field):
            hf_merge.get_merger(method, **{field: value})

    def test_task_data_is_validated(self) -> None:
        with pytest.raises(TypeError, match="examples"):
            TaskData("not a dataset")
        with pytest.raises(TypeError, match="logits"):
            TaskData(["x"], logits=3)
        with pytest.raises(ValueError, match="max_length"):
            TaskData(["x"], max_length=0)


@pytest.mark.parametrize(("architecture", "key"), [
    ("llama", "model.layers.1.self_attn.q_proj.weight"),
    ("gpt2", "transformer.h.1.attn.c_attn.weight"),  # Conv1D, stored (in, out)
    ("vit", "vit.layers.1.attention.q_proj.weight"),  # transformers 5's in-memory name
])
def test_every_architecture_gets_regmean_and_runs_fisher_and_adamerging(architecture, key) -> None:
    from tests.tiny_models import FACTORIES

    base = FACTORIES[architecture]()
    experts = {"a": finetuned_copy(base, 1), "b": finetuned_copy(base, 2)}
    generator = torch.Generator().manual_seed(0)
    if architecture == "vit":
        rows = [{"pixel_values": torch.randn(3, 16, 16, generator=generator), "label": torch.tensor(i % 3)}
                for i in range(8)]
    else:
        rows = [{"input_ids": torch.randint(0, 128, (10,), generator=generator)} for _ in range(8)]
    data = {task: torch.utils.data.DataLoader(rows, batch_size=4) for task in experts}
    average = {k: (experts["a"].state_dict()[k] + experts["b"].state_dict()[k]) / 2 for k in base.state_dict()}
    for method in ("regmean", "regmean_plus"):
        merged = hf_merge.merge(base, experts, method, data=data, progress=False).state_dict()
        assert not torch.allclose(merged[key], average[key], atol=1e-6), method
    for method, keywords in (("fisher", {"num_examples": 4}), ("adamerging", {"steps": 2})):
        merged = hf_merge.merge(base, experts, method, data=data, progress=False, **keywords).state_dict()
        assert all(torch.isfinite(t).all() for t in merged.values() if t.is_floating_point())


def test_check_reports_missing_or_unwanted_data(models, data) -> None:
    base, experts = models
    assert any("learns from data" in p.message for p in hf_merge.check(base, experts, "regmean").errors)
    assert not hf_merge.check(base, experts, "regmean", data=data).errors
    unwanted = hf_merge.check(base, experts, "ties", data=data).errors
    assert [p.topic for p in unwanted] == ["data"] and "'ties' uses no data" in unwanted[0].message


def test_atm_refuses_a_data_aware_merge_step() -> None:
    with pytest.raises(ValueError, match="'regmean' learns from data"):
        hf_merge.ATMConfig(rounds=1, steps_per_round=1, merge=hf_merge.RegMeanConfig())


def test_per_example_logits_are_never_masked_like_tokens() -> None:
    """A batch of one example whose length equals the number of classes: the logits (1, C) are per example."""
    from hf_merge.data import token_mask

    batch = {"attention_mask": torch.tensor([[1, 1, 0]])}
    assert token_mask(batch, torch.Size([1, 3])) is None
    assert token_mask(batch, torch.Size([1, 3, 8])).tolist() == [[True, True, False]]
