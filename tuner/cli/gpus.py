"""``vtune gpus``: the GPU registry, and the cards this machine has."""

from __future__ import annotations

import json

import click

from tuner.cli.common import json_flag_option

_COLUMNS = {  # registry row key -> column title
    "name": "name",
    "aliases": "aliases",
    "memory_gib": "GiB",
    "bandwidth_tbs": "TB/s",
    "bf16_tflops": "bf16 TFLOP/s",
    "fp8_tflops": "fp8 TFLOP/s",
    "compute_capability": "cc",
}


@click.command()
@json_flag_option("Print the registry as JSON.")
@click.option("--wide", is_flag=True, help="Also show quantization methods and KV dtypes.")
def gpus(as_json: bool, wide: bool) -> None:
    """List the GPUs vtune knows (dense datasheet peaks, and `vtune probe`'s figures beside
    them for a device probed here) and the ones detected here."""
    from rich.console import Console
    from rich.table import Table

    from tuner.specs.detect import detect_gpus, match_detected
    from tuner.specs.gpu import format_registry_rows, get_gpu
    from tuner.specs.peaks import with_peaks

    rows = format_registry_rows()
    for row in rows:  # `vtune probe`'s figures for the entries measured on this machine
        _, peaks = with_peaks(get_gpu(str(row["name"])))
        row["probed"] = peaks.to_json() if peaks.probed else None
        row["probed_bandwidth_tbs"] = (
            round(peaks.memory_bandwidth / 1e12, 3) if peaks.probed else None
        )
        bf16 = peaks.flops.get("bf16")
        row["probed_bf16_tflops"] = round(bf16 / 1e12, 2) if peaks.probed and bf16 else None
    detected = detect_gpus()
    if as_json:
        payload = {"registry": rows, "detected": [d.__dict__ for d in detected]}
        click.echo(json.dumps(payload, indent=2))
        return
    columns = dict(_COLUMNS)
    if any(row["probed"] for row in rows):
        columns |= {"probed_bandwidth_tbs": "probed TB/s", "probed_bf16_tflops": "probed bf16"}
    if wide:
        columns |= {"quantization": "--quantization", "kv_cache_dtypes": "--kv-cache-dtype"}
    table = Table(
        title="GPU registry (dense peaks; sources in tuner/data/gpus.yaml)", title_justify="left"
    )
    for title in columns.values():
        table.add_column(title, no_wrap=title == "name")
    for row in rows:
        table.add_row(*("-" if row[key] is None else str(row[key]) for key in columns))
    out = Console()
    out.print(table)
    if not detected:
        out.print("No NVIDIA GPU detected on this machine (no NVML / nvidia-smi).")
    for det in detected:
        spec = match_detected(det)
        out.print(
            f"Detected GPU {det.index}: {det.name} ({det.memory_bytes / 2**30:.1f} GiB) -> "
            f"{spec.name if spec else 'not in the registry'}"
        )
    for row in rows:
        if row["probed"]:
            probed = row["probed"]
            out.print(
                f"{row['name']}: probed on {probed['device']} at {probed['measured_at']}; "
                "estimate, search and bench use these figures"
            )
