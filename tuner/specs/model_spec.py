"""ModelSpec: the architecture facts the estimator needs, built from a Hugging Face config dict.

Pure: no file, cache or network access (finding and reading a model's config is
:mod:`tuner.specs.model`'s job). Parameter counts come from the architecture (tied embeddings,
biases, MoE total vs active, MLA) via :mod:`tuner.specs.architecture`. A config that cannot
describe a model (a missing or non-positive size, a string or list where a number belongs, a
``quantization_config`` that is not an object) raises :class:`~tuner.errors.ModelError` with one
line naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tuner.errors import ModelError
from tuner.specs.architecture import LinearGroup, count_linear_groups
from tuner.specs.checkpoint import CheckpointInfo

# Keys under which multimodal configs nest the language model's config.
_TEXT_CONFIG_KEYS = ("text_config", "language_config", "llm_config")


@dataclass(frozen=True)
class QuantConfig:
    """A checkpoint's own ``quantization_config``, reduced to what sizes weights."""

    method: str  # vLLM --quantization name: awq, gptq, fp8, bitsandbytes, compressed-tensors
    bits: int
    group_size: int | None = None  # None: per output channel (or per tensor for fp8)
    weight_block_size: tuple[int, int] | None = None  # fp8 block-wise (DeepSeek-V3)
    has_zero_points: bool = True
    has_g_idx: bool = False  # GPTQ stores an int32 group index per input row


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a decoder-only transformer, as the estimator sees it.

    ``linear_groups`` lists every weight matrix family (shape and how many), which is what weight
    bytes under each quantization method and per-step weight reads are computed from.
    """

    name: str
    source: str  # "local", "hf-cache", "card", "hub"
    model_type: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    torch_dtype: str
    attention: str  # "mha" | "gqa" | "mqa" | "mla"
    linear_groups: tuple[LinearGroup, ...]
    norm_params: int  # norms and biases: never quantized
    # MLA (DeepSeek-V2/V3): the cache holds one latent of this width per layer and token.
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    # Sliding-window attention: how many layers use it and the window length.
    sliding_window: int | None = None
    num_sliding_layers: int = 0
    # Mixture of experts.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    quantization: QuantConfig | None = None
    checkpoint: CheckpointInfo | None = None
    path: str | None = None  # local directory, when there is one
    raw_config: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """The output projection; zero extra parameters when tied to the embedding."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def linear_params(self) -> int:
        return sum(g.params for g in self.linear_groups)

    @property
    def param_count(self) -> int:
        """All parameters (every expert counts): what memory holds."""
        return self.embedding_params + self.lm_head_params + self.linear_params + self.norm_params

    @property
    def active_param_count(self) -> int:
        """Parameters one token's forward pass multiplies by: only routed experts it uses, and no
        input-embedding lookup (a gather, not a matmul); the output projection always counts."""
        active_linear = sum(g.active_params(self.num_experts_per_tok) for g in self.linear_groups)
        return active_linear + self.vocab_size * self.hidden_size + self.norm_params

    @property
    def num_full_attention_layers(self) -> int:
        return self.num_layers - self.num_sliding_layers


def kv_width_per_layer(spec: ModelSpec, tensor_parallel_size: int = 1) -> int:
    """Elements cached per token per layer on one GPU: 2·n_kv·d (K and V), or the MLA latent.

    With tensor parallelism KV heads are split across GPUs, and replicated when there are fewer
    KV heads than GPUs; the MLA latent is replicated on every GPU.
    """
    if spec.attention == "mla":
        assert spec.kv_lora_rank is not None and spec.qk_rope_head_dim is not None
        return spec.kv_lora_rank + spec.qk_rope_head_dim
    heads_per_gpu = max(1, spec.num_kv_heads // tensor_parallel_size)
    return 2 * heads_per_gpu * spec.head_dim


# ---------------------------------------------------------------------------------------------
# Building a ModelSpec from a config dict


def spec_from_config(
    config: Mapping[str, Any],
    *,
    name: str,
    source: str,
    checkpoint: CheckpointInfo | None = None,
    path: str | None = None,
) -> ModelSpec:
    """Build a ModelSpec from a Hugging Face ``config.json`` dict; ModelError when a field the
    estimate needs is missing or unusable (the message names the field)."""
    cfg = _text_config(config)

    def need(*keys: str) -> int:
        """The first of ``keys`` that is set (0 included: it fails the positivity check)."""
        for key in keys:
            value = cfg.get(key)
            if value is not None:
                return _whole(value, key, name)
        raise ModelError(f"model {name!r}: config is missing {' / '.join(keys)}")

    def optional(default: int, *keys: str) -> int:
        """The first of ``keys`` that is truthy (configs write 0 or null for "unset")."""
        for key in keys:
            value = cfg.get(key)
            if value:
                return _whole(value, key, name)
        return default

    num_layers = need("num_hidden_layers", "n_layer", "num_layers")
    hidden = need("hidden_size", "n_embd", "d_model")
    num_heads = need("num_attention_heads", "n_head")
    vocab = need("vocab_size")
    _check_positive(
        name,
        num_hidden_layers=num_layers,
        hidden_size=hidden,
        num_attention_heads=num_heads,
        vocab_size=vocab,
    )
    num_kv = optional(num_heads, "num_key_value_heads", "multi_query_group_num")
    head_dim = optional(hidden // num_heads, "head_dim")
    intermediate = optional(4 * hidden, "intermediate_size", "n_inner")
    _check_positive(name, head_dim=head_dim, intermediate_size=intermediate)
    if num_kv <= 0 or num_heads % num_kv:
        raise ModelError(
            f"model {name!r}: num_key_value_heads={num_kv} does not divide "
            f"num_attention_heads={num_heads}"
        )

    is_mla = cfg.get("kv_lora_rank") is not None
    if is_mla:
        attention = "mla"
    elif num_kv == 1 and num_heads > 1:
        attention = "mqa"
    elif num_kv < num_heads:
        attention = "gqa"
    else:
        attention = "mha"
    kv_lora_rank = _whole(cfg["kv_lora_rank"], "kv_lora_rank", name) if is_mla else None
    qk_rope_head_dim = optional(64, "qk_rope_head_dim") if is_mla else None

    try:
        groups, norm_params, experts, experts_per_tok = count_linear_groups(
            cfg,
            num_layers=num_layers,
            hidden=hidden,
            num_heads=num_heads,
            num_kv=num_kv,
            head_dim=head_dim,
            intermediate=intermediate,
        )
    except (TypeError, ValueError, ArithmeticError) as exc:  # e.g. "moe_layer_freq": "two"
        raise ModelError(
            f"model {name!r}: config has an unusable architecture field ({exc})"
        ) from None
    sliding_window, num_sliding = _sliding_layers(cfg, num_layers, name)
    return ModelSpec(
        name=name,
        source=source,
        model_type=str(cfg.get("model_type") or config.get("model_type") or "unknown"),
        num_layers=num_layers,
        hidden_size=hidden,
        num_attention_heads=num_heads,
        num_kv_heads=1 if is_mla else num_kv,
        head_dim=head_dim,
        vocab_size=vocab,
        intermediate_size=intermediate,
        max_position_embeddings=optional(2048, "max_position_embeddings", "n_positions"),
        tie_word_embeddings=bool(
            cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", False))
        ),
        torch_dtype=str(
            cfg.get("torch_dtype") or cfg.get("dtype") or config.get("torch_dtype") or "bfloat16"
        ),
        attention=attention,
        linear_groups=tuple(groups),
        norm_params=norm_params,
        kv_lora_rank=kv_lora_rank,
        qk_rope_head_dim=qk_rope_head_dim,
        sliding_window=sliding_window,
        num_sliding_layers=num_sliding,
        num_experts=experts,
        num_experts_per_tok=experts_per_tok,
        quantization=parse_quantization_config(
            config.get("quantization_config") or cfg.get("quantization_config")
        ),
        checkpoint=checkpoint,
        path=path,
        raw_config=config,
    )


def _whole(value: Any, key: str, name: str) -> int:
    """A config number as an int. A string, list, bool or fraction is a broken config, not a
    number to coerce: ModelError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ModelError(f"model {name!r}: config field {key} must be a number, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise ModelError(
            f"model {name!r}: config field {key} must be a whole number, got {value!r}"
        )
    return int(value)


def _check_positive(name: str, **fields: int) -> None:
    for key, value in fields.items():
        if value <= 0:
            raise ModelError(f"model {name!r}: config field {key} must be positive, got {value}")


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    for key in _TEXT_CONFIG_KEYS:
        sub = config.get(key)
        if isinstance(sub, Mapping) and sub.get("num_hidden_layers"):
            return sub
    return config


def _sliding_layers(cfg: Mapping[str, Any], num_layers: int, name: str) -> tuple[int | None, int]:
    """(window, number of sliding-window layers). Gemma-2 alternates sliding and full layers;
    Gemma-3 uses a pattern; ``layer_types`` (newer configs) says it per layer; Mistral v0.1 style
    configs slide on every layer; Qwen2 carries a window but ``use_sliding_window: false``."""
    window = cfg.get("sliding_window")
    if not window or cfg.get("use_sliding_window") is False:
        return None, 0
    window = _whole(window, "sliding_window", name)
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list) and layer_types:
        return window, sum(1 for t in layer_types if t == "sliding_attention")
    model_type = cfg.get("model_type", "")
    if model_type == "gemma2":
        return window, (num_layers + 1) // 2  # layers 0, 2, 4, ... slide
    pattern = cfg.get("sliding_window_pattern")
    if pattern:
        pattern = _whole(pattern, "sliding_window_pattern", name)
        _check_positive(name, sliding_window_pattern=pattern)
        return window, num_layers - num_layers // pattern  # every pattern-th layer is full
    return window, num_layers


def parse_quantization_config(qc: Any) -> QuantConfig | None:
    """Reduce a checkpoint's ``quantization_config`` to a QuantConfig (None when absent).
    ModelError for an unsupported method, or for a config that is not a JSON object or holds a
    value of the wrong kind."""
    if not qc:
        return None
    if not isinstance(qc, Mapping):
        raise ModelError(f"quantization_config must be a JSON object, got {qc!r}")
    try:
        return _quant_config(qc)
    except (TypeError, ValueError, AttributeError) as exc:  # e.g. "bits": "four"
        raise ModelError(f"quantization_config has a value of the wrong kind ({exc})") from None


def _quant_config(qc: Mapping[str, Any]) -> QuantConfig:
    method = str(qc.get("quant_method", "")).lower()
    if method == "awq":
        return QuantConfig(
            "awq",
            int(qc.get("bits", qc.get("w_bit", 4))),
            _group(qc.get("group_size", qc.get("q_group_size", 128))),
            has_zero_points=bool(qc.get("zero_point", True)),
        )
    if method == "gptq":
        return QuantConfig(
            "gptq",
            int(qc.get("bits", 4)),
            _group(qc.get("group_size", 128)),
            has_zero_points=True,
            has_g_idx=True,
        )
    if method == "fp8":
        block = qc.get("weight_block_size")
        return QuantConfig(
            "fp8",
            8,
            None,
            weight_block_size=tuple(block) if block else None,  # type: ignore[arg-type]
            has_zero_points=False,
        )
    if method == "bitsandbytes":
        bits = 8 if qc.get("load_in_8bit") else 4
        return QuantConfig("bitsandbytes", bits, 64 if bits == 4 else None, has_zero_points=False)
    if method == "compressed-tensors":
        weights = _compressed_tensors_weights(qc)
        bits = int(weights.get("num_bits", 8))
        group = weights.get("group_size")
        return QuantConfig(
            "compressed-tensors",
            bits,
            _group(group) if group else None,
            has_zero_points=not weights.get("symmetric", True),
        )
    raise ModelError(f"unsupported checkpoint quantization method {method!r}")


def _group(value: Any) -> int | None:
    group = int(value)
    return None if group <= 0 else group  # -1 means one group per output channel


def _compressed_tensors_weights(qc: Mapping[str, Any]) -> Mapping[str, Any]:
    for group in (qc.get("config_groups") or {}).values():
        weights = group.get("weights")
        if weights:
            return weights
    return {}
