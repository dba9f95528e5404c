"""``verify``: a measured run against memplan's prediction for the same setup.

Compared like with like: the allocated peak (``max_memory_allocated``) with ``peak_bytes``,
the reserved peak (``max_memory_reserved``) with the caching-allocator model's
``reserved_bytes``, and NVML's device memory (minus what was in use before the process touched
CUDA) with ``device_bytes`` (reserved + CUDA context + paged optimizer state); then phase by
phase, and the model state left after loading and after a full step. Torch-free.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from memplan.accuracy import relative_error
from memplan.catalog import load_model
from memplan.errors import MemplanError
from memplan.files import read_json, shown
from memplan.measure.records import MeasuredRun, ResultsFile
from memplan.plan import GpuTarget, PlanResult, plan
from memplan.specs import ParallelSetup, TrainingSetup
from memplan.trace import WEIGHT_CATEGORIES

_PHASES = ("forward", "backward", "optimizer")


class Check(BaseModel):
    """One measured quantity and its prediction."""

    model_config = ConfigDict(frozen=True)

    name: str
    measured_bytes: int
    predicted_bytes: int

    @property
    def error(self) -> float:
        """(predicted - measured) / measured."""
        return relative_error(self.predicted_bytes, self.measured_bytes)


class RunVerification(BaseModel):
    model_config = ConfigDict(frozen=True)

    label: str
    model: str
    checks: list[Check]
    oom: str | None = Field(default=None, description="The run ran out of memory (where).")
    predicted_fits: bool | None = None
    prediction: dict[str, Any]

    def check(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)


def _steady(run: MeasuredRun, phase: str) -> int | None:
    values = [s.max_allocated_bytes for s in run.steady_samples() if s.phase == phase]
    return max(values) if values else None


def _after(run: MeasuredRun, phase: str, step: int | None = None) -> int | None:
    values = [
        s.allocated_bytes
        for s in run.samples
        if s.phase == phase and (step is None or s.step == step)
    ]
    return values[-1] if values else None


def predict_run(run: MeasuredRun) -> PlanResult:
    """memplan's plan of the run's configuration, judged on its device's memory."""
    spec = load_model(run.model)
    try:
        setup = TrainingSetup(**{**run.setup, "defaults_from_method": ()})
        parallel = ParallelSetup(**run.parallel)
    except ValidationError as exc:
        raise MemplanError(
            f"run {run.label or run.model}: its configuration does not validate: "
            f"{exc.errors()[0]['msg']}"
        ) from exc
    capacity = run.environment.total_memory_bytes
    if run.memory_fraction is not None:
        # The cap bounds torch's allocator; the CUDA context sits beside it, outside the cap.
        capacity = int(capacity * run.memory_fraction) + (run.cuda_context_bytes or 0)
    target = None
    if capacity:
        target = GpuTarget(
            name=run.environment.device_name,
            capacity_bytes=capacity,
            context_bytes=run.cuda_context_bytes or 0,
        )
    return plan(spec, setup, parallel, gpu=target)


def verify_run(run: MeasuredRun, *, nvml_baseline_bytes: int | None = None) -> RunVerification:
    """Every comparison memplan can make for one measured run."""
    result = predict_run(run)
    checks: list[Check] = []
    if run.oom is None:
        checks.append(
            Check(
                name="allocated peak",
                measured_bytes=run.peak_allocated_bytes,
                predicted_bytes=result.peak_bytes,
            )
        )
        checks.append(
            Check(
                name="reserved peak",
                measured_bytes=run.peak_reserved_bytes,
                predicted_bytes=result.reserved_bytes,
            )
        )
        nvml = run.peak_nvml_bytes
        if nvml is not None and nvml_baseline_bytes is not None:
            checks.append(
                Check(
                    name="nvml device",
                    measured_bytes=nvml - nvml_baseline_bytes,
                    predicted_bytes=result.device_bytes,
                )
            )
        steady = max((int(k.split(":")[0]) for k in result.phase_peaks_bytes), default=0)
        for phase in _PHASES:
            measured = _steady(run, phase)
            predicted = _phase_peak(result, steady, phase)
            if measured is not None and predicted is not None:
                checks.append(
                    Check(name=f"{phase} peak", measured_bytes=measured, predicted_bytes=predicted)
                )
    loaded = _after(run, "load")
    if loaded is not None:
        state = sum(v for k, v in result.final_bytes.items() if k in WEIGHT_CATEGORIES)
        checks.append(Check(name="after load", measured_bytes=loaded, predicted_bytes=state))
    stepped = _after(run, "zero_grad", step=max((s.step for s in run.samples), default=0))
    if stepped is not None:
        # After zero_grad(set_to_none=True) only what persists across steps remains.
        checks.append(
            Check(
                name="after step",
                measured_bytes=stepped,
                predicted_bytes=sum(result.final_bytes.values()),
            )
        )
    oom = f"{run.oom.phase} of step {run.oom.step}" if run.oom else None
    return RunVerification(
        label=run.label or run.model,
        model=run.model,
        checks=checks,
        oom=oom,
        predicted_fits=result.fits,
        prediction=result.model_dump(mode="json"),
    )


def _phase_peak(result: PlanResult, step: int, phase: str) -> int | None:
    # The measured "forward" sample spans the model forward and the loss.
    names = ("forward", "loss") if phase == "forward" else (phase,)
    values = [result.phase_peaks_bytes.get(f"{step}:{n}") for n in names]
    present = [v for v in values if v is not None]
    return max(present) if present else None


class Summary(BaseModel):
    model_config = ConfigDict(frozen=True)

    n_runs: int
    n_oom: int
    device: str
    median_abs_error: dict[str, float]
    max_abs_error: dict[str, float]


def summarize(verifications: list[RunVerification], device: str) -> Summary:
    """Median and worst absolute error (fractions) of the allocated, reserved and NVML peaks."""
    keys = {"allocated": "allocated peak", "reserved": "reserved peak", "nvml": "nvml device"}
    median: dict[str, float] = {}
    worst: dict[str, float] = {}
    for key, name in keys.items():
        errors = [abs(c.error) for v in verifications if (c := v.check(name)) is not None]
        if errors:
            median[key] = statistics.median(errors)
            worst[key] = max(errors)
    return Summary(
        n_runs=len(verifications),
        n_oom=sum(v.oom is not None for v in verifications),
        device=device,
        median_abs_error=median,
        max_abs_error=worst,
    )


def load_runs(path: Path) -> tuple[list[MeasuredRun], int | None, str]:
    """Runs from a results file (many runs) or a single-run file (``memplan measure --out``)."""
    data = read_json(path, what="run file")
    if not isinstance(data, dict):
        raise MemplanError(f"{shown(path)}: not a memplan measured run or results file")
    try:
        if isinstance(data, dict) and "runs" in data:
            results = ResultsFile(**data)
            return results.runs, results.nvml_baseline_bytes, results.environment.device_name
        run = MeasuredRun(**{k: v for k, v in data.items() if k in MeasuredRun.model_fields})
    except (ValidationError, TypeError) as exc:
        raise MemplanError(f"{shown(path)}: not a memplan measured run or results file") from exc
    return [run], None, run.environment.device_name


_POINT_METRICS: dict[str, str] = {
    "allocated peak": "allocated",
    "reserved peak": "reserved",
    "nvml device": "nvml",
}


def verification_points(verifications: list[RunVerification], source: str) -> list[Any]:
    """The peak checks as predicted-vs-measured points (memplan.compare.ValidationPoint)."""
    from memplan.compare import ValidationPoint

    return [
        ValidationPoint(v.label, c.predicted_bytes, c.measured_bytes, metric, source)
        for v in verifications
        for c in v.checks
        if (metric := _POINT_METRICS.get(c.name)) is not None and c.measured_bytes > 0
    ]


CPU_DEVICE = "cpu (every allocation tracked)"


def is_traced_record(data: object) -> bool:
    """A ``memplan measure --device cpu --out`` record: the traced step and its trace."""
    return isinstance(data, dict) and {"traced", "trace"} <= data.keys()


def verify_traced_record(data: dict[str, Any], where: str) -> RunVerification:
    """A CPU-measured step against a fresh prediction of its setup, on the CPU's kernels.

    A CPU step has no caching allocator and no NVML: the allocated peak, each phase's peak and
    each category at the peak are what it measured.
    """
    try:
        traced = PlanResult(**data["traced"])
        setup = TrainingSetup(**{**traced.setup, "defaults_from_method": ()})
        parallel = ParallelSetup(**traced.parallel)
    except (ValidationError, TypeError) as exc:
        raise MemplanError(f"{where}: not a memplan measured run or results file") from exc
    reference = data.get("model_reference")
    spec = load_model(reference if isinstance(reference, str) else traced.model)
    result = plan(spec, setup, parallel)
    checks = [
        Check(
            name="allocated peak",
            measured_bytes=traced.peak_bytes,
            predicted_bytes=result.peak_bytes,
        )
    ]
    steady = max((int(k.split(":")[0]) for k in traced.phase_peaks_bytes), default=0)
    for phase in (*_PHASES[:1], "loss", *_PHASES[1:]):
        measured = traced.phase_peaks_bytes.get(f"{steady}:{phase}")
        predicted = result.phase_peaks_bytes.get(f"{steady}:{phase}")
        if measured is not None and predicted is not None:
            checks.append(
                Check(name=f"{phase} peak", measured_bytes=measured, predicted_bytes=predicted)
            )
    for category, measured in traced.breakdown_bytes.items():
        predicted = result.breakdown_bytes.get(category, 0)
        if measured or predicted:
            checks.append(
                Check(
                    name=f"{category} at peak", measured_bytes=measured, predicted_bytes=predicted
                )
            )
    return RunVerification(
        label=f"{setup.method}, {traced.source}",
        model=traced.model,
        checks=checks,
        prediction=result.model_dump(mode="json"),
    )


def verify_file(path: Path) -> tuple[list[RunVerification], Summary]:
    data = read_json(path, what="run file")
    if is_traced_record(data):
        assert isinstance(data, dict)
        verification = verify_traced_record(data, shown(path))
        return [verification], summarize([verification], CPU_DEVICE)
    runs, baseline, device = load_runs(path)
    verifications = [verify_run(r, nvml_baseline_bytes=baseline) for r in runs]
    return verifications, summarize(verifications, device)
