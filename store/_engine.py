"""Storage URLs to engines, and database errors to one-line :class:`StoreError` messages.

SQLite is set up for several worker processes on one file: WAL journal (readers never block the
writer), a busy timeout (a writer waits for the lock instead of failing at once), foreign keys on,
and write transactions that start with ``BEGIN IMMEDIATE`` so that a read-then-write (the next trial
number, get-or-create) is serialised with other writers instead of failing half-way.
"""

from __future__ import annotations

import os
import re
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError, OperationalError
from sqlalchemy.pool import StaticPool

from difftune.errors import StoreError

__all__ = ["DEFAULT_URL", "ENV_VAR", "default_url", "make_engine", "mask_url", "store_error"]

DEFAULT_URL = "sqlite:///difftune.db"
ENV_VAR = "DIFFTUNE_STORAGE"
#: Execution option that makes a SQLite transaction start with BEGIN IMMEDIATE.
WRITE_OPTION = "difftune_write"

_EXAMPLES = "e.g. sqlite:///difftune.db or postgresql+psycopg://user:password@host/dbname"
# Driver module -> what to pip install (the driver is not a difftune dependency).
_DRIVERS = {
    "psycopg": "psycopg[binary]",
    "psycopg2": "psycopg2-binary",
    "pymysql": "pymysql",
    "MySQLdb": "mysqlclient",
    "asyncpg": "asyncpg",
}


def default_url() -> str:
    """``$DIFFTUNE_STORAGE`` if set, else ``sqlite:///difftune.db`` in the working directory."""
    return os.environ.get(ENV_VAR) or DEFAULT_URL


def mask_url(url: str | URL) -> str:
    """``url`` with its password replaced by ``***``, even when the URL does not parse."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError, TypeError):
        return re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", str(url))


def _password(url: str | URL) -> str | None:
    try:
        return make_url(url).password
    except (ArgumentError, ValueError, TypeError):
        match = re.search(r"://[^:/@\s]*:([^@\s]*)@", str(url))
        return match.group(1) if match else None


def _is_sqlite_memory(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and (
        url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"
    )


def make_engine(url: str, *, busy_timeout: float = 30.0, engine_kwargs: dict[str, Any] | None = None) -> Engine:
    """An engine for ``url``, with the SQLite set-up described in this module's docstring.

    Raises:
        StoreError: the URL does not parse, names an unknown dialect, or its driver is not installed.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise store_error(exc, url, "cannot open storage") from exc
    kwargs: dict[str, Any] = dict(engine_kwargs or {})
    sqlite = parsed.get_backend_name() == "sqlite"
    memory = sqlite and _is_sqlite_memory(parsed)
    if memory:
        # One connection for everyone: each new connection to :memory: would be another empty database.
        kwargs.setdefault("poolclass", StaticPool)
        kwargs.setdefault("connect_args", {}).setdefault("check_same_thread", False)
    if parsed.get_backend_name() == "postgresql":
        kwargs.setdefault("pool_pre_ping", True)
    try:
        engine = create_engine(parsed, **kwargs)
    except (ArgumentError, ImportError) as exc:
        raise store_error(exc, url, "cannot open storage") from exc
    if sqlite:
        _set_up_sqlite(engine, busy_timeout=busy_timeout, memory=memory)
    return engine


def _set_up_sqlite(engine: Engine, *, busy_timeout: float, memory: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event (below) emit BEGIN, instead of the sqlite3 module's implicit
        # one before the first write, which leaves reads outside the transaction.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            cursor.execute("PRAGMA foreign_keys = ON")
            if not memory:
                cursor.execute("PRAGMA journal_mode = WAL")
                # Safe with WAL (a crash loses at most the last commits, never consistency), and no
                # fsync per trial.
                cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        write = connection.get_execution_options().get(WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _first_line(exc: BaseException) -> str:
    source: BaseException = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    text = str(source).strip() or type(source).__name__
    return text.splitlines()[0].strip()


def _hint(exc: BaseException, detail: str) -> str:
    lowered = detail.lower()
    if isinstance(exc, NoSuchModuleError):
        return f"unknown database dialect; use a SQLAlchemy URL, {_EXAMPLES}, in --storage or ${ENV_VAR}"
    if isinstance(exc, ArgumentError):
        return f"not a database URL; use a SQLAlchemy URL, {_EXAMPLES}, in --storage or ${ENV_VAR}"
    if isinstance(exc, ImportError):
        module = (exc.name or "").split(".")[0]
        package = _DRIVERS.get(module, module or "the database driver")
        return f"the database driver is not installed: pip install '{package}'"
    if isinstance(exc, IntegrityError):
        return "a row conflicts with one already stored; reload and retry"
    if isinstance(exc, DBAPIError):
        server = _server_hint(exc, detail)
        if server:
            return server
        if "locked" in lowered or "busy" in lowered:
            return (
                "another process held the write lock longer than the busy timeout; retry, or use PostgreSQL "
                "for many workers"
            )
        if "unable to open database file" in lowered:
            return "check that the directory exists and is writable, or pass another --storage"
        if "not a database" in lowered or "malformed" in lowered:
            return "the file is not a difftune SQLite database; pass another --storage"
        if "no such table" in lowered or "no such column" in lowered or "does not exist" in lowered:
            return "the schema is not difftune's or not up to date; run difftune.store.upgrade(url)"
    if isinstance(exc, OperationalError):
        return f"check that the database server is running and reachable and the URL is right (--storage or ${ENV_VAR})"
    return f"see the database's message; check the URL (--storage or ${ENV_VAR}) and retry"


# Connection failures of a database server (psycopg / libpq and psycopg2 wording).
_UNREACHABLE = (
    "connection refused",
    "could not connect",
    "failed to resolve host",
    "could not translate host name",
    "name or service not known",
    "no route to host",
    "network is unreachable",
    "timeout expired",
    "timed out",
    "no such file or directory",  # a Unix socket that is not there: no local server
    "server closed the connection",
    "the database system is starting up",
    "the database system is shutting down",
)


def _server_hint(exc: BaseException, detail: str) -> str | None:
    """What to do when connecting to a database server (PostgreSQL, MySQL) failed, or ``None``."""
    lowered = detail.lower()
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return "the connection to the database server was lost; check that it is running and retry"
    if "password authentication failed" in lowered or "access denied" in lowered:
        return f"the server refused the user or password in the URL; fix them (--storage or ${ENV_VAR})"
    if re.search(r'role "[^"]*" does not exist', lowered):
        return "no such user on the server; create it (CREATE ROLE … LOGIN PASSWORD …) or fix the URL"
    match = re.search(r'database "([^"]*)" does not exist', detail, re.I) or re.search(
        r"unknown database '([^']*)'", detail, re.I
    )
    if match:
        return f"the server has no database {match.group(1)!r}; create it (createdb {match.group(1)}) or fix the URL"
    if any(marker in lowered for marker in _UNREACHABLE):
        return (
            "no database server answers at that host and port; start it (e.g. sudo pg_ctlcluster <version> main "
            f"start, or systemctl start postgresql) or fix the host/port in the URL (--storage or ${ENV_VAR})"
        )
    return None


def store_error(exc: BaseException, url: str | URL, action: str) -> StoreError:
    """A one-line :class:`StoreError`: what failed, on which URL (password masked), why, what to do."""
    detail = _first_line(exc)
    password = _password(url)
    if password:
        # Whole occurrences only: a password "x" must not turn "exist" into "e***ist".
        detail = re.sub(rf"(?<!\w){re.escape(password)}(?!\w)", "***", detail)
    return StoreError(f"{action} {mask_url(url)}: {detail} — {_hint(exc, detail)}")
