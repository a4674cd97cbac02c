"""A small fake OpenAI-compatible streaming server for unit tests (aiohttp.web, in-process).

It answers /v1/completions and /v1/chat/completions the way vLLM does (one SSE event per token,
a usage chunk when asked, ``data: [DONE]``), serves /health, /v1/models and a Prometheus
/metrics page, and misbehaves on request: HTTP errors, malformed chunks, error objects in the
stream, a dropped connection mid-stream, an answer that never comes, keep-alive comments,
events split across writes (also inside a UTF-8 character).

:class:`RawServer` is a bare TCP server for what no HTTP library would send (negative
``Content-Length``, interim 1xx replies, 70 KB of headers, a body cut mid-chunk): each request
gets scripted raw bytes (:class:`RawReply`).

    async with FakeServer(Behaviour(ttft_s=0.01, token_delay_s=0.002)) as srv:
        ... srv.url ...

``srv.behaviour`` may be replaced between requests; ``srv.stats`` counts requests, tokens and
the peak number of streams in flight.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Behaviour:
    """How the fake answers. ``*_at`` are token indices (0-based) where the fault happens."""

    ttft_s: float = 0.0
    token_delay_s: float = 0.0
    status: int = 200
    malformed_at: int | None = None
    error_at: int | None = None
    drop_at: int | None = None
    hang: bool = False
    keepalive: bool = False
    split_writes: bool = False
    send_usage: bool = True
    send_done: bool = True
    text: str = "é"  # two UTF-8 bytes, so split writes can cut a character


@dataclass
class Stats:
    requests: int = 0
    tokens: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    bodies: list[dict] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    prefix_queries: int = 0  # prompt tokens looked up in the fake prefix cache
    prefix_hits: int = 0  # ... and found there (whole 16-token blocks behind the same blocks)


METRICS_TEMPLATE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="fake"}} {running}
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="fake"}} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="fake"}} {kv}
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{{engine="0",model_name="fake"}} 0.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{{engine="0",model_name="fake"}} {tokens}
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{{engine="0",model_name="fake"}} {prefix_queries}
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{{engine="0",model_name="fake"}} {prefix_hits}
"""
PREFIX_BLOCK = 16  # tokens per block of the fake prefix cache


class FakeServer:
    """Async context manager running the fake on 127.0.0.1 (a free port) in the current loop."""

    def __init__(
        self, behaviour: Behaviour | None = None, model: str = "fake", prefix_caching: bool = True
    ) -> None:
        self.behaviour = behaviour or Behaviour()
        self.model = model
        self.prefix_caching = prefix_caching
        self._cached: set[int] = set()
        self.stats = Stats()
        self.url = ""
        self.metrics_status = 200
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> FakeServer:
        app = web.Application()
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_post("/v1/chat/completions", self._complete)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=0.2
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _health(self, _: web.Request) -> web.Response:
        return web.Response(text="")

    async def _models(self, _: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.model, "object": "model"}]}
        )

    async def _metrics(self, _: web.Request) -> web.Response:
        if self.metrics_status != 200:
            return web.Response(status=self.metrics_status, text="nope")
        text = METRICS_TEMPLATE.format(
            running=float(self.stats.in_flight),
            kv=min(1.0, self.stats.in_flight / 10),
            tokens=float(self.stats.tokens),
            prefix_queries=float(self.stats.prefix_queries),
            prefix_hits=float(self.stats.prefix_hits),
        )
        return web.Response(text=text, content_type="text/plain")

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        b = self.behaviour
        body = await request.json()
        st = self.stats
        st.requests += 1
        st.bodies.append(body)
        st.headers.append(dict(request.headers))
        if b.hang:
            await asyncio.sleep(3600)
        if b.status != 200:
            return web.json_response({"error": {"message": "fake failure"}}, status=b.status)
        chat = request.path.endswith("/chat/completions")
        n = body.get("max_completion_tokens" if chat else "max_tokens") or 16
        prompt = body.get("prompt", "")
        prompt_len = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
        self._look_up(prompt if isinstance(prompt, list) else _words(body, chat))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        st.in_flight += 1
        st.peak_in_flight = max(st.peak_in_flight, st.in_flight)
        try:
            return await self._stream(request, resp, body, chat, n, prompt_len)
        except ConnectionResetError:  # the client hung up (it saw a fault): not our problem
            return resp
        finally:
            st.in_flight -= 1

    def _look_up(self, tokens: list) -> None:
        """Count the prompt in the fake prefix cache (as vLLM's counters do, in tokens): full
        blocks found behind the same blocks are hits; every full block is cached afterwards."""
        st = self.stats
        st.prefix_queries += len(tokens)
        if not self.prefix_caching:
            return
        key, hit = 0, True
        for start in range(0, len(tokens) - PREFIX_BLOCK + 1, PREFIX_BLOCK):
            key = hash((key, tuple(tokens[start : start + PREFIX_BLOCK])))
            hit = hit and key in self._cached
            st.prefix_hits += PREFIX_BLOCK if hit else 0
            self._cached.add(key)

    async def _stream(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        body: dict,
        chat: bool,
        n: int,
        prompt_len: int,
    ) -> web.StreamResponse:
        b, st = self.behaviour, self.stats
        await asyncio.sleep(b.ttft_s)
        if chat:
            await self._send(resp, _chat_chunk({"role": "assistant", "content": ""}))
        for i in range(n):
            if i:
                await asyncio.sleep(b.token_delay_s)
            if b.keepalive:
                await resp.write(b": keep-alive\n\n")
            if i == b.drop_at:
                assert request.transport is not None
                request.transport.close()
                return resp
            if i == b.malformed_at:
                await resp.write(b'data: {"id": "x", "choices": [{"text": \n\n')
                continue
            if i == b.error_at:
                err = {"error": {"message": "engine died", "type": "InternalServerError"}}
                await self._send(resp, json.dumps(err))
                continue
            chunk = (
                _chat_chunk({"content": b.text})
                if chat
                else json.dumps(
                    {
                        "id": "cmpl-1",
                        "object": "text_completion",
                        "created": int(time.time()),
                        "model": self.model,
                        "choices": [
                            {"index": 0, "text": b.text, "logprobs": None, "finish_reason": None}
                        ],
                        "usage": None,
                    }
                )
            )
            await self._send(resp, chunk)
            st.tokens += 1
        want_usage = (body.get("stream_options") or {}).get("include_usage")
        if b.send_usage and want_usage:
            usage = {
                "prompt_tokens": prompt_len,
                "completion_tokens": n,
                "total_tokens": prompt_len + n,
            }
            await self._send(resp, json.dumps({"id": "cmpl-1", "choices": [], "usage": usage}))
        if b.send_done:
            await self._send(resp, "[DONE]")
        await resp.write_eof()
        return resp

    async def _send(self, resp: web.StreamResponse, payload: str) -> None:
        data = f"data: {payload}\n\n".encode()
        if not self.behaviour.split_writes:
            await resp.write(data)
            return
        # Cut inside the first multi-byte character and again inside the event terminator.
        cut = next((i + 1 for i, c in enumerate(data) if c >= 0x80), len(data) // 2)
        for part in (data[:cut], data[cut:-1], data[-1:]):
            await resp.write(part)
            await asyncio.sleep(0.0005)  # let each part leave as its own TCP segment


def _words(body: dict, chat: bool) -> list[str]:
    """A text prompt's words (a chat request's message contents), the fake's tokens."""
    if not chat:
        return str(body.get("prompt", "")).split()
    messages = body.get("messages") or []
    return [w for m in messages if isinstance(m, dict) for w in str(m.get("content", "")).split()]


def _chat_chunk(delta: dict[str, str]) -> str:
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "fake",
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
        }
    )


# --- a raw TCP server for replies no HTTP library would send ------------------------------------


@dataclass(frozen=True)
class RawReply:
    """Bytes to answer one request with, then what to do with the connection: ``keep`` it for
    the next request, ``close`` it, or ``hold`` it open (reading nothing) until the client
    hangs up, so that only the client's own parsing or its timeout can end the request."""

    data: bytes
    then: str = "keep"


def sse_events(*payloads: str) -> bytes:
    return b"".join(f"data: {p}\n\n".encode() for p in payloads)


def chunked_reply(body: bytes, head: bytes = b"HTTP/1.1 200 OK\r\n") -> bytes:
    """``head`` (a status line and any headers) then ``body`` as an event stream in chunked
    encoding, one chunk per event, ended properly."""
    events = [e + b"\n\n" for e in body.split(b"\n\n") if e]
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    framing = b"Content-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + framing + chunks


TOKEN_EVENT = '{"id":"c","choices":[{"index":0,"text":"a","finish_reason":null}]}'
USAGE_EVENT = '{"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}'
GOOD_STREAM = chunked_reply(sse_events(TOKEN_EVENT, TOKEN_EVENT, USAGE_EVENT, "[DONE]"))


class RawServer:
    """A bare HTTP/1.1 server on 127.0.0.1 (a free port; ``asyncio.start_server``) that answers
    each request with scripted raw bytes: ``replies`` in order, then ``default`` (a well-formed
    two-token stream) for every request after them. ``requests`` lists, per request served,
    the number of the connection it came on (0, 1, ...), so a test sees whether a later request
    reused a connection.

        async with RawServer(RawReply(b"HTTP/1.1 101 Upgrade\\r\\n\\r\\n", "hold")) as srv:
            ... srv.url ...
    """

    def __init__(self, *replies: RawReply, default: RawReply | None = None) -> None:
        self.replies = list(replies)
        self.default = default or RawReply(GOOD_STREAM)
        self.requests: list[int] = []
        self.url = ""
        self._connections = 0
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number, self._connections = self._connections, self._connections + 1
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                self.requests.append(number)
                reply = self.replies.pop(0) if self.replies else self.default
                writer.write(reply.data)
                await writer.drain()
                if reply.then == "close":
                    return
                if reply.then == "hold":
                    await reader.read()  # until the client hangs up
                    return
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return  # the client hung up
        except asyncio.CancelledError:
            return  # the server is closing; end quietly (asyncio logs a cancelled handler)
        finally:
            self._handlers.discard(task)
            writer.close()
