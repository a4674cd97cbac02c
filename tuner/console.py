"""Console (rich) rendering of results. Printing only: no computation beyond unit formatting."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from tuner.estimate import Estimate

GiB = 2**30


def _size(value: int) -> str:
    return f"{value / GiB:,.2f} GiB  ({value:,} B)"


def print_estimate(est: Estimate, *, explain: bool = False, console: Console | None = None) -> None:
    """Print the estimate as two tables (memory and capacity; roofline ladder)."""
    out = console or Console()
    table = Table(
        title=f"{est.model} on {est.gpu} (quantization {est.quantization}, "
        f"KV {est.kv_cache_dtype}, TP {est.tensor_parallel_size})",
        show_header=False,
        title_justify="left",
    )
    table.add_column("quantity", style="bold")
    table.add_column("value", justify="right")
    rows = [
        (
            "parameters (total / active)",
            f"{est.param_count / 1e9:,.2f} B / {est.active_param_count / 1e9:,.2f} B",
        ),
        ("weights", _size(est.weight_bytes)),
        ("KV per token", f"{est.kv_bytes_per_token:,} B"),
        (f"KV per sequence (S = {est.context_len:,})", _size(est.kv_bytes_per_sequence)),
        ("naive max batch (whole card, no overhead)", f"{est.naive_max_batch:,}"),
        ("GPU memory", _size(est.gpu_memory_bytes)),
        ("activations (profiled peak)", _size(est.activation_bytes)),
        ("non-torch + CUDA graphs", _size(est.non_torch_bytes)),
        ("vLLM KV pool", _size(est.kv_pool_bytes)),
        (
            f"KV capacity (block {est.block_size})",
            f"{est.kv_capacity_tokens:,} tokens ({est.num_gpu_blocks:,} blocks)",
        ),
        (f"max concurrency at S = {est.context_len:,}", f"{est.max_concurrency:,.2f}"),
        ("roofline knee batch (weights only)", _knee(est.roofline_knee_batch)),
        ("roofline knee batch (with KV reads at S)", _knee(est.roofline_knee_batch_with_kv)),
        (
            "max_num_seqs / max_num_batched_tokens",
            f"{est.max_num_seqs:,} / {est.max_num_batched_tokens:,}",
        ),
    ]
    for name, value in rows:
        table.add_row(name, value)
    out.print(table)
    if est.kv_pool_bytes <= 0:
        out.print("[bold red]The weights do not leave room for a KV cache on this GPU.[/]")

    ladder = Table(title="Predicted decode (context S)", title_justify="left")
    for col in ("batch", "step ms", "tokens/s", "bound", "fits KV"):
        ladder.add_column(col, justify="right")
    for p in est.ladder:
        ladder.add_row(
            str(p.batch),
            f"{p.step_time_s * 1e3:.2f}",
            f"{p.tokens_per_s:,.0f}",
            p.bound,
            "yes" if p.fits_kv else "[red]no[/]",
        )
    out.print(ladder)
    if explain:
        out.print("[bold]How each figure is computed[/]")
        for line in est.explain:
            out.print(
                f"  {line.label} = {line.formula}\n      = {line.values} = {line.result}",
                highlight=False,
            )


def _knee(value: float | None) -> str:
    return "none (memory-bound at every batch)" if value is None else f"{value:,.1f}"
