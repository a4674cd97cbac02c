"""Is `vtune search` worth it? The exhaustive grid vs vtune's search, same space and SLO, vLLM CPU.

    .venv/bin/python benchmarks/search_efficiency.py [--model DIR] [--out DIR] [--budget N]
        [--referee N] [--reuse]

Runs the same space twice on the tiny model: once as the full grid (every candidate measured,
``--sampler grid --repeats 0``), once as vtune searches it by default (analytic picks first,
then TPE, with ``--budget`` trials, finalists re-measured). Prints engine time (the sum of
each run's vLLM launches and measurements, finalist re-runs included) as a ratio, and regret:
how far vtune's choice is from the grid's best.

Regret is printed twice. By the grid's own single measurement of both candidates, and by a
referee: both candidates measured again, ``--referee`` rounds each, alternating, every round
a fresh launch and a full trial (capacity probe and rate search), compared on the means with
95 % intervals. On 2 shared CPU cores one measurement varies by 15 % or more (the grid's
baseline and its identical ``seqs128-mbt2048`` differ that much), so the grid's best is partly
the luckiest draw; the referee is the comparison that noise does not decide.
Target: within 3 % of the grid's best at no more than 25 % of its engine time.
Takes about 45 minutes on 2 cores (the grid dominates); ``--reuse`` keeps finished runs.
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


def search_argv(model: Path, out: Path, extra: list[str]) -> list[str]:
    space = out / "space.yaml"
    space.parent.mkdir(parents=True, exist_ok=True)
    space.write_text("".join(f"{k}: {v}\n" for k, v in SPACE.items()))
    return [
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


def run(argv: list[str], out: Path, reuse: bool) -> tuple[dict, float | None]:
    """The search's JSON record and its wall time (None when a finished record was reused)."""
    found = next(out.glob("*/cpu.json"), None)
    if reuse and found is not None:
        return json.loads(found.read_text()), None
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "tuner", "search", *argv], check=True, cwd=ROOT)
    wall = time.monotonic() - start
    return json.loads(next(out.glob("*/cpu.json")).read_text()), wall


def referee(argv: list[str], names: list[str], rounds: int) -> dict[str, list[float]]:
    """Each named candidate measured ``rounds`` times as a full trial (own launch, capacity
    probe, rate search), alternating so that drift of the machine hits both alike."""
    from tuner.cli.search import tune_config
    from tuner.search.prepare import prepare
    from tuner.search.run import trial_setup
    from tuner.search.trial import VllmTrialRunner

    prep = prepare(tune_config(argv))
    runner = VllmTrialRunner(trial_setup(prep))
    planned = {p.name: p for p in prep.plan.all()}
    missing = [n for n in names if n not in planned]
    if missing:  # e.g. a reused grid from code that planned differently
        sys.exit(f"referee: {', '.join(missing)} not in today's plan; rerun without --reuse")
    values: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            cand = planned[name]
            variant = prep.target.variants[cand.candidate.quantization or "none"]
            record = runner.measure(1000 + i, cand, variant)
            values[name].append(record.objective or 0.0)
            print(f"referee round {i + 1}: {name} {values[name][-1]:,.0f}", flush=True)
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="tiny model dir (built if absent)")
    parser.add_argument("--out", type=Path, default=Path("runs/search-efficiency"))
    parser.add_argument("--budget", type=int, default=6)
    parser.add_argument("--referee", type=int, default=3, help="re-measurements of each pick")
    parser.add_argument("--reuse", action="store_true", help="keep finished grid/vtune runs")
    args = parser.parse_args()
    from tuner.search.record import Finalist
    from tuner.tiny import build_tiny_model, default_tiny_model_dir

    model = build_tiny_model(args.model or default_tiny_model_dir())
    grid_argv = search_argv(model, args.out / "grid", ["--sampler", "grid", "--repeats", "0"])
    vt_argv = search_argv(model, args.out / "vtune", ["--budget", str(args.budget)])
    grid, grid_wall = run(grid_argv, args.out / "grid", args.reuse)
    vt, vt_wall = run(vt_argv, args.out / "vtune", args.reuse)

    grid_value = {t["name"]: t["objective"] or 0.0 for t in grid["trials"]}
    grid_best = max(grid_value, key=grid_value.__getitem__)
    chosen = vt["best"]
    grid_engine = grid["study"]["engine_time_s"]
    vt_engine = vt["study"]["engine_time_s"] + vt["study"]["finalist_engine_time_s"]

    def wall(w: float | None) -> str:
        return "reused" if w is None else f"{w:.0f}"

    print(f"{'':24s} {'grid':>16s} {'vtune':>16s}")
    print(f"{'candidates measured':24s} {len(grid['trials']):16d} {len(vt['trials']):16d}")
    print(f"{'engine time (s)':24s} {grid_engine:16.0f} {vt_engine:16.0f}")
    print(f"{'wall time (s)':24s} {wall(grid_wall):>16s} {wall(vt_wall):>16s}")
    print(f"{'best candidate':24s} {grid_best:>16s} {chosen:>16s}")
    print(
        f"{'its grid objective':24s} {grid_value[grid_best]:16.0f} "
        f"{grid_value.get(chosen, 0.0):16.0f}"
    )
    ratio = vt_engine / grid_engine
    print(f"\nengine-time ratio vtune/grid: {ratio:.2f} (target <= 0.25)")
    by_grid = 1 - grid_value.get(chosen, 0.0) / grid_value[grid_best]
    print(f"regret by the grid's single measurements: {by_grid:.1%} (target <= 3%)")
    if chosen == grid_best:
        print("referee: not needed, vtune chose the grid's best")
        return
    if args.referee < 2:
        return
    samples = referee(vt_argv, [grid_best, chosen], args.referee)
    best_f, chosen_f = (Finalist.of(n, samples[n]) for n in (grid_best, chosen))
    for f in (best_f, chosen_f):
        print(f"referee {f.name}: mean {f.mean:,.0f} [{f.ci_low:,.0f}, {f.ci_high:,.0f}]")
    regret = 1 - chosen_f.mean / best_f.mean
    verdict = "within noise" if best_f.overlaps(chosen_f) else "outside noise"
    print(f"regret by the referee's means: {regret:.1%} ({verdict}; target <= 3%)")


if __name__ == "__main__":
    main()
