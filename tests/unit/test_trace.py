"""Request traces: vtune's and Mooncake's fields, bad traces in one line with the line number,
replay and re-sampling, the gamma shape of the gaps, prompts laid out so recorded reuse is
real reuse, replay timing and session order against a fake server, and the shipped example."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.fakes import Behaviour, FakeServer
from tuner.cli import main
from tuner.errors import DatasetError
from tuner.load.generator import LoadConfig, run_load
from tuner.load.prompts import Request, load_tokenizer
from tuner.load.trace import (
    HASH_BLOCK_TOKENS,
    TraceRequest,
    gamma_shape,
    ideal_prefix_reuse,
    interleave,
    read_trace,
    write_trace,
)
from tuner.load.workload import WorkloadSpec, build_requests

EXAMPLE = Path(__file__).resolve().parents[2] / "tuner" / "data" / "traces" / "example.jsonl"


def _write(tmp_path: Path, *lines: Any, name: str = "t.jsonl") -> Path:
    path = tmp_path / name
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines)
    path.write_text(text + "\n")
    return path


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> Any:
    return load_tokenizer(tiny_model_dir)


def test_vtune_fields_are_read_sorted_by_arrival_and_made_relative(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        {"arrival_s": 12.0, "input_tokens": 30, "output_tokens": 5, "session": "a"},
        {"arrival_s": 10.0, "input_tokens": 10, "output_tokens": 4, "session": "a"},
        {"arrival_s": 10.5, "prompt": "hello there", "output_tokens": 3, "think_s": 2},
        "",  # blank lines are fine
    )
    trace = read_trace(path)
    assert [r.arrival_s for r in trace.requests] == [0.0, 0.5, 2.0]
    first, text, second = trace.requests
    assert (first.input_tokens, first.turn, second.turn) == (10, 0, 1)  # turns by arrival
    assert text.prompt == "hello there" and text.input_tokens is None and text.think_s == 2.0
    assert trace.duration_s == 2.0 and trace.mean_rate == pytest.approx(1.0)
    assert [len(s) for s in trace.sessions()] == [2, 1]


def test_mooncake_fields_are_accepted_as_they_are(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        {"timestamp": 0, "input_length": 655, "output_length": 52, "hash_ids": [46, 47]},
        {"timestamp": 3052, "input_length": 672, "output_length": 26, "hash_ids": [46, 47]},
        {"timestamp": 3052, "input_length": 90, "output_length": 9, "session_id": 7, "delay": 500},
    )
    r = read_trace(path).requests
    assert [x.arrival_s for x in r] == [0.0, 3.052, 3.052]
    assert r[0].hash_ids == (46, 47) and r[1].input_tokens == 672 and r[1].output_tokens == 26
    assert r[2].session == "7" and r[2].think_s == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("lines", "fragment"),
    [
        ([], "is empty"),
        (["", "  "], "is empty"),
        (
            ['{"arrival_s": 0, "input_tokens": 5, "output_tokens": 1}', "{oops"],
            "line 2 is not JSON",
        ),
        (["[1, 2]"], "line 1 is not a JSON object"),
        ([{"input_tokens": 5, "output_tokens": 1}], "line 1: no arrival time"),
        (
            [{"arrival_s": -1, "input_tokens": 5, "output_tokens": 1}],
            "must be a finite number >= 0",
        ),
        (
            [{"timestamp": "x", "input_tokens": 5, "output_tokens": 1}],
            "'timestamp' must be a number",
        ),
        ([{"arrival_s": 0, "output_tokens": 1}], "missing 'input_tokens' or 'input_length'"),
        ([{"arrival_s": 0, "input_tokens": 5}], "missing 'output_tokens' or 'output_length'"),
        ([{"arrival_s": 0, "input_tokens": 0, "output_tokens": 1}], "'input_tokens' must be an"),
        ([{"arrival_s": 0, "input_tokens": 5, "output_tokens": True}], "'output_tokens' must be"),
        ([{"arrival_s": 0, "input_tokens": 5, "output_tokens": 1, "hash_ids": [-1]}], "hash_ids"),
        ([{"arrival_s": 0, "prompt": "", "output_tokens": 1}], "'prompt' must be non-empty"),
        (
            [
                {"arrival_s": 0, "input_tokens": 5, "output_tokens": 1, "session": "s", "turn": 1},
                {"arrival_s": 1, "input_tokens": 5, "output_tokens": 1, "session": "s", "turn": 1},
            ],
            "line 2: session 's' has turn 1 twice",
        ),
    ],
)
def test_bad_traces_name_the_line(tmp_path: Path, lines: list[Any], fragment: str) -> None:
    path = _write(tmp_path, *lines) if lines else tmp_path / "empty.jsonl"
    if not lines:
        path.write_text("")
    with pytest.raises(DatasetError) as info:
        read_trace(path)
    message = str(info.value)
    assert fragment in message and "\n" not in message, message


def test_missing_file_directory_and_binary_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    for name, fragment in (("nope", "not found"), ("d", "directory"), ("bin", "not UTF-8")):
        with pytest.raises(DatasetError, match=fragment):
            read_trace(tmp_path / name)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return int(info.value.code or 0), capsys.readouterr().err


def test_a_bad_trace_ends_bench_and_search_in_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _write(tmp_path, {"arrival_s": 0, "input_tokens": 5, "output_tokens": 1}, "{oops")
    for command in (
        ["bench", "--model", str(tmp_path), "--url", "http://127.0.0.1:9"],
        ["search", "--model", str(tmp_path), "--gpu", "cpu", "--dry-run"],
    ):
        code, err = _run([*command, "--dataset", f"trace:{bad}"], capsys)
        assert code == 2 and err.count("\n") == 1 and "line 2 is not JSON" in err, err


def test_time_scale_without_a_replay_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "--model", str(tmp_path), "--url", "http://127.0.0.1:9"]
    code, err = _run(
        [*argv, "--dataset", f"trace:{EXAMPLE}", "--rate", "2", "--time-scale", "2"], capsys
    )
    assert code == 2 and err.count("\n") == 1 and "--time-scale replays a trace" in err


def test_gamma_shape_recovers_the_arrival_process() -> None:
    rng = np.random.default_rng(0)
    assert gamma_shape(rng.exponential(0.5, 20000)) == pytest.approx(1.0, rel=0.05)
    assert gamma_shape(rng.gamma(0.3, 1.0, 20000)) == pytest.approx(0.3, rel=0.08)
    assert gamma_shape(np.full(10, 0.25)) == math.inf  # perfectly even spacing
    assert gamma_shape(np.array([1.0, 2.0])) is None  # too few gaps to say


def test_replay_keeps_recorded_order_scales_time_and_cycles_with_fresh_sessions(
    tmp_path: Path,
) -> None:
    path = _write(
        tmp_path,
        {"arrival_s": 0, "input_tokens": 5, "output_tokens": 1, "session": "a"},
        {"arrival_s": 1, "input_tokens": 9, "output_tokens": 1, "session": "a"},
        {"arrival_s": 3, "input_tokens": 7, "output_tokens": 1},
    )
    plan = read_trace(path).replay(5, time_scale=0.5)
    # The second pass starts one mean gap (1.5 s) after the last request (3 s): at 4.5 s.
    assert [r.arrival_s for r in plan] == [0.0, 0.5, 1.5, 2.25, 2.75]
    assert [r.session for r in plan] == ["a", "a", None, "a#1", "a#1"]


def test_resample_keeps_sessions_whole_in_turn_order_and_is_seeded(tmp_path: Path) -> None:
    lines = [{"arrival_s": i, "input_tokens": 5, "output_tokens": 1} for i in range(10)]
    lines += [
        {"arrival_s": 10 + t, "input_tokens": 5 + t, "output_tokens": 1, "session": "s", "turn": t}
        for t in range(4)
    ]
    trace = read_trace(_write(tmp_path, *lines))
    plan = trace.resample(200, seed=3, slots=8)
    assert len(plan) == 200 and plan == trace.resample(200, seed=3, slots=8)
    assert plan != trace.resample(200, seed=4, slots=8)
    by_session: dict[str, list[int]] = {}
    for r in plan:
        assert r.session is not None  # every draw is its own session (id#k)
        by_session.setdefault(r.session, []).append(r.turn)
    chats = [t for s, t in by_session.items() if s.startswith("s#")]
    assert chats and all(t == list(range(len(t))) for t in chats)


def test_interleave_spreads_a_sessions_turns_about_slots_apart() -> None:
    sessions = [[(s, t) for t in range(3)] for s in range(4)]
    order = interleave(sessions, slots=4)
    assert order[:4] == [(0, 0), (1, 0), (2, 0), (3, 0)]
    assert [order.index((0, t)) for t in range(3)] == [0, 4, 8]
    assert interleave(sessions, slots=1) == [x for s in sessions for x in s]


def test_ideal_prefix_reuse_by_hand() -> None:
    reqs = [
        TraceRequest(0.0, 1, 1024, hash_ids=(1, 2)),
        TraceRequest(1.0, 1, 1100, hash_ids=(1, 2, 3)),  # 1024 reused
        TraceRequest(2.0, 1, 600, hash_ids=(9, 2)),  # block 2 behind another block: none
        TraceRequest(3.0, 10, 100, session="s", turn=0),
        TraceRequest(4.0, 1, 150, session="s", turn=1),  # 100 + 10 reused
    ]
    assert ideal_prefix_reuse(reqs) == pytest.approx((1024 + 110) / (1024 + 1100 + 600 + 100 + 150))


def test_hash_ids_give_the_same_tokens_wherever_they_appear(tmp_path: Path, tok: Any) -> None:
    block = HASH_BLOCK_TOKENS
    path = _write(
        tmp_path,
        {"timestamp": 0, "input_length": block + 40, "output_length": 4, "hash_ids": [5, 6]},
        {"timestamp": 10, "input_length": 2 * block + 3, "output_length": 4, "hash_ids": [5, 7, 8]},
    )
    spec = WorkloadSpec(num_prompts=2, trace=path, output_len=None, replay=True)
    a, b = build_requests(tok, spec)
    assert (a.prompt_len, b.prompt_len) == (block + 40, 2 * block + 3)
    assert a.prompt[:block] == b.prompt[:block] and a.prompt[block:] != b.prompt[block : block + 40]


def test_a_sessions_later_turn_starts_with_the_earlier_turn(tmp_path: Path, tok: Any) -> None:
    path = _write(
        tmp_path,
        {"arrival_s": 0, "input_tokens": 20, "output_tokens": 6, "session": "x"},
        {"arrival_s": 1, "input_tokens": 40, "output_tokens": 6, "session": "x"},
    )
    spec = WorkloadSpec(num_prompts=2, trace=path, output_len=None, replay=True, time_scale=2.0)
    warm, first, second = build_requests(tok, spec, extra=1)
    assert warm.at is None and warm.session == "warmup-0"  # warm-up: outside any session
    assert (first.at, second.at) == (0.0, 2.0) and second.session == first.session == "x"
    assert second.prompt[:20] == first.prompt and second.prompt_len == 40  # 20 + 6 + 14 new


def test_example_trace_is_small_bursty_has_sessions_and_fits_a_2k_context() -> None:
    trace = read_trace(EXAMPLE)
    assert 150 <= len(trace.requests) <= 250
    assert trace.burstiness is not None and trace.burstiness < 0.8  # burstier than Poisson
    assert sum(1 for s in trace.sessions() if len(s) > 1) >= 3
    assert max((r.input_tokens or 0) + r.output_tokens for r in trace.requests) <= 2048


def test_write_trace_reads_back(tmp_path: Path) -> None:
    reqs = [
        TraceRequest(0.0, 3, 10),
        TraceRequest(0.5, 4, None, prompt="hi", session="q", turn=0, think_s=1.5),
    ]
    back = read_trace(write_trace(tmp_path / "w.jsonl", reqs)).requests
    assert [(r.input_tokens, r.prompt, r.session, r.think_s) for r in back] == [
        (10, None, None, 0.0),
        (None, "hi", "q", 1.5),
    ]


# --- the generator: replay times and session order ---------------------------------------------


def _req(n: int, **meta: Any) -> Request:
    return Request(tuple(range(1, n + 1)), n, 4, **meta)


def test_replay_sends_at_the_recorded_times() -> None:
    reqs = [_req(3)] + [_req(3, at=t) for t in (0.0, 0.05, 0.05, 0.2, 0.35)]

    async def go() -> Any:
        async with FakeServer(Behaviour()) as srv:
            return await run_load(srv.url, "fake", reqs, LoadConfig(warmup=1, timeout_s=10))

    result = asyncio.run(go())
    measured = sorted(result.measured, key=lambda r: r.index)
    offsets = [r.due - measured[0].due for r in measured]  # type: ignore[operator]
    assert offsets == pytest.approx([0.0, 0.05, 0.05, 0.2, 0.35], abs=1e-6)
    lags = [r.start - r.due for r in measured]  # type: ignore[operator]
    assert max(lags) < 0.05 and all(r.ok for r in measured)


@pytest.mark.parametrize("rate", [200.0, math.inf])
def test_a_turn_waits_for_the_previous_turn_and_its_think_time(rate: float) -> None:
    think = 0.15
    reqs = [_req(4, session="s", turn=0), _req(4), _req(4, session="s", turn=1, think_s=think)]

    async def go() -> Any:
        async with FakeServer(Behaviour(ttft_s=0.05, token_delay_s=0.01)) as srv:
            return await run_load(srv.url, "fake", reqs, LoadConfig(rate=rate, timeout_s=10))

    records = sorted(asyncio.run(go()).records, key=lambda r: r.index)
    first, other, turn = records
    assert first.end is not None and turn.start >= first.end  # after the answer
    if math.isinf(rate):  # closed loop: no think time, the turn goes right after the answer
        assert turn.start - first.end < think
    else:
        assert turn.start - first.end >= think - 1e-3
        assert turn.due == pytest.approx(first.end + think, abs=1e-6)
    assert other.start < first.end  # the other request is not held up by the session


# --- vtune workload describe --------------------------------------------------------------------


def _describe(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from tuner.cli.common import VtuneGroup

    group = VtuneGroup(lazy_commands={"workload": "tuner.cli.workload:workload"})
    try:
        group.main(["workload", "describe", *args], standalone_mode=False)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_describe_figures_by_hand(tmp_path: Path) -> None:
    from tuner.outputs.workload_describe import describe_trace

    path = _write(
        tmp_path,
        {"arrival_s": 0.0, "input_tokens": 100, "output_tokens": 10, "session": "a"},
        {"arrival_s": 0.5, "input_tokens": 300, "output_tokens": 30},
        {"arrival_s": 1.0, "input_tokens": 200, "output_tokens": 20, "session": "a"},
        {"arrival_s": 1.5, "input_tokens": 400, "output_tokens": 40},
    )
    d = describe_trace(read_trace(path))
    assert (d["requests"], d["duration_s"], d["peak_rate_1s"]) == (4, 1.5, 2)
    assert d["input_tokens"]["mean"] == 250 and d["output_tokens"]["max"] == 40
    assert d["gamma_shape"] == math.inf  # evenly spaced
    assert (d["sessions"], d["requests_in_sessions"]) == (1, 2)
    assert d["between_turns_s"]["mean"] == 1.0
    assert d["ideal_prefix_reuse"] == pytest.approx(110 / 1000)


def test_workload_describe_prints_a_table_and_draws_a_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "w.png"
    code, out, err = _describe([str(EXAMPLE), "--png", str(png)], capsys)
    assert code == 0, err
    assert "burstiness (gamma shape)" in out and "bursty" in out and "sessions" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = _describe([str(EXAMPLE), "--json"], capsys)
    assert code == 0 and json.loads(out)["requests"] == len(read_trace(EXAMPLE).requests)
    bad = _write(tmp_path, {"arrival_s": 0, "output_tokens": 1}, name="bad.jsonl")
    code, _, err = _describe([str(bad)], capsys)
    assert code == 2 and err.count("\n") == 1 and "line 1: missing 'input_tokens'" in err


def test_vtune_bench_replays_a_trace_at_its_recorded_times_scaled(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.prom import free_port

    port = free_port()
    fake = Path(__file__).parents[1] / "fake_vllm_process.py"
    server = subprocess.Popen(
        [sys.executable, str(fake), "--model", "fake", "--port", str(port)],
        env={"FAKE_VLLM_STARTUP_S": "0", "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        out = tmp_path / "bench.json"
        argv = ["bench", "--model", str(tiny_model_dir), "--url", f"http://127.0.0.1:{port}"]
        argv += ["--dataset", f"trace:{EXAMPLE}", "--num-prompts", "60", "--time-scale", "0.25"]
        with pytest.raises(SystemExit) as info:
            main([*argv, "--json", str(out)])
        assert info.value.code == 0, capsys.readouterr().err
    finally:
        server.terminate()
        server.wait(10)
    result = json.loads(out.read_text())
    assert result["config"]["load"]["arrival"] == "replay" and result["completed"] == 60
    assert (
        result["config"]["workload"]["replay"]
        and result["config"]["workload"]["time_scale"] == 0.25
    )
    recorded = [r.arrival_s for r in read_trace(EXAMPLE).requests[:60]]
    expected = (recorded[-1] - recorded[0]) * 0.25
    assert max(result["start_times"]) == pytest.approx(expected, abs=0.05)
