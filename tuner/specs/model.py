"""Finding a model: a name resolved to a :class:`ModelSpec`.

Sources, in order: a local directory holding ``config.json`` (its safetensors headers give exact
checkpoint bytes); the Hugging Face cache; the bundled architecture cards
(``tuner/data/model_cards.json``, so estimates work offline); the hub (config only, never
weights). Building the spec from the config is :mod:`tuner.specs.model_spec`; its names are
re-exported here, so ``from tuner.specs.model import ModelSpec, load_model`` is the one import.

The config is read as plain JSON: no transformers or torch import, so ``vtune estimate`` stays fast.
"""

from __future__ import annotations

import json
import os
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from tuner.errors import ModelError
from tuner.specs.checkpoint import read_checkpoint_info
from tuner.specs.model_spec import (
    ModelSpec,
    QuantConfig,
    kv_width_per_layer,
    parse_quantization_config,
    spec_from_config,
)

__all__ = [
    "ModelSpec",
    "QuantConfig",
    "card_ids",
    "kv_width_per_layer",
    "load_cards",
    "load_model",
    "parse_quantization_config",
    "spec_from_config",
]


# ---------------------------------------------------------------------------------------------
# Resolving a model name


@cache
def load_cards() -> dict[str, dict[str, Any]]:
    """The bundled architecture cards, keyed by lower-case hub id and alias."""
    text = resources.files("tuner").joinpath("data/model_cards.json").read_text()
    cards: dict[str, dict[str, Any]] = {}
    for card in json.loads(text)["cards"]:
        for key in (card["hub_id"], *card.get("aliases", [])):
            cards[key.lower()] = card
    return cards


def card_ids() -> list[str]:
    """Hub ids of the bundled cards, sorted."""
    return sorted({card["hub_id"] for card in load_cards().values()})


def load_model(name: str, *, offline: bool | None = None) -> ModelSpec:
    """Resolve ``name`` to a ModelSpec: local directory, HF cache, bundled card, then the hub.

    ``offline`` defaults to the ``HF_HUB_OFFLINE`` environment variable. Raises ModelError with
    one line when nothing can be found or read.
    """
    if not name or not name.strip():
        raise ModelError("model name is empty")
    path = Path(name).expanduser()
    if path.exists():
        return _load_local(path, name)
    if name.startswith((".", "/", "~")):
        raise ModelError(f"model directory {name!r} does not exist")

    cached = _from_hf_cache(name)
    if cached is not None:
        return spec_from_config(_read_json(cached, name), name=name, source="hf-cache")

    card = load_cards().get(name.lower())
    if card is not None:
        return spec_from_config(card["config"], name=card["hub_id"], source="card")

    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if not offline and "/" in name:
        config = _from_hub(name)
        if config is not None:
            return spec_from_config(config, name=name, source="hub")
    raise ModelError(_not_found_message(name))


def _load_local(path: Path, name: str) -> ModelSpec:
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise ModelError(f"model directory {str(path)!r} has no config.json")
    checkpoint = read_checkpoint_info(path) if path.is_dir() else None
    return spec_from_config(
        _read_json(config_file, name),
        name=name,
        source="local",
        checkpoint=checkpoint,
        path=str(path.resolve()) if path.is_dir() else None,
    )


def _read_json(file: Path, name: str) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"model {name!r}: cannot read {file}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ModelError(
            f"model {name!r}: {file} is not valid JSON ({exc.msg}, line {exc.lineno})"
        ) from None
    if not isinstance(data, dict):
        raise ModelError(f"model {name!r}: {file} does not hold a JSON object")
    return data


def _from_hf_cache(name: str) -> Path | None:
    if "/" not in name:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # transformers brings huggingface_hub; without it there is no cache
        return None
    found = try_to_load_from_cache(name, "config.json")
    return Path(found) if isinstance(found, str) else None


def _from_hub(name: str) -> dict[str, Any] | None:
    """Fetch config.json (never weights) from the hub; None when unreachable or absent.
    The token, if any, comes from huggingface_hub's own settings and is never logged here."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:
        return None
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    try:
        file = hf_hub_download(name, "config.json")
    except (HfHubHTTPError, OSError, ValueError):
        return None
    except Exception:  # network stacks raise many types; any of them means "not reachable"
        return None
    return _read_json(Path(file), name)


def _not_found_message(name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name.lower(), list(load_cards()), n=3, cutoff=0.5)
    hint = (
        f"; did you mean {', '.join(close)}?"
        if close
        else "; `vtune estimate --list-models` lists bundled cards"
    )
    return (
        f"model {name!r} not found: not a local directory, not in the Hugging Face cache, "
        f"not a bundled card, and not reachable on the hub{hint}"
    )
