"""LoRA extraction from full fine-tunes (issue 19, deliverable 1): hf_merge.extract_lora, its CLI, and
merge(..., output="lora") of full models."""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path

import pytest
import torch

import hf_merge
from hf_merge.extract import energy_rank, truncated_factors
from tests.helpers import rel_error, tiny_llama_without_gqa
from tests.tiny_models import finetuned_copy, logits, tiny_gpt2, tiny_llama

_PREFIX = "base_model.model."


# ------------------------------------------------------------------------------------------------ helpers
def _gpt2_finetune(base: torch.nn.Module, seed: int, *, biases: bool = False) -> torch.nn.Module:
    """A GPT-2 "fine-tune"; its Conv1D biases are the base's unless ``biases`` (LoRA cannot hold their change)."""
    tuned = finetuned_copy(base, seed)
    if not biases:
        reference = dict(base.named_parameters())
        with torch.no_grad():
            for name, param in tuned.named_parameters():
                if name.endswith(".bias") and ".ln_" not in name:
                    param.copy_(reference[name])
    return tuned


def _pair(name: str, tmp_path: Path) -> tuple[torch.nn.Module, torch.nn.Module, Path, Path]:
    """(base, fine-tune, base folder, fine-tune folder) of a tiny model: the extraction streams from the folders."""
    base = {"llama": tiny_llama, "gpt2": tiny_gpt2}[name]()
    tuned = _gpt2_finetune(base, 1) if name == "gpt2" else finetuned_copy(base, 1)
    base.save_pretrained(tmp_path / f"{name}_base")
    tuned.save_pretrained(tmp_path / f"{name}_ft")
    return base, tuned, tmp_path / f"{name}_base", tmp_path / f"{name}_ft"


def _extract(*args, **kwargs):
    """extract_lora with progress bars off and the expected warnings (no license, tied embeddings) silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(license|tied to the input embedding|leaves out base).*")
        return hf_merge.extract_lora(*args, progress=False, **kwargs)


def _load_peft(base: torch.nn.Module, folder: Path) -> torch.nn.Module:
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()


def _adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _updates(folder: Path) -> dict[str, torch.Tensor]:
    """ΔW = B A of every LoRA module of a saved adapter, in PEFT's (out, in) layout ((num, dim) for embeddings)."""
    tensors = _adapter_tensors(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] and config["alpha_pattern"] == config["rank_pattern"]  # scaling 1
    out = {}
    for module in config["target_modules"]:
        prefix = f"{_PREFIX}{module}."
        if prefix + "lora_embedding_A" in tensors:
            a, b = tensors[prefix + "lora_embedding_A"], tensors[prefix + "lora_embedding_B"]
            out[module] = (b.double() @ a.double()).T
        else:
            out[module] = tensors[prefix + "lora_B.weight"].double() @ tensors[prefix + "lora_A.weight"].double()
    return out


def _deltas(base: torch.nn.Module, tuned: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Float64 W_ft − W₀ of every weight, by module name, in PEFT's (out, in) layout (Conv1D transposed)."""
    from transformers.pytorch_utils import Conv1D

    tuned_modules = dict(tuned.named_modules())
    out = {}
    for name, module in base.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D, torch.nn.Embedding)):
            delta = (tuned_modules[name].weight.double() - module.weight.double()).detach()
            out[name] = delta.T if isinstance(module, Conv1D) else delta
    return out


def _best(delta: torch.Tensor, k: int) -> torch.Tensor:
    """The float64 truncated SVD of ``delta`` at rank k (Eckart–Young)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def _config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


# ------------------------------------------------------------------------------------- full-rank reproduction
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_full_rank_adapter_reproduces_the_finetune_in_peft_and_transformers(tmp_path, name):
    base, tuned, base_dir, ft_dir = _pair(name, tmp_path)
    out = _extract(base_dir, ft_dir, rank=64, output_dir=tmp_path / "adapter")
    expected = logits(name, tuned)
    torch.testing.assert_close(logits(name, _load_peft(base, out)), expected, rtol=1e-4, atol=1e-5)
    model = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_adapter(str(out), adapter_name="extracted")
    torch.testing.assert_close(logits(name, model.eval()), expected, rtol=1e-4, atol=1e-5)
    # weights: every module's B A is its update, and the saved norms are the fine-tune's
    for module, update in _updates(Path(out)).items():
        assert rel_error(update, _deltas(base, tuned)[module]) < 1e-5, module
    config = _config(Path(out))
    assert config["task_type"] == "CAUSAL_LM" and config["fan_in_fan_out"] == (name == "gpt2")
    norms = [n for n, _ in base.named_modules() if n.endswith(("norm", "layernorm", "ln_1", "ln_2", "ln_f"))]
    assert sorted(config["modules_to_save"]) == sorted(norms)
    saved = _adapter_tensors(Path(out))
    for module in norms:
        torch.testing.assert_close(saved[f"{_PREFIX}{module}.weight"], dict(tuned.named_modules())[module].weight)


def test_folders_stream_without_loading_either_model(tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    _, tuned, base_dir, ft_dir = _pair("llama", tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("a whole model was loaded")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(torch, "load", refuse)
    adapter = _extract(base_dir, ft_dir, rank=2)
    assert set(adapter.ranks.values()) == {2} and len(adapter.ranks) == 16


def test_merge_and_unload_of_an_untied_model_gives_the_finetunes_weights(tmp_path):
    base = tiny_llama_without_gqa(tie_word_embeddings=False)
    tuned = finetuned_copy(base, 3)
    out = _extract(base, tuned, rank=64, output_dir=tmp_path / "adapter")
    merged = _load_peft(base, out).merge_and_unload()
    for key, value in tuned.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    assert "lm_head" in _config(Path(out))["target_modules"]  # an untied output projection is a linear module


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_other_architectures_are_reproduced_at_full_rank(name):
    """BERT (a classification head, no PEFT task type) and ViT (in-memory names differ from the checkpoint's; its
    learned tokens and patch convolution are saved whole under ``vit.embeddings``)."""
    from tests.tiny_models import FACTORIES

    base = FACTORIES[name]()
    tuned = finetuned_copy(base, 1)
    modules = dict(tuned.named_modules())
    with torch.no_grad():  # the base's Linear biases: LoRA cannot hold their change
        for param_name, param in tuned.named_parameters():
            if param_name.endswith(".bias") and isinstance(modules[param_name[:-5]], torch.nn.Linear):
                param.copy_(base.get_parameter(param_name))
    adapter = _extract(base, tuned, rank=64)
    assert adapter.adapter_config["task_type"] is None and "classifier" in adapter.adapter_config["target_modules"]
    model = adapter.to_peft_model(copy.deepcopy(base)).eval()
    torch.testing.assert_close(logits(name, model), logits(name, tuned), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------- Eckart–Young at rank k
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_rank_k_factors_are_the_float64_truncated_svd(tmp_path, name):
    base, tuned, base_dir, ft_dir = _pair(name, tmp_path)
    out = Path(_extract(base_dir, ft_dir, rank=3, output_dir=tmp_path / "adapter"))
    deltas = _deltas(base, tuned)
    modules = json.loads((out / "merge_config.json").read_text())["summary"]["lora_extraction"]["modules"]
    for module, update in _updates(out).items():
        delta = deltas.get(module, deltas.get("transformer.wte" if name == "gpt2" else "model.embed_tokens"))
        assert rel_error(update, _best(delta, 3)) < 1e-4, module
        s = torch.linalg.svdvals(delta)
        assert modules[module] == {"rank": 3, "energy": pytest.approx(float((s[:3] ** 2).sum() / (s**2).sum()),
                                                                        abs=1e-5)}


def _spectrum_matrix(rows: int, cols: int, singular_values: list[float], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    r = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, r, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, r, generator=generator, dtype=torch.float64))
    s = torch.tensor(singular_values + [0.0] * (r - len(singular_values)), dtype=torch.float64)
    return ((u * s) @ v.T).float()


_ROUTES = {
    # k ≤ r/4 with λ_k ≥ 1e-3 λ_1: the float32 Gram eigensolve is accepted
    "float32 Gram": ([10.0, 9.0, 8.0, 7.0] + [1.0 / (i + 1) for i in range(60)], 4, ["float32"]),
    # k ≤ r/4 but λ_k < 1e-3 λ_1: float32 refused, float64 Gram accepted
    "float64 Gram after float32": ([1.0, 0.5, 0.1, 0.01] + [1e-3 / (i + 1) for i in range(60)], 4,
                                   ["float32", "float64"]),
    # k > r/4: the float64 Gram directly
    "float64 Gram": ([0.9 ** i for i in range(64)], 40, ["float64"]),
    # rank-deficient (λ_k ≈ 0): both Gram tiers refused, the full float32 SVD
    "full SVD": ([5.0, 4.0, 3.0, 2.0, 1.0], 8, ["float32", "float64", "svd"]),
}


@pytest.mark.parametrize("route", list(_ROUTES))
@pytest.mark.parametrize("wide", [False, True], ids=["tall", "wide"])
def test_every_linalg_route_matches_a_float64_svd(monkeypatch, route, wide):
    import hf_merge.linalg as linalg

    spectrum, k, expected_route = _ROUTES[route]
    delta = _spectrum_matrix(96, 64, spectrum, seed=len(route))
    delta = delta.T.contiguous() if wide else delta
    taken: list[str] = []
    top_eigh, svd = linalg._top_eigh, torch.linalg.svd
    monkeypatch.setattr(linalg, "_top_eigh", lambda grams, kk: taken.append(str(grams.dtype)[6:]) or
                        top_eigh(grams, kk))
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **kw: taken.append("svd") or svd(*a, **kw))
    factors, kept = truncated_factors(delta, rank=k)
    monkeypatch.undo()
    assert taken == expected_route
    reference = _best(delta, k)
    assert factors.rank == k and rel_error(factors.dense().double(), reference) < 2e-5
    s = torch.linalg.svdvals(delta.double())
    assert kept == pytest.approx(float((s[:k] ** 2).sum() / (s**2).sum()), rel=1e-5)
    # balanced factors: B = U √S, A = √S Vᵀ, so BᵀB = A Aᵀ = S
    torch.testing.assert_close(factors.P.T @ factors.P, factors.Q @ factors.Q.T, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 1.0])
def test_energy_rank_is_the_smallest_rank_keeping_the_fraction(energy):
    delta = _spectrum_matrix(80, 48, [0.8 ** i for i in range(48)], seed=5)
    s2 = torch.linalg.svdvals(delta.double()) ** 2
    fractions = torch.cumsum(s2, 0) / s2.sum()
    expected = int((fractions < energy - 1e-12).sum()) + 1
    assert energy_rank(delta, energy) == energy_rank(delta.T, energy) == min(expected, 48)
    factors, kept = truncated_factors(delta, energy=energy)
    assert factors.rank == min(expected, 48) and kept >= energy - 1e-6
    assert truncated_factors(torch.zeros(5, 3), rank=2)[0].rank == 0  # an unchanged module gets no factors


def test_energy_sets_per_module_ranks_in_rank_pattern(tmp_path):
    base, tuned, base_dir, ft_dir = _pair("llama", tmp_path)
    out = Path(_extract(base_dir, ft_dir, energy=0.6, output_dir=tmp_path / "adapter"))
    config, deltas = _config(out), _deltas(base, tuned)
    model = _load_peft(base, out)
    lora_modules = {n: m for n, m in model.named_modules() if "default" in (getattr(m, "r", None) or {})}
    for module in config["target_modules"]:
        delta = deltas.get(module, deltas["model.embed_tokens"])
        s2 = torch.linalg.svdvals(delta) ** 2
        expected = int(((torch.cumsum(s2, 0) / s2.sum()) < 0.6 - 1e-12).sum()) + 1
        pattern = re.escape(module)
        assert config["rank_pattern"].get(pattern, config["r"]) == expected, module
        if pattern in config["rank_pattern"]:
            assert config["rank_pattern"][pattern] != config["r"]
        peft_module = next(m for n, m in lora_modules.items() if n.endswith(module))
        assert peft_module.r["default"] == expected and peft_module.scaling["default"] == 1.0
    assert len(set(config["rank_pattern"].values()) | {config["r"]}) > 1  # the ranks do differ


def test_rank_mapping_gives_per_module_ranks(tmp_path):
    base, tuned, base_dir, ft_dir = _pair("llama", tmp_path)
    out = Path(_extract(base_dir, ft_dir, rank={"q_proj": 2, "embed_tokens": 3, ".*": 5},
                        output_dir=tmp_path / "adapter"))
    adapter_ranks = {m: r for m, r in _config(out)["rank_pattern"].items()}
    assert _config(out)["r"] == 5
    assert adapter_ranks == {**{re.escape(f"model.layers.{i}.self_attn.q_proj"): 2 for i in range(2)},
                             re.escape("model.embed_tokens"): 3, "lm_head": 3}
    model = _load_peft(base, out)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.r["default"] == 2
    assert model.base_model.model.model.layers[0].mlp.up_proj.r["default"] == 5
    with pytest.raises(ValueError, match="rank gives no rank for module 'model.layers.0.self_attn.k_proj'"):
        _extract(base_dir, ft_dir, rank={"q_proj": 2, "embed_tokens": 3, "lm_head": 3, "_proj": 4},
                 targets=["q_proj", "k_proj"])


# ----------------------------------------------------------------------------------------------- embeddings
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_embeddings_saved_whole_reproduce_the_finetune_and_merge_cleanly(tmp_path, name):
    base, tuned, base_dir, ft_dir = _pair(name, tmp_path)
    out = Path(_extract(base_dir, ft_dir, rank=64, embeddings="save", output_dir=tmp_path / "adapter"))
    config = _config(out)
    embedding, output = ("transformer.wte", "lm_head") if name == "gpt2" else ("model.embed_tokens", "lm_head")
    assert {embedding, output} <= set(config["modules_to_save"])
    assert not any("embed" in m or "wte" in m or "wpe" in m or m == "lm_head" for m in config["target_modules"])
    model = _load_peft(base, out)
    torch.testing.assert_close(logits(name, model), logits(name, tuned), rtol=1e-4, atol=1e-5)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(name, merged), logits(name, tuned), rtol=1e-4, atol=1e-5)


def test_embeddings_as_lora_factors_use_peft_embedding_names_and_cover_the_tied_head(tmp_path):
    base, tuned, base_dir, ft_dir = _pair("llama", tmp_path)
    with pytest.warns(UserWarning, match="lm_head.weight is tied to the input embedding"):
        out = Path(hf_merge.extract_lora(base_dir, ft_dir, rank=4, output_dir=tmp_path / "adapter", progress=False,
                                         license="mit"))
    tensors = _adapter_tensors(out)
    assert tensors[f"{_PREFIX}model.embed_tokens.lora_embedding_A"].shape == (4, 128)
    assert tensors[f"{_PREFIX}model.embed_tokens.lora_embedding_B"].shape == (32, 4)
    # the tied head repeats the table's factors as a Linear LoRA: B A = (B_e A_e)ᵀ
    updates = _updates(out)
    torch.testing.assert_close(updates["lm_head"], updates["model.embed_tokens"])


def test_skipped_embeddings_are_left_out(tmp_path):
    base, tuned, base_dir, ft_dir = _pair("gpt2", tmp_path)
    out = Path(_extract(base_dir, ft_dir, rank=64, embeddings="skip", output_dir=tmp_path / "adapter"))
    config = _config(out)
    assert not {"transformer.wte", "transformer.wpe", "lm_head"} & set(config["target_modules"])
    assert not {"transformer.wte", "transformer.wpe"} & set(config["modules_to_save"])
    summary = json.loads((out / "merge_config.json").read_text())["summary"]["lora_extraction"]
    assert summary["left_out"] == ["transformer.wpe", "transformer.wte"]
    reverted = copy.deepcopy(tuned)
    with torch.no_grad():
        reverted.transformer.wte.weight.copy_(base.transformer.wte.weight)
        reverted.transformer.wpe.weight.copy_(base.transformer.wpe.weight)
    torch.testing.assert_close(logits("gpt2", _load_peft(base, out)), logits("gpt2", reverted), rtol=1e-4,
                               atol=1e-5)


def test_changed_biases_of_extracted_modules_are_left_out_with_a_warning(tmp_path):
    base = tiny_gpt2()
    tuned = _gpt2_finetune(base, 2, biases=True)
    with pytest.warns(UserWarning, match=r"cannot hold the changes of 8 tensor\(s\).*transformer\.h\.0\.attn\."
                                         r"c_attn\.bias"):
        adapter = hf_merge.extract_lora(base, tuned, rank=64, progress=False)
    assert len(adapter.summary["lora_extraction"]["dropped"]) == 8
    reverted = _gpt2_finetune(base, 2)  # the same fine-tune with the base's Conv1D biases
    model = adapter.to_peft_model(copy.deepcopy(base)).eval()
    torch.testing.assert_close(logits("gpt2", model), logits("gpt2", reverted), rtol=1e-4, atol=1e-5)


def test_unchanged_modules_get_no_factors(tmp_path):
    base = tiny_llama()
    tuned = finetuned_copy(base, 4)
    with torch.no_grad():
        tuned.model.layers[1].mlp.down_proj.weight.copy_(base.model.layers[1].mlp.down_proj.weight)
        tuned.model.norm.weight.copy_(base.model.norm.weight)
    adapter = _extract(base, tuned, rank=4)
    assert "model.layers.1.mlp.down_proj" not in adapter.adapter_config["target_modules"]
    assert "model.norm" not in adapter.adapter_config["modules_to_save"]
    assert adapter.summary["lora_extraction"]["unchanged"] == ["model.layers.1.mlp.down_proj"]
    assert set(adapter.ranks.values()) == {4}


# ------------------------------------------------------------------------------------------------- targets
def test_targets_select_linear_modules_by_name_or_regex(tmp_path):
    base, tuned, base_dir, ft_dir = _pair("llama", tmp_path)
    by_name = _extract(base_dir, ft_dir, rank=2, targets=["q_proj", "v_proj"], embeddings="skip")
    expected = sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))
    assert by_name.adapter_config["target_modules"] == expected
    by_regex = _extract(base_dir, ft_dir, rank=2, targets=r".*\.(q|v)_proj", embeddings="skip")
    assert by_regex.adapter_config["target_modules"] == expected
    left_out = by_name.summary["lora_extraction"]["left_out"]
    assert "model.layers.0.mlp.up_proj" in left_out and "model.embed_tokens" in left_out
    model = by_name.to_peft_model(copy.deepcopy(base))
    assert sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                  if type(m).__name__ == "Linear" and hasattr(m, "lora_A")) == expected


# ------------------------------------------------------------------------------------- output="lora" of merges
def test_task_arithmetic_of_full_finetunes_as_an_adapter_equals_the_dense_merge(tmp_path):
    base = tiny_llama()
    finetunes = [finetuned_copy(base, seed) for seed in (1, 2)]
    dense = hf_merge.merge(base, finetunes, "task_arithmetic", scaling=0.5, progress=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(license|tied to the input embedding).*")
        out = Path(hf_merge.merge(base, finetunes, "task_arithmetic", scaling=0.5, output="lora", energy=1.0,
                                  output_dir=tmp_path / "adapter", progress=False))
    torch.testing.assert_close(logits("llama", _load_peft(base, out)), logits("llama", dense), rtol=1e-4, atol=1e-5)
    assert hf_merge.MergeConfig.from_pretrained(out).scaling == 0.5
    card = (out / "README.md").read_text()
    assert "from the merge of 2 fine-tuned models" in card and "Task Arithmetic" in card
    summary = json.loads((out / "merge_config.json").read_text())["summary"]["lora_extraction"]
    assert summary["source"] == "merge" and summary["energy"] == 1.0


def test_ties_of_full_finetunes_as_an_adapter_is_the_truncated_svd_of_merged_minus_base():
    base = tiny_gpt2()
    finetunes = [_gpt2_finetune(base, seed) for seed in (1, 2)]
    dense = hf_merge.merge(base, finetunes, "ties", density=0.3, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = hf_merge.merge(base, finetunes, "ties", density=0.3, output="lora", rank=3, progress=False)
    ranked = {k: v for k, v in adapter.tensors.items() if ".c_fc." in k}
    a = ranked[f"{_PREFIX}transformer.h.0.mlp.c_fc.lora_A.weight"].double()
    b = ranked[f"{_PREFIX}transformer.h.0.mlp.c_fc.lora_B.weight"].double()
    delta = (dense.transformer.h[0].mlp.c_fc.weight - base.transformer.h[0].mlp.c_fc.weight).double().T
    assert rel_error(b @ a, _best(delta, 3)) < 1e-4


def test_output_lora_of_full_models_needs_a_rank_or_an_energy():
    base = tiny_llama()
    with pytest.raises(ValueError, match=r"output='lora' of full fine-tuned models.*exactly one of rank="):
        hf_merge.merge(base, [finetuned_copy(base, 1)], "task_arithmetic", scaling=1.0, output="lora",
                       progress=False)


# ---------------------------------------------------------------------------- record, card, push, re-extraction
def test_record_and_card_describe_the_extraction(tmp_path):
    base, tuned, base_dir, ft_dir = _pair("llama", tmp_path)
    out = Path(_extract(base_dir, ft_dir, rank=4, output_dir=tmp_path / "adapter",
                        base_model={"base": "org/tiny-llama"}))
    config = hf_merge.MergeConfig.from_pretrained(out)
    assert config.method == "task_arithmetic" and config.scaling == 1.0
    summary = json.loads((out / "merge_config.json").read_text())["summary"]["lora_extraction"]
    assert summary["rank"] == 4 and summary["source"] == "finetune" and len(summary["modules"]) == 16
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "org/tiny-llama" and card.data.base_model_relation == "adapter"
    assert "lora-extraction" in card.data.tags and "merge" not in card.data.tags
    assert "extracted with hf-merge from the full fine-tune `llama_ft`" in card.text
    assert "| model.layers.*.self_attn.q_proj | 2 | 4 |" in card.text
    assert "eckart1936approximation" in card.text and "hu2022lora" in card.text
    assert _config(out)["base_model_name_or_path"] == "org/tiny-llama"


def test_in_memory_adapter_saves_and_pushes_like_a_merged_adapter(tmp_path, monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub import ModelCard

    from tests.hub_server import HubTestServer

    base = tiny_llama()
    adapter = _extract(base, finetuned_copy(base, 1), rank=2)
    assert isinstance(adapter, hf_merge.MergedAdapter)
    folder = Path(adapter.save_pretrained(tmp_path / "saved"))
    assert json.loads((folder / "merge_config.json").read_text())["summary"]["lora_extraction"]["rank"] == 2
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with HubTestServer(token="hf_test") as hub:
        adapter.push_to_hub("me/extracted", token="hf_test", endpoint=hub.endpoint, license="mit",
                            base_model={"base": "org/tiny-llama"})
        files = hub.files("me/extracted")
    assert {"adapter_config.json", "adapter_model.safetensors", "merge_config.json", "README.md"} <= set(files)
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "peft" and card.data.license == "mit" and "Extraction" in card.text


def test_a_lora_adapter_is_re_extracted_at_a_lower_rank(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    dense = copy.deepcopy(peft_model).merge_and_unload()
    adapter = _extract(base, tmp_path / "adapter", rank=2)
    assert adapter.adapter_config["target_modules"] == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    b = adapter.tensors[f"{_PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"].double()
    a = adapter.tensors[f"{_PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"].double()
    delta = dense.model.layers[0].self_attn.q_proj.weight.double() - base.model.layers[0].self_attn.q_proj.weight
    assert rel_error(b @ a, _best(delta, 2)) < 1e-4


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_extracts_an_adapter(tmp_path, capsys):
    from hf_merge.cli import main

    base, tuned, base_dir, ft_dir = _pair("llama", tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["extract-lora", str(base_dir), str(ft_dir), str(tmp_path / "out"), "--rank", "q_proj=2",
                     "--rank", "6", "--targets", "q_proj", "k_proj", "--embeddings", "save", "--quiet"])
    assert code == 0 and capsys.readouterr().out == ""
    config = _config(tmp_path / "out")
    assert config["r"] == 6 and set(config["rank_pattern"].values()) == {2}
    assert {"model.embed_tokens", "lm_head"} <= set(config["modules_to_save"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["extract-lora", str(base_dir), str(ft_dir), str(tmp_path / "energy"), "--energy", "0.9"]) == 0
    assert "Extracted a LoRA adapter" in capsys.readouterr().out
    assert main(["extract-lora", str(base_dir), str(ft_dir), str(tmp_path / "out2"), "--rank", "0"]) == 2
    assert "rank must be a positive integer" in capsys.readouterr().err
    assert main(["extract-lora", str(base_dir), str(ft_dir), str(tmp_path / "out"), "--rank", "4"]) == 0  # ours
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["extract-lora", str(base_dir), str(ft_dir), str(tmp_path / "mine"), "--rank", "4"]) == 2
    assert "already holds files hf_merge did not write" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- faults
def _mismatched_finetune() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=True)).eval()


FAULTS = {
    "rank zero": (dict(rank=0), ValueError, "rank must be a positive integer"),
    "rank negative": (dict(rank=-3), ValueError, "rank must be a positive integer"),
    "rank not an int": (dict(rank=2.5), ValueError, "rank must be a positive integer"),
    "rank mapping to zero": (dict(rank={"q_proj": 0}), ValueError, "rank must be a positive integer"),
    "energy zero": (dict(energy=0.0), ValueError, r"energy must be a number in \(0, 1\]"),
    "energy above one": (dict(energy=1.5), ValueError, r"energy must be a number in \(0, 1\]"),
    "both rank and energy": (dict(rank=4, energy=0.9), ValueError, "exactly one of rank="),
    "neither rank nor energy": ({}, ValueError, "exactly one of rank="),
    "targets match nothing": (dict(rank=4, targets=["q_prj"]), ValueError, r"targets \['q_prj'\] match no linear"),
    "targets regex matches nothing": (dict(rank=4, targets="nothing.*"), ValueError, "matches no linear module"),
    "targets bad regex": (dict(rank=4, targets="(q"), ValueError, "targets: '\\(q' is not a valid regular"),
    "bad embeddings mode": (dict(rank=4, embeddings="full"), ValueError, "embeddings must be one of"),
    "unknown keyword": (dict(rank=4, scaling=2.0), TypeError, r"unexpected keyword argument\(s\) \['scaling'\]"),
    "vocabulary option": (dict(rank=4, tokenizer_source="union"), ValueError, "tokenizer_source"),
    "shape mismatch": (dict(rank=4, finetuned="mismatched"), hf_merge.MergeError,
                       r"Shape mismatch for 'model.layers.0.mlp.gate_proj.weight'"),
    "non-empty output_dir": (dict(rank=4, output_dir="foreign"), ValueError, "already holds files hf_merge did not"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_bad_input_raises_naming_the_parameter(tmp_path, fault):
    kwargs, error, message = FAULTS[fault]
    base = tiny_llama()
    kwargs = dict(kwargs)
    finetuned = _mismatched_finetune() if kwargs.pop("finetuned", None) == "mismatched" else finetuned_copy(base, 1)
    if kwargs.get("output_dir") == "foreign":
        (tmp_path / "foreign").mkdir()
        (tmp_path / "foreign" / "mine.txt").write_text("user data")
        kwargs["output_dir"] = tmp_path / "foreign"
    with pytest.raises(error, match=message):
        hf_merge.extract_lora(base, finetuned, progress=False, **kwargs)
    if fault == "non-empty output_dir":
        assert sorted(p.name for p in (tmp_path / "foreign").iterdir()) == ["mine.txt"]
