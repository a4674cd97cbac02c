"""A ``vtune search`` on the fake vLLM process, started so that a test can signal it while it
runs (:mod:`tests.faults.searchproc` runs one to its end): its output goes to files (a pipe
nobody reads would block it), every process of its tree is remembered as it appears, and its
trial logs are watched for the moment to strike (a trial starting, a load begun).

``pid1=True`` runs it as PID 1 of a new PID namespace (``unshare -pf --mount-proc``, root), as
in a container without an init: there the kernel drops every signal the process does not
handle, which is how SIGTERM used to be lost.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from tests.faults.searchproc import ROOT, Ran, profile_dir

UNSHARE = ("unshare", "-pf", "--mount-proc")


@dataclass
class Search:
    """A running search: ``proc`` (vtune, or unshare around it), the pids seen in its tree."""

    proc: subprocess.Popen[bytes]
    out: Path
    pdir: Path
    stdout: Path
    stderr: Path
    pid1: bool
    seen: dict[int, psutil.Process] = field(default_factory=dict)

    def vtune(self, timeout: float = 30) -> psutil.Process:
        """vtune itself (under unshare: unshare's child, PID 1 inside)."""
        top = psutil.Process(self.proc.pid)
        if not self.pid1:
            return top
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            children = top.children()
            if children:
                return children[0]
            time.sleep(0.05)
        raise AssertionError("unshare did not start vtune")

    def remember(self) -> list[psutil.Process]:
        """Every process of the tree now (vtune, the guard, the fake vLLM), remembered."""
        with contextlib.suppress(psutil.NoSuchProcess):
            top = psutil.Process(self.proc.pid)
            for p in [top, *top.children(recursive=True)]:
                self.seen.setdefault(p.pid, p)
        return list(self.seen.values())

    def wait_log(self, trial: str, text: str, timeout: float = 180) -> Path:
        """Wait until the log of the trial whose file starts with ``trial`` (``000``) says
        ``text``, remembering the process tree meanwhile; returns the log's path."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.remember()
            for log in self.pdir.glob(f"cpu.study/*/logs/{trial}-*.log"):
                if text in log.read_text(errors="replace"):
                    self.remember()
                    return log
            if self.proc.poll() is not None:
                raise AssertionError(f"vtune ended first:\n{self.ended().describe()}")
            time.sleep(0.1)
        raise AssertionError(f"no {text!r} in trial {trial}'s log within {timeout} s")

    def guard(self) -> psutil.Process:
        """The guard process vLLM runs under (a child of vtune running guard.py)."""
        for p in self.vtune().children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if any(part.endswith("guard.py") for part in p.cmdline()):
                    return p
        raise AssertionError("no guard process")

    def signal(self, sig: int, timeout: float = 60) -> tuple[Ran, float]:
        """Send ``sig`` to vtune; wait for the search to end; returns it and the seconds it
        took to end after the signal."""
        self.remember()
        target = self.vtune()
        t0 = time.monotonic()
        target.send_signal(sig)
        self.proc.wait(timeout)
        return self.ended(), time.monotonic() - t0

    def ended(self, timeout: float = 600) -> Ran:
        self.proc.wait(timeout)
        return Ran(
            list(map(str, self.proc.args)),
            self.proc.returncode,
            self.stdout.read_text(errors="replace"),
            self.stderr.read_text(errors="replace"),
        )

    def kill(self) -> None:
        """Tear down whatever is left (a failed test): the processes seen, by pid."""
        for p in self.remember():
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def start(
    argv: list[str],
    env: dict[str, str],
    out: Path,
    model: Path,
    tag: str,
    *,
    pid1: bool = False,
    ignore_sigint: bool = False,
    new_session: bool = False,
) -> Search:
    """Start ``argv`` (a ``vtune search`` writing under ``out``); output to ``out/../tag.*``.
    ``new_session``: as the leader of a session of its own (its pid is its process group's id:
    ``os.killpg`` reaches it and whatever shares its group, not this test)."""

    def ignore() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    stdout, stderr = out.parent / f"{tag}.out", out.parent / f"{tag}.err"
    with open(stdout, "wb") as so, open(stderr, "wb") as se:
        proc = subprocess.Popen(
            [*UNSHARE, *argv] if pid1 else argv,
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=so,
            stderr=se,
            preexec_fn=ignore if ignore_sigint else None,
            start_new_session=new_session,
        )
    return Search(proc, out, profile_dir(model, out), stdout, stderr, pid1)


def assert_gone(procs: list[psutil.Process], grace_s: float = 10.0) -> None:
    """None of these processes is still running (psutil checks the start time: a reused pid is
    not mistaken for one of them)."""
    deadline = time.monotonic() + grace_s
    alive = [p for p in procs if _running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if _running(p)]
    assert not alive, f"left running: {[(p.pid, _cmd(p)) for p in alive]}"


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _cmd(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:200]
    except psutil.Error:
        return "?"


def shm_segments(pdir: Path) -> list[Path]:
    """The /dev/shm files the fake vLLM servers of this search mapped (``shm PATH`` lines)."""
    found = []
    for log in pdir.glob("cpu.study/*/logs/*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("shm /dev/shm/"):
                found.append(Path(line.split()[1]))
    return found


def trial_logs(pdir: Path) -> list[str]:
    """The trial logs' names (``000-vllm-defaults.log``...), finalists' excluded, sorted."""
    return sorted(
        p.name for p in pdir.glob("cpu.study/*/logs/*.log") if not p.name.startswith("finalist")
    )


def record_numbers(pdir: Path) -> dict[str, Any]:
    """Candidate -> trial number in the search record written beside the profile."""
    record = json.loads((pdir / "cpu.json").read_text())
    return {t["name"]: t.get("number") for t in record["trials"]}


def vllm_under_load(port: int) -> bool:
    """vLLM's own /metrics on ``port`` shows requests being served, or served (False while it
    does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return False
    names = (
        "vllm:num_requests_running",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
    )
    for line in text.splitlines():
        if line.startswith(names):
            with contextlib.suppress(ValueError):
                if float(line.rsplit(" ", 1)[1]) > 0:
                    return True
    return False
