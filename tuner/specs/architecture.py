"""Weight-matrix inventory of a decoder-only transformer from its config (pure, no I/O).

Each :class:`LinearGroup` is one family of matrices of the same shape (e.g. all layers' q_proj).
Weight bytes under a quantization method, parameter counts (total and active) and per-step weight
reads are all sums over this list, so getting it right here gets them right everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Families whose MLP is fc1 -> act -> fc2 (two matrices) rather than gated (gate, up, down).
_UNGATED_MLP = {"gpt2", "gpt_neox", "opt", "falcon", "bloom", "gpt_bigcode", "starcoder2", "phi"}
# Families with four RMSNorms per layer (pre/post attention and pre/post MLP).
_FOUR_NORMS = {"gemma2", "gemma3", "gemma3_text"}
# Families with biases on q, k and v but not o.
_QKV_BIAS = {"qwen2", "qwen2_moe", "qwen2_vl"}


@dataclass(frozen=True)
class LinearGroup:
    """``count`` matrices of shape in_features x out_features.

    kind: "attention", "mlp", "expert" (routed; ``num_experts`` per layer), "shared_expert", or
    "router". Routers stay 16-bit under every quantization method vLLM applies.
    """

    name: str
    in_features: int
    out_features: int
    count: int
    kind: str
    num_experts: int = 0

    @property
    def params(self) -> int:
        return self.in_features * self.out_features * self.count

    @property
    def quantizable(self) -> bool:
        return self.kind != "router"

    def active_params(self, experts_per_tok: int) -> int:
        """Parameters one token multiplies by: a routed expert group counts k of its E experts."""
        if self.kind == "expert" and self.num_experts:
            return self.params * experts_per_tok // self.num_experts
        return self.params

    def touched_fraction(self, batch: int, experts_per_tok: int) -> float:
        """Expected fraction of this group read in a decode step of ``batch`` tokens: all of a
        dense group; for routed experts 1 - (1 - k/E)^B, assuming uniform routing."""
        if self.kind != "expert" or not self.num_experts:
            return 1.0
        return 1.0 - (1.0 - experts_per_tok / self.num_experts) ** max(batch, 1)


def count_linear_groups(
    cfg: Mapping[str, Any],
    *,
    num_layers: int,
    hidden: int,
    num_heads: int,
    num_kv: int,
    head_dim: int,
    intermediate: int,
) -> tuple[list[LinearGroup], int, int, int]:
    """Return (linear groups, norm-and-bias parameter count, experts per MoE layer, experts per
    token) for the config's architecture family."""
    model_type = str(cfg.get("model_type", ""))
    groups: list[LinearGroup] = []
    other = 0  # norms and biases

    if cfg.get("kv_lora_rank") is not None:
        attn_groups, attn_other = _mla_attention(cfg, num_layers, hidden, num_heads)
    else:
        attn_groups, attn_other = _mha_attention(
            cfg, model_type, num_layers, hidden, num_heads, num_kv, head_dim
        )
    groups += attn_groups
    other += attn_other

    mlp_groups, experts, experts_per_tok, mlp_other = _mlp(
        cfg, model_type, num_layers, hidden, intermediate
    )
    groups += mlp_groups
    other += mlp_other

    norms_per_layer = 4 if model_type in _FOUR_NORMS else 2
    other += num_layers * norms_per_layer * hidden + hidden  # + the final norm
    if model_type.startswith("qwen3"):
        other += num_layers * 2 * head_dim  # per-head q_norm and k_norm
    return groups, other, experts, experts_per_tok


def _mha_attention(
    cfg: Mapping[str, Any], model_type: str, layers: int, hidden: int, heads: int, kv: int, d: int
) -> tuple[list[LinearGroup], int]:
    q_out, kv_out = heads * d, kv * d
    groups = [
        LinearGroup("q_proj", hidden, q_out, layers, "attention"),
        LinearGroup("k_proj", hidden, kv_out, layers, "attention"),
        LinearGroup("v_proj", hidden, kv_out, layers, "attention"),
        LinearGroup("o_proj", q_out, hidden, layers, "attention"),
    ]
    bias = 0
    if cfg.get("attention_bias"):
        bias = layers * (q_out + 2 * kv_out + hidden)
    elif model_type in _QKV_BIAS:
        bias = layers * (q_out + 2 * kv_out)
    return groups, bias


def _mla_attention(
    cfg: Mapping[str, Any], layers: int, hidden: int, heads: int
) -> tuple[list[LinearGroup], int]:
    """DeepSeek-V2/V3 multi-head latent attention."""
    kv_rank = int(cfg["kv_lora_rank"])
    q_rank = cfg.get("q_lora_rank")
    rope = int(cfg.get("qk_rope_head_dim", 64))
    nope = int(cfg.get("qk_nope_head_dim", 128))
    v_dim = int(cfg.get("v_head_dim", 128))
    qk_dim = nope + rope
    groups: list[LinearGroup] = []
    other = 0
    if q_rank:
        groups += [
            LinearGroup("q_a_proj", hidden, int(q_rank), layers, "attention"),
            LinearGroup("q_b_proj", int(q_rank), heads * qk_dim, layers, "attention"),
        ]
        other += layers * int(q_rank)  # q_a_layernorm
    else:
        groups.append(LinearGroup("q_proj", hidden, heads * qk_dim, layers, "attention"))
    groups += [
        LinearGroup("kv_a_proj_with_mqa", hidden, kv_rank + rope, layers, "attention"),
        LinearGroup("kv_b_proj", kv_rank, heads * (nope + v_dim), layers, "attention"),
        LinearGroup("o_proj", heads * v_dim, hidden, layers, "attention"),
    ]
    other += layers * kv_rank  # kv_a_layernorm
    return groups, other


def _mlp(
    cfg: Mapping[str, Any], model_type: str, layers: int, hidden: int, intermediate: int
) -> tuple[list[LinearGroup], int, int, int]:
    """MLP groups for dense and MoE families; returns (groups, experts, experts/token, other)."""
    experts = int(
        cfg.get("num_local_experts") or cfg.get("n_routed_experts") or cfg.get("num_experts") or 0
    )
    per_tok = int(cfg.get("num_experts_per_tok") or 0)
    if not experts or not per_tok:
        return _dense_mlp("mlp", hidden, intermediate, layers, model_type), 0, 0, 0

    # MoE: some families keep the first k layers dense (DeepSeek), or alternate (moe_layer_freq).
    first_dense = int(cfg.get("first_k_dense_replace") or 0)
    freq = int(cfg.get("moe_layer_freq") or cfg.get("decoder_sparse_step") or 1)
    moe_layers = sum(1 for i in range(first_dense, layers) if (i - first_dense) % freq == 0)
    dense_layers = layers - moe_layers
    expert_inter = int(cfg.get("moe_intermediate_size") or intermediate)

    groups = _dense_mlp("mlp", hidden, intermediate, dense_layers, model_type)
    groups += [
        LinearGroup(
            f"experts.{g.name.removeprefix('x.')}",
            g.in_features,
            g.out_features,
            moe_layers * experts,
            "expert",
            num_experts=experts,
        )
        for g in _dense_mlp("x", hidden, expert_inter, 1, model_type)
    ]
    groups.append(LinearGroup("router", hidden, experts, moe_layers, "router"))
    other = 0
    if cfg.get("topk_method") == "noaux_tc":  # DeepSeek-V3 keeps a per-expert score bias
        other += moe_layers * experts

    shared_inter = int(cfg.get("shared_expert_intermediate_size") or 0)
    n_shared = int(cfg.get("n_shared_experts") or 0)
    if n_shared:
        shared_inter = n_shared * expert_inter
    if shared_inter:
        groups += [
            LinearGroup(
                f"shared_expert.{g.name.removeprefix('x.')}",
                g.in_features,
                g.out_features,
                moe_layers,
                "shared_expert",
            )
            for g in _dense_mlp("x", hidden, shared_inter, 1, model_type)
        ]
        if cfg.get("shared_expert_intermediate_size"):  # Qwen2-MoE gates its shared expert
            groups.append(LinearGroup("shared_expert_gate", hidden, 1, moe_layers, "router"))
    return [g for g in groups if g.count], experts, per_tok, other


def _dense_mlp(
    prefix: str, hidden: int, inter: int, layers: int, model_type: str
) -> list[LinearGroup]:
    if not layers:
        return []
    if model_type in _UNGATED_MLP:
        return [
            LinearGroup(f"{prefix}.fc1", hidden, inter, layers, "mlp"),
            LinearGroup(f"{prefix}.fc2", inter, hidden, layers, "mlp"),
        ]
    return [
        LinearGroup(f"{prefix}.gate_proj", hidden, inter, layers, "mlp"),
        LinearGroup(f"{prefix}.up_proj", hidden, inter, layers, "mlp"),
        LinearGroup(f"{prefix}.down_proj", inter, hidden, layers, "mlp"),
    ]
