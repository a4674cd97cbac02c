"""Runs one ``vtune search`` with its ``--out`` on a small tmpfs that fills up mid-run; started by
tests/faults/test_disk.py under ``unshare -rm`` (a user and mount namespace: no root needed, and
the tmpfs vanishes with the namespace).

    unshare -rm PYTHON tmpfs_driver.py SPEC.json

SPEC: ``out`` (the mount point, an empty directory), ``size`` (tmpfs size), ``argv`` (the search),
``results`` (a directory outside the tmpfs), ``fill_when`` (``glob``, relative to ``out``, and
``text``: fill the tmpfs once a file matching ``glob`` contains ``text``; "" for any such
file). Writes ``results/stdout``, ``results/stderr``, a copy of the tmpfs as it was left (the
filler file excepted) in ``results/out``, and ``results/driver.json`` (``returncode``,
``filled``: the trial files saved when it filled, ``filler_bytes``).
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

FILLER = ".vtune-test-filler"


def fill(directory: Path) -> int:
    """Write zeros into ``directory`` until the file system is full; returns the bytes written."""
    written = 0
    block = b"\0" * 65536
    with open(directory / FILLER, "wb", buffering=0) as fh:
        while True:
            try:
                written += fh.write(block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(block) == 1:
                    return written
                block = block[: len(block) // 2]  # fill the last pages too


def _seen(out: Path, pattern: str, text: str) -> bool:
    for path in out.glob(pattern):
        try:
            if text in path.read_text(errors="replace"):
                return True
        except OSError:
            continue
    return False


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    out, results = Path(spec["out"]), Path(spec["results"])
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={spec['size']}", "tmpfs", str(out)], check=True
    )
    filled = None
    filler_bytes = 0
    with open(results / "stdout", "w") as o, open(results / "stderr", "w") as e:
        proc = subprocess.Popen(spec["argv"], stdin=subprocess.DEVNULL, stdout=o, stderr=e)
        deadline = time.monotonic() + spec.get("timeout_s", 300)
        when = spec["fill_when"]
        while proc.poll() is None and time.monotonic() < deadline:
            if filled is None and _seen(out, when["glob"], when["text"]):
                filler_bytes = fill(out)
                filled = len(list(out.glob("*/cpu.study/*/trials/*.json")))
            time.sleep(0.02)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    shutil.copytree(out, results / "out", ignore=shutil.ignore_patterns(FILLER), symlinks=True)
    (results / "driver.json").write_text(
        json.dumps({"returncode": proc.returncode, "filled": filled, "filler_bytes": filler_bytes})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
