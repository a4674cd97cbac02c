"""Unit tests of the trial engine: settings -> argv/config, log parsing, failure classes, and the
process handling of ``VllmServer`` against a fake vLLM (a small stdlib HTTP server script that
also spawns a grandchild, ignores SIGTERM, crashes, or never answers, on request)."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tuner.engine import server as engine
from tuner.engine.guard import group_members, listening_inodes, socket_inodes
from tuner.engine.log import (
    classify_failure,
    environment_failure,
    memory_taken,
    outside_stop,
    parse_cache_config_info,
    parse_kv_cache_log,
    parse_prometheus_labels,
    redact_argv,
)
from tuner.engine.logfile import create_log, private_log_dir, reopen_log
from tuner.engine.server import (
    EngineSettings,
    FailureClass,
    LaunchConfig,
    ServerStartError,
    VllmServer,
    attach,
    child_env,
    find_free_port,
)
from tuner.errors import EngineError, ParameterError, VtuneError

# --- verbatim vLLM CPU 0.32.0 output (what tuner/engine/log.py parses) ----------------------------

KV_LOG = (
    "(Worker pid=4169) INFO 11-25 20:42:14 [cpu_worker.py:260] Explicitly set (1.0/8.21) GiB "
    "for KV cache on node 0.\n"
    "(EngineCore pid=4098) INFO 11-25 20:42:14 [kv_cache_utils.py:2327] CPU KV cache size: "
    "1,048,576 tokens, Maximum concurrency for 2,048 tokens per request: 512.00x\n"
)
CACHE_INFO = (
    'vllm:cache_config_info{_block_size_resolved="True",block_size="128",cache_dtype="auto",'
    'cache_hit_alignment_tokens="None",effective_attention_block_size="128",'
    'enable_mamba_shared_prefix_checkpoint="False",enable_prefix_caching="True",engine="0",'
    'gpu_memory_utilization="0.92",hash_block_size="None",is_attention_free="False",'
    'kv_cache_dtype_skip_layers="[]",kv_cache_layout="None",kv_cache_max_concurrency="512.0",'
    'kv_cache_memory_bytes="1073741824",kv_cache_size_tokens="1048576",'
    'kv_offloading_backend="native",kv_offloading_size="None",kv_sharing_fast_prefill="False",'
    'mamba_block_size="None",mamba_cache_dtype="auto",mamba_cache_mode="none",'
    'mamba_page_size_padded="None",mamba_ssm_cache_dtype="float32",num_cpu_blocks="None",'
    'num_gpu_blocks="8192",num_gpu_blocks_override="None",prefix_cache_retention_interval="0",'
    'prefix_caching_hash_algo="sha256",prefix_match_unit="None",replayssm_buffer_len="16",'
    'skip_page_size_padded="None",sliding_window="None",swa_bounded_replay="True",'
    'use_kda_recoverssm="False",use_replayssm="False",user_specified_block_size="False"} 1.0'
)
ULIMIT_WARNING = (
    "(APIServer pid=3896) WARNING 11-25 20:41:18 [system_utils.py:255] Found ulimit of 20000 and "
    "failed to automatically increase with error current limit exceeds maximum limit. This can "
    "cause fd limit errors like `OSError: [Errno 24] Too many open files`. Consider increasing "
    "with ulimit -n"
)
ENGINE_INIT_FAILED = (
    "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}"
)
LOGS = {
    "flag": "usage: api_server.py [-h] [--headless]\n"
    "                     [model_tag]\n"
    "api_server.py: error: unrecognized arguments: --no-such-flag\n",
    "seqs0": "Traceback (most recent call last):\n"
    '  File ".../vllm/engine/arg_utils.py", line 2617, in create_engine_config\n'
    "pydantic_core._pydantic_core.ValidationError: 2 validation errors for SchedulerConfig\n"
    "max_num_batched_tokens\n"
    "  Input should be greater than or equal to 1 [type=greater_than_equal, input_value=0, "
    "input_type=int]\n"
    "    For further information visit https://errors.pydantic.dev/2.14/v/greater_than_equal\n",
    "gmu": "(VllmWorker-0 pid=11403) ERROR 11-25 20:56:54 [multiproc_executor.py:953] ValueError: "
    "Available memory on node 0 (8.25/9.71 GiB) on startup is less than desired CPU memory "
    "utilization (0.99, 9.62 GiB). On the CPU backend, the `--gpu-memory-utilization` flag "
    "controls the fraction of CPU memory reserved (despite its name).\n" + ENGINE_INIT_FAILED,
    "kvbig": "RuntimeError: Worker failed with error 'Available memory on node 0 (8.2/9.84 GiB) "
    "on kv cache allocation is less than requested memory for kv (100.0 GiB). Decrease "
    "--kv-cache-memory-bytes, VLLM_CPU_KVCACHE_SPACE, or reduce CPU memory used by other "
    "processes.', please check the stack trace above for the root cause\n" + ENGINE_INIT_FAILED,
    "port": '  File ".../vllm/entrypoints/launchers/launcher.py", line 348, in '
    "create_server_socket\n    sock.bind(addr)\nOSError: [Errno 98] Address already in use\n",
    "nomodel": "OSError: Repo id must be in the form 'repo_name' or 'namespace/repo_name': "
    "'/tmp/does-not-exist'. Use `repo_type` argument if needed.\n",
    "awq": "pydantic_core._pydantic_core.ValidationError: 1 validation error for VllmConfig\n"
    "  Value error, Cannot find the config file for awq [type=value_error, "
    "input_value=ArgsKwargs((), {'model_co... 'shutdown_timeout': 0}), input_type=ArgsKwargs]\n",
    "fp8q": "(Worker pid=20358) ERROR 11-25 21:11:53 [multiproc_executor.py:953] RuntimeError: "
    "_C::static_scaled_fp8_quant() expected at most 0 argument(s) but received 4 argument(s). "
    "Declaration: _C::static_scaled_fp8_quant() -> ()\n" + ENGINE_INIT_FAILED,
    "tp2": "(EngineCore pid=20646) ERROR 11-25 21:12:18 [core.py:1510] AssertionError: Not enough "
    "allowed NUMA nodes to bind threads of 2 local CPUWorkers. Allowed NUMA nodes are [0]. "
    "Please try to bind threads manually or decrease DP/TP/PP.\n" + ENGINE_INIT_FAILED,
}

# --- EngineSettings --------------------------------------------------------------------------


def test_argv_has_only_set_flags_booleans_and_extra() -> None:
    s = EngineSettings(
        "m",
        max_num_seqs=8,
        gpu_memory_utilization=0.9,
        enable_prefix_caching=False,
        enable_chunked_prefill=True,
        extra=(("enforce_eager", None), ("--max-log-len", 10)),
    )
    assert s.to_vllm_args() == [
        "--model", "m", "--max-num-seqs", "8", "--gpu-memory-utilization", "0.9",
        "--enable-chunked-prefill", "--no-enable-prefix-caching",
        "--enforce-eager", "--max-log-len", "10",
    ]  # fmt: skip
    assert EngineSettings("m").to_vllm_args() == ["--model", "m"]


def test_config_dict_uses_vllm_config_keys() -> None:
    s = EngineSettings(
        "m",
        max_num_batched_tokens=512,
        enable_prefix_caching=False,
        kv_cache_dtype="fp8",
        extra=(("--enforce-eager", None), ("--no-enable-log-requests", None), ("--seed2", "3")),
    )
    assert s.to_config() == {
        "model": "m",
        "max-num-batched-tokens": 512,
        "kv-cache-dtype": "fp8",
        "enable-prefix-caching": False,
        "enforce-eager": True,
        "enable-log-requests": False,
        "seed2": "3",
    }


def test_secrets_leave_argv_and_config_for_the_environment() -> None:
    s = EngineSettings("m", extra=(("--hf-token", "hf_SECRET"), ("--api-key", "sk-SECRET")))
    assert "hf_SECRET" not in " ".join(s.to_vllm_args())
    assert "SECRET" not in repr(s.to_config())
    env = child_env(s, LaunchConfig(device="cpu"))
    assert env["HF_TOKEN"] == "hf_SECRET" and env["VLLM_API_KEY"] == "sk-SECRET"
    assert s.api_key == "sk-SECRET"
    assert s.name == "default"  # secrets do not even change the name


@pytest.mark.parametrize(
    "extra", [(("--port", "1"),), (("host", "x"),), (("--max-num-seqs", "4"),), (("",),)]
)
def test_extra_rejects_launch_owned_and_typed_flags(extra: tuple) -> None:
    with pytest.raises(ParameterError):
        EngineSettings("m", extra=extra)


def test_name_is_stable_and_distinguishes_settings() -> None:
    a = EngineSettings(
        "m", max_num_seqs=8, enable_prefix_caching=False, kv_cache_memory_bytes=1 << 30
    )
    assert a.name == "mns8_pc0_kvb1G"
    assert EngineSettings("other", max_num_seqs=8, enable_prefix_caching=False,
                          kv_cache_memory_bytes=1 << 30).name == a.name  # fmt: skip
    assert EngineSettings("m").name == "default"
    assert EngineSettings("m", gpu_memory_utilization=0.85).name == "gmu0.85"
    x1 = EngineSettings("m", extra=(("--enforce-eager", None),)).name
    x2 = EngineSettings("m", extra=(("--max-log-len", "5"),)).name
    assert x1.startswith("x") and x1 != x2


def test_from_mapping_types_known_knobs_and_keeps_the_rest() -> None:
    s = EngineSettings.from_mapping(
        "m",
        {"max-num-seqs": "8", "enable_prefix_caching": "false", "gpu_memory_utilization": "0.8",
         "enforce-eager": True, "disable-log-stats": False, "max_log_len": 7},
    )  # fmt: skip
    assert (s.max_num_seqs, s.enable_prefix_caching, s.gpu_memory_utilization) == (8, False, 0.8)
    assert s.extra == (("--enforce-eager", None), ("--no-disable-log-stats", None),
                       ("--max-log-len", "7"))  # fmt: skip
    with pytest.raises(ParameterError, match="max_num_seqs"):
        EngineSettings.from_mapping("m", {"max_num_seqs": "eight"})


def test_launch_defaults_kv_pool_on_cpu_only() -> None:
    s = EngineSettings("m")
    assert LaunchConfig(device="cpu").effective(s).kv_cache_memory_bytes == 1 << 30
    assert LaunchConfig(device="cuda").effective(s).kv_cache_memory_bytes is None
    mine = EngineSettings("m", kv_cache_memory_bytes=123)
    assert LaunchConfig(device="cpu").effective(mine).kv_cache_memory_bytes == 123
    legacy = LaunchConfig(device="cpu", env={"VLLM_CPU_KVCACHE_SPACE": "3"})
    assert legacy.effective(s).kv_cache_memory_bytes == 3 << 30  # what vLLM would have used
    with pytest.raises(ParameterError):
        LaunchConfig(device="tpu")


def test_child_env_drops_legacy_kv_variable_and_keeps_hf_token(monkeypatch) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "40")
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    launch = LaunchConfig(device="cpu", env={"VLLM_FOO": "1"}, cuda_visible_devices="2,3")
    env = child_env(LaunchConfig(device="cpu").effective(EngineSettings("m")), launch)
    assert "VLLM_CPU_KVCACHE_SPACE" not in env  # it would override --kv-cache-memory-bytes
    assert env["HF_TOKEN"] == "hf_x" and env["VLLM_FOO"] == "1"
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["VLLM_NO_USAGE_STATS"] == "1"
    assert (
        child_env(EngineSettings("m"), LaunchConfig(device="cuda"))["VLLM_CPU_KVCACHE_SPACE"]
        == "40"
    )


# --- log and metrics parsing -----------------------------------------------------------------


def test_parse_kv_cache_log_current_and_old_formats() -> None:
    kv = parse_kv_cache_log(KV_LOG)
    assert (kv.kv_cache_size_tokens, kv.max_concurrency, kv.concurrency_context, kv.pool) == (
        1_048_576, 512.0, 2048, "CPU",
    )  # fmt: skip
    old = parse_kv_cache_log(
        "INFO 05-01 10:00:00 [kv_cache_utils.py:716] GPU KV cache size: 421,184 tokens\n"
        "INFO 05-01 10:00:00 [kv_cache_utils.py:720] Maximum concurrency for 8,192 tokens per "
        "request: 51.41x\n"
    )
    assert (old.kv_cache_size_tokens, old.max_concurrency, old.pool) == (421_184, 51.41, "GPU")
    assert parse_kv_cache_log("nothing here").kv_cache_size_tokens is None


def test_parse_cache_config_info_verbatim() -> None:
    text = "# HELP x\n# TYPE vllm:cache_config_info gauge\n" + CACHE_INFO + "\nother 1\n"
    info = parse_cache_config_info(text)
    assert info is not None
    assert (info.num_gpu_blocks, info.block_size, info.kv_cache_size_tokens) == (8192, 128, 1048576)
    assert info.max_concurrency == 512.0 and info.kv_cache_memory_bytes == 1 << 30
    assert info.enable_prefix_caching is True and info.gpu_memory_utilization == 0.92
    assert info.labels["num_cpu_blocks"] == "None"
    old = parse_cache_config_info(
        'vllm:cache_config_info{block_size="16",num_gpu_blocks="100"} 1.0'
    )
    assert old is not None and old.kv_cache_size_tokens == 1600  # blocks x block size
    assert parse_cache_config_info("vllm:num_requests_running 0.0") is None
    assert parse_prometheus_labels(r'a="x\"y",b=""') == {"a": 'x"y', "b": ""}


@pytest.mark.parametrize(
    ("case", "cls", "needle"),
    [
        ("flag", FailureClass.INVALID_OPTION, "unrecognized arguments: --no-such-flag"),
        ("seqs0", FailureClass.INVALID_OPTION, "greater than or equal to 1"),
        ("gmu", FailureClass.OOM, "less than desired CPU memory utilization"),
        ("kvbig", FailureClass.OOM, "less than requested memory for kv (100.0 GiB)"),
        ("port", FailureClass.PORT_IN_USE, "Address already in use"),
        ("nomodel", FailureClass.LOAD_CRASH, "Repo id must be"),
        ("awq", FailureClass.UNSUPPORTED, "Cannot find the config file for awq"),
        ("fp8q", FailureClass.UNSUPPORTED, "static_scaled_fp8_quant"),
        ("tp2", FailureClass.UNSUPPORTED, "Not enough allowed NUMA nodes"),
    ],
)
def test_classify_failure_on_captured_vllm_errors(
    case: str, cls: FailureClass, needle: str
) -> None:
    text = ULIMIT_WARNING + "\n" + KV_LOG + LOGS[case] + "\n(APIServer pid=1) INFO shutdown\n"
    got, message = classify_failure(text)
    assert got is cls
    assert needle in message and "\n" not in message and len(message) <= 300
    assert not message.startswith("(")  # the "(Worker pid=...) ERROR ... [file:line]" prefix is cut


def test_classify_ignores_warnings_and_falls_back_to_crashed() -> None:
    text = ULIMIT_WARNING + "\nSegmentation fault (core dumped)\nRuntimeError: boom\nbye\n"
    cls, message = classify_failure(text)
    assert cls is FailureClass.CRASHED and message == "RuntimeError: boom"
    assert classify_failure("")[0] is FailureClass.CRASHED


def test_classify_after_start_keeps_only_oom() -> None:
    assert classify_failure(LOGS["flag"], started=True)[0] is FailureClass.CRASHED
    oom = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
    assert classify_failure(oom, started=True)[0] is FailureClass.OOM


def test_redact_argv() -> None:
    argv = ["vllm", "--hf-token", "hf_abc", "--api-key=sk", "--tokenizer", "t",
            "--max-num-batched-tokens", "512"]  # fmt: skip
    assert redact_argv(argv) == ("vllm", "--hf-token", "***", "--api-key=***", "--tokenizer", "t",
                                 "--max-num-batched-tokens", "512")  # fmt: skip


# --- process handling against a fake vLLM ----------------------------------------------------

FAKE_VLLM = textwrap.dedent(
    r"""
    import http.server, json, os, signal, subprocess, sys, threading, time
    mode, args = sys.argv[1], sys.argv[2:]
    host, port = args[args.index("--host") + 1], int(args[args.index("--port") + 1])
    model = args[args.index("--model") + 1]  # served as /v1/models' id, as vLLM does
    print("fake vllm argv:", " ".join(args), flush=True)
    if mode == "exit_oom":
        print("(VllmWorker-0 pid=1) ERROR 11-25 20:56:54 [x.py:1] ValueError: Available memory on "
              "node 0 (8.25/9.71 GiB) on startup is less than desired CPU memory utilization "
              "(0.99, 9.62 GiB).", flush=True)
        sys.exit(1)
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(f"grandchild {grandchild.pid}", flush=True)
    import mmap  # like vLLM's message queues: a mapped /dev/shm file, unlinked on clean exit
    shm_path = f"/dev/shm/vtune-test-{os.getpid()}"
    with open(shm_path, "wb") as fh:
        fh.truncate(4096)
    with open(shm_path, "r+b") as fh:
        shm = mmap.mmap(fh.fileno(), 4096)
    print(f"shm {shm_path}", flush=True)
    if mode == "late":  # answers only after a while (vLLM binds its port early, loads, serves)
        time.sleep(2.0)
    if mode in ("never", "ignore_term"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode == "never":
        time.sleep(600)
    print("(EngineCore pid=2) INFO 11-25 20:42:14 [kv_cache_utils.py:2327] CPU KV cache size: "
          "4,096 tokens, Maximum concurrency for 2,048 tokens per request: 2.00x", flush=True)
    METRICS = ('vllm:cache_config_info{block_size="128",engine="0",kv_cache_max_concurrency="2.0",'
               'kv_cache_size_tokens="4096",num_gpu_blocks="32"} 1.0\n')
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            models = json.dumps({"data": [{"id": model, "max_model_len": 2048}]})
            body = {"/health": "", "/version": '{"version":"0.0.fake"}', "/metrics": METRICS,
                    "/v1/models": models}.get(self.path)
            self.send_response(404 if body is None else 200)
            self.end_headers()
            self.wfile.write((body or "").encode())
        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer((host, port), H)
    if mode == "die_later":
        threading.Timer(1.0, lambda: (os.unlink(shm_path), os._exit(3))).start()
    def on_term(*_):
        threading.Thread(target=srv.shutdown).start()
    if mode != "ignore_term":
        signal.signal(signal.SIGTERM, on_term)
    srv.serve_forever()
    grandchild.terminate()
    os.unlink(shm_path)
    """
)


@pytest.fixture
def fake(tmp_path: Path):
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_VLLM)

    def make(mode: str, **kw) -> VllmServer:
        launch = LaunchConfig(
            command=(sys.executable, str(script), mode),
            device="cpu",
            log_dir=tmp_path / "logs",
            startup_timeout_s=kw.pop("timeout", 20.0),
            stop_grace_s=kw.pop("grace", 2.0),
            **kw,
        )
        return VllmServer(EngineSettings("fake-model", max_num_seqs=4), launch)

    return make


def _grandchild(server: VllmServer) -> int:
    for line in server.log_path.read_text().splitlines():
        if line.startswith("grandchild "):
            return int(line.split()[1])
    raise AssertionError("fake server did not report its grandchild")


def _shm(server: VllmServer) -> Path:
    for line in server.log_path.read_text().splitlines():
        if line.startswith("shm "):
            return Path(line.split()[1])
    raise AssertionError("fake server did not report its shared memory file")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def test_fake_server_starts_reports_info_and_whole_group_dies(fake) -> None:
    server = fake("ok")
    with server:
        info = server.info
        assert info is not None and info.url == server.url and info.base_url == server.url + "/v1"
        assert (info.model, info.vllm_version, info.max_model_len) == (
            "fake-model",
            "0.0.fake",
            2048,
        )
        assert (info.kv_cache_size_tokens, info.num_gpu_blocks, info.block_size) == (4096, 32, 128)
        assert info.max_concurrency == 2.0 and info.startup_s is not None
        assert "--max-num-seqs" in info.argv and "--kv-cache-memory-bytes" in info.argv
        assert server.alive() and server.poll_failure() is None
        gc, pgid = _grandchild(server), server.pid
        assert pgid is not None and gc in group_members(pgid)
        assert attach(server.url + "/v1/").kv_cache_size_tokens == 4096
    assert server.survivors == [] and not _alive(gc) and group_members(pgid) == []
    assert server.poll_failure() is None  # stopped by us: not a failure
    assert server.stop() == []  # idempotent
    with pytest.raises(EngineError, match="already started"):
        server.start()


def test_interrupted_start_leaves_nothing_behind(fake, monkeypatch) -> None:
    server = fake("never")

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(server, "wait_ready", interrupted)
    with pytest.raises(KeyboardInterrupt):
        server.start()
    assert server.pid is not None and group_members(server.pid) == []


def test_sigterm_ignoring_server_is_killed_after_grace(fake) -> None:
    server = fake("ignore_term", grace=1.0)
    server.start()
    gc, pgid, shm = _grandchild(server), server.pid, _shm(server)
    assert shm.exists()
    t0 = time.monotonic()
    assert server.stop() == []
    assert time.monotonic() - t0 < 8 and not _alive(gc) and group_members(pgid) == []
    assert not shm.exists()  # SIGKILLed processes' /dev/shm files are unlinked for them


def test_health_timeout_on_a_server_that_never_answers(fake) -> None:
    server = fake("never", timeout=2.0)
    t0 = time.monotonic()
    with pytest.raises(ServerStartError) as err:
        server.start()
    assert err.value.failure_class is FailureClass.HEALTH_TIMEOUT
    assert isinstance(err.value, VtuneError) and time.monotonic() - t0 < 10
    assert not _alive(_grandchild(server)) and group_members(server.pid) == []


def test_exit_during_start_is_classified(fake) -> None:
    with pytest.raises(ServerStartError) as err, fake("exit_oom"):
        pass
    failure = err.value.failure
    assert failure.failure_class is FailureClass.OOM and failure.returncode == 1
    assert "less than desired CPU memory" in failure.message and failure.log_path is not None
    assert "fake vllm argv" in failure.log_tail
    assert failure.to_json()["failure_class"] == "oom"


def test_crash_after_start_is_detected(fake) -> None:
    with fake("die_later") as server:
        assert server.poll_failure() is None
        deadline = time.monotonic() + 10
        while server.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        failure = server.poll_failure()
        assert failure is not None and failure.failure_class is FailureClass.CRASHED
        assert failure.returncode == 3 and "exit 3" in failure.message
    assert server.survivors == []


def test_explicit_port_in_use_fails_fast_without_launching(fake) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = fake("ok", port=busy.getsockname()[1])
        with pytest.raises(ServerStartError) as err:
            server.start()
    assert err.value.failure_class is FailureClass.PORT_IN_USE and server.pid is None


def test_auto_port_retries_when_the_free_port_was_taken(fake, monkeypatch) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    ports = iter([busy.getsockname()[1], find_free_port()])
    monkeypatch.setattr(engine, "find_free_port", lambda host: next(ports))
    try:
        with fake("ok") as server:
            assert server.port != busy.getsockname()[1] and server.info is not None
    finally:
        busy.close()


def test_free_port_is_bindable() -> None:
    port = find_free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_secrets_are_not_in_the_log(fake) -> None:
    server = fake("ok")
    server = VllmServer(EngineSettings("m", extra=(("--hf-token", "hf_TOPSECRET"),)), server.launch)
    with server:
        pass
    assert "hf_TOPSECRET" not in server.log_path.read_text()


def test_attach_unreachable_url_is_one_line_engine_error() -> None:
    port = find_free_port()
    with pytest.raises(EngineError, match=rf"cannot reach vLLM at http://127.0.0.1:{port}") as err:
        attach(f"http://127.0.0.1:{port}", timeout_s=1)
    assert "\n" not in str(err.value)
    with pytest.raises(EngineError, match="not an http"):
        attach("localhost:8000")


DRIVER = textwrap.dedent(
    """
    import sys, time
    from tuner.engine.server import EngineSettings, LaunchConfig, VllmServer
    from tuner.errors import Interrupted
    script, mode, log_dir = sys.argv[1:4]
    launch = LaunchConfig(command=(sys.executable, script, mode), device="cpu", log_dir=log_dir,
                          stop_grace_s=1.0)
    server = VllmServer(EngineSettings("m"), launch)
    try:  # the signal may land as soon as the pid is out, before a later ``try`` would begin
        server.start()
        print(server.pid, flush=True)
        time.sleep(600)
    except Interrupted as exc:
        sys.exit(128 + exc.signum)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_no_orphans_when_vtune_is_killed(fake, tmp_path: Path, sig: int) -> None:
    """SIGKILL: the guard's parent-death signal cleans up. SIGTERM: vtune's handler does, then
    ends the run (``Interrupted``, exit 128 + 15)."""
    fake("ok")  # writes the script
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.Popen(
        [sys.executable, str(driver), str(tmp_path / "fake_vllm.py"), "ignore_term",
         str(tmp_path / "logs")],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    pgid = int(proc.stdout.readline())
    assert len(group_members(pgid)) >= 3  # guard, fake server, grandchild
    proc.send_signal(sig)
    assert proc.wait(10) == (-sig if sig == signal.SIGKILL else 128 + sig)
    deadline = time.monotonic() + 10
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert group_members(pgid) == []


# --- environment failures, the guard killed alone, another worker's port, private logs ---------


def test_failure_classes_split_the_candidate_from_the_environment() -> None:
    candidate = {c for c in FailureClass if not c.environment}
    assert candidate == {FailureClass.OOM, FailureClass.INVALID_OPTION, FailureClass.UNSUPPORTED}
    for value in ("health_timeout", "port_in_use", "load_crash", "crashed", "killed"):
        assert environment_failure(value)
    assert environment_failure("requests_failed") and environment_failure(None)
    assert not environment_failure("oom") and not environment_failure("OOM")
    gpu = (
        "ValueError: Free memory on device cuda:0 (1.2/79.1 GiB) on startup is less than desired "
        "GPU memory utilization (0.9, 71.2 GiB). Decrease GPU memory utilization or reduce GPU "
        "memory used by other processes."
    )
    assert memory_taken(gpu) and memory_taken(LOGS["gmu"]) and not memory_taken(LOGS["kvbig"])
    assert not memory_taken("CUDA out of memory")


def test_outside_stop_reads_the_exit_status_and_the_guards_line() -> None:
    assert outside_stop("", -9) == "was killed by SIGKILL from outside vtune"
    said = "INFO serving\nvtune guard: stopping vLLM: received SIGTERM\n"
    assert outside_stop(said, 0) == "was stopped from outside vtune (received SIGTERM)"
    assert outside_stop("ERROR boom\n", 1) is None and outside_stop("", None) is None


def _wait_dead(server: VllmServer, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while server.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not server.alive()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_guard_stopped_from_outside_is_an_environment_failure(fake, sig: int) -> None:
    """Someone kills (or terminates) only the guard: vLLM did not crash, and the candidate is
    not to blame; the group (vLLM orphaned by a SIGKILLed guard included) still goes."""
    server = fake("ok")
    with server:
        gc = _grandchild(server)
        os.kill(server.pid, sig)
        _wait_dead(server)
        failure = server.poll_failure()
        assert failure is not None and failure.failure_class is FailureClass.KILLED
        assert failure.failure_class.environment and "from outside vtune" in failure.message
        assert signal.Signals(sig).name in failure.message
    assert server.survivors == [] and not _alive(gc) and group_members(server.pid) == []


def test_listening_sockets_are_found_with_their_holder() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        found = listening_inodes(port)
        assert found and found <= socket_inodes([os.getpid()])
    assert listening_inodes(port) == set()


class _Other(BaseHTTPRequestHandler):
    """Another worker's server: healthy, serving another model."""

    def do_GET(self) -> None:
        body = b'{"data":[{"id":"other-model"}]}' if self.path == "/v1/models" else b""
        self.send_response(200 if self.path in ("/health", "/v1/models") else 404)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("evidence", ["listener", "model"])
def test_port_answered_by_another_worker_is_retried(fake, monkeypatch, evidence: str) -> None:
    """Two workers picked the same free port: the other one's server answers our /health while
    ours still starts. Seen (the socket is not our group's, or /v1/models names another model),
    the start moves to another port instead of measuring the other worker's vLLM."""
    other = ThreadingHTTPServer(("127.0.0.1", 0), _Other)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    taken = other.server_address[1]
    ports = iter([taken, find_free_port()])
    monkeypatch.setattr(engine, "find_free_port", lambda host: next(ports))
    monkeypatch.setattr(engine, "port_free", lambda host, port: True)  # free when checked
    if evidence == "model":
        monkeypatch.setattr(engine, "foreign_listeners", lambda port, pgid: False)
    seen: list[str | None] = []
    stranger = VllmServer._stranger
    monkeypatch.setattr(
        VllmServer, "_stranger", lambda s, i: seen.append(stranger(s, i)) or seen[-1]
    )
    try:
        with fake("late") as server:
            assert server.port != taken and server.info is not None
            assert server.info.model == "fake-model"
    finally:
        other.shutdown()
        other.server_close()
    assert seen[-1] is None and seen[0] is not None and str(taken) in seen[0]
    assert ("outside this vLLM" if evidence == "listener" else "'other-model'") in seen[0]


def test_logs_go_to_a_private_directory_and_never_through_a_link(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    logs = private_log_dir()
    assert logs == tmp_path / f"vtune-logs-{os.getuid()}"
    assert stat.S_IMODE(logs.stat().st_mode) == 0o700
    server = VllmServer(EngineSettings("m"), LaunchConfig(command=("true",), device="cpu"))
    assert server.log_path.parent == logs
    victim = tmp_path / "victim"
    victim.write_text("keep")
    planted = logs / "trial.log"
    planted.symlink_to(victim)
    log, path = create_log(planted)  # the name is taken: the next free one, never the link
    with log:
        log.write("ours")
    assert path == logs / "trial.1.log" and path.read_text() == "ours"
    assert victim.read_text() == "keep"
    with pytest.raises(EngineError, match="cannot write"):
        reopen_log(planted)  # O_NOFOLLOW
    logs.chmod(0o755)
    with pytest.raises(EngineError, match="not a private directory"):
        private_log_dir()
    logs.chmod(0o700)
    os.rename(logs, tmp_path / "elsewhere")
    logs.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(EngineError, match="not a private directory"):
        private_log_dir()


def test_a_port_retry_rewrites_its_own_log_and_a_rerun_keeps_the_old_one(fake) -> None:
    server = fake("ok")
    with server:
        first = server.log_path
    again = VllmServer(server.settings, server.launch, log_path=first)
    with again:
        pass
    assert again.log_path == first.with_name(first.name.removesuffix(".log") + ".1.log")
    assert first.read_text().startswith("# vtune:") and again.log_path.read_text()
