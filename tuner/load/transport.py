"""How request bytes reach the server and response bytes reach the stream parser.

Two transports with one method, :meth:`post_stream`, that hand every piece of the response body
to a :class:`Sink` with the ``perf_counter`` time it arrived:

* :class:`Http11Pool` — a lean HTTP/1.1 client for ``http://`` URLs (keep-alive connection pool,
  chunked or content-length bodies) built on an ``asyncio.Protocol``. The body is parsed in
  ``data_received`` as it comes off the socket: no stream buffer and no coroutine wake-up per
  token, which is where a generic client spends most of its time on a token stream (one HTTP
  chunk per token). It is what lets one core drive a fast server (benchmarks/loadgen.py).
* :class:`AiohttpTransport` — aiohttp for everything else (``https://``, proxies).

Both raise :class:`TransportError` (or ``OSError`` / ``aiohttp.ClientError``) when the
connection fails; the caller turns that into a failed record. The lean client names what was
wrong with a malformed reply (a bad status line or ``Content-Length``, headers over 64 KiB,
broken chunk framing, an unasked-for 101, the connection closed mid-body) and skips interim
1xx responses (``100 Continue``, ``103 Early Hints``) to read the final one.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp

from tuner.errors import ParameterError

clock = time.perf_counter
_MAX_HEAD = 64 * 1024
_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]+)[^\r\n]*\r\n")  # chunk size, extensions ignored
_ERROR_BODY = 1024


class TransportError(Exception):
    """The connection failed or the response was not valid HTTP/1.1."""


class Sink(Protocol):
    def feed(self, data: bytes, now: float) -> bool:
        """Take body bytes that arrived at ``now``; return False to stop reading (bad stream)."""
        ...


class Transport(Protocol):
    async def post_stream(self, body: bytes, sink: Sink) -> tuple[int, bytes]:
        """POST ``body``; stream a 200 response's body into ``sink``. Returns (status, first
        bytes of a non-200 body)."""
        ...

    async def close(self) -> None: ...


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")  # latin-1 text, no control characters


def check_header(name: str, value: str) -> str:
    """``value`` when ``name: value`` can go on an HTTP/1.1 header line as is; otherwise
    ParameterError naming the header, never showing the value (it may be a secret)."""
    if not _HEADER_NAME.fullmatch(name) or not _HEADER_VALUE.fullmatch(value):
        raise ParameterError(
            f"the HTTP header {name[:40]!r} has characters HTTP cannot carry "
            "(control characters or non-latin-1 text)"
        )
    return value


def make_transport(url: str, headers: Mapping[str, str], limit: int | None = None) -> Transport:
    """The lean HTTP/1.1 pool for http:// URLs, aiohttp otherwise."""
    if urlsplit(url).scheme == "http":
        return Http11Pool(url, headers)
    return AiohttpTransport(url, headers, limit)


# --- aiohttp ------------------------------------------------------------------------------------


class AiohttpTransport:
    def __init__(self, url: str, headers: Mapping[str, str], limit: int | None = None) -> None:
        self.url, self.headers = url, dict(headers)
        connector = aiohttp.TCPConnector(limit=limit or 0, keepalive_timeout=60)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None)
        )

    async def post_stream(self, body: bytes, sink: Sink) -> tuple[int, bytes]:
        async with self.session.post(self.url, data=body, headers=self.headers) as resp:
            if resp.status != 200:
                return resp.status, await resp.content.read(_ERROR_BODY)
            async for data in resp.content.iter_any():
                if not sink.feed(data, clock()):
                    break
            return 200, b""

    async def close(self) -> None:
        await self.session.close()


# --- lean HTTP/1.1 ------------------------------------------------------------------------------


class _Conn(asyncio.Protocol):
    """One keep-alive connection; parses one response at a time as bytes arrive."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._reset(None, None)

    def _reset(self, sink: Sink | None, done: asyncio.Future[tuple[int, bytes]] | None) -> None:
        self.sink, self.done = sink, done
        self.head = b""
        self.in_body = False
        self.status = 0
        self.chunked = False
        self.remaining = -1  # content-length left; -1: until the chunked end or close
        self.pending = b""  # unparsed chunked framing carried over between reads
        self.chunk_left = 0  # body bytes left in the current chunk
        self.error_body = b""
        self.keep_alive = True
        self.trailer = False
        self.got_bytes = False
        self.interim = 0  # the status of the last 1xx (interim) response, 0 if none

    # asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.done is not None and not self.done.done():
            if self.in_body and self.remaining == -1 and not self.chunked:
                self._finish()  # a body delimited by the connection closing: complete
            else:
                why = f": {exc}" if exc else ""
                if self.interim and not self.in_body:
                    why = f" (after an interim HTTP {self.interim}){why}"
                self.done.set_exception(
                    TransportError(f"connection closed before the response ended{why}")
                )

    def data_received(self, data: bytes) -> None:
        now = clock()
        if self.done is None or self.done.done():
            return  # nothing expected (a late byte after an abandoned response)
        self.got_bytes = True
        try:
            if not self.in_body:
                body = self._head_received(data)
                if body is None:
                    return
                if self.remaining == 0:
                    self._finish()
                    return
                if not body:
                    return
                data = body
            if self.trailer:
                self._trailer(data)
                return
            if self.chunked:
                data = self._dechunk(data)
                if data is None:
                    return
            elif self.remaining >= 0:
                data = data[: self.remaining]
                self.remaining -= len(data)
            if data:
                self._deliver(data, now)
            if self.remaining == 0 and self.done is not None and not self.done.done():
                self._finish()
        except Exception as exc:  # a bug here must fail this response, not hang it
            self._fail(f"cannot handle the response: {type(exc).__name__}: {exc}"[:300])

    # parsing --------------------------------------------------------------------------------
    def _head_received(self, data: bytes) -> bytes | None:
        """Collect the response head; once the final (non-1xx) head is whole, parse it and
        return the body bytes that came after it; None while it is incomplete or failed.

        Interim responses (100 Continue, 103 Early Hints) are skipped: the final one follows on
        the same connection. 101 Switching Protocols was not asked for, so it fails. The head
        is limited to ``_MAX_HEAD`` bytes, whether it arrives in one read or many.
        """
        scan = max(0, len(self.head) - 3)  # the blank line may straddle two reads
        self.head += data
        while True:
            end = self.head.find(b"\r\n\r\n", scan)
            if end > _MAX_HEAD or (end < 0 and len(self.head) > _MAX_HEAD):
                self._fail(f"response headers too large (over {_MAX_HEAD // 1024} KiB)")
                return None
            if end < 0:
                return None
            head, rest = self.head[:end], self.head[end + 4 :]
            try:
                self._parse_head(head)
            except TransportError as exc:
                self._fail(str(exc))
                return None
            if self.status >= 200:
                self.head, self.in_body = b"", True
                return rest
            if self.status == 101:
                self._fail("unexpected HTTP 101 Switching Protocols (no upgrade was asked for)")
                return None
            self.interim, self.head, scan = self.status, rest, 0

    def _parse_head(self, head: bytes) -> None:
        """Status and framing of one response head; TransportError (named) when malformed."""
        lines = head.split(b"\r\n")
        parts = lines[0].split(None, 2)
        if (
            len(parts) < 2
            or not parts[0].startswith(b"HTTP/1.")
            or not (len(parts[1]) == 3 and parts[1].isdigit() and parts[1] >= b"100")
        ):
            raise TransportError(f"malformed HTTP response head: {head[:60]!r}")
        self.status = int(parts[1])
        self.chunked, self.remaining = False, -1
        self.keep_alive = parts[0] != b"HTTP/1.0"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value:
                self.chunked = True
            elif name == b"content-length":
                if not value.isdigit():  # negative, empty, not a number
                    raise TransportError(f"invalid Content-Length {value[:20]!r}")
                length = int(value)
                if self.remaining not in (-1, length):
                    raise TransportError("conflicting Content-Length headers")
                self.remaining = length
            elif name == b"connection":
                self.keep_alive = value == b"keep-alive" or (self.keep_alive and value != b"close")
        if self.status < 200 or self.status in (204, 304):
            self.chunked, self.remaining = False, 0  # these never have a body
        elif self.chunked:
            self.remaining = -1
        elif self.remaining == -1:
            self.keep_alive = False  # body ends when the server closes

    def _dechunk(self, data: bytes) -> bytes | None:
        """Strip chunked framing; None when the response failed or ended inside this read.

        ``chunk_left`` counts the data bytes left in the current chunk *plus* its trailing
        CRLF, so a chunk costs one slice; the CRLF is checked where it arrives whole.
        """
        buf = self.pending + data if self.pending else data
        self.pending = b""
        out = []
        pos, n, left = 0, len(buf), self.chunk_left
        while pos < n:
            if left:
                end = pos + left
                if end <= n and left > 2:  # the common case: the rest of the chunk is here
                    if buf[end - 2 : end] != b"\r\n":
                        self._fail("malformed chunked encoding (no CRLF after a chunk)")
                        return None
                    out.append(buf[pos : end - 2])
                    pos, left = end, 0
                    continue
                if end - 2 > pos:
                    out.append(buf[pos : min(n, end - 2)])
                if end > n:  # the chunk goes on in the next read
                    left = end - n
                    break
                pos, left = end, 0  # a CRLF split across reads: counted, not checked
                continue
            m = _SIZE_LINE.match(buf, pos)
            if m is None:
                if buf.find(b"\r\n", pos) >= 0 or n - pos > 1024:
                    self._fail(f"malformed chunk size {buf[pos : pos + 20]!r}")
                    return None
                self.pending = buf[pos:]  # the size line goes on in the next read
                break
            size = int(m.group(1), 16)
            pos = m.end()
            if size == 0:  # the last chunk: what follows is the trailer, up to a blank line
                self.chunk_left = 0
                if out:
                    self._deliver(b"".join(out), clock())
                self.trailer = True
                self._trailer(buf[pos:])
                return None
            left = size + 2
        self.chunk_left = left
        return b"".join(out) if len(out) != 1 else out[0]

    def _trailer(self, data: bytes) -> None:
        """Consume the trailer (normally just CRLF) so a reused connection starts clean."""
        buf = self.pending + data
        if buf.startswith(b"\r\n") or b"\r\n\r\n" in buf:
            self.pending, self.trailer, self.remaining = b"", False, 0
            self._finish()
        else:
            self.pending = buf

    def _deliver(self, data: bytes, now: float) -> None:
        if self.status != 200:
            if len(self.error_body) < _ERROR_BODY:
                self.error_body += data[: _ERROR_BODY - len(self.error_body)]
            return
        assert self.sink is not None
        if not self.sink.feed(data, now):
            self.keep_alive = False
            self._finish()

    def _finish(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result((self.status, self.error_body))

    def _fail(self, message: str) -> None:
        self.keep_alive = False
        if self.done is not None and not self.done.done():
            self.done.set_exception(TransportError(message))


class Http11Pool:
    """Keep-alive HTTP/1.1 connections to one ``http://host:port``; one request per connection
    at a time (no pipelining). Connections are opened on demand and reused."""

    def __init__(self, url: str, headers: Mapping[str, str]) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"not an http:// URL: {url}")
        self.host, self.port = parts.hostname, parts.port or 80
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = parts.netloc.rsplit("@", 1)[-1]
        fixed = {"Host": host_header, "Accept": "text/event-stream", **headers}
        self._head = (
            f"POST {path} HTTP/1.1\r\n"
            + "".join(
                f"{k}: {check_header(k, v)}\r\n"
                for k, v in fixed.items()
                if k.lower() != "content-length"
            )
        ).encode("latin-1")
        self._idle: list[_Conn] = []

    def _idle_conn(self) -> _Conn | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def _new_conn(self) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(_Conn, self.host, self.port)
        except OSError as exc:
            raise TransportError(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        return conn

    async def post_stream(self, body: bytes, sink: Sink) -> tuple[int, bytes]:
        """See :class:`Transport`. A reused connection that the server closed just as the
        request went out (its keep-alive timeout) is retried once on a new connection, if no
        byte of a response came back."""
        conn = self._idle_conn()
        if conn is not None:
            try:
                return await self._exchange(conn, body, sink)
            except TransportError:
                if conn.got_bytes:
                    raise
        return await self._exchange(await self._new_conn(), body, sink)

    async def _exchange(self, conn: _Conn, body: bytes, sink: Sink) -> tuple[int, bytes]:
        done: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        conn._reset(sink, done)
        assert conn.transport is not None
        conn.transport.write(self._head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        reusable = False
        try:
            result = await done
            reusable = conn.keep_alive and conn.remaining == 0 and not conn.closed
            return result
        finally:
            got = conn.got_bytes
            conn._reset(None, None)
            conn.got_bytes = got
            if reusable:
                self._idle.append(conn)
            elif conn.transport is not None:
                conn.transport.close()  # failed, abandoned, cancelled or not keep-alive

    async def close(self) -> None:
        for conn in self._idle:
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()
