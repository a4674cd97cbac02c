"""Is `vtune search` worth it? The exhaustive grid vs vtune's search, same space and SLO, vLLM CPU.

    .venv/bin/python benchmarks/search_efficiency.py [--model DIR] [--out DIR] [--budget N]

Runs the same space twice on the tiny model: once as the full grid (every candidate measured,
``--sampler grid --repeats 0``), once as vtune searches it by default (analytic order first,
then TPE, with ``--budget`` trials, finalists re-measured). Prints engine time (the sum of
each run's vLLM launches and measurements, finalist re-runs included) as a ratio, and the
regret: how far vtune's chosen candidate is from the grid's best, both valued by the grid's
own measurement of them (so one noisy run does not flatter either side).
Target: within 3 % of the grid's best at no more than 25 % of its engine time.
Takes about 30 minutes on 2 cores (the grid dominates).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPACE = {
    "max_num_seqs": [4, 8, 16, 32, 64, 128, 256, 512],
    "max_num_batched_tokens": [1024, 2048, 4096],
}
SLO = "ttft:p95<1s;tpot:p95<100ms"


def run(model: Path, out: Path, extra: list[str]) -> tuple[dict, float]:
    space = out / "space.yaml"
    space.parent.mkdir(parents=True, exist_ok=True)
    space.write_text("".join(f"{k}: {v}\n" for k, v in SPACE.items()))
    argv = [
        sys.executable,
        "-m",
        "tuner",
        "search",
        "--model",
        str(model),
        "--gpu",
        "cpu",
        "--slo",
        SLO,
        "--space",
        str(space),
        "--input-len",
        "128",
        "--output-len",
        "64",
        "--seconds-per-point",
        "5",
        "--iterations",
        "2",
        "--out",
        str(out),
        *extra,
    ]
    start = time.monotonic()
    subprocess.run(argv, check=True, cwd=ROOT)
    wall = time.monotonic() - start
    record = json.loads(next(out.glob("*/cpu.json")).read_text())
    return record, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="tiny model dir (built if absent)")
    parser.add_argument("--out", type=Path, default=Path("runs/search-efficiency"))
    parser.add_argument("--budget", type=int, default=6)
    args = parser.parse_args()
    from tuner.tiny import build_tiny_model, default_tiny_model_dir

    model = build_tiny_model(args.model or default_tiny_model_dir())
    grid, grid_wall = run(model, args.out / "grid", ["--sampler", "grid", "--repeats", "0"])
    vt, vt_wall = run(model, args.out / "vtune", ["--budget", str(args.budget)])

    grid_value = {t["name"]: t["objective"] or 0.0 for t in grid["trials"]}
    grid_best = max(grid_value, key=grid_value.__getitem__)
    chosen = vt["best"]
    regret = 1 - grid_value.get(chosen, 0.0) / grid_value[grid_best]
    grid_engine = grid["study"]["engine_time_s"]
    vt_engine = vt["study"]["engine_time_s"] + vt["study"]["finalist_engine_time_s"]
    print(f"{'':24s} {'grid':>12s} {'vtune':>12s}")
    print(f"{'candidates measured':24s} {len(grid['trials']):12d} {len(vt['trials']):12d}")
    print(f"{'engine time (s)':24s} {grid_engine:12.0f} {vt_engine:12.0f}")
    print(f"{'wall time (s)':24s} {grid_wall:12.0f} {vt_wall:12.0f}")
    print(f"{'best candidate':24s} {grid_best:>12s} {chosen:>12s}")
    print(
        f"{'its grid objective':24s} {grid_value[grid_best]:12.0f} "
        f"{grid_value.get(chosen, 0.0):12.0f}"
    )
    ratio = vt_engine / grid_engine
    print(
        f"\nengine-time ratio vtune/grid: {ratio:.2f} (target <= 0.25); regret: "
        f"{regret:.1%} (target <= 3%)"
    )


if __name__ == "__main__":
    main()
