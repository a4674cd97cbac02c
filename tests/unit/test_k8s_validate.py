"""Every Kubernetes manifest vtune ships or renders passes the API's JSON schema (strict: an
unknown or misspelt field fails), and the many-worker tuning Job is what issue 14 asks for:
an Indexed Job of N pods on one study, one GPU each, the storage URL only from a Secret."""

from __future__ import annotations

import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from tuner.cli import cli, main
from tuner.cli.search import search
from tuner.outputs.k8s import dump_manifests
from tuner.outputs.k8s_tuning import (
    POSTGRES_NAME,
    TuningSpec,
    render_tuning,
    tuning_header,
)

# The Kubernetes release the manifests are checked against: the first in which both Job
# features the tuning Job relies on are GA (podFailurePolicy 1.31, backoffLimitPerIndex 1.33).
# kubernetes-validate (pinned in the test extra) ships schemas for 1.33 and later.
K8S_VERSION = "1.33"

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
TUNE = ["deploy", "--tuning-job", "--model", MODEL, "--gpu", "h100", "--slo", "ttft:p95<500ms"]
CANARY = "s3cr3t-canary-7f2a"


def valid(doc: dict) -> None:
    """Fails the test with the schema's own message (kind, name, where, what)."""
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.path)
        pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {where}: {exc.message}")


def docs_of(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def render(*args: str, env: dict[str, str] | None = None) -> tuple[str, list[dict]]:
    result = CliRunner().invoke(cli, [*TUNE, *args], env=env)
    assert result.exit_code == 0, result.output
    return result.stdout, docs_of(result.stdout)


def kinds(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


def pod_of(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def vtune_container(job: dict) -> dict:
    [container] = pod_of(job)["containers"]
    return container


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


def one_line_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("vtune: error: "), err
    return err


# --- everything in deploy/ ---------------------------------------------------------------------


def test_every_manifest_in_deploy_is_valid_kubernetes():
    checked = []
    for path in sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]):
        for doc in docs_of(path.read_text()):
            if "k8s" in path.parts:  # everything there is a manifest; elsewhere only those that
                assert "kind" in doc and "apiVersion" in doc, path  # say so (not prometheus.yml)
            if isinstance(doc, dict) and "kind" in doc and "apiVersion" in doc:
                valid(doc)
                checked.append((path.name, doc["kind"]))
    assert ("tuning-workers.yaml", "Job") in checked and ("serving.yaml", "Deployment") in checked
    assert len(checked) >= 12, checked


def test_the_validator_rejects_a_misspelt_field():
    """Strict mode bites: otherwise the tests above would prove nothing."""
    job = kinds(docs_of((DEPLOY / "k8s" / "tuning-workers.yaml").read_text()))["Job"]
    job["spec"]["completionsMode"] = job["spec"].pop("completionMode")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


def test_example_tuning_manifest_is_what_vtune_deploy_renders():
    text = (DEPLOY / "k8s" / "tuning-workers.yaml").read_text()
    job = kinds(docs_of(text))["Job"]
    container = vtune_container(job)
    args = container["args"]
    spec = TuningSpec(
        name=job["metadata"]["name"],
        image=container["image"],
        search_args=tuple(args[1 : args.index("--storage")]),
        workers=job["spec"]["completions"],
    )
    assert dump_manifests(render_tuning(spec), header=tuning_header(spec)) == text


def test_example_job_runs_a_search_that_vtune_search_accepts():
    job = kinds(docs_of((DEPLOY / "k8s" / "tuning-workers.yaml").read_text()))["Job"]
    args = vtune_container(job)["args"]
    assert args[0] == "search"
    expanded = [
        a.replace("$(VTUNE_STORAGE)", "postgresql+psycopg://u@h/db").replace(
            "$(JOB_COMPLETION_INDEX)", "0"
        )
        for a in args[1:]
    ]
    ctx = search.make_context("search", expanded)
    assert ctx.params["storage"] == "postgresql+psycopg://u@h/db"
    assert str(ctx.params["out"]) == "/results/worker-0"
    assert ctx.params["metrics_port"] == 9400 and ctx.params["metrics_host"] == "0.0.0.0"


def test_the_placeholder_secret_matches_what_the_manifests_read():
    [secret] = docs_of((DEPLOY / "k8s" / "storage-secret.yaml").read_text())
    docs = kinds(docs_of((DEPLOY / "k8s" / "tuning-workers.yaml").read_text()))
    url_ref = env_of(vtune_container(docs["Job"]))["VTUNE_STORAGE"]["valueFrom"]["secretKeyRef"]
    pg = docs["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]
    pw_ref = env_of(pg)["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert secret["metadata"]["name"] == url_ref["name"] == pw_ref["name"]
    assert {url_ref["key"], pw_ref["key"]} == set(secret["stringData"])
    assert all("REPLACE-ME" in v for v in secret["stringData"].values())  # placeholders only
    assert f"@{POSTGRES_NAME}:5432/" in secret["stringData"]["url"]
    assert docs["Service"]["metadata"]["name"] == POSTGRES_NAME
    assert "kubectl create secret generic" in (DEPLOY / "k8s" / "storage-secret.yaml").read_text()


# --- what `vtune deploy` renders ---------------------------------------------------------------


def test_rendered_serving_deployment_is_valid(tmp_path):
    profile = tmp_path / "h100.yaml"
    profile.write_text(f"model: {MODEL}\nmax-num-seqs: 64\n")
    for extra in ([], ["--gpus", "0", "--namespace", "prod", "--replicas", "3"]):
        result = CliRunner().invoke(cli, ["deploy", str(profile), *extra])
        assert result.exit_code == 0, result.output
        docs = docs_of(result.stdout)
        assert [d["kind"] for d in docs] == ["ConfigMap", "Deployment", "Service"]
        for doc in docs:
            valid(doc)


@pytest.mark.parametrize("workers", [1, 4])
def test_rendered_tuning_job_is_an_indexed_job_of_n_gpu_pods(workers):
    _, docs = render("--workers", str(workers))
    for doc in docs:
        valid(doc)
    by = kinds(docs)
    assert list(by) == ["Service", "StatefulSet", "PersistentVolumeClaim", "Job"]
    job = by["Job"]["spec"]
    assert job["completionMode"] == "Indexed"
    assert job["parallelism"] == job["completions"] == workers
    assert job["backoffLimitPerIndex"] >= 1
    rules = job["podFailurePolicy"]["rules"]
    ignore = {"type": "DisruptionTarget", "status": "True"}
    assert {"action": "Ignore", "onPodConditions": [ignore]} in rules
    [fail_index] = [r for r in rules if r["action"] == "FailIndex"]
    assert fail_index["onExitCodes"] == {"containerName": "vtune", "operator": "In", "values": [2]}
    pod = pod_of(by["Job"])
    assert pod["restartPolicy"] == "Never"  # required by backoffLimitPerIndex/podFailurePolicy
    container = vtune_container(by["Job"])
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory"}
    claim = volumes[mounts["/results"]]["persistentVolumeClaim"]["claimName"]
    assert claim == by["PersistentVolumeClaim"]["metadata"]["name"]
    args = container["args"]
    assert args[:5] == ["search", "--model", MODEL, "--gpu", "h100"]
    assert args[args.index("--storage") + 1] == "$(VTUNE_STORAGE)"
    assert args[args.index("--out") + 1] == "/results/worker-$(JOB_COMPLETION_INDEX)"
    env = env_of(container)
    index = env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert "batch.kubernetes.io/job-completion-index" in index
    # the workers wait for the database before the first trial
    [wait] = pod["initContainers"]
    assert POSTGRES_NAME in wait["command"][-1] and "pg_isready" in wait["command"][-1]


def test_the_storage_url_comes_only_from_a_secret():
    _, docs = render("--workers", "2", "--storage-secret", "my-db")
    by = kinds(docs)
    env = env_of(vtune_container(by["Job"]))
    assert env["VTUNE_STORAGE"] == {
        "name": "VTUNE_STORAGE",
        "valueFrom": {"secretKeyRef": {"name": "my-db", "key": "url"}},
    }
    assert "value" not in env["VTUNE_STORAGE"]
    pg = by["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]
    assert env_of(pg)["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "my-db"
    assert "Secret" not in {d["kind"] for d in docs}  # applying must not overwrite the user's


def test_a_headless_postgres_statefulset_keeps_the_study():
    _, docs = render()
    by = kinds(docs)
    service, sts = by["Service"], by["StatefulSet"]["spec"]
    assert service["spec"]["clusterIP"] == "None"
    assert sts["serviceName"] == service["metadata"]["name"] == POSTGRES_NAME
    assert sts["selector"]["matchLabels"].items() <= service["spec"]["selector"].items()
    [claim] = sts["volumeClaimTemplates"]
    [pg] = sts["template"]["spec"]["containers"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/var/lib/postgresql/data"} in pg[
        "volumeMounts"
    ]


def test_an_external_database_renders_no_postgres():
    text, docs = render("--postgres", "external", "--workers", "3", "--namespace", "tune")
    for doc in docs:
        valid(doc)
        assert doc["metadata"]["namespace"] == "tune"
    assert [d["kind"] for d in docs] == ["PersistentVolumeClaim", "Job"]
    assert "initContainers" not in pod_of(docs[-1])
    assert "secretKeyRef" in env_of(vtune_container(docs[-1]))["VTUNE_STORAGE"]["valueFrom"]
    assert "--postgres external" not in text and "USER:PASSWORD@HOST" in text  # the hint


def test_no_password_reaches_the_rendered_output(tmp_path):
    """Neither the environment of the machine that renders nor a URL in the arguments."""
    url = f"postgresql+psycopg://vtune:{CANARY}@db:5432/vtune"
    env = {"VTUNE_STORAGE": url, "POSTGRES_PASSWORD": CANARY, "HF_TOKEN": CANARY}
    text, _ = render("--workers", "4", env=env)
    assert CANARY not in text
    result = CliRunner().invoke(cli, [*TUNE, "--out", str(tmp_path)], env=env)
    assert result.exit_code == 0, result.output
    written = Path(result.stdout.strip())
    assert written.parent == tmp_path and CANARY not in written.read_text()


def test_secrets_in_search_args_are_refused_without_echo(capsys):
    for extra in (
        f"--storage postgresql+psycopg://vtune:{CANARY}@db/vtune",
        f"--engine-arg api_key={CANARY}",
        f"--engine-arg=hf_token={CANARY}",
    ):
        err = one_line_error([*TUNE, "--search-args", extra], capsys)
        assert CANARY not in err and "--search-args must not" in err, err


@pytest.mark.parametrize("workers", ["0", "-2"])
def test_bad_worker_count_is_one_line(workers, capsys):
    err = one_line_error([*TUNE, "--workers", workers], capsys)
    assert f"--workers must be at least 1, got {workers}" in err


def test_search_args_are_checked_as_vtune_search_checks_them(capsys):
    for extra, needle in (
        ("--bogus 1", "No such option"),
        ("--budget many", "--budget"),
        ("--out /tmp/x", "each worker writes under"),
        ("--dry-run", "--dry-run"),
        ("--model other/model", "give --model to vtune deploy"),
        ("--slo 'ttft<1s", "cannot be split"),
        ("--slo 'nope<1s'", "--slo"),
    ):
        err = one_line_error([*TUNE, "--search-args", extra], capsys)
        assert needle in err, (extra, err)
    # a trace file is read by the pod, not here; the rest passes through in order
    _, docs = render("--search-args", "--dataset trace:/in/pod.jsonl --budget 40 --pareto")
    args = vtune_container(kinds(docs)["Job"])["args"]
    i = args.index("--dataset")
    assert args[i : i + 5] == ["--dataset", "trace:/in/pod.jsonl", "--budget", "40", "--pareto"]


def test_serving_and_tuning_options_do_not_mix(tmp_path, capsys):
    profile = tmp_path / "p.yaml"
    profile.write_text("model: m\n")
    for argv, needle in (
        ([*TUNE, str(profile)], "drop PROFILE"),
        ([*TUNE, "--replicas", "2"], "--replicas only apply to a serving"),
        (["deploy", str(profile), "--workers", "4"], "--workers only apply with --tuning-job"),
        (["deploy"], "missing PROFILE"),
        (["deploy", "--tuning-job", "--model", MODEL], "needs --model"),
        ([*TUNE, "--name", "Bad_Name"], "Kubernetes name"),
    ):
        assert needle in one_line_error(argv, capsys), argv


def test_the_readme_command_renders_the_example_manifest():
    """README's "Tuning on a cluster" says deploy/k8s/tuning-workers.yaml is its output."""
    readme = (ROOT / "README.md").read_text()
    [line] = [s for s in readme.splitlines() if s.startswith("vtune deploy --tuning-job")]
    argv = shlex.split(line.split(" > ")[0])
    assert argv[:2] == ["vtune", "deploy"]
    result = CliRunner().invoke(cli, argv[1:])
    assert result.exit_code == 0, result.output
    assert result.stdout == (DEPLOY / "k8s" / "tuning-workers.yaml").read_text()
    assert "kubectl create secret generic vtune-storage" in readme
    assert (
        "kubectl apply -f tuning.yaml" in readme
        and 'optuna-dashboard "postgresql+psycopg://' in readme
    )
