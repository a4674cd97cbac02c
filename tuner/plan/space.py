"""The search space: vLLM knobs, typed candidates, and value parsing for overrides.

A :class:`Candidate` holds one value per knob (None = vLLM's own default) and knows its vLLM
arguments and a stable name. Pruning with the analytic bounds lives in ``tuner.plan.prune``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from tuner.errors import ParameterError

# knob -> value type. Names are vLLM's (flag without dashes, underscores for hyphens).
KNOB_TYPES: dict[str, type] = {
    "max_num_seqs": int,
    "max_num_batched_tokens": int,
    "gpu_memory_utilization": float,
    "kv_cache_dtype": str,
    "enable_chunked_prefill": bool,
    "enable_prefix_caching": bool,
    "quantization": str,  # a variant name: "none", an online method (fp8) or a checkpoint variant
    "block_size": int,
    "tensor_parallel_size": int,
    "max_model_len": int,
}
# Short labels for candidate names (stable: changing one renames stored trials).
_LABELS = {
    "max_num_seqs": "seqs",
    "max_num_batched_tokens": "mbt",
    "gpu_memory_utilization": "gmu",
    "kv_cache_dtype": "kv",
    "enable_chunked_prefill": "cp",
    "enable_prefix_caching": "pc",
    "quantization": "q",
    "block_size": "bs",
    "tensor_parallel_size": "tp",
    "max_model_len": "len",
}


@dataclass(frozen=True, order=True)
class Candidate:
    """One vLLM configuration to measure; None means "leave vLLM's default"."""

    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float | None = None
    kv_cache_dtype: str | None = None
    enable_chunked_prefill: bool | None = None
    enable_prefix_caching: bool | None = None
    quantization: str | None = None
    block_size: int | None = None
    tensor_parallel_size: int | None = None
    max_model_len: int | None = None

    @property
    def is_baseline(self) -> bool:
        """True for vLLM's defaults (every knob unset), the reference every search measures."""
        return all(v is None for v in asdict(self).values())

    @property
    def name(self) -> str:
        """Stable, human-readable id, e.g. ``seqs64-mbt8192-kvfp8``; ``vllm-defaults``."""
        if self.is_baseline:
            return "vllm-defaults"
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, bool):
                value = int(value)
            parts.append(f"{_LABELS[f.name]}{value}")
        return "-".join(parts)

    def knobs(self) -> dict[str, Any]:
        """The knobs that are set (vLLM names -> values)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def to_vllm_args(self, variant_flag: str | None = None) -> list[str]:
        """vLLM CLI arguments for the knobs that are set. ``quantization`` is a variant name;
        the caller passes the variant's real ``--quantization`` value (or None)."""
        args: list[str] = []
        for key, value in self.knobs().items():
            if key == "quantization":
                value = variant_flag
                if value is None:
                    continue
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                args.append(flag if value else "--no-" + flag[2:])
            else:
                args += [flag, str(value)]
        return args

    def with_knob(self, key: str, value: Any) -> Candidate:
        return replace(self, **{key: value})


@dataclass(frozen=True)
class Space:
    """Values to try per knob; a knob absent from ``values`` stays at vLLM's default."""

    values: Mapping[str, tuple[Any, ...]]

    def size(self) -> int:
        size = 1
        for vals in self.values.values():
            size *= len(vals)
        return size

    def candidates(self) -> list[Candidate]:
        """Every combination (the full grid), in a stable order."""
        keys = list(self.values)
        out = []
        for combo in itertools.product(*(self.values[k] for k in keys)):
            out.append(Candidate(**dict(zip(keys, combo, strict=True))))
        return out

    def with_overrides(self, overrides: Mapping[str, tuple[Any, ...]]) -> Space:
        merged = dict(self.values)
        merged.update(overrides)
        return Space({k: v for k, v in merged.items() if v})


def parse_value(knob: str, text: str) -> Any:
    """Parse one value of ``knob`` from text; "default" means vLLM's default (None)."""
    if knob not in KNOB_TYPES:
        raise ParameterError(f"unknown parameter {knob!r}; valid: {', '.join(KNOB_TYPES)}")
    raw = str(text).strip()
    if raw.lower() in ("default", "none", "null") and knob != "quantization":
        return None
    kind = KNOB_TYPES[knob]
    try:
        if kind is bool:
            lowered = raw.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError(raw)
        value = kind(raw)
    except ValueError:
        raise ParameterError(f"bad value {raw!r} for {knob} (expected {kind.__name__})") from None
    if kind in (int, float) and value <= 0:
        raise ParameterError(f"{knob} must be positive, got {raw}")
    if knob == "gpu_memory_utilization" and value > 1:
        raise ParameterError(f"gpu_memory_utilization must be in (0, 1], got {raw}")
    return value


def parse_param_overrides(items: Iterable[str]) -> dict[str, tuple[Any, ...]]:
    """``["max_num_seqs=16,64,256", ...]`` -> ``{"max_num_seqs": (16, 64, 256)}``."""
    out: dict[str, tuple[Any, ...]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_").lstrip("_")
        if not sep or not values.strip():
            raise ParameterError(f"--param expects NAME=V1,V2,..., got {item!r}")
        out[key] = _unique(parse_value(key, v) for v in values.split(","))
    return out


def load_space_file(path: str | Path) -> dict[str, tuple[Any, ...]]:
    """Read a YAML space file: ``{knob: [values]}`` (a scalar is a single value)."""
    import yaml

    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text())
    except OSError as exc:
        raise ParameterError(f"cannot read space file {str(file)!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ParameterError(
            f"space file {str(file)!r} is not valid YAML: {str(exc).splitlines()[0]}"
        ) from None
    if not isinstance(data, Mapping):
        raise ParameterError(f"space file {str(file)!r} must map parameter names to lists")
    out: dict[str, tuple[Any, ...]] = {}
    for key, values in data.items():
        key = str(key).replace("-", "_")
        seq: Sequence[Any] = values if isinstance(values, list) else [values]
        out[key] = _unique(parse_value(key, "default" if v is None else v) for v in seq)
    return out


def _unique(values: Iterable[Any]) -> tuple[Any, ...]:
    seen: list[Any] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return tuple(seen)
