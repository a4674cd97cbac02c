"""Serving cost arithmetic (pure, no I/O): GPUs per replica, output tokens/s per GPU, and the
price of a million output tokens. The one place these formulas live: the search record's cost
block (:mod:`tuner.search.outcome`) and ``vtune plan`` (:mod:`tuner.outputs.capacity`) both
call them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SECONDS_PER_HOUR = 3600.0
TOKENS_PER_MILLION = 1e6
# The vLLM settings whose product is the GPUs one replica spans.
PARALLEL_SETTINGS = ("tensor_parallel_size", "pipeline_parallel_size")


def gpus_per_replica(
    knobs: Mapping[str, Any], fixed: Mapping[str, Any] | None = None, on_cpu: bool = False
) -> int:
    """tensor_parallel_size x pipeline_parallel_size, each from ``knobs`` (the candidate's),
    else ``fixed`` (the settings every candidate ran with; ``-`` or ``_`` in the name), else 1;
    a value that is not a positive int counts as 1. Always 1 ``on_cpu`` (no GPU to count)."""
    if on_cpu:
        return 1
    fixed_norm = {str(k).replace("-", "_"): v for k, v in (fixed or {}).items()}
    gpus = 1
    for name in PARALLEL_SETTINGS:
        value = knobs.get(name)
        if value is None:
            value = fixed_norm.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            gpus *= value
    return gpus


def per_gpu(tokens_per_s: float, gpus: int) -> float:
    """Output tokens/s per GPU of ``gpus`` GPUs serving ``tokens_per_s`` together."""
    return tokens_per_s / gpus


def hourly_cost(gpus: int, gpu_hour_price: float) -> float:
    """USD an hour for ``gpus`` GPUs at ``gpu_hour_price`` USD per GPU-hour."""
    return gpus * gpu_hour_price


def usd_per_million_tokens(gpus: int, gpu_hour_price: float, tokens_per_s: float) -> float:
    """USD per 1M output tokens: ``gpus`` GPUs at ``gpu_hour_price`` USD per GPU-hour serving
    ``tokens_per_s`` output tokens/s in total, i.e.
    ``gpus x price x 1e6 / (tokens_per_s x 3600)``. ``tokens_per_s`` must be positive."""
    return (
        hourly_cost(gpus, gpu_hour_price) * TOKENS_PER_MILLION / (tokens_per_s * SECONDS_PER_HOUR)
    )
