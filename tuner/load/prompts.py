"""Prompt building blocks every request set shares: the :class:`Request`, token-length ranges,
the model's tokenizer, and prompts of exact token counts.

* :class:`Request` — one request to send (prompt, lengths; session, turn, think time and replay
  time for conversations and traces);
* :class:`LengthRange` — a fixed token count or a uniform range;
* :func:`load_tokenizer` — the model's own tokenizer from its local directory (never downloads;
  without transformers where :mod:`tuner.load.fast_tokenizer` gives the same tokens);
* :class:`TokenSource` — ids to draw prompts from (whole-word tokens for chat, so text prompts
  re-tokenize to their exact length) and the Request made of a list of ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from tuner.errors import ModelError, ParameterError

Endpoint = Literal["completions", "chat"]


class Tokenizer(Protocol):
    """The slice of a Hugging Face tokenizer that request building needs."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class Request:
    """One request to send: a prompt and the exact number of tokens to generate.

    ``prompt`` is a tuple of token ids (exact length, for /v1/completions) or text (chat, or
    completions without a tokenizer). ``prompt_len`` is its length in the model's tokens.

    Conversations and traces add: ``session`` (turns of one session are sent in order, each
    no earlier than ``think_s`` after the previous turn's answer, see
    :mod:`tuner.load.schedule`), ``turn`` (0 for the first), and ``at``: a replayed trace's
    send time in seconds after the measured phase starts (None: the arrival process decides).
    """

    prompt: tuple[int, ...] | str
    prompt_len: int
    output_len: int
    session: str | None = None
    turn: int = 0
    think_s: float = 0.0
    at: float | None = None


@dataclass(frozen=True)
class LengthRange:
    """A token count: fixed (``low == high``) or uniform over ``[low, high]`` inclusive."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if self.low < 1 or self.high < self.low:
            raise ParameterError(f"bad length range {self}: need 1 <= low <= high")

    @classmethod
    def fixed(cls, n: int) -> LengthRange:
        return cls(n, n)

    @classmethod
    def parse(cls, text: str | int) -> LengthRange:
        """``"128"`` -> fixed 128; ``"64:256"`` or ``"64-256"`` -> uniform in [64, 256]."""
        raw = str(text).strip()
        m = re.fullmatch(r"(\d+)\s*(?:[:\-]\s*(\d+))?", raw)
        if not m:
            raise ParameterError(f"not a token length or range: {raw!r} (use e.g. 128 or 64:256)")
        low = int(m.group(1))
        high = int(m.group(2)) if m.group(2) else low
        return cls(low, high)

    def draw(self, rng: np.random.Generator, n: int) -> list[int]:
        if self.low == self.high:
            return [self.low] * n
        return rng.integers(self.low, self.high + 1, size=n).tolist()

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"


def load_tokenizer(model_dir: str | Path, *, local_files_only: bool = True) -> Any:
    """The model's tokenizer, from local files only unless ``local_files_only`` is False (a hub
    id whose weights a quantization tool downloads anyway); ModelError in one line.

    From local files, a ``tokenizer.json`` that transformers would use unchanged is read with the
    ``tokenizers`` library alone (:mod:`tuner.load.fast_tokenizer`: same ids, texts and special
    ids, without importing transformers and torch, ~5 s of CPU per process); transformers' own
    tokenizer otherwise, or when the fast one is asked for more (a chat template...)."""
    if local_files_only:
        from tuner.load.fast_tokenizer import load_fast

        fast = load_fast(model_dir, lambda: transformers_tokenizer(model_dir))
        if fast is not None:
            return fast
    return transformers_tokenizer(model_dir, local_files_only=local_files_only)


def transformers_tokenizer(model_dir: str | Path, *, local_files_only: bool = True) -> Any:
    """``AutoTokenizer.from_pretrained`` of ``model_dir``; ModelError in one line."""
    from transformers import AutoTokenizer  # heavy import (torch), only when needed

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=local_files_only)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load the tokenizer of {model_dir}: {first}") from None


def usable_ids(tokenizer: Any) -> np.ndarray:
    """Vocabulary ids that are not special tokens (so random prompts never contain EOS/BOS)."""
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.vocab_size
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = np.array([i for i in range(size) if i not in special], dtype=np.int64)
    if ids.size == 0:
        raise ModelError("the tokenizer has no non-special tokens")
    return ids


_WORD = re.compile(r"^ ?[A-Za-z]{2,}$")


def word_pool(tokenizer: Any, rng: np.random.Generator, want: int = 2000) -> np.ndarray:
    """Ids of tokens that are whole words (" harbour") and re-encode to themselves: text made
    of them tokenizes back to the same ids, so chat prompts get exact lengths. Empty if the
    vocabulary has too few such tokens."""
    ids = usable_ids(tokenizer)
    found: list[int] = []
    for start in range(0, ids.size, 4096):
        block = ids[start : start + 4096].tolist()
        texts = [tokenizer.decode([i]) for i in block]
        cands = [(i, t) for i, t in zip(block, texts, strict=True) if _WORD.match(t)]
        spaced = [c for c in cands if c[1].startswith(" ")]
        cands = spaced or cands
        if cands:
            enc = tokenizer([t for _, t in cands], add_special_tokens=False)["input_ids"]
            found += [i for (i, _), e in zip(cands, enc, strict=True) if list(e) == [i]]
        if len(found) >= want:
            break
    return np.array(found if len(found) >= 20 else [], dtype=np.int64)


def exact_text(
    tokenizer: Tokenizer,
    ids: list[int],
    target: int,
    rng: np.random.Generator,
    pool: np.ndarray,
    tries: int = 20,
) -> tuple[str, int]:
    """Text that re-tokenizes (without special tokens) to ``target`` tokens; returns (text, len).

    Decoding then encoding is not an identity for BPE tokenizers, so adjust and retry (as vLLM's
    benchmark does); the returned length is what the tokenizer really gives, equal to ``target``
    unless every retry failed.
    """
    seq = list(ids)
    text = tokenizer.decode(seq)
    for _ in range(tries):
        text = tokenizer.decode(seq)
        seq = list(tokenizer.encode(text, add_special_tokens=False))
        if len(seq) == target:
            return text, target
        if len(seq) > target:
            seq = seq[:target]
        else:
            seq += rng.choice(pool, size=target - len(seq)).tolist()
    text = tokenizer.decode(seq)
    return text, len(tokenizer.encode(text, add_special_tokens=False))


@dataclass(frozen=True)
class TokenSource:
    """Where prompt tokens come from: ``pool`` (the tokenizer's non-special ids; whole-word
    tokens for chat, so text made of them re-tokenizes to the same length)."""

    tokenizer: Any
    pool: np.ndarray
    endpoint: Endpoint = "completions"

    @classmethod
    def of(cls, tokenizer: Any, endpoint: Endpoint, rng: np.random.Generator) -> TokenSource:
        pool = usable_ids(tokenizer)
        if endpoint == "chat":
            words = word_pool(tokenizer, rng)
            pool = words if words.size else pool
        return cls(tokenizer, pool, endpoint)

    def draw(self, rng: np.random.Generator, n: int) -> list[int]:
        """``n`` random ids of the pool."""
        return rng.choice(self.pool, size=n).tolist() if n > 0 else []

    def request(
        self, ids: list[int], output_len: int, rng: np.random.Generator, **meta: Any
    ) -> Request:
        """The request whose prompt is ``ids``: the ids themselves for /v1/completions, text
        that re-tokenizes to that many tokens for chat. ``meta``: session, turn, think_s, at."""
        if self.endpoint == "completions":
            return Request(tuple(int(t) for t in ids), len(ids), output_len, **meta)
        text, real = exact_text(self.tokenizer, ids, len(ids), rng, self.pool)
        return Request(text, real, output_len, **meta)

    def text_request(self, text: str, output_len: int, **meta: Any) -> Request:
        """A request with the prompt text as given: token ids for /v1/completions (so its
        length is exact), the text itself for chat."""
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        if not ids:
            raise ParameterError("a prompt text tokenizes to no token")
        if self.endpoint == "completions":
            return Request(tuple(ids), len(ids), output_len, **meta)
        return Request(text, len(ids), output_len, **meta)
