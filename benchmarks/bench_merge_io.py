"""Path → path merge speed and memory against the I/O floor (not a test).

Generates a Llama-style checkpoint of about 0.5B parameters (bf16, sharded safetensors) plus T "fine-tuned"
checkpoints, then measures in one run, each in a fresh subprocess:

- floor: read every input tensor once (``os.preadv`` into a fresh buffer, as ``TensorSource.get``) and write one
  output checkpoint (no arithmetic) — the I/O floor of the issue's target;
- mapped floor: the same without copies out of the page cache — map every input tensor, read each byte once (an OR
  reduction) and write the output: what a merge reading memory-mapped inputs (one-pass TIES) can at best reach;
- Task Arithmetic, global-scope TIES, per-tensor TIES and DARE-TIES (what mergekit recipes use) and the per-tensor
  LLM-toolbox methods (Multi-SLERP, Karcher, Model Stock, DELLA, DELLA-linear, Breadcrumbs, Breadcrumbs-TIES, SCE,
  MagMax; ``--methods`` picks them) with
  ``hf_merge.merge(path, paths, ..., output_dir=...)``, after a first subprocess has compiled (and numba cached on
  disk) the TIES and Task Arithmetic kernels; the compile time is reported on its own, and so is each process's
  start-up (imports, kernels loaded from numba's cache, model-card machinery: what its first merge pays once, whatever
  the model size), timed on a tiny merge before the timed one. Each method is also reported as a ratio to Task
  Arithmetic's time on the same inputs. SLERP takes the base and exactly one other model and NuSLERP exactly two
  fine-tuned ones: they run on base + 1 and base + 2 of the same checkpoints, and the floors and Task Arithmetic are
  measured on those same inputs in the same run for their ratios.

Each runs twice over: with the inputs in the page cache ("warm": reading is memory-speed, so the merge arithmetic
shows) and with them evicted first (``posix_fadvise(DONTNEED)``, "cold": read from storage, as for checkpoints not
read since they were written or models larger than RAM). Before timing, each subprocess touches and frees 2 GB: the
virtual machines this was developed on return free memory to the host after ~2 s (free page reporting) and touching
it again costs ~1.7 s/GB, which otherwise lands at random on whichever run allocates first; this way every run starts
with recently used free memory.

Reports wall time, its ratio to the floors of the same cache state, the CPU time (user + system over all threads:
on a shared virtual machine the time stolen by other guests inflates wall times and not this) and each as a ratio to
Task Arithmetic's, and peak RSS (VmHWM of the subprocess) against the output size. Targets: wall ≤ 1.3× the floor,
peak RSS ≤ output size + 2 GB. Results: ``benchmarks/results/merge_io.json``.

    python benchmarks/bench_merge_io.py            # ~0.5B parameters, base + 4 inputs, every method
    python benchmarks/bench_merge_io.py --quick    # ~42M parameters, for a smoke run
    python benchmarks/bench_merge_io.py --methods ta ties    # only these methods (Task Arithmetic is always timed)
    python benchmarks/bench_merge_io.py --quick --device cuda   # the merges' arithmetic on a GPU (floors unchanged)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def llama_shapes(hidden: int, intermediate: int, layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (hidden, hidden),
            p + "self_attn.v_proj.weight": (hidden, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def generate(workdir: Path, args: argparse.Namespace) -> list[Path]:
    """Base + T fine-tuned checkpoints (θ_t = θ₀ + 0.01·noise), written once and reused."""
    from transformers import LlamaConfig

    from hf_merge.io import TensorMeta, write_safetensors_shards

    shapes = llama_shapes(args.hidden, args.intermediate, args.layers, args.vocab)
    folders = [workdir / "base"] + [workdir / f"task{t}" for t in range(args.tasks)]
    stamp = workdir / "generated.json"
    signature = {k: v for k, v in vars(args).items() if k in ("hidden", "intermediate", "layers", "vocab", "tasks")}
    if stamp.is_file() and json.loads(stamp.read_text()) == signature:
        return folders
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                         vocab_size=args.vocab, tie_word_embeddings=False, dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    metas = {k: TensorMeta(s, torch.bfloat16) for k, s in shapes.items()}
    for index, folder in enumerate(folders):
        folder.mkdir()
        config.save_pretrained(folder)

        def tensor(key: str, index: int = index) -> torch.Tensor:
            seed = abs(hash(key)) % (2**31)
            base = torch.randn(shapes[key], generator=torch.Generator().manual_seed(seed)) * 0.02
            if index:
                noise = torch.Generator().manual_seed(seed + index)
                base += 0.01 * 0.02 * torch.randn(shapes[key], generator=noise)
            return base.to(torch.bfloat16)

        write_safetensors_shards(folder, metas, tensor, max_shard_size="400MB")
        print(f"  generated {folder.name}", flush=True)
    stamp.write_text(json.dumps(signature))
    return folders


#: Timed methods: measurement name → (label, registered method, config fields, fine-tuned inputs it takes; None: all).
#: DELLA and Breadcrumbs keep TIES' default density (as in bench_text5.py); λ does not change their cost.
METHODS: dict[str, tuple[str, str, dict, int | None]] = {
    "ta": ("Task Arithmetic", "task_arithmetic", {"scaling": 0.3}, None),
    "ties": ("TIES (global scope)", "ties", {}, None),
    "ties_tensor": ("TIES (tensor scope, as mergekit)", "ties", {"scope": "tensor"}, None),
    "dare_ties": ("DARE-TIES (drop 0.8, tensor scope)", "dare", {"drop_rate": 0.8, "then": {"method": "ties",
                                                                                     "scope": "tensor"}}, None),
    "slerp": ("SLERP (t = 0.5)", "slerp", {"t": 0.5}, 1),
    "nuslerp": ("NuSLERP (weights 1, 1)", "nuslerp", {"weights": [1.0, 1.0]}, 2),
    "multislerp": ("Multi-SLERP", "multislerp", {}, None),
    "karcher": ("Karcher mean", "karcher", {}, None),
    "model_stock": ("Model Stock", "model_stock", {}, None),
    "della": ("DELLA (density 0.2)", "della", {"density": 0.2}, None),
    "della_linear": ("DELLA-linear (density 0.2)", "della_linear", {"density": 0.2}, None),
    "breadcrumbs": ("Breadcrumbs (density 0.2)", "breadcrumbs", {"density": 0.2}, None),
    "breadcrumbs_ties": ("Breadcrumbs-TIES (density 0.2)", "breadcrumbs_ties", {"density": 0.2}, None),
    "sce": ("SCE", "sce", {}, None),
    "magmax": ("MagMax", "magmax", {}, None),
}
FLOORS = ("floor", "floor_mapped")


def method_config(kind: str):
    """The hf_merge config of a timed method."""
    import hf_merge

    _, method, fields, _ = METHODS[kind]
    return hf_merge.MergeConfig.from_dict({"method": method, **fields})


def method_inputs(kind: str, tasks: int) -> int:
    """How many fine-tuned inputs the method merges (all ``tasks`` unless it takes a fixed number)."""
    need = METHODS[kind][3] if kind in METHODS else None
    return tasks if need is None else need


def default_runs(methods: list[str], tasks: int, repeats: int) -> list[tuple[str, int]]:
    """``repeats`` interleaved rounds of (measurement, fine-tuned inputs): per input count, the two floors, Task
    Arithmetic and the methods taking that many inputs; each round in another order (reversed every other round,
    rotated by the round), so that no measurement always runs first or right after the same one."""
    groups: dict[int, list[str]] = {}
    for kind in (m for m in methods if m != "ta"):
        groups.setdefault(method_inputs(kind, tasks), ["ta"]).append(kind)
    groups.setdefault(tasks, ["ta"])
    base = [(kind, count) for count, kinds in sorted(groups.items(), reverse=True) for kind in (*FLOORS, *kinds)]
    runs = []
    for round_index in range(repeats):
        shift = round_index * len(base) // max(repeats, 1)
        order = base[shift:] + base[:shift]
        runs += order[::-1] if round_index % 2 else order
    return runs


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def merge_tiny(configs: list, tasks: int, device: str = "cpu") -> None:
    """Merge tiny checkpoint folders (inputs mapped, as in the timed runs) with each config."""
    import tempfile

    from safetensors.torch import save_file

    import hf_merge

    with tempfile.TemporaryDirectory() as tmp:
        folders = []
        for index in range(tasks + 1):
            folders.append(Path(tmp) / f"input{index}")
            folders[-1].mkdir()
            tensor = torch.zeros(64) if index == 0 else torch.randn(64)
            save_file({"w": tensor.to(torch.bfloat16)}, folders[-1] / "model.safetensors")
        for config in configs:
            hf_merge.merge(folders[0], folders[1:], config, output_dir=Path(tmp) / config.method, progress=False,
                           device=device)


def compile_kernels(tasks: int) -> dict:
    """Compile the numba kernels the TIES and Task Arithmetic runs use (once per machine: numba caches them on disk)
    and time it, so the timed runs measure merging, not compiling. Reports ``None`` without the ``fast`` extra."""
    import hf_merge
    from hf_merge.kernels import kernels_enabled

    if not kernels_enabled():
        return {"wall_s": None}
    start = time.perf_counter()
    merge_tiny([hf_merge.TiesConfig(), hf_merge.TaskArithmeticConfig(scaling=0.3)], tasks)
    return {"wall_s": time.perf_counter() - start}


def set_page_cache(folders: list[Path], cache: str) -> None:
    """Put the folders' safetensors files in the page cache ("warm": read them) or drop them from it ("cold": their
    pages are clean, so ``posix_fadvise`` evicts them without root)."""
    buffer = bytearray(16 << 20)
    for path in (p for folder in folders for p in folder.glob("*.safetensors")):
        if cache == "cold":
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        else:
            with open(path, "rb", buffering=0) as fh:
                while fh.readinto(buffer):
                    pass


def touch_free_memory(gigabytes: float = 2.0) -> None:
    """Touch and free this much anonymous memory, so the run starts with recently used free pages (see above), then
    reset the process's peak RSS (``clear_refs``) so that it measures the run only."""
    import numpy as np

    np.ones(int(gigabytes * 2**30) // 8, dtype=np.uint64)
    Path("/proc/self/clear_refs").write_text("5")


def measure(kind: str, workdir: Path, tasks: int, max_memory: str | None = None, cache: str = "warm",
            device: str = "cpu") -> dict:
    """Run one measurement in this (fresh) process; print its JSON."""
    if kind == "compile":
        return compile_kernels(tasks)
    folders = [workdir / "base"] + [workdir / f"task{t}" for t in range(tasks)]
    output = workdir / f"out-{kind}"
    shutil.rmtree(output, ignore_errors=True)
    import warnings

    import numpy as np

    import hf_merge
    from hf_merge.io import open_source, write_safetensors_shards

    startup = None
    if kind in METHODS:  # a process's one-time costs (imports, kernels loaded from numba's cache, the model card
        # machinery) come with its first merge: timed on a tiny merge and reported apart
        config = method_config(kind)
        begin = time.perf_counter()
        merge_tiny([config], tasks, device)
        startup = time.perf_counter() - begin
    set_page_cache(folders, cache)
    touch_free_memory()
    start, cpu_start = time.perf_counter(), time.process_time()
    if kind == "floor":
        sources = [open_source(f) for f in folders]
        metas = {k: sources[0].meta(k) for k in sources[0].keys()}

        def read_all(key: str) -> torch.Tensor:
            tensors = [s.get(key) for s in sources]
            return tensors[0]

        output.mkdir()
        write_safetensors_shards(output, metas, read_all)
    elif kind == "floor_mapped":  # the floor without copies: map every input tensor, read each byte once, write
        sources = [open_source(f) for f in folders]
        metas = {k: sources[0].meta(k) for k in sources[0].keys()}

        def map_all(key: str) -> torch.Tensor:
            arrays = [s.flat_array(key) for s in sources]
            for array in arrays:  # one pass over every byte
                np.bitwise_or.reduce(array.view(np.uint8).view(np.uint64) if array.nbytes % 8 == 0 else array)
            with warnings.catch_warnings():  # read-only mapping: only read from here
                warnings.simplefilter("ignore")
                return torch.from_numpy(arrays[0]).view(metas[key].dtype).view(metas[key].shape)

        output.mkdir()
        write_safetensors_shards(output, metas, map_all)
    else:
        hf_merge.merge(folders[0], folders[1:], config, output_dir=output, progress=False, max_memory=max_memory,
                       device=device)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    size = sum(p.stat().st_size for p in output.glob("*.safetensors"))
    shutil.rmtree(output, ignore_errors=True)
    return {"wall_s": wall, "cpu_s": cpu, "startup_s": startup, "peak_rss_bytes": peak_rss_bytes(),
            "output_bytes": size}


LABELS = {"floor": "I/O floor (read all + write one)", "floor_mapped": "mapped floor (map all, read once, write)",
          **{kind: label for kind, (label, *_) in METHODS.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="~42M parameters instead of ~0.5B")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".work" / "merge_io")
    parser.add_argument("--measure", choices=["compile", *LABELS], help=argparse.SUPPRESS)
    parser.add_argument("--max-memory", default=None, help="host-memory budget passed to hf_merge.merge, e.g. 4GB")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
                        help=f"methods to time (default: all of {', '.join(METHODS)}); Task Arithmetic is always "
                             "timed, as the reference of the ratios")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved rounds of every measurement (the fastest run of each counts)")
    parser.add_argument("--runs", default=None,
                        help="comma-separated measurements, in order, instead of --methods/--repeats (a repeated one "
                             "counts its fastest run; KIND@N runs it on base + N fine-tuned inputs)")
    parser.add_argument("--cache", default="warm,cold", help="page-cache states of the inputs to measure, in order")
    parser.add_argument("--name", default=None, help="results file name (default merge_io[_quick].json)")
    parser.add_argument("--device", default="cpu", help="where the merges' arithmetic runs: cpu (default) or cuda[:N]")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.vocab = 512, 2048, 8, 8000
    if args.device != "cpu" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    if args.measure:
        print(json.dumps(measure(args.measure, args.workdir, args.tasks, args.max_memory, args.cache, args.device)))
        return

    if args.runs:
        plan = []
        for item in args.runs.split(","):
            kind, _, count = item.partition("@")
            if kind not in LABELS:
                parser.error(f"unknown measurement {kind!r} in --runs (choose from {', '.join(LABELS)})")
            plan.append((kind, int(count) if count else method_inputs(kind, args.tasks)))
    else:
        plan = default_runs(args.methods, args.tasks, args.repeats)
    too_many = sorted({count for _, count in plan if count > args.tasks})
    if too_many:
        parser.error(f"some methods need {too_many[-1]} fine-tuned inputs but --tasks is {args.tasks}")
    n_params = sum(int(torch.Size(s).numel()) for s in
                   llama_shapes(args.hidden, args.intermediate, args.layers, args.vocab).values())
    print(f"Generating base + {args.tasks} checkpoints, {n_params / 1e6:.0f}M parameters each (bf16) ...")
    generate(args.workdir, args)

    def run(kind: str, cache: str = "warm", tasks: int = args.tasks) -> dict:
        cmd = [sys.executable, __file__, "--measure", kind, "--workdir", str(args.workdir), "--tasks",
               str(tasks), "--cache", cache, "--device", args.device]
        if args.max_memory:
            cmd += ["--max-memory", args.max_memory]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            return {"error": (done.stderr.strip().splitlines() or ["exit code " + str(done.returncode)])[-1]}
        return json.loads(done.stdout.splitlines()[-1])

    started = time.perf_counter()
    compile_s = run("compile")["wall_s"]
    rows, failures = [], {}
    for cache in args.cache.split(","):
        runs: dict[tuple[str, int], dict] = {}
        cpu_runs: dict[tuple[str, int], float] = {}  # the least CPU time of each (steal time on a shared machine
        # inflates wall times, not CPU times)
        for index, (kind, count) in enumerate(plan):  # interleaved rounds: the fastest run of each counts
            result = run(kind, cache, count)
            print(f"  [{cache} {index + 1}/{len(plan)}] {kind} on base + {count}: "
                  + (f"{result['wall_s']:.2f} s" if "error" not in result else f"failed: {result['error']}"), flush=True)
            if "error" in result:
                failures[f"{kind}@{count}"] = result["error"]
                continue
            runs[kind, count] = min(runs.get((kind, count), result), result, key=lambda r: r["wall_s"])
            cpu_runs[kind, count] = min(cpu_runs.get((kind, count), result["cpu_s"]), result["cpu_s"])
        for count in sorted({count for _, count in runs}, reverse=True):
            floor = runs.get(("floor", count), {}).get("wall_s")
            mapped_floor = runs.get(("floor_mapped", count), {}).get("wall_s")
            ta = runs.get(("ta", count), {}).get("wall_s")
            ta_cpu = cpu_runs.get(("ta", count))
            for kind, label in LABELS.items():
                if (kind, count) not in runs:
                    continue
                r = runs[kind, count]
                rows.append({
                    "cache": cache,
                    "run": label,
                    "method": kind,
                    "inputs": 1 + count,
                    "wall_s": round(r["wall_s"], 2),
                    "startup_s": None if r["startup_s"] is None else round(r["startup_s"], 2),
                    "wall_over_floor": round(r["wall_s"] / floor, 2) if floor else None,
                    "wall_over_mapped_floor": round(r["wall_s"] / mapped_floor, 2) if mapped_floor else None,
                    "wall_over_task_arithmetic": round(r["wall_s"] / ta, 2) if ta and kind not in FLOORS else None,
                    "cpu_s": round(cpu_runs[kind, count], 2),
                    "cpu_over_task_arithmetic": (round(cpu_runs[kind, count] / ta_cpu, 2)
                                                 if ta_cpu and kind not in FLOORS else None),
                    "peak_rss_gb": round(r["peak_rss_bytes"] / 2**30, 2),
                    "output_gb": round(r["output_bytes"] / 2**30, 2),
                    "rss_minus_output_gb": round((r["peak_rss_bytes"] - r["output_bytes"]) / 2**30, 2),
                })
    total_s = time.perf_counter() - started
    if compile_s is not None:
        print(f"one-time numba kernel compile (cached on disk afterwards): {compile_s:.1f} s")
    print(f"\n{'inputs':<7}{'n':>3} {'run':<42}{'wall s':>8}{'× floor':>9}{'× mapped':>10}{'× TA':>7}{'CPU s':>7}"
          f"{'CPU × TA':>9}{'start-up s':>12}{'peak RSS GB':>13}{'output GB':>11}{'RSS−out GB':>12}")
    for row in rows:
        print(f"{row['cache']:<7}{row['inputs']:>3} {row['run']:<42}{row['wall_s']:>8}{str(row['wall_over_floor']):>9}"
              f"{str(row['wall_over_mapped_floor']):>10}{str(row['wall_over_task_arithmetic']):>7}{row['cpu_s']:>7}"
              f"{str(row['cpu_over_task_arithmetic']):>9}{str(row['startup_s']):>12}{row['peak_rss_gb']:>13}"
              f"{row['output_gb']:>11}{row['rss_minus_output_gb']:>12}")
    for kind, error in failures.items():
        print(f"FAILED {kind}: {error}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {
        "parameters_per_model": n_params,
        "inputs": 1 + args.tasks,
        "dtype": "bfloat16",
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform()},
        "page_cache": {"warm": "inputs in the page cache (read before timing)",
                       "cold": "inputs evicted from the page cache before each run (read from storage)"},
        "max_memory": args.max_memory,
        "device": args.device if args.device == "cpu" else f"{args.device} ({torch.cuda.get_device_name(args.device)})",
        "methods": {kind: {"label": METHODS[kind][0], "method": METHODS[kind][1], "config": METHODS[kind][2],
                           "finetuned_inputs": method_inputs(kind, args.tasks)}
                    for kind in dict.fromkeys(k for k, _ in plan) if kind in METHODS},
        "runs": [f"{kind}@{count}" for kind, count in plan],
        "ratios": ("wall_over_floor / wall_over_mapped_floor / wall_over_task_arithmetic: against the floors and "
                   "Task Arithmetic measured on the same inputs (row 'inputs': base + fine-tuned) and cache state; "
                   "cpu_over_task_arithmetic: the same for the least CPU time (user + system, all threads) of each, "
                   "which a shared machine's steal time does not inflate"),
        "kernel_compile_s": None if compile_s is None else round(compile_s, 2),
        "benchmark_wall_s": round(total_s, 1),
        "targets": {"wall_over_floor": 1.3, "rss_minus_output_gb": 2.0},
        "rows": rows,
        "failures": failures,
    }
    name = args.name or ("merge_io_quick.json" if args.quick else "merge_io.json")
    (RESULTS / name).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {RESULTS / name}")


if __name__ == "__main__":
    main()
