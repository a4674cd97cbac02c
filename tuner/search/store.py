"""Where a search keeps what it has measured, apart from the study: one JSON file per finished
trial and per finalist's samples, each written atomically, so that a rerun skips them even
when the study storage is new. A write the disk refuses (full, read-only, I/O error) raises
:class:`~tuner.errors.StorageError` with one line; the files already written stay whole."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tuner.errors import ParameterError, StorageError
from tuner.files import atomic_write_json, read_json
from tuner.search.objective import worst
from tuner.search.profile import remove_debris
from tuner.search.record import FinalistSample, TrialRecord


class TrialStore:
    """One JSON file per finished trial (and per finalist's samples), written atomically."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, kind: str, name: str) -> Path:
        return self.directory / kind / f"{name}.json"

    def _write(self, what: str, path: Path, data: Any) -> None:
        try:
            atomic_write_json(path, data)
        except OSError as exc:
            reason = exc.strerror or str(exc)
        except ParameterError as exc:  # the temporary file could not be created
            reason = str(exc).rpartition(": ")[2]
        else:
            return
        raise StorageError(
            f"cannot save {what} in {path.parent}: {reason}; finished trials are kept "
            "(rerun the same command to finish)"
        )

    def save(self, record: TrialRecord) -> None:
        """Save a finished trial; StorageError when the disk refuses it."""
        self._write(f"trial {record.name}", self._path("trials", record.name), record.to_json())

    def load_all(self) -> dict[str, TrialRecord]:
        """Every saved trial; first removes what a killed write left (its temporary files)."""
        for kind in ("trials", "finalists"):
            remove_debris(self.directory / kind)
        out = {}
        for file in sorted((self.directory / "trials").glob("*.json")):
            record = TrialRecord.from_json(read_json(file))
            out[record.name] = record
        return out

    def save_samples(
        self,
        name: str,
        samples: list[float],
        seconds: float,
        runs: Sequence[FinalistSample] = (),
    ) -> None:
        """Save a finalist's samples (and ``runs``: the load each was measured at);
        StorageError when the disk refuses them."""
        data: dict[str, Any] = {"name": name, "samples": samples, "engine_time_s": seconds}
        if runs:
            data["runs"] = [r.to_json() for r in runs]
        self._write(f"the samples of finalist {name}", self._path("finalists", name), data)

    def load_runs(self, name: str, objective: str | None = None) -> tuple[FinalistSample, ...]:
        """The loads of a finalist's saved samples (:meth:`save_samples`); empty when not
        saved, or saved without them."""
        path = self._path("finalists", name)
        raw = read_json(path).get("runs") if path.exists() else None
        read = [FinalistSample.from_json(r, worst(objective)) for r in raw or []]
        return tuple(r for r in read if r is not None) if isinstance(raw, list) else ()

    def load_samples(
        self, name: str, objective: str | None = None
    ) -> tuple[list[float], float] | None:
        """A finalist's saved samples and the engine time they took; None if not saved. A null
        sample (a non-finite value) reads as the worst value for ``objective``."""
        path = self._path("finalists", name)
        if not path.exists():
            return None
        data = read_json(path)
        samples = [worst(objective) if v is None else float(v) for v in data["samples"]]
        return samples, float(data.get("engine_time_s", 0.0))
