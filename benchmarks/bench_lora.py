"""LoRA merging: low-rank TSV-M vs densify-then-TSV-M vs PEFT's ``add_weighted_adapter(combination_type="svd")``.

Generates a Llama-style base (random init from a config) and T LoRA adapters of rank r on every linear layer
(q, k, v, o, gate, up, down), saved as PEFT adapter folders. Then, each in a fresh subprocess:

- ``lowrank``: ``hf_merge.merge(base, adapters, "tsv_m", output="lora")`` — factors only, no d × d matrix;
- ``dense``: ``hf_merge.merge(base, adapters, "tsv_m")`` — every ΔW densified, TSV-M on the dense matrices;
- ``peft_svd``: PEFT's ``add_weighted_adapter`` with ``combination_type="svd"`` (Task Arithmetic + truncated SVD,
  a different method: timed for reference, its error measured against exact Task Arithmetic).

TSV-M keeps k = r per task (``rank_fraction = r / hidden``) so the dense method is well defined. Reports wall time,
peak RSS (VmHWM) and the maximum relative Frobenius error per matrix of the low-rank result against the dense one.
Target: low-rank ≥ 10× faster than the dense path at ≤ 1e-5 error. Results: ``benchmarks/results/lora.json``.

    python benchmarks/bench_lora.py           # hidden 512, 4 layers (minutes on 2 cores)
    python benchmarks/bench_lora.py --full    # ~0.5B parameters (hidden 1024, 24 layers)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_merge_io import peak_rss_bytes  # same folder: run as a script

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def generate(workdir: Path, args: argparse.Namespace) -> None:
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    signature = {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "vocab", "tasks", "rank")}
    stamp = workdir / "generated.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == signature:
        return
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                         vocab_size=args.vocab, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.save_pretrained(workdir / "base")
    modules = [(name, m) for name, m in base.named_modules() if name.rsplit(".", 1)[-1] in TARGETS]
    for t in range(args.tasks):
        generator = torch.Generator().manual_seed(100 + t)
        tensors = {}
        for name, module in modules:
            out_f, in_f = module.weight.shape
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(args.rank, in_f, generator=generator) / in_f**0.5
            # Decaying spectrum, like trained adapters: B's columns scaled 1/(i+1).
            decay = 1.0 / torch.arange(1, args.rank + 1, dtype=torch.float32)
            tensors[f"base_model.model.{name}.lora_B.weight"] = (
                torch.randn(out_f, args.rank, generator=generator) * decay * 0.01
            )
        folder = workdir / f"adapter{t}"
        folder.mkdir()
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": args.rank, "lora_alpha": args.rank, "target_modules": TARGETS,
            "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(workdir / "base"),
        }))
    stamp.write_text(json.dumps(signature))


def measure(kind: str, workdir: Path, args: argparse.Namespace) -> dict:
    import hf_merge

    adapters = [workdir / f"adapter{t}" for t in range(args.tasks)]
    config = hf_merge.TSVMergeConfig(rank_fraction=args.rank / args.hidden)
    start = time.perf_counter()
    if kind == "lowrank":
        merged = hf_merge.merge(workdir / "base", adapters, config, output="lora", progress=False)
        wall = time.perf_counter() - start
        updates = {}
        for key, tensor in merged.tensors.items():
            if key.endswith("lora_B.weight"):
                module = key.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
                a = merged.tensors[key.replace("lora_B", "lora_A")]
                updates[module + ".weight"] = (tensor @ a)
        torch.save(updates, workdir / "lowrank_updates.pt")
    elif kind == "dense":
        merged = hf_merge.merge(workdir / "base", adapters, config, progress=False)
        wall = time.perf_counter() - start
        base = hf_merge.io.open_source(workdir / "base")
        state = merged.state_dict()
        lowrank = torch.load(workdir / "lowrank_updates.pt")
        errors = [float((lowrank[k] - (state[k] - base.get(k))).norm() / (state[k] - base.get(k)).norm())
                  for k in lowrank]
        return {"wall_s": wall, "peak_rss_bytes": peak_rss_bytes(), "max_rel_error_vs_lowrank": max(errors),
                "matrices": len(errors)}
    else:
        from peft import PeftModel
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(workdir / "base")
        peft_model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="a0")
        for t, folder in enumerate(adapters[1:], start=1):
            peft_model.load_adapter(str(folder), adapter_name=f"a{t}")
        names = [f"a{t}" for t in range(args.tasks)]
        start = time.perf_counter()
        peft_model.add_weighted_adapter(names, [1.0] * len(names), "merged", combination_type="svd",
                                        svd_rank=args.rank * args.tasks)
        wall = time.perf_counter() - start
        errors = []
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_A") and "merged" in module.lora_A:
                got = module.get_delta_weight("merged")
                exact = sum(module.get_delta_weight(n) for n in names)
                errors.append(float((got - exact).norm() / exact.norm()))
        return {"wall_s": wall, "peak_rss_bytes": peak_rss_bytes(), "max_rel_error_vs_exact_ta": max(errors)}
    return {"wall_s": wall, "peak_rss_bytes": peak_rss_bytes()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--full", action="store_true", help="~0.5B parameters: hidden 1024, 24 layers")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".work" / "lora")
    parser.add_argument("--measure", choices=["lowrank", "dense", "peft_svd"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.full:
        args.hidden, args.intermediate, args.layers, args.vocab = 1024, 4096, 24, 32000
    if args.measure:
        print(json.dumps(measure(args.measure, args.workdir, args)))
        return
    print(f"Generating a Llama-style base (hidden {args.hidden}, {args.layers} layers) and {args.tasks} "
          f"rank-{args.rank} adapters ...", flush=True)
    generate(args.workdir, args)
    runs = {}
    for kind in ("lowrank", "dense", "peft_svd"):
        cmd = [sys.executable, __file__, "--measure", kind, "--workdir", str(args.workdir)]
        cmd += [f"--{k}={getattr(args, k)}" for k in ("hidden", "intermediate", "layers", "vocab", "tasks", "rank")]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        runs[kind] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {kind}: {runs[kind]['wall_s']:.2f} s", flush=True)
    lowrank = runs["lowrank"]["wall_s"]
    rows = [
        {"run": "hf_merge low-rank TSV-M (output='lora')", **runs["lowrank"], "speedup_of_lowrank": 1.0},
        {"run": "hf_merge densify-then-TSV-M", **runs["dense"], "speedup_of_lowrank": runs["dense"]["wall_s"] / lowrank},
        {"run": "PEFT add_weighted_adapter(svd) (TA+SVD)", **runs["peft_svd"],
         "speedup_of_lowrank": runs["peft_svd"]["wall_s"] / lowrank},
    ]
    print(f"\n{'run':<44}{'wall s':>9}{'÷ low-rank':>12}{'peak RSS GB':>13}  error")
    for row in rows:
        error = row.get("max_rel_error_vs_lowrank", row.get("max_rel_error_vs_exact_ta", 0.0))
        print(f"{row['run']:<44}{row['wall_s']:>9.2f}{row['speedup_of_lowrank']:>12.1f}"
              f"{row['peak_rss_bytes'] / 2**30:>13.2f}  {error:.2e}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {
        "model": {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "vocab")},
        "adapters": args.tasks, "lora_rank": args.rank, "targets": TARGETS,
        "tsv_rank_per_task": args.rank,
        "rows": rows,
        "targets_stated": {"speedup_vs_dense": 10, "max_rel_error": 1e-5},
    }
    name = "lora_full.json" if args.full else "lora.json"
    (RESULTS / name).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {RESULTS / name}")


if __name__ == "__main__":
    main()
