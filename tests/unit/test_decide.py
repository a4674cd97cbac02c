"""``vtune decide``: a finished search picked again under another SLO from its stored curves.
A looser SLO picks from stored data alone; a stricter one names the candidates whose stored
points do not bracket it; the new profile and record come from stored data only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from tuner.cli.common import VtuneGroup
from tuner.errors import ParameterError
from tuner.measure.slo import parse_slo
from tuner.search.decide import (
    NOT_MEASURED,
    OK,
    RELAUNCH,
    StoredSummary,
    decide,
    decided_profile,
    decided_record,
)
from tuner.search.record import SearchRecord, load_record

OLD_SLO = "ttft:p95<500ms"
CLI = VtuneGroup(lazy_commands={"decide": "tuner.cli.decide:decide", "plan": "tuner.cli.plan:plan"})


def point(
    rate: float | None,
    ttft_ms: float,
    req_s: float,
    out_per_req: float = 128.0,
    *,
    concurrency: int | None = None,
    failed: int = 0,
) -> dict[str, Any]:
    """A stored load point as the search writes it (vllm bench serve names, milliseconds)."""
    completed = 200
    return {
        "load": {"rate": rate, "concurrency": concurrency, "num_requests": 200, "duration_s": None},
        "slo_met": ttft_ms < 500 and failed == 0,
        "summary": {
            "completed": completed,
            "failed": failed,
            "duration": completed / req_s,
            "request_throughput": req_s,
            "output_throughput": req_s * out_per_req,
            "total_output_tokens": completed * out_per_req,
            "mean_ttft_ms": ttft_ms * 0.6,
            "median_ttft_ms": ttft_ms * 0.5,
            "p50_ttft_ms": ttft_ms * 0.5,
            "p90_ttft_ms": ttft_ms * 0.9,
            "p95_ttft_ms": ttft_ms,
            "p99_ttft_ms": ttft_ms * 1.2,
            "p95_tpot_ms": 20.0,
        },
        "server": None,
    }


def trial(
    name: str, number: int, knobs: dict[str, Any], points: list[dict[str, Any]], best: int | None
) -> dict[str, Any]:
    value = None if best is None else points[best]["summary"]["output_throughput"]
    return {
        "name": name,
        "number": number,
        "knobs": knobs,
        "state": "complete",
        "baseline": name == "vllm-defaults",
        "variant": "none",
        "objective": value,
        "rate_search": {"capacity_rps": 0, "reason": "", "best_index": best, "points": points},
        "best": None,
    }


def record_json(model_dir: str = "/models/m") -> dict[str, Any]:
    """Three measured candidates (one tensor-parallel) and a failed one, under OLD_SLO."""
    trials = [
        trial(
            "vllm-defaults",
            0,
            {},
            [
                point(None, 900, 10.0, concurrency=256),  # saturation: misses 500 ms
                point(2.5, 100, 2.5),
                point(6.25, 300, 6.2),
            ],
            2,
        ),
        trial("seqs64", 1, {"max_num_seqs": 64}, [point(None, 450, 12.0, 100, concurrency=64)], 0),
        trial(
            "seqs16-tp2",
            2,
            {"max_num_seqs": 16, "tensor_parallel_size": 2},
            [point(None, 700, 20.0, concurrency=16), point(5.0, 150, 5.0), point(12.5, 400, 12.4)],
            2,
        ),
        {
            "name": "seqs512",
            "number": 3,
            "knobs": {"max_num_seqs": 512},
            "state": "failed",
            "failure": {"class": "oom"},
        },
    ]
    return {
        "schema": "vtune.search/2",
        "created_at": "2026-01-01T00:00:00+0000",
        "model": {"name": "m", "source": model_dir},
        "gpu": {"name": "h100", "memory_bytes": 80 * 2**30},
        "vllm_version": "0.32.0",
        "workload": {"dataset": "random"},
        "slo": OLD_SLO,
        "objective": "throughput",
        "trials": trials,
        "baseline": "vllm-defaults",
        "best": "seqs16-tp2",
        "finalists": [
            {
                "name": "vllm-defaults",
                "samples": [790.0, 800.0, 810.0],
                "mean": 800.0,
                "ci_low": 768.0,
                "ci_high": 832.0,
            },
            {
                "name": "seqs64",
                "samples": [1200.0, 0.0],
                "mean": 600.0,
                "ci_low": -7000.0,
                "ci_high": 8200.0,
            },
        ],
        "variants": [{"name": "none", "model": model_dir, "flag": None, "source": "original"}],
        "fixed_settings": {"max_model_len": 4096, "api_key": "***"},
        "profile": {"path": "/profiles/m/h100.yaml", "config": {}},
    }


@pytest.fixture
def record_path(tmp_path: Path) -> Path:
    path = tmp_path / "h100.json"
    path.write_text(json.dumps(record_json()))
    return path


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        CLI.main(args, standalone_mode=False)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    except click.ClickException as exc:
        code = exc.exit_code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_stored_summaries_read_in_seconds() -> None:
    s = StoredSummary(point(1.0, 250, 1.0)["summary"])
    assert s.stat("ttft", "p95") == 0.25 and s.stat("ttft", "median") == 0.125
    assert s.stat("itl", "p99") is None


def test_a_looser_slo_picks_from_stored_data_alone() -> None:
    record = SearchRecord.from_json(record_json())
    d = decide(record, parse_slo("ttft:p95<1s"))
    rows = {t.name: t for t in d.trials}
    assert d.needs_relaunch == [] and rows["seqs512"].status == NOT_MEASURED
    assert all(rows[n].status == OK and rows[n].high is None for n in rows if n != "seqs512")
    assert rows["vllm-defaults"].index == 0  # saturation now meets the SLO
    assert d.best == "seqs16-tp2" and rows["seqs16-tp2"].value == pytest.approx(20.0 * 128)
    assert d.gain == pytest.approx(20.0 / 10.0)


def test_a_stricter_slo_names_the_candidates_that_need_a_relaunch() -> None:
    record = SearchRecord.from_json(record_json())
    d = decide(record, parse_slo("ttft:p95<120ms"))
    rows = {t.name: t for t in d.trials}
    assert d.needs_relaunch == ["seqs64", "seqs16-tp2"]
    assert rows["seqs16-tp2"].status == RELAUNCH and rows["seqs16-tp2"].high == 5.0
    base = rows["vllm-defaults"]  # 100 ms at 2.5 req/s, 300 ms by 6.2: bracketed
    assert (base.status, base.index, base.low, base.high) == (OK, 1, 2.5, 6.2)
    assert d.best == "vllm-defaults" and d.gain == pytest.approx(1.0)


def test_goodput_cannot_be_redecided_from_summaries_and_latency_can() -> None:
    record = SearchRecord.from_json(record_json())
    with pytest.raises(ParameterError, match="goodput judges each request"):
        decide(record, parse_slo("ttft:p95<1s"), "goodput")
    d = decide(record, parse_slo("ttft:p95<1s"), "latency")
    assert {t.name: t.value for t in d.trials}["vllm-defaults"] == pytest.approx(20.0)
    assert d.best in ("vllm-defaults", "seqs64", "seqs16-tp2")


def test_the_decided_record_is_a_consistent_search_record() -> None:
    record = SearchRecord.from_json(record_json())
    d = decide(record, parse_slo("ttft:p95<120ms"))
    config = decided_profile(record, "vllm-defaults")
    assert config == {"model": "/models/m", "max-model-len": 4096}  # no secret is written
    data = decided_record(record, d, "h100.json", {"path": "x.yaml", "config": config})
    back = SearchRecord.from_json(data)
    assert back.slo == "ttft:p95<120ms" and back.best == "vllm-defaults" and not back.finalists
    base = back.trial("vllm-defaults")
    assert base is not None and base.chosen_point is not None
    assert base.chosen_point["load"]["rate"] == 2.5 and base.best["rate"] == 2.5
    assert [p["slo_met"] for p in base.points] == [False, True, False]
    assert data["decided"]["needs_relaunch"] == ["seqs64", "seqs16-tp2"]
    assert data["decided"]["previous_slo"] == OLD_SLO and data["decided"]["stored_data_only"]
    assert record_json()["trials"][0]["rate_search"]["best_index"] == 2  # source untouched
    # The cost block is the new choice's, from its re-decided point, at the search's price.
    assert data["cost"]["at"] == "vllm-defaults" and data["cost"]["source"] == "trial"
    tokens = base.best["output_throughput"]
    assert data["cost"]["output_tokens_per_s_per_gpu"] == pytest.approx(tokens)
    assert data["cost"]["usd_per_1m_output_tokens"] is None  # the search had no price
    searched = {"gpus_per_replica": 2, "output_tokens_per_s": 900.0, "gpu_hour_price": 4.0}
    searched |= {"output_tokens_per_s_per_gpu": 450.0, "at": "seqs16-tp2"}
    priced = {**record_json(), "cost": searched}
    d = decide(SearchRecord.from_json(priced), parse_slo("ttft:p95<1s"))
    cost = decided_record(SearchRecord.from_json(priced), d, "h100.json", None)["cost"]
    tp2 = 20.0 * 128  # seqs16-tp2's closed-loop point: 20 req/s x 128 tokens, on 2 GPUs
    assert cost["at"] == "seqs16-tp2" and cost["gpus_per_replica"] == 2
    assert cost["output_tokens_per_s_per_gpu"] == pytest.approx(tp2 / 2)
    assert cost["usd_per_1m_output_tokens"] == pytest.approx(2 * 4.0 * 1e6 / (tp2 * 3600))


def test_cli_writes_the_new_profile_beside_the_record(
    record_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = record_path.read_text()
    code, out, err = run(["decide", str(record_path), "--slo", "ttft:p95<1s"], capsys)
    assert code == 0, err
    yaml_path = record_path.with_name("h100.ttft-p95-1s.yaml")
    assert f"Chosen: seqs16-tp2  ->  {yaml_path}" in out
    config = yaml.safe_load(yaml_path.read_text())
    assert config == {
        "model": "/models/m",
        "max-model-len": 4096,
        "max-num-seqs": 16,
        "tensor-parallel-size": 2,
    }
    assert "re-decided from stored measurements" in yaml_path.read_text()
    assert load_record(yaml_path.with_suffix(".json")).best == "seqs16-tp2"
    assert record_path.read_text() == before


def test_cli_with_a_stricter_slo_names_relaunches_and_with_out_writes_there(
    record_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "profiles"
    code, out, _ = run(
        ["decide", str(record_path), "--slo", "ttft:p95<120ms", "--out", str(out_dir)], capsys
    )
    assert code == 0
    assert "do not bracket the new SLO for: seqs64, seqs16-tp2" in out.replace("\n", " ")
    assert (out_dir / "m" / "h100.yaml").exists() and (out_dir / "m" / "h100.json").exists()


def test_cli_when_nothing_meets_the_slo_is_one_line_and_writes_nothing(
    record_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["decide", str(record_path), "--slo", "ttft:p95<10ms"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "need a relaunch: vllm-defaults, seqs64, seqs16-tp2" in err
    assert sorted(p.name for p in record_path.parent.iterdir()) == ["h100.json"]


def test_cli_json_and_a_bad_record_is_one_line(
    record_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(["decide", str(record_path), "--slo", "ttft:p95<1s", "--json"], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["best"] == "seqs16-tp2" and doc["needs_relaunch"] == []
    bad = tmp_path / "bad.json"
    bad.write_text("[1]")
    code, _, err = run(["decide", str(bad), "--slo", "ttft:p95<1s"], capsys)
    assert code == 2 and err.count("\n") == 1 and "not a vtune search record" in err
