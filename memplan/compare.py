"""Several plans side by side: methods, models, ZeRO stages, one-change-at-a-time variations.

Everything here composes :func:`memplan.plan.plan` (the analytical model) and returns data;
:mod:`memplan.plot` draws it and the CLI prints it. Byte counts stay ``int``.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from memplan.accuracy import relative_error
from memplan.analytic.predict import predict
from memplan.catalog import load_model
from memplan.errors import MemplanError
from memplan.files import read_json, shown
from memplan.plan import GpuTarget, PlanResult, plan, resolve_gpu
from memplan.specs.model import ModelSpec
from memplan.specs.parallel import ParallelSetup, Sharding
from memplan.specs.training import TrainingSetup
from memplan.trace import Trace

if TYPE_CHECKING:
    from memplan.fit import FitResult

DEFAULT_METHODS: Final = ("full", "lora", "qlora")
# The three card sizes people ask about: 24 GB consumer, 48 GB workstation, 80 GB data centre.
DEFAULT_CAPACITY_GPUS: Final = ("rtx-4090", "rtx-a6000", "a100-80gb")
ANALYTICAL: Final = "analytical"
SIMULATED: Final = "simulated"  # torchsim on fake tensors
MEASURED_CPU: Final = "measured-cpu"  # torchsim on real CPU tensors


@dataclass(frozen=True)
class Case:
    """One configuration to plan: a label, the group it is drawn in, and its inputs."""

    label: str
    model: str | ModelSpec
    setup: TrainingSetup
    parallel: ParallelSetup | None = None
    group: str = ""


class ComparisonRow(BaseModel):
    """One planned configuration."""

    model_config = ConfigDict(frozen=True)

    label: str = Field(description="Short name of the configuration (bar label).")
    group: str = Field(default="", description="Bars of one group are drawn together.")
    result: PlanResult


class NotApplicable(BaseModel):
    """A configuration that cannot run (BitFit on a model without biases), and why."""

    model_config = ConfigDict(frozen=True)

    label: str
    group: str = ""
    reason: str = Field(description="The one-line refusal plan would give.")


class Comparison(BaseModel):
    """Plans of several configurations judged against one GPU, as ``compare --json`` prints."""

    model_config = ConfigDict(frozen=True)

    rows: list[ComparisonRow]
    not_applicable: list[NotApplicable] = Field(
        default_factory=list, description="Configurations that cannot run, with the reason."
    )
    gpu: str | None = Field(default=None, description="The device judged against.")
    gpu_capacity_bytes: int | None = Field(default=None, description="Its usable memory.")

    def results(self) -> dict[str, PlanResult]:
        """``group label`` (or ``label``) -> plan result, in order."""
        return {_row_name(r): r.result for r in self.rows}


def _row_name(row: ComparisonRow) -> str:
    return f"{row.group} {row.label}".strip()


def _target(gpu: str | GpuTarget | None) -> GpuTarget | None:
    return resolve_gpu(gpu) if isinstance(gpu, str) else gpu


def compare_cases(
    cases: Iterable[Case], *, gpu: str | GpuTarget | None = None, safety: float | None = None
) -> Comparison:
    """Plan every case against ``gpu``; a case the method or model refuses becomes a
    :class:`NotApplicable` with the reason instead of failing the whole comparison."""
    target = _target(gpu)
    rows: list[ComparisonRow] = []
    refused: list[NotApplicable] = []
    for c in cases:
        try:
            result = plan(c.model, c.setup, c.parallel, gpu=target, safety=safety)
        except MemplanError as exc:
            refused.append(NotApplicable(label=c.label, group=c.group, reason=str(exc)))
            continue
        rows.append(ComparisonRow(label=c.label, group=c.group, result=result))
    if not rows:
        if refused:
            raise MemplanError(f"nothing to compare: {refused[0].reason}")
        raise MemplanError("nothing to compare: give at least one model and one method")
    return Comparison(
        rows=rows,
        not_applicable=refused,
        gpu=target.name if target else None,
        gpu_capacity_bytes=target.capacity_bytes if target else None,
    )


def compare(
    models: str | ModelSpec | Sequence[str | ModelSpec],
    methods: Sequence[str] = DEFAULT_METHODS,
    *,
    setup: Mapping[str, Any] | None = None,
    parallel: ParallelSetup | None = None,
    gpu: str | GpuTarget | None = None,
) -> Comparison:
    """Plan each method on each model; ``setup`` holds TrainingSetup fields shared by all.

    Unset fields take each method's typical values (``TrainingSetup``), so ``qlora`` brings
    NF4, paged AdamW and checkpointing while ``full`` trains under bf16 autocast.

    >>> rows = compare("llama-2-7b", ["lora", "qlora"], gpu="rtx-4090").rows
    >>> [(r.label, r.result.fits) for r in rows]
    [('lora', True), ('qlora', True)]
    """
    model_list = [models] if isinstance(models, str | ModelSpec) else list(models)
    specs = [load_model(m) if isinstance(m, str) else m for m in model_list]
    shared = dict(setup or {})
    cases = [
        Case(
            label=method,
            model=spec,
            setup=TrainingSetup(**{**shared, "method": method}),
            parallel=parallel,
            group=spec.name if len(specs) > 1 else "",
        )
        for spec in specs
        for method in methods
    ]
    return compare_cases(cases, gpu=gpu)


def varied(setup: TrainingSetup, **changes: Any) -> TrainingSetup:
    """``setup`` with some fields changed, validated again (method defaults kept as they were).

    >>> base = TrainingSetup(method="qlora")
    >>> varied(base, seq_len=2048).seq_len, varied(base, lora_r=8).lora_r
    (2048, 8)
    """
    data = setup.model_dump()
    data.update(changes)
    # Fields the method filled in and the caller now sets are no longer assumptions.
    data["defaults_from_method"] = tuple(f for f in setup.defaults_from_method if f not in changes)
    data["defaults_from_stack"] = tuple(f for f in setup.defaults_from_stack if f not in changes)
    return TrainingSetup(**data)


def what_if(
    model: str | ModelSpec,
    setup: TrainingSetup,
    changes: Mapping[str, Sequence[Any]],
    *,
    parallel: ParallelSetup | None = None,
    gpu: str | GpuTarget | None = None,
) -> Comparison:
    """The baseline, then one row per changed value of one field at a time.

    ``changes`` maps a TrainingSetup field to the values to try, e.g.
    ``{"seq_len": [1024, 2048], "optimizer": ["adamw"]}``; rows are grouped by field and
    labelled by value.
    """
    cases = [Case("as given", model, setup, parallel, group="baseline")]
    for name, values in changes.items():
        if name not in TrainingSetup.model_fields:
            raise MemplanError(f"what_if: {name!r} is not a TrainingSetup field")
        cases.extend(
            Case(_show(v), model, varied(setup, **{name: v}), parallel, group=name) for v in values
        )
    return compare_cases(cases, gpu=gpu)


def _show(value: Any) -> str:
    return str(getattr(value, "value", value))


def zero_stages(
    model: str | ModelSpec,
    setup: TrainingSetup,
    *,
    gpu_counts: Sequence[int] = (1, 2, 4, 8),
    stages: Sequence[int] = (0, 1, 2, 3),
    sharding: Sharding = Sharding.DEEPSPEED,
    gpu: str | GpuTarget | None = None,
) -> Comparison:
    """Per-GPU memory under each ZeRO stage as the data-parallel GPU count grows.

    Stage 0 is plain data parallelism: every GPU holds a full replica.
    """
    cases = [
        Case(
            label=f"{n} GPU" + ("s" if n > 1 else ""),
            model=model,
            setup=setup,
            parallel=ParallelSetup(num_gpus=n, zero_stage=stage, sharding=sharding),
            group=f"ZeRO-{stage}",
        )
        for stage in stages
        for n in gpu_counts
    ]
    return compare_cases(cases, gpu=gpu)


def capacities(gpus: Sequence[str | GpuTarget] = DEFAULT_CAPACITY_GPUS) -> dict[str, int]:
    """Display name -> usable bytes of each GPU, for capacity lines.

    >>> list(capacities(["rtx-4090", "48GB"]))
    ['RTX 4090', '48GB']
    """
    out: dict[str, int] = {}
    for gpu in gpus:
        target = resolve_gpu(gpu) if isinstance(gpu, str) else gpu
        out[gpu_label(target)] = target.capacity_bytes
    return out


def gpu_label(gpu: str | GpuTarget) -> str:
    """Short display name of a GPU: ``RTX A6000`` for ``rtx-a6000``, a capacity as typed.

    >>> gpu_label("rtx-a6000"), gpu_label("48GB")
    ('RTX A6000', '48GB')
    """
    target = resolve_gpu(gpu) if isinstance(gpu, str) else gpu
    if target.profile is None:
        return target.name
    from memplan.hardware import load_profile

    name = load_profile(target.profile).display_name
    for prefix in ("NVIDIA GeForce ", "NVIDIA ", "AMD Instinct ", "AMD ", "Intel "):
        name = name.removeprefix(prefix)
    return name


@dataclass(frozen=True)
class PeakGrid:
    """Per-GPU memory over a micro-batch x sequence-length grid (rows: batch sizes)."""

    model: str
    batch_sizes: tuple[int, ...]
    seq_lens: tuple[int, ...]
    cell_bytes: tuple[tuple[int, ...], ...]  # [batch][seq], what ``quantity`` names
    capacity_bytes: int | None
    gpu: str | None
    fits: tuple[tuple[bool, ...], ...] | None  # plan()'s verdict per cell (paging included)
    # The cells of ``fits`` that fit only once paged optimizer state moves to host memory.
    paging: tuple[tuple[bool, ...], ...] | None = None
    # "device": what nvidia-smi would show (plan().device_bytes); "allocated": the allocated
    # peak (plan().peak_bytes), as ``memplan fit``'s table holds it.
    quantity: Literal["device", "allocated"] = "device"


def peak_grid(
    model: str | ModelSpec,
    setup: TrainingSetup,
    *,
    batch_sizes: Sequence[int] = (1, 2, 4, 8, 16),
    seq_lens: Sequence[int] = (256, 512, 1024, 2048, 4096),
    parallel: ParallelSetup | None = None,
    gpu: str | GpuTarget | None = None,
) -> PeakGrid:
    """Plan every (micro-batch, sequence length) pair of ``setup`` on ``model``."""
    spec = load_model(model) if isinstance(model, str) else model
    target = _target(gpu)
    results = [
        [
            plan(spec, varied(setup, micro_batch_size=b, seq_len=s), parallel, gpu=target)
            for s in seq_lens
        ]
        for b in batch_sizes
    ]
    return PeakGrid(
        model=spec.name,
        batch_sizes=tuple(batch_sizes),
        seq_lens=tuple(seq_lens),
        cell_bytes=tuple(tuple(r.device_bytes for r in row) for row in results),
        capacity_bytes=target.capacity_bytes if target else None,
        gpu=target.name if target else None,
        fits=tuple(tuple(r.verdict != "does not fit" for r in row) for row in results)
        if target
        else None,
        paging=tuple(tuple(r.verdict == "fits only by paging" for r in row) for row in results)
        if target
        else None,
    )


def grid_from_fit(result: FitResult) -> PeakGrid:
    """The batch x sequence table of ``memplan fit --table`` as a grid of allocated peaks.

    ``fit`` judges each cell with plan() (or a bound that proves it cannot fit) but keeps
    only the allocated peak of each, so the cells hold ``peak_bytes``, not device bytes.
    """
    table = result.table
    if table is None:
        raise MemplanError("this fit result has no table: call fit(..., table=True)")
    return PeakGrid(
        model=result.model,
        batch_sizes=tuple(table.batch_sizes),
        seq_lens=tuple(table.seq_lens),
        cell_bytes=tuple(tuple(c.peak_bytes for c in row) for row in table.rows),
        capacity_bytes=result.gpu.capacity_bytes,
        gpu=result.gpu.name,
        fits=tuple(tuple(c.fits or c.by_paging for c in row) for row in table.rows),
        paging=tuple(tuple(c.by_paging for c in row) for row in table.rows),
        quantity="allocated",
    )


def trace_sources() -> tuple[str, ...]:
    """Trace sources this installation can produce (the torch ones need the extra ``torch``)."""
    if importlib.util.find_spec("torch") is None:
        return (ANALYTICAL,)
    try:
        import memplan.torchsim  # noqa: F401
    except ImportError:
        return (ANALYTICAL,)
    return (ANALYTICAL, SIMULATED, MEASURED_CPU)


def step_traces(
    model: str | ModelSpec,
    setup: TrainingSetup,
    sources: Sequence[str] = (ANALYTICAL,),
    *,
    parallel: ParallelSetup | None = None,
) -> dict[str, Trace]:
    """Traces of the same training steps from each source: analytical, simulated, measured-cpu.

    ``measured-cpu`` runs the step on real CPU tensors: keep the model tiny.
    """
    spec = load_model(model) if isinstance(model, str) else model
    out: dict[str, Trace] = {}
    for source in sources:
        if source == ANALYTICAL:
            out[source] = predict(spec, setup, parallel).trace
            continue
        if source not in (SIMULATED, MEASURED_CPU):
            raise MemplanError(
                f"unknown trace source {source!r} (use {ANALYTICAL}, {SIMULATED}, {MEASURED_CPU})"
            )
        if source not in trace_sources():
            raise MemplanError(f"trace source {source!r} needs the extra 'torch'")
        if parallel is not None and parallel.num_gpus > 1:
            raise MemplanError(f"trace source {source!r} traces one GPU: use --gpus 1")
        from memplan.torchsim import trace_step

        traced = trace_step(spec, setup, mode="fake" if source == SIMULATED else "cpu")
        out[source] = traced.trace
    return out


@dataclass(frozen=True)
class ValidationPoint:
    """One measured peak and memplan's prediction of it (for the predicted-vs-measured plot)."""

    label: str
    predicted_bytes: int
    measured_bytes: int
    metric: str = "allocated"  # allocated, reserved, nvml (nvidia-smi) or unknown
    source: str = ""  # file or reference the measurement comes from

    @property
    def error_fraction(self) -> float:
        """(predicted - measured) / measured."""
        return relative_error(self.predicted_bytes, self.measured_bytes)


_PREDICTED_KEYS: Final = ("predicted_bytes", "prediction_bytes", "predicted_peak_bytes")
_MEASURED_KEYS: Final = ("measured_bytes", "measured_peak_bytes")
MEMPLAN: Final = "memplan"
VALIDATION_DIR: Final = Path(__file__).resolve().parents[1] / "validation"
"""``validation/`` of this source checkout (not shipped in the wheel)."""


def _int_field(record: dict[str, Any], keys: Sequence[str]) -> int | None:
    return next((record[k] for k in keys if isinstance(record.get(k), int)), None)


def _predicted(record: dict[str, Any], estimator: str) -> int | None:
    """The estimator's prediction in a record: ``{estimator: {"bytes": n}}`` (the estimator
    comparison of ``memplan/references/estimators.json``), or, for memplan, a top-level
    ``predicted_bytes`` (``memplan validate --json`` rows)."""
    nested = record.get(estimator)
    if isinstance(nested, dict) and isinstance(nested.get("bytes"), int):
        return int(nested["bytes"])
    return _int_field(record, _PREDICTED_KEYS) if estimator == MEMPLAN else None


def _points_in(data: Any, source: str, estimator: str) -> list[ValidationPoint]:
    """Records holding both a prediction and a measured byte count, at any depth."""
    found: list[ValidationPoint] = []
    if isinstance(data, list):
        for item in data:
            found.extend(_points_in(item, source, estimator))
    elif isinstance(data, dict):
        measured = _int_field(data, _MEASURED_KEYS)
        if measured is not None:
            predicted = _predicted(data, estimator)
            if predicted is not None and measured > 0:
                label = str(data.get("id") or data.get("name") or data.get("label") or len(found))
                origin = data.get("source")
                found.append(
                    ValidationPoint(
                        label,
                        predicted,
                        measured,
                        str(data.get("metric") or "unknown"),
                        origin if isinstance(origin, str) and origin else source,
                    )
                )
        else:
            for value in data.values():
                found.extend(_points_in(value, source, estimator))
    return found


def _records(path: Path) -> Any:
    if path.suffix != ".jsonl":
        return read_json(path, what="results file")
    try:
        text = path.read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, ValueError, RecursionError) as exc:
        raise MemplanError(f"{shown(path)}: not valid JSON lines ({exc})") from exc


def _measured_points(path: Path, source: str) -> list[ValidationPoint]:
    from memplan.verify import verification_points, verify_file

    points: list[ValidationPoint] = verification_points(verify_file(path)[0], source)
    return points


def validation_points(
    root: str | Path | None = None, *, estimator: str = MEMPLAN
) -> list[ValidationPoint]:
    """Predicted-vs-measured pairs committed under ``root`` (default: this checkout's
    ``validation/``).

    Reads every ``*.json`` / ``*.jsonl`` under ``results/`` and ``references/`` (recursively)
    and keeps the records that carry a measurement (``measured_bytes``) and ``estimator``'s
    prediction of it: ``predicted_bytes`` (``memplan validate --json`` rows) or
    ``{estimator: {"bytes": ...}}`` (the estimator comparison, where ``estimator`` may also be
    ``accelerate``, ``deepspeed`` or ``llm-analysis``). Measured-runs files (``memplan
    verify`` input) give memplan's allocated, reserved and NVML points. Records with a
    measurement only are skipped. Empty when nothing has been committed.
    """
    from memplan.validate import REFERENCES_DIR

    folder = Path(root) if root is not None else VALIDATION_DIR
    references = folder / "references" if root is not None else REFERENCES_DIR
    points: list[ValidationPoint] = []
    for where_from in (folder / "results", references):
        for path in sorted(where_from.rglob("*.json*")):
            if path.suffix in (".json", ".jsonl"):
                where = str(path.relative_to(where_from.parent))
                records = _records(path)
                if isinstance(records, dict) and {"runs", "environment"} <= records.keys():
                    # A measured-runs file (validation/gpu): memplan predicts each run now.
                    if estimator == MEMPLAN:
                        points.extend(_measured_points(path, where))
                    continue
                points.extend(_points_in(records, where, estimator))
    return points


@dataclass(frozen=True)
class ErrorSummary:
    """How far predictions are from measurements, as fractions of the measurement."""

    num_points: int
    median_abs_error: float
    max_abs_error: float
    worst: str  # label of the worst point
    within_band: int  # points within +-band_fraction
    band_fraction: float


def error_summary(points: Sequence[ValidationPoint], band_fraction: float = 0.05) -> ErrorSummary:
    """Median and worst |predicted - measured| / measured, and how many fall in the band.

    >>> error_summary([ValidationPoint("a", 105, 100), ValidationPoint("b", 80, 100)])
    ErrorSummary(num_points=2, median_abs_error=0.125, max_abs_error=0.2, worst='b', \
within_band=1, band_fraction=0.05)
    """
    if not points:
        raise MemplanError("no validation points to summarise")
    errors = sorted(abs(p.error_fraction) for p in points)
    worst = max(points, key=lambda p: abs(p.error_fraction))
    return ErrorSummary(
        num_points=len(points),
        median_abs_error=statistics.median(errors),
        max_abs_error=errors[-1],
        worst=worst.label,
        within_band=sum(e <= band_fraction for e in errors),
        band_fraction=band_fraction,
    )


def comparison_table(comparison: Comparison) -> Any:
    """A rich table with one column per configuration and one row per category (GiB)."""
    from rich import box
    from rich.table import Table

    from memplan.units import gib

    results = [r.result for r in comparison.rows]
    title = "per-GPU memory at the peak, GiB (2^30 bytes)"
    if comparison.gpu:
        title += f"; fits on {comparison.gpu} ({gib(comparison.gpu_capacity_bytes or 0):,.2f})?"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("", no_wrap=True)
    for row in comparison.rows:
        header = f"{row.group}\n{row.label}" if row.group else row.label
        table.add_column(header, justify="right", no_wrap=True)
    # Configurations that cannot run: an "n/a" column each, the reason under the table.
    missing = comparison.not_applicable
    for index, item in enumerate(missing, start=1):
        header = f"{item.group}\n{item.label}" if item.group else item.label
        table.add_column(f"{header} [{index}]", justify="right", no_wrap=True)
    na = ["n/a"] * len(missing)
    for key, label in _TABLE_ROWS.items():
        values = [_stack_value(r, key) for r in results]
        if any(values):
            table.add_row(label, *(f"{gib(v):,.1f}" for v in values), *na)
    table.add_section()
    totals = (f"{gib(r.device_bytes):,.1f}" for r in results)
    table.add_row("device total", *totals, *na, style="bold")
    if comparison.gpu:
        table.add_row("fits", *(_verdict(r) for r in results), *na)
        table.add_row("margin", *(f"{gib(r.margin_bytes or 0):+,.1f}" for r in results), *na)
    trainable = (f"{100 * r.trainable_params / r.params:.2f}" for r in results)
    table.add_row("trainable %", *trainable, *na)
    table.add_row("state B/param", *(f"{r.model_state_bytes_per_param:.2f}" for r in results), *na)
    table.add_row("peak in", *(r.peak_phase for r in results), *na)
    if missing:
        table.caption = "\n".join(f"[{i}] {m.reason}" for i, m in enumerate(missing, start=1))
        table.caption_justify = "left"
    return table


def verdict_table(comparison: Comparison) -> Any:
    """A compact rich table: one row per configuration with its total, margin and verdict."""
    from rich import box
    from rich.table import Table

    from memplan.units import gib

    title = "per-GPU memory, GiB (2^30 bytes)"
    if comparison.gpu:
        title += f", on {comparison.gpu} ({gib(comparison.gpu_capacity_bytes or 0):,.2f})"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("configuration", "allocated peak", "device", "margin", "fits", "peak in"):
        left = name in ("configuration", "fits", "peak in")
        table.add_column(name, justify="left" if left else "right")
    for row in comparison.rows:
        r = row.result
        table.add_row(
            _row_name(row),
            f"{gib(r.peak_bytes):,.2f}",
            f"{gib(r.device_bytes):,.2f}",
            "-" if r.margin_bytes is None else f"{gib(r.margin_bytes):+,.2f}",
            _verdict(r),
            r.peak_phase,
        )
    return table


def trace_table(traces: Mapping[str, Trace]) -> Any:
    """A rich table of each trace's peak: when it happens and its bytes by category."""
    from rich import box
    from rich.table import Table

    from memplan.trace import ALLOCATED_CATEGORIES
    from memplan.units import format_bytes

    peaks = {name: t.peak() for name, t in traces.items()}
    table = Table(title="allocated memory at each trace's peak", title_justify="left")
    table.box = box.SIMPLE_HEAD
    table.add_column("")
    for name in peaks:
        table.add_column(name, justify="right")
    for category in ALLOCATED_CATEGORIES:
        values = [p.breakdown_bytes[category] for p in peaks.values()]
        if any(values):
            table.add_row(category.value, *(format_bytes(v) for v in values))
    table.add_section()
    table.add_row("peak", *(format_bytes(p.peak_bytes) for p in peaks.values()), style="bold")
    table.add_row("in", *(f"step {p.step} {p.phase.value}" for p in peaks.values()))
    return table


def error_table(
    points: Mapping[str, Sequence[ValidationPoint]], band_fraction: float = 0.05
) -> Any:
    """A rich table: per estimator, the cases it predicts and its median and worst error."""
    from rich import box
    from rich.table import Table

    table = Table(
        title="|predicted - measured| / measured", title_justify="left", box=box.SIMPLE_HEAD
    )
    for name in ("estimator", "cases", "median", "worst", f"within ±{band_fraction:.0%}"):
        table.add_column(name, justify="left" if name == "estimator" else "right")
    for name, pts in points.items():
        if not pts:
            table.add_row(name, "0", "-", "-", "-")
            continue
        s = error_summary(pts, band_fraction)
        table.add_row(
            name,
            str(s.num_points),
            f"{s.median_abs_error:.1%}",
            f"{s.max_abs_error:.1%}",
            f"{s.within_band}",
        )
    return table


# Rows of the comparison table (short: one column per configuration must fit 80 columns).
_TABLE_ROWS: Final = {
    "frozen_weights": "frozen",
    "quant_state": "quant state",
    "trainable_weights": "trainable",
    "master_weights": "fp32 master",
    "gradients": "gradients",
    "optimizer_state": "optimizer",
    "paged": "paged optim",
    "activations": "activations",
    "logits": "logits/loss",
    "temporaries": "temporaries",
    "allocator_overhead": "allocator",
    "cuda_context": "CUDA context",
    "communicators": "NCCL",
}


def _stack_value(result: PlanResult, key: str) -> int:
    if key == "paged":
        return result.paged_bytes
    if key == "allocator_overhead":
        return result.allocator_overhead_bytes
    if key == "cuda_context":
        return result.cuda_context_bytes
    if key == "communicators":
        return result.communicator_bytes
    return result.breakdown_bytes.get(key, 0)


_VERDICT_CELLS: Final = {
    "fits": "yes",
    "borderline": "borderline",
    "fits only by paging": "by paging",  # the shortfall moves to host memory (bnb paged)
    "does not fit": "no",
}


def _verdict(result: PlanResult) -> str:
    return _VERDICT_CELLS.get(result.verdict or "", "-")
