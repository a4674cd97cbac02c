"""Does sampling telemetry slow the load? Client capacity with and without the psutil sampler.

    .venv/bin/python benchmarks/telemetry_overhead.py [--requests 1500] [--concurrency 64]
        [--tokens 64] [--period 0.1] [--repeats 3]

The trivial streaming server of ``benchmarks/loadgen.py`` (vLLM's /v1/completions chunk format,
zero delays) runs in a child process pinned to core 1; the client, vtune's ``run_load``, runs
closed-loop in this process pinned to core 0, so it is the bottleneck: its streamed chunks per
second are the capacity. Runs alternate without and with a
:class:`~tuner.measure.telemetry.Sampler` over a
:class:`~tuner.measure.telemetry_cpu.ProcessTreeSource` rooted at this process (this process and
the server: a tree like vLLM's), at ``--period`` seconds, its thread in the client's process and
on the client's core. Prints each run, the medians and the ratio with / without (target >= 0.98).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import loadgen  # noqa: E402  (the trivial server, shared with the load-generator benchmark)

from tuner.load.generator import LoadConfig, run_load  # noqa: E402
from tuner.load.workload import Request  # noqa: E402
from tuner.measure.metrics import summarize  # noqa: E402
from tuner.measure.telemetry import Sampler, Telemetry  # noqa: E402
from tuner.measure.telemetry_cpu import ProcessTreeSource  # noqa: E402

MODEL = "trivial"


def _cpu() -> float:
    """CPU seconds of this process, all threads (the client and the sampler's thread)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def reading_cost(reads: int = 200) -> tuple[float, float]:
    """(CPU ms, wall ms) of one ProcessTreeSource reading of this process tree, averaged."""
    source = ProcessTreeSource(os.getpid())
    source.start()
    source.read()
    c0, t0 = time.thread_time(), time.perf_counter()
    for _ in range(reads):
        source.read()
    cpu, wall = time.thread_time() - c0, time.perf_counter() - t0
    source.close()
    return cpu / reads * 1e3, wall / reads * 1e3


def one_run(url: str, n: int, conc: int, n_out: int, period: float | None) -> dict:
    """One closed-loop load; with a sampler around it when ``period`` is given."""
    requests = [Request(tuple(range(1, 33)), 32, n_out) for _ in range(n + 4)]
    cfg = LoadConfig(concurrency=conc, warmup=4)
    sampler = Sampler(ProcessTreeSource(os.getpid()), period) if period else None
    if sampler is not None:
        sampler.start()
    c0 = _cpu()
    try:
        result = loadgen._run(run_load(url, MODEL, requests, cfg))
    finally:
        tele: Telemetry | None = sampler.stop() if sampler is not None else None
    cpu_s = _cpu() - c0
    summary = summarize(result.records, result.window)  # type: ignore[attr-defined]
    row = {
        "sampler": period is not None,
        "chunks_per_s": summary.output_throughput,
        "requests_per_s": summary.request_throughput,
        "chunks_per_cpu_s": (n + 4) * n_out / cpu_s,
        "failed": summary.failed,
    }
    if tele is not None:
        inside = tele.between(result.window.start, result.window.end)  # type: ignore[attr-defined]
        row |= {
            "samples": inside.samples,
            "errors": tele.errors,
            "cpu_percent_total": inside.mean.get("cpu_percent_total", float("nan")),
            "num_processes": inside.max.get("num_processes", float("nan")),
        }
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    ap.add_argument("--period", type=float, default=0.1, help="sampling period, seconds")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--port", type=int, default=18341)
    a = ap.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        print("note: fewer than two cores; server and client share one", file=sys.stderr)
    mp.set_start_method("spawn", force=True)
    ready = mp.Event()
    server = mp.Process(target=loadgen._serve, args=(a.port, 0.0, 0.0, ready), daemon=True)
    server.start()
    os.sched_setaffinity(0, {loadgen.CLIENT_CORE})
    rows = []
    try:
        if not ready.wait(30):
            raise SystemExit("the trivial server did not start")
        url = f"http://127.0.0.1:{a.port}"
        one_run(url, 200, a.concurrency, a.tokens, None)  # warm the client and the server
        for i in range(a.repeats):  # alternate, so drifting background load hits both
            for period in (None, a.period):
                row = one_run(url, a.requests, a.concurrency, a.tokens, period)
                rows.append(row)
                extra = (
                    f"  sampler: {row['samples']} samples, {row['errors']} errors, "
                    f"tree CPU {row['cpu_percent_total']:.0f} %, "
                    f"{row['num_processes']:.0f} processes"
                    if period
                    else ""
                )
                print(
                    f"run {i + 1} {'with   ' if period else 'without'}: "
                    f"{row['chunks_per_s']:9,.0f} chunks/s {row['requests_per_s']:7.1f} req/s "
                    f"{row['chunks_per_cpu_s']:9,.0f} chunks/CPU-s failed {row['failed']}{extra}",
                    flush=True,
                )
        cost_cpu, cost_wall = reading_cost()
    finally:
        server.kill()
        server.join(5)

    def med(key: str, sampled: bool) -> float:
        return statistics.median(r[key] for r in rows if r["sampler"] == sampled)

    wall = med("chunks_per_s", True) / med("chunks_per_s", False)
    per_cpu = med("chunks_per_cpu_s", True) / med("chunks_per_cpu_s", False)
    print(
        f"\nmedian of {a.repeats}: without {med('chunks_per_s', False):,.0f} chunks/s, with the "
        f"sampler at {a.period} s {med('chunks_per_s', True):,.0f} chunks/s"
    )
    print(f"ratio with / without: {wall:.3f} chunks/s (wall), {per_cpu:.3f} chunks per CPU-second")
    print(
        f"one reading of this tree: {cost_cpu:.2f} ms CPU ({cost_wall:.2f} ms wall), "
        f"{cost_cpu / (a.period * 1e3):.1%} of one core at a {a.period} s period"
    )
    ok = min(wall, per_cpu) >= 0.98
    print("PASS" if ok else "BELOW TARGET (wall figures on a shared machine are noisy)")


if __name__ == "__main__":
    main()
