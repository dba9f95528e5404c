"""``memplan validate``: predict published peak-memory measurements and report the error.

Each case under ``memplan/references/cases/`` is one published fine-tuning run: the
publisher's record verbatim (``reference``: source, configuration, measured number, metric,
confidence), memplan's reading of it (``memplan``: model, TrainingSetup and ParallelSetup
fields, and which number of a :class:`~memplan.plan.PlanResult` to compare), the assumptions
made where the source is silent (``assumed``, each with its reason), what the run did that
memplan's specs cannot express (``not_expressible``), and, for a miss, its mechanism
(``explanation``).

The metric decides what is compared, like with like:

- ``allocated`` (``torch.cuda.max_memory_allocated``) -> ``peak_bytes``;
- ``reserved`` (``torch.cuda.max_memory_reserved``) -> ``reserved_bytes`` (allocator replay);
- ``nvidia-smi`` (NVML device memory used) -> ``device_bytes`` = reserved + CUDA context
  (+ paged optimizer state);
- ``unknown`` -> ``peak_bytes``: every publisher in the set that states its instrument prints
  torch's allocated counter, so the allocated peak is the likeliest reading.
"""

from __future__ import annotations

import json
import shlex
import statistics
from collections.abc import Callable, Iterable
from functools import cached_property
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from memplan.accuracy import ErrorBand, relative_error
from memplan.catalog import load_model, with_overrides
from memplan.errors import MemplanError
from memplan.hardware import load_profile
from memplan.overheads import CUDA_CONTEXT_BYTES
from memplan.plan import GpuTarget, PlanResult, plan
from memplan.specs import ModelSpec, ParallelSetup, TrainingSetup
from memplan.units import GB

REFERENCES_DIR: Final = Path(__file__).resolve().parent / "references"
"""The published reference cases and their configs (shipped with the package)."""

Compared = Literal["peak_bytes", "reserved_bytes", "device_bytes"]

# What each published metric is compared with, and why.
METRIC_COMPARED: Final[dict[str, tuple[Compared, str]]] = {
    "allocated": ("peak_bytes", "torch.cuda.max_memory_allocated = memplan's allocated peak"),
    "reserved": (
        "reserved_bytes",
        "max_memory_reserved = allocated peak replayed through the caching-allocator model",
    ),
    "nvidia-smi": (
        "device_bytes",
        "NVML device memory = reserved + CUDA context (+ paged optimizer state)",
    ),
    "unknown": (
        "peak_bytes",
        "instrument not stated; the publishers in this set that state "
        "theirs print torch's allocated counter",
    ),
}

# Cases off by more than this need a written mechanism in their record (issue 7).
EXPLANATION_THRESHOLD: Final = 0.30
# Cases off by more than this are explained in docs/accuracy.md.
MISS_THRESHOLD: Final = 0.10

# Id prefix -> publisher, for the per-source summary.
SOURCES: Final[dict[str, str]] = {
    "litgpt-rt": "litgpt resource tables",
    "litgpt-hub": "litgpt config hub",
    "litgpt-finetune_lora": "litgpt finetune_lora tutorial",
    "peft-readme": "peft README",
    "hf-perf": "transformers perf docs",
}


class CaseMapping(BaseModel):
    """memplan's reading of one published run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(description="Catalog name, or a config path relative to the references.")
    model_overrides: dict[str, Any] | None = Field(
        default=None, description="ModelSpec fields the run's framework version sets differently."
    )
    setup: dict[str, Any] = Field(description="TrainingSetup fields.")
    parallel: dict[str, Any] = Field(default_factory=dict, description="ParallelSetup fields.")
    gpu: str | None = Field(default=None, description="Hardware profile of the measured GPU.")
    cuda_context_bytes: int | None = Field(
        default=None, description="CUDA context measured by the source itself, if it did."
    )
    compare: Compared = Field(description="The PlanResult number compared with the measurement.")


class ReferenceCase(BaseModel):
    """One published measurement and how memplan predicts it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    reference: dict[str, Any] = Field(description="The publisher's record, verbatim.")
    framework: str | None = Field(default=None, description="Training code that produced it.")
    memplan: CaseMapping
    assumed: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Field -> {value, reason} where the source is silent."
    )
    not_expressible: list[str] = Field(
        default_factory=list, description="What the run did that memplan's specs cannot say."
    )
    suspect: bool = Field(default=False, description="The source value is flagged unreliable.")
    explanation: str | None = Field(default=None, description="Mechanism of a miss.")

    @property
    def measured_bytes(self) -> int:
        """The published number in bytes (``measured_gb`` is decimal GB)."""
        return round(float(self.reference["measured_gb"]) * GB)

    @property
    def metric(self) -> str:
        return str(self.reference.get("metric", "unknown"))

    @property
    def source(self) -> str:
        for prefix, name in SOURCES.items():
            if self.id.startswith(prefix + "-"):
                return name
        return self.id.split("-", 1)[0]


def load_cases(directory: Path | None = None) -> list[ReferenceCase]:
    """Every reference case under ``directory/cases`` (default: this checkout's), by id."""
    folder = (directory or REFERENCES_DIR) / "cases"
    files = sorted(folder.glob("*.json"))
    if not files:
        raise MemplanError(f"no reference cases under {folder}")
    cases = []
    for path in files:
        try:
            case = ReferenceCase.model_validate_json(path.read_text())
        except ValueError as exc:
            raise MemplanError(f"{path}: {exc}") from exc
        if case.id != path.stem:
            raise MemplanError(f"{path}: id {case.id!r} differs from the file name")
        cases.append(case)
    return cases


def case_model(case: ReferenceCase, directory: Path | None = None) -> ModelSpec:
    """The ModelSpec of a case: catalog name or config path, with its overrides applied."""
    name = case.memplan.model
    if name.endswith(".json"):
        spec = load_model((directory or REFERENCES_DIR) / name)
    else:
        spec = load_model(name)
    return with_overrides(spec, case.memplan.model_overrides or {})


def case_gpu(case: ReferenceCase) -> GpuTarget | None:
    """The measured GPU, with the source's own CUDA context reading where it gave one."""
    mapping = case.memplan
    if mapping.gpu is None:
        return None
    profile = load_profile(mapping.gpu)
    return GpuTarget(
        name=profile.name,
        capacity_bytes=profile.usable_memory_bytes,
        context_bytes=mapping.cuda_context_bytes or CUDA_CONTEXT_BYTES,
        profile=profile.name,
    )


class CaseResult(BaseModel):
    """One row of the accuracy table."""

    model_config = ConfigDict(frozen=True)

    id: str
    source: str
    model: str
    method: str = Field(default="full", description="The case's fine-tuning method.")
    stack: str = Field(default="hf-trainer", description="The training stack the case ran.")
    metric: str = Field(description="What the publisher measured.")
    compared: Compared = Field(description="The memplan number set against it.")
    compared_because: str
    confidence: str
    suspect: bool
    measured_bytes: int
    predicted_bytes: int
    error_fraction: float = Field(description="(predicted - measured) / measured.")
    dominant_category: str = Field(description="Largest allocated category at the peak.")
    breakdown_bytes: dict[str, int]
    peak_phase: str
    simulated_bytes: int | None = None
    simulated_error_fraction: float | None = None
    simulated_status: str = Field(
        default="not run", description="'ok', 'not run', or why the simulator could not run."
    )
    explanation: str | None
    command: str = Field(default="", description="The memplan plan command of this case.")

    @property
    def abs_error(self) -> float:
        return abs(self.error_fraction)


# TrainingSetup / ParallelSetup fields and the plan flags that set them.
_SETUP_FLAGS: Final = {
    "stack": "--stack",
    "method": "--method",
    "precision": "--precision",
    "quant": "--quant",
    "optimizer": "--optimizer",
    "optimizer_impl": "--optimizer-impl",
    "micro_batch_size": "--batch",
    "seq_len": "--seq",
    "target_seq_len": "--target-seq",
    "grad_accum_steps": "--grad-accum",
    "grad_ckpt_every": "--grad-ckpt-every",
    "attention": "--attn",
    "lora_r": "--lora-r",
    "lora_alpha": "--lora-alpha",
    "lora_dropout": "--lora-dropout",
    "adapter_dtype": "--adapter-dtype",
    "adapter_size": "--adapter-size",
    "prefix_len": "--prefix-len",
    "loha_r": "--loha-r",
    "loha_alpha": "--loha-alpha",
    "lokr_r": "--lokr-r",
    "lokr_alpha": "--lokr-alpha",
    "vera_r": "--vera-r",
    "device": "--device",
}
_SWITCHES: Final = {
    "grad_ckpt": "grad-ckpt",
    "double_quant": "double-quant",
    "kbit_prep": "kbit-prep",
}


def case_command(case: ReferenceCase, directory: Path | None = None) -> str:
    """The ``memplan plan`` command line that predicts ``case`` (every knob a CLI flag)."""
    mapping = case.memplan
    model = mapping.model
    if model.endswith(".json"):
        path = (directory or REFERENCES_DIR) / model
        try:
            model = str(path.relative_to(Path.cwd()))
        except ValueError:
            model = str(path)
    argv = ["memplan", "plan", model]
    for field, value in (mapping.model_overrides or {}).items():
        argv += ["--model-set", f"{field}={json.dumps(value)}"]
    for field, value in mapping.setup.items():
        if field in _SWITCHES:
            argv.append(f"--{'' if value else 'no-'}{_SWITCHES[field]}")
        elif field == "lora_targets":
            argv += ["--lora-targets", ",".join(value)]
        elif field == "library_versions":
            argv += [item for k, v in value.items() for item in ("--assume", f"{k}={v}")]
        elif field in _SETUP_FLAGS:
            argv += [_SETUP_FLAGS[field], _flag_value(value)]
        else:
            raise MemplanError(f"{case.id}: setup field {field!r} has no plan flag")
    parallel = ParallelSetup(**mapping.parallel)
    if parallel.num_gpus != 1:
        argv += ["--gpus", str(parallel.num_gpus)]
    if parallel.sharding.value == "fsdp":
        argv.append("--fsdp")
    if parallel.zero_stage:
        argv += ["--zero", str(parallel.zero_stage)]
    if parallel.offload.value != "none":
        argv += ["--offload", parallel.offload.value]
    if parallel.fsdp_mixed_units:
        argv += ["--fsdp-wrap", "blocks"]
    if mapping.gpu is not None:
        argv += ["--gpu", mapping.gpu]
        if mapping.cuda_context_bytes:
            argv += ["--cuda-context", f"{mapping.cuda_context_bytes}B"]
    return shlex.join(argv)


def _flag_value(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def predict_case(case: ReferenceCase, directory: Path | None = None) -> PlanResult:
    """memplan's analytical plan of a case on its measured GPU."""
    spec = case_model(case, directory)
    setup = TrainingSetup(**case.memplan.setup)
    parallel = ParallelSetup(**case.memplan.parallel)
    return plan(spec, setup, parallel, gpu=case_gpu(case))


def _compared(case: ReferenceCase) -> tuple[Compared, str]:
    compared, because = METRIC_COMPARED.get(case.metric, METRIC_COMPARED["unknown"])
    if compared != case.memplan.compare:
        raise MemplanError(
            f"{case.id}: metric {case.metric!r} is compared with {compared}, the record says "
            f"{case.memplan.compare}"
        )
    return compared, because


def evaluate_case(
    case: ReferenceCase, directory: Path | None = None, *, simulate: bool = False
) -> CaseResult:
    """Predict one case and set the prediction against the published number."""
    result = predict_case(case, directory)
    compared, because = _compared(case)
    predicted = int(getattr(result, compared))
    measured = case.measured_bytes
    breakdown = result.breakdown_bytes
    sim_bytes: int | None = None
    sim_error: float | None = None
    status = "not run"
    if simulate:
        sim_bytes, status = simulated_bytes(case, result, directory)
        if sim_bytes is not None:
            sim_error = relative_error(sim_bytes, measured)
    return CaseResult(
        id=case.id,
        source=case.source,
        model=result.model,
        method=str(result.setup["method"]),
        stack=str(result.setup.get("stack", "hf-trainer")),
        metric=case.metric,
        compared=compared,
        compared_because=because,
        confidence=str(case.reference.get("confidence", "")),
        suspect=case.suspect,
        measured_bytes=measured,
        predicted_bytes=predicted,
        error_fraction=relative_error(predicted, measured),
        dominant_category=max(breakdown, key=lambda c: breakdown[c]),
        breakdown_bytes=breakdown,
        peak_phase=result.peak_phase,
        simulated_bytes=sim_bytes,
        simulated_error_fraction=sim_error,
        simulated_status=status,
        explanation=case.explanation,
        command=case_command(case, directory),
    )


def simulator_status() -> str | None:
    """None when the fake-tensor simulator can run here, else why not."""
    try:
        from memplan.torchsim.step import trace_step  # noqa: F401
    except ImportError as exc:
        return f"not available: {exc.name or exc} is not installed (pip install memplan[torch,hf])"
    return None


def simulated_bytes(
    case: ReferenceCase, result: PlanResult, directory: Path | None = None
) -> tuple[int | None, str]:
    """The compared number from a fake-tensor trace of the case's step, or why there is none.

    The simulator traces one GPU without sharding, so cases with ZeRO/FSDP or offload are
    left to the analytical model.
    """
    status = simulator_status()
    if status is not None:
        return None, status
    parallel = ParallelSetup(**case.memplan.parallel)
    if parallel.num_gpus > 1 or parallel.zero_stage or parallel.offload != "none":
        return None, "not simulated: sharded or offloaded run"
    from memplan.allocator import replay
    from memplan.torchsim.records import Placement
    from memplan.torchsim.step import trace_step

    spec = case_model(case, directory)
    setup = TrainingSetup(**case.memplan.setup)
    hf_config = None
    if case.memplan.model.endswith(".json"):  # not in the catalog: hand the tracer its config
        path = (directory or REFERENCES_DIR) / case.memplan.model
        hf_config = {**json.loads(path.read_text()), **(case.memplan.model_overrides or {})}
    try:
        traced = trace_step(spec, setup, mode="fake", hf_config=hf_config)
    except Exception as exc:  # the simulator cannot build every family/method yet
        return None, f"not simulated: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    peak = traced.trace.peak().peak_bytes
    compared = case.memplan.compare
    if compared == "peak_bytes":
        return peak, "ok"
    reserved = max(replay(traced.trace.events(relabel=False)).peak_reserved_bytes, peak)
    if compared == "reserved_bytes":
        return reserved, "ok"
    paged = traced.outside_allocator_bytes.get(Placement.PAGED, 0)
    return reserved + result.cuda_context_bytes + result.communicator_bytes + paged, "ok"


class SourceSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    cases: int
    median_abs_error: float
    max_abs_error: float
    worst_case: str
    median_error: float = Field(description="Median signed error (negative: predicted low).")
    lowest_error: float = Field(description="Most negative signed error.")
    highest_error: float = Field(description="Most positive signed error.")


class ValidationReport(BaseModel):
    """Every case's row and the error summary, as ``memplan validate --json`` prints it."""

    model_config = ConfigDict(frozen=True)

    rows: list[CaseResult]
    simulator: str = Field(description="'available', 'not run' or why it is not available.")

    @cached_property
    def summary(self) -> dict[str, Any]:
        return summarize(self.rows)

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": [r.model_dump(mode="json") for r in self.rows],
            "summary": self.summary,
            "simulator": self.simulator,
        }


def _source_summary(rows: list[CaseResult]) -> SourceSummary:
    worst = max(rows, key=lambda r: r.abs_error)
    return SourceSummary(
        cases=len(rows),
        median_abs_error=statistics.median(r.abs_error for r in rows),
        max_abs_error=worst.abs_error,
        worst_case=worst.id,
        median_error=statistics.median(r.error_fraction for r in rows),
        lowest_error=min(r.error_fraction for r in rows),
        highest_error=max(r.error_fraction for r in rows),
    )


def summarize(rows: Iterable[CaseResult]) -> dict[str, Any]:
    """Median and worst absolute error: all cases, without SUSPECT ones, and per source."""
    rows = list(rows)
    reliable = [r for r in rows if not r.suspect]
    by_source: dict[str, list[CaseResult]] = {}
    by_stack: dict[str, list[CaseResult]] = {}
    for r in rows:
        by_source.setdefault(r.source, []).append(r)
        by_stack.setdefault(r.stack, []).append(r)
    misses = [r.id for r in rows if r.abs_error > MISS_THRESHOLD]
    unexplained = [r.id for r in rows if r.abs_error > EXPLANATION_THRESHOLD and not r.explanation]
    return {
        "all": _source_summary(rows).model_dump(),
        "without_suspect": _source_summary(reliable).model_dump(),
        "per_source": {s: _source_summary(rs).model_dump() for s, rs in sorted(by_source.items())},
        "per_stack": {s: _source_summary(rs).model_dump() for s, rs in sorted(by_stack.items())},
        "over_10_percent": misses,
        "over_30_percent_unexplained": unexplained,
    }


def error_bands(rows: Iterable[CaseResult]) -> dict[str, ErrorBand]:
    """Signed error range of the published cases per method, and over all of them ("all");
    SUSPECT cases left out."""
    reliable = [r for r in rows if not r.suspect]
    groups: dict[str, list[CaseResult]] = {"all": reliable}
    for r in reliable:
        groups.setdefault(r.method, []).append(r)
    return {
        name: ErrorBand(
            cases=len(group),
            lowest_error=min(r.error_fraction for r in group),
            highest_error=max(r.error_fraction for r in group),
            median_abs_error=statistics.median(r.abs_error for r in group),
        )
        for name, group in sorted(groups.items())
        if group
    }


def validate(
    directory: Path | None = None,
    *,
    simulate: bool = False,
    on_row: Callable[[int, int, CaseResult], None] | None = None,
) -> ValidationReport:
    """Predict every reference case (and simulate it where asked and possible).

    ``on_row(index, count, row)`` is called as each case finishes (progress reports).
    """
    cases = load_cases(directory)
    rows = []
    for index, case in enumerate(cases, start=1):
        rows.append(evaluate_case(case, directory, simulate=simulate))
        if on_row is not None:
            on_row(index, len(cases), rows[-1])
    status = simulator_status() if simulate else "not run"
    return ValidationReport(rows=rows, simulator=status or "available")


def print_commands(report: ValidationReport) -> None:
    """Each case as the command line that predicts it (plain lines, for copying)."""
    for row in report.rows:
        print(f"{row.id}: {row.command}")


def print_report(report: ValidationReport, *, simulate: bool = False) -> None:
    """The accuracy table and its summary, rendered with rich (display only)."""
    from rich.table import Table

    from memplan.report import stdout_console
    from memplan.units import gb

    table = Table(title="memplan vs published peak-memory measurements (decimal GB, 10^9 bytes)")
    numeric = ("measured", "predicted", "error", "simulated")
    for col in (
        "case",
        "metric -> compared",
        "measured",
        "predicted",
        "error",
        "dominant",
        *numeric[3:],
    ):
        table.add_column(col, justify="right" if col in numeric else "left")
    for row in report.rows:
        if row.simulated_bytes is not None and row.simulated_error_fraction is not None:
            simulated = f"{gb(row.simulated_bytes):.2f} ({row.simulated_error_fraction:+.0%})"
        else:
            simulated = "-" if row.simulated_status == "not run" else "n/a"
        table.add_row(
            row.id + (" (SUSPECT)" if row.suspect else ""),
            f"{row.metric} -> {row.compared}",
            f"{gb(row.measured_bytes):.2f}",
            f"{gb(row.predicted_bytes):.2f}",
            f"{row.error_fraction:+.1%}",
            row.dominant_category,
            simulated,
        )
    console = stdout_console()
    console.print(table)
    summary = report.summary
    for key, label in (("all", "all cases"), ("without_suspect", "without SUSPECT cases")):
        s = summary[key]
        console.print(
            f"{label}: {s['cases']} cases, median |error| {s['median_abs_error']:.1%}, "
            f"worst {s['max_abs_error']:.1%} ({s['worst_case']})"
        )
    for source, s in summary["per_source"].items():
        console.print(
            f"  {source}: {s['cases']} cases, median {s['median_abs_error']:.1%}, "
            f"worst {s['max_abs_error']:.1%} ({s['worst_case']})"
        )
    for stack, s in summary["per_stack"].items():
        console.print(
            f"  stack {stack}: {s['cases']} cases, median {s['median_error']:+.1%} "
            f"(|error| {s['median_abs_error']:.1%}), signed range {s['lowest_error']:+.1%} .. "
            f"{s['highest_error']:+.1%}"
        )
    if simulate:
        console.print(f"simulator: {report.simulator}")
        for row in report.rows:
            if row.simulated_status not in ("ok", "not run"):
                console.print(f"  {row.id}: {row.simulated_status}")
