"""Where a search keeps what it has measured, apart from the study: one JSON file per finished
trial and per finalist's samples, each written atomically, so that a rerun skips them even
when the study storage is new."""

from __future__ import annotations

from pathlib import Path

from tuner.files import atomic_write_json, read_json
from tuner.search.record import TrialRecord


class TrialStore:
    """One JSON file per finished trial (and per finalist's samples), written atomically."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, kind: str, name: str) -> Path:
        return self.directory / kind / f"{name}.json"

    def save(self, record: TrialRecord) -> None:
        atomic_write_json(self._path("trials", record.name), record.to_json())

    def load_all(self) -> dict[str, TrialRecord]:
        out = {}
        for file in sorted((self.directory / "trials").glob("*.json")):
            record = TrialRecord.from_json(read_json(file))
            out[record.name] = record
        return out

    def save_samples(self, name: str, samples: list[float], seconds: float) -> None:
        atomic_write_json(
            self._path("finalists", name),
            {"name": name, "samples": samples, "engine_time_s": seconds},
        )

    def load_samples(self, name: str) -> tuple[list[float], float] | None:
        """A finalist's saved samples and the engine time they took; None if not saved."""
        path = self._path("finalists", name)
        if not path.exists():
            return None
        data = read_json(path)
        return list(data["samples"]), float(data.get("engine_time_s", 0.0))
