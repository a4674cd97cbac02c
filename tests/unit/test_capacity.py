"""``vtune plan``: replicas x GPUs and $/1M output tokens for a target rate, re-derived here by
hand from the record's own numbers (test_decide's record: three measured candidates, one of
them tensor-parallel, two re-measured finalists)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.unit.test_decide import record_json, run
from tuner.errors import ParameterError
from tuner.outputs.capacity import capacity_plan
from tuner.search.record import SearchRecord

PRICE = 4.10
TARGET = 40.0


def test_replicas_and_cost_re_derived_by_hand() -> None:
    data = record_json()
    record = SearchRecord.from_json(data)
    rows = {r.name: r for r in capacity_plan(record, TARGET, PRICE)}

    # vllm-defaults: re-measured; its interval's low end, 768 tok/s, over the chosen point's
    # 25600 tokens / 200 requests = 128 tokens per request, is 6 req/s per replica.
    chosen = data["trials"][0]["rate_search"]["points"][2]["summary"]
    per_request = chosen["total_output_tokens"] / chosen["completed"]
    rate = data["finalists"][0]["ci_low"] / per_request
    base = rows["vllm-defaults"]
    assert (per_request, rate, base.rate) == (128.0, 6.0, 6.0)
    assert math.ceil(TARGET / rate) == 7
    assert (base.replicas, base.gpus, base.gpus_per_replica) == (7, 7, 1)
    assert base.cost_per_hour == pytest.approx(7 * PRICE)
    # 7 GPUs x $4.10 = $28.70 an hour for 40 req/s x 128 tokens x 3600 s = 18.432M tokens.
    assert base.cost_per_million_tokens == pytest.approx(28.7 / 18.432)
    assert base.tokens_per_s_per_gpu == pytest.approx(40 * 128 / 7)
    assert base.basis == "CI low, 3 runs" and base.extrapolated

    # seqs16-tp2: not re-measured: its SLO-meeting point completed 12.4 req/s on 2 GPUs.
    tp = rows["seqs16-tp2"]
    assert (tp.rate, tp.basis, tp.gpus_per_replica) == (12.4, "1 run", 2)
    assert (tp.replicas, tp.gpus) == (4, 8)  # ceil(40 / 12.4) = 4 replicas x 2 GPUs
    assert tp.cost_per_million_tokens == pytest.approx(8 * PRICE / (40 * 128 * 3600 / 1e6))
    assert tp.measured_tokens_per_s_per_gpu == pytest.approx(12.4 * 128 / 2)

    # seqs64: a re-run missed the SLO (a 0 sample): no safe rate, listed last.
    last = rows["seqs64"]
    assert last.rate is None and last.replicas is None and "missed the SLO" in last.note
    order = [r.name for r in capacity_plan(record, TARGET, PRICE)]
    assert order == ["vllm-defaults", "seqs16-tp2", "seqs64"]  # cheapest (fewest GPUs) first


def test_a_small_target_needs_one_replica_and_is_not_extrapolated() -> None:
    record = SearchRecord.from_json(record_json())
    rows = {r.name: r for r in capacity_plan(record, 5.0)}
    base = rows["vllm-defaults"]
    assert (base.replicas, base.extrapolated, base.cost_per_hour) == (1, False, None)


def test_two_runs_too_few_for_an_interval_fall_back_to_the_slowest_run() -> None:
    data = record_json()
    data["finalists"][0] = {
        "name": "vllm-defaults",
        "samples": [640.0, 768.0],
        "mean": 704.0,
        "ci_low": -110.0,
        "ci_high": 1518.0,
    }
    rows = capacity_plan(SearchRecord.from_json(data), TARGET)
    row = next(r for r in rows if r.name == "vllm-defaults")
    assert row.rate == 5.0 and row.basis == "min of 2 runs" and row.replicas == 8  # 640 / 128
    # 8 GPUs either way: the configuration with more rate per replica (headroom) comes first.
    assert [r.name for r in rows][:2] == ["seqs16-tp2", "vllm-defaults"]


def test_bad_targets_and_prices_are_one_line() -> None:
    record = SearchRecord.from_json(record_json())
    for target, price in ((0.0, None), (math.inf, None), (1.0, -2.0)):
        with pytest.raises(ParameterError):
            capacity_plan(record, target, price)


def test_cli_prints_the_rows_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "h100.json"
    path.write_text(json.dumps(record_json()))
    code, out, err = run(
        ["plan", str(path), "--target-rate", "40", "--gpu-hour-price", "4.10"], capsys
    )
    assert code == 0, err
    lines = [line for line in out.splitlines() if "vllm-defaults" in line]
    assert lines and lines[0].split()[:5] == ["vllm-defaults", "+", "1", "6", "7"]
    assert "1.557" in lines[0] and "28.70" in lines[0]  # 28.7 / 18.432 = 1.557 $/1M tokens
    code, out, _ = run(["plan", str(path), "--target-rate", "40", "--json"], capsys)
    doc = json.loads(out)
    assert code == 0 and [r["replicas"] for r in doc["rows"]] == [7, 4, None]
    nothing = record_json()
    nothing["trials"] = nothing["trials"][3:]
    path.write_text(json.dumps(nothing))
    code, _, err = run(["plan", str(path), "--target-rate", "40"], capsys)
    assert code == 2 and err.count("\n") == 1 and "nothing to plan" in err
