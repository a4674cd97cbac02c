"""Multi-turn conversations, and the prompts of any session plan (a trace's or synthetic ones).

``--dataset conversations[:KEY=VALUE,...]`` makes sessions: a system prompt shared by every
session (``--num-prefixes`` distinct ones), then turns whose prompt is the whole history so far
(system prompt, every earlier user message and answer) plus the new user message, with a think
time between one turn's answer and the next turn. Keys (defaults in :class:`ConversationSpec`):
``turns`` (per session, N or LOW-HIGH), ``think`` (mean seconds, exponential), ``system``
(system prompt tokens; ``--prefix-len`` sets it too), ``ctx`` (a session ends before a turn
would pass this many tokens), ``users`` (sessions in progress at once). ``--input-len`` is each
user message, ``--output-len`` each answer.

:func:`session_requests` lays out the tokens of any list of :class:`TraceRequest` (a trace's, or
:func:`conversation_plan`'s): prompts given as text are kept; hash-id blocks are the same tokens
wherever the same id appears; a session's later turn starts with its previous turn's prompt and
an answer of the recorded length, so the server's prefix cache sees the reuse a real
conversation gives. (The answer's tokens are drawn, not the ones the server generated: the
cached history is the earlier prompt, as with a client that re-sends a summarised answer.)
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from tuner.errors import ParameterError
from tuner.load.prompts import Endpoint, LengthRange, Request, TokenSource
from tuner.load.trace import HASH_BLOCK_TOKENS, SESSION_SLOTS, TraceRequest, interleave

DEFAULT_TURNS = LengthRange(2, 6)


@dataclass(frozen=True)
class ConversationSpec:
    """The shape of synthetic sessions (see the module docstring)."""

    turns: LengthRange = DEFAULT_TURNS
    think_s: float = 1.0
    system_len: int = 128
    max_context: int = 2048
    users: int = 32

    def __post_init__(self) -> None:
        if not self.think_s >= 0:
            raise ParameterError(f"conversations: think time must be >= 0, got {self.think_s}")
        if self.system_len < 0:
            raise ParameterError("conversations: system prompt length must be >= 0")
        if self.max_context < 2:
            raise ParameterError("conversations: ctx must be at least 2 tokens")
        if self.users < 1:
            raise ParameterError("conversations: users must be at least 1")

    @classmethod
    def parse(cls, text: str) -> ConversationSpec:
        """``conversations`` or ``conversations:turns=2-6,think=1.5,system=128,ctx=2048,
        users=32``; ParameterError (one line) for anything else."""
        head, _, rest = text.strip().partition(":")
        if head.strip().lower() != "conversations":
            raise ParameterError(f"not a conversations dataset: {text!r}")
        values: dict[str, Any] = {}
        for item in filter(None, (p.strip() for p in rest.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip().lower()
            if not sep or key not in _KEYS:
                raise ParameterError(
                    f"conversations: {item!r} is not KEY=VALUE with KEY one of {', '.join(_KEYS)}"
                )
            values[_KEYS[key]] = _value(key, value.strip())
        return cls(**values)

    def with_system(self, prefix_len: int) -> ConversationSpec:
        """This spec with ``--prefix-len`` as the system prompt length when that is given."""
        return replace(self, system_len=prefix_len) if prefix_len else self

    def describe(self) -> dict[str, Any]:
        return {
            "turns": str(self.turns),
            "think_s": self.think_s,
            "system_len": self.system_len,
            "max_context": self.max_context,
            "users": self.users,
        }


_KEYS = {
    "turns": "turns",
    "think": "think_s",
    "system": "system_len",
    "ctx": "max_context",
    "users": "users",
}


def _value(key: str, raw: str) -> Any:
    try:
        if key == "turns":
            return LengthRange.parse(raw)
        if key == "think":
            return float(re.sub(r"s$", "", raw))
        return int(raw)
    except ValueError:
        raise ParameterError(f"conversations: bad value for {key}: {raw!r}") from None


def conversation_plan(
    spec: ConversationSpec,
    input_len: LengthRange,
    output_len: LengthRange,
    n: int,
    *,
    seed: int = 0,
    num_systems: int = 1,
) -> list[TraceRequest]:
    """``n`` turns of synthetic sessions, interleaved over ``spec.users`` sessions at once.
    ``input_tokens`` is each turn's whole prompt (system + history + the new message); a
    session ends early rather than pass ``spec.max_context``. ``hash_ids`` holds the index of
    the session's system prompt (one id; :func:`session_requests` lays it out)."""
    first = spec.system_len + input_len.low + output_len.low
    if first > spec.max_context:
        raise ParameterError(
            f"conversations: a first turn needs {first} tokens (system {spec.system_len} + "
            f"input {input_len.low} + output {output_len.low}), more than ctx={spec.max_context}"
        )
    rng = np.random.default_rng(seed)
    sessions: list[list[TraceRequest]] = []
    total = 0
    while total < n:
        s = len(sessions)
        turns: list[TraceRequest] = []
        history = spec.system_len
        for k in range(spec.turns.draw(rng, 1)[0]):
            user, out = input_len.draw(rng, 1)[0], output_len.draw(rng, 1)[0]
            if history + user + out > spec.max_context:
                break
            think = float(rng.exponential(spec.think_s)) if k and spec.think_s else 0.0
            turns.append(
                TraceRequest(
                    0.0,
                    out,
                    history + user,
                    session=f"c{s}",
                    turn=k,
                    think_s=think,
                    hash_ids=(s % max(1, num_systems),) if spec.system_len else (),
                )
            )
            history += user + out
        sessions.append(turns)
        total += len(turns)
    return interleave(sessions, spec.users)[:n]


def session_requests(
    tokens: TokenSource,
    plan: Sequence[TraceRequest],
    *,
    seed: int = 0,
    system_len: int = 0,
    replay: bool = False,
) -> list[Request]:
    """The requests of ``plan`` in its order (see the module docstring). With ``system_len``
    (synthetic conversations), a first turn's single hash id picks a system prompt of that many
    tokens instead of 512-token blocks. With ``replay`` each request keeps its ``arrival_s`` as
    its send time (``Request.at``)."""
    rng = np.random.default_rng(seed)
    layout = _Layout(tokens, seed, system_len)
    out = []
    for item in plan:
        meta: dict[str, Any] = {
            "session": item.session,
            "turn": item.turn,
            "think_s": item.think_s,
            "at": item.arrival_s if replay else None,
        }
        if item.prompt is not None:
            out.append(tokens.text_request(item.prompt, item.output_tokens, **meta))
            layout.forget(item.session)
            continue
        ids = layout.ids(item)
        out.append(tokens.request(ids, item.output_tokens, rng, **meta))
    return out


class _Layout:
    """Token ids of each planned request: shared blocks, histories, fresh tokens, all seeded
    (the same plan and seed give the same ids)."""

    def __init__(self, tokens: TokenSource, seed: int, system_len: int) -> None:
        self.tokens, self.seed, self.system_len = tokens, seed, system_len
        self.blocks: dict[int, list[int]] = {}
        self.last: dict[str, tuple[int, list[int], int]] = {}  # session -> (turn, ids, output)

    def _rng(self, *key: Any) -> np.random.Generator:
        words = [self.seed] + [zlib.crc32(str(k).encode()) for k in key]
        return np.random.default_rng(words)

    def _block(self, hid: int) -> list[int]:
        if hid not in self.blocks:
            size = self.system_len or HASH_BLOCK_TOKENS
            self.blocks[hid] = self.tokens.draw(self._rng("block", hid), size)
        return self.blocks[hid]

    def forget(self, session: str | None) -> None:
        if session is not None:
            self.last.pop(session, None)

    def ids(self, item: TraceRequest) -> list[int]:
        n = item.input_tokens or 1
        prev = self.last.get(item.session) if item.session is not None else None
        fresh = self._rng("fresh", item.session, item.turn, item.line)
        if item.hash_ids and not self.system_len:  # recorded blocks say exactly what is reused
            base = [t for h in item.hash_ids for t in self._block(h)]
        elif prev is not None and prev[0] < item.turn:
            _, prev_ids, prev_out = prev
            answer = self.tokens.draw(self._rng("answer", item.session, prev[0]), prev_out)
            base = prev_ids + answer
        elif item.hash_ids:  # a synthetic session's first turn: its system prompt
            base = list(self._block(item.hash_ids[0]))
        else:
            base = []
        ids = base[:n] + self.tokens.draw(fresh, n - len(base))
        if item.session is not None:
            self.last[item.session] = (item.turn, ids, item.output_tokens)
        return ids


def conversation_requests(
    tokenizer: Any,
    spec: ConversationSpec,
    input_len: LengthRange,
    output_len: LengthRange,
    n: int,
    *,
    seed: int = 0,
    num_systems: int = 1,
    endpoint: Endpoint = "completions",
) -> list[Request]:
    """``n`` requests of synthetic conversations (plan, then token layout)."""
    plan = conversation_plan(spec, input_len, output_len, n, seed=seed, num_systems=num_systems)
    tokens = TokenSource.of(tokenizer, endpoint, np.random.default_rng(seed))
    return session_requests(tokens, plan, seed=seed, system_len=spec.system_len)


def synthetic_trace(
    n: int,
    *,
    seed: int = 0,
    rate: float = 4.0,
    burstiness: float = 0.4,
    sessions: int = 8,
    spec: ConversationSpec | None = None,
) -> list[TraceRequest]:
    """A made-up trace of ``n`` requests: single requests with lognormal lengths arriving in
    gamma-distributed gaps (shape ``burstiness``, mean ``1/rate``), and ``sessions``
    conversations whose turns follow one another by a second plus their think time. The
    shipped example trace and the replay benchmark are made with it."""
    rng = np.random.default_rng(seed)
    spec = spec or ConversationSpec(turns=LengthRange(3, 5), system_len=64)
    one_at_a_time = replace(spec, users=1)  # sessions one after another: easy to cut whole
    talk = conversation_plan(
        one_at_a_time, LengthRange(32, 192), LengthRange(16, 96), 10 * sessions, seed=seed
    )
    chats = [t for t in talk if int((t.session or "c0")[1:]) < sessions]
    singles = n - len(chats)
    if singles < 0:
        raise ParameterError(f"{n} requests are too few for {sessions} sessions")
    times = np.cumsum(rng.gamma(burstiness, 1.0 / (rate * burstiness), size=singles))
    ins = np.clip(rng.lognormal(5.0, 0.8, size=singles), 8, 1024).astype(int)
    outs = np.clip(rng.lognormal(4.0, 0.6, size=singles), 4, 256).astype(int)
    out = [TraceRequest(float(t), int(o), int(i)) for t, i, o in zip(times, ins, outs, strict=True)]
    span = float(times[-1]) if singles else 60.0
    starts = {f"c{s}": float(rng.uniform(0, span * 0.8)) for s in range(sessions)}
    clock: dict[str, float] = {}
    for t in sorted(chats, key=lambda c: (c.session or "", c.turn)):
        sid = t.session or ""
        at = starts[sid] if t.turn == 0 else clock[sid] + 1.0 + t.think_s
        clock[sid] = at
        out.append(TraceRequest(at, t.output_tokens, t.input_tokens, session=sid, turn=t.turn))
    return sorted(out, key=lambda r: r.arrival_s)


def mean_context(plan: Sequence[TraceRequest]) -> int:
    """Mean prompt + output tokens of a plan (what the planner sizes the KV cache for)."""
    if not plan:
        return 0
    return int(sum(r.length + r.output_tokens for r in plan) / len(plan))


__all__ = [
    "SESSION_SLOTS",
    "ConversationSpec",
    "conversation_plan",
    "conversation_requests",
    "mean_context",
    "session_requests",
    "synthetic_trace",
]
