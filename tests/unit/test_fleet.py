"""``vtune search --workers N`` / ``--devices``: the pure planning of the workers' device groups
and ports (:mod:`tuner.search.fleet`), the workers' command lines, the port ranges the engine
takes its ports from, the journal storage, and the one-line errors at the CLI."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from tuner.cli import cli
from tuner.engine import http
from tuner.errors import EngineError, ParameterError
from tuner.search.fleet import (
    PORT_BASE,
    PORT_STRIDE,
    Slot,
    child_args,
    cpu_list,
    parse_devices,
    plan_fleet,
)
from tuner.search.storage import open_storage, storage_url


def _cpus(n: int) -> list[str]:
    return [str(i) for i in range(n)]


# --- CPU sets -------------------------------------------------------------------------------------


def test_cpus_split_into_disjoint_nearly_equal_sets() -> None:
    plan = plan_fleet(2, None, _cpus(4), cpu=True)
    assert [s.devices for s in plan.slots] == [("0", "1"), ("2", "3")]
    plan = plan_fleet(3, None, _cpus(8), cpu=True)
    sets = [set(s.devices) for s in plan.slots]
    assert [len(s) for s in sets] == [3, 3, 2]
    assert set().union(*sets) == set(_cpus(8)) and sum(map(len, sets)) == 8  # disjoint, all
    assert plan.unused == ()


def test_cpu_sets_follow_the_affinity_not_the_numbering() -> None:
    plan = plan_fleet(2, None, ["2", "3", "6", "7"], cpu=True)
    assert [s.devices for s in plan.slots] == [("2", "3"), ("6", "7")]
    assert [s.where() for s in plan.slots] == ["CPUs 2-3", "CPUs 6-7"]


def test_devices_alone_give_one_worker_per_device() -> None:
    plan = plan_fleet(None, ["0", "1"], _cpus(2), cpu=True)
    assert [s.devices for s in plan.slots] == [("0",), ("1",)]


def test_a_cpu_listed_twice_is_shared_by_choice() -> None:
    plan = plan_fleet(None, ["0", "1", "0", "1"], _cpus(2), cpu=True)
    assert [s.devices for s in plan.slots] == [("0",), ("1",), ("0",), ("1",)]


def test_more_workers_than_cpus_is_one_line() -> None:
    with pytest.raises(ParameterError, match=r"--workers 3 needs 3 CPUs.*2 here \(0-1\)"):
        plan_fleet(3, None, _cpus(2), cpu=True)


def test_a_cpu_this_process_may_not_use_is_refused() -> None:
    with pytest.raises(ParameterError, match="no CPU 5 here"):
        plan_fleet(None, ["0", "5"], _cpus(2), cpu=True)


def test_cpu_list_is_the_bind_form() -> None:
    assert cpu_list(["0", "1", "2", "3", "8", "10", "11"]) == "0-3,8,10-11"
    assert cpu_list([5]) == "5"
    assert parse_devices("0-2,5", cpu=True) == ["0", "1", "2", "5"]
    with pytest.raises(ParameterError):
        parse_devices("0,x", cpu=True)
    with pytest.raises(ParameterError):
        parse_devices("0,,1", cpu=False)


# --- GPU groups -----------------------------------------------------------------------------------


def test_gpus_are_grouped_by_the_largest_tensor_parallel_size() -> None:
    gpus = _cpus(8)
    plan = plan_fleet(None, None, gpus, cpu=False, group=2)
    assert [s.devices for s in plan.slots] == [("0", "1"), ("2", "3"), ("4", "5"), ("6", "7")]
    plan = plan_fleet(3, None, gpus, cpu=False, group=2)
    assert plan.size == 3 and plan.unused == ("6", "7")
    plan = plan_fleet(None, ["4", "5", "6", "7"], gpus, cpu=False, group=4)
    assert [s.devices for s in plan.slots] == [("4", "5", "6", "7")]


def test_more_workers_than_gpu_groups_is_one_line() -> None:
    with pytest.raises(ParameterError, match=r"--workers 3 with tensor_parallel_size 2 needs 6"):
        plan_fleet(3, None, _cpus(4), cpu=False, group=2)
    with pytest.raises(ParameterError, match="--workers 5 needs 5 GPUs; 4 here"):
        plan_fleet(5, None, _cpus(4), cpu=False)
    with pytest.raises(ParameterError, match="one worker with tensor_parallel_size 4 needs 4"):
        plan_fleet(None, ["0", "1"], _cpus(4), cpu=False, group=4)
    with pytest.raises(ParameterError, match="no GPU found"):
        plan_fleet(2, None, [], cpu=False)
    with pytest.raises(ParameterError, match="listed twice"):
        plan_fleet(None, ["0", "0"], _cpus(4), cpu=False)


def test_each_worker_has_its_own_ports() -> None:
    plan = plan_fleet(4, None, _cpus(4), cpu=False)
    ranges = [s.ports for s in plan.slots]
    assert ranges[0] == (PORT_BASE, PORT_BASE + PORT_STRIDE - 1)
    ports = [set(range(a, b + 1)) for a, b in ranges]
    assert all(not (ports[i] & ports[j]) for i in range(4) for j in range(i + 1, 4))
    with pytest.raises(ParameterError, match="1024-65535"):
        plan_fleet(2, None, _cpus(2), cpu=True, port_base=65500)


# --- the workers' command line -------------------------------------------------------------------


def test_child_args_replace_the_parents_own_options() -> None:
    args = [
        "--model",
        "M",
        "--workers",
        "2",
        "--devices=0,1",
        "--out",
        "OUT",
        "--storage",
        "sqlite:///x.db",
        "--metrics-port",
        "9400",
        "--slo",
        "ttft:p95<1s",
    ]
    slot = Slot(1, ("1",), True, (28100, 28199))
    got = child_args(args, slot, "OUT/m/cpu.workers/w1", "journal:///j")
    assert got == [
        *("--model", "M", "--slo", "ttft:p95<1s"),
        *("--workers", "1", "--devices", "1", "--out", "OUT/m/cpu.workers/w1"),
        *("--storage", "journal:///j", "--fleet-worker", "w1"),
    ]


# --- the engine's ports --------------------------------------------------------------------------


def test_find_free_port_takes_the_range_in_turn_and_skips_a_taken_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        monkeypatch.setenv(http.PORT_RANGE_ENV, f"{taken}-{taken + 1}")
        picked = {http.find_free_port() for _ in range(4)}
        assert picked == {taken + 1}
        monkeypatch.setenv(http.PORT_RANGE_ENV, f"{taken}-{taken}")
        with pytest.raises(EngineError, match="no free port"):
            http.find_free_port()
    monkeypatch.setenv(http.PORT_RANGE_ENV, "9-x")
    with pytest.raises(EngineError, match="expected FIRST-LAST"):
        http.find_free_port()


# --- the journal storage -------------------------------------------------------------------------


def test_journal_paths_and_urls_open_optunas_journal_storage(tmp_path: Path) -> None:
    import optuna

    path = tmp_path / "sub" / "x.journal"
    url = storage_url(str(path), tmp_path / "default.db")
    assert url == f"journal://{path.resolve()}"
    storage = open_storage(url)
    assert isinstance(storage, optuna.storages.JournalStorage)
    study = optuna.create_study(study_name="s", storage=storage)
    study.tell(study.ask(), 1.0)
    again = optuna.load_study(study_name="s", storage=open_storage(url))
    assert len(again.trials) == 1
    assert storage_url(None, tmp_path / "d.db").startswith("sqlite:///")  # one worker: SQLite


# --- the CLI -------------------------------------------------------------------------------------


def _dry(tiny_model_dir: Path, tmp_path: Path, *extra: str) -> object:
    argv = ["search", "--model", str(tiny_model_dir), "--gpu", "cpu", "--param", "max_num_seqs=2,4"]
    argv += ["--out", str(tmp_path / "out"), "--dry-run", *extra]
    return CliRunner().invoke(cli, argv)


def test_dry_run_shows_the_workers_and_the_journal(tiny_model_dir: Path, tmp_path: Path) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    result = _dry(tiny_model_dir, tmp_path, "--workers", "2")
    assert result.exit_code == 0, result.output
    assert "2 workers on one study" in result.output
    assert f"w0: CPUs {cpu_list(cpus[: len(cpus) // 2 + len(cpus) % 2])}" in result.output
    assert "study storage: journal file" in result.output
    assert "cpu.study.journal (2 workers on one node)" in result.output


def test_too_many_workers_is_one_line_and_exit_2(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tuner.cli import main

    n = len(os.sched_getaffinity(0)) + 1
    argv = ["search", "--model", str(tiny_model_dir), "--gpu", "cpu", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as ended:
        main([*argv, "--workers", str(n), "--dry-run"])
    assert ended.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"vtune: error: --workers {n} needs {n} CPUs"), err
    assert not (tmp_path / "o").exists()  # nothing created


def test_group_size_is_the_largest_tensor_parallel_size_times_a_fixed_pipeline() -> None:
    from types import SimpleNamespace

    from tuner.search.fleet import group_size

    def prep(tps: tuple[object, ...], fixed: tuple[tuple[str, object], ...] = ()) -> object:
        config = SimpleNamespace(engine_args=fixed)
        return SimpleNamespace(
            config=config, space=SimpleNamespace(values={"tensor_parallel_size": tps})
        )

    assert group_size(prep((1, 4, None))) == 4  # type: ignore[arg-type]
    assert group_size(prep((), (("tensor-parallel-size", "2"),))) == 2  # type: ignore[arg-type]
    assert group_size(prep((2,), (("pipeline_parallel_size", 2),))) == 4  # type: ignore[arg-type]
