"""``vtune probe``: measure this machine's bandwidth, matmul FLOP/s and memory, and cache them."""

from __future__ import annotations

import json

import click


@click.command()
@click.option(
    "--gpu",
    "gpu_name",
    default=None,
    help="The device to probe: cpu, or the registry GPU (`vtune gpus`) this card is, whose "
    "datasheet the measurement is compared with. Default: the CUDA device when torch sees one, "
    "else cpu.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def probe(gpu_name: str | None, as_json: bool) -> None:
    """Measure the device vtune would tune (memory bandwidth, dense matmul FLOP/s per dtype,
    memory) with torch, and cache the result for estimate, search and bench to use."""
    from tuner.specs.probe import run_probe

    if not as_json:
        click.echo("probing (torch: a large copy and matmuls; seconds to a minute)...", err=True)
    run = run_probe(gpu_name)
    if run.warning:
        click.echo(f"vtune: warning: {run.warning}", err=True)
    if as_json:
        click.echo(json.dumps(run.to_json(), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    res = run.result
    table = Table(
        title=f"{res.device_name} ({res.kind}, torch {res.torch_version}, {res.seconds:.1f} s)",
        title_justify="left",
    )
    for col in ("quantity", "measured", "datasheet", "fraction"):
        table.add_column(col, justify="left" if col == "quantity" else "right")
    for name, measured, sheet in run.comparison():
        if name == "bandwidth":
            label, unit = "memory bandwidth (copy)", "B/s"
        else:
            label, unit = f"{name} matmul (n = {res.matmul_n.get(name)})", "FLOP/s"
        shown = _rate(measured, unit)
        sheet_shown = "-" if sheet is None else _rate(sheet, unit)
        fraction = "-" if not sheet else f"{measured / sheet:.0%}"
        table.add_row(label, shown, sheet_shown, fraction)
    for dtype, why in res.skipped.items():
        table.add_row(f"{dtype} matmul", "skipped", "-", why)
    table.add_row(
        "memory (total / free)",
        f"{res.memory_total_bytes / 2**30:,.1f} / {res.memory_free_bytes / 2**30:,.1f} GiB",
        "-",
        "-",
    )
    out = Console()
    out.print(table)
    out.print(f"cached in {run.path} (key {res.device_key}, measured {res.measured_at})")


def _rate(value: float, unit: str) -> str:
    """1.23e12 -> "1.23 TFLOP/s"; 4.5e10 -> "45.0 GFLOP/s"."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if value >= scale:
            return f"{value / scale:,.{2 if value < 10 * scale else 1}f} {prefix}{unit}"
    return f"{value:,.0f} {unit}"
