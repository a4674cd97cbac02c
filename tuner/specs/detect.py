"""Detection of this machine's GPUs, and matching them to the registry.

Asks NVML (``pynvml``) when it is importable, else ``nvidia-smi``; never raises and returns
``[]`` on machines without NVIDIA GPUs.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tuner.specs.gpu import GIB, MIB, GpuSpec, _registry, get_gpu

NVIDIA_SMI_ARGV = (
    "nvidia-smi",
    "--query-gpu=index,name,memory.total",
    "--format=csv,noheader,nounits",
)
SMI_TIMEOUT_S = 5.0

SmiRunner = Callable[[Sequence[str], float], str]
"""``(argv, timeout_s) -> stdout``; may raise (missing binary, timeout, non-zero exit)."""


@dataclass(frozen=True)
class DetectedGpu:
    """A GPU found on this machine: its index, driver name and total memory (0 if unknown)."""

    index: int
    name: str
    memory_bytes: int


def detect_gpus(*, run_smi: SmiRunner | None = None, use_nvml: bool = True) -> list[DetectedGpu]:
    """This machine's NVIDIA GPUs: NVML if ``pynvml`` imports and initialises, else
    ``nvidia-smi`` (argv list, 5 s timeout) through ``run_smi``. Never raises; ``[]`` when
    neither is there or both fail. Both list every GPU, whatever CUDA_VISIBLE_DEVICES says."""
    if use_nvml:
        found = _detect_nvml()
        if found is not None:
            return found
    runner = run_smi or _run_subprocess
    try:
        out = runner(list(NVIDIA_SMI_ARGV), SMI_TIMEOUT_S)
    except Exception:  # missing binary, timeout, driver error: no GPUs to report
        return []
    return parse_nvidia_smi(out)


def _run_subprocess(argv: Sequence[str], timeout_s: float) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=True)
    return done.stdout


def _detect_nvml() -> list[DetectedGpu] | None:
    """GPUs via NVML, or None when NVML is not importable or will not initialise."""
    try:
        import pynvml  # nvidia-ml-py; optional
    except Exception:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        found = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            if isinstance(name, bytes):  # nvidia-ml-py < 11.515 returns bytes
                name = name.decode("utf-8", "replace")
            total = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
            found.append(DetectedGpu(index=i, name=str(name).strip(), memory_bytes=total))
        return found
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def parse_nvidia_smi(text: str) -> list[DetectedGpu]:
    """Parse ``index, name, memory.total`` CSV lines (no header, MiB); bad lines are
    skipped, an unreported memory ("[N/A]") becomes 0."""
    found = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3 or not parts[0].isdigit():
            continue
        name = ", ".join(parts[1:-1])
        try:
            memory = int(float(parts[-1]) * MIB)
        except ValueError:
            memory = 0
        if name:
            found.append(DetectedGpu(index=int(parts[0]), name=name, memory_bytes=memory))
    return found


# (tokens that must all be in the name, tokens that must not, registry name); first match wins.
_NAME_RULES: tuple[tuple[frozenset[str], frozenset[str], str], ...] = (
    (frozenset({"h100", "nvl"}), frozenset(), "h100-nvl"),
    (frozenset({"h100", "pcie"}), frozenset(), "h100-pcie"),
    (frozenset({"h100"}), frozenset(), "h100-sxm"),  # "NVIDIA H100 80GB HBM3"
    (frozenset({"h200"}), frozenset({"nvl"}), "h200"),
    (frozenset({"a100", "80gb"}), frozenset(), "a100-80gb"),
    (frozenset({"a100", "40gb"}), frozenset(), "a100-40gb"),
    (frozenset({"l40s"}), frozenset(), "l40s"),
    (frozenset({"l4"}), frozenset(), "l4"),
    (frozenset({"a10g"}), frozenset(), "a10g"),
    (frozenset({"a10"}), frozenset(), "a10"),
    (frozenset({"b200"}), frozenset(), "b200"),
    (frozenset({"rtx", "4090"}), frozenset({"d", "laptop"}), "rtx-4090"),
    (frozenset({"mi300x"}), frozenset(), "mi300x"),
)


def match_detected(det: DetectedGpu) -> GpuSpec | None:
    """The registry entry for a detected card ("NVIDIA A100-SXM4-40GB" -> a100-40gb), or
    None for a card the registry does not hold (H200 NVL, GH200, L40, ...)."""
    tokens = frozenset(re.split(r"[^a-z0-9]+", det.name.lower())) - {""}
    registry = _registry()
    for need, forbid, name in _NAME_RULES:
        if need <= tokens and not forbid & tokens:
            return registry[name]
    if "a100" in tokens and det.memory_bytes > 0:  # a name without its size: go by memory
        return registry["a100-80gb" if det.memory_bytes > 60 * GIB else "a100-40gb"]
    return None


def check_gpu_choice(spec: GpuSpec, detected: Sequence[DetectedGpu]) -> str | None:
    """A one-line warning when this machine's GPUs disagree with ``--gpu``, else None.

    No detected GPU gives None (estimates run anywhere). When any detected card is the chosen
    one there is nothing to say; otherwise the first card is named.
    """
    if not detected:
        return None
    first = detected[0]
    if spec.is_cpu:
        return (
            f"--gpu cpu, but this machine has {len(detected)} GPU(s) ('{first.name}'); "
            "vLLM's CPU build will not use them"
        )
    matches = [match_detected(d) for d in detected]
    if any(m is not None and m.name == spec.name for m in matches):
        return None
    found = matches[0].name if matches[0] is not None else "not in the registry"
    return (
        f"--gpu {spec.name}, but GPU {first.index} is '{first.name}' ({found}, "
        f"{first.memory_bytes / GIB:.1f} GiB); figures are {spec.name}'s"
    )


def gpu_choice_warnings(gpu: GpuSpec | str) -> list[str]:
    """The warnings to show before running on ``--gpu`` (a registry name or spec): the one line
    of :func:`check_gpu_choice` against this machine's detected GPUs, or nothing. Raises
    UnknownGpuError for a name the registry does not hold. ``vtune bench`` and the search's
    prepare both call this, so the check and its wording live here only."""
    spec = get_gpu(gpu) if isinstance(gpu, str) else gpu
    warning = check_gpu_choice(spec, detect_gpus())
    return [warning] if warning else []
