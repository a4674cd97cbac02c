"""``vtune deploy``: Kubernetes manifests serving a model with a tuned profile, or (with
``--tuning-job``) tuning one study with many workers."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from tuner.cli.common import positive_int

# Options of each mode: given in the other, they are a mistake (one line, exit 2).
SERVING_ONLY = ("port", "replicas")
TUNING_ONLY = ("workers", "gpu", "slo", "search_args", "postgres", "storage_secret")
# `vtune search` options the tuning Job sets itself, or that `vtune deploy` takes directly.
SET_BY_JOB = {
    "model": "give --model to vtune deploy",
    "gpu_name": "give --gpu to vtune deploy",
    "slo": "give --slo to vtune deploy",
    "storage": "the Job reads the storage URL from the Secret (--storage-secret)",
    "out": "each worker writes under /results/worker-<index>",
    "metrics_port": "the Job serves metrics on port 9400",
    "metrics_host": "the Job serves metrics on port 9400",
    "dry_run": "the Job runs the search; try --dry-run with vtune search here",
    "show_all": "the Job runs the search; try --all with vtune search --dry-run here",
    "as_json": "the Job runs the search; try --json with vtune search --dry-run here",
}
# Read by `vtune search` in the pod: a trace file here need not exist on this machine.
POD_FILE_OPTIONS = ("--dataset",)


@click.command()
@click.argument("profile", type=click.Path(path_type=Path), required=False)
@click.option("--name", help="Object name (default: vllm-<model>, or vtune-<model> for a Job).")
@click.option(
    "--image",
    help="vLLM image (default: the official image of the vLLM version "
    "the profile was tuned with, from the record beside it); with --tuning-job the vtune image "
    "built from deploy/Dockerfile (default: vtune:<this version>).",
)
@click.option("--namespace", help="Kubernetes namespace (default: the kubectl context's).")
@click.option("--port", type=int, default=8000, show_default=True, callback=positive_int)
@click.option("--replicas", type=int, default=1, show_default=True)
@click.option(
    "--gpus",
    type=int,
    help="GPUs per pod (default: tensor x pipeline parallel size; 1 with --tuning-job).",
)
@click.option(
    "--model",
    "model",
    metavar="NAME",
    help="The model the pods serve, in place of the profile's (e.g. the Hugging Face id of a "
    "model tuned from a local directory); with --tuning-job, the model to tune.",
)
@click.option(
    "--tuning-job",
    is_flag=True,
    help="Render an Indexed Job of --workers pods tuning one study on PostgreSQL instead.",
)
@click.option(
    "--workers", type=int, default=1, show_default=True, help="Tuning pods (one GPU each)."
)
@click.option("--gpu", help="With --tuning-job: the cluster's GPU, as for vtune search --gpu.")
@click.option("--slo", help='With --tuning-job: the SLO, e.g. "ttft:p95<500ms;tpot:p95<50ms".')
@click.option(
    "--search-args",
    default="",
    metavar="ARGS",
    help='With --tuning-job: more vtune search options, e.g. "--budget 40 --param '
    'max_num_seqs=64,256" (checked here as vtune search checks them).',
)
@click.option(
    "--postgres",
    type=click.Choice(["statefulset", "external"]),
    default="statefulset",
    show_default=True,
    help="With --tuning-job: run PostgreSQL in the cluster, or use the database the Secret's "
    "URL names.",
)
@click.option(
    "--storage-secret",
    default="vtune-storage",
    show_default=True,
    help="With --tuning-job: the Secret holding the storage URL (key url) and, for the "
    "StatefulSet, its password (key password).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write DIR/<name>.yaml instead of printing.",
)
@click.pass_context
def deploy(ctx: click.Context, profile: Path | None, **o: Any) -> None:
    """Render a ConfigMap (the PROFILE YAML as it is, or with --model's model), a Deployment
    running `vllm serve --config` with it, and a Service. Apply with `kubectl apply -f`.
    Warns (one line each, on stderr) when the profile was measured on another kind of device
    than the Deployment targets, and when its model is a path on the tuning machine.

    With --tuning-job (no PROFILE): an Indexed Job of --workers pods, each running the same
    `vtune search --model M --gpu G ...` on one shared study (a PostgreSQL StatefulSet, or an
    external database), the storage URL from a Secret."""
    from tuner.errors import ParameterError

    def given(names: tuple[str, ...]) -> list[str]:
        return [
            "--" + n.replace("_", "-")
            for n in names
            if ctx.get_parameter_source(n) is ParameterSource.COMMANDLINE
        ]

    if o["tuning_job"]:
        if profile is not None:
            raise ParameterError("--tuning-job renders a search, not a profile: drop PROFILE")
        if wrong := given(SERVING_ONLY):
            raise ParameterError(f"{', '.join(wrong)} only apply to a serving Deployment")
        name, manifests = _tuning(o)
    else:
        if wrong := given(TUNING_ONLY):
            raise ParameterError(f"{', '.join(wrong)} only apply with --tuning-job")
        if profile is None:
            raise ParameterError("missing PROFILE (a profile YAML or its record), or --tuning-job")
        name, manifests = _serving(profile, o)
    _emit(manifests, o["out"], name)


def _emit(manifests: str, out: Path | None, name: str) -> None:
    """Print the manifests, or write DIR/<name>.yaml and print its path."""
    from tuner.files import atomic_write_text

    if out is None:
        click.echo(manifests, nl=False)
        return
    path = out / f"{name}.yaml"
    atomic_write_text(path, manifests)
    click.echo(str(path))


def _serving(profile: Path, o: dict[str, Any]) -> tuple[str, str]:
    """The serving Deployment's object name and manifests; warnings on stderr."""
    from tuner.errors import ParameterError
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

    image, model, gpus = o["image"], o["model"], o["gpus"]
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
        name=o["name"] or default_name(config),
        image=image,
        namespace=o["namespace"],
        port=o["port"],
        replicas=o["replicas"],
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
    return spec.name, manifests


def _tuning(o: dict[str, Any]) -> tuple[str, str]:
    """The tuning Job's object name and manifests (its storage, results volume and Job)."""
    from tuner.errors import ParameterError
    from tuner.outputs.k8s import dump_manifests
    from tuner.outputs.k8s_tuning import TuningSpec, render_tuning, tuning_header, tuning_name

    model, gpu = o["model"], o["gpu"]
    if not model or not gpu:
        raise ParameterError("--tuning-job needs --model (the model to tune) and --gpu")
    argv = ["--model", model, "--gpu", gpu, *(["--slo", o["slo"]] if o["slo"] else [])]
    spec = TuningSpec(
        name=o["name"] or tuning_name(model),
        image=o["image"] or _vtune_image(),
        search_args=(*argv, *search_args(o["search_args"], argv)),
        workers=o["workers"],
        namespace=o["namespace"],
        postgres=o["postgres"],
        storage_secret=o["storage_secret"],
        gpus=1 if o["gpus"] is None else o["gpus"],
    )
    return spec.name, dump_manifests(render_tuning(spec), header=tuning_header(spec))


def search_args(text: str, fixed: list[str]) -> list[str]:
    """``--search-args`` as argv, checked as ``vtune search`` checks its options (after
    ``fixed``); ParameterError when it cannot be split, names an unknown option or a bad
    value, sets what the Job sets itself or carries a secret (``--engine-arg api_key=...``:
    the manifest would hold it). A secret's value is never echoed."""
    from tuner.cli.search import search
    from tuner.engine.settings import is_secret
    from tuner.errors import ParameterError

    try:
        extra = shlex.split(text)
    except ValueError as exc:
        raise ParameterError(f"--search-args cannot be split: {exc}") from None
    own = search.make_context("search", _without(extra, POD_FILE_OPTIONS), resilient_parsing=True)
    for name, why in SET_BY_JOB.items():
        if own.get_parameter_source(name) is ParameterSource.COMMANDLINE:
            flag = next(p.opts[0] for p in search.params if p.name == name)
            raise ParameterError(f"--search-args must not set {flag}: {why}")
    try:
        full = search.make_context("search", _without([*fixed, *extra], POD_FILE_OPTIONS))
    except click.ClickException as exc:
        raise ParameterError(f"--search-args: {exc.format_message()}") from None
    secret = [key for key in full.params["engine_args"] if is_secret(key)]
    if secret:  # a manifest is read by everyone with access to the namespace
        raise ParameterError(
            f"--search-args must not carry a secret (--engine-arg {secret[0]}): the pods read "
            "HF_TOKEN from the hf-token Secret"
        )
    return extra


def _without(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """``argv`` less each of ``flags`` and its value (``--flag V`` or ``--flag=V``)."""
    from tuner.search.fleet import drop_options

    return drop_options(argv, flags)


def _vtune_image() -> str:
    """``vtune:<installed version>``, the tag deploy/Dockerfile's build line gives."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"vtune:{version('vtune')}"
    except PackageNotFoundError:
        return "vtune:0.1.0"


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
