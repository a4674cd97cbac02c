"""ModelSpec: the architecture facts the estimator needs, read from a Hugging Face config.

Sources, in order: a local directory holding ``config.json``; the Hugging Face cache; the bundled
architecture cards (``tuner/data/model_cards.json``, so estimates work offline); the hub (config
only, never weights). Parameter counts come from the architecture (tied embeddings, biases, MoE
total vs active, MLA) or, for a local checkpoint, from its safetensors headers.

The config is read as plain JSON: no transformers or torch import, so ``vtune estimate`` stays fast.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from tuner.errors import ModelError
from tuner.specs.architecture import LinearGroup, count_linear_groups
from tuner.specs.checkpoint import CheckpointInfo, read_checkpoint_info

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

    def need(*keys: str) -> Any:
        for key in keys:
            value = cfg.get(key)
            if value is not None:
                return value
        raise ModelError(f"model {name!r}: config is missing {' / '.join(keys)}")

    num_layers = int(need("num_hidden_layers", "n_layer", "num_layers"))
    hidden = int(need("hidden_size", "n_embd", "d_model"))
    num_heads = int(need("num_attention_heads", "n_head"))
    num_kv = int(cfg.get("num_key_value_heads") or cfg.get("multi_query_group_num") or num_heads)
    head_dim = int(cfg.get("head_dim") or hidden // num_heads)
    vocab = int(need("vocab_size"))
    intermediate = int(cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * hidden)
    for key, value in (
        ("num_hidden_layers", num_layers),
        ("hidden_size", hidden),
        ("num_attention_heads", num_heads),
        ("vocab_size", vocab),
    ):
        if value <= 0:
            raise ModelError(f"model {name!r}: config field {key} must be positive, got {value}")
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

    groups, norm_params, experts, experts_per_tok = count_linear_groups(
        cfg,
        num_layers=num_layers,
        hidden=hidden,
        num_heads=num_heads,
        num_kv=num_kv,
        head_dim=head_dim,
        intermediate=intermediate,
    )
    sliding_window, num_sliding = _sliding_layers(cfg, num_layers)
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
        max_position_embeddings=int(
            cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2048
        ),
        tie_word_embeddings=bool(
            cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", False))
        ),
        torch_dtype=str(
            cfg.get("torch_dtype") or cfg.get("dtype") or config.get("torch_dtype") or "bfloat16"
        ),
        attention=attention,
        linear_groups=tuple(groups),
        norm_params=norm_params,
        kv_lora_rank=int(cfg["kv_lora_rank"]) if is_mla else None,
        qk_rope_head_dim=int(cfg.get("qk_rope_head_dim") or 64) if is_mla else None,
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


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    for key in _TEXT_CONFIG_KEYS:
        sub = config.get(key)
        if isinstance(sub, Mapping) and sub.get("num_hidden_layers"):
            return sub
    return config


def _sliding_layers(cfg: Mapping[str, Any], num_layers: int) -> tuple[int | None, int]:
    """(window, number of sliding-window layers). Gemma-2 alternates sliding and full layers;
    Gemma-3 uses a pattern; ``layer_types`` (newer configs) says it per layer; Mistral v0.1 style
    configs slide on every layer; Qwen2 carries a window but ``use_sliding_window: false``."""
    window = cfg.get("sliding_window")
    if not window or cfg.get("use_sliding_window") is False:
        return None, 0
    window = int(window)
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list) and layer_types:
        return window, sum(1 for t in layer_types if t == "sliding_attention")
    model_type = cfg.get("model_type", "")
    if model_type == "gemma2":
        return window, (num_layers + 1) // 2  # layers 0, 2, 4, ... slide
    pattern = cfg.get("sliding_window_pattern")
    if pattern:
        pattern = int(pattern)
        return window, num_layers - num_layers // pattern  # every pattern-th layer is full
    return window, num_layers


def parse_quantization_config(qc: Mapping[str, Any] | None) -> QuantConfig | None:
    """Reduce a checkpoint's ``quantization_config`` to a QuantConfig (None when absent)."""
    if not qc:
        return None
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


# ---------------------------------------------------------------------------------------------
# Resolving a model name


@cache
def load_cards() -> dict[str, dict[str, Any]]:
    """The bundled architecture cards, keyed by lower-case hub id and alias."""
    text = resources.files("tuner").joinpath("data/model_cards.json").read_text()
    cards: dict[str, dict[str, Any]] = {}
    for card in json.loads(text)["cards"]:
        for key in (card["hub_id"], *card.get("aliases", [])):
            cards[key.lower()] = card
    return cards


def card_ids() -> list[str]:
    """Hub ids of the bundled cards, sorted."""
    return sorted({card["hub_id"] for card in load_cards().values()})


def load_model(name: str, *, offline: bool | None = None) -> ModelSpec:
    """Resolve ``name`` to a ModelSpec: local directory, HF cache, bundled card, then the hub.

    ``offline`` defaults to the ``HF_HUB_OFFLINE`` environment variable. Raises ModelError with
    one line when nothing can be found or read.
    """
    if not name or not name.strip():
        raise ModelError("model name is empty")
    path = Path(name).expanduser()
    if path.exists():
        return _load_local(path, name)
    if name.startswith((".", "/", "~")):
        raise ModelError(f"model directory {name!r} does not exist")

    cached = _from_hf_cache(name)
    if cached is not None:
        return spec_from_config(_read_json(cached, name), name=name, source="hf-cache")

    card = load_cards().get(name.lower())
    if card is not None:
        return spec_from_config(card["config"], name=card["hub_id"], source="card")

    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if not offline and "/" in name:
        config = _from_hub(name)
        if config is not None:
            return spec_from_config(config, name=name, source="hub")
    raise ModelError(_not_found_message(name))


def _load_local(path: Path, name: str) -> ModelSpec:
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise ModelError(f"model directory {str(path)!r} has no config.json")
    checkpoint = read_checkpoint_info(path) if path.is_dir() else None
    return spec_from_config(
        _read_json(config_file, name),
        name=name,
        source="local",
        checkpoint=checkpoint,
        path=str(path.resolve()) if path.is_dir() else None,
    )


def _read_json(file: Path, name: str) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"model {name!r}: cannot read {file}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ModelError(
            f"model {name!r}: {file} is not valid JSON ({exc.msg}, line {exc.lineno})"
        ) from None
    if not isinstance(data, dict):
        raise ModelError(f"model {name!r}: {file} does not hold a JSON object")
    return data


def _from_hf_cache(name: str) -> Path | None:
    if "/" not in name:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # transformers brings huggingface_hub; without it there is no cache
        return None
    found = try_to_load_from_cache(name, "config.json")
    return Path(found) if isinstance(found, str) else None


def _from_hub(name: str) -> dict[str, Any] | None:
    """Fetch config.json (never weights) from the hub; None when unreachable or absent.
    The token, if any, comes from huggingface_hub's own settings and is never logged here."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:
        return None
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    try:
        file = hf_hub_download(name, "config.json")
    except (HfHubHTTPError, OSError, ValueError):
        return None
    except Exception:  # network stacks raise many types; any of them means "not reachable"
        return None
    return _read_json(Path(file), name)


def _not_found_message(name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name.lower(), list(load_cards()), n=3, cutoff=0.5)
    hint = (
        f"; did you mean {', '.join(close)}?"
        if close
        else "; `vtune estimate --list-models` lists bundled cards"
    )
    return (
        f"model {name!r} not found: not a local directory, not in the Hugging Face cache, "
        f"not a bundled card, and not reachable on the hub{hint}"
    )
