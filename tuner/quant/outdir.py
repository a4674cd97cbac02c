"""Build output directories beside their target, swap them in, and never lose or leak one.

A build of ``NAME`` writes into ``.NAME.tmp-<pid>-<hex>`` beside it. The swap renames the old
``NAME`` aside to ``.NAME.old-<pid>-<hex>``, renames the new one in, then deletes the old. If the
second rename fails the old one is renamed back; if the process is killed between the two
renames, the next build of ``NAME`` (or of any sibling in the same folder) restores a complete
checkpoint first: the new one when it was finished (``marker`` is written last), else the old.

Everything happens under an exclusive ``flock`` on ``.NAME.lock`` beside the target, so two
builds into one target never collide: the second waits, says so on the log, and then finds the
first one's output. Leftovers are judged by that lock, not by the pid in their name: in a
container vtune is PID 1 in every run, so a dead run's pid is always "alive".
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-\d+(?:-[0-9a-f]+)?")


def lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


@contextlib.contextmanager
def locked(target: Path, marker: str) -> Iterator[None]:
    """Hold the exclusive build lock of ``target`` (waiting for another build to finish), with
    the leftovers of interrupted builds of it and of its unlocked siblings cleaned up first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with _flock(lock_path(target), wait=True):
        recover(target, marker)
        _sweep_siblings(target, marker)
        yield


@contextlib.contextmanager
def _flock(path: Path, *, wait: bool) -> Iterator[bool]:
    """Yields whether the lock is held (always True with ``wait``)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            log.warning("another build into %s is running; waiting for it to finish", path.parent)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def build_dir(target: Path) -> Path:
    """A new, empty directory beside ``target`` to build into (call under :func:`locked`)."""
    path = _aside(target, "tmp")
    path.mkdir()
    return path


def swap_in(new: Path, target: Path) -> None:
    """Replace ``target`` by the finished build ``new``: old aside, new in, old deleted."""
    if not target.exists():
        os.replace(new, target)
        return
    old = _aside(target, "old")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)  # the old checkpoint goes back where it was
        raise
    shutil.rmtree(old, ignore_errors=True)


def recover(target: Path, marker: str) -> None:
    """After a kill: put a complete build back at ``target`` when it is missing, then delete
    every leftover of ``target``. Call with the lock held."""
    leftovers = _leftovers(target)
    if not target.exists():
        finished = [p for kind in ("tmp", "old") for p in leftovers[kind] if (p / marker).is_file()]
        if finished:  # the new build when complete (tmp listed first), else the old one
            os.replace(finished[0], target)
            log.warning("restored %s from an interrupted build", target)
    for paths in leftovers.values():
        for path in paths:
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)


def _leftovers(target: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {"tmp": [], "old": []}
    for path in target.parent.glob(f".{_glob_escape(target.name)}.*-*"):
        m = _LEFTOVER.fullmatch(path.name)
        if m and m["name"] == target.name and path.is_dir():
            out[m["kind"]].append(path)
    for paths in out.values():
        paths.sort(key=lambda p: p.stat().st_mtime, reverse=True)  # newest first
    return out


def _sweep_siblings(target: Path, marker: str) -> None:
    """Recover the interrupted builds of other targets in the same folder whose lock is free.
    Only names with a lock file count: a look-alike of another tool's is never touched."""
    names = set()
    for path in target.parent.glob(".*.*-*"):
        m = _LEFTOVER.fullmatch(path.name)
        if m and m["name"] != target.name and lock_path(target.with_name(m["name"])).is_file():
            names.add(m["name"])
    for name in sorted(names):
        sibling = target.with_name(name)
        with _flock(lock_path(sibling), wait=False) as held:
            if held:
                recover(sibling, marker)


def _aside(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)
