"""Server-sent events from an OpenAI token stream, as pure functions (no I/O, no clock).

* :class:`SseParser` turns raw bytes as they come off the socket into complete ``data`` payloads,
  whatever the read boundaries: UTF-8 characters split across reads, events split anywhere,
  ``\\n``, ``\\r\\n`` or ``\\r`` line ends, comment (keep-alive) lines, multi-line ``data`` fields.
* :func:`classify` turns one payload into what the client acts on: a token chunk, the usage
  chunk, ``[DONE]``, an error object sent inside the stream, or a malformed chunk (also one whose
  ``choices`` is not a list of objects). It never raises, whatever the payload.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

MAX_EVENT = 4 * 1024 * 1024  # one token chunk is a few hundred bytes


class StreamError(ValueError):
    """The byte stream cannot be SSE: an event grew past :data:`MAX_EVENT` without ending."""


class SseParser:
    """Incremental SSE parser: ``feed(bytes) -> [data, ...]``, ``close() -> [data, ...]``.

    Buffers bytes and decodes only complete events; a newline byte never occurs inside a UTF-8
    multi-byte sequence, so splitting on it first makes split characters a non-issue.
    Undecodable bytes are replaced (U+FFFD) so the JSON step reports them, not this one.
    An unfinished event over :data:`MAX_EVENT` bytes raises :class:`StreamError` (a server
    that never ends its event must not grow the buffer without bound).
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[str]:
        if (  # fast path: exactly one one-line event, as vLLM sends each token
            not self._buf
            and data[:6] == b"data: "
            and data.find(b"\n") == len(data) - 2
            and data[-1:] == b"\n"
            and b"\r" not in data
        ):
            return [data[6:-2].decode("utf-8", "replace")]
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            # Normalise CRLF / CR line ends; a trailing CR may be half of a CRLF: keep it back.
            hold = buf.endswith(b"\r")
            if hold:
                buf = buf[:-1]
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if hold:
                buf += b"\r"
        if b"\n\n" not in buf:
            self._buf = buf
            if len(buf) > MAX_EVENT:
                self._buf = b""
                raise StreamError(f"stream event over {MAX_EVENT // 1024} KiB without an end")
            return []
        *events, self._buf = buf.split(b"\n\n")
        out = []
        for raw in events:
            payload = _data_of(raw)
            if payload is not None:
                out.append(payload)
        return out

    def close(self) -> list[str]:
        """Flush an event the server did not terminate with a blank line (the stream ended)."""
        raw, self._buf = self._buf.rstrip(b"\r\n"), b""
        payload = _data_of(raw) if raw else None
        return [] if payload is None else [payload]


def _data_of(raw: bytes) -> str | None:
    """The ``data`` of one event (lines joined by ``\\n``), or None for comment-only events."""
    if raw.startswith(b"data: ") and b"\n" not in raw:  # the common case, one line
        return raw[6:].decode("utf-8", "replace")
    lines = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
        # ':' comments (keep-alives), event:, id:, retry: and blank lines carry no data.
    if not lines:
        return None
    return b"\n".join(lines).decode("utf-8", "replace")


Kind = Literal["token", "usage", "done", "error", "malformed", "other"]


@dataclass(frozen=True, slots=True)
class Event:
    """One classified payload. ``tokens`` is set for usage chunks (completion_tokens),
    ``prompt_tokens`` where the server reports it, ``message`` for errors and malformed data."""

    kind: Kind
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    message: str | None = None


DONE = Event("done")
TOKEN = Event("token")
OTHER = Event("other")


def classify(payload: str) -> Event:
    """Classify one ``data`` payload of a /v1/completions or /v1/chat/completions stream.

    A chunk with choices is a token chunk, except a chat chunk that only announces the role
    (no content yet). A chunk that also carries usage (``continuous_usage_stats``) is a token
    chunk; the final usage chunk has no choices.
    """
    # Fast path for the bulk of a stream, a compact token chunk ('{"id":..,"choices":[{..}]..}'),
    # recognised without a full JSON parse: one object (braces at both ends), a non-empty choices
    # list, no role-only delta, no error. Quotes inside JSON strings are escaped, so these
    # substrings cannot come from generated text. Anything else takes the strict path below.
    if (
        payload[-1:] == "}"
        and payload[:1] == "{"
        and '"choices":[{' in payload
        and '"role"' not in payload
        and '"error"' not in payload
    ):
        return TOKEN
    if payload == "[DONE]":
        return DONE
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):  # RecursionError: nested too deep to parse
        return _malformed(payload)
    if not isinstance(obj, dict):
        return _malformed(payload)
    choices = obj.get("choices")
    if choices is not None and not isinstance(choices, list):
        return _malformed(payload, "choices is not a list")
    if choices:
        if not isinstance(choices[0], dict):
            return _malformed(payload, "a choice is not an object")
        delta = choices[0].get("delta")
        if isinstance(delta, dict) and "role" in delta and not delta.get("content"):
            return OTHER
        return TOKEN
    if obj.get("error"):
        err = obj["error"]
        msg = err.get("message", err) if isinstance(err, dict) else err
        return Event("error", message=f"error in stream: {str(msg)[:200]}")
    usage = obj.get("usage")
    if isinstance(usage, dict):
        ct, pt = usage.get("completion_tokens"), usage.get("prompt_tokens")
        return Event(
            "usage",
            completion_tokens=ct if isinstance(ct, int) else None,
            prompt_tokens=pt if isinstance(pt, int) else None,
        )
    if "object" in obj and obj.get("object") == "error":
        return Event("error", message=f"error in stream: {str(obj.get('message'))[:200]}")
    return OTHER


def _malformed(payload: str, why: str = "") -> Event:
    what = f"malformed stream chunk ({why})" if why else "malformed stream chunk"
    return Event("malformed", message=f"{what}: {payload[:80]!r}")
