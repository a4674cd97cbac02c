"""What to launch and how: ``EngineSettings`` (the vLLM knobs of one trial, as argv and as a
``--config`` YAML mapping) and ``LaunchConfig`` (how vLLM runs on this machine, and its env).

Unset (None) means vLLM's default and is never passed. The typed fields are the knobs of
``tuner.specs.knobs``, which give their flags (booleans ``--enable-x`` / ``--no-enable-x``),
config keys, parsing and name tags. Any other vLLM flag goes in ``extra`` as ``(flag, value)``
pairs (value None for a bare flag). Secrets given as flags (``--hf-token``, ``--api-key``) never
appear on argv or in the config mapping: ``secret_env`` moves them to the environment, because
vLLM logs its non-default arguments and profiles are shared. Anything written about settings
(records, messages) goes through :func:`redact_settings` (``"api_key": "***"``), the one
redaction of settings by name (:func:`is_secret`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.analytic.estimate import CPU_DEFAULT_KV_CACHE_BYTES
from tuner.errors import ParameterError
from tuner.specs.knobs import KNOBS, find_knob

GiB = 1 << 30
_API_SERVER = ("-m", "vllm.entrypoints.openai.api_server")
# Every flag a typed field owns, booleans' --no- form included.
_TYPED_FLAGS = {k.flag for k in KNOBS} | {k.off_flag for k in KNOBS if k.off_flag}
# Flags that belong to the launch (host, port) or to a typed field, not to ``extra``.
_RESERVED = {"--host", "--port", "--model", "--config"}
# Secret flag -> environment variable vLLM reads instead.
_SECRETS = {"--hf-token": "HF_TOKEN", "--api-key": "VLLM_API_KEY"}
# A setting whose value is a secret, by its name (snake, kebab or flag form): api_key, hf_token,
# token, *_secret, *_password; not max_num_batched_tokens, not tokenizer.
_SECRET_NAME = re.compile(r"^([\w-]*[-_])?(token|key|secret|password)$", re.IGNORECASE)
REDACTED = "***"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class EngineSettings:
    """One candidate's vLLM settings, by vLLM's names: ``model``, one field per knob of
    ``tuner.specs.knobs.KNOBS`` in its order (a unit test holds them together), ``extra``."""

    model: str
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
    kv_cache_memory_bytes: int | None = None
    dtype: str | None = None
    seed: int | None = None
    served_model_name: str | None = None
    extra: tuple[tuple[str, str | None], ...] = ()

    def __post_init__(self) -> None:
        if not self.model:
            raise ParameterError("a model is required")
        normalized = []
        for item in self.extra:
            if len(item) != 2:
                raise ParameterError(f"extra vLLM flags are (flag, value) pairs, got {item!r}")
            flag, value = item
            name = str(flag).strip().lstrip("-")
            if not name:
                raise ParameterError("empty vLLM flag in extra settings")
            name = name.split("=", 1)[0] if "=" in name else name
            norm = _flag(name)
            if norm in _RESERVED:
                raise ParameterError(f"{norm} is set by vtune itself, not as an extra flag")
            if norm in _TYPED_FLAGS:
                raise ParameterError(f"{norm} has its own setting; do not pass it in extra")
            normalized.append((norm, None if value is None else str(value)))
        object.__setattr__(self, "extra", tuple(normalized))

    # -- views -----------------------------------------------------------------------------

    def set_knobs(self) -> dict[str, Any]:
        """The typed knobs that are set, by field name, in the registry's order."""
        values = ((k.name, getattr(self, k.name)) for k in KNOBS)
        return {name: value for name, value in values if value is not None}

    @property
    def api_key(self) -> str | None:
        return dict(self.extra).get("--api-key")

    def to_vllm_args(self) -> list[str]:
        """``--model M`` then every set knob, then ``extra`` (secrets excluded)."""
        args = ["--model", self.model]
        for k in KNOBS:
            value = getattr(self, k.name)
            if value is not None:
                args += k.argv(value)
        for flag, value in self.extra:
            if flag in _SECRETS:
                continue
            args += [flag] if value is None else [flag, value]
        return args

    def to_config(self) -> dict[str, Any]:
        """The same settings as a mapping that ``vllm serve --config FILE.yaml`` accepts
        (kebab-case keys, ``model`` included, booleans as YAML booleans, no secrets)."""
        out: dict[str, Any] = {"model": self.model}
        for k in KNOBS:
            value = getattr(self, k.name)
            if value is not None:
                out[k.config_key] = value
        for flag, value in self.extra:
            if flag in _SECRETS or is_secret(flag):  # records and shared files carry none
                continue
            if value is None and flag.startswith("--no-"):
                out[flag[5:]] = False
            else:
                out[flag[2:]] = True if value is None else value
        return out

    @property
    def name(self) -> str:
        """A stable, file-name-safe label of the set knobs, e.g. ``mns8_pc0_kvb1G``;
        ``default`` when nothing is set. Model and served name are not part of it."""
        parts = [
            k.tag_part(getattr(self, k.name))
            for k in KNOBS
            if k.tag is not None and getattr(self, k.name) is not None
        ]
        shown = [(f, v) for f, v in self.extra if f not in _SECRETS]
        if shown:
            digest = hashlib.sha1(repr(shown).encode()).hexdigest()[:8]
            parts.append("x" + digest)
        return "_".join(parts) or "default"

    @classmethod
    def from_mapping(cls, model: str, values: Mapping[str, Any]) -> EngineSettings:
        """Build from ``{"max_num_seqs": "8", "enforce-eager": True, ...}`` (snake or kebab
        keys, strings or typed values, e.g. from ``--engine-arg`` or a profile). Known knobs are
        typed; anything else becomes ``extra`` (True: bare flag, False: ``--no-`` flag)."""
        kwargs: dict[str, Any] = {}
        extra: list[tuple[str, str | None]] = []
        for key, value in values.items():
            name = key.strip().lstrip("-").replace("-", "_")
            known = find_knob(name)
            if name == "model":
                model = str(value)
            elif known is not None:
                unset = value is None or (
                    isinstance(value, str) and value.strip().lower() in ("", "none", "null")
                )
                kwargs[name] = None if unset else known.coerce(value)
            elif value is True:
                extra.append((_flag(name), None))
            elif value is False:
                extra.append(("--no-" + _flag(name)[2:], None))
            elif value is not None:
                extra.append((_flag(name), str(value)))
        return cls(model=model, extra=tuple(extra), **kwargs)


def is_secret(name: str) -> bool:
    """Whether the setting ``name`` (``api_key``, ``hf-token``, ``--api-key``...) holds a secret."""
    return bool(_SECRET_NAME.match(str(name).strip().lstrip("-")))


def redact_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with every secret's value (:func:`is_secret`) replaced by ``***``: the one
    redaction of settings for records, logs and messages (a profile drops secrets instead)."""
    return {k: REDACTED if is_secret(k) and v is not None else v for k, v in values.items()}


def secret_env(settings: EngineSettings) -> dict[str, str]:
    """Environment variables carrying the secrets given as flags in ``settings.extra``."""
    return {_SECRETS[f]: v for f, v in settings.extra if f in _SECRETS and v is not None}


@dataclass(frozen=True)
class LaunchConfig:
    """How to run vLLM here. ``command`` (e.g. ``("vllm", "serve")``) replaces
    ``python -m vllm.entrypoints.openai.api_server``; ``port=None`` picks a free one (and
    retries on a lost race); ``device=None`` means "cuda" if /dev/nvidiactl exists, else "cpu"."""

    python: str = field(
        default_factory=lambda: os.environ.get("VTUNE_VLLM_PYTHON") or sys.executable
    )
    command: tuple[str, ...] | None = None
    host: str = "127.0.0.1"
    port: int | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    log_dir: Path | None = None
    startup_timeout_s: float = 600.0
    stop_grace_s: float = 10.0
    device: str | None = None
    cuda_visible_devices: str | None = None
    cpu_kv_cache_bytes: int = CPU_DEFAULT_KV_CACHE_BYTES  # the pool the estimator assumes
    access_log: bool = False  # uvicorn's per-request lines cost CPU and fill the log

    def __post_init__(self) -> None:
        # Accept the obvious loose types (str paths, list commands) and keep the record frozen.
        if self.log_dir is not None:
            object.__setattr__(self, "log_dir", Path(self.log_dir))
        if self.command is not None:
            object.__setattr__(self, "command", tuple(self.command))
        object.__setattr__(self, "env", dict(self.env))
        if self.device not in (None, "cpu", "cuda"):
            raise ParameterError(f"device must be 'cpu' or 'cuda', not {self.device!r}")

    def resolved_device(self) -> str:
        if self.device is not None:
            return self.device
        return "cuda" if Path("/dev/nvidiactl").exists() else "cpu"

    def prefix(self) -> list[str]:
        return list(self.command) if self.command else [self.python, *_API_SERVER]

    def effective(self, settings: EngineSettings) -> EngineSettings:
        """The settings actually launched. On CPU an unset KV pool becomes what vLLM would
        take from ``VLLM_CPU_KVCACHE_SPACE`` (GiB) when that is set, else ``cpu_kv_cache_bytes``;
        either way the trial records the real size and passes it as a flag."""
        if self.resolved_device() != "cpu" or settings.kv_cache_memory_bytes is not None:
            return settings
        legacy = self.env.get("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE"))
        size = int(legacy) * GiB if legacy and legacy.strip().isdigit() else self.cpu_kv_cache_bytes
        return dataclasses.replace(settings, kv_cache_memory_bytes=size)

    def describe(self) -> dict[str, Any]:
        """JSON-safe description; env values are not included (they may hold secrets)."""
        return {
            "command": self.prefix(),
            "host": self.host,
            "port": self.port,
            "env": sorted(self.env),
            "device": self.resolved_device(),
            "cuda_visible_devices": self.cuda_visible_devices,
            "startup_timeout_s": self.startup_timeout_s,
        }


def child_env(settings: EngineSettings, launch: LaunchConfig) -> dict[str, str]:
    """The environment vLLM gets: ours (HF_TOKEN included), plus quiet, unbuffered, no telemetry.

    On CPU with an explicit KV size, ``VLLM_CPU_KVCACHE_SPACE`` is dropped: vLLM lets that legacy
    variable override ``--kv-cache-memory-bytes``, and the flag is what the trial records.
    Secrets given as flags (``--hf-token``, ``--api-key``) travel here instead of on argv,
    because vLLM logs its non-default arguments.
    """
    env = dict(os.environ)
    env.update(VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO")  # the KV capacity line is logged at INFO
    if launch.resolved_device() == "cpu" and settings.kv_cache_memory_bytes is not None:
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    if launch.cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = launch.cuda_visible_devices
    env.update(launch.env)
    env.update(secret_env(settings))
    return env


def served_api_key(settings: EngineSettings, launch: LaunchConfig) -> str | None:
    """The API key the server started with ``settings`` and ``launch`` requires (vLLM reads
    ``--api-key``, else ``VLLM_API_KEY`` from its environment); None when it requires none.
    A client of that server (the search's load) sends it."""
    return child_env(settings, launch).get("VLLM_API_KEY") or None
