"""The ``vtune`` command line: click commands that parse, call one function and print.

Each command lives in its own module; this one builds the group and maps every
:class:`~tuner.errors.VtuneError` to one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys

import click

from tuner.cli.common import VtuneGroup, fail
from tuner.engine import interrupt
from tuner.errors import Interrupted, VtuneError
from tuner.search.lease import ProfileElsewhere

COMMANDS = {
    "estimate": "tuner.cli.estimate:estimate",
    "gpus": "tuner.cli.gpus:gpus",
    "bench": "tuner.cli.bench:bench",
    "search": "tuner.cli.search:search",
    "quantize": "tuner.cli.quantize:quantize",
    "report": "tuner.cli.report:report",
    "deploy": "tuner.cli.deploy:deploy",
    "tiny-model": "tuner.cli.tiny:tiny_model",
    "probe": "tuner.cli.probe:probe",
    "workload": "tuner.cli.workload:workload",
    "decide": "tuner.cli.decide:decide",
    "plan": "tuner.cli.plan:plan",
    "worker": "tuner.cli.worker:worker",
}


@click.group(
    cls=VtuneGroup, lazy_commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.version_option(package_name="vtune", prog_name="vtune")
def cli() -> None:
    """vtune: tune vLLM serving settings — estimate, prune, measure, write a profile."""


def main(argv: list[str] | None = None) -> None:
    """Console entry point; exit code 2 for every user error, never a traceback for one.

    click's own usage errors are reduced to one line too (click prints three by default).
    A stop request (SIGTERM; SIGINT unless it was ignored when vtune started) stops every vLLM
    vtune started, then ends the command with one line and exit code 128 + the signal's number
    (143, 130), also as PID 1 in a container (:mod:`tuner.engine.interrupt`).
    """
    interrupt.install()
    try:
        cli.main(args=argv, prog_name="vtune", standalone_mode=False)
    except Interrupted as stop:
        click.echo(f"vtune: {stop}{'; ' + stop.hint if stop.hint else ''}", err=True)
        sys.exit(128 + stop.signum)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except ProfileElsewhere as done:  # a worker of a shared study that does not write: no error
        click.echo(f"vtune: {done}", err=True)
        sys.exit(0)
    except click.Abort:
        click.echo("vtune: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        fail(exc.format_message().replace("\n", " "))
    except VtuneError as exc:
        fail(str(exc))
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
