"""Mixture-of-Experts assembly from dense fine-tunes (:mod:`hf_merge.moe`, mergekit-moe's method).

A tiny Llama base with a 40-token word-level tokenizer built in code reads three prompt families of disjoint words
(``alpha``, ``beta``, ``gamma``); like a pre-trained model, it embeds each family's words near one another. Three
experts are the base with its MLPs trained (a few SGD steps) on one family each. The MoE assembled from them with
``gate_mode="hidden"`` must send held-out prompts of each family to that family's expert, must hold the base's
attention, norms and embeddings and the experts' MLPs exactly, and must load with ``AutoModelForCausalLM`` with no
missing or unexpected keys.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import hf_merge
from hf_merge.errors import MergeError
from hf_merge.io.publish import OutputFolderError
from hf_merge.io.sources import FolderSource
from hf_merge.moe import MoEConfig, gate_vectors, is_moe_recipe, read_moe_recipe, run_moe_recipe
from tests import tiny_models
from tests.helpers import push_to_test_hub

FAMILIES = {name: [f"{name[0]}{i}" for i in range(12)] for name in ("alpha", "beta", "gamma")}
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
WORDS = SPECIALS + [word for words in FAMILIES.values() for word in words]
#: Routing prompts use each family's first 8 words; the held-out prompts also its last 4.
SEEN = 8
#: The measured share of held-out tokens (every layer) whose top-1 expert is their family's must reach this.
MIN_ROUTING_ACCURACY = 0.9
PROMPTS = {name: [" ".join(words[(i + j) % SEEN] for j in range(5)) for i in range(6)] for name, words in FAMILIES.items()}
NEGATIVES = {"alpha": ["b0 b1 b2 g0 g1"]}
#: The card's warnings about local inputs without Hub ids and unknown licenses are expected here.
pytestmark = pytest.mark.filterwarnings("ignore:The model card:UserWarning")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def _base() -> torch.nn.Module:
    """A Llama whose embeddings cluster by family (each word = its family's direction + noise)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2, pad_token_id=3)).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for words in FAMILIES.values():
            direction = torch.randn(32, generator=generator) * 0.05
            for word in words:
                model.model.embed_tokens.weight[WORDS.index(word)] = direction + 0.02 * torch.randn(32, generator=generator)
    return model


def _sequences(words: list[str], count: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([WORDS.index(w) for w in words])
    return ids[torch.randint(0, len(words), (count, length), generator=generator)]


def _expert(base: torch.nn.Module, words: list[str], seed: int) -> torch.nn.Module:
    """The base with its MLPs trained for a few SGD steps on sequences of ``words``."""
    model = copy.deepcopy(base).train()
    parameters = [p for name, p in model.named_parameters() if ".mlp." in name]
    optimizer = torch.optim.SGD(parameters, lr=0.2)
    for step in range(20):
        batch = _sequences(words, 16, 8, seed * 100 + step)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
    base = _base()
    return base, {name: _expert(base, words, seed) for seed, (name, words) in enumerate(FAMILIES.items(), start=1)}


@pytest.fixture(scope="module")
def folders(models, tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("moe_inputs")
    base, experts = models
    base.save_pretrained(root / "base")
    _tokenizer().save_pretrained(root / "base")
    for name, model in experts.items():
        model.save_pretrained(root / name)
    return root / "base", {name: root / name for name in experts}


@pytest.fixture(scope="module")
def moe(folders, tmp_path_factory) -> Path:
    """The Mixtral assembled with hidden-state gates from the three experts' folders."""
    base_dir, experts = folders
    out = tmp_path_factory.mktemp("moe") / "mixtral"
    result = hf_merge.assemble_moe(base_dir, experts, prompts=PROMPTS, negative_prompts=NEGATIVES, output_dir=out,
                                   progress=False)
    assert result == str(out)
    return out


def _load(folder: Path) -> torch.nn.Module:
    """The folder loaded with AutoModelForCausalLM, which must report no missing, unexpected or mismatched keys."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model.eval()


def _held_out(words: list[str], bos: bool = True) -> torch.Tensor:
    ids = _sequences(words, 12, 6, seed=99)
    return torch.cat([torch.ones(len(ids), 1, dtype=torch.long), ids], dim=1) if bos else ids


def _top1(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``(layers, batch, tokens)``: each token's top-1 expert in each layer."""
    with torch.no_grad():
        logits = model(input_ids=ids, output_router_logits=True).router_logits
    return torch.stack([layer.reshape(*ids.shape, -1).argmax(-1) for layer in logits])


# ------------------------------------------------------------------------------------------------ routing
def test_experts_specialise_on_their_family(models) -> None:
    base, experts = models
    for name, words in FAMILIES.items():
        batch = _sequences(words, 16, 8, seed=5)
        with torch.no_grad():
            losses = {e: float(m(input_ids=batch, labels=batch).loss) for e, m in {"base": base, **experts}.items()}
        assert losses[name] == min(losses.values()), (name, losses)


def test_hidden_gates_route_each_family_to_its_expert(moe) -> None:
    model = _load(moe)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.num_local_experts == 3 and model.config.num_experts_per_tok == 2
    correct = total = 0
    for index, words in enumerate(FAMILIES.values()):
        top1 = _top1(model, _held_out(words))[:, :, 1:]  # the BOS token is every family's: not counted
        correct += int((top1 == index).sum())
        total += top1.numel()
    accuracy = correct / total
    print(f"\nMoE routing accuracy (held-out tokens, top-1 expert is the family's, every layer): {accuracy:.3f}")
    assert accuracy >= MIN_ROUTING_ACCURACY


def test_one_expert_per_token_computes_the_routed_expert(folders, models) -> None:
    """With top-1 routing, a prompt whose every token goes to one expert in every layer gets that expert's logits
    (the experts differ from the base in their MLPs only)."""
    base_dir, experts = folders
    moe = hf_merge.assemble_moe(base_dir, experts, prompts=PROMPTS, experts_per_token=1, progress=False)
    checked = 0
    for index, (name, words) in enumerate(FAMILIES.items()):
        ids = _held_out(words, bos=False)
        routed = (_top1(moe, ids) == index).all(0).all(-1)
        with torch.no_grad():
            ours, theirs = moe(input_ids=ids[routed]).logits, models[1][name](input_ids=ids[routed]).logits
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        checked += int(routed.sum())
    assert checked >= 12


def test_hidden_gates_are_mergekits_formula(moe, models) -> None:
    """Router row of expert e in layer l: mean over its prompts of the base's hidden_states[l] at the last token of
    "<s>" + prompt, minus the same for its negative prompts, normalised (mergekit's get_gate_params)."""
    base, _ = models
    tokenizer = _tokenizer()

    def mean_state(prompts: list[str]) -> torch.Tensor:
        states = []
        for prompt in prompts:
            ids = tokenizer("<s>" + prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            assert ids[0, 0] == 1 and WORDS[int(ids[0, 1])] == prompt.split()[0]
            with torch.no_grad():
                hidden = base(input_ids=ids, output_hidden_states=True).hidden_states
            states.append(torch.stack([hidden[layer][0, -1] for layer in range(2)]))
        return torch.stack(states).mean(0)

    written = FolderSource(moe)
    for index, name in enumerate(FAMILIES):
        expected = mean_state(PROMPTS[name])
        if name in NEGATIVES:
            expected = expected - mean_state(NEGATIVES[name])
        expected = expected / expected.norm(dim=-1, keepdim=True)
        for layer in range(2):
            row = written.get(f"model.layers.{layer}.block_sparse_moe.gate.weight")[index]
            torch.testing.assert_close(row, expected[layer], atol=1e-5, rtol=1e-5)


def test_qwen2_moe_shared_expert_gate_comes_from_its_prompts(moe, folders, models, tmp_path) -> None:
    """The shared expert's sigmoid gate row is computed from its prompts like the routers' rows, which are the
    Mixtral's for the same prompts."""
    from hf_merge.io.sources import ModelSource

    base_dir, experts = folders
    shared_prompts = ["a0 b0 g0", "a1 b1 g1"]
    out = hf_merge.assemble_moe(base_dir, experts, prompts={**PROMPTS, "shared_expert": shared_prompts},
                                negative_prompts=NEGATIVES, shared_expert=base_dir, output_dir=tmp_path / "qwen",
                                progress=False)
    model, written, mixtral = _load(Path(out)), FolderSource(out), FolderSource(moe)
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and model.config.shared_expert_intermediate_size == 64
    base = models[0]
    expected = gate_vectors("hidden", [(shared_prompts, [])], base=ModelSource(base), config=base.config,
                            tokenizer=_tokenizer())
    for layer in range(2):
        torch.testing.assert_close(written.get(f"model.layers.{layer}.mlp.shared_expert_gate.weight"),
                                   expected[layer])
        assert torch.equal(written.get(f"model.layers.{layer}.mlp.gate.weight"),
                           mixtral.get(f"model.layers.{layer}.block_sparse_moe.gate.weight"))
        assert torch.equal(written.get(f"model.layers.{layer}.mlp.shared_expert.down_proj.weight"),
                           base.model.layers[layer].mlp.down_proj.weight)
    assert "| shared_expert | base | local folder | unknown | 2 | 0 |" in (Path(out) / "README.md").read_text()


# ------------------------------------------------------------------------------------------------ weights and record
def test_weights_are_the_bases_and_the_experts_mlps(moe, folders) -> None:
    base_dir, experts = folders
    base, written = FolderSource(base_dir), FolderSource(moe)
    sources = [FolderSource(folder) for folder in experts.values()]
    projections = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
    routers = 0
    for key in written.keys():
        parts = key.split(".")
        if "experts" in parts:
            layer, expert, proj = parts[2], int(parts[5]), parts[6]
            expected = sources[expert].get(f"model.layers.{layer}.mlp.{projections[proj]}.weight")
        elif key.endswith("block_sparse_moe.gate.weight"):
            routers += 1
            continue
        else:
            expected = base.get(key)  # attention, norms, embeddings, LM head
        assert torch.equal(written.get(key), expected), key
    assert routers == 2
    assert len(written.keys()) == len(base.keys()) - 2 * 3 + 2 * (3 * 3 + 1)  # dense MLPs out, experts and routers in


def test_record_card_and_tokenizer(moe) -> None:
    from huggingface_hub import ModelCard
    from transformers import AutoTokenizer

    config = MoEConfig.from_pretrained(moe)
    assert config.architecture == "mixtral" and config.gate_mode == "hidden" and config.experts_per_token == 2
    assert config.experts["alpha"] == {"positive_prompts": PROMPTS["alpha"], "negative_prompts": NEGATIVES["alpha"]}
    assert json.loads((moe / "merge_config.json").read_text())["method"] == "moe"
    card = ModelCard.load(moe / "README.md")
    assert {"moe", "mixture-of-experts", "hf-merge"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "text-generation" and card.data.library_name == "transformers"
    assert "| alpha | alpha | local folder | unknown | 6 | 1 |" in card.text
    assert "| beta | beta | local folder | unknown | 6 | 0 |" in card.text
    assert "| base | base | local folder | unknown | — | — |" in card.text
    assert "gate mode **`hidden`**" in card.text and "**2** of the 3 experts" in card.text
    assert card.text.lstrip().startswith("# 3-expert Mixtral")
    assert "`MixtralForCausalLM`" in card.text and "arXiv:2401.04088" in card.text
    assert AutoTokenizer.from_pretrained(moe).get_vocab() == _tokenizer().get_vocab()  # the base's tokenizer


def test_a_folder_output_is_pushed_with_its_card(moe, monkeypatch) -> None:
    from huggingface_hub import ModelCard

    files = push_to_test_hub(moe, "me/tiny-moe", "--base-model", "base=org/tiny-llama", "--base-model",
                             "alpha=org/tiny-alpha", "--license", "mit", monkeypatch=monkeypatch)
    assert {"model.safetensors", "config.json", "merge_config.json", "README.md", "tokenizer.json"} <= set(files)
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == ["org/tiny-llama", "org/tiny-alpha"] and card.data.license == "mit"
    assert "License of this model: `mit`." in card.text
    published = card.text + files["merge_config.json"].decode()
    assert str(moe.parent) not in published and "/tmp/" not in published  # no local path is published


# ------------------------------------------------------------------------------------------------ gate modes
@pytest.mark.parametrize("mode", ["cheap_embed", "hidden_avg", "random", "uniform_random"])
def test_other_gate_modes_load_and_run(mode, folders, tmp_path) -> None:
    base_dir, experts = folders
    out = hf_merge.assemble_moe(base_dir, experts, gate_mode=mode, prompts=PROMPTS, output_dir=tmp_path / mode,
                                seed=3, progress=False, base_model={"base": "org/base"})
    model = _load(Path(out))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=_held_out(FAMILIES["beta"])).logits).all()
    gates = torch.stack([FolderSource(out).get(f"model.layers.{i}.block_sparse_moe.gate.weight") for i in range(2)])
    if mode == "cheap_embed":  # the normalised sum of the prompts' embeddings, in every layer
        table = FolderSource(base_dir).get("model.embed_tokens.weight")
        ids = torch.tensor([[1] + [WORDS.index(w) for w in p.split()] for p in PROMPTS["gamma"]])
        expected = table[ids].sum((0, 1))
        torch.testing.assert_close(gates[0, 2], expected / expected.norm())
        assert torch.equal(gates[0], gates[1])
    if mode in ("random", "uniform_random"):  # seeded
        again = gate_vectors(mode, [([], [])] * 3, base=None, config=_load(Path(out)).config, seed=3)
        assert torch.equal(gates, again)
    if mode == "uniform_random":
        assert gates.abs().max() <= 32 ** -0.5


def _architecture_inputs(family: str) -> tuple[torch.nn.Module, dict[str, torch.nn.Module], torch.nn.Module]:
    base = {"llama": tiny_models.tiny_llama, "mistral": tiny_models.tiny_mistral, "qwen2": tiny_models.tiny_qwen2,
            "qwen3": tiny_models.tiny_qwen3}[family]()
    experts = {f"e{i}": tiny_models.finetuned_copy(base, seed=i) for i in range(3)}
    return base, experts, tiny_models.finetuned_copy(base, seed=7)


@pytest.mark.parametrize(("family", "architecture"), [
    ("llama", "mixtral"), ("mistral", "mixtral"), ("llama", "qwen2_moe"), ("qwen2", "qwen2_moe"), ("qwen3", "qwen3_moe"),
])
def test_each_architecture_loads_with_the_experts_and_shared_expert(family, architecture, tmp_path) -> None:
    base, experts, shared = _architecture_inputs(family)
    qwen2 = architecture == "qwen2_moe"
    out = hf_merge.assemble_moe(base, experts, gate_mode="random", architecture=architecture,
                                shared_expert=shared if qwen2 else None, output_dir=tmp_path / "moe", progress=False)
    model = _load(Path(out))
    assert type(model).__name__ == {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                                    "qwen3_moe": "Qwen3MoeForCausalLM"}[architecture]
    assert model.config.tie_word_embeddings == base.config.tie_word_embeddings
    assert (model.config.sliding_window or None) == (getattr(base.config, "sliding_window", None) or None)
    written = FolderSource(out)
    expert_key = ("model.layers.1.block_sparse_moe.experts.2.w2.weight" if architecture == "mixtral" else
                  "model.layers.1.mlp.experts.2.down_proj.weight")
    assert torch.equal(written.get(expert_key), experts["e2"].model.layers[1].mlp.down_proj.weight)
    assert torch.equal(written.get("model.layers.1.self_attn.q_proj.weight"), base.model.layers[1].self_attn.q_proj.weight)
    if qwen2:
        assert torch.equal(written.get("model.layers.0.mlp.shared_expert.up_proj.weight"),
                           shared.model.layers[0].mlp.up_proj.weight)
        assert written.meta("model.layers.0.mlp.shared_expert_gate.weight").shape == (1, 32)
        assert written.has("model.layers.0.self_attn.q_proj.bias") == (family == "qwen2")
    with torch.no_grad():
        logits = model(input_ids=torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))).logits
    assert torch.isfinite(logits).all()


def test_in_memory_output_is_the_model(models) -> None:
    base, experts = models
    moe = hf_merge.assemble_moe(base, experts, prompts=PROMPTS, tokenizer=_tokenizer(), progress=False)
    assert type(moe).__name__ == "MixtralForCausalLM"
    assert torch.equal(moe.model.embed_tokens.weight, base.model.embed_tokens.weight)


# ------------------------------------------------------------------------------------------------ recipes
def test_mergekit_moe_recipe(folders, tmp_path, capsys) -> None:
    import os

    import yaml

    base_dir, experts = folders
    recipe = {
        "base_model": os.path.relpath(base_dir, tmp_path), "gate_mode": "hidden", "dtype": "bfloat16",
        "experts_per_token": 1,
        "experts": [{"source_model": os.path.relpath(folder, tmp_path), "positive_prompts": PROMPTS[name],
                     **({"negative_prompts": NEGATIVES[name]} if name in NEGATIVES else {})}
                    for name, folder in experts.items()],
    }
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(recipe))
    assert is_moe_recipe(yaml.safe_load(path.read_text()))
    assert not is_moe_recipe({"merge_method": "ties", "base_model": "b", "models": []})
    read = read_moe_recipe(path)
    assert read.base == str(base_dir) and list(read.experts.values()) == [str(f) for f in experts.values()]
    assert read.config.experts_per_token == 1 and read.options == {"dtype": "bfloat16"}
    out = run_moe_recipe(path, tmp_path / "out", progress=False)
    model = _load(Path(out))
    assert model.config.num_experts_per_tok == 1 and model.dtype == torch.bfloat16

    from hf_merge.cli import main  # the same recipe through hf-merge merge, detected by its keys

    assert main(["merge", str(path), str(tmp_path / "cli"), "--quiet"]) == 0
    state, from_cli = _load(Path(out)).state_dict(), _load(tmp_path / "cli").state_dict()
    assert all(torch.equal(from_cli[k], state[k]) for k in state)
    assert main(["check", str(path)]) == 2
    assert "do not check MoE recipes yet" in capsys.readouterr().err


@pytest.mark.parametrize(("change", "message"), [
    ({"experts": [{"source_model": "alpha", "noise_scale": 0.1}]}, "noise_scale is not supported"),
    ({"gate_mod": "hidden"}, "did you mean 'gate_mode'"),
    ({"architecture": "deepseek"}, "architecture 'deepseek' is not supported"),
    ({"shared_experts": [{"source_model": "alpha"}, {"source_model": "beta"}]}, "a list of one expert"),
    ({"experts": [{"source_model": "alpha", "positive_prompts": "a0 a1"}]}, "must be a list of strings"),
    ({"experts": [{"source_model": "alpha"}], "experts_per_token": 1}, "has no positive prompts"),
])
def test_recipe_faults_are_named(change, message, folders) -> None:
    base_dir, experts = folders
    recipe = {"base_model": "base", "experts": [{"source_model": name, "positive_prompts": PROMPTS[name]}
                                                 for name in experts], **change}
    with pytest.raises(ValueError, match=message):
        read_moe_recipe(recipe, root=base_dir.parent)


# ------------------------------------------------------------------------------------------------ faults
def test_faults_are_refused_by_name(models, folders, tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    base, experts = models
    base_dir, expert_dirs = folders
    tokenizer = _tokenizer()
    with pytest.raises(ValueError, match=r"Unknown MoE architecture 'deepseek'.*mixtral \(from llama, mistral\)"):
        hf_merge.assemble_moe(base, experts, gate_mode="random", architecture="deepseek")
    with pytest.raises(MergeError, match="No MoE architecture is assembled from a 'gpt2' base"):
        hf_merge.assemble_moe(tiny_models.tiny_gpt2(), [tiny_models.tiny_gpt2()], gate_mode="random",
                              experts_per_token=1)
    with pytest.raises(MergeError, match="qwen3_moe MoE is assembled from qwen3"):
        hf_merge.assemble_moe(base, experts, gate_mode="random", architecture="qwen3_moe")
    wide = LlamaForCausalLM(LlamaConfig(**{**base.config.to_dict(), "intermediate_size": 48}))
    with pytest.raises(MergeError, match=r"Shape mismatch for 'model\.layers\.0\.mlp\.(gate|up)_proj\.weight'.*'wide'"):
        hf_merge.assemble_moe(base, {**experts, "wide": wide}, gate_mode="random")
    with pytest.raises(ValueError, match="the 'gamma' expert has no positive prompts"):
        hf_merge.assemble_moe(base, experts, prompts={k: PROMPTS[k] for k in ("alpha", "beta")}, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"prompts names \['delta'\]"):
        hf_merge.assemble_moe(base, experts, prompts={**PROMPTS, "delta": ["a0"]}, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="has no tokenizer files: give tokenizer="):
        hf_merge.assemble_moe(base, experts, prompts=PROMPTS)
    with pytest.raises(ValueError, match=r"experts_per_token=4 but there are only 3 experts"):
        hf_merge.assemble_moe(base, experts, gate_mode="random", experts_per_token=4)
    with pytest.raises(ValueError, match="Every expert has the same prompts"):
        hf_merge.assemble_moe(base, experts, prompts={k: ["a0 b0"] for k in experts}, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="give shared_expert="):
        hf_merge.assemble_moe(base, experts, gate_mode="random", architecture="qwen2_moe")
    with pytest.raises(ValueError, match="mixtral MoE has no shared expert"):
        hf_merge.assemble_moe(base, experts, gate_mode="random", architecture="mixtral", shared_expert=base)
    with pytest.raises(ValueError, match=r"cannot honour the option\(s\) \['memory_budget'\]"):
        hf_merge.assemble_moe(base, experts, gate_mode="random", memory_budget="1GB")
    with pytest.raises(MergeError, match="have no place in a MixtralForCausalLM"):
        biased = LlamaForCausalLM(LlamaConfig(**{**base.config.to_dict(), "attention_bias": True}))
        hf_merge.assemble_moe(biased, [copy.deepcopy(biased) for _ in range(2)], gate_mode="random")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(OutputFolderError, match="already holds files hf_merge did not write"):
        hf_merge.assemble_moe(base_dir, expert_dirs, prompts=PROMPTS, output_dir=out, progress=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    with pytest.raises(OutputFolderError, match="contains the input"):
        hf_merge.assemble_moe(base_dir, expert_dirs, prompts=PROMPTS, output_dir=base_dir.parent, progress=False)
