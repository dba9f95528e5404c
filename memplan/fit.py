"""``fit``: the largest micro-batch and sequence length that fit one device, as plan() judges.

The search runs on cheap predictions and confirms with ``plan()`` (:class:`memplan.judge.Judge`):

1. the allocated peak alone bounds the search from above without any replay;
2. inside that bound the estimated boundary (reserved memory from the latest plan()'s overhead
   ratio) is tested with plan();
3. each plan() verdict narrows the interval (largest known fit, smallest known miss) until they
   are adjacent: the reported largest value fits by plan() and the next one does not.

Sequence lengths are multiples of ``SEQ_STEP_TOKENS``; learned position tables cap them at the
model's ``max_position_embeddings``, other position schemes at ``SEQ_SEARCH_LIMIT_TOKENS``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from memplan.catalog import load_model
from memplan.errors import MemplanError
from memplan.hardware import load_profile
from memplan.judge import Judge
from memplan.plan import GpuTarget, PlanResult, resolve_gpu
from memplan.specs.model import ModelSpec
from memplan.specs.parallel import ParallelSetup
from memplan.specs.training import TrainingSetup

# Resolution of the sequence search: 128 tokens, a common pad_to_multiple_of and attention-kernel
# tile size. A search step, not a limit.
SEQ_STEP_TOKENS: Final = 128
# Longest sequence searched for models without a learned position table (RoPE, ALiBi, T5's
# relative bias): a search bound, not a property of the model.
SEQ_SEARCH_LIMIT_TOKENS: Final = 1 << 20
# Largest micro-batch searched.
BATCH_SEARCH_LIMIT: Final = 1 << 16
# The batch x sequence table: powers of two, the smallest rows and the longest columns kept.
TABLE_MAX_ROWS: Final = 10
TABLE_MAX_COLUMNS: Final = 10
TABLE_FIRST_SEQ_TOKENS: Final = 256

Axis = Literal["micro_batch_size", "seq_len"]


class Capacity(BaseModel):
    """What one device offers a run, and where the number comes from."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="Hardware profile name, or the capacity as typed.")
    kind: str = Field(description="discrete, unified-memory, tpu, or 'capacity' (typed size).")
    usable_memory_bytes: int = Field(
        description="Device total the driver reports (profile), or the typed capacity."
    )
    gpu_share_fraction: float = Field(
        description="Share the accelerator may use (unified memory: the OS GPU limit)."
    )
    capacity_bytes: int = Field(description="What plan() judges device bytes against.")
    context_bytes: int = Field(description="CUDA context plan() adds outside the allocator.")


def capacity(target: GpuTarget) -> Capacity:
    """The capacity facts of ``target`` for reports."""
    if target.profile is None:
        return Capacity(
            name=target.name,
            kind="capacity",
            usable_memory_bytes=target.capacity_bytes,
            gpu_share_fraction=1.0,
            capacity_bytes=target.capacity_bytes,
            context_bytes=target.context_bytes,
        )
    profile = load_profile(target.profile)
    return Capacity(
        name=target.name,
        kind=profile.kind,
        usable_memory_bytes=profile.usable_memory_bytes,
        gpu_share_fraction=profile.gpu_share_fraction,
        capacity_bytes=target.capacity_bytes,
        context_bytes=target.context_bytes,
    )


def last_true(test: Callable[[int], bool], first: int, last: int) -> int:
    """Largest k in [first, last] with test(k), for a test true up to some k and false after.

    Returns first - 1 when test(first) is false. Doubles the step, then bisects.

    >>> last_true(lambda k: k * k <= 50, 1, 100)
    7
    """
    if last < first or not test(first):
        return first - 1
    good, step = first, 1
    while good + step <= last and test(good + step):
        good, step = good + step, step * 2
    bad = min(good + step, last + 1)
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if test(mid) else (good, mid)
    return good


def boundary_index(
    judge: Judge,
    at: Callable[[int], TrainingSetup],
    limit: int,
    parallel: ParallelSetup,
    target: GpuTarget | None = None,
    *,
    paging: bool = False,
) -> int:
    """Largest k in [1, limit] that fits by plan() while k + 1 does not (0: even 1 fails).

    k + 1 is either judged by plan() or proven too large by the allocated peak alone.
    ``target``: the device (default: the judge's); ``paging``: paged optimizer state may move
    to host memory.
    """

    def bounded(k: int) -> bool:
        return judge.cannot_fit(at(k), parallel, target, paging=paging)

    def likely(k: int) -> bool:
        return judge.likely_fits(at(k), parallel, target, paging=paging)

    good = 0
    bad = last_true(lambda k: not bounded(k), 1, limit) + 1
    while bad - good > 1:
        guess = min(max(last_true(likely, good + 1, bad - 1), good + 1), bad - 1)
        fits = judge.fits(at(guess), parallel, target, paging=paging)
        good, bad = (guess, bad) if fits else (good, guess)
    return good


class Point(BaseModel):
    """plan()'s verdict on one configuration."""

    model_config = ConfigDict(frozen=True)

    micro_batch_size: int
    seq_len: int
    peak_bytes: int = Field(description="Allocated peak (plan().peak_bytes).")
    device_bytes: int = Field(description="plan().device_bytes: reserved + context + paged.")
    margin_bytes: int = Field(description="Capacity minus device bytes (negative: short).")
    fits: bool = Field(description="Fits without paging anything to host memory.")
    verdict: str = Field(description="plan()'s verdict: fits, borderline, paging, does not fit.")
    paged_out_bytes: int = Field(default=0, description="Paged state that must leave the device.")


def point(result: PlanResult) -> Point:
    return Point(
        micro_batch_size=result.setup["micro_batch_size"],
        seq_len=result.setup["seq_len"],
        peak_bytes=result.peak_bytes,
        device_bytes=result.device_bytes,
        margin_bytes=result.margin_bytes or 0,
        fits=bool(result.fits),
        verdict=result.verdict or "",
        paged_out_bytes=result.paged_out_bytes,
    )


class Boundary(BaseModel):
    """The largest value of one axis that fits, with plan() at it and at the next value."""

    model_config = ConfigDict(frozen=True)

    axis: Axis
    largest: int | None = Field(description="Largest value that fits; None: not even the first.")
    step: int = Field(description="Spacing of the values searched (1 for batch, 128 for seq).")
    limit: int = Field(description="Largest value searched.")
    at_limit: bool = Field(description="The search bound fits: the true answer may be larger.")
    fitting: Point | None = Field(description="plan() at the largest value.")
    next: Point | None = Field(description="plan() one step further (does not fit).")


def _search(
    judge: Judge,
    axis: Axis,
    base: TrainingSetup,
    parallel: ParallelSetup,
    step: int,
    limit: int,
    *,
    paging: bool = False,
) -> Boundary:
    def at(k: int) -> TrainingSetup:
        return base.model_copy(update={axis: k * step})

    count = limit // step
    k = boundary_index(judge, at, count, parallel, paging=paging)
    return Boundary(
        axis=axis,
        largest=k * step if k else None,
        step=step,
        limit=count * step,
        at_limit=k == count,
        fitting=point(judge.plan(at(k), parallel)) if k else None,
        next=point(judge.plan(at(k + 1), parallel)) if k < count else None,
    )


def seq_limit(spec: ModelSpec) -> tuple[int, str]:
    """Longest sequence searched, and why."""
    if spec.position_embedding == "learned":
        return spec.max_position_embeddings, "the size of the learned position table"
    return SEQ_SEARCH_LIMIT_TOKENS, f"a search bound ({spec.position_embedding} positions)"


class Cell(BaseModel):
    """One batch x sequence entry of the table."""

    model_config = ConfigDict(frozen=True)

    micro_batch_size: int
    seq_len: int
    peak_bytes: int = Field(description="Allocated peak from predict() (equals plan().peak_bytes).")
    fits: bool = Field(description="Fits without paging.")
    by_paging: bool = Field(
        default=False, description="Does not fit as is, but fits once paged state moves out."
    )
    basis: Literal["plan", "bound", "row"] = Field(
        description="plan: judged by plan(); bound: the allocated peak alone exceeds capacity; "
        "row: follows from a plan() verdict in the same row (memory grows with sequence length)."
    )


class FitTable(BaseModel):
    model_config = ConfigDict(frozen=True)

    batch_sizes: list[int]
    seq_lens: list[int]
    rows: list[list[Cell]]


class FitResult(BaseModel):
    """What ``memplan fit`` prints: the largest micro-batch and sequence length that fit."""

    model_config = ConfigDict(frozen=True)

    model: str
    gpu: Capacity
    setup: dict[str, Any]
    parallel: dict[str, Any]
    given: Point = Field(description="plan() at the given micro-batch and sequence length.")
    batch: Boundary = Field(
        description="Largest micro-batch at the given sequence length (without paging)."
    )
    seq: Boundary = Field(description="Largest sequence length at the given micro-batch.")
    batch_paging: Boundary | None = Field(
        default=None,
        description="Largest micro-batch when paged optimizer state may move to host memory "
        "(only with a paged optimizer).",
    )
    seq_paging: Boundary | None = Field(
        default=None, description="Largest sequence length with paging (paged optimizers)."
    )
    seq_limit_reason: str
    max_position_embeddings: int = Field(description="The model's trained context length.")
    smallest: Point | None = Field(
        default=None,
        description="plan() at micro-batch 1 x one sequence step, when neither search found a "
        "fit (None otherwise).",
    )
    table: FitTable | None = None
    plan_calls: int = Field(description="Allocator replays (plan() calls) the search ran.")


def _powers(start: int, stop: int) -> list[int]:
    out = [start]
    while out[-1] * 2 <= stop:
        out.append(out[-1] * 2)
    return out


def _table(judge: Judge, base: TrainingSetup, parallel: ParallelSetup, seq_cap: int) -> FitTable:
    """Powers-of-two batches and sequences around the boundary (the given values included)."""

    def at(batch: int, seq: int) -> TrainingSetup:
        return base.model_copy(update={"micro_batch_size": batch, "seq_len": seq})

    # With a paged optimizer the table also spans what fits once the paged state moves out.
    paged_opt = bool(judge.plan(base, parallel).paged_bytes)

    def bounded(setup: TrainingSetup) -> bool:
        return judge.cannot_fit(setup, parallel, paging=paged_opt)

    seqs = _powers(TABLE_FIRST_SEQ_TOKENS, seq_cap)
    fits_1 = last_true(lambda i: not bounded(at(1, seqs[i - 1])), 1, len(seqs))
    seqs = sorted({*seqs[: fits_1 + 1], base.seq_len})[-TABLE_MAX_COLUMNS:]
    most = last_true(lambda b: not bounded(at(b, seqs[0])), 1, BATCH_SEARCH_LIMIT)
    batches = _powers(1, max(2 * most, 1))[:TABLE_MAX_ROWS]
    batches = sorted({*batches, base.micro_batch_size})
    rows = []
    for batch in batches:

        def along_row(i: int, batch: int = batch) -> TrainingSetup:
            return at(batch, seqs[i - 1])

        k = boundary_index(judge, along_row, len(seqs), parallel)
        k_paging = (
            boundary_index(judge, along_row, len(seqs), parallel, paging=True) if paged_opt else k
        )
        row = []
        for i, seq in enumerate(seqs, start=1):
            setup = at(batch, seq)
            basis: Literal["plan", "bound", "row"] = (
                "plan" if judge.planned(setup, parallel) else "bound" if bounded(setup) else "row"
            )
            peak = judge.cheap(setup, parallel).peak_bytes
            paged = i > k and i <= k_paging
            row.append(
                Cell(
                    micro_batch_size=batch,
                    seq_len=seq,
                    peak_bytes=peak,
                    fits=i <= k,
                    by_paging=paged,
                    basis=basis,
                )
            )
        rows.append(row)
    return FitTable(batch_sizes=batches, seq_lens=seqs, rows=rows)


def fit(
    model: str | ModelSpec,
    setup: TrainingSetup | None = None,
    parallel: ParallelSetup | None = None,
    *,
    gpu: str | GpuTarget,
    table: bool = False,
    safety: float | None = None,
) -> FitResult:
    """Largest micro-batch (at ``setup.seq_len``) and sequence (at its micro-batch) on ``gpu``.

    >>> r = fit("tiny-llama", TrainingSetup(method="lora", seq_len=256), gpu="1GiB")
    >>> r.batch.fitting.fits, r.batch.next.fits, r.batch.next.micro_batch_size - r.batch.largest
    (True, False, 1)
    """
    spec = load_model(model) if isinstance(model, str) else model
    setup = setup or TrainingSetup()
    parallel = parallel or ParallelSetup()
    target = resolve_gpu(gpu) if isinstance(gpu, str) else gpu
    judge = Judge(spec, target, safety=safety)
    cap, reason = seq_limit(spec)
    if cap < SEQ_STEP_TOKENS:
        raise MemplanError(
            f"{spec.name} takes at most {cap} tokens, below the {SEQ_STEP_TOKENS} step"
        )
    given = point(judge.plan(setup, parallel))  # first: its overhead ratio seeds the estimates
    seq = _search(judge, "seq_len", setup, parallel, SEQ_STEP_TOKENS, cap)
    batch = _search(judge, "micro_batch_size", setup, parallel, 1, BATCH_SEARCH_LIMIT)
    seq_paging = batch_paging = None
    if judge.plan(setup, parallel).paged_bytes:  # a paged optimizer: also what fits by paging
        seq_paging = _search(judge, "seq_len", setup, parallel, SEQ_STEP_TOKENS, cap, paging=True)
        batch_paging = _search(
            judge, "micro_batch_size", setup, parallel, 1, BATCH_SEARCH_LIMIT, paging=True
        )
    smallest = None
    if batch.largest is None and seq.largest is None:  # does anything fit at all?
        tiny = setup.model_copy(update={"micro_batch_size": 1, "seq_len": SEQ_STEP_TOKENS})
        smallest = point(judge.plan(tiny, parallel))
    return FitResult(
        model=spec.name,
        gpu=capacity(target),
        setup=setup.model_dump(mode="json"),
        parallel=parallel.model_dump(mode="json"),
        given=given,
        batch=batch,
        seq=seq,
        batch_paging=batch_paging,
        seq_paging=seq_paging,
        seq_limit_reason=reason,
        max_position_embeddings=spec.max_position_embeddings,
        smallest=smallest,
        table=_table(judge, setup, parallel, cap) if table else None,
        plan_calls=judge.plan_calls,
    )
