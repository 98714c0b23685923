"""Bad URLs and broken databases give one-line StoreErrors naming the URL (password masked) and leave files alone."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from difftune.errors import DifftuneError, StoreError
from difftune.store import Store, TrialState, current_revision, database_exists, get_store, mask_url, upgrade
from difftune.store import _storage as storage_module
from tests.store._helpers import complete, make_study


def _one_line_error(url: str) -> str:
    with pytest.raises(StoreError) as info:
        Store(url)
    message = str(info.value)
    assert "\n" not in message
    assert isinstance(info.value, DifftuneError)
    return message


@pytest.mark.parametrize("url", ["not a url", "sqlite:/x.db:::", "://nothing"])
def test_malformed_url(url: str) -> None:
    message = _one_line_error(url)
    assert url in message
    assert "sqlite:///difftune.db" in message  # an example of what to write
    assert "DIFFTUNE_STORAGE" in message


def test_unknown_dialect() -> None:
    message = _one_line_error("nosuchdb://host/db")
    assert "unknown database dialect" in message and "nosuchdb://host/db" in message


def test_unreachable_server_masks_the_password() -> None:
    # Port 1 on localhost: refused at once (or the driver is missing, which says what to install).
    message = _one_line_error("postgresql+psycopg://tuner:s3cret-pw@127.0.0.1:1/difftune")
    assert "s3cret-pw" not in message
    assert "postgresql+psycopg://tuner:***@127.0.0.1:1/difftune" in message
    assert "pip install 'psycopg[binary]'" in message or "no database server answers" in message


def test_short_password_masks_whole_words_only() -> None:
    from sqlalchemy.exc import OperationalError

    from difftune.store._engine import store_error

    exc = OperationalError("connect", {}, Exception('FATAL:  role "nobody" does not exist'))
    message = str(store_error(exc, "postgresql+psycopg://nobody:x@127.0.0.1:5432/db", "cannot open storage"))
    assert 'role "nobody" does not exist' in message  # not "e***ist"
    assert "postgresql+psycopg://nobody:***@127.0.0.1:5432/db" in message
    assert "no such user" in message


def test_postgresql_wrong_password_and_missing_database(postgres_url: str) -> None:
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url)
    wrong = url.set(password="wrong-s3cret").render_as_string(hide_password=False)
    try:
        Store(wrong).close()  # a server that trusts local connections accepts any password
    except StoreError as exc:
        message = str(exc)
        assert "wrong-s3cret" not in message and ":***@" in message and "\n" not in message
        assert "refused the user or password" in message
    missing = url.set(database=f"{url.database}_missing").render_as_string(hide_password=False)
    message = _one_line_error(missing)
    assert f"has no database '{url.database}_missing'" in message and f"createdb {url.database}_missing" in message


def test_missing_directory(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'x.db'}"
    message = _one_line_error(url)
    assert url in message and "directory exists" in message
    assert not (tmp_path / "no").exists()


def test_database_exists_without_creating_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "later.db"
    assert not database_exists(f"sqlite:///{path}") and not path.exists()
    monkeypatch.setenv("DIFFTUNE_STORAGE", f"sqlite:///{path}")
    assert not database_exists()
    path.write_bytes(b"")
    assert database_exists(f"sqlite:///{path}") and database_exists()
    for url in ("sqlite://", "sqlite:///:memory:", "postgresql+psycopg://u:p@nowhere/db", "not a url"):
        assert database_exists(url), url


def test_mask_url() -> None:
    assert mask_url("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"
    assert mask_url("garbage://u:pw@") == "garbage://u:***@"
    assert mask_url("sqlite:///difftune.db") == "sqlite:///difftune.db"


def test_default_url_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("DIFFTUNE_STORAGE", url)
    with get_store() as store:
        assert store.url == url
    monkeypatch.delenv("DIFFTUNE_STORAGE")
    monkeypatch.chdir(tmp_path)
    with get_store(None) as store:
        assert store.url == "sqlite:///difftune.db"
        assert get_store(store) is store
    assert (tmp_path / "difftune.db").is_file()


def test_not_a_database_file_is_left_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are my notes, not a database\n" * 100)
    before = path.read_bytes()
    message = _one_line_error(f"sqlite:///{path}")
    assert "not a difftune SQLite database" in message
    assert path.read_bytes() == before


def _populated(path: Path) -> tuple[str, int, int]:
    url = f"sqlite:///{path}"
    with Store(url) as store:
        study = make_study(store)
        done = complete(store, study.id, {"speedup": 2.0, "psnr": 30.0})
        running = store.add_trial(study.id, {"x": 1})
    assert not Path(f"{path}-wal").exists()  # closing folded the WAL back into the file
    return url, done.id, running.id


def test_failed_operations_leave_the_file_byte_for_byte_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "difftune.db"
    url, done_id, running_id = _populated(path)
    before = path.read_bytes()

    with Store(url) as store:
        with pytest.raises(StoreError):
            make_study(store)  # the name is taken
        with pytest.raises(StoreError):
            store.set_trial_state(done_id, "failed", error="late")  # finished trials do not change
        with pytest.raises(StoreError):
            store.set_trial_state(running_id, "complete", metrics={"speedup": 3.0, "psnr": float("nan")})

        # An error after the rows were written (flushed) in the transaction: everything rolls back.
        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("crash after the flush")

        monkeypatch.setattr(storage_module, "_trial_record", broken)
        with pytest.raises(RuntimeError, match="crash after the flush"):
            store.set_trial_state(running_id, "complete", metrics={"speedup": 3.0, "psnr": 29.0})
        monkeypatch.undo()
        assert store.get_trial(running_id).state is TrialState.RUNNING
        assert store.get_trial(running_id).metrics == ()

    assert path.read_bytes() == before


def test_newer_schema_is_refused_and_left_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    url, _, _ = _populated(path)
    connection = sqlite3.connect(path)
    connection.execute("UPDATE difftune_alembic_version SET version_num = 'v9.0.0.a'")
    connection.commit()
    connection.close()
    before = path.read_bytes()
    message = _one_line_error(url)
    assert "v9.0.0.a, newer than this difftune understands" in message and "upgrade difftune" in message
    with pytest.raises(StoreError, match="newer"):
        upgrade(url)
    assert current_revision(url) == "v9.0.0.a"
    assert path.read_bytes() == before


def test_tables_without_version_are_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'stray.db'}"
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE difftune_models (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    assert "not created by difftune's migrations" in _one_line_error(url)


def test_sqlite_file_uses_wal_and_a_busy_timeout(tmp_path: Path) -> None:
    with Store(f"sqlite:///{tmp_path / 'wal.db'}", busy_timeout=12.5) as store:
        with store._engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 12500
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_locked_database_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    url, _, running_id = _populated(path)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    try:
        with Store(url, busy_timeout=0.2) as store:
            with pytest.raises(StoreError, match=r"locked.*busy timeout.*PostgreSQL") as info:
                store.heartbeat(running_id)
            assert url in str(info.value)
            assert store.get_trial(running_id).state is TrialState.RUNNING  # readers are not blocked
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
