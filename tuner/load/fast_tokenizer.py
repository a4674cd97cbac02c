"""The model's tokenizer without importing transformers, where that gives the same tokens.

``import transformers`` costs about 5 s of CPU (it imports torch), and every process that builds
requests paid it: each worker of ``vtune search --workers N`` on its first trial. Transformers'
fast tokenizers wrap a ``tokenizers.Tokenizer`` read from ``tokenizer.json``, and that library
imports in about 0.1 s. :func:`load_fast` reads it directly when transformers would hand out
that same backend, unchanged in everything request building asks of a tokenizer: ``encode``
and ``__call__`` without special tokens, ``decode``, ``len``, ``vocab_size`` and
``all_special_ids``; otherwise it returns None and the caller loads transformers. Anything else
asked of a :class:`FastTokenizer` (``apply_chat_template``, ``chat_template``, encoding with
special tokens, ``bos_token_id``, ``save_pretrained``...) loads transformers' own tokenizer, once,
and answers from it. (Chat requests need no template here: vLLM applies it to the messages.)

When is it the same? Read from transformers 5's ``AutoTokenizer.from_pretrained`` and
``TokenizersBackend`` (other major versions: never, load transformers):

* the class is the generic one: ``tokenizer_config.json`` names ``PreTrainedTokenizerFast`` (or
  ``TokenizersBackend``), has no ``auto_map`` (remote code), and ``config.json``'s model type is
  one whose generic class transformers keeps (:data:`GENERIC_MODEL_TYPES`; a model-specific
  class may rebuild the backend from the vocabulary);
* transformers would add no token and change no added token's flags: every special token the
  config names (bos, eos, unk, sep, pad, cls, mask, the extra ones) is an added token of
  ``tokenizer.json`` already, special and with the flags transformers re-adds it with, and so
  is every entry of the config's ``added_tokens_decoder``; no other ``*_token`` key, no legacy
  ``special_tokens_map.json`` / ``added_tokens.json`` to merge, no padding in ``tokenizer.json``
  without a pad token in the config (transformers would name it the pad token);
* decoding is the backend's: no ``clean_up_tokenization_spaces`` that applies (transformers 5
  skips it for BPE), and no Mistral regex patch (over 100k tokens without a
  ``transformers_version`` in ``config.json``);
* encoding is the backend's: no ``split_special_tokens``; truncation and padding off (what
  transformers sets before each encode that asks for neither).

``tests/unit/test_fast_tokenizer.py`` checks both paths give the same ids, texts and special ids.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Model types whose generic tokenizer class transformers 5 keeps (no entry, or one it trusts the
# hub's class over, in its TOKENIZER_MAPPING_NAMES; none of MODELS_WITH_INCORRECT_HUB_TOKENIZER_
# CLASS; not a Mistral one). The unit test checks this against the installed transformers.
GENERIC_MODEL_TYPES = frozenset({"llama", "falcon", "granite", "olmo2", "gpt_oss"})
GENERIC_CLASSES = frozenset({"PreTrainedTokenizerFast", "TokenizersBackend"})
NAMED_SPECIALS = (  # transformers' SPECIAL_TOKENS_ATTRIBUTES, in its order
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
MISTRAL_REGEX_VOCAB = 100_000  # above it, transformers may patch a Mistral pre-tokenizer


class FastTokenizer:
    """``tokenizer.json`` read by the ``tokenizers`` library, answering as transformers' fast
    tokenizer of the same directory does (see the module docstring for when it does):
    ``encode``/``__call__`` without special tokens, ``decode``, ``len``, ``vocab_size``,
    ``all_special_tokens``/``all_special_ids``. Any other attribute, and an encode with special
    tokens, is transformers' tokenizer's, loaded by ``full()`` on first use."""

    def __init__(self, backend: Any, specials: Sequence[str], full: Callable[[], Any]) -> None:
        self._backend = backend
        self._specials = list(specials)
        self._full = full
        self._transformers: Any = None

    def transformers(self) -> Any:
        """Transformers' tokenizer of the same directory (loaded once, on first use)."""
        if self._transformers is None:
            self._transformers = self._full()
        return self._transformers

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        if add_special_tokens or kwargs:  # the post-processor is transformers' to settle
            return self.transformers().encode(text, add_special_tokens=add_special_tokens, **kwargs)
        return list(self._backend.encode(text, add_special_tokens=False).ids)

    def __call__(
        self, text: str | Sequence[str], add_special_tokens: bool = True, **kwargs: Any
    ) -> dict[str, Any]:
        """``{"input_ids": ids}``: one list for a text, a list of lists for a list of texts."""
        if add_special_tokens or kwargs or not isinstance(text, (str, list, tuple)):
            return self.transformers()(text, add_special_tokens=add_special_tokens, **kwargs)
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens=False)}
        encodings = self._backend.encode_batch(list(text), add_special_tokens=False)
        return {"input_ids": [list(e.ids) for e in encodings]}

    def decode(self, ids: int | Sequence[int], skip_special_tokens: bool = False, **kw: Any) -> str:
        if kw:
            return self.transformers().decode(ids, skip_special_tokens=skip_special_tokens, **kw)
        seq = [int(i) for i in ids] if hasattr(ids, "__iter__") else [int(ids)]
        return self._backend.decode(seq, skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=False)

    @property
    def all_special_tokens(self) -> list[str]:
        return list(self._specials)

    @property
    def all_special_ids(self) -> list[int]:
        return [self._backend.token_to_id(t) for t in self._specials]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # copy/pickle probes, and fields not set yet: never load
            raise AttributeError(name)
        return getattr(self.transformers(), name)

    def __repr__(self) -> str:
        return f"FastTokenizer(vocab={len(self)}, specials={self._specials})"


def load_fast(model_dir: str | Path, full: Callable[[], Any]) -> FastTokenizer | None:
    """The directory's tokenizer read with ``tokenizers`` alone, or None when that might differ
    from transformers' (module docstring) or anything is missing or unreadable (the caller then
    loads transformers, which says what is wrong). ``full`` loads transformers' tokenizer."""
    root = Path(model_dir)
    try:
        if _transformers_major() != 5 or not (root / "tokenizer.json").is_file():
            return None
        tok_cfg = json.loads((root / "tokenizer_config.json").read_text(encoding="utf-8"))
        model_cfg = json.loads((root / "config.json").read_text(encoding="utf-8"))
        if not isinstance(tok_cfg, dict) or not isinstance(model_cfg, dict):
            return None
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(root / "tokenizer.json"))
        specials = _same_as_transformers(root, tok_cfg, model_cfg, backend)
    except Exception:  # any doubt (bad JSON, tokenizers' own errors): transformers decides
        return None
    if specials is None:
        return None
    # What transformers sets before an encode that asks for no truncation and no padding.
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = False
    return FastTokenizer(backend, specials, full)


def _transformers_major() -> int | None:
    from importlib import metadata

    try:
        return int(metadata.version("transformers").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return None


def _same_as_transformers(
    root: Path, tok_cfg: dict[str, Any], model_cfg: dict[str, Any], backend: Any
) -> list[str] | None:
    """transformers' ``all_special_tokens`` when its tokenizer of this directory is ``backend``
    as read (module docstring), else None."""
    from tokenizers import AddedToken

    if (
        tok_cfg.get("tokenizer_class") not in GENERIC_CLASSES
        or "auto_map" in tok_cfg
        or tok_cfg.get("split_special_tokens")
        or model_cfg.get("model_type") not in GENERIC_MODEL_TYPES
        or "model_name" in model_cfg  # transformers routes some model names to their own class
    ):
        return None
    is_bpe = type(backend.model).__name__ == "BPE"
    force = tok_cfg.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")
    if tok_cfg.get("clean_up_tokenization_spaces") and (not is_bpe or force):
        return None
    if backend.get_vocab_size() > MISTRAL_REGEX_VOCAB and not model_cfg.get("transformers_version"):
        return None
    added = backend.get_added_tokens_decoder()  # id -> AddedToken, as tokenizer.json has them
    by_content = {str(t): t for t in added.values()}
    declared = tok_cfg.get("added_tokens_decoder")
    if declared is None:  # transformers merges these legacy files, else tokenizer.json's list
        if (root / "special_tokens_map.json").exists() or (root / "added_tokens.json").exists():
            return None
        mapped = dict(by_content)
    elif isinstance(declared, dict):  # each must be there as declared, or transformers adds it
        mapped = {}
        for idx, spec in declared.items():
            token = _added_token(spec, AddedToken, typed=False)
            if token is None or repr(added.get(int(idx))) != repr(token):
                return None
            mapped[str(token)] = token
    else:
        return None
    named = {k: tok_cfg[k] for k in NAMED_SPECIALS if tok_cfg.get(k) is not None}
    odd = [  # model-specific named tokens (add_bos_token and such flags are no tokens)
        k
        for k, v in tok_cfg.items()
        if k.endswith("_token")
        and k not in NAMED_SPECIALS
        and (isinstance(v, str) or (isinstance(v, dict) and v.get("__type") == "AddedToken"))
    ]
    if odd or ("additional_special_tokens" in tok_cfg and "extra_special_tokens" in tok_cfg):
        return None  # ... or two lists to merge
    extra = tok_cfg.get("extra_special_tokens", tok_cfg.get("additional_special_tokens")) or []
    if not isinstance(extra, list) or (backend.padding is not None and "pad_token" not in named):
        return None  # a dict of named tokens; padding whose token would become the pad token
    # How transformers re-adds each special token after loading (add_special_tokens): a named
    # one as the added token of the same text when there is one, else as given; a string as a
    # special token that is not normalized.
    wanted = []
    for is_named, value in [*((True, v) for v in named.values()), *((False, v) for v in extra)]:
        if isinstance(value, str):
            token = AddedToken(value, special=True, normalized=False)
        else:
            token = _added_token(value, AddedToken, typed=True)
        if token is None:
            return None
        if is_named:
            token = mapped.get(str(token), token)
        wanted.append(_as_special(token, AddedToken))
    specials: list[str] = []
    for token in wanted:
        have = by_content.get(str(token))
        if have is None or repr(have) != repr(token):
            return None  # transformers would add it, or change its flags
        if str(token) not in specials:
            specials.append(str(token))
    return specials


def _added_token(spec: Any, added_token: type, *, typed: bool) -> Any:
    """An ``AddedToken`` from its JSON form in ``tokenizer_config.json`` (``typed``: with
    ``"__type": "AddedToken"``, as special tokens are written; without, as in
    ``added_tokens_decoder``); None when transformers would not read it as one."""
    if not isinstance(spec, dict) or not isinstance(spec.get("content"), str):
        return None
    if (spec.get("__type") == "AddedToken") != typed:
        return None
    try:
        return added_token(**{k: v for k, v in spec.items() if k != "__type"})
    except TypeError:
        return None


def _as_special(token: Any, added_token: type) -> Any:
    """``token`` as ``add_special_tokens`` keeps it: the same flags, special."""
    return added_token(
        str(token),
        single_word=token.single_word,
        lstrip=token.lstrip,
        rstrip=token.rstrip,
        normalized=token.normalized,
        special=True,
    )


__all__ = ["GENERIC_MODEL_TYPES", "FastTokenizer", "load_fast"]
