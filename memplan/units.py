"""Byte units: the one module that knows 2**30 and 10**9.

Everything inside memplan is an ``int`` number of bytes; these helpers convert only for display
and parse the capacities users type (``48GB``, ``24GiB``).
"""

from __future__ import annotations

import re
from typing import Final

from memplan.errors import MemplanError

KiB: Final = 2**10
MiB: Final = 2**20
GiB: Final = 2**30
TiB: Final = 2**40
KB: Final = 10**3
MB: Final = 10**6
GB: Final = 10**9
TB: Final = 10**12

_UNITS: Final = {
    "b": 1,
    "kb": KB,
    "mb": MB,
    "gb": GB,
    "tb": TB,
    "kib": KiB,
    "mib": MiB,
    "gib": GiB,
    "tib": TiB,
}
# Largest device capacity accepted: far beyond any accelerator (1 PiB).
MAX_CAPACITY_BYTES: Final = 2**50
_CAPACITY_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*$")


def gib(num_bytes: int | float) -> float:
    """Bytes as GiB (2**30) for display."""
    return num_bytes / GiB


def gb(num_bytes: int | float) -> float:
    """Bytes as decimal GB (10**9) for display."""
    return num_bytes / GB


def format_bytes(num_bytes: int | float, *, digits: int = 2) -> str:
    """Human-readable binary size: ``format_bytes(3 * 2**30) == '3.00 GiB'``."""
    size = float(num_bytes)
    sign = "-" if size < 0 else ""
    size = abs(size)
    for unit, factor in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= factor:
            return f"{sign}{size / factor:.{digits}f} {unit}"
    return f"{sign}{int(size)} B"


def parse_capacity(text: str) -> int:
    """Parse a memory size such as ``48GB`` (10**9) or ``24GiB`` (2**30) into bytes.

    >>> parse_capacity("24GiB")
    25769803776
    >>> parse_capacity("48 GB")
    48000000000
    """
    match = _CAPACITY_RE.match(text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise MemplanError(
            f"cannot read memory size {text!r}: expected a number and a unit such as 48GB or 24GiB"
        )
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise MemplanError(f"memory size {text!r} must be positive")
    if value > MAX_CAPACITY_BYTES:
        raise MemplanError(f"memory size {text!r} is beyond any device (at most 1 PiB)")
    return round(value)
