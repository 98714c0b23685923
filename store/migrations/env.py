"""Alembic environment of difftune's schema; run through :func:`difftune.store.upgrade`, no alembic.ini.

Only the ``difftune_*`` tables are difftune's: Optuna's tables in the same database, and Optuna's
``alembic_version`` table, are neither compared nor touched (our version table is
``difftune_alembic_version``).
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.pool import NullPool

from difftune.store._migrate import TABLE_PREFIX, VERSION_TABLE
from difftune.store._models import Base

config = context.config
target_metadata = Base.metadata

# Any constant: serialises concurrent first-time schema creation by several PostgreSQL workers.
_PG_LOCK_KEY = 0x64696666  # "diff"


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """Compare and migrate difftune's tables only; Optuna's live in the same database."""
    if type_ == "table":
        return name is not None and name.startswith(TABLE_PREFIX)
    return True


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        include_name=include_name,
        render_as_batch=True,  # SQLite alters tables by copying them
        compare_type=True,
        transactional_ddl=True,  # SQLite's DDL is transactional when we emit BEGIN (see _engine.py)
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "", poolclass=NullPool)
    with engine.begin() as own_connection:
        run_migrations(own_connection)


if context.is_offline_mode():
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        include_name=include_name,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
