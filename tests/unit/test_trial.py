"""VllmTrialRunner against a fake vLLM (tests.fake_vllm): a trial and a finalist re-measure get
the dead-server watchdog and uvloop, keep what was measured before a crash, and stop the server
on every path; the load carries the server's API key, and a trial whose every request was
refused is a failure with the status seen, not a score of 0."""

from __future__ import annotations

import asyncio
import math
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import uvloop

import tuner.engine.server
from tests.fake_vllm import FakeVllm, fake_vllm
from tests.fakes import Behaviour
from tuner.engine.server import LaunchConfig
from tuner.engine.settings import is_secret, redact_settings
from tuner.load.workload import LengthRange, WorkloadSpec
from tuner.measure.ratesearch import RateSearchConfig
from tuner.measure.slo import Slo, parse_slo
from tuner.plan.prune import Planned, Variant
from tuner.plan.space import Candidate
from tuner.search.record import STATE_COMPLETE, STATE_FAILED, TrialRecord
from tuner.search.trial import REQUESTS_FAILED, TrialSetup, VllmTrialRunner
from tuner.specs.model import load_model

# TTFT >= 10 ms, so an SLO of 1 ms fails at saturation and the search goes on to a low rate;
# 20 tokens x 20 ms: each request takes about 0.4 s.
SLOW = Behaviour(ttft_s=0.01, token_delay_s=0.02)
LONG = 200  # requests in a low-rate point: far longer than any test waits


def _runner(tiny_model_dir: Path, tmp_path: Path, slo: Slo | None) -> VllmTrialRunner:
    setup = TrialSetup(
        tokenizer=str(tiny_model_dir),
        workload=WorkloadSpec(input_len=LengthRange.fixed(8), output_len=LengthRange.fixed(20)),
        launch=LaunchConfig(device="cpu"),
        log_dir=tmp_path,
        slo=slo,
        rate=RateSearchConfig(concurrency=4, seconds_per_point=0.5, min_requests=LONG),
    )
    runner = VllmTrialRunner(setup)
    runner.requests()  # the tokenizer loads before the fake's clock starts
    return runner


def _planned() -> Planned:
    return Planned(Candidate(max_num_seqs=4), 1.0, 100_000, 4.0, None, 1)


def _variant(tiny_model_dir: Path) -> Variant:
    return Variant("none", str(tiny_model_dir), load_model("qwen2.5-0.5b"))


def _fake(monkeypatch: pytest.MonkeyPatch, **attrs: Any) -> type[FakeVllm]:
    cls = fake_vllm(behaviour=SLOW, **attrs)
    monkeypatch.setattr(tuner.engine.server, "VllmServer", cls)
    return cls


def _spy_loops(monkeypatch: pytest.MonkeyPatch, method: str) -> list[type]:
    """Wrap VllmTrialRunner.<method> to record the type of the loop it runs on."""
    loops: list[type] = []
    original = getattr(VllmTrialRunner, method)

    async def spy(self: VllmTrialRunner, *args: Any) -> Any:
        loops.append(type(asyncio.get_running_loop()))
        return await original(self, *args)

    monkeypatch.setattr(VllmTrialRunner, method, spy)
    return loops


# --- a trial ------------------------------------------------------------------------------------


def test_a_trial_runs_on_uvloop_and_stops_the_server(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cls = _fake(monkeypatch)
    loops = _spy_loops(monkeypatch, "_search")
    runner = _runner(tiny_model_dir, tmp_path, slo=None)  # no SLO: the probe is the answer
    record = runner.measure(0, _planned(), _variant(tiny_model_dir))
    assert record.state == STATE_COMPLETE and record.failure is None
    assert record.objective is not None and record.objective > 0
    assert record.log_path == str(tmp_path / "000-seqs4.log")
    assert loops == [uvloop.Loop]
    (server,) = cls.instances
    assert server.stopped


def test_a_crash_mid_trial_is_caught_at_once_and_keeps_the_points_before(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cls = _fake(monkeypatch)

    class KillAfterProbe:
        """The server dies 0.5 s into the low-rate point after the probe (which would send
        200 requests at a few per second)."""

        def on_point(self, name: str, point: dict[str, Any]) -> None:
            (server,) = cls.instances
            server.die_after_s = time.monotonic() - server.t0 + 0.5

    runner = _runner(tiny_model_dir, tmp_path, slo=parse_slo("ttft<1ms"))
    runner.observer = KillAfterProbe()
    record = runner.measure(3, _planned(), _variant(tiny_model_dir))
    (server,) = cls.instances
    assert server.stopped and server.stopped_at is not None and server.died_at is not None
    assert server.stopped_at - server.died_at < 1.0  # not after the point's 200 requests
    assert record.state == STATE_FAILED and record.objective is None
    assert record.failure is not None and record.failure["class"] == "crashed"
    assert record.failure["log_path"] == str(tmp_path / "003-seqs4.log")
    assert record.rate_search is not None
    points = record.rate_search["points"]
    assert len(points) == 1 and points[0]["load"]["rate"] is None  # the probe, kept
    assert points[0]["summary"]["completed"] > 0
    assert record.rate_search["best_index"] is None
    assert record.server_info is not None and record.vllm_args == ["vllm", "serve"]


def test_a_failed_start_is_a_failed_trial(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tuner.engine.log import EngineFailure, FailureClass

    _fake(monkeypatch, start_failure=EngineFailure(FailureClass.OOM, "CUDA out of memory"))
    runner = _runner(tiny_model_dir, tmp_path, slo=None)
    record = runner.measure(1, _planned(), _variant(tiny_model_dir))
    assert record.state == STATE_FAILED and record.failure is not None
    assert record.failure["class"] == "oom" and record.rate_search is None
    assert record.log_path == str(tmp_path / "001-seqs4.log")
    assert "--max-num-seqs" in record.vllm_args


def test_an_error_in_the_trials_load_propagates_after_the_stop(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cls = _fake(monkeypatch)

    async def broken(*args: Any) -> None:
        raise RuntimeError("rate search bug")

    monkeypatch.setattr(VllmTrialRunner, "_search", broken)
    runner = _runner(tiny_model_dir, tmp_path, slo=None)
    with pytest.raises(RuntimeError, match="rate search bug"):
        runner.measure(0, _planned(), _variant(tiny_model_dir))
    (server,) = cls.instances
    assert server.stopped


# --- the server's API key; every request refused -----------------------------------------------


def _keyed_runner(
    tiny_model_dir: Path, tmp_path: Path, fixed: dict[str, Any], slo: Slo | None = None
) -> VllmTrialRunner:
    runner = _runner(tiny_model_dir, tmp_path, slo=slo)
    runner.setup = replace(runner.setup, fixed=fixed)
    return runner


def test_the_load_sends_the_key_the_server_was_started_with(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    cls = _fake(monkeypatch)
    runner = _keyed_runner(tiny_model_dir, tmp_path, {"api_key": "k-123"})
    record = runner.measure(0, _planned(), _variant(tiny_model_dir))
    assert record.state == STATE_COMPLETE
    (server,) = cls.instances
    assert server.settings.api_key == "k-123"
    sent = {h.get("Authorization") for h in server.fake.stats.headers}
    assert sent == {"Bearer k-123"}


def test_a_key_from_the_environment_is_sent_too(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # vLLM reads VLLM_API_KEY when --api-key is not given; vtune's server inherits it.
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    cls = _fake(monkeypatch)
    record = _runner(tiny_model_dir, tmp_path, slo=None).measure(
        0, _planned(), _variant(tiny_model_dir)
    )
    assert record.state == STATE_COMPLETE
    (server,) = cls.instances
    assert {h.get("Authorization") for h in server.fake.stats.headers} == {"Bearer from-env"}


@pytest.mark.parametrize(
    ("status", "phrase"), [(401, "Unauthorized"), (404, "Not Found"), (403, "Forbidden")]
)
def test_every_request_refused_is_a_failed_trial_with_the_status_seen(
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    phrase: str,
) -> None:
    cls = fake_vllm(behaviour=Behaviour(status=status))
    monkeypatch.setattr(tuner.engine.server, "VllmServer", cls)
    runner = _runner(tiny_model_dir, tmp_path, slo=parse_slo("ttft:p95<1s"))
    t0 = time.monotonic()
    record = runner.measure(2, _planned(), _variant(tiny_model_dir))
    assert record.state == STATE_FAILED and record.objective is None and record.best is None
    assert record.failure is not None and record.failure["class"] == REQUESTS_FAILED
    match = re.fullmatch(
        rf"every request failed: HTTP {status} {phrase} \((\d+) of (\d+)\)",
        record.failure["message"],
    )
    assert match and match[1] == match[2] and int(match[1]) > 0, record.failure
    assert record.failure["log_path"] == str(tmp_path / "002-seqs4.log")
    assert record.rate_search is not None
    assert len(record.rate_search["points"]) == 1  # the first refused point ended the trial
    assert time.monotonic() - t0 < 5.0  # not a whole rate search of refusals
    (server,) = cls.instances
    assert server.stopped


def test_a_refusing_server_in_a_latency_trial_is_a_failure_too(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        tuner.engine.server, "VllmServer", fake_vllm(behaviour=Behaviour(status=401))
    )
    runner = _runner(tiny_model_dir, tmp_path, slo=None)
    runner.setup = replace(runner.setup, objective="latency", latency_rate=50.0)
    record = runner.measure(0, _planned(), _variant(tiny_model_dir))
    assert record.state == STATE_FAILED and record.failure is not None
    assert record.failure["class"] == REQUESTS_FAILED
    assert record.failure["message"].startswith("every request failed: HTTP 401 Unauthorized (")


def test_secret_settings_are_known_by_name() -> None:
    secret = ["api_key", "hf_token", "--api-key", "hf-token", "token", "db_password", "x_secret"]
    plain = ["max_num_batched_tokens", "tokenizer", "kv_cache_dtype", "enforce_eager", "keys"]
    assert all(is_secret(name) for name in secret)
    assert not any(is_secret(name) for name in plain)
    shown = redact_settings({"api_key": "s3", "max_num_seqs": 8, "hf_token": None})
    assert shown == {"api_key": "***", "max_num_seqs": 8, "hf_token": None}


# --- a finalist's re-measure --------------------------------------------------------------------


def _finalist(rate: float, num_requests: int) -> TrialRecord:
    load = {"rate": rate, "concurrency": None, "num_requests": num_requests, "duration_s": None}
    return TrialRecord(
        "seqs4",
        {"max_num_seqs": 4},
        STATE_COMPLETE,
        objective=1.0,
        rate_search={"best_index": 0, "points": [{"load": load}]},
    )


def test_a_remeasure_runs_on_uvloop_and_stops_the_server(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cls = _fake(monkeypatch)
    loops = _spy_loops(monkeypatch, "_repeat")
    runner = _runner(tiny_model_dir, tmp_path, slo=None)
    values = runner.remeasure(_finalist(50.0, 4), _variant(tiny_model_dir), 2)
    assert len(values) == 2 and all(v > 0 and math.isfinite(v) for v in values)
    assert loops == [uvloop.Loop]
    (server,) = cls.instances
    assert server.stopped and server.log_path == tmp_path / "finalist-seqs4.log"


def test_a_crash_during_a_remeasure_counts_as_zero_at_once(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cls = _fake(monkeypatch, die_after_s=1.0)
    runner = _runner(tiny_model_dir, tmp_path, slo=None)
    t0 = time.monotonic()
    values = runner.remeasure(_finalist(5.0, LONG), _variant(tiny_model_dir), 3)  # 40 s of load
    assert values == [0.0, 0.0, 0.0]
    assert time.monotonic() - t0 < 3.0
    (server,) = cls.instances
    assert server.stopped and server.stopped_at is not None and server.died_at is not None
    assert server.stopped_at - server.died_at < 1.0


def test_a_failed_relaunch_counts_as_zero_and_a_load_error_propagates(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tuner.engine.log import EngineFailure, FailureClass

    _fake(monkeypatch, start_failure=EngineFailure(FailureClass.OOM, "CUDA out of memory"))
    runner = _runner(tiny_model_dir, tmp_path, slo=None)
    assert runner.remeasure(_finalist(5.0, 4), _variant(tiny_model_dir), 2) == [0.0, 0.0]

    cls = _fake(monkeypatch)

    async def broken(*args: Any) -> None:
        raise RuntimeError("repeat bug")

    monkeypatch.setattr(VllmTrialRunner, "_repeat", broken)
    with pytest.raises(RuntimeError, match="repeat bug"):
        runner.remeasure(_finalist(5.0, 4), _variant(tiny_model_dir), 2)
    (server,) = cls.instances
    assert server.stopped
