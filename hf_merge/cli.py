"""``hf-merge`` command line.

    hf-merge merge CONFIG.yaml [--quiet]     run the merge a YAML file describes
    hf-merge methods                        list the methods and their default parameters
    hf-merge push DIR REPO_ID [--private] [--revision REV]   upload a merge folder to the Hub in one commit

The YAML keys are ``method``, ``base``, ``models`` (a list or a ``{task: path}`` mapping), ``parameters``,
``output``, and optionally any field of :class:`~hf_merge.options.MergeOptions` (``dtype``, ``device``,
``memory_budget``, ``max_shard_size``, ``allow_pickle``, ...). Relative paths are resolved against the YAML file's
folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_RECIPE_KEYS = {"method", "base", "models", "parameters", "output"}
_PATH_OPTIONS = ("offload_folder",)


def _yaml_keys() -> set[str]:
    from .options import MergeOptions

    return _RECIPE_KEYS | set(MergeOptions.field_names()) - {"progress"}


def load_merge_spec(path: str | Path) -> dict[str, Any]:
    """Read and check a merge YAML file; paths in it are resolved relative to the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Merge config {path} does not exist.")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{path}: not valid YAML{at}: {problem}.") from None
    valid = _yaml_keys()
    if not isinstance(spec, Mapping):
        raise ValueError(f"{path}: expected a mapping with keys {sorted(valid)}.")
    unknown = sorted(set(spec) - valid)
    if unknown:
        from .config import did_you_mean

        raise ValueError(f"{path}: unknown key(s) {unknown}{did_you_mean(unknown, valid)}; valid keys are "
                         f"{sorted(valid)}.")
    for key in ("method", "models", "output"):
        if key not in spec:
            raise ValueError(f"{path}: missing required key {key!r}.")
    root = path.parent

    def resolve(value: Any, what: str) -> str:
        if not isinstance(value, str):
            raise ValueError(f"{path}: {what} must be a path string, got {value!r}.")
        return str((root / value).resolve()) if not Path(value).is_absolute() else value

    models = spec["models"]
    if isinstance(models, Mapping):
        models = {str(name): resolve(p, f"models.{name}") for name, p in models.items()}
    elif isinstance(models, Sequence) and not isinstance(models, str):
        models = [resolve(p, f"models[{i}]") for i, p in enumerate(models)]
    else:
        raise ValueError(f"{path}: models must be a list or a mapping of paths.")
    parameters = spec.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        raise ValueError(f"{path}: parameters must be a mapping.")
    options = {key: spec[key] for key in set(spec) - _RECIPE_KEYS}
    for key in _PATH_OPTIONS:
        if options.get(key) is not None:
            options[key] = resolve(options[key], key)
    return {
        "method": spec["method"],
        "base": resolve(spec["base"], "base") if spec.get("base") is not None else None,
        "models": models,
        "parameters": dict(parameters),
        "output": resolve(spec["output"], "output"),
        "options": options,
    }


def _merge_command(args: argparse.Namespace) -> int:
    from .api import merge
    from .config import MergeConfig

    spec = load_merge_spec(args.config)
    config = MergeConfig.from_dict({"method": spec["method"], **spec["parameters"]})
    options = {**spec["options"], **({"overwrite": True} if args.overwrite else {})}
    output = merge(spec["base"], spec["models"], config, output_dir=spec["output"], progress=not args.quiet, **options)
    if not args.quiet:
        print(f"Merged {len(spec['models'])} model(s) with {config.method} into {output}")
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-merge", description="Merge Hugging Face models.")
    commands = parser.add_subparsers(dest="command", required=True)
    merge_parser = commands.add_parser("merge", help="run the merge described by a YAML file")
    merge_parser.add_argument("config", help="YAML file with method, base, models, parameters, output")
    merge_parser.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    merge_parser.add_argument("--overwrite", action="store_true",
                              help="write into an existing folder hf-merge did not write (your files are kept)")
    merge_parser.set_defaults(func=_merge_command)
    methods_parser = commands.add_parser("methods", help="list merge methods and their defaults")
    methods_parser.set_defaults(func=_methods_command)
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
