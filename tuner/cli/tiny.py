"""``vtune tiny-model``: build the tiny random-weight Llama the demo and the tests serve."""

from __future__ import annotations

from pathlib import Path

import click

from tuner.cli.common import seed_option


@click.command("tiny-model")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Directory (default: $VTUNE_TINY_MODEL_DIR or ./.vtune/models/tiny-llama).",
)
@seed_option()
def tiny_model(out_dir: Path | None, seed: int) -> None:
    """Write a random-weight Llama (GQA, head_dim 64) with a tokenizer trained on the spot.

    Nothing is downloaded; an existing complete model with the same parameters is reused."""
    from tuner.tiny import build_tiny_model, default_tiny_model_dir

    path = build_tiny_model(out_dir or default_tiny_model_dir(), seed=seed)
    click.echo(str(path))
