"""ATM (Alternating Tuning and Merging): configuration, equivalence with multi-task gradient descent, any merger,
per-task heads and losses, evaluation logging, resumable round checkpoints, refinement of a merge (``init_from``),
DDP, and the runnable example."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_merge.training import ATMConfig
from tests.helpers import REPO, accelerate_launch, run_launched

sys.path.insert(0, str(Path(__file__).resolve().parent))
from atm_ddp_script import TokenClassificationTask


# --------------------------------------------------------------------------------------------- helpers
def tiny_classifier(dtype: torch.dtype = torch.float32, dropout: float = 0.0, seed: int = 0) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification(
        BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                   max_position_embeddings=16, num_labels=3, hidden_dropout_prob=dropout,
                   attention_probs_dropout_prob=dropout)
    )
    return model.to(dtype)


def training_args(output_dir: Path, **overrides):
    from transformers import TrainingArguments

    settings = {
        "output_dir": str(output_dir), "use_cpu": True, "report_to": "none", "disable_tqdm": True,
        "logging_strategy": "no", "save_strategy": "no", "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8, "seed": 3,
    }
    settings.update(overrides)
    return TrainingArguments(**settings)


def full_batch_sgd_args(output_dir: Path, learning_rate: float, batch_size: int):
    """One optimizer step = θ ← θ − η ∇L(θ) on the whole task: plain SGD, constant lr, no clipping or decay."""
    return training_args(
        output_dir, optim="sgd", learning_rate=learning_rate, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=0.0, per_device_train_batch_size=batch_size,
    )


def synthetic_tasks(count: int, size: int = 8, with_eval: bool = False) -> dict:
    return {
        f"task_{i}": (TokenClassificationTask(seed=i, size=size), TokenClassificationTask(seed=50 + i, size=4))
        if with_eval else TokenClassificationTask(seed=i, size=size)
        for i in range(count)
    }


def train_set(value):
    return value[0] if isinstance(value, tuple) else value


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.state_dict().values(), b.state_dict().values())
               if x.is_floating_point())


def multitask_gradient_descent(model, tasks, learning_rate, steps, loss_weight):
    """Reference: θ ← θ − η · w · Σ_t ∇L_t(θ) with full-batch task losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(steps):
        total = [torch.zeros_like(p) for p in params]
        for value in tasks.values():
            data = train_set(value)
            loss = model(input_ids=data.input_ids, labels=data.labels).loss
            for acc, grad in zip(total, torch.autograd.grad(loss, params)):
                acc += grad
        with torch.no_grad():
            for p, grad in zip(params, total):
                p -= learning_rate * loss_weight * grad
    return model


# --------------------------------------------------------------------------------------------- config
def test_config_needs_exactly_one_budget_and_positive_rounds():
    with pytest.raises(ValueError, match="exactly one of steps_per_round and epochs_per_round"):
        ATMConfig(rounds=2)
    with pytest.raises(ValueError, match="exactly one"):
        ATMConfig(rounds=2, steps_per_round=1, epochs_per_round=1.0)
    with pytest.raises(ValueError, match="rounds must be a positive integer"):
        ATMConfig(rounds=0, steps_per_round=1)
    with pytest.raises(ValueError, match="steps_per_round must be a positive integer"):
        ATMConfig(rounds=1, steps_per_round=0)
    with pytest.raises(ValueError, match="epochs_per_round must be > 0"):
        ATMConfig(rounds=1, epochs_per_round=-0.5)
    with pytest.raises(TypeError, match="merge must be a MergeConfig"):
        ATMConfig(rounds=1, steps_per_round=1, merge="ties")


def test_config_default_scaling_is_one_over_number_of_tasks():
    assert ATMConfig(rounds=1, steps_per_round=1).scaling_for(4) == pytest.approx(0.25)
    assert ATMConfig(rounds=1, steps_per_round=1, scaling=0.7).scaling_for(4) == pytest.approx(0.7)


def test_config_round_trips_through_json_with_a_nested_merge_config(tmp_path):
    from hf_merge import TiesConfig

    config = ATMConfig(rounds=3, epochs_per_round=0.5, scaling=0.5, merge=TiesConfig(density=0.2, scaling=1.0),
                       reset_optimizer=False)
    config.save_pretrained(tmp_path)
    assert ATMConfig.from_pretrained(tmp_path) == config
    assert ATMConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="Unknown ATMConfig parameter"):
        ATMConfig.from_dict({**config.to_dict(), "lr": 1.0})


def test_importing_the_config_does_not_import_transformers():
    code = "import sys, hf_merge.training as t; t.ATMConfig; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# --------------------------------------------------------------------------------------------- trainer API
def test_trainer_rejects_inputs_it_cannot_honour(tmp_path):
    from hf_merge.training import ATMTrainer

    config = ATMConfig(rounds=1, steps_per_round=1)
    tasks = synthetic_tasks(2)
    with pytest.raises(ValueError, match="do not pass train_dataset"):
        ATMTrainer(tiny_classifier(), training_args(tmp_path), task_datasets=tasks, atm_config=config,
                   train_dataset=tasks["task_0"])
    with pytest.raises(ValueError, match="one head per task"):
        ATMTrainer(tiny_classifier(), training_args(tmp_path), task_datasets=tasks, atm_config=config,
                   task_heads={"task_0": torch.nn.Linear(16, 3)})
    with pytest.raises(ValueError, match="no submodule"):
        ATMTrainer(tiny_classifier(), training_args(tmp_path), task_datasets=tasks, atm_config=config,
                   task_heads={t: torch.nn.Linear(16, 3) for t in tasks}, head_attribute="bert.missing")
    with pytest.raises(ValueError, match="unknown task"):
        ATMTrainer(tiny_classifier(), training_args(tmp_path), task_datasets=tasks, atm_config=config,
                   compute_loss_fns={"other": lambda model, inputs: model(**inputs).loss})


# --------------------------------------------------------------------------------------------- equivalences
@pytest.mark.parametrize("scaling, loss_weight_of", [(1.0, lambda T: 1.0), (None, lambda T: 1.0 / T)],
                         ids=["scaling_1_is_summed_loss", "scaling_1_over_T_is_mean_loss"])
def test_one_full_batch_sgd_step_per_task_is_multitask_gradient_descent(tmp_path, scaling, loss_weight_of):
    from hf_merge.training import ATMTrainer

    tasks, rounds, lr = synthetic_tasks(3), 3, 0.5
    model = tiny_classifier(torch.float64)
    reference = multitask_gradient_descent(copy.deepcopy(model), tasks, lr, rounds, loss_weight_of(len(tasks)))
    trainer = ATMTrainer(model, full_batch_sgd_args(tmp_path, lr, batch_size=8), task_datasets=tasks,
                         atm_config=ATMConfig(rounds=rounds, steps_per_round=1, scaling=scaling))
    output = trainer.train()

    assert output.global_step == rounds * len(tasks)
    assert max_difference(trainer.model, reference) < 1e-6
    assert max_difference(trainer.model, tiny_classifier(torch.float64)) > 1e-2  # it did move


def test_any_merger_applies_to_the_rounds_fine_tuned_models(tmp_path):
    """One ATM round with TIES equals hf_merge.merge(θ⁰, {t: θ⁰ fine-tuned on t}, TIES) (α = 1)."""
    import hf_merge
    from hf_merge.training import ATMTrainer

    tasks, lr = synthetic_tasks(3), 0.5
    merge_config = hf_merge.TiesConfig(density=0.3, scaling=1.0)
    model = tiny_classifier()
    fine_tuned = {
        name: multitask_gradient_descent(copy.deepcopy(model), {name: data}, lr, steps=1, loss_weight=1.0)
        for name, data in tasks.items()
    }
    expected = hf_merge.merge(model, fine_tuned, merge_config, progress=False)
    trainer = ATMTrainer(model, full_batch_sgd_args(tmp_path, lr, batch_size=8), task_datasets=tasks,
                         atm_config=ATMConfig(rounds=1, steps_per_round=1, scaling=1.0, merge=merge_config))
    trainer.train()

    assert max_difference(trainer.model, expected) < 1e-6
    assert max_difference(trainer.model, fine_tuned["task_0"]) > 1e-3


def test_task_heads_are_task_specific_and_the_body_follows_multitask_gradient_descent(tmp_path):
    """Per-task heads of different widths with per-task losses: one SGD step per task and α = 1 is gradient
    descent on Σ_t L_t(body, head_t); heads are not merged and the model's own head is left untouched."""
    from hf_merge.training import ATMTrainer

    widths = {"task_0": 3, "task_1": 2}
    tasks = {name: TokenClassificationTask(seed=i, size=8, num_labels=widths[name]) for i, name in enumerate(widths)}
    torch.manual_seed(1)
    heads = {name: torch.nn.Linear(16, width).double() for name, width in widths.items()}

    def classification_loss(model, inputs):
        logits = model(input_ids=inputs["input_ids"]).logits
        return torch.nn.functional.cross_entropy(logits, inputs["labels"]), logits

    model = tiny_classifier(torch.float64)
    own_head = copy.deepcopy(model.classifier.state_dict())
    body, ref_heads = copy.deepcopy(model), copy.deepcopy(heads)
    lr, rounds = 0.5, 2
    params = [p for n, p in body.named_parameters() if not n.startswith("classifier.")]
    for _ in range(rounds):
        grads = [torch.zeros_like(p) for p in params]
        head_grads = {}
        for name, data in tasks.items():
            body.classifier = ref_heads[name]
            loss = classification_loss(body, {"input_ids": data.input_ids, "labels": data.labels})[0]
            all_grads = torch.autograd.grad(loss, params + list(ref_heads[name].parameters()))
            for acc, grad in zip(grads, all_grads[: len(params)]):
                acc += grad
            head_grads[name] = all_grads[len(params):]
        with torch.no_grad():
            for p, grad in zip(params, grads):
                p -= lr * grad
            for name, head in ref_heads.items():
                for p, grad in zip(head.parameters(), head_grads[name]):
                    p -= lr * grad

    trainer = ATMTrainer(model, full_batch_sgd_args(tmp_path, lr, batch_size=8), task_datasets=tasks,
                         atm_config=ATMConfig(rounds=rounds, steps_per_round=1, scaling=1.0),
                         task_heads=heads, compute_loss_fns={t: classification_loss for t in tasks})
    trainer.train()

    trained_body = {n: p for n, p in trainer.model.named_parameters() if not n.startswith("classifier.")}
    reference_body = {n: p for n, p in body.named_parameters() if not n.startswith("classifier.")}
    assert max((trained_body[n] - reference_body[n]).abs().max().item() for n in reference_body) < 1e-6
    for name in tasks:
        for p, q in zip(trainer.task_heads[name].parameters(), ref_heads[name].parameters()):
            assert torch.allclose(p, q, atol=1e-6, rtol=0)
    for key, value in trainer.model.classifier.state_dict().items():
        assert torch.equal(value, own_head[key])
    with trainer.task_context("task_1"):
        assert trainer.model.classifier is trainer.task_heads["task_1"]
        assert trainer.model(input_ids=tasks["task_1"].input_ids).logits.shape[-1] == 2


def test_every_round_logs_every_tasks_evaluation_metrics(tmp_path):
    import numpy as np

    from hf_merge.training import ATMTrainer

    def accuracy(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    tasks = synthetic_tasks(2, with_eval=True)
    trainer = ATMTrainer(tiny_classifier(), training_args(tmp_path, eval_strategy="epoch", logging_strategy="steps",
                                                          logging_steps=1),
                         task_datasets=tasks, atm_config=ATMConfig(rounds=3, steps_per_round=2),
                         compute_metrics=accuracy)
    trainer.train()
    history = trainer.state.log_history

    for task in tasks:
        per_round = [entry for entry in history if f"eval_{task}_loss" in entry]
        assert [entry["atm_round"] for entry in per_round] == [1, 2, 3]
        assert all(0.0 <= entry[f"eval_{task}_accuracy"] <= 1.0 for entry in per_round)
        assert [entry["step"] for entry in per_round] == [4, 8, 12]  # 2 tasks × 2 steps per round
    training_steps = [entry["step"] for entry in history if "loss" in entry]
    assert training_steps == list(range(1, 13))  # steps count across all fine-tunes


def test_epochs_per_round_trains_that_fraction_of_each_task_per_round(tmp_path):
    from hf_merge.training import ATMTrainer

    tasks = synthetic_tasks(2, size=8)
    trainer = ATMTrainer(tiny_classifier(), training_args(tmp_path, per_device_train_batch_size=2),
                         task_datasets=tasks, atm_config=ATMConfig(rounds=2, epochs_per_round=0.5))
    # half of 8 examples in batches of 2 = 2 steps, per task and round
    assert trainer.train().global_step == 2 * 2 * 2


# --------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("reset_optimizer", [True, False], ids=["fresh_optimizer", "per_task_optimizer_moments"])
def test_resuming_from_a_round_checkpoint_reproduces_the_uninterrupted_run(tmp_path, reset_optimizer):
    from hf_merge.training import ATMTrainer

    config = ATMConfig(rounds=3, steps_per_round=2, reset_optimizer=reset_optimizer)
    tasks = synthetic_tasks(2, size=12, with_eval=True)
    args = {"per_device_train_batch_size": 4, "learning_rate": 1e-2, "save_strategy": "epoch",
            "eval_strategy": "epoch"}
    # dropout and shuffling exercise the per-(round, task) seeds; AdamW exercises the optimizer handling
    full = ATMTrainer(tiny_classifier(dropout=0.1), training_args(tmp_path / "full", **args),
                      task_datasets=tasks, atm_config=config)
    full.train()
    assert sorted(os.listdir(tmp_path / "full")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]

    resumed = ATMTrainer(tiny_classifier(dropout=0.1, seed=99), training_args(tmp_path / "resumed", **args),
                         task_datasets=tasks, atm_config=config)
    output = resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-1"))

    assert output.global_step == full.state.global_step == 12
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    final_eval = [e for e in full.state.log_history if "eval_task_0_loss" in e][-1]
    resumed_eval = [e for e in resumed.state.log_history if "eval_task_0_loss" in e][-1]
    assert resumed_eval["eval_task_0_loss"] == final_eval["eval_task_0_loss"]


def test_resume_true_continues_from_the_last_round_and_checks_the_settings(tmp_path):
    from hf_merge.training import ATMTrainer

    tasks = synthetic_tasks(2)
    args = training_args(tmp_path, save_strategy="epoch", save_total_limit=1, learning_rate=1e-2)
    first = ATMTrainer(tiny_classifier(), args, task_datasets=tasks, atm_config=ATMConfig(rounds=2, steps_per_round=1))
    first.train()
    assert os.listdir(tmp_path) == ["checkpoint-2"]  # save_total_limit keeps the newest round

    longer = ATMTrainer(tiny_classifier(seed=5), args, task_datasets=tasks,
                        atm_config=ATMConfig(rounds=3, steps_per_round=1))
    assert longer.train(resume_from_checkpoint=True).global_step == 6
    reference = ATMTrainer(tiny_classifier(), training_args(tmp_path / "ref", learning_rate=1e-2),
                           task_datasets=tasks, atm_config=ATMConfig(rounds=3, steps_per_round=1))
    reference.train()
    assert max_difference(longer.model, reference.model) == 0.0

    different = ATMTrainer(tiny_classifier(), args, task_datasets=tasks,
                           atm_config=ATMConfig(rounds=3, steps_per_round=1, scaling=1.0))
    with pytest.raises(ValueError, match="only rounds may change"):
        different.train(resume_from_checkpoint=True)


def test_saved_model_loads_with_from_pretrained_and_keeps_task_heads(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from hf_merge.training import ATMTrainer

    tasks = synthetic_tasks(2)
    heads = {t: torch.nn.Linear(16, 3) for t in tasks}
    trainer = ATMTrainer(tiny_classifier(), training_args(tmp_path / "run", learning_rate=1e-2),
                         task_datasets=tasks, atm_config=ATMConfig(rounds=1, steps_per_round=1), task_heads=heads)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))

    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    assert max_difference(loaded, trainer.model) == 0.0
    assert ATMConfig.from_pretrained(tmp_path / "saved") == trainer.atm_config
    saved_heads = load_file(tmp_path / "saved" / "task_heads.safetensors")
    assert torch.equal(saved_heads["weight@task_1"], trainer.task_heads["task_1"].weight.detach())


# --------------------------------------------------------------------------------------------- refining a merge
def experts_of(model: torch.nn.Module, tasks: dict, lr: float = 0.5) -> dict[str, torch.nn.Module]:
    """One full-batch SGD step of ``model`` on each task: tiny fine-tuned experts."""
    return {name: multitask_gradient_descent(copy.deepcopy(model), {name: data}, lr, steps=1, loss_weight=1.0)
            for name, data in tasks.items()}


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    expected = b.state_dict()
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def merged_weights(tmp_path: Path, kind: str):
    """A 'merged model' (a seed-7 model) as init_from of ``kind``, and that model."""
    merged = tiny_classifier(seed=7)
    if kind == "model":
        return merged, merged
    if kind == "state_dict":
        return {name: tensor.clone() for name, tensor in merged.state_dict().items()}, merged
    merged.save_pretrained(tmp_path / "merged")
    return str(tmp_path / "merged"), merged


@pytest.mark.parametrize("kind", ["model", "state_dict", "checkpoint"])
def test_init_from_merged_weights_makes_them_theta0(tmp_path, kind):
    """θ⁰ is the merged model's weights as soon as the trainer is built; a round with learning rate 0 keeps them
    (the rounds start from θ⁰), and the record says where they came from."""
    from hf_merge.training import ATMTrainer

    init_from, merged = merged_weights(tmp_path, kind)
    trainer = ATMTrainer(tiny_classifier(), training_args(tmp_path / "run", learning_rate=0.0),
                         task_datasets=synthetic_tasks(2), atm_config=ATMConfig(rounds=1, steps_per_round=1),
                         init_from=init_from)
    assert_same_weights(trainer.model, merged)
    trainer.train()
    assert_same_weights(trainer.model, merged)
    assert trainer.init_record["init_from"] == kind
    if kind == "checkpoint":
        assert trainer.init_record["origin"] == "merged"  # a local folder by name, as merge records do


@pytest.mark.parametrize("architecture", ["tiny_llama", "tiny_mixtral"], ids=["tied_embeddings", "fused_experts"])
def test_init_from_places_weights_as_checkpoints_store_them(tmp_path, architecture):
    """Tied copies stored once (Llama) and weights transformers converts on loading (Mixtral's per-expert matrices,
    fused in memory) are placed from a model, a folder and a state dict under either naming, in the model's dtype."""
    import tiny_models

    from hf_merge.training import ATMTrainer

    factory = getattr(tiny_models, architecture)
    merged = factory()
    merged.save_pretrained(tmp_path / "merged")
    for init_from in (merged, str(tmp_path / "merged"), merged.state_dict()):
        model = factory().to(torch.bfloat16)
        ATMTrainer(model, training_args(tmp_path / "run"), task_datasets={"t": [{"input_ids": [1]}]},
                   atm_config=ATMConfig(rounds=1, steps_per_round=1), init_from=init_from)
        assert_same_weights(model, copy.deepcopy(merged).to(torch.bfloat16))


def test_atm_from_init_from_is_atm_from_the_merged_model(tmp_path):
    from hf_merge.training import ATMTrainer

    tasks, config = synthetic_tasks(2), ATMConfig(rounds=2, steps_per_round=2)
    merged = tiny_classifier(seed=7)
    refined = ATMTrainer(tiny_classifier(), training_args(tmp_path / "a", learning_rate=1e-2), task_datasets=tasks,
                         atm_config=config, init_from=merged)
    refined.train()
    direct = ATMTrainer(copy.deepcopy(merged), training_args(tmp_path / "b", learning_rate=1e-2), task_datasets=tasks,
                        atm_config=config)
    direct.train()
    assert_same_weights(refined.model, direct.model)
    assert max_difference(refined.model, merged) > 1e-4  # it did train


@pytest.mark.parametrize("config", ["tsv_m config", "tsv_m", {"method": "ties", "density": 0.3, "scaling": 1.0}],
                         ids=["merge_config", "method_name", "config_dict"])
def test_init_from_a_merge_config_is_that_merge_of_init_experts_into_the_model(tmp_path, config):
    import json

    import hf_merge
    from hf_merge.training import ATMTrainer

    tasks = synthetic_tasks(2)
    base = tiny_classifier()
    experts = experts_of(base, tasks)
    config = hf_merge.TSVMergeConfig() if config == "tsv_m config" else config
    as_config = hf_merge.TSVMergeConfig() if config == "tsv_m" else (
        hf_merge.MergeConfig.from_dict(config) if isinstance(config, dict) else config)
    expected = hf_merge.merge(base, experts, as_config, progress=False)
    given = experts
    if isinstance(config, dict):  # experts as checkpoint folders
        for name, expert in experts.items():
            expert.save_pretrained(tmp_path / f"expert-{name}")
        given = {name: str(tmp_path / f"expert-{name}") for name in experts}
    model = copy.deepcopy(base)
    trainer = ATMTrainer(model, training_args(tmp_path / "run", learning_rate=1e-2), task_datasets=tasks,
                         atm_config=ATMConfig(rounds=1, steps_per_round=1), init_from=config, init_experts=given)

    assert trainer.model is model  # the model given is θ₀ of the merge and is overwritten in place with θ⁰
    assert_same_weights(trainer.model, expected)
    assert max_difference(trainer.model, base) > 1e-4
    assert not hasattr(model, "merge_config")  # the merge's record is the trainer's, not attached to the model
    assert trainer.init_record["init_from"] == "merge"
    assert trainer.init_record["merge_config"] == as_config.to_dict()
    # inputs by folder name (local paths are not recorded, as in merge_config.json), None in memory
    assert trainer.init_record["experts"] == {name: f"expert-{name}" if given is not experts else None for name in experts}
    trainer.save_model(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / "atm_init.json").read_text())
    assert hf_merge.MergeConfig.from_dict(saved["merge_config"]) == as_config


def test_init_from_rejects_inputs_it_cannot_use_before_training(tmp_path):
    import hf_merge
    from hf_merge.training import ATMTrainer

    tasks = synthetic_tasks(2)

    def build(**init):
        return ATMTrainer(tiny_classifier(), training_args(tmp_path), task_datasets=tasks,
                          atm_config=ATMConfig(rounds=1, steps_per_round=1), **init)

    state = tiny_classifier(seed=7).state_dict()
    key = "bert.encoder.layer.0.attention.self.query.weight"
    with pytest.raises(TypeError, match="init_from must be .* got int"):
        build(init_from=3)
    with pytest.raises(TypeError, match="init_from must be .* got list"):
        build(init_from=[state])
    with pytest.raises(ValueError, match=rf"'{key}' has shape \(8, 16\), the model's is \(16, 16\)"):
        build(init_from={**state, key: torch.zeros(8, 16)})
    with pytest.raises(ValueError, match=rf"'{key}' \(shape \(16, 16\)\) is missing"):
        build(init_from={k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match=r"'extra.weight' \(shape \(2,\)\) is not a tensor of the model"):
        build(init_from={**state, "extra.weight": torch.zeros(2)})
    with pytest.raises(TypeError, match="entry 'bert.pooler.dense.bias' is a str"):
        build(init_from={**state, "bert.pooler.dense.bias": "zeros"})
    with pytest.raises(ValueError, match="neither an existing checkpoint folder nor a merge method.*'tsv_n'"):
        build(init_from="tsv_n")
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        build(init_from=tmp_path / "missing")
    experts = {"a": tiny_classifier(seed=1)}
    with pytest.raises(ValueError, match="init_experts are merged by the merge config.*init_from is missing"):
        build(init_experts=experts)
    with pytest.raises(ValueError, match="init_experts are merged by the merge config.*init_from is a state dict"):
        build(init_from=state, init_experts=experts)
    with pytest.raises(ValueError, match="init_from='tsv_m' merges init_experts into the model.*give init_experts"):
        build(init_from=hf_merge.TSVMergeConfig())
    with pytest.raises(TypeError, match="init_from='task_arithmetic': .*'scaling'.* config dict"):
        build(init_from="task_arithmetic", init_experts=experts)
    with pytest.raises(TypeError, match="init_experts must be a non-empty"):
        build(init_from="tsv_m", init_experts=[tiny_classifier(seed=1)])

    # with task heads, the model's own head may be left out of the merged weights
    heads = {t: torch.nn.Linear(16, 3) for t in tasks}
    body = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    trainer = build(init_from=body, task_heads=heads)
    assert torch.equal(trainer.model.bert.pooler.dense.weight, state["bert.pooler.dense.weight"])
    with pytest.raises(ValueError, match="'classifier.weight' .* is missing"):
        build(init_from=body)


def test_resuming_a_refinement_reproduces_the_uninterrupted_run(tmp_path):
    """The checkpoint's weights are loaded over θ⁰, whether init_from is given again or not; a different init_from
    is refused."""
    import hf_merge
    from hf_merge.training import ATMTrainer

    tasks = synthetic_tasks(2, size=12, with_eval=True)
    config = ATMConfig(rounds=3, steps_per_round=2)
    args = {"per_device_train_batch_size": 4, "learning_rate": 1e-2, "save_strategy": "epoch", "eval_strategy": "epoch"}
    base = tiny_classifier(dropout=0.1)
    experts = experts_of(base, synthetic_tasks(2))
    init = {"init_from": hf_merge.TSVMergeConfig(), "init_experts": experts}
    full = ATMTrainer(copy.deepcopy(base), training_args(tmp_path / "full", **args), task_datasets=tasks,
                      atm_config=config, **init)
    full.train()
    assert (tmp_path / "full" / "checkpoint-1" / "atm_init.json").is_file()

    checkpoint = str(tmp_path / "full" / "checkpoint-1")
    again = ATMTrainer(tiny_classifier(dropout=0.1, seed=99), training_args(tmp_path / "again", **args),
                       task_datasets=tasks, atm_config=config, **init)
    without = ATMTrainer(tiny_classifier(dropout=0.1, seed=98), training_args(tmp_path / "without", **args),
                         task_datasets=tasks, atm_config=config)
    for resumed in (again, without):
        assert resumed.train(resume_from_checkpoint=checkpoint).global_step == 12
        assert_same_weights(resumed.model, full.model)
        assert resumed.init_record == full.init_record  # adopted from the checkpoint when not given
    assert (tmp_path / "without" / "checkpoint-3" / "atm_init.json").is_file()

    other = ATMTrainer(copy.deepcopy(base), training_args(tmp_path / "other", **args), task_datasets=tasks,
                       atm_config=config, init_from={"method": "task_arithmetic", "scaling": 0.5},
                       init_experts=experts)
    with pytest.raises(ValueError, match="started from a merge with .*tsv_m.* but this trainer's init_from is "
                                         ".*task_arithmetic"):
        other.train(resume_from_checkpoint=checkpoint)
    plain = tmp_path / "plain" / "checkpoint-1"  # a run that started from the model given to its trainer
    shutil.copytree(checkpoint, plain)
    (plain / "atm_init.json").unlink()
    refined = ATMTrainer(tiny_classifier(), training_args(tmp_path / "plain", **args), task_datasets=tasks,
                         atm_config=config, init_from=tiny_classifier(seed=7))
    with pytest.raises(ValueError, match="started from the model given to the trainer, but .* is model weights"):
        refined.train(resume_from_checkpoint=True)


# --------------------------------------------------------------------------------------------- DDP and example
def test_two_process_ddp_matches_a_single_process_run_with_the_same_global_batch(tmp_path, atm_one_process_result):
    """``accelerate launch`` with two CPU processes (DDP over gloo) gives the parameters of one process."""
    from safetensors.torch import load_file

    distributed = tmp_path / "ddp.safetensors"
    run_launched(accelerate_launch() + [str(REPO / "tests" / "atm_ddp_script.py"), "--per-device-batch-size", "4",
                                        "--expect-world-size", "2", "--result", str(distributed)],
                 timeout=180, check=True)
    expected, got = load_file(atm_one_process_result), load_file(distributed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-5, rtol=1e-5), name


def test_example_runs_offline(tmp_path):
    result = run_launched([sys.executable, str(REPO / "examples" / "atm_training.py"), "--output-dir", str(tmp_path)],
                          timeout=120, check=True, capture_output=True, text=True)
    assert "ATM" in result.stdout
    assert (tmp_path / "final" / "config.json").is_file()
