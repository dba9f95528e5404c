"""Progress of long work, on stderr (so stdout stays the answer, JSON included)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner with ``message`` while the block runs, on an interactive stderr only."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(message):
        yield


def note(message: str) -> None:
    """One line of progress on stderr (streamed as work finishes)."""
    print(message, file=sys.stderr, flush=True)
