"""Talking to a running vLLM over HTTP: health, version, models, cache config -> ``ServerInfo``.

Stdlib only (urllib), so starting or attaching needs no event loop. ``attach(url)`` serves
``vtune bench --url``; ``tuner.engine.server.VllmServer`` uses ``read_info`` once /health answers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import socket
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tuner.engine.log import parse_cache_config_info, parse_kv_cache_log
from tuner.errors import EngineError


@dataclass(frozen=True)
class ServerInfo:
    """What a running server told us. Capacity fields are None where vLLM did not say."""

    url: str
    model: str | None  # served model name (first of /v1/models)
    vllm_version: str | None
    kv_cache_size_tokens: int | None  # vLLM's own number (metrics, else log)
    max_concurrency: float | None  # at max_model_len
    num_gpu_blocks: int | None  # KV blocks (also on CPU)
    block_size: int | None
    max_model_len: int | None
    startup_s: float | None = None
    log_path: Path | None = None
    argv: tuple[str, ...] = ()  # secrets redacted

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["log_path"] = None if self.log_path is None else str(self.log_path)
        out["argv"] = list(self.argv)
        return out


# "FIRST-LAST": the ports this process's vLLM servers take, in turn (each worker of
# ``vtune search --workers`` gets its own range: no two workers ever pick the same port).
PORT_RANGE_ENV = "VTUNE_PORT_RANGE"
_turn = itertools.count()


def find_free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS's choice); may be taken before vLLM binds.
    With ``VTUNE_PORT_RANGE=FIRST-LAST`` in the environment: the next free port of that range,
    in turn (a port just given up is tried last); EngineError when none of it is free."""
    span = os.environ.get(PORT_RANGE_ENV, "").strip()
    if span:
        first, _, last = span.partition("-")
        if not (first.isdigit() and last.isdigit() and 0 < int(first) <= int(last) < 65536):
            raise EngineError(f"{PORT_RANGE_ENV}={span!r}: expected FIRST-LAST, e.g. 28000-28099")
        size = int(last) - int(first) + 1
        for _ in range(size):
            port = int(first) + next(_turn) % size
            if port_free(host, port):
                return port
        raise EngineError(f"no free port in {PORT_RANGE_ENV}={span} on {host}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _http_get(
    url: str, timeout: float, headers: Mapping[str, str] | None = None
) -> tuple[int, str]:
    host = urlsplit(url).hostname or ""
    handlers = (
        [urllib.request.ProxyHandler({})] if host in ("127.0.0.1", "localhost", "::1") else []
    )
    opener = urllib.request.build_opener(*handlers)
    req = urllib.request.Request(url, headers=dict(headers or {}))
    with opener.open(req, timeout=timeout) as resp:
        return resp.status, resp.read().decode("utf-8", errors="replace")


def try_get(url: str, timeout: float, headers: Mapping[str, str] | None = None) -> str | None:
    try:
        status, body = _http_get(url, timeout, headers)
    except (OSError, urllib.error.URLError, ValueError):
        return None
    return body if status == 200 else None


def read_info(
    url: str,
    *,
    log_text: str = "",
    timeout: float = 5.0,
    api_key: str | None = None,
    **extra: Any,
) -> ServerInfo:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    version = None
    if (body := try_get(url + "/version", timeout)) is not None:
        with contextlib.suppress(ValueError, AttributeError):
            version = json.loads(body).get("version")
    model = max_len = None
    if (body := try_get(url + "/v1/models", timeout, headers)) is not None:
        with contextlib.suppress(ValueError, AttributeError, IndexError, KeyError):
            first = json.loads(body)["data"][0]
            model, max_len = first.get("id"), first.get("max_model_len")
    cache = parse_cache_config_info(try_get(url + "/metrics", timeout) or "")
    logged = parse_kv_cache_log(log_text)
    return ServerInfo(
        url=url,
        model=model,
        vllm_version=version,
        kv_cache_size_tokens=(cache and cache.kv_cache_size_tokens) or logged.kv_cache_size_tokens,
        max_concurrency=(cache and cache.max_concurrency) or logged.max_concurrency,
        num_gpu_blocks=cache.num_gpu_blocks if cache else None,
        block_size=cache.block_size if cache else None,
        max_model_len=max_len or logged.concurrency_context,
        **extra,
    )


def attach(url: str, *, api_key: str | None = None, timeout_s: float = 5.0) -> ServerInfo:
    """Describe a vLLM server that is already running at ``url`` (``/v1`` suffix optional).

    Raises :class:`EngineError` (one line) when /health does not answer 200.
    """
    base = url.rstrip("/")
    base = base.removesuffix("/v1")
    if not base.startswith(("http://", "https://")):
        raise EngineError(f"not an http(s) URL: {url!r}")
    try:
        status, _ = _http_get(base + "/health", timeout_s)
    except urllib.error.HTTPError as exc:
        raise EngineError(f"vLLM at {base} is not healthy: /health answered {exc.code}") from None
    except (OSError, urllib.error.URLError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise EngineError(f"cannot reach vLLM at {base}: {reason}") from None
    if status != 200:
        raise EngineError(f"vLLM at {base} is not healthy: /health answered {status}")
    return read_info(base, timeout=timeout_s, api_key=api_key)
