"""Request sets: what a benchmark sends, built before the load starts.

Three sources, all seeded and reproducible (same tokenizer + same seed -> same requests):

* :func:`random_requests` — random token ids with exact input lengths and exact output lengths
  (``ignore_eos`` + ``min_tokens``), fixed or drawn from a range, optionally behind a shared prefix;
* :func:`sharegpt_requests` — conversations from a ShareGPT-format JSON file;
* :func:`load_tokenizer` — the model's own tokenizer from its local directory (never downloads).

For ``/v1/completions`` a prompt is a tuple of token ids, so its length is exact by
construction. For ``/v1/chat/completions`` it is text built (decode, re-encode, adjust) so that it
tokenizes to the requested length.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from tuner.errors import DatasetError, ModelError, ParameterError

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
    """

    prompt: tuple[int, ...] | str
    prompt_len: int
    output_len: int


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
    id whose weights a quantization tool downloads anyway); ModelError in one line."""
    from transformers import AutoTokenizer  # heavy import, only when a request set is built

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=local_files_only)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load the tokenizer of {model_dir}: {first}") from None


def _usable_ids(tokenizer: Any) -> np.ndarray:
    """Vocabulary ids that are not special tokens (so random prompts never contain EOS/BOS)."""
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.vocab_size
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = np.array([i for i in range(size) if i not in special], dtype=np.int64)
    if ids.size == 0:
        raise ModelError("the tokenizer has no non-special tokens")
    return ids


_WORD = re.compile(r"^ ?[A-Za-z]{2,}$")


def _word_pool(tokenizer: Any, rng: np.random.Generator, want: int = 2000) -> np.ndarray:
    """Ids of tokens that are whole words (" harbour") and re-encode to themselves: text made
    of them tokenizes back to the same ids, so chat prompts get exact lengths. Empty if the
    vocabulary has too few such tokens."""
    ids = _usable_ids(tokenizer)
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


def random_requests(
    tokenizer: Any,
    num: int,
    input_len: LengthRange,
    output_len: LengthRange,
    *,
    seed: int = 0,
    prefix_len: int = 0,
    num_prefixes: int = 1,
    endpoint: Endpoint = "completions",
) -> list[Request]:
    """``num`` requests of random tokens; request i is the same for the same seed and tokenizer.

    ``prefix_len`` tokens are shared: ``num_prefixes`` distinct prefixes, request i uses prefix
    ``i % num_prefixes``; the input length counts the prefix (so input_len.low must exceed it).
    """
    if num < 1:
        raise ParameterError(f"number of prompts must be at least 1, got {num}")
    if prefix_len < 0 or num_prefixes < 1:
        raise ParameterError("prefix length must be >= 0 and the number of prefixes >= 1")
    if prefix_len and input_len.low <= prefix_len:
        raise ParameterError(
            f"input length {input_len} must exceed the shared prefix length {prefix_len}"
        )
    rng = np.random.default_rng(seed)
    pool = _usable_ids(tokenizer)
    if endpoint == "chat":  # whole-word tokens keep text prompts exact after re-tokenizing
        words = _word_pool(tokenizer, rng)
        pool = words if words.size else pool
    prefixes = [rng.choice(pool, size=prefix_len).tolist() for _ in range(num_prefixes)]
    in_lens = input_len.draw(rng, num)
    out_lens = output_len.draw(rng, num)
    out: list[Request] = []
    for i, (n_in, n_out) in enumerate(zip(in_lens, out_lens, strict=True)):
        ids = prefixes[i % num_prefixes] + rng.choice(pool, size=n_in - prefix_len).tolist()
        if endpoint == "completions":
            out.append(Request(tuple(int(t) for t in ids), n_in, n_out))
        else:
            text, real = exact_text(tokenizer, ids, n_in, rng, pool)
            out.append(Request(text, real, n_out))
    return out


def _conversation_pair(entry: Any) -> tuple[str, str] | None:
    """(first human turn, the answer to it) of one ShareGPT entry, or None if it has no pair."""
    if not isinstance(entry, dict):
        return None
    turns = entry.get("conversations", entry.get("messages"))
    if not isinstance(turns, list) or len(turns) < 2:
        return None
    texts = []
    for turn in turns[:2]:
        if not isinstance(turn, dict):
            return None
        text = turn.get("value", turn.get("content"))
        if not isinstance(text, str):
            return None
        texts.append(text)
    return texts[0], texts[1]


def read_sharegpt(path: str | Path) -> list[tuple[str, str]]:
    """All (prompt, completion) pairs of a ShareGPT-format JSON file, in file order.

    Raises :class:`DatasetError` (one line) for a missing or unreadable file, a directory, text
    that is not UTF-8 or not JSON, JSON that is not a list, or no usable entry.
    """
    p = Path(path)
    if p.is_dir():
        raise DatasetError(f"dataset {p} is a directory, not a ShareGPT JSON file")
    if not p.exists():
        raise DatasetError(f"dataset file not found: {p}")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read dataset {p}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is harmless
    except UnicodeDecodeError as exc:
        raise DatasetError(f"dataset {p} is not UTF-8 text (byte {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"dataset {p} is not valid JSON ({exc.msg}, line {exc.lineno})"
        ) from None
    except (ValueError, RecursionError):  # a number too long, nesting too deep
        raise DatasetError(f"dataset {p} is not valid JSON (too deep or too long)") from None
    if not isinstance(data, list):
        raise DatasetError(f"dataset {p}: expected a JSON list of conversations")
    pairs = [pair for pair in map(_conversation_pair, data) if pair is not None]
    if not pairs:
        raise DatasetError(
            f"dataset {p}: no entry with a 'conversations' list of two turns "
            "({'from': ..., 'value': ...}) was found"
        )
    return pairs


def sharegpt_requests(
    tokenizer: Any,
    path: str | Path,
    num: int,
    *,
    seed: int = 0,
    output_len: LengthRange | None = None,
    max_input_len: int = 1024,
    max_total_len: int = 2048,
    endpoint: Endpoint = "completions",
) -> list[Request]:
    """``num`` requests sampled (seeded shuffle) from a ShareGPT file.

    The prompt is the first human turn; the output length is the reference answer's token count
    unless ``output_len`` fixes it. Like vLLM's benchmark, pairs shorter than 4 tokens on either
    side or longer than the limits are skipped. Cycles through the file when ``num`` exceeds it.
    """
    if num < 1:
        raise ParameterError(f"number of prompts must be at least 1, got {num}")
    pairs = read_sharegpt(path)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pairs)).tolist()
    fixed_out = output_len.draw(rng, num) if output_len is not None else None
    usable: list[Request] = []
    for idx in order:
        prompt, completion = pairs[idx]
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        n_out = len(tokenizer.encode(completion, add_special_tokens=False))
        if fixed_out is not None:
            n_out = fixed_out[len(usable) % num]
        too_long = len(ids) > max_input_len or len(ids) + n_out > max_total_len
        if len(ids) < 4 or n_out < 4 or too_long:
            continue
        prompt_val: tuple[int, ...] | str = tuple(ids) if endpoint == "completions" else prompt
        usable.append(Request(prompt_val, len(ids), n_out))
        if len(usable) == num:
            break
    if not usable:
        raise DatasetError(
            f"dataset {path}: no conversation fits (4..{max_input_len} prompt tokens, "
            f"at most {max_total_len} in all)"
        )
    return [usable[i % len(usable)] for i in range(num)]


# --- a workload spec ------------------------------------------------------------------------


DEFAULT_INPUT_LEN = LengthRange(256, 256)
DEFAULT_OUTPUT_LEN = LengthRange(128, 128)


@dataclass(frozen=True)
class WorkloadSpec:
    """Which requests to send: random lengths (``input_len``/``output_len``) or a ShareGPT file
    (``dataset``; ``output_len`` then overrides the reference answers' lengths if given)."""

    num_prompts: int = 100
    input_len: LengthRange = DEFAULT_INPUT_LEN
    output_len: LengthRange | None = DEFAULT_OUTPUT_LEN
    dataset: Path | None = None
    prefix_len: int = 0
    num_prefixes: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ParameterError(f"--num-prompts must be at least 1, got {self.num_prompts}")
        if self.dataset is None and self.output_len is None:
            raise ParameterError("random prompts need an output length")

    def describe(self) -> dict[str, Any]:
        return {
            "num_prompts": self.num_prompts,
            "dataset": str(self.dataset) if self.dataset else "random",
            "input_len": None if self.dataset else str(self.input_len),
            "output_len": None if self.output_len is None else str(self.output_len),
            "prefix_len": self.prefix_len,
            "num_prefixes": self.num_prefixes,
            "seed": self.seed,
        }


def build_requests(
    tokenizer: Any, spec: WorkloadSpec, extra: int = 0, endpoint: Endpoint = "completions"
) -> list[Request]:
    """``extra`` (warm-up) requests followed by ``spec.num_prompts`` measured ones."""
    n = spec.num_prompts + extra
    if spec.dataset is not None:
        return sharegpt_requests(
            tokenizer,
            spec.dataset,
            n,
            seed=spec.seed,
            output_len=spec.output_len,
            endpoint=endpoint,
        )
    assert spec.output_len is not None
    return random_requests(
        tokenizer,
        n,
        spec.input_len,
        spec.output_len,
        seed=spec.seed,
        prefix_len=spec.prefix_len,
        num_prefixes=spec.num_prefixes,
        endpoint=endpoint,
    )
