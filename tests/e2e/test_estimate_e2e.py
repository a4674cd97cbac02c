"""The estimator against real vLLM CPU: KV capacity must equal what vLLM reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import SERVER_KV_BYTES
from tuner.analytic.estimate import ServingConfig, estimate
from tuner.engine.log import parse_kv_cache_log
from tuner.specs.gpu import get_gpu
from tuner.specs.model import load_model

pytestmark = pytest.mark.e2e


def test_kv_capacity_matches_vllm(tiny_model_dir: Path, vllm_server: object) -> None:
    spec = load_model(str(tiny_model_dir))
    assert spec.attention == "gqa" and spec.head_dim == 64
    est = estimate(spec, get_gpu("cpu"), ServingConfig(kv_cache_memory_bytes=SERVER_KV_BYTES))
    info = vllm_server.info  # type: ignore[attr-defined]
    # vLLM's own figure, from /metrics (vllm:cache_config_info) ...
    assert est.kv_capacity_tokens == info.kv_cache_size_tokens
    assert est.num_gpu_blocks == info.num_gpu_blocks
    assert est.block_size == info.block_size == 128
    # ... and from its log line "CPU KV cache size: N tokens, Maximum concurrency ...".
    logged = parse_kv_cache_log(vllm_server.log_path.read_text())  # type: ignore[attr-defined]
    assert logged.pool == "CPU"
    assert est.kv_capacity_tokens == logged.kv_cache_size_tokens
    assert est.max_concurrency == pytest.approx(info.max_concurrency, rel=1e-3)
    # 300,000,000 B is deliberately not a whole number of blocks: the floor matters.
    assert SERVER_KV_BYTES % (128 * est.kv_bytes_per_token) != 0
