"""Fixtures of the store tests. ``postgres_url`` (a fresh PostgreSQL database per test) lives in tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import POSTGRES_ENV, REQUIRE_POSTGRES_ENV

__all__ = ["POSTGRES_ENV", "REQUIRE_POSTGRES_ENV"]


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a SQLite file, or a fresh PostgreSQL database (see tests/conftest.py)."""
    if request.param == "postgresql":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return f"sqlite:///{tmp_path / 'store.db'}"
