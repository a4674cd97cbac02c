"""``vtune probe``: a real (tiny) probe on the CPU, the per-machine cache, the command."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from tuner.errors import UnsupportedError
from tuner.specs import probe as probe_mod
from tuner.specs.probe import (
    ProbeResult,
    ProbeSizes,
    cache_dir,
    cache_path,
    device_key,
    load_probe,
    local_device_key,
    probe,
    run_probe,
    save_probe,
)

pytest.importorskip("torch")

TINY = ProbeSizes(copy_bytes=1 << 20, matmul_n=64, repeats=1)


@pytest.fixture
def xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("VTUNE_PROBE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path


def test_a_tiny_cpu_probe_measures_and_round_trips_through_the_cache(xdg: Path) -> None:
    result = probe("cpu", TINY)
    assert result.kind == "cpu" and result.memory_bandwidth > 0
    assert set(result.peak_flops) == {"fp32", "bf16"}
    assert all(v > 0 for v in result.peak_flops.values())
    assert result.matmul_n == {"fp32": 64, "bf16": 64}
    assert result.memory_total_bytes >= result.memory_free_bytes > 0
    assert result.device_key == local_device_key("cpu")  # found again without torch
    assert result.measured_at.endswith("+00:00")
    path = save_probe(result)
    assert path == xdg / "vtune" / "probe" / f"{result.device_key}.json"
    assert json.loads(path.read_text())["device_key"] == result.device_key
    assert load_probe(result.device_key) == result


def test_a_missing_cache_is_none(xdg: Path) -> None:
    assert load_probe("nothing-here") is None


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[1, 2]",
        '{"schema": 1, "device_key": "x"}',
        '{"schema": 99}',
        b"\xff\xfe",
    ],
)
def test_a_corrupt_cache_is_ignored_with_a_warning(
    xdg: Path, content: str | bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = cache_path("some-gpu")
    path.parent.mkdir(parents=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="tuner.specs.probe"):
        assert load_probe("some-gpu") is None
    assert len(caplog.records) == 1
    assert "ignoring the probe cache" in caplog.text and str(path) in caplog.text


def test_negative_figures_are_not_a_probe(xdg: Path) -> None:
    good = probe("cpu", TINY)
    bad = {**good.to_json(), "memory_bandwidth": -1.0}
    cache_path(good.device_key).parent.mkdir(parents=True, exist_ok=True)
    cache_path(good.device_key).write_text(json.dumps(bad))
    assert load_probe(good.device_key) is None


def test_cache_location_and_keys() -> None:
    assert cache_dir({"XDG_CACHE_HOME": "/x"}) == Path("/x/vtune/probe")
    assert cache_dir({"XDG_CACHE_HOME": ""}) == Path.home() / ".cache" / "vtune" / "probe"
    assert device_key("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert device_key("  ") == "unknown"
    assert cache_path("NVIDIA H100", {"XDG_CACHE_HOME": "/c"}) == Path(
        "/c/vtune/probe/nvidia-h100.json"
    )


def test_cuda_asked_for_without_one_is_one_clear_error(xdg: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UnsupportedError, match="--gpu cpu"):
        run_probe("h100")
    with pytest.raises(RuntimeError, match="CUDA"):
        probe("cuda", TINY)


def test_run_probe_on_the_cpu_caches_and_compares_with_nothing(xdg: Path) -> None:
    run = run_probe("cpu", sizes=TINY)
    assert run.spec is None and run.warning is None
    assert run.path.exists() and load_probe(run.result.device_key) == run.result
    rows = run.comparison()
    assert [r[0] for r in rows] == ["bandwidth", "fp32", "bf16"]
    assert all(sheet is None for _, _, sheet in rows)
    out = run.to_json()
    assert out["fractions_of_datasheet"] == {} and out["cache_path"] == str(run.path)


def test_the_command_prints_a_table_or_json(xdg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tuner.cli.probe import probe as probe_command

    monkeypatch.setattr(probe_mod.ProbeSizes, "default", classmethod(lambda cls, kind: TINY))
    runner = CliRunner()
    table = runner.invoke(probe_command, ["--gpu", "cpu"])
    assert table.exit_code == 0, table.output
    assert "memory bandwidth" in table.output and "fp32 matmul (n = 64)" in table.output
    as_json = runner.invoke(probe_command, ["--gpu", "cpu", "--json"])
    assert as_json.exit_code == 0, as_json.output
    payload = json.loads(as_json.stdout)
    assert payload["probe"]["kind"] == "cpu" and payload["datasheet"] is None
    assert ProbeResult.from_json(payload["probe"]).memory_bandwidth > 0


def test_cuda_asked_for_on_a_cpu_machine_is_one_line_and_exit_2(xdg: Path) -> None:
    import torch

    from tuner.cli.common import VtuneGroup

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    group = VtuneGroup(lazy_commands={"probe": "tuner.cli.probe:probe"})
    result = CliRunner().invoke(group, ["probe", "--gpu", "h100"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1].startswith("vtune: error: --gpu h100-sxm asks")
    unknown = CliRunner().invoke(group, ["probe", "--gpu", "h1000"])
    assert unknown.exit_code == 2 and "unknown GPU" in unknown.stderr
