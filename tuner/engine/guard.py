"""A tiny stdlib-only guard that runs vLLM and never lets it outlive vtune.

Why it exists (measured on vLLM CPU 0.32.0): killing the API server
with SIGKILL orphans its ``VLLM::EngineCore`` and ``VLLM::Worker`` children, and a SIGTERM sent
during startup is ignored for 30 s or more. A parent-death signal on the API server alone
therefore cannot guarantee cleanup. Instead ``tuner.engine.server`` starts this script as the
leader of a new session (``start_new_session``), and the script:

1. asks the kernel for SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``), then checks
   that the parent is still the expected one (closing the race with an early death);
2. runs the vLLM command in its own process group and waits for it;
3. on SIGTERM / SIGINT / SIGHUP, or when the parent is gone (also polled, in case the
   signal was lost), says so in the log (``vtune guard: stopping vLLM: ...``, how vtune tells
   a stop it did not ask for from a crash of vLLM), sends SIGTERM to vLLM's API server, waits
   up to ``grace`` seconds for it,
   then SIGKILLs everything else left in the group and unlinks the /dev/shm files they had
   mapped (a SIGKILLed vLLM leaks them);
4. when vLLM exits on its own, SIGKILLs whatever else is left in the group (an orphaned
   EngineCore) and exits with vLLM's code (128 + N when vLLM died of signal N).

Usage: ``python guard.py PARENT_PID GRACE_S -- CMD...``. Run by path with vtune's own
interpreter, so it works whichever Python runs vLLM. Linux only (as is vLLM).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time

_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent thread exits.

    Returns False where prctl is unavailable. Note the kernel's rule: the signal fires when the
    *thread* that forked us exits, so vtune must start servers from a long-lived thread.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def group_members(pgid: int, *, include_zombies: bool = False) -> list[int]:
    """PIDs whose process group is ``pgid`` (from /proc); zombies excluded unless asked."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
        except OSError:
            continue
        # Fields after the parenthesised comm: state ppid pgrp ...
        rest = stat[stat.rfind(")") + 2 :].split()
        if len(rest) < 3:
            continue
        state, group = rest[0], int(rest[2])
        if group == pgid and (include_zombies or state not in ("Z", "X")):
            found.append(int(entry))
    return found


def shm_files(pids: list[int]) -> set[str]:
    """Files under /dev/shm that these processes have mapped (vLLM's ``psm_*`` message queues
    and ``sem.mp-*`` semaphores). A SIGKILLed vLLM leaves them behind (its resource tracker dies
    too), so whoever kills the group unlinks them afterwards; nobody else maps them."""
    found: set[str] = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    path = line.rstrip("\n").partition("/dev/shm/")
                    if path[1]:
                        found.add("/dev/shm/" + path[2].removesuffix(" (deleted)"))
        except OSError:
            continue
    return found


def listening_inodes(port: int) -> set[int] | None:
    """Inodes of the TCP sockets listening on ``port`` (any address, IPv4 or IPv6) in this
    network namespace; None when ``/proc/net`` cannot be read (then nobody can tell)."""
    found: set[int] = set()
    readable = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii", errors="replace") as fh:
                lines = fh.read().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            fields = line.split()
            if len(fields) < 10 or fields[3] != "0A":  # 0A: LISTEN
                continue
            with contextlib.suppress(ValueError):
                if int(fields[1].rpartition(":")[2], 16) == port:
                    found.add(int(fields[9]))
    return found if readable else None


def socket_inodes(pids: list[int]) -> set[int]:
    """Inodes of the sockets these processes hold open (``/proc/PID/fd`` -> ``socket:[N]``)."""
    found: set[int] = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link.endswith("]"):
                found.add(int(link[8:-1]))
    return found


def foreign_listeners(port: int, pgid: int) -> bool:
    """Whether a socket listening on ``port`` is held by no member of process group ``pgid``
    (another process serves the port too); False when ``/proc/net`` cannot be read."""
    listening = listening_inodes(port)
    return bool(listening) and bool(listening - socket_inodes(group_members(pgid)))


def unlink_all(paths: set[str]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _others(pgid: int) -> list[int]:
    me = os.getpid()
    return [pid for pid in group_members(pgid) if pid != me]


def _kill_others(pgid: int, sig: int) -> None:
    for pid in _others(pgid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: guard.py PARENT_PID GRACE_S -- CMD...", file=sys.stderr)
        return 2
    parent, grace, cmd = int(argv[0]), float(argv[1]), argv[3:]
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        return 1
    pgid = os.getpgid(0)
    stop = {"why": None}

    def on_signal(signum: int, _frame: object) -> None:
        stop["why"] = signum

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        child = subprocess.Popen(cmd)
    except OSError as exc:
        print(f"vtune guard: cannot run {cmd[0]!r}: {exc}", file=sys.stderr)
        return 127
    while stop["why"] is None:
        try:
            code = child.wait(timeout=0.25)
        except subprocess.TimeoutExpired:
            if os.getppid() != parent:
                stop["why"] = "parent gone"
            continue
        # vLLM exited by itself; its children normally follow within moments (the resource
        # tracker unlinks shared memory on its way out): let them, then make sure.
        deadline = time.monotonic() + 3
        while _others(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        shm = shm_files(_others(pgid))
        _kill_others(pgid, signal.SIGKILL)
        unlink_all(shm)
        return code if code >= 0 else 128 - code
    # Said in the log, so that vtune can tell a stop it did not ask for (someone killed the
    # guard) from a crash of vLLM.
    print(f"vtune guard: stopping vLLM: {_why(stop['why'])}", flush=True)
    # Asked to stop (or orphaned): SIGTERM to vLLM's API server only (it shuts its own children
    # down cleanly once started; a second SIGTERM would make uvicorn force-exit), then certainty.
    with contextlib.suppress(ProcessLookupError):
        child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.1)
    code = child.poll()
    if code is None:
        shm = shm_files(_others(pgid))
        _kill_others(pgid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, subprocess.TimeoutExpired):
            child.wait(5)
        unlink_all(shm)
        return 128 + signal.SIGKILL
    _kill_others(pgid, signal.SIGKILL)
    return code if code >= 0 else 128 - code


def _why(why: object) -> str:
    if isinstance(why, int):
        try:
            return f"received {signal.Signals(why).name}"
        except ValueError:
            return f"received signal {why}"
    return str(why)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
