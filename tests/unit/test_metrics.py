"""Summaries, the SLO grammar, goodput and the /metrics scraper."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from tests.fakes import Behaviour, FakeServer
from tuner.errors import SloError
from tuner.load.generator import LoadConfig, RequestRecord, Window, run_load
from tuner.load.workload import Request
from tuner.measure.metrics import Distribution, summarize
from tuner.measure.scrape import Sample, Scraper, parse_metrics, summarize_samples
from tuner.measure.slo import Slo, SloTerm, parse_slo

REAL_METRICS = Path(__file__).parent / "data" / "vllm_cpu_metrics.txt"


def rec(
    index: int,
    start: float,
    ttft: float,
    gaps: list[float],
    *,
    error: str | None = None,
    prompt_len: int = 10,
    usage: bool = True,
) -> RequestRecord:
    first = start + ttft
    chunks = [first]
    for g in gaps:
        chunks.append(chunks[-1] + g)
    return RequestRecord(
        index=index,
        start=start,
        end=chunks[-1] + 0.001,
        first_token=first,
        chunk_times=tuple(chunks),
        prompt_len=prompt_len,
        output_tokens=len(chunks) if usage else None,
        expected_output_len=len(chunks),
        error=error,
    )


# --- Distribution -----------------------------------------------------------------------------


def test_distribution_matches_numpy():
    values = np.random.default_rng(0).lognormal(size=501)
    d = Distribution.of(values)
    assert d.count == 501
    assert d.mean == pytest.approx(np.mean(values))
    assert d.median == pytest.approx(np.median(values))
    assert d.std == pytest.approx(np.std(values))
    for p in (50, 90, 95, 99):
        assert d.get(f"p{p}") == pytest.approx(np.percentile(values, p))
    assert (d.min, d.max) == (values.min(), values.max())
    ms = d.scaled(1000)
    assert ms.p99 == pytest.approx(1000 * np.percentile(values, 99)) and ms.count == 501


def test_empty_distribution_is_none_not_zero():
    d = Distribution.of([])
    assert d.count == 0 and d.mean is None and d.p99 is None and d.std is None
    with pytest.raises(KeyError):
        d.get("p42")


# --- summarize --------------------------------------------------------------------------------


def test_summary_uses_only_the_window_and_successful_requests():
    warm = rec(0, 0.5, 0.5, [0.1])  # before the window: warm-up
    a = rec(1, 1.0, 0.1, [0.02, 0.03, 0.04])
    b = rec(2, 1.5, 0.3, [0.05])
    bad = rec(3, 1.6, 0.2, [0.01], error="HTTP 500: x")
    late = rec(4, 5.0, 0.1, [0.1])  # after the window
    s = summarize([warm, a, b, bad, late], Window(1.0, 3.0))
    assert (s.completed, s.failed, s.duration) == (2, 1, 2.0)
    assert s.total_output_tokens == 4 + 2
    assert s.total_input_tokens == 20
    assert s.request_throughput == pytest.approx(1.0)
    assert s.output_throughput == pytest.approx(3.0)
    assert s.total_token_throughput == pytest.approx(13.0)
    assert s.ttft.mean == pytest.approx(0.2)
    assert s.itl.count == 4 and s.itl.max == pytest.approx(0.05)
    # TPOT = (E2E - TTFT) / (n - 1), per request, then averaged
    tpots = [(a.e2el - a.ttft) / 3, (b.e2el - b.ttft) / 1]  # type: ignore[operator]
    assert s.tpot.mean == pytest.approx(np.mean(tpots))
    assert s.errors == {"HTTP 500: x": 1}
    assert s.peak_in_flight == 2  # b and bad overlap (a ended at 1.19)
    assert s.request_goodput is None


def test_summary_json_uses_vllm_bench_serve_names():
    s = summarize([rec(0, 1.0, 0.1, [0.02, 0.02])], Window(1.0, 2.0))
    j = s.to_json()
    for key in (
        "completed",
        "failed",
        "duration",
        "total_input_tokens",
        "total_output_tokens",
        "request_throughput",
        "request_goodput",
        "output_throughput",
        "total_token_throughput",
        "max_output_tokens_per_s",
        "max_concurrent_requests",
    ):
        assert key in j
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p50", "p90", "p95", "p99"):
            assert f"{stat}_{metric}_ms" in j
    assert j["mean_ttft_ms"] == pytest.approx(100.0)
    json.dumps(j)  # serialisable


def test_summary_of_nothing_has_none_latencies():
    s = summarize([rec(0, 1.0, 0.1, [], error="timeout after 1s")], Window(1.0, 2.0))
    assert s.completed == 0 and s.failed == 1
    assert s.ttft.mean is None and s.to_json()["p99_ttft_ms"] is None


def test_output_tokens_fall_back_to_chunk_count():
    s = summarize([rec(0, 1.0, 0.1, [0.1, 0.1], usage=False)], Window(1.0, 2.0))
    assert s.total_output_tokens == 3


# --- SLO grammar ------------------------------------------------------------------------------


def test_parse_slo_terms_defaults_and_units():
    slo = parse_slo("ttft:p95<500ms; tpot:p99<50ms;e2el<10s;itl:mean<250us")
    assert slo.terms == (
        SloTerm("ttft", "p95", 500.0, "ms"),
        SloTerm("tpot", "p99", 50.0, "ms"),
        SloTerm("e2el", "p99", 10.0, "s"),
        SloTerm("itl", "mean", 250.0, "us"),
    )
    assert [t.seconds for t in slo.terms] == pytest.approx([0.5, 0.05, 10.0, 0.00025])
    assert parse_slo("ttft<2").terms[0] == SloTerm("ttft", "p99", 2.0, "ms")


@pytest.mark.parametrize(
    "text", ["ttft:p95<500ms;tpot:p99<50ms;e2el:p99<10s", "itl:median<0.5s", "ttft:p50<1.5e3us"]
)
def test_slo_round_trips(text: str):
    slo = parse_slo(text)
    assert parse_slo(str(slo)) == slo
    assert str(parse_slo(str(slo))) == str(slo)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("ttfb:p95<1ms", "unknown metric 'ttfb'"),
        ("ttft:p42<1ms", "unknown statistic 'p42'"),
        ("ttft:p95>1ms", "upper bounds"),
        ("ttft:p95<", "missing threshold"),
        ("ttft:p95<5min", "unknown unit 'min'"),
        ("ttft:p95<0ms", "positive"),
        ("ttft:p95<1ms;ttft:p95<2ms", "given twice"),
        ("ttft p95 < 1ms", "ttft p95 < 1ms"),
        ("tpot:p99<50ms;;bad", "'bad'"),
    ],
)
def test_slo_errors_are_one_line_naming_the_term(text: str, fragment: str):
    with pytest.raises(SloError) as info:
        parse_slo(text)
    msg = str(info.value)
    assert fragment in msg and "\n" not in msg


def test_slo_check_against_a_summary():
    recs = [rec(i, 1.0 + i * 0.01, 0.1 + i * 0.01, [0.02] * 5) for i in range(10)]
    s = summarize(recs, Window(1.0, 3.0))
    slo = parse_slo("ttft:p50<200ms;tpot:mean<10ms")
    (_, v1, ok1), (_, v2, ok2) = slo.check(s)
    assert ok1 and v1 == pytest.approx(s.ttft.p50)
    assert not ok2 and v2 == pytest.approx(s.tpot.mean)
    assert not slo.met(s)
    empty = summarize([], Window(1.0, 2.0))
    assert slo.check(empty)[0][2] is False  # no data does not meet an SLO


def test_goodput_counts_requests_meeting_their_own_thresholds():
    fast = [rec(i, 1.0, 0.05, [0.01] * 4) for i in range(6)]
    slow_ttft = [rec(10 + i, 1.0, 0.5, [0.01] * 4) for i in range(3)]
    slow_tokens = [rec(20, 1.0, 0.05, [0.01, 0.2, 0.01])]
    failed = [rec(30, 1.0, 0.01, [0.01], error="x")]
    recs = fast + slow_ttft + slow_tokens + failed
    s = summarize(recs, Window(1.0, 3.0), parse_slo("ttft<100ms"))
    assert s.request_goodput == pytest.approx(7 / 2.0)
    s = summarize(recs, Window(1.0, 3.0), parse_slo("ttft<100ms;itl<100ms"))
    assert s.request_goodput == pytest.approx(6 / 2.0)
    assert s.slo == "ttft:p99<100ms;itl:p99<100ms"
    one_token = rec(40, 1.0, 0.05, [])
    assert Slo((SloTerm("tpot", "p99", 1.0),)).request_ok(one_token)  # TPOT 0 with one token


# --- scraping ---------------------------------------------------------------------------------

FAKE_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 120.0
vllm:generation_tokens_created{engine="0",model_name="m"} 1.7e9
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 4.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 5.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 5.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 0.6
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 123.0
"""


def test_parse_metrics_sums_label_sets_and_keeps_buckets():
    v = parse_metrics(FAKE_TEXT)
    assert v["vllm:num_requests_running"] == 5.0
    assert v["vllm:generation_tokens_total"] == 120.0
    assert v['vllm:time_to_first_token_seconds_bucket{le="0.1"}'] == 4.0
    assert v["vllm:time_to_first_token_seconds_sum"] == pytest.approx(0.6)
    assert "python_gc_objects_collected_total" not in v
    assert "python_gc_objects_collected_total" in parse_metrics(FAKE_TEXT, names=None)


def test_parse_real_vllm_cpu_metrics_sample():
    v = parse_metrics(REAL_METRICS.read_text())
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:num_preemptions_total",
        "vllm:generation_tokens_total",
        "vllm:prompt_tokens_total",
        "vllm:time_to_first_token_seconds_sum",
        "vllm:time_to_first_token_seconds_count",
    ):
        assert name in v, name
    assert v["vllm:generation_tokens_total"] > 0
    assert 0.0 <= v["vllm:kv_cache_usage_perc"] <= 1.0


def test_summarize_samples_peaks_and_deltas():
    def s(t: float, running: float, tokens: float, kv: float) -> Sample:
        return Sample(
            t,
            {
                "vllm:num_requests_running": running,
                "vllm:kv_cache_usage_perc": kv,
                "vllm:generation_tokens_total": tokens,
                "vllm:num_preemptions_total": 1.0,
            },
        )

    samples = [
        s(0.0, 0, 100, 0.0),
        s(1.0, 4, 150, 0.3),
        s(2.0, 9, 300, 0.7),
        s(3.0, 1, 400, 0.2),
        s(4.0, 0, 400, 0.0),
        s(9.0, 50, 900, 0.99),
    ]
    st = summarize_samples(samples, start=0.5, end=3.5)
    assert st.max_running == 9 and st.peak_kv_cache_usage == 0.7
    assert st.generation_tokens == 300.0  # from the sample at 0.0 to the one at 4.0
    assert st.preemptions == 0.0
    assert st.max_waiting is None  # not exposed: None, not 0
    # The KV series for the report: window-relative times, the sample before and after.
    assert [p[0] for p in st.series] == [-0.5, 0.5, 1.5, 2.5, 3.5]
    assert [p[1] for p in st.series] == [0.0, 0.3, 0.7, 0.2, 0.0]
    assert st.series[2][2] == 9 and st.series[2][3] is None
    assert st.to_json()["series"][1] == [0.5, 0.3, 4, None]
    empty = summarize_samples([], failures=2)
    assert empty.samples == 0 and empty.failures == 2 and empty.generation_tokens is None


async def test_scraper_follows_a_run_and_counts_tokens():
    async with FakeServer(Behaviour(token_delay_s=0.01)) as srv:
        async with Scraper(srv.url, interval=0.05) as scraper:
            reqs = [Request((1, 2, 3), 3, 20)] * 6
            res = await run_load(srv.url, "fake", reqs, LoadConfig(concurrency=3))
        st = scraper.summary(res.window.start, res.window.end)
    assert st.failures == 0 and st.samples >= 4
    assert st.generation_tokens == 120.0
    assert st.max_running == 3.0
    assert st.peak_kv_cache_usage == pytest.approx(0.3)


async def test_scrape_failures_do_not_stop_the_load():
    async with FakeServer(Behaviour(token_delay_s=0.01)) as srv:
        srv.metrics_status = 500
        async with Scraper(srv.url, interval=0.05) as scraper:
            res = await run_load(srv.url, "fake", [Request((1,), 1, 10)] * 3, LoadConfig())
        assert all(r.ok for r in res.records)
    assert scraper.failures >= 2 and scraper.samples == []
    assert "HTTP 500" in (scraper.summary().last_error or "")


async def test_scraper_against_nothing_finishes_quickly():
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with Scraper("http://127.0.0.1:9", interval=0.05, timeout=0.5) as scraper:
        await asyncio.sleep(0.2)
    assert loop.time() - t0 < 1.5
    assert scraper.failures >= 2
