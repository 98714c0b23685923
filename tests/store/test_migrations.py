"""Alembic migrations: they build exactly the models' schema, beside Optuna's tables, without alembic.ini.

Every test taking ``db`` runs on SQLite and on PostgreSQL (when $DIFFTUNE_TEST_POSTGRES_URL is set).
"""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, inspect, text

from difftune.store import VERSION_TABLE, Store, current_revision, head_revision, upgrade
from difftune.store._migrate import MIGRATIONS_DIR, TABLE_PREFIX, known_revisions
from difftune.store._models import Base

ROOT = Path(__file__).resolve().parents[2]


def _engine(url: str) -> Engine:
    return create_engine(url)


def _broad_type(type_: Any) -> str:
    """A column type's family: reflection returns VARCHAR for String, DATETIME for our UTC type, …"""
    python_type = getattr(type_, "impl", type_).python_type
    return {dict: "json", list: "json"}.get(python_type, python_type.__name__)


def _reflected_schema(url: str) -> dict[str, Any]:
    engine = _engine(url)
    try:
        inspector = inspect(engine)
        schema = {}
        for table in inspector.get_table_names():
            if not table.startswith(TABLE_PREFIX) or table == VERSION_TABLE:
                continue
            schema[table] = {
                "columns": {c["name"]: (_broad_type(c["type"]), c["nullable"]) for c in inspector.get_columns(table)},
                # PostgreSQL also lists the index behind each unique constraint; those are in "unique".
                "indexes": {
                    (i["name"], tuple(i["column_names"]), bool(i["unique"]))
                    for i in inspector.get_indexes(table)
                    if not i.get("duplicates_constraint")
                },
                "unique": {tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)},
                "foreign_keys": {
                    (tuple(f["constrained_columns"]), f["referred_table"]) for f in inspector.get_foreign_keys(table)
                },
            }
        return schema
    finally:
        engine.dispose()


def _model_schema() -> dict[str, Any]:
    schema = {}
    for table in Base.metadata.sorted_tables:
        uniques = {
            tuple(c.name for c in con.columns)
            for con in table.constraints
            if con.__class__.__name__ == "UniqueConstraint"
        }
        schema[table.name] = {
            "columns": {c.name: (_broad_type(c.type), c.nullable) for c in table.columns},
            "indexes": {(i.name, tuple(c.name for c in i.columns), bool(i.unique)) for i in table.indexes},
            "unique": uniques,
            "foreign_keys": {((fk.parent.name,), fk.column.table.name) for fk in table.foreign_keys},
        }
    return schema


def test_upgrade_builds_exactly_the_models_schema(db: str) -> None:
    assert current_revision(db) is None
    assert upgrade(db) == head_revision() == "v0.7.0.a"
    assert current_revision(db) == "v0.7.0.a"
    assert _reflected_schema(db) == _model_schema()
    engine = _engine(db)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection,
                opts={
                    "compare_type": True,
                    "version_table": VERSION_TABLE,
                    "include_name": lambda name, kind, _: kind != "table" or name.startswith(TABLE_PREFIX),
                },
            )
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_every_table_is_prefixed_and_the_version_table_is_ours() -> None:
    assert all(name.startswith(TABLE_PREFIX) for name in Base.metadata.tables)
    assert VERSION_TABLE == "difftune_alembic_version"


def test_revisions_are_named_after_releases() -> None:
    revisions = known_revisions()
    assert revisions[0] == "v0.1.0.a"
    for revision in revisions:
        assert (MIGRATIONS_DIR / "versions" / f"{revision}.py").is_file()
        assert revision.startswith("v") and revision.count(".") == 3


@pytest.mark.parametrize("revision", known_revisions())
def test_data_survives_upgrading_from_every_revision(db: str, revision: str) -> None:
    upgrade(db, revision)
    engine = _engine(db)
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO difftune_models (name, family, fingerprint, created_at) "
                    "VALUES ('old', 'embedded', 'fp-old', '2025-01-01 00:00:00.000000')"
                )
            )
    finally:
        engine.dispose()
    assert upgrade(db) == head_revision()
    with Store(db) as store:
        [model] = store.list_models()
        assert (model.name, model.fingerprint) == ("old", "fp-old")


def test_downgrade_to_base_and_back(db: str) -> None:
    upgrade(db)
    from alembic import command

    from difftune.store._migrate import _config

    engine = _engine(db)
    try:
        with engine.begin() as connection:
            command.downgrade(_config(connection), "base")
        assert [t for t in inspect(engine).get_table_names() if t != VERSION_TABLE] == []
    finally:
        engine.dispose()
    assert upgrade(db) == head_revision()


def test_store_creates_the_schema_on_first_open(db: str) -> None:
    with Store(db):
        pass
    assert current_revision(db) == head_revision()
    assert _reflected_schema(db) == _model_schema()


def _optuna_storage(url: str) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.storages.RDBStorage(url)


def _optuna_revision(url: str) -> str | None:
    engine = _engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()  # Optuna's alembic_version
    finally:
        engine.dispose()


@pytest.mark.parametrize("optuna_first", [True, False], ids=["optuna-first", "difftune-first"])
def test_optuna_tables_live_beside_ours_untouched(db: str, optuna_first: bool) -> None:
    import optuna

    if optuna_first:
        _optuna_storage(db)
        optuna_revision = _optuna_revision(db)
    with Store(db) as store:
        model = store.create_model("m", "embedded", "fp")
        store.create_study("s", model_id=model.id, space="cache", searcher="tpe", objectives=["psnr"])
    if not optuna_first:
        assert _optuna_revision(db) is None
        _optuna_storage(db)
        optuna_revision = _optuna_revision(db)
    assert optuna_revision is not None and not optuna_revision.startswith("v0.1.0")
    study = optuna.create_study(study_name="s", storage=_optuna_storage(db), directions=["maximize"])
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, values=[1.0]))
    with Store(db) as store:
        assert store.get_study("s").space == "cache"
    tables = set(inspect(_engine(db)).get_table_names())
    assert {"studies", "trials", "alembic_version", VERSION_TABLE, "difftune_studies"} <= tables
    assert _optuna_revision(db) == optuna_revision
    assert current_revision(db) == head_revision()


def test_migrations_are_package_data() -> None:
    """pyproject lists packages explicitly; the migration scripts (no __init__.py) must ship as package data."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = config.get("package-data", {}).get("difftune.store", [])
    store_dir = ROOT / "store"
    files = [
        p.relative_to(store_dir).as_posix()
        for p in MIGRATIONS_DIR.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    ]
    assert files
    missing = [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in patterns)]
    assert not missing, (
        f"add to pyproject [tool.setuptools.package-data]: "
        f'"difftune.store" = ["migrations/*.py", "migrations/*.mako", "migrations/versions/*.py"] (missing {missing})'
    )
