"""The device check of issue 12, prepared for a lent GPU: `vtune probe`, then the NVML sampler
under a torch decode-shaped workload at a ladder of batches, each placed on the roofline.

    python3 benchmarks/gpu_knee_check.py [--layers 32] [--seconds 3] [--out DIR]
    python3 benchmarks/gpu_knee_check.py --device cpu --layers 2 --hidden 512   # a smoke run

Needs torch (and nvidia-ml-py on a GPU), no vLLM. One "decode step" is every layer's
Llama-3.1-8B-shaped projections (q/k/v/o, gate/up, down; bf16, random) applied to a batch of B
tokens, run back to back for ``--seconds`` per batch while a
:class:`~tuner.measure.telemetry.Sampler` reads NVML (the process tree on a CPU). For each
batch it prints steps/s, achieved bandwidth (weight bytes x steps/s) and FLOP/s (2 x params x B
x steps/s) as fractions of the probed peaks, vtune's regime for them, and what NVML saw
(kernel-busy %, memory-controller %, SM clock, power). The JSON goes to ``--out``
(``$OUT`` on the device machine). The probe is cached under ``--out``, not the user's cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuner.analytic.roofline import classify  # noqa: E402
from tuner.measure.telemetry import Sampler  # noqa: E402


def projections(hidden: int) -> list[tuple[int, int]]:
    """One Llama-3.1-8B-shaped layer's (in, out) matrices at ``hidden`` (GQA 4:1, MLP 3.5x)."""
    kv, mlp = hidden // 4, int(hidden * 3.5)
    return [(hidden, hidden + 2 * kv), (hidden, hidden), (hidden, 2 * mlp), (mlp, hidden)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--batches", default="1,16,64,256,1024")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    os.environ["VTUNE_PROBE_DIR"] = str(a.out / "probe")

    import torch

    from tuner.specs.probe import run_probe

    t0 = time.perf_counter()
    run = run_probe("cpu" if a.device == "cpu" else None)
    probe = run.result
    bf16 = max(probe.peak_flops.get("bf16", 0.0), probe.peak_flops.get("fp32", 0.0))
    print(
        f"probe ({time.perf_counter() - t0:.1f} s): {probe.device_name}: "
        f"{probe.memory_bandwidth / 1e12:.3f} TB/s copy, {bf16 / 1e12:.1f} TFLOP/s bf16; "
        f"datasheet fractions {run.to_json()['fractions_of_datasheet']}",
        flush=True,
    )
    dtype = torch.bfloat16
    shapes = projections(a.hidden) * a.layers
    weights = [torch.randn(i, o, device=a.device).to(dtype) for i, o in shapes]
    params = sum(i * o for i, o in shapes)
    weight_bytes = 2 * params
    if a.device == "cuda":
        from tuner.measure.telemetry_nvidia import NvmlSource

        source = NvmlSource([0])
        sync = torch.cuda.synchronize
    else:
        from tuner.measure.telemetry_cpu import ProcessTreeSource

        source, sync = ProcessTreeSource(os.getpid()), (lambda: None)
    rows = []
    for batch in (int(b) for b in a.batches.split(",")):
        inputs = {n: torch.randn(batch, n, device=a.device).to(dtype) for n, _ in set(shapes)}

        def step(inputs: dict = inputs) -> None:
            for w in weights:  # each projection reads its whole matrix, as a decode step does
                torch.matmul(inputs[w.shape[0]], w)

        step()
        sync()
        steps = 0
        with Sampler(source, 0.05) as sampler:
            start = time.perf_counter()
            while time.perf_counter() - start < a.seconds:
                step()
                steps += 1
            sync()
            elapsed = time.perf_counter() - start
        tele = sampler.result
        per_s = steps / elapsed
        bw, flops = weight_bytes * per_s, 2.0 * params * batch * per_s
        bw_frac, fl_frac = bw / probe.memory_bandwidth, flops / bf16
        row = {
            "batch": batch,
            "steps_per_s": per_s,
            "achieved_bandwidth_bytes_per_s": bw,
            "achieved_flops_per_s": flops,
            "bandwidth_fraction": bw_frac,
            "flops_fraction": fl_frac,
            "regime": classify(bw_frac, fl_frac),
            "telemetry": tele.to_json(),
        }
        rows.append(row)
        m = tele.mean
        print(
            f"batch {batch:5d}: {per_s:8.1f} steps/s  bandwidth {bw_frac:6.1%}  FLOP/s "
            f"{fl_frac:6.1%}  {row['regime']:14s}  NVML busy "
            f"{m.get('gpu_util_percent', float('nan')):5.1f} %  mem-ctl "
            f"{m.get('mem_util_percent', float('nan')):5.1f} %  SM "
            f"{m.get('sm_clock_mhz', float('nan')):6.0f} MHz  "
            f"{m.get('power_w', float('nan')):5.0f} W  CPU "
            f"{m.get('cpu_percent_total', float('nan')):5.1f} %  "
            f"({tele.samples} samples, {tele.errors} errors)",
            flush=True,
        )
    result = {"probe": run.to_json(), "weight_bytes": weight_bytes, "params": params, "rows": rows}
    path = a.out / "knee_check.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
