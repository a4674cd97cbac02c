"""The tokenizer read with ``tokenizers`` alone (tuner.load.fast_tokenizer) answers as
transformers' does: same ids, texts, special ids, requests; it falls back when it might not."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tuner.load.fast_tokenizer import GENERIC_MODEL_TYPES, FastTokenizer, load_fast
from tuner.load.prompts import (
    LengthRange,
    exact_text,
    load_tokenizer,
    transformers_tokenizer,
    usable_ids,
    word_pool,
)
from tuner.load.workload import random_requests

ROOT = Path(__file__).resolve().parents[2]
TEXTS = [
    "",
    " ",
    "The quick brown fox, 42 times: naïve café!",
    "  leading and trailing spaces  \n\ttabs\r\nand CRLF  ",
    "<s>a literal bos</s> and <pad> in the text<s>",
    "emoji 🦜🚀 and CJK 漢字かな, RTL שלום, combining é",
    "don't stop ... she said , isn 't it ? ( yes )",  # what a clean-up would change
    "x" * 500,
]


def _corpus_lines() -> list[str]:
    text = (ROOT / "tuner" / "data" / "tiny_corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()][:200]


@pytest.fixture(scope="module")
def pair(tiny_model_dir: Path) -> tuple[Any, Any]:
    """(the fast tokenizer, transformers' tokenizer) of the tiny model."""
    fast = load_tokenizer(tiny_model_dir)
    assert isinstance(fast, FastTokenizer)
    return fast, transformers_tokenizer(tiny_model_dir)


def _assert_same(fast: Any, slow: Any, texts: list[str]) -> None:
    """Every part of a tokenizer request building uses gives the same answer."""
    assert isinstance(fast, FastTokenizer)
    assert len(fast) == len(slow) and fast.vocab_size == slow.vocab_size
    assert fast.all_special_tokens == slow.all_special_tokens
    assert fast.all_special_ids == slow.all_special_ids
    assert np.array_equal(usable_ids(fast), usable_ids(slow))
    for text in texts:
        assert fast.encode(text, add_special_tokens=False) == slow.encode(
            text, add_special_tokens=False
        ), text
    batch = fast(texts, add_special_tokens=False)["input_ids"]
    assert batch == slow(texts, add_special_tokens=False)["input_ids"]
    ids = list(range(len(slow)))
    assert [fast.decode([i]) for i in ids] == [slow.decode([i]) for i in ids]
    rng = np.random.default_rng(3)
    for _ in range(50):
        seq = rng.integers(0, len(slow), size=int(rng.integers(1, 40))).tolist()
        assert fast.decode(seq) == slow.decode(seq)
    for text in texts:  # decode(encode(text)) round trips alike, specials inside included
        seq = slow.encode(text, add_special_tokens=False)
        assert fast.decode(seq) == slow.decode(seq)


def test_tiny_model_gets_the_fast_path_without_importing_transformers(tiny_model_dir: Path):
    code = (
        "import sys; from tuner.load.prompts import load_tokenizer\n"
        f"tok = load_tokenizer({str(tiny_model_dir)!r})\n"
        "print(type(tok).__name__, 'transformers' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["FastTokenizer", "False", "False"]


def test_same_ids_texts_and_special_ids_as_transformers(pair: tuple[Any, Any]):
    fast, slow = pair
    _assert_same(fast, slow, TEXTS + _corpus_lines())
    assert type(slow).__name__ == "TokenizersBackend"  # the class the fast path stands in for
    assert fast.decode(np.int64(5)) == slow.decode(5)  # numpy ids, as request builders draw


def test_same_requests_for_both_endpoints(pair: tuple[Any, Any]):
    fast, slow = pair
    rng_f, rng_s = np.random.default_rng(11), np.random.default_rng(11)
    assert np.array_equal(word_pool(fast, rng_f), word_pool(slow, rng_s))
    for endpoint in ("completions", "chat"):
        kw: dict[str, Any] = dict(seed=5, prefix_len=8, num_prefixes=2, endpoint=endpoint)
        a = random_requests(fast, 30, LengthRange(10, 60), LengthRange.fixed(4), **kw)
        b = random_requests(slow, 30, LengthRange(10, 60), LengthRange.fixed(4), **kw)
        assert a == b, endpoint
    pool = usable_ids(slow)
    ids = np.random.default_rng(2).choice(pool, size=40).tolist()
    got = [exact_text(t, ids, 40, np.random.default_rng(9), pool) for t in (fast, slow)]
    assert got[0] == got[1]


def test_chat_template_and_special_tokens_come_from_transformers(pair: tuple[Any, Any]):
    """What needs more than the fast slice (the chat template, a BOS-adding encode, named
    special tokens) is answered by transformers' tokenizer, loaded on first use."""
    fast, slow = pair
    messages = [{"role": "user", "content": "hello there"}]
    assert fast.chat_template == slow.chat_template
    assert fast.apply_chat_template(messages, tokenize=False) == slow.apply_chat_template(
        messages, tokenize=False
    )
    text = "the morning fog"
    assert fast.encode(text) == slow.encode(text) and fast.encode(text)[0] == slow.bos_token_id
    assert fast(text)["input_ids"] == slow(text)["input_ids"]
    assert fast.bos_token_id == slow.bos_token_id
    with pytest.raises(AttributeError):
        fast._no_such_field  # noqa: B018 - private names never load transformers


Edit = Callable[[dict[str, Any], dict[str, Any], Any], None]


def _variant(src: Path, dst: Path, edit: Edit) -> Path:
    """A copy of ``src``'s tokenizer files and config, edited: ``edit(tokenizer_config,
    config, backend)`` (the backend is a tokenizers.Tokenizer, saved back)."""
    from tokenizers import Tokenizer

    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(src / name, dst / name)
    tok_cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg = json.loads((dst / "config.json").read_text())
    backend = Tokenizer.from_file(str(dst / "tokenizer.json"))
    edit(tok_cfg, cfg, backend)
    (dst / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (dst / "config.json").write_text(json.dumps(cfg))
    backend.save(str(dst / "tokenizer.json"))
    return dst


def _declared(backend: Any) -> dict[str, Any]:
    """``added_tokens_decoder`` as transformers writes it (Llama 3 configs carry one)."""
    return {
        str(i): {
            "content": t.content,
            "lstrip": t.lstrip,
            "normalized": t.normalized,
            "rstrip": t.rstrip,
            "single_word": t.single_word,
            "special": t.special,
        }
        for i, t in backend.get_added_tokens_decoder().items()
    }


def _llama3_like(tok_cfg: dict[str, Any], cfg: dict[str, Any], backend: Any) -> None:
    from tokenizers import AddedToken

    backend.add_special_tokens([AddedToken("<|eot_id|>", special=True, normalized=False)])
    backend.add_tokens([AddedToken("<|plain|>", normalized=False)])  # an added, not special, one
    tok_cfg["added_tokens_decoder"] = _declared(backend)
    tok_cfg["extra_special_tokens"] = ["<|eot_id|>"]
    tok_cfg["clean_up_tokenization_spaces"] = True  # transformers 5 skips it for BPE
    tok_cfg["add_bos_token"] = True  # a flag for encodes with special tokens: transformers'
    backend.enable_padding(pad_id=2, pad_token="<pad>")  # transformers turns it off per encode


def _pad_without_token(tok_cfg: dict[str, Any], cfg: dict[str, Any], backend: Any) -> None:
    backend.enable_padding(pad_id=1, pad_token="</s>")
    del tok_cfg["pad_token"]


def test_a_llama3_like_directory_gets_the_fast_path_and_the_same_answers(
    tiny_model_dir: Path, tmp_path: Path
):
    model = _variant(tiny_model_dir, tmp_path / "llama3ish", _llama3_like)
    fast = load_tokenizer(model)
    slow = transformers_tokenizer(model)
    texts = [*TEXTS, "a<|eot_id|>b <|plain|> c", "<|eot_id|><|eot_id|>"]
    _assert_same(fast, slow, texts)
    assert slow.convert_tokens_to_ids("<|eot_id|>") in fast.all_special_ids
    assert fast.encode("a b") == slow.encode("a b")  # with special tokens: transformers'


def _set(**values: Any) -> Edit:
    def edit(tok_cfg: dict[str, Any], cfg: dict[str, Any], backend: Any) -> None:
        for key, value in values.items():
            target = cfg if key in ("model_type", "model_name", "transformers_version") else tok_cfg
            target[key] = value

    return edit


def _unk_not_in_vocab(tok_cfg: dict[str, Any], cfg: dict[str, Any], backend: Any) -> None:
    tok_cfg["unk_token"] = "<unk>"  # transformers adds it: one more token, one more special


def _flags_differ(tok_cfg: dict[str, Any], cfg: dict[str, Any], backend: Any) -> None:
    declared = _declared(backend)
    declared["1"]["lstrip"] = True
    tok_cfg["added_tokens_decoder"] = declared


def _special_not_special(tok_cfg: dict[str, Any], cfg: dict[str, Any], backend: Any) -> None:
    from tokenizers import AddedToken

    backend.add_tokens([AddedToken("<|x|>", normalized=False)])
    tok_cfg["extra_special_tokens"] = ["<|x|>"]  # transformers makes it special


FALLBACKS: dict[str, Edit] = {
    "model-specific class": _set(tokenizer_class="LlamaTokenizer"),
    "remote code": _set(auto_map={"AutoTokenizer": [None, "tok.MyTokenizer"]}),
    "model type with its own class": _set(model_type="qwen2"),
    "model name": _set(model_name="qwen2"),
    "split special tokens": _set(split_special_tokens=True),
    "clean-up forced on BPE": _set(
        clean_up_tokenization_spaces=True,
        clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True,
    ),
    "special token missing": _unk_not_in_vocab,
    "declared flags differ": _flags_differ,
    "extra token not special": _special_not_special,
    "model-specific named token": _set(image_token="<pad>"),
    "model-specific named token (typed)": _set(
        image_token={"__type": "AddedToken", "content": "<pad>", "special": True}
    ),
    "extra tokens as a dict": _set(extra_special_tokens={"image_token": "<pad>"}),
    "padding without a pad token": _pad_without_token,
    "legacy special_tokens_map.json": lambda *_: None,  # the test writes the file
}


@pytest.mark.parametrize("case", sorted(FALLBACKS))
def test_falls_back_to_transformers_when_it_might_differ(
    tiny_model_dir: Path, tmp_path: Path, case: str
):
    model = _variant(tiny_model_dir, tmp_path / "m", FALLBACKS[case])
    if case == "legacy special_tokens_map.json":
        (model / "special_tokens_map.json").write_text(json.dumps({"unk_token": "<unk>"}))
    assert load_fast(model, lambda: None) is None


def test_the_fallbacks_matter(tiny_model_dir: Path, tmp_path: Path):
    """Where the fast path steps aside, transformers may answer otherwise: a named special
    token missing from tokenizer.json is added (one more id, one more special id); padding in
    tokenizer.json names the pad token."""
    from tokenizers import Tokenizer

    unk = _variant(tiny_model_dir, tmp_path / "unk", _unk_not_in_vocab)
    backend = Tokenizer.from_file(str(unk / "tokenizer.json"))
    slow = transformers_tokenizer(unk)
    assert len(slow) == backend.get_vocab_size() + 1 and len(slow.all_special_ids) == 4
    pad = transformers_tokenizer(_variant(tiny_model_dir, tmp_path / "pad", _pad_without_token))
    assert pad.pad_token == "</s>"


def test_missing_or_broken_files_fall_back(tiny_model_dir: Path, tmp_path: Path):
    assert load_fast(tmp_path / "nothing", lambda: None) is None
    broken = _variant(tiny_model_dir, tmp_path / "broken", lambda *_: None)
    (broken / "tokenizer.json").write_text("{not json")
    assert load_fast(broken, lambda: None) is None
    (broken / "tokenizer.json").unlink()
    assert load_fast(broken, lambda: None) is None


def test_generic_model_types_keep_the_generic_class_in_this_transformers():
    """GENERIC_MODEL_TYPES, checked against the installed transformers' routing tables: a
    generic hub class stays generic for these model types."""
    from transformers.models.auto import tokenization_auto as auto

    for model_type in GENERIC_MODEL_TYPES:  # the two ways a generic hub class is overruled
        assert model_type not in auto.MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS, model_type
        assert auto.TOKENIZER_MAPPING_NAMES.get(model_type) != "MistralCommonBackend", model_type
