"""Architecture matrix (issue 18): every listed model family merged with Task Arithmetic, TIES and TSV-M from
checkpoint folders, reloaded with its Auto class and compared with the in-memory merge of the same models; the
parameter classifier checked on each (stacks, kinds, fused projections, MoE experts); LiNeS checked to scale each
stack of encoder-decoder, dual-tower and vision-language models over its own depth.

The models are tiny (hidden 32, 2-3 blocks) and built once per module (see :mod:`tests.tiny_models`).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hf_merge
from hf_merge.inputs import classify_sources
from hf_merge.io.sinks import ModelSink
from hf_merge.io.sources import FolderSource, ModelSource
from hf_merge.params import ParamKind, classify_parameters
from tests import tiny_models
from tests.tiny_models import ARCHITECTURES, architecture_outputs, finetuned_copy

pytestmark = pytest.mark.filterwarnings("ignore:The model card has no license")

METHODS = {
    "task_arithmetic": lambda: hf_merge.TaskArithmeticConfig(scaling=0.5),
    "ties": lambda: hf_merge.TiesConfig(density=0.5, scaling=1.0),
    "tsv_m": lambda: hf_merge.TSVMergeConfig(),
}

# The Auto classes the reload tries, each with the transformers mapping (model_type -> class name) it loads from.
_AUTO_MAPPINGS = (
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForSpeechSeq2Seq", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForImageTextToText", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
)


@dataclasses.dataclass(frozen=True)
class Expected:
    """What the classifier must say about one architecture (in-memory parameter names).

    ``stacks``: every block container and its depth; ``embeddings`` / ``norms`` / ``linears``: names of that kind;
    ``fused``: ``{name: projections}`` (every other tensor has ``fused=None``)."""

    stacks: dict[str, int]
    embeddings: tuple[str, ...] = ()
    norms: tuple[str, ...] = ()
    linears: tuple[str, ...] = ()
    fused: dict[str, int] = dataclasses.field(default_factory=dict)


_DECODER = Expected(
    {"model.layers": 2}, embeddings=("model.embed_tokens.weight",),
    norms=("model.norm.weight", "model.layers.1.input_layernorm.weight"),
    linears=("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"),
)
EXPECTED: dict[str, Expected] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": dataclasses.replace(_DECODER, norms=(*_DECODER.norms, "model.layers.0.self_attn.q_norm.weight")),
    "gemma2": dataclasses.replace(_DECODER, norms=(*_DECODER.norms, "model.layers.0.pre_feedforward_layernorm.weight")),
    "gemma3_text": dataclasses.replace(_DECODER, norms=(*_DECODER.norms, "model.layers.0.self_attn.k_norm.weight")),
    "phi3": Expected(
        {"model.layers": 2}, embeddings=("model.embed_tokens.weight",), norms=("model.norm.weight",),
        linears=("model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight", "lm_head.weight"),
        fused={f"model.layers.{i}.{name}": n for i in range(2)
               for name, n in (("self_attn.qkv_proj.weight", 3), ("mlp.gate_up_proj.weight", 2))},
    ),
    "gpt2": Expected(
        {"transformer.h": 2}, embeddings=("transformer.wte.weight", "transformer.wpe.weight"),
        norms=("transformer.ln_f.weight", "transformer.h.0.ln_1.bias"), linears=("transformer.h.1.mlp.c_fc.weight",),
        fused={f"transformer.h.{i}.attn.c_attn.{p}": 3 for i in range(2) for p in ("weight", "bias")},
    ),
    "gpt_neox": Expected(
        {"gpt_neox.layers": 2}, embeddings=("gpt_neox.embed_in.weight",),
        norms=("gpt_neox.final_layer_norm.weight", "gpt_neox.layers.0.post_attention_layernorm.bias"),
        linears=("lm_head.weight", "gpt_neox.layers.0.attention.query_key_value.weight"),
        fused={f"gpt_neox.layers.{i}.attention.query_key_value.{p}": 3 for i in range(2) for p in ("weight", "bias")},
    ),
    "t5": Expected(
        {"encoder.block": 3, "decoder.block": 2},
        embeddings=("shared.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
        norms=("encoder.final_layer_norm.weight", "decoder.block.1.layer.2.layer_norm.weight"),
        linears=("decoder.block.1.layer.1.EncDecAttention.q.weight", "encoder.block.2.layer.1.DenseReluDense.wo.weight"),
    ),
    "bart": Expected(
        {"model.encoder.layers": 3, "model.decoder.layers": 2},
        embeddings=("model.shared.weight", "model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight"),
        norms=("model.encoder.layernorm_embedding.weight", "model.decoder.layers.1.encoder_attn_layer_norm.bias"),
        linears=("model.encoder.layers.2.fc1.weight", "model.decoder.layers.0.encoder_attn.k_proj.weight"),
    ),
    "bert": Expected(
        {"bert.encoder.layer": 2}, embeddings=("bert.embeddings.word_embeddings.weight",
                                               "bert.embeddings.token_type_embeddings.weight"),
        norms=("bert.embeddings.LayerNorm.weight", "bert.encoder.layer.1.output.LayerNorm.bias"),
        linears=("bert.pooler.dense.weight", "classifier.weight"),
    ),
    "roberta": Expected(
        {"roberta.encoder.layer": 2}, embeddings=("roberta.embeddings.position_embeddings.weight",),
        norms=("lm_head.layer_norm.weight",), linears=("lm_head.dense.weight",),
    ),
    "deberta_v2": Expected(
        {"deberta.encoder.layer": 2}, embeddings=("deberta.encoder.rel_embeddings.weight",),
        norms=("deberta.encoder.LayerNorm.weight", "deberta.encoder.layer.0.attention.output.LayerNorm.weight"),
        linears=("deberta.encoder.layer.1.attention.self.query_proj.weight",),
    ),
    "vit": Expected(
        {"vit.layers": 2}, embeddings=("vit.embeddings.cls_token", "vit.embeddings.position_embeddings"),
        linears=("classifier.weight",),
    ),
    "clip": Expected(
        {"text_model.encoder.layers": 2, "vision_model.encoder.layers": 3},
        embeddings=("text_model.embeddings.token_embedding.weight", "vision_model.embeddings.class_embedding",
                    "vision_model.embeddings.position_embedding.weight"),
        norms=("vision_model.pre_layrnorm.weight", "text_model.final_layer_norm.bias"),
        linears=("text_projection.weight", "visual_projection.weight", "vision_model.encoder.layers.2.mlp.fc2.weight"),
    ),
    "whisper": Expected(
        {"model.encoder.layers": 3, "model.decoder.layers": 2},
        embeddings=("model.decoder.embed_tokens.weight", "model.encoder.embed_positions.weight",
                    "model.decoder.embed_positions.weight"),
        norms=("model.encoder.layer_norm.weight", "model.decoder.layers.1.final_layer_norm.weight"),
        linears=("model.encoder.layers.2.fc1.weight", "model.decoder.layers.1.encoder_attn.v_proj.weight"),
    ),
    "mixtral": Expected(
        {"model.layers": 2}, embeddings=("model.embed_tokens.weight",), norms=("model.norm.weight",),
        linears=("model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.gate_up_proj",
                 "model.layers.1.mlp.experts.down_proj"),
        fused={f"model.layers.{i}.mlp.experts.gate_up_proj": 2 for i in range(2)},
    ),
    "qwen2_vl": Expected(
        {"model.visual.blocks": 3, "model.language_model.layers": 2},
        embeddings=("model.language_model.embed_tokens.weight",),
        norms=("model.visual.blocks.2.norm1.weight", "model.visual.merger.ln_q.weight", "model.language_model.norm.weight"),
        linears=("model.visual.merger.mlp.0.weight", "model.visual.blocks.0.attn.proj.weight"),
        fused={f"model.visual.blocks.{i}.attn.qkv.{p}": 3 for i in range(3) for p in ("weight", "bias")},
    ),
}


@pytest.fixture(scope="module", autouse=True)
def _serial_torch_routes():
    """One intra-op thread and the torch routes: on a busy 2-core machine, threads spin-waiting on 32x32 matrices
    make an SVD 20x slower (TSV-M of a tiny model: 2 s instead of 0.05 s), and numba's parallel kernels compile on
    first use (seconds) and are slower than torch on tensors this small. The routes give the same bits
    (tests/test_kernels.py compares them); what this module tests is the architectures."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_MERGE_KERNELS", "0")
        yield
    torch.set_num_threads(threads)


@dataclasses.dataclass
class Built:
    name: str
    base: torch.nn.Module
    finetuned: list[torch.nn.Module]
    base_dir: Path
    finetuned_dirs: list[Path]


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The base, two "fine-tuned" copies and their three checkpoint folders, built once per architecture."""
    name = request.param
    torch.manual_seed(0)
    try:
        base = ARCHITECTURES[name]()
    except ImportError as error:  # an older transformers without the model class
        import transformers

        pytest.skip(f"{name}: transformers {transformers.__version__} cannot build it ({error})")
    finetuned = [finetuned_copy(base, seed).eval() for seed in (1, 2)]
    root = tmp_path_factory.mktemp(name)
    dirs = [root / label for label in ("base", "ft1", "ft2")]
    for model, folder in zip([base, *finetuned], dirs):
        model.save_pretrained(folder)
    return Built(name, base, finetuned, dirs[0], dirs[1:])


def auto_class(folder: Path) -> type:
    """The Auto class that loads the architecture a folder's ``config.json`` names (its ``architectures`` field)."""
    import transformers
    from transformers.models.auto import modeling_auto

    config = transformers.AutoConfig.from_pretrained(folder)
    (architecture,) = config.architectures
    for auto_name, mapping_name in _AUTO_MAPPINGS:
        names = getattr(modeling_auto, mapping_name).get(config.model_type, ())
        if architecture in ((names,) if isinstance(names, str) else names):
            return getattr(transformers, auto_name)
    raise AssertionError(f"no Auto class maps {config.model_type!r} to {architecture!r}")


def _assert_outputs_close(name: str, actual: torch.nn.Module, expected: torch.nn.Module) -> None:
    got, want = architecture_outputs(name, actual), architecture_outputs(name, expected)
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=lambda m, key=key: f"{name} {key}: {m}")


# ------------------------------------------------------------------------------------------ merge and reload
def _in_memory_merge(built: Built, config: hf_merge.MergeConfig) -> torch.nn.Module:
    """The merge of the in-memory models, as a model of the base's class."""
    merged = hf_merge.merge(built.base, built.finetuned, config, progress=False)
    assert type(merged) is type(built.base)
    return merged.eval()


@pytest.mark.filterwarnings("ignore:TSV keeps k")  # BART's final_logits_bias (1, vocab) buffer: zero update anyway
@pytest.mark.parametrize("method", list(METHODS))
def test_folder_merge_reloads_and_matches_the_in_memory_merge(built: Built, method: str, tmp_path: Path) -> None:
    config = METHODS[method]()
    out = hf_merge.merge(built.base_dir, built.finetuned_dirs, config, output_dir=tmp_path / "merged", progress=False)
    reloaded = auto_class(Path(out)).from_pretrained(out).eval()
    assert type(reloaded) is type(built.base)

    in_memory = _in_memory_merge(built, config)
    expected_state = in_memory.state_dict()
    for key, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, expected_state[key], msg=lambda m, key=key: f"{key}: {m}")
    _assert_outputs_close(built.name, reloaded, in_memory)

    base_out = architecture_outputs(built.name, built.base)
    merged_out = architecture_outputs(built.name, reloaded)
    assert any(not torch.allclose(merged_out[k], base_out[k]) for k in base_out), "the merge changed nothing"

    if method == "task_arithmetic":  # independent reference, on the in-memory (possibly fused) parameters
        base_state = built.base.state_dict()
        tasks = [model.state_dict() for model in built.finetuned]
        for key, tensor in reloaded.state_dict().items():
            if tensor.is_floating_point():
                expected = base_state[key] + 0.5 * sum(task[key] - base_state[key] for task in tasks)
                torch.testing.assert_close(tensor, expected, msg=lambda m, key=key: f"{key}: {m}")


# ------------------------------------------------------------------------------------------ the classifier
def test_classifier_stacks_kinds_and_fused_projections(built: Built) -> None:
    expected = EXPECTED[built.name]
    infos = classify_parameters(built.base)
    stacks = {info.stack: info.num_blocks for info in infos.values() if info.stack is not None}
    assert stacks == expected.stacks
    for info in infos.values():
        if info.block is not None:
            assert 0 <= info.block < info.num_blocks
            assert info.name.startswith(f"{info.stack}.{info.block}.")
    for kind, names in ((ParamKind.EMBEDDING, expected.embeddings), (ParamKind.NORM, expected.norms),
                        (ParamKind.LINEAR, expected.linears)):
        for name in names:
            assert infos[name].kind is kind, (name, infos[name])
    assert {name: info.fused for name, info in infos.items() if info.fused is not None} == expected.fused

    # Generic checks: kinds agree with the module types, and nothing that is a matrix is called a vector.
    modules = dict(built.base.named_modules())
    for name, info in infos.items():
        module_name, _, param = name.rpartition(".")
        module = modules.get(module_name)
        if isinstance(module, torch.nn.Embedding) and param == "weight":
            assert info.kind is ParamKind.EMBEDDING, name
        elif isinstance(module, torch.nn.Linear) and param == "weight":
            assert info.kind is ParamKind.LINEAR, name
        elif isinstance(module, (torch.nn.LayerNorm,)) or "RMSNorm" in type(module).__name__:
            assert info.kind is ParamKind.NORM, name
        if info.kind is ParamKind.CONV:
            assert isinstance(module, torch.nn.modules.conv._ConvNd), f"{name} is not a convolution"
        if info.kind is ParamKind.VECTOR:
            assert info.ndim <= 1 or param.endswith("bias"), name


def test_folder_classification_matches_the_model(built: Built) -> None:
    """What a folder merge uses agrees with the in-memory classification: the checkpoint's names classified through
    the meta-device model (methods that read kinds), and by names alone (elementwise methods) — same blocks and
    depths, same kinds (a buffer is a vector by name; GPT-2's ``Conv1D`` is ``transposed`` only with the model)."""
    source = FolderSource(built.base_dir)
    with_model = classify_sources(source, {})
    by_name = classify_parameters(source.shapes(), config=source.config)
    memory_names = ModelSource(built.base).memory_names
    in_memory = classify_parameters(built.base)
    depth = {}
    for key, info in with_model.items():
        if info.stack is not None:
            depth[info.stack] = info.num_blocks
        memory = in_memory.get(memory_names.get(key, key))
        if memory is not None:
            assert (info.kind, info.block, info.num_blocks, info.fused) == (
                memory.kind, memory.block, memory.num_blocks, memory.fused), (key, info, memory)
        else:  # only the per-expert copies of fused MoE tensors have no in-memory counterpart
            assert re.search(r"\.experts\.\d+\.w[123]\.weight$", key), key
            assert info.kind is ParamKind.LINEAR and info.ndim == 2 and info.block is not None
        named = by_name[key]
        assert (named.block, named.num_blocks, named.fused) == (info.block, info.num_blocks, info.fused), key
        assert named.kind is (ParamKind.VECTOR if info.kind is ParamKind.BUFFER else info.kind), (key, named, info)
    assert sorted(depth.values()) == sorted(EXPECTED[built.name].stacks.values())


# ------------------------------------------------------------------------------------------ LiNeS per stack
# Checkpoint stack prefix -> depth, for the models whose stacks differ in depth.
LINES_STACKS = {
    "t5": {"encoder.block": 3, "decoder.block": 2},
    "bart": {"model.encoder.layers": 3, "model.decoder.layers": 2},
    "whisper": {"model.encoder.layers": 3, "model.decoder.layers": 2},
    "clip": {"text_model.encoder.layers": 2, "vision_model.encoder.layers": 3},
    "qwen2_vl": {"model.layers": 2, "visual.blocks": 3},
}


@pytest.mark.parametrize("built", list(LINES_STACKS), indirect=True)
def test_lines_scales_each_stack_over_its_own_depth(built: Built, tmp_path: Path) -> None:
    alpha, beta = 0.2, 0.6
    config = hf_merge.LinesConfig(alpha=alpha, beta=beta, inner=hf_merge.TaskArithmeticConfig(scaling=1.0))
    out = Path(hf_merge.merge(built.base_dir, built.finetuned_dirs, config, output_dir=tmp_path / "m", progress=False))
    merged, base = load_file(out / "model.safetensors"), load_file(built.base_dir / "model.safetensors")
    tasks = [load_file(folder / "model.safetensors") for folder in built.finetuned_dirs]
    stacks = LINES_STACKS[built.name]
    seen = set()
    for key, theta in merged.items():
        if not theta.is_floating_point():
            continue
        scale = alpha
        for stack, depth in stacks.items():
            match = re.match(rf"{re.escape(stack)}\.(\d+)\.", key)
            if match:
                scale = alpha + beta * int(match.group(1)) / (depth - 1)
                seen.add(stack)
        expected = base[key] + scale * sum(task[key] - base[key] for task in tasks)
        torch.testing.assert_close(theta, expected, msg=lambda m, key=key: f"{key} (λ={scale}): {m}")
    assert seen == set(stacks)


# ------------------------------------------------------------------------------------------ converted in memory
@pytest.mark.parametrize("built", ["mixtral"], indirect=True)
def test_converted_weights_are_merged_into_the_model_in_place(built: Built, tmp_path: Path) -> None:
    """Mixtral's experts (per expert on disk, fused 3-D in memory) go through transformers' loading conversion:
    ``merge_with(inplace=True)`` updates the model's own parameters, and a merge of folders returns a loaded model,
    both equal to the folder merge reloaded."""
    config = METHODS["ties"]()
    out = hf_merge.merge(built.base_dir, built.finetuned_dirs, config, output_dir=tmp_path / "m", progress=False)
    expected = type(built.base).from_pretrained(out).state_dict()
    model = copy.deepcopy(built.base)
    params = dict(model.named_parameters())
    assert model.merge_with(built.finetuned, config, inplace=True, progress=False) is model
    assert all(param is params[name] for name, param in model.named_parameters())
    from_folders = hf_merge.merge(built.base_dir, built.finetuned_dirs, config, progress=False)
    assert type(from_folders) is type(built.base)
    for merged in (model, from_folders):
        for key, tensor in merged.state_dict().items():
            torch.testing.assert_close(tensor, expected[key], msg=lambda m, key=key: f"{key}: {m}")


def test_converted_weights_missing_a_part_are_refused_before_any_write() -> None:
    """A fused parameter short of one of its experts cannot be built: the sink names its keys in begin()."""
    model = ARCHITECTURES["mixtral"]()
    source = ModelSource(model)
    metas = {key: source.meta(key) for key in source.keys()}
    del metas["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    with pytest.raises(hf_merge.MergeError, match=r"experts\.0\.w2\.weight.*\(3\) into a MixtralForCausalLM"):
        ModelSink(model).begin(metas, {}, 0)


def test_the_matrix_covers_every_factory() -> None:
    assert set(EXPECTED) == set(ARCHITECTURES)
    assert set(tiny_models.FACTORIES) <= set(ARCHITECTURES)


# ------------------------------------------------------------------------------------------ classifier fixes
def _shapes(**named: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {name.replace("__", "."): (shape, torch.float32) for name, shape in named.items()}


def test_fused_moe_expert_stacks_are_linear() -> None:
    """transformers 5 holds MoE experts as 3-D ``(experts, out, in)`` parameters of an experts module (they were
    classified CONV); ``transposed`` follows the module's ``is_transposed`` (GPT-OSS stores ``(experts, in, out)``);
    by name alone a 3-D tensor under ``experts`` is LINEAR too, and per-expert biases are VECTOR."""

    class Experts(torch.nn.Module):  # what transformers' use_experts_implementation decorator leaves on the module
        def __init__(self, transposed: bool) -> None:
            super().__init__()
            self.is_transposed = transposed
            self.gate_up_proj = torch.nn.Parameter(torch.zeros(4, 8, 16) if transposed else torch.zeros(4, 16, 8))
            self.gate_up_proj_bias = torch.nn.Parameter(torch.zeros(4, 16))
            self.down_proj = torch.nn.Parameter(torch.zeros(4, 8, 8))

    for transposed in (False, True):
        model = torch.nn.Module()
        model.layers = torch.nn.ModuleList([torch.nn.Module()])
        model.layers[0].experts = Experts(transposed)
        infos = classify_parameters(model)
        gate_up = infos["layers.0.experts.gate_up_proj"]
        assert (gate_up.kind, gate_up.transposed, gate_up.fused, gate_up.block) == (
            ParamKind.LINEAR, transposed, 2, 0)
        assert infos["layers.0.experts.down_proj"].kind is ParamKind.LINEAR
        assert infos["layers.0.experts.down_proj"].fused is None
        bias = infos["layers.0.experts.gate_up_proj_bias"]
        assert (bias.kind, bias.fused) == (ParamKind.VECTOR, 2)

    by_name = classify_parameters(_shapes(model__layers__0__mlp__experts__down_proj=(4, 8, 8),
                                          model__layers__0__mlp__experts__gate_up_proj_bias=(4, 16),
                                          model__layers__0__mlp__experts__3__w1__weight=(16, 8),
                                          vision__conv__weight=(8, 3, 3, 3)))
    assert by_name["model.layers.0.mlp.experts.down_proj"].kind is ParamKind.LINEAR
    assert by_name["model.layers.0.mlp.experts.gate_up_proj_bias"].kind is ParamKind.VECTOR
    assert by_name["model.layers.0.mlp.experts.3.w1.weight"].kind is ParamKind.LINEAR
    assert by_name["vision.conv.weight"].kind is ParamKind.CONV


def test_fused_projections_are_flagged() -> None:
    """``ParamInfo.fused``: how many projections one weight (and its bias) concatenates."""
    infos = classify_parameters(_shapes(
        model__layers__0__self_attn__qkv_proj__weight=(64, 32),  # Phi-3 (q 32 rows, k and v 16 each)
        model__layers__0__mlp__gate_up_proj__weight=(128, 32),
        model__layers__0__mlp__down_proj__weight=(32, 64),
        gpt_neox__layers__0__attention__query_key_value__bias=(96,),
        transformer__h__0__attn__c_attn__weight=(32, 96),
        transformer__h__0__crossattention__c_attn__weight=(32, 64),  # GPT-2 cross-attention: k and v
        transformer__h__0__crossattention__q_attn__weight=(32, 32),
        model__layers__0__mixer__in_proj__weight=(128, 32),  # Mamba: not in the table
        model__layers__0__input_layernorm__weight=(32,),
    ))
    assert {name: info.fused for name, info in infos.items()} == {
        "model.layers.0.self_attn.qkv_proj.weight": 3,
        "model.layers.0.mlp.gate_up_proj.weight": 2,
        "model.layers.0.mlp.down_proj.weight": None,
        "gpt_neox.layers.0.attention.query_key_value.bias": 3,
        "transformer.h.0.attn.c_attn.weight": 3,
        "transformer.h.0.crossattention.c_attn.weight": 2,
        "transformer.h.0.crossattention.q_attn.weight": None,
        "model.layers.0.mixer.in_proj.weight": None,
        "model.layers.0.input_layernorm.weight": None,
    }
    attention = torch.nn.Module()
    attention.layers = torch.nn.ModuleList([torch.nn.MultiheadAttention(8, 2)])
    mha = classify_parameters(attention)
    assert mha["layers.0.in_proj_weight"].fused == 3 and mha["layers.0.in_proj_weight"].kind is ParamKind.LINEAR
    assert mha["layers.0.in_proj_bias"].fused == 3 and mha["layers.0.in_proj_bias"].kind is ParamKind.VECTOR
    assert mha["layers.0.out_proj.weight"].fused is None


def test_learned_tokens_and_position_tables_are_embeddings() -> None:
    """Embeddings held as bare parameters (ViT's 3-D ``cls_token`` / ``position_embeddings`` were CONV, CLIP's 1-D
    ``class_embedding`` VECTOR); a scalar such as Gemma 3's ``embed_scale`` stays a vector."""
    infos = classify_parameters(ARCHITECTURES["vit"]())
    assert infos["vit.embeddings.cls_token"].kind is ParamKind.EMBEDDING
    assert infos["vit.embeddings.position_embeddings"].kind is ParamKind.EMBEDDING
    assert infos["vit.embeddings.patch_embeddings.projection.weight"].kind is ParamKind.CONV
    by_name = classify_parameters(_shapes(vision_model__embeddings__class_embedding=(32,),
                                          model__embed_tokens__embed_scale=(), encoder__register_tokens=(1, 4, 32)))
    assert by_name["vision_model.embeddings.class_embedding"].kind is ParamKind.EMBEDDING
    assert by_name["encoder.register_tokens"].kind is ParamKind.EMBEDDING
    assert by_name["model.embed_tokens.embed_scale"].kind is ParamKind.VECTOR


def test_bare_state_dict_names_of_encoder_decoders() -> None:
    """Without a model: T5/BART ``shared`` and T5's ``relative_attention_bias`` are embeddings (were LINEAR),
    GPT-NeoX's output head ``embed_out`` is LINEAR (was EMBEDDING), BART's ``final_logits_bias`` (1, vocab) a
    VECTOR (was LINEAR); encoder and decoder blocks are numbered per stack (``block.1.layer.2.`` is block 1)."""
    infos = classify_parameters(_shapes(
        shared__weight=(128, 32), model__shared__weight=(128, 32), final_logits_bias=(1, 128),
        encoder__block__0__layer__0__SelfAttention__relative_attention_bias__weight=(8, 4),
        encoder__block__2__layer__1__DenseReluDense__wi__weight=(64, 32),
        decoder__block__1__layer__2__DenseReluDense__wi__weight=(64, 32),
        embed_out__weight=(128, 32), gpt_neox__embed_in__weight=(128, 32),
    ), config={"num_layers": 3, "num_decoder_layers": 2})
    kinds = {name: info.kind for name, info in infos.items()}
    assert kinds["shared.weight"] is kinds["model.shared.weight"] is ParamKind.EMBEDDING
    assert kinds["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] is ParamKind.EMBEDDING
    assert kinds["final_logits_bias"] is ParamKind.VECTOR
    assert kinds["embed_out.weight"] is ParamKind.LINEAR and kinds["gpt_neox.embed_in.weight"] is ParamKind.EMBEDDING
    encoder = infos["encoder.block.2.layer.1.DenseReluDense.wi.weight"]
    decoder = infos["decoder.block.1.layer.2.DenseReluDense.wi.weight"]
    assert (encoder.stack, encoder.block, encoder.num_blocks) == ("encoder.block", 2, 3)
    assert (decoder.stack, decoder.block, decoder.num_blocks) == ("decoder.block", 1, 2)
