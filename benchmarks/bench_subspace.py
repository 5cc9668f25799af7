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

Writes benchmarks/results/subspace.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
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


def model_shapes(layers: int, hidden: int, intermediate: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
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


def task_deltas(key: str, shape: tuple[int, ...], num_tasks: int, seed: int) -> list[torch.Tensor]:
    """Low-rank plus noise task vectors, deterministic per (seed, key, task): a rank-r/2 part with singular values
    decaying like i^-0.5 plus Gaussian noise at about a tenth of the top singular value (fine-tuning deltas are not
    low-rank enough for randomized SVD; see the spec §6)."""
    out = []
    for t in range(num_tasks):
        g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{key}/{t}".encode()))
        if len(shape) == 1:
            out.append(1e-3 * torch.randn(shape, generator=g))
            continue
        m, n = shape
        rank = min(m, n) // 2
        decay = torch.arange(1, rank + 1, dtype=torch.float32) ** -0.5
        low_rank = (torch.randn(m, rank, generator=g) * decay) @ torch.randn(rank, n, generator=g)
        noise = torch.randn(m, n, generator=g) * (0.1 * (m * n) ** 0.5 / (m**0.5 + n**0.5))
        out.append(1e-4 * (low_rank + noise))
    return out


# --------------------------------------------------------------------------------------------- reference
def _svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD; LAPACK's divide-and-conquer (gesdd) can fail to converge, then the QR-iteration driver (gesvd)."""
    try:
        return torch.linalg.svd(x, full_matrices=False)
    except torch.linalg.LinAlgError:
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


def compare(args: argparse.Namespace) -> dict:
    shapes = model_shapes(args.layers, args.hidden, args.intermediate)
    matrices = {k: s for k, s in shapes.items() if len(s) == 2}
    results = {}
    for method, config in CONFIGS.items():
        merger = get_merger(config)
        fast_s = ref_s = 0.0
        worst = worst_reference = 0.0
        for key, shape in matrices.items():
            deltas = task_deltas(key, shape, args.tasks, args.seed)
            base = torch.zeros(shape)
            start = time.perf_counter()
            fast = merger.merge_tensor(key, base, deltas, _info(key, shape))
            fast_s += time.perf_counter() - start
            start = time.perf_counter()
            exact = reference(method, deltas)
            ref_s += time.perf_counter() - start
            truth = reference(method, [d.double() for d in deltas])  # float64 ground truth (untimed)
            worst = max(worst, ((fast.double() - truth).norm() / truth.norm()).item())
            worst_reference = max(worst_reference, ((exact.double() - truth).norm() / truth.norm()).item())
        results[method] = {"fast_s": fast_s, "reference_s": ref_s, "speedup": ref_s / fast_s, "max_rel_error": worst,
                           "reference_max_rel_error": worst_reference}
        print(f"  {method:8s} done: {ref_s / fast_s:.2f}x, error {worst:.1e} (float32 reference: "
              f"{worst_reference:.1e})", flush=True)
    return results


def memory_child(args: argparse.Namespace) -> None:
    """TSV-M over the whole model in one implementation; prints the peak RSS in MiB."""
    shapes = model_shapes(args.layers, args.hidden, args.intermediate)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=3072)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child processes")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "subspace.json"))
    parser.add_argument("--child", choices=["reference", "fast"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        memory_child(args)
        return
    print(f"BERT-base-shaped: {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
          f"T = {args.tasks}, torch threads {torch.get_num_threads()}", flush=True)
    results = compare(args)
    memory = {}
    if not args.no_memory:
        for impl in ("reference", "fast"):
            cmd = [sys.executable, __file__, "--child", impl, "--layers", str(args.layers), "--hidden", str(args.hidden),
                   "--intermediate", str(args.intermediate), "--tasks", str(args.tasks), "--seed", str(args.seed)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            memory[impl] = json.loads(out)["peak_rss_mib"]
    print(f"\n{'method':8s} {'reference s':>12s} {'hf_merge s':>11s} {'speedup':>8s} {'max rel err':>12s}")
    for method, r in results.items():
        print(f"{method:8s} {r['reference_s']:12.2f} {r['fast_s']:11.2f} {r['speedup']:7.2f}x {r['max_rel_error']:12.1e}")
    total_ref = sum(r["reference_s"] for r in results.values())
    total_fast = sum(r["fast_s"] for r in results.values())
    print(f"{'all':8s} {total_ref:12.2f} {total_fast:11.2f} {total_ref / total_fast:7.2f}x")
    if memory:
        print(f"\npeak RSS, TSV-M over the model: reference {memory['reference']:.0f} MiB, "
              f"hf_merge streaming {memory['fast']:.0f} MiB")
    payload = {
        "setup": {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate, "tasks": args.tasks,
                  "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "methods": results,
        "total_speedup": total_ref / total_fast,
        "peak_rss_mib": memory,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
