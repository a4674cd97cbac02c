"""Build AWQ / GPTQ checkpoints that vLLM loads: ``vtune quantize`` and the search's built variants.

One entry point, :func:`quantize`, behind which each method has one backend class with one
method (:class:`QuantBackend`): AWQ with AutoAWQ (:class:`AutoAwqBackend`), GPTQ with Optimum's
``GPTQQuantizer`` on GPT-QModel (:class:`OptimumGptqBackend`). AutoAWQ is deprecated upstream;
replacing it (e.g. by llm-compressor) means adding one class and one ``BACKENDS`` entry.

Calibration texts come from a file or the bundled ``tuner/data/calibration.txt``; nothing is
downloaded (AutoAWQ's own default, "pileval", would download, so texts are always passed in,
already tokenized into equal blocks). Both backends run on CPU; on a CUDA box AutoAWQ and
GPT-QModel move one decoder layer at a time to the GPU themselves.

The output directory is a complete model: weights with ``quantization_config`` in
``config.json`` (what vLLM reads), the tokenizer, and a marker file written last. The same request
on the same source reuses the directory (the marker holds a fingerprint of model, method,
settings, calibration texts and backend version); a different request rebuilds it beside the
old one and swaps it in under a lock (:mod:`tuner.quant.outdir`), so no kill loses a checkpoint
or leaves a half-built one behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tuner.errors import DatasetError, ModelError, ParameterError, UnsupportedError
from tuner.files import atomic_write_json
from tuner.load.workload import load_tokenizer
from tuner.quant import outdir
from tuner.quant.backends import (
    METHODS,
    QUANT_DTYPE,
    QuantBackend,
    QuantJob,
    edit_config,
    get_backend,
)
from tuner.specs.checkpoint import read_checkpoint_info
from tuner.specs.gpu import GpuSpec
from tuner.specs.model import ModelSpec, load_model

MARKER = "vtune-quantize.json"
"""Written last into an output directory: the request's fingerprint and the result."""
RECIPE_VERSION = 1  # bump when the build recipe changes, so cached outputs are rebuilt
BUNDLED_CALIBRATION = Path(__file__).parent.parent / "data" / "calibration.txt"
MIN_CALIB_TOKENS = 32  # fewer tokens than this cannot calibrate anything meaningful


# ---------------------------------------------------------------------------------------------
# Calibration texts


def load_calibration_texts(path: str | Path | None = None) -> list[str]:
    """Calibration texts: paragraphs (separated by blank lines) of a ``.txt`` file, the ``text``
    field of each line of a ``.jsonl`` file, or a ``.json`` list of strings; the bundled set when
    ``path`` is None. Raises DatasetError when the file is missing, malformed or holds no text."""
    file = Path(path).expanduser() if path is not None else BUNDLED_CALIBRATION
    try:
        raw = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise DatasetError(f"cannot read calibration file {str(file)!r}: {reason}") from None
    suffix = file.suffix.lower()
    if suffix in (".jsonl", ".json"):
        texts = _json_texts(raw, file, jsonl=suffix == ".jsonl")
    else:
        texts = re.split(r"\n[ \t]*\n", raw)
    texts = [t.strip() for t in texts if t and t.strip()]
    if not texts:
        raise DatasetError(f"calibration set {str(file)!r} is empty: it holds no text")
    return texts


def _json_texts(raw: str, file: Path, *, jsonl: bool) -> list[str]:
    try:
        items = (
            [json.loads(line) for line in raw.splitlines() if line.strip()]
            if jsonl
            else (json.loads(raw) if raw.strip() else [])
        )
    except json.JSONDecodeError as exc:
        raise DatasetError(f"calibration file {str(file)!r} is not valid JSON: {exc.msg}") from None
    if not isinstance(items, list):
        raise DatasetError(f"calibration file {str(file)!r} must hold a list of texts")
    texts = []
    for item in items:
        text = item.get("text") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise DatasetError(
                f"calibration file {str(file)!r}: entries must be strings or have a 'text' field"
            )
        texts.append(text)
    return texts


def calibration_blocks(
    token_lists: Sequence[Sequence[int]], *, seq_len: int, max_blocks: int
) -> list[list[int]]:
    """Concatenate tokenized texts and cut them into equal blocks of ``min(seq_len, total)``
    tokens (at most ``max_blocks``), as AutoAWQ and GPTQ calibrate. Pure. DatasetError when the
    texts hold fewer than MIN_CALIB_TOKENS tokens."""
    stream = [int(t) for ids in token_lists for t in ids]
    if len(stream) < MIN_CALIB_TOKENS:
        raise DatasetError(
            f"calibration set too small: {len(stream)} tokens, need at least {MIN_CALIB_TOKENS}"
        )
    length = min(seq_len, len(stream))
    count = min(max_blocks, len(stream) // length)
    return [stream[i * length : (i + 1) * length] for i in range(count)]


# ---------------------------------------------------------------------------------------------
# Requests, results, backends


@dataclass(frozen=True)
class QuantizeRequest:
    """What to build. ``model`` is a local directory (or a hub id whose weights the backend may
    download); ``calib`` a calibration file, None for the bundled set."""

    model: str
    method: str
    out_dir: str
    bits: int = 4
    group_size: int = 128  # -1: one group per output channel (GPTQ only)
    calib: str | None = None
    calib_seq_len: int = 512
    max_calib_blocks: int = 128


@dataclass(frozen=True)
class QuantizedModel:
    """A built checkpoint. ``tensor_bytes`` sums its safetensors headers (what vLLM loads);
    ``seconds`` is the build time (of the original build when ``reused``)."""

    path: str
    method: str
    bits: int
    group_size: int
    tensor_bytes: int
    seconds: float
    backend: str
    calib_blocks: int
    calib_seq_len: int
    reused: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_method_on_gpu(method: str, gpu: GpuSpec) -> None:
    """UnsupportedError when vLLM on ``gpu`` cannot serve ``method`` checkpoints."""
    if not gpu.supports_quantization(method):
        have = ", ".join(gpu.quantization_methods) or "none"
        raise UnsupportedError(f"{method} does not run on {gpu.name} (it supports: {have})")


def check_request(req: QuantizeRequest, spec: ModelSpec) -> None:
    """Reject what no backend can build: unknown method, bit width, group size that does not
    divide a quantized matrix's input size, an already-quantized source."""
    method = req.method.lower()
    if method not in METHODS:
        raise ParameterError(f"unknown method {req.method!r}; choose from {', '.join(METHODS)}")
    if spec.quantization is not None:
        raise ModelError(
            f"model {req.model!r} is already quantized ({spec.quantization.method}, "
            f"{spec.quantization.bits}-bit); quantize the original 16-bit checkpoint"
        )
    if req.calib_seq_len <= 0 or req.max_calib_blocks <= 0:
        raise ParameterError("calibration sequence length and block count must be positive")
    allowed_bits = (4,) if method == "awq" else (2, 4, 8)  # 3-bit packing crosses int32 words
    if req.bits not in allowed_bits:
        raise ParameterError(
            f"{method} builds {', '.join(map(str, allowed_bits))}-bit weights, not {req.bits}"
        )
    if req.group_size == -1 and method == "gptq":
        return
    if req.group_size <= 0 or req.group_size % 2:
        raise ParameterError(f"group size must be a positive even number, got {req.group_size}")
    for group in spec.linear_groups:
        if group.quantizable and group.in_features % req.group_size:
            raise ParameterError(
                f"group size {req.group_size} does not divide {group.name}'s input size "
                f"{group.in_features}; choose a divisor such as 64 or 32"
            )


# ---------------------------------------------------------------------------------------------
# The entry point


def quantize(
    req: QuantizeRequest,
    *,
    gpu: GpuSpec | None = None,
    backend: QuantBackend | None = None,
) -> QuantizedModel:
    """Build (or reuse) the checkpoint ``req`` describes and return it.

    Checks, in order, each a one-line VtuneError: the method runs on ``gpu`` (when given), the
    source is readable and not already quantized, bits and group size fit, the calibration set
    is not empty, the output directory is empty or an earlier vtune output, the backend's tool
    is installed. ``backend`` replaces the method's default backend (tests, other tools).
    """
    method = req.method.lower()
    if gpu is not None:
        check_method_on_gpu(method, gpu)
    spec = load_model(req.model)
    check_request(req, spec)
    texts = load_calibration_texts(req.calib)
    out_dir = Path(req.out_dir).expanduser().resolve()
    _check_out_dir(out_dir)
    backend = backend or get_backend(method)
    fingerprint = json.loads(json.dumps(_fingerprint(req, spec, texts, backend)))  # as stored
    with outdir.locked(out_dir, MARKER):  # a second build into out_dir waits, then reuses
        _check_out_dir(out_dir)  # again: a build that just finished may have written it
        cached = _reuse(out_dir, fingerprint)
        if cached is not None:
            return cached
        return _build(req, spec, method, backend, texts, fingerprint, out_dir)


def _build(
    req: QuantizeRequest,
    spec: ModelSpec,
    method: str,
    backend: QuantBackend,
    texts: list[str],
    fingerprint: dict[str, Any],
    out_dir: Path,
) -> QuantizedModel:
    """Build into a directory beside ``out_dir`` and swap it in (see :mod:`tuner.quant.outdir`)."""
    tokenizer = load_tokenizer(req.model, local_files_only=False)
    token_lists = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    blocks = calibration_blocks(
        token_lists, seq_len=req.calib_seq_len, max_blocks=req.max_calib_blocks
    )
    tmp = outdir.build_dir(out_dir)
    try:
        start = time.perf_counter()
        dtype = _calibration_dtype()
        job = QuantJob(req.model, tmp, req.bits, req.group_size, blocks, spec.model_type, dtype)
        with contextlib.redirect_stdout(sys.stderr), _environment_kept():
            backend.quantize(job)  # tool chatter must not mix with results on stdout
        if dtype != QUANT_DTYPE:
            _cast_checkpoint(tmp, QUANT_DTYPE)
        seconds = time.perf_counter() - start
        tokenizer.save_pretrained(tmp)
        info = read_checkpoint_info(tmp)
        if info is None:
            raise ModelError(f"{backend.name} wrote no safetensors weights for {req.model!r}")
        result = QuantizedModel(
            path=str(out_dir),
            method=method,
            bits=req.bits,
            group_size=req.group_size,
            tensor_bytes=info.tensor_bytes,
            seconds=round(seconds, 3),
            backend=backend.name,
            calib_blocks=len(blocks),
            calib_seq_len=len(blocks[0]),
        )
        atomic_write_json(
            tmp / MARKER, {"fingerprint": fingerprint, "result": result.to_json()}, sort_keys=True
        )
        outdir.swap_in(tmp, out_dir)  # out_dir is an earlier vtune output, if any (checked)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


@contextlib.contextmanager
def _environment_kept():
    """Undo environment changes a tool makes (GPT-QModel sets PYTORCH_ALLOC_CONF and
    CUDA_DEVICE_ORDER on import), so vLLM servers started later do not inherit them."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)


def _calibration_dtype() -> str:
    """fp16 where the tools move layers to a CUDA GPU; fp32 on CPU, where fp16 arithmetic is
    emulated (about 2x slower here) and fp32 loses nothing."""
    import torch

    return QUANT_DTYPE if torch.cuda.is_available() else "float32"


def _cast_checkpoint(directory: Path, dtype: str) -> None:
    """Cast every floating tensor of the checkpoint (scales, embeddings, norms) to ``dtype``."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    target = getattr(torch, dtype)
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        cast = {k: v.to(target) if v.is_floating_point() else v for k, v in tensors.items()}
        save_file(cast, str(file), metadata={"format": "pt"})
    edit_config(directory, set_={"dtype": dtype}, drop={"torch_dtype"})


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ParameterError(f"output {str(out_dir)!r} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MARKER).is_file():
        raise ParameterError(
            f"output directory {str(out_dir)!r} is not empty and was not written by "
            "vtune quantize; choose another --out"
        )


def _reuse(out_dir: Path, fingerprint: dict[str, Any]) -> QuantizedModel | None:
    try:
        recorded = json.loads((out_dir / MARKER).read_text())
        if recorded["fingerprint"] != fingerprint:
            return None
        result = QuantizedModel(**{**recorded["result"], "reused": True, "path": str(out_dir)})
    except (OSError, ValueError, KeyError, TypeError):
        return None
    info = read_checkpoint_info(out_dir)
    if info is None or info.tensor_bytes != result.tensor_bytes:
        return None  # weights missing or altered since the build
    return result


def _fingerprint(
    req: QuantizeRequest, spec: ModelSpec, texts: list[str], backend: QuantBackend
) -> dict[str, Any]:
    """What determines the output: source identity, settings, texts, backend and its version."""
    source: dict[str, Any] = {"name": req.model}
    if spec.path:
        root = Path(spec.path)
        source = {
            "path": spec.path,
            "config_sha256": _sha256((root / "config.json").read_bytes()),
            "weights": sorted(
                (f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in root.glob("*.safetensors")
            ),
        }
    return {
        "recipe": RECIPE_VERSION,
        "source": source,
        "method": req.method.lower(),
        "bits": req.bits,
        "group_size": req.group_size,
        "calib_sha256": _sha256("\n\n".join(texts).encode()),
        "calib_seq_len": req.calib_seq_len,
        "max_calib_blocks": req.max_calib_blocks,
        "backend": backend.name,
        "backend_versions": {
            m: _version(m) for m in sorted({m.split(".")[0] for m in backend.modules})
        },
    }


def _version(module: str) -> str | None:
    dist = {"awq": "autoawq", "gptqmodel": "gptqmodel", "optimum": "optimum"}.get(module, module)
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
