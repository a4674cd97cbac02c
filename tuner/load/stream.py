"""One streamed request: the per-request record and sending.

* :class:`Flight` — the stream sink of one request in flight: SSE payloads (parsed and classified
  by :mod:`tuner.load.sse`) become token times, the server's usage counts, or an error.
* :class:`RequestRecord` — one frozen record per request with raw ``time.perf_counter``
  stamps; TTFT, ITL, TPOT and E2E latency are properties, ``None`` (never 0.0) when not set.
* :func:`send_request` — sends one request and never raises: HTTP errors, timeouts, resets,
  malformed chunks and error objects in the stream all end up in ``RequestRecord.error``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from dataclasses import dataclass
from http import HTTPStatus

import aiohttp

from tuner.errors import ParameterError
from tuner.load.sse import SseParser, StreamError, classify
from tuner.load.transport import Transport, TransportError
from tuner.load.workload import Endpoint, Request

clock = time.perf_counter


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
        "usage",
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
        self.usage = False
        self.last: float | None = None

    def feed(self, data: bytes, now: float) -> bool:
        """Body bytes that arrived at ``now``; False (error set) on an error or malformed chunk."""
        self.last = now
        try:
            payloads = self.parser.feed(data)
        except StreamError as exc:
            self.error, self.end = str(exc), now
            return False
        for payload in payloads:
            ev = classify(payload)
            kind = ev.kind
            if kind == "token":
                if self.first is None:
                    self.first = now
                self.chunks.append(now)
            elif kind == "usage":
                self.usage = True
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
        and judge completeness: ``[DONE]`` came, after a token (when one was asked for) and the
        usage chunk (the payload asks for it: the server's token counts)."""
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
        elif not self.usage:
            self.error = "[DONE] before the usage chunk (no token counts from the server)"

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
            f.error, f.end = http_error(status, text), clock()
        else:
            f.finish(clock())
    except TimeoutError:
        f.error, f.end = f"timeout after {timeout_s:g}s", None
    except TransportError as exc:
        f.error = str(exc)
    except (aiohttp.ClientError, OSError, ValueError, RuntimeError) as exc:
        f.error = _describe(exc)
    except Exception as exc:  # a bug must cost this request, not the run
        f.error = f"client error: {_describe(exc)}"
    return f.record()


_MESSAGE = re.compile(r'"(?:message|detail)"\s*:\s*"((?:[^"\\]|\\.)*)')  # may be cut short


def http_error(status: int, body: bytes) -> str:
    """One line for a non-200 answer: the status and its standard phrase, then the server's
    message (a JSON error body's ``error.message``, ``message`` or ``detail``, else the body
    text), truncated: ``HTTP 401 Unauthorized: invalid key``."""
    try:
        head = f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        head = f"HTTP {status}"
    text = body.decode("utf-8", "replace")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, or cut short at the first KiB
        obj = None
        if cut := _MESSAGE.search(text):
            text = cut.group(1).replace('\\"', '"')
    if isinstance(obj, dict):
        err = obj.get("error")
        found = [err.get("message") if isinstance(err, dict) else err]
        found += [obj.get("message"), obj.get("detail")]
        text = next((m for m in found if isinstance(m, str) and m.strip()), text)
    msg = " ".join(text.split())
    return f"{head}: {msg[:200]}" if msg else head


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The request headers; ParameterError (one line, the key not shown) when the API key is
    not printable ASCII, the only text a bearer token is made of and a header carries as is."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        if not (api_key.isascii() and api_key.isprintable()):
            raise ParameterError(
                "the API key (--api-key or OPENAI_API_KEY) has characters an HTTP header "
                "cannot carry: non-ASCII or control characters"
            )
        headers["Authorization"] = f"Bearer {api_key}"
    return headers
