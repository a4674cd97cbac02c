"""Where a study lives: the storage URL (a SQLite file by default), opening it, and its
failures as one line without a credential.

``postgresql://`` (or ``postgres://``) is PostgreSQL through psycopg 3, the ``vtune[postgresql]``
extra: several machines share one study there (``vtune worker``). Every message and record
shows a storage URL through :func:`redact`; a driver's own words are scrubbed of the URL's
password before they are shown (:func:`open_failure`).
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from tuner.errors import StorageError

OPEN_TRIES = 5  # opening a new storage races with workers creating its tables at once
CONNECT_TIMEOUT_S = 10  # a database server that does not answer


def _optuna() -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def storage_url(storage: str | None, default_path: Path) -> str:
    """``None`` -> SQLite file at ``default_path``; a bare path -> SQLite there (one ending in
    ``.journal``: Optuna's journal file, :func:`journal_url`); else a URL."""
    if storage is None:
        default_path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{default_path.resolve()}"
    if "://" not in storage:
        if storage.endswith(JOURNAL_SUFFIX):
            return journal_url(Path(storage))
        return f"sqlite:///{Path(storage).resolve()}"
    return storage


JOURNAL_SCHEME = "journal://"  # journal:///abs/path: Optuna's journal file, for one node
JOURNAL_SUFFIX = ".journal"  # a bare path ending so is a journal file too


def journal_url(path: Path) -> str:
    """The URL of Optuna's journal file storage at ``path`` (``journal:///abs/path``)."""
    return f"{JOURNAL_SCHEME}{path.resolve()}"


def journal_storage(url: str) -> Any:
    """Optuna's journal file storage at ``journal:///path``: an append-only log under a file
    lock, which the processes of one node share safely (``vtune search --workers``); the file
    and its directory are created on first use. StorageError (one line) when it cannot be."""
    optuna = _optuna()
    from optuna.storages.journal import JournalFileBackend

    path = Path(url[len(JOURNAL_SCHEME) :])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    except OSError as exc:
        raise StorageError(f"cannot open study storage {url}: {exc.strerror or exc}") from None


# userinfo with a password: the password runs to the last "@" (an unencoded "@" in it must not
# leak its tail; a query holding "@" is rare, and then too much is hidden, never too little).
_USERINFO = re.compile(r"(?P<user>[^:/?#@]*):(?P<password>.*)@(?P<after>[^@]*)", re.DOTALL)
_SECRET_KEYS = ("password", "secret", "token")


def redact(url: str) -> str:
    """A storage URL without its secrets, for logs and records: the userinfo password and the
    value of every query key containing "password", "secret" or "token" (``sslpassword``,
    ``auth_token``...) become ``***``; the username, host and everything else stay as written."""
    if "://" not in url:
        return url  # a file path
    scheme, rest = url.split("://", 1)
    m = _USERINFO.fullmatch(rest)
    if m:
        rest = f"{m['user']}:***@{m['after']}"
    base, sep, query = rest.partition("?")
    if not sep:
        return f"{scheme}://{rest}"
    query, hash_, fragment = query.partition("#")
    pairs = []
    for pair in re.split(r"([&;])", query):
        key, eq, _ = pair.partition("=")
        if eq and any(word in unquote(key).lower() for word in _SECRET_KEYS):
            pair = f"{key}=***"
        pairs.append(pair)
    return f"{scheme}://{base}?{''.join(pairs)}{hash_}{fragment}"


def sqlalchemy_url(url: str) -> str:
    """The URL given to SQLAlchemy: ``postgresql://`` and ``postgres://`` name psycopg 3
    (``postgresql+psycopg://``, the ``vtune[postgresql]`` extra) rather than SQLAlchemy's
    default driver of the day; anything else as written."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


def open_storage(url: str) -> Any:
    """Optuna's RDB storage at ``url`` (tables created on first use); StorageError with one
    line, credentials redacted: a missing database driver names the extra to install; a
    server that cannot be reached or refuses the login names host and port."""
    if url.startswith(JOURNAL_SCHEME):
        return journal_storage(url)
    optuna = _optuna()
    for attempt in range(1, OPEN_TRIES + 1):
        try:
            return optuna.storages.RDBStorage(
                sqlalchemy_url(url), engine_kwargs=_engine_kwargs(url)
            )
        except ImportError as exc:  # Optuna wraps the driver's ModuleNotFoundError
            cause = exc.__cause__ or exc.__context__
            driver = getattr(cause, "name", None) or getattr(exc, "name", None) or "its driver"
            fix = (
                "pip install 'vtune[postgresql]'"
                if url.startswith("postgres")
                else f"install the Python package {driver}"
            )
            raise StorageError(
                f"study storage {redact(url)}: missing database driver {driver} ({fix})"
            ) from None
        except Exception as exc:
            if attempt < OPEN_TRIES and lost_creation_race(exc):
                time.sleep(random.uniform(0.1, 0.5))  # the other worker's tables are there now
                continue
            raise StorageError(open_failure(url, exc)) from None
    raise AssertionError("unreachable")  # pragma: no cover


# What a database server's refusal means, by the words of its driver (psycopg, sqlite3).
_REFUSALS = (
    ("password authentication failed", "the server refused the login (check user and password)"),
    ("authentication failed", "the server refused the login (check user and password)"),
    ("no password supplied", "the server asks for a password (add it to the URL)"),
    ("connection refused", "connection refused (is the database server running there?)"),
    ("timeout expired", "no answer (timed out)"),
    ("timed out", "no answer (timed out)"),
    ("could not translate host name", "unknown host"),
    ("name or service not known", "unknown host"),
    ("no route to host", "no route to host"),
)


def open_failure(url: str, exc: BaseException) -> str:
    """One line for a storage that cannot be opened: the URL redacted, where it points
    (``host:port``), and why, without any credential of the URL."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = re.sub(r"^\([\w.]+\)\s*", "", text)  # SQLAlchemy's "(psycopg.OperationalError) "
    text = re.sub(r"\s*\(Background on this error at: [^)]*\)", "", text)
    lower = text.lower()
    reason = next((why for words, why in _REFUSALS if words in lower), None)
    if reason is None:
        db = re.search(r'database "([^"]*)" does not exist', text)
        reason = (
            f"database {db[1]!r} does not exist (createdb it)" if db else _scrub(text, url)[:200]
        )
    where = _host_port(url)
    return f"cannot open study storage {redact(url)}: {where + ': ' if where else ''}{reason}"


_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306}


def _host_port(url: str) -> str:
    """``host:port`` of a server URL (the default port when none is written); "" for files."""
    if "://" not in url or url.startswith("sqlite"):
        return ""
    netloc = url.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    if not netloc:
        return ""
    if ":" in netloc.rsplit("]", 1)[-1]:
        return netloc
    default = _PORTS.get(url.split("://", 1)[0].split("+", 1)[0].lower())
    return f"{netloc}:{default}" if default else netloc


def _scrub(text: str, url: str) -> str:
    """``text`` without any secret of ``url`` (the userinfo password, a secret query value; as
    written and decoded) anywhere in it."""
    if "://" not in url:
        return text
    secrets: set[str] = set()
    rest = url.split("://", 1)[1]
    m = _USERINFO.fullmatch(rest)
    if m and m["password"]:
        secrets.add(m["password"])
    for pair in re.split(r"[&;]", rest.partition("?")[2].partition("#")[0]):
        key, eq, value = pair.partition("=")
        if eq and value and any(word in unquote(key).lower() for word in _SECRET_KEYS):
            secrets.add(value)
    for secret in sorted(secrets | {unquote(s) for s in secrets}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def lost_creation_race(exc: BaseException) -> bool:
    """Whether ``exc`` is another worker creating the tables of a new storage at the same
    moment: Optuna creates them on first use without a lock ("table studies already exists",
    "UNIQUE constraint failed: alembic_version.version_num"; optuna/optuna#1092, #4621)."""
    text = str(exc).lower()
    return type(exc).__name__ == "IntegrityError" or "already exists" in text


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        # Several workers on one SQLite file wait for the lock instead of failing at once.
        return {"connect_args": {"timeout": 60}}
    if url.startswith("postgres"):
        # A server behind a dropped route answers nothing: say so in seconds, not minutes.
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
    return {"pool_pre_ping": True}


__all__ = [
    "lost_creation_race",
    "open_failure",
    "open_storage",
    "redact",
    "sqlalchemy_url",
    "storage_url",
]
