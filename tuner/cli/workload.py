"""``vtune workload describe FILE``: what a request trace asks of a server, as a table and a
PNG, so the user sees what a search on it tunes for."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tuner.cli.common import json_flag_option


@click.group()
def workload() -> None:
    """Look at workloads (request traces) before tuning on them."""


@workload.command()
@click.argument("trace_path", metavar="FILE", type=click.Path(path_type=Path))
@click.option(
    "--png",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also draw the histograms, the gap distribution and the arrivals into this PNG.",
)
@json_flag_option("Print the figures as one JSON object.")
def describe(trace_path: Path, png: Path | None, as_json: bool) -> None:
    """Length histograms, arrival burstiness (gamma shape of the gaps) and session statistics
    of the JSONL trace FILE (vtune's or Mooncake's fields; see --dataset trace:FILE)."""
    from tuner.load.trace import read_trace
    from tuner.outputs.workload_describe import describe_rows, describe_trace, plot_trace

    trace = read_trace(trace_path)
    figures = describe_trace(trace)
    if as_json:
        click.echo(json.dumps(figures, indent=2))
    else:
        from rich import box
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"Workload {trace_path}", box=box.SIMPLE_HEAD, show_header=False)
        table.add_column("figure", no_wrap=True)
        table.add_column("value")
        for name, value in describe_rows(figures):
            table.add_row(name, value)
        Console().print(table)
    if png is not None:
        plot_trace(trace, png)
        if not as_json:
            click.echo(f"plot: {png}")
