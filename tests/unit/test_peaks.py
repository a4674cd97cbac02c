"""Probed peaks in place of the datasheet's (issue 12): which cached probe belongs to a
registry entry, how its figures replace the entry's, and ``vtune estimate`` / ``gpus`` /
``search --dry-run`` using them and saying so. Probes are written as files (no torch)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from tuner.cli import cli
from tuner.specs.gpu import get_gpu
from tuner.specs.peaks import PeakFigures, probe_for, probed_flops, with_peaks
from tuner.specs.probe import ProbeResult, ProbeSizes, device_key, local_device_key, save_probe

GB, TF = 1e9, 1e12


@pytest.fixture
def probe_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VTUNE_PROBE_DIR", str(tmp_path))
    return tmp_path


def _probe(
    name: str, kind: str, bandwidth: float, flops: dict[str, float], memory: int = 80 << 30
) -> ProbeResult:
    key = device_key(name if kind == "cuda" else "cpu " + name)
    return ProbeResult(
        device_key=key,
        device_name=name,
        kind=kind,
        memory_bandwidth=bandwidth,
        peak_flops=flops,
        memory_total_bytes=memory,
        memory_free_bytes=memory // 2,
        measured_at="2026-11-29T12:00:00+00:00",
        torch_version="2.x",
        sizes=ProbeSizes(1 << 20, 64, 1),
        matmul_n=dict.fromkeys(flops, 64),
        seconds=1.0,
    )


def cpu_probe(bandwidth: float = 28 * GB, bf16: float = 2 * GB, fp32: float = 128 * GB):
    probe = _probe("test cpu", "cpu", bandwidth, {"fp32": fp32, "bf16": bf16})
    return replace(probe, device_key=local_device_key("cpu"))


def test_no_probe_means_the_datasheet(probe_dir: Path) -> None:
    spec, figures = with_peaks(get_gpu("cpu"))
    assert spec == get_gpu("cpu")
    assert figures.source == "datasheet" and figures.measured_at is None
    assert figures.memory_bandwidth == spec.memory_bandwidth


def test_a_cpu_probe_replaces_the_nominal_figures(probe_dir: Path) -> None:
    save_probe(cpu_probe())
    spec, figures = with_peaks(get_gpu("cpu"))
    assert figures.probed and figures.measured_at == "2026-11-29T12:00:00+00:00"
    assert spec.memory_bandwidth == 28 * GB
    # bf16 on a CPU without bf16 units: vLLM's GEMMs run at the fp32 rate, not torch's 2 GFLOP/s
    assert spec.flops_for("bf16") == spec.flops_for("fp16") == 128 * GB
    # int8 was not timed: the datasheet's ratio to bf16 (2x), scaled to the probed bf16
    assert spec.peak_flops["int8"] == pytest.approx(256 * GB)
    assert figures.to_json()["flops"] == 128 * GB and figures.to_json()["source"] == "probe"
    # asked not to, the datasheet stands
    assert with_peaks(get_gpu("cpu"), use_probe=False)[1].source == "datasheet"


def test_a_cpu_with_fast_bf16_keeps_its_bf16_rate() -> None:
    flops = probed_flops(cpu_probe(bf16=400 * GB, fp32=128 * GB), get_gpu("cpu"))
    assert flops["bf16"] == 400 * GB


def test_a_gpu_probe_belongs_to_the_entry_the_registry_matches_its_card_to(
    probe_dir: Path,
) -> None:
    h100 = _probe(
        "NVIDIA H100 80GB HBM3",
        "cuda",
        2.9 * TF,
        {"bf16": 700 * TF, "fp16": 690 * TF, "fp8": 1300 * TF},
    )
    save_probe(h100)
    save_probe(_probe("NVIDIA A100-SXM4-80GB", "cuda", 1.6 * TF, {"bf16": 250 * TF}))
    (probe_dir / "broken.json").write_text("{not json")
    assert probe_for(get_gpu("h100")) == h100
    spec, figures = with_peaks(get_gpu("h100"))
    assert spec.memory_bandwidth == 2.9 * TF and spec.flops_for("fp8") == 1300 * TF
    assert spec.flops_for("int8") == pytest.approx(
        get_gpu("h100").peak_flops["int8"] * 700 / (get_gpu("h100").peak_flops["bf16"] / TF)
    )
    assert figures.device == "NVIDIA H100 80GB HBM3"
    # an estimate for a card nobody probed here keeps its datasheet
    assert with_peaks(get_gpu("l40s"))[1].source == "datasheet"
    # an A100 has no fp8: a probe does not add what the card cannot run
    a100, _ = with_peaks(get_gpu("a100-80gb"))
    assert "fp8" not in a100.peak_flops and a100.flops_for("bf16") == 250 * TF


def test_peak_figures_json_names_the_compute_dtype() -> None:
    figures = PeakFigures("probe", 1.0, {"bf16": 2.0, "fp8": 4.0}, "when", "dev")
    assert figures.to_json("fp8")["flops"] == 4.0
    assert figures.to_json()["flops"] == 2.0


# --- the commands -----------------------------------------------------------------------------


def _estimate(model: Path, *extra: str) -> dict:
    argv = ["estimate", "--model", str(model), "--gpu", "cpu", "--context-len", "384", "--json"]
    result = CliRunner().invoke(cli, [*argv, *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _at(data: dict, batch: int) -> float:
    return next(p["tokens_per_s"] for p in data["ladder"] if p["batch"] == batch)


def test_estimate_uses_a_cached_probe_and_says_which_figures(
    probe_dir: Path, tiny_model_dir: Path
) -> None:
    before = _estimate(tiny_model_dir)
    assert before["peaks"]["source"] == "datasheet" and before["memory_bandwidth"] == 50 * GB
    save_probe(cpu_probe())
    after = _estimate(tiny_model_dir)
    assert after["peaks"]["source"] == "probe"
    assert after["memory_bandwidth"] == 28 * GB and after["peak_flops"] == 128 * GB
    assert _at(after, 128) < _at(before, 128)  # 28 GB/s and 128 GFLOP/s, not 50 and 1000
    assert after["roofline_knee_batch"] < before["roofline_knee_batch"]
    assert _estimate(tiny_model_dir, "--datasheet") == before
    table = CliRunner().invoke(cli, ["estimate", "--model", str(tiny_model_dir), "--gpu", "cpu"])
    assert "Peaks: probed on test cpu at 2026-11-29" in table.output


def test_gpus_shows_probed_beside_datasheet(probe_dir: Path) -> None:
    save_probe(cpu_probe())
    result = CliRunner().invoke(cli, ["gpus", "--json"])
    rows = {row["name"]: row for row in json.loads(result.output)["registry"]}
    assert rows["cpu"]["probed"]["source"] == "probe"
    assert rows["cpu"]["probed_bandwidth_tbs"] == 0.028
    assert rows["cpu"]["bandwidth_tbs"] == 0.05  # the datasheet figure stays beside it
    assert rows["h100-sxm"]["probed"] is None
    text = " ".join(CliRunner().invoke(cli, ["gpus"]).output.split())
    assert "probed" in text.split("No NVIDIA GPU")[0]  # the table's extra columns
    assert "cpu: probed on test cpu at 2026-11-29" in text


def test_search_plans_with_the_probed_figures(probe_dir: Path, tiny_model_dir: Path) -> None:
    from tuner.load.workload import LengthRange, WorkloadSpec
    from tuner.search.prepare import TuneConfig, prepare

    cfg = TuneConfig(
        model=str(tiny_model_dir),
        gpu="cpu",
        workload=WorkloadSpec(input_len=LengthRange.fixed(256), output_len=LengthRange.fixed(128)),
        out=probe_dir / "profiles",
    )
    before = prepare(cfg)
    save_probe(cpu_probe())
    after = prepare(cfg)
    assert before.peaks is not None and before.peaks.source == "datasheet"
    assert after.peaks is not None and after.peaks.source == "probe"
    assert after.gpu.memory_bandwidth == 28 * GB
    assert after.plan.baseline.predicted_tokens_per_s < before.plan.baseline.predicted_tokens_per_s
