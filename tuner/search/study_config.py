"""What a study carries so that a worker on another machine can run it: the search's
configuration, stored in the study when its search first runs (:func:`remember`), read back by
``vtune worker --storage URL --study NAME`` (:func:`prepare_worker`).

Stored (study user attribute ``vtune_search``): the :class:`~tuner.search.prepare.TuneConfig`
as JSON (local paths made absolute: a worker sees them where the search did, on a shared
filesystem or the same image), the space the search planned, and the names of the secret
``--engine-arg`` settings. Never stored: any secret (a secret engine setting's value, the
storage URL and its password, vLLM's environment), nor what belongs to each machine (``--out``,
``--vllm-python``, the DCGM exporter, a log directory, a port). A worker gives those on its own
command line; a secret setting the search had must be given again (``--engine-arg
api_key=...``) or the worker stops with one line.

A worker plans the search from this configuration; a different space (another vtune version,
another model) stops it with one line rather than measure other candidates into the study.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tuner.engine.settings import is_secret
from tuner.errors import ParameterError, StorageError
from tuner.plan.space import Space
from tuner.search.prepare import Prepared, TuneConfig, prepare
from tuner.search.storage import redact

ATTR = "vtune_search"
FORMAT = 1
# Each machine's own (given on the worker's command line), or secret: never stored.
_NOT_STORED = {
    "TuneConfig": {"storage", "out"},
    "LaunchConfig": {"python", "command", "env", "log_dir", "port", "cuda_visible_devices"},
    "TelemetryOptions": {"dcgm_url"},
}


def remember(study: Any, prep: Prepared, space: Space) -> None:
    """Store the search's configuration and its planned ``space`` in ``study`` unless the
    study holds it already (the first search of a study writes it; nobody rewrites it)."""
    if ATTR in study.user_attrs:
        return
    study.set_user_attr(ATTR, describe(prep.config, space))


def describe(cfg: TuneConfig, space: Space) -> dict[str, Any]:
    """The JSON a study carries (see the module docstring)."""
    secrets = sorted(str(k) for k, _ in cfg.engine_args if is_secret(k))
    shared = dataclasses.replace(
        cfg,
        model=_absolute(cfg.model),
        space_file=_absolute_path(cfg.space_file),
        calib=_absolute(cfg.calib) if cfg.calib else cfg.calib,
        variants=tuple((name, _absolute(path)) for name, path in cfg.variants),
        workload=dataclasses.replace(
            cfg.workload,
            dataset=_absolute_path(cfg.workload.dataset),
            trace=_absolute_path(cfg.workload.trace),
        ),
        engine_args=tuple((k, v) for k, v in cfg.engine_args if not is_secret(k)),
    )
    return {
        "format": FORMAT,
        "config": _encode(shared),
        "space": space_json(space),
        "secret_engine_args": secrets,
    }


def prepare_worker(
    url: str,
    name: str,
    *,
    out: Path | None,
    python: str | None,
    secrets: Mapping[str, Any],
) -> Prepared:
    """The search of study ``name`` as this machine runs it: the stored configuration with
    this worker's storage, ``--out``, vLLM Python and secrets, prepared here; VtuneError (one
    line) when the study is missing, carries no configuration, lacks a secret, or plans
    another space here."""
    from tuner.search.study import load_study

    stored = load_study(url, name).user_attrs.get(ATTR)
    if not isinstance(stored, dict) or stored.get("format") != FORMAT:
        raise StorageError(
            f"study {name!r} in {redact(url)} carries no search configuration this vtune reads "
            "(its search has not started yet, or another vtune version made it)"
        )
    needed = set(stored.get("secret_engine_args") or ())
    given = {str(k): v for k, v in secrets.items()}
    extra = sorted(set(given) - needed)
    if extra:
        raise ParameterError(
            f"--engine-arg {', '.join(extra)}: a worker takes only the secret settings of the "
            "study's search; everything else comes from the study"
        )
    missing = sorted(needed - set(given))
    if missing:
        raise ParameterError(
            f"study {name!r} was searched with the secret setting(s) {', '.join(missing)}, "
            f"which a study never stores: give them here (--engine-arg {missing[0]}=...)"
        )
    cfg = decode(stored["config"])
    launch = cfg.launch if python is None else dataclasses.replace(cfg.launch, python=python)
    cfg = dataclasses.replace(
        cfg,
        storage=url,
        out=out,
        launch=launch,
        engine_args=(*cfg.engine_args, *given.items()),
    )
    prep = prepare(cfg)
    here, there = space_json(prep.space), stored.get("space")
    if here != there:
        raise ParameterError(_space_difference(name, there, here))
    prep.study_name = name  # the study's, whatever this machine would name it
    prep.work_dir = prep.yaml_path.parent / f"{prep.gpu.name}.study" / name.rsplit("-", 1)[-1]
    return prep


def space_json(space: Space) -> dict[str, list[Any]]:
    """A space as the study stores it (knob -> values, JSON-normalised)."""
    data = {k: list(v) for k, v in sorted(space.values.items())}
    return typing.cast(dict[str, list[Any]], json.loads(json.dumps(data, default=str)))


def _space_difference(name: str, there: Any, here: dict[str, list[Any]]) -> str:
    there = there if isinstance(there, dict) else {}
    knobs = sorted(k for k in set(there) | set(here) if there.get(k) != here.get(k))
    first = knobs[0] if knobs else "?"
    return (
        f"study {name!r} plans another search space on this machine ({first}: "
        f"{there.get(first)} in the study, {here.get(first)} here); run the same vtune "
        "version with the same model and GPU as the search"
    )


def _absolute(value: str) -> str:
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def _absolute_path(value: Path | None) -> Path | None:
    return None if value is None else Path(_absolute(str(value)))


# --- a typed dataclass <-> JSON, by the dataclasses' own annotations -------------------------


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        skip = _NOT_STORED.get(type(value).__name__, set())
        return {
            f.name: _encode(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.init and f.name not in skip
        }
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _encode(v) for k, v in value.items()}
    return value


def decode(data: Mapping[str, Any]) -> TuneConfig:
    """The TuneConfig of :func:`describe`'s ``config`` (fields not stored take defaults)."""
    try:
        return typing.cast(TuneConfig, _decode(TuneConfig, data))
    except (TypeError, ValueError, KeyError) as exc:
        raise StorageError(f"the study's search configuration cannot be read: {exc}") from None


def _decode(tp: Any, data: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return data
    if origin in (typing.Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        return _decode(next(a for a in args if a is not type(None)), data)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp) if f.init}
        return tp(**{k: _decode(hints[k], v) for k, v in data.items() if k in names})
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], v) for v in data)
        return tuple(_decode(a, v) for a, v in zip(args, data, strict=True))
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        value = args[1] if len(args) == 2 else Any
        return {str(k): _decode(value, v) for k, v in data.items()}
    if tp is Path:
        return Path(data)
    if tp is float and isinstance(data, int) and not isinstance(data, bool):
        return float(data)
    if isinstance(tp, type) and not isinstance(data, tp):
        raise TypeError(f"expected {tp.__name__}, got {data!r}")
    return data


__all__ = ["ATTR", "decode", "describe", "prepare_worker", "remember", "space_json"]
