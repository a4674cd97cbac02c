"""Kubernetes manifests for one study tuned by many workers (pure: a spec in, documents out).

:func:`render_tuning` gives an Indexed Job of N pods (``completionMode: Indexed``,
``completions == parallelism == N``), one GPU each, that all run the same ``vtune search`` on a
shared Optuna storage, plus what the storage needs: by default a PostgreSQL StatefulSet behind
a headless Service (``--postgres statefulset``), or nothing when the database is elsewhere
(``--postgres external``). Either way the storage URL reaches the pods only through a Secret
(``secretKeyRef``) that the user creates; no document holds a password.

Why every pod runs ``vtune search`` rather than index 0 creating the study and the others
running ``vtune worker --study NAME``: the study's name is a hash of the search's settings,
known only once a search has prepared them (model config, space, workload), and a search on an
existing study joins it (:mod:`tuner.search.workers`), so no pod has to go first and any pod can
be retried alone. Each worker has its own ``--out`` (``/results/worker-<index>``): an ``--out``
directory is locked by one search at a time; the one worker holding the study's lease
(:mod:`tuner.search.lease`) writes the profile there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tuner.errors import ParameterError
from tuner.outputs.k8s import check_name

POSTGRES_NAME = "vtune-postgres"  # StatefulSet, headless Service and the URL's host
POSTGRES_IMAGE = "postgres:17"  # 18 moved PGDATA; the data path below is 17's
POSTGRES_USER = "vtune"
POSTGRES_DB = "vtune"
STORAGE_SECRET = "vtune-storage"  # keys: url (the workers), password (the StatefulSet)
STORAGE_ENV = "VTUNE_STORAGE"
RESULTS_DIR = "/results"
METRICS_PORT = 9400
POSTGRES_MODES = ("statefulset", "external")
# The pod's index as the Job controller itself sets it, declared here so that `$(...)` in the
# args expands to it whatever the controller's order of variables (it skips a declared one).
INDEX_ENV = "JOB_COMPLETION_INDEX"
INDEX_ANNOTATION = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
# Retries per index (each resumes the study); a user error (exit 2) fails the index at once.
BACKOFF_LIMIT_PER_INDEX = 3
USER_ERROR_EXIT = 2


@dataclass(frozen=True)
class TuningSpec:
    """The tuning Job: object name, workers (pods, one per index), the ``vtune search``
    arguments every worker runs (without ``--storage``/``--out``, which the Job sets), the vtune
    image (deploy/Dockerfile), namespace (None: the kubectl context's), where PostgreSQL runs
    (``statefulset`` or ``external``), the Secret with the storage URL under key ``url`` (and,
    for the StatefulSet, its password under key ``password``), GPUs per pod and the optional
    Secret holding ``HF_TOKEN`` under key ``token``."""

    name: str
    image: str
    search_args: tuple[str, ...]
    workers: int = 1
    namespace: str | None = None
    postgres: str = "statefulset"
    storage_secret: str = STORAGE_SECRET
    gpus: int = 1
    hf_token_secret: str = "hf-token"

    def __post_init__(self) -> None:
        check_name(self.name)
        check_name(self.storage_secret, "the storage Secret's name")
        if self.namespace is not None:
            check_name(self.namespace, "namespace")
        if self.workers < 1:
            raise ParameterError(f"--workers must be at least 1, got {self.workers}")
        if self.postgres not in POSTGRES_MODES:
            raise ParameterError(
                f"--postgres must be one of {', '.join(POSTGRES_MODES)}, got {self.postgres!r}"
            )
        if self.gpus < 0:
            raise ParameterError(f"gpus must be >= 0, got {self.gpus}")
        if not self.image.strip():
            raise ParameterError("the image must not be empty")


def tuning_name(model: str) -> str:
    """A Job name from the model: ``meta-llama/Llama-3.1-8B`` -> ``vtune-llama-3-1-8b``, short
    enough that the pods' hostnames (``<job>-<index>``) stay within 63 characters."""
    base = model.rstrip("/").split("/")[-1].lower()
    slug = re.sub(r"[^a-z0-9]+", "-", base).strip("-")[:44].strip("-")
    return f"vtune-{slug or 'model'}"


def storage_url_template() -> str:
    """The URL of the in-cluster PostgreSQL, ``$PW`` standing for the password."""
    return f"postgresql+psycopg://{POSTGRES_USER}:$PW@{POSTGRES_NAME}:5432/{POSTGRES_DB}"


def secret_command(spec: TuningSpec) -> str:
    """The one shell line that creates the storage Secret (the password is generated there,
    never written into a manifest)."""
    ns = f" -n {spec.namespace}" if spec.namespace else ""
    if spec.postgres == "external":
        return (
            f"kubectl{ns} create secret generic {spec.storage_secret} "
            "--from-literal=url='postgresql+psycopg://USER:PASSWORD@HOST:5432/DB'"
        )
    return (
        f"PW=$(openssl rand -hex 24); kubectl{ns} create secret generic {spec.storage_secret} "
        f'--from-literal=password="$PW" --from-literal=url="{storage_url_template()}"'
    )


def tuning_header(spec: TuningSpec) -> str:
    """The comment above the rendered documents: what runs, the design, how to apply."""
    where = (
        f"a PostgreSQL StatefulSet ({POSTGRES_NAME})"
        if spec.postgres == "statefulset"
        else "an external PostgreSQL (any SQLAlchemy URL Optuna takes)"
    )
    return "\n".join(
        [
            f"Rendered by `vtune deploy --tuning-job --workers {spec.workers}`: one Optuna study,",
            f"{spec.workers} worker pod(s) of an Indexed Job, the study in {where}.",
            "Every pod runs the same `vtune search`: a search on an existing study joins it, so",
            "no pod goes first, and the study's name (a hash of the search's settings) need not",
            "be known here. Each finished trial is in the database at once; a retried pod",
            "(backoffLimitPerIndex) or a later rerun resumes the study, and a pod evicted",
            "(DisruptionTarget) does not count as a failure. Exit code 2 (a user error: bad",
            "arguments, unreachable storage, nothing met the SLO) fails that index without retry.",
            "One worker (the holder of the study's lease) writes the profile, under",
            f"{RESULTS_DIR}/worker-<index>/ on the results volume (ReadWriteMany: the pods may",
            "run on different nodes; on one node ReadWriteOnce is enough); the others exit 0.",
            "More workers can join from anywhere: vtune worker --storage URL --study NAME.",
            "The storage URL comes from a Secret; create it first (no password is written here):",
            f"  {secret_command(spec)}",
            "  kubectl create secret generic hf-token --from-literal=token=hf_...   (gated models)",
            "Apply with: kubectl apply -f <this file>",
        ]
    )


def render_tuning(spec: TuningSpec) -> list[dict[str, Any]]:
    """[headless Service, PostgreSQL StatefulSet] (``statefulset`` only), the results
    PersistentVolumeClaim and the Indexed Job."""
    docs = _postgres(spec) if spec.postgres == "statefulset" else []
    results = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(spec, f"{spec.name}-results", "tuning"),
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "resources": {"requests": {"storage": "20Gi"}},  # profiles, records, trial logs
        },
    }
    return [*docs, results, _job(spec)]


def _labels(name: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/part-of": "vtune",
        "app.kubernetes.io/component": component,
    }


def _meta(spec: TuningSpec, name: str, component: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": _labels(name, component)}
    if spec.namespace:
        meta["namespace"] = spec.namespace
    return meta


def _secret_env(name: str, secret: str, key: str, optional: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def _postgres(spec: TuningSpec) -> list[dict[str, Any]]:
    """A headless Service and a one-replica StatefulSet with its own volume. Its
    ``max_connections`` leaves room for each worker's connection pool and heartbeat."""
    selector = {"app.kubernetes.io/name": POSTGRES_NAME}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(spec, POSTGRES_NAME, "study-storage"),
        "spec": {
            "clusterIP": "None",
            "selector": selector,
            "ports": [{"name": "postgres", "port": 5432, "targetPort": "postgres"}],
        },
    }
    ready = ["pg_isready", "-h", "127.0.0.1", "-U", POSTGRES_USER, "-d", POSTGRES_DB]
    container = {
        "name": "postgres",
        "image": POSTGRES_IMAGE,
        "args": ["-c", f"max_connections={max(100, 10 * spec.workers + 20)}"],
        "ports": [{"name": "postgres", "containerPort": 5432}],
        "env": [
            {"name": "POSTGRES_USER", "value": POSTGRES_USER},
            {"name": "POSTGRES_DB", "value": POSTGRES_DB},
            _secret_env("POSTGRES_PASSWORD", spec.storage_secret, "password"),
            # a subdirectory: a fresh volume's root may hold lost+found, which initdb refuses
            {"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"},
        ],
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}},
        "readinessProbe": {"exec": {"command": ready}, "periodSeconds": 5},
        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"}],
    }
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(spec, POSTGRES_NAME, "study-storage"),
        "spec": {
            "serviceName": POSTGRES_NAME,
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": _labels(POSTGRES_NAME, "study-storage")},
                "spec": {"containers": [container]},
            },
            "volumeClaimTemplates": [
                {
                    "metadata": {"name": "data"},
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": "10Gi"}},
                    },
                }
            ],
        },
    }
    return [service, statefulset]


def _job(spec: TuningSpec) -> dict[str, Any]:
    """The Indexed Job: N pods, each ``vtune search ARGS --storage $(VTUNE_STORAGE) --out
    /results/worker-$(JOB_COMPLETION_INDEX)`` (Kubernetes expands ``$(VAR)`` from the
    container's env, so the URL never appears in the pod spec)."""
    args = [
        "search",
        *spec.search_args,
        "--storage",
        f"$({STORAGE_ENV})",
        "--out",
        f"{RESULTS_DIR}/worker-$({INDEX_ENV})",
        "--metrics-port",
        str(METRICS_PORT),
        "--metrics-host",
        "0.0.0.0",
    ]
    container = {
        "name": "vtune",
        "image": spec.image,
        "args": args,
        "env": [
            _secret_env(STORAGE_ENV, spec.storage_secret, "url"),
            {"name": INDEX_ENV, "valueFrom": {"fieldRef": {"fieldPath": INDEX_ANNOTATION}}},
            _secret_env("HF_TOKEN", spec.hf_token_secret, "token", optional=True),
            {"name": "HF_HOME", "value": "/cache/huggingface"},
        ],
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT}],
        "resources": {"limits": {"nvidia.com/gpu": spec.gpus}} if spec.gpus else {},
        "volumeMounts": [
            {"name": "results", "mountPath": RESULTS_DIR},
            {"name": "hf-cache", "mountPath": "/cache"},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    pod: dict[str, Any] = {
        "restartPolicy": "Never",  # a failed pod is replaced (per index), never restarted
        "terminationGracePeriodSeconds": 60,  # vtune stops vLLM (SIGTERM, SIGKILL after 10 s)
        "containers": [container],
        "volumes": [
            {"name": "results", "persistentVolumeClaim": {"claimName": f"{spec.name}-results"}},
            # per pod: N pods downloading into one shared cache would contend for its locks
            {"name": "hf-cache", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},  # vLLM's shared memory
        ],
    }
    if spec.postgres == "statefulset":  # start measuring only once the study can be reached
        wait = f"until pg_isready -q -h {POSTGRES_NAME} -p 5432; do sleep 2; done"
        pod["initContainers"] = [
            {"name": "wait-for-postgres", "image": POSTGRES_IMAGE, "command": ["sh", "-c", wait]}
        ]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(spec, spec.name, "tuning"),
        "spec": {
            "completionMode": "Indexed",
            "completions": spec.workers,
            "parallelism": spec.workers,
            "backoffLimitPerIndex": BACKOFF_LIMIT_PER_INDEX,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailIndex",
                        "onExitCodes": {
                            "containerName": "vtune",
                            "operator": "In",
                            "values": [USER_ERROR_EXIT],
                        },
                    },
                    {
                        "action": "Ignore",
                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                    },
                ]
            },
            "template": {
                "metadata": {
                    "labels": _labels(spec.name, "tuning"),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(METRICS_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod,
            },
        },
    }
