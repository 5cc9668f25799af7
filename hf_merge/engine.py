"""The engine: one run for every merge — validate the plan's inputs once, run the method's statistics passes, then
stream every output tensor from the sources through the method into a sink.

    inputs ──► sources ──► merger.prepare (statistics passes) ──► one tensor at a time ──► sink ──► record

:func:`run` chooses the route and owns iteration, dtypes, device, memory and progress; it names no method:

- *encoded*: a compressor's parts per tensor, for a task bank;
- *one pass*: a merge that reads every input once (:attr:`Merger.one_pass`), amended at the end;
- *low rank*: a method's low-rank form on factored updates, for a LoRA output;
- *linear*: θ₀ + Σ_t c_t τ_t in one fused accumulation, for methods linear in the task vectors;
- *Gram*: the method run on each tensor's Gram coordinates, then one fused combination (SLERP family, Model Stock);
- *per tensor*: ``merge_tensor`` on the float32 base and task vectors.

Under ``torch.distributed`` (:mod:`hf_merge.distributed`) the run is split: each process takes its share of the keys
through the same route into its share of the sink (:meth:`Sink.split`), and the statistics passes reduce across the
processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from .context import MergeContext
from .data import check_data_for
from .distributed import SINGLE, Ranks, ranks_for, split_keys
from .errors import MergeError
from .inputs import bind_deltas, classify_sources, reconcile_tied_embeddings, validate_sources
from .io.deltas import DeltaSource, LowRankSource
from .io.prefetch import Prefetcher
from .io.sinks import Sink
from .io.sources import TensorSource
from .kernels import fused_add_store
from .linalg import cpu_threads, gram_coordinates
from .lowrank import LowRank
from .methods.base import Merger, ModelMerger, TaskCompressor
from .options import MergeOptions
from .params import classify_parameters
from .placement import release_freed_memory
from .progress import Progress
from .record import MergeRecord
from .summary import MergeSummary
from .tensors import Amendment, TensorMeta, check_output_finite, numpy_view
from .tuning import TUNING
from .vocab import vocabulary_of


@dataclasses.dataclass
class Plan:
    """What to merge: the base θ₀ (``None`` for methods that merge whole models), the tasks, the method, what the
    output records about the merge, and optionally a model whose modules classify the parameters."""

    base: TensorSource | None
    tasks: Mapping[str, TensorSource]
    merger: Merger
    record: MergeRecord | None = None
    architecture: torch.nn.Module | None = None


def check_plan(plan: Plan) -> None:
    """Refuse a plan whose method and inputs do not go together (before anything is built for its output)."""
    method = plan.merger.config.method
    if isinstance(plan.merger, ModelMerger):
        if plan.base is not None:
            raise ValueError(f"Method {method!r} merges models without a base: call merge(None, models, ...).")
        if len(plan.tasks) < 2:
            raise ValueError(f"Method {method!r} needs at least two models, got {len(plan.tasks)}.")
    elif plan.base is None:
        raise ValueError(f"Method {method!r} needs the pre-trained base model θ₀ (base=None given).")


def run(plan: Plan, sink: Sink, options: MergeOptions) -> Any:
    """Carry out ``plan`` into ``sink`` under ``options``; return what the sink returns. The whole run has
    ``options.num_threads`` CPU threads (torch and every BLAS/OpenMP pool, restored afterwards: :func:`cpu_threads`)."""
    with cpu_threads(options.num_threads):
        return _run(plan, sink, options)


def _run(plan: Plan, sink: Sink, options: MergeOptions) -> Any:
    check_plan(plan)
    sink.check_options(options)
    if isinstance(plan.merger, ModelMerger):
        return _run_whole_models(plan, sink, options)
    ranks = ranks_for(options.distributed, sink.splits_across_ranks, f"The output, {sink.description},")
    ctx = _context(plan, options, ranks)
    summary = MergeSummary.of(plan.merger.config.method, len(plan.tasks) + 1, ctx.metas,
                              _output_metas(ctx.metas, options.dtype))
    try:
        if ctx.owners is not None:  # a split run: this process merges its keys into its share of the output
            sink = sink.split(ranks, ctx.owners)
            summary.split(ranks.world_size, ctx.owners, ctx.metas)
        with ctx.tracker:
            plan.merger.prepare(ctx if plan.merger.reduces_across_ranks else ctx.unsplit())
            summary.finish(_stream(plan, ctx, sink))
        return _finish(plan, sink, summary, options, ctx)
    except BaseException as error:
        ranks.fail(error)
        sink.abort(error)
        raise


@contextlib.contextmanager
def merged_tensors(plan: Plan, options: MergeOptions) -> Iterator[Callable[[str], torch.Tensor]]:
    """``key → merged tensor`` (output dtype, CPU) of each floating-point key of ``plan``, on demand, in any order:
    for a caller that assembles one output from several merges (a layer stack, :mod:`hf_merge.stack`) and reads
    ahead itself. The plan is validated and prepared (statistics passes) on entry, as :func:`run` does it, and each
    tensor merged by the route ``run`` would take, never in one pass (nothing can be amended once handed out)."""
    if isinstance(plan.merger, (ModelMerger, TaskCompressor)):
        raise ValueError(f"Method {plan.merger.config.method!r} does not merge tensor by tensor from a base; it cannot "
                         "merge part of a model.")
    check_plan(plan)
    with cpu_threads(options.num_threads):
        ctx = _context(plan, options).nested()
        buffers = _BufferSink()
        buffers.begin(_output_metas(ctx.metas, options.dtype), ctx.infos, 0)
        with ctx.tracker, contextlib.ExitStack() as stack:
            plan.merger.prepare(ctx)
            ctx.prefetch_depth = 0  # the caller's order is not known here: no read-ahead of keys it may ask for later
            floating = [k for k, m in ctx.metas.items() if m.dtype.is_floating_point]
            yield _tensor_route(plan.merger, ctx, buffers, stack, floating, buffers.metas)[1]


class _BufferSink(Sink):
    """Fresh output buffers for :func:`merged_tensors` (whose caller takes the tensors)."""

    def put(self, key: str, value: Any) -> None:
        raise TypeError("merged_tensors hands its tensors to the caller.")

    def finish(self, record: MergeRecord | None) -> None:
        return None


def _finish(plan: Plan, sink: Sink, summary: MergeSummary, options: MergeOptions,
            ctx: MergeContext | None = None) -> Any:
    """Report the summary, store it with the record, and let the sink finish (publish)."""
    plan_of_vocabulary = vocabulary_of(plan.base if plan.base is not None else next(iter(plan.tasks.values())))
    if plan_of_vocabulary is not None:
        summary.vocabulary = {"tokenizer_source": plan_of_vocabulary.source,
                              "rows": plan_of_vocabulary.rows or plan_of_vocabulary.layout_rows}
    summary.statistics = plan.merger.statistics()
    if ctx is not None and ctx.ranks.split:
        summary.statistics = ctx.ranks.combined_statistics(
            summary.statistics, sum(math.prod(ctx.metas[k].shape) for k in ctx.merge_keys))
    summary.report(options.progress and (ctx is None or ctx.ranks.rank == 0))
    if plan.record is not None:
        plan.record.summary.update(summary.to_dict())
    return sink.finish(plan.record)


def _context(plan: Plan, options: MergeOptions, ranks: Ranks = SINGLE) -> MergeContext:
    """The run's context: on a split run, this process's keys are those :func:`split_keys` gives its rank."""
    base, tasks = plan.base, plan.tasks
    check_data_for(plan.merger, options.data, list(tasks))
    bind_deltas(base, tasks)
    reconcile_tied_embeddings(base, tasks)
    metas = validate_sources(base, tasks, dtype=options.dtype)
    if plan.merger.uses_param_info or plan.architecture is not None:
        infos = classify_sources(base, tasks, architecture=plan.architecture)
    else:  # elementwise methods ignore the kinds: skip building the architecture
        infos = classify_parameters(base.shapes(), config=base.config)
    out_metas = _output_metas(metas, options.dtype)
    return MergeContext(
        base, tasks, infos, metas, device=options.device, progress=options.progress and ranks.rank == 0,
        prefetch_depth=read_ahead_depth(metas, len(tasks) + 1, options),
        output_dtypes={k: m.dtype for k, m in out_metas.items()}, bounded_memory=options.memory_budget is not None,
        data=options.data, ranks=ranks, owners=split_keys(metas, ranks.world_size) if ranks.split else None,
    )


def _output_metas(metas: Mapping[str, TensorMeta], dtype: torch.dtype | None) -> dict[str, TensorMeta]:
    return {
        k: TensorMeta(m.shape, dtype if dtype is not None and m.dtype.is_floating_point else m.dtype)
        for k, m in metas.items()
    }


def read_ahead_depth(metas: Mapping[str, TensorMeta], num_inputs: int, options: MergeOptions) -> int:
    """How many tensors to read ahead while keeping the merge within ``options.memory_budget`` (the output needs no
    room of its own: each tensor goes to its sink as it is produced).

    The working set of one tensor is about (inputs + 3) float32 copies of it (base, task vectors, temporaries, the
    output); read-ahead doubles it. Raises :class:`MergeError` when even one tensor's working set does not fit.
    """
    budget = options.memory_budget
    if budget is None:
        return 1
    largest_key, working = working_set(metas, num_inputs)
    if largest_key is None:
        return 0
    if working > budget:
        raise MergeError(
            f"max_memory={budget} bytes is below the ~{working} bytes needed to merge the largest tensor "
            f"{largest_key!r} {metas[largest_key].shape} across {num_inputs} inputs in float32."
        )
    return 1 if 2 * working <= budget // 2 else 0


def working_set(metas: Mapping[str, TensorMeta], num_inputs: int) -> tuple[str | None, int]:
    """``(largest floating-point tensor, bytes)`` of the working set of merging one tensor: about (inputs + 3)
    float32 copies of the largest one (base, task vectors, temporaries, the output); ``(None, 0)`` without any."""
    floats = {k: m for k, m in metas.items() if m.dtype.is_floating_point}
    if not floats:
        return None, 0
    largest_key = max(floats, key=lambda k: math.prod(floats[k].shape))
    return largest_key, (num_inputs + 3) * math.prod(floats[largest_key].shape) * 4


class _MemoryRelease:
    """Hands freed memory back to the OS (glibc ``malloc_trim``) every ``TUNING.release_every`` input bytes."""

    def __init__(self, metas: Mapping[str, TensorMeta], num_inputs: int) -> None:
        self.metas, self.num_inputs, self.since = metas, num_inputs, 0

    def after(self, key: str) -> None:
        meta = self.metas[key]
        self.since += meta.nbytes * self.num_inputs
        if self.since > TUNING.release_every:
            release_freed_memory()
            self.since = 0


def _stream(plan: Plan, ctx: MergeContext, sink: Sink) -> str:
    """Put every output tensor the sink wants, through the route the method and the sink allow; return the route."""
    merger, base, metas, infos = plan.merger, ctx.base, ctx.metas, ctx.infos
    out_metas = {k: TensorMeta(m.shape, ctx.output_dtypes[k]) for k, m in metas.items()}
    order = sink.begin(out_metas, infos, ctx.prefetch_depth)
    if ctx.owned is not None:  # a split run: this process's keys only
        order = [k for k in order if k in ctx.owned]
    floating = [k for k in order if metas[k].dtype.is_floating_point]
    release = _MemoryRelease(metas, len(ctx.tasks) + 1)
    method = merger.config.method

    with contextlib.ExitStack() as stack:  # read-ahead threads, closed however the merge ends
        if sink.takes_encoded:
            if not isinstance(merger, TaskCompressor):
                raise TypeError(f"Method {method!r} cannot build a task bank (it is not a TaskCompressor).")
            inputs = stack.enter_context(ctx.prefetcher(floating))

            def produce(key: str) -> Any:
                theta0, deltas = inputs.get(key)
                return merger.encode_tensor(key, theta0, deltas, infos[key])
            route = "encoded"
        elif merger.one_pass is not None:
            route, produce = "one pass", _one_pass_route(merger, ctx, sink, stack, floating)
        else:
            route, produce = _tensor_route(merger, ctx, sink, stack, floating, out_metas)

        _put_all(sink, order, metas, base, produce, release, ctx.tracker, f"merging ({method})")
        if merger.one_pass is not None and sink.amends_in_place:
            sink.amend(_checked(merger.one_pass.amendments()))
    return route


def _put_all(sink: Sink, order: list[str], metas: Mapping[str, TensorMeta], base: TensorSource,
             produce: Callable[[str], Any], release: _MemoryRelease, tracker: Progress, desc: str) -> None:
    for key in tracker.track(order, desc):
        if not metas[key].dtype.is_floating_point:
            sink.put(key, base.get(key))
            continue
        sink.put(key, produce(key))
        release.after(key)


def _one_pass_route(merger: Merger, ctx: MergeContext, sink: Sink, stack: contextlib.ExitStack,
                    floating: list[str]) -> Callable[[str], torch.Tensor]:
    """Each tensor merged as its inputs stream by (mapped, two tensors ahead); a sink that cannot patch what it was
    given gets every tensor after the amendments."""
    one_pass = merger.one_pass
    inputs = stack.enter_context(Prefetcher(one_pass.load, floating, depth=2))

    def merge_one(key: str) -> torch.Tensor:
        out = sink.buffer(key)
        one_pass.merge(key, inputs.get(key), out)
        return out

    if sink.amends_in_place:
        return stack.enter_context(Prefetcher(merge_one, floating, depth=ctx.prefetch_depth)).get
    held = {key: merge_one(key) for key in ctx.tracker.track(floating, f"merging ({merger.config.method})")}
    for key, index, values in _checked(one_pass.amendments()):
        held[key].view(-1)[slice(None) if index is None else index] = values.view(-1)
    return held.pop


def _checked(amendments: Iterable[Amendment]) -> Iterator[Amendment]:
    """The amendments, each checked finite in the output dtype."""
    for key, index, values in amendments:
        yield key, index, check_output_finite(key, values)


def _tensor_route(merger: Merger, ctx: MergeContext, sink: Sink, stack: contextlib.ExitStack, floating: list[str],
                  out_metas: Mapping[str, TensorMeta]) -> tuple[str, Callable[[str], Any]]:
    """Per tensor: the low-rank form, the fused linear combination, or ``merge_tensor`` on float32 task vectors."""
    tasks = list(ctx.tasks.values())
    if sink.takes_lowrank and merger.has_lowrank_form and all(isinstance(t, LowRankSource) for t in tasks):
        def lowrank(key: str) -> Any:
            parts = [t.update(key) for t in tasks]
            if all(part is None for part in parts):
                theta0, deltas = ctx.load(key)
                return theta0 + merger.merge_tensor(key, theta0, deltas, ctx.infos[key])
            rows, cols = ctx.metas[key].shape
            parts = [(p if p is not None else LowRank.zero(rows, cols)).to(ctx.device) for p in parts]
            return merger.merge_lowrank(key, parts, ctx.infos[key])

        return "low rank", lowrank
    coefficients_of = merger.coefficients_of(ctx.task_names)
    if coefficients_of is not None and not any(isinstance(t, DeltaSource) for t in tasks):
        # Linear in the task vectors (Task Arithmetic, averaging): one fused accumulation per tensor.
        prefetcher = stack.enter_context(ctx.prefetcher(floating, load=lambda key: ctx.combine(
            key, coefficients_of(key), out_metas[key].dtype, out=sink.buffer(key))))
        return "linear", prefetcher.get
    if merger.gram_determined and not any(isinstance(t, DeltaSource) for t in tasks):
        # Determined by inner products (SLERP family, Model Stock): merged in Gram coordinates, then combined.
        def combined(key: str) -> torch.Tensor:
            gram = ctx.gram(key)
            if not torch.isfinite(gram).all():
                ctx.load(key)  # raises naming the input that holds NaN or Inf
                raise MergeError(f"tensor {key!r}: the inputs are finite but their inner products overflow.")
            coordinates, back = gram_coordinates(gram)
            if coordinates.shape[0] == 0:  # θ₀ and every τ_t are zero
                scale, weights = 1.0, [0.0] * len(tasks)
            else:
                base, *deltas = coordinates.T
                merged = base + merger.merge_tensor(key, base, list(deltas), ctx.infos[key])
                scale, *weights = (back @ merged).tolist()
            return ctx.combine(key, weights, out_metas[key].dtype, out=sink.buffer(key), base_scale=scale)

        return "Gram", stack.enter_context(ctx.prefetcher(floating, load=combined)).get
    sources = [ctx.base, *tasks]
    stored = merger.reads_stored and ctx.plain_differences

    def load(key: str) -> tuple[torch.Tensor, Any]:
        """The output buffer, and either ``None`` (merged straight from the stored inputs into it) or (θ₀, [τ_t])."""
        out = sink.buffer(key)
        if stored and merger.merge_stored(key, [s.flat_array(key) for s in sources], numpy_view(out.view(-1)),
                                          ctx.infos[key]):
            return out, None
        return out, ctx.load(key)

    prefetcher = stack.enter_context(ctx.prefetcher(floating, load=load))

    def merge_one(key: str) -> torch.Tensor:
        out, loaded = prefetcher.get(key)
        if loaded is None:
            return out
        theta0, deltas = loaded
        update = merger.merge_tensor(key, theta0, deltas, ctx.infos[key])
        if fused_add_store(theta0, update, out):  # θ₀ + u cast once into the output, in one compiled pass
            return out
        merged = theta0 + update
        return check_output_finite(key, out.copy_(merged), merged)

    return ("stored" if stored else "per tensor"), merge_one


def _run_whole_models(plan: Plan, sink: Sink, options: MergeOptions) -> Any:
    """Merge models that share no base: the first model is the reference for keys, shapes and output layout."""
    merger, models = plan.merger, dict(plan.tasks)
    ranks_for(options.distributed, False, f"A merge of whole models ({merger.config.method})")  # never split
    first, *_ = models.values()
    reconcile_tied_embeddings(first, dict(list(models.items())[1:]))
    metas = validate_sources(first, dict(list(models.items())[1:]), dtype=options.dtype)
    infos = classify_sources(first, models, architecture=plan.architecture)
    ctx = MergeContext(first, models, infos, metas, device=options.device, progress=options.progress)
    out_metas = _output_metas(metas, options.dtype)
    summary = MergeSummary.of(merger.config.method, len(models), metas, out_metas)
    try:
        with ctx.tracker:
            merged = merger.merge_models(ctx)
            order = sink.begin(out_metas, infos, 0)
            _put_all(sink, order, metas, first,
                     lambda key: check_output_finite(key, merged[key].to("cpu", out_metas[key].dtype), merged[key]),
                     _MemoryRelease(metas, len(models)), ctx.tracker, f"merging ({merger.config.method})")
        summary.finish("whole models")
    except BaseException as error:
        sink.abort(error)
        raise
    return _finish(plan, sink, summary, options)
