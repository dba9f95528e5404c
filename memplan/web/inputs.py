"""A web request's JSON body read into the Python API's arguments, every error tied to its field.

The body holds the fields of :func:`memplan.plan.plan` (and fit, recommend)::

    {"model": "llama-65b",                      # or "config": {"name": ..., "text": ...}
     "setup": {"method": "qlora", ...},         # TrainingSetup fields; left out: the method's
     "parallel": {"num_gpus": 1, ...},          # ParallelSetup fields
     "gpu": "rtx-a6000", "safety": 0.05}        # a profile or a capacity such as 48GB

A bad value raises :class:`FieldError`: the one-line message the CLI prints for it
(:func:`memplan.answers.error_message`) and the field it is about, so the page can show it next
to the control.
"""

from __future__ import annotations

import math
from typing import Any, Final

from pydantic import ValidationError

from memplan.answers import error_message, validation_field
from memplan.errors import MemplanError
from memplan.recommend import Rank
from memplan.specs.model import ModelSpec
from memplan.specs.parallel import ParallelSetup
from memplan.specs.training import TrainingSetup
from memplan.units import MiB

# A request is a few hundred bytes of fields plus, at most, one config.json (a few kilobytes;
# the largest catalog config, with its rope-scaling tables, is under 8 KiB).
MAX_BODY_BYTES: Final = 1 * MiB
MAX_CONFIG_NAME_CHARS: Final = 255  # a file name, as file systems bound it
MAX_MODEL_NAME_CHARS: Final = 200  # a catalog name or a Hugging Face id
BODY_KEYS: Final = frozenset(
    {"model", "config", "setup", "parallel", "gpu", "safety", "table", "tokens", "rank"}
)


class FieldError(MemplanError):
    """A bad input and the request field it is about (None: the request as a whole)."""

    def __init__(self, message: str, field: str | None) -> None:
        super().__init__(message)
        self.field = field


def _object(body: dict[str, Any], key: str) -> dict[str, Any]:
    value = body.get(key) or {}
    if not isinstance(value, dict):
        raise FieldError(f"{key}: expected a JSON object, got {type(value).__name__}", key)
    return value


def check_keys(body: object) -> dict[str, Any]:
    """``body`` if it is a JSON object of known fields."""
    if not isinstance(body, dict):
        raise FieldError(f"expected a JSON object, got {type(body).__name__}", None)
    unknown = sorted(set(body) - BODY_KEYS)
    if unknown:
        raise FieldError(
            f"unknown field {unknown[0]!r} (fields: {', '.join(sorted(BODY_KEYS))})", unknown[0]
        )
    return body


def model_of(body: dict[str, Any]) -> ModelSpec:
    """The catalog model ``model`` names, or the uploaded ``config`` (name and text)."""
    from memplan.catalog import load_config_bytes, load_model

    config = body.get("config")
    if config is not None:
        config = _object(body, "config")
        name, text = config.get("name", "config.json"), config.get("text")
        if not isinstance(name, str) or not name or len(name) > MAX_CONFIG_NAME_CHARS:
            raise FieldError("config: expected the file's name", "config")
        if not isinstance(text, str):
            raise FieldError(f"config {name}: expected the file's text", "config")
        try:
            return load_config_bytes(text.encode("utf-8", "surrogatepass"), filename=name)
        except MemplanError as exc:
            raise FieldError(error_message(exc), "config") from exc
    name = body.get("model")
    if not isinstance(name, str) or not name.strip():
        raise FieldError("model: choose a catalog model or upload a config.json", "model")
    if len(name) > MAX_MODEL_NAME_CHARS:
        raise FieldError(
            f"model: a name of {len(name):,} characters is not a catalog name", "model"
        )
    from memplan.catalog import catalog_name, catalog_record

    found = catalog_name(name)  # a catalog name or a Hugging Face id: never a server path
    try:
        if found is None:
            catalog_record(name)  # raises the CLI's message for an unknown model
        return load_model(found or name)
    except MemplanError as exc:
        raise FieldError(error_message(exc), "model") from exc


def setup_of(body: dict[str, Any], spec: ModelSpec) -> TrainingSetup:
    """The TrainingSetup of ``setup`` (``lora_targets`` also as the CLI's text, read against
    ``spec``)."""
    from memplan.methods.lora import parse_targets

    fields = dict(_object(body, "setup"))
    targets = fields.get("lora_targets")
    try:
        if isinstance(targets, str):
            fields["lora_targets"] = parse_targets(targets, spec)
        return TrainingSetup(**fields)
    except MemplanError as exc:
        raise FieldError(error_message(exc), "setup.lora_targets") from exc
    except ValidationError as exc:
        field = validation_field(exc)
        raise FieldError(error_message(exc), f"setup.{field}" if field else "setup") from exc


def parallel_of(body: dict[str, Any]) -> ParallelSetup:
    """The ParallelSetup of ``parallel``."""
    try:
        return ParallelSetup(**_object(body, "parallel"))
    except ValidationError as exc:
        field = validation_field(exc)
        raise FieldError(error_message(exc), f"parallel.{field}" if field else "parallel") from exc


def gpu_of(body: dict[str, Any], *, required: bool = False) -> str | None:
    """The ``gpu`` named (a hardware profile or a capacity), checked."""
    from memplan.plan import resolve_gpu

    gpu = body.get("gpu")
    if gpu is None or gpu == "":
        if required:
            raise FieldError("gpu: choose a GPU or type a capacity such as 48GB", "gpu")
        return None
    if not isinstance(gpu, str):
        raise FieldError(f"gpu: expected a name or a capacity, got {type(gpu).__name__}", "gpu")
    try:
        resolve_gpu(gpu)
    except MemplanError as exc:
        raise FieldError(error_message(exc), "gpu") from exc
    return gpu


def safety_of(body: dict[str, Any]) -> float | None:
    """The ``safety`` fraction in [0, 1), or None for the method's default."""
    safety = body.get("safety")
    if safety is None:
        return None
    if isinstance(safety, bool) or not isinstance(safety, int | float):
        raise FieldError("invalid --safety: expected a fraction such as 0.05", "safety")
    if not (math.isfinite(safety) and 0 <= safety < 1):
        raise FieldError(f"invalid --safety: expected a fraction in [0, 1), got {safety}", "safety")
    return float(safety)


def tokens_of(body: dict[str, Any]) -> int | None:
    """The ``tokens`` of a job (``50M``), or None."""
    from memplan.throughput import parse_tokens

    tokens = body.get("tokens")
    if tokens is None or tokens == "":
        return None
    try:
        return parse_tokens(str(tokens))
    except MemplanError as exc:
        raise FieldError(error_message(exc), "tokens") from exc


def rank_of(body: dict[str, Any]) -> Rank:
    """``cost`` (default) or ``time``."""
    rank = body.get("rank") or "cost"
    if rank == "cost" or rank == "time":
        return "cost" if rank == "cost" else "time"
    raise FieldError(f"invalid --rank: expected cost or time, got {rank!r}", "rank")


def flag_of(body: dict[str, Any], key: str) -> bool:
    """A true/false field (default false)."""
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise FieldError(f"{key}: expected true or false, got {value!r}", key)
    return value
