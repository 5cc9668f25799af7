#!/usr/bin/env bash
# GPU check of hf_merge (issue #21, deliverable 3): one script, under 8 minutes on one modern GPU.
#
#   bash benchmarks/gpu_check.sh            # PYTHON=... to choose the interpreter (default .venv/bin/python, python3)
#
# 1. installs what it needs (only when hf_merge, threadpoolctl, pytest or yaml do not import; torch is never replaced);
# 2. runs the tests marked `cuda` (pytest -m cuda: tests/test_cuda.py, tests/test_placement.py, ...);
# 3. runs benchmarks/bench_subspace.py on BERT-base (12 layers) and on a Llama-7B-shaped layer stack (1 layer:
#    q/k/v/o 4096², gate/up/down 11008×4096), hf_merge on the GPU against the full-SVD reference on the same GPU;
# 4. runs benchmarks/bench_merge_io.py (--quick, Task Arithmetic and TIES) with device="cuda";
# 5. runs a 2-process NCCL merge when 2 GPUs are present (benchmarks/bench_distributed.py --size tiny --device cuda:
#    1 process against 2, outputs compared byte for byte);
# 6. writes benchmarks/results/gpu/summary.json and summary.md (logs under benchmarks/results/gpu/logs/).
#
# Every step has a time cap inside a total budget (GPU_CHECK_BUDGET_S, default 450 s), so the script ends in time
# whatever a step does; a step cut short is reported as timed out, with what it measured before. Without a CUDA
# device every GPU step is skipped and the summary says so: no GPU number is ever made up.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="$ROOT/benchmarks/results/gpu"
LOGS="$OUT/logs"
mkdir -p "$LOGS"
rm -f "$OUT"/*.json "$OUT"/*.xml "$LOGS"/*.log
STEPS="$OUT/steps.tsv"
: > "$STEPS"
BUDGET=${GPU_CHECK_BUDGET_S:-450}
START=$(date +%s)
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi

# record NAME STATUS SECONDS DETAIL: one line of the steps table (tabs and newlines in DETAIL become spaces)
record() {
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(printf '%s' "$4" | tr '\t\n' '  ' | cut -c1-400)" >> "$STEPS"
  printf '[gpu_check] %-16s %-14s %4ss  %s\n' "$1" "$2" "$3" "$(printf '%s' "$4" | tr '\t\n' '  ' | cut -c1-160)"
}

# run_step NAME CAP_S COMMAND...: run with a time cap (never past the budget), log to logs/NAME.log, record the outcome
run_step() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START) - 15))
  if [ "$left" -lt 20 ]; then
    record "$name" "skipped" 0 "not started: the ${BUDGET} s budget is spent"
    return 1
  fi
  local limit=$((cap < left ? cap : left))
  local t0 rc took
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  took=$(($(date +%s) - t0))
  if [ $rc -eq 0 ]; then
    record "$name" "ok" "$took" "$(tail -n 1 "$LOGS/$name.log")"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    record "$name" "timed out" "$took" "cut at its ${limit} s cap; what it wrote before is kept (logs/$name.log)"
  else
    record "$name" "failed" "$took" "exit $rc: $(tail -n 1 "$LOGS/$name.log")"
  fi
  return $rc
}

# 1. install --------------------------------------------------------------------------------------------------------
if ! "$PY" -c "import torch" > /dev/null 2>&1; then
  record install "failed" 0 "$PY has no torch: install a CUDA build of torch first (this script never replaces torch)"
elif "$PY" -c "import hf_merge, threadpoolctl, pytest, yaml" > /dev/null 2>&1; then
  record install "ok" 0 "already installed ($PY)"
else
  run_step install 180 "$PY" -m pip install -q -e ".[dev]"
fi

NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2> /dev/null || echo 0)
SMI_GPUS=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true)
NO_GPU="no CUDA device: $("$PY" -c "import torch; print(f'torch {torch.__version__} (CUDA build: {torch.version.cuda is not None}) sees none')" 2> /dev/null || echo 'torch does not import')"
if [ "${SMI_GPUS:-0}" -gt 0 ] && [ "$NGPU" -eq 0 ]; then
  NO_GPU="$NO_GPU, although nvidia-smi lists $SMI_GPUS GPU(s): use a CUDA build of torch (PYTHON=...)"
fi
NO_GPU="$NO_GPU - no GPU number measured"

# 2. the cuda tests -------------------------------------------------------------------------------------------------
run_step cuda_tests 150 "$PY" -m pytest -m cuda tests -q -rs -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml"

# 3.-4. the GPU benchmarks ------------------------------------------------------------------------------------------
if [ "$NGPU" -ge 1 ]; then
  run_step subspace_bert 150 "$PY" benchmarks/bench_subspace.py --device cuda --shape bert --layers 12 --no-truth \
    --no-memory --out "$OUT/subspace_bert.json"
  run_step subspace_llama 180 "$PY" benchmarks/bench_subspace.py --device cuda --shape llama --layers 1 --no-truth \
    --no-memory --methods tsv_m iso_c iso_cts tsv_c --out "$OUT/subspace_llama7b.json"
  run_step merge_io_cuda 150 "$PY" benchmarks/bench_merge_io.py --quick --device cuda --methods ta ties --repeats 1 \
    --cache warm --workdir "$ROOT/benchmarks/.work/merge_io_gpu" --name gpu/merge_io_cuda.json
else
  for name in subspace_bert subspace_llama merge_io_cuda; do record "$name" "skipped" 0 "$NO_GPU"; done
fi

# 5. the 2-process NCCL merge ---------------------------------------------------------------------------------------
if [ "$NGPU" -lt 2 ]; then
  record nccl_merge "skipped" 0 "needs 2 GPUs, found $NGPU"
else
  # 1 process against 2 (one GPU each, NCCL next to gloo), tiny Llama-style set; the output compared byte for byte
  run_step nccl_merge 150 "$PY" benchmarks/bench_distributed.py --size tiny --device cuda --repeats 1
fi

# 6. the summary ----------------------------------------------------------------------------------------------------
"$PY" - "$OUT" "$NGPU" "$(($(date +%s) - START))" "$PY" << 'PYEOF'
import json
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, ngpu, wall, python = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, seconds, detail = (line.split("\t") + [""] * 4)[:4]
    steps.append({"step": name, "status": status, "seconds": int(seconds or 0), "detail": detail})


def git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


env = {"python": python, "python_version": platform.python_version(), "platform": platform.platform(),
       "commit": git("rev-parse", "HEAD"), "uncommitted_changes": bool(git("status", "--porcelain")), "gpus": ngpu}
try:
    import torch

    env |= {"torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu_names": [torch.cuda.get_device_name(i) for i in range(ngpu)]}
except Exception as error:  # noqa: BLE001  (the summary is written whatever failed)
    env["torch"] = f"does not import: {error}"

tests = None
junit = out / "cuda_tests.xml"
if junit.is_file():
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    reasons = sorted({s.get("message", "") for s in suite.iter("skipped")})
    tests = counts | {"skip_reasons": reasons}
    for step in steps:
        if step["step"] == "cuda_tests" and counts["tests"] and counts["skipped"] == counts["tests"]:
            step["status"] = "skipped"
            step["detail"] = f"all {counts['tests']} cuda tests skipped: " + "; ".join(reasons)

benches = {}
for name, file in (("subspace_bert", "subspace_bert.json"), ("subspace_llama", "subspace_llama7b.json"),
                   ("merge_io_cuda", "merge_io_cuda.json")):
    if (out / file).is_file():
        benches[name] = json.loads((out / file).read_text())

summary = {"gpu_parts_run": ngpu > 0, "wall_s": wall, "environment": env, "steps": steps, "cuda_tests": tests,
           "benchmarks": benches}
if ngpu == 0:
    summary["note"] = "No CUDA device: every GPU step was skipped and no GPU number was measured."
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

md = ["# GPU check (benchmarks/gpu_check.sh)", ""]
if ngpu == 0:
    md += ["**No CUDA device on this machine: every GPU step was skipped; no GPU number was measured.**", ""]
md += [f"{env.get('gpu_names') or 'no GPU'}; torch {env.get('torch')} (CUDA {env.get('cuda')}); commit "
       f"{(env.get('commit') or '?')[:12]}{' + uncommitted changes' if env.get('uncommitted_changes') else ''}; "
       f"{wall} s in all.", "", "| step | status | s | detail |", "|---|---|---:|---|"]
md += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['detail'].replace('|', '/')} |" for s in steps]
if tests:
    md += ["", f"cuda tests: {tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
               f"{tests['skipped']} skipped."]
for name in ("subspace_bert", "subspace_llama"):
    if name in benches:
        bench = benches[name]
        setup = bench["setup"]
        md += ["", f"## {name}: {setup['shape']}-shaped, {setup['layers']} layer(s), T = {setup['tasks']}, on "
                   f"{setup.get('gpu', setup['device'])} (hf_merge vs full SVDs on the same GPU)", "",
               "| method | reference s | hf_merge s | ratio |", "|---|---:|---:|---:|"]
        md += [f"| {m} | {r['reference_s']:.2f} | {r['fast_s']:.2f} | {r['speedup']:.2f}x |"
               for m, r in bench["methods"].items()]
if "merge_io_cuda" in benches:
    md += ["", "## bench_merge_io.py --quick, device cuda (warm page cache)", "",
           "| run | inputs | wall s | × floor | × TA | peak RSS GB |", "|---|---:|---:|---:|---:|---:|"]
    md += [f"| {r['run']} | {r['inputs']} | {r['wall_s']} | {r['wall_over_floor']} | {r['wall_over_task_arithmetic']} | "
           f"{r['peak_rss_gb']} |" for r in benches["merge_io_cuda"]["rows"]]
(out / "summary.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
print(f"\nwrote {out / 'summary.json'} and {out / 'summary.md'}")
PYEOF
