"""The store contract on SQLite, in memory and in a file (PostgreSQL: test_store_postgres.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.store.contract import StoreContract


class TestSQLiteMemory(StoreContract):
    shared_between_processes = False

    @pytest.fixture
    def url(self) -> str:
        return "sqlite://"


class TestSQLiteFile(StoreContract):
    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path / 'difftune.db'}"
