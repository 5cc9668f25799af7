"""Vocabularies of a merge: which tokenizer the output gets, and every input's embedding rows in its vocabulary.

mergekit's ``tokenizer_source`` (``merge(..., tokenizer_source=...)``, the hf_merge YAML, mergekit recipes):

- ``None`` (not given): the base's vocabulary. Inputs whose embeddings have the base's number of rows are merged row by
  row as they are (token ids are assumed to mean the same tokens, as mergekit does without the key); an input with
  another number of rows is matched to the base's tokens by token, as with ``"base"``.
- ``"base"``: the base's tokenizer and vocabulary; every input's rows are matched to it by token (tokenizers loaded
  from each input's folder). Tokens an input has but the base lacks are dropped, with a warning naming them.
- ``"union"``: the base's tokenizer with every token of every input added (mergekit's ``build_union_tokenizer``:
  regular tokens the base lacks first, then added tokens with their settings, special or not).
- an input (a task name, a model reference as given, or ``"base"``): that input's tokenizer and vocabulary.

Every input's input embedding, untied output embedding (and its bias) is permuted into the output vocabulary by a
:class:`PermutedSource` wrapped around the input's source: the merge engine and every method see inputs of equal
shapes, every other tensor passes through untouched, and the embeddings are read one tensor at a time as everything
else. A token an input lacks gets a row as mergekit's ``PermutedEmbeddings`` gives it: the only owner's row if one
input has the token; else the base's row if the base has it; else the mean of the owners' rows (no owner: zero). Rows
every input has are merged by the method; so a token only model A has comes out as A's row (every other input,
the base included, holds A's row there: A's task vector is zero for it), a token the base has keeps the base's row
in the models that lack it (their task vector is zero there).

Embedding rows beyond the tokenizer's length (padding, e.g. a vocabulary padded to a multiple of 64) count as a
token of each input that has that padding row. The output has the base's number of rows for ``"base"`` (a named
input's for a named source); a union is padded to the base's padding (the largest power of two up to 128 dividing
the base's row count, when the base's rows exceed its tokenizer's length) and never has fewer rows than the base;
``pad_to_multiple_of`` (mergekit's ``tokenizer.pad_to_multiple_of``) pads the output tokenizer's length to a
multiple instead. Padding rows no input has get each input's mean row (as mergekit does).

``tokenizer.tokens`` (mergekit's per-token overrides, :func:`token_overrides`): ``{token: {source, force}}`` with
``source`` an input (its row of that token), ``{kind: zero}`` (a zero row) or ``{kind: model_token, model, token |
token_id}`` (that input's row of another token, or its row ``token_id``). As in mergekit's ``PermutedEmbeddings``,
the override replaces the default fill above for the inputs that lack the token (so a token every input has is still
merged by the method); with ``force: true`` every input holds that row, so the output has it. A token the output
vocabulary lacks is added to the output tokenizer (as mergekit adds every overridden token).

``chat_template``: ``None`` keeps the tokenizer source's template; a Jinja template string; ``"auto"`` (the template
most inputs have, as mergekit's); one of mergekit's template names shipped in ``hf_merge/chat_templates``
(``alpaca``, ``chatml``, ``exaone``, ``llama3``, ``mistral``); or an input, whose template is taken. A name that is both
a template's and an input's is refused as ambiguous (give the input by its path, or the template's text).

``tokenizer``: tokenizers of inputs held in memory (a ``PreTrainedTokenizerBase`` or a folder path): one for the base,
or ``{input: tokenizer}``. Without it an in-memory model's tokenizer is read from its ``name_or_path`` when that is a
local folder holding tokenizer files. A folder output of an in-memory base gets that tokenizer too. A mapping whose keys
are among ``source``, ``tokens`` and ``pad_to_multiple_of`` is mergekit's ``tokenizer:`` setting instead (``source``:
``tokenizer_source``, ``"union"`` when neither is given, as in mergekit).

Departures from mergekit: a tokenizer that cannot be found is an error where mergekit assumes the base's (for
``"union"``, for a named source, and for an input whose number of rows differs from the base's); padding rows of the
inputs are kept as described above (mergekit replaces every row beyond the tokenizer's length by the mean); a token
``tokenizer.tokens`` adds to the ``"base"`` vocabulary is one the base lacks (mergekit 0.1.5 adds it to the base's own
tokenizer object, so the base seems to hold it at its padding row of that id, or fails without padding rows).

One concern in one file (~1000 lines): reading tokenizers, building the union, permuting rows as a source and
writing the tokenizer are one plan that must agree on every index.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import importlib.resources
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import MergeError, warn
from .io.sources import ModelSource, TensorMeta, TensorSource

#: Files that make a folder's tokenizer loadable (``tokenizer_config.json`` alone does not).
TOKENIZER_MODEL_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                         "sentencepiece.bpe.model")
#: Every file of a saved tokenizer: removed from an output folder before another tokenizer is written there.
TOKENIZER_FILES = (*TOKENIZER_MODEL_FILES, "merges.txt", "added_tokens.json", "special_tokens_map.json",
                   "tokenizer_config.json", "chat_template.jinja", "chat_template.json")
#: ``tokenizer_source`` values besides input names.
SOURCES = ("base", "union")
#: The :class:`~hf_merge.options.MergeOptions` fields about vocabularies.
VOCABULARY_OPTIONS = ("tokenizer_source", "tokenizer", "chat_template", "pad_to_multiple_of")
#: The keys of mergekit's ``tokenizer:`` setting, and of one ``tokenizer.tokens`` entry.
TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
TOKEN_KEYS = ("source", "force")
#: The largest padding multiple inferred from the base's embedding rows.
_MAX_INFERRED_MULTIPLE = 128
_PREVIEW = 8


# ------------------------------------------------------------------------------------------------ the plan
@dataclasses.dataclass
class VocabularyPlan:
    """What a merge does about vocabularies: the output's tokenizer and embedding rows, and the permutation.

    Attributes:
        source: ``"base"``, ``"union"`` or the name of the input whose vocabulary the output has.
        tokenizer: the output tokenizer to save (``None``: the layout input's tokenizer files are copied as they are).
        tokenizer_folder: a folder whose tokenizer files the output copies (an in-memory base's ``name_or_path``).
        rows: the output's embedding rows where they differ from the layout input's (``None``: unchanged).
        permutation: the embedding permutation shared by the wrapped sources (``None``: inputs untouched).
    """

    source: str
    tokenizer: Any = None
    tokenizer_folder: Path | None = None
    rows: int | None = None
    permutation: RowPermutation | None = None
    #: the layout input's embedding rows
    layout_rows: int | None = None

    @property
    def writes_tokenizer(self) -> bool:
        return self.tokenizer is not None or self.tokenizer_folder is not None

    def write(self, destination: Path) -> None:
        """Write the output's tokenizer into ``destination`` (replacing the tokenizer files copied there) and set
        ``config.json``'s vocabulary size to :attr:`rows`."""
        if self.writes_tokenizer:
            for name in TOKENIZER_FILES:
                (destination / name).unlink(missing_ok=True)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(destination)
            else:
                for item in self.tokenizer_folder.iterdir():
                    if item.is_file() and item.name in TOKENIZER_FILES:
                        shutil.copy2(item, destination / item.name)
        if self.rows is not None:
            set_config_vocab_size(destination / "config.json", self.rows, self.layout_rows)


def set_config_vocab_size(config_file: Path, rows: int, old_rows: int | None = None) -> None:
    """Set ``vocab_size`` in a saved ``config.json`` (top level, and a nested ``text_config``'s when it had the
    old size)."""
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        return
    if "vocab_size" in config or not isinstance(config.get("text_config"), dict):
        config["vocab_size"] = rows
    text = config.get("text_config")
    if isinstance(text, dict) and "vocab_size" in text and (old_rows is None or text["vocab_size"] == old_rows
                                                            or "vocab_size" not in config):
        text["vocab_size"] = rows
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------ tokenizer.tokens
@dataclasses.dataclass(frozen=True)
class TokenOverride:
    """One ``tokenizer.tokens`` entry: the token's row is input ``model``'s row of ``token`` (or its row ``row``), or
    zero (``model`` ``None``); ``force``: every input holds it, else only the inputs that lack the token. ``where``:
    the key it was given by, for errors."""

    where: str
    model: str | None = None
    token: str | None = None
    row: int | None = None
    force: bool = False

    def as_config(self) -> dict[str, Any]:
        """The entry in mergekit's schema."""
        if self.model is None:
            source: Any = {"kind": "zero"}
        elif self.row is not None:
            source = {"kind": "model_token", "model": self.model, "token_id": self.row}
        else:
            source = {"kind": "model_token", "model": self.model, "token": self.token}
        return {"source": source, "force": self.force}


def token_overrides(tokens: Any, resolve: Callable[[Any], str | None], models: Sequence[str]
                    ) -> dict[str, TokenOverride]:
    """``tokenizer.tokens`` in mergekit's schema, checked: ``{token: TokenOverride}``, each model reference made an
    input name by ``resolve`` (``None``: no input of the merge; ``models`` name them in the error)."""
    if tokens is None:
        return {}
    if not isinstance(tokens, Mapping):
        raise ValueError(f"tokenizer.tokens must be a mapping {{token: {{source, force}}}}, got {tokens!r}.")
    overrides = {}
    for token, entry in tokens.items():
        where = f"tokenizer.tokens[{token!r}]"
        if not isinstance(token, str) or not token:
            raise ValueError(f"{where}: a token must be a non-empty string.")
        _check_keys(entry, TOKEN_KEYS, where)
        force = entry.get("force", False)
        if not isinstance(force, bool):
            raise ValueError(f"{where}.force must be true or false, got {force!r}.")
        source = entry.get("source")
        if source is None:
            raise ValueError(f"{where}.source is required: a model, {{kind: zero}} or {{kind: model_token, model, "
                             "token | token_id}.")
        if not isinstance(source, Mapping):
            model = _token_model(source, f"{where}.source", resolve, models)
            overrides[token] = TokenOverride(f"{where}.source", model, token, force=force)
            continue
        kind = source.get("kind")
        if kind == "zero":
            _check_keys(source, ("kind",), f"{where}.source")
            overrides[token] = TokenOverride(f"{where}.source", force=force)
            continue
        if kind != "model_token":
            raise ValueError(f"{where}.source.kind must be 'zero' or 'model_token', got {kind!r}.")
        _check_keys(source, ("kind", "model", "token", "token_id"), f"{where}.source")
        model = _token_model(source.get("model"), f"{where}.source.model", resolve, models)
        other, row = source.get("token"), source.get("token_id")
        if (other is None) == (row is None):
            raise ValueError(f"{where}.source: give one of token and token_id.")
        if other is not None and (not isinstance(other, str) or not other):
            raise ValueError(f"{where}.source.token must be a token (a string), got {other!r}.")
        if row is not None and (isinstance(row, bool) or not isinstance(row, int) or row < 0):
            raise ValueError(f"{where}.source.token_id must be a row number (an integer >= 0), got {row!r}.")
        key = f"{where}.source.{'token' if row is None else 'token_id'}"
        overrides[token] = TokenOverride(key, model, other, row, force)
    return overrides


def _check_keys(entry: Any, keys: Sequence[str], where: str) -> None:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} must be a mapping with keys {list(keys)}, got {entry!r}.")
    unknown = sorted(str(key) for key in entry if key not in keys)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; its keys are {list(keys)}.")


def _token_model(value: Any, where: str, resolve: Callable[[Any], str | None], models: Sequence[str]) -> str:
    name = resolve(value) if isinstance(value, (str, os.PathLike)) else None
    if name is None:
        raise ValueError(f"{where} {value!r} names no model of this merge; its models are {list(models)}.")
    return name


def _tokenizer_setting(option: Any, names: Sequence[str]) -> Mapping[str, Any] | None:
    """``tokenizer=`` as mergekit's ``tokenizer:`` setting (a mapping of :data:`TOKENIZER_KEYS`), or ``None`` when it
    gives the inputs' tokenizers."""
    if not isinstance(option, Mapping) or not option or not set(option) <= set(TOKENIZER_KEYS):
        return None
    if set(option) <= set(names):
        raise ValueError(f"tokenizer= {sorted(option)} reads both as mergekit's tokenizer setting and as the "
                         "tokenizers of the inputs named so: rename those inputs.")
    return option


def _resolve_overrides(overrides: Mapping[str, TokenOverride], inputs: Mapping[str, _Input],
                       vocabs: Mapping[str, Mapping[str, int]]) -> dict[str, tuple[int, int, bool]]:
    """``{token: (input position or -1 for zero, row in that input, force)}``: a token or row the input lacks
    raises."""
    positions = {name: m for m, name in enumerate(inputs)}
    resolved = {}
    for token, override in overrides.items():
        if override.model is None:
            resolved[token] = (-1, -1, override.force)
            continue
        item = inputs[override.model]
        if override.row is not None:
            if item.rows is not None and override.row >= item.rows:
                raise ValueError(f"{override.where} {override.row}: {item.label} has {item.rows} embedding rows.")
            row = override.row
        else:
            row = vocabs[override.model].get(override.token, -1)
            if row < 0:
                raise ValueError(f"{override.where}: {item.label} has no token {override.token!r} (with an embedding "
                                 f"row) to take the row of {token!r} from.")
        resolved[token] = (positions[override.model], row, override.force)
    return resolved


def vocabulary_of(source: TensorSource | None) -> VocabularyPlan | None:
    """The :class:`VocabularyPlan` attached to a (base) source by :func:`reconcile_vocabularies`, if any."""
    return getattr(source, "vocabulary", None)


# ------------------------------------------------------------------------------------------------ the permutation
class RowPermutation:
    """Every input's embedding rows in the output vocabulary, computed per tensor for all inputs at once (a missing
    row may come from another input) and handed out once per input.

    ``index[m][j]``: the row of input ``m`` holding output row ``j``, or -1 where the input lacks it. ``overrides``
    (``tokenizer.tokens``): ``{j: (input position or -1 for zero, row of that input, force)}``.
    """

    def __init__(self, names: Sequence[str], sources: Sequence[TensorSource], index: Sequence[torch.Tensor],
                 base: int | None, rows: int, vocab_length: int, keys: Sequence[str],
                 overrides: Mapping[int, tuple[int, int, bool]] | None = None) -> None:
        self.names, self.sources, self.rows, self.keys = list(names), list(sources), rows, frozenset(keys)
        self.index = [ix.long() for ix in index]
        owners = torch.stack([ix >= 0 for ix in self.index])  # (inputs, rows)
        count = owners.sum(0)
        self.fixed_model = torch.full((rows,), -1, dtype=torch.long)
        self.fixed_row = torch.full((rows,), -1, dtype=torch.long)
        fixed, forced = torch.zeros(rows, dtype=torch.bool), torch.zeros(rows, dtype=torch.bool)
        for j, (model, row, force) in (overrides or {}).items():
            fixed[j], forced[j], self.fixed_model[j], self.fixed_row[j] = True, force, model, row
        #: the rows each input keeps as its own (a forced override replaces them)
        self.keep = owners & ~forced
        donor = torch.full((rows,), -1, dtype=torch.long)
        single = (count == 1) & ~fixed
        donor[single] = owners[:, single].to(torch.int8).argmax(0)
        if base is not None:
            donor[(count > 1) & owners[base] & ~fixed] = base
        self.donor = donor
        self.mean = (count > 1) & (donor < 0) & ~fixed
        self.count = count
        self.owned = (count > 0) | fixed
        #: rows no input has: zero inside the vocabulary, each input's mean row in the padding
        self.none_padding = ~self.owned & (torch.arange(rows) >= vocab_length)
        self._lock = threading.Lock()
        self._cache: dict[str, list[torch.Tensor | None]] = {}

    def meta(self, key: str, inner: TensorMeta) -> TensorMeta:
        return TensorMeta((self.rows, *inner.shape[1:]), inner.dtype)

    def take(self, key: str, position: int) -> torch.Tensor:
        """Input ``position``'s permuted tensor ``key`` (all inputs' are computed on the first request, each handed
        out once; a second request of the same input computes them again)."""
        with self._lock:
            held = self._cache.get(key)
            if held is None or held[position] is None:
                held = self._cache[key] = self._compute(key)
            tensor, held[position] = held[position], None
            if all(t is None for t in held):
                del self._cache[key]
            return tensor

    def _compute(self, key: str) -> list[torch.Tensor | None]:
        tensors = []
        for name, source in zip(self.names, self.sources):
            if not source.has(key):
                raise MergeError(f"{source.label} has no {key!r}, which the vocabulary of the merge permutes.")
            tensors.append(source.get(key))
        trailing = {tuple(t.shape[1:]) for t in tensors}
        if len(trailing) > 1:
            shapes = {name: tuple(t.shape) for name, t in zip(self.names, tensors)}
            raise MergeError(f"Embedding {key!r} has different widths across the inputs: {shapes}.")
        rest = tensors[0].shape[1:]
        work = torch.float32
        for t in tensors:
            work = torch.promote_types(work, t.dtype)
        needed = (~self.keep).any(0) & self.owned
        positions = needed.nonzero().flatten()
        slot = torch.full((self.rows,), -1, dtype=torch.long)
        slot[positions] = torch.arange(positions.numel())
        defaults = torch.zeros((positions.numel(), *rest), dtype=work)
        donor, mean = self.donor[positions], self.mean[positions]
        fixed_model, fixed_row = self.fixed_model[positions], self.fixed_row[positions]
        for m, tensor in enumerate(tensors):
            rows_of = self.index[m][positions]
            take = donor == m
            if take.any():
                defaults[take] = tensor[rows_of[take]].to(work)
            add = mean & (rows_of >= 0)
            if add.any():
                defaults[add] += tensor[rows_of[add]].to(work)
            given = fixed_model == m
            if given.any():
                defaults[given] = tensor[fixed_row[given]].to(work)
        if mean.any():
            defaults[mean] /= self.count[positions][mean].to(work).view(-1, *([1] * len(rest)))
        out: list[torch.Tensor | None] = []
        for m, tensor in enumerate(tensors):
            result = torch.zeros((self.rows, *rest), dtype=tensor.dtype)
            have = self.keep[m]
            result[have] = tensor[self.index[m][have]]
            lack = ~have & self.owned
            if lack.any():
                result[lack] = defaults[slot[lack]].to(tensor.dtype)
            if self.none_padding.any():
                mean_row = result[self.owned].to(work).mean(0) if self.owned.any() else torch.zeros(rest, dtype=work)
                result[self.none_padding] = mean_row.to(tensor.dtype)
            out.append(result)
        return out


class PermutedSource(TensorSource):
    """An input whose embedding tensors read permuted into the output vocabulary (:class:`RowPermutation`); every
    other tensor, the keys, aliases and ties are the wrapped source's."""

    def __init__(self, inner: TensorSource, permutation: RowPermutation, position: int) -> None:
        # no super().__init__(): the aliases (and the ties made through them) are the wrapped source's own
        self.inner, self.permutation, self.position = inner, permutation, position
        self.aliases = inner.aliases
        self.memory_names = inner.memory_names
        self.label, self.model, self.folder = inner.label, inner.model, inner.folder
        self._config = _with_vocab_size(inner.config, permutation.rows)

    def __getattr__(self, name: str) -> Any:  # e.g. FolderSource.file_metadata
        if name.startswith("_") or "inner" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["inner"], name)

    def keys(self) -> list[str]:
        return self.inner.keys()

    def _drop(self, key: str) -> None:
        self.inner._drop(key)

    def tie(self, alias: str, canonical: str) -> None:
        self.inner.tie(alias, canonical)
        self.__dict__.pop("_cached_key_set", None)

    def _permuted(self, key: str) -> bool:
        return self.resolve(key) in self.permutation.keys

    def meta(self, key: str) -> TensorMeta:
        meta = self.inner.meta(key)
        return self.permutation.meta(key, meta) if self._permuted(key) else meta

    def _read(self, key: str) -> torch.Tensor:
        if key in self.permutation.keys:
            return self.permutation.take(key, self.position)
        return self.inner.get(key)

    def flat_array(self, key: str) -> np.ndarray:
        return super().flat_array(key) if self._permuted(key) else self.inner.flat_array(key)

    def read_blocks(self, key: str, starts: Sequence[int], count: int) -> torch.Tensor:
        if self._permuted(key):
            return super().read_blocks(key, starts, count)
        return self.inner.read_blocks(key, starts, count)

    def iter_chunks(self, key: str, chunk_elements: int) -> Iterator[torch.Tensor]:
        if self._permuted(key):
            return super().iter_chunks(key, chunk_elements)
        return self.inner.iter_chunks(key, chunk_elements)

    @property
    def config(self) -> Any:
        return self._config


class PermutedModelSource(PermutedSource, ModelSource):
    """A :class:`PermutedSource` around an in-memory model (still a :class:`ModelSource`: its modules classify the
    parameters and its class builds in-memory outputs)."""


def _with_vocab_size(config: Any, rows: int) -> Any:
    if config is None:
        return None
    if isinstance(config, Mapping):
        return {**config, "vocab_size": rows} if "vocab_size" in config else dict(config)
    if getattr(config, "vocab_size", None) is None:
        return config
    config = copy.deepcopy(config)
    config.vocab_size = rows
    return config


def wrap(source: TensorSource, permutation: RowPermutation, position: int) -> PermutedSource:
    cls = PermutedModelSource if isinstance(source, ModelSource) else PermutedSource
    return cls(source, permutation, position)


# ------------------------------------------------------------------------------------------------ inputs
@dataclasses.dataclass
class _Input:
    """One input of the merge as far as vocabularies go."""

    name: str
    source: TensorSource
    rows: int | None
    given_tokenizer: Any = None
    _tokenizer: Any = None
    _loaded: bool = False
    _problem: str | None = None
    _vocab: dict[str, int] | None = None

    @property
    def folder(self) -> Path | None:
        """Where its tokenizer files are: its checkpoint folder, or an in-memory model's local ``name_or_path``."""
        if self.source.folder is not None:
            return Path(self.source.folder) if has_tokenizer_files(self.source.folder) else None
        if self.source.model is not None:
            config = getattr(self.source.model, "config", None)
            name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
            if name and os.path.isdir(name) and has_tokenizer_files(name):
                return Path(name)
        return None

    def tokenizer(self) -> Any:
        """Its tokenizer (given, or loaded from :attr:`folder`), or ``None`` (see :meth:`problem`)."""
        if not self._loaded:
            self._loaded = True
            value, where = self.given_tokenizer, "tokenizer="
            if value is None:
                value, where = self.folder, None
            if value is None:
                self._problem = ("it has no tokenizer files (tokenizer.json, tokenizer.model, vocab.json, ...)" if
                                 self.source.model is None else "it is in memory: give its tokenizer with tokenizer= "
                                 "(or load it from a folder holding tokenizer files: its name_or_path)")
            elif isinstance(value, (str, os.PathLike)):
                self._tokenizer = _load_tokenizer(value, self.name, where)
            elif hasattr(value, "get_vocab"):
                self._tokenizer = value
            else:
                raise TypeError(f"tokenizer= for {self.name!r} must be a tokenizer or a folder path, got "
                                f"{type(value).__name__}.")
        return self._tokenizer

    def problem(self) -> str:
        self.tokenizer()
        return self._problem or ""

    def vocab(self) -> dict[str, int] | None:
        """``{token: id}`` of the tokens that have an embedding row, or ``None`` without a tokenizer."""
        if self._vocab is not None or self.tokenizer() is None:
            return self._vocab
        vocab = self.tokenizer().get_vocab()
        if self.rows is not None:
            beyond = sorted((i, t) for t, i in vocab.items() if i >= self.rows)
            if beyond:
                warn(f"{self.label}: its tokenizer has {len(beyond)} token(s) beyond its {self.rows} embedding rows "
                     f"({_preview([t for _, t in beyond])}); they have no row and are left out, as mergekit does.")
            vocab = {t: i for t, i in vocab.items() if i < self.rows}
        self._vocab = dict(vocab)
        return self._vocab

    @property
    def label(self) -> str:
        return "the base" if self.name == "base" else f"input {self.name!r}"


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_MODEL_FILES)


def _load_tokenizer(folder: str | os.PathLike, name: str, where: str | None) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as error:  # transformers raises many kinds for a folder it cannot read
        given = f" (given as {where})" if where else ""
        raise ValueError(f"Cannot load the tokenizer of {'the base' if name == 'base' else repr(name)} from "
                         f"{folder}{given}: {type(error).__name__}: {error}") from None


def _span(vocab: Mapping[str, int]) -> int:
    """The tokenizer's length: its largest id + 1."""
    return max(vocab.values(), default=-1) + 1


def _preview(tokens: Sequence[str]) -> str:
    shown = ", ".join(repr(t) for t in tokens[:_PREVIEW])
    return f"[{shown}{', ...' if len(tokens) > _PREVIEW else ''}] ({len(tokens)})"


# ------------------------------------------------------------------------------------------------ entry point
def reconcile_vocabularies(base: TensorSource | None, tasks: Mapping[str, TensorSource], options: Any,
                           references: Mapping[str, Any] | None = None
                           ) -> tuple[TensorSource | None, dict[str, TensorSource]]:
    """The inputs of a merge with their embeddings in the output vocabulary (see the module docstring), and the
    :class:`VocabularyPlan` attached to the layout source (the base, else the first task) as ``.vocabulary`` for the
    sink. Inputs that need nothing are returned as they are. ``options``: the run's
    :class:`~hf_merge.options.MergeOptions` (``tokenizer_source``, ``tokenizer``, ``chat_template``,
    ``pad_to_multiple_of``); ``references``: the inputs as given (``{"base": ..., task: ...}``), to match a
    ``tokenizer_source``, ``chat_template`` or ``tokenizer.tokens`` model given as a path or Hub id. Raises naming the
    input (or the override) before any tensor is read or anything written."""
    from .inputs import reconcile_tied_embeddings, tied_embedding_keys

    source_option = getattr(options, "tokenizer_source", None)
    template_option = getattr(options, "chat_template", None)
    tokenizer_option = getattr(options, "tokenizer", None)
    multiple = getattr(options, "pad_to_multiple_of", None)
    tasks = dict(tasks)
    names = (["base"] if base is not None else []) + list(tasks)
    sources = ([base] if base is not None else []) + list(tasks.values())
    if not sources:
        return base, tasks
    reference = names[0]
    asked = not (source_option is None and template_option is None and tokenizer_option is None and multiple is None)
    special = [name for name, s in zip(names, sources) if _is_pipeline_or_update(s)]
    if special:
        if asked:
            raise ValueError("tokenizer_source / chat_template / tokenizer= / pad_to_multiple_of are not supported with "
                             f"{', '.join(repr(n) for n in special)} among the inputs (LoRA adapters, task vectors and "
                             "Sentence-Transformers pipelines keep their base's vocabulary).")
        return base, tasks
    setting = _tokenizer_setting(tokenizer_option, names)
    overrides: dict[str, TokenOverride] = {}
    if setting is not None:
        source_option, multiple, overrides = _setting_options(setting, source_option, multiple, names, sources,
                                                              references)
        tokenizer_option = None
    given = _given_tokenizers(tokenizer_option, names, reference)
    source = _resolve_source(source_option, names, sources, references, reference)  # checked before anything else
    if not asked and not _shapes_differ(sources):
        if sources[0].model is None:
            return base, tasks  # the common case: nothing to do, nothing built
        # an in-memory layout model: its tokenizer (name_or_path's) goes with a folder output
        plan = VocabularyPlan(source=reference)
        plan.tokenizer, plan.tokenizer_folder = _layout_tokenizer(_Input(reference, sources[0], None), False)
        return _attach(plan, base, tasks, reference)
    if base is not None and "base" in tasks:
        raise ValueError("A task is named 'base', which names the base in tokenizer_source / chat_template / "
                         "tokenizer=: rename the task.")
    reconcile_tied_embeddings(sources[0], dict(zip(names[1:], sources[1:])))
    keys = _embedding_keys(sources[0], tied_embedding_keys(sources))
    embedding = keys[0] if keys else None
    inputs = {name: _Input(name, s, s.meta(embedding).shape[0] if embedding and s.has(embedding) else None,
                           given.get(name)) for name, s in zip(names, sources)}
    differ = len({item.rows for item in inputs.values() if item.rows is not None}) > 1
    if (source_option is not None or differ or multiple is not None) and embedding is None:
        raise ValueError("tokenizer_source: cannot find the input embedding of this architecture (no model class "
                         "or config.json names it), so its rows cannot be matched to a vocabulary.")

    layout = inputs[reference]
    plan = VocabularyPlan(source=source, layout_rows=layout.rows)
    if source_option is None and not differ and multiple is None:
        # as without tokenizer_source in mergekit: token ids mean the same tokens in every input; the output gets the
        # layout input's tokenizer
        if template_option is not None or tokenizer_option is not None or layout.source.folder is None:
            plan.tokenizer, plan.tokenizer_folder = _layout_tokenizer(layout, template_option is not None)
        _apply_template(plan, template_option, inputs, references, source_name=reference)
        return _attach(plan, base, tasks, reference)

    vocabs = _vocabularies(inputs, source, reference, explicit=source_option is not None)
    resolved = _resolve_overrides(overrides, inputs, vocabs)
    out_tokenizer = _output_tokenizer(inputs, source, reference, vocabs)
    added = [token for token in overrides if token not in out_tokenizer.get_vocab()]
    if added:  # as mergekit adds every overridden token to the output tokenizer
        if source != "union":  # the input's own tokenizer: not changed
            out_tokenizer = _copy_tokenizer(out_tokenizer)
        out_tokenizer.add_tokens(added)
    out_vocab = dict(out_tokenizer.get_vocab())
    length = _span(out_vocab)
    out_rows = _output_rows(inputs, source, reference, vocabs, length, multiple, grow=bool(added))
    beyond = sorted((i, t) for t, i in out_vocab.items() if i >= out_rows)
    if beyond:
        warn(f"tokenizer_source {source!r}: the output tokenizer has {len(beyond)} token(s) beyond the output's "
             f"{out_rows} embedding rows ({_preview([t for _, t in beyond])}).")
    index = [_index(out_vocab, out_rows, length, vocabs[name], item.rows) for name, item in inputs.items()]
    if source != "union":
        _warn_dropped(inputs, vocabs, out_vocab, source)
    fixed = {out_vocab[token]: value for token, value in resolved.items() if out_vocab[token] < out_rows}
    identity = not fixed and all(item.rows == out_rows and torch.equal(ix, torch.arange(out_rows))
                                 for item, ix in zip(inputs.values(), index))
    changed = source != reference or out_rows != layout.rows or bool(added)
    if changed or template_option is not None or layout.source.folder is None:
        plan.tokenizer = out_tokenizer if source == "union" or added else _copy_tokenizer(out_tokenizer)
    if out_rows != layout.rows:
        plan.rows = out_rows
    _apply_template(plan, template_option, inputs, references, source_name=source)
    if identity:
        return _attach(plan, base, tasks, reference)
    permuted = [k for k in keys if sources[0].has(k) and sources[0].resolve(k) == k]
    permutation = RowPermutation(names, sources, index, 0 if base is not None else None, out_rows, length, permuted,
                                 fixed)
    plan.permutation = permutation
    wrapped = [wrap(s, permutation, position) for position, s in enumerate(sources)]
    new_base = wrapped[0] if base is not None else None
    new_tasks = dict(zip(tasks, wrapped[1:] if base is not None else wrapped))
    return _attach(plan, new_base, new_tasks, reference)


def _shapes_differ(sources: Sequence[TensorSource]) -> bool:
    """Whether any tensor's shape differs between the first source and another (headers only)."""
    first = sources[0]
    shapes = {key: first.meta(key).shape for key in first.keys()}
    return any(other.meta(key).shape != shape for other in sources[1:] for key, shape in shapes.items()
               if other.has(key))


def _attach(plan: VocabularyPlan, base: TensorSource | None, tasks: dict[str, TensorSource], reference: str
            ) -> tuple[TensorSource | None, dict[str, TensorSource]]:
    layout = base if base is not None else tasks[reference]
    if plan.writes_tokenizer or plan.rows is not None or plan.permutation is not None:
        layout.vocabulary = plan
    return base, tasks


def _is_pipeline_or_update(source: TensorSource) -> bool:
    from .io.deltas import DeltaSource
    from .sentence_transformers import SentenceTransformerSource

    return isinstance(source, (DeltaSource, SentenceTransformerSource))


def _setting_options(setting: Mapping[str, Any], source_option: Any, multiple: Any, names: list[str],
                     sources: list[TensorSource], references: Mapping[str, Any] | None
                     ) -> tuple[Any, Any, dict[str, TokenOverride]]:
    """``(tokenizer_source, pad_to_multiple_of, overrides)`` of mergekit's ``tokenizer:`` setting given as
    ``tokenizer=`` (its ``source`` defaults to ``tokenizer_source=``, else ``"union"``, as in mergekit)."""
    source, pad = setting.get("source"), setting.get("pad_to_multiple_of")
    if source is not None and source_option is not None:
        raise ValueError("tokenizer_source= and tokenizer['source'] both choose the output's vocabulary; give one.")
    if pad is not None and multiple is not None:
        raise ValueError("pad_to_multiple_of= and tokenizer['pad_to_multiple_of'] are both given; give one.")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise ValueError(f"tokenizer['pad_to_multiple_of'] must be a positive integer, got {pad!r}.")
    overrides = token_overrides(setting.get("tokens"), lambda value: match_input(value, names, sources, references),
                                names)
    source = source if source is not None else source_option if source_option is not None else "union"
    return source, pad if pad is not None else multiple, overrides


def _given_tokenizers(option: Any, names: list[str], reference: str) -> dict[str, Any]:
    """``{input: tokenizer or path}`` of ``tokenizer=``: one value is the base's (the first model's without one)."""
    if option is None:
        return {}
    if not isinstance(option, Mapping):
        return {reference: option}
    unknown = [str(k) for k in option if k not in names]
    if unknown:
        raise ValueError(f"tokenizer= names {unknown}, which are not inputs of this merge; its inputs are {names}.")
    return dict(option)


def _resolve_source(option: Any, names: list[str], sources: list[TensorSource], references: Mapping[str, Any] | None,
                    reference: str) -> str:
    if option is None or option == "base":
        return reference
    if option == "union":
        return "union"
    if not isinstance(option, (str, os.PathLike)):
        raise TypeError(f"tokenizer_source must be 'base', 'union' or an input's name, got {option!r}.")
    name = match_input(option, names, sources, references)
    if name is None:
        raise ValueError(f"tokenizer_source {os.fspath(option)!r} names no input of this merge: give 'base', 'union' "
                         f"or one of the inputs {names} (by name, or by the path or Hub id it was given as).")
    return name


def match_input(value: Any, names: Sequence[str], sources: Sequence[TensorSource],
                references: Mapping[str, Any] | None = None) -> str | None:
    """The input ``value`` names: a task name (or ``"base"``), the reference an input was given as (a path, a Hub id),
    or a folder that is an input's."""
    from .hub.resolve import cached_repo, split_revision

    text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if text is None:
        return None
    if text in names:
        return text
    for name, given in (references or {}).items():
        if name in names and isinstance(given, (str, os.PathLike)) and os.fspath(given) == text:
            return name
    path = Path(text).expanduser()
    for name, source in zip(names, sources):
        if source.folder is not None and path.exists() and path.resolve() == Path(source.folder).resolve():
            return name
        repo = cached_repo(source.origin)
        if repo is not None and split_revision(text)[0] == repo[0]:
            return name
    return None


def _embedding_keys(source: TensorSource, pair: tuple[str, str] | None) -> list[str]:
    """``[input embedding, output embedding, output bias]`` keys of the architecture that the source stores (the
    output ones only where stored separately), input embedding first; ``[]`` when unknown."""
    if pair is None:
        found = [k for k in source.keys() if k.endswith(("embed_tokens.weight", "word_embeddings.weight", "wte.weight"))]
        if len(found) != 1:
            return []
        heads = [k for k in ("lm_head.weight", "embed_out.weight") if source.has(k) and source.resolve(k) == k]
        return found + heads
    output, embedding = pair
    keys = [embedding]
    if source.has(output) and source.resolve(output) != source.resolve(embedding):
        keys.append(output)
        bias = output.removesuffix(".weight") + ".bias"
        if source.has(bias) and source.meta(bias).shape[:1] == source.meta(output).shape[:1]:
            keys.append(bias)
    return keys


def _vocabularies(inputs: dict[str, _Input], source: str, reference: str, *, explicit: bool
                  ) -> dict[str, dict[str, int]]:
    """Every input's ``{token: row}``: an input without a tokenizer whose rows are the reference's is assumed to have
    its vocabulary (as mergekit assumes the base's); for ``"union"``, a named source or rows that differ, its
    tokenizer is required."""
    ref = inputs[reference]
    vocabs: dict[str, dict[str, int] | None] = {name: item.vocab() for name, item in inputs.items()}
    missing = [name for name, vocab in vocabs.items() if vocab is None]
    if source == "union" and missing:
        raise ValueError("tokenizer_source 'union' builds the union of the inputs' tokenizers, but "
                         + "; ".join(f"{inputs[name].label} has none: {inputs[name].problem()}" for name in missing)
                         + ".")
    if source not in ("union", reference) and vocabs[source] is None:
        raise ValueError(f"tokenizer_source {source!r}: {inputs[source].label} has no tokenizer: "
                         f"{inputs[source].problem()}.")
    if vocabs[reference] is None:
        why = (f"tokenizer_source {'base' if source == reference else source!r} matches the inputs' tokens" if explicit
               else f"the inputs' embedding rows differ ({_rows_text(inputs)}), so their tokens must be matched")
        raise MergeError(f"{why}, but {ref.label} has no tokenizer: {ref.problem()}.")
    for name in missing:
        item = inputs[name]
        if item.rows != ref.rows:
            raise MergeError(f"{item.label} has {item.rows} embedding rows, {ref.label} {ref.rows}, and its tokens "
                             f"cannot be matched: {item.problem()}.")
        warn(f"{item.label} has no tokenizer ({item.problem()}): its tokens are assumed to be {ref.label}'s, as "
             "mergekit assumes.")
        vocabs[name] = vocabs[reference]
    return vocabs  # type: ignore[return-value]


def _rows_text(inputs: dict[str, _Input]) -> str:
    return ", ".join(f"{item.label} {item.rows}" for item in inputs.values())


def _output_tokenizer(inputs: dict[str, _Input], source: str, reference: str, vocabs: dict[str, dict[str, int]]
                      ) -> Any:
    if source != "union":
        return inputs[source].tokenizer()
    return union_tokenizer(inputs[reference].tokenizer(),
                           [(inputs[name].tokenizer(), vocabs[name]) for name in inputs])


def union_tokenizer(base_tokenizer: Any, tokenizers: Sequence[tuple[Any, Mapping[str, int]]]) -> Any:
    """A copy of ``base_tokenizer`` with every token of ``tokenizers`` (``(tokenizer, {token: row})``) it lacks added:
    regular tokens first (in the order of the inputs, then of their ids), then added tokens with their settings
    (special or not, stripping, normalization), as mergekit's ``build_union_tokenizer``; a token added with
    different settings by two inputs takes the first's, with a warning."""
    union = _copy_tokenizer(base_tokenizer)
    have = set(union.get_vocab())
    regular: dict[str, None] = {}
    added: dict[str, Any] = {}
    differing: list[str] = []
    for tokenizer, vocab in tokenizers:
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        added_contents = {info.content for info in decoder.values()}
        for token, _ in sorted(vocab.items(), key=lambda item: item[1]):
            if token not in added_contents and token not in have:
                regular.setdefault(token)
        for _, info in sorted(decoder.items()):
            if info.content not in vocab:  # beyond its embedding rows
                continue
            if info.content in added:
                if str(added[info.content]) != str(info) and info.content not in differing:
                    differing.append(info.content)
                continue
            added[info.content] = info
    if differing:
        warn(f"tokenizer_source 'union': token(s) {_preview(differing)} are added with different settings by "
             "different inputs; the first input's settings are kept, as mergekit does.")
    if regular:
        union.add_tokens(list(regular))
    new_added = [info for content, info in added.items() if content not in have and content not in regular]
    if new_added:
        union.add_tokens(new_added)
    return union


def _copy_tokenizer(tokenizer: Any) -> Any:
    """An independent copy (saved and loaded again, as mergekit does, so that the input's tokenizer is not changed)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder)


def _output_rows(inputs: dict[str, _Input], source: str, reference: str, vocabs: dict[str, dict[str, int]],
                 length: int, multiple: int | None, grow: bool) -> int:
    """The output's embedding rows: a named source's (``grow``: tokens were added, grown as a union is), else the
    base's grown to the union's length, padded as the base is."""
    if multiple is not None:
        return -(-length // multiple) * multiple
    name = reference if source == "union" else source
    rows = inputs[name].rows
    if source != "union" and not grow:
        return rows if rows is not None else length
    rows = rows or 0
    inferred = padding_multiple(rows) if rows > _span(vocabs[name]) else 1
    return max(rows, -(-length // inferred) * inferred)


def padding_multiple(rows: int) -> int:
    """The largest power of two up to 128 dividing ``rows``: the padding multiple a padded vocabulary suggests."""
    multiple = 1
    while rows % (multiple * 2) == 0 and multiple * 2 <= _MAX_INFERRED_MULTIPLE:
        multiple *= 2
    return multiple


def _index(out_vocab: Mapping[str, int], out_rows: int, length: int, vocab: Mapping[str, int],
           rows: int | None) -> torch.Tensor:
    """Row of the input holding each output row (-1: none): its row of the same token, and in the output's padding
    (rows ``length`` and beyond) its own padding row (a row beyond its tokenizer's length) of the same index."""
    index = torch.full((out_rows,), -1, dtype=torch.long)
    positions, own = [], []
    for token, j in out_vocab.items():
        i = vocab.get(token)
        if i is not None and j < out_rows:
            positions.append(j)
            own.append(i)
    if positions:
        index[torch.tensor(positions)] = torch.tensor(own)
    start, stop = max(length, _span(vocab)), min(out_rows, rows if rows is not None else 0)
    if stop > start:
        index[start:stop] = torch.arange(start, stop)
    return index


def _warn_dropped(inputs: dict[str, _Input], vocabs: dict[str, dict[str, int]], out_vocab: Mapping[str, int],
                  source: str) -> None:
    for name, vocab in vocabs.items():
        if name == source:
            continue
        dropped = sorted((i, t) for t, i in vocab.items() if t not in out_vocab)
        if dropped:
            warn(f"tokenizer_source {source!r}: {inputs[name].label} has {len(dropped)} token(s) the output "
                 f"vocabulary lacks; their embedding rows are dropped: {_preview([t for _, t in dropped])}.")


# ------------------------------------------------------------------------------------------------ tokenizer to save
def _layout_tokenizer(layout: _Input, need_object: bool) -> tuple[Any, Path | None]:
    """``(tokenizer to save, folder to copy)`` for an output that keeps the layout input's vocabulary."""
    if layout.given_tokenizer is not None or need_object:
        tokenizer = layout.tokenizer()
        if tokenizer is None:
            if need_object:
                raise ValueError(f"chat_template: the output's tokenizer is {layout.label}'s, but {layout.problem()}.")
            return None, None
        return _copy_tokenizer(tokenizer), None
    return None, layout.folder  # an in-memory model's name_or_path folder (None: no tokenizer to save)


def _apply_template(plan: VocabularyPlan, option: Any, inputs: dict[str, _Input],
                    references: Mapping[str, Any] | None, source_name: str) -> None:
    if option is None:
        return
    template = chat_template_of(option, inputs, references)
    if template is None:
        return
    if plan.tokenizer is None:
        tokenizer = (inputs[source_name].tokenizer() if source_name in inputs else None)
        if tokenizer is None:
            raise ValueError(f"chat_template: the output has no tokenizer to carry it "
                             f"({inputs[source_name].problem() if source_name in inputs else source_name}).")
        plan.tokenizer, plan.tokenizer_folder = _copy_tokenizer(tokenizer), None
    plan.tokenizer.chat_template = template


def chat_template_of(option: Any, inputs: Mapping[str, _Input], references: Mapping[str, Any] | None = None
                     ) -> str | None:
    """The template ``chat_template=`` chooses: a Jinja template string as given; ``"auto"``: the template most
    inputs have (``None`` when none has one); a built-in template's name (:func:`chat_template_names`): its text; an
    input: its tokenizer's template (an input without one raises). A name both a built-in's and an input's raises."""
    if not isinstance(option, str) or not option:
        raise TypeError(f"chat_template must be a Jinja template, 'auto', a built-in template's name or an input's "
                        f"name, got {option!r}.")
    if "{" in option:
        return option
    if option == "auto":
        templates = [t for t in (_template(item) for item in inputs.values()) if t]
        if not templates:
            warn("chat_template 'auto': no input has a chat template; the output keeps its tokenizer's.")
            return None
        return collections.Counter(templates).most_common(1)[0][0]
    names = list(inputs)
    name = match_input(option, names, [item.source for item in inputs.values()], references)
    builtin = builtin_chat_template(option)
    if builtin is not None and name is not None:
        raise ValueError(f"chat_template {option!r} names both {inputs[name].label} and the built-in template "
                         f"{option!r}: give the input by its path (or Hub id) to take its template, or the built-in's "
                         "Jinja text.")
    if builtin is not None:
        return builtin
    if name is None:
        raise ValueError(f"chat_template {option!r} is neither a Jinja template, a built-in template "
                         f"{chat_template_names()} nor an input of this merge (its inputs are {names}; 'auto' takes "
                         "the template most inputs have).")
    item = inputs[name]
    if item.tokenizer() is None:
        raise ValueError(f"chat_template {option!r}: {item.label} has no tokenizer to take a chat template from: "
                         f"{item.problem()}.")
    template = _template(item)
    if not template:
        raise ValueError(f"chat_template {option!r}: {item.label}'s tokenizer has no chat template.")
    return template


def chat_template_names() -> list[str]:
    """The names of the chat templates shipped in ``hf_merge/chat_templates`` (mergekit's built-in names)."""
    return sorted(item.name.removesuffix(".jinja") for item in _templates_folder().iterdir()
                  if item.name.endswith(".jinja"))


def builtin_chat_template(name: str) -> str | None:
    """The Jinja text of the built-in chat template ``name``, or ``None`` when there is none of that name."""
    if name not in chat_template_names():
        return None
    return (_templates_folder() / f"{name}.jinja").read_text(encoding="utf-8")


def _templates_folder() -> Any:
    return importlib.resources.files("hf_merge") / "chat_templates"


def _template(item: _Input) -> str | None:
    tokenizer = item.tokenizer() if item.given_tokenizer is not None or item.folder is not None else None
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(template, Mapping):
        template = template.get("default")
    return template.strip() if isinstance(template, str) and template.strip() else None


def merged_tokenizer(model: Any) -> Any:
    """The output tokenizer of an in-memory merge whose vocabulary changed (``None`` otherwise)."""
    return getattr(model, "hf_merge_tokenizer", None)


__all__ = ["SOURCES", "TOKENIZER_FILES", "TOKENIZER_KEYS", "TOKEN_KEYS", "VOCABULARY_OPTIONS", "PermutedSource",
           "RowPermutation", "TokenOverride", "VocabularyPlan", "builtin_chat_template", "chat_template_names",
           "chat_template_of", "match_input", "merged_tokenizer", "reconcile_vocabularies", "token_overrides",
           "union_tokenizer", "vocabulary_of"]
