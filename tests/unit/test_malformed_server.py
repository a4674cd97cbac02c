"""The load client against a malformed server (a raw TCP server playing scripted bytes): every
bad reply fails its request with a named error within the timeout, never hangs or raises, and
the next well-formed request, on a fresh connection, succeeds. Also: an API key no header can
carry fails before any request is sent."""

from __future__ import annotations

import json
import time

import pytest

from tests.fakes import (
    GOOD_STREAM,
    TOKEN_EVENT,
    USAGE_EVENT,
    RawReply,
    RawServer,
    chunked_reply,
    sse_events,
)
from tuner.errors import ParameterError
from tuner.load import generator as load
from tuner.load.generator import LoadConfig, run_load
from tuner.load.stream import auth_headers, http_error
from tuner.load.transport import AiohttpTransport, Http11Pool
from tuner.load.workload import Request

TIMEOUT = 2.0
REQUESTS = [Request((1, 2, 3), 3, 2)] * 2


def _json_reply(status: str, body: object) -> bytes:
    data = json.dumps(body).encode()
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode() + data


PADDING = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 1000) for i in range(70))  # 70 KB
EVENTS = sse_events(TOKEN_EVENT, USAGE_EVENT, "[DONE]")

# (id, the first request's reply, what its error must contain (None: it succeeds)). A reply the
# server "keep"s is complete HTTP, so the client may reuse its connection; after the others
# ("hold": the connection stays open, silent; "close") the next request must use a new one.
CASES = [
    (
        "negative-content-length",
        RawReply(b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n" + EVENTS, "hold"),
        "invalid Content-Length b'-5'",
    ),
    (
        "conflicting-content-length",
        RawReply(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", "hold"),
        "conflicting Content-Length headers",
    ),
    (
        "bad-status-line",
        RawReply(b"HTTP/1.1 OK\r\nContent-Length: 0\r\n\r\n", "hold"),
        "malformed HTTP response head",
    ),
    (
        "done-without-the-usage-chunk",
        RawReply(chunked_reply(sse_events(TOKEN_EVENT, TOKEN_EVENT, "[DONE]")), "keep"),
        "[DONE] before the usage chunk",
    ),
    (
        "done-alone",
        RawReply(chunked_reply(sse_events("[DONE]")), "keep"),
        "stream finished without a token",
    ),
    (
        "choices-an-object",
        RawReply(chunked_reply(sse_events('{"choices": {}}', USAGE_EVENT, "[DONE]")), "keep"),
        "malformed stream chunk (choices is not a list)",
    ),
    (
        "choices-a-string",
        RawReply(chunked_reply(sse_events('{"choices": "abc"}', "[DONE]")), "keep"),
        "malformed stream chunk (choices is not a list)",
    ),
    (
        "choices-of-numbers",
        RawReply(chunked_reply(sse_events('{"choices": [1]}', "[DONE]")), "keep"),
        "malformed stream chunk (a choice is not an object)",
    ),
    (
        "json-nested-too-deep",
        RawReply(chunked_reply(sse_events("[" * 100_000, "[DONE]")), "keep"),
        "malformed stream chunk",
    ),
    (
        "an-event-that-never-ends",
        RawReply(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
            % (5 * 2**20 + 6, b"data: " + b"x" * (5 * 2**20)),
            "keep",
        ),
        "stream event over 4096 KiB without an end",
    ),
    (
        "100-continue-then-the-answer",
        RawReply(b"HTTP/1.1 100 Continue\r\n\r\n" + GOOD_STREAM),
        None,
    ),
    (
        "103-early-hints-then-the-answer",
        RawReply(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + GOOD_STREAM),
        None,
    ),
    (
        "lone-101",
        RawReply(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", "hold"),
        "unexpected HTTP 101 Switching Protocols",
    ),
    (
        "lone-103-then-close",
        RawReply(b"HTTP/1.1 103 Early Hints\r\n\r\n", "close"),
        "connection closed before the response ended (after an interim HTTP 103)",
    ),
    (
        "70-kb-of-headers",
        RawReply(chunked_reply(EVENTS, b"HTTP/1.1 200 OK\r\n" + PADDING), "hold"),
        "response headers too large (over 64 KiB)",
    ),
    (
        "70-kb-of-headers-never-ending",
        RawReply(b"HTTP/1.1 200 OK\r\n" + PADDING, "hold"),
        "response headers too large (over 64 KiB)",
    ),
    (
        "closed-mid-chunk",
        RawReply(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"%x\r\n%s\r\n" % (len(EVENTS), EVENTS) + b"1f4\r\ndata: {",
            "close",
        ),
        "connection closed before the response ended",
    ),
    (
        "204-no-content",
        RawReply(b"HTTP/1.1 204 No Content\r\n\r\n", "keep"),
        "HTTP 204 No Content",
    ),
    (
        "401-openai-error",
        RawReply(_json_reply("401 Unauthorized", {"error": {"message": "invalid API key"}})),
        "HTTP 401 Unauthorized: invalid API key",
    ),
    (
        "404-vllm-error",
        RawReply(
            _json_reply(
                "404 Not Found",
                {"object": "error", "message": "The model `x` does not exist.", "code": 404},
            )
        ),
        "HTTP 404 Not Found: The model `x` does not exist.",
    ),
    (
        "500-long-json-error",
        RawReply(_json_reply("500 Internal Server Error", {"error": {"message": "boom " * 300}})),
        "HTTP 500 Internal Server Error: boom boom",
    ),
    (
        "500-text-body-closed",
        RawReply(b"HTTP/1.1 500 Internal Server Error\r\n\r\nengine\r\n  died", "close"),
        "HTTP 500 Internal Server Error: engine died",
    ),
]


@pytest.mark.parametrize(("reply", "expect"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_malformed_reply_fails_one_request_by_name(reply: RawReply, expect: str | None):
    async with RawServer(reply) as srv:
        t0 = time.perf_counter()
        res = await run_load(srv.url, "m", REQUESTS, LoadConfig(timeout_s=TIMEOUT, concurrency=1))
        took = time.perf_counter() - t0
        connections = list(srv.requests)
    first, second = res.records
    assert second.ok, second.error  # the run goes on, and the next request is served
    assert second.output_tokens == 2 and len(second.chunk_times) == 2
    if expect is None:
        assert first.ok, first.error
        return
    assert first.error is not None and expect in first.error, first.error
    assert "\n" not in first.error and len(first.error) <= 300
    assert took < TIMEOUT, took  # named from the bytes themselves, not by the timeout
    if reply.then != "keep":  # a connection left in an unknown state is never reused
        assert connections == [0, 1]


async def test_lone_103_held_open_ends_at_the_timeout():
    async with RawServer(RawReply(b"HTTP/1.1 103 Early Hints\r\n\r\n", "hold")) as srv:
        t0 = time.perf_counter()
        res = await run_load(srv.url, "m", REQUESTS, LoadConfig(timeout_s=0.4, concurrency=1))
        took = time.perf_counter() - t0
    assert [r.error for r in res.records] == ["timeout after 0.4s", None]
    assert took < 0.4 + 1.5 and srv.requests == [0, 1]


# aiohttp reads 70 KB of headers (it bounds each line, not the head) and reuses the connection
# after a 101 without a body, so for it those replies leave the connection able to serve more.
AIOHTTP_READS = {"70-kb-of-headers"}
AIOHTTP_REUSES = {"70-kb-of-headers", "lone-101"}


@pytest.mark.parametrize(("case", "reply", "expect"), CASES, ids=[c[0] for c in CASES])
async def test_aiohttp_transport_survives_the_same_replies(
    case: str, reply: RawReply, expect: str | None, monkeypatch: pytest.MonkeyPatch
):
    """The https:// transport words errors its own way; it too never hangs past the timeout,
    never raises, and serves the next request."""
    monkeypatch.setattr(
        load, "make_transport", lambda url, headers, limit=None: AiohttpTransport(url, headers)
    )
    if case in AIOHTTP_REUSES:
        reply = RawReply(reply.data, "keep")
    timeout = 0.5
    async with RawServer(reply) as srv:
        t0 = time.perf_counter()
        res = await run_load(srv.url, "m", REQUESTS, LoadConfig(timeout_s=timeout, concurrency=1))
        took = time.perf_counter() - t0
    first, second = res.records
    assert second.ok, second.error
    assert (first.error is None) == (expect is None or case in AIOHTTP_READS), first.error
    assert took < 2 * timeout + 1.5


def test_http_error_names_the_status_and_the_message():
    assert http_error(401, b"") == "HTTP 401 Unauthorized"
    assert http_error(599, b"odd") == "HTTP 599: odd"
    assert http_error(422, b'{"detail": "Unprocessable"}') == (
        "HTTP 422 Unprocessable Entity: Unprocessable"
    )
    assert http_error(500, b'{"error": "plain"}') == "HTTP 500 Internal Server Error: plain"
    truncated = http_error(500, b'{"error": {"message": "' + b"x" * 2000)
    assert truncated == "HTTP 500 Internal Server Error: " + "x" * 200  # cut short, still read
    assert (
        http_error(502, b"<html>\n<b>Bad</b>\n</html>")
        == "HTTP 502 Bad Gateway: <html> <b>Bad</b> </html>"
    )


# --- the API key ----------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["ключ", "sk-é", "sk-1\r\nX-Evil: 1", "sk\t1"])
def test_an_api_key_no_header_can_carry_is_one_line_before_any_request(key: str):
    with pytest.raises(ParameterError) as info:
        LoadConfig(api_key=key)
    message = str(info.value)
    assert "API key" in message and "\n" not in message and key not in message
    with pytest.raises(ParameterError):
        auth_headers(key)


async def test_run_load_sends_nothing_with_a_bad_key_and_the_pool_refuses_one_too():
    async with RawServer() as srv:
        with pytest.raises(ParameterError):
            await run_load(srv.url, "m", REQUESTS, LoadConfig(api_key="ключ"))
        assert srv.requests == []
    with pytest.raises(ParameterError, match="Authorization"):
        Http11Pool("http://h:1/v1/completions", {"Authorization": "Bearer ключ"})
    assert auth_headers("sk-ok_1.2")["Authorization"] == "Bearer sk-ok_1.2"
