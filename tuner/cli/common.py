"""Shared CLI plumbing: lazy command loading, error mapping, option callbacks, and the options
several commands declare.

Option decorators come in two kinds. Blocks (:func:`workload_options`, :func:`metrics_options`)
are plain decorators: the same options, texts and defaults wherever they appear. Single options
that recur with a command-specific help text or default (``--model``, ``--gpu``,
``--engine-arg``, ...) are factories: ``@gpu_option("GPU from the registry.", required=True)``.
Either way the name, destination, type and callback of an option are written once, here.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

import click

from tuner.errors import VtuneError


def fail(message: str) -> None:
    """Print one line to stderr and exit with code 2 (the user-error code)."""
    click.echo(f"vtune: error: {message}", err=True)
    sys.exit(2)


class VtuneGroup(click.Group):
    """A click group that imports command modules only when they run (keeps `estimate` fast)
    and turns :class:`VtuneError` into one clear line and exit code 2."""

    def __init__(self, *args: Any, lazy_commands: dict[str, str] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._lazy = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(super().list_commands(ctx)) | {
            name for name, target in self._lazy.items() if _importable(target)
        }
        return sorted(names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self._lazy.get(cmd_name)
        if target is None or not _importable(target):
            return super().get_command(ctx, cmd_name)
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VtuneError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            click.echo("vtune: interrupted", err=True)
            sys.exit(130)


def _importable(target: str) -> bool:
    module_name = target.split(":")[0]
    return importlib.util.find_spec(module_name) is not None


def parse_bytes(text: str) -> int:
    """Parse '1GiB', '512MiB', '40e9', '1073741824' into bytes."""
    units = {
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
        "tib": 2**40,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
        "tb": 10**12,
        "b": 1,
    }
    raw = text.strip().lower().replace("_", "")
    for suffix in sorted(units, key=len, reverse=True):
        if raw.endswith(suffix):
            number, factor = raw[: -len(suffix)], units[suffix]
            break
    else:
        number, factor = raw, 1
    try:
        value = float(number) * factor
    except ValueError:
        raise click.BadParameter(
            f"not a byte size: {text!r} (use e.g. 1GiB, 512MiB, 40e9)"
        ) from None
    if value <= 0:
        raise click.BadParameter(f"must be positive, got {text!r}")
    return int(value)


def bytes_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """click callback for byte-size options."""
    return None if value is None else parse_bytes(value)


def positive_int(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    """click callback: reject zero and negative integers."""
    if value is not None and value <= 0:
        raise click.BadParameter(f"must be a positive integer, got {value}")
    return value


def fraction_option(
    ctx: click.Context, param: click.Parameter, value: float | None
) -> float | None:
    """click callback: a fraction in (0, 1]."""
    if value is not None and not (0.0 < value <= 1.0):
        raise click.BadParameter(f"must be in (0, 1], got {value}")
    return value


def parse_scalar(text: str) -> Any:
    """A command-line value as YAML would read it: true/false, ints, floats, else the string."""
    low = text.strip().lower()
    if low in ("true", "on", "yes"):
        return True
    if low in ("false", "off", "no"):
        return False
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_engine_args(
    ctx: click.Context, param: click.Parameter, pairs: tuple[str, ...]
) -> dict[str, Any]:
    """click callback for repeatable ``--engine-arg KEY=VALUE``: a bare KEY is a flag (True);
    values are typed (``enforce_eager=true`` -> True, ``max_num_seqs=8`` -> 8)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}")
        out[key.strip()] = parse_scalar(value) if sep else True
    return out


def positive_float(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """click callback: reject zero, negative and NaN floats."""
    if value is not None and not value > 0:
        raise click.BadParameter(f"must be positive, got {value}")
    return value


def non_negative(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    """click callback: reject negative integers."""
    if value is not None and value < 0:
        raise click.BadParameter(f"must be >= 0, got {value}")
    return value


def length_option(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """click callback: a token length ``N`` or range ``LOW:HIGH`` (a LengthRange)."""
    from tuner.errors import ParameterError
    from tuner.load.workload import LengthRange

    if value is None:
        return None
    try:
        return LengthRange.parse(value)
    except ParameterError as exc:
        raise click.BadParameter(str(exc)) from None


def slo_option(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """click callback: an SLO string parsed by tuner.measure.slo (SloError -> one line, exit 2)."""
    from tuner.measure.slo import parse_slo

    return None if value is None else parse_slo(value)


def metrics_options(fn: Any) -> Any:
    """``--metrics-port``, ``--metrics-host`` and ``--pushgateway`` (search and bench)."""
    fn = click.option(
        "--pushgateway", default=None, help="Push vtune's metrics to this Pushgateway URL."
    )(fn)
    fn = click.option(
        "--metrics-host",
        default="127.0.0.1",
        show_default=True,
        help="Address the metrics endpoint binds.",
    )(fn)
    return click.option(
        "--metrics-port",
        type=int,
        default=None,
        help="Serve vtune's Prometheus /metrics on this port while running.",
    )(fn)


def _http_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not value.startswith(("http://", "https://")):
        raise click.BadParameter(f"expected an http(s):// URL, got {value!r}")
    return value


def telemetry_options(fn: Any) -> Any:
    """``--dcgm-url`` and ``--telemetry-period`` (search and bench): how each load point's
    hardware telemetry is sampled (:class:`tuner.measure.watch.TelemetryOptions`)."""
    fn = click.option(
        "--telemetry-period",
        type=float,
        default=0.1,
        show_default=True,
        callback=positive_float,
        help="Seconds between telemetry samples (CPU via psutil, GPU via NVML).",
    )(fn)
    return click.option(
        "--dcgm-url",
        default=None,
        callback=_http_url,
        help="A dcgm-exporter /metrics URL: also sample DCGM's SM, DRAM and tensor activity.",
    )(fn)


def telemetry_config(o: dict[str, Any]) -> Any:
    """The TelemetryOptions of :func:`telemetry_options`' values."""
    from tuner.measure.watch import TelemetryOptions

    return TelemetryOptions(period_s=o["telemetry_period"], dcgm_url=o["dcgm_url"])


def workload_options(fn: Any) -> Any:
    """The request-set options ``vtune bench`` and ``vtune search`` share: lengths, a dataset
    (ShareGPT file, request trace, or conversations), trace replay speed, shared prefixes,
    and the endpoint."""
    options = [
        click.option(
            "--input-len",
            default="256",
            show_default=True,
            callback=length_option,
            help="Prompt tokens: N or LOW:HIGH.",
        ),
        click.option(
            "--output-len",
            default=None,
            callback=length_option,
            help="Output tokens: N or LOW:HIGH (default 128; with --dataset: the answers').",
        ),
        click.option(
            "--dataset",
            default=None,
            metavar="FILE|trace:FILE|conversations",
            callback=dataset_option,
            help="Instead of random prompts: a ShareGPT JSON file; trace:FILE, a JSONL request "
            "trace (vtune's or Mooncake's fields); or conversations[:turns=2-6,think=1,"
            "system=128,ctx=2048,users=32], multi-turn sessions.",
        ),
        click.option(
            "--time-scale",
            type=float,
            default=None,
            callback=positive_float,
            help="vtune bench: replay the trace at its recorded times times this (0.5: twice "
            "as fast; default 1 without --rate or --concurrency).",
        ),
        click.option(
            "--prefix-len",
            default=0,
            type=int,
            callback=non_negative,
            help="Tokens of shared prefix per prompt.",
        ),
        click.option(
            "--num-prefixes",
            default=1,
            type=int,
            callback=positive_int,
            help="How many distinct shared prefixes.",
        ),
        click.option(
            "--endpoint",
            type=click.Choice(["completions", "chat"]),
            default="completions",
            show_default=True,
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def dataset_option(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """click callback for ``--dataset``: WorkloadSpec keyword arguments
    (:func:`tuner.load.workload.dataset_source`); a bad trace is one line (exit 2) here."""
    from tuner.load.workload import dataset_source

    return dataset_source(value)


def workload_spec(o: dict[str, Any], num_prompts: int = 100) -> Any:
    """A WorkloadSpec from the options of :func:`workload_options`. A trace is replayed at its
    recorded times when the command has ``--rate`` and neither it nor ``--concurrency`` is
    given (vtune bench); otherwise (a search, or a rate) it is re-sampled."""
    from tuner.errors import ParameterError
    from tuner.load.workload import DEFAULT_OUTPUT_LEN
    from tuner.measure.bench import WorkloadSpec

    source = o["dataset"] or {}
    output_len = o["output_len"]
    if output_len is None and "dataset" not in source and "trace" not in source:
        output_len = DEFAULT_OUTPUT_LEN
    replay = "trace" in source and "rate" in o and o["rate"] is None and not o.get("concurrency")
    if o.get("time_scale") is not None and not replay:
        raise ParameterError(
            "--time-scale replays a trace (--dataset trace:FILE) at its recorded times: "
            "vtune bench without --rate or --concurrency"
        )
    return WorkloadSpec(
        num_prompts=num_prompts,
        input_len=o["input_len"],
        output_len=output_len,
        prefix_len=o["prefix_len"],
        num_prefixes=o["num_prefixes"],
        seed=o["seed"],
        replay=replay,
        time_scale=o.get("time_scale") or 1.0,
        **source,
    )


# ---------------------------------------------------------------------------------------------
# Single options shared by several commands (help texts and defaults differ per command)

Decorator = Callable[[Any], Any]


def model_option(help: str, *, required: bool = True) -> Decorator:
    """``--model`` (parameter ``model``): a model directory, HF id or bundled card."""
    return click.option("--model", "model", required=required, help=help)


def gpu_option(help: str, *, default: str | None = None, required: bool = False) -> Decorator:
    """``--gpu`` (parameter ``gpu_name``): a GPU registry name, or cpu; a default is shown."""
    extra: dict[str, Any] = {"default": default, "show_default": True} if default else {}
    return click.option("--gpu", "gpu_name", required=required, help=help, **extra)


def engine_arg_option(help: str) -> Decorator:
    """Repeatable ``--engine-arg KEY=VALUE`` (parameter ``engine_args``, a dict; see
    :func:`parse_engine_args`)."""
    return click.option(
        "--engine-arg",
        "engine_args",
        multiple=True,
        metavar="KEY=VALUE",
        callback=parse_engine_args,
        help=help,
    )


def max_model_len_option(help: str | None = None) -> Decorator:
    """``--max-model-len``: vLLM's flag of that name, a positive integer."""
    return click.option("--max-model-len", type=int, callback=positive_int, help=help)


def kv_cache_memory_bytes_option(help: str) -> Decorator:
    """``--kv-cache-memory-bytes``: vLLM's flag of that name, a byte size (1GiB, 40e9, ...)."""
    return click.option("--kv-cache-memory-bytes", callback=bytes_option, help=help)


def startup_timeout_option(default: float | None, help: str | None = None) -> Decorator:
    """``--startup-timeout``: seconds to wait for vLLM to become healthy; a default is shown."""
    extra: dict[str, Any] = {"show_default": True} if default is not None else {}
    return click.option(
        "--startup-timeout",
        type=float,
        default=default,
        callback=positive_float,
        help=help,
        **extra,
    )


def seed_option() -> Decorator:
    """``--seed`` (default 0): the seed of every random choice the command makes."""
    return click.option("--seed", type=int, default=0, show_default=True)


def json_flag_option(help: str = "Print one JSON object.") -> Decorator:
    """``--json`` as a flag (parameter ``as_json``): print JSON instead of tables."""
    return click.option("--json", "as_json", is_flag=True, help=help)
