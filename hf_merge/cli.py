"""``hf-merge`` command line.

    hf-merge merge RECIPE.yaml [OUT_DIR] [--quiet] [--overwrite] [--dry-run]   run the merge a YAML recipe describes
    hf-merge check RECIPE.yaml [OUT_DIR] [--json]   check a recipe before merging: inputs, method, memory (exit 1:
                                            the merge would be refused)
    hf-merge methods                        list the methods and their default parameters
    hf-merge extract-lora BASE FINETUNED OUT_DIR (--rank R | --energy E) [--targets NAME ...] [--embeddings MODE]
                                            extract a PEFT LoRA adapter from a full fine-tune (hf_merge.extract_lora)
    hf-merge push DIR REPO_ID [--private] [--revision REV]   upload a merge folder to the Hub in one commit

A recipe is hf_merge's own YAML or a mergekit configuration, told apart by its keys (``method`` or
``merge_method``). hf_merge's keys are ``method``, ``base``, ``models`` (a list or a ``{task: path}`` mapping),
``parameters``, ``output``, and optionally any field of :class:`~hf_merge.options.MergeOptions` (``dtype``, ``device``,
``memory_budget``, ``max_shard_size``, ``allow_pickle``, ..., and ``data: {task: path}`` for the data-aware methods,
each a saved dataset folder or a .txt/.json/.jsonl/.csv/.parquet file). mergekit's are read by :mod:`hf_merge.mergekit`. Relative
paths in a recipe are resolved against the YAML file's folder; ``OUT_DIR`` (relative to the working directory)
overrides ``output`` and is required for mergekit recipes, which have no output key.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_RECIPE_KEYS = {"method", "base", "models", "parameters", "output"}
_PATH_OPTIONS = ("offload_folder", "cache_dir")
_REFERENCE_OPTIONS = ("tokenizer", "tokenizer_source", "chat_template")


def _yaml_keys() -> set[str]:
    from .options import MergeOptions

    return _RECIPE_KEYS | set(MergeOptions.field_names()) - {"progress"}


def load_merge_spec(path: str | Path, output: str | Path | None = None) -> dict[str, Any]:
    """Read and check an hf_merge merge YAML file; paths in it are resolved relative to the file. ``output`` (relative
    to the working directory) overrides the file's ``output`` key, which is then optional."""
    from .mergekit import load_yaml

    path = Path(path)
    return _check_merge_spec(path, load_yaml(path), output)


def _check_merge_spec(path: Path, spec: Any, output: str | Path | None) -> dict[str, Any]:
    valid = _yaml_keys()
    if not isinstance(spec, Mapping):
        raise ValueError(f"{path}: expected a mapping with keys {sorted(valid)}.")
    unknown = sorted(set(spec) - valid)
    if unknown:
        from .config import did_you_mean

        raise ValueError(f"{path}: unknown key(s) {unknown}{did_you_mean(unknown, valid)}; valid keys are "
                         f"{sorted(valid)}.")
    for key in ("method", "models", "output"):
        if key not in spec and not (key == "output" and output is not None):
            raise ValueError(f"{path}: missing required key {key!r}" + (
                " (or give the output folder: hf-merge merge RECIPE OUT_DIR)." if key == "output" else "."))
    root = path.parent

    def resolve(value: Any, what: str) -> str:
        if not isinstance(value, str):
            raise ValueError(f"{path}: {what} must be a path string, got {value!r}.")
        return str((root / value).resolve()) if not Path(value).is_absolute() else value

    def reference(value: Any, what: str) -> str:
        """A model: a folder relative to the recipe, or (when no such path exists) a Hub repo id as written."""
        resolved = resolve(value, what)
        try:
            return resolved if os.path.exists(resolved) else value
        except (OSError, ValueError):  # not a path at all (e.g. a Jinja template's text)
            return value

    models = spec["models"]
    if isinstance(models, Mapping):
        models = {str(name): reference(p, f"models.{name}") for name, p in models.items()}
    elif isinstance(models, Sequence) and not isinstance(models, str):
        models = [reference(p, f"models[{i}]") for i, p in enumerate(models)]
    else:
        raise ValueError(f"{path}: models must be a list or a mapping of paths.")
    parameters = spec.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        raise ValueError(f"{path}: parameters must be a mapping.")
    options = {key: spec[key] for key in set(spec) - _RECIPE_KEYS}
    for key in _PATH_OPTIONS:
        if options.get(key) is not None:
            options[key] = resolve(options[key], key)
    if options.get("data") is not None:  # {task: a saved dataset folder or a data file, relative to the recipe}
        from .data import load_examples

        if not isinstance(options["data"], Mapping):
            raise ValueError(f"{path}: data must be a mapping {{task: path}}, got {options['data']!r}.")
        options["data"] = {str(task): load_examples(resolve(value, f"data.{task}"))
                           for task, value in options["data"].items()}
    for key in _REFERENCE_OPTIONS:  # an input or a folder relative to the recipe, else as written (a name, "union")
        if isinstance(options.get(key), str):
            options[key] = reference(options[key], key)
    return {
        "method": spec["method"],
        "base": reference(spec["base"], "base") if spec.get("base") is not None else None,
        "models": models,
        "parameters": dict(parameters),
        "output": str(Path(output).resolve()) if output is not None else resolve(spec["output"], "output"),
        "options": options,
    }


def _read_recipe(path: Path) -> tuple[Any, bool]:
    """``(parsed recipe, whether it is mergekit's)``; a recipe of neither schema raises, and so does a mergekit-moe
    recipe (:func:`_merge_command` runs those before)."""
    from .mergekit import is_mergekit_recipe, load_yaml
    from .moe import is_moe_recipe

    data = load_yaml(path)
    if is_moe_recipe(data):
        raise ValueError(f"{path}: a mergekit-moe recipe (experts) is assembled by hf-merge merge {path} OUT_DIR; "
                         "hf-merge check and --dry-run do not check MoE recipes yet.")
    if isinstance(data, Mapping) and "merge_method" in data and "method" in data:
        raise ValueError(f"{path}: has both 'method' (hf_merge's recipe) and 'merge_method' (mergekit's); give one.")
    if isinstance(data, Mapping) and "merge_method" not in data and "method" not in data and not is_mergekit_recipe(data):
        raise ValueError(f"{path}: missing the method: 'method' (hf_merge's recipe) or 'merge_method' (mergekit's).")
    return data, is_mergekit_recipe(data)


def _merge_command(args: argparse.Namespace) -> int:
    """``hf-merge merge``; launched on several processes (``torchrun -m hf_merge merge ...``, ``accelerate launch -m
    hf_merge merge ...``) it initialises ``torch.distributed`` and the merge is split across them."""
    from .distributed import init_from_environment

    launched = init_from_environment()
    try:
        return _merge_recipe(args)
    finally:
        if launched:
            import torch.distributed as dist

            dist.destroy_process_group()


def _main_process() -> bool:
    """Whether this is the process that reports (rank 0 of a launcher's processes, or the only one)."""
    return int(os.environ.get("RANK", "0")) == 0


def _merge_recipe(args: argparse.Namespace) -> int:
    if args.dry_run:
        report = _check_recipe(Path(args.config), args.out_dir, overwrite=args.overwrite, require_output=True)
        print(report)
        return 0 if report.ok else 1
    path = Path(args.config)
    if _run_moe_recipe(path, args):
        return 0
    data, mergekit = _read_recipe(path)
    if mergekit:
        return _merge_mergekit(path, data, args)
    from .api import merge
    from .config import MergeConfig

    spec = _check_merge_spec(path, data, args.out_dir)
    config = MergeConfig.from_dict({"method": spec["method"], **spec["parameters"]})
    options = {**spec["options"], **({"overwrite": True} if args.overwrite else {})}
    output = merge(spec["base"], spec["models"], config, output_dir=spec["output"], progress=not args.quiet, **options)
    if not args.quiet and _main_process():
        print(f"Merged {len(spec['models'])} model(s) with {config.method} into {output}")
    return 0


def _run_moe_recipe(path: Path, args: argparse.Namespace) -> bool:
    """Assemble a mergekit-moe recipe (:mod:`hf_merge.moe`) into ``OUT_DIR``; ``False`` for any other recipe."""
    from .mergekit import load_yaml
    from .moe import is_moe_recipe, run_moe_recipe

    if not is_moe_recipe(load_yaml(path)):
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"{path}: a mixture of experts is assembled by one process; run it without torchrun or "
                         "accelerate launch.")
    if args.out_dir is None:
        raise ValueError(f"{path}: an MoE recipe has no output key: give the output folder, "
                         f"hf-merge merge {args.config} OUT_DIR.")
    output = run_moe_recipe(path, args.out_dir, progress=not args.quiet,
                            **({"overwrite": True} if args.overwrite else {}))
    if not args.quiet:
        print(f"Assembled a mixture of experts into {output}")
    return True


def _merge_mergekit(path: Path, data: Mapping[str, Any], args: argparse.Namespace) -> int:
    """Run a mergekit recipe (see :mod:`hf_merge.mergekit`) into ``OUT_DIR``."""
    from .mergekit import recipe_from_dict

    if args.out_dir is None:
        raise ValueError(f"{path}: a mergekit recipe has no output key: give the output folder, "
                         f"hf-merge merge {args.config} OUT_DIR.")
    recipe = recipe_from_dict(data, root=path.parent, where=str(path), output=args.out_dir)
    output = recipe.merge(progress=not args.quiet, **({"overwrite": True} if args.overwrite else {}))
    if not args.quiet and _main_process():
        print(f"Merged {len(recipe.models)} model(s) with mergekit's {recipe.merge_method} (hf_merge "
              f"{recipe.config.method}) into {output}")
    return 0


def _check_command(args: argparse.Namespace) -> int:
    import json

    report = _check_recipe(Path(args.config), args.out_dir, overwrite=args.overwrite, require_output=False)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0 if report.ok else 1


def _check_recipe(path: Path, out_dir: str | None, *, overwrite: bool, require_output: bool) -> Any:
    """The :class:`~hf_merge.check.CheckReport` of a recipe (either schema). A recipe that cannot be read as one
    raises (a usage error, exit 2); what the merge would refuse is in the report. ``require_output``: the output
    folder is required as ``hf-merge merge`` requires it."""
    from .check import check

    data, mergekit = _read_recipe(path)
    flags = {"overwrite": True} if overwrite else {}
    if mergekit:
        if out_dir is None and require_output:
            raise ValueError(f"{path}: a mergekit recipe has no output key: give the output folder, "
                             f"hf-merge merge {path} OUT_DIR.")
        return _check_mergekit(path, data, out_dir, flags)
    if out_dir is None and not require_output and isinstance(data, Mapping) and data.get("output") is None:
        spec = {**_check_merge_spec(path, {**data, "output": "."}, None), "output": None}  # no output: not checked
    else:
        spec = _check_merge_spec(path, data, out_dir)
    config = {"method": spec["method"], **spec["parameters"]}
    return check(spec["base"], spec["models"], config, output_dir=spec["output"], **{**spec["options"], **flags})


def _check_mergekit(path: Path, data: Mapping[str, Any], out_dir: str | None, flags: dict[str, Any]) -> Any:
    """Check a mergekit recipe: a recipe hf_merge refuses (an unsupported key or method, a bad parameter, a missing
    model folder) is reported as a blocking problem, with its inputs still checked where they can be read."""
    from .check import check
    from .mergekit import recipe_from_dict

    try:
        recipe = recipe_from_dict(data, root=path.parent, where=str(path), output=out_dir)
    except ValueError as error:
        recipe_error = error
    else:
        return check(recipe.base, recipe.models, recipe.config, output_dir=recipe.output,
                     tokenizer_source=recipe.vocabulary.get("tokenizer_source", data.get("tokenizer_source")),
                     **{**recipe.options, **flags})
    # Refused: check what can be read. Without the vocabulary keys hf_merge refuses, the recipe may read in full
    # (the check then reports tokenizer_source itself).
    vocabulary_keys = ("tokenizer_source", "tokenizer", "chat_template")
    try:
        recipe = recipe_from_dict({k: v for k, v in data.items() if k not in vocabulary_keys}, root=path.parent,
                                  where=str(path), output=out_dir)
    except ValueError:
        base, models = _mergekit_references(path, data)
        report = check(base, models, None, output_dir=out_dir, **flags)
    else:
        report = check(recipe.base, recipe.models, recipe.config, output_dir=recipe.output,
                       tokenizer_source=data.get("tokenizer_source"), **{**recipe.options, **flags})
        if not any(data.get(key) is not None for key in ("tokenizer", "chat_template")):
            return report  # the refusal was tokenizer_source's, which the report names
    report.error("recipe", recipe_error)
    report.problems.insert(0, report.problems.pop())  # the recipe's problem first
    return report


def _mergekit_references(path: Path, data: Any) -> tuple[str | None, dict[str, str]]:
    """``(base, {reference: folder})`` of a mergekit recipe that did not read, as far as its references are strings
    (relative to the recipe's folder)."""
    def resolve(ref: str) -> str:
        local = (path.parent / Path(ref).expanduser()).resolve()
        return str(local) if local.exists() else ref  # else a Hub repo id, as written

    data = data if isinstance(data, Mapping) else {}
    base = data.get("base_model")
    entries = data.get("models") if isinstance(data.get("models"), Sequence) else []
    models = {entry["model"]: resolve(entry["model"]) for entry in entries
              if isinstance(entry, Mapping) and isinstance(entry.get("model"), str) and entry["model"] != base}
    return (resolve(base) if isinstance(base, str) else None), models


def _methods_command(args: argparse.Namespace) -> int:
    from .registry import MERGE_METHODS, _load_builtin_methods

    _load_builtin_methods()
    for name, (config_cls, _) in sorted(MERGE_METHODS.items()):
        params = []
        for f in dataclasses.fields(config_cls):
            if f.name == "method" or not f.init:
                continue
            if f.default is not dataclasses.MISSING:
                params.append(f"{f.name}={f.default!r}")
            elif f.default_factory is not dataclasses.MISSING:
                params.append(f"{f.name}={f.default_factory()!r}")
            else:
                params.append(f"{f.name}=<required>")
        print(f"{name:<18} {config_cls.__name__}({', '.join(params)})")
    return 0


# ------------------------------------------------------------------------------------------------- extract-lora
def _parse_rank(values: Sequence[str] | None) -> int | dict[str, int] | None:
    """``--rank R`` → R; ``--rank PATTERN=R`` (repeatable) → ``{pattern: R}``, a plain ``R`` beside them standing for
    every other module (``".*"``, matched last)."""
    if not values:
        return None

    def number(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"--rank {text!r}: expected an integer R or PATTERN=R.") from None

    patterns = {pattern: number(value) for pattern, equals, value in (v.rpartition("=") for v in values) if equals}
    plain = [number(v) for v in values if "=" not in v]
    if len(plain) > 1:
        raise ValueError(f"--rank: give one plain rank R (others as PATTERN=R), got {plain}.")
    if not patterns:
        return plain[0]
    return {**patterns, **({".*": plain[0]} if plain else {})}


def _extract_lora_command(args: argparse.Namespace) -> int:
    from .extract import extract_lora

    options = {key: value for key, value in (("dtype", args.dtype), ("device", args.device)) if value is not None}
    output = extract_lora(args.base, args.finetuned, rank=_parse_rank(args.rank), energy=args.energy,
                          targets=args.targets if args.targets is not None else args.target_regex,
                          embeddings=args.embeddings, output_dir=args.out_dir, progress=not args.quiet,
                          allow_pickle=args.allow_pickle, **({"overwrite": True} if args.overwrite else {}), **options)
    if not args.quiet:
        print(f"Extracted a LoRA adapter of {args.finetuned} (base {args.base}) into {output}")
    return 0


def _add_extract_lora_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "extract-lora", help="extract a PEFT LoRA adapter from a full fine-tune (truncated SVD of W_ft - W_0 per "
                             "linear module)")
    parser.add_argument("base", help="the base model: a checkpoint folder or a Hub repo id")
    parser.add_argument("finetuned", help="the full fine-tune of the base: a checkpoint folder or a Hub repo id")
    parser.add_argument("out_dir", help="output folder for the adapter (PEFT format, with merge_config.json and card)")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", action="append", metavar="R|PATTERN=R",
                      help="LoRA rank of every module, or of the modules matching PATTERN (repeatable, PEFT "
                           "rank_pattern matching; a plain R then covers the rest)")
    size.add_argument("--energy", type=float, metavar="E",
                      help="per module, the smallest rank keeping this fraction of the squared singular values")
    targets = parser.add_mutually_exclusive_group()
    targets.add_argument("--targets", nargs="+", metavar="NAME",
                         help="linear modules to extract, by the name their path ends with (default: all)")
    targets.add_argument("--target-regex", metavar="REGEX", help="linear modules whose whole path matches REGEX")
    parser.add_argument("--embeddings", choices=("lora", "save", "skip"), default="lora",
                        help="embedding tables as LoRA factors, saved whole (modules_to_save) or left out "
                             "(default: lora)")
    parser.add_argument("--dtype", default=None, help="dtype of the factors (default: the base's)")
    parser.add_argument("--device", default=None, help="where the SVDs run, e.g. cuda (default: cpu)")
    parser.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin checkpoints")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an existing folder hf-merge did not write (your files are kept)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    parser.set_defaults(func=_extract_lora_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-merge", description="Merge Hugging Face models.")
    commands = parser.add_subparsers(dest="command", required=True)
    merge_parser = commands.add_parser("merge", help="run the merge a YAML recipe describes (hf_merge's or mergekit's)")
    merge_parser.add_argument("config", help="YAML recipe: hf_merge's (method, base, models, parameters, output) or "
                                             "mergekit's (merge_method, base_model, models, parameters, ...)")
    merge_parser.add_argument("out_dir", nargs="?", default=None,
                              help="output folder (overrides the recipe's output; required for mergekit recipes)")
    merge_parser.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    merge_parser.add_argument("--overwrite", action="store_true",
                              help="write into an existing folder hf-merge did not write (your files are kept)")
    merge_parser.add_argument("--dry-run", action="store_true",
                              help="check the recipe (as hf-merge check) and write nothing; exit 1 if the merge would "
                                   "be refused")
    merge_parser.set_defaults(func=_merge_command)
    check_parser = commands.add_parser(
        "check", help="check a recipe before merging: inputs, differences, vocabulary, method, memory and time (reads "
                      "headers only, writes nothing; exit 1 if the merge would be refused)")
    check_parser.add_argument("config", help="YAML recipe, hf_merge's or mergekit's (as for hf-merge merge)")
    check_parser.add_argument("out_dir", nargs="?", default=None,
                              help="output folder to check (overrides the recipe's output; optional)")
    check_parser.add_argument("--json", action="store_true", help="print the report as JSON")
    check_parser.add_argument("--overwrite", action="store_true",
                              help="check the output folder as hf-merge merge --overwrite would use it")
    check_parser.set_defaults(func=_check_command)
    methods_parser = commands.add_parser("methods", help="list merge methods and their defaults")
    methods_parser.set_defaults(func=_methods_command)
    _add_extract_lora_parser(commands)
    from .hub.cli_push import add_push_parser

    add_push_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, KeyError, OSError) as error:  # user errors: one line, exit code 2
        message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
        print(f"hf-merge: error: {' '.join(message.split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
