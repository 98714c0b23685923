"""Fixtures of the dashboard's tests: a seeded database, and the app opened on a database with Streamlit's AppTest."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from difftune.dashboard import APP_FILE
from tests.dashboard._seed import seed


@pytest.fixture(scope="session")
def seeded_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seeded database file (read-only for the tests: copy it to change it)."""
    path = tmp_path_factory.mktemp("dashboard") / "seeded.db"
    seed(f"sqlite:///{path}")
    return path


@pytest.fixture
def seeded_url(seeded_db: Path, tmp_path: Path) -> str:
    """A fresh copy of the seeded database, for a test that may write to it."""
    copy = tmp_path / "seeded.db"
    shutil.copy(seeded_db, copy)
    return f"sqlite:///{copy}"


@pytest.fixture
def open_app(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Any]]:
    """``open_app(url, **query)``: the dashboard run once by AppTest on the database at ``url``, with those URL
    query parameters (``study=…``, ``page=…``, ``trial=…``), as ``difftune dashboard --storage url`` serves it."""
    from streamlit.testing.v1 import AppTest

    def run(url: str, **query: Any) -> Any:
        monkeypatch.setenv("DIFFTUNE_STORAGE", url)  # what `difftune dashboard --storage` sets for the app
        app = AppTest.from_file(str(APP_FILE), default_timeout=120)
        for key, value in query.items():
            app.query_params[key] = str(value)
        app.run()
        assert not app.exception, [e.value for e in app.exception]
        return app

    yield run
