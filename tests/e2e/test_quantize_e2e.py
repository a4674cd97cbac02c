"""Real quantization of the tiny model, served by real vLLM CPU, judged by the quality guard.

AWQ and GPTQ both run through the ``vtune quantize`` command (a subprocess, as a user runs it);
the API then finds and reuses what the command built. Each checkpoint is checked for the config
vLLM reads, for weight bytes against the estimator's prediction (within 2 %), for dequantization
against the tool's own, for a vLLM CPU server answering completions with ``--quantization``, and
for a finite perplexity.

Run under the vLLM lock:
``flock /tmp/vtune-vllm.lock .venv/bin/pytest -m e2e tests/e2e/test_quantize_e2e.py``.
Needs AutoAWQ and Optimum + GPT-QModel installed (`make setup` installs both).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tuner.analytic.weights import default_scheme, resolve_scheme, weight_bytes
from tuner.engine.log import FailureClass
from tuner.engine.server import EngineSettings, LaunchConfig, ServerStartError, VllmServer
from tuner.quant.quality import (
    dequantize_awq,
    dequantize_gptq,
    perplexity,
    quality_loss_pct,
)
from tuner.quant.quantize import MARKER, QuantizeRequest, load_calibration_texts, quantize
from tuner.specs.gpu import get_gpu
from tuner.specs.model import QuantConfig, load_model

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

CALIB = ("--calib-seq-len", "256", "--calib-blocks", "4")  # fast; the tiny model needs no more


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> Path:
    return tiny_model_dir  # the session's tiny model (tests/conftest.py); never written to


@pytest.fixture(scope="module")
def out_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quant")  # fresh: every session really quantizes


def vtune_quantize(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "tuner", "quantize", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def awq(tiny: Path, out_root: Path) -> dict:
    out = out_root / "tiny-awq"
    return vtune_quantize("--model", str(tiny), "--method", "awq", "--out", str(out), *CALIB)


@pytest.fixture(scope="module")
def gptq(tiny: Path, out_root: Path) -> dict:
    # Through the CLI too: GPT-QModel logs to stdout, which must not reach --json's output.
    out = out_root / "tiny-gptq"
    return vtune_quantize("--model", str(tiny), "--method", "gptq", "--out", str(out), *CALIB)


def predicted_vs_actual(base: Path, method: str, out: Path) -> tuple[int, int]:
    predicted = weight_bytes(load_model(str(base)), default_scheme(method, bits=4, group_size=128))
    quantized = load_model(str(out))
    assert quantized.checkpoint is not None
    # The checkpoint's own scheme (read from its config) must predict the same bytes.
    own = weight_bytes(quantized, resolve_scheme(quantized, None))
    assert own.total == predicted.total
    return predicted.total, quantized.checkpoint.tensor_bytes


def serve_and_complete(model: Path, method: str, *extra: tuple[str, str | None]) -> dict:
    settings = EngineSettings(
        model=str(model), quantization=method, max_model_len=512, extra=tuple(extra)
    )
    with VllmServer(settings, LaunchConfig(device="cpu")) as server:
        body = json.dumps(
            {
                "model": server.info.model,
                "prompt": "The weather today",
                "max_tokens": 8,
                "ignore_eos": True,
                "temperature": 0,
            }
        ).encode()
        req = urllib.request.Request(
            server.base_url + "/completions", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())
        log = server.log_path.read_text(errors="replace")
    assert re.search(rf"quantization=(auto_)?{method}\b", log)  # vLLM 0.32 says auto_gptq
    assert "Using CPUWNA16LinearKernel" in log  # vLLM CPU's 4-bit kernel, not a dense fallback
    return answer


# vLLM CPU serves 4-bit checkpoints only where it loads its AVX-512 kernels; elsewhere vtune's
# registry says so, and a launch anyway fails as "unsupported" (both are checked below).
CPU_SERVES_4BIT = get_gpu("cpu").supports_quantization("awq")


def assert_unsupported_here(model: Path, method: str, *extra: tuple[str, str | None]) -> None:
    settings = EngineSettings(
        model=str(model), quantization=method, max_model_len=512, extra=tuple(extra)
    )
    with pytest.raises(ServerStartError) as info:
        VllmServer(settings, LaunchConfig(device="cpu")).start()
    assert info.value.failure_class is FailureClass.UNSUPPORTED, str(info.value)


# -- AWQ ------------------------------------------------------------------------------------


def test_awq_checkpoint_has_the_config_vllm_reads(awq: dict) -> None:
    out = Path(awq["path"])
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 128,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }
    assert config["dtype"] == "float16"
    assert load_model(str(out)).quantization == QuantConfig("awq", 4, 128, has_zero_points=True)
    for name in ("tokenizer.json", "tokenizer_config.json", MARKER, "model.safetensors"):
        assert (out / name).is_file(), name
    assert awq["backend"] == "autoawq" and awq["calib_blocks"] == 4 and not awq["reused"]


def test_awq_weight_bytes_within_two_percent_of_prediction(tiny: Path, awq: dict) -> None:
    predicted, actual = predicted_vs_actual(tiny, "awq", Path(awq["path"]))
    assert actual == awq["tensor_bytes"]
    assert abs(predicted - actual) / actual <= 0.02, (predicted, actual)


def test_awq_dequantization_matches_autoawq(awq: dict) -> None:
    from awq.utils.packing_utils import dequantize_gemm
    from safetensors.torch import load_file

    tensors = load_file(str(Path(awq["path"]) / "model.safetensors"))
    for prefix in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        q, z, s = (tensors[f"{prefix}.{k}"] for k in ("qweight", "qzeros", "scales"))
        ours = dequantize_awq(q, z, s, 4)
        theirs = dequantize_gemm(q, z, s.float(), 4, 128)
        assert ours.shape == theirs.shape
        assert (ours == theirs).all()


def test_rerun_reuses_the_checkpoint(tiny: Path, awq: dict) -> None:
    again = vtune_quantize("--model", str(tiny), "--method", "awq", "--out", awq["path"], *CALIB)
    assert again["reused"] and again["tensor_bytes"] == awq["tensor_bytes"]
    assert again["seconds"] == awq["seconds"]


def test_vllm_cpu_serves_awq(awq: dict) -> None:
    if not CPU_SERVES_4BIT:
        assert_unsupported_here(Path(awq["path"]), "awq")
        return
    answer = serve_and_complete(Path(awq["path"]), "awq")
    assert answer["usage"]["completion_tokens"] == 8
    assert answer["choices"][0]["text"]


def test_awq_perplexity_is_finite_and_close_to_base(tiny: Path, awq: dict) -> None:
    texts = load_calibration_texts()
    base = perplexity(tiny, texts)
    variant = perplexity(awq["path"], texts, tokenizer=tiny)
    fp8 = perplexity(tiny, texts, simulate="fp8")
    for value in (base, variant, fp8):
        assert math.isfinite(value) and value > 1.0
    assert variant != base  # the weights really changed
    assert abs(quality_loss_pct(base, variant)) < 5.0
    assert abs(quality_loss_pct(base, fp8)) < 5.0


# -- GPTQ -----------------------------------------------------------------------------------


def test_gptq_checkpoint_has_the_config_vllm_reads(gptq: dict) -> None:
    out = Path(gptq["path"])
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 128
    assert qc["sym"] is True and qc["desc_act"] is False and qc["format"] == "gptq"
    assert "dataset" not in qc  # Optimum would store the whole calibration set here
    assert load_model(str(out)).quantization == QuantConfig(
        "gptq", 4, 128, has_zero_points=True, has_g_idx=True
    )
    assert gptq["backend"] == "optimum-gptq" and (out / "tokenizer.json").is_file()


def test_api_reuses_what_the_cli_built(tiny: Path, gptq: dict) -> None:
    req = QuantizeRequest(
        model=str(tiny),
        method="gptq",
        out_dir=gptq["path"],
        calib_seq_len=256,
        max_calib_blocks=4,
    )
    again = quantize(req)
    assert again.reused and again.to_json() == {**gptq, "reused": True}


def test_gptq_weight_bytes_within_two_percent_of_prediction(tiny: Path, gptq: dict) -> None:
    predicted, actual = predicted_vs_actual(tiny, "gptq", Path(gptq["path"]))
    assert abs(predicted - actual) / actual <= 0.02, (predicted, actual)


def test_gptq_dequantization_matches_gptqmodel(gptq: dict) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tensors = load_file(str(Path(gptq["path"]) / "model.safetensors"))
    ref = AutoModelForCausalLM.from_pretrained(gptq["path"], dtype=torch.float16, device_map="cpu")
    for layer, name in ((0, "self_attn.q_proj"), (1, "mlp.down_proj")):
        prefix = f"model.layers.{layer}.{name}"
        g_idx = tensors[f"{prefix}.g_idx"]
        assert torch.equal(g_idx, torch.arange(g_idx.numel(), dtype=g_idx.dtype) // 128)
        ours = dequantize_gptq(
            *(tensors[f"{prefix}.{k}"] for k in ("qweight", "qzeros", "scales")), 4, g_idx
        )
        theirs = ref.get_submodule(prefix).dequantize_weight().float()
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max() <= 1e-3 * ours.abs().max()  # fp16 rounding only


def test_vllm_cpu_serves_gptq(gptq: dict) -> None:
    if not CPU_SERVES_4BIT:
        # Not eager: then vLLM's start-up forward pass reaches the missing kernel (eager
        # starts, and fails at the first request instead).
        assert_unsupported_here(Path(gptq["path"]), "gptq")
        return
    answer = serve_and_complete(Path(gptq["path"]), "gptq", ("--enforce-eager", None))
    assert answer["usage"]["completion_tokens"] == 8


def test_gptq_perplexity_is_finite(tiny: Path, gptq: dict) -> None:
    texts = load_calibration_texts()
    value = perplexity(gptq["path"], texts, tokenizer=tiny)
    assert math.isfinite(value) and value > 1.0
    assert abs(quality_loss_pct(perplexity(tiny, texts), value)) < 5.0
