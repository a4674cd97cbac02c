"""How faithfully does vtune replay a trace? Scheduled against actual send times, beside GuideLLM.

    .venv/bin/python benchmarks/replay_fidelity.py [--requests 1000] [--rate 50] \\
        [--burstiness 0.5] [--guidellm PATH] [--out DIR]

A synthetic trace of ``--requests`` requests (bursty: gamma gaps of shape ``--burstiness``,
mean ``--rate`` req/s; lognormal lengths) is written in the Mooncake format (``timestamp`` in
ms, ``input_length``, ``output_length``, ``hash_ids``: one fresh id per 512-token block, so
no reuse), then replayed against a trivial local streaming server
(``tests/fake_vllm_process.py``: tests/fakes.py's FakeServer in its own process, 10 ms to the
first token, 1 ms a token) by

1. vtune: ``--dataset trace:FILE`` as ``vtune bench`` builds it (replay at recorded times),
   chat endpoint; per request its scheduled send time (``due``) and when it was sent;
2. GuideLLM (``guidellm run --profile kind=replay,schedule_turn=timestamp`` with the
   ``mooncake`` data kind; GuideLLM reads the ``timestamp`` column as seconds, so the trace's
   milliseconds are scaled by ``time_scale=0.001``): per request ``targeted_start`` and
   ``request_start`` from its JSON output. GuideLLM is not a dependency of vtune: give its
   executable with ``--guidellm`` (e.g. installed into its own virtualenv), else the script
   looks for ``guidellm`` on PATH; without it vtune is compared with the trace itself.

Both are checked against the trace too: each request's scheduled offset from the first must
equal its recorded offset. Prints lag percentiles (actual minus scheduled send time) and writes
``replay_fidelity.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuner.load.conversations import synthetic_trace  # noqa: E402
from tuner.load.trace import HASH_BLOCK_TOKENS  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_mooncake(path: Path, n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """The trace in Mooncake's fields; returns the recorded offsets in seconds."""
    reqs = synthetic_trace(n, seed=seed, rate=rate, burstiness=burstiness, sessions=0)
    t0, next_id, offsets, lines = reqs[0].arrival_s, 0, [], []
    for r in reqs:
        assert r.input_tokens is not None
        blocks = math.ceil(r.input_tokens / HASH_BLOCK_TOKENS)
        ids = list(range(next_id, next_id + blocks))
        next_id += blocks
        ms = round((r.arrival_s - t0) * 1000.0, 3)
        offsets.append(ms / 1000.0)
        row = {"timestamp": ms, "input_length": r.input_tokens, "output_length": r.output_tokens}
        lines.append(json.dumps({**row, "hash_ids": ids}))
    path.write_text("\n".join(lines) + "\n")
    return offsets


class FakeServerProcess:
    """tests/fake_vllm_process.py on a free port, stopped on exit."""

    def __init__(self, model: Path, log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "FAKE_VLLM_STARTUP_S": "0",
            "FAKE_VLLM_TTFT_S": "0.01",
            "FAKE_VLLM_TOKEN_S": "0.001",
        }
        argv = [sys.executable, str(ROOT / "tests" / "fake_vllm_process.py")]
        argv += ["--model", str(model), "--port", str(self.port), "--max-num-seqs", "100000"]
        self.log = log.open("w")
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self) -> FakeServerProcess:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the fake server did not come up")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def lag_stats(scheduled: list[float], actual: list[float], recorded: list[float]) -> dict[str, Any]:
    """Lag (actual - scheduled) percentiles in ms, and how far the schedule itself strays from
    the recorded offsets (both measured from the first request)."""
    s, a, r = (np.asarray(x, dtype=float) for x in (scheduled, actual, recorded))
    lag = (a - s) * 1000.0
    drift = ((s - s.min()) - (r - r.min())) * 1000.0
    return {
        "requests": int(lag.size),
        "lag_ms": {
            "p50": float(np.percentile(lag, 50)),
            "p90": float(np.percentile(lag, 90)),
            "p99": float(np.percentile(lag, 99)),
            "max": float(lag.max()),
            "mean": float(lag.mean()),
        },
        "late_over_10ms": float((lag > 10.0).mean()),
        "schedule_vs_trace_ms": {"max_abs": float(np.abs(drift).max())},
        "span_s": float(a.max() - a.min()),
    }


def run_vtune(trace: Path, model: Path, url: str, recorded: list[float]) -> dict[str, Any]:
    from tuner.load.generator import LoadConfig, run_load
    from tuner.load.prompts import load_tokenizer
    from tuner.load.workload import WorkloadSpec, build_requests
    from tuner.measure.session import run_async

    n = len(recorded)
    spec = WorkloadSpec(num_prompts=n, trace=trace, output_len=None, replay=True)
    requests = build_requests(load_tokenizer(model), spec, endpoint="chat")
    cfg = LoadConfig(timeout_s=120.0, endpoint="chat")
    result = run_async(run_load(url, str(model), requests, cfg))
    records = sorted(result.measured, key=lambda r: r.index)
    errors = sum(1 for r in records if not r.ok)
    by_at = [recorded[r.index] for r in records]
    stats = lag_stats([r.due or 0.0 for r in records], [r.start for r in records], by_at)
    return {"tool": "vtune", "errors": errors, **stats}


def run_guidellm(
    exe: str, trace: Path, model: Path, url: str, out: Path, recorded: list[float]
) -> dict[str, Any]:
    report = out / "guidellm.json"
    data = {
        "kind": "mooncake",
        "time_scale": 0.001,
        "source": {"kind": "json_file", "path": str(trace)},
    }
    argv = [
        exe, "run",
        "--backend", f"kind=openai_http,target={url}",
        "--profile", "kind=replay,schedule_turn=timestamp",
        "--data", json.dumps(data),
        "--tokenizer", f"kind=hf_auto,model={model}",
        "--output", f"kind=json,path={report}",
        "--disable-console-interactive",
    ]  # fmt: skip
    with (out / "guidellm.log").open("w") as log:
        subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=1800)
    bench = json.loads(report.read_text())["benchmarks"][0]
    done = bench["requests"]["successful"]
    errors = len(bench["requests"].get("errored") or [])
    rows = []
    for r in done:
        timings = r["info"]["timings"]
        rel = (r["info"].get("settings") or {}).get("relative_timestamp")
        rows.append((timings["targeted_start"], timings["request_start"], rel))
    rows.sort()
    # relative_timestamp is the trace offset after the dataset-side time_scale: seconds.
    rel_times = [row[2] if row[2] is not None else math.nan for row in rows]
    stats = lag_stats([row[0] for row in rows], [row[1] for row in rows], rel_times)
    return {"tool": "guidellm", "errors": errors, "completed": len(done), **stats}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--rate", type=float, default=50.0)
    p.add_argument("--burstiness", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--guidellm", default=os.environ.get("GUIDELLM") or shutil.which("guidellm"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="vtune-replay-"))
    out.mkdir(parents=True, exist_ok=True)

    from tuner.tiny import build_tiny_model

    model = build_tiny_model(out / "tiny-model")
    trace = out / "trace.jsonl"
    recorded = write_mooncake(trace, args.requests, args.rate, args.burstiness, args.seed)
    results = []
    with FakeServerProcess(model, out / "server.log") as server:
        results.append(run_vtune(trace, model, server.url, recorded))
        if args.guidellm:
            results.append(run_guidellm(args.guidellm, trace, model, server.url, out, recorded))
    doc = {
        "trace": {
            "requests": args.requests,
            "rate": args.rate,
            "burstiness": args.burstiness,
            "span_s": recorded[-1],
        },
        "compared_with": "guidellm" if args.guidellm else "the trace itself",
        "results": results,
    }
    (out / "replay_fidelity.json").write_text(json.dumps(doc, indent=2))
    print(
        f"trace: {args.requests} requests over {recorded[-1]:.1f} s (gamma shape "
        f"{args.burstiness}, {args.rate:g} req/s); server: fake, 10 ms TTFT, 1 ms/token"
    )
    print(
        f"{'tool':<10}{'sent':>6}{'p50 lag':>10}{'p90':>9}{'p99':>9}{'max':>9}{'>10ms':>8}"
        f"{'sched-trace':>13}"
    )
    for r in results:
        lag = r["lag_ms"]
        print(
            f"{r['tool']:<10}{r['requests']:>6}{lag['p50']:>9.2f}m{lag['p90']:>8.2f}m"
            f"{lag['p99']:>8.2f}m{lag['max']:>8.1f}m{r['late_over_10ms']:>8.1%}"
            f"{r['schedule_vs_trace_ms']['max_abs']:>12.3f}m"
        )
    print(
        "lag: actual minus scheduled send time (m = ms); sched-trace: largest gap between a "
        "scheduled offset and the recorded one"
    )
    print(f"written: {out / 'replay_fidelity.json'}")


if __name__ == "__main__":
    main()
