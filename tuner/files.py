"""Files vtune writes and reads back: every write is atomic (a temporary file in the same
directory, fsync, rename, fsync of the directory), so a kill or a crash leaves either the old
file or the new one, never half of one. JSON is written strict (non-finite floats as null).
Reads fail with one line (``ParameterError``)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from tuner.errors import ParameterError


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as exc:
        raise ParameterError(f"cannot write {target}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return target


def atomic_write_json(
    path: str | Path, data: Any, *, sort_keys: bool = False, nonfinite_as_null: bool = True
) -> Path:
    """``data`` as indented JSON (paths, tuples, sets and ``to_json()`` objects converted).

    Non-finite floats (inf, -inf, nan) are written as ``null``: ``Infinity`` and ``NaN`` are
    not JSON, and strict parsers (jq, JavaScript, Go) reject the whole file. A reader gets
    None back where the value was not finite. ``nonfinite_as_null=False`` keeps Python's
    ``Infinity``/``NaN``, for a file that only Python reads and that must keep its values (a
    model's config.json rewritten in place).
    """
    if nonfinite_as_null:
        data = finite_json(data)
    text = json.dumps(data, indent=2, sort_keys=sort_keys, default=json_default) + "\n"
    return atomic_write_text(path, text)


def finite_json(value: Any) -> Any:
    """``value`` as plain JSON data (dicts, lists, str, int, finite float, bool, None), with
    every non-finite float replaced by None; converts like :func:`json_default`."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int):
        return value
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [finite_json(v) for v in value]
    return finite_json(json_default(value))


def read_json(path: str | Path) -> Any:
    """Read a JSON file written by vtune; ParameterError with one line when unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ParameterError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ParameterError(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ParameterError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except (ValueError, RecursionError):  # a number too long, nesting too deep
        raise ParameterError(f"{path} is not valid JSON (too deep or too long)") from None


def read_text_file(
    path: str | Path, what: str, kind: str, error: type[Exception] = ParameterError
) -> str:
    """The UTF-8 text of a user's input file (a byte-order mark is harmless); ``error`` with
    one line naming ``what`` ("trace", "dataset") for a directory (not a ``kind``), a missing
    or unreadable file, or text that is not UTF-8."""
    p = Path(path)
    if p.is_dir():
        raise error(f"{what} {p} is a directory, not a {kind}")
    if not p.exists():
        raise error(f"{what} file not found: {p}")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise error(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {p} is not UTF-8 text (byte {exc.start})") from None


def json_default(value: Any) -> Any:
    """``json.dumps`` default for the types vtune's records hold."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    if hasattr(value, "to_json"):
        return value.to_json()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (the directory entry), where the OS allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
