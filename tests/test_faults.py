"""The fault matrix: every bad input or fault a user can hit, and what hf_merge does about it.

Each row sets up its inputs in a fresh folder, runs one call, and asserts that the call fails with an error naming
the culprit (or, where the fault is recoverable, that the result is right). Around every row the harness asserts
that nothing outside the row's output folder changed (every file listed and hashed before and after) and that no
staging folder, lock or other temporary entry was left behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import hf_merge
from hf_merge import MergeError
from hf_merge.cli import main
from hf_merge.io.publish import MARKER, OutputFolderError
from tests.tiny_models import finetuned_copy, tiny_bert

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------- harness
def snapshot(folder: Path, skip: str | None) -> dict[str, str]:
    """``{relative path: content hash}`` of every entry under ``folder`` except the ``skip`` subtree."""
    out = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if skip is not None and (relative == skip or relative.startswith(skip + "/")):
            continue
        if any(_is_temporary(part) for part in Path(relative).parts):  # checked by leftovers()
            continue
        if path.is_symlink():
            out[relative] = "link:" + os.readlink(path)
        elif path.is_file():
            out[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[relative] = "dir"
    return out


def _is_temporary(name: str) -> bool:
    return name.endswith(".lock") or ".tmp-" in name or ".old-" in name or "hf_merge-staging" in name


def leftovers(folder: Path) -> list[str]:
    """Temporary entries a run may create (staging folders, locks, moved-aside earlier outputs)."""
    return [p.relative_to(folder).as_posix() for p in folder.iterdir() if _is_temporary(p.name)] + [
        p.relative_to(folder).as_posix() for p in folder.rglob("*/*") if _is_temporary(p.name)]


@dataclasses.dataclass
class Fault:
    """One row: ``setup(tmp) -> action``; the action raises ``error`` matching ``message``, or returns a result that
    ``check(result, tmp)`` verifies. ``target`` is the one path under tmp the action may change."""

    name: str
    setup: Callable[[Path], Callable[[], Any]]
    error: type[BaseException] | tuple[type[BaseException], ...] | None = None
    message: str = ""
    check: Callable[[Any, Path], None] | None = None
    target: str | None = "out"


def _save(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / "model.safetensors")
    return folder


def _state(value: float = 0.0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4, 3), value, dtype=dtype), "b": torch.full((3,), value, dtype=dtype)}


def _checkpoints(tmp: Path) -> tuple[Path, list[Path]]:
    base = _save(tmp / "base", _state(0.0))
    return base, [_save(tmp / f"ft{i}", _state(float(i + 1))) for i in range(2)]


def _merge(tmp: Path, output: str = "out", **kwargs: Any) -> Callable[[], Any]:
    base, fts = _checkpoints(tmp)
    kwargs.setdefault("scaling", 0.5)
    return lambda: hf_merge.merge(base, fts, "task_arithmetic", output_dir=tmp / output, progress=False, **kwargs)


def _merged_weight(tmp: Path, folder: str = "out") -> torch.Tensor:
    return load_file(tmp / folder / "model.safetensors")["w"]


# --------------------------------------------------------------------------------------------------- output folders
def _into_an_input(tmp: Path, where: str) -> Callable[[], Any]:
    base, fts = _checkpoints(tmp)
    target = {"base": base, "inside_ft": fts[0] / "sub", "parent": tmp}[where]
    return lambda: hf_merge.merge(base, fts, "task_arithmetic", scaling=0.5, output_dir=target, progress=False)


def _cli_dot_output(tmp: Path) -> Callable[[], Any]:
    (tmp / "notes.txt").write_text("my notes")
    return _cli(tmp, output=".")


def _existing_file(tmp: Path) -> Callable[[], Any]:
    (tmp / "out").write_text("a file, not a folder")
    return _merge(tmp)


def _foreign_folder(tmp: Path, overwrite: bool) -> Callable[[], Any]:
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("keep me")
    (tmp / "out" / "model.safetensors").write_bytes(b"the user's own file")
    return _merge(tmp, overwrite=overwrite)


def _corrupt_marker(tmp: Path) -> Callable[[], Any]:
    _merge(tmp, scaling=0.1)()
    (tmp / "out" / MARKER).write_text("{not json")
    return _merge(tmp)


def _check_foreign_kept(result: Any, tmp: Path) -> None:
    assert (tmp / "out" / "notes.txt").read_text() == "keep me"
    assert torch.equal(_merged_weight(tmp), torch.full((4, 3), 1.5))  # 0.5·(1 + 2)
    assert json.loads((tmp / "out" / MARKER).read_text())["entries"]


def _earlier_output(tmp: Path) -> Callable[[], Any]:
    _merge(tmp, scaling=0.1)()
    (tmp / "out" / "my_eval.txt").write_text("added by the user")
    return _merge(tmp, scaling=0.5)


def _check_rewritten(result: Any, tmp: Path) -> None:
    assert torch.equal(_merged_weight(tmp), torch.full((4, 3), 1.5))
    assert (tmp / "out" / "my_eval.txt").read_text() == "added by the user"


def _compress_onto_its_base(tmp: Path) -> Callable[[], Any]:
    base, fts = _checkpoints(tmp)
    return lambda: hf_merge.compress(base, fts, "tsv_c", output_dir=base, progress=False)


def _symlinked_folder(tmp: Path) -> Callable[[], Any]:
    (tmp / "real").mkdir()
    (tmp / "out").symlink_to(tmp / "real", target_is_directory=True)
    return _merge(tmp)


def _check_written_through(result: Any, tmp: Path) -> None:
    assert (tmp / "out").is_symlink() and torch.equal(_merged_weight(tmp, "real"), torch.full((4, 3), 1.5))


def _mount_point(tmp: Path) -> Callable[[], Any]:
    (tmp / "out").mkdir()
    _merge(tmp, scaling=0.1)()  # an earlier output in the "mounted" folder
    action = _merge(tmp)
    original = os.replace

    def refuse_renaming_the_mount(src: Any, dst: Any) -> None:
        if Path(src) == tmp / "out":
            raise OSError(16, "Device or resource busy", str(src))  # EBUSY, as for a mount point
        original(src, dst)

    def run() -> Any:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(os, "replace", refuse_renaming_the_mount)
            return action()

    return run


def _check_published_inside(result: Any, tmp: Path) -> None:
    assert torch.equal(_merged_weight(tmp), torch.full((4, 3), 1.5))


def _locked(tmp: Path) -> Callable[[], Any]:
    from hf_merge.io import publish

    action = _merge(tmp)

    def run() -> Any:
        with publish._lock((tmp / "out").absolute()):  # another run holds the lock
            return action()

    return run


def _read_only_parent(tmp: Path) -> Callable[[], Any]:
    import builtins

    (tmp / "out").mkdir()
    _merge(tmp, scaling=0.1)()
    action = _merge(tmp)
    original = builtins.open

    def refuse_the_parent(file: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(str(file)) == tmp / ".out.lock":
            raise PermissionError(13, "Read-only file system", str(file))
        return original(file, *args, **kwargs)

    def run() -> Any:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(builtins, "open", refuse_the_parent)
            return action()

    return run


def _stale_staging(tmp: Path) -> Callable[[], Any]:
    stale = tmp / ".out.tmp-999999999-dead"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    action = _merge(tmp)

    def run() -> Any:
        result = action()
        assert not stale.exists()  # removed: its process is gone
        return result

    return run


def _umask_permissions(tmp: Path) -> Callable[[], Any]:
    return _merge(tmp)


def _check_permissions(result: Any, tmp: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp / "out").stat().st_mode & 0o777 == 0o777 & ~mask


def _sigterm(tmp: Path) -> Callable[[], Any]:
    script = (
        "import os, signal, sys\n"
        "from hf_merge.io.publish import publish_folder\n"
        "with publish_folder(sys.argv[1]) as staging:\n"
        "    (staging / 'model.safetensors').write_bytes(b'half written')\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
    )

    def run() -> None:
        done = subprocess.run([sys.executable, "-c", script, str(tmp / "out")], env={**os.environ,
                              "PYTHONPATH": str(ROOT)}, capture_output=True, timeout=120)
        assert done.returncode == 128 + 15, done.stderr
        raise SystemExit("terminated")

    return run


# ----------------------------------------------------------------------------------------------------------- values
def _overflow(tmp: Path, dtype: torch.dtype, method: str) -> Callable[[], Any]:
    base = _save(tmp / "base", _state(60000.0, dtype))
    ft = _save(tmp / "ft", _state(65000.0, dtype))
    params = {"scaling": 3.0} if method == "task_arithmetic" else {"density": 1.0, "scaling": 3.0}
    return lambda: hf_merge.merge(base, [ft], method, output_dir=tmp / "out", progress=False, **params)


def _scheduled_global_ties(tmp: Path) -> Callable[[], Any]:
    base, fts = _checkpoints(tmp)
    density = hf_merge.Schedule({"w": 0.5}, default=0.2)  # two densities: two sets of "global" statistics
    return lambda: hf_merge.merge(base, fts, "ties", density=density, output_dir=tmp / "out", progress=False)


def _bad_config(method: str, **params: Any) -> Callable[[Path], Callable[[], Any]]:
    return lambda tmp: lambda: hf_merge.get_merger(method, **params)


# ------------------------------------------------------------------------------------------------ integrity of inputs
def _overlapping_offsets(tmp: Path) -> Callable[[], Any]:
    base, fts = _checkpoints(tmp)
    path = fts[0] / "model.safetensors"
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header["w"]["data_offsets"] = [0, 48]
    header["b"]["data_offsets"] = [36, 48]  # overlaps w
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :])
    return lambda: hf_merge.merge(base, fts, "task_arithmetic", scaling=0.5, output_dir=tmp / "out", progress=False)


def _sharded(tmp: Path, index: dict[str, str], shards: dict[str, dict[str, torch.Tensor]], single: bool = False) -> Path:
    folder = tmp / "sharded"
    folder.mkdir()
    for name, state in shards.items():
        save_file(state, folder / name)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    if single:
        save_file(_state(1.0), folder / "model.safetensors")
    return folder


def _stale_duplicate(tmp: Path) -> Callable[[], Any]:
    base = _save(tmp / "base", _state(0.0))
    ft = _sharded(tmp, {"w": "a.safetensors", "b": "b.safetensors"},
                  {"a.safetensors": {"w": torch.full((4, 3), 2.0)},
                   "b.safetensors": {"b": torch.full((3,), 2.0), "w": torch.full((4, 3), 99.0)}})  # stale w in b
    return lambda: hf_merge.merge(base, [ft], "task_arithmetic", scaling=1.0, output_dir=tmp / "out", progress=False)


def _check_indexed_copy(result: Any, tmp: Path) -> None:
    assert torch.equal(_merged_weight(tmp), torch.full((4, 3), 2.0))


def _contradicting_index(tmp: Path) -> Callable[[], Any]:
    base = _save(tmp / "base", _state(0.0))
    ft = _sharded(tmp, {"w": "b.safetensors", "b": "b.safetensors"},
                  {"a.safetensors": {"w": torch.ones(4, 3)}, "b.safetensors": {"b": torch.ones(3)}})
    return lambda: hf_merge.merge(base, [ft], "task_arithmetic", scaling=1.0, output_dir=tmp / "out", progress=False)


def _stale_index(tmp: Path) -> Callable[[], Any]:
    base = _save(tmp / "base", _state(0.0))
    ft = _sharded(tmp, {"w": "gone.safetensors", "b": "gone.safetensors"}, {}, single=True)

    def run() -> Any:
        with pytest.warns(UserWarning, match="index is ignored"):
            return hf_merge.merge(base, [ft], "task_arithmetic", scaling=1.0, output_dir=tmp / "out",
                                  progress=False)

    return run


def _check_single_file(result: Any, tmp: Path) -> None:
    assert torch.equal(_merged_weight(tmp), torch.ones(4, 3))


def _malformed_json(tmp: Path, what: str) -> Callable[[], Any]:
    base, fts = _checkpoints(tmp)
    if what == "index.json":
        (fts[0] / "model.safetensors").rename(fts[0] / "a.safetensors")
        (fts[0] / "model.safetensors.index.json").write_text('{"weight_map": {"w": "a.safetensors",')
    elif what == "config.json":
        (fts[0] / "config.json").write_text("{not json")
    elif what == "adapter_config.json":
        (fts[0] / "adapter_config.json").write_text("[1, 2")
    elif what == "merge_config.json":
        (tmp / "cfg").mkdir()
        (tmp / "cfg" / "merge_config.json").write_text('{"method": "ties",')
        return lambda: hf_merge.MergeConfig.from_pretrained(tmp / "cfg")
    return lambda: hf_merge.merge(base, fts, "task_arithmetic", scaling=0.5, output_dir=tmp / "out", progress=False)


def _lora_rank_mismatch(tmp: Path) -> Callable[[], Any]:
    from peft import LoraConfig, get_peft_model

    base = tiny_bert()
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["query"]))
    peft_model.save_pretrained(tmp / "adapter")
    config = json.loads((tmp / "adapter" / "adapter_config.json").read_text())
    (tmp / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "r": 2}))
    plain = tiny_bert()
    return lambda: hf_merge.merge(plain, [tmp / "adapter"], "task_arithmetic", scaling=1.0, output_dir=tmp / "out",
                                  progress=False)


class _Residual(torch.nn.Module):
    """A custom residual MLP: the default (sequential) permutation spec does not describe its symmetries."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6), torch.nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.fc1(x))
        return self.head(hidden + self.fc2(hidden))


def _residual_weight_matching(tmp: Path) -> Callable[[], Any]:
    torch.manual_seed(0)
    models = [_Residual(), _Residual()]
    return lambda: hf_merge.merge(None, models, "weight_matching", progress=False)


def _legacy_pickle(tmp: Path) -> Callable[[], Any]:
    base = _save(tmp / "base", _state(0.0))
    (tmp / "legacy").mkdir()
    torch.save(_state(2.0), tmp / "legacy" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    return lambda: hf_merge.merge(base, [tmp / "legacy"], "task_arithmetic", scaling=0.5, allow_pickle=True,
                                  output_dir=tmp / "out", progress=False)


def _check_legacy(result: Any, tmp: Path) -> None:
    assert torch.equal(_merged_weight(tmp), torch.full((4, 3), 1.0))


def _fp8(tmp: Path, value: float) -> Callable[[], Any]:
    dtype = torch.float8_e4m3fn
    base = _save(tmp / "base", _state(0.0, dtype))
    ft = _save(tmp / "ft", _state(value, dtype))
    return lambda: hf_merge.merge(base, [ft], "task_arithmetic", scaling=2.0, output_dir=tmp / "out", progress=False)


def _check_fp8(result: Any, tmp: Path) -> None:
    merged = _merged_weight(tmp)
    assert merged.dtype == torch.float8_e4m3fn and torch.equal(merged.float(), torch.full((4, 3), 4.0))


def _llama(tied: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)).eval()


def _untied_copy(model: torch.nn.Module, folder: Path) -> Path:
    """``model`` fine-tuned and saved untied: ``lm_head.weight`` stored on its own, with values of its own."""
    from transformers import LlamaForCausalLM

    config = model.config.to_dict() | {"tie_word_embeddings": False}
    untied = LlamaForCausalLM(type(model.config)(**config))
    untied.load_state_dict({**finetuned_copy(model, 3).state_dict()}, strict=False)
    with torch.no_grad():
        untied.lm_head.weight.copy_(untied.model.embed_tokens.weight + 0.5)
    untied.save_pretrained(folder)
    return folder


def _tie_mismatch(tmp: Path, base_ties: bool) -> Callable[[], Any]:
    base = _llama(tied=base_ties)
    base.save_pretrained(tmp / "base")
    if base_ties:
        other = _untied_copy(base, tmp / "ft")
    else:
        tied = _llama(tied=True)
        tied.model.load_state_dict(finetuned_copy(base, 3).model.state_dict())
        tied.save_pretrained(tmp / "ft")
        other = tmp / "ft"

    def run() -> Any:
        import warnings

        results = []
        for base_input in (tmp / "base", base):  # a folder and a model: the same answer
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                merged = hf_merge.merge(base_input, [other], "task_arithmetic", scaling=1.0, progress=False)
            results.append((merged.state_dict(), [str(w.message) for w in caught]))
        return results

    return run


def _check_tied_base(result: Any, tmp: Path) -> None:
    (from_folder, warned_folder), (from_model, warned_model) = result
    assert all(torch.equal(from_folder[k], from_model[k]) for k in from_model)
    assert torch.equal(from_model["lm_head.weight"], from_model["model.embed_tokens.weight"])  # tied, as the base
    assert any("stores 'lm_head.weight' separately" in message for message in warned_folder + warned_model)


def _check_untied_base(result: Any, tmp: Path) -> None:
    (from_folder, _), (from_model, _) = result
    assert all(torch.equal(from_folder[k], from_model[k]) for k in from_model)
    from transformers import LlamaForCausalLM

    tied = LlamaForCausalLM.from_pretrained(tmp / "ft")
    base = LlamaForCausalLM.from_pretrained(tmp / "base")
    expected = base.lm_head.weight + (tied.model.embed_tokens.weight - base.lm_head.weight)  # the task's lm_head is
    torch.testing.assert_close(from_model["lm_head.weight"], expected)  # its input embedding, as transformers reads it


# --------------------------------------------------------------------------------------------------------- task banks
def _bank(tmp: Path) -> tuple[Path, Path]:
    base = tiny_bert()
    base.save_pretrained(tmp / "base")
    fts = {f"t{i}": finetuned_copy(base, i + 1) for i in range(2)}
    hf_merge.compress(tmp / "base", fts, "tsv_c", output_dir=tmp / "bank", progress=False)
    return tmp / "base", tmp / "bank"


def _bank_base_changed(tmp: Path) -> Callable[[], Any]:
    base, bank = _bank(tmp)
    finetuned_copy(tiny_bert(), 7).save_pretrained(base)  # same shapes, other values
    return lambda: hf_merge.TaskBank.from_pretrained(bank)


def _bank_tasks_reordered(tmp: Path) -> Callable[[], Any]:
    _, bank = _bank(tmp)
    manifest = json.loads((bank / "task_bank.json").read_text())
    manifest["tasks"] = manifest["tasks"][::-1]
    (bank / "task_bank.json").write_text(json.dumps(manifest))
    return lambda: hf_merge.TaskBank.from_pretrained(bank)


def _bank_payload_nan(tmp: Path) -> Callable[[], Any]:
    _, bank = _bank(tmp)
    payload = bank / "payload" / "model.safetensors"
    tensors = load_file(payload)
    name = next(k for k in tensors if k.endswith("::s.0"))
    tensors[name][0] = float("nan")
    metadata = __import__("safetensors").safe_open(str(payload), "pt").metadata()
    save_file(tensors, payload, metadata=metadata)
    return lambda: hf_merge.TaskBank.from_pretrained(bank).load_task("t0")


def _bank_removed(tmp: Path) -> Callable[[], Any]:
    import shutil

    _, bank = _bank(tmp)
    opened = hf_merge.TaskBank.from_pretrained(bank)
    shutil.rmtree(bank / "payload")
    return lambda: opened.load_task("t0")


# ----------------------------------------------------------------------------------------------------- bounded waits
def _silent_hub(tmp: Path) -> Callable[[], Any]:
    from hf_merge.hub import RetryPolicy, push_folder
    from tests.hub_server import NEVER_ANSWER, HubTestServer

    _save(tmp / "folder", _state(1.0))

    def run() -> Any:
        import huggingface_hub.constants

        with HubTestServer(token="hf_test") as server, pytest.MonkeyPatch.context() as patch:
            patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
            server.fail("create", NEVER_ANSWER, times=2)
            started = time.monotonic()
            try:
                push_folder(tmp / "folder", "me/merge", token="hf_test", endpoint=server.endpoint,
                            retry=RetryPolicy(max_attempts=2, timeout=0.5, sleep=lambda seconds: None))
            finally:
                assert time.monotonic() - started < 30
                assert not server.commits  # nothing committed

    return run


# ---------------------------------------------------------------------------------------------------------------- CLI
def _cli(tmp: Path, spec_text: str | None = None, **spec: Any) -> Callable[[], Any]:
    _checkpoints(tmp)
    text = spec_text if spec_text is not None else yaml.safe_dump(
        {"method": "task_arithmetic", "base": "base", "models": ["ft0", "ft1"], "parameters": {"scaling": 0.5},
         "output": "out", **spec})
    (tmp / "merge.yaml").write_text(text)

    def run() -> None:
        import contextlib
        import io

        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            code = main(["merge", str(tmp / "merge.yaml"), "--quiet"])
        lines = stderr.getvalue().strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("hf-merge: error: "), stderr.getvalue()
        raise ValueError(lines[0])

    return run


def _consensus_beyond_the_tasks(tmp: Path) -> Callable[[], Any]:
    def run() -> Any:
        with pytest.warns(UserWarning, match=r"k=3 exceeds the number of tasks \(2\).*returns the base"):
            return hf_merge.merge(_state(0.0), [_state(1.0), _state(2.0)], "consensus", k=3, progress=False)

    return run


def _check_base_returned(result: Any, tmp: Path) -> None:
    assert all(torch.equal(result[key], value) for key, value in _state(0.0).items())


# ---------------------------------------------------------------------------------------------- errors (test_errors)
def _tensors(base: dict, finetuned: Any, config: str = "task_arithmetic", **kwargs: Any) -> Callable[[Path], Any]:
    if config == "task_arithmetic":
        kwargs.setdefault("scaling", 1.0)
    return lambda tmp: lambda: hf_merge.merge(base, finetuned, config, output_dir=tmp / "out", progress=False,
                                              **kwargs)


def _data_merge(method: str, data: Any, base_kind: str = "folder", **kwargs: Any) -> Callable[[Path], Any]:
    """A data-aware (or other) merge of saved tiny BERT folders (or, with ``base_kind="state_dict"``, of bare state
    dicts) with ``data`` (a function of the example batches) into ``out``."""
    def setup(tmp: Path) -> Callable[[], Any]:
        base = tiny_bert()
        models = {"base": base, "a": finetuned_copy(base, 1), "b": finetuned_copy(base, 2)}
        if base_kind == "folder":
            for name, model in models.items():
                model.save_pretrained(tmp / name)
            inputs: dict[str, Any] = {name: tmp / name for name in models}
        else:
            inputs = {name: dict(model.state_dict()) for name, model in models.items()}
        examples = [{"input_ids": torch.arange(4, 12)} for _ in range(4)]
        loader = torch.utils.data.DataLoader(examples, batch_size=2)
        return lambda: hf_merge.merge(inputs["base"], {"a": inputs["a"], "b": inputs["b"]}, method,
                                      data=data(loader), output_dir=tmp / "out", progress=False, **kwargs)
    return setup


NAN = float("nan")
FAULTS = [
    # output folders
    Fault("output_dir is the base", lambda tmp: _into_an_input(tmp, "base"), OutputFolderError, r"'.*base' is the input"),
    Fault("output_dir inside a fine-tuned folder", lambda tmp: _into_an_input(tmp, "inside_ft"), OutputFolderError,
          r"lies inside the input '.*ft0'"),
    Fault("output_dir contains the inputs", lambda tmp: _into_an_input(tmp, "parent"), OutputFolderError,
          r"contains the input"),
    Fault("CLI output: . (the project folder)", _cli_dot_output, ValueError,
          r"hf-merge: error: output_dir '.*' contains the input", target=None),
    Fault("output_dir is an existing file", _existing_file, OutputFolderError, r"'.*out' is an existing file"),
    Fault("existing folder of the user's", lambda tmp: _foreign_folder(tmp, False), OutputFolderError,
          r"holds files hf_merge did not write \(model.safetensors, notes.txt\).*overwrite=True"),
    Fault("a corrupt output marker makes the folder the user's", _corrupt_marker, OutputFolderError,
          r"holds files hf_merge did not write"),
    Fault("existing folder of the user's with overwrite=True", lambda tmp: _foreign_folder(tmp, True),
          check=_check_foreign_kept),
    Fault("an earlier output, with a file the user added", _earlier_output, check=_check_rewritten),
    Fault("compress into its own base", _compress_onto_its_base, OutputFolderError, r"is the input '.*base'"),
    Fault("symlinked output folder", _symlinked_folder, check=_check_written_through, target="real"),
    Fault("output folder that cannot be renamed (mount point)", _mount_point, check=_check_published_inside),
    Fault("output folder under a parent that cannot be written (a mounted volume)", _read_only_parent,
          check=_check_published_inside),
    Fault("two runs into one output_dir", _locked, OutputFolderError, r"Another run is writing into '.*out'"),
    Fault("stale staging folder of a killed run", _stale_staging, check=lambda result, tmp: None),
    Fault("folders get the umask's permissions", _umask_permissions, check=_check_permissions),
    Fault("SIGTERM while writing", _sigterm, SystemExit, "terminated"),
    # values
    Fault("float16 overflow after the cast (Task Arithmetic)", lambda tmp: _overflow(tmp, torch.float16,
          "task_arithmetic"), MergeError, r"tensor '(w|b)': merged values overflow float16"),
    Fault("float16 overflow after the cast (one-pass TIES)", lambda tmp: _overflow(tmp, torch.float16, "ties"),
          MergeError, r"tensor '(w|b)': merged values overflow float16"),
    Fault("DARE drop_rate=nan", _bad_config("dare", drop_rate=NAN, then=hf_merge.TaskArithmeticConfig(scaling=1.0)),
          ValueError, "drop_rate must be a finite number", target=None),
    Fault("TSV-M scaling=nan", _bad_config("tsv_m", scaling=NAN), ValueError, "scaling must be a finite", target=None),
    Fault("Iso-C scaling=inf", _bad_config("iso_c", scaling=math.inf), ValueError, "scaling must be a finite",
          target=None),
    Fault("LiNeS alpha=nan", _bad_config("lines", alpha=NAN), ValueError, "alpha must be a finite", target=None),
    Fault("Consensus mask_threshold=nan", _bad_config("consensus", mask_threshold=NAN), ValueError,
          "mask_threshold must be a finite", target=None),
    Fault("average weights with a NaN", _bad_config("average", weights=[1.0, NAN]), ValueError,
          r"weights\[1\] must be a finite", target=None),
    # integrity of inputs
    Fault("safetensors header with overlapping offsets", _overlapping_offsets, ValueError,
          r"ft0/model.safetensors: invalid safetensors file"),
    Fault("stale duplicate in another shard", _stale_duplicate, check=_check_indexed_copy),
    Fault("index contradicting its shards", _contradicting_index, ValueError,
          r"index.json puts tensor 'w' in b.safetensors, which does not hold it"),
    Fault("stale index next to model.safetensors", _stale_index, check=_check_single_file),
    Fault("malformed index.json", lambda tmp: _malformed_json(tmp, "index.json"), ValueError,
          r"model.safetensors.index.json: malformed JSON at line 1"),
    Fault("malformed config.json", lambda tmp: _malformed_json(tmp, "config.json"), ValueError,
          r"ft0/config.json: malformed JSON"),
    Fault("malformed adapter_config.json", lambda tmp: _malformed_json(tmp, "adapter_config.json"), ValueError,
          r"adapter_config.json: malformed JSON"),
    Fault("malformed merge_config.json", lambda tmp: _malformed_json(tmp, "merge_config.json"), ValueError,
          r"merge_config.json: malformed JSON", target=None),
    Fault("LoRA adapter whose r disagrees with its tensors", _lora_rank_mismatch, ValueError,
          r"rank 4 \(lora_A\).*gives r=2"),
    Fault("weight matching on a residual custom model", _residual_weight_matching, ValueError,
          "default permutation spec does not describe _Residual", target=None),
    Fault("legacy (non-zip) pytorch_model.bin", _legacy_pickle, check=_check_legacy),
    Fault("fp8 inputs", lambda tmp: _fp8(tmp, 2.0), check=_check_fp8),
    Fault("fp8 overflow after the cast", lambda tmp: _fp8(tmp, 400.0), MergeError,
          r"merged values overflow float8_e4m3fn"),
    Fault("untied fine-tune (lm_head stored) of a tied base", lambda tmp: _tie_mismatch(tmp, True),
          check=_check_tied_base, target=None),
    Fault("tied fine-tune of an untied base", lambda tmp: _tie_mismatch(tmp, False), check=_check_untied_base,
          target=None),
    # task banks
    Fault("bank whose base changed", _bank_base_changed, ValueError, r"base .* changed since the bank was written",
          target=None),
    Fault("bank whose manifest task order was edited", _bank_tasks_reordered, ValueError,
          r"lists the tasks \['t1', 't0'\], but the payload model.safetensors holds \['t0', 't1'\]", target=None),
    Fault("bank payload holding a NaN", _bank_payload_nan, MergeError, r"rebuild task 't0' with NaN", target=None),
    Fault("bank folder removed after opening", _bank_removed, FileNotFoundError, r"was removed after it was opened",
          target=None),
    # bounded waits
    Fault("push to an endpoint that never answers", _silent_hub, Exception, r"failed 2 time\(s\).*nothing was committed",
          target=None),
    # CLI
    Fault("CLI: YAML syntax error", lambda tmp: _cli(tmp, "method: ties\nmodels: [a, b\n"), ValueError,
          r"hf-merge: error: .*merge.yaml: not valid YAML at line"),
    Fault("CLI: device=cuda without CUDA", lambda tmp: _cli(tmp, device="cuda"), ValueError,
          r"hf-merge: error: device='cuda', but no CUDA device is available"),
    Fault("CLI: bad size units", lambda tmp: _cli(tmp, max_shard_size="abc"), ValueError,
          r"hf-merge: error: Invalid memory size 'abc'"),
    Fault("CLI: unknown key with a suggestion", lambda tmp: _cli(tmp, max_shardsize="1GB"), ValueError,
          r"unknown key\(s\) \['max_shardsize'\] \(did you mean 'max_shard_size'\?\)"),
    Fault("CLI: method name typo", lambda tmp: _cli(tmp, method="tie"), ValueError,
          r"Unknown merge method 'tie' \(did you mean 'ties'\?\)"),
    Fault("overwrite that is not a bool", lambda tmp: _merge(tmp, overwrite="yes"), TypeError,
          "overwrite must be a bool"),
    Fault("memory_budget with bad units", lambda tmp: _merge(tmp, memory_budget="4 gigs"), ValueError,
          r"Invalid memory size '4 gigs'"),
    Fault("overwrite on an in-memory output", lambda tmp: lambda: hf_merge.merge(_state(0.0), [_state(1.0)],
          "task_arithmetic", scaling=1.0, overwrite=True, progress=False), ValueError,
          r"cannot honour the option\(s\) \['overwrite'\]", target=None),
    Fault("parameter name typo", _bad_config("ties", densty=0.3), ValueError,
          r"Unknown parameter\(s\) \['densty'\] for method 'ties' \(did you mean 'density'\?\)", target=None),
    # the cases of test_errors.py
    Fault("missing and extra tensors", _tensors({"a": torch.zeros(2), "b": torch.zeros(2)},
          [{"a": torch.ones(2), "c": torch.ones(2)}]), MergeError, r"missing \['b'\].*extra \['c'\]"),
    Fault("shape mismatch", _tensors({"l.weight": torch.zeros(4, 3)}, [{"l.weight": torch.zeros(3, 4)}]), MergeError,
          r"'l.weight'.*\(4, 3\).*\(3, 4\)"),
    Fault("dtype mismatch", _tensors({"w": torch.zeros(4)}, [{"w": torch.ones(4, dtype=torch.bfloat16)}]),
          MergeError, r"dtype mismatch for 'w'"),
    Fault("NaN input", _tensors({"w": torch.zeros(3)}, {"math": {"w": torch.tensor([0.0, NAN, 1.0])}}), MergeError,
          r"task 'math'.*'w'.*NaN or Inf"),
    Fault("NaN input, global TIES", _tensors({"w": torch.zeros(3)}, {"math": {"w": torch.tensor([0.0, NAN, 1.0])}},
          "ties"), MergeError, r"'w'.*NaN or Inf"),
    Fault("missing checkpoint folder", lambda tmp: _tensors({"w": torch.zeros(1)}, [tmp / "nowhere"])(tmp),
          FileNotFoundError, r"task 'task_0'.*nowhere"),
    Fault("pickle without allow_pickle", lambda tmp: (torch.save(_state(), _save(tmp / "p", {}) / "pytorch_model.bin"),
          (tmp / "p" / "model.safetensors").unlink(), _tensors(_state(), [tmp / "p"])(tmp))[-1], ValueError,
          r"pytorch_model\.bin.*allow_pickle=True"),
    Fault("unknown method", _tensors({"w": torch.zeros(1)}, [{"w": torch.zeros(1)}], "frankenmerge"), ValueError,
          r"Unknown merge method 'frankenmerge'.*'ties'"),
    Fault("average weights not matching the models", _tensors({"w": torch.zeros(1)}, [{"w": torch.zeros(1)}] * 3,
          "average", weights=[1, 2]), ValueError, "2 weights given for 3 models"),
    Fault("Consensus with k > T", _consensus_beyond_the_tasks, check=_check_base_returned, target=None),
    Fault("TIES density out of range", _bad_config("ties", density=1.5), ValueError, "density must be in",
          target=None),
    Fault("DARE then of the wrong type", _bad_config("dare", drop_rate=0.5, then="ties"), TypeError, "then must be",
          target=None),
    # schedules
    Fault("schedule point out of range", _bad_config("slerp", t=hf_merge.Schedule([0.0, 1.5])), ValueError,
          r"t must be in \[0, 1\], got 1.5", target=None),
    Fault("schedule without a catch-all", lambda tmp: lambda: hf_merge.Schedule({"self_attn": 0.3}), ValueError,
          "give default=", target=None),
    Fault("schedule rule after the catch-all", lambda tmp: lambda: hf_merge.Schedule([{"value": 1}, {"filter": "mlp",
          "value": 2}]), ValueError, "can never apply", target=None),
    Fault("schedule with NaN", lambda tmp: lambda: hf_merge.Schedule([0.1, NAN]), ValueError, "finite", target=None),
    Fault("schedule splitting global TIES statistics", _scheduled_global_ties, ValueError, "scope='tensor'"),
    # data-aware merges
    Fault("data-aware merge without data", _data_merge("regmean", lambda loader: None), ValueError,
          r"'regmean' learns from data"),
    Fault("data-aware merge missing a task's data", _data_merge("fisher", lambda loader: {"a": loader}), ValueError,
          r"none was given for \['b'\]"),
    Fault("data for a task that is not an input", _data_merge("regmean", lambda loader: {"a": loader, "b": loader,
          "c": loader}), ValueError, r"not among the inputs"),
    Fault("data given to a method that uses none", _data_merge("task_arithmetic", lambda loader: {"a": loader,
          "b": loader}, scaling=0.5), ValueError, r"'task_arithmetic' uses no data"),
    Fault("data-aware merge of bare state dicts", _data_merge("regmean_plus", lambda loader: {"a": loader, "b": loader},
          base_kind="state_dict"), ValueError, r"needs its architecture"),
    Fault("raw text without a tokenizer", _data_merge("regmean", lambda loader: {"a": ["red"], "b": ["blue"]}),
          ValueError, r"task 'a' is raw text, but no tokenizer"),
    Fault("AdaMerging learning rate of zero", _bad_config("adamerging", lr=0.0), ValueError, "lr must be > 0",
          target=None),
    Fault("WUDI unknown solver", _bad_config("wudi", solver="lbfgs"), ValueError, "solver must be one of",
          target=None),
    # distributed merges (two processes failing: tests/test_distributed.py)
    Fault("distributed=True without launched processes", lambda tmp: _merge(tmp, distributed=True), ValueError,
          "torch.distributed is not initialised"),
    Fault("distributed that is not a bool", lambda tmp: _merge(tmp, distributed="yes"), TypeError,
          "distributed must be True, False or None"),
]


@pytest.mark.parametrize("fault", FAULTS, ids=lambda fault: fault.name)
def test_fault(fault: Fault, tmp_path: Path) -> None:
    action = fault.setup(tmp_path)
    skip = None if fault.error is not None else fault.target  # a refused run changes nothing at all
    before = snapshot(tmp_path, skip)
    if fault.error is not None:
        with pytest.raises(fault.error, match=fault.message):
            action()
    else:
        fault.check(action(), tmp_path)
    assert snapshot(tmp_path, skip) == before, "something outside the output folder changed"
    assert leftovers(tmp_path) == [], "temporary entries left behind"


def test_every_row_of_the_matrix_has_a_distinct_name() -> None:
    names = [fault.name for fault in FAULTS]
    assert len(names) == len(set(names))


# ------------------------------------------------------------------------------------------------- property-based
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_FINITE = st.floats(min_value=-3.0, max_value=3.0, allow_nan=False, allow_infinity=False)
_FRACTION = st.floats(min_value=0.05, max_value=1.0)
_CONFIGS = st.one_of(
    st.builds(lambda s: hf_merge.TaskArithmeticConfig(scaling=s), _FINITE),
    st.builds(lambda d, s, scope: hf_merge.TiesConfig(density=d, scaling=s, scope=scope), _FRACTION, _FINITE,
              st.sampled_from(["global", "tensor"])),
    st.builds(lambda p, s: hf_merge.DareConfig(drop_rate=p, then=hf_merge.TaskArithmeticConfig(scaling=s)),
              st.floats(min_value=0.0, max_value=0.9), _FINITE),
    st.builds(lambda s: hf_merge.TSVMergeConfig(scaling=s), _FINITE),
    st.builds(lambda s: hf_merge.IsoCConfig(scaling=s), _FINITE),
    st.builds(lambda s, k: hf_merge.ConsensusConfig(scaling=s, k=k), _FINITE, st.integers(0, 3)),
    st.builds(lambda w: hf_merge.AverageConfig(weights=w), st.lists(st.floats(0.1, 5.0), min_size=2, max_size=2)),
    st.builds(lambda w, flat: hf_merge.NuSlerpConfig(weights=w, flatten=flat),
              st.lists(st.floats(0.1, 5.0), min_size=2, max_size=2), st.booleans()),
    st.just(hf_merge.MultiSlerpConfig()),
    st.just(hf_merge.KarcherConfig()),
    st.builds(lambda f: hf_merge.ModelStockConfig(filter_wise=f), st.booleans()),
    st.builds(lambda d, s: hf_merge.DellaConfig(density=d, scaling=s), st.floats(0.2, 0.8), _FINITE),
    st.builds(lambda d, s, e: hf_merge.BreadcrumbsConfig(density=d, scaling=s, sign_election=e), st.floats(0.1, 0.9),
              _FINITE, st.booleans()),
    st.builds(lambda k: hf_merge.SCEConfig(select_topk=k), st.floats(0.1, 1.0)),
    st.builds(lambda s: hf_merge.MagMaxConfig(scaling=s), _FINITE),
    st.builds(lambda steps, solver: hf_merge.WUDIConfig(steps=steps, solver=solver), st.integers(0, 5),
              st.sampled_from(["adam", "closed_form"])),
)


@settings(max_examples=80, deadline=None)
@given(config=_CONFIGS, seed=st.integers(0, 2**16), magnitude=st.sampled_from([1e-3, 1.0, 1e3, 1e30]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_random_valid_merges_never_return_a_non_finite_tensor(config, seed, magnitude, dtype) -> None:
    generator = torch.Generator().manual_seed(seed)
    base = {"w": (torch.randn(6, 5, generator=generator) * magnitude).to(dtype), "b": torch.randn(5).to(dtype)}
    fts = [{k: (v.float() + torch.randn(v.shape, generator=generator) * magnitude).to(dtype) for k, v in base.items()}
           for _ in range(2)]
    if not all(torch.isfinite(t).all() for state in (base, *fts) for t in state.values()):
        return  # inputs that do not fit the dtype are refused as inputs (another row)
    try:
        merged = hf_merge.merge(base, fts, config, progress=False)
    except MergeError as error:
        assert "overflow" in str(error) or "NaN or Inf" in str(error)
        return
    assert all(torch.isfinite(t).all() for t in merged.values())


@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from([("ties", "density"), ("ties", "scaling"), ("task_arithmetic", "scaling"),
                              ("tsv_m", "scaling"), ("iso_cts", "common_space_fraction"), ("lines", "beta"),
                              ("consensus", "scaling")]),
       value=st.one_of(st.just(math.nan), st.just(math.inf), st.just(-math.inf), st.floats(1.0001, 1e6),
                       st.floats(-1e6, -1e-6), st.text(max_size=3), st.booleans()))
def test_random_invalid_values_are_always_refused(field, value) -> None:
    method, name = field
    params = {name: value, **({"alpha": 0.5} if method == "lines" else {})}
    if name in ("scaling", "beta") and isinstance(value, float) and math.isfinite(value):
        return  # any finite scaling is valid
    with pytest.raises((ValueError, TypeError), match=name):
        hf_merge.get_merger(method, **params)


# ------------------------------------------------------------------------------------------------------ package data
def test_an_install_with_pip_target_writes_merged_folders_with_cards(tmp_path: Path) -> None:
    """The card templates ship inside the package: an install outside sys.prefix (--target, --user, a system
    Python) can write an output_dir merge."""
    import shutil

    source = tmp_path / "source"  # a copy: building in place would leave build/ and egg-info in the checkout
    shutil.copytree(ROOT / "hf_merge", source / "hf_merge", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(tmp_path / "site"), str(source)], check=True, timeout=600)
    assert (tmp_path / "site" / "hf_merge" / "model_cards" / "merged_model.md").is_file()
    assert (tmp_path / "site" / "hf_merge" / "py.typed").is_file()
    script = (
        "import sys, torch, hf_merge\n"
        "assert hf_merge.__file__.startswith(sys.argv[1]), hf_merge.__file__\n"
        "hf_merge.merge({'w': torch.zeros(2)}, [{'w': torch.ones(2)}], 'task_arithmetic', scaling=1.0,\n"
        "               output_dir=sys.argv[2], progress=False)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "site"), str(tmp_path / "out")], check=True,
                   cwd=tmp_path, env={**env, "PYTHONPATH": str(tmp_path / "site")}, timeout=300)
    assert "hf-merge" in (tmp_path / "out" / "README.md").read_text()
