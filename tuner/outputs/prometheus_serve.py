"""Serving and pushing Prometheus metrics, for the search's and the bench's exporters alike.

* :func:`start_exporter` serves a registry on ``host:port`` (127.0.0.1 unless told otherwise)
  and raises :class:`~tuner.errors.EngineError` with one line when the port is taken.
* :class:`Pushgateway` pushes a registry; a failed push logs one warning line and never raises,
  so an unreachable gateway never stops a tuning job. Credentials in the URL
  (``http://user:pass@host:9091``) go into HTTP basic auth, never into a message.
* :class:`RegistryExporter` is what every exporter shares: its own registry (never the global
  one), an optional Pushgateway and an info metric.
* :func:`exporting` is the CLI's one call: an exporter served and/or pushing for a block.

The metrics themselves: ``tuner.outputs.prometheus`` (search) and
``tuner.outputs.prometheus_bench`` (bench).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import math
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

from prometheus_client import CollectorRegistry, Info

from tuner.errors import EngineError, ParameterError

log = logging.getLogger(__name__)
E = TypeVar("E")


@dataclass
class MetricsServer:
    """A running /metrics endpoint (a daemon thread). ``port`` is the bound one (useful with 0)."""

    host: str
    port: int
    registry: CollectorRegistry
    _httpd: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and free the port; safe to call twice."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_exporter(
    port: int, host: str = "127.0.0.1", registry: CollectorRegistry | None = None
) -> MetricsServer:
    """Serve ``registry`` (a fresh one if None) at ``http://host:port/metrics``.

    Port 0 picks a free port. Raises EngineError with one line when the port is in use, the
    address cannot be bound, or the host is unknown.
    """
    from prometheus_client import start_http_server

    if not 0 <= port <= 65535:
        raise ParameterError(f"metrics port must be 0-65535, got {port}")
    reg = registry if registry is not None else CollectorRegistry()
    try:
        httpd, thread = start_http_server(port, addr=host, registry=reg)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise EngineError(f"metrics port {port} is in use on {host}") from None
        if exc.errno == errno.EACCES:
            raise EngineError(f"no permission to listen on {host}:{port}") from None
        reason = exc.strerror or str(exc)
        raise EngineError(f"cannot serve metrics on {host}:{port}: {reason}") from None
    return MetricsServer(host, httpd.server_address[1], reg, httpd, thread)


class Pushgateway:
    """Pushes a registry to a Pushgateway under ``job`` and ``grouping`` (PUT: the group's
    metrics are replaced). :meth:`push` never raises: a failure logs one warning line (the
    same failure again only at debug level) and returns False.

    A URL with userinfo (``http://user:pass@host:9091``) pushes with HTTP basic auth
    (prometheus-client's ``basic_auth_handler``) to the URL without it: ``url`` never holds the
    password, and messages show ``shown`` (``http://user:***@host:9091``)."""

    def __init__(
        self,
        url: str,
        job: str = "vtune",
        grouping: Mapping[str, str] | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        text = url.strip()
        if "://" not in text:
            text = "http://" + text
        parts = urlsplit(text)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
            shown = _without_password(text)
            raise ParameterError(f"not a Pushgateway URL: {shown!r} (use e.g. http://host:9091)")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        netloc = host if port is None else f"{host}:{port}"
        self.url = urlunsplit(parts._replace(netloc=netloc)).rstrip("/")
        self.username = None if parts.username is None else unquote(parts.username)
        self._password = None if parts.password is None else unquote(parts.password)
        self.shown = _without_password(text).rstrip("/")
        self.job = job
        self.grouping = dict(grouping or {})
        self.timeout_s = timeout_s
        self.failures = 0
        self.pushes = 0
        self._last_error: str | None = None

    def handler(self) -> Any:
        """The prometheus-client push handler: basic auth when the URL had a user, else the
        default one."""
        from prometheus_client.exposition import basic_auth_handler, default_handler

        if self.username is None:
            return default_handler
        return functools.partial(
            basic_auth_handler, username=self.username, password=self._password or ""
        )

    def push(self, registry: CollectorRegistry) -> bool:
        from prometheus_client import push_to_gateway

        try:
            push_to_gateway(
                self.url,
                job=self.job,
                registry=registry,
                grouping_key=self.grouping,
                timeout=self.timeout_s,
                handler=self.handler(),
            )
        except Exception as exc:  # any failure (DNS, refused, HTTP 401 or 5xx) only warns
            self.failures += 1
            reason = " ".join(str(getattr(exc, "reason", None) or exc).split())[:200]
            code = getattr(exc, "code", None)  # an HTTP error: the gateway answered
            if isinstance(code, int):
                reason = f"HTTP {code} {reason}"
            if self._password:
                reason = reason.replace(self._password, "***")
            what = "refused the push" if isinstance(code, int) else "unreachable"
            level = logging.DEBUG if reason == self._last_error else logging.WARNING
            log.log(level, "Pushgateway %s %s (%s); the run goes on", self.shown, what, reason)
            self._last_error = reason
            return False
        if self._last_error is not None:
            log.info("Pushgateway %s reachable again", self.shown)
        self._last_error = None
        self.pushes += 1
        return True


def _without_password(url: str) -> str:
    """``url`` with the password of its userinfo shown as ``***`` (the rest as written). The
    password runs to the last "@", so an unencoded "@" or "/" in it hides more, never less."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, after = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{after}"


def label_value(value: Any) -> str:
    """A JSON value as a label value: true/false, none, or its text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "none" if value is None else str(value)


class RegistryExporter:
    """What both exporters share: their registry, an optional Pushgateway, and an info metric
    ``<info_name>_info`` with vtune's version and the ``info`` labels (never a secret)."""

    default_job = "vtune"

    def __init__(
        self,
        registry: CollectorRegistry | None,
        pushgateway: Pushgateway | None,
        info_name: str,
        info_doc: str,
        info: Mapping[str, Any] | None,
    ) -> None:
        from tuner import __version__

        self.registry = registry if registry is not None else CollectorRegistry()
        self.pushgateway = pushgateway
        self.info = Info(info_name, info_doc, registry=self.registry)
        self.info.info(
            {"version": __version__, **{k: label_value(v) for k, v in (info or {}).items()}}
        )

    def _push(self) -> None:
        if self.pushgateway is not None:
            self.pushgateway.push(self.registry)


def set_gauge(gauge: Any, value: Any) -> None:
    """Set a gauge from a JSON value; None (not measured) becomes NaN, never 0."""
    gauge.set(float(value) if isinstance(value, int | float) else math.nan)


@contextlib.contextmanager
def exporting(
    kind: type[E],
    port: int | None = None,
    host: str = "127.0.0.1",
    pushgateway: str | None = None,
    *,
    job: str | None = None,
    grouping: Mapping[str, str] | None = None,
    info: Mapping[str, Any] | None = None,
) -> Iterator[E | None]:
    """The CLI's one call: an exporter of ``kind`` (SearchExporter or BenchExporter, whose
    ``default_job`` names the Pushgateway job) served on
    ``host:port`` and/or pushing to ``pushgateway`` (job "vtune-search" / "vtune-bench" unless
    given) for the duration of the block; None when neither is asked for. A taken port raises
    EngineError before the block runs; the endpoint is closed after it."""
    if port is None and pushgateway is None:
        yield None
        return
    default_job = getattr(kind, "default_job", "vtune")
    gateway = (
        Pushgateway(pushgateway, job=job or default_job, grouping=grouping) if pushgateway else None
    )
    exporter = kind(pushgateway=gateway, info=info)
    server = start_exporter(port, host, exporter.registry) if port is not None else None
    if server is not None:
        log.info("metrics on %s", server.url)
    try:
        yield exporter
    finally:
        if server is not None:
            server.close()
