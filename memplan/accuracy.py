"""How far a prediction is from a measurement, and how far memplan has been from published ones.

:func:`relative_error` is the one error definition memplan uses. :func:`error_band` gives,
per fine-tuning method, the range of signed errors memplan makes on the published reference
runs (``memplan validate``, SUSPECT cases left out), from ``references/error_bands.json``
(written by ``scripts/error_bands.py``; a test keeps it equal to what validate computes). A
verdict states its margin against that band, and the default safety margin is the largest
underestimate in it: a run predicted to fit by less than that is borderline.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Final

from pydantic import BaseModel, ConfigDict, Field

from memplan.errors import MemplanError

BANDS_FILE: Final = Path(__file__).resolve().parent / "references" / "error_bands.json"


def relative_error(predicted_bytes: int, measured_bytes: int) -> float:
    """Signed relative error (predicted - measured) / measured; negative: predicted low.

    >>> relative_error(95, 100)
    -0.05
    """
    if measured_bytes <= 0:
        raise MemplanError(f"a measured size must be positive, got {measured_bytes} bytes")
    return (predicted_bytes - measured_bytes) / measured_bytes


class ErrorBand(BaseModel):
    """memplan's signed errors on the published runs of one kind."""

    model_config = ConfigDict(frozen=True)

    cases: int = Field(description="Published runs of this kind.")
    lowest_error: float = Field(description="Most negative (predicted - measured) / measured.")
    highest_error: float = Field(description="Most positive error.")
    median_abs_error: float

    @property
    def underestimate(self) -> float:
        """The largest fraction by which memplan predicted one of these runs low (0: never)."""
        return max(0.0, -self.lowest_error)

    def describe(self, kind: str) -> str:
        return (
            f"published {kind} runs ({self.cases}) were predicted within "
            f"{self.lowest_error:+.0%} .. {self.highest_error:+.0%} "
            f"(median |error| {self.median_abs_error:.0%})"
        )


@cache
def error_bands() -> dict[str, ErrorBand]:
    """Every committed band by method name (and "all")."""
    if not BANDS_FILE.exists():
        return {}
    data = json.loads(BANDS_FILE.read_text(encoding="utf-8"))
    return {name: ErrorBand(**band) for name, band in data["bands"].items()}


def error_band(method: str) -> tuple[str, ErrorBand] | None:
    """The band of ``method``'s published runs, else of all of them: (kind, band)."""
    bands = error_bands()
    if method in bands:
        return method, bands[method]
    if "all" in bands:
        return "fine-tuning", bands["all"]
    return None
