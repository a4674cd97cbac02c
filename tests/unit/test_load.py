"""The streaming client: SSE parsing, record math, arrivals, and faults against the fake server."""

from __future__ import annotations

import asyncio
import json
import math
import time

import numpy as np
import pytest

from tests.fakes import Behaviour, FakeServer
from tuner.errors import ParameterError
from tuner.load.generator import (
    LoadConfig,
    RequestRecord,
    Window,
    arrivals,
    build_payload,
    interarrival_gaps,
    run_load,
)
from tuner.load.sse import SseParser, classify
from tuner.load.transport import (
    AiohttpTransport,
    Http11Pool,
    TransportError,
    _Conn,
    make_transport,
)
from tuner.load.workload import Request

# --- SSE parser -------------------------------------------------------------------------------

STREAM = (
    'data: {"choices":[{"text":"h\u00e9"}]}\n\n'
    ": keep-alive\n\n"
    'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
    "data: [DONE]\n\n"
).encode()


def _feed_all(parts: list[bytes]) -> list[str]:
    p = SseParser()
    out = [m for part in parts for m in p.feed(part)]
    return out + p.close()


def test_sse_whole_stream_in_one_read():
    msgs = _feed_all([STREAM])
    assert msgs == [
        '{"choices":[{"text":"hé"}]}',
        '{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}',
        "[DONE]",
    ]


def test_sse_byte_by_byte_splits_utf8_and_terminators():
    parts = [STREAM[i : i + 1] for i in range(len(STREAM))]
    assert _feed_all(parts) == _feed_all([STREAM])


def test_sse_crlf_and_cr_line_ends_even_split_between_reads():
    crlf = STREAM.replace(b"\n", b"\r\n")
    assert _feed_all([crlf]) == _feed_all([STREAM])
    # a CRLF pair split across two reads must not count as two line ends
    parts = [crlf[i : i + 7] for i in range(0, len(crlf), 7)]
    assert _feed_all(parts) == _feed_all([STREAM])
    assert _feed_all([STREAM.replace(b"\n", b"\r")]) == _feed_all([STREAM])


def test_sse_multiline_data_comments_and_other_fields():
    raw = b"event: x\nid: 1\ndata: a\ndata:b\n: comment\n\n: only a comment\n\nretry: 5\n\n"
    assert _feed_all([raw]) == ["a\nb"]


def test_sse_unterminated_last_event_is_flushed_on_close():
    p = SseParser()
    assert p.feed(b"data: [DONE]") == []
    assert p.close() == ["[DONE]"]
    assert p.close() == []


def test_classify_kinds():
    assert classify("[DONE]").kind == "done"
    assert classify('{"choices":[{"text":""}]}').kind == "token"  # empty text still a token
    usage = classify('{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":5}}')
    assert (usage.kind, usage.completion_tokens, usage.prompt_tokens) == ("usage", 5, 7)
    role = classify('{"choices":[{"delta":{"role":"assistant","content":""}}]}')
    assert role.kind == "other"
    assert classify('{"choices":[{"delta":{"content":"x"}}]}').kind == "token"
    err = classify('{"error":{"message":"boom","type":"x"}}')
    assert err.kind == "error" and "boom" in (err.message or "")
    assert classify('{"object":"error","message":"bad"}').kind == "error"
    assert classify('{"choices": [{"text": ').kind == "malformed"
    assert classify("[1, 2]").kind == "malformed"
    assert classify('{"id":"x","choices":[]}').kind == "other"


def test_classify_fast_path_agrees_with_a_full_parse():
    # vLLM's compact token chunks skip json.loads; tricky texts must still classify right.
    for text in ['"role"', '\\"choices\\":[{', "}", '{"error": 1}', "", "\u00e9\n"]:
        chunk = json.dumps(
            {"id": "c", "choices": [{"index": 0, "text": text}]}, separators=(",", ":")
        )
        assert classify(chunk).kind == "token", chunk
        chat = json.dumps({"choices": [{"delta": {"content": text}}]}, separators=(",", ":"))
        assert classify(chat).kind == "token", chat
        role = json.dumps({"choices": [{"delta": {"role": "assistant", "content": text}}]})
        assert classify(role).kind == ("token" if text else "other"), role
    truncated = '{"id":"c","choices":[{"index":0,"text":"x"}]'
    assert classify(truncated).kind == "malformed"
    assert classify('{"choices":[{"text":"x"}],"error":{"message":"m"}}').kind == "token"


def test_classify_never_raises_on_odd_shapes():
    for payload, why in [
        ('{"choices": {}}', "choices is not a list"),
        ('{"choices": {"a": 1}}', "choices is not a list"),
        ('{"choices": "abc"}', "choices is not a list"),
        ('{"choices": [1]}', "a choice is not an object"),
        ('{"choices": [null]}', "a choice is not an object"),
        ("[" * 100_000, ""),
        ('"just a string"', ""),
    ]:
        ev = classify(payload)
        assert ev.kind == "malformed", payload[:40]
        assert (ev.message or "").startswith(f"malformed stream chunk ({why})" if why else "malf")
    assert classify('{"choices": null, "usage": {"completion_tokens": 2}}').kind == "usage"


def test_sse_event_that_never_ends_is_refused_not_buffered():
    from tuner.load.sse import MAX_EVENT, StreamError

    p = SseParser()
    piece = b"data: " + b"x" * (MAX_EVENT // 4)
    for _ in range(3):  # 3/4 of the limit: kept
        assert p.feed(piece) == []
    with pytest.raises(StreamError, match="without an end"):
        p.feed(piece)
    assert p.feed(b"data: ok\n\n") == ["ok"]  # the buffer was dropped


# --- record math ------------------------------------------------------------------------------


def _record(**kw: object) -> RequestRecord:
    base: dict[str, object] = dict(
        index=0,
        start=10.0,
        end=10.5,
        first_token=10.1,
        chunk_times=(10.1, 10.2, 10.35, 10.5),
        prompt_len=8,
        output_tokens=4,
        expected_output_len=4,
        error=None,
    )
    base.update(kw)
    return RequestRecord(**base)  # type: ignore[arg-type]


def test_record_ttft_itl_tpot_e2el():
    r = _record()
    assert r.ttft == pytest.approx(0.1)
    assert r.e2el == pytest.approx(0.5)
    assert r.itl == pytest.approx((0.1, 0.15, 0.15))
    assert r.tpot == pytest.approx((0.5 - 0.1) / 3)
    assert r.ok


def test_record_unset_values_are_none_not_zero():
    r = _record(end=None, first_token=None, chunk_times=(), output_tokens=None, error="x")
    assert r.ttft is None and r.e2el is None and r.tpot is None and r.itl == ()
    assert not r.ok
    one = _record(chunk_times=(10.1,), output_tokens=1)
    assert one.tpot is None  # needs two tokens


def test_record_output_count_falls_back_to_chunks_without_usage():
    r = _record(output_tokens=None)
    assert r.num_output == 4


# --- arrivals ---------------------------------------------------------------------------------


def _gaps(rate: float, burstiness: float, n: int, seed: int = 1) -> np.ndarray:
    it = interarrival_gaps(rate, burstiness, np.random.default_rng(seed))
    return np.array([next(it) for _ in range(n)])


def test_poisson_mean_rate_within_tolerance():
    gaps = _gaps(20.0, 1.0, 20000)
    assert 1 / gaps.mean() == pytest.approx(20.0, rel=0.03)
    # exponential: coefficient of variation 1
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)


def test_gamma_variance_grows_as_burstiness_falls():
    cvs = [(_gaps(10.0, b, 20000).std() / (1 / 10.0)) for b in (4.0, 1.0, 0.25)]
    assert cvs[0] < cvs[1] < cvs[2]
    assert cvs[0] == pytest.approx(1 / math.sqrt(4.0), rel=0.08)  # CV = 1/sqrt(shape)
    for b in (4.0, 0.25):
        assert 1 / _gaps(10.0, b, 20000).mean() == pytest.approx(10.0, rel=0.05)


def test_constant_and_infinite_rate():
    assert set(_gaps(4.0, math.inf, 10)) == {0.25}
    assert set(_gaps(math.inf, 1.0, 10)) == {0.0}


def test_gaps_are_reproducible_with_a_seed():
    assert np.array_equal(_gaps(5.0, 0.5, 100, seed=3), _gaps(5.0, 0.5, 100, seed=3))
    assert not np.array_equal(_gaps(5.0, 0.5, 100, seed=3), _gaps(5.0, 0.5, 100, seed=4))


async def test_arrivals_yield_on_schedule_and_stop_at_until():
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    got = [(r, due) async for r, due in arrivals(range(5), 50.0, math.inf, rng)]
    assert [r for r, _ in got] == [0, 1, 2, 3, 4]
    dues = np.array([d for _, d in got])
    assert np.allclose(np.diff(dues), 0.02)
    assert time.perf_counter() - t0 >= 0.08 - 1e-3
    got = [
        r
        async for r, _ in arrivals(
            range(100), 50.0, math.inf, rng, until=time.perf_counter() + 0.05
        )
    ]
    assert 2 <= len(got) <= 3


# --- payloads ---------------------------------------------------------------------------------


def test_payload_exact_lengths_and_usage():
    body = json.loads(build_payload(Request((5, 6, 7), 3, 9), "m", "completions"))
    assert body["prompt"] == [5, 6, 7]
    assert body["max_tokens"] == body["min_tokens"] == 9
    assert body["ignore_eos"] is True and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    chat = json.loads(build_payload(Request("hi there", 2, 4), "m", "chat"))
    assert chat["messages"] == [{"role": "user", "content": "hi there"}]
    assert chat["max_completion_tokens"] == chat["min_tokens"] == 4
    with pytest.raises(ParameterError):
        build_payload(Request((1, 2), 2, 4), "m", "chat")


def test_load_config_rejects_bad_values():
    for bad in (
        dict(rate=-1.0),
        dict(rate=0.0),
        dict(burstiness=0.0),
        dict(concurrency=0),
        dict(num_requests=0),
        dict(duration_s=-1.0),
        dict(warmup=-1),
        dict(timeout_s=0.0),
        dict(duration_s=1.0),
    ):
        with pytest.raises(ParameterError):
            LoadConfig(**bad)  # type: ignore[arg-type]
    assert "key" not in repr(LoadConfig(api_key="sk-secret-key"))
    assert "sk-secret" not in repr(LoadConfig(api_key="sk-secret-key"))


# --- against the fake server ------------------------------------------------------------------


def _reqs(n: int, out: int = 8) -> list[Request]:
    return [Request(tuple(range(i % 5 + 3)), i % 5 + 3, out) for i in range(n)]


async def test_records_have_timings_and_usage_counts():
    async with FakeServer(Behaviour(ttft_s=0.02, token_delay_s=0.005)) as srv:
        res = await run_load(srv.url, "fake", _reqs(3, out=6), LoadConfig())
    assert res.stopped == "count"
    for r in res.records:
        assert r.ok, r.error
        assert r.output_tokens == 6 and len(r.chunk_times) == 6
        assert r.ttft is not None and 0.02 <= r.ttft < 2.0  # upper bounds allow a busy box
        assert r.tpot is not None and 0.004 <= r.tpot < 0.5
        assert r.prompt_len == r.index % 5 + 3
    assert srv.stats.bodies[0]["ignore_eos"] is True


async def test_split_writes_keepalives_and_chat_endpoint():
    beh = Behaviour(token_delay_s=0.001, split_writes=True, keepalive=True)
    async with FakeServer(beh) as srv:
        res = await run_load(
            srv.url, "fake", [Request("a b c", 3, 5)] * 2, LoadConfig(endpoint="chat")
        )
    for r in res.records:
        assert r.ok, r.error
        assert len(r.chunk_times) == 5  # the role chunk is not a token
        assert r.output_tokens == 5


async def test_concurrency_is_never_exceeded():
    async with FakeServer(Behaviour(ttft_s=0.005, token_delay_s=0.002)) as srv:
        res = await run_load(srv.url, "fake", _reqs(40), LoadConfig(concurrency=3))
    assert srv.stats.peak_in_flight == 3
    events = sorted([(r.start, 1) for r in res.records] + [(r.end, -1) for r in res.records])
    assert max(np.cumsum([d for _, d in events])) <= 3
    assert all(r.ok for r in res.records)


async def test_warmup_is_sent_first_and_excluded_from_the_window():
    async with FakeServer(Behaviour(token_delay_s=0.001)) as srv:
        res = await run_load(srv.url, "fake", _reqs(12), LoadConfig(warmup=2, concurrency=4))
    assert len(res.records) == 12
    warm = [r for r in res.records if r not in res.window]
    assert sorted(r.index for r in warm) == [0, 1]
    assert all(r.end is not None and r.end <= res.window.start for r in warm)
    assert len(res.measured) == 10 and {r.index for r in res.measured} == set(range(2, 12))


async def test_gc_is_frozen_only_while_measuring():
    import gc

    frozen: list[int] = []

    class Watch:
        def started(self) -> None:
            frozen.append(gc.get_freeze_count())

        def observe(self, record: object) -> None:
            pass

    before = gc.get_freeze_count()
    async with FakeServer(Behaviour(token_delay_s=0.001)) as srv:
        res = await run_load(srv.url, "fake", _reqs(6), LoadConfig(warmup=1), observer=Watch())
    assert all(r.ok for r in res.records)
    # Everything alive at the start (the request pool among it) is out of the collector's
    # way during the window, and given back afterwards.
    assert len(frozen) == 5 and min(frozen) > before
    assert gc.get_freeze_count() == before


async def test_num_requests_cycles_the_set():
    async with FakeServer() as srv:
        res = await run_load(srv.url, "fake", _reqs(3), LoadConfig(num_requests=7))
    assert [r.index for r in res.records] == [0, 1, 2, 0, 1, 2, 0]


async def test_duration_stop():
    async with FakeServer(Behaviour(token_delay_s=0.001)) as srv:
        t0 = time.perf_counter()
        res = await run_load(
            srv.url,
            "fake",
            _reqs(5, out=4),
            LoadConfig(rate=100.0, duration_s=0.4, burstiness=math.inf),
        )
        took = time.perf_counter() - t0
    assert res.stopped == "duration"
    assert 0.37 <= took < 3.0
    assert 35 <= len(res.records) <= 45  # 100/s for 0.4 s, the set cycled
    assert all(r.start < res.window.start + 0.4 for r in res.records)


async def test_per_request_timeout_is_honoured():
    async with FakeServer(Behaviour(hang=True)) as srv:
        t0 = time.perf_counter()
        res = await run_load(srv.url, "fake", _reqs(4), LoadConfig(timeout_s=0.3, concurrency=2))
        took = time.perf_counter() - t0
    assert took < 3.0  # two waves of 0.3 s, not the server's hour
    assert [r.error for r in res.records] == ["timeout after 0.3s"] * 4
    assert all(r.end is None and r.ttft is None for r in res.records)


async def test_slow_stream_times_out_mid_stream_keeping_what_it_got():
    async with FakeServer(Behaviour(token_delay_s=0.1)) as srv:
        res = await run_load(srv.url, "fake", _reqs(1, out=50), LoadConfig(timeout_s=0.35))
    (r,) = res.records
    assert r.error == "timeout after 0.35s"
    assert 2 <= len(r.chunk_times) <= 5 and r.ttft is not None


@pytest.mark.parametrize(
    ("behaviour", "expect"),
    [
        (Behaviour(status=500), "HTTP 500"),
        (Behaviour(status=404), "HTTP 404"),
        (Behaviour(malformed_at=2), "malformed stream chunk"),
        (Behaviour(error_at=1), "error in stream: engine died"),
        (Behaviour(drop_at=3), "connection closed before the response ended"),
        (Behaviour(send_done=False), "stream ended before [DONE]"),
    ],
)
async def test_faults_become_error_records(behaviour: Behaviour, expect: str):
    async with FakeServer(behaviour) as srv:
        res = await run_load(srv.url, "fake", _reqs(3), LoadConfig(timeout_s=5))
    assert len(res.records) == 3
    for r in res.records:
        assert r.error is not None and expect in r.error
    if behaviour.malformed_at is not None:
        assert all(len(r.chunk_times) == 2 for r in res.records)  # tokens before it are kept


async def test_unreachable_server_gives_errors_quickly():
    t0 = time.perf_counter()
    res = await run_load("http://127.0.0.1:9", "m", _reqs(3), LoadConfig(timeout_s=5))
    assert time.perf_counter() - t0 < 2
    assert all("cannot connect" in (r.error or "") for r in res.records)


async def test_stop_event_aborts_and_keeps_partial_records():
    stop = asyncio.Event()
    async with FakeServer(Behaviour(token_delay_s=0.05)) as srv:
        task = asyncio.create_task(
            run_load(srv.url, "fake", _reqs(50, out=40), LoadConfig(rate=20.0), stop=stop)
        )
        await asyncio.sleep(0.3)
        stop.set()
        t0 = time.perf_counter()
        res = await task
        assert time.perf_counter() - t0 < 2.0
    assert res.stopped == "aborted"
    assert 3 <= len(res.records) < 50
    aborted = [r for r in res.records if r.error == "aborted"]
    assert aborted and all(r.chunk_times for r in aborted)  # what arrived before is kept


async def test_api_key_is_sent_as_bearer_header():
    async with FakeServer() as srv:
        await run_load(srv.url, "fake", _reqs(1), LoadConfig(api_key="sk-test"))
    assert srv.stats.headers[0]["Authorization"] == "Bearer sk-test"


def test_window_membership():
    w = Window(10.0, 11.0)
    assert _record(start=10.5) in w
    assert _record(start=9.9) not in w
    assert w.duration == 1.0


# --- the lean HTTP/1.1 transport ----------------------------------------------------------------


class _Sink:
    def __init__(self, stop_at: int | None = None) -> None:
        self.data = b""
        self.calls = 0
        self.stop_at = stop_at

    def feed(self, data: bytes, now: float) -> bool:
        self.data += data
        self.calls += 1
        return self.stop_at is None or self.calls < self.stop_at


def _chunked(events: list[bytes]) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events)
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n"
    )


async def _parse(raw: bytes, step: int, sink: _Sink | None = None) -> tuple[object, _Conn]:
    conn = _Conn()
    done = asyncio.get_running_loop().create_future()
    conn._reset(sink or _Sink(), done)
    for i in range(0, len(raw), step):
        conn.data_received(raw[i : i + step])
    return (done.result() if done.done() else None), conn


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, 10_000])
async def test_chunked_body_reassembled_whatever_the_reads(step: int):
    events = [b'data: {"x": %d}\n\n' % i for i in range(20)] + [b"data: [DONE]\n\n"]
    sink = _Sink()
    result, conn = await _parse(_chunked(events), step, sink)
    assert result == (200, b"")
    assert sink.data == b"".join(events)
    assert conn.keep_alive and conn.remaining == 0  # trailer consumed: reusable


@pytest.mark.parametrize("step", [1, 5, 10_000])
async def test_interim_responses_are_skipped_whatever_the_reads(step: int):
    events = [b"data: a\n\n", b"data: [DONE]\n\n"]
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
    sink = _Sink()
    result, conn = await _parse(interim + _chunked(events), step, sink)
    assert result == (200, b"") and sink.data == b"".join(events)
    assert conn.keep_alive and conn.remaining == 0


@pytest.mark.parametrize("step", [1_000, 100_000])
async def test_response_head_is_limited_whatever_the_reads(step: int):
    padding = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(70))
    conn = _Conn()
    done = asyncio.get_running_loop().create_future()
    conn._reset(_Sink(), done)
    raw = b"HTTP/1.1 200 OK\r\n" + padding + b"\r\n"
    for i in range(0, len(raw), step):
        conn.data_received(raw[i : i + step])
    with pytest.raises(TransportError, match="response headers too large"):
        done.result()
    assert not conn.keep_alive


@pytest.mark.parametrize(
    ("head", "expect"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "invalid Content-Length b'-1'"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1e3\r\n\r\n", "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length:\r\n\r\n", "invalid Content-Length b''"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "malformed HTTP response head"),
        (b"HTTP/1.1 099 Odd\r\n\r\n", "malformed HTTP response head"),
        (b"HTTP/1.1\r\n\r\n", "malformed HTTP response head"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "unexpected HTTP 101"),
    ],
)
async def test_bad_heads_fail_by_name(head: bytes, expect: str):
    conn = _Conn()
    done = asyncio.get_running_loop().create_future()
    conn._reset(_Sink(), done)
    conn.data_received(head)
    with pytest.raises(TransportError) as info:
        done.result()
    assert expect in str(info.value)


async def test_content_length_and_error_bodies():
    raw = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 11\r\n\r\nbusy, sorry"
    result, _ = await _parse(raw, 4)
    assert result == (503, b"busy, sorry")
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\nConnection: close\r\n\r\ndata: [DONE]\n\n"
    sink = _Sink()
    result, conn = await _parse(raw, 5, sink)
    assert result == (200, b"") and sink.data == b"data: [DONE]\n\n" and not conn.keep_alive


async def test_malformed_framing_fails_the_response():
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n"
    conn = _Conn()
    done = asyncio.get_running_loop().create_future()
    conn._reset(_Sink(), done)
    conn.data_received(raw)
    with pytest.raises(TransportError, match="malformed chunk size"):
        done.result()
    conn3 = _Conn()
    done3 = asyncio.get_running_loop().create_future()
    conn3._reset(_Sink(), done3)
    conn3.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY")
    with pytest.raises(TransportError, match="no CRLF after a chunk"):
        done3.result()
    conn2 = _Conn()
    done2 = asyncio.get_running_loop().create_future()
    conn2._reset(_Sink(), done2)
    conn2.data_received(b"SPDY/3 200 OK\r\n\r\n")
    with pytest.raises(TransportError, match="malformed HTTP response head"):
        done2.result()


async def test_sink_can_stop_the_stream():
    events = [b"data: a\n\n", b"data: b\n\n", b"data: c\n\n"]
    sink = _Sink(stop_at=2)
    result, conn = await _parse(_chunked(events), 12, sink)
    assert result == (200, b"") and not conn.keep_alive  # not reused after an abandoned stream


async def test_connections_are_reused_and_stale_ones_retried():
    async with FakeServer(Behaviour(token_delay_s=0.001)) as srv:
        pool = Http11Pool(srv.url + "/v1/completions", {"Content-Type": "application/json"})
        body = build_payload(Request((1, 2), 2, 3), "fake", "completions")
        try:
            for _ in range(3):
                sink = _Sink()
                assert (await pool.post_stream(body, sink))[0] == 200
                assert sink.data.endswith(b"data: [DONE]\n\n")
            assert len(pool._idle) == 1  # one connection served all three
            # The server closes the kept-alive connection just as the next request goes out
            # (its keep-alive timeout): no byte of an answer came, so it is retried on a new one.
            srv.behaviour = Behaviour(hang=True)
            conn = pool._idle[0]
            task = asyncio.create_task(pool.post_stream(body, _Sink()))
            await asyncio.sleep(0.05)
            srv.behaviour = Behaviour()
            assert conn.transport is not None
            conn.transport.abort()
            status, _ = await asyncio.wait_for(task, 2)
            assert status == 200 and pool._idle and pool._idle[0] is not conn
        finally:
            await pool.close()


@pytest.mark.parametrize(
    ("behaviour", "expect"),
    [
        (Behaviour(status=500), "HTTP 500"),
        (Behaviour(malformed_at=2), "malformed stream chunk"),
        (Behaviour(drop_at=3), "ClientPayloadError"),
        (Behaviour(hang=True), "timeout after 0.3s"),
        (Behaviour(token_delay_s=0.001, split_writes=True), None),
    ],
)
async def test_aiohttp_transport_for_non_http_urls(
    behaviour: Behaviour, expect: str | None, monkeypatch: pytest.MonkeyPatch
):
    from tuner.load import generator as load

    monkeypatch.setattr(
        load,
        "make_transport",
        lambda url, headers, limit=None: AiohttpTransport(url, headers, limit),
    )
    async with FakeServer(behaviour) as srv:
        res = await run_load(srv.url, "fake", _reqs(2), LoadConfig(timeout_s=0.3))
    for r in res.records:
        if expect is None:
            assert r.ok and r.output_tokens == 8
        else:
            assert r.error is not None and expect in r.error


async def test_make_transport_picks_by_scheme():
    assert isinstance(make_transport("http://h:1/v1/completions", {}), Http11Pool)
    other = make_transport("https://h/v1/completions", {})
    assert isinstance(other, AiohttpTransport)
    await other.close()
