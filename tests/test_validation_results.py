"""Every committed GPU results file (validation/results/*.json) against the analytical model.

The bar: allocated peak median |error| <= 3% and worst <= 8%; reserved peak median <= 6%.
The files come from `validation/gpu/run.sh` on a real GPU and are committed unchanged.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from memplan.verify import load_runs, verify_file

RESULTS_DIR = Path(__file__).resolve().parents[1] / "validation" / "results"
RESULTS = sorted(RESULTS_DIR.glob("*.json")) if RESULTS_DIR.is_dir() else []

ALLOCATED_MEDIAN = 0.03
ALLOCATED_MAX = 0.08
RESERVED_MEDIAN = 0.06


def test_results_exist_or_skip_saying_so() -> None:
    if not RESULTS:
        pytest.skip(
            f"no GPU results yet in {RESULTS_DIR.relative_to(RESULTS_DIR.parents[1])}: "
            "run validation/gpu/run.sh on a CUDA machine to measure them"
        )


@pytest.mark.parametrize("path", RESULTS, ids=[p.stem for p in RESULTS])
def test_prediction_error_on_measured_runs(path: Path) -> None:
    verifications, summary = verify_file(path)
    measured = [v for v in verifications if v.oom is None]
    assert measured, f"{path.name}: every run ran out of memory"
    worst = max(
        verifications, key=lambda v: abs(c.error) if (c := v.check("allocated peak")) else 0.0
    )
    assert summary.median_abs_error["allocated"] <= ALLOCATED_MEDIAN
    assert summary.max_abs_error["allocated"] <= ALLOCATED_MAX, f"worst run: {worst.label}"
    assert summary.median_abs_error["reserved"] <= RESERVED_MEDIAN


@pytest.mark.parametrize("path", RESULTS, ids=[p.stem for p in RESULTS])
def test_results_record_the_machine(path: Path) -> None:
    runs, _, device = load_runs(path)
    assert device != "cpu", f"{path.name}: not a GPU measurement"
    for run in runs:
        env = run.environment
        assert env.driver, f"{run.label}: no driver version recorded"
        assert env.cuda, f"{run.label}: no CUDA version recorded"
