"""RegMean (Jin et al., ICLR 2023) and RegMean++ (Nguyen et al., 2025): per linear layer, the weights that best match
every fine-tuned layer's outputs on its own task's inputs, in closed form.

For a linear layer y = W x (W stored out × in) with input Gram matrices G_i = X_iᵀ X_i / n_i on task i's data,
regularised G̃_i = α G_i + (1 − α) diag(G_i), RegMean's merged weight is (eq. 3, transposed to W's orientation)

    W* = (Σ_i W_i G̃_i)(Σ_i G̃_i)⁻¹,   i.e.  τ* = (Σ_i τ_i G̃_i)(Σ_i G̃_i)⁻¹  with τ_i = W_i − W₀,

solved by a Cholesky factorisation (a small ridge, reported in the summary, where the sum is singular). Every other
parameter is averaged. The models run block by block: each task's inputs to the first residual block are captured
once, then every block runs on the inputs of the one before, so only one block's Gram matrices are held at a time.
RegMean takes block ℓ's inputs from task i's own blocks < ℓ; RegMean++ from the already merged blocks < ℓ (its
inputs to the first block from the averaged embeddings), so that each layer's statistics see the merged model's
representation. A model without one recognised stack of blocks runs whole (RegMean++ is then RegMean). Only the
block being fitted sits on the compute device (with the embeddings and head); the others wait on the CPU.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..config import MergeConfig, MethodCard, check_fraction, check_positive_int
from ..data import TaskModels, capture_inputs, run_until, token_mask
from ..errors import MergeError
from ..params import ParamInfo
from ..registry import register_method
from .base import Merger

if TYPE_CHECKING:
    from ..context import MergeContext

REGMEAN_BIBTEX = """@inproceedings{jin2023dataless,
  title     = {Dataless Knowledge Fusion by Merging Weights of Language Models},
  author    = {Jin, Xisen and Ren, Xiang and Preotiuc-Pietro, Daniel and Cheng, Pengxiang},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2023}
}"""
REGMEAN_PLUS_BIBTEX = """@article{nguyen2025regmeanplus,
  title   = {{RegMean++}: Enhancing Effectiveness and Generalization of Regression Mean for Model Merging},
  author  = {Nguyen, The-Hai and Huu-Tien, Dang and Suzuki, Takeshi and Nguyen, Le-Minh},
  journal = {arXiv preprint arXiv:2508.03121},
  year    = {2025}
}"""
#: Input widths up to this accumulate each batch's Gram product in float64; wider ones multiply in float32 (the
#: running sum stays float64).
FLOAT64_GRAM_WIDTH = 1024
#: Container names of residual-block stacks (as in :data:`hf_merge.params.BLOCK_PATTERN`).
_STACK_NAME = re.compile(r"(?:^|\.)(layers|layer|h|blocks|block|resblocks)$")


@dataclasses.dataclass(kw_only=True)
class RegMeanConfig(MergeConfig):
    """``alpha`` scales the Gram matrices' off-diagonal entries (α = 1: plain Gram; α = 0: a diagonal-weighted
    average); ``num_examples`` of each task's data are run in batches of ``batch_size``."""

    method: str = dataclasses.field(default="regmean", init=False)
    alpha: float = 0.95
    num_examples: int = 256
    batch_size: int = 16

    card: ClassVar[MethodCard] = MethodCard(
        title="RegMean (regression mean)",
        summary=(
            "Each linear layer of the merged model is the least-squares fit to every fine-tuned model's layer "
            "outputs on a few hundred inputs of its own task: W* = (Σ_i W_i G_i)(Σ_i G_i)⁻¹, with G_i the Gram matrix "
            "of the layer's inputs on task i (off-diagonal entries scaled by α). Only inner-product statistics of "
            "the data are used, never labels; other parameters are averaged."
        ),
        bibtex=REGMEAN_BIBTEX,
        paper_url="https://arxiv.org/abs/2212.09849",
    )

    def __post_init__(self) -> None:
        check_fraction("alpha", self.alpha)
        check_positive_int("num_examples", self.num_examples)
        check_positive_int("batch_size", self.batch_size)


@dataclasses.dataclass(kw_only=True)
class RegMeanPlusConfig(RegMeanConfig):
    """RegMean with each layer's Gram matrices taken on inputs propagated through the already merged layers."""

    method: str = dataclasses.field(default="regmean_plus", init=False)

    card: ClassVar[MethodCard] = MethodCard(
        title="RegMean++",
        summary=(
            "RegMean's closed-form merge of every linear layer, W* = (Σ_i W_i G_i)(Σ_i G_i)⁻¹, with the Gram matrices "
            "of layer ℓ computed on inputs that passed through the already merged layers before it, so that each "
            "layer is fitted to the representation the merged model will actually feed it."
        ),
        bibtex=REGMEAN_PLUS_BIBTEX,
        paper_url="https://arxiv.org/abs/2508.03121",
    )


def regularized_gram(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """G̃ = α G + (1 − α) diag(G)."""
    return gram * alpha + torch.diag(gram.diagonal() * (1.0 - alpha))


def solve_right(weighted: torch.Tensor, gram_sum: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(X, ridge)`` with X (Σ G̃ + ridge·I) = B for B = ``weighted`` (out × in) and the symmetric ``gram_sum``, by a
    Cholesky factorisation; ``ridge`` is 0 unless the sum is singular, then the smallest of 1e-10, 1e-8, ... times its
    largest diagonal entry that factors."""
    scale = float(gram_sum.diagonal().abs().max())
    ridge = 0.0
    while True:
        factor, info = torch.linalg.cholesky_ex(gram_sum + ridge * torch.eye(len(gram_sum), dtype=gram_sum.dtype))
        if int(info) == 0:
            return torch.cholesky_solve(weighted.T, factor).T, ridge
        ridge = scale * 1e-10 if ridge == 0.0 else ridge * 100.0
        if scale == 0.0 or ridge > scale:
            raise MergeError("RegMean: the sum of the Gram matrices is not positive definite even with a ridge of "
                             f"{ridge:.3g} (largest diagonal entry {scale:.3g}).")


def regmean(deltas: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """τ* = (Σ_i τ_i G̃_i)(Σ_i G̃_i)⁻¹ of one linear weight (out × in) from its task vectors and input Gram matrices."""
    regularized = [regularized_gram(gram.double(), alpha) for gram in grams]
    weighted = sum(delta.double() @ gram for delta, gram in zip(deltas, regularized))
    return solve_right(weighted, sum(regularized))[0].to(deltas[0].dtype)


class _Gram:
    """The running Gram matrix XᵀX / n of one linear layer's inputs (padding tokens left out)."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.rows = 0
        self.mask: torch.Tensor | None = None  # the current batch's attention mask

    def add(self, inputs: torch.Tensor) -> None:
        mask = token_mask({"attention_mask": self.mask}, inputs.shape) if self.mask is not None else None
        rows = inputs[mask] if mask is not None else inputs.reshape(-1, inputs.shape[-1])
        rows = rows.double() if rows.shape[-1] <= FLOAT64_GRAM_WIDTH else rows.float()
        product = (rows.T @ rows).double()
        self.total = product if self.total is None else self.total.add_(product)
        self.rows += rows.shape[0]

    def mean(self) -> torch.Tensor | None:
        return None if self.total is None or self.rows == 0 else self.total / self.rows


@dataclasses.dataclass
class _Block:
    """One residual block (or the whole model): its module, its linear layers by key, and every key it holds."""

    module: torch.nn.Module
    linears: dict[str, tuple[torch.nn.Module, bool]]  # key -> (module, transposed: stored (in, out) like Conv1D)
    keys: list[str]


#: A forward call of a block: positional and keyword arguments, and the batch's attention mask.
_Call = tuple[tuple[Any, ...], dict[str, Any], Any]


class RegMeanMerger(Merger):
    uses_data = True
    config: RegMeanConfig
    #: RegMean++: blocks see the inputs of the merged blocks before them.
    sequential: ClassVar[bool] = False

    def prepare(self, ctx: MergeContext) -> None:
        models = ctx.task_models(self.config.method)
        keys = [k for k in ctx.merge_keys if models.base.has(k)]
        work = models.build(lambda key: models.base.get(key).float(), device="cpu")
        self.work, self.models = work, models
        self.merged: dict[str, torch.Tensor] = {}
        self.ridges: dict[str, float] = {}
        blocks = _blocks(work, models, set(keys))
        if blocks[0].module is work:
            work.to(ctx.device)
        else:  # only one block at a time on the compute device: the rest of the model there, the blocks on the CPU
            in_blocks = {id(t) for block in blocks for t in (*block.module.parameters(), *block.module.buffers())}
            with torch.no_grad():
                for tensor in (*work.parameters(), *work.buffers()):
                    if id(tensor) not in in_blocks:
                        tensor.data = tensor.data.to(ctx.device)
        calls = self._first_calls(ctx, models, work, blocks, keys)
        for block in ctx.tracker.track(blocks, f"{self.config.method} (blocks)"):
            block.module.to(ctx.device)
            calls = self._merge_block(ctx, models, block, calls)
            if block.module is not work:
                block.module.to("cpu")
        del self.work, self.models

    def _first_calls(self, ctx: MergeContext, models: TaskModels, work: torch.nn.Module, blocks: list[_Block],
                     keys: list[str]) -> dict[str, list[_Call]]:
        """Each task's calls of the first block: its batches run through the weights before it (the task's own for
        RegMean, the tasks' average for RegMean++); the batches themselves when the model runs whole."""
        config = self.config
        batches = {task: list(models.batches(task, config.batch_size, config.num_examples)) for task in ctx.task_names}
        if blocks[0].module is work:
            return {task: [((), dict(b), b.get("attention_mask")) for b in task_batches]
                    for task, task_batches in batches.items()}
        in_blocks = {key for block in blocks for key in block.keys}
        outside = [key for key in keys if key not in in_blocks]
        calls: dict[str, list[_Call]] = {}
        if self.sequential:
            self._load(_mean(models.weights(task, outside) for task in ctx.task_names))
        for task in ctx.task_names:
            if not self.sequential:
                self._load(models.weights(task, outside))
            with torch.no_grad(), capture_inputs(blocks[0].module) as captured:
                for batch in batches[task]:
                    run_until(work, batch)
            calls[task] = [(args, kwargs, batch.get("attention_mask"))
                           for (args, kwargs), batch in zip(captured, batches[task])]
        return calls

    def _merge_block(self, ctx: MergeContext, models: TaskModels, block: _Block,
                     calls: dict[str, list[_Call]]) -> dict[str, list[_Call]]:
        """Merge one block's linear layers from every task's Gram matrices; return every task's calls of the next."""
        alpha = self.config.alpha
        base = {key: models.base.get(key).float() for key in block.linears}
        gram_sums: dict[str, torch.Tensor] = {}
        weighted: dict[str, torch.Tensor] = {}
        weight_sum: dict[str, torch.Tensor] = {}
        next_calls: dict[str, list[_Call]] = {}
        for task in ctx.task_names:
            weights = models.weights(task, block.keys)
            self._load(weights)
            for key, value in weights.items():
                weight_sum[key] = weight_sum[key].add_(value) if key in weight_sum else value.clone()
            grams = {key: _Gram() for key in block.linears}
            handles = [module.register_forward_hook(lambda _m, inputs, _o, gram=grams[key]: gram.add(inputs[0]))
                       for key, (module, _) in block.linears.items()]
            try:
                outputs = _run(block.module, calls[task], grams.values())
            finally:
                for handle in handles:
                    handle.remove()
            if not self.sequential:
                next_calls[task] = outputs
            for key, (_, transposed) in block.linears.items():
                gram = grams[key].mean()
                if gram is None:  # the layer never ran on this task's data
                    continue
                regularized = regularized_gram(gram, alpha)
                delta = weights[key] - base[key]
                delta = (delta.T if transposed else delta).double()
                gram_sums[key] = gram_sums[key].add_(regularized) if key in gram_sums else regularized
                weighted[key] = weighted[key].add_(delta @ regularized) if key in weighted else delta @ regularized
        for key, (_, transposed) in block.linears.items():
            if key not in gram_sums:
                continue
            solution, ridge = solve_right(weighted[key], gram_sums[key])
            if not torch.isfinite(solution).all():
                raise MergeError(f"{self.config.method}: the merged weight {key!r} is not finite.")
            if ridge:
                self.ridges[key] = ridge
            self.merged[key] = (solution.T if transposed else solution).float().contiguous()
        if not self.sequential:
            return next_calls
        count = len(ctx.task_names)
        self._load({key: self.merged[key] + base[key] if key in self.merged else total / count
                    for key, total in weight_sum.items()})
        return {task: _run(block.module, calls[task], ()) for task in ctx.task_names}

    def _load(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy ``weights`` (by input key) into the working model, wherever its tensors are now."""
        with torch.no_grad():
            for name, tensor in self.work.state_dict().items():
                key = self.models.key_of(name)
                if key in weights:
                    tensor.copy_(weights[key])

    def merge_tensor(self, key: str, base: torch.Tensor, deltas: list[torch.Tensor], info: ParamInfo) -> torch.Tensor:
        if key in self.merged:
            return self.merged[key].to(base.device)
        return torch.stack(deltas).mean(dim=0)

    def statistics(self) -> dict[str, float] | None:
        return {"regmean_layers": float(len(self.merged)), "ridge_layers": float(len(self.ridges))}


class RegMeanPlusMerger(RegMeanMerger):
    config: RegMeanPlusConfig
    sequential = True


def _mean(weights: Any) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    count = 0
    for each in weights:
        count += 1
        for key, value in each.items():
            total[key] = total[key].add_(value) if key in total else value.clone()
    return {key: value / count for key, value in total.items()}


def _run(module: torch.nn.Module, calls: list[_Call], grams: Any) -> list[_Call]:
    """Run ``module`` on each call (the Gram accumulators see the call's attention mask); the calls of the next block:
    the same arguments with the hidden states replaced by this block's output."""
    grams = list(grams)
    out: list[_Call] = []
    with torch.no_grad():
        for args, kwargs, mask in calls:
            for gram in grams:
                gram.mask = mask
            result = module(*args, **kwargs)
            hidden = result[0] if isinstance(result, tuple) else result
            if args:
                out.append(((hidden, *args[1:]), kwargs, mask))
            elif "hidden_states" in kwargs:
                out.append(((), {**kwargs, "hidden_states": hidden}, mask))
            else:
                out.append(((), kwargs, mask))  # the whole model: nothing follows
    return out


def _blocks(model: torch.nn.Module, models: TaskModels, keys: set[str]) -> list[_Block]:
    """The model's residual blocks in order, when it has exactly one recognised stack of them; else the whole model
    as one block."""
    stacks = [(name, module) for name, module in model.named_modules()
              if isinstance(module, torch.nn.ModuleList) and _STACK_NAME.search(name) and len(module)
              and any(models.key_of(f"{name}.0.{param}") in keys for param, _ in module[0].named_parameters())]
    if len(stacks) == 1:
        name, stack = stacks[0]
        return [_block(module, f"{name}.{index}.", models, keys) for index, module in enumerate(stack)]
    return [_block(model, "", models, keys)]


def _block(module: torch.nn.Module, prefix: str, models: TaskModels, keys: set[str]) -> _Block:
    linears = {}
    for name, sub in module.named_modules():
        transposed = type(sub).__name__ == "Conv1D"  # transformers' GPT-2 Conv1D stores (in, out)
        if isinstance(sub, torch.nn.Linear) or transposed:
            key = models.key_of(f"{prefix}{name}.weight")
            if key in keys:
                linears[key] = (sub, transposed)
    block_keys = [key for key in (models.key_of(f"{prefix}{name}") for name, t in module.state_dict().items()
                                  if t.is_floating_point()) if key in keys]
    return _Block(module, linears, block_keys)


register_method(RegMeanConfig, RegMeanMerger)
register_method(RegMeanPlusConfig, RegMeanPlusMerger)
