"""A fake vLLM *process* for process-level tests of the whole CLI (signals, kills, reruns,
faults injected with strace): it takes vLLM's API-server arguments, serves the fake
OpenAI-compatible endpoints of :mod:`tests.fakes` on ``--host``/``--port``, and logs the lines
vtune reads from vLLM's log (version, KV cache size). Real processes, real ports, no model.

Run it through ``tests/bin/fake-vllm-python`` given as ``--vllm-python``. Environment knobs:
``FAKE_VLLM_STARTUP_S`` (seconds from the process's start before /health answers),
``FAKE_VLLM_TTFT_S`` and ``FAKE_VLLM_TOKEN_S`` (latency; the per-token delay grows with the
requests in flight beyond ``--max-num-seqs``, so throughput responds to batching),
``FAKE_VLLM_FAIL`` (``oom`` or ``unsupported``: log vLLM's message for that failure and exit 1),
``VLLM_API_KEY`` (require ``Authorization: Bearer KEY``, answer 401 otherwise, as vLLM does),
``FAKE_VLLM_SHM=1`` (map a /dev/shm file, logged as ``shm PATH``, removed on a clean exit). The
log says ``fake vLLM: first request`` when the load begins, and ``fake vLLM: cpus 0,1 bind 0-1
port N`` once it listens (its CPU affinity and ``VLLM_CPU_OMP_THREADS_BIND``). ``/metrics``
counts prefix cache queries and hits as vLLM does (off with ``--no-enable-prefix-caching``).
"""

from __future__ import annotations

import time

# FAKE_VLLM_STARTUP_S counts from here: the imports below (aiohttp, 0.4 s of CPU) are part of
# the start-up, not added to it, so a trial costs fixed seconds on a busy machine too.
STARTED = time.monotonic()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiohttp import web  # noqa: E402

from tests.fakes import Behaviour, FakeServer  # noqa: E402

FAILURES = {
    "oom": "ValueError: No available memory for the cache blocks. Try increasing "
    "`gpu_memory_utilization` when initializing the engine.",
    "unsupported": "ValueError: fake: this option is not supported on this platform",
}


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=1 << 30)
    p.add_argument("--served-model-name", default=None)
    # vLLM V1 caches prefixes unless told not to (--no-enable-prefix-caching).
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    args, _ = p.parse_known_args(argv)
    return args


async def _serve(args: argparse.Namespace) -> None:
    env = os.environ
    shm = _map_shm() if env.get("FAKE_VLLM_SHM") else None  # mapped early, as vLLM does
    startup_s = float(env.get("FAKE_VLLM_STARTUP_S", "0.5"))
    await asyncio.sleep(max(0.0, startup_s - (time.monotonic() - STARTED)))
    behaviour = Behaviour(
        ttft_s=float(env.get("FAKE_VLLM_TTFT_S", "0.01")),
        token_delay_s=float(env.get("FAKE_VLLM_TOKEN_S", "0.002")),
        text="a",
    )
    fake = FakeServer(
        behaviour,
        model=args.served_model_name or args.model,
        prefix_caching=args.enable_prefix_caching,
    )
    key = env.get("VLLM_API_KEY")
    loaded: list[bool] = []

    @web.middleware
    async def auth(request: web.Request, handler):  # type: ignore[no-untyped-def]
        if (
            key
            and request.path.startswith("/v1")
            and (request.headers.get("Authorization") != f"Bearer {key}")
        ):
            return web.json_response({"error": "Unauthorized"}, status=401)
        if request.path.startswith("/v1/") and request.method == "POST":
            if not loaded:
                loaded.append(True)
                print("fake vLLM: first request", flush=True)  # "under load" for fault tests
            # Past max_num_seqs in flight, requests queue: slower tokens, as a saturated engine.
            over = max(0, fake.stats.in_flight - args.max_num_seqs)
            fake.behaviour.token_delay_s = behaviour.token_delay_s * (1 + over)
        return await handler(request)

    app = web.Application(middlewares=[auth])
    app.router.add_post("/v1/completions", fake._complete)
    app.router.add_post("/v1/chat/completions", fake._complete)
    app.router.add_get("/health", fake._health)
    app.router.add_get("/v1/models", fake._models)
    app.router.add_get("/metrics", fake._metrics)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    tokens = args.kv_cache_memory_bytes // 4096
    print(f"INFO fake vLLM version 0.32.0 serving {args.model} on port {args.port}", flush=True)
    # Where it runs, for the tests of `vtune search --workers` (each worker its own CPUs).
    cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    bind = env.get("VLLM_CPU_OMP_THREADS_BIND", "-")
    print(f"fake vLLM: cpus {cpus} bind {bind} port {args.port}", flush=True)
    print(
        f"INFO CPU KV cache size: {tokens:,} tokens, Maximum concurrency for 512 tokens per "
        f"request: {tokens / 512:.2f}x",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    if shm is not None:
        os.unlink(shm)  # a clean exit removes it, as vLLM's resource tracker does


def _map_shm() -> str:
    """Map a /dev/shm file as vLLM's message queues do (``FAKE_VLLM_SHM=1``): a SIGKILLed
    server leaves it behind unless whoever kills it unlinks it. Logged as ``shm PATH``."""
    import mmap

    path = f"/dev/shm/fake-vllm-{os.getpid()}"
    with open(path, "wb") as fh:
        fh.truncate(4096)
    with open(path, "r+b") as fh:
        _MAPPED.append(mmap.mmap(fh.fileno(), 4096))
    print(f"shm {path}", flush=True)
    return path


_MAPPED: list[object] = []


def main(argv: list[str]) -> int:
    args = _args(argv)
    failure = os.environ.get("FAKE_VLLM_FAIL")
    if failure:
        print(f"ERROR fake engine: {FAILURES[failure]}", flush=True)
        return 1
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
