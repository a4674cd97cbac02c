"""Whole ``vtune search`` processes on the fake vLLM process, for the fault tests of the output
directory, the disk and secrets: the command, its environment (a per-test marker that finds
every process it left), and the checks every fault test makes on what a search left in --out.

A search here: the tiny model, ``max_num_seqs`` 4 beside vLLM's defaults (two candidates), one
re-run of each finalist; about 15-30 s on two cores.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FAKE_VLLM_PYTHON = ROOT / "tests" / "bin" / "fake-vllm-python"
VTUNE = Path(sys.executable).with_name("vtune")
MARK = "VTUNE_FAULT_MARK"
CANDIDATES = ("vllm-defaults", "seqs4")


def search_argv(model: Path, out: Path, *extra: str) -> list[str]:
    """``vtune search`` on the fake vLLM process, writing under ``out``."""
    return [
        str(VTUNE),
        "search",
        "--model",
        str(model),
        "--gpu",
        "cpu",
        "--slo",
        "ttft:p95<1s",
        "--param",
        "max_num_seqs=4",
        "--seconds-per-point",
        "1",
        "--iterations",
        "1",
        "--repeats",
        "1",
        "--finalists",
        "2",
        "--startup-timeout",
        "60",
        "--vllm-python",
        str(FAKE_VLLM_PYTHON),
        "--out",
        str(out),
        *extra,
    ]


def fake_env(mark: str, **extra: str) -> dict[str, str]:
    """The environment of a search under test: the fake vLLM on this Python, quick starts,
    ``MARK`` (inherited by every process it starts), and ``extra``."""
    env = dict(os.environ)
    env.update(
        FAKE_VLLM_PYTHON=sys.executable,
        FAKE_VLLM_STARTUP_S="0.2",
        PYTHONUNBUFFERED="1",
        COLUMNS="100",
        **{MARK: mark},
    )
    env.pop("VLLM_API_KEY", None)
    env.update(extra)
    return env


def new_mark() -> str:
    return uuid.uuid4().hex


@dataclass
class Ran:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    def one_line_error(self) -> str:
        """The run ended with exit 2 and exactly one line on stderr after any progress
        display (``vtune: error: ...``), no traceback; returns that line."""
        assert self.returncode == 2, self.describe()
        assert "Traceback" not in self.stdout + self.stderr, self.describe()
        errors = [line for line in self.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and errors[0].startswith("vtune: error: "), self.describe()
        return errors[0]

    def describe(self) -> str:
        return (
            f"exit {self.returncode}\n--- stdout\n{self.stdout[-3000:]}\n"
            f"--- stderr\n{self.stderr[-3000:]}"
        )


def run(argv: list[str], env: dict[str, str], timeout: float = 300) -> Ran:
    proc = subprocess.run(
        argv,
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return Ran(argv, proc.returncode, proc.stdout, proc.stderr)


def marked_processes(mark: str) -> list[str]:
    """Processes still alive whose environment carries ``mark`` (``pid cmdline``)."""
    out = []
    needle = f"{MARK}={mark}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                status = (entry / "status").read_text()
                if "\nState:\tZ" not in status:
                    out.append(f"{entry.name} {cmd}")
        except OSError:
            continue
    return out


def assert_no_process_left(mark: str, grace_s: float = 15.0) -> None:
    """Nothing a search started (vtune, the guard, the fake vLLM) outlives it."""
    deadline = time.monotonic() + grace_s
    left = marked_processes(mark)
    while left and time.monotonic() < deadline:
        time.sleep(0.25)
        left = marked_processes(mark)
    assert not left, f"processes left behind: {left}"


# --- what a search left in --out ----------------------------------------------------------------


def profile_dir(model: Path, out: Path) -> Path:
    """Where the search of ``model`` writes its profile under ``out``."""
    from tuner.search.profile import slug

    return out / slug(str(model))


def studies(pdir: Path) -> set[str]:
    """The studies that have a work directory under ``pdir`` (``cpu.study/<id>``)."""
    return {p.name for p in pdir.glob("cpu.study/*")}


def saved_trials(pdir: Path, skip: set[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """The trial files saved (name -> record JSON), but those of the studies in ``skip``; each
    one must parse."""
    found = {}
    for path in sorted(pdir.glob("cpu.study/*/trials/*.json")):
        if path.parent.parent.name not in skip:
            data = json.loads(path.read_text())
            found[data["name"]] = data
    return found


def saved_samples(pdir: Path, skip: set[str] = frozenset()) -> dict[str, list[float]]:
    """The finalists' saved samples (name -> samples), but those of the studies in ``skip``."""
    found = {}
    for path in sorted(pdir.glob("cpu.study/*/finalists/*.json")):
        if path.parent.parent.name not in skip:
            data = json.loads(path.read_text())
            found[data["name"]] = data["samples"]
    return found


def assert_nothing_half_written(out: Path, *, killed: bool = False) -> None:
    """Every JSON file parses. A temporary file of an atomic write (``.NAME.json.XXXXXXXX``) is
    left only by a kill at its rename (``killed``), and then it is whole; after any run that
    ended on its own, none is left."""
    for path in out.rglob("*"):
        if not path.is_file():
            continue
        if re.fullmatch(r"\..+\.(json|yaml)\.[A-Za-z0-9_]{8}", path.name):
            assert killed, f"left behind: {path}"
            if ".json." in path.name:
                json.loads(path.read_text())
        elif path.suffix == ".json":
            json.loads(path.read_text())


def assert_pair_from_one_run(pdir: Path) -> dict[str, Any] | None:
    """The profile YAML, when there is one, was written by the run that wrote the JSON beside
    it (its header names the record's creation time and chosen candidate); returns the record."""
    yaml_path = pdir / "cpu.yaml"
    json_path = yaml_path.with_suffix(".json")
    if not json_path.exists():
        assert not yaml_path.exists(), "a profile without its record"
        return None
    record = json.loads(json_path.read_text())
    if yaml_path.exists():
        header = yaml_path.read_text()
        assert f"(created {record['created_at']})" in header, (header, record["created_at"])
        assert f"# Chosen: {record['best']} -> " in header
    return record


def assert_complete_record(record: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Every candidate exactly once, measured (objective > 0); returns trials by name."""
    assert record is not None
    names = [t["name"] for t in record["trials"]]
    assert sorted(names) == sorted(CANDIDATES), names
    trials = {t["name"]: t for t in record["trials"]}
    for trial in trials.values():
        assert trial["state"] == "complete" and trial["objective"] > 0, trial
    return trials


def study_dump(db: Path) -> str:
    """The study database as SQL text (every table, every row)."""
    with sqlite3.connect(db) as conn:
        return "\n".join(conn.iterdump())


def running_trials(db: Path) -> list[int]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT number FROM trials WHERE state = 'RUNNING'").fetchall()
    return [r[0] for r in rows]
