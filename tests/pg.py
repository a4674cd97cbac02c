"""A throwaway PostgreSQL server for tests (Debian's ``postgresql`` package, which
``scripts/system-packages`` installs).

    with running_postgres() as pg:
        url = pg.new_database()   # postgresql://postgres:<password>@127.0.0.1:<port>/<db>

or the module-scoped fixture :func:`postgres` (assign it in a test module: ``postgres =
pg.postgres``). The cluster lives in a fresh temporary directory: ``initdb`` (trust on the Unix
socket, a password over TCP, so a test's URL carries a password that must never leak), then
``pg_ctl start`` on a free port on 127.0.0.1, with durability off (fsync, synchronous commit:
a test's data need not survive a crash); ``pg_ctl stop -m immediate`` and the directory removed
at the end. As root (CI) the server runs as the ``postgres`` user (else ``nobody``) through
``setpriv``: ``initdb`` refuses to run as root. Missing binaries FAIL the test with the command
that installs them: CI installs them, so a skip would hide a broken setup.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

INSTALL_HINT = "scripts/system-packages installs them (apt-get install postgresql)"
START_TRIES = 3  # a free port can be taken between the check and the server's bind


@dataclass(frozen=True)
class Postgres:
    """A running server: ``user`` logs in with ``password`` over TCP (trust on the socket)."""

    bindir: Path
    datadir: Path
    socket_dir: Path
    port: int
    password: str
    owner: tuple[str, ...]  # the setpriv prefix the server's tools run under ("" when not root)
    user: str = "postgres"
    host: str = "127.0.0.1"

    def url(self, database: str = "vtune", password: str | None = None) -> str:
        """``postgresql://user:password@host:port/database`` (the real password by default)."""
        secret = self.password if password is None else password
        return f"postgresql://{self.user}:{secret}@{self.host}:{self.port}/{database}"

    def new_database(self, name: str | None = None) -> str:
        """Create a database (a fresh name by default); returns its URL."""
        name = name or f"t{secrets.token_hex(6)}"
        tool = [str(self.bindir / "createdb"), "-h", str(self.socket_dir), "-p", str(self.port)]
        _run([*self.owner, *tool, "-U", self.user, name])
        return self.url(name)


def find_bindir() -> Path:
    """The directory of ``initdb`` and ``pg_ctl``: ``pg_config --bindir``, else the newest
    ``/usr/lib/postgresql/*/bin``; fails the test (not skips) when there is none."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10
            ).stdout
            candidates.append(Path(out.strip()))
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    versions.sort(key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    candidates += [Path(p) for p in reversed(versions)]
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    pytest.fail(f"PostgreSQL server binaries (initdb, pg_ctl) not found: {INSTALL_HINT}", False)


def _owner() -> tuple[tuple[str, ...], int, int]:
    """(setpriv prefix, uid, gid) the server runs as: this user, or as root an unprivileged
    one (initdb refuses root)."""
    if os.geteuid() != 0:
        return (), os.getuid(), os.getgid()
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            prefix = (
                "setpriv",
                f"--reuid={entry.pw_uid}",
                f"--regid={entry.pw_gid}",
                "--clear-groups",
                "--",
            )
            return prefix, entry.pw_uid, entry.pw_gid
    pytest.fail("running as root with no 'postgres' or 'nobody' user to run PostgreSQL", False)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} -> {proc.returncode}\n{proc.stdout}{proc.stderr}")
    return proc


@contextlib.contextmanager
def running_postgres() -> Iterator[Postgres]:
    """Start a throwaway cluster with a database ``vtune``; stop and remove it on exit."""
    bindir = find_bindir()
    owner, uid, gid = _owner()
    # Not pytest's tmp_path: as root that directory is 0700, out of the server user's reach.
    base = Path(tempfile.mkdtemp(prefix="vtune-pg-"))
    datadir, password = base / "data", secrets.token_hex(12)
    pwfile = base / "pw"
    pwfile.write_text(password + "\n")
    os.chown(base, uid, gid)
    os.chown(pwfile, uid, gid)
    started: Postgres | None = None
    try:
        _run(
            [
                *owner,
                str(bindir / "initdb"),
                "-D",
                str(datadir),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                f"--pwfile={pwfile}",
                "--no-sync",
                "--no-locale",
                "-E",
                "UTF8",
            ],
            timeout=120,
        )
        for attempt in range(1, START_TRIES + 1):
            port = _free_port()
            options = (
                f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off"
            )
            start = [str(bindir / "pg_ctl"), "-D", str(datadir), "-o", options]
            start += ["-l", str(base / "server.log"), "-w", "-t", "60", "start"]
            proc = subprocess.run([*owner, *start], capture_output=True, text=True, timeout=90)
            if proc.returncode == 0:
                break
            if attempt == START_TRIES:
                log = (base / "server.log").read_text(errors="replace")[-2000:]
                raise AssertionError(f"pg_ctl start failed: {proc.stderr}\n{log}")
        started = Postgres(bindir, datadir, base, port, password, owner)
        started.new_database("vtune")
        yield started
    finally:
        if started is not None:
            _stop(started)
        shutil.rmtree(base, ignore_errors=True)


def _stop(pg: Postgres) -> None:
    """``pg_ctl stop -m immediate``; the postmaster (by the pid it wrote) killed if that fails."""
    stop = [*pg.owner, str(pg.bindir / "pg_ctl"), "-D", str(pg.datadir), "-m", "immediate"]
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        if subprocess.run([*stop, "-w", "stop"], capture_output=True, timeout=60).returncode == 0:
            return
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((pg.datadir / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A throwaway PostgreSQL server for the tests of one module (:func:`running_postgres`)."""
    with running_postgres() as pg:
        yield pg
