"""The store contract on PostgreSQL: runs when $DIFFTUNE_TEST_POSTGRES_URL names a server (see tests/conftest.py).

Each test gets a fresh database on that server (the ``postgres_url`` fixture).
"""

from __future__ import annotations

import os

import pytest

from tests.store.conftest import POSTGRES_ENV, REQUIRE_POSTGRES_ENV
from tests.store.contract import StoreContract

# With $CI_REQUIRE_POSTGRES=1 the fixture fails each test instead of this module being skipped.
if not os.environ.get(POSTGRES_ENV) and os.environ.get(REQUIRE_POSTGRES_ENV) != "1":
    pytest.skip(
        f"set {POSTGRES_ENV}=postgresql+psycopg://user:password@host/db to test PostgreSQL", allow_module_level=True
    )


class TestPostgreSQL(StoreContract):
    @pytest.fixture
    def url(self, postgres_url: str) -> str:
        return postgres_url
