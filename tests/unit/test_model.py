"""ModelSpec: parameter counts against published figures, attention kinds, configs, errors."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest

from tuner.errors import ModelError
from tuner.specs.model import card_ids, kv_width_per_layer, load_model, spec_from_config

# Published totals (vendor model cards / papers).
PUBLISHED = {
    "meta-llama/Llama-3.1-8B-Instruct": 8.03e9,
    "mistralai/Mixtral-8x7B-Instruct-v0.1": 46.7e9,
    "Qwen/Qwen2.5-7B-Instruct": 7.62e9,
    "Qwen/Qwen2.5-72B-Instruct": 72.7e9,
    "meta-llama/Llama-2-7b-hf": 6.74e9,
    "meta-llama/Llama-2-13b-hf": 13.0e9,
    "meta-llama/Llama-2-70b-hf": 69.0e9,
    "meta-llama/Llama-3.1-70B-Instruct": 70.6e9,
    "mistralai/Mistral-7B-Instruct-v0.3": 7.25e9,
    "google/gemma-2-9b-it": 9.24e9,
    "deepseek-ai/DeepSeek-V2-Lite-Chat": 15.7e9,
    "deepseek-ai/DeepSeek-V3": 671e9,
}


@pytest.mark.parametrize("name,published", sorted(PUBLISHED.items()))
def test_param_count_within_one_percent_of_published(name: str, published: float) -> None:
    spec = load_model(name)
    assert spec.source == "card"
    assert abs(spec.param_count - published) / published < 0.01


def test_every_required_card_is_bundled() -> None:
    ids = set(card_ids())
    for name in (
        "meta-llama/Llama-2-7b-hf",
        "meta-llama/Llama-2-13b-hf",
        "meta-llama/Llama-2-70b-hf",
        "meta-llama/Llama-3.1-8B-Instruct",
        "meta-llama/Llama-3.1-70B-Instruct",
        "mistralai/Mistral-7B-Instruct-v0.3",
        "mistralai/Mixtral-8x7B-Instruct-v0.1",
        "Qwen/Qwen2.5-0.5B-Instruct",
        "Qwen/Qwen2.5-7B-Instruct",
        "Qwen/Qwen2.5-72B-Instruct",
        "deepseek-ai/DeepSeek-V2-Lite-Chat",
        "google/gemma-2-9b-it",
    ):
        assert name in ids


def test_aliases_are_case_insensitive() -> None:
    assert load_model("LLAMA-3.1-8B").name == "meta-llama/Llama-3.1-8B-Instruct"


def test_moe_total_vs_active() -> None:
    mixtral = load_model("mixtral-8x7b")
    assert mixtral.is_moe and mixtral.num_experts == 8 and mixtral.num_experts_per_tok == 2
    # Mistral AI: 12.9B active (counting embeddings); ours excludes the input embedding lookup.
    embed = mixtral.vocab_size * mixtral.hidden_size
    assert abs(mixtral.active_param_count + embed - 12.9e9) / 12.9e9 < 0.01
    v3 = load_model("deepseek-v3")
    assert abs(v3.active_param_count - 37e9) / 37e9 < 0.02  # DeepSeek: 37B activated


def test_tied_embeddings_count_once() -> None:
    qwen = load_model("qwen2.5-0.5b")
    assert qwen.tie_word_embeddings and qwen.lm_head_params == 0
    untied = spec_from_config(
        {**qwen.raw_config, "tie_word_embeddings": False}, name="x", source="test"
    )
    assert untied.param_count - qwen.param_count == qwen.vocab_size * qwen.hidden_size


def test_qkv_bias_counted_for_qwen2() -> None:
    qwen = load_model("qwen2.5-7b")
    no_bias = spec_from_config({**qwen.raw_config, "model_type": "llama"}, name="x", source="t")
    q_kv = (qwen.num_attention_heads + 2 * qwen.num_kv_heads) * qwen.head_dim
    assert qwen.param_count - no_bias.param_count == qwen.num_layers * q_kv


def test_attention_kinds() -> None:
    assert load_model("llama-2-13b").attention == "mha"
    assert load_model("llama-3.1-8b").attention == "gqa"
    assert load_model("deepseek-v2-lite").attention == "mla"
    base = load_model("llama-3.1-8b").raw_config
    mqa = spec_from_config({**base, "num_key_value_heads": 1}, name="mqa", source="t")
    assert mqa.attention == "mqa"
    assert kv_width_per_layer(mqa) == 2 * 1 * 128


def test_gemma2_alternates_sliding_layers() -> None:
    gemma = load_model("gemma-2-9b")
    assert gemma.sliding_window == 4096
    assert gemma.num_sliding_layers == 21 and gemma.num_full_attention_layers == 21


def test_qwen_window_disabled_means_no_sliding() -> None:
    assert load_model("qwen2.5-7b").num_sliding_layers == 0


def test_checkpoint_quantization_config_is_read() -> None:
    v3 = load_model("deepseek-v3")
    assert v3.quantization is not None
    assert v3.quantization.method == "fp8" and v3.quantization.weight_block_size == (128, 128)


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], int]]) -> None:
    header, offset = {}, 0
    for name, (dtype, shape, itemsize) in tensors.items():
        size = itemsize
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def test_local_directory_reads_config_and_safetensors(tmp_path: Path) -> None:
    cfg = {
        "model_type": "llama",
        "num_hidden_layers": 2,
        "hidden_size": 128,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "intermediate_size": 256,
        "vocab_size": 1000,
        "max_position_embeddings": 512,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _write_safetensors(
        tmp_path / "model.safetensors", {"a": ("BF16", [10, 20], 2), "b": ("F32", [5], 4)}
    )
    spec = load_model(str(tmp_path))
    assert spec.source == "local" and spec.attention == "mqa"
    assert spec.checkpoint is not None
    assert spec.checkpoint.tensor_bytes == 10 * 20 * 2 + 5 * 4
    assert spec.checkpoint.num_elements == 205


@pytest.mark.parametrize("missing", ["num_hidden_layers", "hidden_size", "vocab_size"])
def test_missing_field_is_a_model_error_naming_it(tmp_path: Path, missing: str) -> None:
    cfg = {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2, "vocab_size": 1000}
    del cfg[missing]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=missing):
        load_model(str(tmp_path))


def test_unreadable_and_unknown_models(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_model(str(tmp_path))
    with pytest.raises(ModelError, match="does not exist"):
        load_model("./no/such/dir")
    with pytest.raises(ModelError, match="did you mean"):
        load_model("llama-3.1-8", offline=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=r"no config\.json"):
        load_model(str(empty))


# --- broken configs end in one ModelError, never a traceback ------------------------------------

_GOOD = {
    "model_type": "llama",
    "num_hidden_layers": 2,
    "hidden_size": 128,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 256,
    "vocab_size": 1000,
}


def _model_dir(tmp_path: Path, **changes: object) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({**_GOOD, **changes}))
    return tmp_path


def test_the_good_config_loads(tmp_path: Path) -> None:
    spec = load_model(str(_model_dir(tmp_path)))
    assert spec.head_dim == 64 and spec.attention == "mqa"


def test_zero_attention_heads_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="num_attention_heads must be positive, got 0"):
        load_model(str(_model_dir(tmp_path, num_attention_heads=0)))


@pytest.mark.parametrize(
    "key,value",
    [
        ("hidden_size", "4096"),
        ("num_hidden_layers", "thirty-two"),
        ("num_attention_heads", [32, 32]),
        ("vocab_size", True),
        ("num_key_value_heads", "1"),
        ("head_dim", 64.5),
        ("intermediate_size", {"mlp": 256}),
    ],
)
def test_a_string_or_list_where_a_number_belongs_is_a_model_error(
    tmp_path: Path, key: str, value: object
) -> None:
    with pytest.raises(ModelError, match=f"config field {key} must be a"):
        load_model(str(_model_dir(tmp_path, **{key: value})))


def test_a_whole_float_is_still_a_number(tmp_path: Path) -> None:
    assert load_model(str(_model_dir(tmp_path, hidden_size=128.0))).hidden_size == 128


def test_a_broken_architecture_field_is_a_model_error(tmp_path: Path) -> None:
    moe = {"num_local_experts": 4, "num_experts_per_tok": 2, "moe_layer_freq": "two"}
    with pytest.raises(ModelError, match="unusable architecture field"):
        load_model(str(_model_dir(tmp_path, **moe)))
    with pytest.raises(ModelError, match="sliding_window must be a number"):
        load_model(str(_model_dir(tmp_path, sliding_window="4k")))


@pytest.mark.parametrize(
    "qc,needle",
    [
        ("awq", "quantization_config must be a JSON object, got 'awq'"),
        (["gptq"], "quantization_config must be a JSON object"),
        ({"quant_method": "gptq", "bits": "four"}, "quantization_config has a value of the wrong"),
        ({"quant_method": "compressed-tensors", "config_groups": ["g"]}, "wrong kind"),
    ],
)
def test_a_broken_quantization_config_is_a_model_error(
    tmp_path: Path, qc: object, needle: str
) -> None:
    with pytest.raises(ModelError, match=needle):
        load_model(str(_model_dir(tmp_path, quantization_config=qc)))


def _write_header(path: Path, header: dict[str, object]) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


@pytest.mark.parametrize(
    "entry,needle",
    [
        ({"dtype": "BF16", "shape": [2, 2]}, "tensor 'w' has no data_offsets"),
        ({"shape": [2, 2], "data_offsets": [0, 8]}, "tensor 'w' has no dtype"),
        ({"dtype": "BF16", "shape": [2, 2], "data_offsets": [8]}, "not [start, end]"),
        ({"dtype": "BF16", "shape": [2, 2], "data_offsets": [8, 0]}, "not [start, end]"),
        ({"dtype": "BF16", "shape": "2x2", "data_offsets": [0, 8]}, "not a list of sizes"),
        ("BF16", "tensor 'w' is not a JSON object"),
    ],
)
def test_a_broken_safetensors_entry_is_a_model_error(
    tmp_path: Path, entry: object, needle: str
) -> None:
    _write_header(_model_dir(tmp_path) / "model.safetensors", {"w": entry})
    with pytest.raises(ModelError, match=f"safetensors header of .*{re.escape(needle)}"):
        load_model(str(tmp_path))
