"""`vtune search` input errors: one line, exit code 2, nothing launched."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from tuner.cli import main

CONFIG = {
    "model_type": "llama",
    "num_hidden_layers": 2,
    "hidden_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "intermediate_size": 1024,
    "vocab_size": 1024,
    "max_position_embeddings": 2048,
    "torch_dtype": "bfloat16",
}


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
    rows = [line.split()[3] for line in out.splitlines() if line.startswith("│")]
    # Baseline, then one per distinct prediction; the token-budget ties come after.
    assert rows[:4] == ["vllm-defaults", "seqs128-mbt1024", "seqs32-mbt1024", "seqs8-mbt1024"]
    code, out, _ = run(capsys, *args, *space)
    assert "Trial order (analytically best first)" in out  # no budget: the whole grid


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
