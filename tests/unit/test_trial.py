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
from types import SimpleNamespace
from typing import Any

import pytest
import uvloop

import tuner.engine.server
from tests.fake_vllm import FakeVllm, fake_vllm
from tests.fakes import Behaviour
from tuner.engine.server import LaunchConfig
from tuner.engine.settings import EngineSettings, is_secret, redact_settings
from tuner.load.workload import LengthRange, WorkloadSpec
from tuner.measure.ratesearch import (
    LoadPoint,
    RatePoint,
    RateSearchConfig,
    RateSearchResult,
    objective_value,
)
from tuner.measure.slo import Slo, parse_slo
from tuner.plan.prune import Planned, Variant
from tuner.plan.space import Candidate
from tuner.search.finalist_runs import launch_key, repeat_rounds
from tuner.search.record import STATE_COMPLETE, STATE_FAILED, STATE_PRUNED, TrialRecord
from tuner.search.trial import REQUESTS_FAILED, TrialSetup, VllmTrialRunner
from tuner.specs.gpu import get_gpu
from tuner.specs.model import load_model
from tuner.specs.vllm_defaults import vllm_defaults

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


def _finalist(rate: float, num_requests: int, name: str = "seqs4") -> TrialRecord:
    load = {"rate": rate, "concurrency": None, "num_requests": num_requests, "duration_s": None}
    return TrialRecord(
        name,
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
    assert len(values) == 2 and all(v.value > 0 and math.isfinite(v.value) for v in values)
    assert all(v.rate == 50.0 and not v.step_down for v in values)  # no SLO: never a miss
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
    assert [v.value for v in values] == [0.0, 0.0, 0.0]
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
    values = runner.remeasure(_finalist(5.0, 4), _variant(tiny_model_dir), 2)
    assert [(v.value, v.rate) for v in values] == [(0.0, 5.0), (0.0, 5.0)]

    cls = _fake(monkeypatch)

    async def broken(*args: Any) -> None:
        raise RuntimeError("repeat bug")

    monkeypatch.setattr(VllmTrialRunner, "_repeat", broken)
    with pytest.raises(RuntimeError, match="repeat bug"):
        runner.remeasure(_finalist(5.0, 4), _variant(tiny_model_dir), 2)
    (server,) = cls.instances
    assert server.stopped


def test_equal_settings_are_remeasured_in_one_launch_in_turn(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cls = _fake(monkeypatch)
    seen: list[tuple[str, float | None]] = []

    class Points:
        def on_point(self, name: str, point: dict[str, Any]) -> None:
            seen.append((name, point["load"]["rate"]))

    runner = _runner(tiny_model_dir, tmp_path, slo=None)
    runner.observer = Points()
    records = [_finalist(50.0, 4, "vllm-defaults"), _finalist(40.0, 4, "seqs4")]
    samples = runner.remeasure_group(records, _variant(tiny_model_dir), 2)
    (server,) = cls.instances  # one launch for both
    assert server.stopped and server.log_path == tmp_path / "finalist-vllm-defaults+seqs4.log"
    assert seen == [("vllm-defaults", 50.0), ("seqs4", 40.0)] * 2  # in turn, each repeat
    assert [s.rate for s in samples["vllm-defaults"]] == [50.0, 50.0]
    assert [s.rate for s in samples["seqs4"]] == [40.0, 40.0]
    assert all(s.value > 0 for v in samples.values() for s in v)


def test_a_rerun_that_misses_the_slo_is_measured_again_a_step_down(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake(monkeypatch)
    runner = _runner(tiny_model_dir, tmp_path, slo=parse_slo("ttft<1ms"))  # never met
    runner.setup = replace(runner.setup, rate=replace(runner.setup.rate, min_requests=4))
    values = runner.remeasure(_finalist(50.0, 4), _variant(tiny_model_dir), 1)
    assert [(v.value, v.step_down) for v in values] == [(0.0, True)]
    assert values[0].rate == pytest.approx(45.0)  # one step (the tolerance, 10 %) down


def test_a_trial_whose_probe_cannot_reach_the_incumbent_stops_after_it(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cls = _fake(monkeypatch)
    runner = _runner(tiny_model_dir, tmp_path, slo=parse_slo("ttft<1ms"))  # a bisection follows
    record = runner.measure(4, _planned(), _variant(tiny_model_dir), incumbent=1e9)
    assert record.state == STATE_PRUNED and record.stopped_early and record.objective is None
    assert record.failure is not None and record.failure["rule"] == "early_stop"
    assert record.failure["reason"].startswith("stopped early: capacity ")
    assert record.failure["reason"].endswith(
        " tok/s cannot reach the incumbent's 1,000,000,000 tok/s (margin 15%)"
    )
    assert record.rate_search is not None and record.rate_search["stopped_early"] is True
    assert len(record.rate_search["points"]) == 1 and record.engine_time_s > 0
    assert record.log_path == str(tmp_path / "004-seqs4.log")
    (server,) = cls.instances
    assert server.stopped
    # The latency objective never stops early: its one point is the answer.
    runner.setup = replace(runner.setup, objective="latency", latency_rate=50.0)
    assert runner._early_stop(1e9) is None


def test_a_contending_trial_reruns_its_point_in_its_own_launch(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cls = _fake(monkeypatch)
    runner = _runner(tiny_model_dir, tmp_path, slo=None)  # no SLO: the probe is the answer
    runner.setup = replace(runner.setup, in_trial_repeats=2, early_stop_margin=None)
    points: list[dict[str, Any]] = []
    runner.observer = SimpleNamespace(on_point=lambda name, point: points.append(point))
    record = runner.measure(0, _planned(), _variant(tiny_model_dir))  # no incumbent: contends
    assert record.state == STATE_COMPLETE and record.objective is not None
    runs = record.in_trial_samples
    assert len(runs) == 2 and all(r.in_trial and r.value > 0 for r in runs)
    assert all(r.concurrency == 4 and r.rate is None for r in runs)  # the probe's load again
    assert len(points) == 3 and len(cls.instances) == 1  # probe + two re-runs, one launch
    assert record.to_json()["in_trial_runs"] == [r.to_json() for r in runs]
    # Far below the incumbent (early stop off: it completes): not a contender, no re-runs.
    far = runner.measure(1, _planned(), _variant(tiny_model_dir), incumbent=1e9)
    assert far.state == STATE_COMPLETE and far.in_trial_runs == []
    assert "in_trial_runs" not in far.to_json()  # the record keeps its older keys
    assert all(server.stopped for server in cls.instances)


def test_the_screens_launch_measures_the_largest_members_trial_after_its_rungs(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tuner.search.screen_run import vllm_screen

    cls = _fake(monkeypatch)
    runner = _runner(tiny_model_dir, tmp_path, slo=None)
    runner.setup = replace(runner.setup, in_trial_repeats=1)
    two = Planned(Candidate(max_num_seqs=2), 1.0, 100_000, 4.0, None, 1)
    got = vllm_screen(runner, [_planned(), two], _variant(tiny_model_dir))
    assert [p.concurrency for p in got.points] == [4, 2]
    trial = got.trial
    assert trial is not None and trial.name == "seqs4" and trial.state == STATE_COMPLETE
    assert trial.objective is not None and trial.objective > 0 and trial.number == -1
    assert len(trial.in_trial_samples) == 1  # the first trial: a contender
    assert trial.log_path == str(tmp_path / "screen-seqs4.log")
    (server,) = cls.instances  # one launch for the rungs and the trial
    assert server.stopped
    assert 0 < trial.engine_time_s < time.monotonic() - server.t0  # the trial's part only


# --- the re-run rounds and launch sharing, without a server ---------------------------------------


class _Ttft:
    """TTFT 0.1 / (1 - rate / 10): the SLO (TTFT < 0.5 s) holds below 8 req/s."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, int, int]] = []

    async def __call__(self, name: str, load: LoadPoint, warmup: int, offset: int) -> RatePoint:
        self.calls.append((name, load.rate, warmup, offset))
        ttft = 0.1 / (1 - min(load.rate / 10, 0.999))
        summary = SimpleNamespace(
            request_throughput=load.rate, output_throughput=100 * load.rate, completed=10
        )
        return RatePoint(load, summary, ttft < 0.5)


def _value(result: RateSearchResult) -> float:
    return objective_value(result, "throughput")


async def test_rounds_take_the_step_down_value_when_the_chosen_rate_misses() -> None:
    measure = _Ttft()
    loads = {"a": LoadPoint(8.5, None, 85), "b": LoadPoint(5.0, None, 50)}
    cfg = RateSearchConfig(concurrency=4)
    samples = await repeat_rounds(measure, loads, 2, cfg, _value, warmup=4)
    a, b = samples["a"], samples["b"]
    assert [s.step_down for s in a] == [True, True] and [s.step_down for s in b] == [False] * 2
    assert [s.value for s in a] == [pytest.approx(765.0)] * 2  # 7.65 req/s x 100 tokens
    assert [s.rate for s in a] == [pytest.approx(7.65)] * 2 and [s.value for s in b] == [500.0] * 2
    names = [c[0] for c in measure.calls]
    assert names == ["a", "a", "b", "a", "a", "b"]  # in turn; a miss and its step down together
    assert [c[2] for c in measure.calls] == [4, 0, 0, 0, 0, 0]  # the warm-up once
    offsets = [c[3] for c in measure.calls]
    assert offsets == sorted(set(offsets)) and offsets[1] == 85 + 4
    # Without the step (the latency objective), a miss is measured once.
    once = await repeat_rounds(_Ttft(), {"a": loads["a"]}, 1, cfg, _value, step=False)
    assert [(s.value, s.step_down) for s in once["a"]] == [(0.0, False)]


def test_vllm_defaults_and_a_knob_at_its_default_share_a_launch() -> None:
    gpu = get_gpu("cpu")
    tokens, seqs = vllm_defaults().batch_limits(gpu)
    base = EngineSettings("m", kv_cache_memory_bytes=1 << 30)
    same = EngineSettings("m", max_num_seqs=seqs, kv_cache_memory_bytes=1 << 30)
    assert launch_key(base, gpu) == launch_key(same, gpu)
    other = EngineSettings("m", max_num_seqs=seqs // 2, kv_cache_memory_bytes=1 << 30)
    assert launch_key(base, gpu) != launch_key(other, gpu)
    assert launch_key(EngineSettings("q", max_num_seqs=seqs), gpu) != launch_key(same, gpu)
    # Chunked prefill off: vLLM's token budget follows max_model_len, not the table's default.
    off = EngineSettings("m", enable_chunked_prefill=False)
    assert launch_key(off, gpu).max_num_batched_tokens is None
    assert launch_key(base, gpu).max_num_batched_tokens == tokens
