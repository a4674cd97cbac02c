"""`vtune search` input errors: one line, exit code 2, nothing launched; the --out directory
(in the way, locked by another search, a stale profile, a full disk) and secrets in its files."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.configs import TINY_LLAMA_CONFIG
from tuner.cli import main

CONFIG = TINY_LLAMA_CONFIG


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(CONFIG))
    return tmp_path / "m"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def test_dry_run_prints_the_plan(
    capsys: pytest.CaptureFixture[str], model_dir: Path, tmp_path: Path
) -> None:
    code, out, _ = run(
        capsys,
        "search",
        "--model",
        str(model_dir),
        "--gpu",
        "cpu",
        "--param",
        "max_num_seqs=4,16,64",
        "--dry-run",
        "--out",
        str(tmp_path),
    )
    assert code == 0
    assert "vllm-defaults" in out and "seqs64" in out and "Estimated time" in out
    assert not list(tmp_path.glob("*/cpu.yaml"))  # nothing written


def test_dry_run_of_a_sampled_search_shows_the_first_picks_then_the_sampler(
    capsys: pytest.CaptureFixture[str], model_dir: Path, tmp_path: Path
) -> None:
    args = [
        "search",
        "--model",
        str(model_dir),
        "--gpu",
        "cpu",
        "--dry-run",
        "--out",
        str(tmp_path),
    ]
    space = ["--param", "max_num_seqs=8,32,128", "--param", "max_num_batched_tokens=1024,4096"]
    code, out, _ = run(capsys, *args, *space, "--budget", "3")
    assert code == 0
    assert "the first 4 run in this order, then TPE chooses" in out
    rows = [w[1] for w in map(str.split, out.splitlines()) if w and w[0].isdigit()]
    # Baseline, then one per distinct prediction; the token-budget ties come after.
    assert rows[:4] == ["vllm-defaults", "seqs128-mbt1024", "seqs32-mbt1024", "seqs8-mbt1024"]
    code, out, _ = run(capsys, *args, *space)
    assert "Trial order, all 7: vLLM's defaults, then best predicted" in out  # the whole grid


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--slo", "ttft:p95<<5"], "SLO term"),
        (["--slo", "latency<5ms"], "SLO"),
        (["--param", "max_seqs=4"], "unknown parameter 'max_seqs'"),
        (["--param", "max_num_seqs=0"], "positive"),
        (
            ["--param", "max_num_seqs=64", "--param", "max_num_batched_tokens=16"],
            "every candidate was pruned (1 by invalid)",
        ),
        (["--param", "quantization=none,awq"], "not defined"),
        (["--build-variants", "q2"], "cannot build"),
        (["--objective", "latency"], "needs --rate"),
        (["--space", "/no/such/space.yaml"], "cannot read space file"),
        (["--gpu", "h1000"], "unknown GPU"),
        (["--storage", "sqlite:////no/such/dir/study.db"], "cannot open study storage"),
        (["--input-len", "0"], "--input-len"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    capsys: pytest.CaptureFixture[str],
    model_dir: Path,
    tmp_path: Path,
    args: list[str],
    needle: str,
) -> None:
    base = ["search", "--model", str(model_dir), "--gpu", "cpu", "--out", str(tmp_path)]
    if "--gpu" in args:
        base = base[:3] + base[5:]
    code, out, err = run(capsys, *base, *args)
    assert code == 2, err
    assert needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err + out


def test_metrics_port_in_use(
    capsys: pytest.CaptureFixture[str], model_dir: Path, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run(
            capsys,
            "search",
            "--model",
            str(model_dir),
            "--gpu",
            "cpu",
            "--metrics-port",
            str(port),
            "--out",
            str(tmp_path),
        )
    assert code == 2 and f"port {port} is in use" in err
    assert len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*/cpu.study.db"))  # failed before the study was opened


def test_missing_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "search", "--model", str(tmp_path / "nope"), "--gpu", "cpu")
    assert code == 2 and "does not exist" in err


def test_a_gpu_this_machine_does_not_have_is_a_warning_not_an_error(
    capsys: pytest.CaptureFixture[str],
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tuner.specs import detect

    h100 = detect.DetectedGpu(0, "NVIDIA H100 80GB HBM3", 80 * 2**30)
    monkeypatch.setattr(detect, "detect_gpus", lambda: [h100])
    args = ["search", "--model", str(model_dir), "--dry-run", "--out", str(tmp_path)]
    code, _, err = run(capsys, *args, "--gpu", "cpu")
    assert code == 0
    assert err.startswith("vtune: warning: --gpu cpu, but this machine has 1 GPU(s)")
    code, _, err = run(capsys, *args, "--gpu", "h100")
    assert code == 0 and "warning" not in err


# --- the --out directory: in the way, locked, stale profiles ------------------------------------


def _search_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["search", "--model", str(model_dir), "--gpu", "cpu", "--out", str(out), *extra]


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("where", ["out", "parent"])
def test_an_out_that_cannot_be_created_is_one_line_before_anything_starts(
    capsys: pytest.CaptureFixture[str],
    model_dir: Path,
    tmp_path: Path,
    dry_run: bool,
    where: str,
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory\n")
    out = blocker if where == "out" else blocker / "profiles"
    args = _search_args(model_dir, out, *(["--dry-run"] if dry_run else []))
    code, stdout, err = run(capsys, *args)
    assert code == 2, err
    assert f"cannot create --out directory {out}/m: {blocker} is a file" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err + stdout
    assert stdout == ""  # nothing planned, nothing printed
    assert blocker.read_text() == "a file, not a directory\n"


HOLD_LOCK = """
import sys
from pathlib import Path
from tuner.search.profile import out_lock
with out_lock(Path(sys.argv[1]), "cpu"):
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


def test_a_second_search_on_one_out_ends_at_once_with_one_line(
    capsys: pytest.CaptureFixture[str], model_dir: Path, tmp_path: Path
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / "m")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        code, out, err = run(capsys, *_search_args(model_dir, tmp_path))
    finally:
        holder.communicate("", timeout=10)  # closes its stdin: it releases and exits
    assert code == 2, err
    assert err.startswith("vtune: error: ") and err.count("\n") == 1, err
    assert f"another vtune search (pid {holder.pid}) is writing the cpu profile" in err
    assert "give this search its own --out" in err and "Traceback" not in err + out
    assert not (tmp_path / "m" / "cpu.study.db").exists()  # it stopped before the study
    from tuner.search.profile import out_lock

    with out_lock(tmp_path / "m", "cpu"):  # the lock ended with its holder: free again
        pass


def test_without_a_new_profile_the_old_one_is_moved_aside(tmp_path: Path) -> None:
    from tuner.search.profile import stale_path, write_outputs

    yaml_path = tmp_path / "m" / "cpu.yaml"
    assert write_outputs(yaml_path, {"run": 1}, "model: m\nmax-num-seqs: 8\n") is None
    assert yaml_path.read_text() == "model: m\nmax-num-seqs: 8\n"
    # The next run meets nothing: its record replaces the old one, the old YAML is not shipped.
    stale = write_outputs(yaml_path, {"run": 2}, None)
    assert stale == stale_path(yaml_path) == tmp_path / "m" / "cpu.yaml.stale"
    assert not yaml_path.exists() and stale.read_text() == "model: m\nmax-num-seqs: 8\n"
    assert json.loads(yaml_path.with_suffix(".json").read_text()) == {"run": 2}
    # A later run with a profile writes the pair and drops the stale copy.
    assert write_outputs(yaml_path, {"run": 3}, "model: m\n") is None
    assert yaml_path.read_text() == "model: m\n" and not stale.exists()
    assert sorted(p.name for p in yaml_path.parent.iterdir()) == ["cpu.json", "cpu.yaml"]


def test_a_full_disk_while_writing_the_profile_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import tuner.files
    from tuner.errors import StorageError
    from tuner.search.profile import write_outputs

    yaml_path = tmp_path / "cpu.yaml"
    write_outputs(yaml_path, {"run": 1}, "model: old\n")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tuner.files.os, "fsync", full)
    with pytest.raises(StorageError, match="No space left on device; finished trials are kept"):
        write_outputs(yaml_path, {"run": 2}, "model: new\n")
    monkeypatch.undo()
    # Nothing half-written, no temporary file left, and no YAML beside a record of another run.
    assert json.loads(yaml_path.with_suffix(".json").read_text()) == {"run": 1}
    assert not yaml_path.exists() and (tmp_path / "cpu.yaml.stale").read_text() == "model: old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu.json", "cpu.yaml.stale"]


def test_a_full_disk_while_saving_a_trial_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import tuner.files
    from tuner.errors import StorageError
    from tuner.search.record import STATE_COMPLETE, TrialRecord
    from tuner.search.store import TrialStore

    store = TrialStore(tmp_path)
    store.save(TrialRecord("seqs8", {"max_num_seqs": 8}, STATE_COMPLETE, objective=1.0))

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tuner.files.os, "fsync", lambda fd: full(fd, b""))
    with pytest.raises(StorageError) as caught:
        store.save(TrialRecord("seqs16", {"max_num_seqs": 16}, STATE_COMPLETE, objective=2.0))
    assert str(caught.value) == (
        f"cannot save trial seqs16 in {tmp_path / 'trials'}: No space left on device; "
        "finished trials are kept (rerun the same command to finish)"
    )
    monkeypatch.undo()
    assert list(store.load_all()) == ["seqs8"]  # the finished one kept, nothing half-written
    assert [p.name for p in (tmp_path / "trials").iterdir()] == ["seqs8.json"]


def test_secrets_never_reach_the_profile() -> None:
    from tuner.search.profile import vllm_config

    config = vllm_config(
        {"api_key": "s1", "hf_token": "s2", "ssl_password": "s3", "max_num_seqs": 8, "seed": 1}
    )
    assert config == {"max-num-seqs": 8, "seed": 1}


@pytest.mark.parametrize(
    "storage",
    [
        "postgresql://tuner:CANARY-pw-7f3a@127.0.0.1:1/vtune?sslpassword=CANARY-q-91bc",
        "postgresql+psycopg2://tuner:CANARY-pw-7f3a@127.0.0.1:1/vtune?auth_token=CANARY-q-91bc",
    ],
)
def test_storage_secrets_are_never_shown(
    capsys: pytest.CaptureFixture[str], model_dir: Path, tmp_path: Path, storage: str
) -> None:
    for dry in (["--dry-run"], []):
        code, out, err = run(capsys, *_search_args(model_dir, tmp_path, "--storage", storage, *dry))
        assert "CANARY" not in out + err
        if not dry:  # the storage is unreachable: one line naming it, the secrets hidden
            assert code == 2 and len(err.strip().splitlines()) == 1
            assert "tuner:***@127.0.0.1:1/vtune?" in err and "=***" in err
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or b"CANARY" not in path.read_bytes()
