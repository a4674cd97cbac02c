"""The quality guard: perplexity of a model variant on the calibration texts (transformers, CPU).

Every variant is measured the same way: as a plain transformers model whose linear weights are
what the variant's kernels multiply by. Quantized checkpoints (AWQ GEMM, GPTQ v1) are dequantized
here, in plain torch, into a temporary 16/32-bit copy — AutoAWQ's own loader demands Intel's IPEX
on CPU and transformers' AWQ/GPTQ integration demands GPT-QModel, while this needs neither, so a
user's pre-quantized checkpoint can be judged with nothing but transformers installed. The
forward pass runs in float32 by default, so base and variant differ only by their weights.
vLLM's on-the-fly fp8 is simulated (per-tensor e4m3 weights and activations, lm_head kept).

Contract: ``perplexity`` returns exp(mean next-token NLL) over the first ``max_tokens`` tokens
of the texts (each text starts with the tokenizer's BOS), in windows of ``window`` tokens.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tuner.errors import DatasetError, ModelError, ParameterError, UnsupportedError
from tuner.load.workload import load_tokenizer

AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # AutoAWQ GEMM packs 8 nibbles as 0 2 4 6 1 3 5 7
FP8_E4M3_MAX = 448.0
ONLINE_SIMULATIONS = ("fp8",)


@dataclass(frozen=True)
class QualityResult:
    """One variant's figures as the search record keeps them."""

    variant: str
    perplexity: float
    base_perplexity: float
    loss_pct: float
    max_loss_pct: float | None
    passed: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def quality_loss_pct(base_ppl: float, variant_ppl: float) -> float:
    """Relative perplexity increase in percent (negative when the variant is better)."""
    for name, value in (("base", base_ppl), ("variant", variant_ppl)):
        if not (math.isfinite(value) and value > 0):
            raise ParameterError(f"{name} perplexity must be a positive finite number, got {value}")
    return (variant_ppl - base_ppl) / base_ppl * 100.0


def assess(
    variant: str, base_ppl: float, variant_ppl: float, max_loss_pct: float | None
) -> QualityResult:
    """The variant passes when its loss is at most ``max_loss_pct`` (always when None)."""
    loss = quality_loss_pct(base_ppl, variant_ppl)
    passed = max_loss_pct is None or loss <= max_loss_pct
    return QualityResult(variant, variant_ppl, base_ppl, round(loss, 4), max_loss_pct, passed)


def perplexity(
    model_dir: str | Path,
    texts: Sequence[str],
    *,
    tokenizer: str | Path | None = None,
    max_tokens: int = 4096,
    window: int = 512,
    dtype: str = "float32",
    simulate: str | None = None,
) -> float:
    """Perplexity of the model in ``model_dir`` on ``texts`` (see the module docstring).

    ``tokenizer``: where to load the tokenizer from (default ``model_dir``); pass the base model
    so every variant sees the same tokens. ``simulate="fp8"`` applies vLLM's online fp8 to an
    unquantized model. Raises DatasetError for texts with fewer than two tokens, ModelError for
    an unreadable model, UnsupportedError for a quantization format this cannot dequantize.
    """
    import torch

    if max_tokens < 2 or window < 2:
        raise ParameterError("max_tokens and window must be at least 2")
    if simulate is not None and simulate not in ONLINE_SIMULATIONS:
        raise ParameterError(f"cannot simulate {simulate!r}; choose from {ONLINE_SIMULATIONS}")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ParameterError(f"unknown dtype {dtype!r}")
    tok = load_tokenizer(tokenizer or model_dir, local_files_only=False)
    ids: list[int] = []
    for text in texts:
        ids.extend(tok(text, add_special_tokens=True)["input_ids"])
    ids = ids[:max_tokens]
    if len(ids) < 2:
        raise DatasetError("perplexity needs texts with at least two tokens")

    model = load_dense_model(model_dir, torch_dtype)
    if simulate == "fp8":
        if _quant_config(Path(model_dir)) is not None:
            raise ParameterError("fp8 is applied on the fly to an unquantized model only")
        simulate_online_fp8(model)
    limit = getattr(model.config, "max_position_embeddings", None) or window
    window = min(window, int(limit))
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids), window):
            chunk = ids[start : start + window]
            if len(chunk) < 2:
                break
            inputs = torch.tensor([chunk])
            logits = model(input_ids=inputs).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, inputs[0, 1:], reduction="sum"))
            count += len(chunk) - 1
    value = math.exp(nll / count)
    if not math.isfinite(value):
        raise ModelError(f"perplexity of {str(model_dir)!r} is not finite (overflow in {dtype})")
    return value


def load_dense_model(model_dir: str | Path, torch_dtype: Any):
    """A transformers model in ``torch_dtype`` whose weights are those the checkpoint's kernels
    use: loaded as is when unquantized, dequantized first when AWQ or GPTQ."""
    from transformers import AutoModelForCausalLM

    path = Path(model_dir)
    qc = _quant_config(path) if path.is_dir() else None
    if qc is None:
        return _from_pretrained(AutoModelForCausalLM, str(model_dir), torch_dtype)
    with tempfile.TemporaryDirectory(prefix="vtune-dense-") as tmp:
        dequantize_checkpoint(path, Path(tmp), torch_dtype)
        return _from_pretrained(AutoModelForCausalLM, tmp, torch_dtype)


def _from_pretrained(auto_cls, where: str, torch_dtype):
    try:
        model = auto_cls.from_pretrained(where, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model {where!r} with transformers: {exc}") from None
    return model.eval()


def dequantize_checkpoint(src: Path, dst: Path, torch_dtype: Any) -> None:
    """Write a dense copy of the AWQ/GPTQ checkpoint ``src`` into ``dst`` (config without
    ``quantization_config``, one safetensors file per source file, no tokenizer)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    qc = _quant_config(src) or {}
    method = str(qc.get("quant_method", "")).lower()
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    if method not in ("awq", "gptq"):
        raise UnsupportedError(
            f"cannot dequantize {method or 'unknown'} checkpoints for perplexity"
        )
    if method == "awq" and str(qc.get("version", "gemm")).lower() != "gemm":
        raise UnsupportedError(f"cannot dequantize AWQ version {qc.get('version')!r} (only gemm)")
    if 32 % bits:
        raise UnsupportedError(f"cannot dequantize {bits}-bit {method} weights (2, 4 or 8 only)")
    # GPTQ v1 (what vLLM and most hubs hold) stores zero - 1; GPT-QModel's internal v2 does not.
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    zero_offset = 0 if fmt == "gptq_v2" else 1
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    config["dtype"] = str(torch_dtype).removeprefix("torch.")
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("generation_config.json",):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{str(src)!r} has no safetensors weights")
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        dense = {}
        for key, value in tensors.items():
            if key.endswith(".qweight"):
                prefix = key.removesuffix(".qweight")
                args = (value, tensors[f"{prefix}.qzeros"], tensors[f"{prefix}.scales"], bits)
                if method == "awq":
                    weight = dequantize_awq(*args)
                else:
                    weight = dequantize_gptq(*args, tensors[f"{prefix}.g_idx"], zero_offset)
                dense[f"{prefix}.weight"] = weight.t().contiguous().to(torch_dtype)
            elif not key.endswith((".qzeros", ".scales", ".g_idx")):
                dense[key] = value.to(torch_dtype) if value.is_floating_point() else value
        save_file(dense, str(dst / file.name), metadata={"format": "pt"})
    index = src / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = _dense_weight_map(data.get("weight_map", {}))
        (dst / index.name).write_text(json.dumps(data))


def _dense_weight_map(weight_map: dict[str, str]) -> dict[str, str]:
    out = {}
    for key, file in weight_map.items():
        if key.endswith(".qweight"):
            out[key.removesuffix(".qweight") + ".weight"] = file
        elif not key.endswith((".qzeros", ".scales", ".g_idx")):
            out[key] = file
    return out


def _unpack(packed, bits: int, dim: int):
    """Split each int32 along ``dim`` into 32/bits unsigned values, lowest bits first."""
    import torch

    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    mask = (1 << bits) - 1
    if dim == 1:  # [r, c] -> [r, c * per]
        values = (packed.unsqueeze(-1) >> shifts) & mask
        return values.reshape(packed.shape[0], -1)
    values = (packed.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask  # [r, per, c]
    return values.reshape(-1, packed.shape[1])


def dequantize_awq(qweight, qzeros, scales, bits: int):
    """AutoAWQ GEMM layout -> float32 [in, out]: qweight [in, out/8] and qzeros [groups, out/8]
    pack 4-bit values along the output dim in AWQ's interleaved order; scales are
    [groups, out]; W = (q - z) * s per group of in/groups input rows."""
    import torch

    if bits != 4:
        raise UnsupportedError(f"AWQ GEMM checkpoints are 4-bit; this one says {bits}")
    q = _unpack(qweight, bits, 1)
    z = _unpack(qzeros, bits, 1)
    idx = torch.arange(q.shape[1]).view(-1, 8)[:, list(AWQ_REVERSE_ORDER)].reshape(-1)
    q, z = q[:, idx], z[:, idx]
    group = q.shape[0] // scales.shape[0]
    z = z.repeat_interleave(group, dim=0)
    s = scales.float().repeat_interleave(group, dim=0)
    return (q - z).float() * s


def dequantize_gptq(qweight, qzeros, scales, bits: int, g_idx, zero_offset: int = 1):
    """GPTQ layout -> float32 [in, out]: qweight [in*bits/32, out] packs along the input dim,
    qzeros [groups, out*bits/32] along the output dim (v1 stores zero - 1: ``zero_offset`` 1;
    v2 stores the zero: 0); scales [groups, out]; row i uses group g_idx[i]:
    W = (q - (z + zero_offset)) * s."""
    q = _unpack(qweight, bits, 0)
    z = _unpack(qzeros, bits, 1) + zero_offset
    g = g_idx.long()
    return (q - z[g]).float() * scales.float()[g]


def simulate_online_fp8(model) -> None:
    """Round every linear weight but lm_head to fp8 e4m3 with one scale per tensor, and each
    linear's input the same way on every call — vLLM's dynamic per-tensor online fp8."""
    import torch

    def fake(x):
        scale = x.abs().amax().float().clamp(min=1e-12) / FP8_E4M3_MAX
        return ((x.float() / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            with torch.no_grad():
                module.weight.copy_(fake(module.weight))
            module.register_forward_pre_hook(lambda _m, args: (fake(args[0]), *args[1:]))


def _quant_config(path: Path) -> dict[str, Any] | None:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    qc = config.get("quantization_config")
    return qc if isinstance(qc, dict) and qc else None
