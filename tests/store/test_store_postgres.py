"""The store contract on PostgreSQL: runs when $DIFFTUNE_TEST_POSTGRES_URL names a server (see conftest.py)."""

from __future__ import annotations

import os

import pytest

from tests.store.conftest import POSTGRES_ENV
from tests.store.contract import StoreContract

if not os.environ.get(POSTGRES_ENV):
    pytest.skip(
        f"set {POSTGRES_ENV}=postgresql+psycopg://user:password@host/db to test PostgreSQL", allow_module_level=True
    )


class TestPostgreSQL(StoreContract):
    @pytest.fixture
    def url(self, postgres_url: str) -> str:
        return postgres_url
