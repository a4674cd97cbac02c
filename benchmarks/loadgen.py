"""How fast is vtune's load generator? Side by side with vLLM's own benchmark client.

    .venv/bin/python benchmarks/loadgen.py [--requests 2000] [--concurrency 64] [--tokens 64]

A trivial streaming server (raw asyncio protocol, vLLM's /v1/completions chunk format, one SSE
event per token) runs in its own process pinned to one core; each client runs in a fresh
process pinned to the other core, so "per core" is literal. Two phases, same server and
workload for both clients:

1. throughput: closed loop at ``--concurrency`` with zero server delays — requests/s and
   streamed chunks/s the client sustains (the server is not the limit: it only copies bytes);
2. low load: concurrency 1, a fixed server TTFT and inter-token delay — mean and median TTFT
   of each client, next to the server's own delay (the true TTFT is that plus the network).

Prints a table and the ratios. Target: vtune >= 2x vLLM's client, TTFT agreeing within 1 ms.
vLLM's client is ``vllm.benchmarks.serve`` from the installed (CPU) build, run in-process via its
``main(args)`` with the random dataset, ``--ignore-eos`` and the tiny model's tokenizer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SERVER_CORE, CLIENT_CORE = 1, 0


# --- the trivial server ------------------------------------------------------------------------


def _chunk(payload: bytes) -> bytes:
    data = b"data: " + payload + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Streamer(asyncio.Protocol):
    """HTTP/1.1 keep-alive; POST -> chunked SSE stream; GET -> 200 empty (health, models)."""

    ttft = 0.0
    gap = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        self.buf = b""
        self.busy = False

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._next()

    def _next(self) -> None:
        if self.busy:
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end].decode("latin-1")
        length = 0
        for line in head.split("\r\n")[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == "content-length":
                length = int(v)
        if len(self.buf) < end + 4 + length:
            return
        body, self.buf = self.buf[end + 4 : end + 4 + length], self.buf[end + 4 + length :]
        if head.startswith("GET"):
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            self._next()
            return
        self.busy = True
        asyncio.get_running_loop().create_task(self._stream(json.loads(body)))

    async def _stream(self, req: dict) -> None:
        n = int(req.get("max_tokens", 16))
        prompt = req.get("prompt", [])
        n_in = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
        token = _chunk(
            json.dumps(
                {
                    "id": "cmpl-0",
                    "object": "text_completion",
                    "created": 0,
                    "model": req["model"],
                    "choices": [
                        {
                            "index": 0,
                            "text": " tok",
                            "logprobs": None,
                            "finish_reason": None,
                            "stop_reason": None,
                        }
                    ],
                    "usage": None,
                },
                separators=(",", ":"),
            ).encode()
        )
        usage = _chunk(
            json.dumps(
                {
                    "id": "cmpl-0",
                    "object": "text_completion",
                    "created": 0,
                    "model": req["model"],
                    "choices": [],
                    "usage": {
                        "prompt_tokens": n_in,
                        "total_tokens": n_in + n,
                        "completion_tokens": n,
                    },
                }
            ).encode()
        )
        w = self.t.write
        w(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        if self.ttft:
            await asyncio.sleep(self.ttft)
        for i in range(n):
            if i and self.gap:
                await asyncio.sleep(self.gap)
            elif i % 8 == 7:
                await asyncio.sleep(0)  # let other streams interleave, as a real server does
            if self.t.is_closing():
                return  # the client hung up
            w(token)
        if self.t.is_closing():
            return
        w(usage + _chunk(b"[DONE]") + b"0\r\n\r\n")
        self.busy = False
        self._next()


def _serve(port: int, ttft: float, gap: float, ready: mp.Event) -> None:  # type: ignore[valid-type]
    os.sched_setaffinity(0, {SERVER_CORE})
    _Streamer.ttft, _Streamer.gap = ttft, gap

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(_Streamer, "127.0.0.1", port)
        ready.set()
        async with server:
            await server.serve_forever()

    _run(main())


def _run(coro: object) -> object:
    try:
        import uvloop

        return uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]


# --- the two clients ----------------------------------------------------------------------------
# Each reports its own measured duration and throughput, and the CPU time spent generating the
# load: vtune's run_load (warm-up included); vLLM's benchmark() (ready check, warm-up, run) minus
# its calculate_metrics -- not the tokenizer loading, dataset sampling or summary statistics.


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _vtune_client(
    url: str, model: str, n: int, conc: int, n_in: int, n_out: int, q: mp.Queue
) -> None:
    os.sched_setaffinity(0, {CLIENT_CORE})
    from tuner.load.generator import LoadConfig, run_load
    from tuner.load.workload import LengthRange, load_tokenizer, random_requests
    from tuner.measure.metrics import summarize

    tok = load_tokenizer(model)
    reqs = random_requests(tok, n + 2, LengthRange.fixed(n_in), LengthRange.fixed(n_out))
    cfg = LoadConfig(concurrency=conc, warmup=2)
    c0 = _cpu()
    res = _run(run_load(url, model, reqs, cfg))
    cpu_s = _cpu() - c0
    s = summarize(res.records, res.window)  # type: ignore[attr-defined]
    q.put(_report(s.to_json(), cpu_s))


def _vllm_client(
    url: str, model: str, n: int, conc: int, n_in: int, n_out: int, q: mp.Queue
) -> None:
    os.sched_setaffinity(0, {CLIENT_CORE})
    import contextlib
    import io

    from vllm.benchmarks import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    inner, spent = serve.benchmark, []

    async def timed(*args: object, **kwargs: object) -> object:
        c0 = _cpu()
        try:
            return await inner(*args, **kwargs)
        finally:
            spent.append(_cpu() - c0)

    serve.benchmark = timed
    metrics_fn, in_metrics = serve.calculate_metrics, []

    def timed_metrics(*args: object, **kwargs: object) -> object:
        c0 = _cpu()
        try:
            return metrics_fn(*args, **kwargs)
        finally:
            in_metrics.append(_cpu() - c0)

    serve.calculate_metrics = timed_metrics
    parser = FlexibleArgumentParser()
    serve.add_cli_args(parser)
    argv = f"""--base-url {url} --model {model} --dataset-name random --random-input-len {n_in}
        --random-output-len {n_out} --num-prompts {n} --max-concurrency {conc} --ignore-eos
        --disable-tqdm --num-warmups 2 --ready-check-timeout-sec 30
        --percentile-metrics ttft,tpot,itl,e2el""".split()
    with contextlib.redirect_stdout(io.StringIO()):
        res = serve.main(parser.parse_args(argv))
    q.put(_report(res, spent[0] - sum(in_metrics)))


def _report(res: dict, cpu_s: float) -> dict:
    keys = (
        "completed",
        "failed",
        "duration",
        "request_throughput",
        "output_throughput",
        "mean_ttft_ms",
        "median_ttft_ms",
    )
    return {**{k: res[k] for k in keys}, "cpu_s": cpu_s}


def _client(fn: object, *args: object) -> dict:
    q: mp.Queue = mp.Queue()
    p = mp.Process(target=fn, args=(*args, q))  # type: ignore[arg-type]
    p.start()
    try:
        return q.get(timeout=600)
    finally:
        p.join(30)
        if p.is_alive():
            p.kill()


def _with_server(
    ttft: float, gap: float, port: int, runs: list[tuple[str, object, tuple]]
) -> dict[str, dict]:
    ready = mp.Event()
    srv = mp.Process(target=_serve, args=(port, ttft, gap, ready), daemon=True)
    srv.start()
    try:
        if not ready.wait(30):
            raise SystemExit("the trivial server did not start")
        url = f"http://127.0.0.1:{port}"
        return {name: _client(fn, url, *args) for name, fn, args in runs}
    finally:
        srv.kill()
        srv.join(5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model dir for the tokenizer (default: tiny)")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--ttft-ms", type=float, default=20.0, help="server TTFT in the low-load phase")
    ap.add_argument("--itl-ms", type=float, default=5.0, help="server ITL in the low-load phase")
    ap.add_argument("--low-load-requests", type=int, default=100)
    ap.add_argument("--port", type=int, default=18321)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        print("note: fewer than two cores; server and client share one", file=sys.stderr)
    model = a.model
    if model is None:
        from tuner.tiny import build_tiny_model, default_tiny_model_dir

        model = str(build_tiny_model(default_tiny_model_dir()))
    mp.set_start_method("spawn", force=True)

    shape = (a.requests, a.concurrency, a.input_len, a.tokens)
    # Alternate the clients (vllm, vtune, vllm, ...) so drifting background load hits both.
    runs = [
        (f"{name}#{i}", fn, (model, *shape))
        for i in range(a.repeats)
        for name, fn in (("vllm", _vllm_client), ("vtune", _vtune_client))
    ]
    fast = _with_server(0.0, 0.0, a.port, runs)
    low = (a.low_load_requests, 1, a.input_len, 16)
    slow = _with_server(
        a.ttft_ms / 1e3,
        a.itl_ms / 1e3,
        a.port + 1,
        [
            ("vllm", _vllm_client, (model, *low)),
            ("vtune", _vtune_client, (model, *low)),
        ],
    )

    print(
        f"\nthroughput: {a.requests} requests x {a.tokens} tokens, concurrency "
        f"{a.concurrency}, client on one core (core {CLIENT_CORE}), median of {a.repeats}"
    )
    head = ("client", "req/s", "chunks/s", "CPU s", "chunks/CPU-s", "failed")
    print(f"{head[0]:<8}" + "".join(f"{h:>13}" for h in head[1:]))
    med: dict[str, dict[str, float]] = {}
    for name in ("vllm", "vtune"):
        rs = [r for key, r in fast.items() if key.startswith(name + "#")]
        row = {
            "rps": statistics.median(r["request_throughput"] for r in rs),
            "cps": statistics.median(r["output_throughput"] for r in rs),
            "cpu": statistics.median(r["cpu_s"] for r in rs),
            "per_cpu": statistics.median(r["completed"] * a.tokens / r["cpu_s"] for r in rs),
            "failed": max(r["failed"] for r in rs),
        }
        med[name] = row
        print(
            f"{name:<8}{row['rps']:>13.1f}{row['cps']:>13.0f}{row['cpu']:>13.2f}"
            f"{row['per_cpu']:>13.0f}{row['failed']:>13}"
        )
    wall = med["vtune"]["rps"] / med["vllm"]["rps"]
    per_cpu = med["vtune"]["per_cpu"] / med["vllm"]["per_cpu"]
    print(
        f"ratio vtune / vllm: {wall:.2f}x requests/s (wall), {per_cpu:.2f}x chunks per "
        "CPU-second (target >= 2x)"
    )
    print(
        f"\nlow load: concurrency 1, server TTFT {a.ttft_ms} ms, ITL {a.itl_ms} ms, "
        f"{a.low_load_requests} requests"
    )
    for name in ("vllm", "vtune"):
        r = slow[name]
        print(
            f"{name:<8} TTFT mean {r['mean_ttft_ms']:.3f} ms, median {r['median_ttft_ms']:.3f} ms"
            f" (server's own delay {a.ttft_ms:.1f} ms)"
        )
    diff = slow["vtune"]["mean_ttft_ms"] - slow["vllm"]["mean_ttft_ms"]
    mdiff = slow["vtune"]["median_ttft_ms"] - slow["vllm"]["median_ttft_ms"]
    print(
        f"TTFT difference vtune - vllm: mean {diff:+.3f} ms, median {mdiff:+.3f} ms "
        "(target |diff| <= 1 ms)"
    )
    ok = min(wall, per_cpu) >= 2.0 and abs(diff) <= 1.0
    print("PASS" if ok else "BELOW TARGET")


if __name__ == "__main__":
    main()
