"""Tuning for the traffic you really have, end to end on vLLM CPU with the tiny model.

1. A search driven by the shipped example trace (its length and session mix re-sampled under
   the search's own arrival process) writes a profile; ``vtune decide`` on its record picks
   again from stored data alone under a looser SLO and names the candidates that need a
   relaunch under a stricter one; ``vtune plan`` prints replicas and $/1M tokens that this test
   re-derives from the record's numbers.
2. A search driven by multi-turn conversations writes a profile, and its record shows a
   prefix-cache hit rate above zero for the candidate with prefix caching on.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_search_e2e import vllm_processes

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "tuner" / "data" / "traces" / "example.jsonl"
SLO = "ttft:p95<5s;tpot:p95<500ms"


def vtune(*args: str, timeout: float = 1500) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tuner", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )


def search(model: Path, out: Path, *extra: str) -> dict[str, Any]:
    """Run a small search (the baseline and one candidate, 3 s a point, no finalist re-runs)
    and return its record."""
    done = vtune(
        "search",
        "--model",
        str(model),
        "--gpu",
        "cpu",
        "--slo",
        SLO,
        "--seconds-per-point",
        "3",
        "--iterations",
        "1",
        "--finalists",
        "0",
        "--no-early-stop",  # both trials in full: their stored curves are what decide reads
        "--out",
        str(out),
        *extra,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    yaml_path = out / model.name / "cpu.yaml"
    assert yaml_path.exists(), done.stdout[-2000:]
    return json.loads(yaml_path.with_suffix(".json").read_text())


def test_trace_driven_search_then_decide_and_plan(tiny_model_dir: Path, tmp_path: Path) -> None:
    before = frozenset(vllm_processes())
    out = tmp_path / "profiles"
    record = search(
        tiny_model_dir, out, "--dataset", f"trace:{EXAMPLE}", "--param", "max_num_seqs=16"
    )
    assert record["workload"]["dataset"] == f"trace:{EXAMPLE}"
    assert record["workload"]["replay"] is False  # a search re-samples the trace
    names = sorted(t["name"] for t in record["trials"])
    assert names == ["seqs16", "vllm-defaults"]
    for trial in record["trials"]:
        assert trial["state"] == "complete", trial.get("failure")
        points = trial["rate_search"]["points"]
        assert points and all(p["summary"]["failed"] == 0 for p in points)
        # The trace's mix, not fixed lengths: prompts of many sizes were sent.
        summary = points[0]["summary"]
        assert summary["total_input_tokens"] / summary["completed"] > 50
    record_path = out / tiny_model_dir.name / "cpu.json"

    # decide: a looser SLO picks from stored data alone (every stored point meets it).
    loose = vtune("decide", str(record_path), "--slo", "ttft:p95<60s;tpot:p95<10s")
    assert loose.returncode == 0, loose.stdout + loose.stderr
    assert "need a relaunch" not in loose.stdout and "do not bracket" not in loose.stdout
    decided = out / tiny_model_dir.name / "cpu.ttft-p95-60s-tpot-p95-10s.yaml"
    assert decided.exists() and "re-decided from stored measurements" in decided.read_text()
    again = json.loads(decided.with_suffix(".json").read_text())
    assert again["decided"]["stored_data_only"] and again["decided"]["needs_relaunch"] == []
    # ... a stricter one names the candidates whose stored points do not bracket it.
    strict = vtune("decide", str(record_path), "--slo", "ttft:p95<0.01ms")
    assert strict.returncode == 2
    assert strict.stderr.count("\n") == 1 and "vllm-defaults" in strict.stderr
    assert "seqs16" in strict.stderr and "need a relaunch" in strict.stderr

    # plan: replicas and $/1M output tokens, re-derived from the record's numbers.
    target, price = 40.0, 4.10
    planned = vtune(
        "plan", str(record_path), "--target-rate", str(target), "--gpu-hour-price", str(price),
        "--json",
    )  # fmt: skip
    assert planned.returncode == 0, planned.stderr
    rows = {r["name"]: r for r in json.loads(planned.stdout)["rows"]}
    for trial in record["trials"]:
        chosen = trial["rate_search"]["points"][trial["rate_search"]["best_index"]]["summary"]
        rate = chosen["request_throughput"]  # no finalist re-runs: one run is the basis
        per_request = chosen["total_output_tokens"] / chosen["completed"]
        replicas = math.ceil(target / rate)
        row = rows[trial["name"]]
        assert row["replicas"] == replicas and row["gpus"] == replicas
        assert row["cost_per_million_tokens"] == pytest.approx(
            replicas * price * 1e6 / (target * per_request * 3600)
        )
    assert not vllm_processes(before)


def test_conversation_search_records_prefix_cache_hits(tiny_model_dir: Path, tmp_path: Path):
    before = frozenset(vllm_processes())
    record = search(
        tiny_model_dir,
        tmp_path / "profiles",
        "--dataset",
        "conversations:turns=3,think=0.2,system=256,users=8",
        "--input-len",
        "32",
        "--output-len",
        "16",
        "--param",
        "max_num_seqs=16",
        "--param",
        "enable_prefix_caching=true",
    )
    assert record["workload"]["dataset"] == "conversations"
    assert sorted(t["name"] for t in record["trials"]) == ["seqs16-pc1", "vllm-defaults"]
    cached = next(t for t in record["trials"] if t["knobs"].get("enable_prefix_caching") is True)
    assert cached["state"] == "complete", cached.get("failure")
    rates = [
        (p.get("server") or {}).get("prefix_cache_hit_rate")
        for p in cached["rate_search"]["points"]
    ]
    assert any(r is not None and r > 0 for r in rates), rates
    assert not vllm_processes(before)
