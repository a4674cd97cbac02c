"""``vtune bench`` and ``run_bench``: bad input in one line with exit 2, --url against the fake
server, JSON output, secrets, and server failures (start and mid-run) as results."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fake_vllm import ThreadedFake, fake_vllm
from tests.fakes import Behaviour, FakeServer
from tuner.cli import main
from tuner.engine.log import EngineFailure, FailureClass
from tuner.engine.server import EngineSettings, LaunchConfig
from tuner.load.generator import LoadConfig
from tuner.load.workload import LengthRange
from tuner.measure.bench import BenchConfig, WorkloadSpec, run_bench, write_json
from tuner.measure.slo import parse_slo


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    out = capsys.readouterr()
    return int(info.value.code or 0), out.out, out.err


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    with ThreadedFake(Behaviour(ttft_s=0.005, token_delay_s=0.001)) as srv:
        yield srv


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--num-prompts", "0"], "--num-prompts"),
        (["--rate", "-1"], "--rate"),
        (["--rate", "0"], "--rate"),
        (["--concurrency", "0"], "--concurrency"),
        (["--burstiness", "-2"], "--burstiness"),
        (["--input-len", "abc"], "--input-len"),
        (["--slo", "ttft:p42<1ms"], "unknown statistic"),
        (["--gpu", "nosuchgpu"], "unknown GPU"),
        (["--engine-arg", "=5"], "--engine-arg"),
        (["--engine-arg", "max_num_seqs=many"], "max_num_seqs"),
        (["--duration", "5"], "duration-limited run"),
    ],
)
def test_bad_options_exit_2_in_one_line(
    extra: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    code, _, err = run_cli(["bench", "--model", str(tmp_path), *extra], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("vtune: error:"), err
    assert fragment in err


def test_missing_and_malformed_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    code, _, err = run_cli(
        ["bench", "--model", str(tmp_path), "--dataset", str(tmp_path / "nope.json")], capsys
    )
    assert code == 2 and "dataset file not found" in err and err.count("\n") == 1
    bad = tmp_path / "bad.json"
    bad.write_text("[{]")
    code, _, err = run_cli(["bench", "--model", str(tmp_path), "--dataset", str(bad)], capsys)
    assert code == 2 and "not valid JSON" in err and err.count("\n") == 1


def test_unreachable_url_exits_2_quickly(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    t0 = time.monotonic()
    code, _, err = run_cli(
        ["bench", "--model", str(tmp_path), "--url", "http://127.0.0.1:9"], capsys
    )
    assert code == 2 and "cannot reach" in err and err.count("\n") == 1
    assert time.monotonic() - t0 < 10


def test_missing_tokenizer_exits_2(
    fake: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    code, _, err = run_cli(
        ["bench", "--model", str(tmp_path / "nothing"), "--url", fake.url], capsys
    )
    assert code == 2 and "tokenizer" in err and err.count("\n") == 1


# --- --url against the fake -----------------------------------------------------------------------


def test_bench_url_prints_table_and_writes_json(
    fake: FakeServer,
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-very-secret")
    out_json = tmp_path / "res" / "bench.json"
    code, out, err = run_cli(
        [
            "bench",
            "--model",
            str(tiny_model_dir),
            "--url",
            fake.url,
            "--num-prompts",
            "12",
            "--input-len",
            "16:24",
            "--output-len",
            "6",
            "--concurrency",
            "4",
            "--warmup",
            "2",
            "--slo",
            "ttft:p99<5s;tpot<1s",
            "--json",
            str(out_json),
        ],
        capsys,
    )
    assert code == 0, err
    assert "request throughput" in out and "TTFT" in out and "met" in out
    data = json.loads(out_json.read_text())
    assert data["status"] == "ok" and data["completed"] == 12 and data["failed"] == 0
    assert data["total_output_tokens"] == 72
    assert data["max_concurrency"] == 4 and data["warmup_requests"] == 2
    assert len(data["ttfts"]) == 12 and all(16 <= n <= 24 for n in data["input_lens"])
    assert data["request_goodput"] == pytest.approx(data["request_throughput"])
    for key in ("mean_ttft_ms", "p99_tpot_ms", "median_itl_ms", "std_e2el_ms"):
        assert data[key] is not None and data[key] > 0
    assert data["server_metrics"]["generation_tokens"] == 72.0
    assert {c["term"] for c in data["slo_check"]} == {"ttft:p99<5s", "tpot:p99<1s"}
    # the key went to the server, and nowhere else
    assert fake.stats.headers[-1]["Authorization"] == "Bearer sk-very-secret"
    assert "sk-very-secret" not in out_json.read_text() + out + err
    assert not list(out_json.parent.glob(".bench.json.*"))  # no temp file left


def test_bench_url_with_a_failing_server_keeps_error_records(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    with ThreadedFake(Behaviour(status=503)) as srv:
        code, out, _ = run_cli(
            [
                "bench",
                "--model",
                str(tiny_model_dir),
                "--url",
                srv.url,
                "--num-prompts",
                "3",
                "--warmup",
                "0",
                "--json",
                str(tmp_path / "r.json"),
            ],
            capsys,
        )
    assert code == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["completed"] == 0 and data["failed"] == 3
    assert all(e.startswith("HTTP 503") for e in data["errors"])
    assert "HTTP 503" in out


# --- run_bench with a launched server (the engine replaced by fakes) ----------------------------


def _launched_cfg(tiny_model_dir: Path, **load: Any) -> BenchConfig:
    return BenchConfig(
        model=str(tiny_model_dir),
        workload=WorkloadSpec(
            num_prompts=40, input_len=LengthRange.fixed(8), output_len=LengthRange.fixed(20)
        ),
        load=LoadConfig(**{"rate": 20.0, "warmup": 1, **load}),
        engine=EngineSettings(model=str(tiny_model_dir)),
        launch=LaunchConfig(device="cpu"),
        slo=parse_slo("ttft<1s"),
    )


def test_failed_start_is_a_result_with_its_class(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    import tuner.engine.server

    failure = EngineFailure(FailureClass.INVALID_OPTION, "unrecognized arguments: --no-such-flag")
    monkeypatch.setattr(tuner.engine.server, "VllmServer", fake_vllm(start_failure=failure))
    result = run_bench(_launched_cfg(tiny_model_dir))
    assert result.status == "failed" and result.failure == "invalid_option"
    assert result.measurement is None and "--no-such-flag" in (result.message or "")
    assert result.to_json()["failure"] == "invalid_option"
    assert result.server_info == {"log_path": "/tmp/fake-vllm.log"}  # where to look


def test_server_death_mid_run_keeps_partial_records(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import tuner.engine.server

    dying = fake_vllm(die_after_s=0.8)
    monkeypatch.setattr(tuner.engine.server, "VllmServer", dying)
    t0 = time.monotonic()
    result = run_bench(_launched_cfg(tiny_model_dir))
    assert time.monotonic() - t0 < 5  # 40 requests at 20/s would take > 2 s; it stops at once
    assert result.status == "failed" and result.failure == "crashed" and result.partial
    m = result.measurement
    assert m is not None and m.load.stopped == "aborted"
    assert m.summary.completed >= 3  # what finished before the death is kept
    assert any(r.error == "aborted" for r in m.records)
    data = result.to_json()
    assert data["partial"] is True and data["failure"] == "crashed" and data["completed"] >= 3
    path = write_json(result, tmp_path / "partial.json")
    assert json.loads(path.read_text())["stopped"] == "aborted"
    (server,) = dying.instances
    assert server.stopped


def test_launched_bench_measures_and_stops_the_server(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    import tuner.engine.server

    healthy = fake_vllm()
    monkeypatch.setattr(tuner.engine.server, "VllmServer", healthy)
    said: list[str] = []
    result = run_bench(_launched_cfg(tiny_model_dir, rate=200.0), progress=said.append)
    assert result.status == "ok" and result.failure is None and not result.partial
    assert result.summary is not None and result.summary.completed == 40
    assert result.server_info is not None and result.server_info["model"] == "tiny"
    (server,) = healthy.instances
    assert server.stopped and said[-1] == "stopping vLLM"
    assert said[0].startswith("starting vLLM") and "/tmp/fake-vllm.log" in said[0]


def test_launched_bench_stops_the_server_when_the_load_raises(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    import tuner.engine.server
    import tuner.measure.bench

    async def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("load generator bug")

    healthy = fake_vllm()
    monkeypatch.setattr(tuner.engine.server, "VllmServer", healthy)
    monkeypatch.setattr(tuner.measure.bench, "measure", broken)
    with pytest.raises(RuntimeError, match="load generator bug"):
        run_bench(_launched_cfg(tiny_model_dir))
    (server,) = healthy.instances
    assert server.stopped
