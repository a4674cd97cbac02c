"""``vtune worker``: join a study that ``vtune search --storage URL`` started, from any machine
that reaches the storage, and measure its candidates beside the other workers.

The study carries the search's configuration (:mod:`tuner.search.study_config`); this machine
gives only what is its own: the storage URL, ``--out``, the vLLM Python, and any secret setting
the search had. The workers share the candidates (each measured once), each ends with the whole
study, and one of them writes the profile (:mod:`tuner.search.lease`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from tuner.cli.common import engine_arg_option


@click.command()
@click.option(
    "--storage",
    required=True,
    help="The study's storage URL, e.g. postgresql://USER:PASSWORD@HOST:5432/DB.",
)
@click.option(
    "--study",
    "study_name",
    required=True,
    help="The study to join (vtune search prints its name).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Profiles root on this machine (default ./profiles).",
)
@click.option("--vllm-python", default=None, help="Python that has vLLM (default: this one).")
@engine_arg_option(
    "A secret setting the study's search was given, e.g. api_key=... (never stored in a study)."
)
def worker(**o: Any) -> None:
    """Join a study another machine started and measure its candidates with the others."""
    from tuner.cli.console import print_search_result
    from tuner.cli.progress import SearchProgress
    from tuner.cli.search import RESUME_HINT
    from tuner.errors import Interrupted
    from tuner.search.outcome import ensure_feasible
    from tuner.search.prepare import check_storage
    from tuner.search.run import run_search
    from tuner.search.study_config import prepare_worker

    prep = prepare_worker(
        o["storage"],
        o["study_name"],
        out=o["out"],
        python=o["vllm_python"],
        secrets=o["engine_args"],
    )
    for line in prep.warnings:
        click.echo(f"vtune: warning: {line}", err=True)
    click.echo(
        f"worker on study {prep.study_name}: {len(prep.plan.all())} candidates, "
        f"profile {prep.yaml_path}"
    )
    check_storage(prep)  # takes the --out lock
    try:
        with SearchProgress() as progress:
            outcome = run_search(prep, progress)
    except Interrupted as stop:
        stop.hint = RESUME_HINT
        raise
    print_search_result(outcome)
    ensure_feasible(outcome)
