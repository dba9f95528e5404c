"""Measured-run records: peaks over phases, steady samples without the warm-up, JSON round trip."""

from __future__ import annotations

from memplan.measure.records import Environment, MeasuredRun, PhaseSample, ResultsFile

ENV = Environment(
    device_name="NVIDIA H100 80GB HBM3",
    total_memory_bytes=85_045_870_592,
    driver="550.54.15",
    cuda="12.4",
    torch="2.5.1",
    python="3.11.9",
    memplan="0.1.0",
)


def sample(
    step: int, phase: str, allocated: int, peak: int, nvml: int | None = None
) -> PhaseSample:
    return PhaseSample(
        step=step,
        phase=phase,
        allocated_bytes=allocated,
        max_allocated_bytes=peak,
        reserved_bytes=peak + 1000,
        max_reserved_bytes=peak + 2000,
        nvml_used_bytes=nvml,
    )


def make_run() -> MeasuredRun:
    return MeasuredRun(
        model="tiny-llama",
        setup={"method": "lora"},
        parallel={},
        environment=ENV,
        samples=[
            sample(-1, "load", 100, 100),
            sample(-1, "forward", 100, 900, nvml=5000),  # warm-up: the highest of all
            sample(0, "forward", 100, 700, nvml=4000),
            sample(0, "backward", 150, 800),
        ],
    )


def test_peaks_span_every_sample_including_warm_up() -> None:
    run = make_run()
    assert run.peak_allocated_bytes == 900
    assert run.peak_reserved_bytes == 2900
    assert run.peak_nvml_bytes == 5000


def test_steady_samples_drop_the_warm_up() -> None:
    run = make_run()
    assert [(s.step, s.phase) for s in run.steady_samples()] == [(0, "forward"), (0, "backward")]
    warm_only = run.model_copy(update={"samples": run.samples[:2]})
    assert len(warm_only.steady_samples()) == 2  # nothing measured: fall back to all


def test_no_samples_means_no_peak() -> None:
    run = make_run().model_copy(update={"samples": []})
    assert run.peak_allocated_bytes == 0
    assert run.peak_nvml_bytes is None


def test_results_file_round_trips_through_json() -> None:
    results = ResultsFile(
        created="2026-11-27T12:00:00+00:00",
        environment=ENV,
        nvml_baseline_bytes=600_000_000,
        runs=[make_run()],
    )
    again = ResultsFile.model_validate_json(results.model_dump_json())
    assert again == results
    assert again.runs[0].peak_allocated_bytes == 900
