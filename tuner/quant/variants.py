"""Building the planned quantization variants before any trial, and the optional perplexity
guard that drops variants losing too much quality."""

from __future__ import annotations

import logging
from dataclasses import replace

from tuner.errors import ModelError
from tuner.load.workload import load_tokenizer
from tuner.plan.prune import Variant
from tuner.quant.quality import assess, perplexity
from tuner.quant.quantize import QuantizeRequest, load_calibration_texts, quantize
from tuner.specs.gpu import GpuSpec
from tuner.specs.model import load_model

log = logging.getLogger(__name__)


def materialize(
    variants: dict[str, Variant],
    gpu: GpuSpec,
    *,
    calib: str | None = None,
    max_quality_loss: float | None = None,
) -> tuple[dict[str, Variant], list[dict]]:
    """Build the variants marked "built" (reused when already built), re-read their real
    checkpoints, and run the quality guard when asked. Returns the variants to search and the
    quality figures of every variant (dropped ones included, with ``passed: false``).
    ModelError in one line when the guard is asked for and the base model has no tokenizer."""
    if max_quality_loss is not None:  # fail before hours of building, not after
        try:
            load_tokenizer(variants["none"].model, local_files_only=False)
        except ModelError as exc:
            raise ModelError(f"--max-quality-loss needs the model's tokenizer: {exc}") from None
    out = dict(variants)
    for name, variant in variants.items():
        if variant.source != "built":
            continue
        built = quantize(
            QuantizeRequest(
                model=variants["none"].model,
                method=variant.flag or name,
                out_dir=variant.model,
                calib=calib,
            ),
            gpu=gpu,
        )
        out[name] = replace(variant, model=built.path, spec=load_model(built.path))
    if max_quality_loss is None:
        return out, []
    return _quality_guard(out, calib, max_quality_loss)


def _quality_guard(
    variants: dict[str, Variant], calib: str | None, max_loss: float
) -> tuple[dict[str, Variant], list[dict]]:
    texts = load_calibration_texts(calib)
    base = variants["none"]
    base_ppl = perplexity(base.model, texts, tokenizer=base.model)
    kept: dict[str, Variant] = {"none": replace(base, quality={"perplexity": base_ppl})}
    figures: list[dict] = [{"variant": "none", "perplexity": base_ppl, "passed": True}]
    for name, variant in variants.items():
        if name == "none":
            continue
        simulate = "fp8" if variant.source == "online" and variant.flag == "fp8" else None
        if variant.source == "online" and simulate is None:
            log.warning("no perplexity for online %s; kept without a quality check", name)
            kept[name] = variant
            continue
        model_dir = base.model if simulate else variant.model
        ppl = perplexity(model_dir, texts, tokenizer=base.model, simulate=simulate)
        result = assess(name, base_ppl, ppl, max_loss)
        figures.append(result.to_json())
        if result.passed:
            kept[name] = replace(variant, quality=result.to_json())
    return kept, figures
