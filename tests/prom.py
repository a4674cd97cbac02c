"""Real Prometheus and Pushgateway servers for tests (Debian's ``prometheus`` and
``prometheus-pushgateway`` packages, which ``make system-packages`` installs).

    with running_prometheus(["127.0.0.1:9400"]) as prom:
        prom.wait_for('vtune_trials_total{state="complete"}')
        prom.query("vtune_best_goodput")

    with running_pushgateway() as gw:
        ... push to gw.url ...; gw.metrics() -> {sample name: [(labels, value)]}

Both listen on loopback only, on a free port, with their data in a temporary directory, and are
started as argv lists in their own process group, which is killed on exit. A missing binary
fails the test with a clear message: CI installs them, so a skip would hide a broken setup.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

PROMETHEUS = ("prometheus",)
PUSHGATEWAY = ("prometheus-pushgateway", "pushgateway")
INSTALL_HINT = "make system-packages (or: apt-get install prometheus prometheus-pushgateway)"


def find_binary(names: Sequence[str]) -> str:
    """The first of ``names`` on PATH; fails the test (not skips) when none is installed."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(f"{' / '.join(names)} is not installed: {INSTALL_HINT}", pytrace=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


@dataclass
class _Process:
    """A started server: its process, base URL and log file."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, path: str, timeout_s: float) -> None:
        """Poll ``url + path`` until it answers 200, failing early if the process exits."""
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"{self.name} exited with {self.proc.returncode} while starting:\n"
                    f"{self.log_tail()}",
                    pytrace=False,
                )
            try:
                http_get(self.url + path, timeout=2)
                # The answer must come from our process: a port taken between free_port() and
                # the bind (tests running side by side) would make another server answer.
                if self._listening():
                    return
                last = "the port answers, but not from this process"
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(0.2)
        pytest.fail(
            f"{self.name} not ready after {timeout_s:g}s ({last}):\n{self.log_tail()}",
            pytrace=False,
        )

    def _listening(self) -> bool:
        port = int(urllib.parse.urlsplit(self.url).port or 0)
        try:
            conns = psutil.Process(self.proc.pid).net_connections(kind="tcp")
        except psutil.Error:
            return False
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def _start(name: str, argv: list[str], url: str, workdir: Path) -> _Process:
    log = workdir / f"{name}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            argv,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
            start_new_session=True,
        )
    return _Process(name, proc, url, log)


@dataclass
class PromHandle:
    """A running Prometheus. ``query`` returns the API's result list (instant vectors:
    ``[{"metric": {...}, "value": [ts, "v"]}]``)."""

    url: str
    config_path: Path
    process: _Process

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        body = json.loads(http_get(f"{self.url}{path}?{query}"))
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus {path} failed: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("/api/v1/query", query=expr)["result"]

    def value(self, expr: str) -> float | None:
        """The single value of ``expr`` (None when it has no series)."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, f"{expr} has {len(result)} series: {result}"
        return float(result[0]["value"][1])

    def targets(self) -> list[dict[str, Any]]:
        return self.api("/api/v1/targets")["activeTargets"]

    def series_names(self, regex: str = ".+") -> set[str]:
        """Metric names Prometheus holds now that match ``regex``."""
        return {r["metric"]["__name__"] for r in self.query(f'{{__name__=~"{regex}"}}')}

    def wait_for(
        self,
        expr: str,
        timeout_s: float = 30.0,
        check: Callable[[list[dict[str, Any]]], bool] = bool,
    ) -> list[dict[str, Any]]:
        """Poll ``expr`` until ``check(result)`` holds (default: any series), then return the
        result; fails the test with the targets' state after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if check(result):
                return result
            time.sleep(0.25)
        pytest.fail(
            f"Prometheus: {expr} -> {result} after {timeout_s:g}s; targets: "
            f"{[(t['scrapeUrl'], t['health'], t['lastError']) for t in self.targets()]}",
            pytrace=False,
        )


def prometheus_config(
    jobs: Mapping[str, Sequence[str]],
    scrape_interval_s: float = 1.0,
    honor_labels: Sequence[str] = (),
) -> str:
    """A prometheus.yml scraping each job's targets every ``scrape_interval_s``."""
    import yaml

    interval = f"{int(scrape_interval_s * 1000)}ms"
    return yaml.safe_dump(
        {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [
                {
                    "job_name": job,
                    "honor_labels": job in honor_labels,
                    "static_configs": [{"targets": list(targets)}],
                }
                for job, targets in jobs.items()
            ],
        },
        sort_keys=False,
    )


@contextlib.contextmanager
def running_prometheus(
    targets: Sequence[str] | Mapping[str, Sequence[str]],
    *,
    scrape_interval_s: float = 1.0,
    honor_labels: Sequence[str] = ("pushgateway",),
    ready_timeout_s: float = 60.0,
) -> Iterator[PromHandle]:
    """Start Prometheus on 127.0.0.1 scraping ``targets`` ("host:port"; a list goes into job
    "vtune", a mapping gives job -> targets). Jobs named in ``honor_labels`` keep the labels
    of what they scrape (a Pushgateway's). Stopped (process group killed) on exit."""
    binary = find_binary(PROMETHEUS)
    jobs = dict(targets) if isinstance(targets, Mapping) else {"vtune": list(targets)}
    with tempfile.TemporaryDirectory(prefix="vtune-prom-") as tmp:
        work = Path(tmp)
        config = work / "prometheus.yml"
        config.write_text(prometheus_config(jobs, scrape_interval_s, honor_labels))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = _start(
            "prometheus",
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.console.templates=" + str(work),
                "--web.console.libraries=" + str(work),
                "--log.level=warn",
            ],
            url,
            work,
        )
        try:
            proc.wait_ready("/-/ready", ready_timeout_s)
            yield PromHandle(url, config, proc)
        finally:
            proc.stop()


@dataclass
class PushgatewayHandle:
    """A running Pushgateway; ``address`` is "127.0.0.1:port" for a Prometheus target."""

    url: str
    address: str
    process: _Process

    def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        """What it serves on /metrics: sample name -> [(labels, value)]."""
        from prometheus_client.parser import text_string_to_metric_families

        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        text = http_get(self.url + "/metrics").decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
        return out


@contextlib.contextmanager
def running_pushgateway(ready_timeout_s: float = 30.0) -> Iterator[PushgatewayHandle]:
    """Start a Pushgateway on 127.0.0.1 (nothing persisted); stopped on exit."""
    binary = find_binary(PUSHGATEWAY)
    with tempfile.TemporaryDirectory(prefix="vtune-pushgw-") as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = _start(
            "pushgateway",
            [
                binary,
                f"--web.listen-address=127.0.0.1:{port}",
                # Debian's build persists to /var/lib/prometheus by default: every test's pushes
                # would meet the earlier ones'. In memory only.
                "--persistence.file=",
                "--log.level=warn",
            ],
            url,
            Path(tmp),
        )
        try:
            proc.wait_ready("/-/ready", ready_timeout_s)
            yield PushgatewayHandle(url, f"127.0.0.1:{port}", proc)
        finally:
            proc.stop()
