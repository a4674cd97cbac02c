"""Serving profiles: a vLLM config YAML (``vllm serve --config`` loads it unchanged) and the
full JSON record beside it.

* Every write is atomic (temp file + rename), so a killed search never leaves a half-written
  file; :func:`write_outputs` orders the writes so that a YAML beside a JSON record always comes
  from the run that wrote that record (a profile no run stands behind becomes ``*.yaml.stale``).
* :func:`take_out_lock` / :func:`out_lock` hold an exclusive lock (``<gpu>.lock`` beside the
  profile) for a whole search, so a second search on the same ``--out`` ends at once with one
  line. (Several workers of one study on one host each need their own ``--out``.)
* No secret (:func:`tuner.engine.settings.is_secret`) is ever written to a profile.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tuner.engine.settings import is_secret
from tuner.errors import ParameterError, StorageError, VtuneError
from tuner.files import atomic_write_json, atomic_write_text

DEFAULT_PROFILES_DIR = Path("profiles")
STALE_SUFFIX = ".stale"
# A temporary file of tuner.files' atomic writes: ".<name>." + mkstemp's 8 random characters.
_DEBRIS = re.compile(r"\..+\.(json|yaml)\.[A-Za-z0-9_]{8}")


def slug(model: str) -> str:
    """Directory name for a model: ``meta-llama/Llama-3.1-8B`` -> ``meta-llama--llama-3.1-8b``;
    a local path -> its last component."""
    path = Path(model)
    base = path.name if (path.is_absolute() or model.startswith(".") or path.exists()) else model
    text = base.strip().lower().replace("/", "--")
    text = re.sub(r"[^a-z0-9._-]+", "-", text).strip("-.")
    return text or "model"


def profile_paths(model: str, gpu: str, out: Path | None = None) -> tuple[Path, Path]:
    """(YAML, JSON) paths: ``profiles/<model-slug>/<gpu>.yaml`` or the same under ``out``."""
    root = out if out is not None else DEFAULT_PROFILES_DIR
    directory = root / slug(model)
    return directory / f"{gpu}.yaml", directory / f"{gpu}.json"


def vllm_config(settings: Mapping[str, Any]) -> dict[str, Any]:
    """vLLM settings (snake_case names) -> the key format ``--config`` reads (flag names)."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if value is None:
            continue
        flag = key.replace("_", "-")
        if is_secret(flag):  # a shared file: the key comes from the deployment's secret
            continue
        out[flag] = value
    return out


def render_profile(config: Mapping[str, Any], header: Sequence[str]) -> str:
    """YAML text: a comment header, then only vLLM keys."""
    import yaml

    lines = [f"# {line}".rstrip() for line in header]
    body = yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False)
    return "\n".join(lines) + ("\n" if lines else "") + body


def write_profile(
    yaml_path: Path, config: Mapping[str, Any], header: Sequence[str], record: Mapping[str, Any]
) -> tuple[Path, Path]:
    """Write the profile YAML and its JSON record (:func:`write_outputs`); returns both paths."""
    write_outputs(yaml_path, record, render_profile(config, header))
    return yaml_path, yaml_path.with_suffix(".json")


def stale_path(yaml_path: Path) -> Path:
    """Where a profile that no longer matches its record is kept: ``<gpu>.yaml.stale``."""
    return yaml_path.with_name(yaml_path.name + STALE_SUFFIX)


def remove_debris(directory: Path) -> list[Path]:
    """Remove the temporary files of atomic writes that a kill cut short (``.NAME.json.XXXX``,
    complete but never renamed) from ``directory``; call it under the ``--out`` lock only.
    Returns what was removed."""
    removed = []
    if directory.is_dir():
        for path in directory.iterdir():
            if _DEBRIS.fullmatch(path.name) and path.is_file():
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(path)
    return removed


def write_outputs(yaml_path: Path, record: Mapping[str, Any], profile: str | None) -> Path | None:
    """Write the JSON record beside ``yaml_path`` and, when ``profile`` (YAML text) is given,
    the profile; returns the ``.yaml.stale`` file left when there is no new profile, else None.

    The pair always comes from one run, whenever a kill or a full disk stops this: an old
    profile is first renamed ``*.yaml.stale`` (its record is about to be replaced), then the
    record is written, then the new profile, and only then is the stale copy removed. So a YAML
    beside a record is that record's, and ``vtune deploy`` never ships a profile that a later
    search did not confirm. StorageError (one line) when the disk refuses a write."""
    json_path = yaml_path.with_suffix(".json")
    stale = stale_path(yaml_path)
    remove_debris(yaml_path.parent)
    try:
        if yaml_path.exists():
            os.replace(yaml_path, stale)
        atomic_write_json(json_path, record)
        if profile is None:
            return stale if stale.exists() else None
        atomic_write_text(yaml_path, profile)
        stale.unlink(missing_ok=True)
    except OSError as exc:
        raise StorageError(
            f"cannot write the profile in {yaml_path.parent}: {exc.strerror or exc}; "
            "finished trials are kept (rerun the same command to finish)"
        ) from None
    except ParameterError as exc:  # the temporary file could not be created
        raise StorageError(f"{exc}; finished trials are kept (rerun the same command)") from None
    return None


# The --out locks this process holds: lock file -> its open descriptor (the flock is on it).
_HELD: dict[Path, int] = {}


def lock_path(directory: Path, gpu: str) -> Path:
    """The lock file of the ``gpu`` profile in ``directory``."""
    return directory / f"{gpu}.lock"


def take_out_lock(directory: Path, gpu: str) -> Path:
    """Take the exclusive lock on ``directory/<gpu>.lock`` (creating the directory) for this
    process, or raise at once: VtuneError (one line, exit 2) when another search holds it. Taken
    twice by one process, it is one lock. Released by :func:`out_lock`'s block or the exit."""
    import fcntl

    path = lock_path(directory, gpu)
    if path in _HELD:
        return path
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ParameterError(f"cannot create --out directory {directory}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _read_pid(fd)
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            raise StorageError(f"cannot lock {path}: {exc.strerror}") from None
        raise VtuneError(
            f"another vtune search{holder} is writing the {gpu} profile in {directory}; "
            "wait for it to end, or give this search its own --out"
        ) from None
    with contextlib.suppress(OSError):  # who holds it, for the message above; optional
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[path] = fd
    return path


@contextlib.contextmanager
def out_lock(directory: Path, gpu: str) -> Iterator[Path]:
    """Hold the ``--out`` lock (:func:`take_out_lock`, or the one this process took already)
    for the block, and release it after: one search at a time writes a profile there. The lock
    goes with the process too, so a killed search leaves none behind."""
    path = take_out_lock(directory, gpu)
    try:
        yield path
    finally:
        release_out_lock(path)


def release_out_lock(path: Path) -> None:
    """Release a lock :func:`take_out_lock` took (nothing when this process does not hold it)."""
    fd = _HELD.pop(path, None)
    if fd is not None:
        os.close(fd)  # releases the flock


def _read_pid(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        return f" (pid {int(os.pread(fd, 32, 0).decode().strip())})"
    return ""
