"""The compiled kernels (numba, the ``fast`` extra) give the torch route's exact bits, and fail the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import hf_merge
from hf_merge.kernels import TiesOnePassKernel
from hf_merge.tuning import TUNING
from tests.helpers import ties_reference

pytest.importorskip("numba")


def _grid_task_vectors(dtype: torch.dtype, num_tasks: int, seed: int):
    """Base + fine-tuned state dicts whose task vectors take few distinct values (multiples of 2⁻¹⁰ up to ±8), so
    many |τ| equal the threshold, many entries sit inside the threshold brackets and many elected sums are
    exactly 0 — the entries the one pass sets aside."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"big": (300, 257), "mid": (33, 17), "bias": (7,)}
    base = {k: torch.randint(-64, 64, shape, generator=gen).float().mul(2**-6).to(dtype) for k, shape in shapes.items()}
    fts = [{k: (v.float() + torch.randint(-8, 9, v.shape, generator=gen).float().mul(2**-10)).to(dtype)
            for k, v in base.items()} for _ in range(num_tasks)]
    return base, fts


def _merge(monkeypatch, route: str, base, fts, **options):
    monkeypatch.setenv("HF_MERGE_KERNELS", "1" if route == "compiled" else "0")
    return hf_merge.merge(base, fts, "ties", progress=False, **options)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("aggregate", ["mean", "sum"])
@pytest.mark.parametrize("block", [1 << 20, 40_000])  # one block per tensor, or tensors split across blocks
def test_compiled_one_pass_ties_equals_the_torch_route_and_the_whole_model_reference(monkeypatch, dtype, aggregate,
                                                                                      block):
    monkeypatch.setattr(TUNING, "ties_kernel_block", block)
    monkeypatch.setattr(TUNING, "ties_sample_every", 16)  # a dense sample: brackets tight enough on a small model to
    #                                                        leave entries both inside them and outside with an exact 0 sum
    base, fts = _grid_task_vectors(dtype, num_tasks=4, seed=1)
    reports = []
    original_call = TiesOnePassKernel.__call__
    monkeypatch.setattr(TiesOnePassKernel, "__call__",
                        lambda self, *args: reports.append(original_call(self, *args)) or reports[-1])
    options = dict(density=0.3, scaling=1.3, aggregate=aggregate)
    compiled = _merge(monkeypatch, "compiled", base, fts, **options)
    assert reports, "the compiled kernel did not run"
    assert sum(r.open_index.size for r in reports) > 0, "no entry was left inside a bracket"
    assert sum(r.zero_index.size for r in reports) > 0, "no elected sum cancelled exactly"
    calls = len(reports)
    torch_route = _merge(monkeypatch, "torch", base, fts, **options)
    assert len(reports) == calls
    as_float = lambda sd: {k: v.float() for k, v in sd.items()}  # noqa: E731
    expected = ties_reference(as_float(base), [as_float(f) for f in fts], 0.3, 1.3, aggregate)
    for key in base:
        assert compiled[key].dtype == dtype, key
        assert torch.equal(compiled[key], torch_route[key]), key
        assert torch.equal(compiled[key], expected[key].to(dtype)), key


@pytest.mark.parametrize("route", ["compiled", "torch"])
def test_one_pass_ties_takes_a_negative_majority_sign_for_cancelling_entries(monkeypatch, route):
    base, fts = _grid_task_vectors(torch.bfloat16, num_tasks=3, seed=2)
    for ft in fts:  # every entry that does not cancel elects -1: the global majority sign is -1
        for key, value in ft.items():
            delta = value.float() - base[key].float()
            ft[key] = (base[key].float() - delta.abs()).to(torch.bfloat16)
    fts[1]["big"][0, 0] = (base["big"][0, 0].float() + (base["big"][0, 0].float() - fts[0]["big"][0, 0].float()))
    fts[2]["big"][0, 0] = base["big"][0, 0]
    merged = _merge(monkeypatch, route, base, fts, density=1.0)
    as_float = lambda sd: {k: v.float() for k, v in sd.items()}  # noqa: E731
    expected = ties_reference(as_float(base), [as_float(f) for f in fts], 1.0, 1.0)
    for key in base:
        assert torch.equal(merged[key], expected[key].to(torch.bfloat16)), key
    cancelled = merged["big"][0, 0].float() - base["big"][0, 0].float()
    assert cancelled.item() == (fts[0]["big"][0, 0].float() - base["big"][0, 0].float()).item() < 0


@pytest.mark.parametrize("route", ["compiled", "torch"])
def test_one_pass_ties_names_the_input_holding_nan_and_writes_nothing(tmp_path, monkeypatch, route):
    from safetensors.torch import save_file

    base, fts = _grid_task_vectors(torch.bfloat16, num_tasks=2, seed=3)
    fts[1]["big"][123, 45] = float("nan")
    for name, state in [("base", base), ("ft0", fts[0]), ("ft1", fts[1])]:
        (tmp_path / name).mkdir()
        save_file(state, tmp_path / name / "model.safetensors")
    monkeypatch.setenv("HF_MERGE_KERNELS", "1" if route == "compiled" else "0")
    with pytest.raises(hf_merge.MergeError, match=r"ft1.*'big'.*NaN"):
        hf_merge.merge(tmp_path / "base", [tmp_path / "ft0", tmp_path / "ft1"], "ties", output_dir=tmp_path / "out",
                       progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft0", "ft1"]


@pytest.mark.parametrize("route", ["compiled", "torch"])
def test_ties_reports_a_task_vector_that_overflows_float32(monkeypatch, route):
    base = {"w": torch.full((8,), -3e38, dtype=torch.bfloat16)}
    fts = [{"w": torch.full((8,), 3e38, dtype=torch.bfloat16)}, {"w": base["w"].clone()}]
    with pytest.raises(hf_merge.MergeError, match=r"'w'.*overflows float32"):
        _merge(monkeypatch, route, base, fts)


@pytest.mark.parametrize("route", ["compiled", "torch"])
@pytest.mark.parametrize("case", ["kept sum", "scaled result"])
def test_ties_reports_a_merge_that_overflows_float32_from_finite_task_vectors(monkeypatch, route, case):
    base = {"w": torch.zeros(8, dtype=torch.bfloat16)}
    if case == "kept sum":  # each τ_t is finite, their sum is not
        fts, scaling = [{"w": torch.full((8,), 3e38, dtype=torch.bfloat16)} for _ in range(2)], 1.0
    else:  # the merged τ is finite, λ·τ is not
        fts, scaling = [{"w": torch.full((8,), 1e38, dtype=torch.bfloat16)}], 10.0
    with pytest.raises(hf_merge.MergeError, match=r"'w'.*overflows float32"):
        _merge(monkeypatch, route, base, fts, density=1.0, aggregate="sum", scaling=scaling)


def test_kernel_bfloat16_load_and_store_match_torchs_conversions():
    import numpy as np

    from hf_merge._numba_kernels import load, store

    values = torch.cat([torch.randn(500), torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3e38])])  # ties
    stored = np.empty(values.numel(), dtype=np.uint16)
    for i, value in enumerate(values.tolist()):
        store(stored, i, value)
    assert np.array_equal(stored, values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    loaded = np.array([load(stored, i) for i in range(stored.size)], dtype=np.float32)
    assert np.array_equal(loaded, values.to(torch.bfloat16).float().numpy())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("inputs", ["folders", "state_dicts", "mixed"])  # mixed: mapped and in-memory inputs
def test_compiled_linear_merges_equal_the_torch_route(tmp_path, monkeypatch, dtype, inputs):
    from safetensors.torch import save_file

    from hf_merge import context

    gen = torch.Generator().manual_seed(5)
    shapes = {"w": (300, 257), "b": (7,), "s": ()}
    base = {k: torch.randn(shape, generator=gen).to(dtype) for k, shape in shapes.items()}
    fts = [{k: (v.float() + 0.1 * torch.randn(v.shape, generator=gen)).to(dtype) for k, v in base.items()}
           for _ in range(3)]
    if inputs != "state_dicts":
        for name, state in [("base", base), *((f"ft{i}", ft) for i, ft in enumerate(fts))]:
            (tmp_path / name).mkdir()
            save_file(state, tmp_path / name / "model.safetensors")
        base, fts = tmp_path / "base", [tmp_path / f"ft{i}" for i in range(3)] if inputs == "folders" else \
            [tmp_path / "ft0", fts[1], tmp_path / "ft2"]
    calls = []
    original = context.fused_linear_combine

    def spied(*dtypes):  # the kernel the seam hands out, recording each call
        kernel = original(*dtypes)
        return None if kernel is None else lambda *args: calls.append(args) or kernel(*args)

    monkeypatch.setattr(context, "fused_linear_combine", spied)
    for config in (hf_merge.TaskArithmeticConfig(scaling=0.37), hf_merge.AverageConfig(weights=[1.0, 2.0, 4.0])):
        monkeypatch.setenv("HF_MERGE_KERNELS", "1")
        compiled = hf_merge.merge(base, fts, config, progress=False, dtype=dtype)
        assert len(calls) == len(shapes), "the compiled kernel did not merge every tensor"
        monkeypatch.setenv("HF_MERGE_KERNELS", "0")
        torch_route = hf_merge.merge(base, fts, config, progress=False, dtype=dtype)
        assert len(calls) == len(shapes)
        calls.clear()
        compiled = compiled if isinstance(compiled, dict) else compiled.state_dict()
        torch_route = torch_route if isinstance(torch_route, dict) else torch_route.state_dict()
        for key in shapes:
            assert compiled[key].dtype == dtype and torch.equal(compiled[key], torch_route[key]), key


# ----------------------------------------------------------------------------------------- selection without sorting
@pytest.mark.parametrize("seed", range(6))
def test_selection_and_stable_rank_bands_equal_the_sorted_reference(seed):
    from hf_merge.tensors import kth_smallest, stable_rank_band

    generator = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 400, (1,), generator=generator))
    values = torch.randint(0, 7, (n,), generator=generator).float()  # many equal values: ties by position matter
    order = torch.argsort(values, stable=True)
    for k in (1, n, max(1, n // 3)):
        assert kth_smallest(values, k) == values.kthvalue(k).values.item()
    for start, stop in [(0, n), (n // 4, n // 2), (n // 3, n // 3 + 1), (n // 2, n // 2), (0, 0)]:
        expected = torch.zeros(n, dtype=torch.bool)
        expected[order[start:stop]] = True
        assert torch.equal(stable_rank_band(values, start, stop), expected), (start, stop)


@pytest.mark.parametrize("aggregate", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("majority", [None, 1.0])
def test_the_fused_elect_merge_equals_the_torch_route(monkeypatch, aggregate, weighted, majority):
    from hf_merge.methods.ties import sign_elected_merge, trim_rule

    generator = torch.Generator().manual_seed(7)
    # integer-valued task vectors: many equal magnitudes at the thresholds and many exactly cancelling sums
    flat = [torch.randint(-3, 4, (5000,), generator=generator).float() for _ in range(3)]
    rules = [trim_rule(f, density, trim) for f, density, trim in zip(flat, (0.3, 0.5, 1.0), ("topk", "threshold",
                                                                                            "topk"))]
    weights = [0.5, 2.0, 1.0] if weighted else None
    scales = [0.25, 2.0, 1.0] if weighted else None
    results = []
    for kernels in ("1", "0"):
        monkeypatch.setenv("HF_MERGE_KERNELS", kernels)
        results.append(sign_elected_merge(flat, rules, scales, weights, majority, aggregate))
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=0)


def test_the_first_compile_on_a_machine_is_announced_once(monkeypatch, caplog):
    from hf_merge import kernels

    monkeypatch.setenv("HF_MERGE_KERNELS", "1")
    monkeypatch.setattr(kernels, "_cached_on_disk", lambda kernel: False)
    kernels._announce_compile.cache_clear()
    monkeypatch.setattr(type(kernels._kernel("gram")), "signatures", property(lambda self: []))
    with caplog.at_level("WARNING", logger="hf_merge.kernels"):
        kernels._kernel("gram")
        kernels._kernel("linear_combine")
    assert [r.getMessage() for r in caplog.records] == ["compiling merge kernels (once per machine)…"]
    kernels._announce_compile.cache_clear()


@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_sce_variance_has_the_bits_of_torch_var(num_tasks):
    from hf_merge.methods.sce import population_variance

    generator = torch.Generator().manual_seed(num_tasks)
    values = [(torch.randn(20000, generator=generator) * 1e-3).to(torch.bfloat16).float() for _ in range(num_tasks)]
    assert torch.equal(population_variance(values), torch.stack(values).var(dim=0, unbiased=False))


# ----------------------------------------------------------------------------------------- radix selection and bands
def _tied_values(seed: int) -> torch.Tensor:
    """Float32 values with runs of equal magnitudes of both signs, exact zeros and negative zeros."""
    generator = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 3000, (1,), generator=generator))
    values = (torch.randn(n, generator=generator) * 0.01).to(torch.float8_e4m3fn).float()  # few distinct values
    values[torch.randint(0, n, (n // 4,), generator=generator)] = 0.0
    values[torch.randint(0, n, (n // 8,), generator=generator)] = -0.0
    return values


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("absolute", [False, True])
def test_the_radix_selection_equals_kthvalue_with_its_counts(seed, absolute):
    from hf_merge.kernels import select_kth

    values = _tied_values(seed)
    reference = values.abs() if absolute else values
    n = values.numel()
    for k in sorted({1, n, max(1, n // 2), max(1, n // 9)}):
        selected = select_kth(values.numpy(), k, absolute)
        expected = reference.kthvalue(k).values.item()
        assert selected.value == expected, k
        assert (selected.below, selected.equal) == (int((reference < expected).sum()), int((reference == expected).sum()))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("absolute", [False, True])
def test_the_fused_rank_band_keeps_what_the_stable_sort_keeps(seed, absolute):
    from hf_merge.kernels import fused_rank_band

    values = _tied_values(seed)
    n = values.numel()
    ranks = torch.empty(n, dtype=torch.long)
    ranks[torch.argsort(values.abs() if absolute else values, stable=True)] = torch.arange(n)
    for start, stop in [(0, n), (n // 4, n // 2), (n // 3, n // 3 + 1), (n - 1, n)]:
        if stop <= start:
            continue
        expected = torch.where((ranks >= start) & (ranks < stop), values, torch.zeros_like(values))
        assert torch.equal(fused_rank_band(values, start, stop, absolute), expected), (start, stop)


def test_counter_uniforms_are_the_same_bits_from_the_kernel_and_numpy_and_uniform(monkeypatch):
    from hf_merge.kernels import counter_uniforms

    monkeypatch.setenv("HF_MERGE_KERNELS", "1")
    compiled = counter_uniforms(2**62 + 12345, (300, 700))
    monkeypatch.setenv("HF_MERGE_KERNELS", "0")
    assert torch.equal(compiled, counter_uniforms(2**62 + 12345, (300, 700)))
    assert not torch.equal(compiled, counter_uniforms(2**62 + 12346, (300, 700)))
    flat = compiled.reshape(-1)
    assert flat.min() >= 0 and flat.max() < 1
    # Kolmogorov–Smirnov distance to U(0, 1): 1.63/√n is the 1% critical value
    ordered = flat.double().sort().values
    grid = torch.arange(1, flat.numel() + 1, dtype=torch.float64) / flat.numel()
    assert (ordered - grid).abs().max() < 1.63 / flat.numel() ** 0.5
    # neighbouring entries are uncorrelated
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1]) < 0.01


@pytest.mark.parametrize("method", ["magmax", "sce", "breadcrumbs", "della", "della-l1", "della_linear-unscaled",
                                    "dare"])
def test_the_compiled_sparsifiers_equal_the_torch_route(monkeypatch, method):
    base, fts = _grid_task_vectors(torch.float32, 3, seed=11)
    options = {"magmax": {}, "sce": {"select_topk": 0.5}, "breadcrumbs": {"density": 0.5, "gamma": 0.1},
               "della": {"density": 0.4}, "della-l1": {"density": 0.4, "rescale_norm": "l1"},
               "della_linear-unscaled": {"density": 0.3, "epsilon": 0.1, "rescale": False},
               "dare": {"drop_rate": 0.5, "then": hf_merge.TiesConfig(density=1.0)}}[method]
    method = method.split("-")[0]
    results = []
    for kernels in ("1", "0"):
        monkeypatch.setenv("HF_MERGE_KERNELS", kernels)
        results.append(hf_merge.merge(base, fts, method, progress=False, **options))
    for key in base:
        assert torch.equal(results[0][key], results[1][key]), key


# ----------------------------------------------------------------------------------------- merges from stored inputs
STORED_ROUTE_CONFIGS = {
    "ties-tensor-threshold": {"method": "ties", "density": 0.3, "scope": "tensor"},
    "ties-tensor-topk-weighted": {"method": "ties", "density": [0.2, 0.5, 0.4], "scope": "tensor", "trim": "topk",
                                  "weights": [0.5, 1.5, 1.0], "zero_sign": "positive", "scaling": 0.7},
    "ties-tensor-sum": {"method": "ties", "density": 0.5, "scope": "tensor", "aggregate": "sum"},
    "ties-global-weighted": {"method": "ties", "density": 0.3, "weights": [1.0, 2.0, 0.5]},
    "dare-ties": {"method": "dare", "drop_rate": [0.5, 0.7, 0.0], "then": {"method": "ties", "density": 1.0,
                                                                          "scope": "tensor", "zero_sign": "positive"}},
    "dare-ties-l1": {"method": "dare", "drop_rate": 0.6, "rescale_norm": "l1",
                     "then": {"method": "ties", "density": 1.0, "scope": "tensor", "zero_sign": "positive"}},
    "dare-ties-no-rescale-trimmed": {"method": "dare", "drop_rate": 0.4, "rescale": False,
                                     "then": {"method": "ties", "density": 0.5, "scope": "tensor", "trim": "topk"}},
    "magmax": {"method": "magmax", "scaling": 0.7},
    "sce": {"method": "sce"},
    "sce-mergekit": {"method": "sce", "zero_sign": "positive", "epsilon": 1e-6},
    "sce-selection-on-one-tensor": {"method": "sce", "select_topk": hf_merge.Schedule([{"filter": "big", "value": 0.5},
                                                                                     {"value": 1.0}])},
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", list(STORED_ROUTE_CONFIGS))
def test_merges_from_the_stored_inputs_equal_the_float32_route(monkeypatch, dtype, name):
    base, fts = _grid_task_vectors(dtype, 3, seed=5)
    config = hf_merge.MergeConfig.from_dict(STORED_ROUTE_CONFIGS[name])
    results = []
    for kernels in ("1", "0"):
        monkeypatch.setenv("HF_MERGE_KERNELS", kernels)
        results.append(hf_merge.merge(base, fts, config, progress=False))
    for key in base:
        assert results[0][key].dtype == dtype and torch.equal(results[0][key], results[1][key]), key


def test_the_stored_route_is_taken_and_counts_what_ties_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_MERGE_KERNELS", "1")
    base, fts = _grid_task_vectors(torch.bfloat16, 3, seed=6)
    out = hf_merge.merge(base, fts, "ties", density=0.3, scope="tensor", output_dir=tmp_path / "out", progress=False)
    summary = json.loads((Path(out) / "merge_config.json").read_text())["summary"]
    assert summary["route"] == "stored"
    # the reference: the float32 task vectors, trimmed per tensor, and their elected signs
    kept = conflicts = entries = 0
    for key in base:
        deltas = torch.stack([ft[key].float() - base[key].float() for ft in fts]).reshape(3, -1)
        thresholds = [d.abs().kthvalue(d.numel() - int(d.numel() * 0.3)).values for d in deltas]
        trimmed = torch.stack([torch.where(d.abs() >= th, d, 0) for d, th in zip(deltas, thresholds)])
        signs = torch.sign(trimmed.sum(0))
        signs[signs == 0] = torch.sign(torch.sign(trimmed.sum(0)).sum()) or 1.0
        kept += int((trimmed != 0).sum())
        conflicts += int(((trimmed * signs) < 0).any(0).sum())
        entries += deltas.shape[1]
    assert summary["statistics"] == pytest.approx({"kept_fraction": kept / (3 * entries),
                                                   "sign_conflict_rate": conflicts / entries})


def test_a_non_finite_stored_input_is_named_by_the_float32_route(monkeypatch):
    monkeypatch.setenv("HF_MERGE_KERNELS", "1")
    base, fts = _grid_task_vectors(torch.bfloat16, 3, seed=7)
    fts[1]["mid"].view(-1)[5] = float("nan")
    with pytest.raises(hf_merge.MergeError, match="'mid' contains NaN"):
        hf_merge.merge(base, fts, "ties", density=0.3, scope="tensor", progress=False)


@pytest.mark.parametrize("values", ["smooth", "tied", "dropped"])
def test_bracketed_selection_from_stored_inputs_equals_the_radix_selection(values):
    from hf_merge.kernels import StoredTies
    from hf_merge.tensors import numpy_view

    generator = torch.Generator().manual_seed(3)
    n = 300_000
    base = torch.randn(n, generator=generator).to(torch.bfloat16)
    noise = {"smooth": lambda: torch.randn(n, generator=generator) * 1e-2,
             "tied": lambda: torch.randint(-4, 5, (n,), generator=generator).float() * 2**-8,
             "dropped": lambda: torch.randn(n, generator=generator) * 1e-2}[values]
    tasks = [(base.float() + noise()).to(torch.bfloat16) for _ in range(3)]
    arrays = [numpy_view(x) for x in (base, *tasks)]
    drop = {"rates": [0.5, 0.9, 0.0], "seeds": [1, 2, 3], "divisors": [0.5, 0.1, 1.0]} if values == "dropped" else {}
    ranks = [1, n // 2, n - 7]
    for shift in range(3):  # every task gets every rank
        ranks_now = ranks[shift:] + ranks[:shift]
        stored = StoredTies(arrays, **drop)
        bracketed = stored.select_all(ranks_now)
        for t, k in enumerate(ranks_now):
            assert bracketed[t] == StoredTies(arrays, **drop).select(t, k), (t, k)


def test_global_ties_in_one_pass_reports_the_exact_kept_fraction(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_MERGE_KERNELS", "1")
    base, fts = _grid_task_vectors(torch.float32, 3, seed=8)
    out = hf_merge.merge(base, fts, "ties", density=0.3, output_dir=tmp_path / "out", progress=False)
    summary = json.loads((Path(out) / "merge_config.json").read_text())["summary"]
    assert summary["route"] == "one pass"
    deltas = [torch.cat([(ft[k].float() - base[k].float()).reshape(-1) for k in base]) for ft in fts]
    total = deltas[0].numel()
    thresholds = [d.abs().kthvalue(total - int(total * 0.3)).values for d in deltas]
    kept = sum(int((d.abs() >= th).sum()) for d, th in zip(deltas, thresholds))
    assert summary["statistics"] == {"kept_fraction": pytest.approx(kept / (3 * total))}


def test_numpy_uniforms_in_pieces_equal_the_kernel_across_piece_boundaries(monkeypatch):
    from hf_merge import kernels

    monkeypatch.setattr(kernels, "_UNIFORMS_PIECE", 1000)
    monkeypatch.setenv("HF_MERGE_KERNELS", "1")
    compiled = kernels.counter_uniforms(99, (37, 101))
    monkeypatch.setenv("HF_MERGE_KERNELS", "0")
    assert torch.equal(compiled, kernels.counter_uniforms(99, (37, 101)))


# ------------------------------------------------------------- Breadcrumbs and DELLA from stored inputs
SPARSE_STORED_CONFIGS = {
    "breadcrumbs": {"method": "breadcrumbs", "density": 0.5, "gamma": 0.1},
    "breadcrumbs-per-task-weighted-mean-l1": {"method": "breadcrumbs", "density": [0.3, 0.5, 0.6],
                                              "gamma": [0.0, 0.1, 0.05], "weights": [0.5, 1.5, 1.0],
                                              "aggregate": "mean", "rescale_norm": "l1", "scaling": 0.7},
    "breadcrumbs-density-1-gamma-0": {"method": "breadcrumbs", "density": 1.0, "gamma": 0.0, "aggregate": "mean"},
    "breadcrumbs_ties": {"method": "breadcrumbs_ties", "density": 0.5, "gamma": 0.1},
    "breadcrumbs_ties-positive-sum-weighted-l1": {"method": "breadcrumbs_ties", "density": [0.2, 0.4, 0.7],
                                                  "gamma": [0.05, 0.0, 0.3], "weights": [1.0, 2.0, 0.5],
                                                  "zero_sign": "positive", "aggregate": "sum", "rescale_norm": "l1"},
    "breadcrumbs_ties-tiny-band": {"method": "breadcrumbs_ties", "density": 0.01, "gamma": 0.0, "scaling": 1.3},
    "della": {"method": "della", "density": 0.4},
    "della-per-task-weighted-positive-l1": {"method": "della", "density": [0.3, 0.5, 1.0],
                                            "epsilon": [0.1, 0.2, 0.1], "weights": [0.5, 1.5, 1.0],
                                            "zero_sign": "positive", "rescale_norm": "l1", "seed": 3},
    "della-sum-unscaled": {"method": "della", "density": 0.3, "epsilon": 0.1, "rescale": False,
                           "aggregate": "sum"},
    "della-weighted-majority": {"method": "della", "density": 0.5, "epsilon": 0.3, "weights": [1.0, -0.5, 2.0]},
    "della_linear": {"method": "della_linear", "density": 0.4},
    "della_linear-mean-weighted": {"method": "della_linear", "density": [0.4, 0.6, 0.5], "weights": [0.5, 1.5, 1.0],
                                   "aggregate": "mean", "scaling": 0.8},
    "della_linear-l1-density-1": {"method": "della_linear", "density": [0.4, 1.0, 0.3], "rescale_norm": "l1"},
}


def _sparse_task_vectors(dtype: torch.dtype, seed: int):
    """:func:`_grid_task_vectors` (magnitude ties everywhere) plus a 3-D tensor, one-entry rows, a tensor whose task
    vectors are all zero, one whose elected sums are mostly negative (a negative majority sign, with exact
    cancellations) and a task vector that is zero in one tensor only."""
    base, fts = _grid_task_vectors(dtype, 3, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    shapes = {"cube": (4, 5, 6), "column": (9, 1), "zero": (40, 30), "down": (50, 40)}
    for key, shape in shapes.items():
        base[key] = torch.randint(-64, 64, shape, generator=gen).float().mul(2**-6).to(dtype)
    for t, ft in enumerate(fts):
        for key in ("cube", "column"):
            noise = torch.randint(-8, 9, base[key].shape, generator=gen).float().mul(2**-10)
            ft[key] = (base[key].float() + noise).to(dtype)
        ft["zero"] = base["zero"].clone()
        down = torch.randint(-8, 3, base["down"].shape, generator=gen).float().mul(2**-10)
        ft["down"] = (base["down"].float() + down).to(dtype)
    fts[2]["mid"] = base["mid"].clone()
    return base, fts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", list(SPARSE_STORED_CONFIGS))
def test_breadcrumbs_and_della_from_the_stored_inputs_equal_the_float32_route(monkeypatch, dtype, name):
    """Bit-identical to ``merge_tensor`` (the torch reference, kernels off), with every tensor merged from the stored
    inputs (no fallback)."""
    from hf_merge.methods.breadcrumbs import BreadcrumbsMerger
    from hf_merge.methods.della import DellaMerger

    taken = []
    for merger_class in (BreadcrumbsMerger, DellaMerger):
        original = merger_class.merge_stored

        def recorded(self, key, arrays, out, info, original=original):
            taken.append((key, original(self, key, arrays, out, info)))
            return taken[-1][1]

        monkeypatch.setattr(merger_class, "merge_stored", recorded)
    base, fts = _sparse_task_vectors(dtype, seed=5)
    config = hf_merge.MergeConfig.from_dict(SPARSE_STORED_CONFIGS[name])
    results = []
    for kernels in ("1", "0"):
        monkeypatch.setenv("HF_MERGE_KERNELS", kernels)
        results.append(hf_merge.merge(base, fts, config, progress=False))
        if kernels == "1":
            assert sorted(taken) == sorted((key, True) for key in base)
    for key in base:
        assert results[0][key].dtype == dtype and torch.equal(results[0][key], results[1][key]), key


@pytest.mark.parametrize("method", ["breadcrumbs_ties", "della"])
def test_a_negative_majority_sign_is_settled_in_the_stored_pass(monkeypatch, method):
    """The tensor's majority sign is decided in the same pass: a tensor whose elected sums are mostly negative takes
    −1 at its exact cancellations (as the float32 route), and an all-zero one the sign 0."""
    import numpy as np

    from hf_merge.kernels import StoredTies
    from hf_merge.tensors import numpy_view

    monkeypatch.setenv("HF_MERGE_KERNELS", "1")
    # every entry: τ = (−2, +2, −1)·2⁻¹⁰ (elected −1) or (+1, −1, 0)·2⁻¹⁰ (an exact cancellation), 3:1
    n = 4000
    base = torch.zeros(n, dtype=torch.float32)
    cancel = torch.arange(n) % 4 == 0
    rows = [torch.where(cancel, a, b) * 2**-10 for a, b in ((1.0, -2.0), (-1.0, 2.0), (0.0, -1.0))]
    arrays = [numpy_view(base), *(numpy_view(r.clone()) for r in rows)]
    for majority, expected in ((None, -1.0), (-1.0, -1.0), (1.0, 1.0)):
        out = np.empty(n, dtype=np.float32)
        stored = StoredTies(arrays)
        if method == "della":
            counts = stored.magprune_merge(n, [1.0] * 3, [0.1] * 3, [0] * 3, None, [1.0] * 3, None, True, majority,
                                           True, 1.0, 1.0, out)
        else:
            counts = stored.merge(stored.rank_bands([(0, n)] * 3), [1.0] * 3, None, majority, True, 1.0, out)
        assert counts is not None
        assert np.all(out[cancel.numpy()] == expected * 2**-10)  # the one value agreeing with the elected sign
        assert np.all(out[~cancel.numpy()] == -1.5 * 2**-10)
    zeros = [numpy_view(torch.zeros(n)) for _ in range(4)]
    out = np.full(n, 7.0, dtype=np.float32)
    assert StoredTies(zeros).merge(StoredTies(zeros).rank_bands([(0, n)] * 3), [1.0] * 3, None, None, True, 1.0,
                                   out) is not None
    assert np.all(out == 0)


def test_a_non_finite_input_sends_breadcrumbs_and_della_to_the_float32_route(monkeypatch):
    monkeypatch.setenv("HF_MERGE_KERNELS", "1")
    for method, options in (("breadcrumbs", {"density": 0.5, "gamma": 0.1}), ("della", {"density": 0.4})):
        base, fts = _grid_task_vectors(torch.bfloat16, 3, seed=7)
        fts[1]["big"].view(-1)[5] = float("inf")  # an outlier the band would drop
        with pytest.raises(hf_merge.MergeError, match="'big' contains"):
            hf_merge.merge(base, fts, method, progress=False, **options)


@pytest.mark.parametrize("values", ["smooth", "tied"])
def test_stored_rank_bands_keep_what_the_stable_sort_keeps(values):
    import numpy as np

    from hf_merge.kernels import StoredTies
    from hf_merge.tensors import numpy_view

    generator = torch.Generator().manual_seed(4)
    n = 200_000  # above the bracketing size
    base = torch.zeros(n, dtype=torch.bfloat16)  # (θ₀ + τ then holds τ exactly)
    noise = {"smooth": lambda: torch.randn(n, generator=generator) * 1e-2,
             "tied": lambda: torch.randint(-4, 5, (n,), generator=generator).float() * 2**-8}[values]
    tasks = [noise().to(torch.bfloat16) for _ in range(3)]
    arrays = [numpy_view(x) for x in (base, *tasks)]
    bands = [(0, n // 3), (n // 10, n - n // 100), (n - 5, n)]
    trim = StoredTies(arrays).rank_bands(bands)
    out = np.empty(n, dtype=np.float32)
    for t, (start, stop) in enumerate(bands):  # one task at a time: weights 1 for t, 0 for the others
        scales = [1.0 if s == t else 0.0 for s in range(3)]
        assert StoredTies(arrays).masked_sum(trim, scales, 1.0, 1.0, out) is not None
        delta = tasks[t].float() - base.float()
        order = torch.argsort(delta.abs(), stable=True)
        expected = torch.zeros(n)
        expected[order[start:stop]] = delta[order[start:stop]]
        assert torch.equal(torch.from_numpy(out) - base.float(), expected), t


def test_stored_l1_factors_agree_with_the_float64_reference_to_an_ulp_of_float32():
    """The one departure from bit-identity that can occur: the L1 factors' float64 sums run in another order than
    torch's, so the float32 factor can differ by one ulp where it lies within ~1e-15 of a rounding boundary."""
    import numpy as np

    from hf_merge.kernels import StoredTies
    from hf_merge.methods.ties import l1_factor
    from hf_merge.tensors import numpy_view

    generator = torch.Generator().manual_seed(9)
    n = 150_000
    base = torch.randn(n, generator=generator).to(torch.bfloat16)
    tasks = [(base.float() + torch.randn(n, generator=generator) * 1e-2).to(torch.bfloat16) for _ in range(3)]
    arrays = [numpy_view(x) for x in (base, *tasks)]
    bands = [(0, n // 2), (n // 10, n - n // 10), (n // 3, n - 1)]
    stored = StoredTies(arrays)
    trim = stored.rank_bands(bands)
    stored.rescale_trim_to_l1(trim)
    for t, (start, stop) in enumerate(bands):
        delta = tasks[t].float() - base.float()
        order = torch.argsort(delta.abs(), stable=True)
        masked = torch.zeros(n)
        masked[order[start:stop]] = delta[order[start:stop]]
        reference = np.float32(l1_factor(delta, masked))
        assert abs(int(trim.factors[t].view(np.int32)) - int(reference.view(np.int32))) <= 1, t
        assert abs(float(trim.factors[t]) / l1_factor(delta, masked) - 1) < 1e-7
