"""A real Prometheus scrapes vtune's exporter, and a real Pushgateway takes its pushes.

No vLLM here: the exporters are fed the observer calls a search makes (from the sample
record) and the records a bench produces. Prometheus and the Pushgateway are Debian's
packages, started on loopback by tests/prom.py; a missing binary fails the test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.prom import running_prometheus, running_pushgateway
from tuner.load.generator import RequestRecord
from tuner.outputs.prometheus import Pushgateway, SearchExporter, start_exporter
from tuner.outputs.prometheus_bench import BenchExporter
from tuner.search.record import SearchRecord, TrialRecord

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

RECORD = json.loads((Path(__file__).parent.parent / "data" / "sample_record.json").read_text())
TRIALS = [TrialRecord.from_json(t) for t in RECORD["trials"]]


def start_search(exp: SearchExporter, upto: int) -> None:
    exp.on_phase("plan")
    exp.on_plan(RECORD["plan"]["candidates"], len(RECORD["plan"]["pruned"]), 8)
    exp.on_phase("baseline")
    for t in TRIALS[:upto]:
        exp.on_trial_start(t.number, t.name, t.knobs)
        for p in (t.rate_search or {}).get("points", []):
            exp.on_point(t.name, p)
        exp.on_trial_end(t)
        exp.on_phase("trials")


def bench_records(n: int) -> list[RequestRecord]:
    out = []
    for i in range(n):
        start, ttft = 100.0 + i, 0.05 + 0.01 * i
        chunks = tuple(start + ttft + 0.02 * k for k in range(16))
        out.append(
            RequestRecord(
                i,
                start,
                chunks[-1],
                chunks[0],
                chunks,
                64,
                16,
                16,
                None if i % 5 else "HTTP 503: overloaded",
            )
        )
    return out


def test_prometheus_scrapes_search_and_bench_exporters():
    search = SearchExporter(info={"model": "tiny-llama", "gpu": "cpu", "objective": "goodput"})
    start_search(search, upto=3)
    running = TRIALS[3]
    search.on_trial_start(running.number, running.name, running.knobs)
    bench = BenchExporter(info={"model": "tiny-llama"})
    for r in bench_records(10):
        bench.started()
        bench.observe(r)

    with (
        start_exporter(0, registry=search.registry) as s_srv,
        start_exporter(0, registry=bench.registry) as b_srv,
        running_prometheus(
            {"vtune": [f"127.0.0.1:{s_srv.port}"], "vtune-bench": [f"127.0.0.1:{b_srv.port}"]}
        ) as prom,
    ):
        prom.wait_for('vtune_trials_total{state="complete"}')
        prom.wait_for("vtune_bench_requests_total")
        names = prom.series_names("vtune_.+")
        for expected in (
            "vtune_info",
            "vtune_phase",
            "vtune_trials_total",
            "vtune_trial_running_info",
            "vtune_last_trial_output_throughput",
            "vtune_last_trial_latency_seconds",
            "vtune_best_goodput",
            "vtune_best_objective",
            "vtune_bench_requests_total",
            "vtune_bench_requests_in_flight",
            "vtune_bench_ttft_seconds_bucket",
            "vtune_bench_itl_seconds_bucket",
            "vtune_bench_e2el_seconds_count",
        ):
            assert expected in names, f"{expected} not in {sorted(names)}"

        assert prom.value('up{job="vtune"}') == 1
        assert prom.value('vtune_trials_total{state="complete"}') == 3
        assert prom.value('vtune_phase{phase="trials"}') == 1
        assert prom.value('vtune_last_trial_latency_seconds{metric="tpot",stat="p95"}') == (
            pytest.approx(TRIALS[2].best["p95_tpot_ms"] / 1000)
        )
        [info] = prom.query("vtune_trial_running_info")
        assert info["metric"]["name"] == running.name
        assert info["metric"]["max_num_seqs"] == str(running.knobs["max_num_seqs"])

        # live: the next trial's end shows up at the next scrape
        search.on_trial_end(running)
        prom.wait_for('vtune_trials_total{state="failed"} == 1')
        prom.wait_for("absent(vtune_trial_running_info)")

        # the bench's histograms in Prometheus's bucket format: quantiles work on them
        assert prom.value('vtune_bench_requests_total{status="error"}') == 2
        assert prom.value("vtune_bench_ttft_seconds_count") == 8
        p95 = prom.value("histogram_quantile(0.95, vtune_bench_ttft_seconds_bucket)")
        assert p95 is not None and 0.06 <= p95 <= 0.25  # true values: 0.06..0.14 s
        assert prom.value("vtune_bench_itl_seconds_count") == 8 * 15


def test_pushgateway_receives_each_trial():
    with running_pushgateway() as gw, running_prometheus({"pushgateway": [gw.address]}) as prom:
        pusher = Pushgateway(gw.url, job="vtune-search", grouping={"study": "e2e"})
        exp = SearchExporter(pushgateway=pusher, info={"model": "tiny-llama"})
        start_search(exp, upto=2)
        assert pusher.failures == 0 and pusher.pushes == 3  # the plan and two trial ends
        pushed = gw.metrics()
        [(labels, count)] = [s for s in pushed["vtune_trials_total"] if s[0]["state"] == "complete"]
        assert count == 2 and labels["job"] == "vtune-search" and labels["study"] == "e2e"
        assert "vtune_last_trial_latency_seconds" in pushed

        exp.on_trial_start(TRIALS[2].number, TRIALS[2].name, TRIALS[2].knobs)
        exp.on_trial_end(TRIALS[2])
        exp.on_finish(SearchRecord.from_json(RECORD))
        pushed = gw.metrics()
        assert [v for lab, v in pushed["vtune_trials_total"] if lab["state"] == "complete"] == [3]
        [(_, gain)] = pushed["vtune_gain_ratio"]
        assert math.isclose(gain, RECORD["gain"]["ratio"])

        # Prometheus scrapes the gateway and keeps the pushed job label (honor_labels)
        result = prom.wait_for('vtune_best_objective{job="vtune-search",study="e2e"}')
        assert float(result[0]["value"][1]) == pytest.approx(max(t.objective for t in TRIALS[:3]))
        prom.wait_for('vtune_phase{job="vtune-search",phase="done"} == 1')
