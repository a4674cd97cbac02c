"""vLLM's knobs: one registry, :data:`KNOBS`, that owns everything vtune knows about each.

A :class:`Knob` holds vLLM's name for it (the ``EngineArgs`` field, snake_case), its value type,
its flag (``--max-num-seqs``; booleans ``--enable-x`` / ``--no-enable-x``), its key in a
``vllm serve --config`` YAML file (kebab-case), how a value becomes argv, and the short labels
vtune builds names from: ``label`` for candidate names (``seqs64-mbt8192-kvfp8``, stored in
studies and records, so a label never changes) and ``tag`` for ``EngineSettings.name`` (log
file names). The typed dataclasses that carry knob values declare them as fields
(``Candidate``: the search knobs, ``EngineSettings``: all, both in this order;
``ServingConfig``: those the estimate needs) and go through the registry for every name, flag,
key, parse and default (``tuner.specs.vllm_defaults``, keyed by the same names).

Knobs with a ``label`` are the search space; the rest are set only as fixed settings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tuner.errors import ParameterError

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


@dataclass(frozen=True)
class Knob:
    """One vLLM knob. ``label`` None: not a search knob; ``tag`` None: not in a settings name."""

    name: str
    kind: type  # int, float, str or bool
    label: str | None
    tag: str | None

    @property
    def flag(self) -> str:
        """vLLM's long flag, e.g. ``--max-num-seqs`` (``--enable-x`` for a boolean)."""
        return "--" + self.config_key

    @property
    def off_flag(self) -> str | None:
        """The flag that sets a boolean False (``--no-enable-x``); None for other kinds."""
        return "--no-" + self.config_key if self.kind is bool else None

    @property
    def config_key(self) -> str:
        """The key ``vllm serve --config FILE.yaml`` reads: the flag without its dashes."""
        return self.name.replace("_", "-")

    @property
    def searchable(self) -> bool:
        return self.label is not None

    def argv(self, value: Any) -> list[str]:
        """``value`` as vLLM arguments: ``[flag, text]``, or one flag for a boolean."""
        if self.kind is bool:
            return [self.flag if value else str(self.off_flag)]
        return [self.flag, repr(value) if isinstance(value, float) else str(value)]

    def coerce(self, value: Any) -> Any:
        """``value`` (text, e.g. from the command line, or already typed) as this knob's type;
        ParameterError naming the knob when it is not one. None handling is the caller's."""
        try:
            return self._coerce(value)
        except (TypeError, ValueError, OverflowError):
            raise ParameterError(
                f"bad value {value!r} for {self.name} (expected {self.kind.__name__})"
            ) from None

    def _coerce(self, value: Any) -> Any:
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError(value)
        if self.kind is int:
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, str) and "e" in value.lower():  # 1e9, 4E3
                value = float(value)
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError(value)
                return int(value)
            return int(value)
        if self.kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(value)
            return number
        return str(value).strip()

    def label_part(self, value: Any) -> str:
        """This knob's piece of a candidate name, e.g. ``seqs64``, ``cp0``, ``gmu0.95``."""
        return f"{self.label}{int(value) if isinstance(value, bool) else value}"

    def tag_part(self, value: Any) -> str:
        """This knob's piece of a settings name, file-name safe, e.g. ``mns8``, ``kvb1G``."""
        return f"{self.tag}{_short(value)}"


# The order is the order of fields, of names and of flags on argv: never reorder searchable
# knobs (candidate names would change).
KNOBS: tuple[Knob, ...] = (
    Knob("max_num_seqs", int, "seqs", "mns"),
    Knob("max_num_batched_tokens", int, "mbt", "mnbt"),
    Knob("gpu_memory_utilization", float, "gmu", "gmu"),
    Knob("kv_cache_dtype", str, "kv", "kvd"),
    Knob("enable_chunked_prefill", bool, "cp", "cp"),
    Knob("enable_prefix_caching", bool, "pc", "pc"),
    # In a candidate this is a variant name ("none", "fp8", a checkpoint's name); the variant
    # gives the real --quantization value. Everywhere else it is vLLM's method.
    Knob("quantization", str, "q", "q"),
    Knob("block_size", int, "bs", "bs"),
    Knob("tensor_parallel_size", int, "tp", "tp"),
    Knob("max_model_len", int, "len", "mml"),
    Knob("kv_cache_memory_bytes", int, None, "kvb"),
    Knob("dtype", str, None, "dt"),
    Knob("seed", int, None, "seed"),
    Knob("served_model_name", str, None, None),
)
SEARCH_KNOBS: tuple[Knob, ...] = tuple(k for k in KNOBS if k.searchable)
_BY_NAME = {k.name: k for k in KNOBS}


def knob(name: str) -> Knob:
    """The knob called ``name`` (vLLM's snake_case name); ParameterError for an unknown one."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ParameterError(f"unknown vLLM knob {name!r}") from None


def find_knob(name: str) -> Knob | None:
    """The knob called ``name``, or None: for callers that accept any vLLM flag besides knobs."""
    return _BY_NAME.get(name)


def knob_names(knobs: Iterable[Knob] = KNOBS) -> tuple[str, ...]:
    return tuple(k.name for k in knobs)


def _short(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int) and value >= 1 << 20:
        for unit, size in (("G", 1 << 30), ("M", 1 << 20)):
            if value % size == 0:
                return f"{value // size}{unit}"
    text = repr(value) if isinstance(value, float) else str(value)
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in text)
