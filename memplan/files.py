"""Files memplan reads and writes, checked at the boundary.

Inputs are regular files of bounded size holding UTF-8 JSON: anything else (a folder, a FIFO,
a device, binary or UTF-16 bytes, JSON nested too deep, integers of thousands of digits) is a
one-line :class:`MemplanError`. Outputs are checked before any work starts (the folder exists
and is writable, the name has a known suffix) and written atomically (a temporary file in the
same folder, then a rename), so a failed write never leaves half a file behind.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Final

from memplan.errors import MemplanError
from memplan.units import MiB

# Largest JSON input read: config.json files are kilobytes; measured runs with their traces
# reach a few MiB.
MAX_JSON_BYTES: Final = 256 * MiB


def shown(path: str | Path) -> str:
    """A path as one line of an error message (control characters escaped)."""
    text = str(path)
    if text.isprintable():
        return text
    return repr(text)[1:-1]


def read_json(path: str | Path, *, what: str = "file", max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in ``path``; a one-line MemplanError naming the file otherwise."""
    where = shown(path)
    try:
        info = os.stat(path)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise MemplanError(f"cannot read {what} {where}: {reason}") from exc
    if stat.S_ISDIR(info.st_mode):
        raise MemplanError(f"{what} {where} is a folder, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise MemplanError(f"{what} {where} is not a regular file")
    if info.st_size > max_bytes:
        raise MemplanError(
            f"{what} {where} is {info.st_size:,} bytes: too large for a JSON {what} "
            f"(at most {max_bytes:,})"
        )
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise MemplanError(f"cannot read {what} {where}: {exc.strerror or exc}") from exc
    return parse_json_bytes(data, where=where, what=what)


def parse_json_bytes(data: bytes, *, where: str, what: str = "file") -> Any:
    """The JSON value in ``data`` (the bytes of ``where``); a one-line MemplanError naming
    ``where`` otherwise. What :func:`read_json` does once the file is read."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MemplanError(f"{what} {where} is not UTF-8 text (byte {exc.start})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MemplanError(f"{where}: malformed JSON ({exc.msg} at line {exc.lineno})") from exc
    except RecursionError as exc:
        raise MemplanError(f"{where}: JSON nested too deeply") from exc
    except ValueError as exc:  # e.g. integers past Python's digit limit
        raise MemplanError(f"{where}: unreadable JSON ({str(exc).splitlines()[0]})") from exc


def check_writable(path: str | Path, *, what: str, suffixes: tuple[str, ...] = ()) -> Path:
    """``path`` if a file can be written there: its folder exists and is writable, it is not
    a folder itself, and it ends in one of ``suffixes`` (when given)."""
    out = Path(path)
    where = shown(path)
    if suffixes and not out.name.lower().endswith(suffixes):
        raise MemplanError(f"{what}: cannot write {where}: end the name in {', '.join(suffixes)}")
    if out.is_dir():
        raise MemplanError(f"{what}: {where} is a folder; name a file")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise MemplanError(f"{what}: cannot write {where}: folder {shown(folder)} does not exist")
    if not os.access(folder, os.W_OK):
        raise MemplanError(f"{what}: cannot write {where}: folder {shown(folder)} is not writable")
    return out


def write_atomic(path: str | Path, data: bytes | str, *, what: str) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    out = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    folder = out.parent if str(out.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{out.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise MemplanError(f"{what}: cannot write {shown(path)}: {exc.strerror or exc}") from exc
