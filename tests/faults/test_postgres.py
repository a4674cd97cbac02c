"""Many workers, one study, on a real PostgreSQL server (a throwaway cluster: tests/pg.py).

One shared run (module fixture, about 25-35 s on 2 cores): ``vtune search --storage
postgresql://...`` on the fake vLLM process over two candidates, and, once the study carries its
configuration, ``vtune worker --storage URL --study NAME`` beside it with its own ``--out``.
Then ``vtune worker`` joins the finished study. The tests read what that left:

- each candidate measured exactly once across the workers (one COMPLETE trial holds its record,
  one trial log across all ``--out``), and exactly one profile with its record: the lease's
  holder wrote them; every other worker said ``profile written by another worker``, exit 0;
- the late worker ended at once, wrote nothing, measured nothing;
- each trial carries what optuna-dashboard shows (candidate, knobs, objective, SLO verdict,
  worker id), the study its search configuration;
- the URL's password is nowhere: not in any output, any file under ``--out``, the study;
- no process left behind.

And, a few seconds each: a wrong password or port ends ``vtune search`` and ``vtune worker``
with exit 2 and one line naming host and port without the password; a study name that does not
exist ends ``vtune worker`` with exit 2 and one line.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import pg
from tests.faults import procs
from tests.faults import searchproc as sp

pytestmark = pytest.mark.faults

postgres = pg.postgres  # the module's PostgreSQL server
CANDIDATES = ("vllm-defaults", "seqs4")
ELSEWHERE = "profile written by another worker"
OTHER_HOST = "vtune-pg-worker"


def _search_argv(model: Path, out: Path, url: str) -> list[str]:
    """``vtune search`` of two candidates on the fake vLLM, no finalist re-runs."""
    argv = sp.search_argv(model, out, "--storage", url)
    argv[argv.index("--repeats") + 1] = "0"
    return argv


def _other_host() -> list[str]:
    """A prefix that runs the worker under a hostname of its own (``unshare -u``, root), as on
    another machine: on this host's name it would first watch the search's live trial for a
    grace period (it might be a dead run's of this host: ``fail_stale``'s settle); without
    root, nothing (the run takes that much longer)."""
    ran = subprocess.run(["unshare", "-u", "true"], capture_output=True, timeout=30)
    if ran.returncode != 0:
        return []
    return ["unshare", "-u", "sh", "-c", 'hostname "$0" && exec "$@"', OTHER_HOST]


def _worker_argv(url: str, study: str, out: Path) -> list[str]:
    return [
        str(sp.VTUNE),
        "worker",
        "--storage",
        url,
        "--study",
        study,
        "--out",
        str(out),
        "--vllm-python",
        str(sp.FAKE_VLLM_PYTHON),
    ]


def _optuna_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


def _wait_for_config(url: str, timeout: float = 120) -> str:
    """The study's name, once it carries the search configuration (the search stores it when
    its trials begin)."""
    import optuna

    from tuner.search.study_config import ATTR

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        storage = optuna.storages.RDBStorage(_optuna_url(url))
        for summary in storage.get_all_studies():
            if "/" not in summary.study_name and ATTR in summary.user_attrs:
                storage.remove_session()
                return summary.study_name
        storage.remove_session()
        time.sleep(0.2)
    raise AssertionError("the search never stored its configuration in the study")


@dataclass
class Shared:
    """What the shared run left: the URL, the study, how each process ended, their --out."""

    url: str
    password: str
    study: str
    searches: list[procs.Search]
    ended: list[sp.Ran]
    late: sp.Ran
    late_s: float
    late_out: Path
    trials_before_late: int

    def describe(self) -> str:
        return "\n".join(r.describe() for r in [*self.ended, self.late])


@pytest.fixture(scope="module")
def shared(
    postgres: pg.Postgres, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Shared]:
    tmp = tmp_path_factory.mktemp("shared")
    url, mark = postgres.new_database(), sp.new_mark()
    env = sp.fake_env(mark, FAKE_VLLM_STARTUP_S="1")
    searches: list[procs.Search] = []
    t_start = time.monotonic()
    try:
        a_out, b_out = tmp / "search", tmp / "worker"
        searches.append(
            procs.start(
                _search_argv(tiny_model_dir, a_out, url), env, a_out, tiny_model_dir, "search"
            )
        )
        study = _wait_for_config(url)
        argv = [*_other_host(), *_worker_argv(url, study, b_out)]
        searches.append(procs.start(argv, env, b_out, tiny_model_dir, "worker"))
        ended = [s.ended(timeout=240) for s in searches]
        print(f"search and worker ended after {time.monotonic() - t_start:.1f} s")
        late_out = tmp / "late"
        # The two may have told a trial as a duplicate of a finished one (never measured):
        # what the late worker must not add is counted from here.
        trials_before_late = len(_trials(url, study))
        t0 = time.monotonic()
        late = sp.run(_worker_argv(url, study, late_out), env, timeout=120)
        late_s = time.monotonic() - t0
    finally:
        for search in searches:
            search.kill()
    for search in searches:
        procs.assert_gone(search.remember())
    sp.assert_no_process_left(mark)
    yield Shared(
        url, postgres.password, study, searches, ended, late, late_s, late_out, trials_before_late
    )


def _trials(url: str, study: str) -> list[Any]:
    import optuna

    return optuna.load_study(study_name=study, storage=_optuna_url(url)).get_trials(deepcopy=False)


def test_each_candidate_measured_once_and_one_profile(shared: Shared) -> None:
    import optuna

    context = shared.describe()
    for ran in shared.ended:
        assert ran.returncode == 0, context
        assert "Traceback" not in ran.stdout + ran.stderr, context
    trials = _trials(shared.url, shared.study)
    table = "\n".join(
        f"  #{t.number} {t.state.name} {t.user_attrs.get('candidate')} "
        f"by {str(t.user_attrs.get('worker_id'))[:8]} {t.user_attrs.get('slo')}"
        for t in trials
    )
    print(f"study:\n{table}")
    context = f"study:\n{table}\n{context}"
    complete = optuna.trial.TrialState.COMPLETE
    measured = [t.user_attrs["candidate"] for t in trials if "record" in t.user_attrs]
    assert collections.Counter(measured) == dict.fromkeys(CANDIDATES, 1), context
    assert all(t.state == complete for t in trials if "record" in t.user_attrs), context
    assert not [t.number for t in trials if t.user_attrs.get("stale")], context
    logs = [name for s in shared.searches for name in procs.trial_logs(s.pdir)]
    by_candidate = collections.Counter(n.split("-", 1)[1].removesuffix(".log") for n in logs)
    assert by_candidate == dict.fromkeys(CANDIDATES, 1), f"{logs}\n{context}"

    # One profile with its record, written by the lease's holder; the other said so and
    # wrote neither.
    wrote = [s for s in shared.searches if (s.pdir / "cpu.yaml").exists()]
    assert len(wrote) == 1, context
    writer = wrote[0]
    record = sp.assert_pair_from_one_run(writer.pdir)
    sp.assert_complete_record(record)
    for search, ran in zip(shared.searches, shared.ended, strict=True):
        sp.assert_nothing_half_written(search.out)
        if search is not writer:
            assert not (search.pdir / "cpu.json").exists(), context
            assert ELSEWHERE in ran.stderr, context
            assert str(writer.pdir / "cpu.yaml") in ran.stderr, context  # who wrote it


def test_a_worker_joining_a_finished_study_ends_at_once(shared: Shared) -> None:
    """Nothing left to measure, the lease held: exit 0, one line, nothing written, no trial."""
    late = shared.late
    assert late.returncode == 0, late.describe()
    assert ELSEWHERE in late.stderr and "Traceback" not in late.stderr, late.describe()
    assert shared.late_s < 20, shared.late_s  # vtune's start-up, no vLLM launched
    assert not list(shared.late_out.rglob("cpu.yaml"))
    assert not list(shared.late_out.rglob("cpu.json"))
    assert not list(shared.late_out.rglob("*.log")), "the late worker launched something"
    assert len(_trials(shared.url, shared.study)) == shared.trials_before_late  # it asked none


def test_trials_carry_what_the_dashboard_shows(shared: Shared) -> None:
    for trial in _trials(shared.url, shared.study):
        attrs = trial.user_attrs
        assert attrs["candidate"] in CANDIDATES, attrs
        if "duplicate_of" in attrs or "running_elsewhere" in attrs:
            continue  # asked, found finished or running elsewhere: told at once, not measured
        assert isinstance(attrs["knobs"], dict), attrs
        assert attrs["objective"] > 0, attrs
        assert attrs["slo"] == "met", attrs
        assert len(attrs["worker_id"]) == 32 and attrs["worker"], attrs


def test_no_password_anywhere(shared: Shared) -> None:
    """Not in any output, any file under any --out, nor anywhere in the storage's studies."""
    import optuna

    secret = shared.password
    for ran in [*shared.ended, shared.late]:
        assert secret not in ran.stdout + ran.stderr
    for root in [*(s.out for s in shared.searches), shared.late_out]:
        for path in root.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
    storage = optuna.storages.RDBStorage(_optuna_url(shared.url))
    studies = storage.get_all_studies()
    assert {s.study_name for s in studies} == {shared.study, f"{shared.study}/profile-lease"}
    for summary in studies:
        dumped = json.dumps([summary.user_attrs, summary.system_attrs], default=str)
        assert secret not in dumped
        trials = storage.get_all_trials(summary._study_id)
        assert secret not in json.dumps([t.user_attrs for t in trials], default=str)
    storage.remove_session()


# --- one-line failures ------------------------------------------------------------------------


def _assert_one_line_without(ran: sp.Ran, secret: str, *words: str) -> str:
    line = ran.one_line_error()
    assert secret not in ran.stdout + ran.stderr, ran.describe()
    for word in words:
        assert word in line, line
    return line


def test_wrong_password_or_port_is_one_line_without_the_password(
    postgres: pg.Postgres, tiny_model_dir: Path, tmp_path: Path
) -> None:
    env, wrong = sp.fake_env(sp.new_mark()), "not-the-" + postgres.password
    where = f"127.0.0.1:{postgres.port}"
    bad_password = postgres.url(password=wrong)
    ran = sp.run(_search_argv(tiny_model_dir, tmp_path / "a", bad_password), env, timeout=120)
    line = _assert_one_line_without(ran, wrong, where, "refused the login")
    assert "***" in line
    closed = dataclasses.replace(postgres, port=_closed_port())
    ran = sp.run(_worker_argv(closed.url(), "vtune-x", tmp_path / "b"), env, timeout=120)
    _assert_one_line_without(ran, postgres.password, f"127.0.0.1:{closed.port}", "refused")
    assert not list(tmp_path.rglob("*.yaml"))


def test_worker_on_a_study_that_does_not_exist(postgres: pg.Postgres, tmp_path: Path) -> None:
    env = sp.fake_env(sp.new_mark())
    ran = sp.run(_worker_argv(postgres.url(), "vtune-no-such-study", tmp_path), env, timeout=120)
    _assert_one_line_without(ran, postgres.password, "no study 'vtune-no-such-study'")
    assert not any(tmp_path.iterdir())  # nothing created


def _closed_port() -> int:
    """A port nothing listens on (free now; the test needs it closed for seconds)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
