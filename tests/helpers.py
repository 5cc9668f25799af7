"""Helpers shared by several test files: error measures, state-dict snapshots and comparisons, the whole-model TIES
reference, the permutation-symmetry models (model factories of the merge tests live in ``tiny_models``), and the
launch of two CPU processes (torchrun, accelerate launch)."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from hf_merge.methods.ties import disjoint_merge
from hf_merge.permutation import MLP, ResNet, apply_permutation, default_spec, random_permutations
from hf_merge.permutation.spec import state_dict_of
from tests import tiny_models


# ----------------------------------------------------------------------------------------- tensors and state dicts
def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖, computed in float64 (‖b‖ floored at 1e-30, so two zero tensors are 0 apart)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def state_of(model_or_state: torch.nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A snapshot of a model's state dict (or of a state dict): detached copies that later in-place writes leave alone."""
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    return {k: v.detach().clone() for k, v in state.items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *, atol: float | None = None) -> None:
    """The same keys, and under each the same dtype and values: bit-equal when ``atol`` is None, else
    ``torch.allclose`` in float32 with that ``atol`` (and its default ``rtol``)."""
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert value.dtype == b[key].dtype, key
        if atol is None:
            assert torch.equal(value, b[key]), key
        else:
            assert torch.allclose(value.float(), b[key].float(), atol=atol), key


# ----------------------------------------------------------------------------------------- TIES
def ties_reference(base, fts, density, scaling, aggregate="mean"):
    """The reference's whole-model computation on one flattened tasks × parameters matrix."""
    keys = list(base)
    flat = torch.stack([torch.cat([(ft[k] - base[k]).flatten() for k in keys]) for ft in fts])
    d = flat.shape[1]
    if density < 1:
        kth = flat.abs().kthvalue(d - int(d * density), dim=1, keepdim=True).values
    else:  # keep everything
        kth = torch.zeros(len(fts), 1)
    trimmed = flat * (flat.abs() >= kth)
    signs = torch.sign(trimmed.sum(0))
    signs[signs == 0] = torch.sign(signs.sum())
    merged = disjoint_merge(trimmed, signs, aggregate) * scaling
    out, offset = {}, 0
    for k in keys:
        n = base[k].numel()
        out[k] = base[k] + merged[offset:offset + n].view_as(base[k])
        offset += n
    return out


# ----------------------------------------------------------------------------------------- permutation symmetries
def randomized_resnet() -> ResNet:
    """A small BatchNorm ResNet whose BatchNorm statistics and affine parameters are not the trivial defaults."""
    model = ResNet(in_channels=1, widths=(4, 8), blocks_per_stage=2, num_classes=3).eval()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.copy_(torch.randn(module.num_features, generator=generator))
                module.bias.copy_(torch.randn(module.num_features, generator=generator))
    return model


def tiny_llama_without_gqa(tie_word_embeddings: bool = True) -> torch.nn.Module:
    """A rotary decoder with as many kv heads as query heads (the built-in Llama spec refuses GQA)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=tie_word_embeddings)
    ).eval()


BUILT_IN_MODELS = {
    "mlp": lambda: MLP([6, 12, 10, 3]).eval(),
    "resnet_bn": randomized_resnet,
    "bert": tiny_models.tiny_bert,
    "vit": tiny_models.tiny_vit,
    "llama_rotary": tiny_llama_without_gqa,
}


def permuted_copy(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of ``model`` with its weights moved by random permutations of its built-in spec (the same function)."""
    spec = default_spec(model)
    state = state_dict_of(model)
    sizes = spec.perm_sizes({k: v.shape for k, v in state.items()})
    out = copy.deepcopy(model)
    perms = random_permutations(spec, sizes, torch.Generator().manual_seed(seed))
    out.load_state_dict(apply_permutation(spec, perms, state))
    return out


def run_push_cli(argv: list[str]) -> tuple[int, str, str]:
    """``hf-merge push ...`` in process: (exit code, stdout, stderr)."""
    import argparse
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from hf_merge.hub.cli_push import add_push_parser

    parser = argparse.ArgumentParser(prog="hf-merge")
    add_push_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = args.func(args)
    return code, out.getvalue(), err.getvalue()


def push_to_test_hub(folder: str | Path, repo_id: str, *flags: str, monkeypatch: Any) -> dict[str, bytes]:
    """``hf-merge push FOLDER REPO_ID FLAGS`` to a fresh local test Hub (online for this test only); the pushed
    files ``{path_in_repo: bytes}``. Fails the test if the push fails."""
    import huggingface_hub.constants

    from tests.hub_server import HubTestServer

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with HubTestServer(token="hf_test") as hub:
        code, _, stderr = run_push_cli(["push", str(folder), repo_id, "--token", "hf_test", "--endpoint",
                                        hub.endpoint, *flags])
        assert code == 0, stderr
        return hub.files(repo_id)


# ------------------------------------------------------------------------------------------- two CPU processes
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_environment() -> dict[str, str]:
    """The test run's environment for launched processes: one thread each, this checkout importable, and none of a
    surrounding launch's variables."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", PYTHONPATH=str(REPO))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(name, None)
    return env


def accelerate_launch() -> list[str]:
    """``accelerate launch`` of two CPU processes: ``--multi_gpu`` selects its torchrun launcher (``--cpu
    --num_processes 2`` would select mpirun, which runs one process without it); gloo on CPU."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())]


def run_launched(command: list[str], timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=launcher_environment(), cwd=REPO, timeout=timeout, **kwargs)
