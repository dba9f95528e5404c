"""Read a Hugging Face ``config.json`` into a :class:`ModelSpec`, through its family.

The family registered for the config's ``model_type`` (:mod:`memplan.families`) reads it with
the defaults of its transformers configuration class and requires the sizes that define the
model (vocabulary, width, depth, heads, MLP width). A reader raises ``ValueError`` with a short
message; :func:`spec_from_hf_config` turns it into a one-line :class:`MemplanError` that names
the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from memplan.errors import MemplanError
from memplan.families import family, family_for_model_type, model_types
from memplan.specs.model import ModelSpec


def supported_model_types() -> tuple[str, ...]:
    """Every config.json ``model_type`` a registered family reads, sorted."""
    return model_types()


def spec_from_hf_config(
    config: Mapping[str, Any],
    *,
    name: str,
    source: str | None = None,
    traced_only: bool = False,
    **extra: Any,
) -> ModelSpec:
    """Build a ModelSpec from a parsed Hugging Face config.json.

    ``source`` names the file in error messages; ``extra`` adds catalog fields (num_params,
    hf_id). ``traced_only``: a model_type no family reads becomes a traced-only spec (what
    transformers' configuration says) instead of an error. Raises MemplanError for unsupported
    model types and missing or invalid fields.
    """
    where = source or name
    model_type = config.get("model_type")
    fam = family_for_model_type(model_type) if isinstance(model_type, str) else None
    if fam is None and traced_only and isinstance(model_type, str):
        fam = family("traced-only")
    if fam is None:
        found = (
            "has no 'model_type'"
            if model_type is None
            else f"unsupported model_type {model_type!r}"
        )
        hint = "" if model_type is None else "; `memplan simulate` traces it with transformers"
        raise MemplanError(
            f"{where}: {found} (supported: {', '.join(supported_model_types())}){hint}"
        )
    try:
        fields = fam.read_config(config)
        return ModelSpec(name=name, family=fam.name, **fields, **extra)
    except (TypeError, ValueError, AttributeError) as exc:  # ValidationError is a ValueError
        raise MemplanError(f"{where}: {_one_line(exc)}") from exc


def _one_line(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        message = str(first["msg"]).removeprefix("Value error, ")
        loc = ".".join(str(p) for p in first["loc"])
        return f"invalid {loc}: {message}" if loc else message
    return str(exc).splitlines()[0]
