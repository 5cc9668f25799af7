"""A merge split across processes against one process, and a paper model of a 405B merge (not a test).

Measured on this machine, in one run: Task Arithmetic and global TIES of base + 3 generated Llama-style checkpoints
(``bench_merge_io.generate``, bf16, sharded) into a checkpoint folder, on 1 process and on 2 processes
(``python -m torch.distributed.run --standalone --nproc_per_node 2``, gloo), inputs in the page cache. Each process
reports its wall time (from a barrier before the merge to its end), its peak RSS (VmHWM) and the bytes of the inputs
it read (the merge summary's ``rank_input_bytes``: the tensors it merged, times the inputs; global TIES's one pass also
samples 1/1024 of every input on every process). The 2-process output is checked byte for byte against the 1-process one.

The paper model: Llama-3.1-405B's shapes (bf16), base + 3 fine-tunes, split over N ranks by the merge's own
:func:`hf_merge.distributed.split_keys`: bytes read and written by the busiest rank, its peak memory (the engine's
working-set rule for one tensor, and the output buffers of the fused routes), and the expected wall time at a stated
read and write bandwidth per rank.

    python benchmarks/bench_distributed.py                 # the default size (468M parameters per model)
    python benchmarks/bench_distributed.py --size tiny     # a smoke run
    python benchmarks/bench_distributed.py --size tiny --device cuda   # 2 GPUs, NCCL (benchmarks/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
WORK = ROOT / ".work" / "distributed"
sys.path.insert(0, str(ROOT))

SIZES = {
    "tiny": {"hidden": 128, "intermediate": 384, "layers": 5, "vocab": 4096, "tasks": 3},
    "default": {"hidden": 1024, "intermediate": 4096, "layers": 24, "vocab": 32000, "tasks": 3},
}
METHODS = {"ta": ("Task Arithmetic", {"method": "task_arithmetic", "scaling": 0.3}),
           "ties": ("TIES (global scope)", {"method": "ties", "density": 0.2, "scope": "global"})}
#: Llama-3.1-405B: hidden, intermediate, layers, vocabulary, attention heads, key-value heads.
LLAMA_405B = {"hidden": 16384, "intermediate": 53248, "layers": 126, "vocab": 128256, "heads": 128, "kv_heads": 8}


def worker(method: str, folders: list[str], output: str, report: str, device: str) -> None:
    """One process's merge (rank r of N when launched by torchrun): time it, write what it measured to ``report``."""
    import warnings

    import torch.distributed as dist
    from bench_merge_io import touch_free_memory

    import hf_merge
    from hf_merge.config import MergeConfig
    from hf_merge.distributed import init_from_environment

    warnings.filterwarnings("ignore", message="The model card")  # local inputs: no Hub ids, no license
    launched = init_from_environment()  # gloo on CPU; NCCL and gloo where torch has CUDA
    if device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    config = MergeConfig.from_dict(dict(METHODS[method][1]))
    touch_free_memory()  # fresh page-cache pages cost this VM ~1.7 s/GB otherwise (see bench_merge_io)
    if launched:
        dist.barrier()
    start = time.perf_counter()
    hf_merge.merge(folders[0], folders[1:], config, output_dir=output, progress=False, max_shard_size="400MB",
                   device=device)
    wall = time.perf_counter() - start
    rank = dist.get_rank() if launched else 0
    summary = json.loads((Path(output) / "merge_config.json").read_text())["summary"]
    shares = summary.get("rank_input_bytes", [summary["input_bytes"]])
    Path(f"{report}.rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "wall_s": wall, "peak_rss_bytes": peak_rss_bytes(), "input_bytes_read": shares[rank],
         "route": summary["route"]}))
    if launched:
        dist.destroy_process_group()


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run(method: str, processes: int, folders: list[Path], output: Path, device: str) -> list[dict]:
    """Each rank's measurements of one merge on ``processes`` processes."""
    from bench_merge_io import set_page_cache

    shutil.rmtree(output, ignore_errors=True)
    report = WORK / f"report-{method}-{processes}"
    for old in WORK.glob(f"{report.name}.rank*.json"):
        old.unlink()
    set_page_cache(folders, "warm")
    args = ["--worker", method, "--folders", *map(str, folders), "--output", str(output), "--report", str(report),
            "--device", device]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // processes)))
    if processes == 1:
        command = [sys.executable, __file__, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(processes), __file__, *args]
    subprocess.run(command, check=True, env=env)
    return [json.loads(Path(f"{report}.rank{r}.json").read_text()) for r in range(processes)]


def llama_405b_shapes() -> dict[str, tuple[int, ...]]:
    s = LLAMA_405B
    head = s["hidden"] // s["heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (s["vocab"], s["hidden"])}
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (s["hidden"], s["hidden"]),
                   p + "self_attn.k_proj.weight": (s["kv_heads"] * head, s["hidden"]),
                   p + "self_attn.v_proj.weight": (s["kv_heads"] * head, s["hidden"]),
                   p + "self_attn.o_proj.weight": (s["hidden"], s["hidden"]),
                   p + "mlp.gate_proj.weight": (s["intermediate"], s["hidden"]),
                   p + "mlp.up_proj.weight": (s["intermediate"], s["hidden"]),
                   p + "mlp.down_proj.weight": (s["hidden"], s["intermediate"]),
                   p + "input_layernorm.weight": (s["hidden"],),
                   p + "post_attention_layernorm.weight": (s["hidden"],)}
    shapes["model.norm.weight"] = (s["hidden"],)
    shapes["lm_head.weight"] = (s["vocab"], s["hidden"])
    return shapes


def paper_model(ranks: list[int], inputs: int, read_gbps: float, write_gbps: float) -> dict:
    """The 405B merge (bf16, ``inputs`` models read) on each number of ranks: the busiest rank's bytes and time."""
    import math

    import torch

    from hf_merge.distributed import split_keys
    from hf_merge.engine import working_set
    from hf_merge.tensors import TensorMeta

    metas = {k: TensorMeta(shape, torch.bfloat16) for k, shape in llama_405b_shapes().items()}
    parameters = sum(math.prod(m.shape) for m in metas.values())
    largest = max(m.nbytes for m in metas.values())
    sample = inputs * sum(m.nbytes for m in metas.values()) / 1024
    rows = []
    for n in ranks:
        owners = split_keys(metas, n)
        loads = [0] * n
        for key, rank in owners.items():
            loads[rank] += metas[key].nbytes
        written = max(loads)
        read = written * inputs
        rows.append({
            "ranks": n, "read_gb": read / 1e9, "written_gb": written / 1e9,
            # the per-tensor route's working set (engine.working_set); the fused routes hold 2 output buffers
            "peak_gb_per_tensor_route": working_set(metas, inputs)[1] / 1e9,
            "peak_gb_fused_routes": 2 * largest / 1e9,
            "ta_wall_s": read / (read_gbps * 1e9) + written / (write_gbps * 1e9),
            # global TIES: one pass, after every rank sampled 1/1024 of every input (the same brackets everywhere)
            "ties_wall_s": (read + sample) / (read_gbps * 1e9) + written / (write_gbps * 1e9),
        })
    return {"parameters": parameters, "model_gb": sum(m.nbytes for m in metas.values()) / 1e9, "inputs": inputs,
            "read_gbps_per_rank": read_gbps, "write_gbps_per_rank": write_gbps, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="default")
    parser.add_argument("--read-gbps", type=float, default=2.0, help="per-rank read bandwidth of the paper model")
    parser.add_argument("--write-gbps", type=float, default=1.0, help="per-rank write bandwidth of the paper model")
    parser.add_argument("--device", default="cpu", help="where the merges' arithmetic runs: cpu, or cuda (a GPU per "
                        "process, NCCL next to gloo)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each configuration, interleaved; the best "
                        "(slowest rank's wall) is reported")
    parser.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--folders", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.folders, args.output, args.report, args.device)
        return
    from bench_merge_io import generate

    WORK.mkdir(parents=True, exist_ok=True)
    folders = generate(WORK / f"inputs-{args.size}", argparse.Namespace(**SIZES[args.size]))
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load = os.getloadavg()
    measured = {}
    for method, (label, _) in METHODS.items():
        runs: dict[int, list[list[dict]]] = {1: [], 2: []}
        for _ in range(args.repeats):
            for processes in (1, 2):
                runs[processes].append(run(method, processes, folders, WORK / f"out-{method}-{processes}",
                                           args.device))
        one, two = (min(runs[p], key=lambda ranks: max(r["wall_s"] for r in ranks)) for p in (1, 2))
        identical = all(filecmp.cmp(p, WORK / f"out-{method}-2" / p.name, shallow=False)
                        for p in sorted((WORK / f"out-{method}-1").glob("*.safetensors*")))
        measured[method] = {"label": label, "1": one, "2": two, "bit_identical": identical}
        for processes in ("1", "2"):
            shutil.rmtree(WORK / f"out-{method}-{processes}", ignore_errors=True)
    paper = paper_model([1, 2, 4, 8, 16, 32, 64], SIZES[args.size]["tasks"] + 1, args.read_gbps, args.write_gbps)
    report = {"size": args.size, "device": args.device, "repeats": args.repeats, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "started": started,
              "load_average": load, "measured": measured, "paper_model_405b": paper}
    RESULTS.mkdir(exist_ok=True)
    name = "_".join(["distributed"] + ([args.size] if args.size != "default" else [])
                    + ([args.device] if args.device != "cpu" else []))
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"{name}.md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = [f"# One process against two (torch.distributed, gloo): `{report['size']}` size, base + 3, bf16",
             "",
             f"{report['machine']}, merges on {report['device']}; best of {report['repeats']} interleaved runs; "
             f"started {report['started']}, load average at start "
             f"{', '.join(f'{x:.1f}' for x in report['load_average'])}. Inputs in the page cache. Wall: from a "
             "barrier before the merge to the end of `hf_merge.merge`, per process; the 2-process wall is the "
             "slowest rank's. Read: bytes of the input tensors the process merged (× inputs; global TIES's one pass "
             "also samples 1/1024 of every input on every process).",
             "",
             "| method | processes | wall s | speed-up | peak RSS per rank GB | input bytes read per rank GB | route | "
             "same bytes as 1 process |",
             "|---|---|---|---|---|---|---|---|"]
    for entry in report["measured"].values():
        base_wall = max(r["wall_s"] for r in entry["1"])
        for processes in ("1", "2"):
            ranks = entry[processes]
            wall = max(r["wall_s"] for r in ranks)
            rss = " / ".join(f"{r['peak_rss_bytes'] / 1e9:.2f}" for r in ranks)
            read = " / ".join(f"{r['input_bytes_read'] / 1e9:.2f}" for r in ranks)
            same = "—" if processes == "1" else ("yes" if entry["bit_identical"] else "NO")
            lines.append(f"| {entry['label']} | {processes} | {wall:.1f} | {base_wall / wall:.2f}× | {rss} | {read} | "
                         f"{ranks[0]['route']} | {same} |")
    paper = report["paper_model_405b"]
    lines += ["",
              f"## Paper model: a 405B merge ({paper['parameters'] / 1e9:.1f}B parameters, {paper['model_gb']:.0f} GB "
              f"in bf16, {paper['inputs']} inputs)",
              "",
              f"Tensors split by `hf_merge.distributed.split_keys`; the busiest rank's bytes. Expected wall: read at "
              f"{paper['read_gbps_per_rank']} GB/s and write at {paper['write_gbps_per_rank']} GB/s per rank; Task "
              "Arithmetic and global TIES read every input once, TIES after every rank sampled 1/1024 of the whole "
              "model (its thresholds' brackets). Peak memory: the per-tensor route's working set of the largest tensor (inputs + 3 float32 "
              "copies of the 2.1B-entry embedding) and the fused routes' two bf16 output buffers.",
              "",
              "| ranks | read GB per rank | written GB per rank | peak GB, per-tensor route | peak GB, fused routes | "
              "Task Arithmetic min | global TIES min |",
              "|---|---|---|---|---|---|---|"]
    for row in paper["rows"]:
        lines.append(f"| {row['ranks']} | {row['read_gb']:.0f} | {row['written_gb']:.0f} | "
                     f"{row['peak_gb_per_tensor_route']:.0f} | {row['peak_gb_fused_routes']:.1f} | "
                     f"{row['ta_wall_s'] / 60:.1f} | {row['ties_wall_s'] / 60:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
