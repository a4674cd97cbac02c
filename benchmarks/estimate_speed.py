"""How long does `vtune estimate` take on a bundled card? Target: well under a second.

    .venv/bin/python benchmarks/estimate_speed.py [--runs 10]

Times the whole command as a user runs it (a fresh process: interpreter start, imports, card
lookup, estimate, printing), side by side with a bare ``python -c pass`` in the same run, and
the in-process estimate alone. Prints medians and the ratio to the bare interpreter.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ESTIMATE = [sys.executable, "-m", "tuner", "estimate", "--model", "llama-3.1-8b", "--gpu", "h100"]
ESTIMATE += ["--max-model-len", "8192"]
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "vtune estimate --json": [*ESTIMATE, "--json"],
    "vtune estimate (table)": ESTIMATE,
}


def time_command(argv: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return times


def time_in_process(runs: int) -> list[float]:
    from tuner.analytic.estimate import ServingConfig, estimate
    from tuner.specs.gpu import get_gpu
    from tuner.specs.model import load_model

    times = []
    for _ in range(runs):
        start = time.perf_counter()
        estimate(load_model("llama-3.1-8b"), get_gpu("h100"), ServingConfig(max_model_len=8192))
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    results = {name: time_command(argv, args.runs) for name, argv in COMMANDS.items()}
    results["estimate() in-process"] = time_in_process(args.runs * 10)
    bare = statistics.median(results["python -c pass"])
    print(f"{'what':28s} {'median s':>10s} {'max s':>8s} {'x bare python':>14s}")
    for name, times in results.items():
        med = statistics.median(times)
        print(f"{name:28s} {med:10.4f} {max(times):8.4f} {med / bare:14.1f}")
    cli = statistics.median(results["vtune estimate --json"])
    verdict = "OK" if cli < 1.0 else "TOO SLOW"
    print(f"\nvtune estimate: {cli:.3f} s median over {args.runs} runs (target < 1 s): {verdict}")


if __name__ == "__main__":
    main()
