"""The registry of training stacks: every module of this package defines one.

A module ``memplan/stacks/<name>.py`` binds ``STACK`` to an instance of a
:class:`~memplan.stacks.base.TrainingStack` subclass; it is found here by its presence.
``hf-trainer`` (transformers' Trainer with peft) is the default stack.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from typing import Final

from memplan.errors import MemplanError
from memplan.stacks.base import Default, Request, TrainingStack

__all__ = ["DEFAULT_STACK", "Default", "Request", "TrainingStack", "stack", "stacks"]

DEFAULT_STACK: Final = "hf-trainer"


@cache
def stacks() -> dict[str, TrainingStack]:
    """Every registered stack by name, in display order (``TrainingStack.rank``)."""
    found: dict[str, TrainingStack] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        entry = getattr(module, "STACK", None)
        if not isinstance(entry, TrainingStack):
            raise MemplanError(f"memplan.stacks.{info.name} defines no STACK")
        if entry.name in found:
            raise MemplanError(f"two modules define stack {entry.name!r}")
        found[entry.name] = entry
    return dict(sorted(found.items(), key=lambda item: (item[1].rank, item[0])))


def stack(name: str) -> TrainingStack:
    """The stack called ``name``."""
    try:
        return stacks()[name]
    except KeyError:
        raise MemplanError(f"unknown stack {name!r} (known: {', '.join(stacks())})") from None
