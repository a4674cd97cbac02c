"""Quantization backends: one class per tool, one method each (``quantize(job)``).

AWQ with AutoAWQ, GPTQ with Optimum's ``GPTQQuantizer`` on GPT-QModel. ``tuner.quant.quantize`` does
everything around a build (checks, calibration, caching, atomic output); a backend only turns a
:class:`QuantJob` into a checkpoint in ``job.out_dir``. Replacing AutoAWQ (deprecated upstream)
means one more class here and one ``BACKENDS`` entry.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from tuner.errors import ParameterError, UnsupportedError
from tuner.files import atomic_write_json

METHODS = ("awq", "gptq")
QUANT_DTYPE = "float16"  # the saved dtype: what both tools and vLLM's plain AWQ kernel expect


@dataclass(frozen=True)
class QuantJob:
    """What a backend gets: the source, a fresh output directory and tokenized calibration."""

    model: str
    out_dir: Path
    bits: int
    group_size: int
    blocks: list[list[int]] = field(repr=False)
    model_type: str = ""  # config.json's model_type
    dtype: str = QUANT_DTYPE  # torch dtype to calibrate in; the caller casts the output to fp16

    @property
    def seq_len(self) -> int:
        return len(self.blocks[0])


class QuantBackend(Protocol):
    """One quantization tool. ``quantize`` writes weights and ``config.json`` (with its
    ``quantization_config``) into ``job.out_dir``; tokenizer and marker are the caller's."""

    name: ClassVar[str]
    method: ClassVar[str]
    modules: ClassVar[tuple[str, ...]]  # importable modules the tool needs
    install: ClassVar[str]  # one-line install hint naming the packages

    def quantize(self, job: QuantJob) -> None: ...


class AutoAwqBackend:
    """AWQ (4-bit, GEMM layout, zero points) with AutoAWQ 0.2.9."""

    name: ClassVar[str] = "autoawq"
    method: ClassVar[str] = "awq"
    modules: ClassVar[tuple[str, ...]] = ("awq", "accelerate")
    install: ClassVar[str] = "pip install autoawq==0.2.9"

    def quantize(self, job: QuantJob) -> None:
        import torch

        with warnings.catch_warnings():  # AutoAWQ prints a deprecation notice on import
            warnings.simplefilter("ignore")
            from awq import AutoAWQForCausalLM
            from awq.models.auto import AWQ_CAUSAL_LM_MODEL_MAP
        from transformers import AutoTokenizer

        if job.model_type not in AWQ_CAUSAL_LM_MODEL_MAP:
            raise UnsupportedError(
                f"AutoAWQ cannot quantize model type {job.model_type!r}; try --method gptq"
            )

        # transformers 5 ignores AutoAWQ's own ``torch_dtype=float16`` (it reads ``dtype``),
        # so the dtype is passed through explicitly.
        model = AutoAWQForCausalLM.from_pretrained(
            job.model, dtype=getattr(torch, job.dtype), device_map="cpu", safetensors=True
        )
        model.quantize(
            AutoTokenizer.from_pretrained(job.model),
            quant_config={
                "zero_point": True,
                "q_group_size": job.group_size,
                "w_bit": job.bits,
                "version": "GEMM",
            },
            calib_data=job.blocks,  # list of token lists: no download, no re-tokenizing
            max_calib_samples=len(job.blocks),
            max_calib_seq_len=job.seq_len,
            n_parallel_calib_samples=None,
        )
        model.save_quantized(str(job.out_dir))
        edit_config(job.out_dir, drop={"use_cache"})  # AutoAWQ saves use_cache=false


class OptimumGptqBackend:
    """GPTQ with Optimum's ``GPTQQuantizer`` (GPT-QModel underneath), saved in the v1 format
    vLLM reads (symmetric, no act-order, sequential ``g_idx``)."""

    name: ClassVar[str] = "optimum-gptq"
    method: ClassVar[str] = "gptq"
    modules: ClassVar[tuple[str, ...]] = ("optimum.gptq", "gptqmodel")
    install: ClassVar[str] = (
        "pip install optimum==2.3.0 && pip install --no-deps gptqmodel==7.6.0 threadpoolctl "
        "device-smi pypcre tokenicer logbar defuser (pinned versions: the Makefile's GPTQ_NODEPS)"
    )

    def quantize(self, job: QuantJob) -> None:
        import torch
        from optimum.gptq import GPTQQuantizer
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(job.model, dtype=getattr(torch, job.dtype))
        dataset = [{"input_ids": [b], "attention_mask": [[1] * len(b)]} for b in job.blocks]
        quantizer = GPTQQuantizer(
            bits=job.bits,
            dataset=dataset,
            group_size=job.group_size,
            model_seqlen=job.seq_len,
            desc_act=False,
            sym=True,
        )
        quantizer.quantize_model(model, AutoTokenizer.from_pretrained(job.model))
        quantizer.save(model, str(job.out_dir))
        # The saved config carries the whole calibration set and the pre-save "gptq_v2" format;
        # quantize_config.json (written after the v1 conversion) holds the truth.
        qc_file = job.out_dir / "quantize_config.json"
        qc = json.loads(qc_file.read_text())
        qc.pop("dataset", None)
        qc_file.write_text(json.dumps(qc, indent=2) + "\n")
        edit_config(job.out_dir, set_={"quantization_config": qc})


BACKENDS: dict[str, type[QuantBackend]] = {"awq": AutoAwqBackend, "gptq": OptimumGptqBackend}


def get_backend(method: str) -> QuantBackend:
    """The backend for ``method``; UnsupportedError naming the package to install when its tool
    is missing, ParameterError for a method vtune cannot build."""
    cls = BACKENDS.get(method.lower())
    if cls is None:
        raise ParameterError(
            f"cannot build {method!r} checkpoints; choose from {', '.join(METHODS)}"
        )
    missing = [m for m in cls.modules if not _module_available(m)]
    if missing:
        raise UnsupportedError(
            f"{cls.method} quantization needs {cls.name}, but module {missing[0]!r} is not "
            f"installed: {cls.install}"
        )
    return cls()


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a missing parent package of a dotted name
        return False


# ---------------------------------------------------------------------------------------------
# Checks


def edit_config(
    directory: Path, *, set_: dict[str, Any] | None = None, drop: set[str] | None = None
) -> None:
    """Update keys of ``directory/config.json`` (written atomically)."""
    file = directory / "config.json"
    cfg = json.loads(file.read_text())
    cfg.update(set_ or {})
    for key in drop or ():
        cfg.pop(key, None)
    atomic_write_json(file, cfg, sort_keys=True)
