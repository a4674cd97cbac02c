"""The search record's cost block and the profile's "Measured:" line: tokens/s per GPU and, with
``--gpu-hour-price``, $/1M output tokens, re-derived here by hand from the record's own numbers
(X tokens/s, k GPUs per replica, price P). Searches run with test_record's fake runner (no
vLLM); the whole file takes about 3 s."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from tests.configs import TINY_LLAMA_CONFIG
from tests.unit.test_decide import record_json
from tests.unit.test_record import SAMPLE, FakeRunner, search
from tuner.analytic.cost import gpus_per_replica, usd_per_million_tokens
from tuner.cli import cli, main
from tuner.errors import ParameterError
from tuner.outputs.capacity import capacity_plan
from tuner.search.cost import cost_info, cost_line
from tuner.search.decide import decide, decided_record
from tuner.search.record import STATE_COMPLETE, SearchRecord, TrialRecord, load_record
from tuner.search.record_parts import CostInfo

PRICE = 4.10


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(TINY_LLAMA_CONFIG))
    return tmp_path / "m"


def by_hand(x: float, k: int, price: float | None) -> dict[str, float | None]:
    """The block's figures from X, k and P, written out rather than calling the code."""
    return {
        "output_tokens_per_s_per_gpu": x / k,
        "usd_per_1m_output_tokens": None if price is None else price * k / (x * 3600) * 1e6,
    }


def test_the_record_and_profile_carry_the_cost_re_derived_by_hand(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outcome, _ = search(tmp_path, model_dir, monkeypatch, "--gpu-hour-price", str(PRICE))
    written = json.loads(outcome.prepared.json_path.read_text())
    cost = written["cost"]
    # The chosen candidate was re-measured: X is its finalists' mean, on 1 "GPU" (cpu).
    fin = next(f for f in written["finalists"] if f["name"] == written["best"])
    x = sum(fin["samples"]) / len(fin["samples"])
    assert len(fin["samples"]) > 1 and cost["output_tokens_per_s"] == pytest.approx(x)
    assert (cost["at"], cost["source"], cost["gpus_per_replica"]) == (
        "seqs256",
        "finalist mean",
        1,
    )
    assert cost["gpu_hour_price"] == PRICE
    hand = by_hand(x, 1, PRICE)
    assert cost["output_tokens_per_s_per_gpu"] == pytest.approx(hand["output_tokens_per_s_per_gpu"])
    assert cost["usd_per_1m_output_tokens"] == pytest.approx(hand["usd_per_1m_output_tokens"])
    # 25,600 tok/s (+0.1 %, +0.2 % re-runs) on one GPU at $4.10/hour: about $0.044 per 1M.
    assert cost["usd_per_1m_output_tokens"] == pytest.approx(4.10e6 / (25625.6 * 3600), rel=1e-3)

    again = load_record(outcome.prepared.json_path)
    assert again.cost == outcome.record.cost and again.to_json() == written

    text = outcome.yaml_path.read_text()
    header = [line for line in text.splitlines() if line.startswith("# Measured:")]
    assert header == [
        f"# Measured: {x:,.0f} output tok/s per GPU (1 GPU, finalist mean); "
        f"${hand['usd_per_1m_output_tokens']:.3g} per 1M output tokens at $4.10/GPU-hour"
    ]
    # Comments only: the YAML still loads as exactly the profile's vLLM keys.
    assert yaml.safe_load(text) == outcome.record.profile.config


def test_without_a_price_the_cost_is_null_and_the_profile_names_no_price(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outcome, _ = search(tmp_path, model_dir, monkeypatch)
    cost = json.loads(outcome.prepared.json_path.read_text())["cost"]
    assert cost["gpu_hour_price"] is None and cost["usd_per_1m_output_tokens"] is None
    assert cost["output_tokens_per_s_per_gpu"] == cost["output_tokens_per_s"] > 0
    text = outcome.yaml_path.read_text()
    assert "# Measured: " in text and "GPU-hour" not in text and "per 1M" not in text


def test_other_objectives_use_the_chosen_points_output_throughput(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ("--objective", "latency", "--rate", "2", "--gpu-hour-price", "2")
    outcome, _ = search(tmp_path, model_dir, monkeypatch, *args)
    record = outcome.record
    chosen = record.trial(record.best)
    x = chosen.best["output_throughput"]  # not the latency objective, not a finalist mean
    assert record.cost is not None and x == 25600.0
    assert (record.cost.output_tokens_per_s, record.cost.source) == (x, "trial")
    assert record.cost.usd_per_1m_output_tokens == pytest.approx(2 * 1 / (x * 3600) * 1e6)


def test_a_tensor_parallel_candidate_halves_the_per_gpu_figure() -> None:
    point = {"slo_met": True, "summary": {"output_throughput": 3000.0}}
    rate_search = {"best_index": 0, "points": [point]}

    def trial(knobs: dict[str, int]) -> TrialRecord:
        return TrialRecord("c", knobs, STATE_COMPLETE, 3000.0, rate_search=rate_search)

    one = cost_info("throughput", trial({}), (), {}, on_cpu=False, gpu_hour_price=PRICE)
    two = cost_info(
        "throughput", trial({"tensor_parallel_size": 2}), (), {}, False, gpu_hour_price=PRICE
    )
    assert one is not None and two is not None
    assert (one.gpus_per_replica, two.gpus_per_replica) == (1, 2)
    assert two.output_tokens_per_s == one.output_tokens_per_s == 3000.0
    assert two.output_tokens_per_s_per_gpu == one.output_tokens_per_s_per_gpu / 2 == 1500.0
    assert two.usd_per_1m_output_tokens == pytest.approx(PRICE * 2 / (3000 * 3600) * 1e6)
    assert two.usd_per_1m_output_tokens == pytest.approx(2 * one.usd_per_1m_output_tokens)
    assert "1,500 output tok/s per GPU (2 GPUs, trial)" in cost_line(two)
    # Pipeline stages multiply in, from the search's fixed settings too; cpu counts one.
    fixed = {"pipeline-parallel-size": 2}
    four = cost_info("throughput", trial({"tensor_parallel_size": 2}), (), fixed, False)
    assert four is not None and four.gpus_per_replica == 4 and four.usd_per_1m_output_tokens is None
    cpu = cost_info("throughput", trial({"tensor_parallel_size": 2}), (), fixed, on_cpu=True)
    assert cpu is not None and cpu.gpus_per_replica == 1


def test_gpus_per_replica_reads_knobs_over_fixed_settings() -> None:
    assert gpus_per_replica({}) == 1
    assert gpus_per_replica({"tensor_parallel_size": 4}, {"tensor_parallel_size": 2}) == 4
    assert gpus_per_replica({}, {"tensor_parallel_size": 2, "pipeline_parallel_size": 3}) == 6
    assert gpus_per_replica({"tensor_parallel_size": True}, {}) == 1  # not a count
    assert gpus_per_replica({"tensor_parallel_size": 8}, on_cpu=True) == 1


def test_nothing_measured_means_no_cost_block() -> None:
    empty = TrialRecord("c", {}, STATE_COMPLETE, None)
    assert cost_info("throughput", None, (), {}, False) is None
    assert cost_info("throughput", empty, (), {}, False, PRICE) is None
    assert cost_info("goodput", empty, (), {}, False, PRICE) is None


def test_vtune_plan_uses_the_same_formula_and_counts_pipeline_stages() -> None:
    data = record_json()
    row = next(r for r in capacity_plan(SearchRecord.from_json(data), 40.0, PRICE))
    expected = usd_per_million_tokens(row.gpus, PRICE, 40.0 * row.output_tokens_per_request)
    assert row.cost_per_million_tokens == expected
    data["fixed_settings"]["pipeline_parallel_size"] = 2
    rows = {r.name: r for r in capacity_plan(SearchRecord.from_json(data), 40.0)}
    assert rows["seqs16-tp2"].gpus_per_replica == 4 and rows["vllm-defaults"].gpus_per_replica == 2


def test_records_without_the_block_still_read_and_a_bad_block_is_one_line() -> None:
    data = record_json()
    record = SearchRecord.from_json(data)
    assert record.cost is None and "cost" not in record.to_json()
    assert SearchRecord.from_json(json.loads(SAMPLE.read_text())).cost is None  # vtune.search/1
    data["cost"] = [1]
    with pytest.raises(ParameterError, match="cost is a JSON list, not an object"):
        SearchRecord.from_json(data)
    data["cost"] = {"gpus_per_replica": 0, "output_tokens_per_s": "many"}
    assert SearchRecord.from_json(data).cost is None  # nothing to say: read as absent
    block = CostInfo(2, 1000.0, 500.0, None, None, "seqs16-tp2", "trial")
    data["cost"] = block.to_json()
    assert SearchRecord.from_json(data).cost == block


def test_a_re_decided_record_carries_the_new_choices_cost_not_the_old() -> None:
    from tuner.measure.slo import parse_slo

    old = CostInfo(2, 1.0, 0.5, gpu_hour_price=3.0, at="seqs16-tp2", source="finalist mean")
    record = SearchRecord.from_json({**record_json(), "cost": old.to_json()})
    decision = decide(record, parse_slo("ttft:p95<1s"))
    cost = decided_record(record, decision, "h100.json", None)["cost"]
    assert cost["at"] == decision.best and cost["source"] == "trial"  # its stored point
    assert cost["output_tokens_per_s"] != old.output_tokens_per_s
    assert cost["gpu_hour_price"] == 3.0  # the search's price carries over


@pytest.mark.parametrize("price", ["-1", "0", "nan", "inf", "abc"])
def test_a_bad_price_is_one_line_and_exit_2(
    price: str, tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["search", "--model", str(model_dir), "--gpu", "cpu", "--out", str(tmp_path / "p")]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--gpu-hour-price", price, "--dry-run"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "--gpu-hour-price" in err, err


def test_the_console_ends_with_the_cost_line(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = FakeRunner()
    monkeypatch.setattr("tuner.search.run.VllmTrialRunner", lambda setup, observer: runner)
    argv = ["search", "--model", str(model_dir), "--gpu", "cpu", "--out", str(tmp_path / "p")]
    argv += ["--param", "max_num_seqs=4,32", "--gpu-hour-price", "4.10"]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("Measured: "))
    assert line.endswith("per 1M output tokens at $4.10/GPU-hour")
