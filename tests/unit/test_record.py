"""The typed search record: built once by the search, written as /2, read back (both /1 and
/2) by the console, `vtune report`, the exporter and `vtune deploy`; malformed records end in
one line; the objective's direction and the trial order each live in one place."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from io import StringIO
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from rich.console import Console

from tests.configs import TINY_LLAMA_CONFIG
from tuner.cli import cli, main
from tuner.cli.console import print_plan, print_search_result
from tuner.cli.search import tune_config
from tuner.errors import ParameterError
from tuner.outputs.prometheus import SearchExporter
from tuner.plan.prune import Planned, Variant
from tuner.search.objective import direction, gain_ratio, is_better
from tuner.search.outcome import TuneOutcome
from tuner.search.prepare import prepare
from tuner.search.record import (
    SCHEMA,
    STATE_COMPLETE,
    SearchRecord,
    TrialRecord,
    load_record,
)
from tuner.search.run import run_search
from tuner.search.runner import SearchSettings, directions, trial_order

SAMPLE = Path(__file__).parent.parent / "data" / "sample_record.json"
VLLM_VERSION = "0.31.1"  # not the default image's version: deploy must read it from the record
CONFIG = TINY_LLAMA_CONFIG


class FakeRunner:
    """Measures nothing: throughput = 100 x max_num_seqs (vLLM's default 128 for the
    baseline), latency = 1000 / max_num_seqs; one load point per trial with the server's
    figures, so every output has something to show."""

    def __init__(self, objective: str = "throughput") -> None:
        self.objective = objective
        self.measured: list[str] = []

    def value(self, seqs: int) -> float:
        return 1000.0 / seqs if self.objective == "latency" else 100.0 * seqs

    def engine_settings(self, cand: object, variant: Variant) -> object:
        return (variant.model, cand)  # what decides whether finalists share a launch

    def measure(
        self, number: int, planned: Planned, variant: Variant, incumbent: float | None = None
    ) -> TrialRecord:
        cand = planned.candidate
        self.measured.append(planned.name)
        seqs = cand.max_num_seqs or 128
        summary = {
            "output_throughput": 100.0 * seqs,
            "request_throughput": seqs / 10,
            "p95_ttft_ms": 10.0 + seqs,
            "p95_tpot_ms": 1.0 + seqs / 100,
        }
        point = {
            "load": {"rate": 2.0, "concurrency": None, "num_requests": 20},
            "slo_met": True,
            "summary": summary,
            "server": {
                "peak_kv_cache_usage": min(1.0, seqs / 256),
                "preemptions": 0,
                "series": [[0.0, 0.0, 0, 0], [1.0, min(1.0, seqs / 256), min(seqs, 20), 0]],
            },
        }
        return TrialRecord(
            planned.name,
            cand.knobs(),
            STATE_COMPLETE,
            objective=self.value(seqs),
            number=number,
            baseline=cand.is_baseline,
            estimate={"predicted_tokens_per_s": 90.0 * seqs},
            server_info={"vllm_version": VLLM_VERSION},
            rate_search={"capacity_rps": 2.0, "reason": "fake", "best_index": 0, "points": [point]},
            best={**summary, "rate": 2.0},
        )

    def remeasure(self, record: TrialRecord, variant: Variant, repeats: int) -> list[float]:
        return [(record.objective or 0.0) * (1 + 0.001 * (i + 1)) for i in range(repeats)]


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(CONFIG))
    return tmp_path / "m"


def search(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch, *args: str
) -> tuple[TuneOutcome, FakeRunner]:
    """``vtune search`` with the fake runner in place of vLLM."""
    objective = args[args.index("--objective") + 1] if "--objective" in args else "throughput"
    runner = FakeRunner(objective)
    monkeypatch.setattr("tuner.search.run.VllmTrialRunner", lambda setup, observer: runner)
    argv = ["--model", str(model_dir), "--gpu", "cpu", "--out", str(tmp_path / "profiles")]
    prep = prepare(tune_config([*argv, "--param", "max_num_seqs=4,32,256", *args]))
    return run_search(prep), runner


# --- writing and reading ------------------------------------------------------------------------


def test_a_written_v2_record_round_trips_and_reports(tmp_path, model_dir, monkeypatch):
    outcome, _ = search(tmp_path, model_dir, monkeypatch)
    path = outcome.prepared.json_path
    written = json.loads(path.read_text())
    assert written["schema"] == SCHEMA == "vtune.search/2"
    assert written == outcome.record.to_json()  # the JSON beside the profile is to_json()
    again = load_record(path)
    assert again == outcome.record
    assert again.to_json() == written
    assert again.best == "seqs256" and again.vllm_version == VLLM_VERSION
    assert again.gain is not None and again.gain.ratio == pytest.approx(2.0)
    assert again.profile is not None and again.profile.path == str(outcome.yaml_path)

    result = CliRunner().invoke(cli, ["report", str(path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "r" / "index.html").read_text()
    assert all(t.name in page for t in again.trials)
    assert {p.name for p in (tmp_path / "r").glob("*.png")} >= {"kv_usage.png", "pareto.png"}

    result = CliRunner().invoke(cli, ["deploy", str(path)])
    assert result.exit_code == 0, result.output
    assert f"vllm/vllm-openai:v{VLLM_VERSION}" in result.output  # read from the record


def test_latency_gain_and_choice_follow_the_direction(tmp_path, model_dir, monkeypatch):
    outcome, _ = search(tmp_path, model_dir, monkeypatch, "--objective", "latency", "--rate", "2")
    record = outcome.record
    objectives = {t.name: t.objective for t in record.trials}
    assert record.best == min(objectives, key=lambda n: objectives[n]) == "seqs256"
    assert record.gain is not None
    assert record.gain.ratio == pytest.approx(objectives["vllm-defaults"] / objectives["seqs256"])
    assert record.gain.ratio > 1  # "times better", not "times higher"
    assert record.gain.ratio_of_finalist_means is not None
    assert record.gain.ratio_of_finalist_means > 1


def test_the_v1_sample_still_reports_and_deploys(tmp_path):
    data = json.loads(SAMPLE.read_text())
    assert data["schema"] == "vtune.search/1"
    data["vllm_version"] = VLLM_VERSION
    path = tmp_path / "h100.json"
    path.write_text(json.dumps(data))
    rec = load_record(path)
    assert rec.plan.kept == data["plan"]["candidates"]  # a count in /1, names in /2
    assert [t.name for t in rec.trials] == [t["name"] for t in data["trials"]]
    result = CliRunner().invoke(cli, ["report", str(path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "h100-report" / "index.html").is_file()
    (tmp_path / "h100.yaml").write_text("model: meta-llama/Llama-3.1-8B-Instruct\n")
    result = CliRunner().invoke(cli, ["deploy", str(path)])
    assert result.exit_code == 0, result.output
    assert f"vllm/vllm-openai:v{VLLM_VERSION}" in result.output


def test_v1_field_names_are_kept_in_v2():
    data = json.loads(SAMPLE.read_text())
    out = SearchRecord.from_json(data).to_json()
    assert set(data) <= set(out)
    for part in ("study", "plan", "gain"):
        assert set(data[part]) <= set(out[part]), part
    assert [set(t) for t in data["trials"]] == [set(t) for t in out["trials"]]
    assert set(data["finalists"][0]) == set(out["finalists"][0])
    assert out["plan"]["candidates"] == data["plan"]["candidates"]  # the /1 count survives


@pytest.mark.parametrize(
    "content,needle",
    [
        ("[1, 2]", "is not a vtune search record (a JSON list, not an object"),
        ('"text"', "a JSON string, not an object"),
        ('{"schema": "vtune.search/9", "trials": []}', "schema 'vtune.search/9'"),
        ('{"trials": []}', "schema None"),
        ('{"schema": "vtune.search/2", "trials": {}}', "trials is a JSON object, not a list"),
        ('{"schema": "vtune.search/2", "trials": [[1]]}', "an entry of trials is a JSON list"),
        ('{"schema": "vtune.search/2", "trials": [{"name": "x"}]}', "trials[0] has no name"),
        ('{"schema": "vtune.search/1", "plan": [1]}', "plan is a JSON list, not an object"),
        (
            '{"schema": "vtune.search/2", "trials": [{"name": "x", "state": "complete", '
            '"best": [1]}]}',
            "trials[0].best is a JSON list",
        ),
    ],
)
def test_a_malformed_record_is_one_line(tmp_path, capsys, content, needle):
    path = tmp_path / "cpu.json"
    path.write_text(content)
    with pytest.raises(ParameterError, match=re.escape(needle)):
        load_record(path)
    (tmp_path / "cpu.yaml").write_text("model: m\n")
    for argv in (["report", str(path)], ["deploy", str(tmp_path / "cpu.yaml")]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1 and needle in err, (argv, err)


# --- the objective's direction ------------------------------------------------------------------


def test_the_objective_table_decides_every_comparison():
    assert [direction(o) for o in ("throughput", "goodput", "latency")] == [
        "maximize",
        "maximize",
        "minimize",
    ]
    assert is_better("latency", 1.0, 2.0) and not is_better("throughput", 1.0, 2.0)
    assert is_better("goodput", 0.0, None) and not is_better("latency", None, 1.0)
    assert not is_better("throughput", float("nan"), 1.0)
    assert gain_ratio("latency", 50.0, 100.0) == 2.0 == gain_ratio("throughput", 200.0, 100.0)
    assert gain_ratio("throughput", 1.0, 0.0) is None and gain_ratio("latency", None, 1.0) is None
    assert SearchSettings(objective="latency").minimize
    assert directions(SearchSettings(objective="latency")) == ["minimize"]
    assert directions(SearchSettings(objective="goodput")) == ["maximize"]
    with pytest.raises(ParameterError, match="unknown objective 'speed'"):
        direction("speed")


def test_the_exporter_finishes_with_the_typed_record(tmp_path, model_dir, monkeypatch):
    outcome, _ = search(tmp_path, model_dir, monkeypatch, "--objective", "latency", "--rate", "2")
    exp = SearchExporter(info={"objective": "latency"})
    for trial in outcome.record.trials:
        exp.on_trial_end(trial)
    exp.on_finish(outcome.record)
    values = {s.name: s.value for m in exp.registry.collect() for s in m.samples}
    assert values["vtune_best_objective"] == min(t.objective for t in outcome.record.trials)
    assert values["vtune_gain_ratio"] == pytest.approx(outcome.record.gain.ratio)


# --- the trial order ----------------------------------------------------------------------------


def test_the_dry_run_prints_the_order_the_search_queues(tmp_path, model_dir, monkeypatch):
    args = ["--param", "max_num_batched_tokens=1024,4096", "--budget", "4", "--repeats", "0"]
    outcome, runner = search(tmp_path, model_dir, monkeypatch, *args)
    prep = outcome.prepared
    order = trial_order(prep.plan, prep.config.settings)
    assert order.sampler == "TPE" and order.queued[0].name == "vllm-defaults"
    assert runner.measured == [p.name for p in order.queued]  # the budget: just the queue
    buf = StringIO()
    print_plan(prep, verbose=True, console=Console(width=200, file=buf))
    text = buf.getvalue()
    assert f"the first {len(order.queued)} run in this order, then TPE chooses" in text
    rows = [w[1] for w in map(str.split, text.splitlines()) if w and w[0].isdigit()]
    assert rows == [p.name for p in order.candidates]
    grid = trial_order(prep.plan, replace(prep.config.settings, budget=None))
    assert grid.sampler is None and grid.rest == ()
    assert [p.name for p in grid.queued] == [p.name for p in prep.plan.all()]


# --- the console ----------------------------------------------------------------------------------


def test_trial_names_are_never_cut_at_80_columns():
    rec = load_record(SAMPLE)
    long = replace(rec.trials[2], name="seqs256-mbt16384-gmu0.95-kvfp8-cp1-pc1-bs32-qawq", number=8)
    for record in (rec, replace(rec, trials=(*rec.trials, long))):
        buf = StringIO()
        outcome = SimpleNamespace(record=record, yaml_path=Path("h100.yaml"))
        print_search_result(outcome, Console(width=80, file=buf))
        text = buf.getvalue()
        for trial in record.trials:
            assert trial.name in text, trial.name
        assert "…" not in text
    # At 80 columns the sample's names fit beside their figures: one line per trial.
    buf = StringIO()
    print_search_result(SimpleNamespace(record=rec, yaml_path=None), Console(width=80, file=buf))
    lines = buf.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines)
    [chosen] = [line for line in lines if "seqs256-mbt16384-kvfp8 *" in line]
    assert "6.71" in chosen and "69" in chosen  # its objective and peak KV % on the same line
