"""Fixtures of the store tests: the PostgreSQL backend, when one is configured."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

#: Set to a PostgreSQL URL (e.g. postgresql+psycopg://difftune:difftune@localhost/difftune_test) to run
#: the store contract against it; the tests drop difftune's tables after each test.
POSTGRES_ENV = "DIFFTUNE_TEST_POSTGRES_URL"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL from $DIFFTUNE_TEST_POSTGRES_URL, emptied of difftune's tables afterwards; else skip."""
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"set {POSTGRES_ENV}=postgresql+psycopg://user:password@host/db to test PostgreSQL")
    pytest.importorskip("psycopg", reason="pip install 'psycopg[binary]' to test PostgreSQL")
    yield url
    from sqlalchemy import create_engine, text

    from difftune.store._migrate import VERSION_TABLE
    from difftune.store._models import Base

    engine = create_engine(url)
    try:
        Base.metadata.drop_all(engine)
        with engine.begin() as connection:
            connection.execute(text(f"DROP TABLE IF EXISTS {VERSION_TABLE}"))
    finally:
        engine.dispose()
