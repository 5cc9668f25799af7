"""Layer stacking (:mod:`hf_merge.stack`): passthrough slices, depth up-scaling, merged slices, scale filters, the
config's per-layer settings, mergekit's slices recipes, and the refusals.

References are built by hand in torch: the source models' decoder layers deep-copied and assembled into a model of
the stacked config, whose outputs the written stack must reproduce exactly.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import hf_merge
from hf_merge.cli import main
from hf_merge.errors import MergeError
from hf_merge.io.publish import OutputFolderError
from hf_merge.stack import StackConfig, stacked_config
from tests.tiny_models import finetuned_copy

LAYERS = 8


def _llama(seed: int, *, tied: bool = False, hidden: int = 16) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=tied)).eval()


def _qwen3(seed: int) -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=32, sliding_window=3, use_sliding_window=True,
        max_window_layers=3, layer_types=["sliding_attention", "full_attention", "full_attention"] * 2,
        tie_word_embeddings=False)).eval()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """Checkpoint folders: two unrelated 8-layer Llamas ``a`` and ``b``, ``a_ft`` (a fine-tune of ``a``), a tied
    Llama, a wider Llama (other shapes) and a Qwen3 with sliding-window layers."""
    root = tmp_path_factory.mktemp("stack_zoo")
    a = _llama(0)
    models = {"a": a, "b": _llama(1), "a_ft": finetuned_copy(a, 7, scale=0.05), "tied": _llama(2, tied=True),
              "wide": _llama(3, hidden=32), "qwen3": _qwen3(4)}
    for name, model in models.items():
        model.save_pretrained(root / name)
    return {name: root / name for name in models}


@pytest.fixture
def load(zoo):
    from transformers import AutoModelForCausalLM

    return lambda name: AutoModelForCausalLM.from_pretrained(zoo[name]).eval()


def _assembled(first: torch.nn.Module, layers: list[torch.nn.Module], last: torch.nn.Module,
               **config: object) -> torch.nn.Module:
    """A model of ``first``'s class and config with ``layers`` (deep copies, renumbered), ``first``'s embeddings and
    ``last``'s final norm and head (mergekit's rule)."""
    model = copy.deepcopy(first)
    model.model.layers = torch.nn.ModuleList(copy.deepcopy(layer) for layer in layers)
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = index
    model.model.norm = copy.deepcopy(last.model.norm)
    if not model.config.tie_word_embeddings:
        model.lm_head = copy.deepcopy(last.lm_head)
    model.config.num_hidden_layers = len(layers)
    for key, value in config.items():
        setattr(model.config, key, value)
    return model


def _same_outputs(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids, output_hidden_states=True, use_cache=False)
        theirs = reference(ids, output_hidden_states=True, use_cache=False)
    assert len(ours.hidden_states) == len(theirs.hidden_states)
    for mine, expected in zip(ours.hidden_states, theirs.hidden_states):
        torch.testing.assert_close(mine, expected, rtol=0, atol=0)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=0)


def _weights(folder: str | Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


# ----------------------------------------------------------------------------------------- depth up-scaling
def test_depth_up_scaled_llama_equals_the_hand_built_stack(zoo, load, tmp_path):
    from transformers import AutoModelForCausalLM

    out = hf_merge.stack_layers([(str(zoo["a"]), 0, 6), (str(zoo["b"]), 2, 8)], output_dir=tmp_path / "dus",
                                progress=False)
    assert out == str(tmp_path / "dus")
    stacked = AutoModelForCausalLM.from_pretrained(out).eval()
    assert stacked.config.num_hidden_layers == 12
    a, b = load("a"), load("b")
    reference = _assembled(a, [*a.model.layers[0:6], *b.model.layers[2:8]], b)
    _same_outputs(stacked, reference)

    written = _weights(out)
    assert torch.equal(written["model.layers.6.mlp.up_proj.weight"], b.model.layers[2].mlp.up_proj.weight)
    assert torch.equal(written["model.embed_tokens.weight"], a.model.embed_tokens.weight)
    assert not any(".layers.12." in key for key in written)
    record = json.loads((Path(out) / "merge_config.json").read_text())
    assert record["method"] == "passthrough" and record["slices"][1]["sources"][0]["layer_range"] == [2, 8]
    assert isinstance(hf_merge.MergeConfig.from_pretrained(out), StackConfig)
    card = (Path(out) / "README.md").read_text()
    assert "| 1 | 6–11 |" in card and "layers 2–7" in card and "- passthrough" in card


def test_a_stack_in_memory_with_embeddings_from_and_tied_weights(zoo, load):
    stacked = hf_merge.stack_layers([(str(zoo["tied"]), 0, 3), (str(zoo["a"]), 5, 8)],
                                    embeddings_from=str(zoo["tied"]), progress=False)
    tied, a = load("tied"), load("a")
    assert type(stacked).__name__ == "LlamaForCausalLM" and stacked.config.num_hidden_layers == 6
    assert stacked.config.tie_word_embeddings
    assert stacked.lm_head.weight.data_ptr() == stacked.model.embed_tokens.weight.data_ptr()
    reference = _assembled(tied, [*tied.model.layers[0:3], *a.model.layers[5:8]], tied)
    _same_outputs(stacked, reference)
    assert isinstance(stacked.merge_config, StackConfig)


def test_a_self_stack_of_one_model_objects_and_state_dicts(zoo, load):
    a = load("a")
    stacked = hf_merge.stack_layers([(a, 0, 4), (a, 2, 8)], progress=False)
    assert stacked.config.num_hidden_layers == 10
    _same_outputs(stacked, _assembled(a, [*a.model.layers[0:4], *a.model.layers[2:8]], a))
    state = hf_merge.stack_layers([(a.state_dict(), 6, 8)], progress=False)
    assert isinstance(state, dict) and torch.equal(state["model.layers.1.self_attn.q_proj.weight"],
                                                   a.model.layers[7].self_attn.q_proj.weight)


# ----------------------------------------------------------------------------------------- merged slices
def test_a_slice_merged_with_slerp_equals_slerp_of_those_layers(zoo, tmp_path):
    a, b = str(zoo["a"]), str(zoo["a_ft"])
    out = hf_merge.stack_layers(
        [(a, 0, 4), {"sources": [(a, 4, 8), (b, 4, 8)], "method": "slerp", "parameters": {"t": 0.3}}],
        output_dir=tmp_path / "stack", progress=False)
    slerp = _weights(hf_merge.merge(a, [b], "slerp", t=0.3, output_dir=tmp_path / "slerp", progress=False))
    assert hf_merge.MergeConfig.from_pretrained(out).slices[1]["merge"] == hf_merge.SlerpConfig(t=0.3)
    ours, original = _weights(out), _weights(a)
    assert ours.keys() == slerp.keys()
    for key, value in ours.items():
        if ".layers." in key and int(key.split(".layers.")[1].split(".")[0]) < 4 or "embed_tokens" in key:
            assert torch.equal(value, original[key]), key  # copied, and the embeddings from the first slice
        else:
            assert torch.equal(value, slerp[key]), key  # merged, and the final norm and head from the last slice


def test_a_gradient_spreads_over_the_slice_as_in_mergekit(zoo):
    """mergekit's t of the k-th of n layers of a slice is k / (n − 1), whatever the slice's position."""
    a, b = str(zoo["a"]), str(zoo["a_ft"])
    state = hf_merge.stack_layers(
        [{"sources": [(a, 2, 6), (b, 2, 6)], "method": "slerp", "parameters": {"t": hf_merge.Schedule([0.0, 1.0])}}],
        progress=False).state_dict()
    for k in range(4):
        expected = hf_merge.merge(a, [b], "slerp", t=k / 3, progress=False).state_dict()
        key = "model.layers.{}.mlp.down_proj.weight"
        torch.testing.assert_close(state[key.format(k)], expected[key.format(2 + k)], rtol=0, atol=1e-7)


def test_scaled_and_merged_slices_together(zoo, load):
    """A config holding a Schedule (a scale) keeps every slice as given; the merged slice's θ₀ is its first source."""
    a, b = str(zoo["a"]), str(zoo["a_ft"])
    stacked = hf_merge.stack_layers(
        [{"sources": [(a, 0, 2)], "scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]},
         {"sources": [(a, 2, 4), (b, 2, 4)], "method": "slerp", "parameters": {"t": 0.5}}], progress=False)
    ours = stacked.state_dict()
    expected = hf_merge.merge(a, [b], "slerp", t=0.5, progress=False).state_dict()
    assert not ours["model.layers.1.self_attn.o_proj.weight"].any()
    assert torch.equal(ours["model.layers.3.mlp.up_proj.weight"], expected["model.layers.3.mlp.up_proj.weight"])
    assert stacked.merge_config.slices[1].get("base", a) == a


def test_an_average_slice_without_base_merges_every_source(zoo, load):
    a, b = str(zoo["a"]), str(zoo["a_ft"])
    stacked = hf_merge.stack_layers([{"sources": [(a, 0, 2), (b, 0, 2)], "method": "average", "base": None}],
                                    progress=False)
    ours, la, lb = stacked.state_dict(), load("a").state_dict(), load("a_ft").state_dict()
    key = "model.layers.1.self_attn.v_proj.weight"
    torch.testing.assert_close(ours[key], (la[key] + lb[key]) / 2, rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------------------- scale, config
def test_scale_filters_multiply_the_copied_tensors(zoo, tmp_path):
    scale = hf_merge.Schedule([{"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.0},
                               {"value": 1.0}])
    out = hf_merge.stack_layers([(str(zoo["a"]), 0, 8), {"sources": [(str(zoo["b"]), 4, 8)], "scale": scale},
                                 {"sources": [(str(zoo["b"]), 6, 8)], "scale": 0.5}],
                                output_dir=tmp_path / "scaled", progress=False)
    ours, a, b = _weights(out), _weights(zoo["a"]), _weights(zoo["b"])
    assert torch.equal(ours["model.layers.3.self_attn.o_proj.weight"], a["model.layers.3.self_attn.o_proj.weight"])
    for layer in range(8, 12):
        assert not ours[f"model.layers.{layer}.self_attn.o_proj.weight"].any()
        assert not ours[f"model.layers.{layer}.mlp.down_proj.weight"].any()
        assert torch.equal(ours[f"model.layers.{layer}.mlp.up_proj.weight"],
                           b[f"model.layers.{layer - 4}.mlp.up_proj.weight"])
    assert torch.equal(ours["model.layers.13.mlp.up_proj.weight"], b["model.layers.7.mlp.up_proj.weight"] * 0.5)
    assert torch.equal(ours["lm_head.weight"], b["lm_head.weight"] * 0.5)  # the last slice's head, scaled with it
    recorded = hf_merge.MergeConfig.from_pretrained(out)
    assert recorded.slices[1]["scale"] == scale and recorded.slices[2]["scale"] == 0.5


def test_a_qwen3_stack_slices_layer_types_consistently(zoo, load, tmp_path):
    from transformers import AutoModelForCausalLM

    q = str(zoo["qwen3"])
    out = hf_merge.stack_layers([(q, 0, 4), (q, 2, 6)], output_dir=tmp_path / "q", progress=False)
    config = json.loads((Path(out) / "config.json").read_text())
    types = ["sliding_attention", "full_attention", "full_attention"] * 2
    assert config["num_hidden_layers"] == 8 and config["layer_types"] == types[0:4] + types[2:6]
    assert config["max_window_layers"] == 3  # layers 0, 1, 2 of the source lead the stack
    source = load("qwen3")
    reference = _assembled(source, [*source.model.layers[0:4], *source.model.layers[2:6]], source,
                           layer_types=config["layer_types"], max_window_layers=3)
    _same_outputs(AutoModelForCausalLM.from_pretrained(out).eval(), reference)


def test_stacked_config_remaps_index_lists_and_thresholds():
    configs = {"m": {"num_hidden_layers": 4, "mlp_only_layers": [1, 3], "first_k_dense_replace": 2,
                     "no_rope_layers": [1, 0, 1, 0]}}
    out = stacked_config({"num_hidden_layers": 4}, configs, "m", [("m", 0), ("m", 1), ("m", 1), ("m", 3)])
    assert out == {"num_hidden_layers": 4, "mlp_only_layers": [1, 2, 3], "first_k_dense_replace": 3,
                   "no_rope_layers": [1, 0, 0, 0]}
    with pytest.raises(ValueError, match="first_k_dense_replace"):
        stacked_config({}, configs, "m", [("m", 3), ("m", 0)])  # a dense layer after a sparse one


# ----------------------------------------------------------------------------------------- mergekit recipes
def test_a_mergekit_slices_recipe_through_read_recipe_and_the_cli(zoo, tmp_path, capsys):
    recipe = {"slices": [{"sources": [{"model": str(zoo["a"]), "layer_range": [0, 6]}]},
                         {"sources": [{"model": str(zoo["b"]), "layer_range": [2, 8]}],
                          "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]}}],
              "merge_method": "passthrough", "dtype": "bfloat16"}
    read = hf_merge.read_recipe(recipe, root=tmp_path)
    assert isinstance(read.config, StackConfig) and read.base is None and set(read.models) == {str(zoo["a"]),
                                                                                          str(zoo["b"])}
    from_python = _weights(read.merge(tmp_path / "python", progress=False))
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "recipe.yml"), str(tmp_path / "cli"), "--quiet"]) == 0
    from_cli, b = _weights(tmp_path / "cli"), _weights(zoo["b"])
    assert from_cli.keys() == from_python.keys() and all(torch.equal(from_cli[k], from_python[k]) for k in from_cli)
    assert from_cli["model.layers.7.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert torch.equal(from_cli["model.layers.7.mlp.up_proj.weight"],
                       b["model.layers.3.mlp.up_proj.weight"].to(torch.bfloat16))
    assert not from_cli["model.layers.7.self_attn.o_proj.weight"].any()
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["num_hidden_layers"] == 12
    assert main(["check", str(tmp_path / "recipe.yml")]) == 2
    assert "do not check layer stacks (slices) yet" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- refusals
def _fault_rows(zoo: dict[str, Path]) -> dict:
    a, b, wide = str(zoo["a"]), str(zoo["b"]), str(zoo["wide"])
    return {
        "out-of-bounds": ([(a, 4, 9)], ValueError, ["slices[0].sources[0]", "out of bounds", "8 layers"]),
        "empty-range": ([(a, 0, 6), (b, 5, 5)], ValueError, ["slices[1].sources[0]", "[5, 5]", "start < end"]),
        "different-layer-counts": ([{"sources": [(a, 0, 4), (b, 0, 3)], "method": "slerp",
                                     "parameters": {"t": 0.5}}], ValueError,
                                   ["slices[0]", "different numbers of layers", "[4, 3]"]),
        "mismatching-shapes": ([(a, 0, 4), (wide, 4, 8)], MergeError,
                               ["slices[1].sources[0]", "wide", "shape mismatch",
                                "model.layers.4."]),
        "unknown-model": ([(a, 0, 4), (str(zoo["a"].parent / "nowhere"), 0, 4)], OSError, ["nowhere"]),
        "merged-without-method": ([{"sources": [(a, 0, 4), (b, 0, 4)]}], ValueError,
                                  ["slices[0]", "give its 'method'"]),
        "model-twice-in-a-slice": ([{"sources": [(a, 0, 2), (a, 2, 4)], "method": "average"}], ValueError,
                                   ["slices[0]", "listed twice"]),
    }


@pytest.mark.parametrize("row", ["out-of-bounds", "empty-range", "different-layer-counts", "mismatching-shapes",
                                 "unknown-model", "merged-without-method", "model-twice-in-a-slice"])
def test_a_refused_stack_names_the_culprit_and_writes_nothing(row, zoo, tmp_path):
    slices, error, expected = _fault_rows(zoo)[row]
    with pytest.raises(error) as raised:
        hf_merge.stack_layers(slices, output_dir=tmp_path / "out", progress=False)
    for text in expected:
        assert text in str(raised.value), (text, str(raised.value))
    assert list(tmp_path.iterdir()) == []


def test_an_architecture_without_a_layer_stack_is_refused(tmp_path):
    state = {"encoder.weight": torch.zeros(4, 4), "head.weight": torch.zeros(2, 4)}
    with pytest.raises(MergeError, match="no recognisable layer stack"):
        hf_merge.stack_layers([(state, 0, 1)], output_dir=tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_of_the_user_is_not_overwritten(zoo, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match="notes.txt"):
        hf_merge.stack_layers([(str(zoo["a"]), 0, 2)], output_dir=tmp_path / "out", progress=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


def test_passthrough_is_not_a_merge_of_fine_tuned_models(zoo):
    config = StackConfig(slices=[{"sources": [{"model": "a", "layer_range": [0, 2]}]}])
    with pytest.raises(ValueError, match="stack_layers"):
        hf_merge.merge(str(zoo["a"]), [str(zoo["b"])], config, progress=False)


def test_a_stacked_folder_is_pushed_with_its_slices_card(zoo, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    from tests.helpers import push_to_test_hub

    out = hf_merge.stack_layers([(str(zoo["a"]), 0, 6), (str(zoo["b"]), 2, 8)], output_dir=tmp_path / "dus",
                                progress=False)
    files = push_to_test_hub(out, "me/tiny-dus", "--base-model", "a=org/tiny-a", "--base-model", "b=org/tiny-b",
                             "--license", "mit", monkeypatch=monkeypatch)
    assert {"model.safetensors", "config.json", "merge_config.json", "README.md"} <= set(files)
    card = ModelCard(files["README.md"].decode())
    assert sorted(card.data.base_model) == ["org/tiny-a", "org/tiny-b"] and card.data.license == "mit"
    assert "| 1 | 6–11 |" in card.text and "layers 2–7" in card.text
    assert str(zoo["a"]) not in card.text and str(tmp_path) not in card.text  # no local path is published
