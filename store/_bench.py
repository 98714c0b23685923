"""Benchmark of the store's front query: a study of ``n`` complete trials on a SQLite file.

python -c "from difftune.store._bench import bench_store_front; bench_store_front()"
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Table, func, select
from sqlalchemy.orm import Session

from difftune.store._models import Base, TrialMetricModel, TrialModel
from difftune.store._storage import Store

__all__ = ["FrontBench", "bench_store_front", "fill_study"]


@dataclass(frozen=True)
class FrontBench:
    """Timings of one run (seconds) and the front it found."""

    n_trials: int
    fill_s: float
    front_s: float
    front_size: int


def _insert_many(session: Session, table: Table, rows: list[dict[str, Any]]) -> None:
    """``executemany`` on the DBAPI cursor, binding each column through its SQLAlchemy type once per row."""
    connection = session.connection()
    dialect = connection.dialect
    keys = list(rows[0])
    compiled = table.insert().compile(dialect=dialect, column_keys=keys)
    processors = {key: table.c[key].type.bind_processor(dialect) for key in keys}
    bound = [{k: (p(row[k]) if (p := processors[k]) else row[k]) for k in keys} for row in rows]
    args: list[Any] = (
        [tuple(row[k] for k in compiled.positiontup or ()) for row in bound] if compiled.positional else bound
    )
    cursor = connection.connection.cursor()
    try:
        cursor.executemany(str(compiled), args)
    finally:
        cursor.close()


def fill_study(store: Store, study: int | str, n: int, *, seed: int = 0, batch: int = 20_000) -> None:
    """Add ``n`` complete trials with speedup, psnr and latency_ms (a noisy trade-off) in bulk.

    Goes below the repository API on purpose (bulk inserts, one transaction per batch): adding
    100,000 trials one by one would measure the insert path, not the query.
    """
    rng = np.random.default_rng(seed)
    study_id = store.get_study(study).id
    start = store.count_trials(study_id)
    now = datetime.now(UTC)
    speedup = rng.uniform(1.0, 8.0, n)
    psnr = 45.0 - 3.0 * speedup + rng.normal(0.0, 2.0, n)
    latency = 1000.0 / speedup * rng.uniform(0.95, 1.05, n)
    metrics = (
        ("speedup", speedup, "×", "maximize"),
        ("psnr", psnr, "dB", "maximize"),
        ("latency_ms", latency, "ms", "minimize"),
    )
    with store._session("cannot fill the benchmark study in") as session:
        first_id = (session.scalar(select(func.max(TrialModel.id))) or 0) + 1
    for lo in range(0, n, batch):
        hi = min(n, lo + batch)
        trials = [
            {
                "id": first_id + i,
                "study_id": study_id,
                "number": start + i,
                "state": "complete",
                "params": {"i": i},
                "started_at": now,
                "finished_at": now,
                "heartbeat_at": now,
                "kind": "searched",
            }
            for i in range(lo, hi)
        ]
        values = [
            {
                "trial_id": first_id + i,
                "study_id": study_id,
                "name": name,
                "value": float(column[i]),
                "unit": unit,
                "direction": direction,
                "split": "calibration",
                "rung": 0,
            }
            for i in range(lo, hi)
            for name, column, unit, direction in metrics
        ]
        with store._session("cannot fill the benchmark study in", write=True) as session:
            _insert_many(session, Base.metadata.tables[TrialModel.__tablename__], trials)
            _insert_many(session, Base.metadata.tables[TrialMetricModel.__tablename__], values)


def bench_store_front(n: int = 100_000, *, repeats: int = 3, directory: str | None = None) -> FrontBench:
    """Time ``Store.pareto_front`` over ``n`` stored trials on a SQLite file and print the figures.

    The front query is timed on a freshly opened store (new connection, warm OS cache), best of
    ``repeats``. The database goes to a temporary directory unless ``directory`` is given.
    """
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(directory or tmp) / 'bench_front.db'}"
        store = Store(url)
        model = store.create_model("bench", "embedded", "bench-fingerprint")
        store.create_study("bench", model_id=model.id, space="cache", searcher="random", objectives=["speedup", "psnr"])
        t0 = time.perf_counter()
        fill_study(store, "bench", n)
        fill_s = time.perf_counter() - t0
        store.close()
        timings = []
        front = []
        for _ in range(repeats):
            store = Store(url)
            t0 = time.perf_counter()
            front = store.pareto_front("bench", [("speedup", "maximize"), ("psnr", "maximize")])
            timings.append(time.perf_counter() - t0)
            store.close()
        result = FrontBench(n, fill_s, min(timings), len(front))
        print(
            f"store front: {n:,} trials on SQLite, front of {result.front_size} found in {result.front_s:.3f} s "
            f"(best of {repeats}; filling took {fill_s:.1f} s)"
        )
        return result
