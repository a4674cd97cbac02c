"""A tiny random-weight Llama for tests and the demo.

``build_tiny_model`` writes a Hugging Face model directory that vLLM (CPU build included) serves:
``config.json`` + ``model.safetensors`` (random weights) and a byte-level BPE tokenizer trained on
the spot on the bundled corpus ``tuner/data/tiny_corpus.txt``, with ``<s>``/``</s>`` and a simple
chat template so both ``/v1/completions`` and ``/v1/chat/completions`` work. No download happens.

The default sizes are chosen for vLLM CPU (measured on vLLM CPU 0.32.0):
- head_dim 64, a size vLLM's CPU attention supports (16 is not);
- GQA (4 query heads over 2 KV heads) so KV arithmetic exercises ``n_kv < n_heads``;
- small enough that loading takes well under a second, large enough that one decode step costs
  real compute, so throughput clearly rises with batch size (the search must see max_num_seqs
  matter).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

TINY_MARKER = "vtune-tiny.json"
"""File written last into a built model directory; it records the parameters used."""

_CORPUS = Path(__file__).parent / "data" / "tiny_corpus.txt"
_SPECIALS = ("<s>", "</s>", "<pad>")

_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class TinyParams:
    """Everything that determines the built model; stored in the marker file."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    dtype: str
    seed: int
    version: int = 1  # bump when the build recipe changes, so stale directories are rebuilt


def default_tiny_model_dir() -> Path:
    """Where the demo keeps its tiny model.

    ``$VTUNE_TINY_MODEL_DIR`` if set, else ``.vtune/models/tiny-llama`` under the current directory.
    """
    env = os.environ.get("VTUNE_TINY_MODEL_DIR")
    return Path(env) if env else Path.cwd() / ".vtune" / "models" / "tiny-llama"


def build_tiny_model(
    out_dir: Path,
    *,
    num_layers: int = 2,
    hidden_size: int = 256,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 64,
    intermediate_size: int = 1024,
    vocab_size: int = 1024,
    max_position_embeddings: int = 2048,
    dtype: str = "bfloat16",
    seed: int = 0,
) -> Path:
    """Build (or reuse) a random-weight Llama with a trained tokenizer in ``out_dir``.

    Returns ``out_dir``. If ``out_dir`` already holds a complete model built with the same
    parameters (marker file ``vtune-tiny.json``), it is returned untouched. The tokenizer has
    exactly ``vocab_size`` entries (BPE merges, padded with unused ``<|extra_i|>`` tokens when the
    corpus runs out of merges), so every id the model can emit decodes. Deterministic for a seed.
    """
    from tuner.errors import ParameterError

    if num_attention_heads % num_key_value_heads:
        raise ParameterError(
            f"num_attention_heads ({num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({num_key_value_heads})"
        )
    if vocab_size < 256 + len(_SPECIALS):
        raise ParameterError(f"vocab_size must be at least {256 + len(_SPECIALS)} (byte-level BPE)")
    params = TinyParams(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        dtype=dtype,
        seed=seed,
    )
    out_dir = Path(out_dir)
    if _is_complete(out_dir, params):
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / TINY_MARKER
    marker.unlink(missing_ok=True)  # an interrupted rebuild must not look complete
    tokenizer = _build_tokenizer(vocab_size)
    tokenizer.save_pretrained(out_dir)
    _build_weights(out_dir, params, tokenizer)
    _widen_compatibility(out_dir, params)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(params), indent=2, sort_keys=True) + "\n")
    tmp.replace(marker)  # written last: its presence means the directory is complete
    return out_dir


def _is_complete(out_dir: Path, params: TinyParams) -> bool:
    marker = out_dir / TINY_MARKER
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    needed = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return recorded == asdict(params) and all((out_dir / n).is_file() for n in needed)


def _build_tokenizer(vocab_size: int):
    """Train a byte-level BPE of exactly ``vocab_size`` tokens on the bundled corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = _CORPUS.read_text(encoding="utf-8")
    # Lines as separate samples keep training deterministic and fast.
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    # Pad with plain added tokens so the tokenizer covers every id the model can emit.
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_tokens([f"<|extra_{i}|>" for i in range(missing)])
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=1 << 30,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = _CHAT_TEMPLATE
    return fast


def _widen_compatibility(out_dir: Path, params: TinyParams) -> None:
    """Let older transformers (4.x, as GPU boxes' vLLM may pin) read what transformers 5 wrote:
    the generic tokenizer class name, the chat template inline, ``torch_dtype`` and
    ``rope_theta`` beside their new spellings. Without ``torch_dtype`` an older vLLM would
    serve float32."""
    tok_path = out_dir / "tokenizer_config.json"
    tok = json.loads(tok_path.read_text())
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok.pop("backend", None)
    tok["chat_template"] = _CHAT_TEMPLATE
    tok_path.write_text(json.dumps(tok, indent=2, sort_keys=True) + "\n")
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("torch_dtype", params.dtype)
    cfg.setdefault("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _build_weights(out_dir: Path, params: TinyParams, tokenizer) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=params.vocab_size,
        hidden_size=params.hidden_size,
        intermediate_size=params.intermediate_size,
        num_hidden_layers=params.num_layers,
        num_attention_heads=params.num_attention_heads,
        num_key_value_heads=params.num_key_value_heads,
        head_dim=params.head_dim,
        max_position_embeddings=params.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    from transformers.utils import logging as hf_logging

    torch.manual_seed(params.seed)
    model = LlamaForCausalLM(config)
    model = model.to(getattr(torch, params.dtype))
    model.config.dtype = params.dtype
    bars_were_off = hf_logging.is_progress_bar_enabled() is False
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar on stderr
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
    finally:
        if not bars_were_off:
            hf_logging.enable_progress_bar()
