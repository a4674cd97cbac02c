"""Model configs the unit tests write as config.json (no weights: planning and fake runs)."""

from __future__ import annotations

# A small Llama (GQA, head_dim 64) that every estimator path accepts.
TINY_LLAMA_CONFIG = {
    "model_type": "llama",
    "num_hidden_layers": 2,
    "hidden_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "intermediate_size": 1024,
    "vocab_size": 1024,
    "max_position_embeddings": 2048,
    "torch_dtype": "bfloat16",
}
