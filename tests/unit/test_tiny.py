"""The tiny random-weight Llama: shape, tokenizer, chat template, idempotent rebuilds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuner.errors import ParameterError
from tuner.tiny import TINY_MARKER, build_tiny_model, default_tiny_model_dir


def test_session_model_is_a_gqa_llama_with_head_dim_64(tiny_model_dir: Path) -> None:
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["head_dim"] == 64 and cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    assert cfg["hidden_size"] == cfg["num_attention_heads"] * cfg["head_dim"]
    assert cfg["torch_dtype"] == "bfloat16"  # older transformers would otherwise pick float32
    assert (tiny_model_dir / "model.safetensors").stat().st_size > 1_000_000


def test_tokenizer_covers_the_vocab_and_round_trips(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert len(tok) == cfg["vocab_size"]  # every id the model can emit decodes
    assert (tok.bos_token_id, tok.eos_token_id) == (cfg["bos_token_id"], cfg["eos_token_id"])
    text = "The quick brown fox, 42 times: naïve café!"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text  # byte-level: lossless
    assert len(tok("the morning fog rolled in").input_ids) < 12  # merges were learnt


def test_chat_template_renders_roles_and_generation_prompt(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"


def test_build_is_idempotent_and_rebuilds_on_new_params(tmp_path: Path) -> None:
    small = {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
             "intermediate_size": 256, "vocab_size": 300}  # fmt: skip
    out = build_tiny_model(tmp_path / "m", **small)
    weights = out / "model.safetensors"
    first = weights.stat().st_mtime_ns
    assert build_tiny_model(tmp_path / "m", **small) == out
    assert weights.stat().st_mtime_ns == first  # reused, not rebuilt
    marker = json.loads((out / TINY_MARKER).read_text())
    assert marker["vocab_size"] == 300 and marker["seed"] == 0
    build_tiny_model(tmp_path / "m", **small, seed=1)
    assert json.loads((out / TINY_MARKER).read_text())["seed"] == 1
    assert weights.stat().st_mtime_ns != first


def test_incomplete_directory_is_rebuilt(tmp_path: Path) -> None:
    small = {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
             "intermediate_size": 256, "vocab_size": 300}  # fmt: skip
    out = build_tiny_model(tmp_path / "m", **small)
    (out / "model.safetensors").unlink()  # e.g. an interrupted copy
    build_tiny_model(out, **small)
    assert (out / "model.safetensors").is_file()


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    small = {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
             "intermediate_size": 256, "vocab_size": 300}  # fmt: skip
    a = build_tiny_model(tmp_path / "a", **small)
    b = build_tiny_model(tmp_path / "b", **small)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize(
    "bad", [{"num_attention_heads": 4, "num_key_value_heads": 3}, {"vocab_size": 100}]
)
def test_invalid_params_are_parameter_errors(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ParameterError):
        build_tiny_model(tmp_path / "x", **bad)
    assert not (tmp_path / "x").exists()


def test_default_dir_honours_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VTUNE_TINY_MODEL_DIR", str(tmp_path / "here"))
    assert default_tiny_model_dir() == tmp_path / "here"
    monkeypatch.delenv("VTUNE_TINY_MODEL_DIR")
    monkeypatch.chdir(tmp_path)
    assert default_tiny_model_dir() == tmp_path / ".vtune" / "models" / "tiny-llama"
