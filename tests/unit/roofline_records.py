"""Search records with roofline and telemetry blocks for the report's tests (no server): each
point's roofline is computed by the real math from a made-up throughput curve that bends at
the knee, as a decode on an H100 would."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from tuner.analytic.estimate import ServingConfig, estimate
from tuner.analytic.roofline import Peaks, model_roofline_point
from tuner.specs.gpu import get_gpu
from tuner.specs.model import load_model

SAMPLE = Path(__file__).parent.parent / "data" / "sample_record.json"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def decode_tps(batch: float, context: float = 1152.0) -> float:
    """A plausible H100 decode throughput at ``batch``: 75 % of the bandwidth roofline below
    the knee, 60 % of the compute roofline above it, plus a 1.5 ms step overhead."""
    model, gpu = load_model(MODEL), get_gpu("h100")
    est = estimate(model, gpu, ServingConfig(context_len=int(context)))
    step_bytes = est.weight_bytes + batch * context * est.kv_bytes_per_token
    t_mem = step_bytes / (0.75 * gpu.memory_bandwidth)
    t_comp = 2 * model.active_param_count * batch / (0.6 * gpu.flops_for("bf16"))
    return batch / (max(t_mem, t_comp) + 0.0015)


def roofline_json(batch: float, tps: float, context: float = 1152.0) -> dict[str, Any]:
    model, gpu = load_model(MODEL), get_gpu("h100")
    peaks = Peaks.from_gpu(gpu)
    point = model_roofline_point(
        model, peaks, output_tokens_per_s=tps, mean_batch=batch, mean_context=context
    )
    assert point is not None
    return {
        **point.to_json(),
        "batch_source": "server",
        "mean_context": context,
        "peak_bandwidth_bytes_per_s": peaks.bandwidth_bytes_per_s,
        "peak_flops_per_s": peaks.flops_per_s,
        "peaks": {
            "source": "datasheet",
            "memory_bandwidth": gpu.memory_bandwidth,
            "flops": gpu.flops_for("bf16"),
            "measured_at": None,
        },
    }


def telemetry_json(cpu: float, seconds: float = 10.0) -> dict[str, Any]:
    series = [
        [round(t * 0.5, 3), {"cpu_percent_total": cpu + (t % 3), "num_processes": 4.0}]
        for t in range(int(seconds * 2))
    ]
    return {
        "device": "cpu,cuda:0",
        "period_s": 0.1,
        "samples": 100,
        "errors": 0,
        "last_error": None,
        "mean": {"cpu_percent_total": cpu, "gpu_util_percent": 97.0, "rss_bytes_total": 3e9},
        "p50": {"cpu_percent_total": cpu},
        "max": {"cpu_percent_total": cpu + 2},
        "series": series,
        "notes": [],
    }


def with_rooflines(data: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sample record (or ``data``) with every point's throughput redrawn from
    :func:`decode_tps` at a batch that grows with its load, and its roofline and telemetry
    blocks filled in; the knee of every trial's estimate is the estimator's."""
    data = copy.deepcopy(data or json.loads(SAMPLE.read_text()))
    knee = estimate(load_model(MODEL), get_gpu("h100"), ServingConfig()).roofline_knee_batch
    for trial in data["trials"]:
        trial["estimate"]["roofline_knee_batch"] = knee
        seqs = trial["knobs"].get("max_num_seqs") or 256
        points = (trial.get("rate_search") or {}).get("points") or []
        for i, point in enumerate(points):
            share = [0.2, 1.0, 0.6, 0.8][i % 4]
            batch = max(1.0, seqs * share)
            tps = decode_tps(batch)
            point["summary"]["output_throughput"] = tps
            point["roofline"] = roofline_json(batch, tps)
            point["telemetry"] = telemetry_json(40 + batch / 4)
        best = (trial.get("rate_search") or {}).get("best_index")
        if best is not None and trial.get("best"):
            trial["best"]["output_throughput"] = points[best]["summary"]["output_throughput"]
    return data
