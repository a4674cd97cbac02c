"""The search space: typed candidates, and value parsing for overrides.

A :class:`Candidate` holds one value per search knob (None = vLLM's own default) and knows its
vLLM arguments and a stable name; the knobs themselves (names, flags, labels, types) are
``tuner.specs.knobs``. Pruning with the analytic bounds lives in ``tuner.plan.prune``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tuner.errors import ParameterError
from tuner.specs.knobs import SEARCH_KNOBS, knob, knob_names

_SEARCH_NAMES = knob_names(SEARCH_KNOBS)


@dataclass(frozen=True, order=True)
class Candidate:
    """One vLLM configuration to measure; None means "leave vLLM's default".

    One field per search knob of ``tuner.specs.knobs.SEARCH_KNOBS``, in its order (a unit test
    holds them together). ``quantization`` is a variant name ("none", "fp8", a checkpoint's)."""

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
        return not self.knobs()

    @property
    def name(self) -> str:
        """Stable, human-readable id, e.g. ``seqs64-mbt8192-kvfp8``; ``vllm-defaults``. Stored
        in studies and records: the knobs' labels never change."""
        if self.is_baseline:
            return "vllm-defaults"
        return "-".join(knob(k).label_part(v) for k, v in self.knobs().items())

    def knobs(self) -> dict[str, Any]:
        """The knobs that are set (vLLM names -> values), in the registry's order."""
        values = ((name, getattr(self, name)) for name in _SEARCH_NAMES)
        return {name: value for name, value in values if value is not None}

    def to_vllm_args(self, variant_flag: str | None = None) -> list[str]:
        """vLLM CLI arguments for the knobs that are set. ``quantization`` is a variant name;
        the caller passes the variant's real ``--quantization`` value (or None)."""
        args: list[str] = []
        for key, value in self.knobs().items():
            if key == "quantization":
                value = variant_flag
                if value is None:
                    continue
            args += knob(key).argv(value)
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


def parse_value(name: str, text: str) -> Any:
    """Parse one value of the search knob ``name`` from text; "default" means vLLM's default
    (None), except for ``quantization``, whose "none" is the unquantized variant."""
    if name not in _SEARCH_NAMES:
        raise ParameterError(f"unknown parameter {name!r}; valid: {', '.join(_SEARCH_NAMES)}")
    raw = str(text).strip()
    if raw.lower() in ("default", "none", "null") and name != "quantization":
        return None
    the_knob = knob(name)
    value = the_knob.coerce(raw)
    if the_knob.kind in (int, float) and value <= 0:
        raise ParameterError(f"{name} must be positive, got {raw}")
    if name == "gpu_memory_utilization" and value > 1:
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
