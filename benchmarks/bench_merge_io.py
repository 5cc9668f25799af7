"""Path → path merge speed and memory against the I/O floor (not a test).

Generates a Llama-style checkpoint of about 0.5B parameters (bf16, sharded safetensors) plus T "fine-tuned"
checkpoints, then measures in one run, each in a fresh subprocess:

- floor: read every input tensor once (``os.preadv`` into a fresh buffer, as ``TensorSource.get``) and write one
  output checkpoint (no arithmetic) — the I/O floor of the issue's target;
- mapped floor: the same without copies out of the page cache — map every input tensor, read each byte once (an OR
  reduction) and write the output: what a merge reading memory-mapped inputs (one-pass TIES) can at best reach;
- Task Arithmetic and global-scope TIES with ``hf_merge.merge(path, paths, ..., output_dir=...)``, after a first
  subprocess has compiled (and numba cached on disk) their kernels; the compile time is reported on its own, and so
  is each process's start-up (imports, kernels loaded from numba's cache, model-card machinery: what its first merge
  pays once, whatever the model size), timed on a tiny merge before the timed one.

Each runs twice over: with the inputs in the page cache ("warm": reading is memory-speed, so the merge arithmetic
shows) and with them evicted first (``posix_fadvise(DONTNEED)``, "cold": read from storage, as for checkpoints not
read since they were written or models larger than RAM). Before timing, each subprocess touches and frees 2 GB: the
virtual machines this was developed on return free memory to the host after ~2 s (free page reporting) and touching
it again costs ~1.7 s/GB, which otherwise lands at random on whichever run allocates first; this way every run starts
with recently used free memory.

Reports wall time, its ratio to the floors of the same cache state, and peak RSS (VmHWM of the subprocess) against the
output size. Targets: wall ≤ 1.3× the floor, peak RSS ≤ output size + 2 GB. Results:
``benchmarks/results/merge_io.json``.

    python benchmarks/bench_merge_io.py            # ~0.5B parameters, base + 4 inputs
    python benchmarks/bench_merge_io.py --quick    # ~60M parameters, for a smoke run
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


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def merge_tiny(configs: list, tasks: int) -> None:
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
            hf_merge.merge(folders[0], folders[1:], config, output_dir=Path(tmp) / config.method, progress=False)


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


def measure(kind: str, workdir: Path, tasks: int, max_memory: str | None = None, cache: str = "warm") -> dict:
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
    if kind in ("ta", "ties"):  # a process's one-time costs (imports, kernels loaded from numba's cache, the model card
        # machinery) come with its first merge: timed on a tiny merge and reported apart
        config = {"ta": hf_merge.TaskArithmeticConfig(scaling=0.3), "ties": hf_merge.TiesConfig()}[kind]
        begin = time.perf_counter()
        merge_tiny([config], tasks)
        startup = time.perf_counter() - begin
    set_page_cache(folders, cache)
    touch_free_memory()
    start = time.perf_counter()
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
        hf_merge.merge(folders[0], folders[1:], config, output_dir=output, progress=False, max_memory=max_memory)
    wall = time.perf_counter() - start
    size = sum(p.stat().st_size for p in output.glob("*.safetensors"))
    shutil.rmtree(output, ignore_errors=True)
    return {"wall_s": wall, "startup_s": startup, "peak_rss_bytes": peak_rss_bytes(), "output_bytes": size}


LABELS = {"floor": "I/O floor (read all + write one)", "floor_mapped": "mapped floor (map all, read once, write)",
          "ta": "Task Arithmetic", "ties": "TIES (global scope)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="~60M parameters instead of ~0.5B")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".work" / "merge_io")
    parser.add_argument("--measure", choices=["compile", *LABELS], help=argparse.SUPPRESS)
    parser.add_argument("--max-memory", default=None, help="host-memory budget passed to hf_merge.merge, e.g. 4GB")
    parser.add_argument("--runs", help="comma-separated measurements, in order (a repeated one counts its fastest run)",
                        default="floor,floor_mapped,ta,ties,ta,ties,floor_mapped,floor,ties,ta,floor,floor_mapped")
    parser.add_argument("--cache", default="warm,cold", help="page-cache states of the inputs to measure, in order")
    parser.add_argument("--name", default=None, help="results file name (default merge_io[_quick].json)")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.vocab = 512, 2048, 8, 8000
    if args.measure:
        print(json.dumps(measure(args.measure, args.workdir, args.tasks, args.max_memory, args.cache)))
        return

    n_params = sum(int(torch.Size(s).numel()) for s in
                   llama_shapes(args.hidden, args.intermediate, args.layers, args.vocab).values())
    print(f"Generating base + {args.tasks} checkpoints, {n_params / 1e6:.0f}M parameters each (bf16) ...")
    generate(args.workdir, args)

    def run(kind: str, cache: str = "warm") -> dict:
        cmd = [sys.executable, __file__, "--measure", kind, "--workdir", str(args.workdir), "--tasks",
               str(args.tasks), "--cache", cache]
        if args.max_memory:
            cmd += ["--max-memory", args.max_memory]
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])

    compile_s = run("compile")["wall_s"]
    rows = []
    for cache in args.cache.split(","):
        runs: dict[str, dict] = {}
        for kind in args.runs.split(","):  # three of each, interleaved: the fastest run of each counts
            result = run(kind, cache)
            runs[kind] = min(runs.get(kind, result), result, key=lambda r: r["wall_s"])
        floor = runs["floor"]["wall_s"]
        mapped_floor = runs.get("floor_mapped", {}).get("wall_s")
        for kind, label in LABELS.items():
            if kind not in runs:
                continue
            r = runs[kind]
            rows.append({
                "cache": cache,
                "run": label,
                "wall_s": round(r["wall_s"], 2),
                "startup_s": None if r["startup_s"] is None else round(r["startup_s"], 2),
                "wall_over_floor": round(r["wall_s"] / floor, 2),
                "wall_over_mapped_floor": round(r["wall_s"] / mapped_floor, 2) if mapped_floor else None,
                "peak_rss_gb": round(r["peak_rss_bytes"] / 2**30, 2),
                "output_gb": round(r["output_bytes"] / 2**30, 2),
                "rss_minus_output_gb": round((r["peak_rss_bytes"] - r["output_bytes"]) / 2**30, 2),
            })
    if compile_s is not None:
        print(f"one-time numba kernel compile (cached on disk afterwards): {compile_s:.1f} s")
    print(f"\n{'inputs':<7}{'run':<42}{'wall s':>8}{'× floor':>9}{'× mapped':>10}{'start-up s':>12}"
          f"{'peak RSS GB':>13}{'output GB':>11}{'RSS−out GB':>12}")
    for row in rows:
        print(f"{row['cache']:<7}{row['run']:<42}{row['wall_s']:>8}{row['wall_over_floor']:>9}"
              f"{str(row['wall_over_mapped_floor']):>10}{str(row['startup_s']):>12}{row['peak_rss_gb']:>13}"
              f"{row['output_gb']:>11}"
              f"{row['rss_minus_output_gb']:>12}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {
        "parameters_per_model": n_params,
        "inputs": 1 + args.tasks,
        "dtype": "bfloat16",
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform()},
        "page_cache": {"warm": "inputs in the page cache (read before timing)",
                       "cold": "inputs evicted from the page cache before each run (read from storage)"},
        "max_memory": args.max_memory,
        "kernel_compile_s": None if compile_s is None else round(compile_s, 2),
        "targets": {"wall_over_floor": 1.3, "rss_minus_output_gb": 2.0},
        "rows": rows,
    }
    name = args.name or ("merge_io_quick.json" if args.quick else "merge_io.json")
    (RESULTS / name).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {RESULTS / name}")


if __name__ == "__main__":
    main()
