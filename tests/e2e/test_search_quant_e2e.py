"""A search with an AWQ variant among its candidates, on vLLM CPU with the tiny model: vtune
builds the variant (AutoAWQ), checks its perplexity, measures it and records it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tuner.specs.gpu import get_gpu

pytestmark = pytest.mark.e2e


def test_search_builds_measures_and_records_awq(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "profiles"
    argv = [
        sys.executable,
        "-m",
        "tuner",
        "search",
        "--model",
        str(tiny_model_dir),
        "--gpu",
        "cpu",
        "--slo",
        "ttft:p95<2s",
        "--build-variants",
        "awq",
        "--max-quality-loss",
        "5",
        "--param",
        "max_num_seqs=16",
        "--param",
        "quantization=none,awq",
        "--input-len",
        "64",
        "--output-len",
        "32",
        "--seconds-per-point",
        "3",
        "--iterations",
        "1",
        "--repeats",
        "0",
        "--out",
        str(out),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1200, check=False)
    if not get_gpu("cpu").supports_quantization("awq"):
        # vLLM CPU has no 4-bit kernels on this host (no AVX-512): one line, before any build.
        assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "awq does not run on cpu" in lines[0], lines
        assert not (out / tiny_model_dir.name / "variants").exists()
        return
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    record = json.loads((out / tiny_model_dir.name / "cpu.json").read_text())
    variants = {v["name"]: v for v in record["variants"]}
    assert variants["awq"]["source"] == "built" and variants["awq"]["flag"] == "awq"
    awq_dir = Path(variants["awq"]["model"])
    config = json.loads((awq_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "awq"
    quality = {q["variant"]: q for q in record["quality"]}
    assert quality["awq"]["passed"] and quality["awq"]["loss_pct"] <= 5

    trials = {t["name"]: t for t in record["trials"]}
    awq = trials["seqs16-qawq"]
    assert awq["state"] == "complete" and awq["variant"] == "awq"
    assert awq["objective"] > 0
    assert "--quantization" in awq["vllm_args"] and str(awq_dir) in awq["vllm_args"]
    # The estimate behind the plan used the checkpoint's real bytes: 4-bit weights are smaller.
    assert awq["estimate"]["weight_bytes"] < trials["seqs16-qnone"]["estimate"]["weight_bytes"]

    profile = (out / tiny_model_dir.name / "cpu.yaml").read_text()
    if record["best"] == "seqs16-qawq":
        assert "quantization: awq" in profile and str(awq_dir) in profile
    else:
        assert "quantization" not in profile
