"""Vocabularies (``tokenizer_source``, ``tokenizer=``, ``tokenizer.tokens``, ``chat_template``): mergekit's semantics,
offline.

A tiny Llama base whose 24-token word-level tokenizer is built in code and whose embeddings are padded to 32 rows; two
fine-tunes that each added tokens (``resize_token_embeddings`` and their own tokenizer saved): ``a`` adds ``<tool>``,
``alpha`` and the special ``<|a|>`` (27 rows), ``b`` adds ``<tool>`` and ``beta`` (26 tokens, rows padded to 32). The
merged rows are compared with mergekit's rule written out by hand (``PermutedEmbeddings``): a token one model has is
that model's row in every model, a token the base has is the base's row in the models that lack it, a token several
models but not the base have is their mean; every model's row is then merged by the method. ``tokenizer.tokens``
overrides are checked row by row against Task Arithmetic written out by hand (θ₀ + λ Σ (θ_m − θ₀)).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import hf_merge
from hf_merge.mergekit import read_recipe

WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(21)]
BASE_ROWS = 32
SCALING = 0.7
BASE_TEMPLATE = "{% for m in messages %}base:{{ m['content'] }}{% endfor %}"
B_TEMPLATE = "{% for m in messages %}b:{{ m['content'] }}{% endfor %}"
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _tokenizer(template: str | None = None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def _base_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=BASE_ROWS, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                        max_position_embeddings=32, tie_word_embeddings=False)).eval()


def _finetune(base, tokenizer, added, seed: int, pad_to: int | None = None):
    """A copy of ``base`` with every weight moved a little, ``added`` tokens added (with new random rows) and its
    embeddings resized to the tokenizer's length (``pad_to``: padded to that multiple)."""
    import copy

    from transformers import AddedToken

    model = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    tokenizer.add_tokens([AddedToken(t, special=True) if t.startswith("<|") else t for t in added])
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad_to, mean_resizing=False)
    with torch.no_grad():  # the new (and padding) rows: random, distinct per model
        for matrix in (model.model.embed_tokens.weight, model.lm_head.weight):
            matrix[len(WORDS):] = torch.randn(matrix[len(WORDS):].shape, generator=generator)
    return model, tokenizer


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("vocab")
    base = _base_model()
    with torch.no_grad():  # the base's padding rows (24..31) differ from the fine-tunes'
        base.model.embed_tokens.weight[len(WORDS):] = 5.0
    base.save_pretrained(root / "base")
    _tokenizer(BASE_TEMPLATE).save_pretrained(root / "base")
    a, tok_a = _finetune(base, _tokenizer(), ["<tool>", "alpha", "<|a|>"], seed=1)
    b, tok_b = _finetune(base, _tokenizer(B_TEMPLATE), ["<tool>", "beta"], seed=2, pad_to=8)
    for name, model, tokenizer in (("a", a, tok_a), ("b", b, tok_b)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    same, _ = _finetune(base, _tokenizer(), [], seed=3)  # the base's vocabulary, saved without a tokenizer
    same.resize_token_embeddings(BASE_ROWS, mean_resizing=False)
    same.save_pretrained(root / "same")
    return root


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _vocab(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).get_vocab()


def _expected(folders: Path, out_vocab: dict[str, int], rows: int, key: str, names=("a", "b"),
              weights=(1.0, 1.0)) -> torch.Tensor:
    """mergekit's PermutedEmbeddings then Task Arithmetic (θ₀ + λ Σ w τ), row by row."""
    states = {name: _state(folders / name) for name in ("base", *names)}
    vocabs = {name: _vocab(folders / name) for name in ("base", *names)}
    spans = {name: max(v.values()) + 1 for name, v in vocabs.items()}
    length = max(out_vocab.values()) + 1
    token_of = {i: t for t, i in out_vocab.items()}
    expected = torch.empty(rows, states["base"][key].shape[1])
    for j in range(rows):
        own = {}
        for name in ("base", *names):
            matrix = states[name][key]
            if j < length:
                i = vocabs[name].get(token_of[j])
                if i is not None and i < matrix.shape[0]:
                    own[name] = matrix[i]
            elif spans[name] <= j < matrix.shape[0]:  # a padding row of that model
                own[name] = matrix[j]
        if len(own) == 1:
            fill = next(iter(own.values()))
        elif "base" in own:
            fill = own["base"]
        else:
            fill = torch.stack(list(own.values())).mean(0)
        rows_of = {name: own.get(name, fill) for name in ("base", *names)}
        expected[j] = rows_of["base"] + SCALING * sum(w * (rows_of[n] - rows_of["base"]) for n, w in zip(names, weights))
    return expected


def test_union_merges_every_token_as_mergekit_does(folders, tmp_path):
    out = tmp_path / "union"
    hf_merge.merge(str(folders / "base"), {"a": str(folders / "a"), "b": str(folders / "b")}, "task_arithmetic",
                   scaling=SCALING, tokenizer_source="union", output_dir=out, progress=False)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    vocab = tokenizer.get_vocab()
    recorded = json.loads((out / "merge_config.json").read_text())["summary"]["vocabulary"]
    assert recorded == {"tokenizer_source": "union", "rows": 32}  # the vocabulary choice is recorded
    sizes = {name: len(_vocab(folders / name)) for name in ("base", "a", "b")}
    assert sizes == {"base": 24, "a": 27, "b": 26}
    assert len(vocab) == 28  # 24 + <tool>, alpha, <|a|>, beta
    for name in ("base", "a", "b"):  # every token of every model has an id, and encodes to it
        for token in _vocab(folders / name):
            assert token in vocab
    text = "w3 <tool> alpha <|a|> beta w20"
    assert tokenizer.encode(text, add_special_tokens=False) == [vocab[t] for t in text.split()]
    assert vocab["<tool>"] == 24 and vocab["beta"] == 27
    assert tokenizer.decode([vocab["<|a|>"], vocab["w1"]], skip_special_tokens=True) == "w1"

    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == BASE_ROWS  # 28 tokens padded as the base is (32 rows)
    merged = _state(out)
    for key in (EMBED, HEAD):
        assert merged[key].shape == (BASE_ROWS, 16)
        expected = _expected(folders, vocab, BASE_ROWS, key)
        assert (merged[key] - expected).abs().max() < 1e-6, key
    a, b = _state(folders / "a"), _state(folders / "b")
    assert torch.equal(merged[EMBED][vocab["alpha"]], a[EMBED][25])  # only a has it: a's row
    assert torch.equal(merged[HEAD][vocab["beta"]], b[HEAD][25])  # only b has it: b's row
    mean = (a[EMBED][24] + b[EMBED][24]) / 2  # both, not the base: their mean (Task Arithmetic keeps it)
    assert (merged[EMBED][vocab["<tool>"]] - mean).abs().max() < 1e-6
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape == (BASE_ROWS, 16)
    assert model(torch.tensor([[vocab["beta"], vocab["w2"]]])).logits.shape == (1, 2, BASE_ROWS)
    assert tokenizer.chat_template.strip() == BASE_TEMPLATE  # the source's (the base's) template


def test_the_pre_merge_check_accepts_what_the_union_reconciles(folders):
    models = {"a": str(folders / "a"), "b": str(folders / "b")}
    union = hf_merge.check(str(folders / "base"), models, "task_arithmetic", scaling=SCALING, tokenizer_source="union")
    assert union.ok, str(union)
    with pytest.warns(UserWarning):  # by default the base's vocabulary: the added tokens are dropped, named
        assert hf_merge.check(str(folders / "base"), models, "task_arithmetic", scaling=SCALING).ok


def test_union_in_memory_output_has_the_union_vocabulary(folders):
    merged = hf_merge.merge(str(folders / "base"), {"a": str(folders / "a"), "b": str(folders / "b")},
                            "task_arithmetic", scaling=SCALING, tokenizer_source="union", progress=False)
    assert merged.config.vocab_size == BASE_ROWS and merged.get_input_embeddings().weight.shape == (BASE_ROWS, 16)
    vocab = merged.hf_merge_tokenizer.get_vocab()
    expected = _expected(folders, vocab, BASE_ROWS, EMBED)
    assert (merged.get_input_embeddings().weight.detach() - expected).abs().max() < 1e-6


def test_base_source_drops_the_tokens_the_base_lacks(folders, tmp_path):
    out = tmp_path / "base_source"
    with pytest.warns(UserWarning, match=r"'<tool>', 'alpha', '<\|a\|>'.*dropped|dropped.*'<tool>', 'alpha'"):
        hf_merge.merge(str(folders / "base"), {"a": str(folders / "a")}, "task_arithmetic", scaling=SCALING,
                       tokenizer_source="base", output_dir=out, progress=False)
    vocab = _vocab(out)
    assert vocab == _vocab(folders / "base")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == BASE_ROWS
    merged, base = _state(out), _state(folders / "base")
    for key in (EMBED, HEAD):
        expected = _expected(folders, vocab, BASE_ROWS, key, names=("a",))
        assert (merged[key] - expected).abs().max() < 1e-6
    assert torch.equal(merged[EMBED][24:], base[EMBED][24:])  # a's added rows dropped: the base's padding stays
    # the same without tokenizer_source: embedding rows that differ are matched to the base's tokens
    with pytest.warns(UserWarning, match="dropped"):
        again = hf_merge.merge(str(folders / "base"), {"a": str(folders / "a")}, "task_arithmetic",
                               scaling=SCALING, output_dir=tmp_path / "default", progress=False)
    assert torch.equal(_state(Path(again))[EMBED], merged[EMBED])


def test_a_named_input_as_source_and_its_chat_template(folders, tmp_path):
    out = tmp_path / "named"
    with pytest.warns(UserWarning, match="'alpha'"):
        hf_merge.merge(str(folders / "base"), {"a": str(folders / "a"), "b": str(folders / "b")}, "task_arithmetic",
                       scaling=SCALING, tokenizer_source=str(folders / "b"), output_dir=out, progress=False)
    vocab = _vocab(out)
    assert vocab == _vocab(folders / "b")
    rows = json.loads((out / "config.json").read_text())["vocab_size"]
    assert rows == 32  # b's rows (26 tokens padded to 32)
    merged = _state(out)
    for key in (EMBED, HEAD):
        assert (merged[key] - _expected(folders, vocab, rows, key)).abs().max() < 1e-6
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template.strip() == B_TEMPLATE


def test_chat_template_by_name_or_text(folders, tmp_path):
    from transformers import AutoTokenizer

    inputs = {"a": str(folders / "a"), "b": str(folders / "b")}
    out = hf_merge.merge(str(folders / "base"), inputs, "task_arithmetic", scaling=SCALING, tokenizer_source="union",
                         chat_template="b", output_dir=tmp_path / "by_name", progress=False)
    assert AutoTokenizer.from_pretrained(out).chat_template.strip() == B_TEMPLATE
    out = hf_merge.merge(str(folders / "base"), {"b": str(folders / "b"), "b2": str(folders / "b")}, "task_arithmetic",
                         scaling=SCALING, chat_template="auto", output_dir=tmp_path / "auto", progress=False)
    assert AutoTokenizer.from_pretrained(out).chat_template.strip() == B_TEMPLATE  # b's: 2 of 3 inputs
    text = "{% for m in messages %}mine:{{ m['content'] }}{% endfor %}"
    out = hf_merge.merge(str(folders / "base"), {"same": str(folders / "same")}, "task_arithmetic",
                         scaling=SCALING, chat_template=text, output_dir=tmp_path / "text", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == text and tokenizer.get_vocab() == _vocab(folders / "base")


def test_in_memory_base_gets_its_tokenizer_saved(folders, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    loaded = LlamaForCausalLM.from_pretrained(folders / "base")  # name_or_path: the base folder
    out = hf_merge.merge(loaded, {"same": str(folders / "same")}, "task_arithmetic", scaling=SCALING,
                         output_dir=tmp_path / "name_or_path", progress=False)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == _vocab(folders / "base")
    fresh = LlamaForCausalLM(loaded.config)  # name_or_path says nothing about a tokenizer
    fresh.config._name_or_path = ""
    fresh.load_state_dict(loaded.state_dict())
    out = hf_merge.merge(fresh, {"same": str(folders / "same")}, "task_arithmetic", scaling=SCALING,
                         tokenizer=_tokenizer(), output_dir=tmp_path / "given", progress=False)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == _vocab(folders / "base")
    out = hf_merge.merge(fresh, {"a": str(folders / "a")}, "task_arithmetic", scaling=SCALING,
                         tokenizer_source="union", tokenizer=str(folders / "base"), output_dir=tmp_path / "union",
                         progress=False)
    assert len(AutoTokenizer.from_pretrained(out)) == 27
    assert (_state(Path(out))[EMBED] - _expected(folders, _vocab(Path(out)), BASE_ROWS, EMBED, names=("a",))
            ).abs().max() < 1e-6


def test_mergekit_recipe_and_hf_merge_yaml(folders, tmp_path):
    from hf_merge.cli import main

    recipe = {"merge_method": "task_arithmetic", "base_model": str(folders / "base"), "tokenizer_source": "union",
              "chat_template": str(folders / "b"), "parameters": {"lambda": SCALING},
              "models": [{"model": str(folders / "a"), "parameters": {"weight": 1.0}},
                         {"model": str(folders / "b"), "parameters": {"weight": 1.0}}]}
    read = read_recipe(recipe)
    assert read.vocabulary == {"tokenizer_source": "union", "chat_template": str(folders / "b")}
    out = read.merge(tmp_path / "mergekit", progress=False)
    vocab = _vocab(Path(out))
    assert (_state(Path(out))[EMBED] - _expected(folders, vocab, BASE_ROWS, EMBED)).abs().max() < 1e-6
    tokenizer_key = {**recipe, "tokenizer_source": None, "tokenizer": {"source": str(folders / "b")}}
    assert read_recipe(tokenizer_key).vocabulary["tokenizer_source"] == str(folders / "b")
    assert read_recipe({**recipe, "tokenizer_source": None, "tokenizer": {}}).vocabulary["tokenizer_source"] == "union"
    assert read_recipe({**recipe, "tokenizer_source": str(folders / "base")}).vocabulary["tokenizer_source"] == "base"

    spec = {"method": "task_arithmetic", "base": str(folders / "base"), "parameters": {"scaling": SCALING},
            "models": {"a": str(folders / "a"), "b": str(folders / "b")}, "tokenizer_source": "union",
            "chat_template": "b", "output": str(tmp_path / "yaml")}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(spec))
    assert main(["merge", str(tmp_path / "recipe.yaml"), "--quiet"]) == 0
    assert torch.equal(_state(tmp_path / "yaml")[EMBED], _state(Path(out))[EMBED])


def _refused(tmp_path, call, *needles):
    out = tmp_path / "out"
    with pytest.raises((ValueError, TypeError)) as caught:
        call(out)
    message = " ".join(str(caught.value).split())
    for needle in needles:
        assert needle in message, message
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_fault_rows(folders, tmp_path):
    base, a, same = str(folders / "base"), str(folders / "a"), str(folders / "same")

    def merge(out, models, **keywords):
        return hf_merge.merge(base, models, "task_arithmetic", scaling=SCALING, output_dir=out, progress=False,
                              **keywords)

    _refused(tmp_path, lambda out: merge(out, {"a": a}, tokenizer_source="nope"), "tokenizer_source 'nope'",
             "names no input", "'a'")
    _refused(tmp_path, lambda out: merge(out, {"a": a, "same": same}, tokenizer_source="union"), "'union'",
             "input 'same'", "no tokenizer files")
    _refused(tmp_path, lambda out: merge(out, {"a": a}, tokenizer_source="union", chat_template="a"),
             "chat_template 'a'", "input 'a'", "no chat template")
    _refused(tmp_path, lambda out: merge(out, {"a": a}, chat_template="chatmlx"), "chat_template 'chatmlx'",
             "neither a Jinja template", "'chatml'", "'llama3'")
    _refused(tmp_path, lambda out: merge(out, {"a": a}, tokenizer={"zz": base}), "tokenizer= names ['zz']")
    from transformers import LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(a).save_pretrained(tmp_path / "notok")  # a's 27 rows, no tokenizer files
    _refused(tmp_path, lambda out: merge(out, {"notok": str(tmp_path / "notok")}), "input 'notok' has 27",
             "the base 32", "no tokenizer files")
    recipe = {"merge_method": "task_arithmetic", "base_model": base, "models": [{"model": a,
                                                                                  "parameters": {"weight": 1.0}}]}
    for bad, needles in (({"tokenizer_source": "elsewhere"}, ["tokenizer_source 'elsewhere'", "names no model"]),
                         ({"tokenizer": {"source": "union", "tokens": {"<x>": {"source": "elsewhere"}}}},
                          ["tokenizer.tokens['<x>'].source 'elsewhere'", "names no model"]),
                         ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "one"}}}}},
                          ["tokenizer.tokens['<x>'].source.kind", "'zero' or 'model_token'"]),
                         ({"chat_template": "chatmlx"}, ["chat_template 'chatmlx'", "'chatml'"]),
                         ({"tokenizer_source": "union", "tokenizer": {"source": "base"}}, ["not both"])):
        with pytest.raises(ValueError) as caught:
            read_recipe({**recipe, **bad})
        for needle in needles:
            assert needle in str(caught.value), str(caught.value)


# ------------------------------------------------------------------------------------------------ tokenizer.tokens
#: One override of each kind (``w3`` is id 6, ``w5`` id 8, ``w7`` id 10; ``</s>`` id 2).
TOKENS = {"alpha": {"source": {"kind": "zero"}},  # only a has it: a keeps its row, base and b hold zero
          "w3": {"source": {"kind": "zero"}, "force": True},  # forced: zero in every model, so in the output
          "w4": {"source": {"kind": "zero"}},  # every model has it: not forced, no effect
          "<tool>": {"source": "a"},  # a and b have it: the base holds a's row instead of their mean
          "beta": {"source": {"kind": "model_token", "model": "base", "token": "w5"}},  # base, a: base's w5 row
          "w7": {"source": {"kind": "model_token", "model": "a", "token_id": 2}, "force": True},  # a's row 2 everywhere
          "<new>": {"source": {"kind": "model_token", "model": "b", "token": "beta"}}}  # added: b's beta row everywhere


def _union_merge(folders: Path, out: Path, **keywords) -> Path:
    return Path(hf_merge.merge(str(folders / "base"), {"a": str(folders / "a"), "b": str(folders / "b")},
                               "task_arithmetic", scaling=SCALING, output_dir=out, progress=False, **keywords))


def _task_arithmetic(base_row: torch.Tensor, *rows: torch.Tensor) -> torch.Tensor:
    return base_row + SCALING * sum(row - base_row for row in rows)


def test_token_overrides_give_each_kind_its_row(folders, tmp_path):
    out = _union_merge(folders, tmp_path / "tokens", tokenizer={"source": "union", "tokens": TOKENS})
    plain = _union_merge(folders, tmp_path / "plain", tokenizer_source="union")
    vocab, plain_vocab = _vocab(out), _vocab(plain)
    assert vocab == {**plain_vocab, "<new>": 28}  # the token the vocabulary lacked is added, as mergekit adds it
    assert json.loads((out / "config.json").read_text())["vocab_size"] == BASE_ROWS
    merged, reference = _state(out), _state(plain)
    base, a, b = (_state(folders / name) for name in ("base", "a", "b"))
    for key in (EMBED, HEAD):  # the untied head's rows follow the same overrides
        row = {token: merged[key][vocab[token]] for token in TOKENS}
        assert torch.allclose(row["alpha"], SCALING * a[key][25], atol=1e-6)  # 0 + λ (a − 0 + 0 − 0)
        assert torch.equal(row["w3"], torch.zeros(16))
        assert torch.equal(row["w4"], reference[key][vocab["w4"]])
        assert torch.allclose(row["<tool>"], _task_arithmetic(a[key][24], a[key][24], b[key][24]), atol=1e-6)
        assert torch.allclose(row["beta"], _task_arithmetic(base[key][8], base[key][8], b[key][25]), atol=1e-6)
        assert torch.allclose(row["w7"], a[key][2], atol=1e-6)
        assert torch.allclose(row["<new>"], b[key][25], atol=1e-6)
        others = [j for t, j in vocab.items() if t not in TOKENS]  # every other token: as without overrides
        assert torch.equal(merged[key][others], reference[key][others])
        assert torch.allclose(reference[key][vocab["<tool>"]], (a[key][24] + b[key][24]) / 2, atol=1e-6)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.encode("w1 <new> beta", add_special_tokens=False) == [vocab["w1"], 28, vocab["beta"]]


def test_forced_override_replaces_the_merge_and_a_plain_one_only_fills(folders, tmp_path):
    def tool_row(force: bool) -> torch.Tensor:
        tokens = {"<tool>": {"source": "a", "force": force}}
        out = _union_merge(folders, tmp_path / str(force), tokenizer={"tokens": tokens})  # source: union by default
        return _state(out)[EMBED][_vocab(out)["<tool>"]]

    a, b = _state(folders / "a")[EMBED], _state(folders / "b")[EMBED]
    assert torch.equal(tool_row(True), a[24])  # every model holds a's row: the merge keeps it
    assert torch.allclose(tool_row(False), a[24] + SCALING * (b[24] - a[24]), atol=1e-6)  # only the base takes it


def test_override_adds_a_token_to_the_base_vocabulary(folders, tmp_path):
    with pytest.warns(UserWarning, match="dropped"):
        out = hf_merge.merge(str(folders / "base"), {"a": str(folders / "a")}, "task_arithmetic", scaling=SCALING,
                             tokenizer={"source": "base", "tokens": {"<|a|>": {"source": "a"}}},
                             output_dir=tmp_path / "base_source", progress=False)
    vocab = _vocab(Path(out))
    assert vocab == {**_vocab(folders / "base"), "<|a|>": 24}
    assert json.loads((Path(out) / "config.json").read_text())["vocab_size"] == BASE_ROWS  # within the padding
    merged, a = _state(Path(out)), _state(folders / "a")
    for key in (EMBED, HEAD):  # the base lacks it: it holds a's row, so the output has a's row
        assert torch.equal(merged[key][24], a[key][26])


def test_token_overrides_from_a_mergekit_recipe_and_the_hf_merge_yaml(folders, tmp_path):
    from hf_merge.cli import main

    base, a, b = str(folders / "base"), str(folders / "a"), str(folders / "b")
    tokens = {"<tool>": {"source": a}, "w3": {"source": {"kind": "zero"}, "force": True},
              "beta": {"source": {"kind": "model_token", "model": base, "token": "w5"}}}
    recipe = {"merge_method": "task_arithmetic", "base_model": base, "parameters": {"lambda": SCALING},
              "tokenizer": {"source": "union", "tokens": tokens},
              "models": [{"model": a, "parameters": {"weight": 1.0}}, {"model": b, "parameters": {"weight": 1.0}}]}
    read = read_recipe(recipe)
    assert read.vocabulary == {"tokenizer_source": "union", "tokenizer": {"tokens": {
        "<tool>": {"source": {"kind": "model_token", "model": a, "token": "<tool>"}, "force": False},
        "w3": {"source": {"kind": "zero"}, "force": True},
        "beta": {"source": {"kind": "model_token", "model": "base", "token": "w5"}, "force": False}}}}
    out = Path(read.merge(tmp_path / "mergekit", progress=False))
    by_name = {"<tool>": {"source": "a"}, "w3": tokens["w3"],
               "beta": {"source": {"kind": "model_token", "model": "base", "token": "w5"}}}
    python = _union_merge(folders, tmp_path / "python", tokenizer={"tokens": by_name})
    assert torch.equal(_state(out)[EMBED], _state(python)[EMBED])
    assert torch.equal(_state(out)[EMBED][_vocab(out)["w3"]], torch.zeros(16))

    spec = {"method": "task_arithmetic", "base": base, "parameters": {"scaling": SCALING},
            "models": {"a": a, "b": b}, "tokenizer": {"source": "union", "tokens": by_name},
            "output": str(tmp_path / "yaml")}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(spec))
    assert main(["merge", str(tmp_path / "recipe.yaml"), "--quiet"]) == 0
    assert torch.equal(_state(tmp_path / "yaml")[HEAD], _state(python)[HEAD])


def test_token_override_fault_rows(folders, tmp_path):
    base, a, b = str(folders / "base"), str(folders / "a"), str(folders / "b")

    def merge(out, tokens, **keywords):
        return hf_merge.merge(base, {"a": a, "b": b}, "task_arithmetic", scaling=SCALING, output_dir=out,
                              progress=False, tokenizer={"source": "union", "tokens": tokens}, **keywords)

    rows = [
        ({"<x>": {"source": {"kind": "one"}}}, ["tokenizer.tokens['<x>'].source.kind", "'zero' or 'model_token'",
                                                "'one'"]),
        ({"<x>": {"source": "c"}}, ["tokenizer.tokens['<x>'].source 'c'", "names no model", "'a'"]),
        ({"<x>": {"source": {"kind": "model_token", "model": "c", "token": "w1"}}},
         ["tokenizer.tokens['<x>'].source.model 'c'", "names no model"]),
        ({"alpha": {"source": "b"}}, ["tokenizer.tokens['alpha'].source", "input 'b' has no token 'alpha'"]),
        ({"<x>": {"source": {"kind": "model_token", "model": "a", "token": "beta"}}},
         ["tokenizer.tokens['<x>'].source.token", "input 'a' has no token 'beta'"]),
        ({"<x>": {"source": {"kind": "model_token", "model": "a", "token_id": 27}}},
         ["tokenizer.tokens['<x>'].source.token_id 27", "input 'a' has 27 embedding rows"]),
        ({"<x>": {"source": {"kind": "model_token", "model": "a", "token": "w1", "token_id": 1}}},
         ["tokenizer.tokens['<x>'].source", "one of token and token_id"]),
        ({"<x>": {"source": "a", "force": "yes"}}, ["tokenizer.tokens['<x>'].force", "true or false", "'yes'"]),
        ({"<x>": {"force": True}}, ["tokenizer.tokens['<x>'].source is required"]),
        ({"<x>": {"source": "a", "forse": True}}, ["tokenizer.tokens['<x>']", "unknown key(s) ['forse']"]),
        ({"<x>": "a"}, ["tokenizer.tokens['<x>'] must be a mapping"]),
    ]
    for tokens, needles in rows:
        _refused(tmp_path, lambda out, tokens=tokens: merge(out, tokens), *needles)
    _refused(tmp_path, lambda out: merge(out, {}, tokenizer_source="base"), "tokenizer_source=",
             "tokenizer['source']", "give one")
    _refused(tmp_path, lambda out: hf_merge.merge(base, {"source": a}, "task_arithmetic", scaling=SCALING,
                                                  output_dir=out, progress=False, tokenizer={"source": base}),
             "tokenizer= ['source']", "rename")


# ------------------------------------------------------------------------------------------------ chat templates
def test_builtin_chat_template_lands_in_the_tokenizer_and_renders(folders, tmp_path):
    from transformers import AutoTokenizer

    from hf_merge.vocab import builtin_chat_template, chat_template_names

    assert chat_template_names() == ["alpaca", "chatml", "exaone", "llama3", "mistral"]  # mergekit's names
    out = hf_merge.merge(str(folders / "base"), {"same": str(folders / "same")}, "task_arithmetic", scaling=SCALING,
                         chat_template="chatml", output_dir=tmp_path / "chatml", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == builtin_chat_template("chatml")
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n")
    assert tokenizer.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    expected = {"alpaca": "### Instruction:\nHi\n\n### Response:\nHello",
                "exaone": "[|system|][|endofturn|]\n[|user|]Hi\n[|assistant|]Hello[|endofturn|]\n",
                "llama3": "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant"
                          "<|end_header_id|>\n\nHello<|eot_id|>",
                "mistral": "<s>[INST] Hi [/INST] Hello</s>"}
    for name, text in expected.items():
        assert tokenizer.apply_chat_template(conversation, tokenize=False,
                                             chat_template=builtin_chat_template(name)) == text, name
    recipe = read_recipe({"merge_method": "task_arithmetic", "base_model": str(folders / "base"),
                          "chat_template": "llama3", "models": [{"model": str(folders / "a"),
                                                                 "parameters": {"weight": 1.0}}]})
    assert recipe.vocabulary == {"chat_template": "llama3"}


def test_a_template_name_that_is_also_an_input_is_refused(folders, tmp_path):
    base, b = str(folders / "base"), str(folders / "b")
    _refused(tmp_path, lambda out: hf_merge.merge(base, {"chatml": b}, "task_arithmetic", scaling=SCALING,
                                                  chat_template="chatml", output_dir=out, progress=False),
             "chat_template 'chatml' names both input 'chatml' and the built-in template 'chatml'", "its path")
