"""``vtune report``: HTML page and PNG plots of a finished search."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("record", metavar="PROFILE_JSON", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Output directory (default: <PROFILE_JSON without .json>-report).",
)
def report(record: Path, out: Path | None) -> None:
    """Write index.html and PNG plots for the search record PROFILE_JSON (the .json written
    beside the profile): throughput vs latency, the Pareto front, pruning, the estimator's
    error and KV-cache usage over each trial."""
    from tuner.outputs.report import write_report

    if record.suffix == ".yaml":  # the profile: take the record beside it
        record = record.with_suffix(".json")
    target = out if out is not None else record.with_name(record.stem + "-report")
    result = write_report(record, target)
    click.echo(f"report: {result.html}")
    for image in result.images:
        click.echo(f"  {image}")
