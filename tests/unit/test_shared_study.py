"""A study several machines share, without a database server (SQLite; the PostgreSQL cases are
in tests/faults/test_postgres.py): the configuration a study carries for ``vtune worker`` (and
the secrets it never carries), the profile lease, the storage's one-line failures, and what a
trial shows in optuna-dashboard."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tuner.cli import main
from tuner.cli.search import tune_config
from tuner.errors import ParameterError, StorageError
from tuner.plan.space import Space
from tuner.search import lease
from tuner.search.prepare import prepare
from tuner.search.record import TrialRecord
from tuner.search.storage import open_failure, open_storage, sqlalchemy_url
from tuner.search.study import open_study, storage_of
from tuner.search.study_config import ATTR, decode, describe, prepare_worker, remember
from tuner.search.trial_record import RULE_EARLY_STOP
from tuner.search.workers import dashboard_attrs, slo_verdict

# A bundled card: no engine, no network.
ARGV = ["--model", "meta-llama/Llama-3.1-8B-Instruct", "--gpu", "h100", "--budget", "3"]
SECRETS = ("S3cr3t-api", "pg-pa55", "http://dcgm.local:9400/metrics", "/secret/venv/python")


def _started(tmp_path: Path, *extra: str):
    """A search's study as ``vtune search`` leaves it once its trials begin."""
    prep = prepare(tune_config([*ARGV, *extra]))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = open_study(url, prep.study_name, ["maximize"], None)
    remember(study, prep, prep.space)
    return prep, url, study


def test_the_study_carries_the_config_and_no_secret(tmp_path: Path) -> None:
    argv = [
        *ARGV,
        "--engine-arg",
        f"api_key={SECRETS[0]}",
        "--engine-arg",
        "enforce_eager=true",
        "--storage",
        f"postgresql://u:{SECRETS[1]}@db:5432/vtune",
        "--dcgm-url",
        SECRETS[2],
        "--vllm-python",
        SECRETS[3],
        "--input-len",
        "64:128",
        "--seconds-per-point",
        "3",
    ]
    cfg = tune_config(argv)
    stored = describe(cfg, prepare(cfg).space)
    text = json.dumps(stored)
    for secret in SECRETS:
        assert secret not in text
    assert stored["secret_engine_args"] == ["api_key"]
    back = decode(json.loads(text)["config"])
    # What a worker runs: the search's settings; the machine's own and the secrets not stored.
    assert back.workload == cfg.workload and back.settings == cfg.settings
    assert back.seconds_per_point == 3.0 and back.slo == cfg.slo and back.params == cfg.params
    assert back.engine_args == (("enforce_eager", True),)  # the secret one left out
    assert back.storage is None and back.out is None and back.telemetry.dcgm_url is None
    assert back.launch.python != SECRETS[3]
    assert back.launch.startup_timeout_s == cfg.launch.startup_timeout_s


def test_a_local_model_path_is_stored_absolute(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = tune_config(["--model", "m", "--gpu", "cpu"])
    stored = describe(cfg, Space({"max_num_seqs": (4,)}))
    assert stored["config"]["model"] == str((tmp_path / "m").resolve())


def test_a_worker_prepares_the_same_search(tmp_path: Path) -> None:
    prep, url, _ = _started(tmp_path, "--engine-arg", f"api_key={SECRETS[0]}")
    with pytest.raises(ParameterError, match=r"secret setting.*api_key"):
        prepare_worker(url, prep.study_name, out=tmp_path / "w", python=None, secrets={})
    with pytest.raises(ParameterError, match="only the secret"):
        prepare_worker(
            url,
            prep.study_name,
            out=tmp_path / "w",
            python=None,
            secrets={"api_key": "k", "max_num_seqs": "8"},
        )
    worker = prepare_worker(
        url, prep.study_name, out=tmp_path / "w", python="/opt/py", secrets={"api_key": "k"}
    )
    assert worker.study_name == prep.study_name
    assert worker.space == prep.space and worker.plan.all() == prep.plan.all()
    assert worker.config.storage == url and worker.config.out == tmp_path / "w"
    assert worker.config.launch.python == "/opt/py"
    assert ("api_key", "k") in worker.config.engine_args
    assert worker.yaml_path.is_relative_to(tmp_path / "w")
    assert worker.work_dir.name == prep.work_dir.name


def test_a_worker_refuses_another_space(tmp_path: Path) -> None:
    prep, url, study = _started(tmp_path)
    stored = dict(study.user_attrs[ATTR])
    stored["space"] = {**stored["space"], "max_num_seqs": [1, 2]}
    study.set_user_attr(ATTR, stored)
    with pytest.raises(ParameterError, match=r"another search space.*max_num_seqs"):
        prepare_worker(url, prep.study_name, out=tmp_path, python=None, secrets={})


def test_a_worker_needs_an_existing_study_with_its_config(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    open_study(url, "vtune-bare-cpu-0123456789", ["maximize"], None)  # made, no config
    with pytest.raises(StorageError, match="carries no search configuration"):
        prepare_worker(url, "vtune-bare-cpu-0123456789", out=None, python=None, secrets={})
    with pytest.raises(StorageError, match=r"no study 'vtune-nope'.*vtune-bare-cpu-0123456789"):
        prepare_worker(url, "vtune-nope", out=None, python=None, secrets={})


def test_worker_command_on_a_missing_study_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    with pytest.raises(SystemExit) as exc:
        main(["worker", "--storage", url, "--study", "vtune-nope", "--out", str(tmp_path)])
    _, err = capsys.readouterr()
    assert exc.value.code == 2
    assert len(err.strip().splitlines()) == 1 and "no study 'vtune-nope'" in err, err


# --- the profile lease ----------------------------------------------------------------------


def test_one_worker_takes_the_lease_and_keeps_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    a = storage_of(open_study(url, "s", ["maximize"], None))
    b = storage_of(open_study(url, "s", ["maximize"], None))  # another worker's connection
    assert lease.held_by(a, "s") is None
    lease.ensure_free(b, "s", "hostB:/b/cpu.yaml")  # nobody holds it yet
    assert lease.take(a, "s", "hostA:/a/cpu.yaml")
    assert not lease.take(b, "s", "hostB:/b/cpu.yaml")
    assert lease.take(a, "s", "hostA:/a/cpu.yaml")  # its holder again: a rerun rewrites
    with pytest.raises(lease.ProfileElsewhere, match=r"another worker \(hostA:/a/cpu\.yaml\)"):
        lease.ensure_taken(b, "s", "hostB:/b/cpu.yaml")
    with pytest.raises(lease.ProfileElsewhere):
        lease.ensure_free(b, "s", "hostB:/b/cpu.yaml")
    lease.ensure_free(a, "s", "hostA:/a/cpu.yaml")
    assert lease.held_by(b, "other") is None  # per study


def test_lease_holder_is_host_and_profile(tmp_path: Path) -> None:
    holder = lease.holder_for(tmp_path / "x" / ".." / "cpu.yaml")
    assert holder.endswith(f":{tmp_path.resolve() / 'cpu.yaml'}")


# --- the storage's failures -------------------------------------------------------------------


def test_postgres_urls_name_psycopg() -> None:
    assert sqlalchemy_url("postgresql://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert sqlalchemy_url("postgres://u@h:5/db") == "postgresql+psycopg://u@h:5/db"
    assert sqlalchemy_url("postgresql+psycopg2://h/db") == "postgresql+psycopg2://h/db"
    assert sqlalchemy_url("sqlite:///x.db") == "sqlite:///x.db"


def test_a_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg now fails
    with pytest.raises(StorageError) as exc:
        open_storage("postgresql://vtune:pw@127.0.0.1:1/vtune")
    text = str(exc.value)
    assert "missing database driver psycopg" in text
    assert "pip install 'vtune[postgresql]'" in text and "pw" not in text.replace("***", "")


@pytest.mark.parametrize(
    "message,expected",
    [
        (
            '(psycopg.OperationalError) connection failed: connection to server at "10.0.0.5", '
            'port 5433 failed: FATAL:  password authentication failed for user "vt"\n'
            "(Background on this error at: https://sqlalche.me/e/21/e3q8)",
            "10.0.0.5:5433: the server refused the login",
        ),
        (
            "connection failed: connection to server at ... Connection refused\n\tIs the server",
            "10.0.0.5:5433: connection refused",
        ),
        ('FATAL:  database "vt" does not exist', "database 'vt' does not exist"),
        ("odd failure mentioning hunter2 and x%40y and tok3n", "odd failure mentioning ***"),
    ],
)
def test_open_failure_is_one_line_without_credentials(message: str, expected: str) -> None:
    url = "postgresql://vt:hunter2@10.0.0.5:5433/vt?sslpassword=tok3n"
    line = open_failure(url, RuntimeError(message))
    assert line.startswith("cannot open study storage postgresql://vt:***@10.0.0.5:5433/vt")
    assert expected in line and "\n" not in line
    assert "hunter2" not in line and "tok3n" not in line


def test_default_port_is_shown() -> None:
    line = open_failure("postgres://u:pw@db.example/vt", RuntimeError("timeout expired"))
    assert "db.example:5432: no answer (timed out)" in line


# --- what optuna-dashboard shows ------------------------------------------------------------


def _record(state: str, best_index: int | None, met: bool = True) -> TrialRecord:
    points = [{"slo_met": False}, {"slo_met": met}]
    return TrialRecord(
        "seqs8",
        {"max_num_seqs": 8},
        state,
        objective=float("inf") if state == "failed" else 512.0,
        rate_search={"best_index": best_index, "points": points},
    )


def test_dashboard_attrs_and_slo_verdict() -> None:
    attrs = dashboard_attrs(_record("complete", 1))
    assert attrs == {
        "candidate": "seqs8",
        "knobs": {"max_num_seqs": 8},
        "objective": 512.0,
        "slo": "met",
    }
    assert slo_verdict(_record("complete", None)) == "not met"
    assert slo_verdict(_record("complete", 1, met=False)) == "not met"
    assert slo_verdict(_record("failed", None)) == "failed"
    early = TrialRecord("seqs8", {}, "pruned", failure={"rule": RULE_EARLY_STOP})
    assert slo_verdict(early) == "stopped early"
    assert dashboard_attrs(_record("failed", None))["objective"] is None  # no infinity in JSON
