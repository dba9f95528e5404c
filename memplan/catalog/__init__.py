"""Built-in model catalog (Hugging Face configs shipped as data) and config.json loading.

Each ``data/<name>.json`` holds the model's published ``config.json`` fields, its Hugging Face
id (and, as ``hf_aliases``, other repositories with the same config.json: an
instruction-tuned ``-it`` beside its ``-pt``), a one-line description, and ``num_params``:
``sum(p.numel())`` of the transformers model built from that config on the meta device
(``scripts/catalog_counts.py`` checks and rewrites it; see :mod:`memplan.catalog.hf_model`).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Final

from memplan.catalog.hf_config import spec_from_hf_config
from memplan.errors import MemplanError
from memplan.files import parse_json_bytes, read_json, shown
from memplan.specs.model import ModelSpec
from memplan.units import MiB

__all__ = [
    "catalog_names",
    "catalog_record",
    "load_config_bytes",
    "load_model",
    "spec_from_hf_config",
]


def _data_dir() -> Any:
    return resources.files("memplan.catalog").joinpath("data")


def _walk(folder: Any) -> Iterator[Any]:
    for entry in folder.iterdir():
        if entry.is_dir():
            yield from _walk(entry)
        elif entry.name.endswith(".json"):
            yield entry


@cache
def _record_files() -> dict[str, Any]:
    """Catalog name (file stem) -> data file, searching data/ recursively."""
    files: dict[str, Any] = {}
    for entry in _walk(_data_dir()):
        name = entry.name.removesuffix(".json")
        if name in files:
            raise MemplanError(f"catalog has two records named {name!r}")
        files[name] = entry
    return files


@cache
def catalog_names() -> tuple[str, ...]:
    """Names of every built-in model, sorted."""
    return tuple(sorted(_record_files()))


@cache
def catalog_record(name: str) -> dict[str, Any]:
    """The raw catalog record (name, hf_id, [hf_aliases], description, num_params, config) of a
    built-in model."""
    if name not in catalog_names():
        raise MemplanError(_unknown_model_message(name))
    data: dict[str, Any] = json.loads(_record_files()[name].read_text())
    return data


@cache
def hub_ids() -> dict[str, str]:
    """Hugging Face repository id (lower case) -> catalog name, for every record that has one."""
    ids = {}
    for name in catalog_names():
        record = json.loads(_record_files()[name].read_text())
        for hf_id in [record.get("hf_id"), *record.get("hf_aliases", [])]:
            if isinstance(hf_id, str):
                ids[hf_id.lower()] = name
    return ids


def catalog_name(text: str) -> str | None:
    """The catalog name ``text`` refers to: a catalog name or a Hugging Face id (any case),
    or None."""
    lowered = text.strip().lower()
    if lowered in catalog_names():
        return lowered
    return hub_ids().get(lowered)


def _unknown_model_message(name: str) -> str:
    shown_name = name if len(name) <= 80 else f"{name[:77]}..."
    candidates = [*catalog_names(), *hub_ids()]
    close = difflib.get_close_matches(name.lower(), candidates, n=3, cutoff=0.5)
    close = list(dict.fromkeys(hub_ids().get(c, c) for c in close))
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `memplan models`"
    return f"unknown model {shown_name!r}{hint} (or pass a path to a config.json)"


@cache
def _load_catalog_model(name: str) -> ModelSpec:
    record = catalog_record(name)
    return spec_from_hf_config(
        record["config"],
        name=name,
        source=f"catalog entry {name}",
        hf_id=record.get("hf_id"),
        num_params=record.get("num_params"),
    )


# A config.json is a few kilobytes; a much larger file is not one.
MAX_CONFIG_BYTES: Final = 16 * MiB


def load_config_file(path: Path, *, traced_only: bool = False) -> ModelSpec:
    """A ModelSpec from a Hugging Face config.json on disk (a file or a model folder);
    ``traced_only``: a model_type no family reads is read for the tracer alone."""
    if _is_dir(path):
        path = path / "config.json"
    config = read_json(path, what="config file", max_bytes=MAX_CONFIG_BYTES)
    name = path.parent.name if path.name == "config.json" and path.parent.name else path.stem
    return _spec_from_config(config, name=name, source=shown(path), traced_only=traced_only)


def load_config_bytes(data: bytes, *, filename: str) -> ModelSpec:
    """A ModelSpec from the bytes of a config.json that arrived without a folder (an upload),
    named by its file name; the messages are those :func:`load_config_file` gives for a file
    of that name."""
    source = shown(filename)
    if len(data) > MAX_CONFIG_BYTES:
        raise MemplanError(
            f"config file {source} is {len(data):,} bytes: too large for a JSON config file "
            f"(at most {MAX_CONFIG_BYTES:,})"
        )
    config = parse_json_bytes(data, where=source, what="config file")
    return _spec_from_config(config, name=Path(filename).stem or "config", source=source)


def _spec_from_config(
    config: object, *, name: str, source: str, traced_only: bool = False
) -> ModelSpec:
    if not isinstance(config, dict):
        raise MemplanError(f"{source}: expected a JSON object, got {type(config).__name__}")
    return spec_from_hf_config(config, name=name, source=source, traced_only=traced_only)


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def load_model(name_or_path: str | Path, *, traced_only: bool = False) -> ModelSpec:
    """A catalog model by name, or a local config.json (or a folder holding one) by path.

    ``traced_only``: a config.json whose model_type no family reads is read for the tracer
    (``simulate``) instead of refused.
    """
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith(".json") or _is_dir(Path(text)):
        return load_config_file(Path(text).expanduser(), traced_only=traced_only)
    path = Path(text).expanduser()
    if "/" in text and _exists(path):
        return load_config_file(path, traced_only=traced_only)
    return _load_catalog_model(catalog_name(text) or text)


def with_overrides(spec: ModelSpec, overrides: dict[str, object]) -> ModelSpec:
    """``spec`` with some fields replaced (``--model-set``), validated, its parameters recounted
    from the layout (the catalog's count belongs to the unchanged model)."""
    from memplan.architecture import count_params

    if not overrides:
        return spec
    unknown = sorted(set(overrides) - set(ModelSpec.model_fields) - {"name"})
    if unknown or "family" in overrides or "num_params" in overrides:
        field = (unknown or ["family" if "family" in overrides else "num_params"])[0]
        raise MemplanError(
            f"--model-set: {field!r} is not a model field memplan can change "
            f"(e.g. tie_word_embeddings, num_decoder_layers, vocab_size)"
        )
    from pydantic import ValidationError

    for field, value in overrides.items():
        # JSON's true/false would pass as 1/0 for a size: a bool only sets a bool field.
        if isinstance(value, bool) and ModelSpec.model_fields[field].annotation is not bool:
            raise MemplanError(
                f"--model-set {field}={str(value).lower()}: {field} is not a true/false field"
            )
    try:
        changed = ModelSpec.model_validate({**spec.model_dump(), **overrides, "num_params": None})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        if where not in overrides:  # a check across fields: its message names them
            raise MemplanError(f"--model-set: {message}") from None
        raise MemplanError(f"--model-set {where}={overrides[where]!r}: {message}") from None
    return changed.model_copy(update={"num_params": count_params(changed)})
