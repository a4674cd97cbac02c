"""Request sets: what a benchmark sends, built before the load starts.

Four sources, all seeded and reproducible (same tokenizer + same seed -> same requests):

* :func:`random_requests` — random token ids with exact input lengths and exact output lengths
  (``ignore_eos`` + ``min_tokens``), fixed or drawn from a range, optionally behind a shared prefix;
* :func:`sharegpt_requests` — conversations from a ShareGPT-format JSON file;
* :func:`trace_requests` — a recorded trace (:mod:`tuner.load.trace`), replayed or re-sampled;
* synthetic multi-turn conversations (:mod:`tuner.load.conversations`).

:class:`WorkloadSpec` says which, :func:`build_requests` builds them; the prompt building blocks
(:class:`Request`, :class:`LengthRange`, :func:`load_tokenizer`) live in
:mod:`tuner.load.prompts` and are re-exported here.

For ``/v1/completions`` a prompt is a tuple of token ids, so its length is exact by
construction. For ``/v1/chat/completions`` it is text built (decode, re-encode, adjust) so that it
tokenizes to the requested length.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from tuner.errors import DatasetError, ParameterError
from tuner.files import read_text_file
from tuner.load.conversations import (
    ConversationSpec,
    conversation_plan,
    conversation_requests,
    mean_context,
    session_requests,
)
from tuner.load.prompts import (
    Endpoint,
    LengthRange,
    Request,
    Tokenizer,
    TokenSource,
    exact_text,
    load_tokenizer,
    usable_ids,
    word_pool,
)
from tuner.load.trace import ideal_prefix_reuse, read_trace

__all__ = [
    "DEFAULT_INPUT_LEN",
    "DEFAULT_OUTPUT_LEN",
    "ConversationSpec",
    "Endpoint",
    "LengthRange",
    "Request",
    "Tokenizer",
    "WorkloadSpec",
    "build_requests",
    "dataset_source",
    "exact_text",
    "load_tokenizer",
    "random_requests",
    "read_sharegpt",
    "sharegpt_requests",
    "trace_requests",
]


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
    pool = usable_ids(tokenizer)
    if endpoint == "chat":  # whole-word tokens keep text prompts exact after re-tokenizing
        words = word_pool(tokenizer, rng)
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
    text = read_text_file(p, "dataset", "ShareGPT JSON file", DatasetError)
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
    """Which requests to send: random lengths (``input_len``/``output_len``), a ShareGPT file
    (``dataset``; ``output_len`` then overrides the reference answers' lengths if given), a
    request trace (``trace``, :mod:`tuner.load.trace`; its own lengths, ``output_len`` unused)
    or synthetic conversations (``conversations``, :mod:`tuner.load.conversations`;
    ``input_len`` per user message, ``output_len`` per answer, ``prefix_len`` the system
    prompt when given, ``num_prefixes`` how many system prompts).

    A trace is re-sampled (whole sessions, for the caller's arrival process) unless ``replay``:
    then its requests go in recorded order, each at its recorded time times ``time_scale``."""

    num_prompts: int = 100
    input_len: LengthRange = DEFAULT_INPUT_LEN
    output_len: LengthRange | None = DEFAULT_OUTPUT_LEN
    dataset: Path | None = None
    prefix_len: int = 0
    num_prefixes: int = 1
    seed: int = 0
    trace: Path | None = None
    conversations: ConversationSpec | None = None
    replay: bool = False
    time_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ParameterError(f"--num-prompts must be at least 1, got {self.num_prompts}")
        sources = [x for x in (self.dataset, self.trace, self.conversations) if x is not None]
        if len(sources) > 1:
            raise ParameterError("give one dataset: a ShareGPT file, a trace or conversations")
        if self.dataset is None and self.trace is None and self.output_len is None:
            raise ParameterError("random prompts need an output length")
        if not self.time_scale > 0:
            raise ParameterError(f"--time-scale must be positive, got {self.time_scale}")
        if self.replay and self.trace is None:
            raise ParameterError("only a trace (--dataset trace:FILE) can be replayed")

    @property
    def shares_prefixes(self) -> bool:
        """Whether prompts share prefixes (so prefix caching is worth trying)."""
        if self.prefix_len > 0 or self.conversations is not None:
            return True
        if self.trace is None:
            return False
        return (ideal_prefix_reuse(read_trace(self.trace).requests) or 0.0) > 0.0

    def context_len(self) -> int:
        """The typical request's context (mean input plus mean output tokens)."""
        if self.trace is not None:
            return mean_context(read_trace(self.trace).requests)
        if self.conversations is not None:
            assert self.output_len is not None
            plan = conversation_plan(
                self.conversations.with_system(self.prefix_len),
                self.input_len,
                self.output_len,
                256,
                seed=self.seed,
            )
            return mean_context(plan)
        if self.dataset is not None:
            return 1024  # ShareGPT-like data: about 1K tokens of context per conversation
        out = self.output_len
        assert out is not None
        return int((self.input_len.low + self.input_len.high) / 2 + (out.low + out.high) / 2)

    def describe(self) -> dict[str, Any]:
        """JSON-safe; the keys of a random or ShareGPT workload are as they always were (a
        search's study name hashes this), the others add theirs."""
        out: dict[str, Any] = {
            "num_prompts": self.num_prompts,
            "dataset": str(self.dataset) if self.dataset else "random",
            "input_len": None if self.dataset or self.trace else str(self.input_len),
            "output_len": None if self.output_len is None or self.trace else str(self.output_len),
            "prefix_len": self.prefix_len,
            "num_prefixes": self.num_prefixes,
            "seed": self.seed,
        }
        if self.trace is not None:
            digest = hashlib.sha256(self.trace.read_bytes()).hexdigest()[:16]
            out.update(dataset=f"trace:{self.trace}", trace_sha256=digest, replay=self.replay)
            if self.replay:
                out["time_scale"] = self.time_scale
        if self.conversations is not None:
            spec = self.conversations.with_system(self.prefix_len)
            out.update(dataset="conversations", conversations=spec.describe())
        return out


def dataset_source(text: str | None) -> dict[str, Any]:
    """``--dataset`` as :class:`WorkloadSpec` keyword arguments: ``conversations[:KEY=VALUE,...]``
    (:class:`ConversationSpec`), ``trace:FILE`` (read and checked now, so a bad line fails
    before anything starts) or a ShareGPT JSON file; ``{}`` for None (random prompts)."""
    if text is None or not text.strip():
        return {}
    raw = text.strip()
    if raw.lower().split(":", 1)[0] == "conversations":
        return {"conversations": ConversationSpec.parse(raw)}
    if raw.lower().startswith("trace:"):
        path = Path(raw[len("trace:") :])
        read_trace(path)
        return {"trace": path}
    return {"dataset": Path(raw)}


def build_requests(
    tokenizer: Any, spec: WorkloadSpec, extra: int = 0, endpoint: Endpoint = "completions"
) -> list[Request]:
    """``extra`` (warm-up) requests followed by ``spec.num_prompts`` measured ones."""
    n = spec.num_prompts + extra
    if spec.trace is not None:
        return trace_requests(tokenizer, spec, extra, endpoint)
    if spec.conversations is not None:
        assert spec.output_len is not None
        return conversation_requests(
            tokenizer,
            spec.conversations.with_system(spec.prefix_len),
            spec.input_len,
            spec.output_len,
            n,
            seed=spec.seed,
            num_systems=spec.num_prefixes,
            endpoint=endpoint,
        )
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


def trace_requests(
    tokenizer: Any, spec: WorkloadSpec, extra: int = 0, endpoint: Endpoint = "completions"
) -> list[Request]:
    """A trace's requests: ``extra`` warm-up ones (copies of its first requests, outside any
    session, no send time), then ``spec.num_prompts`` replayed (recorded order, ``Request.at``
    set) or re-sampled (whole sessions, interleaved)."""
    assert spec.trace is not None
    trace = read_trace(spec.trace)
    tokens = TokenSource.of(tokenizer, endpoint, np.random.default_rng(spec.seed))
    if not spec.replay:
        plan = trace.resample(spec.num_prompts + extra, seed=spec.seed)
        return session_requests(tokens, plan, seed=spec.seed)
    warm = [
        replace(trace.requests[i % len(trace.requests)], session=f"warmup-{i}", turn=0)
        for i in range(extra)
    ]
    measured = trace.replay(spec.num_prompts, spec.time_scale)
    return session_requests(tokens, warm, seed=spec.seed) + session_requests(
        tokens, measured, seed=spec.seed, replay=True
    )
