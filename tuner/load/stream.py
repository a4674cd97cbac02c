"""One streamed request: SSE parsing, event classification, the per-request record, sending.

* :class:`SseParser` turns raw bytes as they come off the socket into complete ``data`` payloads,
  whatever the read boundaries: UTF-8 characters split across reads, events split anywhere,
  ``\\n``, ``\\r\\n`` or ``\\r`` line ends, comment (keep-alive) lines, multi-line ``data`` fields.
* :func:`classify` turns one payload into what the client acts on: a token chunk, the usage
  chunk, ``[DONE]``, an error object sent inside the stream, or a malformed chunk.
* :class:`RequestRecord` — one frozen record per request with raw ``time.perf_counter``
  stamps; TTFT, ITL, TPOT and E2E latency are properties, ``None`` (never 0.0) when not set.
* :func:`send_request` — sends one request and never raises: HTTP errors, timeouts, resets,
  malformed chunks and error objects in the stream all end up in ``RequestRecord.error``.

The parser and classifier are pure (no I/O, no clock) and tested on their own.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass
from typing import Literal

import aiohttp

from tuner.errors import ParameterError
from tuner.load.transport import Transport, TransportError
from tuner.load.workload import Endpoint, Request

clock = time.perf_counter


class SseParser:
    """Incremental SSE parser: ``feed(bytes) -> [data, ...]``, ``close() -> [data, ...]``.

    Buffers bytes and decodes only complete events; a newline byte never occurs inside a UTF-8
    multi-byte sequence, so splitting on it first makes split characters a non-issue.
    Undecodable bytes are replaced (U+FFFD) so the JSON step reports them, not this one.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[str]:
        if (  # fast path: exactly one one-line event, as vLLM sends each token
            not self._buf
            and data[:6] == b"data: "
            and data.find(b"\n") == len(data) - 2
            and data[-1:] == b"\n"
            and b"\r" not in data
        ):
            return [data[6:-2].decode("utf-8", "replace")]
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            # Normalise CRLF / CR line ends; a trailing CR may be half of a CRLF: keep it back.
            hold = buf.endswith(b"\r")
            if hold:
                buf = buf[:-1]
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if hold:
                buf += b"\r"
        if b"\n\n" not in buf:
            self._buf = buf
            return []
        *events, self._buf = buf.split(b"\n\n")
        out = []
        for raw in events:
            payload = _data_of(raw)
            if payload is not None:
                out.append(payload)
        return out

    def close(self) -> list[str]:
        """Flush an event the server did not terminate with a blank line (the stream ended)."""
        raw, self._buf = self._buf.rstrip(b"\r\n"), b""
        payload = _data_of(raw) if raw else None
        return [] if payload is None else [payload]


def _data_of(raw: bytes) -> str | None:
    """The ``data`` of one event (lines joined by ``\\n``), or None for comment-only events."""
    if raw.startswith(b"data: ") and b"\n" not in raw:  # the common case, one line
        return raw[6:].decode("utf-8", "replace")
    lines = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
        # ':' comments (keep-alives), event:, id:, retry: and blank lines carry no data.
    if not lines:
        return None
    return b"\n".join(lines).decode("utf-8", "replace")


Kind = Literal["token", "usage", "done", "error", "malformed", "other"]


@dataclass(frozen=True, slots=True)
class Event:
    """One classified payload. ``tokens`` is set for usage chunks (completion_tokens),
    ``prompt_tokens`` where the server reports it, ``message`` for errors and malformed data."""

    kind: Kind
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    message: str | None = None


DONE = Event("done")
TOKEN = Event("token")
OTHER = Event("other")


def classify(payload: str) -> Event:
    """Classify one ``data`` payload of a /v1/completions or /v1/chat/completions stream.

    A chunk with choices is a token chunk, except a chat chunk that only announces the role
    (no content yet). A chunk that also carries usage (``continuous_usage_stats``) is a token
    chunk; the final usage chunk has no choices.
    """
    # Fast path for the bulk of a stream, a compact token chunk ('{"id":..,"choices":[{..}]..}'),
    # recognised without a full JSON parse: one object (braces at both ends), a non-empty choices
    # list, no role-only delta, no error. Quotes inside JSON strings are escaped, so these
    # substrings cannot come from generated text. Anything else takes the strict path below.
    if (
        payload[-1:] == "}"
        and payload[:1] == "{"
        and '"choices":[{' in payload
        and '"role"' not in payload
        and '"error"' not in payload
    ):
        return TOKEN
    if payload == "[DONE]":
        return DONE
    try:
        obj = json.loads(payload)
    except ValueError:
        return Event("malformed", message=f"malformed stream chunk: {payload[:80]!r}")
    if not isinstance(obj, dict):
        return Event("malformed", message=f"malformed stream chunk: {payload[:80]!r}")
    choices = obj.get("choices")
    if choices:
        delta = choices[0].get("delta") if isinstance(choices[0], dict) else None
        if isinstance(delta, dict) and "role" in delta and not delta.get("content"):
            return OTHER
        return TOKEN
    if obj.get("error"):
        err = obj["error"]
        msg = err.get("message", err) if isinstance(err, dict) else err
        return Event("error", message=f"error in stream: {str(msg)[:200]}")
    usage = obj.get("usage")
    if isinstance(usage, dict):
        ct, pt = usage.get("completion_tokens"), usage.get("prompt_tokens")
        return Event(
            "usage",
            completion_tokens=ct if isinstance(ct, int) else None,
            prompt_tokens=pt if isinstance(pt, int) else None,
        )
    if "object" in obj and obj.get("object") == "error":
        return Event("error", message=f"error in stream: {str(obj.get('message'))[:200]}")
    return OTHER


# --- the record of one request ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What happened to one request. Times are raw ``perf_counter`` seconds.

    ``chunk_times`` holds the arrival of every token chunk (the first one included);
    ``output_tokens`` comes from the server's usage chunk (None if it sent none).
    A record with ``error`` set is a failed request; its timestamps are kept as far as it got.
    """

    index: int
    start: float
    end: float | None
    first_token: float | None
    chunk_times: tuple[float, ...]
    prompt_len: int
    output_tokens: int | None
    expected_output_len: int
    error: str | None
    due: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def num_output(self) -> int:
        """Output tokens: the server's count, else the number of token chunks seen."""
        return self.output_tokens if self.output_tokens is not None else len(self.chunk_times)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def e2el(self) -> float | None:
        return None if self.end is None else self.end - self.start

    @property
    def itl(self) -> tuple[float, ...]:
        t = self.chunk_times
        return tuple(b - a for a, b in itertools.pairwise(t))

    @property
    def tpot(self) -> float | None:
        """(E2E − TTFT) / (output tokens − 1); None with fewer than two tokens."""
        n, e2el, ttft = self.num_output, self.e2el, self.ttft
        if n < 2 or e2el is None or ttft is None:
            return None
        return (e2el - ttft) / (n - 1)

    @property
    def queue_delay(self) -> float | None:
        """How late the client sent it against its schedule (client overload shows here)."""
        return None if self.due is None else self.start - self.due


# --- one request ------------------------------------------------------------------------------


def build_payload(
    request: Request, model: str, endpoint: Endpoint, ignore_eos: bool = True
) -> bytes:
    """The JSON body: exact output length via max_tokens = min_tokens = output_len + ignore_eos,
    and ``stream_options.include_usage`` so the server reports its token counts."""
    body: dict[str, object] = {"model": model}
    n = request.output_len
    if endpoint == "completions":
        prompt = request.prompt
        body["prompt"] = list(prompt) if isinstance(prompt, tuple) else prompt
        body["max_tokens"] = n
    else:
        if not isinstance(request.prompt, str):
            raise ParameterError("chat requests need text prompts (build with endpoint='chat')")
        body["messages"] = [{"role": "user", "content": request.prompt}]
        body["max_completion_tokens"] = n
    if ignore_eos:
        body.update(min_tokens=n, ignore_eos=True)
    body.update(stream=True, stream_options={"include_usage": True})
    return json.dumps(body, separators=(",", ":")).encode()


def endpoint_url(base_url: str, endpoint: Endpoint) -> str:
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    return base_url.rstrip("/") + path


class Flight:
    """The mutable state of one request in flight: the stream sink (:meth:`feed`) and
    ``record()``, which freezes it (also when the request was cancelled half-way)."""

    __slots__ = (
        "chunks",
        "done",
        "due",
        "end",
        "error",
        "first",
        "index",
        "last",
        "out",
        "parser",
        "prompt_len",
        "request",
        "start",
    )

    def __init__(self, index: int, request: Request, due: float | None) -> None:
        self.index, self.request, self.due = index, request, due
        self.start = clock()
        self.first: float | None = None
        self.end: float | None = None
        self.chunks: list[float] = []
        self.out: int | None = None
        self.prompt_len = request.prompt_len
        self.error: str | None = None
        self.parser = SseParser()
        self.done = False
        self.last: float | None = None

    def feed(self, data: bytes, now: float) -> bool:
        """Body bytes that arrived at ``now``; False (error set) on an error or malformed chunk."""
        self.last = now
        for payload in self.parser.feed(data):
            ev = classify(payload)
            kind = ev.kind
            if kind == "token":
                if self.first is None:
                    self.first = now
                self.chunks.append(now)
            elif kind == "usage":
                self.out = ev.completion_tokens
                if ev.prompt_tokens is not None:
                    self.prompt_len = ev.prompt_tokens
            elif kind == "done":
                self.done = True
            elif kind in ("error", "malformed"):
                self.error, self.end = ev.message, now
                return False
        return True

    def finish(self, now: float) -> None:
        """The body ended (its last bytes came at ``self.last``, else ``now``): flush the parser
        and judge completeness."""
        if self.error is not None:
            return
        for payload in self.parser.close():
            if classify(payload).kind == "done":
                self.done = True
        self.end = self.last if self.last is not None else now
        if not self.done:
            self.error = "stream ended before [DONE]"
        elif self.first is None and self.request.output_len > 0:
            self.error = "stream finished without a token"

    def record(self, error: str | None = None) -> RequestRecord:
        return RequestRecord(
            index=self.index,
            start=self.start,
            end=self.end,
            first_token=self.first,
            chunk_times=tuple(self.chunks),
            prompt_len=self.prompt_len,
            output_tokens=self.out,
            expected_output_len=self.request.output_len,
            error=error or self.error,
            due=self.due,
        )


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


async def send_request(
    transport: Transport,
    body: bytes,
    request: Request,
    *,
    index: int = 0,
    timeout_s: float = 300.0,
    due: float | None = None,
    flight: Flight | None = None,
) -> RequestRecord:
    """Send one streaming request; never raises (except cancellation, see :func:`run_load`)."""
    f = flight or Flight(index, request, due)
    f.start = clock()
    try:
        async with asyncio.timeout(timeout_s):
            status, text = await transport.post_stream(body, f)
        if status != 200:
            msg = " ".join(text.decode("utf-8", "replace").split())[:200]
            f.error, f.end = f"HTTP {status}: {msg}", clock()
        else:
            f.finish(clock())
    except TimeoutError:
        f.error, f.end = f"timeout after {timeout_s:g}s", None
    except TransportError as exc:
        f.error = str(exc)
    except (aiohttp.ClientError, OSError, ValueError, RuntimeError) as exc:
        f.error = _describe(exc)
    return f.record()


def auth_headers(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers
