"""The registry of fine-tuning methods: every module of this package defines one.

A module ``memplan/methods/<name>.py`` binds ``METHOD`` to an instance of a
:class:`~memplan.methods.base.TuningMethod` subclass; it is found here by its presence, so a
new method is that module, nothing else. Modules whose names start with an underscore hold code
shared by several methods.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from memplan.errors import MemplanError
from memplan.methods.base import AddedParam, TuningMethod

__all__ = ["AddedParam", "TuningMethod", "method", "method_names", "methods"]


@cache
def methods() -> dict[str, TuningMethod]:
    """Every registered method by name, in display order (``TuningMethod.rank``)."""
    found: dict[str, TuningMethod] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        tuning = getattr(module, "METHOD", None)
        if not isinstance(tuning, TuningMethod):
            raise MemplanError(f"memplan.methods.{info.name} defines no METHOD")
        if tuning.name in found:
            raise MemplanError(f"two modules define method {tuning.name!r}")
        found[tuning.name] = tuning
    return dict(sorted(found.items(), key=lambda item: (item[1].rank, item[0])))


def method_names() -> tuple[str, ...]:
    return tuple(methods())


def method(name: str) -> TuningMethod:
    """The method called ``name``."""
    try:
        return methods()[name]
    except KeyError:
        raise MemplanError(f"unknown method {name!r} (known: {', '.join(methods())})") from None
