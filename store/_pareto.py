"""Pareto fronts and hypervolumes of stored trials.

Non-dominated sorting and hypervolume come from pymoo's public API, not from code of ours (nor from
Optuna's private modules): ``NonDominatedSorting().do(F, only_non_dominated_front=True)`` (fast
since pymoo 0.6.2: 0.14 s for 100,000 random 3-objective points here) and
``pymoo.indicators.hv.HV``.

The front query reads, per metric, one range of the covering index
``ix_difftune_trial_metrics_front`` (study, split, rung, metric → trial, value) and the ids of the
study's complete trials, and joins them in NumPy: no ORM objects until the few front trials are
turned into records.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from sqlalchemy import FromClause, Select, and_, select
from sqlalchemy.orm import Session

from difftune.errors import StoreError
from difftune.store._models import TrialMetricModel, TrialModel
from difftune.store._records import Direction, MetricSpec, TrialState
from difftune.store._select import Constraint, parse_constraint

__all__ = ["SPEEDUP_NOISE_FLOOR", "front_trial_ids", "hypervolume", "noise_dominated", "non_dominated"]

#: Speedups closer than this share of the faster one are taken as equal (timing noise) even when the
#: measured spread is smaller: three paired repeats on a shared CPU swing by more than 1 %.
SPEEDUP_NOISE_FLOOR = 0.02


def _loss(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Values turned into losses (every column minimised), as pymoo's routines expect."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 2 or values.shape[1] != len(directions):
        raise StoreError(f"expected an (n, {len(directions)}) array of values, got shape {values.shape}")
    signs = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    for d in directions:
        if d not in ("minimize", "maximize"):
            raise StoreError(f"direction must be 'minimize' or 'maximize', got {d!r}")
    return values * signs


def non_dominated(values: Any, directions: Sequence[Direction | str]) -> np.ndarray:
    """A boolean mask of the rows of ``values`` that no other row dominates.

    Row ``a`` dominates ``b`` when it is at least as good in every column and better in one.
    Equal rows do not dominate each other: all copies of a non-dominated point are kept.

    >>> non_dominated([[3.0, 5.0], [2.0, 4.0], [2.0, 6.0]], ["maximize", "minimize"]).tolist()
    [True, True, False]
    """
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    loss = _loss(np.asarray(values, dtype=float), list(directions))
    if np.isnan(loss).any():
        raise StoreError("values contain NaN: drop those points before taking the front")
    mask = np.zeros(len(loss), dtype=bool)
    if len(loss) == 0:
        return mask
    mask[np.asarray(NonDominatedSorting().do(loss, only_non_dominated_front=True), dtype=int)] = True
    return mask


def hypervolume(
    points: Any, reference_point: Sequence[float], directions: Sequence[Direction | str] | None = None
) -> float:
    """The hypervolume ``points`` dominate up to ``reference_point`` (larger is a better front).

    ``directions`` default to minimising every column. Points not better than the reference point
    in every column add nothing and are ignored.

    >>> hypervolume([[1, 3], [2, 2], [3, 1]], [4, 4])
    6.0
    >>> hypervolume([[2.0, 30.0]], [1.0, 20.0], ["maximize", "maximize"])
    10.0
    """
    from pymoo.indicators.hv import HV

    reference = np.asarray(reference_point, dtype=float)
    dims = reference.shape[0]
    directions = list(directions) if directions is not None else ["minimize"] * dims
    if len(directions) != dims:
        raise StoreError(f"{len(directions)} directions for a {dims}-dimensional reference point")
    array = np.asarray(points, dtype=float).reshape(-1, dims)
    loss = _loss(array, directions)
    ref_loss = _loss(reference.reshape(1, dims), directions)[0]
    if np.isnan(loss).any() or np.isnan(ref_loss).any():
        raise StoreError("points or reference point contain NaN")
    inside = np.all(loss < ref_loss, axis=1)  # on the reference point's boundary adds no volume
    if not inside.any():
        return 0.0
    return float(HV(ref_point=ref_loss)(loss[inside]))


def noise_dominated(
    values: Any, directions: Sequence[Direction | str], column: int, noise: Sequence[float]
) -> np.ndarray:
    """A boolean mask of the rows that another row beats once column ``column``'s noise is allowed for.

    Row ``a`` beats ``b`` when it is at least as good as ``b`` in every other column and better in one
    of them, and at most ``max(noise[a], noise[b])`` worse in ``column``: a point whose only advantage is
    a difference in ``column`` smaller than its measurement noise (a broken schedule that times 1 %
    faster than a good one at the same NFE) does not stay on a front for it.

    >>> noise_dominated([[4.24, 4.8], [4.12, 38.6], [5.5, 20.0]], ["maximize", "maximize"], 0, [0.1] * 3).tolist()
    [True, False, False]
    """
    array = _loss(np.asarray(values, dtype=float), list(directions))
    n = len(array)
    out = np.zeros(n, dtype=bool)
    if n < 2:
        return out
    tol = np.asarray(noise, dtype=float).reshape(n)
    others = [k for k in range(array.shape[1]) if k != column]
    if not others:
        return out
    rest = array[:, others]
    # at_least[a, b]: a is no worse than b in every other column; better[a, b]: strictly better in one
    at_least = np.all(rest[:, None, :] <= rest[None, :, :], axis=2)
    better = np.any(rest[:, None, :] < rest[None, :, :], axis=2)
    close = array[:, None, column] <= array[None, :, column] + np.maximum(tol[:, None], tol[None, :])
    beats = at_least & better & close
    np.fill_diagonal(beats, False)
    return np.asarray(beats.any(axis=0), dtype=bool)


def _satisfied(rule: Constraint, values: np.ndarray) -> np.ndarray:
    """:meth:`Constraint.satisfied` over an array."""
    if rule.op == ">=":
        return values >= rule.bound
    if rule.op == "<=":
        return values <= rule.bound
    if rule.op == ">":
        return values > rule.bound
    if rule.op == "<":
        return values < rule.bound
    return np.isclose(values, rule.bound, rtol=1e-9, atol=1e-12)


def _fetch_all(session: Session, statement: Select[Any]) -> list[tuple[Any, ...]]:
    """Run ``statement`` on the session's connection and fetch plain DBAPI tuples.

    SQLAlchemy's Row objects cost more than the query itself at 100,000 rows; the columns read here
    (integer ids, floats) need no result processing.
    """
    connection = session.connection()
    compiled = statement.compile(dialect=connection.dialect)
    params = compiled.construct_params()
    args: Any = tuple(params[k] for k in compiled.positiontup or ()) if compiled.positional else params
    cursor = connection.connection.cursor()
    try:
        cursor.execute(str(compiled), args)
        return list(cursor.fetchall())
    finally:
        cursor.close()


def _check_recorded(session: Session, study_id: int, split: str, names: Sequence[str]) -> None:
    """Raise when a front asks for a metric this study never recorded (the message lists those it has)."""
    recorded = session.scalars(
        select(TrialMetricModel.name)
        .where(TrialMetricModel.study_id == study_id, TrialMetricModel.split == split, TrialMetricModel.rung == 0)
        .distinct()
        .order_by(TrialMetricModel.name)
    ).all()
    missing = [n for n in names if n not in recorded]
    if recorded and missing:
        raise StoreError(
            f"no trial of this study has metric {missing[0]!r} on {split}; recorded: {', '.join(recorded)}"
        )


def _spreads(session: Session, study_id: int, trial_ids: np.ndarray, split: str) -> np.ndarray:
    """Each trial's stored ``speedup_spread`` (NaN where none was measured)."""
    table = TrialMetricModel.__table__
    rows = session.execute(  # a front's few ids: the ORM session's expanding IN is fine here
        select(table.c.trial_id, table.c.value).where(
            table.c.study_id == study_id,
            table.c.split == split,
            table.c.rung == 0,
            table.c.name == "speedup_spread",
            table.c.trial_id.in_([int(i) for i in trial_ids]),
        )
    ).all()
    found = {int(t): float(v) for t, v in rows}
    return np.array([found.get(int(i), np.nan) for i in trial_ids], dtype=float)


def front_trial_ids(
    session: Session,
    study_id: int,
    objectives: Sequence[MetricSpec],
    constraints: Iterable[Constraint | str],
    split: str,
) -> list[int]:
    """Ids of the complete trials on the Pareto front of ``objectives``, best first in the first objective.

    With ``speedup`` among the objectives, a front point whose only advantage over another front point
    is a speedup within the timing noise (its stored ``speedup_spread``, at least
    :data:`SPEEDUP_NOISE_FLOOR` of the speedup) is dropped (:func:`noise_dominated`).
    """
    if not objectives:
        raise StoreError("a front needs at least one objective")
    rules = [parse_constraint(c) for c in constraints]
    names = list(dict.fromkeys([o.name for o in objectives] + [c.metric for c in rules]))

    # One row per complete trial that has every metric at full fidelity (rung 0; a multi-fidelity
    # study's screening values never make a front): the first metric's range of the covering index,
    # joined to the others through the unique (trial, split, rung, name) index.
    metrics = [TrialMetricModel.__table__.alias(f"m{k}") for k in range(len(names))]
    trials = TrialModel.__table__
    first = metrics[0]
    joined: FromClause = first
    for name, table in zip(names[1:], metrics[1:], strict=True):
        joined = joined.join(
            table,
            and_(
                table.c.trial_id == first.c.trial_id,
                table.c.split == split,
                table.c.rung == 0,
                table.c.name == name,
            ),
        )
    joined = joined.join(trials, and_(trials.c.id == first.c.trial_id, trials.c.state == TrialState.COMPLETE.value))
    statement = (
        select(first.c.trial_id, *(table.c.value for table in metrics))
        .select_from(joined)
        .where(first.c.study_id == study_id, first.c.split == split, first.c.rung == 0, first.c.name == names[0])
    )
    rows = _fetch_all(session, statement)
    if not rows:
        _check_recorded(session, study_id, split, names)
        return []
    matrix = np.array(rows, dtype=float).reshape(len(rows), len(names) + 1)
    ids = matrix[:, 0].astype(np.int64)
    columns = {name: matrix[:, k + 1] for k, name in enumerate(names)}

    feasible = np.ones(len(ids), dtype=bool)
    for rule in rules:
        feasible &= _satisfied(rule, columns[rule.metric])
    ids = ids[feasible]
    values = np.column_stack([columns[o.name][feasible] for o in objectives])
    if len(ids) == 0:
        return []

    directions = [o.direction for o in objectives]
    on_front = non_dominated(values, directions)
    front_ids, front_values = ids[on_front], values[on_front]
    names_in_order = [o.name for o in objectives]
    if "speedup" in names_in_order and len(front_ids) > 1:
        column = names_in_order.index("speedup")
        spread = _spreads(session, study_id, front_ids, split)
        speed = front_values[:, column]
        noise = np.maximum(np.nan_to_num(spread, nan=0.0), SPEEDUP_NOISE_FLOOR * np.abs(speed))
        keep = ~noise_dominated(front_values, directions, column, noise)
        front_ids, front_values = front_ids[keep], front_values[keep]
    loss = _loss(front_values, directions)
    # Best first in the first objective, then the next ones, then the oldest trial.
    order = np.lexsort((front_ids, *[loss[:, k] for k in reversed(range(loss.shape[1]))]))
    return [int(i) for i in front_ids[order]]
