"""Read a checkpoint's safetensors headers (never the tensors): exact tensor bytes and counts.

A safetensors file starts with an 8-byte little-endian header length and a JSON header that maps
each tensor name to its dtype, shape and byte offsets; reading it costs one small read per file.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.errors import ModelError

_MAX_HEADER = 100 * 2**20  # the format caps headers at 100 MB; anything larger is corrupt


@dataclass(frozen=True)
class CheckpointInfo:
    """What the safetensors headers of a checkpoint directory say."""

    files: int
    tensor_bytes: int
    num_elements: int
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)
    tensor_names: tuple[str, ...] = ()


def read_checkpoint_info(directory: Path) -> CheckpointInfo | None:
    """Sum the headers of every ``*.safetensors`` file in ``directory``; None when there are none.
    Raises ModelError for a file whose header is unreadable."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    total_bytes = 0
    elements = 0
    by_dtype: dict[str, int] = {}
    names: list[str] = []
    for file in files:
        for name, entry in _read_header(file).items():
            if name == "__metadata__":
                continue
            dtype, size, count = _tensor_entry(file, name, entry)
            total_bytes += size
            elements += count
            by_dtype[dtype] = by_dtype.get(dtype, 0) + size
            names.append(name)
    return CheckpointInfo(len(files), total_bytes, elements, by_dtype, tuple(sorted(names)))


def _tensor_entry(file: Path, name: str, entry: Any) -> tuple[str, int, int]:
    """(dtype, bytes, elements) of one header entry; ModelError naming what is missing or
    malformed (a truncated or hand-edited header must not end in a traceback)."""
    where = f"cannot read safetensors header of {file}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise ModelError(f"{where} is not a JSON object")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in entry]
    if missing:
        raise ModelError(f"{where} has no {' / '.join(missing)}")
    offsets, shape = entry["data_offsets"], entry["shape"]
    if not (_sizes(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        raise ModelError(f"{where} has data_offsets {offsets!r}, not [start, end]")
    if not _sizes(shape):
        raise ModelError(f"{where} has shape {shape!r}, not a list of sizes")
    return str(entry["dtype"]), offsets[1] - offsets[0], math.prod(shape)


def _sizes(value: Any) -> bool:
    """A list of non-negative integers (JSON has no other integer kind; bools are not sizes)."""
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


def _read_header(file: Path) -> dict:
    try:
        with file.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > _MAX_HEADER:
                raise ValueError("header too large")
            header = json.loads(fh.read(length))
    except (OSError, struct.error, ValueError) as exc:
        raise ModelError(f"cannot read safetensors header of {file}: {exc}") from None
    if not isinstance(header, dict):
        raise ModelError(f"cannot read safetensors header of {file}: not a JSON object")
    return header
