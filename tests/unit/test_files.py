"""tuner.files: JSON records are strict JSON (no Infinity/NaN) and read back with None there."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tuner.errors import ParameterError
from tuner.files import atomic_write_json, finite_json, read_json


def _strict(text: str) -> Any:
    """Parse as a strict parser (jq, JavaScript) would: Infinity and NaN are errors."""

    def refuse(name: str) -> Any:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


class _Summary:
    def to_json(self) -> dict[str, Any]:
        return {"p99_ttft_ms": math.nan, "rate": math.inf, "ok": 1.5}


def test_non_finite_floats_round_trip_as_null(tmp_path: Path):
    record = {
        "objective": math.inf,
        "low": -math.inf,
        "mean": math.nan,
        "finite": 0.25,
        "count": 3,
        "flag": True,
        "none": None,
        "samples": [1.0, math.inf, {"deep": [math.nan]}],
        "pair": (math.inf, 2),
        "path": Path("a/b"),
        "summary": _Summary(),
    }
    path = atomic_write_json(tmp_path / "trial.json", record, sort_keys=True)
    text = path.read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert _strict(text) == read_json(path)
    assert read_json(path) == {
        "objective": None,
        "low": None,
        "mean": None,
        "finite": 0.25,
        "count": 3,
        "flag": True,
        "none": None,
        "samples": [1.0, None, {"deep": [None]}],
        "pair": [None, 2],
        "path": "a/b",
        "summary": {"p99_ttft_ms": None, "rate": None, "ok": 1.5},
    }
    assert record["objective"] == math.inf  # the caller's data is not changed


def test_python_only_files_may_keep_infinity(tmp_path: Path):
    path = atomic_write_json(tmp_path / "config.json", {"cap": math.inf}, nonfinite_as_null=False)
    assert "Infinity" in path.read_text()
    assert read_json(path) == {"cap": math.inf}
    with pytest.raises(ValueError, match="Infinity"):
        _strict(path.read_text())


def test_finite_json_keeps_types_and_refuses_the_unknown():
    assert finite_json({"a": [1, "x", None, False, 2.5]}) == {"a": [1, "x", None, False, 2.5]}
    assert finite_json(frozenset({math.nan})) == [None]
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        finite_json({"a": object()})


def test_read_json_is_one_line_when_unreadable(tmp_path: Path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ParameterError, match="is not valid JSON"):
        read_json(bad)
    with pytest.raises(ParameterError, match="cannot read"):
        read_json(tmp_path / "missing.json")
    bad.write_text("[" * 100_000)
    with pytest.raises(ParameterError, match="is not valid JSON"):
        read_json(bad)
    bad.write_bytes(b"\xff{}")
    with pytest.raises(ParameterError, match="is not UTF-8 text"):
        read_json(bad)
