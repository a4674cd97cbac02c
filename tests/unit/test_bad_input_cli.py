"""Bad input to ``vtune bench`` ends in one line and exit 2, before a server is asked anything:
an API key no HTTP header can carry, a ShareGPT file that cannot be read."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuner.cli import main

UNREACHABLE = "http://127.0.0.1:9"  # nothing listens: a request sent would fail differently


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return int(info.value.code or 0), capsys.readouterr().err


def test_non_latin1_api_key_flag_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    argv = ["bench", "--model", str(tmp_path), "--url", UNREACHABLE, "--api-key", "ключ"]
    code, err = run_cli(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and "API key" in err
    assert "ключ" not in err and "Traceback" not in err


def test_non_latin1_api_key_from_the_environment_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-\u2603")
    code, err = run_cli(["bench", "--model", str(tmp_path), "--url", UNREACHABLE], capsys)
    assert code == 2 and err.count("\n") == 1 and "OPENAI_API_KEY" in err


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "is a directory"),
        (b"\xff\xfe\x00", "is not UTF-8 text"),
        (b"{not json", "is not valid JSON"),
        (b'{"conversations": []}', "expected a JSON list of conversations"),
    ],
)
def test_unreadable_dataset_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, fragment: str
):
    dataset = tmp_path / "data"
    if content is None:
        dataset.mkdir()
    else:
        dataset.write_bytes(content)
    argv = ["bench", "--model", str(tmp_path), "--url", UNREACHABLE, "--dataset", str(dataset)]
    code, err = run_cli(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and fragment in err, err
