"""How far a prediction is from a measurement: the one definition memplan uses everywhere."""

from __future__ import annotations

from memplan.errors import MemplanError


def relative_error(predicted_bytes: int, measured_bytes: int) -> float:
    """Signed relative error (predicted - measured) / measured; negative: predicted low.

    >>> relative_error(95, 100)
    -0.05
    """
    if measured_bytes <= 0:
        raise MemplanError(f"a measured size must be positive, got {measured_bytes} bytes")
    return (predicted_bytes - measured_bytes) / measured_bytes
