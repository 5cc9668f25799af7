"""LoRA extraction against mergekit's ``mergekit-extract-lora`` (issue 19, deliverable 1; not a test).

Both tools extract a PEFT adapter at the same rank from the same base and fine-tune, each in a subprocess:

- mergekit 0.1.5 in its own venv (made or reused by :func:`bench_vs_mergekit.ensure_mergekit`), run as
  ``mergekit-extract-lora --model FT --base-model BASE --out-path OUT --max-rank R --embed-lora
  --no-copy-tokenizer`` (a full float32 ``torch.linalg.svd`` per module, factors in the input dtype);
- hf_merge as ``hf-merge extract-lora BASE FT OUT --rank R --embeddings lora`` (Gram-matrix eigensolves of
  :func:`hf_merge.linalg.top_k_svd`, factors in the input dtype).

``--embed-lora`` / ``--embeddings lora`` make both put LoRA factors on the embedding table and the (untied) output
head; both save the changed RMSNorm weights whole (``modules_to_save``).

Inputs: the Llama-style bf16 checkpoints of ``bench_merge_io.generate`` (the base and its first fine-tune, whose
ΔW is i.i.d. noise: a flat spectrum, so any rank-r truncation keeps about r/n of the energy), and a second fine-tune
of the same base written here whose ΔW of every matrix has a decaying spectrum σ_i ∝ 0.85^i (as real fine-tunes'
updates concentrate in few directions). Sizes: ``tiny`` (bench_vs_mergekit's, ~2.1M parameters, inputs shared with
it), ``small`` (~34M) and ``default`` (~0.47B, bench_merge_io's shapes).

Measured per run: wall time (subprocess, inputs in the page cache), peak RSS (``/usr/bin/time -v``), and per LoRA
module the relative error ‖ΔW − B A‖_F / ‖ΔW‖_F of each tool's adapter against the stored update (bf16 fine-tune
minus bf16 base, in float64), next to the Eckart–Young optimum at that rank (float64 singular values). Writes
``benchmarks/results/extract_lora.json`` and ``.md``; scratch lives in ``benchmarks/.work/extract_lora/``.

    python benchmarks/bench_extract_lora.py --size tiny            # a few minutes (3 runs of each tool per input)
    python benchmarks/bench_extract_lora.py --size small --rank 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from bench_vs_mergekit import (  # noqa: E402
    MERGEKIT_VENV,
    REPO,
    RESULTS,
    WORK,
    ensure_mergekit,
    hf_merge_command,
    hf_merge_version,
    make_inputs,
    read_inputs,
    timed,
)
from bench_vs_mergekit import SIZES as VS_MERGEKIT_SIZES  # noqa: E402

SIZES = {
    "tiny": VS_MERGEKIT_SIZES["tiny"],
    "small": {"hidden": 512, "intermediate": 1408, "layers": 8, "vocab": 8192, "tasks": 1},
    "default": {**VS_MERGEKIT_SIZES["default"], "tasks": 1},
}
SCRATCH = WORK / "extract_lora"
DECAY = 0.85  # σ_i ∝ DECAY^i in the decaying-spectrum fine-tune
MERGEKIT_FLAGS = ["--embed-lora", "--no-copy-tokenizer"]


# ---------------------------------------------------------------------------------------------------- inputs
def inputs(size: str) -> tuple[Path, dict[str, Path]]:
    """(base, {delta kind: fine-tune folder}): bench_merge_io's base and noise fine-tune, and a decaying one."""
    if size == "tiny":
        folders = make_inputs("tiny")  # shared with bench_vs_mergekit
    else:
        from bench_merge_io import generate

        folders = generate(SCRATCH / f"inputs-{size}", argparse.Namespace(**SIZES[size]))
    base = folders[0]
    return base, {"noise": folders[1], "decaying": decaying_finetune(base, SCRATCH / f"decaying-{size}")}


def decaying_finetune(base: Path, folder: Path) -> Path:
    """A fine-tune of ``base`` whose every matrix moves by U diag(σ) Vᵀ (random orthonormal U, V; σ_i ∝ 0.85^i,
    ‖ΔW‖_F = 1% of ‖W‖_F) and every vector by 1% noise, stored in bf16 like the base (written once)."""
    import torch
    from safetensors import safe_open

    from hf_merge.io import TensorMeta, write_safetensors_shards

    stamp = folder / "generated.json"
    signature = {"base": str(base), "decay": DECAY, "mtime": max(p.stat().st_mtime for p in base.iterdir())}
    if stamp.is_file() and json.loads(stamp.read_text()) == signature:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copy(base / "config.json", folder / "config.json")
    files = {key: path for path in sorted(base.glob("*.safetensors"))
             for key in safe_open(str(path), framework="pt").keys()}

    def tensor(key: str) -> torch.Tensor:
        with safe_open(str(files[key]), framework="pt") as fh:
            weight = fh.get_tensor(key).float()
        generator = torch.Generator().manual_seed(sorted(files).index(key))
        if weight.ndim == 2:
            rows, cols = weight.shape
            r = min(rows, cols)
            u, _ = torch.linalg.qr(torch.randn(rows, r, generator=generator))
            v, _ = torch.linalg.qr(torch.randn(cols, r, generator=generator))
            sigma = DECAY ** torch.arange(r, dtype=torch.float32)
            delta = (u * sigma) @ v.T
        else:
            delta = torch.randn(weight.shape, generator=generator)
        delta *= 0.01 * weight.norm() / delta.norm()
        return (weight + delta).to(torch.bfloat16)

    metas = {}
    for key, path in files.items():
        with safe_open(str(path), framework="pt") as fh:
            piece = fh.get_slice(key)
            metas[key] = TensorMeta(tuple(piece.get_shape()), torch.bfloat16)
    write_safetensors_shards(folder, metas, tensor, max_shard_size="400MB")
    stamp.write_text(json.dumps(signature))
    return folder


# --------------------------------------------------------------------------------------------------- errors
def adapter_updates(folder: Path) -> dict:
    """ΔW = B A (float64, PEFT's (out, in) layout; (num, dim) for embedding tables) of every LoRA module, with the
    scaling ``alpha / r`` of its ``rank_pattern``/``alpha_pattern`` entry applied."""
    from safetensors.torch import load_file

    from hf_merge.adapters import _pattern_value  # PEFT's rank_pattern / alpha_pattern lookup

    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = {k.removeprefix("base_model.model."): v for k, v in load_file(str(folder / "adapter_model.safetensors"))
               .items()}

    out = {}
    for name in tensors:
        for part, embedding in ((".lora_A.weight", False), (".lora_embedding_A", True)):
            if name.endswith(part):
                module = name.removesuffix(part)
                a = tensors[name].double()
                b = tensors[module + part.replace("A", "B")].double()
                scale = _pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]) / _pattern_value(
                    config.get("rank_pattern"), module, config["r"])
                out[module] = ((b @ a).T if embedding else b @ a) * scale
    return out


def module_errors(base: Path, finetune: Path, adapters: dict[str, Path], rank: int) -> dict:
    """Per module present in every adapter: each tool's ‖ΔW − B A‖_F / ‖ΔW‖_F and the Eckart–Young optimum
    √(Σ_{i>r} σ_i²) / ‖ΔW‖_F; modules only some adapters hold are listed."""
    import torch
    from bench_vs_mergekit import load, open_folder

    base_index, ft_index = open_folder(base), open_folder(finetune)
    updates = {tool: adapter_updates(folder) for tool, folder in adapters.items()}
    common = sorted(set.intersection(*(set(u) for u in updates.values())))
    rows = {}
    for module in common:
        delta = (load(ft_index, f"{module}.weight").double() - load(base_index, f"{module}.weight").double())
        norm = float(delta.norm())
        s2 = torch.linalg.svdvals(delta) ** 2
        row = {"shape": list(delta.shape), "optimal": float(s2[rank:].sum().sqrt()) / norm}
        for tool, found in updates.items():
            row[tool] = float((delta - found[module]).norm()) / norm
        rows[module] = row
    only = {tool: sorted(set(u) - set(common)) for tool, u in updates.items()}
    return {"modules": rows, "only_in": {k: v for k, v in only.items() if v}}


def error_stats(errors: dict, tools: list[str]) -> dict:
    modules = errors["modules"].values()
    out = {"modules": len(errors["modules"]),
           "optimal_median": statistics.median(m["optimal"] for m in modules) if modules else None}
    for tool in tools:
        values = [m[tool] for m in modules]
        excess = [m[tool] - m["optimal"] for m in modules]
        out[tool] = {"median": statistics.median(values), "max": max(values), "max_excess_over_optimal": max(excess)}
    ratios = [m["hf_merge"] / m["mergekit"] for m in modules if m["mergekit"] > 0]
    out["error_ratio_hf_over_mk"] = {"min": min(ratios), "max": max(ratios), "median": statistics.median(ratios)}
    return out


# ------------------------------------------------------------------------------------------------------ runs
def run_pair(base: Path, finetune: Path, rank: int, workdir: Path, hf_cmd: list[str], repeats: int) -> dict:
    """Both tools ``repeats`` times, interleaved (the machine is shared: the fastest run of each is kept, with every
    run's wall time listed), then the per-module errors of their adapters."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    outs = {"mergekit": workdir / "mergekit", "hf_merge": workdir / "hf_merge"}
    commands = {
        "mergekit": [str(MERGEKIT_VENV / "bin" / "mergekit-extract-lora"), "--model", str(finetune), "--base-model",
                     str(base), "--out-path", str(outs["mergekit"]), "--max-rank", str(rank), *MERGEKIT_FLAGS],
        "hf_merge": [*hf_cmd, "extract-lora", str(base), str(finetune), str(outs["hf_merge"]), "--rank", str(rank),
                     "--embeddings", "lora", "--quiet", "--overwrite"],
    }
    row: dict = {"finetune": str(finetune.relative_to(REPO)), "rank": rank}
    runs: dict[str, list[dict]] = {tool: [] for tool in commands}
    for _ in range(repeats):
        for tool, command in commands.items():
            read_inputs([base, finetune])
            runs[tool].append(timed(command, workdir / f"{tool}.log"))
    for tool, results in runs.items():
        ok = [r for r in results if r["ok"]]
        row[tool] = min(ok, key=lambda r: r["wall_s"]) if ok else results[-1]
        row[tool]["all_wall_s"] = [r["wall_s"] for r in results]
    if row["mergekit"]["ok"] and row["hf_merge"]["ok"]:
        errors = module_errors(base, finetune, outs, rank)
        row["errors"] = error_stats(errors, list(outs))
        row["only_in"] = errors["only_in"]
        row["per_module"] = errors["modules"]
        row["adapter_bytes"] = {tool: (folder / "adapter_model.safetensors").stat().st_size
                                for tool, folder in outs.items()}
    row["ratios_mk_over_hf"] = ratios(row)
    return row


def ratios(row: dict) -> dict:
    mk, hf = row["mergekit"], row["hf_merge"]
    out = {}
    if mk["ok"] and hf["ok"]:
        out["wall"] = round(mk["wall_s"] / hf["wall_s"], 2)
        if mk["peak_rss_gb"] and hf["peak_rss_gb"]:
            out["peak_rss"] = round(mk["peak_rss_gb"] / hf["peak_rss_gb"], 2)
    return out


def write_report(report: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "extract_lora.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# LoRA extraction: hf_merge vs mergekit-extract-lora",
        "",
        f"mergekit {report['versions']['mergekit']['mergekit']} (torch {report['versions']['mergekit']['torch']}, own "
        f"venv) as `mergekit-extract-lora --model FT --base-model BASE --out-path OUT --max-rank R "
        f"{' '.join(MERGEKIT_FLAGS)}`; hf_merge {report['versions']['hf_merge']} as `hf-merge extract-lora BASE FT "
        f"OUT --rank R --embeddings lora`. {report['machine']['cpus']} CPUs, load average at start "
        f"{', '.join(f'{x:.1f}' for x in report['machine']['load_average_at_start'])} (a shared machine: wall times "
        f"are indicative); wall = subprocess wall clock, inputs in the page cache (both include Python start-up and "
        f"imports, a few seconds), the fastest of {report['repeats']} interleaved runs of each tool (every run's in "
        f"the JSON); peak RSS from `/usr/bin/time -v` of that run. Started {report['started_utc']} UTC.",
        "",
        "Inputs: Llama-style bf16 checkpoints (`bench_merge_io.generate`); `noise`: its fine-tune (ΔW i.i.d. noise, a "
        "flat spectrum), `decaying`: ΔW = U diag(σ) Vᵀ with σ_i ∝ 0.85^i per matrix. Error: ‖ΔW − B A‖_F / ‖ΔW‖_F per "
        "LoRA module against the stored update (float64), next to the Eckart–Young optimum at that rank; both tools "
        "store the factors in bf16, which the error includes.",
        "",
        "| size | params | ΔW | rank | modules | mk wall s | hf wall s | wall mk/hf | mk RSS GB | hf RSS GB | RSS mk/hf "
        "| optimal err (median) | mk err median / max | hf err median / max | hf/mk err (min–max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        mk, hf, e = row["mergekit"], row["hf_merge"], row.get("errors")
        if e is None:
            failed = "; ".join(f"{t}: {row[t].get('error')}" for t in ("mergekit", "hf_merge") if not row[t]["ok"])
            lines.append(f"| {row['size']} | | {row['delta']} | {row['rank']} | failed: {failed} |")
            continue
        r = row["ratios_mk_over_hf"]
        lines.append(
            f"| {row['size']} | {row['parameters'] / 1e6:.1f}M | {row['delta']} | {row['rank']} | {e['modules']} "
            f"| {mk['wall_s']} | {hf['wall_s']} | {r.get('wall', '-')} | {mk['peak_rss_gb']} | {hf['peak_rss_gb']} "
            f"| {r.get('peak_rss', '-')} | {e['optimal_median']:.4f} "
            f"| {e['mergekit']['median']:.4f} / {e['mergekit']['max']:.4f} "
            f"| {e['hf_merge']['median']:.4f} / {e['hf_merge']['max']:.4f} "
            f"| {e['error_ratio_hf_over_mk']['min']:.4f}–{e['error_ratio_hf_over_mk']['max']:.4f} |")
    excess = [f"{row['size']}/{row['delta']}: mergekit {row['errors']['mergekit']['max_excess_over_optimal']:.2e}, "
              f"hf_merge {row['errors']['hf_merge']['max_excess_over_optimal']:.2e}"
              for row in report["rows"] if row.get("errors")]
    lines += ["", "Largest error above the optimum (bf16 factors): " + "; ".join(excess), ""]
    missing = [f"{row['size']}/{row['delta']}: {row['only_in']}" for row in report["rows"] if row.get("only_in")]
    if missing:
        lines += ["Modules only one tool extracted: " + "; ".join(missing), ""]
    (RESULTS / "extract_lora.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), nargs="+", default=["tiny"])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--deltas", nargs="+", choices=("noise", "decaying"), default=["noise", "decaying"])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each tool, interleaved; the fastest is kept")
    args = parser.parse_args()

    import torch
    from bench_merge_io import llama_shapes

    versions = ensure_mergekit()
    hf_cmd = hf_merge_command()
    report = {
        "rank": args.rank,
        "repeats": args.repeats,
        "versions": {"mergekit": versions, "hf_merge": hf_merge_version(), "python": platform.python_version()},
        "mergekit_flags": MERGEKIT_FLAGS,
        "hf_merge_command": hf_cmd,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "load_average_at_start": list(os.getloadavg())},
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "rows": [],
    }
    for size in args.size:
        shapes = SIZES[size]
        parameters = sum(int(torch.Size(s).numel()) for s in llama_shapes(
            shapes["hidden"], shapes["intermediate"], shapes["layers"], shapes["vocab"]).values())
        print(f"{size}: {parameters / 1e6:.1f}M parameters; generating the inputs ...", flush=True)
        base, finetunes = inputs(size)
        for delta in args.deltas:
            print(f"  {delta} ΔW, rank {args.rank} ...", end=" ", flush=True)
            row = run_pair(base, finetunes[delta], args.rank, SCRATCH / "runs" / f"{size}-{delta}", hf_cmd,
                           args.repeats)
            row.update(size=size, delta=delta, parameters=parameters)
            report["rows"].append(row)
            write_report(report)
            e = row.get("errors")
            print(f"mergekit {row['mergekit']['wall_s']} s / {row['mergekit']['peak_rss_gb']} GB, hf_merge "
                  f"{row['hf_merge']['wall_s']} s / {row['hf_merge']['peak_rss_gb']} GB"
                  + (f"; error ratio hf/mk {e['error_ratio_hf_over_mk']}" if e else
                     f"; {row['mergekit'].get('error') or row['hf_merge'].get('error')}"), flush=True)
    report["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    write_report(report)


if __name__ == "__main__":
    main()
