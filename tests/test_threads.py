"""``num_threads``: one CPU thread setting for a whole merge — torch's pool and every BLAS/LAPACK/OpenMP pool that
threadpoolctl sees (SciPy's OpenBLAS included) — restored afterwards, with the same results at any count."""

from __future__ import annotations

import dataclasses

import pytest
import threadpoolctl
import torch
import yaml

import hf_merge
from hf_merge.cli import main
from hf_merge.linalg import cpu_threads
from hf_merge.methods.base import Merger
from hf_merge.options import OPTION_KEYWORDS, MergeOptions, make_options
from hf_merge.params import ParamInfo
from hf_merge.registry import MERGE_METHODS
from tests.tiny_models import finetuned_copy, tiny_bert

SEEN: list[dict] = []


@dataclasses.dataclass(kw_only=True)
class ThreadProbeConfig(hf_merge.MergeConfig):
    """The mean of the task vectors; records the thread settings it runs under."""

    method: str = dataclasses.field(default="thread_probe", init=False)
    fail: bool = False


class ThreadProbeMerger(Merger):
    uses_param_info = False
    config: ThreadProbeConfig

    def prepare(self, ctx) -> None:
        import scipy.linalg  # noqa: F401  (its OpenBLAS is loaded by the engine anyway)

        SEEN.append(_settings())

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        if self.config.fail:
            raise RuntimeError("probe failure")
        return torch.stack(deltas).mean(dim=0)


def _settings() -> dict:
    """torch's thread count and the thread count of every threadpoolctl pool, by user API."""
    pools: dict[str, set[int]] = {}
    for pool in threadpoolctl.threadpool_info():
        pools.setdefault(pool["user_api"], set()).add(pool["num_threads"])
    return {"torch": torch.get_num_threads(), **pools}


def _restored(before: dict) -> bool:
    """The settings are back to ``before`` (pools loaded meanwhile, e.g. by numba, compared where both have them)."""
    after = _settings()
    return all(after[api] == value for api, value in before.items() if api in after)


@pytest.fixture(autouse=True)
def registered():
    hf_merge.register_method(ThreadProbeConfig, ThreadProbeMerger)
    SEEN.clear()
    yield
    MERGE_METHODS.pop("thread_probe", None)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    base = tiny_bert()
    return base, [finetuned_copy(base, seed=i + 1) for i in range(3)]


def _inputs():
    base = {"w": torch.zeros(6, 4), "b": torch.zeros(4)}
    return base, [{"w": torch.randn(6, 4), "b": torch.randn(4)} for _ in range(2)]


@pytest.mark.parametrize("threads", [1, 3])
def test_a_merge_runs_under_the_requested_threads_and_restores_them(threads):
    before = _settings()
    base, tasks = _inputs()
    hf_merge.merge(base, tasks, ThreadProbeConfig(), num_threads=threads, progress=False)
    (inside,) = SEEN
    assert inside["torch"] == threads
    assert inside["blas"] == {threads}  # NumPy's and SciPy's OpenBLAS alike
    assert inside.get("openmp", {threads}) == {threads}
    assert _restored(before)


def test_the_default_is_torchs_thread_count_and_applies_to_blas_too():
    before = _settings()
    base, tasks = _inputs()
    with threadpoolctl.threadpool_limits(limits=before["torch"] + 1, user_api="blas"):  # BLAS out of step with torch
        hf_merge.merge(base, tasks, ThreadProbeConfig(), progress=False)
    (inside,) = SEEN
    assert inside["torch"] == before["torch"]
    assert inside["blas"] == {before["torch"]}
    assert _restored(before)


def test_the_settings_are_restored_when_the_merge_fails():
    before = _settings()
    base, tasks = _inputs()
    with pytest.raises(RuntimeError, match="probe failure"):
        hf_merge.merge(base, tasks, ThreadProbeConfig(fail=True), num_threads=1, progress=False)
    assert SEEN[0]["torch"] == 1
    assert _restored(before)


def test_cpu_threads_nests_and_restores():
    before = _settings()
    with cpu_threads(1) as outer:
        assert outer == 1 and _settings()["blas"] == {1}
        with cpu_threads(None) as inner:  # None: torch's current count
            assert inner == 1
        with cpu_threads(2):
            assert torch.get_num_threads() == 2 and _settings()["blas"] == {2}
        assert torch.get_num_threads() == 1 and _settings()["blas"] == {1}
    assert _restored(before)


@pytest.mark.parametrize("bad", [0, -2, 1.5, "2", True])
def test_bad_thread_counts_are_refused_by_name(bad):
    base, tasks = _inputs()
    with pytest.raises(ValueError, match="num_threads"):
        hf_merge.merge(base, tasks, "task_arithmetic", num_threads=bad, progress=False)
    with pytest.raises(ValueError, match="num_threads"):
        make_options(num_threads=bad)


def test_num_threads_is_an_option_of_every_front_door():
    assert "num_threads" in OPTION_KEYWORDS and "num_threads" in MergeOptions.field_names()
    assert make_options(num_threads=2).num_threads == 2 and make_options().num_threads is None
    base, tasks = _inputs()
    merged = hf_merge.merge(base, tasks, "task_arithmetic", scaling=0.5, num_threads=1, progress=False)
    assert torch.allclose(merged["w"], 0.5 * (tasks[0]["w"] + tasks[1]["w"]))
    bank = hf_merge.compress(base, tasks, "tsv_c", num_threads=1, progress=False)
    assert set(bank.tasks) == {"task_0", "task_1"}


def _floats(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def test_task_arithmetic_is_bitwise_identical_at_one_and_two_threads(models):
    base, fts = models
    one = _floats(hf_merge.merge(base, fts, "task_arithmetic", scaling=0.4, num_threads=1, progress=False))
    two = _floats(hf_merge.merge(base, fts, "task_arithmetic", scaling=0.4, num_threads=2, progress=False))
    for key, value in one.items():
        assert torch.equal(two[key], value), key


@pytest.mark.filterwarnings("ignore:TSV keeps k")
@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_subspace_merges_agree_at_one_and_two_threads(models, method):
    base, fts = models
    one = _floats(hf_merge.merge(base, fts, method, num_threads=1, progress=False))
    two = _floats(hf_merge.merge(base, fts, method, num_threads=2, progress=False))
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.filterwarnings("ignore:The model card")
def test_a_yaml_recipe_takes_num_threads(tmp_path):
    base = tiny_bert()
    base.save_pretrained(tmp_path / "base")
    finetuned_copy(base, 1).save_pretrained(tmp_path / "ft")
    spec = {"method": "task_arithmetic", "base": "base", "models": ["ft"], "output": "merged", "num_threads": 1,
            "parameters": {"scaling": 0.5}}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(spec))
    before = _settings()
    assert main(["merge", str(tmp_path / "merge.yaml"), "--quiet"]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()
    assert _restored(before)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**spec, "num_threads": 0, "output": "bad"}))
    assert main(["merge", str(tmp_path / "bad.yaml"), "--quiet"]) == 2
    assert not (tmp_path / "bad").exists()


def test_the_routes_thread_choices_give_the_same_factors(monkeypatch):
    """Batched eigensolves (one thread each, side by side) equal the one-by-one ones bit for bit; the polar factor
    through torch's threaded eigh equals SciPy's to float32 accuracy."""
    from hf_merge import linalg

    g = torch.Generator().manual_seed(0)
    stack = torch.randn(5, 200, 150, generator=g, dtype=torch.float64).to(torch.float32)  # Gram 150² ≥ batch size
    calls = []
    monkeypatch.setattr(linalg, "_syevr_top", lambda gram, top, solve=linalg._syevr_top: calls.append(1) or solve(
        gram, top))
    with cpu_threads(2):
        batched = linalg.top_k_svd(stack, 12)
        assert len(calls) == len(stack)  # the batched route ran
        polar_torch = linalg.polar(stack[0])
        monkeypatch.setitem(linalg.LAPACK_THREADS, "top_k", 1)
        monkeypatch.setitem(linalg.LAPACK_THREADS, "polar", 1)
        one_by_one = linalg.top_k_svd(stack, 12)
        polar_scipy = linalg.polar(stack[0])
    for got, expected in zip(batched, one_by_one):
        assert torch.equal(got, expected)
    torch.testing.assert_close(polar_torch, polar_scipy, rtol=1e-5, atol=1e-5)
    double = linalg._syevr_top(stack[0].double().T @ stack[0].double(), 7)
    reference = linalg._eigh(stack[0].double().T @ stack[0].double(), top=7)
    assert torch.equal(double[0], reference[0])


def test_compiled_kernels_run_on_the_merges_threads(monkeypatch, tmp_path):
    """numba's parallel kernels (its thread count is per calling thread, read-ahead threads included) follow
    num_threads too: two processes of a split merge with one thread each never run four kernel threads."""
    pytest.importorskip("numba")
    import numba

    from hf_merge import _numba_kernels
    from hf_merge.kernels import kernels_enabled

    if not kernels_enabled():
        pytest.skip("compiled kernels are off")
    seen = []
    original = _numba_kernels.linear_combine

    class Probe:  # the kernel, recording the launching thread's numba thread count
        signatures = original.signatures

        def __call__(self, *args):
            seen.append(numba.get_num_threads())
            return original(*args)

    monkeypatch.setattr(_numba_kernels, "linear_combine", Probe())
    base = {"w": torch.zeros(64, 64, dtype=torch.bfloat16)}
    tasks = [{"w": torch.randn(64, 64).to(torch.bfloat16)} for _ in range(2)]
    hf_merge.merge(base, tasks, "task_arithmetic", scaling=0.5, num_threads=1, progress=False)
    assert seen and set(seen) == {1}
