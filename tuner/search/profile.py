"""Serving profiles: a vLLM config YAML (``vllm serve --config`` loads it unchanged) and the
full JSON record beside it. Every write is atomic (temp file + rename), so a killed search never
leaves a half-written profile.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tuner.files import atomic_write_json, atomic_write_text

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
    atomic_write_json(json_path, record)
    atomic_write_text(yaml_path, render_profile(config, header))
    return yaml_path, json_path
