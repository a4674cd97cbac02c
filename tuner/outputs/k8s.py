"""Kubernetes manifests that serve a model with a tuned profile (pure: text in, text out).

:func:`render_serving` turns a profile YAML (what ``vtune search`` wrote) into three documents:
a ConfigMap holding the profile text byte for byte, a Deployment running
``vllm serve --config /etc/vtune/profile.yaml`` with that ConfigMap mounted (GPU count from the
profile's tensor/pipeline parallel sizes, /health probes, Prometheus scrape annotations, a
checksum annotation so a new profile rolls the pods) and a Service. :func:`dump_manifests`
writes them as one multi-document YAML in which the profile stays a readable literal block.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from tuner.errors import ParameterError, UnknownGpuError
from tuner.specs.gpu import get_gpu

DEFAULT_VLLM_IMAGE = "vllm/vllm-openai:v0.32.0"
PROFILE_DIR = "/etc/vtune"
PROFILE_KEY = "profile.yaml"
PROFILE_PATH = f"{PROFILE_DIR}/{PROFILE_KEY}"
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class ServingSpec:
    """How to serve: object name, image, namespace (None: the kubectl context's), port,
    replicas, GPUs per pod (None: tensor x pipeline parallel size from the profile) and the
    Secret holding ``HF_TOKEN`` under key ``token`` (optional in the pod: public models work
    without it)."""

    name: str
    image: str = DEFAULT_VLLM_IMAGE
    namespace: str | None = None
    port: int = 8000
    replicas: int = 1
    gpus: int | None = None
    hf_token_secret: str = "hf-token"

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.namespace is not None:
            check_name(self.namespace, "namespace")
        if not 1 <= self.port <= 65535:
            raise ParameterError(f"port must be 1-65535, got {self.port}")
        if self.replicas < 0:
            raise ParameterError(f"replicas must be >= 0, got {self.replicas}")
        if self.gpus is not None and self.gpus < 0:
            raise ParameterError(f"gpus must be >= 0, got {self.gpus}")
        if not self.image.strip():
            raise ParameterError("the image must not be empty")


def check_name(name: str, what: str = "name") -> str:
    """A Kubernetes object name (DNS-1123 label, at most 63 characters); ParameterError else."""
    if len(name) > 63 or not _DNS1123.match(name):
        raise ParameterError(
            f"{what} {name!r} is not a valid Kubernetes name (lowercase letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters)"
        )
    return name


def parse_profile(text: str) -> dict[str, Any]:
    """The profile's vLLM settings; ParameterError unless it is a YAML mapping naming a model."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ParameterError(f"the profile is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ParameterError("the profile is not a YAML mapping of vLLM settings")
    if not data.get("model"):
        raise ParameterError("the profile names no model (its 'model' key is missing)")
    return data


def default_name(config: Mapping[str, Any]) -> str:
    """An object name from the profile's model: ``meta-llama/Llama-3.1-8B`` -> ``llama-3-1-8b``."""
    model = str(config.get("model", "model")).rstrip("/").split("/")[-1].lower()
    name = re.sub(r"[^a-z0-9]+", "-", model).strip("-")[:57].strip("-")
    return f"vllm-{name or 'model'}"


def image_for_version(vllm_version: str | None) -> str:
    """vLLM's official image for a version (local parts such as ``+cpu`` dropped)."""
    if not vllm_version:
        return DEFAULT_VLLM_IMAGE
    version = str(vllm_version).split("+")[0].strip()
    if not re.fullmatch(r"\d+\.\d+(\.\d+)?([a-z0-9.]*)", version):
        return DEFAULT_VLLM_IMAGE
    return f"vllm/vllm-openai:v{version}"


def gpus_for(config: Mapping[str, Any]) -> int:
    """GPUs one server needs: tensor-parallel-size x pipeline-parallel-size (1 each if unset)."""
    total = 1
    for key in ("tensor-parallel-size", "pipeline-parallel-size"):
        value = config.get(key, config.get(key.replace("-", "_"), 1))
        try:
            total *= max(1, int(value))
        except (TypeError, ValueError):
            raise ParameterError(f"the profile's {key} is not an integer: {value!r}") from None
    return total


_HEADER = re.compile(r"^# vtune \S+ profile for .* on (\S+) \(vLLM", re.MULTILINE)
_MODEL_LINE = re.compile(r"^model:[^\n]*$", re.MULTILINE)


def measured_on(profile_text: str) -> str | None:
    """The device a profile was measured on, from the header ``vtune search`` writes
    ("vtune X profile for MODEL on GPU (vLLM V)"); None for a profile without it."""
    match = _HEADER.search(profile_text)
    return match.group(1) if match else None


def is_local_path(model: str) -> bool:
    """Whether a profile's ``model`` is a path on the machine that wrote it (absolute, ``./``,
    ``../`` or ``~``) rather than a Hugging Face id the pod can download."""
    return model.startswith(("/", "./", "../", "~", "\\")) or bool(
        re.match(r"^[A-Za-z]:[\\/]", model)
    )


def with_model(profile_text: str, model: str) -> str:
    """The profile with its top-level ``model:`` line replaced (every other byte kept);
    ParameterError when the line cannot be found or the result does not read back."""
    line = yaml.safe_dump({"model": model}, default_flow_style=False, width=float("inf"))
    text, count = _MODEL_LINE.subn(lambda _: line.rstrip("\n"), profile_text, count=1)
    if count != 1 or parse_profile(text).get("model") != model:
        raise ParameterError("cannot replace the profile's model: its 'model:' line is not plain")
    return text


def device_warnings(measured: str | None, gpus: int, image: str) -> list[str]:
    """One line when the profile was measured on another kind of device than the Deployment
    targets (``gpus`` NVIDIA GPUs per pod, or none): settings tuned on vLLM's CPU build on a
    GPU, a GPU's settings on CPU nodes, an AMD GPU's on ``nvidia.com/gpu``."""
    vendor = _vendor(measured)
    if vendor is None:
        return []
    if vendor == "cpu" and gpus > 0:
        return [
            f"this profile was measured on {measured} (vLLM's CPU build), but the Deployment "
            f"requests {gpus} NVIDIA GPU{'s' * (gpus != 1)} (nvidia.com/gpu) and runs {image}: "
            "its settings were not measured there; run `vtune search --gpu <the cluster's GPU>` "
            "on the target, or serve on CPU nodes with --gpus 0 and a vLLM CPU --image"
        ]
    if vendor != "cpu" and gpus == 0:
        return [
            f"this profile was measured on {measured} (a GPU), but the Deployment requests no "
            "GPU (--gpus 0): its settings were not measured on CPU nodes; run "
            "`vtune search --gpu cpu` on the target to tune for them"
        ]
    if vendor == "amd" and gpus > 0:
        return [
            f"this profile was measured on {measured} (AMD), but the Deployment requests "
            f"NVIDIA GPUs (nvidia.com/gpu) and runs {image}: edit the resource and the image "
            "for ROCm, or tune on the cluster's GPU"
        ]
    return []


def _vendor(gpu: str | None) -> str | None:
    """The registry's vendor of a device name ("cpu", "nvidia", "amd"); None when unknown."""
    if not gpu:
        return None
    try:
        return get_gpu(gpu).vendor
    except UnknownGpuError:
        return None


def render_serving(profile_text: str, spec: ServingSpec) -> list[dict[str, Any]]:
    """ConfigMap, Deployment and Service for ``profile_text`` (kept exactly as given)."""
    config = parse_profile(profile_text)
    gpus = spec.gpus if spec.gpus is not None else gpus_for(config)
    labels = {
        "app.kubernetes.io/name": spec.name,
        "app.kubernetes.io/part-of": "vtune",
        "app.kubernetes.io/component": "serving",
    }
    meta = {"name": spec.name, "labels": dict(labels)}
    if spec.namespace:
        meta["namespace"] = spec.namespace
    digest = hashlib.sha256(profile_text.encode()).hexdigest()
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {**meta, "name": f"{spec.name}-profile"},
        "data": {PROFILE_KEY: profile_text},
    }
    probe = {"httpGet": {"path": "/health", "port": "http"}}
    container = {
        "name": "vllm",
        "image": spec.image,
        "command": ["vllm"],
        "args": ["serve", "--config", PROFILE_PATH, "--host", "0.0.0.0", "--port", str(spec.port)],
        "ports": [{"name": "http", "containerPort": spec.port}],
        "env": [
            {
                "name": "HF_TOKEN",
                "valueFrom": {
                    "secretKeyRef": {"name": spec.hf_token_secret, "key": "token", "optional": True}
                },
            }
        ],
        "resources": {"limits": {"nvidia.com/gpu": gpus}} if gpus else {},
        "volumeMounts": [
            {"name": "profile", "mountPath": PROFILE_DIR, "readOnly": True},
            {"name": "hf-cache", "mountPath": "/root/.cache/huggingface"},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        # Downloading and loading weights can take many minutes: the startup probe waits 30 min.
        "startupProbe": {**probe, "periodSeconds": 10, "failureThreshold": 180},
        "readinessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 3},
        "livenessProbe": {**probe, "periodSeconds": 20, "failureThreshold": 3},
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/name": spec.name}},
            "template": {
                "metadata": {
                    "labels": dict(labels),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(spec.port),
                        "prometheus.io/path": "/metrics",
                        "vtune.io/profile-sha256": digest,
                    },
                },
                "spec": {
                    "containers": [container],
                    "volumes": [
                        {"name": "profile", "configMap": {"name": f"{spec.name}-profile"}},
                        {"name": "hf-cache", "emptyDir": {}},
                        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "selector": {"app.kubernetes.io/name": spec.name},
            "ports": [{"name": "http", "port": spec.port, "targetPort": "http"}],
        },
    }
    return [configmap, deployment, service]


class _Literal(str):
    """A string dumped as a YAML literal block (``|``), so the profile stays readable."""


class _Dumper(yaml.SafeDumper):
    pass


def _literal(dumper: yaml.SafeDumper, value: _Literal) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", str(value), style="|")


_Dumper.add_representer(_Literal, _literal)


def dump_manifests(docs: Sequence[Mapping[str, Any]], header: str = "") -> str:
    """Documents as multi-document YAML; multi-line strings as literal blocks. PyYAML falls
    back to a quoted scalar where a literal block cannot hold the text exactly; either way
    loading gives the same string back."""

    def mark(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mark(v) for v in value]
        if isinstance(value, str) and "\n" in value:
            return _Literal(value)
        return value

    body = yaml.dump_all(
        [mark(d) for d in docs],
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        explicit_start=True,
        width=100,
    )
    prefix = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    return prefix + body
