"""`vtune estimate` and `vtune gpus` from the command line: output and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tuner.cli import cli, main


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def test_json_seed_example(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        "estimate",
        "--model",
        "llama-2-13b",
        "--gpu",
        "a100-40gb",
        "--max-model-len",
        "4096",
        "--json",
    )
    assert code == 0
    data = json.loads(out)
    assert data["kv_bytes_per_sequence"] == 3_355_443_200
    assert data["naive_max_batch"] == 5
    assert data["kv_capacity_tokens"] % 16 == 0


def test_table_and_explain(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        "estimate",
        "--model",
        "llama-2-13b",
        "--gpu",
        "a100-40gb",
        "--max-model-len",
        "4096",
        "--explain",
    )
    assert code == 0
    assert "3,355,443,200" in out
    assert "40 GB (decimal)" in out  # --explain says why the seed's 4 differs from our 5


def test_cpu_kv_cache_memory_bytes_fixes_pool(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        "estimate",
        "--model",
        "qwen2.5-0.5b",
        "--gpu",
        "h100",
        "--kv-cache-memory-bytes",
        "2GiB",
        "--json",
    )
    assert code == 0 and json.loads(out)["kv_pool_bytes"] == 2 * 2**30


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--model", "llama-2-13b", "--gpu", "h10"], "did you mean"),
        (["--model", "no-such-model-xyz", "--gpu", "h100"], "not found"),
        (["--model", "./missing/dir", "--gpu", "h100"], "does not exist"),
        (["--model", "llama-2-13b", "--max-model-len", "0"], "positive"),
        (["--model", "llama-2-13b", "--max-model-len", "-4"], "positive"),
        (["--model", "llama-2-13b", "--gpu-memory-utilization", "1.2"], "(0, 1]"),
        (["--model", "llama-2-13b", "--gpu-memory-utilization", "0"], "(0, 1]"),
        (["--model", "llama-2-13b", "--gpu", "a100-40gb", "-q", "fp8"], "not supported"),
        (["--model", "llama-2-13b", "--kv-cache-memory-bytes", "lots"], "byte size"),
        (["--gpu", "h100"], "--model is required"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    code, out, err = run(capsys, "estimate", *args)
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err + out


def test_unreadable_config_from_a_real_process(tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"hidden_size": 64}')
    proc = subprocess.run(
        [sys.executable, "-m", "tuner", "estimate", "--model", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "missing" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_gpus_lists_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "gpus")
    assert code == 0
    for name in ("h100-sxm", "a100-40gb", "mi300x", "cpu"):
        assert name in out


@pytest.mark.parametrize(
    "changes,needle",
    [
        ({"num_attention_heads": 0}, "num_attention_heads must be positive"),
        ({"quantization_config": "awq"}, "quantization_config must be a JSON object"),
    ],
)
def test_broken_config_is_one_line_exit_2(
    tmp_path: Path, changes: dict[str, object], needle: str
) -> None:
    config = {
        "model_type": "llama",
        "num_hidden_layers": 2,
        "hidden_size": 128,
        "num_attention_heads": 2,
        "vocab_size": 1000,
    }
    (tmp_path / "config.json").write_text(json.dumps({**config, **changes}))
    result = CliRunner().invoke(cli, ["estimate", "--model", str(tmp_path), "--gpu", "h100"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vtune: error: ") and needle in lines[0]
    assert "Traceback" not in result.output
