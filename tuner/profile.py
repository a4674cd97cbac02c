"""Serving profiles: a vLLM config YAML (``vllm serve --config`` loads it unchanged) and the
full JSON record beside it. Every write is atomic (temp file + rename), so a killed search never
leaves a half-written profile.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tuner.errors import ParameterError

DEFAULT_PROFILES_DIR = Path("profiles")
# Keys vLLM's --config accepts are its long flag names; these are never written to a profile.
_SECRET_KEYS = {"api-key", "hf-token", "token"}


def slug(model: str) -> str:
    """Directory name for a model: ``meta-llama/Llama-3.1-8B`` -> ``meta-llama--llama-3.1-8b``;
    a local path -> its last component."""
    path = Path(model)
    base = path.name if (path.is_absolute() or model.startswith(".") or path.exists()) else model
    text = base.strip().lower().replace("/", "--")
    text = re.sub(r"[^a-z0-9._-]+", "-", text).strip("-.")
    return text or "model"


def profile_paths(model: str, gpu: str, out: Path | None = None) -> tuple[Path, Path]:
    """(YAML, JSON) paths: ``profiles/<model-slug>/<gpu>.yaml`` or the same under ``out``."""
    root = out if out is not None else DEFAULT_PROFILES_DIR
    directory = root / slug(model)
    return directory / f"{gpu}.yaml", directory / f"{gpu}.json"


def vllm_config(settings: Mapping[str, Any]) -> dict[str, Any]:
    """vLLM settings (snake_case names) -> the key format ``--config`` reads (flag names)."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if value is None:
            continue
        flag = key.replace("_", "-")
        if flag in _SECRET_KEYS:
            continue
        out[flag] = value
    return out


def render_profile(config: Mapping[str, Any], header: Sequence[str]) -> str:
    """YAML text: a comment header, then only vLLM keys."""
    import yaml

    lines = [f"# {line}".rstrip() for line in header]
    body = yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False)
    return "\n".join(lines) + ("\n" if lines else "") + body


def write_profile(
    yaml_path: Path, config: Mapping[str, Any], header: Sequence[str], record: Mapping[str, Any]
) -> tuple[Path, Path]:
    """Write the profile YAML and its JSON record atomically; returns both paths."""
    json_path = yaml_path.with_suffix(".json")
    atomic_write_text(json_path, json.dumps(record, indent=2, default=_json_default) + "\n")
    atomic_write_text(yaml_path, render_profile(config, header))
    return yaml_path, json_path


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory and a rename."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise ParameterError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def read_json(path: Path) -> Any:
    """Read a JSON file written by vtune; ParameterError with one line when unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise ParameterError(f"cannot read {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ParameterError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    if hasattr(value, "to_json"):
        return value.to_json()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
