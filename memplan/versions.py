"""Library versions whose releases change what a training step allocates.

An answer holds for the library versions it assumes: current releases by default, or the
versions a user names (``--assume bitsandbytes=0.42.0``; ``TrainingSetup.library_versions``).
Each entry below is one mechanism that differs across releases, the release that changed it
and the setup field it decides; a named version older than that release sets the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class VersionMechanism:
    library: str
    changed_in: tuple[int, ...]  # first release with today's behaviour
    field: str  # the TrainingSetup field it decides
    before: object  # the field's value for releases before ``changed_in``
    what: str  # the older releases' behaviour, in words
    source: str


MECHANISMS: Final[tuple[VersionMechanism, ...]] = (
    VersionMechanism(
        library="bitsandbytes",
        changed_in=(0, 43, 2),
        field="quant_matmul_saves_input",
        before=True,
        what="MatMul4Bit keeps each 4-bit matmul's input until backward (ctx.tensors = (A, B))",
        # bitsandbytes 9e753741 "fix QLoRA mem bug: delete useless buffered activation (#1270)"
        source="bitsandbytes/autograd/_functions.py MatMul4Bit.forward, fixed in 0.43.2",
    ),
)

LIBRARIES: Final = tuple(sorted({m.library for m in MECHANISMS}))
_VERSION = re.compile(r"^\d+(\.\d+){0,3}$")


def parse_version(text: str) -> tuple[int, ...]:
    """``"0.42.0"`` -> (0, 42, 0); raises ValueError naming the expected form."""
    cleaned = text.strip()
    if not _VERSION.match(cleaned):
        raise ValueError(f"version {text!r} is not of the form 0.42.0")
    return tuple(int(p) for p in cleaned.split("."))


def check_versions(versions: dict[str, str]) -> dict[str, str]:
    """The versions, each a known library with a well-formed version (ValueError if not)."""
    for library, version in versions.items():
        if library not in LIBRARIES:
            raise ValueError(
                f"no mechanism of library {library!r} depends on its version "
                f"(versions matter for: {', '.join(LIBRARIES)})"
            )
        parse_version(version)
    return versions


def fields_for(versions: dict[str, str]) -> dict[str, object]:
    """The setup fields the named versions decide (only those older than a change)."""
    fields: dict[str, object] = {}
    for mechanism in MECHANISMS:
        version = versions.get(mechanism.library)
        if version is not None and parse_version(version) < mechanism.changed_in:
            fields[mechanism.field] = mechanism.before
    return fields


def assumption_lines(versions: dict[str, str]) -> list[str]:
    """One line per named library: the version and what it changes."""
    lines = []
    for library, version in sorted(versions.items()):
        older = [
            m for m in MECHANISMS if m.library == library and parse_version(version) < m.changed_in
        ]
        what = "; ".join(f"{m.what} ({m.source})" for m in older) or "as current releases"
        lines.append(f"{library} {version} assumed: {what}")
    return lines


def parse_assume(items: list[str]) -> dict[str, str]:
    """``["bitsandbytes=0.42.0", ...]`` (the CLI's ``--assume``) -> {library: version}."""
    versions: dict[str, str] = {}
    for item in items:
        library, sep, version = item.partition("=")
        if not sep or not library.strip() or not version.strip():
            raise ValueError(
                f"--assume {item!r}: expected LIBRARY=VERSION, e.g. bitsandbytes=0.42.0"
            )
        versions[library.strip()] = version.strip()
    return check_versions(versions)
