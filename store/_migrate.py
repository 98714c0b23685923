"""Alembic migrations of difftune's schema, run programmatically (users need no alembic.ini).

The revisions live in ``store/migrations/versions``; each is named after the release that introduces
it (``v0.1.0.a`` creates the whole schema). Alembic's bookkeeping table is
``difftune_alembic_version``, so Optuna's own ``alembic_version`` in the same database is untouched.

A developer adds a revision with::

    python -c "from difftune.store._migrate import new_revision; new_revision('v0.2.0.a', 'what changed')"
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect
from sqlalchemy.exc import SQLAlchemyError

from difftune.errors import StoreError
from difftune.store._engine import WRITE_OPTION, default_url, make_engine, mask_url, store_error

__all__ = ["MIGRATIONS_DIR", "TABLE_PREFIX", "VERSION_TABLE", "current_revision", "head_revision", "upgrade"]

TABLE_PREFIX = "difftune_"
VERSION_TABLE = "difftune_alembic_version"
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    # '%' would start an interpolation in Alembic's ini-style options.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.set_main_option("file_template", "%%(rev)s")  # versions/v0.1.0.a.py, like Optuna's
    config.attributes["connection"] = connection
    return config


def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head_revision() -> str:
    """The revision this difftune's models correspond to."""
    head = _script().get_current_head()
    if head is None:  # pragma: no cover - the package ships at least one revision
        raise StoreError(f"no migrations found in {MIGRATIONS_DIR}: reinstall difftune")
    return head


def known_revisions() -> list[str]:
    """Every revision this difftune knows, oldest first."""
    return [script.revision for script in reversed(list(_script().walk_revisions()))]


def revision_of(connection: Connection) -> str | None:
    """The schema revision of the database behind ``connection`` (``None``: no difftune schema yet)."""
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def upgrade_connection(connection: Connection, revision: str = "head") -> None:
    """Run the migrations up to ``revision`` on ``connection``, inside the caller's transaction."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    command.upgrade(_config(connection), revision)


def ensure_schema(engine: Engine, url: str, *, upgrade: bool) -> None:
    """Create the schema in an empty database, upgrade an older one (if ``upgrade``), refuse a newer one."""
    head = head_revision()
    with engine.connect() as connection:
        current = revision_of(connection)
        if current is None:
            stray = [name for name in inspect(connection).get_table_names() if name.startswith(TABLE_PREFIX)]
        connection.rollback()
    if current == head:
        return
    if current is None and stray:
        raise StoreError(
            f"{mask_url(url)} has difftune tables ({', '.join(sorted(stray))}) but no {VERSION_TABLE} "
            "table: it was not created by difftune's migrations; use another --storage"
        )
    if current is not None and current not in known_revisions():
        raise StoreError(
            f"{mask_url(url)} has difftune schema {current}, newer than this difftune understands ({head}): "
            "upgrade difftune (pip install -U difftune)"
        )
    if current is not None and not upgrade:
        raise StoreError(
            f"{mask_url(url)} has difftune schema {current}, this difftune needs {head}: "
            f"run difftune.store.upgrade({mask_url(url)!r}) (back the file up first)"
        )
    # BEGIN IMMEDIATE on SQLite (an advisory lock on PostgreSQL, in env.py): when several workers
    # open a new database at once, one creates the schema and the others then find it at head.
    with engine.execution_options(**{WRITE_OPTION: True}).begin() as connection:
        upgrade_connection(connection)


def upgrade(url: str | None = None, revision: str = "head") -> str:
    """Create or upgrade difftune's schema at ``url`` (default: ``$DIFFTUNE_STORAGE`` or ``sqlite:///difftune.db``).

    Optuna's tables in the same database are left alone. Returns the revision the database is at.

    >>> upgrade("sqlite://")
    'v0.7.0.a'

    Raises:
        StoreError: the database is unreachable, the URL is malformed, or the schema is newer than
            this difftune.
    """
    url = url or default_url()
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            current = revision_of(connection)
            connection.rollback()
        if current is not None and current not in known_revisions():
            raise StoreError(
                f"{mask_url(url)} has difftune schema {current}, newer than this difftune understands "
                f"({head_revision()}): upgrade difftune"
            )
        with engine.execution_options(**{WRITE_OPTION: True}).begin() as connection:
            upgrade_connection(connection, revision)
            now = revision_of(connection)
    except SQLAlchemyError as exc:
        raise store_error(exc, url, "cannot upgrade the schema of") from exc
    finally:
        engine.dispose()
    return now or ""


def current_revision(url: str | None = None) -> str | None:
    """The difftune schema revision at ``url``, or ``None`` for a database without difftune's tables."""
    url = url or default_url()
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return revision_of(connection)
    except SQLAlchemyError as exc:
        raise store_error(exc, url, "cannot read the schema revision of") from exc
    finally:
        engine.dispose()


def new_revision(revision: str, message: str, url: str = "sqlite://") -> None:
    """Write a new revision file by comparing the models with the current head (for developers)."""
    engine = make_engine(url)
    with engine.execution_options(**{WRITE_OPTION: True}).begin() as connection:
        upgrade_connection(connection)
        config = _config(connection)
        command.revision(config, message=message, autogenerate=True, rev_id=revision)
