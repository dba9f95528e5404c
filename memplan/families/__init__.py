"""The registry of model families: every module of this package defines one.

A module ``memplan/families/<name>.py`` binds ``FAMILY`` to an instance of a
:class:`~memplan.families.base.ModelFamily` subclass; it is found here by its presence, so a
new family is that module (and its tiny catalog model), nothing else. Modules whose names start
with an underscore hold code shared by several families.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from memplan.errors import MemplanError
from memplan.families.base import Config, Layout, ModelFamily

__all__ = [
    "Config",
    "Layout",
    "ModelFamily",
    "families",
    "family",
    "family_for_model_type",
    "model_types",
]


@cache
def families() -> dict[str, ModelFamily]:
    """Every registered family by name, sorted."""
    found: dict[str, ModelFamily] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        fam = getattr(module, "FAMILY", None)
        if not isinstance(fam, ModelFamily):
            raise MemplanError(f"memplan.families.{info.name} defines no FAMILY")
        if fam.name in found:
            raise MemplanError(f"two modules define family {fam.name!r}")
        found[fam.name] = fam
    return dict(sorted(found.items()))


def family(name: str) -> ModelFamily:
    """The family called ``name`` (``ModelSpec.family``; the traced-only one included)."""
    from memplan.families._traced import FAMILY as TRACED

    if name == TRACED.name:
        return TRACED
    try:
        return families()[name]
    except KeyError:
        raise MemplanError(
            f"unknown model family {name!r} (known: {', '.join(families())})"
        ) from None


@cache
def _by_model_type() -> dict[str, ModelFamily]:
    return {t: fam for fam in families().values() for t in fam.model_types}


def model_types() -> tuple[str, ...]:
    """Every config.json ``model_type`` some family reads, sorted."""
    return tuple(sorted(_by_model_type()))


def family_for_model_type(model_type: str) -> ModelFamily | None:
    """The family that reads ``model_type`` (None: no family does)."""
    return _by_model_type().get(model_type)
