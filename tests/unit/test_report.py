"""`vtune report`: rows from the record, the HTML page, the PNGs, and records with gaps."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from tuner.cli import cli
from tuner.errors import ParameterError
from tuner.outputs.figure import slo_axes
from tuner.outputs.report import profile_text, render_html, trial_views, write_report
from tuner.search.record import SearchRecord, load_record

SAMPLE = Path(__file__).parent.parent / "data" / "sample_record.json"
PNG = b"\x89PNG\r\n\x1a\n"
ALL_PLOTS = {
    "throughput_latency.png",
    "pareto.png",
    "pruning.png",
    "estimate_error.png",
    "kv_usage.png",
    "objective.png",
}


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads(SAMPLE.read_text())


@pytest.fixture(scope="module")
def sample_report(tmp_path_factory):
    return write_report(SAMPLE, tmp_path_factory.mktemp("report"))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG, path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def typed(data: dict) -> SearchRecord:
    return SearchRecord.from_json(data)


def test_trial_views(record):
    views = trial_views(typed(record))
    assert [v.state for v in views].count("complete") == 6
    [best] = [v for v in views if v.is_best]
    assert best.name == record["best"] and best.objective == max(
        v.objective for v in views if v.state == "complete"
    )
    [base] = [v for v in views if v.baseline]
    assert base.name == "vllm-defaults"
    [failed] = [v for v in views if v.state == "failed"]
    assert failed.failure_class == "OOM" and failed.output_throughput is None
    assert failed.points == [] and failed.peak_kv is None
    t = record["trials"][5]
    servers = [p["server"] for p in t["rate_search"]["points"]]
    v5 = views[5]
    assert v5.peak_kv == max(s["peak_kv_cache_usage"] for s in servers)
    assert v5.preemptions == sum(s["preemptions"] for s in servers)
    assert v5.latency_ms["p95_tpot"] == t["best"]["p95_tpot_ms"]
    assert v5.measured_max_tps == max(
        p["summary"]["output_throughput"] for p in t["rate_search"]["points"]
    )


def test_report_of_the_sample(record, sample_report):
    rep = sample_report
    assert {p.name for p in rep.images} == ALL_PLOTS
    for image in rep.images:
        w, h = png_size(image)
        assert w >= 600 and h >= 400, (image.name, w, h)
    page = rep.html.read_text()
    srcs = re.findall(r"<img src='([^']+)'", page)
    assert sorted(srcs) == sorted(ALL_PLOTS)  # relative links, all present beside the page
    assert all((rep.html.parent / s).is_file() for s in srcs)
    for name in (t["name"] for t in record["trials"]):
        assert name in page
    assert "OOM: torch.OutOfMemoryError" in page
    assert f"×{record['gain']['ratio']:.2f}" in page
    assert "Clear winner" in page  # within_noise is false in the sample
    for rule, n in record["plan"]["counts_by_rule"].items():
        assert f'<td class="l">{rule}</td><td class="">{n}</td>' in page
    # the profile: rendered from the record's config (no YAML beside the sample)
    assert "max-num-batched-tokens: 16384" in page
    assert "<script" not in page


def test_profile_beside_the_record_is_shown_as_is(record, tmp_path):
    rec_path = tmp_path / "h100.json"
    rec_path.write_text(json.dumps(record))
    (tmp_path / "h100.yaml").write_text("# the exact file\nmodel: m\nmax-num-seqs: 7\n")
    rec = typed(record)
    text = profile_text(rec, rec_path)
    assert text == "# the exact file\nmodel: m\nmax-num-seqs: 7\n"
    assert "# the exact file\nmodel: m" in render_html(rec, trial_views(rec), {}, text)
    assert "max-num-seqs: 256" in profile_text(rec, tmp_path / "other.json")


def test_html_is_escaped(record):
    rec = copy.deepcopy(record)
    rec["trials"][1]["name"] = "<script>alert(1)</script>"
    page = render_html(typed(rec), trial_views(typed(rec)), {}, "model: <b>\n")
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "model: &lt;b&gt;" in page


def test_the_outcome_shows_the_cost_block(record):
    assert "class='cost'" not in render_html(typed(record), trial_views(typed(record)), {}, None)
    cost = {"gpus_per_replica": 2, "output_tokens_per_s": 3000.0}
    cost |= {"output_tokens_per_s_per_gpu": 1500.0, "gpu_hour_price": 4.1}
    cost |= {"usd_per_1m_output_tokens": 2 * 4.1 * 1e6 / (3000.0 * 3600), "source": "trial"}
    rec = typed({**record, "cost": cost})
    page = render_html(rec, trial_views(rec), {}, None)
    assert (
        "<p class='cost'>Measured: 1,500 output tok/s per GPU (2 GPUs, trial); $0.76 per 1M "
        "output tokens at $4.10/GPU-hour.</p>"
    ) in page


def minimal(trials: list[dict], **extra) -> dict:
    return {"schema": "vtune.search/1", "trials": trials, **extra}


def test_sparse_records_still_report(record, tmp_path):
    """No SLO, no plan, no profile, closed-loop points without a rate, None summaries."""
    closed = copy.deepcopy(record["trials"][2])
    for p in closed["rate_search"]["points"]:
        p["load"] = {"rate": None, "concurrency": 4, "num_requests": 16}
        p["summary"]["slo"] = None
        p["server"]["series"] = []
    closed["best"]["p99_ttft_ms"] = None
    closed["estimate"] = {}
    failed = copy.deepcopy(record["trials"][3])
    pruned = {"name": "p", "knobs": {}, "state": "pruned"}
    cases = {
        "only-failed": minimal([failed]),
        "closed-loop": minimal([closed, failed, pruned], slo=None, best=closed["name"]),
        "empty": minimal([]),
    }
    made = {}
    for name, rec in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(rec))
        rep = write_report(path, tmp_path / name)
        assert rep.html.is_file()
        for image in rep.images:
            png_size(image)
        made[name] = {p.name for p in rep.images}
    # no predictions and no KV series: those two plots are left out, not drawn empty
    assert made["closed-loop"] == ALL_PLOTS - {"estimate_error.png", "kv_usage.png"}
    assert made["empty"] == set()
    assert made["only-failed"] == {"objective.png", "pruning.png"}


def test_slo_picks_the_latency_axes():
    assert slo_axes("ttft:p99<2s;tpot:p95<250ms") == {
        "ttft": ("p99", 2000.0),
        "tpot": ("p95", 250.0),
    }
    assert slo_axes(None) == {"ttft": ("p95", None), "tpot": ("p95", None)}
    assert slo_axes("e2el<10s") == {"ttft": ("p95", None), "tpot": ("p95", None)}
    assert slo_axes("garbage") == {"ttft": ("p95", None), "tpot": ("p95", None)}


def test_not_a_record(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ParameterError, match="not a vtune search record"):
        load_record(bad)
    bad.write_text("{not json")
    with pytest.raises(ParameterError, match="not valid JSON"):
        load_record(bad)


def test_cli(tmp_path, capsys):
    from tuner.cli import main

    rec = json.loads(SAMPLE.read_text())
    rec["trials"] = rec["trials"][:2]
    path = tmp_path / "h100.json"
    path.write_text(json.dumps(rec))
    result = CliRunner().invoke(cli, ["report", str(path.with_suffix(".yaml"))])
    assert result.exit_code == 0, result.output
    out = tmp_path / "h100-report"  # the default: beside the record
    assert result.output.splitlines()[0] == f"report: {out / 'index.html'}"
    assert len(result.output.splitlines()) == 1 + len(ALL_PLOTS)
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path / "missing.json")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "cannot read" in err


def test_many_trials_stay_readable(record, tmp_path):
    """40 trials: figures keep a bounded size, the KV grid caps its panels."""
    rec = copy.deepcopy(record)
    rec["trials"] = []
    for i in range(40):
        t = copy.deepcopy(record["trials"][i % 7])
        t["number"], t["baseline"] = i, i == 0
        t["name"] = t["name"] if i < 7 else f"{t['name']}-{i}"
        rec["trials"].append(t)
    path = tmp_path / "many.json"
    path.write_text(json.dumps(rec))
    rep = write_report(path, tmp_path / "r")
    sizes = {p.name: png_size(p) for p in rep.images}
    assert set(sizes) == ALL_PLOTS
    assert all(w <= 2000 for w, _ in sizes.values()), sizes
    assert sizes["kv_usage.png"][1] <= 2200  # 12 panels at most: 6 rows
