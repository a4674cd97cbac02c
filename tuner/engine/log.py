"""Pure functions over vLLM's log and /metrics text: KV capacity, cache config, failure class.

Nothing here starts processes or does I/O, so all of it is unit-tested on verbatim excerpts of
real vLLM output (vLLM CPU 0.32.0, in tests/unit/test_engine.py). ``tuner.engine.server`` uses these
on the per-trial log file and on the server's /metrics.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path


class FailureClass(StrEnum):
    """Why a vLLM server did not start, stopped serving, or could not be measured. Values are
    stable strings.

    Two kinds (:attr:`environment`): a *candidate* failure says the candidate cannot run here
    (OOM at its settings, an option vLLM rejects or cannot run): measuring it again gives the
    same answer, so a search records it once and moves on. Every other class is an
    *environment* failure (vLLM not found, a start-up timeout, a port in use, the guard killed
    from outside, every request refused...): it says nothing about the candidate, so the next
    run measures the candidate again.
    """

    OOM = "oom"  # not enough (GPU or NUMA-node) memory for weights, activations or KV cache
    INVALID_OPTION = "invalid_option"  # unknown flag or a value vLLM rejects
    UNSUPPORTED = "unsupported"  # valid option this platform / checkpoint cannot run
    LOAD_CRASH = "load_crash"  # engine failed while loading or initialising otherwise
    HEALTH_TIMEOUT = "health_timeout"  # alive but no /health 200 before the deadline
    PORT_IN_USE = "port_in_use"  # also: the port answered, but from another process
    CRASHED = "crashed"  # died after it was healthy, or an exit nothing above explains
    KILLED = "killed"  # the guard was killed or stopped from outside vtune; vLLM did not fail
    REQUESTS_FAILED = "requests_failed"  # vLLM ran, but every request failed (401, 404, ...)

    @property
    def environment(self) -> bool:
        """Whether this failure is the environment's, not a property of the candidate."""
        return self not in CANDIDATE_FAILURES


# The failures that are properties of the candidate (see FailureClass).
CANDIDATE_FAILURES = frozenset(
    {FailureClass.OOM, FailureClass.INVALID_OPTION, FailureClass.UNSUPPORTED}
)

# vLLM's start-up check that the device has the memory its utilization asks for: "Free memory
# on device (x/y GiB) on startup is less than desired GPU memory utilization (0.9, z GiB).
# Decrease GPU memory utilization or reduce GPU memory used by other processes." (and the CPU
# form, "Available memory on node 0 ..."). At vLLM's default utilization, an empty device has
# it: then another process holds the memory.
_MEMORY_TAKEN = re.compile(r"memory .*on startup is less than desired", re.I)


def memory_taken(message: str) -> bool:
    """Whether an OOM message is vLLM's start-up check that free memory is below what the
    memory utilization asks for (memory held by someone else, unless the candidate set a
    higher utilization)."""
    return bool(_MEMORY_TAKEN.search(message))


def environment_failure(failure_class: str | None) -> bool:
    """Whether a recorded failure class (a string, any case; None or unknown included) is an
    environment failure: only the candidate classes are not."""
    return (failure_class or "").lower() not in {c.value for c in CANDIDATE_FAILURES}


@dataclass(frozen=True)
class EngineFailure:
    """A failed start or a server that died: the class, one line, and where to look."""

    failure_class: FailureClass
    message: str  # one line, no traceback
    log_tail: str = ""  # the last ~40 lines of the log
    log_path: Path | None = None
    returncode: int | None = None

    def __str__(self) -> str:
        where = f" (log: {self.log_path})" if self.log_path else ""
        return f"{self.failure_class.value}: {self.message}{where}"

    def to_json(self) -> dict[str, object]:
        return {
            "failure_class": self.failure_class.value,
            "message": self.message,
            "log_tail": self.log_tail,
            "log_path": None if self.log_path is None else str(self.log_path),
            "returncode": self.returncode,
        }


# Ordered: the first class with a matching line wins. Root causes (OOM, unsupported) come before
# the generic wrappers vLLM prints after them ("Engine core initialization failed").
# Every pattern was seen in real vLLM output unless marked "(source)": taken from vLLM's code.
FAILURE_PATTERNS: tuple[tuple[FailureClass, re.Pattern[str]], ...] = tuple(
    (cls, re.compile(pat))
    for cls, pat in (
        (FailureClass.PORT_IN_USE, r"Address already in use"),
        (FailureClass.OOM, r"Available memory on node \d+ .* is less than"),
        (FailureClass.OOM, r"No available memory for the cache blocks"),  # (source)
        (FailureClass.OOM, r"larger than the available KV cache memory"),  # (source)
        (FailureClass.OOM, r"Cannot auto-fit max_model_len"),  # (source)
        (FailureClass.OOM, r"CUDA out of memory|OutOfMemoryError|CUDA error: out of memory"),
        (FailureClass.UNSUPPORTED, r"Not enough allowed NUMA nodes"),
        (FailureClass.UNSUPPORTED, r"Cannot find the config file for \w+"),
        (FailureClass.UNSUPPORTED, r"expected at most 0 argument\(s\)"),  # kernel not built in
        # A kernel missing from the loaded build (vLLM CPU's AVX2 library has no 4-bit GEMM).
        (FailureClass.UNSUPPORTED, r"'_C' object has no attribute '\w+'"),
        (FailureClass.UNSUPPORTED, r"NotImplementedError"),
        (FailureClass.UNSUPPORTED, r"(is|are) not supported (on|for|by|with)"),  # (source)
        (FailureClass.UNSUPPORTED, r"compute capability"),  # (source) fp8 needs 8.9+
        (FailureClass.INVALID_OPTION, r"error: unrecognized arguments"),
        (FailureClass.INVALID_OPTION, r"error: argument "),
        (FailureClass.INVALID_OPTION, r"validation errors? for \w+"),
        (FailureClass.LOAD_CRASH, r"Repo id must be in the form|does not appear to have a file"),
        (FailureClass.LOAD_CRASH, r"No such file or directory|Can't load|Error loading"),
        (FailureClass.LOAD_CRASH, r"Engine core initialization failed"),
        (FailureClass.LOAD_CRASH, r"WorkerProc initialization failed"),
    )
)

# Classes that can explain a server that was healthy and then died.
_AFTER_START = (FailureClass.OOM,)

# "(EngineCore pid=11833) ERROR 11-25 20:57:30 [core.py:1510] " and similar prefixes.
_PREFIX = re.compile(
    r"^(\(\w[\w-]* pid=\d+\) )?((DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+ \S+ \[\S+\] )?"
)
_WARNING = re.compile(
    r"\bWARNING \d\d-\d\d |Warning: |UserWarning|DeprecationWarning|FutureWarning"
)
_ERRORISH = re.compile(r"(Error|Exception|error:|ERROR|Killed|Traceback)")


def _clean(line: str, limit: int = 300) -> str:
    text = _PREFIX.sub("", line.strip()).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def classify_failure(log_text: str, *, started: bool = False) -> tuple[FailureClass, str]:
    """Classify a vLLM log into a :class:`FailureClass` and a one-line message.

    The whole log is searched (root causes appear ~100 lines before the end); warning lines are
    ignored, because vLLM's routine warnings mention errors (the ulimit one names ``OSError``).
    ``started``: the server had been healthy; then only OOM is kept and anything else is
    CRASHED. With no pattern matching, the class is CRASHED with the last error-looking line.
    """
    lines = [ln for ln in log_text.splitlines() if ln.strip() and not _WARNING.search(ln)]
    for cls, pattern in FAILURE_PATTERNS:
        if started and cls not in _AFTER_START:
            continue
        for i, line in enumerate(lines):
            if pattern.search(line):
                return cls, _message(lines, i, pattern)
    return FailureClass.CRASHED, _last_error_line(lines)


def _message(lines: list[str], i: int, pattern: re.Pattern[str]) -> str:
    text = _clean(lines[i])
    if pattern.pattern.startswith("validation error"):
        # pydantic: "N validation errors for X" then "field" / "  Input should be ..." lines.
        detail = [_clean(ln, 160) for ln in lines[i + 1 : i + 3] if not ln.startswith("    For")]
        text = _clean(": ".join([text, *detail]))
    return text


def _last_error_line(lines: list[str]) -> str:
    for line in reversed(lines):
        if _ERRORISH.search(line) and "Traceback" not in line:
            return _clean(line)
    return _clean(lines[-1]) if lines else "vLLM exited without output"


def outside_stop(log_text: str, returncode: int | None) -> str | None:
    """How vLLM's guard was stopped from outside vtune, given its log and exit status, when
    vtune had not stopped it; None when nothing says so (vLLM exited by itself). The guard
    never dies of a signal by itself (it exits with vLLM's code), and when it is sent one it
    says so in the log (``vtune guard: stopping vLLM: received SIGTERM``) before stopping vLLM."""
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name} from outside vtune"
    for line in reversed(log_text.splitlines()):
        if line.startswith(_GUARD_STOP):
            return f"was stopped from outside vtune ({line[len(_GUARD_STOP) :].strip()})"
    return None


_GUARD_STOP = "vtune guard: stopping vLLM: "  # what tuner/engine/guard.py prints


def log_tail(text: str, n: int = 40) -> str:
    """The last ``n`` lines of ``text``."""
    return "\n".join(text.splitlines()[-n:])


@dataclass(frozen=True)
class KvCacheLog:
    """What vLLM logged about its KV cache; fields are None when the line was not found."""

    kv_cache_size_tokens: int | None = None
    max_concurrency: float | None = None
    concurrency_context: int | None = None  # the "for N tokens per request" (= max_model_len)
    pool: str | None = None  # "CPU", "GPU", "GPU + host"


_KV_SIZE = re.compile(r"(?P<pool>[A-Z][\w +]*?) KV cache size: (?P<tokens>[\d,]+) tokens")
_MAX_CONC = re.compile(
    r"Maximum concurrency for (?P<ctx>[\d,]+) tokens per request: (?P<conc>[\d.]+)x"
)


def parse_kv_cache_log(log_text: str) -> KvCacheLog:
    """Read KV capacity and max concurrency from vLLM's startup log (first engine's line).

    vLLM 0.32: ``CPU KV cache size: 1,048,576 tokens, Maximum concurrency for 2,048 tokens per
    request: 512.00x``; older vLLM printed the two halves on separate lines; both are accepted.
    """
    size = _KV_SIZE.search(log_text)
    conc = _MAX_CONC.search(log_text)
    return KvCacheLog(
        kv_cache_size_tokens=int(size["tokens"].replace(",", "")) if size else None,
        max_concurrency=float(conc["conc"]) if conc else None,
        concurrency_context=int(conc["ctx"].replace(",", "")) if conc else None,
        pool=size["pool"].strip() if size else None,
    )


@dataclass(frozen=True)
class CacheConfigInfo:
    """vLLM's ``vllm:cache_config_info`` labels, typed where vtune uses them.

    ``kv_cache_size_tokens`` falls back to ``num_gpu_blocks * block_size`` for vLLM versions
    that do not export it. ``labels`` keeps every label as exported.
    """

    num_gpu_blocks: int | None
    block_size: int | None
    kv_cache_size_tokens: int | None
    max_concurrency: float | None
    kv_cache_memory_bytes: int | None
    gpu_memory_utilization: float | None
    cache_dtype: str | None
    enable_prefix_caching: bool | None
    labels: dict[str, str]


_INFO_LINE = re.compile(r"^vllm:cache_config_info\{(?P<labels>.*)\}\s+\S+\s*$", re.M)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus_labels(text: str) -> dict[str, str]:
    """``a="1",b="x\\"y"`` -> {"a": "1", "b": 'x"y'} (Prometheus text-format escapes)."""
    return {
        k: v.replace(r"\"", '"').replace(r"\n", "\n").replace("\\\\", "\\")
        for k, v in _LABEL.findall(text)
    }


def parse_cache_config_info(metrics_text: str) -> CacheConfigInfo | None:
    """Parse the first ``vllm:cache_config_info`` series of a /metrics page; None if absent."""
    match = _INFO_LINE.search(metrics_text)
    if match is None:
        return None
    labels = parse_prometheus_labels(match["labels"])
    blocks = _int(labels.get("num_gpu_blocks"))
    block_size = _int(labels.get("block_size"))
    tokens = _int(labels.get("kv_cache_size_tokens"))
    if tokens is None and blocks is not None and block_size is not None:
        tokens = blocks * block_size
    prefix = labels.get("enable_prefix_caching")
    return CacheConfigInfo(
        num_gpu_blocks=blocks,
        block_size=block_size,
        kv_cache_size_tokens=tokens,
        max_concurrency=_float(labels.get("kv_cache_max_concurrency")),
        kv_cache_memory_bytes=_int(labels.get("kv_cache_memory_bytes")),
        gpu_memory_utilization=_float(labels.get("gpu_memory_utilization")),
        cache_dtype=labels.get("cache_dtype"),
        enable_prefix_caching=None if prefix is None else prefix == "True",
        labels=labels,
    )


def _int(value: str | None) -> int | None:
    try:
        return int(float(value)) if value not in (None, "None", "") else None
    except ValueError:
        return None


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "None", "") else None
    except ValueError:
        return None


# Flags whose value is a secret: --hf-token, --api-key, --*-secret, --*-password (not --tokenizer,
# not --max-num-batched-tokens).
_SECRET_FLAG = re.compile(r"^--?([\w-]*[-_])?(token|key|secret|password)$", re.I)


def redact_argv(argv: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Replace values of secret-looking flags (``--hf-token x``, ``--api-key=x``) with ``***``."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append("***")
            hide_next = False
            continue
        flag, eq, _value = arg.partition("=")
        if _SECRET_FLAG.match(flag):
            if eq:
                out.append(f"{flag}=***")
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(arg)
    return tuple(out)
