"""Properties of the baseline merges (average, Task Arithmetic, TIES, DARE) and of the streaming engine."""

from __future__ import annotations

import json
import math

import pytest
import torch

import hf_merge
from hf_merge.io import open_source
from hf_merge.methods.dare import dare_drop, mask_seed
from hf_merge.methods.ties import elect_signs
from hf_merge.tuning import TUNING
from tests.helpers import assert_same_state, state_of, ties_reference
from tests.tiny_models import FACTORIES, finetuned_copy, logits


@pytest.fixture
def trio(architecture):
    base = FACTORIES[architecture]()
    return architecture, base, [finetuned_copy(base, seed) for seed in (1, 2, 3)]


def test_task_arithmetic_with_one_model_and_unit_scaling_reproduces_it(trio):
    _, base, (ft, *_) = trio
    merged = hf_merge.merge(base, [ft], "task_arithmetic", scaling=1.0, progress=False)
    for key, value in ft.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[key], value, rtol=0, atol=1e-6)


def test_average_of_identical_models_is_the_model(trio):
    _, base, (ft, *_) = trio
    merged = hf_merge.merge(base, [ft, ft, ft], hf_merge.AverageConfig(), progress=False)
    for key, value in ft.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[key], value, rtol=0, atol=1e-6)


def test_weighted_average_matches_formula():
    base = {"w": torch.zeros(3)}
    a, b = {"w": torch.tensor([1.0, 2.0, 3.0])}, {"w": torch.tensor([3.0, 2.0, 1.0])}
    merged = hf_merge.merge(base, {"a": a, "b": b}, "average", weights={"a": 3.0, "b": 1.0}, progress=False)
    torch.testing.assert_close(merged["w"], (3 * a["w"] + b["w"]) / 4)


@pytest.mark.parametrize(
    "config", [hf_merge.TiesConfig(density=0.3), hf_merge.TaskArithmeticConfig(scaling=0.3), hf_merge.AverageConfig()]
)
def test_merge_leaves_base_and_inputs_untouched(trio, config):
    _, base, fts = trio
    before = [state_of(m) for m in (base, *fts)]
    merged = hf_merge.merge(base, fts, config, progress=False)
    assert merged is not base
    for model, state in zip((base, *fts), before):
        assert_same_state(state_of(model), state)


def test_model_path_and_dict_inputs_give_identical_tensors(trio, tmp_path):
    _, base, fts = trio
    base.save_pretrained(tmp_path / "base")
    for i, ft in enumerate(fts):
        ft.save_pretrained(tmp_path / f"ft{i}")
    config = hf_merge.TiesConfig(density=0.3, scaling=1.2)
    merged_model = hf_merge.merge(base, fts, config, progress=False)
    # Keys as save_pretrained writes them (transformers 5 renames some weights in memory, e.g. ViT's).
    serialized = open_source(merged_model)
    from_models = {k: serialized.get(k) for k in serialized.keys()}
    # model.state_dict() shares storage between tied weights: the dict input sees the tie too.
    from_dicts = hf_merge.merge(base.state_dict(), [m.state_dict() for m in fts], config, progress=False)
    hf_merge.merge(
        tmp_path / "base", [tmp_path / f"ft{i}" for i in range(3)], config,
        output_dir=tmp_path / "merged", progress=False,
    )
    from safetensors.torch import load_file

    from_paths = load_file(tmp_path / "merged" / "model.safetensors")
    assert set(from_paths) == set(from_models)
    for key, value in from_paths.items():
        assert torch.equal(value, from_models[key]), key
        assert torch.equal(value, from_dicts[serialized.memory_names.get(key, key)]), key
    mixed = hf_merge.merge(base, [fts[0], tmp_path / "ft1", fts[2]], config, progress=False).state_dict()
    assert_same_state(mixed, merged_model.state_dict())


def test_reloaded_checkpoint_gives_the_logits_of_the_in_memory_merge(trio, tmp_path):
    name, base, fts = trio
    in_memory = base.merge_with(fts, "task_arithmetic", scaling=0.4, progress=False)
    path = hf_merge.merge(base, fts, "task_arithmetic", scaling=0.4, output_dir=tmp_path / "out", progress=False)
    reloaded = type(base).from_pretrained(path).eval()
    torch.testing.assert_close(logits(name, reloaded), logits(name, in_memory), rtol=0, atol=0)
    saved_config = hf_merge.MergeConfig.from_pretrained(path)
    assert saved_config == hf_merge.TaskArithmeticConfig(scaling=0.4)


def test_tied_embeddings_are_merged_once_and_stay_tied(tmp_path):
    base = FACTORIES["llama"]()
    fts = [finetuned_copy(base, s) for s in (1, 2)]
    merged = hf_merge.merge(base, fts, "task_arithmetic", scaling=0.5, progress=False)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    expected = base.model.embed_tokens.weight + 0.5 * sum(
        f.model.embed_tokens.weight - base.model.embed_tokens.weight for f in fts
    )
    torch.testing.assert_close(merged.lm_head.weight, expected)
    hf_merge.merge(base, fts, "task_arithmetic", scaling=0.5, output_dir=tmp_path / "o", progress=False)
    from safetensors import safe_open

    with safe_open(tmp_path / "o" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    reloaded = type(base).from_pretrained(tmp_path / "o")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_merge_with_inplace_updates_the_model_itself():
    base = FACTORIES["bert"]()
    fts = [finetuned_copy(base, s) for s in (1, 2)]
    expected = base.merge_with(fts, "task_arithmetic", scaling=0.5, progress=False).state_dict()
    returned = base.merge_with(fts, "task_arithmetic", scaling=0.5, inplace=True, progress=False)
    assert returned is base
    assert_same_state(state_of(base), {k: v for k, v in expected.items()})


def test_sharded_output_reloads(tmp_path):
    base = FACTORIES["gpt2"]()
    fts = [finetuned_copy(base, s) for s in (1, 2)]
    path = hf_merge.merge(
        base, fts, "ties", output_dir=tmp_path / "sharded", max_shard_size="20KB", progress=False
    )
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    in_memory = hf_merge.merge(base, fts, "ties", progress=False)
    reloaded = type(base).from_pretrained(path)
    torch.testing.assert_close(logits("gpt2", reloaded), logits("gpt2", in_memory), rtol=0, atol=0)
    # A sharded checkpoint is a valid input too.
    again = hf_merge.merge(path, [path], "task_arithmetic", scaling=1.0, progress=False)
    assert_same_state(state_of(again), state_of(reloaded))


def test_an_earlier_output_is_replaced_whole_and_a_users_folder_is_never_emptied(tmp_path):
    base = {"w": torch.zeros(4)}
    for scaling in (0.5, 1.0):  # the second run replaces the first run's output
        hf_merge.merge(base, [{"w": torch.ones(4)}], "task_arithmetic", scaling=scaling, output_dir=tmp_path / "out",
                       progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".hf_merge_output.json", "README.md", "merge_config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "stale.txt").write_text("old")
    with pytest.raises(ValueError, match=r"holds files hf_merge did not write \(stale.txt\)"):
        hf_merge.merge(base, [{"w": torch.ones(4)}], "task_arithmetic", scaling=1.0, output_dir=tmp_path / "mine",
                       progress=False)
    hf_merge.merge(base, [{"w": torch.ones(4)}], "task_arithmetic", scaling=1.0, output_dir=tmp_path / "mine",
                   overwrite=True, progress=False)
    assert (tmp_path / "mine" / "stale.txt").read_text() == "old"
    assert (tmp_path / "mine" / "model.safetensors").is_file()


def test_tokenizer_and_config_files_are_copied_from_a_base_folder(tmp_path):
    base = FACTORIES["bert"]()
    base.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "tokenizer.json").write_text("{}")
    (tmp_path / "base" / "vocab.txt").write_text("[PAD]\n")
    finetuned_copy(base, 1).save_pretrained(tmp_path / "ft")
    hf_merge.merge(tmp_path / "base", [tmp_path / "ft"], "ties", output_dir=tmp_path / "out", progress=False)
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "tokenizer.json", "vocab.txt", "merge_config.json", "model.safetensors"} <= names


def test_integer_buffers_are_copied_from_the_base():
    base = {"w": torch.zeros(3), "steps": torch.tensor(7), "mask": torch.tensor([True, False])}
    ft = {"w": torch.ones(3), "steps": torch.tensor(99), "mask": torch.tensor([False, False])}
    merged = hf_merge.merge(base, [ft], "task_arithmetic", scaling=0.5, progress=False)
    assert merged["steps"].item() == 7 and merged["mask"].tolist() == [True, False]
    torch.testing.assert_close(merged["w"], torch.full((3,), 0.5))


def test_bf16_deltas_below_the_bf16_spacing_survive_task_arithmetic():
    base = {"w": torch.ones(16, dtype=torch.bfloat16)}
    ulp = 2.0**-7  # bf16 spacing at 1.0
    fts = [{"w": torch.full((16,), 1.0 + ulp, dtype=torch.bfloat16)} for _ in range(8)]
    merged = hf_merge.merge(base, fts, "task_arithmetic", scaling=0.3, progress=False)
    assert merged["w"].dtype == torch.bfloat16
    expected = torch.tensor(1.0 + 0.3 * 8 * ulp).to(torch.bfloat16)  # rounded once: 1 + 2 ulp
    assert torch.all(merged["w"] == expected)
    naive = base["w"].clone()
    for ft in fts:  # what rounding every step in bf16 gives: each 0.3-ulp step vanishes
        naive = naive + (0.3 * (ft["w"] - base["w"])).to(torch.bfloat16)
    assert torch.all(naive == 1.0) and not torch.all(merged["w"] == naive)


def test_output_dtype_can_be_chosen():
    base = {"w": torch.zeros(4)}
    merged = hf_merge.merge(base, [{"w": torch.ones(4)}], "task_arithmetic", scaling=1.0, dtype="bf16",
                            progress=False)
    assert merged["w"].dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------- TIES
@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.93])
@pytest.mark.parametrize("aggregate", ["mean", "sum"])
def test_global_ties_streams_to_the_exact_whole_model_result(density, aggregate):
    gen = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(17, 9, generator=gen) for i in range(5)}
    base["bias"] = torch.randn(23, generator=gen)
    fts = [{k: v + torch.randn(v.shape, generator=gen) * (0.1 + i) for k, v in base.items()} for i in range(3)]
    merged = hf_merge.merge(base, fts, "ties", density=density, scaling=1.3, aggregate=aggregate, progress=False)
    expected = ties_reference(base, fts, density, 1.3, aggregate)
    for key in base:
        torch.testing.assert_close(merged[key], expected[key], rtol=0, atol=1e-6)


def test_global_ties_is_exact_on_bf16_task_vectors_full_of_ties():
    gen = torch.Generator().manual_seed(5)
    base = {f"w{i}": (torch.randn(40, 30, generator=gen) * 0.02).to(torch.bfloat16) for i in range(3)}
    fts = [{k: (v.float() + torch.randn(v.shape, generator=gen) * 2e-4).to(torch.bfloat16) for k, v in base.items()}
           for _ in range(4)]
    merged = hf_merge.merge(base, fts, "ties", density=0.2, progress=False)
    as_float = lambda sd: {k: v.float() for k, v in sd.items()}  # noqa: E731
    expected = ties_reference(as_float(base), [as_float(f) for f in fts], 0.2, 1.0)
    for key in base:
        assert torch.equal(merged[key], expected[key].to(torch.bfloat16)), key


def test_global_ties_keeps_ties_at_the_threshold_inclusively():
    base = {"w": torch.zeros(10)}
    ft = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1])}
    merged = hf_merge.merge(base, [ft], "ties", density=0.2, progress=False)
    assert merged["w"].tolist() == [1.0, 1.0, 1.0, 1.0, 0, 0, 0, 0, 0, 0]


def test_ties_with_full_density_and_agreeing_signs_is_the_mean():
    gen = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(50, generator=gen)}
    magnitudes = [torch.rand(50, generator=gen) + 0.1 for _ in range(3)]
    sign = torch.where(torch.rand(50, generator=gen) > 0.5, 1.0, -1.0)
    fts = [{"w": base["w"] + sign * m} for m in magnitudes]
    for scope in ("global", "tensor"):
        merged = hf_merge.merge(base, fts, "ties", density=1.0, scope=scope, progress=False)
        torch.testing.assert_close(merged["w"], base["w"] + sign * sum(magnitudes) / 3)


def test_tensor_scope_ties_trims_each_tensor_separately():
    base = {"small": torch.zeros(10), "large": torch.zeros(10)}
    ft = {"small": torch.arange(1.0, 11.0) * 1e-3, "large": torch.arange(1.0, 11.0)}
    per_tensor = hf_merge.merge(base, [ft], "ties", density=0.3, scope="tensor", progress=False)
    assert (per_tensor["small"] != 0).sum() == 4 and (per_tensor["large"] != 0).sum() == 4
    whole_model = hf_merge.merge(base, [ft], "ties", density=0.3, scope="global", progress=False)
    assert (whole_model["small"] != 0).sum() == 0


def test_elected_sign_falls_back_to_the_majority_sign():
    trimmed = torch.tensor([[1.0, 2.0, 3.0, -1.0], [-1.0, 1.0, 1.0, 0.0]])
    signs = elect_signs(trimmed)
    assert signs.tolist() == [1.0, 1.0, 1.0, -1.0]  # column 0 sums to 0: majority (+) wins


# ----------------------------------------------------------------------------------------- DARE
def test_dare_survivors_are_exactly_rescaled_and_the_rest_dropped():
    delta = torch.randn(10_000)
    dropped = dare_drop(delta, 0.9, seed=1)
    survivors = dropped != 0
    assert torch.equal(dropped[survivors], delta[survivors] / (1 - 0.9))
    assert 0.08 < survivors.float().mean() < 0.12


def test_dare_is_unbiased_over_seeds():
    delta = torch.randn(2_000)
    mean = torch.stack([dare_drop(delta, 0.5, seed=s) for s in range(400)]).mean(0)
    assert (mean - delta).abs().mean() < 0.05 * delta.abs().mean()


def test_dare_masks_do_not_depend_on_key_order_or_inputs_order_of_other_tensors():
    gen = torch.Generator().manual_seed(2)
    base = {f"t{i}": torch.zeros(100) for i in range(4)}
    fts = {"a": {k: torch.randn(100, generator=gen) for k in base}, "b": {k: torch.randn(100, generator=gen) for k in base}}
    config = hf_merge.DareConfig(drop_rate=0.7, seed=3, then=hf_merge.TaskArithmeticConfig(scaling=1.0))
    merged = hf_merge.merge(base, fts, config, progress=False)
    reordered = hf_merge.merge(
        dict(reversed(base.items())), {n: dict(reversed(sd.items())) for n, sd in fts.items()}, config, progress=False
    )
    for key in base:
        assert torch.equal(merged[key], reordered[key])
    expected = sum(dare_drop(fts[n]["t2"], 0.7, mask_seed(3, n, "t2")) for n in fts)
    torch.testing.assert_close(merged["t2"], expected)


def test_dare_then_ties_sees_the_dropped_task_vectors():
    gen = torch.Generator().manual_seed(4)
    base = {"w": torch.zeros(200)}
    fts = {"a": {"w": torch.randn(200, generator=gen)}, "b": {"w": torch.randn(200, generator=gen)}}
    ties = hf_merge.TiesConfig(density=0.5)
    merged = hf_merge.merge(base, fts, "dare", drop_rate=0.5, seed=0, then=ties, progress=False)
    dropped = {n: {"w": dare_drop(sd["w"], 0.5, mask_seed(0, n, "w"))} for n, sd in fts.items()}
    torch.testing.assert_close(merged["w"], hf_merge.merge(base, dropped, ties, progress=False)["w"])


def test_dare_with_zero_drop_rate_is_the_inner_merge():
    base = {"w": torch.zeros(8)}
    fts = [{"w": torch.randn(8)}, {"w": torch.randn(8)}]
    ta = hf_merge.TaskArithmeticConfig(scaling=0.5)
    merged = hf_merge.merge(base, fts, "dare", drop_rate=0.0, then=ta, progress=False)
    torch.testing.assert_close(merged["w"], hf_merge.merge(base, fts, ta, progress=False)["w"])


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_ties_merges_large_tensors_in_chunks_with_the_same_result(monkeypatch, scope):

    gen = torch.Generator().manual_seed(6)
    base = {"w": torch.randn(40, 25, generator=gen), "b": torch.randn(9, generator=gen)}
    fts = [{k: v + torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(3)]
    whole = hf_merge.merge(base, fts, "ties", density=0.3, scope=scope, progress=False)
    monkeypatch.setattr(TUNING, "ties_chunk", 7)
    chunked = hf_merge.merge(base, fts, "ties", density=0.3, scope=scope, progress=False)
    for key in base:
        assert torch.equal(whole[key], chunked[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_merges_stream_files_in_pieces_with_the_in_memory_result(monkeypatch, tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(7)
    base = {"w": torch.randn(40, 25, generator=gen).to(dtype), "b": torch.randn(9, generator=gen).to(dtype),
            "s": torch.randn((), generator=gen).to(dtype)}
    fts = [{k: (v.float() + 0.1 * torch.randn(v.shape, generator=gen)).to(dtype) for k, v in base.items()}
           for _ in range(3)]
    for name, state in {"base": base, **{f"ft{i}": ft for i, ft in enumerate(fts)}}.items():
        (tmp_path / name).mkdir()
        save_file(state, tmp_path / name / "model.safetensors")
    monkeypatch.setattr(TUNING, "combine_chunk", 7)  # pieces that split every tensor at odd places
    for config in (hf_merge.TaskArithmeticConfig(scaling=0.4), hf_merge.AverageConfig(weights=[1.0, 2.0, 3.0])):
        out = tmp_path / f"out-{config.method}"
        hf_merge.merge(tmp_path / "base", [tmp_path / f"ft{i}" for i in range(3)], config, output_dir=out,
                       progress=False)
        streamed = load_file(out / "model.safetensors")
        in_memory = hf_merge.merge(base, fts, config, progress=False)
        for key in base:
            assert streamed[key].dtype == dtype and streamed[key].shape == base[key].shape, key
            assert torch.equal(streamed[key], in_memory[key]), key
        coefficients = [0.4] * 3 if config.method == "task_arithmetic" else [1 / 6, 2 / 6, 3 / 6]
        expected = base["w"].float() + sum(c * (ft["w"].float() - base["w"].float())
                                           for c, ft in zip(coefficients, fts))
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(streamed["w"].float(), expected.to(dtype).float(), rtol=0, atol=tolerance)


def _bf16_checkpoints(tmp_path, shapes, num_tasks, seed):
    """Base + fine-tuned bf16 safetensors folders whose task vectors have different scales per tensor and task."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    base = {k: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16) for k, shape in shapes.items()}
    fts = [{k: (v.float() + torch.randn(v.shape, generator=gen) * 1e-3 * (1 + i) * (1 + j)).to(torch.bfloat16)
            for j, (k, v) in enumerate(base.items())} for i in range(num_tasks)]
    folders = []
    for name, state in [("base", base), *((f"ft{i}", ft) for i, ft in enumerate(fts))]:
        (tmp_path / name).mkdir()
        save_file(state, tmp_path / name / "model.safetensors")
        folders.append(tmp_path / name)
    return base, fts, folders


@pytest.mark.parametrize("density", [0.2, 0.9, 1.0])
def test_global_ties_reads_each_checkpoint_tensor_once_and_is_exact(tmp_path, monkeypatch, density):
    from safetensors.torch import load_file

    from hf_merge.io import FolderSource
    from hf_merge.io.safetensors_file import SafetensorsFile

    monkeypatch.setattr(TUNING, "ties_sample_every", 256)  # a sample stride (256 blocks of 1024) below the size of "big"
    shapes = {"big": (600, 512), "mid": (70, 33), "bias": (300,)}  # "big" is sampled in blocks, the others whole
    base, fts, folders = _bf16_checkpoints(tmp_path, shapes, 3, seed=11)
    whole_reads = []  # whole tensors read or mapped (the 1/1024 sample reads blocks)
    original_read, original_read_range = SafetensorsFile.read, SafetensorsFile.read_range

    def read_range(self, name, start, out):
        if start == 0 and out.numel() == math.prod(self.shape(name)):
            whole_reads.append((self.path, name))
        return original_read_range(self, name, start, out)

    def read_blocks(self, key, starts, count):
        if list(starts) == [0] and count >= math.prod(self.meta(key).shape):
            whole_reads.append((self.folder / "model.safetensors", key))
        return original_read_blocks(self, key, starts, count)

    original_map, original_read_blocks = SafetensorsFile.map_array, FolderSource.read_blocks
    for method, original in (("read", original_read), ("map_array", original_map)):  # a fresh buffer, or mapped
        monkeypatch.setattr(SafetensorsFile, method, lambda self, name, original=original:
                            whole_reads.append((self.path, name)) or original(self, name))
    monkeypatch.setattr(SafetensorsFile, "read_range", read_range)
    monkeypatch.setattr(FolderSource, "read_blocks", read_blocks)
    hf_merge.merge(folders[0], folders[1:], "ties", density=density, output_dir=tmp_path / "out", progress=False)
    # once each; with density < 1 a tensor smaller than the threshold sample's stride is also read whole by it
    stride = TUNING.ties_sample_block * TUNING.ties_sample_every
    expected_reads = [(folder / "model.safetensors", key) for folder in folders for key, shape in shapes.items()
                      for _ in range(2 if density < 1 and math.prod(shape) < stride else 1)]
    assert sorted(whole_reads) == sorted(expected_reads)
    as_float = lambda sd: {k: v.float() for k, v in sd.items()}  # noqa: E731
    expected = ties_reference(as_float(base), [as_float(f) for f in fts], density, 1.0)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    for key in shapes:
        assert torch.equal(merged[key], expected[key].to(torch.bfloat16)), key


def test_global_ties_with_a_missed_threshold_bracket_falls_back_to_the_exact_streaming_passes(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from hf_merge.methods.ties import OnePassTies

    shapes = {"big": (600, 512), "bias": (300,)}
    base, fts, folders = _bf16_checkpoints(tmp_path, shapes, 2, seed=12)
    passes = []
    original_bracket = OnePassTies.bracket

    def wrong_bracket(self):  # a bracket far above every |τ|: the verification at the end must reject it
        passes.append(self)
        self._brackets = lambda: (torch.full((2, 1), 10.0), torch.full((2, 1), 20.0))
        return original_bracket(self)

    monkeypatch.setattr(OnePassTies, "bracket", wrong_bracket)
    # the provisional outputs are written as they are merged, then every tensor is rewritten in place
    hf_merge.merge(folders[0], folders[1:], "ties", density=0.2, output_dir=tmp_path / "out", progress=False)
    assert [one_pass.settled for one_pass in passes] == [False]
    as_float = lambda sd: {k: v.float() for k, v in sd.items()}  # noqa: E731
    expected = ties_reference(as_float(base), [as_float(f) for f in fts], 0.2, 1.0)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    for key in shapes:
        assert torch.equal(merged[key], expected[key].to(torch.bfloat16)), key


def test_global_ties_under_a_memory_budget_takes_the_exact_streaming_passes(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from hf_merge.methods.ties import OnePassTies

    base, fts, folders = _bf16_checkpoints(tmp_path, {"w": (64, 48), "b": (48,)}, 2, seed=13)
    monkeypatch.setattr(OnePassTies, "bracket", lambda self: pytest.fail("one-pass TIES under a memory budget"))
    hf_merge.merge(folders[0], folders[1:], "ties", density=0.3, output_dir=tmp_path / "out", max_memory="1GB",
                   progress=False)
    as_float = lambda sd: {k: v.float() for k, v in sd.items()}  # noqa: E731
    expected = ties_reference(as_float(base), [as_float(f) for f in fts], 0.3, 1.0)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    for key in base:
        assert torch.equal(merged[key], expected[key].to(torch.bfloat16)), key


@pytest.mark.parametrize("majority", [1.0, -1.0, 0.0])
def test_global_ties_gives_exactly_cancelling_entries_the_global_majority_sign(monkeypatch, majority):
    from hf_merge.methods.ties import OnePassTies

    # entry 0 cancels exactly (+2 and -2); the elected signs of entries 1-3 sum to the majority sign's mass
    rows = {1.0: ([2.0, 1.0, 1.0, -1.0], [-2.0, 3.0, 1.0, -1.0]),   # signs +, +, -: mass +1
            -1.0: ([2.0, 1.0, -1.0, -1.0], [-2.0, 3.0, -1.0, -1.0]),  # signs +, -, -: mass -1
            0.0: ([2.0, 1.0, -1.0, 5.0], [-2.0, 3.0, -3.0, -5.0])}  # signs +, -, 0: mass 0
    base = {"w": torch.zeros(4)}
    fts = [{"w": torch.tensor(row)} for row in rows[majority]]
    passes = []
    original_bracket = OnePassTies.bracket
    monkeypatch.setattr(OnePassTies, "bracket", lambda self: passes.append(self) or original_bracket(self))
    merged = hf_merge.merge(base, fts, "ties", density=1.0, progress=False)
    expected = ties_reference(base, fts, 1.0, 1.0)
    assert torch.equal(merged["w"], expected["w"])
    assert merged["w"][0].item() == {1.0: 2.0, -1.0: -2.0, 0.0: 0.0}[majority]
    assert passes[0].settled == (majority != 0)  # a majority sign of exactly 0 takes the exact streaming passes
