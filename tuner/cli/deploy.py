"""``vtune deploy``: Kubernetes manifests serving a model with a tuned profile."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    "--model",
    "model",
    metavar="NAME",
    help="The model the pods serve, in place of the profile's (e.g. the Hugging Face id of a "
    "model tuned from a local directory).",
)
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
    model: str | None,
    out: Path | None,
) -> None:
    """Render a ConfigMap (the PROFILE YAML as it is, or with --model's model), a Deployment
    running `vllm serve --config` with it, and a Service. Apply with `kubectl apply -f`.
    Warns (one line each, on stderr) when the profile was measured on another kind of device
    than the Deployment targets, and when its model is a path on the tuning machine."""
    from tuner.errors import ParameterError
    from tuner.files import atomic_write_text
    from tuner.outputs.k8s import (
        ServingSpec,
        default_name,
        device_warnings,
        dump_manifests,
        gpus_for,
        image_for_version,
        is_local_path,
        measured_on,
        parse_profile,
        render_serving,
        with_model,
    )

    if profile.suffix == ".json":  # the record: take the profile YAML beside it
        profile = profile.with_suffix(".yaml")
    try:
        text = profile.read_text()
    except OSError as exc:
        raise ParameterError(f"cannot read {profile}: {exc.strerror or exc}") from None
    config = parse_profile(text)
    record = _record(profile, strict=image is None)
    warnings = []
    if model is not None:
        text = with_model(text, model)
        config = parse_profile(text)
    elif is_local_path(str(config["model"])):
        warnings.append(
            f"the profile's model is {config['model']}, a path on the tuning machine that the "
            "cluster cannot see; pass --model NAME (a Hugging Face id, or a path inside the pod)"
        )
    if image is None:  # the vLLM the profile was tuned with, from the record beside it
        image = image_for_version(None if record is None else record.vllm_version)
    spec = ServingSpec(
        name=name or default_name(config),
        image=image,
        namespace=namespace,
        port=port,
        replicas=replicas,
        gpus=gpus,
    )
    measured = (record.gpu.name if record is not None else None) or measured_on(text)
    warnings += device_warnings(measured, gpus if gpus is not None else gpus_for(config), image)
    for line in warnings:
        click.echo(f"vtune: warning: {line}", err=True)
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


def _record(profile: Path, *, strict: bool) -> Any:
    """The search record beside the profile, or None. A malformed one is an error when the
    image is read from it (``strict``); else the profile's header says where it was measured."""
    from tuner.errors import ParameterError
    from tuner.search.record import load_record

    path = profile.with_suffix(".json")
    if not path.is_file():
        return None
    try:
        return load_record(path)
    except ParameterError:
        if strict:
            raise
        return None
