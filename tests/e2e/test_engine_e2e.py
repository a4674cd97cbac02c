"""The trial engine against real vLLM CPU and the tiny model. Run under the vLLM lock:

    flock /tmp/vtune-vllm.lock .venv/bin/pytest -m e2e tests/e2e/test_engine_e2e.py

Each vLLM start costs 10-70 s on 2 cores, so the capacity checks share the session server
(``vllm_server`` in tests/conftest.py); only the failure and orphan checks start their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tuner.engine.guard import group_members, shm_files
from tuner.engine.http import attach
from tuner.engine.log import parse_cache_config_info, parse_kv_cache_log
from tuner.engine.server import (
    EngineSettings,
    FailureClass,
    LaunchConfig,
    ServerStartError,
    VllmServer,
)

pytestmark = pytest.mark.e2e


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def test_kv_capacity_from_log_metrics_and_formula_agree(vllm_server, tiny_model_dir: Path) -> None:
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    info = vllm_server.info
    kv_bytes = vllm_server.settings.kv_cache_memory_bytes
    assert kv_bytes == 300_000_000  # set by the fixture, not vtune's 1 GiB CPU default
    block = info.block_size
    assert block == 128  # vLLM CPU's default
    kv_bytes_per_token = (
        2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 2  # bf16
    )
    expected = kv_bytes // (block * kv_bytes_per_token) * block
    logged = parse_kv_cache_log(vllm_server.log_path.read_text())
    with urllib.request.urlopen(vllm_server.url + "/metrics", timeout=10) as resp:
        exported = parse_cache_config_info(resp.read().decode())
    assert exported is not None
    assert info.kv_cache_size_tokens == logged.kv_cache_size_tokens == expected
    assert exported.kv_cache_size_tokens == expected
    assert exported.num_gpu_blocks == info.num_gpu_blocks == expected // block
    assert exported.kv_cache_memory_bytes == kv_bytes
    ctx = cfg["max_position_embeddings"]
    assert info.max_model_len == ctx == logged.concurrency_context
    assert info.max_concurrency == pytest.approx(expected / ctx, abs=0.01)
    assert info.vllm_version == "0.32.0" and info.model == str(tiny_model_dir)
    assert "--kv-cache-memory-bytes" in info.argv and info.startup_s > 0


def test_session_server_serves_completions_and_chat(vllm_server) -> None:
    name = vllm_server.info.model
    out = _post(
        vllm_server.base_url + "/completions",
        {"model": name, "prompt": "The morning fog", "max_tokens": 8, "ignore_eos": True},
    )
    assert out["usage"]["completion_tokens"] == 8
    chat = _post(
        vllm_server.base_url + "/chat/completions",
        {"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    )
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert attach(vllm_server.url).kv_cache_size_tokens == vllm_server.info.kv_cache_size_tokens
    assert vllm_server.poll_failure() is None


def test_invalid_flag_is_an_invalid_option_failure(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = EngineSettings(str(tiny_model_dir), extra=(("--no-such-flag", None),))
    server = VllmServer(settings, LaunchConfig(device="cpu", log_dir=tmp_path))
    t0 = time.monotonic()
    with pytest.raises(ServerStartError) as err:
        server.start()
    assert time.monotonic() - t0 < 60  # argparse fails before any engine starts (~9 s)
    failure = err.value.failure
    assert failure.failure_class is FailureClass.INVALID_OPTION
    assert "unrecognized arguments: --no-such-flag" in failure.message
    assert failure.returncode == 2 and server.survivors == []


DRIVER = textwrap.dedent(
    """
    import sys
    from tuner.engine.server import EngineSettings, LaunchConfig, VllmServer
    model, log_dir = sys.argv[1:3]
    launch = LaunchConfig(device="cpu", log_dir=log_dir, stop_grace_s=3.0)
    server = VllmServer(EngineSettings(model), launch)
    server.launch_process(int(sys.argv[3]))
    print(server.pid, flush=True)
    server.wait_ready()
    """
)


def _cmdlines(pgid: int) -> list[str]:
    out = []
    for pid in group_members(pgid):
        try:
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return out


def test_sigkilled_parent_leaves_no_vllm_orphans(tiny_model_dir: Path, tmp_path: Path) -> None:
    """vtune SIGKILLed while vLLM starts (when vLLM ignores SIGTERM): nothing survives."""
    from tuner.engine.server import find_free_port

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, str(driver), str(tiny_model_dir), str(tmp_path), str(find_free_port())],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    pgid = int(proc.stdout.readline())
    deadline = time.monotonic() + 120
    while not any("VLLM::EngineCore" in c for c in _cmdlines(pgid)):
        assert proc.poll() is None and time.monotonic() < deadline, _cmdlines(pgid)
        time.sleep(0.5)
    time.sleep(2)  # let EngineCore map its shared-memory queues
    shm = shm_files(group_members(pgid))
    proc.kill()
    proc.wait(10)
    deadline = time.monotonic() + 20  # guard: 3 s grace, then SIGKILL to the group
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert _cmdlines(pgid) == []
    assert shm and not any(Path(p).exists() for p in shm), shm  # no /dev/shm leak either


def test_config_mapping_is_what_vllm_config_files_accept(tmp_path: Path) -> None:
    """to_config() written as YAML is read by vLLM's own parser into the same settings."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    settings = EngineSettings(
        "/models/x",
        max_num_seqs=8,
        max_num_batched_tokens=512,
        gpu_memory_utilization=0.5,
        enable_prefix_caching=False,
        enable_chunked_prefill=True,
        kv_cache_dtype="fp8",
        block_size=32,
        kv_cache_memory_bytes=1 << 30,
        extra=(("--enforce-eager", None), ("--max-log-len", "7")),
    )
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(settings.to_config(), sort_keys=False))
    ns = make_arg_parser(FlexibleArgumentParser()).parse_args(["--config", str(path)])
    assert ns.model == "/models/x"
    assert (ns.max_num_seqs, ns.max_num_batched_tokens, ns.block_size) == (8, 512, 32)
    assert ns.gpu_memory_utilization == 0.5 and ns.kv_cache_memory_bytes == 1 << 30
    assert ns.enable_prefix_caching is False and ns.enable_chunked_prefill is True
    assert ns.kv_cache_dtype == "fp8" and ns.enforce_eager is True and ns.max_log_len == 7
    # ... and the same as the command line vtune launches.
    argv_ns = make_arg_parser(FlexibleArgumentParser()).parse_args(settings.to_vllm_args())
    assert vars(argv_ns) == vars(ns)
