"""The options several commands share are declared once (tuner/cli/common.py) and read alike
everywhere; each command's option list is pinned; ``vtune bench``'s screen renders through
tuner/cli/console.py."""

from __future__ import annotations

import importlib
import math

import click
import pytest
from rich.console import Console

from tuner.cli import COMMANDS
from tuner.cli.common import parse_engine_args


def _command(name: str) -> click.Command:
    module, attr = COMMANDS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def _option(command: str, flag: str) -> click.Option:
    [option] = [p for p in _command(command).params if flag in getattr(p, "opts", ())]
    assert isinstance(option, click.Option)
    return option


OPTIONS = {
    "estimate": "--model --gpu --max-model-len --context-len --quantization --kv-cache-dtype "
    "--gpu-memory-utilization --max-num-batched-tokens --max-num-seqs --block-size "
    "--kv-cache-memory-bytes --tensor-parallel-size --explain --datasheet --calibration --json "
    "--list-models",
    "gpus": "--json --wide",
    "bench": "--input-len --output-len --dataset --time-scale --prefix-len --num-prefixes "
    "--endpoint --model --gpu --engine-arg --url --served-model-name --tokenizer --rate "
    "--burstiness --concurrency "
    "--num-prompts --duration --warmup --timeout --slo --json --api-key --seed --port "
    "--startup-timeout --no-scrape --dcgm-url --telemetry-period --metrics-port --metrics-host "
    "--pushgateway",
    "search": "--input-len --output-len --dataset --time-scale --prefix-len --num-prefixes "
    "--endpoint --model --gpu --slo --objective --rate --budget --time-budget --param --space "
    "--variant "
    "--build-variants --max-quality-loss --calib --engine-arg --max-model-len "
    "--kv-cache-memory-bytes --finalists --repeats --finalist-runs --early-stop-margin "
    "--no-early-stop "
    "--sampler --screen --pareto --seconds-per-point "
    "--iterations --storage --workers --devices --fleet-worker --out --gpu-hour-price --seed "
    "--dry-run --all --json "
    "--startup-timeout --vllm-python "
    "--dcgm-url --telemetry-period --metrics-port --metrics-host --pushgateway",
    "quantize": "--model --method --out --bits --group-size --calib --calib-seq-len "
    "--calib-blocks --gpu --json",
    "tiny-model": "--out --seed",
}


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_each_command_lists_its_options_in_order(command: str) -> None:
    params = _command(command).params
    assert [p.opts[0] for p in params if isinstance(p, click.Option)] == OPTIONS[command].split()


@pytest.mark.parametrize(
    "flag,commands",
    [
        ("--model", ("bench", "search", "estimate", "quantize")),
        ("--gpu", ("bench", "search", "estimate", "quantize")),
        ("--engine-arg", ("bench", "search")),
        ("--max-model-len", ("search", "estimate")),
        ("--kv-cache-memory-bytes", ("search", "estimate")),
        ("--startup-timeout", ("bench", "search")),
        ("--seed", ("bench", "search", "tiny-model")),
    ],
)
def test_a_shared_option_has_one_name_type_and_callback(
    flag: str, commands: tuple[str, ...]
) -> None:
    shapes = {
        (o.name, repr(o.type), o.callback, o.multiple, o.metavar)
        for o in (_option(c, flag) for c in commands)
    }
    assert len(shapes) == 1, shapes


def test_defaults_that_differ_per_command_stay_as_they_were() -> None:
    assert _option("estimate", "--gpu").default == "h100"
    assert _option("search", "--gpu").required and not _option("bench", "--gpu").required
    assert not _option("estimate", "--model").required and _option("bench", "--model").required
    assert _option("search", "--startup-timeout").default == 600.0
    assert _option("bench", "--startup-timeout").default is None
    assert _option("gpus", "--json").help == "Print the registry as JSON."
    assert _option("quantize", "--json").help == _option("estimate", "--json").help


def test_engine_args_are_typed() -> None:
    pairs = ("enforce_eager", "max_num_seqs=8", "kv_cache_dtype=fp8", "swap=off")
    assert parse_engine_args(None, None, pairs) == {  # type: ignore[arg-type]
        "enforce_eager": True,
        "max_num_seqs": 8,
        "kv_cache_dtype": "fp8",
        "swap": False,
    }
    with pytest.raises(click.BadParameter, match="KEY=VALUE"):
        parse_engine_args(None, None, ("=8",))  # type: ignore[arg-type]


def test_print_bench_result_shows_the_failure_and_the_slo_check() -> None:
    from tuner.cli.console import print_bench_result
    from tuner.measure.bench import BenchResult

    result = BenchResult(
        config={},
        status="failed",
        failure="unreachable",
        message="no server at [http://x]",
        partial=True,
        slo_check=(("ttft:p95<500ms", 0.25, True), ("tpot:p99<50ms", math.nan, False)),
    )
    console = Console(record=True, width=120)
    print_bench_result(result, console=console)
    text = console.export_text()
    assert "SLO ttft:p95<500ms: 250.00 ms met" in text
    assert "SLO tpot:p99<50ms: - ms missed" in text
    assert "failed (unreachable): no server at [http://x] — partial results" in text
    assert "vtune bench" not in text  # no summary, no table
