"""Fixtures of the store tests. ``postgres_url`` (a fresh PostgreSQL database per test) lives in tests/conftest.py."""

from __future__ import annotations

from tests.conftest import POSTGRES_ENV, REQUIRE_POSTGRES_ENV

__all__ = ["POSTGRES_ENV", "REQUIRE_POSTGRES_ENV"]
