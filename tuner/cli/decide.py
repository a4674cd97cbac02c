"""``vtune decide``: pick again under another SLO from a finished search's stored curves, and
write the new profile from stored data only (nothing is launched)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from tuner.cli.common import json_flag_option, slo_option


@click.command()
@click.argument("record_path", metavar="RECORD_JSON", type=click.Path(path_type=Path))
@click.option(
    "--slo", required=True, callback=slo_option, help='The new SLO, e.g. "ttft:p95<300ms".'
)
@click.option(
    "--objective",
    type=click.Choice(["throughput", "goodput", "latency"]),
    default=None,
    help="Objective to pick by (default: the search's).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Profiles root for the new profile (default: beside the record, named after the SLO).",
)
@json_flag_option("Print the decision as one JSON object.")
def decide(
    record_path: Path, slo: Any, objective: str | None, out: Path | None, as_json: bool
) -> None:
    """Re-decide the search in RECORD_JSON (the .json beside a profile) under --slo: each
    candidate's stored load points are judged again; candidates whose points do not bracket
    the new SLO are named (they need a relaunch); the best of the rest is written as a
    profile, with a record beside it."""
    from tuner.errors import VtuneError
    from tuner.search.decide import decide as decide_record
    from tuner.search.decide import decided_header, decided_profile, decided_record
    from tuner.search.profile import profile_paths, slug, write_profile
    from tuner.search.record import load_record

    if record_path.suffix == ".yaml":  # the profile: take the record beside it
        record_path = record_path.with_suffix(".json")
    record = load_record(record_path)
    decision = decide_record(record, slo, objective)
    if as_json:
        click.echo(json.dumps(_json(decision), indent=2))
    else:
        _print(decision, record.slo)
    if decision.best is None:
        relaunch = ", ".join(decision.needs_relaunch) or "none"
        raise VtuneError(
            f"no stored point meets {slo}; candidates that need a relaunch: {relaunch}"
        )
    gpu = record.gpu.name or "gpu"
    if out is not None:
        old = record.profile.path if record.profile else None
        model_dir = Path(old).parent.name if old else slug(record.model.name or "model")
        yaml_path = profile_paths(model_dir, gpu, out)[0]
    else:
        yaml_path = record_path.with_name(f"{gpu}.{slug(str(slo))}.yaml")
    if yaml_path.with_suffix(".json").resolve() == record_path.resolve():
        raise VtuneError(f"the decided profile would overwrite {record_path}; give another --out")
    config = decided_profile(record, decision.best)
    data = decided_record(
        record, decision, str(record_path), {"path": str(yaml_path), "config": config}
    )
    header = decided_header(record, decision, str(record_path), yaml_path.name, data["created_at"])
    write_profile(yaml_path, config, header, data)
    if not as_json:
        click.echo(f"Chosen: {decision.best}  ->  {yaml_path}")


def _json(decision: Any) -> dict[str, Any]:
    return {
        "slo": str(decision.slo),
        "objective": decision.objective,
        "best": decision.best,
        "gain": decision.gain,
        "needs_relaunch": decision.needs_relaunch,
        "trials": [t.__dict__ for t in decision.trials],
    }


def _print(decision: Any, old_slo: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    from tuner.search.decide import OK

    unit = {"throughput": "tok/s", "goodput": "req/s", "latency": "ms"}[decision.objective]
    table = Table(title=f"Re-decided under {decision.slo} (searched under {old_slo or 'none'})")
    table.add_column("candidate", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column(f"{decision.objective} {unit}", justify="right")
    table.add_column("req/s", justify="right")
    table.add_column("why")
    for t in decision.trials:
        mark = " *" if t.name == decision.best else ""
        value = "-" if t.value is None else f"{t.value:,.4g}"
        rate = "-" if t.status != OK or t.low is None else f"{t.low:.3g}"
        table.add_row(t.name + mark, t.status, value, rate, t.reason)
    Console().print(table)
    if decision.needs_relaunch:
        click.echo(
            "Stored points do not bracket the new SLO for: "
            + ", ".join(decision.needs_relaunch)
            + " (relaunch the search to measure them)."
        )
    if decision.gain is not None:
        click.echo(f"Gain over vLLM defaults under the new SLO: x{decision.gain:.3g}")
