"""The SLO grammar: ``metric[:stat]<value[unit]`` joined by ``;``.

    ttft:p95<500ms;tpot:p99<50ms;e2el<10s

metric ∈ ttft, tpot, itl, e2el; stat ∈ mean, median, p50, p90, p95, p99 (default p99);
unit ∈ ms, s, us (default ms). :func:`parse_slo` raises :class:`~tuner.errors.SloError` with one
line that names the bad term; ``str(slo)`` parses back to an equal :class:`Slo`.

Two uses: :meth:`Slo.check` compares a summary's statistics with the thresholds, and
:meth:`Slo.request_ok` judges one request for goodput (as ``vllm bench serve --goodput`` does:
a request is good when its own TTFT, TPOT and E2EL are under the thresholds, whatever the stat).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from tuner.errors import SloError

if TYPE_CHECKING:
    from tuner.load.generator import RequestRecord

METRICS = ("ttft", "tpot", "itl", "e2el")
STATS = ("mean", "median", "p50", "p90", "p95", "p99")
UNITS = {"ms": 1e-3, "s": 1.0, "us": 1e-6, "µs": 1e-6}

_TERM = re.compile(
    r"\s*(?P<metric>[A-Za-z_][A-Za-z0-9_]*)\s*(?::\s*(?P<stat>[A-Za-z0-9_]+)\s*)?"
    r"(?P<op><=|<|>=|>|=)?\s*(?P<value>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)?\s*"
    r"(?P<unit>[A-Za-zµ]+)?\s*"
)


class HasDistributions(Protocol):
    """What :meth:`Slo.check` reads: a summary with one distribution per metric (in seconds)."""

    def stat(self, metric: str, stat: str) -> float | None: ...


@dataclass(frozen=True)
class SloTerm:
    """One threshold: ``metric:stat < value unit``. ``value`` is kept as written (in ``unit``)."""

    metric: str
    stat: str
    value: float
    unit: str = "ms"

    @property
    def seconds(self) -> float:
        return self.value * UNITS[self.unit]

    def __str__(self) -> str:
        return f"{self.metric}:{self.stat}<{self.value:.12g}{self.unit}"


@dataclass(frozen=True)
class Slo:
    """A conjunction of terms; empty means "no SLO" (everything passes)."""

    terms: tuple[SloTerm, ...]

    def __str__(self) -> str:
        return ";".join(map(str, self.terms))

    def check(self, summary: HasDistributions) -> list[tuple[SloTerm, float | None, bool]]:
        """For each term: (term, measured value in seconds or None, met?). A missing value
        (no successful request) does not meet the term."""
        out = []
        for term in self.terms:
            value = summary.stat(term.metric, term.stat)
            out.append((term, value, value is not None and value < term.seconds))
        return out

    def met(self, summary: HasDistributions) -> bool:
        return all(ok for _, _, ok in self.check(summary))

    def request_ok(self, record: RequestRecord) -> bool:
        """Goodput test for one successful request: its own TTFT, TPOT (0 with one token, as in
        vLLM), E2EL and largest inter-token gap are all under their thresholds."""
        if not record.ok:
            return False
        for term in self.terms:
            if term.metric == "ttft":
                value = record.ttft
            elif term.metric == "e2el":
                value = record.e2el
            elif term.metric == "tpot":
                value = record.tpot if record.tpot is not None else 0.0
            else:
                value = max(record.itl, default=0.0)
            if value is None or not value < term.seconds:
                return False
        return True


def parse_slo(text: str) -> Slo:
    """Parse the SLO grammar; raises :class:`SloError` (one line, naming the bad term)."""
    if not text or not text.strip():
        raise SloError("empty SLO (use e.g. 'ttft:p95<500ms;tpot:p99<50ms')")
    terms: list[SloTerm] = []
    seen: set[tuple[str, str]] = set()
    for raw in text.split(";"):
        if not raw.strip():
            continue
        term = _parse_term(raw)
        key = (term.metric, term.stat)
        if key in seen:
            raise SloError(f"SLO term {raw.strip()!r}: {term.metric}:{term.stat} is given twice")
        seen.add(key)
        terms.append(term)
    if not terms:
        raise SloError(f"SLO {text!r} has no terms (use e.g. 'ttft:p95<500ms')")
    return Slo(tuple(terms))


def _parse_term(raw: str) -> SloTerm:
    shown = raw.strip()
    m = _TERM.fullmatch(raw)
    if not m:
        raise SloError(f"SLO term {shown!r} is not metric[:stat]<value[unit] (e.g. ttft:p95<500ms)")
    metric = m["metric"].lower()
    if metric not in METRICS:
        raise SloError(f"SLO term {shown!r}: unknown metric {metric!r} (use {', '.join(METRICS)})")
    stat = (m["stat"] or "p99").lower()
    if stat not in STATS:
        raise SloError(f"SLO term {shown!r}: unknown statistic {stat!r} (use {', '.join(STATS)})")
    if m["op"] != "<":
        raise SloError(f"SLO term {shown!r}: thresholds are upper bounds written with '<'")
    if m["value"] is None:
        raise SloError(f"SLO term {shown!r}: missing threshold value after '<'")
    unit = m["unit"] or "ms"
    if unit not in UNITS:
        raise SloError(f"SLO term {shown!r}: unknown unit {unit!r} (use ms, s or us)")
    value = float(m["value"])
    if value <= 0:
        raise SloError(f"SLO term {shown!r}: the threshold must be positive")
    return SloTerm(metric, stat, value, unit)
