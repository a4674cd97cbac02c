"""Quantization variants for the search: the original model, on-the-fly methods vLLM runs on
this GPU, checkpoints the user names, and checkpoints vtune builds (AWQ / GPTQ).

Planning needs no build: a variant to be built is planned with the estimator's exact formula
for its format; :func:`tuner.quant.variants.materialize` builds it and re-reads the real
checkpoint before any trial runs.

:func:`serving_values` is what a candidate runs with on a variant: the one place that orders
fixed settings, the candidate's knobs and the variant's model and method.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from tuner.errors import ParameterError
from tuner.plan.prune import Variant
from tuner.plan.space import Candidate
from tuner.specs.gpu import GpuSpec
from tuner.specs.model import ModelSpec, QuantConfig, load_model

log = logging.getLogger(__name__)
BUILDABLE = ("awq", "gptq")


def plan_variants(
    model_name: str,
    model: ModelSpec,
    gpu: GpuSpec,
    *,
    checkpoints: tuple[tuple[str, str], ...] = (),
    build: tuple[str, ...] = (),
    variants_dir: Path,
) -> dict[str, Variant]:
    """Every variant the search may serve, keyed by the name candidates use."""
    out = {"none": Variant("none", model_name, model, flag=None, source="original")}
    if model.quantization is None and not gpu.is_cpu:
        for method in online_methods(gpu):
            out[method] = Variant(method, model_name, model, flag=method, source="online")
    for name, where in checkpoints:
        if not name or name in out:
            raise ParameterError(f"--variant name {name!r} is empty or already used")
        spec = load_model(where)
        if spec.quantization is None:
            raise ParameterError(
                f"--variant {name}={where}: the checkpoint has no "
                "quantization_config (is it quantized?)"
            )
        method = spec.quantization.method
        if not gpu.supports_quantization(method):
            raise ParameterError(f"--variant {name}: {method} does not run on {gpu.name}")
        out[name] = Variant(name, where, spec, flag=method, source="checkpoint")
    for method in build:
        method = method.strip().lower()
        if method not in BUILDABLE:
            raise ParameterError(
                f"--build-variants: cannot build {method!r}; choose from {', '.join(BUILDABLE)}"
            )
        if model.quantization is not None:
            raise ParameterError(
                f"--build-variants {method}: model {model.name!r} is already "
                f"quantized with {model.quantization.method}"
            )
        if not gpu.supports_quantization(method):
            raise ParameterError(f"--build-variants {method}: {method} does not run on {gpu.name}")
        if method in out:
            raise ParameterError(f"variant name {method!r} is already used")
        where = default_variant_dir(variants_dir, model_name, method, 4, 128)
        planned = replace(
            model,
            quantization=QuantConfig(
                method, 4, 128, has_zero_points=True, has_g_idx=method == "gptq"
            ),
            checkpoint=None,
        )
        out[method] = Variant(method, str(where), planned, flag=method, source="built")
    return out


def serving_values(fixed: Mapping[str, Any], cand: Candidate, variant: Variant) -> dict[str, Any]:
    """The vLLM settings (by vLLM's names) ``cand`` runs with on ``variant``: ``model`` (the
    variant's) first, then the settings fixed for every candidate, then the candidate's knobs,
    then the variant's ``--quantization`` method; a later one wins. The candidate's own
    ``quantization`` is a variant name, not a vLLM value, so it is not passed on."""
    values: dict[str, Any] = {"model": variant.model}
    values.update((k, v) for k, v in fixed.items() if k != "model")
    values.update((k, v) for k, v in cand.knobs().items() if k != "quantization")
    if variant.flag:
        values["quantization"] = variant.flag
    return values


def online_methods(gpu: GpuSpec) -> list[str]:
    """Methods vLLM applies at load time that run on ``gpu`` and that the installed vLLM has:
    fp8 (compute capability 8.9+) and bitsandbytes (gone from vLLM 0.32)."""
    return [
        m
        for m in ("fp8", "bitsandbytes")
        if gpu.supports_quantization(m) and (m == "fp8" or m in installed_vllm_methods())
    ]


def installed_vllm_methods() -> set[str]:
    """vLLM's quantization method names, read from its source without importing vLLM (slow);
    empty when vLLM is not installed here (e.g. planning on a laptop)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return set()
    path = Path(next(iter(spec.submodule_search_locations)))
    init = path / "model_executor" / "layers" / "quantization" / "__init__.py"
    try:
        text = init.read_text()
    except OSError:
        return set()
    return set(re.findall(r'^\s*"([a-z0-9_\-]+)",?\s*$', text, re.M))


def default_variant_dir(root: str | Path, model: str, method: str, bits: int, group: int) -> Path:
    """Where the search keeps a built variant: ``root/<model-slug>-<method>-w<bits>g<group>``."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name or model).strip("-")
    return Path(root) / f"{slug or 'model'}-{method}-w{bits}g{group}"
