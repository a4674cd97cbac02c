"""Deployment files: every manifest parses, `vtune deploy` carries the profile `vtune search`
wrote byte for byte, Prometheus accepts the scrape config, and every metric the Grafana
dashboard queries exists (vtune_* in the exporter's registry, vllm:* in real vLLM)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from tuner.cli import cli
from tuner.errors import ParameterError
from tuner.outputs.k8s import (
    PROFILE_PATH,
    ServingSpec,
    default_name,
    device_warnings,
    dump_manifests,
    gpus_for,
    image_for_version,
    is_local_path,
    measured_on,
    render_serving,
    with_model,
)
from tuner.outputs.prometheus import SearchExporter
from tuner.outputs.prometheus_bench import BenchExporter
from tuner.search.profile import render_profile, write_profile
from tuner.search.record import SearchRecord, TrialRecord

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DATA = ROOT / "tests" / "data"
CONFIG = {
    "model": "meta-llama/Llama-3.1-8B-Instruct",
    "max-num-seqs": 256,
    "max-num-batched-tokens": 16384,
    "kv-cache-dtype": "fp8",
}
HEADER = ["vtune profile: meta-llama/Llama-3.1-8B-Instruct on h100", "gain x1.45"]


def load_all(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


def test_every_manifest_parses():
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(files) >= 4
    for path in files:
        docs = load_all(path)
        assert docs, path
        if "k8s" in path.parts:
            for d in docs:
                assert d["apiVersion"] and d["kind"] and d["metadata"]["name"], path


def test_rendered_deployment_carries_the_written_profile(tmp_path):
    record = SearchRecord(vllm_version="0.32.0").to_json()
    yaml_path, _ = write_profile(tmp_path / "h100.yaml", CONFIG, HEADER, record)
    written = yaml_path.read_text()
    assert written == render_profile(CONFIG, HEADER)
    result = CliRunner().invoke(cli, ["deploy", str(yaml_path), "--out", str(tmp_path / "k8s")])
    assert result.exit_code == 0, result.output
    out = Path(result.output.strip())
    docs = by_kind(load_all(out))
    assert docs["ConfigMap"]["data"]["profile.yaml"] == written  # byte for byte
    pod = docs["Deployment"]["spec"]["template"]
    [container] = pod["spec"]["containers"]
    assert container["command"] == ["vllm"]
    assert container["args"][:3] == ["serve", "--config", PROFILE_PATH]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "profile")
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "profile")
    assert volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert f"{mount['mountPath']}/profile.yaml" == PROFILE_PATH
    assert container["image"] == "vllm/vllm-openai:v0.32.0"  # from the record beside it
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert (
        pod["metadata"]["annotations"]["vtune.io/profile-sha256"]
        == hashlib.sha256(written.encode()).hexdigest()
    )
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    svc = docs["Service"]
    assert svc["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert pod["metadata"]["labels"].items() >= svc["spec"]["selector"].items()


@pytest.mark.parametrize(
    "text",
    [
        "model: m\n",
        "# trailing spaces   \nmodel: m   \n",
        "model: m",  # no final newline
        "# ünïcode ✓\nmodel: m\n\n\n",
        "model: m\nspeculative-config:\n  model: d\n  num_speculative_tokens: 3\n",
    ],
)
def test_profile_text_survives_exactly(text):
    docs = render_serving(text, ServingSpec(name="x"))
    again = list(yaml.safe_load_all(dump_manifests(docs)))
    assert again[0]["data"]["profile.yaml"] == text


def test_gpu_count_and_names():
    assert gpus_for({"tensor-parallel-size": 4, "pipeline-parallel-size": 2}) == 8
    assert gpus_for({"tensor_parallel_size": 2}) == 2
    assert gpus_for({}) == 1
    docs = render_serving("model: m\ntensor-parallel-size: 2\n", ServingSpec(name="x"))
    assert docs[1]["spec"]["template"]["spec"]["containers"][0]["resources"] == {
        "limits": {"nvidia.com/gpu": 2}
    }
    assert default_name(CONFIG) == "vllm-llama-3-1-8b-instruct"
    assert image_for_version("0.32.0+cpu") == "vllm/vllm-openai:v0.32.0"
    assert image_for_version(None).startswith("vllm/vllm-openai:v")
    with pytest.raises(ParameterError, match="not a valid Kubernetes name"):
        ServingSpec(name="Bad_Name")
    with pytest.raises(ParameterError, match="names no model"):
        render_serving("max-num-seqs: 8\n", ServingSpec(name="x"))
    with pytest.raises(ParameterError, match="not valid YAML"):
        render_serving("model: [unclosed\n", ServingSpec(name="x"))


def test_cli_errors_are_one_line(tmp_path, capsys):
    from tuner.cli import main

    profile = tmp_path / "p.yaml"
    profile.write_text("model: m\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    for argv, needle in (
        (["deploy", str(tmp_path / "missing.yaml")], "cannot read"),
        (["deploy", str(profile), "--name", "Bad_Name"], "Kubernetes name"),
        (["deploy", str(bad)], "not a YAML mapping"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2
        assert err.count("\n") == 1 and needle in err, err


def test_stdout_and_json_record_argument(tmp_path):
    yaml_path, json_path = write_profile(
        tmp_path / "cpu.yaml", {"model": "/m/tiny"}, [], SearchRecord().to_json()
    )
    result = CliRunner().invoke(
        cli,
        [
            "deploy",
            str(json_path),
            "--image",
            "reg/vllm:1",
            "--namespace",
            "tuning",
            "--replicas",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "a path on the tuning machine" in result.stderr  # model: /m/tiny
    docs = by_kind(list(yaml.safe_load_all(result.stdout)))
    assert docs["ConfigMap"]["data"]["profile.yaml"] == yaml_path.read_text()
    assert docs["Deployment"]["metadata"]["namespace"] == "tuning"
    assert docs["Deployment"]["spec"]["replicas"] == 2
    assert docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"] == "reg/vllm:1"


def test_example_serving_manifest_is_what_vtune_deploy_renders():
    path = DEPLOY / "k8s" / "serving.yaml"
    docs = by_kind(load_all(path))
    profile = docs["ConfigMap"]["data"]["profile.yaml"]
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    spec = ServingSpec(name=docs["Deployment"]["metadata"]["name"], image=container["image"])
    body = re.sub(r"\A(#.*\n)+", "", path.read_text())  # the header comment is free text
    assert dump_manifests(render_serving(profile, spec)) == body


def test_tuning_job_resumes_and_exports():
    docs = by_kind(load_all(DEPLOY / "k8s" / "tuning-job.yaml"))
    job = docs["Job"]
    assert job["spec"]["backoffLimit"] >= 1
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "OnFailure"
    [c] = pod["containers"]
    args = c["args"]
    assert args[0] == "search"

    def arg(flag: str) -> str:
        return args[args.index(flag) + 1]

    assert arg("--storage") == "sqlite:////data/study.db"
    assert arg("--out").startswith("/data/")
    assert arg("--metrics-port") == "9400" and arg("--metrics-host") == "0.0.0.0"
    assert arg("--pushgateway").startswith("http://")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "metrics", "containerPort": 9400} in c["ports"]
    data = next(m for m in c["volumeMounts"] if m["mountPath"] == "/data")
    vol = next(v for v in pod["volumes"] if v["name"] == data["name"])
    assert (
        vol["persistentVolumeClaim"]["claimName"]
        == docs["PersistentVolumeClaim"]["metadata"]["name"]
    )
    token = next(e for e in c["env"] if e["name"] == "HF_TOKEN")
    assert "secretKeyRef" in token["valueFrom"]  # never a literal token in the manifest
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9400"


def test_dockerfile_pins_vllm_and_runs_vtune():
    text = (DEPLOY / "Dockerfile").read_text()
    image = re.search(r"^ARG VLLM_IMAGE=(\S+)", text, re.M).group(1)
    assert image.startswith("vllm/vllm-openai:v") and not image.endswith(":latest")
    assert re.search(r"^FROM \$\{VLLM_IMAGE\}", text, re.M)
    assert "COPY tuner ./tuner" in text and "pip install" in text
    # vtune under an init (tini reaps orphans, forwards SIGTERM); vtune stops cleanly as PID 1
    # without one too (tests/faults/test_interrupt.py).
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "vtune"]' in text and "install" in text
    assert re.search(r"apt-get install .*\btini\b", text)


def promtool() -> str:
    path = shutil.which("promtool")
    if not path:
        pytest.fail("promtool is not installed: make system-packages", pytrace=False)
    return path


def test_prometheus_config_is_valid(tmp_path):
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert {"vllm", "vtune", "pushgateway"} <= set(jobs)
    assert jobs["pushgateway"]["honor_labels"] is True
    # Debian's build leaves out Kubernetes discovery; check everything else with promtool
    for job in cfg["scrape_configs"]:
        if job.pop("kubernetes_sd_configs", None) is not None:
            job["static_configs"] = [{"targets": ["127.0.0.1:1"]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [promtool(), "check", "config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- the dashboard -----------------------------------------------------------------------------


def dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "vtune-dashboard.json").read_text())
    exprs = []

    def walk(panels: list[dict]) -> None:
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))

    walk(dash["panels"])
    for var in dash["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if isinstance(query, str) and "label_values(" in query:
            exprs.append(re.search(r"label_values\(([^,)]+)", query).group(1))
    return exprs


def names_in(expr: str) -> set[str]:
    return set(re.findall(r"\b(vtune_[A-Za-z0-9_]+|vllm:[A-Za-z0-9_:]+)", expr))


def exporter_sample_names() -> set[str]:
    """Every sample name the exporters serve once a search and a bench have run."""
    record = json.loads((DATA / "sample_record.json").read_text())
    search, bench = SearchExporter(), BenchExporter()
    search.on_plan(1, 0, 1)
    t = TrialRecord.from_json(record["trials"][2])
    search.on_trial_end(t)
    search.on_trial_start(3, "x", {"max_num_seqs": 8})
    names = set()
    for reg in (search.registry, bench.registry):
        for family in reg.collect():
            names.update(s.name for s in family.samples)
    return names


def captured_vllm_names() -> set[str]:
    """Sample names on a real vLLM /metrics page: tests/data/vllm_metrics.txt was captured
    from vLLM CPU 0.32.0 serving the tiny model after a few streamed requests."""
    text = (DATA / "vllm_metrics.txt").read_text()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def source_vllm_names() -> set[str]:
    """Sample names the installed vLLM defines (counters get _total, histograms
    _bucket/_sum/_count, as prometheus-client exposes them): catches a rename in a newer vLLM
    that the captured page predates."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")  # locate only: importing vLLM takes seconds
    assert spec is not None and spec.submodule_search_locations, "vLLM is not installed"
    package = Path(next(iter(spec.submodule_search_locations)))
    source = (package / "v1" / "metrics" / "loggers.py").read_text()
    suffixes = {"gauge": ("",), "counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    found = re.findall(r'_(gauge|counter|histogram)_cls\(\s*name="(vllm:[a-z0-9_:]+)"', source)
    assert len(found) > 20, "vLLM's metric definitions moved; update this parser"
    return {name + s for kind, name in found for s in suffixes[kind]}


def test_dashboard_queries_name_real_metrics():
    exprs = dashboard_exprs()
    assert len(exprs) > 20
    used = set().union(*(names_in(e) for e in exprs))
    vtune_used = {n for n in used if n.startswith("vtune_")}
    vllm_used = {n for n in used if n.startswith("vllm:")}
    assert len(vtune_used) >= 10 and len(vllm_used) >= 8
    assert not vtune_used - exporter_sample_names(), "not served by vtune's exporters"
    assert not vllm_used - captured_vllm_names(), "not on a real vLLM /metrics page"
    assert not vllm_used - source_vllm_names(), "not defined by the installed vLLM"


def test_dashboard_promql_parses(tmp_path):
    """promtool parses each expression as a recording rule (Grafana's variables filled in)."""
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        filled = (
            expr.replace("$__rate_interval", "1m")
            .replace("$job", ".*")
            .replace("$model_name", ".*")
        )
        assert "$" not in filled, filled
        rules.append({"record": f"vtune:dashboard_{i}", "expr": filled})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- where a profile was measured, and a model the cluster cannot see (issue 16) ---------------

CPU_PROFILE = (
    "# vtune 0.1.0 profile for /home/me/tiny on cpu (vLLM 0.32.0+cpu)\n"
    "# Load: `vllm serve --config cpu.yaml`\n"
    "model: /home/me/tiny\n"
    "kv-cache-memory-bytes: 1073741824\n"
    "max-num-seqs: 16\n"
)


def deploy_run(*args: str):
    result = CliRunner().invoke(cli, ["deploy", *args])
    assert result.exit_code == 0, result.output
    return result, by_kind(list(yaml.safe_load_all(result.stdout)))


def warnings_of(result) -> list[str]:
    lines = result.stderr.splitlines()
    assert all(line.startswith("vtune: warning: ") for line in lines), lines
    return lines


def test_a_cpu_profile_deployed_to_gpus_says_so_in_one_line(tmp_path):
    """The demo's profile (vLLM's CPU build, a local model directory): rendering it as a GPU
    Deployment names both problems, one line each, and still renders."""
    yaml_path, _ = write_profile(
        tmp_path / "cpu.yaml",
        {"model": "/home/me/tiny", "kv-cache-memory-bytes": 1 << 30},
        ["vtune 0.1.0 profile for /home/me/tiny on cpu (vLLM 0.32.0+cpu)"],
        SearchRecord.from_json(
            {"schema": "vtune.search/2", "gpu": {"name": "cpu"}, "vllm_version": "0.32.0+cpu"}
        ).to_json(),
    )
    result, docs = deploy_run(str(yaml_path))
    path, device = warnings_of(result)  # the model line first, then the device
    assert "measured on cpu (vLLM's CPU build)" in device
    assert "requests 1 NVIDIA GPU" in device and "vllm/vllm-openai:v0.32.0" in device
    assert "/home/me/tiny" in path and "cluster cannot see" in path and "--model" in path
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1  # rendered all the same


def test_model_override_and_cpu_target_silence_the_warnings(tmp_path):
    profile = tmp_path / "cpu.yaml"
    profile.write_text(CPU_PROFILE)  # no record beside it: the header says "on cpu"
    result, docs = deploy_run(str(profile))
    assert len(warnings_of(result)) == 2
    result, docs = deploy_run(str(profile), "--model", "Qwen/Qwen2.5-0.5B", "--gpus", "0")
    assert warnings_of(result) == []
    text = docs["ConfigMap"]["data"]["profile.yaml"]
    assert text == CPU_PROFILE.replace("model: /home/me/tiny", "model: Qwen/Qwen2.5-0.5B")
    assert yaml.safe_load(text)["model"] == "Qwen/Qwen2.5-0.5B"
    assert docs["Deployment"]["metadata"]["name"] == "vllm-qwen2-5-0-5b"
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"] == {}
    assert "serves Qwen/Qwen2.5-0.5B" in result.stdout.splitlines()[0]


def test_a_gpu_profile_deployed_without_gpus_says_so(tmp_path):
    yaml_path, _ = write_profile(
        tmp_path / "h100.yaml",
        CONFIG,
        HEADER,
        SearchRecord.from_json({"schema": "vtune.search/2", "gpu": {"name": "h100-sxm"}}).to_json(),
    )
    result, _ = deploy_run(str(yaml_path))
    assert warnings_of(result) == []  # an HF id on the GPU it was measured on: nothing to say
    result, _ = deploy_run(str(yaml_path), "--gpus", "0")
    [line] = warnings_of(result)
    assert "measured on h100-sxm (a GPU)" in line and "requests no GPU" in line


def test_profile_helpers():
    assert measured_on(CPU_PROFILE) == "cpu"
    assert measured_on("# vtune 0.1.0 profile for a on b on h100 (vLLM ?)\nmodel: m\n") == "h100"
    assert measured_on("model: m\n") is None
    assert [is_local_path(m) for m in ("/m", "./m", "../m", "~/m", "org/m", "m")] == [
        True,
        True,
        True,
        True,
        False,
        False,
    ]
    assert with_model("model: a\nx: 1\n", "org/b: c") == "model: 'org/b: c'\nx: 1\n"
    assert device_warnings(None, 1, "img") == [] and device_warnings("nope", 0, "img") == []
    with pytest.raises(ParameterError, match="'model:' line is not plain"):
        with_model("{model: a}\n", "b")


def test_a_model_override_that_cannot_be_applied_is_one_line(tmp_path, capsys):
    from tuner.cli import main

    profile = tmp_path / "p.yaml"
    profile.write_text("{model: a, max-num-seqs: 8}\n")
    with pytest.raises(SystemExit) as exc:
        main(["deploy", str(profile), "--model", "b"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "not plain" in err, err
