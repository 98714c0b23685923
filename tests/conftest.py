from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from typing import Any, NoReturn

import pytest
import torch

#: Set to a PostgreSQL URL (e.g. postgresql+psycopg://difftune:difftune@127.0.0.1/difftune_test) to run the
#: PostgreSQL tests. The role needs CREATEDB: each test gets a fresh database on that server, dropped afterwards.
POSTGRES_ENV = "DIFFTUNE_TEST_POSTGRES_URL"
#: Set to 1 (as .ci/run does) to make a missing PostgreSQL URL, driver or server an error instead of a skip.
REQUIRE_POSTGRES_ENV = "CI_REQUIRE_POSTGRES"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def embedded_pipe():
    import difftune

    pipe = difftune.load_pipeline("embedded")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def classifier():
    from difftune.models.embedded import load_classifier

    return load_classifier()


def _postgres_unavailable(reason: str) -> NoReturn:
    if os.environ.get(REQUIRE_POSTGRES_ENV) == "1":
        pytest.fail(f"{reason} (and ${REQUIRE_POSTGRES_ENV}=1: PostgreSQL is required)", pytrace=False)
    pytest.skip(reason)


def _drop_database(admin: Any, name: str, version: tuple[int, ...]) -> None:
    """Drop the test database, retrying while a server process (autovacuum, a closing connection) holds it.

    ``WITH (FORCE)`` terminates the database's other backends, which a non-superuser may not do to a
    process of another role (an autovacuum worker): that is retried, then the plain drop, and a
    database that still cannot be dropped is a warning naming it, not a failed test.
    """
    import time
    import warnings

    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    force = " WITH (FORCE)" if version >= (13,) else ""
    error: Exception | None = None
    for attempt in range(10):
        try:
            with admin.connect() as connection:
                if not force:  # pragma: no cover - PostgreSQL 12 and older
                    connection.execute(
                        text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
                        {"name": name},
                    )
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"{force if attempt % 2 == 0 else ""}'))
            break
        except SQLAlchemyError as exc:
            error = exc
            time.sleep(0.2 * (attempt + 1))
    else:
        warnings.warn(f"could not drop the test database {name}: {error}", stacklevel=2)
    admin.dispose()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """The URL of a fresh, empty PostgreSQL database on the server of $DIFFTUNE_TEST_POSTGRES_URL, dropped afterwards.

    Skips when the variable is unset, psycopg is missing or the server is unreachable, unless
    $CI_REQUIRE_POSTGRES=1, which makes each of those an error.
    """
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        _postgres_unavailable(f"set {POSTGRES_ENV}=postgresql+psycopg://user:password@host/db to test PostgreSQL")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _postgres_unavailable("pip install 'psycopg[binary]' to test PostgreSQL")
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import NullPool

    server = make_url(url)
    name = f"difftune_t_{secrets.token_hex(6)}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as connection:
            version = connection.dialect.server_version_info or (0,)
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except SQLAlchemyError as exc:
        admin.dispose()
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        _postgres_unavailable(
            f"cannot create a test database on {server.render_as_string(hide_password=True)}: {detail}"
        )
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        _drop_database(admin, name, version)
        admin.dispose()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run the test with one torch thread (tiny models on a busy machine), restoring the count after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
