"""vLLM's log files: where they go and how they are created.

- :func:`private_log_dir`: with no log directory given, logs go to this user's own directory
  under the temporary directory (``vtune-logs-UID``, mode 0700), never to a shared one where
  another user could plant a symbolic link under a predictable name or read the logs.
- :func:`create_log`: a log file is created new (``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0600):
  never through a symbolic link, never into someone else's file; when the name is taken (the
  log of an earlier run), the next free ``NAME.N.log`` is used, so no log is overwritten.
- :func:`reopen_log`: the same file again, emptied (a port retry of the same server).
"""

from __future__ import annotations

import itertools
import os
import stat
import tempfile
from pathlib import Path
from typing import TextIO

from tuner.errors import EngineError

_FLAGS = os.O_WRONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def private_log_dir() -> Path:
    """This user's private log directory, created mode 0700; EngineError (one line) when the
    path exists but is not a directory of ours that only we can enter (a link, another user's,
    or open to others)."""
    path = Path(tempfile.gettempdir()) / f"vtune-logs-{os.getuid()}"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise EngineError(f"cannot create the log directory {path}: {exc.strerror}") from None
    info = os.lstat(path)
    if (
        not stat.S_ISDIR(info.st_mode)
        or info.st_uid != os.getuid()
        or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO)
    ):
        raise EngineError(
            f"the log directory {path} is not a private directory of yours (mode 0700); "
            "remove it, or give the logs a directory"
        )
    return path


def create_log(path: Path) -> tuple[TextIO, Path]:
    """Create a new log file at ``path`` (or at the first free ``NAME.N.log`` beside it) and
    return it open for writing, with the path it got. EngineError (one line) when the file
    cannot be created (the directory is not writable, the path is a symbolic link)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = path.name.removesuffix(".log")
    candidate = path
    for n in itertools.count(1):
        try:
            fd = os.open(candidate, _FLAGS | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            if n > 999:
                raise EngineError(f"cannot create a log file beside {path}") from None
            candidate = path.with_name(f"{stem}.{n}.log")
            continue
        except OSError as exc:
            raise EngineError(f"cannot create {candidate}: {exc.strerror}") from None
        return os.fdopen(fd, "w", encoding="utf-8"), candidate
    raise AssertionError("unreachable")  # pragma: no cover


def reopen_log(path: Path) -> TextIO:
    """The log file this process created at ``path``, emptied (never through a link)."""
    try:
        fd = os.open(path, _FLAGS | os.O_TRUNC)
    except OSError as exc:
        raise EngineError(f"cannot write {path}: {exc.strerror}") from None
    return os.fdopen(fd, "w", encoding="utf-8")


__all__ = ["create_log", "private_log_dir", "reopen_log"]
