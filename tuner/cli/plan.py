"""``vtune plan``: how many replicas and GPUs sustain a target request rate under the search's
SLO, and what a million output tokens costs, from a finished search's measured trials."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from tuner.cli.common import json_flag_option, positive_float


@click.command()
@click.argument("record_path", metavar="RECORD_JSON", type=click.Path(path_type=Path))
@click.option(
    "--target-rate",
    type=float,
    required=True,
    callback=positive_float,
    help="Requests/s the deployment must sustain under the record's SLO.",
)
@click.option(
    "--gpu-hour-price",
    type=float,
    default=None,
    callback=positive_float,
    help="Price of one GPU for one hour (e.g. 4.10): adds $/hour and $/1M output tokens.",
)
@json_flag_option("Print the rows as one JSON object.")
def plan(
    record_path: Path, target_rate: float, gpu_hour_price: float | None, as_json: bool
) -> None:
    """For each configuration of RECORD_JSON that met the SLO: replicas x GPUs for
    --target-rate, with headroom for the measured noise, and the cost; cheapest first."""
    from tuner.errors import VtuneError
    from tuner.outputs.capacity import capacity_plan
    from tuner.search.record import load_record

    if record_path.suffix == ".yaml":
        record_path = record_path.with_suffix(".json")
    record = load_record(record_path)
    rows = capacity_plan(record, target_rate, gpu_hour_price)
    if as_json:
        doc = {
            "record": str(record_path),
            "slo": record.slo,
            "target_rate": target_rate,
            "gpu_hour_price": gpu_hour_price,
            "rows": [r.to_json() for r in rows],
        }
        click.echo(json.dumps(doc, indent=2))
    if not rows:
        raise VtuneError(
            f"no configuration in {record_path} met its SLO ({record.slo}): nothing to plan"
        )
    if not as_json:
        _print(rows, record.slo, record.gpu.name, target_rate, gpu_hour_price)


def _print(rows: list[Any], slo: str | None, gpu: str | None, target: float, price: Any) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    def f(value: float | None, fmt: str = ",.3g") -> str:
        return "-" if value is None else format(value, fmt)

    title = f"{target:g} req/s under {slo or 'no SLO'} on {gpu or '?'}"
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("candidate", no_wrap=True)
    for name in ("TP", "req/s", "replicas", "GPUs", "tok/s/GPU", "$/hour", "$/1M tok"):
        table.add_column(name, justify="right")
    notes = []
    for r in rows:
        if r.basis != "1 run":
            notes.append(f"{r.name}: {r.basis}" + (f"; {r.note}" if not r.extrapolated else ""))
        table.add_row(
            r.name + (" +" if r.extrapolated else ""),
            str(r.gpus_per_replica),
            f(r.rate),
            "-" if r.replicas is None else str(r.replicas),
            "-" if r.gpus is None else str(r.gpus),
            f(r.tokens_per_s_per_gpu, ",.0f"),
            f(r.cost_per_hour, ",.2f"),
            f(r.cost_per_million_tokens, ",.3f"),
        )
    Console().print(table)
    click.echo(
        "req/s: one replica's measured SLO-meeting rate (one run, or the low end of the "
        "re-measured finalists' 95% interval); TP: GPUs per replica; +: extrapolated, more "
        "than one replica assumed to scale linearly; tok/s/GPU and $ at the target load."
    )
    for line in notes:
        click.echo(f"  {line}")
    if price is None:
        click.echo("Give --gpu-hour-price for $/hour and $/1M output tokens.")
