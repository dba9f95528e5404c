"""Byte units: parsing what users type, display helpers, and one module that knows 2**30."""

from __future__ import annotations

import io
import tokenize
from pathlib import Path

import pytest

from memplan.errors import MemplanError
from memplan.units import GB, GiB, MiB, TiB, format_bytes, gb, gib, parse_capacity

PACKAGE = Path(__file__).resolve().parents[1] / "memplan"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("48GB", 48 * 10**9),  # decimal, as GPU vendors print it
        ("48 GB", 48 * 10**9),
        ("48gb", 48 * 10**9),
        ("24GiB", 24 * 2**30),
        ("24 gib", 24 * 2**30),
        ("1.5TB", 1_500_000_000_000),
        ("0.5GiB", 2**29),
        ("80 GiB", 80 * 2**30),
        ("512MiB", 2**29),
        ("1024b", 1024),
    ],
)
def test_parse_capacity(text: str, expected: int) -> None:
    assert parse_capacity(text) == expected
    assert isinstance(parse_capacity(text), int)


@pytest.mark.parametrize("text", ["48", "GB", "48 XB", "-1GB", "4 8GB", "", "1e3GB"])
def test_parse_capacity_rejects_what_it_cannot_read(text: str) -> None:
    with pytest.raises(MemplanError, match="cannot read memory size"):
        parse_capacity(text)


def test_parse_capacity_rejects_zero() -> None:
    with pytest.raises(MemplanError, match="must be positive"):
        parse_capacity("0GB")


def test_unit_constants() -> None:
    assert (MiB, GiB, TiB) == (1024**2, 1024**3, 1024**4)
    assert GB == 1000**3
    assert gib(3 * 2**30) == 3.0
    assert gb(48 * 10**9) == 48.0
    assert gib(GB) == pytest.approx(0.931322574615, rel=1e-12)


@pytest.mark.parametrize(
    ("num_bytes", "shown"),
    [
        (3 * 2**30, "3.00 GiB"),
        (2**40 + 2**39, "1.50 TiB"),
        (5 * 2**20, "5.00 MiB"),
        (1536, "1.50 KiB"),
        (512, "512 B"),
        (0, "0 B"),
        (-(2**31), "-2.00 GiB"),
        (48 * 10**9, "44.70 GiB"),  # 48 GB is 44.70 GiB: never label decimal bytes as GiB
    ],
)
def test_format_bytes_displays_binary_units(num_bytes: int, shown: str) -> None:
    assert format_bytes(num_bytes) == shown


def _code_tokens(path: Path) -> list[str]:
    """The source's tokens without comments and strings (docstrings may quote formulas)."""
    skip = {tokenize.COMMENT, tokenize.STRING, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT}
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline)
    return [t.string for t in tokens if t.type not in skip]


def _unit_literals(tokens: list[str]) -> list[str]:
    found = []
    for i, tok in enumerate(tokens):
        if tok.lower() in ("1e9", "1e12", "1073741824", "1_073_741_824", "1_000_000_000"):
            found.append(tok)
        window = "".join(tokens[i : i + 3])
        if window in ("2**30", "1024**3", "10**9", "1<<30", "2**40", "10**12"):
            found.append(window)
    return found


def test_only_the_units_module_spells_out_gib_and_gb() -> None:
    offenders = {
        str(path.relative_to(PACKAGE)): hits
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "units.py" and (hits := _unit_literals(_code_tokens(path)))
    }
    assert offenders == {}
    # The scanner itself finds what it looks for.
    assert _unit_literals(["x", "=", "n", "/", "2", "**", "30"]) == ["2**30"]
    assert _unit_literals(["n", "/", "1e9"]) == ["1e9"]
