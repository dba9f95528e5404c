"""``verify``: measured runs against the prediction for the same setup, per check and summarized.

The runs here are built from the prediction itself with known distortions, so every error
verify reports is known in advance; real measurements are checked in
tests/test_validation_results.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from memplan.catalog import load_model
from memplan.measure.records import (
    Environment,
    MeasuredRun,
    OutOfMemory,
    PhaseSample,
    ResultsFile,
)
from memplan.plan import PlanResult
from memplan.specs import ParallelSetup, TrainingSetup
from memplan.verify import load_runs, predict_run, summarize, verify_file, verify_run

GiB = 2**30
ENV = Environment(
    device_name="NVIDIA H100 80GB HBM3",
    total_memory_bytes=80 * GiB,
    driver="550.54.15",
    cuda="12.4",
    torch="2.5.1",
    python="3.11.9",
    memplan="0.1.0",
)
CONTEXT_BYTES = 520 * 2**20
BASELINE_BYTES = 600 * 2**20


def setup_of(method: str = "lora", **kwargs: Any) -> TrainingSetup:
    return TrainingSetup(method=method, micro_batch_size=2, seq_len=64, **kwargs)


def empty_run(setup: TrainingSetup, **kwargs: Any) -> MeasuredRun:
    return MeasuredRun(
        model="tiny-llama",
        setup=setup.model_dump(mode="json"),
        parallel=ParallelSetup().model_dump(mode="json"),
        environment=ENV,
        cuda_context_bytes=CONTEXT_BYTES,
        **kwargs,
    )


def run_like(prediction: PlanResult, setup: TrainingSetup, scale: float) -> MeasuredRun:
    """A run whose every measured number is the prediction times ``scale``."""

    def at(value: int) -> int:
        return round(value * scale)

    resident = sum(prediction.final_bytes.values())
    loaded = sum(
        v for k, v in prediction.final_bytes.items() if k not in ("optimizer_state", "gradients")
    )
    samples = [
        PhaseSample(
            step=-1,
            phase="load",
            allocated_bytes=at(loaded),
            max_allocated_bytes=at(loaded),
            reserved_bytes=at(loaded),
            max_reserved_bytes=at(loaded),
        )
    ]
    for step in (0, 1):
        for phase in ("forward", "backward", "optimizer", "zero_grad"):
            names = ("forward", "loss") if phase == "forward" else (phase,)
            peaks = [prediction.phase_peaks_bytes.get(f"{min(step, 1)}:{n}") for n in names]
            peak = max(p for p in peaks if p is not None) if any(peaks) else at(resident)
            samples.append(
                PhaseSample(
                    step=step,
                    phase=phase,
                    allocated_bytes=at(resident),
                    max_allocated_bytes=at(peak),
                    reserved_bytes=at(prediction.reserved_bytes),
                    max_reserved_bytes=at(prediction.reserved_bytes),
                    nvml_used_bytes=BASELINE_BYTES + at(prediction.device_bytes),
                )
            )
    return empty_run(setup, samples=samples)


@pytest.fixture(scope="module")
def lora_prediction() -> PlanResult:
    return predict_run(empty_run(setup_of()))


def test_prediction_is_judged_on_the_measured_device(lora_prediction: PlanResult) -> None:
    assert lora_prediction.gpu == ENV.device_name
    assert lora_prediction.gpu_capacity_bytes == 80 * GiB
    assert lora_prediction.cuda_context_bytes == CONTEXT_BYTES
    capped = predict_run(empty_run(setup_of(), memory_fraction=0.5))
    # The cap bounds the allocator; the context is outside it.
    assert capped.gpu_capacity_bytes == 40 * GiB + CONTEXT_BYTES


def test_exact_measurement_has_zero_error(lora_prediction: PlanResult) -> None:
    run = run_like(lora_prediction, setup_of(), 1.0)
    result = verify_run(run, nvml_baseline_bytes=BASELINE_BYTES)
    names = [c.name for c in result.checks]
    assert names[:3] == ["allocated peak", "reserved peak", "nvml device"]
    # Fused AdamW allocates nothing in a steady step: no optimizer-phase peak to compare.
    assert names[3:] == ["forward peak", "backward peak", "after load", "after step"]
    for check in result.checks:
        assert check.error == pytest.approx(0.0, abs=1e-6), check.name
    assert result.oom is None
    assert result.predicted_fits is True


@pytest.mark.parametrize("scale", [0.9, 1.25])
def test_errors_are_prediction_minus_measurement_over_measurement(
    lora_prediction: PlanResult, scale: float
) -> None:
    run = run_like(lora_prediction, setup_of(), scale)
    result = verify_run(run, nvml_baseline_bytes=BASELINE_BYTES)
    for name in ("allocated peak", "reserved peak", "after step"):
        check = result.check(name)
        assert check is not None
        assert check.error == pytest.approx(1 / scale - 1, rel=1e-4)


def test_after_load_is_the_weights_the_setup_keeps_on_the_gpu(
    lora_prediction: PlanResult,
) -> None:
    # bf16 base weights and fp32 adapters: 2 bytes per frozen and 4 per trainable parameter,
    # each tensor rounded up to the allocator's 512-byte blocks.
    frozen = lora_prediction.params - lora_prediction.trainable_params
    expected = 2 * frozen + 4 * lora_prediction.trainable_params
    run = run_like(lora_prediction, setup_of(), 1.0)
    check = verify_run(run).check("after load")
    assert check is not None
    assert check.predicted_bytes == pytest.approx(expected, rel=0.02)


def test_out_of_memory_run_reports_where_and_skips_the_peaks() -> None:
    run = empty_run(
        setup_of("full"),
        oom=OutOfMemory(
            step=0, phase="backward", requested_bytes=GiB, message="CUDA out of memory"
        ),
    )
    result = verify_run(run)
    assert result.oom == "backward of step 0"
    assert result.check("allocated peak") is None


def test_summary_takes_median_and_worst_absolute_error(lora_prediction: PlanResult) -> None:
    runs = [run_like(lora_prediction, setup_of(), s) for s in (1.0, 0.8, 1.25)]
    verifications = [verify_run(r, nvml_baseline_bytes=BASELINE_BYTES) for r in runs]
    summary = summarize(verifications, ENV.device_name)
    assert summary.n_runs == 3
    assert summary.n_oom == 0
    # Errors 0, +25%, -20%: median |e| 20%, worst 25%.
    assert summary.median_abs_error["allocated"] == pytest.approx(0.20, rel=1e-4)
    assert summary.max_abs_error["allocated"] == pytest.approx(0.25, rel=1e-4)
    assert set(summary.median_abs_error) == {"allocated", "reserved", "nvml"}


def write_results(path: Path, runs: list[MeasuredRun]) -> Path:
    results = ResultsFile(
        created="2026-11-27T12:00:00+00:00",
        environment=ENV,
        nvml_baseline_bytes=BASELINE_BYTES,
        runs=runs,
    )
    path.write_text(results.model_dump_json(indent=2))
    return path


def test_single_run_file_from_measure_out_loads(
    tmp_path: Path, lora_prediction: PlanResult
) -> None:
    run = run_like(lora_prediction, setup_of(), 1.0)
    payload = run.model_dump(mode="json")
    payload["peak_allocated_bytes"] = run.peak_allocated_bytes  # measure --out adds these
    path = tmp_path / "run.json"
    path.write_text(json.dumps(payload))
    runs, baseline, device = load_runs(path)
    assert runs == [run]
    assert baseline is None
    assert device == ENV.device_name


def test_cli_json_prints_runs_and_summary(
    tmp_path: Path, run_cli: Any, lora_prediction: PlanResult
) -> None:
    runs = [run_like(lora_prediction, setup_of(), s) for s in (1.0, 1.02)]
    path = write_results(tmp_path / "h100.json", runs)
    result = run_cli("verify", str(path), "--json")
    assert result.code == 0, result.err
    data = result.json()
    assert data["n_runs"] == 2
    assert data["device"] == ENV.device_name
    assert data["max_abs_error"]["allocated"] == pytest.approx(1 - 1 / 1.02, rel=1e-3)
    assert data["runs"][1]["errors"]["allocated peak"] == pytest.approx(1 / 1.02 - 1, rel=1e-3)
    assert verify_file(path)[1].n_runs == 2


def test_cli_exit_status_follows_the_tolerance(
    tmp_path: Path, run_cli: Any, lora_prediction: PlanResult
) -> None:
    path = write_results(tmp_path / "off.json", [run_like(lora_prediction, setup_of(), 1.1)])
    failed = run_cli("verify", str(path))
    assert failed.code == 1  # 9% off, default tolerance 5%
    assert failed.out.splitlines()[-1] == (
        "FAIL: the worst allocated-peak error, 9.1%, is beyond the tolerance of 5.0%"
    )
    passed = run_cli("verify", str(path), "--tolerance", "0.1")
    assert passed.code == 0
    assert "allocated peak" in passed.out
    assert passed.out.splitlines()[-1].startswith("PASS: the worst allocated-peak error, 9.1%")
    as_json = run_cli("verify", str(path), "--json")
    assert (as_json.code, as_json.json()["passed"]) == (1, False)


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "malformed JSON"), ('{"runs": [1]}', "not a memplan measured run")],
)
def test_cli_bad_file_is_a_one_line_error(
    tmp_path: Path, run_cli: Any, content: str, message: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    result = run_cli("verify", str(path))
    assert result.code == 2
    assert message in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_cli_missing_file_is_a_one_line_error(tmp_path: Path, run_cli: Any) -> None:
    result = run_cli("verify", str(tmp_path / "absent.json"))
    assert result.code == 2
    assert "cannot read" in result.err


def test_unknown_model_in_a_run_is_a_one_line_error(tmp_path: Path, run_cli: Any) -> None:
    run = empty_run(setup_of()).model_copy(update={"model": "no-such-model"})
    path = write_results(tmp_path / "unknown.json", [run])
    result = run_cli("verify", str(path))
    assert result.code == 2
    assert "no-such-model" in result.err


def test_prediction_uses_the_runs_setup_not_the_method_defaults() -> None:
    setup = setup_of("qlora", lora_r=64, optimizer="paged-adamw")
    run = empty_run(setup).model_copy(update={"model": "llama-2-7b"})
    prediction = predict_run(run)
    assert prediction.setup["lora_r"] == 64
    assert prediction.model == load_model("llama-2-7b").name
    # bitsandbytes pages the state of tensors of >= 1e5 elements: every 7B LoRA matrix.
    assert prediction.paged_bytes > 0


def test_points_carry_the_three_peaks_of_every_run(lora_prediction: PlanResult) -> None:
    from memplan.verify import verification_points

    runs = [run_like(lora_prediction, setup_of(), s) for s in (1.0, 1.1)]
    points = verification_points(
        [verify_run(r, nvml_baseline_bytes=BASELINE_BYTES) for r in runs], "h100.json"
    )
    assert [p.metric for p in points] == ["allocated", "reserved", "nvml"] * 2
    assert points[3].error_fraction == pytest.approx(1 / 1.1 - 1, rel=1e-4)
    assert {p.source for p in points} == {"h100.json"}


def test_committed_results_files_become_validation_points(
    tmp_path: Path, lora_prediction: PlanResult
) -> None:
    from memplan.compare import validation_points

    (tmp_path / "results").mkdir()
    write_results(tmp_path / "results" / "h100.json", [run_like(lora_prediction, setup_of(), 1.0)])
    points = validation_points(tmp_path)
    assert [p.metric for p in points] == ["allocated", "reserved", "nvml"]
    assert all(p.source == "results/h100.json" for p in points)
    assert validation_points(tmp_path, estimator="accelerate") == []


def test_cli_plot_writes_the_scatter(
    tmp_path: Path, run_cli: Any, lora_prediction: PlanResult
) -> None:
    path = write_results(tmp_path / "h100.json", [run_like(lora_prediction, setup_of(), 1.0)])
    png = tmp_path / "scatter.png"
    result = run_cli("verify", str(path), "--plot", str(png))
    assert result.code == 0, result.err
    assert png.read_bytes().startswith(b"\x89PNG")


def test_cli_plot_of_only_out_of_memory_runs_is_an_error(tmp_path: Path, run_cli: Any) -> None:
    oom = OutOfMemory(step=0, phase="forward", requested_bytes=None, message="out of memory")
    path = write_results(tmp_path / "oom.json", [empty_run(setup_of(), oom=oom)])
    result = run_cli("verify", str(path), "--plot", str(tmp_path / "x.png"))
    assert result.code == 2
    assert "no completed run" in result.err
