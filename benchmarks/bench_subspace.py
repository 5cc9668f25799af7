"""Benchmark: hf_merge's streaming subspace methods vs a straightforward exact in-memory implementation.

A BERT-base-shaped model (hidden 768, intermediate 3072, 12 layers: q/k/v/o, up, down matrices, biases and
LayerNorm vectors) with T = 8 synthetic task vectors per tensor: low rank plus noise with a decaying spectrum
(s_i ∝ i^-0.5 signal of rank 64 over an i^-1 tail), generated per tensor from a seeded generator.

For TSV-M, TSV-C, Iso-C and Iso-CTS, every matrix goes through both
  * fast: hf_merge's merger (``merge_tensor``, exactly what ``hf_merge.merge`` runs per tensor), and
  * reference: full ``torch.linalg.svd`` of every task matrix (float32) and SVD-based polar factors, as the
    official code does,
and the script reports the summed wall time of each, their ratio and the largest per-matrix relative Frobenius
error. Peak RSS is measured in two child processes running TSV-M: the reference holds all T task vectors of the
model in memory (as the official code), hf_merge streams one tensor (× T) at a time.

    python benchmarks/bench_subspace.py --layers 1        # reduced size, a few minutes on 2 busy cores
    python benchmarks/bench_subspace.py                   # full BERT-base size
    python benchmarks/bench_subspace.py --layers 2 --threads 1 2 all   # every route at 1, 2 and all cores
    python benchmarks/bench_subspace.py --device cuda --shape llama --layers 1   # a Llama-7B layer on a GPU

Writes benchmarks/results/subspace.json (``--out``) and prints a table.

``--threads N ...`` runs both sides under each CPU thread count (``hf_merge.linalg.cpu_threads``: torch's pool and
every BLAS/LAPACK/OpenMP pool, as ``MergeOptions.num_threads`` does in a merge), the reference at the same count as
hf_merge, and also times hf_merge with its SciPy LAPACK calls given all the threads instead of its per-route choice
(``hf_merge.linalg.LAPACK_THREADS``), so the choice can be checked; the float64 ground-truth errors are computed once.
It writes a Markdown table next to the JSON. ``--device cuda`` runs both sides on the GPU (the reference's full SVDs
with cuSOLVER), timed with ``torch.cuda.synchronize``; ``--shape llama`` uses a Llama-7B layer's matrices
(q/k/v/o 4096×4096, gate/up 11008×4096, down 4096×11008).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hf_merge
from hf_merge.methods.iso import iso_cts_sizes
from hf_merge.params import ParamInfo, ParamKind
from hf_merge.registry import get_merger

SHAPES = {"bert": (768, 3072), "llama": (4096, 11008)}


def model_shapes(layers: int, hidden: int, intermediate: int, kind: str = "bert") -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    if kind == "llama":
        for i in range(layers):
            p = f"model.layers.{i}."
            for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
                shapes[p + name + ".weight"] = (hidden, hidden)
            shapes[p + "mlp.gate_proj.weight"] = (intermediate, hidden)
            shapes[p + "mlp.up_proj.weight"] = (intermediate, hidden)
            shapes[p + "mlp.down_proj.weight"] = (hidden, intermediate)
            shapes[p + "input_layernorm.weight"] = (hidden,)
        return shapes
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[p + name + ".weight"] = (hidden, hidden)
            shapes[p + name + ".bias"] = (hidden,)
        shapes[p + "intermediate.dense.weight"] = (intermediate, hidden)
        shapes[p + "intermediate.dense.bias"] = (intermediate,)
        shapes[p + "output.dense.weight"] = (hidden, intermediate)
        shapes[p + "output.LayerNorm.weight"] = (hidden,)
    return shapes


def task_deltas(key: str, shape: tuple[int, ...], num_tasks: int, seed: int, device: str = "cpu"
                ) -> list[torch.Tensor]:
    """Low-rank plus noise task vectors, deterministic per (seed, key, task): a rank-r/2 part with singular values
    decaying like i^-0.5 plus Gaussian noise at about a tenth of the top singular value (fine-tuning deltas are not
    low-rank enough for randomized SVD; see the spec §6)."""
    out = []
    for t in range(num_tasks):  # on a GPU, drawn there (other numbers than the CPU's, as deterministic)
        g = torch.Generator(device).manual_seed(zlib.crc32(f"{seed}/{key}/{t}".encode()))
        if len(shape) == 1:
            out.append(1e-3 * torch.randn(shape, generator=g, device=device))
            continue
        m, n = shape
        rank = min(m, n) // 2
        decay = torch.arange(1, rank + 1, dtype=torch.float32, device=device) ** -0.5
        low_rank = (torch.randn(m, rank, generator=g, device=device) * decay) @ torch.randn(rank, n, generator=g,
                                                                                             device=device)
        noise = torch.randn(m, n, generator=g, device=device) * (0.1 * (m * n) ** 0.5 / (m**0.5 + n**0.5))
        out.append(1e-4 * (low_rank + noise))
    return out


# --------------------------------------------------------------------------------------------- reference
def _svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD; LAPACK's divide-and-conquer (gesdd) can fail to converge, then the QR-iteration driver (gesvd)."""
    try:
        return torch.linalg.svd(x, full_matrices=False)
    except torch.linalg.LinAlgError:
        if x.device.type != "cpu":
            raise
        import scipy.linalg

        u, s, vh = scipy.linalg.svd(x.numpy(), full_matrices=False, lapack_driver="gesvd")
        return torch.from_numpy(u), torch.from_numpy(s), torch.from_numpy(vh)


def _polar(x: torch.Tensor) -> torch.Tensor:
    p, _, qh = _svd(x)
    return p @ qh


def reference(method: str, deltas: list[torch.Tensor]) -> torch.Tensor:
    """The official algorithms with full float32 SVDs of every task matrix."""
    T = len(deltas)
    if method in ("tsv_m", "tsv_c"):
        k = min(deltas[0].shape) // T
        svds = [_svd(d) for d in deltas]
        if method == "tsv_c":
            return sum((u[:, :k] * s[:k]) @ vh[:k] for u, s, vh in svds)
        u = torch.cat([u[:, :k] for u, _, _ in svds], 1)
        s = torch.cat([s[:k] for _, s, _ in svds])
        v = torch.cat([vh[:k].T for _, _, vh in svds], 1)
        return (_polar(u) * s) @ _polar(v).T
    total = torch.stack(deltas).sum(0)
    u, s, vh = _svd(total)
    if method == "iso_c":
        return s.mean() * u @ vh
    c, p = iso_cts_sizes(min(total.shape), T, 0.8)
    us, ss, vs = [u[:, :c]], [s[:c]], [vh[:c].T]
    for d in deltas:
        ut, st, vht = _svd(d - u[:, :c] @ (u[:, :c].T @ d))
        us.append(ut[:, :p]), ss.append(st[:p]), vs.append(vht[:p].T)
    return torch.cat(ss).mean() * _polar(torch.cat(us, 1)) @ _polar(torch.cat(vs, 1)).T


CONFIGS = {
    "tsv_m": hf_merge.TSVMergeConfig(),
    "tsv_c": hf_merge.TSVCompressConfig(),
    "iso_c": hf_merge.IsoCConfig(),
    "iso_cts": hf_merge.IsoCTSConfig(),
}


def _info(key: str, shape: tuple[int, ...]) -> ParamInfo:
    kind = ParamKind.LINEAR if len(shape) == 2 else ParamKind.VECTOR
    return ParamInfo(name=key, kind=kind, ndim=len(shape))


def _timed(fn, device: str) -> tuple[torch.Tensor, float]:
    """``(fn(), wall seconds)``, the GPU's queue drained before and after."""
    if device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device != "cpu":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


@contextlib.contextmanager
def lapack_policy(policy: str | None):
    """hf_merge's SciPy LAPACK threads per route (``hf_merge.linalg.LAPACK_THREADS``): its own choice (``None``), or
    every route's LAPACK calls at ``"all"`` threads or at ``"1"``, one after the other (no batching)."""
    from hf_merge import linalg

    saved = dict(linalg.LAPACK_THREADS)
    if policy is not None:
        linalg.LAPACK_THREADS.update({route: policy if policy == "all" else int(policy) for route in saved})
    try:
        yield
    finally:
        linalg.LAPACK_THREADS.update(saved)


def warm_up(args: argparse.Namespace) -> None:
    """One small matrix through every method and the reference (a GPU's first calls load its solver libraries)."""
    deltas = task_deltas("warm-up", (256, 128), args.tasks, args.seed, args.device)
    for method in args.methods:
        get_merger(CONFIGS[method]).merge_tensor("w", torch.zeros_like(deltas[0]), deltas, _info("w", (256, 128)))
        reference(method, deltas)


def compare(args: argparse.Namespace, truth: bool = True, policies: tuple[str, ...] = (),
            report=None) -> dict:
    """Every method over the model's matrices: hf_merge's merger (and under each LAPACK ``policies``), the
    full-SVD reference, and (``truth``) both against a float64 reference. ``report(results)`` after each method."""
    shapes = model_shapes(args.layers, args.hidden, args.intermediate, args.shape)
    matrices = {k: s for k, s in shapes.items() if len(s) == 2}
    device = args.device
    results = {}
    for method in args.methods:
        merger = get_merger(CONFIGS[method])
        fast_s = ref_s = 0.0
        policy_s = dict.fromkeys(policies, 0.0)
        worst = worst_reference = 0.0
        for key, shape in matrices.items():
            deltas = task_deltas(key, shape, args.tasks, args.seed, device)
            base = torch.zeros(shape, device=device)
            fast, seconds = _timed(lambda: merger.merge_tensor(key, base, deltas, _info(key, shape)), device)
            fast_s += seconds
            for policy in policies:
                with lapack_policy(policy):
                    policy_s[policy] += _timed(lambda: merger.merge_tensor(key, base, deltas, _info(key, shape)),
                                               device)[1]
            exact, seconds = _timed(lambda: reference(method, deltas), device)
            ref_s += seconds
            if truth:
                truth_value = reference(method, [d.double() for d in deltas])  # float64 ground truth (untimed)
                worst = max(worst, ((fast.double() - truth_value).norm() / truth_value.norm()).item())
                worst_reference = max(worst_reference,
                                      ((exact.double() - truth_value).norm() / truth_value.norm()).item())
        results[method] = {"fast_s": fast_s, "reference_s": ref_s, "speedup": ref_s / fast_s}
        if truth:
            results[method] |= {"max_rel_error": worst, "reference_max_rel_error": worst_reference}
        for policy, seconds in policy_s.items():
            results[method][f"fast_s_lapack_{policy}"] = seconds
            results[method][f"speedup_lapack_{policy}"] = ref_s / seconds
        extra = "".join(f", LAPACK at {p}: {ref_s / t:.2f}x" for p, t in policy_s.items())
        error = f", error {worst:.1e} (float32 reference: {worst_reference:.1e})" if truth else ""
        print(f"  {method:8s} done: {ref_s / fast_s:.2f}x{extra}{error}", flush=True)
        if report is not None:
            report(results)
    return results


def memory_child(args: argparse.Namespace) -> None:
    """TSV-M over the whole model in one implementation; prints the peak RSS in MiB."""
    shapes = model_shapes(args.layers, args.hidden, args.intermediate, args.shape)
    merger = get_merger(CONFIGS["tsv_m"])
    if args.child == "reference":  # the official pattern: all T task vectors of the whole model in memory
        tasks = {key: task_deltas(key, shape, args.tasks, args.seed) for key, shape in shapes.items()}
        merged = {}
        for key, shape in shapes.items():
            deltas = tasks[key]
            merged[key] = reference("tsv_m", deltas) if len(shape) == 2 else torch.stack(deltas).mean(0)
    else:  # hf_merge: one tensor × T at a time, merged tensors delivered to the output as they are produced
        merged = {}
        for key, shape in shapes.items():
            merged[key] = merger.merge_tensor(key, torch.zeros(shape), task_deltas(key, shape, args.tasks, args.seed),
                                              _info(key, shape))
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _thread_counts(values: list[str]) -> list[int]:
    counts = []
    for value in values:
        count = (os.cpu_count() or 1) if value == "all" else int(value)
        if count < 1:
            raise SystemExit(f"--threads: {value!r} is not a positive thread count or 'all'")
        if count not in counts:
            counts.append(count)
    return counts


def _setup(args: argparse.Namespace) -> dict:
    setup = {"shape": args.shape, "layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
             "tasks": args.tasks, "methods": args.methods, "device": args.device, "torch": torch.__version__,
             "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "platform": platform.platform()}
    if args.device != "cpu":
        setup["gpu"] = torch.cuda.get_device_name(args.device)
    if args.note:
        setup["note"] = args.note
    return setup


def run_threads(args: argparse.Namespace) -> None:
    """Every method at each ``--threads`` count, hf_merge and the reference under the same count."""
    from hf_merge.linalg import LAPACK_THREADS, cpu_threads

    counts = _thread_counts(args.threads)
    out = Path(args.out)
    payload = {"setup": _setup(args) | {"load_average_before": [round(x, 2) for x in os.getloadavg()],
                                        "lapack_threads_per_route": dict(LAPACK_THREADS)},
               "threads": {}}

    def write(partial: dict | None = None, count: int | None = None) -> None:
        if partial is not None:
            payload["threads"][str(count)] = {"methods": partial}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2) + "\n")
        out.with_suffix(".md").write_text(threads_markdown(payload))

    errors = None
    for index, count in enumerate(counts):
        print(f"\n--- {count} thread(s): torch, BLAS/LAPACK and OpenMP pools ---", flush=True)
        policies = ("all", "1") if count > 1 else ()  # the alternatives to hf_merge's per-route choice
        with cpu_threads(count):
            results = compare(args, truth=index == 0, policies=policies, report=lambda r, c=count: write(r, c))
        if index == 0:
            errors = {m: {k: v for k, v in r.items() if "error" in k} for m, r in results.items()}
        total_ref = sum(r["reference_s"] for r in results.values())
        total_fast = sum(r["fast_s"] for r in results.values())
        payload["threads"][str(count)]["total_speedup"] = total_ref / total_fast
        payload["threads"][str(count)]["slowest_route"] = min(results, key=lambda m: results[m]["speedup"])
        write()
    payload["errors_at_first_count"] = errors
    payload["setup"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    write()
    print(threads_markdown(payload))
    print(f"wrote {out} and {out.with_suffix('.md')}")


def threads_markdown(payload: dict) -> str:
    setup = payload["setup"]
    lines = ["# bench_subspace.py --threads: hf_merge vs the full-SVD reference at each thread count", "",
             f"{setup['shape']}-shaped, {setup['layers']} layer(s), T = {setup['tasks']}, device {setup['device']}, "
             f"{setup['cpus']} CPUs, torch {setup['torch']}. Load average before {setup['load_average_before']}"
             + (f", after {setup['load_average_after']}" if "load_average_after" in setup else "") + ".", ""]
    if setup.get("note"):
        lines += [f"**{setup['note']}**", ""]
    lines += [f"hf_merge's LAPACK threads per route (`hf_merge.linalg.LAPACK_THREADS`): "
              f"`{setup['lapack_threads_per_route']}` — batch: a batch's independent eigensolves side by side, one "
              "thread each; torch: the polar factor's eigendecomposition through torch's threaded LAPACK; 1: "
              "single-threaded SciPy LAPACK, the threads going to torch's matrix products around it; all: SciPy's "
              "LAPACK gets every thread. The last columns time hf_merge with every route's SciPy LAPACK at all "
              "threads and at 1 thread (no batching). The reference (torch's SVDs) runs at the same thread count. "
              "Ratio = reference time / hf_merge time (> 1: hf_merge faster).", "",
              "| threads | method | reference s | hf_merge s | ratio | LAPACK all: s | ratio | LAPACK 1: s | ratio |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for count, block in payload["threads"].items():
        for method, r in block["methods"].items():
            alternatives = " | ".join(f"{r[f'fast_s_lapack_{p}']:.2f} | {r[f'speedup_lapack_{p}']:.2f}x"
                                      if f"fast_s_lapack_{p}" in r else "— | —" for p in ("all", "1"))
            lines.append(f"| {count} | {method} | {r['reference_s']:.2f} | {r['fast_s']:.2f} | {r['speedup']:.2f}x | "
                         f"{alternatives} |")
        if "total_speedup" in block:
            lines.append(f"| {count} | **all methods** | | | **{block['total_speedup']:.2f}x** | | | | |")
    errors = payload.get("errors_at_first_count")
    if errors:
        lines += ["", "Largest per-matrix relative error against a float64 reference (first thread count): " + ", ".join(
            f"{m} {e.get('max_rel_error', float('nan')):.1e} (reference {e.get('reference_max_rel_error', float('nan')):.1e})"
            for m, e in errors.items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bert",
                        help="bert: BERT-base matrices (default); llama: a Llama-7B layer's")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=None, help="default: 768 (bert), 4096 (llama)")
    parser.add_argument("--intermediate", type=int, default=None, help="default: 3072 (bert), 11008 (llama)")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--device", default="cpu", help="where both sides run: cpu (default) or cuda[:N]")
    parser.add_argument("--threads", nargs="+", default=None, metavar="N",
                        help="CPU thread counts to measure every route at (integers or 'all'), e.g. --threads 1 2 all")
    parser.add_argument("--no-truth", action="store_true", help="skip the float64 ground-truth errors")
    parser.add_argument("--note", default=None, help="a note stored with the results (e.g. 'measured on a loaded "
                                                     "machine')")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child processes")
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/subspace.json, "
                                                     "subspace_threads.json with --threads)")
    parser.add_argument("--child", choices=["reference", "fast"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    hidden, intermediate = SHAPES[args.shape]
    args.hidden = args.hidden or hidden
    args.intermediate = args.intermediate or intermediate
    if args.child:
        memory_child(args)
        return
    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device.")
    results_dir = ROOT / "benchmarks" / "results"
    args.out = args.out or str(results_dir / ("subspace_threads.json" if args.threads else "subspace.json"))
    print(f"{args.shape}-shaped: {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
          f"T = {args.tasks}, device {args.device}, torch threads {torch.get_num_threads()}", flush=True)
    if args.device != "cpu":
        warm_up(args)
    if args.threads:
        run_threads(args)
        return
    out = Path(args.out)
    payload = {"setup": _setup(args), "methods": {}}

    def write(results: dict) -> None:  # after each method: a run cut short still leaves what it measured
        payload["methods"] = results
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2) + "\n")

    results = compare(args, truth=not args.no_truth, report=write)
    memory = {}
    if not args.no_memory and args.device == "cpu":
        for impl in ("reference", "fast"):
            cmd = [sys.executable, __file__, "--child", impl, "--layers", str(args.layers), "--hidden", str(args.hidden),
                   "--intermediate", str(args.intermediate), "--tasks", str(args.tasks), "--seed", str(args.seed),
                   "--shape", args.shape]
            out_text = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            memory[impl] = json.loads(out_text)["peak_rss_mib"]
    print(f"\n{'method':8s} {'reference s':>12s} {'hf_merge s':>11s} {'speedup':>8s} {'max rel err':>12s}")
    for method, r in results.items():
        error = f"{r['max_rel_error']:12.1e}" if "max_rel_error" in r else f"{'—':>12s}"
        print(f"{method:8s} {r['reference_s']:12.2f} {r['fast_s']:11.2f} {r['speedup']:7.2f}x {error}")
    total_ref = sum(r["reference_s"] for r in results.values())
    total_fast = sum(r["fast_s"] for r in results.values())
    print(f"{'all':8s} {total_ref:12.2f} {total_fast:11.2f} {total_ref / total_fast:7.2f}x")
    if memory:
        print(f"\npeak RSS, TSV-M over the model: reference {memory['reference']:.0f} MiB, "
              f"hf_merge streaming {memory['fast']:.0f} MiB")
    payload |= {"total_speedup": total_ref / total_fast, "peak_rss_mib": memory}
    write(results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
