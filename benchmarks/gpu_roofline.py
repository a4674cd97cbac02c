"""The roofline on a real GPU: measured decode-step GEMM time vs vtune's estimate.

    python3 benchmarks/gpu_roofline.py [--model llama-3.1-8b] [--gpu h100] [--out FILE.json]

Needs only torch (no vLLM). Allocates the model's weight matrices (bf16, random, from vtune's
architecture inventory), and for a ladder of batch sizes times one decode step's matmuls (every
layer's q/k/v/o and MLP projections, plus the lm_head) captured in a CUDA graph, so kernel
launch overhead is out. Alongside: a device-to-device copy (bandwidth) and an 8192^3 bf16
matmul (compute), which calibrate the estimator's efficiency factors. Prints, side by side, the
measured and predicted step times and the two knees: vtune's F x W / (2 P BW) from the
registry's datasheet peaks, and the measured one (where the memory-bound floor t(1) meets the
compute-bound slope fitted at large batches).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn, device: str, reps: int = 10) -> float:  # type: ignore[no-untyped-def]
    """Median seconds of ``fn()`` over ``reps`` runs after two warm-ups."""
    import torch

    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def measure_peaks(device: str, dtype) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(bytes/s of a device-to-device copy counting reads and writes, bf16 matmul FLOP/s)."""
    import torch

    n = 1 << 30 if device == "cuda" else 1 << 24
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    bw = 2 * n / timed(lambda: dst.copy_(src), device)
    m = 8192 if device == "cuda" else 512
    a = torch.randn(m, m, dtype=dtype, device=device)
    b = torch.randn(m, m, dtype=dtype, device=device)
    return bw, 2 * m**3 / timed(lambda: a @ b, device)


def main() -> None:
    import torch

    from tuner.analytic.estimate import Efficiency, ServingConfig, estimate
    from tuner.specs.gpu import get_gpu
    from tuner.specs.model import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--gpu", default="h100")
    parser.add_argument("--max-batch", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    spec, gpu = load_model(args.model), get_gpu(args.gpu)
    report: dict = {"model": spec.name, "gpu": gpu.name, "device": device}
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        report |= {
            "device_name": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "mem_total_bytes": total,
            "mem_free_bytes": free,
            "registry_memory_bytes": gpu.memory_bytes,
            "registry_usable_memory_bytes": gpu.usable_memory_bytes,
        }

    # Peaks as this card reaches them (the estimator's efficiency factors).
    bw, flops = measure_peaks(device, dtype)
    report |= {
        "measured_bandwidth": bw,
        "datasheet_bandwidth": gpu.memory_bandwidth,
        "bandwidth_efficiency": bw / gpu.memory_bandwidth,
        "measured_bf16_flops": flops,
        "datasheet_bf16_flops": gpu.flops_for("bf16"),
        "compute_efficiency": flops / gpu.flops_for("bf16"),
    }

    # One decode step's matmuls, weights laid out as vtune's inventory says.
    weights = []
    for g in spec.linear_groups:
        if g.kind == "router":
            continue
        count = g.count // g.num_experts * spec.num_experts_per_tok if g.num_experts else g.count
        weights += [
            torch.randn(g.out_features, g.in_features, dtype=dtype, device=device) * 0.01
            for _ in range(count)
        ]
    weights.append(torch.randn(spec.vocab_size, spec.hidden_size, dtype=dtype, device=device))
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    report["step_weight_bytes"] = weight_bytes

    rows = []
    batch = 1
    while batch <= args.max_batch:
        xs = {
            w.shape[1]: torch.randn(batch, w.shape[1], dtype=dtype, device=device) for w in weights
        }

        def step(xs=xs) -> None:  # type: ignore[no-untyped-def]
            for w in weights:
                torch.nn.functional.linear(xs[w.shape[1]], w)

        if device == "cuda":
            graph = torch.cuda.CUDAGraph()
            step()
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                step()
            t = timed(graph.replay, device)
            del graph
        else:
            t = timed(step, device, reps=3)
        rows.append({"batch": batch, "step_s": t, "tokens_per_s": batch / t})
        batch *= 2
    report["ladder"] = rows

    cfg = ServingConfig(max_model_len=min(4096, spec.max_position_embeddings), context_len=1)
    datasheet = estimate(
        spec, gpu, cfg, efficiency=Efficiency(1.0, 1.0, 0.0), ladder=tuple(r["batch"] for r in rows)
    )
    calibrated = estimate(
        spec,
        gpu,
        cfg,
        efficiency=Efficiency(report["bandwidth_efficiency"], report["compute_efficiency"], 0.0),
        ladder=tuple(r["batch"] for r in rows),
    )
    for row, p0, p1 in zip(rows, datasheet.ladder, calibrated.ladder, strict=True):
        row["predicted_datasheet_s"] = p0.step_time_s
        row["predicted_calibrated_s"] = p1.step_time_s
    # Measured knee: memory floor t(1) meets the compute slope fitted on the largest batches.
    big = rows[-2:]
    slope = (big[1]["step_s"] - big[0]["step_s"]) / (big[1]["batch"] - big[0]["batch"])
    knee = rows[0]["step_s"] / slope if slope > 0 else math.inf
    report |= {
        "knee_measured": knee,
        "knee_vtune_datasheet": datasheet.roofline_knee_batch,
        "knee_vtune_calibrated": datasheet.roofline_knee_batch
        * report["compute_efficiency"]
        / report["bandwidth_efficiency"],
    }

    print(f"{spec.name} decode-step matmuls on {report.get('device_name', device)}")
    print(
        f"bandwidth {bw / 1e12:.2f} TB/s ({report['bandwidth_efficiency']:.0%} of datasheet), "
        f"bf16 {flops / 1e12:.0f} TFLOP/s ({report['compute_efficiency']:.0%})"
    )
    print(
        f"{'batch':>6s} {'measured ms':>12s} {'datasheet ms':>13s} {'calibrated ms':>14s} "
        f"{'ratio meas/cal':>15s}"
    )
    for r in rows:
        print(
            f"{r['batch']:6d} {r['step_s'] * 1e3:12.3f} {r['predicted_datasheet_s'] * 1e3:13.3f}"
            f" {r['predicted_calibrated_s'] * 1e3:14.3f} "
            f"{r['step_s'] / r['predicted_calibrated_s']:15.2f}"
        )
    print(
        f"knee: measured {knee:.0f}, vtune datasheet {report['knee_vtune_datasheet']:.0f}, "
        f"vtune calibrated {report['knee_vtune_calibrated']:.0f}"
    )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
