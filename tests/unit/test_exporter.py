"""The Prometheus exporter: metric values from observer calls, the HTTP endpoint, bad ports,
an unreachable Pushgateway, Pushgateway credentials (basic auth, never shown), and the bench's
histograms."""

from __future__ import annotations

import json
import logging
import math
import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tuner.errors import EngineError, ParameterError
from tuner.load.generator import RequestRecord
from tuner.outputs.prometheus import (
    Pushgateway,
    SearchExporter,
    exporting,
    label_name,
    start_exporter,
)
from tuner.outputs.prometheus_bench import BenchExporter
from tuner.search.events import Fanout
from tuner.search.record import SearchRecord, TrialRecord

SAMPLE = Path(__file__).parent.parent / "data" / "sample_record.json"


def samples(registry) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    text = generate_latest(registry).decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def value(registry, name: str, **labels: str) -> float:
    matches = [
        v
        for lab, v in samples(registry).get(name, [])
        if all(lab.get(k) == want for k, want in labels.items())
    ]
    assert len(matches) == 1, f"{name}{labels}: {matches}"
    return matches[0]


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads(SAMPLE.read_text())


def trials(record: dict) -> list[TrialRecord]:
    return [TrialRecord.from_json(t) for t in record["trials"]]


def feed(exp: SearchExporter, record: dict, upto: int | None = None) -> None:
    """The calls a search makes, for the record's trials (all, or the first ``upto``)."""
    exp.on_phase("plan")
    exp.on_plan(record["plan"]["candidates"], len(record["plan"]["pruned"]), 8)
    exp.on_phase("baseline")
    for t in trials(record)[:upto]:
        if t.number == 1:
            exp.on_phase("trials")
        exp.on_trial_start(t.number, t.name, t.knobs)
        for p in (t.rate_search or {}).get("points", []):
            exp.on_point(t.name, p)
        exp.on_trial_end(t)


def test_metrics_follow_the_search(record):
    exp = SearchExporter(info={"model": "meta-llama/Llama-3.1-8B-Instruct", "gpu": "h100"})
    reg = exp.registry
    feed(exp, record)
    ts = trials(record)
    assert value(reg, "vtune_trials_total", state="complete") == 6
    assert value(reg, "vtune_trials_total", state="failed") == 1
    assert value(reg, "vtune_trials_total", state="pruned") == 1
    assert value(reg, "vtune_plan_candidates") == record["plan"]["candidates"]
    assert value(reg, "vtune_budget_trials") == 8
    assert value(reg, "vtune_phase", phase="trials") == 1
    assert sum(v for _, v in samples(reg)["vtune_phase"]) == 1
    assert value(reg, "vtune_points_measured_total") == sum(
        len((t.rate_search or {}).get("points", [])) for t in ts
    )
    # "last trial" = the last complete one (#6); failed and pruned trials leave it alone
    last = next(t for t in reversed(ts) if t.state == "complete")
    assert value(reg, "vtune_last_trial_output_throughput") == pytest.approx(
        last.best["output_throughput"]
    )
    assert value(reg, "vtune_last_trial_latency_seconds", metric="tpot", stat="p95") == (
        pytest.approx(last.best["p95_tpot_ms"] / 1000)
    )
    assert value(reg, "vtune_last_trial_latency_seconds", metric="ttft", stat="p99") == (
        pytest.approx(last.best["p99_ttft_ms"] / 1000)
    )
    best = max((t for t in ts if t.state == "complete"), key=lambda t: t.objective)
    assert value(reg, "vtune_best_objective") == pytest.approx(best.objective)
    assert value(reg, "vtune_best_goodput") == pytest.approx(
        max(t.best["request_goodput"] for t in ts if t.best)
    )
    info = samples(reg)["vtune_info"][0][0]
    assert info["model"] == "meta-llama/Llama-3.1-8B-Instruct" and info["version"]
    exp.on_phase("calibrate")  # a phase this exporter does not know yet
    exp.on_phase("finalists")
    assert value(reg, "vtune_phase", phase="calibrate") == 0
    exp.on_finish(SearchRecord.from_json(record))
    assert value(reg, "vtune_phase", phase="done") == 1
    assert sum(v for _, v in samples(reg)["vtune_phase"]) == 1
    assert value(reg, "vtune_gain_ratio") == pytest.approx(record["gain"]["ratio"])


def test_vllm_figures_of_the_last_trial(record):
    exp = SearchExporter()
    t = trials(record)[5]  # the prefix-caching trial that preempted
    exp.on_trial_start(t.number, t.name, t.knobs)
    exp.on_trial_end(t)
    servers = [p["server"] for p in t.rate_search["points"]]
    assert value(exp.registry, "vtune_last_trial_peak_kv_cache_usage") == pytest.approx(
        max(s["peak_kv_cache_usage"] for s in servers)
    )
    assert (
        value(exp.registry, "vtune_last_trial_preemptions")
        == sum(s["preemptions"] for s in servers)
        > 0
    )


def test_running_trial_info_carries_the_knobs():
    exp = SearchExporter()
    assert "vtune_trial_running_info" not in samples(exp.registry)
    exp.on_trial_start(
        3,
        "seqs64-mbt8192-kvfp8",
        {
            "max_num_seqs": 64,
            "max_num_batched_tokens": 8192,
            "kv_cache_dtype": "fp8",
            "enable_prefix_caching": True,
            "name": "clash",
        },
    )
    [(labels, val)] = samples(exp.registry)["vtune_trial_running_info"]
    assert val == 1 and value(exp.registry, "vtune_trials_running") == 1
    assert labels == {
        "trial": "3",
        "name": "seqs64-mbt8192-kvfp8",
        "max_num_seqs": "64",
        "max_num_batched_tokens": "8192",
        "kv_cache_dtype": "fp8",
        "enable_prefix_caching": "true",
        "knob_name": "clash",
    }
    exp.on_trial_end(TrialRecord("seqs64-mbt8192-kvfp8", {}, "failed", number=3))
    assert "vtune_trial_running_info" not in samples(exp.registry)
    assert value(exp.registry, "vtune_trials_running") == 0
    # a failed trial measured nothing: NaN ("no value"), not a made-up 0
    assert math.isnan(value(exp.registry, "vtune_last_trial_output_throughput"))
    assert math.isnan(value(exp.registry, "vtune_best_goodput"))


def test_label_names():
    assert label_name("max-num-seqs") == "max_num_seqs"
    assert label_name("__x") == "x"
    assert label_name("4bit") == "knob_4bit"


def test_no_slo_goodput_is_request_throughput():
    exp = SearchExporter()
    best = {
        "output_throughput": 100.0,
        "request_throughput": 2.5,
        "request_goodput": None,
        "slo": None,
        "p95_ttft_ms": None,
    }
    exp.on_trial_end(TrialRecord("a", {}, "complete", objective=100.0, number=0, best=best))
    assert value(exp.registry, "vtune_best_goodput") == 2.5
    # a statistic that was not measured is NaN, never a made-up 0
    assert math.isnan(
        value(exp.registry, "vtune_last_trial_latency_seconds", metric="ttft", stat="p95")
    )


def test_best_objective_follows_the_objectives_direction():
    """Latency is minimised: the best so far is the lowest value seen, not the highest."""
    values = (100.0, 80.0, 120.0, 90.0)
    for info, want in (({"objective": "latency"}, 80.0), ({"objective": "throughput"}, 120.0)):
        exp = SearchExporter(info=info)
        for i, v in enumerate(values):
            best = {"output_throughput": 10.0, "request_throughput": 1.0}
            exp.on_trial_end(TrialRecord(f"t{i}", {}, "complete", objective=v, number=i, best=best))
        assert value(exp.registry, "vtune_best_objective") == want, info
        assert value(exp.registry, "vtune_last_trial_objective") == values[-1]
    assert SearchExporter(objective="latency").objective == "latency"
    assert SearchExporter().objective == "throughput"
    with pytest.raises(ParameterError, match="unknown objective 'speed'"):
        SearchExporter(objective="speed")


def test_own_registries_do_not_collide():
    a, b = SearchExporter(), SearchExporter()
    c, d = BenchExporter(), BenchExporter()
    assert a.registry is not b.registry and c.registry is not d.registry


def test_served_over_http_on_loopback(record):
    exp = SearchExporter()
    feed(exp, record, upto=2)
    with start_exporter(0, registry=exp.registry) as server:
        assert server.host == "127.0.0.1" and server.port > 0
        body = urllib.request.urlopen(server.url, timeout=5).read().decode()
        assert 'vtune_trials_total{state="complete"} 2.0' in body
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url, timeout=2)  # closed: the port is free again


def test_port_in_use_is_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(EngineError) as err:
            start_exporter(port)
    assert str(err.value) == f"metrics port {port} is in use on 127.0.0.1"
    with start_exporter(0) as first, pytest.raises(EngineError, match="in use"):
        start_exporter(first.port)
    with pytest.raises(ParameterError, match="0-65535"):
        start_exporter(70000)


def test_unknown_host_is_one_line():
    with pytest.raises(EngineError) as err:
        start_exporter(0, host="no-such-host.invalid")
    assert "\n" not in str(err.value) and "no-such-host.invalid" in str(err.value)


def test_unreachable_pushgateway_warns_and_the_search_goes_on(record, caplog):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    gw = Pushgateway(f"http://127.0.0.1:{dead}", job="t", timeout_s=2)
    exp = SearchExporter(pushgateway=gw)
    caplog.set_level(logging.DEBUG, logger="tuner.outputs.prometheus_serve")
    observer = Fanout([exp])
    for t in trials(record)[:3]:
        observer.on_trial_start(t.number, t.name, t.knobs)
        observer.on_trial_end(t)
    # every trial end pushed (and failed), nothing raised, the metrics kept counting
    assert gw.failures == 3 and gw.pushes == 0
    assert value(exp.registry, "vtune_trials_total", state="complete") == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # the same failure again is logged at debug level only
    assert "unreachable" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    assert not [r for r in caplog.records if r.name == "tuner.search.events"]  # no hook raised


def test_pushgateway_url_checked():
    assert Pushgateway("pushgateway:9091").url == "http://pushgateway:9091"
    with pytest.raises(ParameterError):
        Pushgateway("ftp://x")
    with pytest.raises(ParameterError):
        Pushgateway("http://")


class _Gateway:
    """A small HTTP server standing in for a Pushgateway: records each request's method, path
    and headers, and answers ``status``."""

    def __init__(self, status: int = 200) -> None:
        import http.server
        import threading

        seen: list[tuple[str, str, dict[str, str]]] = []
        self.seen = seen

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                seen.append((self.command, self.path, dict(self.headers)))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def gateway():
    made: list[_Gateway] = []

    def make(status: int = 200) -> _Gateway:
        made.append(_Gateway(status))
        return made[-1]

    yield make
    for g in made:
        g.close()


def test_pushgateway_credentials_go_to_basic_auth_not_the_host(gateway) -> None:
    import base64

    gw = gateway()
    push = Pushgateway(f"http://vtune:p%40ss:w0rd@127.0.0.1:{gw.port}", job="t", timeout_s=5)
    assert push.url == f"http://127.0.0.1:{gw.port}"
    assert push.shown == f"http://vtune:***@127.0.0.1:{gw.port}"
    assert push.push(SearchExporter().registry) and push.failures == 0
    ((method, path, headers),) = gw.seen
    assert method == "PUT" and path == "/metrics/job/t"
    assert headers["Host"] == f"127.0.0.1:{gw.port}"
    expected = base64.b64encode(b"vtune:p@ss:w0rd").decode()
    assert headers["Authorization"] == f"Basic {expected}"


def test_a_push_without_credentials_sends_no_authorization(gateway) -> None:
    gw = gateway()
    assert Pushgateway(f"http://127.0.0.1:{gw.port}", job="t").push(SearchExporter().registry)
    ((_, _, headers),) = gw.seen
    assert "Authorization" not in headers


def test_a_refused_push_warns_without_the_password(gateway, caplog) -> None:
    gw = gateway(status=401)
    push = Pushgateway(f"http://vtune:CANARY-5e1f@127.0.0.1:{gw.port}", job="t", timeout_s=5)
    caplog.set_level(logging.DEBUG, logger="tuner.outputs.prometheus_serve")
    assert not push.push(SearchExporter().registry) and push.failures == 1
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"http://vtune:***@127.0.0.1:{gw.port} refused the push" in warning
    assert "(HTTP 401 Unauthorized)" in warning
    assert all("CANARY" not in r.getMessage() for r in caplog.records)


def test_a_bad_pushgateway_url_is_one_line_without_the_password() -> None:
    with pytest.raises(ParameterError) as bad:
        Pushgateway("ftp://vtune:CANARY-77aa@host:9091")
    assert "CANARY" not in str(bad.value) and "vtune:***@host:9091" in str(bad.value)
    with pytest.raises(ParameterError) as bad:
        Pushgateway("http://vtune:CANARY-77aa@host:port")
    assert "CANARY" not in str(bad.value)


def rec(i: int, start: float, ttft: float, gaps: list[float], error: str | None = None):
    chunks, t = [start + ttft], start + ttft
    for g in gaps:
        t += g
        chunks.append(t)
    return RequestRecord(
        index=i,
        start=start,
        end=t,
        first_token=start + ttft,
        chunk_times=tuple(chunks),
        prompt_len=32,
        output_tokens=len(chunks),
        expected_output_len=len(chunks),
        error=error,
    )


def test_bench_counts_and_histograms():
    exp = BenchExporter(info={"model": "tiny"})
    reg = exp.registry
    exp.started()
    exp.started()
    assert value(reg, "vtune_bench_requests_in_flight") == 2
    exp.observe(rec(0, 10.0, 0.05, [0.01, 0.02, 0.01]))
    exp.observe(RequestRecord(1, 10.0, 10.3, None, (), 32, None, 8, "HTTP 500: boom"))
    assert value(reg, "vtune_bench_requests_in_flight") == 0
    exp.observe(rec(2, 11.0, 0.5, [0.2]))  # no started(): in-flight stays at 0
    assert value(reg, "vtune_bench_requests_in_flight") == 0
    assert value(reg, "vtune_bench_requests_total", status="ok") == 2
    assert value(reg, "vtune_bench_requests_total", status="error") == 1
    assert value(reg, "vtune_bench_output_tokens_total") == 4 + 2
    assert value(reg, "vtune_bench_ttft_seconds_count") == 2
    assert value(reg, "vtune_bench_ttft_seconds_sum") == pytest.approx(0.55)
    assert value(reg, "vtune_bench_itl_seconds_count") == 4  # every gap
    assert value(reg, "vtune_bench_tpot_seconds_sum") == pytest.approx(0.04 / 3 + 0.2)
    assert value(reg, "vtune_bench_e2el_seconds_count") == 2
    # Prometheus bucket format: cumulative counts with le labels, +Inf == count
    buckets = {lab["le"]: v for lab, v in samples(reg)["vtune_bench_ttft_seconds_bucket"]}
    assert buckets["0.06"] == 1 and buckets["0.5"] == 2 and buckets["+Inf"] == 2
    exp.finish({"output_throughput": 123.0, "request_throughput": 4.0})
    assert value(reg, "vtune_bench_output_throughput") == 123.0


def test_exporting_serves_for_the_block_only():
    with exporting(SearchExporter, None, pushgateway=None) as nothing:
        assert nothing is None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with exporting(BenchExporter, port, info={"model": "tiny"}) as exp:
        assert isinstance(exp, BenchExporter)
        exp.observe(rec(0, 1.0, 0.1, [0.01]))
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert b'vtune_bench_requests_total{status="ok"} 1.0' in body
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    with exporting(SearchExporter, None, pushgateway="http://127.0.0.1:1") as exp:
        assert exp.pushgateway.job == "vtune-search"
        exp.on_plan(1, 0, 1)  # unreachable: warns, goes on
        assert exp.pushgateway.failures == 1


async def test_bench_exporter_is_a_live_load_observer():
    """run_load calls started()/observe() per measured request: counts match the records."""
    from tests.fakes import Behaviour, FakeServer
    from tuner.load.generator import LoadConfig, run_load
    from tuner.load.workload import Request

    exp = BenchExporter()
    reqs = [Request(tuple(range(4)), 4, 6) for _ in range(10)]
    async with FakeServer(Behaviour(ttft_s=0.01, token_delay_s=0.002)) as srv:
        result = await run_load(
            srv.url, "fake", reqs, LoadConfig(concurrency=3, warmup=2), observer=exp
        )
    measured = result.measured
    assert len(measured) == 8 and all(r.ok for r in measured)
    assert value(exp.registry, "vtune_bench_requests_total", status="ok") == len(measured)
    assert value(exp.registry, "vtune_bench_requests_in_flight") == 0
    assert value(exp.registry, "vtune_bench_ttft_seconds_count") == len(measured)
    assert value(exp.registry, "vtune_bench_itl_seconds_count") == sum(len(r.itl) for r in measured)
    assert value(exp.registry, "vtune_bench_output_tokens_total") == 8 * 6
