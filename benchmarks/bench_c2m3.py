"""Benchmark: merging 5 independently trained MLPs and 5 small BatchNorm CNNs on scikit-learn's ``digits``.

Methods: naive weight averaging, Git Re-Basin weight matching (every model matched to model 0), and C2M3 (joint
Frank–Wolfe to a universe; ``--reference`` adds the unanchored reference iteration), each with and without REPAIR
on the training set. Reports the merged test accuracy, test loss and loss barrier (merged loss − mean endpoint
loss), the wall time of the matching step, and draws the interpolation curves between models 0 and 1 (test loss
along (1 − α)θ₀ + α·π(θ₁)).

    python benchmarks/bench_c2m3.py            # full run (a few minutes on 2 cores)
    python benchmarks/bench_c2m3.py --quick    # smaller models and fewer epochs
    python benchmarks/bench_c2m3.py --families resnet   # the BatchNorm ResNet of hf_merge.permutation

Needs scikit-learn (``load_digits`` ships with it, nothing is downloaded); matplotlib for the plot (optional).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hf_merge.permutation import (
    MLP,
    ResNet,
    c2m3,
    compose_to,
    default_spec,
    merge_permuted,
    repair,
    weight_matching,
)
from hf_merge.permutation.spec import apply_permutation, identity_permutations

RESULTS = Path(__file__).parent / "results"


def load_digits_tensors(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8)
    y = torch.tensor(data.target, dtype=torch.long)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def make_model(kind: str, quick: bool) -> nn.Module:
    if kind == "mlp":
        width = 64 if quick else 128
        return MLP([64, width, width, 10])
    if kind == "resnet":
        return ResNet(in_channels=1, widths=(16, 32) if quick else (32, 64), blocks_per_stage=1, num_classes=10)
    c1, c2 = (16, 32) if quick else (32, 64)
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c2, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c2, 10),
    )


def forward(model: nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
    return model(x.flatten(1)) if kind == "mlp" else model(x)


def batches(x: torch.Tensor, y: torch.Tensor, size: int, generator: torch.Generator | None = None):
    order = torch.randperm(len(x), generator=generator) if generator is not None else torch.arange(len(x))
    return [(x[order[i:i + size]], y[order[i:i + size]]) for i in range(0, len(x), size)]


def train(kind: str, seed: int, data, epochs: int, quick: bool) -> nn.Module:
    torch.manual_seed(seed)
    model = make_model(kind, quick)
    x_train, y_train = data[0], data[1]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for xb, yb in batches(x_train, y_train, 64, generator):
            optimizer.zero_grad()
            nn.functional.cross_entropy(forward(model, kind, xb), yb).backward()
            optimizer.step()
    return model.eval()


def evaluate(model: nn.Module, kind: str, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = forward(model, kind, x)
    return float((logits.argmax(1) == y).float().mean()), float(nn.functional.cross_entropy(logits, y))


def load(template: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    return model


class InputAdapter:
    """Dataloader for REPAIR: (inputs, labels) batches with the inputs shaped for the model."""

    def __init__(self, kind: str, x: torch.Tensor, y: torch.Tensor) -> None:
        self.items = [(xb.flatten(1) if kind == "mlp" else xb, yb) for xb, yb in batches(x, y, 256)]

    def __iter__(self):
        return iter(self.items)


def run_family(kind: str, args, data) -> dict:
    x_train, y_train, x_test, y_test = data
    epochs = args.epochs or ((8 if kind == "mlp" else 5) if args.quick else (20 if kind == "mlp" else 10))
    start = time.perf_counter()
    models = [train(kind, seed, data, epochs, args.quick) for seed in range(args.models)]
    train_time = time.perf_counter() - start
    template = models[0]
    spec = default_spec(template)
    states = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]
    endpoint = [evaluate(m, kind, x_test, y_test) for m in models]
    endpoint_loss = float(np.mean([loss for _, loss in endpoint]))
    loader = InputAdapter(kind, x_train, y_train)

    sizes = spec.perm_sizes({k: v.shape for k, v in states[0].items()})
    timings = {}
    start = time.perf_counter()
    wm_perms = [identity_permutations(sizes)] + [weight_matching(states[0], s, spec) for s in states[1:]]
    timings["weight_matching"] = time.perf_counter() - start
    start = time.perf_counter()
    c2m3_perms = c2m3(states, spec, max_iter=args.max_iter)
    timings["c2m3"] = time.perf_counter() - start
    alignments = {
        "naive": [identity_permutations(sizes)] * len(states),
        "weight_matching": wm_perms,
        "c2m3": c2m3_perms,
    }
    if args.reference:
        start = time.perf_counter()
        alignments["c2m3_reference"] = c2m3(states, spec, max_iter=args.max_iter, anchor=False)
        timings["c2m3_reference"] = time.perf_counter() - start

    rows = {}
    for method, perms in alignments.items():
        merged_state, aligned = merge_permuted(spec, states, perms)
        merged = load(template, merged_state)
        acc, loss = evaluate(merged, kind, x_test, y_test)
        rows[method] = {"accuracy": acc, "loss": loss, "barrier": loss - endpoint_loss}
        repaired = repair(load(template, merged_state), [load(template, s) for s in aligned], loader)
        acc, loss = evaluate(repaired, kind, x_test, y_test)
        rows[f"{method}+repair"] = {"accuracy": acc, "loss": loss, "barrier": loss - endpoint_loss}

    curves = interpolation_curves(kind, template, spec, states, alignments, loader, x_test, y_test, args.points)
    return {
        "epochs": epochs,
        "train_seconds": train_time,
        "endpoints": {"accuracy": [a for a, _ in endpoint], "loss": [loss for _, loss in endpoint]},
        "endpoint_mean": {"accuracy": float(np.mean([a for a, _ in endpoint])), "loss": endpoint_loss},
        "merged": rows,
        "matching_seconds": timings,
        "interpolation": curves,
    }


def interpolation_curves(kind, template, spec, states, alignments, loader, x_test, y_test, points) -> dict:
    """Test loss on (1 − α)θ₀ + α·π(θ₁) for each alignment, without and with REPAIR (goal weights (1 − α, α))."""
    alphas = np.linspace(0.0, 1.0, points)
    out = {"alpha": alphas.tolist()}
    for method, perms in alignments.items():
        other = apply_permutation(spec, compose_to(perms[0], perms[1]), states[1])
        endpoints = [load(template, states[0]), load(template, other)]
        plain, repaired = [], []
        for alpha in alphas:
            mixed = {
                k: ((1 - alpha) * v + alpha * other[k]) if v.is_floating_point() else v for k, v in states[0].items()
            }
            plain.append(evaluate(load(template, mixed), kind, x_test, y_test)[1])
            if 0.0 < alpha < 1.0:
                model = repair(load(template, mixed), endpoints, loader, weights=[1 - alpha, alpha])
                repaired.append(evaluate(model, kind, x_test, y_test)[1])
            else:
                repaired.append(plain[-1])
        out[method] = plain
        out[f"{method}+repair"] = repaired
    return out


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4))
    for ax, (kind, result) in zip(np.atleast_1d(axes), results.items()):
        curves = result["interpolation"]
        for method, style in (("naive", "C0"), ("weight_matching", "C1"), ("c2m3", "C2"), ("c2m3_reference", "C3")):
            if method not in curves:
                continue
            ax.plot(curves["alpha"], curves[method], color=style, linestyle="--", label=method)
            ax.plot(curves["alpha"], curves[f"{method}+repair"], color=style, label=f"{method}+repair")
        ax.set_title(f"{kind}: model 0 → model 1 (digits test loss)")
        ax.set_xlabel("α")
        ax.set_ylabel("test loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller models, fewer epochs")
    parser.add_argument("--models", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default depends on the family)")
    parser.add_argument("--max-iter", type=int, default=200, help="C2M3 Frank–Wolfe iterations")
    parser.add_argument("--points", type=int, default=7, help="points on the interpolation curve")
    parser.add_argument("--reference", action="store_true",
                        help="also run the reference C2M3 iteration (anchor=False; slower, can stall)")
    parser.add_argument("--families", default="mlp,cnn", help="comma-separated: mlp, cnn (conv-BN), resnet")
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = load_digits_tensors()
    results = {kind: run_family(kind, args, data) for kind in args.families.split(",")}

    RESULTS.mkdir(parents=True, exist_ok=True)
    plotted = plot(results, RESULTS / "c2m3_interpolation.png")
    payload = {"config": vars(args), "results": results}
    (RESULTS / "c2m3.json").write_text(json.dumps(payload, indent=2) + "\n")

    for kind, result in results.items():
        mean = result["endpoint_mean"]
        print(f"\n{kind}: {args.models} models, {result['epochs']} epochs; endpoints mean acc "
              f"{mean['accuracy']:.4f}, loss {mean['loss']:.4f}")
        print(f"{'method':<24}{'test acc':>10}{'test loss':>11}{'barrier':>10}")
        for method, row in result["merged"].items():
            print(f"{method:<24}{row['accuracy']:>10.4f}{row['loss']:>11.4f}{row['barrier']:>10.4f}")
        seconds = result["matching_seconds"]
        print(f"matching time: weight matching {seconds['weight_matching']:.2f}s ({args.models - 1} pairs), "
              f"C2M3 {seconds['c2m3']:.2f}s (joint)"
              + (f", unanchored reference C2M3 {seconds['c2m3_reference']:.2f}s" if args.reference else ""))
    print(f"\nwrote {RESULTS / 'c2m3.json'}" + (f" and {RESULTS / 'c2m3_interpolation.png'}" if plotted else ""))


if __name__ == "__main__":
    main()
