"""``vtune deploy``: Kubernetes manifests serving a model with a tuned profile."""

from __future__ import annotations

from pathlib import Path

import click

from tuner.cli.common import positive_int


@click.command()
@click.argument("profile", type=click.Path(path_type=Path))
@click.option("--name", help="Object name (default: vllm-<model>).")
@click.option(
    "--image",
    help="vLLM image (default: the official image of the vLLM version "
    "the profile was tuned with, from the record beside it).",
)
@click.option("--namespace", help="Kubernetes namespace (default: the kubectl context's).")
@click.option("--port", type=int, default=8000, show_default=True, callback=positive_int)
@click.option("--replicas", type=int, default=1, show_default=True)
@click.option("--gpus", type=int, help="GPUs per pod (default: tensor x pipeline parallel size).")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write DIR/<name>.yaml instead of printing.",
)
def deploy(
    profile: Path,
    name: str | None,
    image: str | None,
    namespace: str | None,
    port: int,
    replicas: int,
    gpus: int | None,
    out: Path | None,
) -> None:
    """Render a ConfigMap (the PROFILE YAML as it is), a Deployment running
    `vllm serve --config` with it, and a Service. Apply with `kubectl apply -f`."""
    from tuner.errors import ParameterError
    from tuner.files import atomic_write_text
    from tuner.outputs.k8s import (
        ServingSpec,
        default_name,
        dump_manifests,
        image_for_version,
        parse_profile,
        render_serving,
    )
    from tuner.search.record import load_record

    if profile.suffix == ".json":  # the record: take the profile YAML beside it
        profile = profile.with_suffix(".yaml")
    try:
        text = profile.read_text()
    except OSError as exc:
        raise ParameterError(f"cannot read {profile}: {exc.strerror or exc}") from None
    config = parse_profile(text)
    if image is None:  # the vLLM the profile was tuned with, from the record beside it
        record = profile.with_suffix(".json")
        version = load_record(record).vllm_version if record.is_file() else None
        image = image_for_version(version)
    spec = ServingSpec(
        name=name or default_name(config),
        image=image,
        namespace=namespace,
        port=port,
        replicas=replicas,
        gpus=gpus,
    )
    manifests = dump_manifests(
        render_serving(text, spec),
        header=f"Rendered by `vtune deploy {profile.name}`: serves {config['model']} with "
        "its tuned profile.\nApply with: kubectl apply -f <this file>",
    )
    if out is None:
        click.echo(manifests, nl=False)
        return
    path = out / f"{spec.name}.yaml"
    atomic_write_text(path, manifests)
    click.echo(str(path))
