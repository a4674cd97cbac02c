"""Request traces: real traffic as a JSONL file, one request a line, read and checked here.

A line is a JSON object; vtune's own field names, and the Mooncake trace's (also AIPerf's) as
they are:

=================  =====================================  =====================================
what               vtune                                  Mooncake / AIPerf
=================  =====================================  =====================================
arrival time       ``arrival_s`` (seconds)                ``timestamp`` (milliseconds)
prompt             ``input_tokens`` or ``prompt`` (text)  ``input_length``; ``hash_ids``
output tokens      ``output_tokens``                      ``output_length``
conversation       ``session``, ``turn`` (0, 1, ...)      ``session_id``
think time         ``think_s`` (seconds)                  ``delay`` (milliseconds)
=================  =====================================  =====================================

``input_tokens`` counts the whole prompt the server sees (a conversation's history included, as
Mooncake records it). ``hash_ids`` name the prompt's 512-token blocks: equal ids are equal
blocks, so prefix reuse is replayed as recorded. A session's turns are numbered by ``turn``,
else by arrival. A turn is sent no earlier than its think time after the previous turn's answer.

:func:`read_trace` turns any bad line (not JSON, a missing field, a negative time) or an empty
file into one :class:`~tuner.errors.DatasetError` line naming the file and the line number.
:meth:`Trace.replay` gives the requests in recorded order with their send times (scaled);
:meth:`Trace.resample` draws its sessions (a single request is a session of one turn) for an
arrival process of the caller's choosing, interleaved (:func:`interleave`) so that any stretch
of the list has the trace's mix of turns. Pure: no tokenizer, no I/O beyond reading the file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from tuner.errors import DatasetError
from tuner.files import atomic_write_text, read_text_file

HASH_BLOCK_TOKENS = 512  # Mooncake's block size: one hash id stands for this many tokens
SESSION_SLOTS = 64  # conversations in progress at once when sessions are re-sampled
T = TypeVar("T")


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace (or of a synthetic conversation). ``arrival_s`` is relative to the
    trace's first request; ``input_tokens`` is None only when ``prompt`` gives the text."""

    arrival_s: float
    output_tokens: int
    input_tokens: int | None = None
    prompt: str | None = None
    session: str | None = None
    turn: int = 0
    think_s: float = 0.0
    hash_ids: tuple[int, ...] = ()
    line: int = 0

    @property
    def length(self) -> int:
        """Prompt tokens (text prompts: their length in characters / 4, a rough stand-in)."""
        if self.input_tokens is not None:
            return self.input_tokens
        return max(1, len(self.prompt or "") // 4)


@dataclass(frozen=True)
class Trace:
    """A checked trace: its requests in arrival order (times relative to the first)."""

    path: Path
    requests: tuple[TraceRequest, ...]

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s if self.requests else 0.0

    @property
    def mean_rate(self) -> float | None:
        """Requests per second over the recorded span (None for a single instant)."""
        span = self.duration_s
        return (len(self.requests) - 1) / span if span > 0 else None

    def gaps(self) -> np.ndarray:
        """Seconds between consecutive arrivals."""
        times = np.array([r.arrival_s for r in self.requests], dtype=float)
        return np.diff(times)

    @property
    def burstiness(self) -> float | None:
        """The gamma shape fitted to the gaps (:func:`gamma_shape`): 1 Poisson, below 1 burstier."""
        return gamma_shape(self.gaps())

    def sessions(self) -> list[list[TraceRequest]]:
        """Each session's turns in turn order; a request without a session is its own."""
        return group_sessions(self.requests)

    def replay(self, n: int, time_scale: float = 1.0) -> list[TraceRequest]:
        """The first ``n`` requests in recorded order, ``arrival_s`` multiplied by
        ``time_scale`` (0.5: twice as fast). Past the end the trace starts again one mean gap
        after its last request, each pass with sessions of its own."""
        out: list[TraceRequest] = []
        gaps = self.gaps()
        period = self.duration_s + (float(gaps.mean()) if gaps.size else 1.0)
        for i in range(n):
            lap, r = divmod(i, len(self.requests))
            base = self.requests[r]
            session = base.session if lap == 0 or base.session is None else f"{base.session}#{lap}"
            at = (base.arrival_s + lap * period) * time_scale
            out.append(replace(base, arrival_s=at, session=session))
        return out

    def resample(self, n: int, seed: int = 0, slots: int = SESSION_SLOTS) -> list[TraceRequest]:
        """``n`` requests drawn as whole sessions (with replacement, seeded), interleaved over
        ``slots`` conversations at once; recorded times are dropped (an arrival process times
        them). A session drawn twice is two sessions (``id#k``)."""
        rng = np.random.default_rng(seed)
        sessions = self.sessions()
        drawn: list[list[TraceRequest]] = []
        total = 0
        while total < n:
            k = len(drawn)
            picked = sessions[int(rng.integers(len(sessions)))]
            sid = picked[0].session or f"line{picked[0].line}"
            drawn.append([replace(t, session=f"{sid}#{k}") for t in picked])
            total += len(picked)
        return interleave(drawn, slots)[:n]


# --- reading ------------------------------------------------------------------------------------


def read_trace(path: str | Path) -> Trace:
    """Read and check a JSONL trace (see the module docstring); DatasetError in one line."""
    p = Path(path)
    text = read_text_file(p, "trace", "JSONL file", DatasetError)
    requests = [_entry(p, number, line) for number, line in _lines(text)]
    if not requests:
        raise DatasetError(
            f"trace {p} is empty: expected one JSON object a line "
            '(e.g. {"arrival_s": 0.0, "input_tokens": 128, "output_tokens": 64})'
        )
    return Trace(p, tuple(_normalise(p, requests)))


def _lines(text: str) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield number, line


def _entry(path: Path, number: int, line: str) -> TraceRequest:
    where = f"trace {path} line {number}"
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "too deep or too long"
        raise DatasetError(f"{where} is not JSON ({msg})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{where} is not a JSON object")
    f = _Fields(where, obj)
    arrival = f.seconds("arrival_s", "timestamp", 1e-3, "arrival time")
    assert arrival is not None
    prompt = obj.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise DatasetError(f"{where}: 'prompt' must be non-empty text")
    input_tokens = f.count(("input_tokens", "input_length"), required=prompt is None)
    output = f.count(("output_tokens", "output_length"), required=True)
    assert output is not None
    session = obj.get("session", obj.get("session_id"))
    if session is not None and (isinstance(session, bool) or not isinstance(session, str | int)):
        raise DatasetError(f"{where}: 'session' must be a string or an integer")
    turn = f.count(("turn",), required=False, low=0)
    hash_ids = obj.get("hash_ids", [])
    if not isinstance(hash_ids, list) or not all(
        isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in hash_ids
    ):
        raise DatasetError(f"{where}: 'hash_ids' must be a list of non-negative integers")
    think = f.seconds("think_s", "delay", 1e-3, "", required=False)
    return TraceRequest(
        arrival_s=arrival,
        output_tokens=output,
        input_tokens=input_tokens,
        prompt=prompt,
        session=None if session is None else str(session),
        turn=-1 if turn is None else turn,  # -1: numbered by arrival in _normalise
        think_s=think or 0.0,
        hash_ids=tuple(hash_ids),
        line=number,
    )


@dataclass(frozen=True)
class _Fields:
    """Typed reads of one line's fields, each failure one DatasetError naming the line."""

    where: str
    obj: dict[str, Any]

    def _number(self, key: str) -> float | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise DatasetError(f"{self.where}: '{key}' must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise DatasetError(f"{self.where}: '{key}' must be a finite number >= 0, got {value}")
        return float(value)

    def seconds(
        self, key: str, alt: str, alt_factor: float, what: str, required: bool = True
    ) -> float | None:
        value = self._number(key)
        if value is None and (raw := self._number(alt)) is not None:
            value = raw * alt_factor
        if value is None and required:
            raise DatasetError(
                f"{self.where}: no {what} ('{key}' in seconds, or Mooncake's '{alt}' in ms)"
            )
        return value

    def count(self, keys: tuple[str, ...], required: bool, low: int = 1) -> int | None:
        key = next((k for k in keys if self.obj.get(k) is not None), None)
        if key is None:
            if required:
                names = " or ".join(f"'{k}'" for k in keys)
                raise DatasetError(f"{self.where}: missing {names}")
            return None
        value = self.obj[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DatasetError(f"{self.where}: '{key}' must be an integer >= {low}, got {value!r}")
        return value


def _normalise(path: Path, requests: list[TraceRequest]) -> list[TraceRequest]:
    """Sort by arrival (stable), make times relative to the first, number unnumbered turns by
    arrival, and refuse a turn number given twice in one session."""
    ordered = sorted(requests, key=lambda r: r.arrival_s)
    t0 = ordered[0].arrival_s
    seen: dict[str, set[int]] = {}
    counters: dict[str, int] = {}
    out = []
    for r in ordered:
        turn = r.turn
        if r.session is not None:
            if turn < 0:
                turn = counters.get(r.session, 0)
            counters[r.session] = max(counters.get(r.session, 0), turn + 1)
            if turn in seen.setdefault(r.session, set()):
                raise DatasetError(
                    f"trace {path} line {r.line}: session {r.session!r} has turn {turn} twice"
                )
            seen[r.session].add(turn)
        out.append(replace(r, arrival_s=r.arrival_s - t0, turn=max(turn, 0)))
    return out


# --- sessions and statistics -----------------------------------------------------------------


def group_sessions(requests: Sequence[TraceRequest]) -> list[list[TraceRequest]]:
    """Sessions in order of their first request, each in turn order; a request without a
    session is a session of one."""
    by_id: dict[str, list[TraceRequest]] = {}
    out: list[list[TraceRequest]] = []
    for r in requests:
        if r.session is None:
            out.append([r])
        elif r.session in by_id:
            by_id[r.session].append(r)
        else:
            by_id[r.session] = [r]
            out.append(by_id[r.session])
    for turns in by_id.values():
        turns.sort(key=lambda t: t.turn)
    return out


def interleave(sessions: Sequence[Sequence[T]], slots: int = SESSION_SLOTS) -> list[T]:
    """One list of the sessions' requests with ``slots`` sessions in progress at once: each
    session goes to the slot with the fewest requests so far, and the slots take turns (one
    request each), so a session's turns stay in order, about ``slots`` requests apart."""
    if slots < 1:
        raise ValueError("slots must be at least 1")
    lanes: list[list[T]] = [[] for _ in range(min(slots, max(1, len(sessions))))]
    for turns in sessions:
        min(lanes, key=len).extend(turns)
    out: list[T] = []
    for step in range(max((len(lane) for lane in lanes), default=0)):
        out.extend(lane[step] for lane in lanes if step < len(lane))
    return out


def gamma_shape(gaps: np.ndarray) -> float | None:
    """The gamma shape of inter-arrival gaps by the method of moments (mean² / variance),
    vLLM's "burstiness": 1 for Poisson arrivals, below 1 burstier, above 1 more regular.
    Simultaneous arrivals (gaps of 0) count. None with fewer than 3 gaps or no spread; inf
    for perfectly even spacing."""
    gaps = np.asarray(gaps, dtype=float)
    if gaps.size < 3 or gaps.mean() <= 0:
        return None
    var = float(gaps.var())
    return math.inf if var == 0 else float(gaps.mean() ** 2 / var)


def ideal_prefix_reuse(requests: Sequence[TraceRequest]) -> float | None:
    """The share of prompt tokens an unbounded prefix cache could serve, replaying in order:
    hash-id blocks seen before (as a chain from the prompt's start), else for a session's later
    turn the previous turn's prompt and answer. None when no prompt has a token count."""
    seen: set[int] = set()  # chained block keys: a block counts only behind the same blocks
    last: dict[str, TraceRequest] = {}
    reused = total = 0
    for r in sorted(requests, key=lambda q: q.arrival_s):
        if r.input_tokens is None:
            continue
        total += r.input_tokens
        if r.hash_ids:
            key, blocks, hit = 0, 0, True
            for h in r.hash_ids:
                key = hash((key, h))
                hit = hit and key in seen
                blocks += hit
                seen.add(key)
            reused += min(r.input_tokens, blocks * HASH_BLOCK_TOKENS)
        elif r.session is not None and (prev := last.get(r.session)) is not None:
            history = (prev.input_tokens or 0) + prev.output_tokens
            reused += min(r.input_tokens, history)
        if r.session is not None:
            last[r.session] = r
    return reused / total if total else None


def write_trace(path: str | Path, requests: Sequence[TraceRequest]) -> Path:
    """Write requests as a vtune-format JSONL trace (the example trace is made this way)."""
    lines = []
    for r in requests:
        obj: dict[str, Any] = {"arrival_s": round(r.arrival_s, 4)}
        if r.input_tokens is not None:
            obj["input_tokens"] = r.input_tokens
        if r.prompt is not None:
            obj["prompt"] = r.prompt
        obj["output_tokens"] = r.output_tokens
        if r.session is not None:
            obj.update(session=r.session, turn=r.turn)
        if r.think_s:
            obj["think_s"] = round(r.think_s, 3)
        if r.hash_ids:
            obj["hash_ids"] = list(r.hash_ids)
        lines.append(json.dumps(obj, separators=(", ", ": ")))
    return atomic_write_text(Path(path), "\n".join(lines) + "\n")
