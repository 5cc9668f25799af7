"""Equivalence with mergekit, tensor by tensor (issue 17, deliverable 5; not a test).

Runs the same mergekit YAML recipes through mergekit's ``mergekit-yaml RECIPE OUT`` and hf_merge's
``hf-merge merge RECIPE OUT`` and compares the two outputs tensor by tensor.

- mergekit runs in its own virtual environment, ``benchmarks/.work/mergekit-venv``, made by this script (skipped when
  it already holds the pinned versions): ``pip install torch==2.13.0`` first (the CPU wheel), then
  ``pip install -c <constraints: torch==2.13.0> mergekit==0.1.5``. hf_merge's environment is never touched.
- Inputs: a Llama-style base + 3 "fine-tunes" (bf16, sharded safetensors, ``LlamaForCausalLM`` config.json) made by
  ``bench_merge_io.generate``: ``--size tiny`` (~2.1M parameters per model, for development) or ``--size default``
  (~0.47B parameters per model, bench_merge_io's default shapes). The task vectors are small (1% of the base's L2
  norm, a median of 2 bf16 ulps of the base entry, 17% exact zeros): their magnitudes tie a lot, as bf16 deltas do.
- Recipes (one YAML file per recipe, the same file for both tools, ``dtype: float32`` and ``out_dtype: bfloat16``):
  linear, task_arithmetic, ties, slerp (per-filter ``t`` gradients), model_stock, breadcrumbs, breadcrumbs_ties,
  nuslerp, multislerp, karcher, sce compared value by value; dare_ties and della (random masks: the two tools' random
  streams differ) compared by the fraction of non-zero entries of (merged - base) per tensor and the L1 norms of
  (merged - base), side by side.
- Per recipe: the largest difference in bf16 ulps over all tensors (ulp of the mergekit value; both outputs loaded
  as float32; a tensor missing on either side fails the recipe), the mean |diff|, each tool's wall time (a
  subprocess, inputs read once before so the page cache is warm) and peak RSS (``/usr/bin/time -v``, else
  ``getrusage(RUSAGE_CHILDREN)`` in a wrapper process), and the ratios mergekit / hf_merge. A recipe that fails on
  one side is reported with the last line of its error and the run goes on.
- Where a ranked recipe (ties, breadcrumbs, breadcrumbs_ties, sce: top-k cuts of |τ| or of a variance) differs,
  mergekit runs once more with torch.sort/argsort/topk made stable and hf_merge is compared with that: identical
  means the whole difference is which of equal magnitudes the cut keeps (mergekit's sorts are not stable).
- Where a deterministic recipe still differs by more than 1 ulp at the base's scale, mergekit runs it once more with
  ``dtype: float64`` (its own formula, rounded once into bf16), and both float32 outputs are measured against that:
  hf_merge within 1 ulp of it means the difference is mergekit's float32 rounding.

Writes ``benchmarks/results/vs_mergekit.json`` and ``.md``; scratch (venv, inputs, recipes, outputs, logs) lives in
``benchmarks/.work/``.

    python benchmarks/bench_vs_mergekit.py --size tiny               # 4 MB per model, ~5 minutes
    python benchmarks/bench_vs_mergekit.py --no-stable-sort-check    # ~0.47B parameters per model, ~45 minutes
    python benchmarks/bench_vs_mergekit.py --recheck-sort-ties       # then add the stable-sort check (~20 minutes)
    python benchmarks/bench_vs_mergekit.py --size tiny --recipes ties,slerp --keep-outputs
    python benchmarks/bench_vs_mergekit.py --recipes linear,slerp --repeats 3   # the fastest of 3 interleaved runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
RESULTS = ROOT / "results"
WORK = ROOT / ".work"
MERGEKIT_VENV = WORK / "mergekit-venv"
MERGEKIT_VERSION = "0.1.5"
TORCH_VERSION = "2.13.0"

sys.path.insert(0, str(ROOT))

SIZES = {
    # hidden must be a multiple of 64 (bench_merge_io sets num_attention_heads = hidden // 64)
    "tiny": {"hidden": 128, "intermediate": 384, "layers": 5, "vocab": 4096, "tasks": 3},
    "default": {"hidden": 1024, "intermediate": 4096, "layers": 24, "vocab": 32000, "tasks": 3},
}
WEIGHTS = [0.5, 0.3, 0.4]  # deliberately not summing to 1: normalisation shows
DENSITIES = [0.5, 0.6, 0.4]
STOCHASTIC = {"dare_ties", "della"}
#: Recipes whose masks come from a magnitude (or variance) ranking: where hf_merge differs, mergekit is re-run with
#: its sorts made stable, to tell tie-breaking (which of equal |values| a top-k cut keeps) from formula differences.
RANKED = {"ties", "breadcrumbs", "breadcrumbs_ties", "sce"}
STABLE_SORT_SHIM = """\
# mergekit-yaml with torch.sort / torch.argsort / torch.topk made stable (equal values in index order): written by
# bench_vs_mergekit.py to tell tie-breaking in mergekit's magnitude rankings from formula differences.
import sys

import torch

_argsort, _sort = torch.argsort, torch.sort


def argsort(input, dim=-1, descending=False, stable=False):
    return _argsort(input, dim=dim, descending=descending, stable=True)


def sort(input, dim=-1, descending=False, stable=False):
    return _sort(input, dim=dim, descending=descending, stable=True)


def topk(input, k, dim=-1, largest=True, sorted=True):
    indices = _argsort(input, dim=dim, descending=largest, stable=True).narrow(dim, 0, k)
    return torch.gather(input, dim, indices), indices


torch.argsort, torch.sort, torch.topk = argsort, sort, topk
from mergekit.scripts.run_yaml import main  # noqa: E402

sys.exit(main())
"""
STABLE_OUT, FLOAT64_OUT = "mergekit_stable_sort", "mergekit_float64"  # the re-runs' output folders
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
MERGEKIT_FLAGS = ["--random-seed", "0", "--no-copy-tokenizer"]  # CPU defaults otherwise (no --cuda)


# ----------------------------------------------------------------------------------------------- environments


def _run_quiet(cmd: list[str], log: Path) -> None:
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(map(str, cmd))}\n")
        fh.flush()
        subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT)


def mergekit_versions(venv: Path = MERGEKIT_VENV) -> dict | None:
    """The torch and mergekit versions the venv holds, or None if it does not work."""
    python = venv / "bin" / "python"
    if not python.is_file():
        return None
    probe = ("import json, importlib.metadata as m, torch, mergekit.merge; "
             "print(json.dumps({'mergekit': m.version('mergekit'), 'torch': torch.__version__, "
             "'transformers': m.version('transformers'), 'safetensors': m.version('safetensors')}))")
    result = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, env={**os.environ, **ENV})
    if result.returncode:
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def ensure_mergekit(venv: Path = MERGEKIT_VENV, version: str = MERGEKIT_VERSION) -> dict:
    """Make (once) the venv mergekit runs in: torch's CPU wheel first, then mergekit with torch pinned by a
    constraints file (mergekit asks for ``torch>=2.0.0``: unconstrained, pip would fetch a CUDA build)."""
    versions = mergekit_versions(venv)
    if versions and versions["mergekit"] == version and versions["torch"].split("+")[0] == TORCH_VERSION:
        return versions
    print(f"Installing mergekit {version} into {venv} (torch {TORCH_VERSION} CPU first) ...", flush=True)
    log = venv.parent / "mergekit-install.log"
    venv.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    shutil.rmtree(venv, ignore_errors=True)
    base_python = getattr(sys, "_base_executable", None) or sys.executable
    _run_quiet([base_python, "-m", "venv", str(venv)], log)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    constraints = venv.parent / "mergekit-constraints.txt"
    constraints.write_text(f"torch=={TORCH_VERSION}\n")
    _run_quiet(pip + [f"torch=={TORCH_VERSION}"], log)
    _run_quiet(pip + ["-c", str(constraints), f"mergekit=={version}"], log)
    versions = mergekit_versions(venv)
    if not versions:
        raise RuntimeError(f"mergekit does not import after installing it; see {log}")
    return versions


def hf_merge_command() -> list[str]:
    """``hf-merge`` of the repository's venv, else ``python -m hf_merge.cli`` of it, else of this interpreter."""
    venv = REPO / ".venv" / "bin"
    if (venv / "hf-merge").is_file():
        return [str(venv / "hf-merge")]
    if (venv / "python").is_file():
        return [str(venv / "python"), "-m", "hf_merge.cli"]
    return [sys.executable, "-m", "hf_merge.cli"]


def hf_merge_version() -> str:
    try:
        import importlib.metadata

        version = importlib.metadata.version("hf-merge")
    except Exception:  # noqa: BLE001 - informational only
        version = "unknown"
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "hf_merge"], capture_output=True,
                               text=True).stdout.strip()
    except OSError:
        commit, dirty = "", ""
    return f"{version} ({commit}{', hf_merge/ modified' if dirty else ''})"


def hf_merge_tree() -> str:
    """A short hash of hf_merge's sources as they are now (the tree may change between recipes while others edit)."""
    import hashlib

    digest = hashlib.sha1()
    for path in sorted((REPO / "hf_merge").rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


# ---------------------------------------------------------------------------------------------------- inputs


def make_inputs(size: str) -> list[Path]:
    """Base + 3 fine-tunes from bench_merge_io's generator (cached under .work/vs_mergekit/inputs-SIZE)."""
    from bench_merge_io import generate

    workdir = WORK / "vs_mergekit" / f"inputs-{size}"
    return generate(workdir, argparse.Namespace(**SIZES[size]))


def n_parameters(size: str) -> int:
    import torch
    from bench_merge_io import llama_shapes

    s = SIZES[size]
    return sum(int(torch.Size(x).numel()) for x in
               llama_shapes(s["hidden"], s["intermediate"], s["layers"], s["vocab"]).values())


def read_inputs(folders: list[Path]) -> None:
    """Read every input file once: both tools then start with the inputs in the page cache."""
    buffer = bytearray(16 << 20)
    for path in (p for folder in folders for p in sorted(folder.glob("*.safetensors"))):
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(buffer):
                pass


def task_vector_stats(folders: list[Path]) -> dict:
    """How the fine-tunes differ from the base (on layer 0 and the embeddings): the task vectors' L2 norm relative
    to the base's, the share of exactly-zero entries (bf16 rounding swallows deltas under half an ulp of the base),
    the median |delta| in ulps of the base value, and the number of distinct |delta| values per entry (ties in a
    magnitude ranking: where a top-k cut falls inside a run of equal magnitudes, which entries are kept is
    implementation-defined)."""
    import torch

    base, tasks = open_folder(folders[0]), [open_folder(f) for f in folders[1:]]
    keys = [k for k in base if ".layers.0." in k or k == "model.embed_tokens.weight"]
    stats: dict = {"relative_l2": [], "zero_fraction": [], "median_abs_delta_in_base_ulps": [],
                   "distinct_abs_values_per_entry": []}
    for task in tasks:
        norm = rel = 0.0
        zero = distinct = count = 0
        ratios = []
        for key in keys:
            b = load(base, key)
            d = load(task, key) - b
            norm += float(b.norm() ** 2)
            rel += float(d.norm() ** 2)
            count += d.numel()
            zero += int((d == 0).sum())
            distinct += int(torch.unique(d.abs()).numel())
            ratios.append((d.abs() / bf16_ulp(b)).reshape(-1)[:: max(1, d.numel() // 100_000)])
        stats["relative_l2"].append(round((rel / norm) ** 0.5, 5))
        stats["zero_fraction"].append(round(zero / count, 4))
        stats["median_abs_delta_in_base_ulps"].append(round(float(torch.cat(ratios).median()), 2))
        stats["distinct_abs_values_per_entry"].append(round(distinct / count, 6))
    return stats


# --------------------------------------------------------------------------------------------------- recipes


def recipes(base: Path, tasks: list[Path]) -> dict[str, dict]:
    """mergekit YAML recipes, one per method (the same file goes to both tools)."""
    b, t = str(base), [str(p) for p in tasks]
    common = {"dtype": "float32", "out_dtype": "bfloat16"}

    def weighted(method: str, **per_model) -> dict:
        models = []
        for i, path in enumerate(t):
            params = {"weight": WEIGHTS[i]}
            params |= {name: values[i] if isinstance(values, list) else values for name, values in per_model.items()}
            models.append({"model": path, "parameters": params})
        return {"merge_method": method, "base_model": b, "models": models, **common}

    out = {
        "linear": {"merge_method": "linear",
                   "models": [{"model": p, "parameters": {"weight": WEIGHTS[i]}} for i, p in enumerate(t)],
                   **common},
        "task_arithmetic": weighted("task_arithmetic"),
        "ties": weighted("ties", density=DENSITIES),
        "slerp": {"merge_method": "slerp", "base_model": b, "models": [{"model": b}, {"model": t[0]}],
                  "parameters": {"t": [{"filter": "self_attn", "value": [0.1, 0.6, 0.3, 0.9]},
                                       {"filter": "mlp", "value": [0.8, 0.2, 0.5, 0.35]},
                                       {"value": 0.4}]},
                  **common},
        "model_stock": {"merge_method": "model_stock", "base_model": b, "models": [{"model": p} for p in t],
                        **common},
        "breadcrumbs": weighted("breadcrumbs", density=0.9, gamma=0.01),
        "breadcrumbs_ties": weighted("breadcrumbs_ties", density=0.9, gamma=0.01),
        "nuslerp": {"merge_method": "nuslerp", "base_model": b,
                    "models": [{"model": t[0], "parameters": {"weight": 0.4}},
                               {"model": t[1], "parameters": {"weight": 0.6}}],
                    **common},
        "multislerp": weighted("multislerp"),
        "karcher": {"merge_method": "karcher", "models": [{"model": p} for p in t], **common},
        "sce": {"merge_method": "sce", "base_model": b, "models": [{"model": p} for p in t],
                "parameters": {"select_topk": 0.5}, **common},
        "dare_ties": weighted("dare_ties", density=0.5),
        "della": weighted("della", density=0.5, epsilon=0.1),
    }
    return out


def write_recipe(path: Path, recipe: dict) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))


# ------------------------------------------------------------------------------------------------ measuring


def last_error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # skip progress bars and /usr/bin/time's "Command exited with non-zero status"
    lines = [line for line in lines if not line.startswith("Command exited with") and "it/s]" not in line
             and "s/it]" not in line]
    return lines[-1][:400] if lines else "(no output)"


def timed(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` as a subprocess; its wall time and peak RSS (``/usr/bin/time -v``, else getrusage in a wrapper
    process); the last line of its error output if it fails."""
    env = {**os.environ, **ENV, "HF_HOME": str(WORK / "vs_mergekit" / "hf-home")}
    times = log.with_suffix(".time")
    if Path("/usr/bin/time").is_file():
        full = ["/usr/bin/time", "-v", "-o", str(times), *cmd]
    else:
        wrapper = ("import json, resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
                   "open(sys.argv[1], 'w').write(json.dumps(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
                   "sys.exit(rc)")
        full = [sys.executable, "-c", wrapper, str(times), *cmd]
    os.sync()  # the previous run's output is flushed before this one starts
    start = time.perf_counter()
    with open(log, "w") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        rc = subprocess.run(full, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - start
    peak_kb = None
    if times.is_file():
        text = times.read_text()
        if text.strip().isdigit():
            peak_kb = int(text.strip())
        for line in text.splitlines():
            if "Maximum resident set size" in line:
                peak_kb = int(line.split(":")[1])
    result = {"ok": rc == 0, "wall_s": round(wall, 2), "peak_rss_gb": None if peak_kb is None else
              round(peak_kb / 2**20, 3), "log": str(log.relative_to(REPO))}
    if rc:
        result["error"] = last_error_line(log.read_text(errors="replace"))
    return result


def fastest(runs: list[dict]) -> dict:
    """The fastest of a command's repeated runs (the first failed one, if any failed), with every run's wall time."""
    failed = [run for run in runs if not run["ok"]]
    chosen = failed[0] if failed else min(runs, key=lambda run: run["wall_s"])
    return {**chosen, "wall_s_runs": [run["wall_s"] for run in runs]}


# ------------------------------------------------------------------------------------------------- comparing


def open_folder(folder: Path) -> dict[str, Path]:
    """tensor name -> safetensors file holding it."""
    from safetensors import safe_open

    index = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                index[key] = path
    return index


def dtype_of(index: dict[str, Path], key: str) -> str:
    from safetensors import safe_open

    with safe_open(str(index[key]), framework="pt") as fh:
        return str(fh.get_slice(key).get_dtype())


def dtype_mismatches(mk: dict[str, Path], hf: dict[str, Path]) -> list[str]:
    """Tensors stored in another dtype by the two tools (both should write ``out_dtype``)."""
    out = []
    for key in sorted(set(mk) & set(hf)):
        a, b = dtype_of(mk, key), dtype_of(hf, key)
        if a != b:
            out.append(f"{key}: {a} vs {b}")
    return out


def load(index: dict[str, Path], key: str):
    from safetensors import safe_open

    with safe_open(str(index[key]), framework="pt") as fh:
        return fh.get_tensor(key).float()


def bf16_ulp(x):
    """Spacing of bfloat16 numbers at |x| (as float32): 2^(e-8) for x = m·2^e, m in [0.5, 1); the subnormal
    spacing 2^-133 at and below the smallest normal number (so at 0)."""
    import torch

    _, exponent = torch.frexp(x.float())
    ulp = torch.ldexp(torch.ones_like(x, dtype=torch.float32), (exponent - 8).clamp(min=-133))
    return torch.where(x == 0, torch.full_like(ulp, 2.0 ** -133), ulp)


def compare_exact(mk_dir: Path, hf_dir: Path, base_dir: Path, has_base: bool) -> dict:
    """Largest |diff| in bf16 ulps of the mergekit value (and, as a scale-aware second view, in bf16 ulps of the
    larger of |mergekit value| and |base value|: a merged entry that cancels to near zero has a tiny ulp of its own),
    mean |diff|, share of elements that differ. ``has_base``: the recipe has a base_model (then mean |merged - base|
    is reported for scale); the base folder is read either way, as the inputs' scale."""
    import torch

    mk, hf, base = open_folder(mk_dir), open_folder(hf_dir), open_folder(base_dir)
    missing_hf, missing_mk = sorted(set(mk) - set(hf)), sorted(set(hf) - set(mk))
    out = {"tensors": len(mk), "missing_in_hf_merge": missing_hf, "missing_in_mergekit": missing_mk,
           "shape_mismatch": [], "dtype_mismatch": dtype_mismatches(mk, hf), "max_ulps": 0.0, "worst_tensor": None,
           "worst_element": None,
           "max_ulps_base_scale": 0.0, "max_abs_diff": 0.0, "mean_abs_diff": 0.0, "differing_fraction": 0.0,
           "over_1ulp_fraction": 0.0, "over_1ulp_count": 0, "mean_abs_delta_mergekit": None, "per_tensor": {}}
    total = differing = over_one = 0
    abs_sum = delta_sum = 0.0
    for key in sorted(set(mk) & set(hf)):
        a, b = load(mk, key), load(hf, key)
        if a.shape != b.shape:
            out["shape_mismatch"].append(f"{key}: {tuple(a.shape)} vs {tuple(b.shape)}")
            continue
        ref = load(base, key) if key in base else None
        if ref is not None and ref.shape != a.shape:
            ref = None
        total += a.numel()
        if has_base and ref is not None:
            delta_sum += float((a - ref).abs().sum(dtype=torch.float64))
        # only the differing entries are looked at further (most are bit-identical): NaN on both sides is equal
        where = (a != b).reshape(-1).nonzero().squeeze(1)
        ad, bd = a.reshape(-1)[where], b.reshape(-1)[where]
        keep = ~(ad.isnan() & bd.isnan())
        where, ad, bd = where[keep], ad[keep], bd[keep]
        diff = torch.nan_to_num((ad - bd).abs(), nan=float("inf"))
        ulps = diff / bf16_ulp(ad)
        ulps_scale = diff / bf16_ulp(torch.maximum(ad.abs(), ref.reshape(-1)[where].abs())) if ref is not None else ulps
        m = float(ulps.max()) if ulps.numel() else 0.0
        m_scale = float(ulps_scale.max()) if ulps.numel() else 0.0
        differing += where.numel()
        over_one += int((ulps > 1).sum())
        abs_sum += float(diff.sum(dtype=torch.float64))
        out["per_tensor"][key] = {"max_ulps": m, "max_ulps_base_scale": m_scale,
                                  "mean_abs_diff": float(diff.sum(dtype=torch.float64)) / a.numel(),
                                  "differing_fraction": where.numel() / a.numel()}
        out["max_ulps_base_scale"] = max(out["max_ulps_base_scale"], m_scale)
        if out["worst_tensor"] is None or m > out["max_ulps"]:
            out["max_ulps"], out["worst_tensor"] = m, key
            if m > 0:
                at = int(ulps.argmax())
                flat = int(where[at])
                index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape))
                out["worst_element"] = {"index": list(index), "mergekit": float(ad[at]), "hf_merge": float(bd[at])}
                if ref is not None:
                    out["worst_element"]["base"] = float(ref.reshape(-1)[flat])
        if diff.numel():
            out["max_abs_diff"] = max(out["max_abs_diff"], float(diff.max()))
    if total:
        out["mean_abs_diff"] = abs_sum / total
        out["differing_fraction"] = differing / total
        out["over_1ulp_fraction"] = over_one / total
        out["over_1ulp_count"] = over_one
        if has_base:
            out["mean_abs_delta_mergekit"] = delta_sum / total
    out["ok"] = not (missing_hf or missing_mk or out["shape_mismatch"] or out["dtype_mismatch"])
    return out


def compare_stochastic(mk_dir: Path, hf_dir: Path, base_dir: Path) -> dict:
    """Random masks differ between the tools: compare, per tensor, the share of non-zero entries of (merged - base)
    and the L1 norm of (merged - base)."""
    mk, hf, base = open_folder(mk_dir), open_folder(hf_dir), open_folder(base_dir)
    missing_hf, missing_mk = sorted(set(mk) - set(hf)), sorted(set(hf) - set(mk))
    per_tensor, shape_mismatch = {}, []
    totals = {"numel": 0, "nz_mk": 0, "nz_hf": 0, "l1_mk": 0.0, "l1_hf": 0.0}
    for key in sorted(set(mk) & set(hf)):
        b = load(base, key)
        a, h = load(mk, key) - b, load(hf, key) - b
        if a.shape != h.shape:
            shape_mismatch.append(f"{key}: {tuple(a.shape)} vs {tuple(h.shape)}")
            continue
        nz_a, nz_h = int((a != 0).sum()), int((h != 0).sum())
        l1_a, l1_h = float(a.abs().double().sum()), float(h.abs().double().sum())
        per_tensor[key] = {"nonzero_mergekit": nz_a / a.numel(), "nonzero_hf_merge": nz_h / a.numel(),
                           "l1_mergekit": l1_a, "l1_hf_merge": l1_h,
                           "l1_ratio_hf_over_mk": l1_h / l1_a if l1_a else None}
        totals["numel"] += a.numel()
        totals["nz_mk"] += nz_a
        totals["nz_hf"] += nz_h
        totals["l1_mk"] += l1_a
        totals["l1_hf"] += l1_h
    ratios = [v["l1_ratio_hf_over_mk"] for v in per_tensor.values() if v["l1_ratio_hf_over_mk"] is not None]
    nz_gap = [abs(v["nonzero_mergekit"] - v["nonzero_hf_merge"]) for v in per_tensor.values()]
    n = max(totals["numel"], 1)
    return {
        "tensors": len(mk), "missing_in_hf_merge": missing_hf, "missing_in_mergekit": missing_mk,
        "shape_mismatch": shape_mismatch, "dtype_mismatch": dtype_mismatches(mk, hf),
        "nonzero_fraction_mergekit": totals["nz_mk"] / n, "nonzero_fraction_hf_merge": totals["nz_hf"] / n,
        "max_nonzero_gap_per_tensor": max(nz_gap, default=None),
        "l1_ratio_hf_over_mk": totals["l1_hf"] / totals["l1_mk"] if totals["l1_mk"] else None,
        "l1_ratio_per_tensor_min": min(ratios, default=None), "l1_ratio_per_tensor_max": max(ratios, default=None),
        "per_tensor": per_tensor,
        "ok": not (missing_hf or missing_mk or shape_mismatch or dtype_mismatches(mk, hf)),
    }


# ---------------------------------------------------------------------------------------------------- report


def fmt(value, spec: str = ".3g", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def verdict(row: dict) -> str:
    mk, hf, cmp = row["mergekit"], row["hf_merge"], row.get("compare")
    if not mk["ok"] and not hf["ok"]:
        return "FAIL both"
    if not mk["ok"]:
        return "FAIL mergekit"
    if not hf["ok"]:
        return "FAIL hf_merge"
    if cmp is None or not cmp["ok"]:
        return "FAIL tensors"
    if row["kind"] == "stochastic":
        return "stats"
    if cmp["max_ulps"] == 0:
        return "identical"
    if cmp["max_ulps"] <= 1:
        return "<=1 ulp"
    if cmp["max_ulps_base_scale"] <= 1:
        return "<=1 ulp at base scale"
    stable = row.get("compare_stable_sort")
    if stable is None and row["recipe"] in RANKED:
        return "differs (sort ties not checked)"
    if stable and stable.get("ok") and stable.get("max_ulps") == 0:
        return "ties in sort order"
    reference = row.get("compare_float64") or {}
    if reference.get("ok") and reference["hf_merge"]["max_ulps_base_scale"] <= 1:
        return "<=1 ulp of mergekit in float64"
    return "MISMATCH"


def table(rows: list[dict]) -> list[str]:
    lines = ["| recipe | verdict | max ulps | max ulps, base scale | elements > 1 ulp | differing | mean abs diff "
             "| mk wall s | hf wall s | wall mk/hf | mk RSS GB | hf RSS GB | RSS mk/hf |", "|" + "---|" * 13]
    for row in rows:
        mk, hf, cmp = row["mergekit"], row["hf_merge"], row.get("compare") or {}
        if row["kind"] == "stochastic" or not cmp.get("ok"):
            ulps = scaled = over = differing = mad = "-"
        else:
            ulps, scaled = fmt(cmp["max_ulps"], ".4g"), fmt(cmp["max_ulps_base_scale"], ".3g")
            over, differing = str(cmp["over_1ulp_count"]), fmt(cmp["differing_fraction"], ".3%")
            mad = fmt(cmp["mean_abs_diff"], ".2e")
        both = mk["ok"] and hf["ok"]
        lines.append(
            f"| {row['recipe']} | {verdict(row)} | {ulps} | {scaled} | {over} | {differing} | {mad} "
            f"| {fmt(mk['wall_s'], '.1f')} | {fmt(hf['wall_s'], '.1f')} "
            f"| {fmt(mk['wall_s'] / hf['wall_s'] if both else None, '.2f')} "
            f"| {fmt(mk['peak_rss_gb'], '.2f')} | {fmt(hf['peak_rss_gb'], '.2f')} "
            f"| {fmt(mk['peak_rss_gb'] / hf['peak_rss_gb'] if both and hf['peak_rss_gb'] else None, '.2f')} |")
    stochastic = [row for row in rows if row["kind"] == "stochastic" and (row.get("compare") or {}).get("ok")]
    if stochastic:
        lines += ["", "| recipe | non-zero share of merged - base, mergekit | hf_merge | largest per-tensor gap "
                      "| L1(merged - base) hf / mk | per tensor min | per tensor max |", "|" + "---|" * 7]
        for row in stochastic:
            c = row["compare"]
            lines.append(f"| {row['recipe']} | {c['nonzero_fraction_mergekit']:.4f} "
                         f"| {c['nonzero_fraction_hf_merge']:.4f} "
                         f"| {fmt(c['max_nonzero_gap_per_tensor'], '.4f')} | {fmt(c['l1_ratio_hf_over_mk'], '.4f')} "
                         f"| {fmt(c['l1_ratio_per_tensor_min'], '.3f')} | {fmt(c['l1_ratio_per_tensor_max'], '.3f')} |")
    return lines


def notes(rows: list[dict]) -> list[str]:
    out = []
    for row in rows:
        for side in ("mergekit", "hf_merge"):
            if not row[side]["ok"]:
                out.append(f"- {row['recipe']}: {side} failed: `{row[side].get('error')}`")
        cmp = row.get("compare") or {}
        if cmp.get("error"):
            out.append(f"- {row['recipe']}: comparison failed: `{cmp['error']}`")
        for what in ("missing_in_hf_merge", "missing_in_mergekit", "shape_mismatch", "dtype_mismatch"):
            if cmp.get(what):
                out.append(f"- {row['recipe']}: {what}: {', '.join(cmp[what][:5])}"
                           f"{' ...' if len(cmp[what]) > 5 else ''} ({len(cmp[what])})")
        if row["kind"] == "exact" and cmp.get("ok") and cmp["max_ulps"] > 0:
            w = cmp.get("worst_element") or {}
            out.append(f"- {row['recipe']}: worst tensor {cmp['worst_tensor']} {w.get('index')}: mergekit "
                       f"{fmt(w.get('mergekit'), '.6g')}, hf_merge {fmt(w.get('hf_merge'), '.6g')}, base "
                       f"{fmt(w.get('base'), '.6g')} ({cmp['max_ulps']:.4g} ulps of the mergekit value, "
                       f"{cmp['max_ulps_base_scale']:.3g} at base scale); mean |diff| {cmp['mean_abs_diff']:.2e} vs "
                       f"mean |merged - base| {fmt(cmp['mean_abs_delta_mergekit'], '.2e')}")
        stable = row.get("compare_stable_sort")
        if stable:
            if stable.get("ok"):
                later = (f" (checked after the run, hf_merge sources {stable.get('hf_merge_tree')} vs "
                         f"{row.get('hf_merge_tree')} in the timed run)" if stable.get("rerun") else "")
                out.append(f"  - against mergekit re-run with stable sorts{later} (torch.sort/argsort/topk made "
                           f"stable: equal magnitudes in index order): max {stable['max_ulps']:.4g} ulps, "
                           f"{stable['differing_fraction']:.3%} of elements differ"
                           + (" -> the whole difference is which of equal magnitudes a top-k cut keeps"
                              if stable["max_ulps"] == 0 else ""))
            else:
                out.append(f"  - mergekit with stable sorts: {stable.get('error')}")
        reference = row.get("compare_float64")
        if reference:
            if reference.get("ok"):
                hf, mk = reference["hf_merge"], reference["mergekit"]
                out.append(f"  - against mergekit run with `dtype: float64` (bf16 ulps at base scale): hf_merge max "
                           f"{hf['max_ulps_base_scale']:.3g}, mergekit's float32 run max "
                           f"{mk['max_ulps_base_scale']:.3g}; elements > 1 ulp of the float64 value: hf_merge "
                           f"{hf['over_1ulp_count']}, mergekit {mk['over_1ulp_count']}")
            else:
                out.append(f"  - mergekit with `dtype: float64`: {reference.get('error')}")
    return out


def changed_sources(report: dict) -> str:
    """A sentence when hf_merge's sources changed between recipes (others editing the tree during the run)."""
    trees = [row.get("hf_merge_tree") for row in report["rows"] if row.get("hf_merge_tree")]
    if len(set(trees)) <= 1:
        return ""
    return (f" hf_merge's sources changed during the run ({len(set(trees))} versions over {len(trees)} recipes: "
            f"`hf_merge_tree` of each row in the JSON).")


def write_report(report: dict, results: Path, name: str) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = [
        "# hf_merge vs mergekit: same recipe, tensor by tensor",
        "",
        f"Inputs: `{report['size']}` size, base + {report['inputs'] - 1} Llama-style fine-tunes, "
        f"{report['parameters_per_model'] / 1e6:.1f}M parameters each, bf16 sharded safetensors "
        f"(`bench_merge_io.generate`). Recipes: mergekit YAML with `dtype: float32`, `out_dtype: bfloat16`, the same "
        f"file for both tools (`{report['recipes_dir']}`).",
        "",
        f"mergekit {report['versions']['mergekit']['mergekit']} (torch {report['versions']['mergekit']['torch']}, "
        f"own venv), run as `mergekit-yaml RECIPE OUT {' '.join(report['mergekit_flags'])}`; hf_merge "
        f"{report['versions']['hf_merge']}, run as `{' '.join(report['hf_merge_command'])} merge RECIPE OUT`. "
        f"{report['machine']['cpus']} CPUs; wall = subprocess wall clock with the inputs in the page cache"
        + ("" if report.get("repeats", 1) == 1 else f", the fastest of {report['repeats']} interleaved runs") + "; "
        f"peak RSS from `{report['rss_source']}`. Started {report['started_utc']} UTC, finished "
        f"{report['finished_utc'] or '(not yet: still to run: ' + ', '.join(report['recipes_not_run_yet']) + ')'}"
        f"{' UTC' if report['finished_utc'] else ''}; load average at start "
        f"{', '.join(f'{x:.1f}' for x in report['machine']['load_average_at_start'])} (a shared machine: wall times "
        f"are indicative). mergekit's venv: `{'; '.join(report['mergekit_install'])}`."
        + changed_sources(report),
        "",
        "max ulps: largest |hf_merge - mergekit| over all tensors in units of the bf16 spacing at the mergekit value "
        "(both outputs read as float32); base scale: the same in units of the bf16 spacing at the larger of |mergekit "
        "value| and |base value| (a merged entry that cancels to nearly zero has a tiny spacing of its own, so float32 "
        "rounding shows there as many ulps); elements > 1 ulp: how many exceed 1 ulp of the mergekit value; "
        "differing: share of elements not bit-identical; mean abs diff over all elements. Verdicts: identical; "
        "<=1 ulp; <=1 ulp at base scale (float32 rounding order); ties in sort order (hf_merge matches mergekit "
        "exactly once mergekit's sorts are made stable); differs (sort ties not checked): a ranked recipe (ties, "
        "breadcrumbs, breadcrumbs_ties, sce) run without that check; <=1 ulp of mergekit in float64: more than 1 ulp "
        "from mergekit's float32 run, but within 1 ulp at base scale of the same recipe run by mergekit with `dtype: "
        "float64` (its own formula rounded once into bf16), so the difference is mergekit's float32 rounding; "
        "MISMATCH. dare_ties and della draw random masks (the tools' random streams differ): the second table shows "
        "the shares of non-zero entries of (merged - base) and the ratio of the L1 norms of (merged - base).",
        "",
        *table(report["rows"]),
        "",
        "## Notes",
        "",
        *(notes(report["rows"]) or ["- none"]),
        "",
        f"Task vectors of the generated fine-tunes: {json.dumps(report['task_vectors'])}",
        "",
    ]
    (results / f"{name}.md").write_text("\n".join(md))


# ------------------------------------------------------------------------------------------------------ main


def run_recipe(name: str, recipe: dict, folders: list[Path], workdir: Path, keep: bool, hf_cmd: list[str],
               stable_check: bool = True, warmup_only: bool = False, repeats: int = 1) -> dict:
    recipe_path = workdir / "recipes" / f"{name}.yml"
    write_recipe(recipe_path, recipe)
    out_root = workdir / "out" / name
    shutil.rmtree(out_root, ignore_errors=True)
    out_root.mkdir(parents=True)
    mk_out, hf_out = out_root / "mergekit", out_root / "hf_merge"
    kind = "stochastic" if name in STOCHASTIC else "exact"
    row = {"recipe": name, "method": recipe["merge_method"], "kind": kind, "recipe_file": str(recipe_path)}
    read_inputs(folders)
    if warmup_only:  # hf_merge's one-time costs (numba compiling kernels into its on-disk cache), untimed
        timed([*hf_cmd, "merge", str(recipe_path), str(hf_out)], out_root / "hf_merge.log")
        shutil.rmtree(out_root, ignore_errors=True)
        return row
    row["hf_merge_tree"] = hf_merge_tree()
    mk_runs, hf_runs = [], []
    for round_ in range(repeats):  # interleaved, so a slow spell of a shared machine hits both tools
        if round_:
            read_inputs(folders)
        mk_runs.append(run_mergekit(recipe_path, mk_out, out_root / "mergekit.log", stable_sorts=False))
        read_inputs(folders)
        shutil.rmtree(hf_out, ignore_errors=True)  # the previous round's output (hf-merge never overwrites)
        hf_runs.append(timed([*hf_cmd, "merge", str(recipe_path), str(hf_out)], out_root / "hf_merge.log"))
    row["mergekit"], row["hf_merge"] = fastest(mk_runs), fastest(hf_runs)
    if row["mergekit"]["ok"] and row["hf_merge"]["ok"]:
        try:
            base = folders[0]
            if kind == "stochastic":
                row["compare"] = compare_stochastic(mk_out, hf_out, base)
            else:
                row["compare"] = compare_exact(mk_out, hf_out, base, "base_model" in recipe)
        except Exception as error:  # noqa: BLE001 - reported, the run goes on
            row["compare"] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    cmp = row.get("compare") or {}
    has_base = "base_model" in recipe
    if name in RANKED and cmp.get("ok") and cmp["max_ulps"] > 0 and stable_check:
        row["compare_stable_sort"] = stable_sort_check(recipe_path, hf_out, out_root, folders, has_base)
    if kind == "exact" and cmp.get("ok") and cmp["max_ulps_base_scale"] > 1 and verdict(row) == "MISMATCH":
        row["compare_float64"] = float64_reference_check(name, recipe, workdir, hf_out, out_root, folders, has_base)
    if not keep:
        for folder in (mk_out, hf_out, out_root / STABLE_OUT, out_root / FLOAT64_OUT):
            shutil.rmtree(folder, ignore_errors=True)
    return row


def run_mergekit(recipe_path: Path, out: Path, log: Path, stable_sorts: bool) -> dict:
    """mergekit-yaml on ``recipe_path`` into ``out`` (emptied first), with its sorts made stable
    (:data:`STABLE_SORT_SHIM`) when ``stable_sorts``; timed as :func:`timed`."""
    shutil.rmtree(out, ignore_errors=True)
    if stable_sorts:
        shim = WORK / "vs_mergekit" / "mergekit_stable_sort.py"
        shim.write_text(STABLE_SORT_SHIM)
        command = [str(MERGEKIT_VENV / "bin" / "python"), str(shim)]
    else:
        command = [str(MERGEKIT_VENV / "bin" / "mergekit-yaml")]
    return timed([*command, str(recipe_path), str(out), *MERGEKIT_FLAGS], log)


def stable_sort_check(recipe_path: Path, hf_out: Path, out_root: Path, folders: list[Path], has_base: bool) -> dict:
    """Run mergekit once more with its sorts made stable, into ``out_root / STABLE_OUT``, and compare hf_merge's
    output with that: identical means the whole difference was which of equal magnitudes a top-k cut keeps."""
    stable_out = out_root / STABLE_OUT
    run = run_mergekit(recipe_path, stable_out, out_root / f"{STABLE_OUT}.log", stable_sorts=True)
    if not run["ok"]:
        return {"ok": False, "error": run.get("error")}
    stable = compare_exact(stable_out, hf_out, folders[0], has_base)
    return {k: stable[k] for k in ("ok", "max_ulps", "max_ulps_base_scale", "differing_fraction", "worst_tensor")}


def float64_reference_check(name: str, recipe: dict, workdir: Path, hf_out: Path, out_root: Path,
                            folders: list[Path], has_base: bool) -> dict:
    """Run the recipe once more through mergekit with ``dtype: float64`` (its own formula, rounded once into bf16;
    with stable sorts for a ranked recipe) and measure against it both hf_merge's output and mergekit's float32 one
    (the stable-sort run for a ranked recipe): tells mergekit's float32 rounding from a formula difference."""
    recipe_path = workdir / "recipes" / f"{name}_float64.yml"
    write_recipe(recipe_path, {**recipe, "dtype": "float64"})
    reference = out_root / FLOAT64_OUT
    run = run_mergekit(recipe_path, reference, out_root / f"{FLOAT64_OUT}.log", stable_sorts=name in RANKED)
    if not run["ok"]:
        return {"ok": False, "error": run.get("error")}
    result = {"ok": True}
    mergekit_float32 = out_root / (STABLE_OUT if name in RANKED else "mergekit")
    for side, out in (("hf_merge", hf_out), ("mergekit", mergekit_float32)):
        cmp = compare_exact(reference, out, folders[0], has_base)
        result[side] = {k: cmp[k] for k in ("max_ulps", "max_ulps_base_scale", "over_1ulp_count",
                                            "differing_fraction", "worst_tensor")}
        result["ok"] = result["ok"] and cmp["ok"]
    return result


def recheck_sort_ties(results: Path, name: str, hf_cmd: list[str]) -> None:
    """Add the stable-sort check to the ranked recipes of an earlier run's results (run without it, as the check
    costs one more mergekit run each): hf_merge runs again (untimed; its sources may have changed since: their hash
    is recorded), then mergekit with stable sorts, and the two are compared."""
    path = results / f"{name}.json"
    report = json.loads(path.read_text())
    folders = make_inputs(report["size"])
    for row in report["rows"]:
        cmp = row.get("compare") or {}
        if row["recipe"] not in RANKED or not cmp.get("ok") or cmp["max_ulps"] == 0 or row.get("compare_stable_sort"):
            continue
        print(f"  {row['recipe']}: hf_merge again, then mergekit with stable sorts ...", end=" ", flush=True)
        recipe_path = Path(row["recipe_file"])
        out_root = recipe_path.parent.parent / "out" / row["recipe"]
        out_root.mkdir(parents=True, exist_ok=True)
        hf_out = out_root / "hf_merge_recheck"
        shutil.rmtree(hf_out, ignore_errors=True)
        tree = hf_merge_tree()
        read_inputs(folders)
        hf = timed([*hf_cmd, "merge", str(recipe_path), str(hf_out)], out_root / "hf_merge_recheck.log")
        if hf["ok"]:
            import yaml

            has_base = "base_model" in yaml.safe_load(recipe_path.read_text())
            check = stable_sort_check(recipe_path, hf_out, out_root, folders, has_base)
        else:
            check = {"ok": False, "error": f"hf_merge failed: {hf.get('error')}"}
        check["hf_merge_tree"] = tree
        check["rerun"] = True
        row["compare_stable_sort"] = check
        for folder in (hf_out, out_root / STABLE_OUT):
            shutil.rmtree(folder, ignore_errors=True)
        write_report(report, results, name)
        print(f"max {check.get('max_ulps')} ulps" if check.get("ok") else check.get("error"), flush=True)
    print("\n".join(table(report["rows"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--recipes", default=None, help="comma-separated subset of the recipes (default: all)")
    parser.add_argument("--keep-outputs", action="store_true", help="keep both merged folders of each recipe")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip hf_merge's untimed run of each recipe on the tiny inputs before a larger size "
                             "(which "
                             "fills numba's on-disk kernel cache, should hf_merge's kernels have changed)")
    parser.add_argument("--no-stable-sort-check", action="store_true",
                        help="skip re-running mergekit with stable sorts where a ranked recipe (ties, breadcrumbs, "
                             "breadcrumbs_ties, sce) differs")
    parser.add_argument("--recheck-sort-ties", action="store_true",
                        help="only add the stable-sort check to the ranked recipes of an existing results file")
    parser.add_argument("--repeats", type=int, default=1,
                        help="interleaved runs of each tool per recipe; the fastest of each counts (default 1)")
    parser.add_argument("--name", default="vs_mergekit", help="results file stem")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where the .json and .md go")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")

    versions = ensure_mergekit()
    hf_cmd = hf_merge_command()
    if args.recheck_sort_ties:
        recheck_sort_ties(args.results_dir, args.name, hf_cmd)
        return
    print(f"mergekit {versions['mergekit']} (torch {versions['torch']}) in {MERGEKIT_VENV}; hf_merge: "
          f"{' '.join(hf_cmd)}", flush=True)
    print(f"Generating base + {SIZES[args.size]['tasks']} fine-tunes ({args.size}, "
          f"{n_parameters(args.size) / 1e6:.1f}M parameters each) ...", flush=True)
    folders = make_inputs(args.size)
    workdir = WORK / "vs_mergekit" / args.size
    all_recipes = recipes(folders[0], folders[1:])
    names = args.recipes.split(",") if args.recipes else list(all_recipes)
    unknown = sorted(set(names) - set(all_recipes))
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; known: {', '.join(all_recipes)}")

    if args.size != "tiny" and not args.no_warmup:  # one-time costs (numba's on-disk kernel cache) off the clock
        print("Warm-up: hf_merge runs each recipe once on the tiny inputs (untimed: numba's kernel cache) ...",
              flush=True)
        tiny = make_inputs("tiny")
        tiny_recipes = recipes(tiny[0], tiny[1:])
        for name in names:
            run_recipe(name, tiny_recipes[name], tiny, WORK / "vs_mergekit" / "warmup", False, hf_cmd, False, True)

    import torch

    report = {
        "size": args.size,
        "parameters_per_model": n_parameters(args.size),
        "inputs": len(folders),
        "shapes": SIZES[args.size],
        "dtype": "bfloat16 inputs and outputs, float32 compute (recipe dtype)",
        "task_vectors": task_vector_stats(folders),
        "versions": {"mergekit": versions, "hf_merge": hf_merge_version(), "python": platform.python_version()},
        "mergekit_install": [f"python -m venv {MERGEKIT_VENV.relative_to(REPO)}",
                             f"pip install torch=={TORCH_VERSION}",
                             f"pip install -c <(echo torch=={TORCH_VERSION}) mergekit=={versions['mergekit']}"],
        "mergekit_flags": MERGEKIT_FLAGS,
        "hf_merge_command": hf_cmd,
        "rss_source": "/usr/bin/time -v" if Path("/usr/bin/time").is_file() else "getrusage(RUSAGE_CHILDREN)",
        "recipes_dir": str((workdir / "recipes").relative_to(REPO)),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "load_average_at_start": list(os.getloadavg())},
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "finished_utc": None,
        "recipes_not_run_yet": list(names),
        "stable_sort_check": not args.no_stable_sort_check,
        "repeats": args.repeats,
        "rows": [],
    }
    for name in names:
        print(f"  {name} ...", end=" ", flush=True)
        row = run_recipe(name, all_recipes[name], folders, workdir, args.keep_outputs, hf_cmd,
                         not args.no_stable_sort_check, repeats=args.repeats)
        report["rows"].append(row)
        report["recipes_not_run_yet"].remove(name)
        write_report(report, args.results_dir, args.name)  # after every recipe: a cut-short run still reports
        cmp = row.get("compare") or {}
        detail = (f"max {cmp['max_ulps']:.4g} ulps ({cmp['max_ulps_base_scale']:.3g} at base scale)"
                  if cmp.get("ok") and row["kind"] == "exact" else
                  cmp.get("error") or row["mergekit"].get("error") or row["hf_merge"].get("error") or "")
        print(f"{verdict(row)}  (mergekit {row['mergekit']['wall_s']} s, hf_merge {row['hf_merge']['wall_s']} s) "
              f"{detail}", flush=True)

    report["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    report["versions"]["hf_merge"] = hf_merge_version()
    print()
    print("\n".join(table(report["rows"])))
    extra = notes(report["rows"])
    if extra:
        print("\n" + "\n".join(extra))
    write_report(report, args.results_dir, args.name)
    print(f"\nwrote {args.results_dir / (args.name + '.json')} and .md")


if __name__ == "__main__":
    main()
