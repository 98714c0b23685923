"""The repository: :class:`Store` turns ids and names into frozen records and back.

Every method runs in one transaction (:meth:`Store._session`) that commits or rolls back, and turns
SQLAlchemy's errors into a one-line :class:`~difftune.StoreError` naming the URL (password masked)
and what to do. Methods take ids or names and return the records of :mod:`difftune.store._records`,
never ORM rows.

>>> store = Store("sqlite://")
>>> model = store.create_model("embedded", "embedded", "sha256:0123")
>>> study = store.create_study("demo", model_id=model.id, space="cache", searcher="nsga2",
...                            objectives=["speedup", "psnr"])
>>> trial = store.add_trial(study.id, {"threshold": 0.1})
>>> trial = store.set_trial_state(trial.id, "complete", metrics={"speedup": 2.0, "psnr": 31.5})
>>> [t.number for t in store.pareto_front("demo")]
[0]
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Row, delete, func, insert, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from difftune.errors import StoreError
from difftune.store._claims import ClaimsMixin
from difftune.store._engine import WRITE_OPTION, default_url, make_engine, mask_url, store_error
from difftune.store._migrate import ensure_schema
from difftune.store._models import (
    FrontModel,
    ImageModel,
    ModelModel,
    ProfileModel,
    ReferenceImageModel,
    StudyModel,
    TrialMetricModel,
    TrialModel,
)
from difftune.store._records import (
    CALIBRATION,
    FULL_RUNG,
    FrontRecord,
    ImageRecord,
    MetricRecord,
    MetricSpec,
    ModelRecord,
    ProfileRecord,
    ReferenceImageRecord,
    StudyRecord,
    StudyStatus,
    TrialRecord,
    TrialState,
)

__all__ = ["Store", "database_exists", "get_store"]

StudyRef = int | str
ObjectiveLike = MetricSpec | str | tuple[str, str]
MetricsLike = Mapping[str, float | MetricRecord] | Iterable[MetricRecord]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# SQLite's default limit of bound parameters is 32766 (999 before 3.32): stay well under it.
_CHUNK = 500
# Attempts of an insert that lost a race on a unique key (PostgreSQL; SQLite writers are serialised).
_RETRIES = 20
# Below this many trials, list_trials fetches metrics by trial id rather than the whole study's.
_FEW_TRIALS = 2_000


class _Conflict(StoreError):
    """An insert hit a unique constraint: another writer got there first (callers may retry)."""


def _now() -> datetime:
    return datetime.now(UTC)


def _json(value: Any, where: str) -> Any:
    """A deep copy of ``value`` through JSON: proves it is storable and detaches it from the caller."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise StoreError(
            f"{where}: not storable as JSON ({exc}); pass plain numbers, strings, lists and dicts"
        ) from None


def _chunks(ids: Sequence[int]) -> Iterator[Sequence[int]]:
    for start in range(0, len(ids), _CHUNK):
        yield ids[start : start + _CHUNK]


def _model_record(row: ModelModel) -> ModelRecord:
    return ModelRecord(row.id, row.name, row.family, row.fingerprint, row.created_at)


def _study_record(row: StudyModel) -> StudyRecord:
    return StudyRecord(
        id=row.id,
        name=row.name,
        model_id=row.model_id,
        space=row.space,
        searcher=row.searcher,
        objectives=tuple(MetricSpec.from_dict(o) for o in row.objectives),
        reference=row.reference,
        optuna_study_name=row.optuna_study_name,
        created_at=row.created_at,
        status=StudyStatus(row.status),
        budget=row.budget,
    )


def _trial_record(row: Any, metrics: Sequence[MetricRecord] = ()) -> TrialRecord:
    return TrialRecord(
        id=row.id,
        study_id=row.study_id,
        number=row.number,
        state=TrialState(row.state),
        params=row.params,
        config=row.config,
        error=row.error,
        started_at=row.started_at,
        finished_at=row.finished_at,
        worker_id=row.worker_id,
        heartbeat_at=row.heartbeat_at,
        metrics=tuple(metrics),
        kind=row.kind or "searched",
        memo_key=row.memo_key,
    )


def _check_kind(kind: str) -> None:
    from difftune.store._records import TRIAL_KINDS

    if kind not in TRIAL_KINDS:
        raise StoreError(f"trial kind {kind!r}: expected one of {', '.join(TRIAL_KINDS)}")


def _metric_record(row: Any) -> MetricRecord:
    return MetricRecord(row.name, row.value, row.unit, row.direction, row.split, row.rung)  # type: ignore[arg-type]


def _front_record(row: FrontModel) -> FrontRecord:
    return FrontRecord(
        row.id,
        row.study_id,
        row.computed_at,
        tuple(int(i) for i in row.trial_ids),
        tuple(MetricSpec.from_dict(o) for o in row.objectives),
    )


def _profile_record(row: ProfileModel) -> ProfileRecord:
    return ProfileRecord(row.id, row.study_id, row.trial_id, row.text, row.path, row.created_at)


_TRIAL_COLUMNS = tuple(TrialModel.__table__.c)
_METRIC_COLUMNS = (
    TrialMetricModel.trial_id,
    TrialMetricModel.name,
    TrialMetricModel.value,
    TrialMetricModel.unit,
    TrialMetricModel.direction,
    TrialMetricModel.split,
    TrialMetricModel.rung,
)


class Store(ClaimsMixin):
    """difftune's database: models, studies, trials with their metrics, fronts, profiles, images.

    Args:
        url: a SQLAlchemy URL; default ``$DIFFTUNE_STORAGE`` or ``sqlite:///difftune.db``. Optuna's
            RDB storage may share the database (its tables are not prefixed ``difftune_``).
        busy_timeout: seconds a SQLite writer waits for another process's write lock.
        upgrade: create the schema in an empty database and upgrade an older one on open; with
            ``False`` an older schema raises :class:`StoreError` instead.
        engine_kwargs: passed to :func:`sqlalchemy.create_engine`.

    Raises:
        StoreError: the URL is malformed, the database is unreachable or not difftune's, or its
            schema is newer than this difftune.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        busy_timeout: float = 30.0,
        upgrade: bool = True,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self._url = url or default_url()
        self._options: dict[str, Any] = {
            "busy_timeout": busy_timeout,
            "upgrade": upgrade,
            "engine_kwargs": engine_kwargs,
        }
        self._engine: Engine = make_engine(self._url, busy_timeout=busy_timeout, engine_kwargs=engine_kwargs)
        try:
            ensure_schema(self._engine, self._url, upgrade=upgrade)
        except SQLAlchemyError as exc:
            self._engine.dispose()
            raise store_error(exc, self._url, "cannot open storage") from exc
        except BaseException:
            self._engine.dispose()
            raise
        self._read = sessionmaker(bind=self._engine, expire_on_commit=False)
        self._write = sessionmaker(bind=self._engine.execution_options(**{WRITE_OPTION: True}), expire_on_commit=False)

    # Pickling sends the URL, not the connections (a worker process opens its own).
    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen, (self._url, self._options))

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    @property
    def url(self) -> str:
        """The database URL, password masked."""
        return mask_url(self._url)

    def close(self) -> None:
        """Close every pooled connection (SQLite then folds its WAL file back into the database)."""
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def _session(self, action: str, *, write: bool = False) -> Iterator[Session]:
        """One transaction: commit on success, roll back on any error, SQLAlchemy errors as StoreError."""
        session = self._write() if write else self._read()
        try:
            yield session
            session.commit()
        except BaseException as exc:
            try:
                session.rollback()
            except SQLAlchemyError:
                pass  # the connection is gone; the original error says why
            if isinstance(exc, IntegrityError):
                raise _Conflict(str(store_error(exc, self._url, action))) from exc
            if isinstance(exc, SQLAlchemyError):
                raise store_error(exc, self._url, action) from exc
            raise
        finally:
            session.close()

    def _retry_conflicts(self, attempt: int) -> None:
        if attempt + 1 >= _RETRIES:
            raise StoreError(f"gave up after {_RETRIES} conflicting writes to {self.url}; retry later")
        time.sleep(random.uniform(0.0, 0.005 * (attempt + 1)))

    # -- lookups shared by the methods -------------------------------------------------------------

    def _study_row(self, session: Session, study: StudyRef) -> StudyModel:
        if isinstance(study, bool) or not isinstance(study, (int, str)):
            raise StoreError(f"study: expected an id or a name, got {study!r}")
        if isinstance(study, int):
            row = session.get(StudyModel, study)
        else:
            row = session.scalars(select(StudyModel).where(StudyModel.name == study)).one_or_none()
        if row is None:
            names = session.scalars(select(StudyModel.name).order_by(StudyModel.name).limit(20)).all()
            known = ", ".join(names) if names else "none yet (run difftune calibrate)"
            raise StoreError(f"no study {study!r} in {self.url}; known studies: {known}")
        return row

    def _trial_row(self, session: Session, trial_id: int) -> TrialModel:
        row = session.get(TrialModel, trial_id)
        if row is None:
            raise StoreError(f"no trial with id {trial_id} in {self.url}; list a study's trials with list_trials()")
        return row

    def _metrics_of(self, session: Session, trial_ids: Sequence[int]) -> dict[int, list[MetricRecord]]:
        out: dict[int, list[MetricRecord]] = {i: [] for i in trial_ids}
        for chunk in _chunks(trial_ids):
            rows = session.execute(
                select(*_METRIC_COLUMNS)
                .where(TrialMetricModel.trial_id.in_(chunk))
                .order_by(
                    TrialMetricModel.trial_id, TrialMetricModel.split, TrialMetricModel.rung, TrialMetricModel.name
                )
            )
            for row in rows:
                out[row.trial_id].append(_metric_record(row))
        return out

    def _trials_by_id(self, session: Session, trial_ids: Sequence[int]) -> list[TrialRecord]:
        """Records of ``trial_ids`` (with metrics) in the given order; unknown ids are skipped."""
        rows: dict[int, Row[Any]] = {}
        for chunk in _chunks(trial_ids):
            for row in session.execute(select(*_TRIAL_COLUMNS).where(TrialModel.id.in_(chunk))):
                rows[row.id] = row
        metrics = self._metrics_of(session, [i for i in trial_ids if i in rows])
        return [_trial_record(rows[i], metrics[i]) for i in trial_ids if i in rows]

    # -- models ------------------------------------------------------------------------------------

    def create_model(self, name: str, family: str, fingerprint: str) -> ModelRecord:
        """The model with ``fingerprint``, created if new (same weights = same model, whatever the name)."""
        for attempt in range(_RETRIES):
            try:
                with self._session(f"cannot add model {name!r} to", write=True) as session:
                    row = session.scalars(select(ModelModel).where(ModelModel.fingerprint == fingerprint)).one_or_none()
                    if row is None:
                        row = ModelModel(name=name, family=family, fingerprint=fingerprint, created_at=_now())
                        session.add(row)
                        session.flush()
                    return _model_record(row)
            except _Conflict:
                self._retry_conflicts(attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def get_model(self, model_id: int) -> ModelRecord:
        """The model with id ``model_id``."""
        with self._session("cannot read a model from") as session:
            row = session.get(ModelModel, model_id)
            if row is None:
                raise StoreError(f"no model with id {model_id} in {self.url}; list them with list_models()")
            return _model_record(row)

    def find_model(self, fingerprint: str) -> ModelRecord | None:
        """The model with these weights, or ``None``."""
        with self._session("cannot read a model from") as session:
            row = session.scalars(select(ModelModel).where(ModelModel.fingerprint == fingerprint)).one_or_none()
            return None if row is None else _model_record(row)

    def list_models(self) -> list[ModelRecord]:
        """Every model, oldest first."""
        with self._session("cannot list models in") as session:
            return [_model_record(r) for r in session.scalars(select(ModelModel).order_by(ModelModel.id))]

    # -- studies -----------------------------------------------------------------------------------

    def create_study(
        self,
        name: str,
        *,
        model_id: int,
        space: str,
        searcher: str,
        objectives: Sequence[ObjectiveLike],
        reference: Mapping[str, Any] | None = None,
        optuna_study_name: str | None = None,
        load_if_exists: bool = False,
    ) -> StudyRecord:
        """A new study, or with ``load_if_exists`` the existing one of that name (resuming it).

        ``objectives`` are known metric names, ``(name, direction)`` pairs or :class:`MetricSpec`.
        Resuming checks that the model, space and objectives are the ones stored; the searcher may
        differ (a resumed study may switch searchers).

        Raises:
            StoreError: the name is taken (without ``load_if_exists``), or the stored study differs.
        """
        specs = tuple(MetricSpec.parse(o) for o in objectives)
        if not specs:
            raise StoreError(f"study {name!r}: give at least one objective, e.g. ['speedup', 'psnr']")
        if len({s.name for s in specs}) != len(specs):
            raise StoreError(f"study {name!r}: objective named twice in {[s.name for s in specs]}")
        reference_json = None if reference is None else _json(dict(reference), f"study {name!r} reference")
        for attempt in range(_RETRIES):
            try:
                with self._session(f"cannot create study {name!r} in", write=True) as session:
                    row = session.scalars(select(StudyModel).where(StudyModel.name == name)).one_or_none()
                    if row is not None:
                        if not load_if_exists:
                            raise StoreError(
                                f"study {name!r} already exists in {self.url}: resume it (load_if_exists=True) "
                                "or choose another --study name"
                            )
                        existing = _study_record(row)
                        self._check_resume(existing, model_id, space, specs)
                        return existing
                    if session.get(ModelModel, model_id) is None:
                        raise StoreError(f"study {name!r}: no model with id {model_id}; create_model() first")
                    row = StudyModel(
                        name=name,
                        model_id=model_id,
                        space=space,
                        searcher=searcher,
                        objectives=[s.to_dict() for s in specs],
                        reference=reference_json,
                        optuna_study_name=optuna_study_name,
                        created_at=_now(),
                        status=StudyStatus.RUNNING.value,
                    )
                    session.add(row)
                    session.flush()
                    return _study_record(row)
            except _Conflict:
                self._retry_conflicts(attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _check_resume(study: StudyRecord, model_id: int, space: str, specs: tuple[MetricSpec, ...]) -> None:
        differences = []
        if study.model_id != model_id:
            differences.append(f"model id {study.model_id} (asked {model_id})")
        if study.space != space:
            differences.append(f"space {study.space!r} (asked {space!r})")
        stored = [(o.name, o.direction) for o in study.objectives]
        asked = [(o.name, o.direction) for o in specs]
        if stored != asked:
            differences.append(f"objectives {stored} (asked {asked})")
        if differences:
            raise StoreError(
                f"cannot resume study {study.name!r}: it was created with {'; '.join(differences)}; "
                "choose another --study name"
            )

    def get_study(self, study: StudyRef) -> StudyRecord:
        """The study with this id or name; an unknown one raises :class:`StoreError` listing known names."""
        with self._session("cannot read a study from") as session:
            return _study_record(self._study_row(session, study))

    def list_studies(self) -> list[StudyRecord]:
        """Every study, oldest first."""
        with self._session("cannot list studies in") as session:
            return [_study_record(r) for r in session.scalars(select(StudyModel).order_by(StudyModel.id))]

    def set_study_status(self, study: StudyRef, status: StudyStatus | str) -> StudyRecord:
        """Mark a study running, finished or stopped."""
        value = StudyStatus.parse(status)
        with self._session("cannot update a study in", write=True) as session:
            row = self._study_row(session, study)
            row.status = value.value
            session.flush()
            return _study_record(row)

    # -- trials ------------------------------------------------------------------------------------

    def add_trial(
        self,
        study: StudyRef,
        params: Mapping[str, Any],
        *,
        number: int | None = None,
        config: Mapping[str, Any] | None = None,
        worker_id: str | None = None,
        kind: str = "searched",
    ) -> TrialRecord:
        """A new running trial of ``study`` (``kind``: one of :data:`~difftune.store.TRIAL_KINDS`).

        Without ``number`` the next free number is taken (concurrent writers each get their own).
        With ``number`` (e.g. Optuna's trial number) the insert is retry-safe: when that number is
        already stored with the same params and config, the stored trial is returned.

        Raises:
            StoreError: ``number`` is taken by a different trial.
        """
        params_json = _json(dict(params), "trial params")
        config_json = None if config is None else _json(dict(config), "trial config")
        _check_kind(kind)
        if number is not None and (isinstance(number, bool) or not isinstance(number, int) or number < 0):
            raise StoreError(f"trial number must be a non-negative integer, got {number!r}")
        for attempt in range(_RETRIES):
            try:
                with self._session("cannot add a trial to", write=True) as session:
                    study_id = self._study_row(session, study).id
                    if number is not None:
                        existing = session.scalars(
                            select(TrialModel).where(TrialModel.study_id == study_id, TrialModel.number == number)
                        ).one_or_none()
                        if existing is not None:
                            return self._same_trial(session, existing, params_json, config_json)
                        chosen = number
                    else:
                        last = session.scalar(
                            select(func.max(TrialModel.number)).where(TrialModel.study_id == study_id)
                        )
                        chosen = 0 if last is None else last + 1
                    now = _now()
                    row = TrialModel(
                        study_id=study_id,
                        number=chosen,
                        state=TrialState.RUNNING.value,
                        params=params_json,
                        config=config_json,
                        started_at=now,
                        worker_id=worker_id,
                        heartbeat_at=now,
                        kind=kind,
                    )
                    session.add(row)
                    session.flush()
                    return _trial_record(row)
            except _Conflict:
                # Another writer took the number between our read and insert: read again.
                self._retry_conflicts(attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _same_trial(self, session: Session, row: TrialModel, params: Any, config: Any) -> TrialRecord:
        if row.params != params or row.config != config:
            raise StoreError(
                f"trial number {row.number} of study id {row.study_id} already exists with other params; "
                "add the trial without a number to get the next free one"
            )
        return _trial_record(row, self._metrics_of(session, [row.id])[row.id])

    def get_trial(self, trial_id: int) -> TrialRecord:
        """The trial with id ``trial_id``, with its metrics."""
        with self._session("cannot read a trial from") as session:
            row = self._trial_row(session, trial_id)
            return _trial_record(row, self._metrics_of(session, [row.id])[row.id])

    def get_trial_by_number(self, study: StudyRef, number: int) -> TrialRecord:
        """Trial ``number`` of ``study``, with its metrics."""
        with self._session("cannot read a trial from") as session:
            study_id = self._study_row(session, study).id
            row = session.scalars(
                select(TrialModel).where(TrialModel.study_id == study_id, TrialModel.number == number)
            ).one_or_none()
            if row is None:
                raise StoreError(f"study {study!r} has no trial number {number}; list them with list_trials()")
            return _trial_record(row, self._metrics_of(session, [row.id])[row.id])

    def _write_metrics(
        self, session: Session, row: TrialModel, metrics: Sequence[MetricRecord], *, replace: bool
    ) -> None:
        if not metrics:
            return
        stored = {
            (m.name, m.split, m.rung): m
            for m in session.scalars(select(TrialMetricModel).where(TrialMetricModel.trial_id == row.id))
        }
        new = []
        for metric in metrics:
            old = stored.get((metric.name, metric.split, metric.rung))
            if old is None:
                new.append(
                    {
                        "trial_id": row.id,
                        "study_id": row.study_id,
                        "name": metric.name,
                        "value": float(metric.value),
                        "unit": metric.unit,
                        "direction": metric.direction,
                        "split": metric.split,
                        "rung": metric.rung,
                    }
                )
            elif (old.value, old.unit, old.direction) != (metric.value, metric.unit, metric.direction):
                if not replace:
                    raise StoreError(
                        f"trial {row.number} of study id {row.study_id} already has {metric.name} ({metric.split}) = "
                        f"{old.value} {old.unit}; pass replace=True to overwrite it"
                    )
                old.value, old.unit, old.direction = float(metric.value), metric.unit, metric.direction
        if new:
            session.execute(insert(TrialMetricModel), new)

    def set_trial_state(
        self,
        trial_id: int,
        state: TrialState | str,
        *,
        metrics: MetricsLike | None = None,
        error: str | None = None,
        split: str = CALIBRATION,
        memo_key: str | None = None,
        rung: int = FULL_RUNG,
    ) -> TrialRecord:
        """Finish a running trial, storing its metrics (and the reason it failed) in the same transaction.

        ``memo_key`` (complete trials) lets a later trial that measures the same thing reuse these
        metrics (:meth:`find_memo`).

        ``metrics`` is ``{name: value}`` for the known metrics, or :class:`MetricRecord` objects. A
        failed trial needs ``error``, its reason. Repeating the call that finished a trial (a retry)
        is harmless; changing a finished trial's state is refused. ``RUNNING`` only refreshes the
        heartbeat of a running trial.

        Raises:
            StoreError: unknown trial or state, a failed trial without a reason, a finished trial.
        """
        target = TrialState.parse(state)
        items = [] if metrics is None else MetricRecord.collect(metrics, split, rung)
        if target is TrialState.FAILED and not error:
            raise StoreError(f"trial {trial_id}: a failed trial needs its reason (error='...')")
        with self._session("cannot update a trial in", write=True) as session:
            row = self._trial_row(session, trial_id)
            current = TrialState(row.state)
            now = _now()
            if current.is_finished():
                if current is not target:
                    raise StoreError(
                        f"trial {row.number} of study id {row.study_id} is already {current.value}; "
                        "a finished trial's state cannot change (add a new trial instead)"
                    )
                self._write_metrics(session, row, items, replace=False)
            else:
                self._write_metrics(session, row, items, replace=False)
                row.state = target.value
                row.heartbeat_at = now
                if target.is_finished():
                    row.finished_at = now
                    if error is not None:
                        row.error = str(error)
                    if memo_key is not None and target is TrialState.COMPLETE:
                        row.memo_key = str(memo_key)
            session.flush()
            return _trial_record(row, self._metrics_of(session, [row.id])[row.id])

    def find_memo(self, memo_key: str) -> TrialRecord | None:
        """The first complete trial, in any study, stored with ``memo_key`` (with its metrics), or None."""
        with self._session("cannot look up a memoised trial in") as session:
            row = session.scalars(
                select(TrialModel)
                .where(TrialModel.memo_key == memo_key, TrialModel.state == TrialState.COMPLETE.value)
                .order_by(TrialModel.id)
                .limit(1)
            ).one_or_none()
            if row is None:
                return None
            return _trial_record(row, self._metrics_of(session, [row.id])[row.id])

    def record_metrics(
        self,
        trial_id: int,
        metrics: MetricsLike,
        *,
        split: str = CALIBRATION,
        replace: bool = False,
        rung: int = FULL_RUNG,
    ) -> TrialRecord:
        """Add metrics to a trial without changing its state (e.g. held-out values measured later, or a
        running trial's screening values at ``rung`` -1).

        A metric already stored with the same value is left alone (retry-safe); another value raises
        unless ``replace``.
        """
        items = MetricRecord.collect(metrics, split, rung)
        with self._session("cannot record metrics in", write=True) as session:
            row = self._trial_row(session, trial_id)
            self._write_metrics(session, row, items, replace=replace)
            session.flush()
            return _trial_record(row, self._metrics_of(session, [row.id])[row.id])

    def heartbeat(self, trial_id: int) -> None:
        """Record that the worker running ``trial_id`` is alive."""
        with self._session("cannot record a heartbeat in", write=True) as session:
            session.execute(
                update(TrialModel)
                .where(TrialModel.id == trial_id, TrialModel.state == TrialState.RUNNING.value)
                .values(heartbeat_at=_now())
            )

    def fail_stale_trials(self, study: StudyRef, grace_period: float) -> list[TrialRecord]:
        """Fail running trials whose worker has not sent a heartbeat for ``grace_period`` seconds."""
        cutoff = _now() - timedelta(seconds=grace_period)
        with self._session("cannot fail stale trials in", write=True) as session:
            study_id = self._study_row(session, study).id
            rows = session.scalars(
                select(TrialModel).where(
                    TrialModel.study_id == study_id,
                    TrialModel.state == TrialState.RUNNING.value,
                    func.coalesce(TrialModel.heartbeat_at, TrialModel.started_at) < cutoff,
                )
            ).all()
            now = _now()
            for row in rows:
                row.state = TrialState.FAILED.value
                row.finished_at = now
                row.error = f"worker {row.worker_id or '?'} sent no heartbeat for {grace_period:g} s"
            session.flush()
            return [_trial_record(r) for r in rows]

    def list_trials(
        self, study: StudyRef, states: Iterable[TrialState | str] | TrialState | str | None = None
    ) -> list[TrialRecord]:
        """The trials of ``study`` (only those in ``states``, if given) by number, with their metrics."""
        wanted = self._states(states)
        with self._session("cannot list trials in") as session:
            study_id = self._study_row(session, study).id
            query = select(*_TRIAL_COLUMNS).where(TrialModel.study_id == study_id)
            if wanted is not None:
                query = query.where(TrialModel.state.in_(wanted))
            rows = session.execute(query.order_by(TrialModel.number)).all()
            if wanted is not None and len(rows) < _FEW_TRIALS:
                # A few running or failed trials of a large study: fetch only their metrics.
                metrics = self._metrics_of(session, [row.id for row in rows])
            else:
                metrics = {row.id: [] for row in rows}
                metric_rows = session.execute(
                    select(*_METRIC_COLUMNS)
                    .where(TrialMetricModel.study_id == study_id)
                    .order_by(
                        TrialMetricModel.trial_id, TrialMetricModel.split, TrialMetricModel.rung, TrialMetricModel.name
                    )
                )
                for m in metric_rows:
                    if m.trial_id in metrics:
                        metrics[m.trial_id].append(_metric_record(m))
            return [_trial_record(row, metrics[row.id]) for row in rows]

    @staticmethod
    def _states(states: Iterable[TrialState | str] | TrialState | str | None) -> list[str] | None:
        if states is None:
            return None
        if isinstance(states, (TrialState, str)):
            states = [states]
        return [TrialState.parse(s).value for s in states]

    def count_trials(self, study: StudyRef, states: Iterable[TrialState | str] | TrialState | str | None = None) -> int:
        """How many trials ``study`` holds (only those in ``states``, if given)."""
        wanted = self._states(states)
        with self._session("cannot count trials in") as session:
            study_id = self._study_row(session, study).id
            query = select(func.count()).select_from(TrialModel).where(TrialModel.study_id == study_id)
            if wanted is not None:
                query = query.where(TrialModel.state.in_(wanted))
            return int(session.scalar(query) or 0)

    def count_finished_trials(self, study: StudyRef) -> int:
        """Trials that are complete, pruned or failed: what a ``--budget`` counts."""
        return self.count_trials(study, [s for s in TrialState if s.is_finished()])

    # -- fronts ------------------------------------------------------------------------------------

    def pareto_front(
        self,
        study: StudyRef,
        objectives: Sequence[ObjectiveLike] | None = None,
        *,
        constraints: Iterable[Any] = (),
        split: str = CALIBRATION,
    ) -> list[TrialRecord]:
        """The complete trials of ``study`` that no other dominates, with their metrics.

        ``objectives`` default to the study's; a trial must have every objective and constrained
        metric on ``split``. ``constraints`` (``"psnr>=30"`` or :class:`Constraint`) filter the
        trials before the front is taken. Sorted by the first objective, best first.
        See :func:`difftune.store.pareto_front_ids` for the algorithm.
        """
        from difftune.store._pareto import front_trial_ids

        with self._session("cannot compute the front in") as session:
            row = self._study_row(session, study)
            specs = (
                tuple(MetricSpec.from_dict(o) for o in row.objectives)
                if objectives is None
                else tuple(MetricSpec.parse(o) for o in objectives)
            )
            ids = front_trial_ids(session, row.id, specs, constraints, split)
            return self._trials_by_id(session, ids)

    def record_front(
        self, study: StudyRef, trial_ids: Iterable[int], objectives: Sequence[ObjectiveLike] | None = None
    ) -> FrontRecord:
        """Store a computed front (default objectives: the study's); the trials must be the study's."""
        ids = [int(i) for i in trial_ids]
        with self._session("cannot record a front in", write=True) as session:
            row = self._study_row(session, study)
            specs = (
                tuple(MetricSpec.from_dict(o) for o in row.objectives)
                if objectives is None
                else tuple(MetricSpec.parse(o) for o in objectives)
            )
            found: set[int] = set()
            for chunk in _chunks(ids):
                found.update(
                    session.scalars(
                        select(TrialModel.id).where(TrialModel.study_id == row.id, TrialModel.id.in_(chunk))
                    )
                )
            missing = [i for i in ids if i not in found]
            if missing:
                raise StoreError(f"front of study {row.name!r}: trials {missing[:10]} are not in this study")
            front = FrontModel(
                study_id=row.id, computed_at=_now(), trial_ids=ids, objectives=[s.to_dict() for s in specs]
            )
            session.add(front)
            session.flush()
            return _front_record(front)

    def latest_front(self, study: StudyRef) -> FrontRecord | None:
        """The front recorded last for ``study``, or ``None``."""
        with self._session("cannot read fronts from") as session:
            study_id = self._study_row(session, study).id
            row = session.scalars(
                select(FrontModel)
                .where(FrontModel.study_id == study_id)
                .order_by(FrontModel.computed_at.desc(), FrontModel.id.desc())
                .limit(1)
            ).one_or_none()
            return None if row is None else _front_record(row)

    def list_fronts(self, study: StudyRef) -> list[FrontRecord]:
        """Every front recorded for ``study``, oldest first."""
        with self._session("cannot read fronts from") as session:
            study_id = self._study_row(session, study).id
            rows = session.scalars(
                select(FrontModel)
                .where(FrontModel.study_id == study_id)
                .order_by(FrontModel.computed_at, FrontModel.id)
            )
            return [_front_record(r) for r in rows]

    # -- exported profiles -------------------------------------------------------------------------

    def save_profile(
        self, study: StudyRef, profile: Any, *, trial_id: int | None = None, path: str | None = None
    ) -> ProfileRecord:
        """Store an exported profile: a :class:`difftune.Profile` (its ``to_json()``), a dict, or JSON text."""
        if hasattr(profile, "to_json"):
            text = str(profile.to_json())
        elif isinstance(profile, Mapping):
            text = json.dumps(_json(dict(profile), "profile"), indent=2) + "\n"
        elif isinstance(profile, str):
            try:
                parsed = json.loads(profile)
            except json.JSONDecodeError as exc:
                raise StoreError(f"profile text is not JSON ({exc.msg} at line {exc.lineno})") from None
            if not isinstance(parsed, dict):
                raise StoreError("profile text must be a JSON object")
            text = profile
        else:
            raise StoreError(f"profile: expected a Profile, a dict or JSON text, got {type(profile).__name__}")
        with self._session("cannot save a profile in", write=True) as session:
            study_id = self._study_row(session, study).id
            if trial_id is not None and self._trial_row(session, trial_id).study_id != study_id:
                raise StoreError(f"trial {trial_id} is not in study {study!r}")
            row = ProfileModel(
                study_id=study_id,
                trial_id=trial_id,
                text=text,
                path=None if path is None else str(path),
                created_at=_now(),
            )
            session.add(row)
            session.flush()
            return _profile_record(row)

    def get_profile(self, profile_id: int) -> ProfileRecord:
        """The exported profile with id ``profile_id``."""
        with self._session("cannot read a profile from") as session:
            row = session.get(ProfileModel, profile_id)
            if row is None:
                raise StoreError(f"no exported profile with id {profile_id} in {self.url}; see list_profiles()")
            return _profile_record(row)

    def list_profiles(self, study: StudyRef) -> list[ProfileRecord]:
        """The profiles exported from ``study``, oldest first."""
        with self._session("cannot list profiles in") as session:
            study_id = self._study_row(session, study).id
            rows = session.scalars(
                select(ProfileModel).where(ProfileModel.study_id == study_id).order_by(ProfileModel.id)
            )
            return [_profile_record(r) for r in rows]

    # -- sample images -----------------------------------------------------------------------------

    def add_image(self, trial_id: int, index: int, png: bytes) -> ImageRecord:
        """Store sample image ``index`` of a trial (PNG bytes), replacing one stored under that index."""
        return self.add_images(trial_id, [png], start=index)[0]

    def add_images(self, trial_id: int, images: Sequence[bytes], *, start: int = 0) -> list[ImageRecord]:
        """Store several PNGs as indices ``start, start+1, …`` in one transaction."""
        blobs = _pngs(images, start, f"trial {trial_id}")
        indices = list(range(start, start + len(blobs)))
        with self._session("cannot store images in", write=True) as session:
            self._trial_row(session, trial_id)
            session.execute(delete(ImageModel).where(ImageModel.trial_id == trial_id, ImageModel.index.in_(indices)))
            if blobs:
                session.execute(
                    insert(ImageModel),
                    [{"trial_id": trial_id, "index": i, "png": b} for i, b in zip(indices, blobs, strict=True)],
                )
        return [ImageRecord(trial_id, i, b) for i, b in zip(indices, blobs, strict=True)]

    def get_images(self, trial_id: int) -> list[ImageRecord]:
        """The sample images of a trial, by index."""
        with self._session("cannot read images from") as session:
            self._trial_row(session, trial_id)
            rows = session.scalars(select(ImageModel).where(ImageModel.trial_id == trial_id).order_by(ImageModel.index))
            return [ImageRecord(r.trial_id, r.index, bytes(r.png)) for r in rows]

    def add_reference_images(
        self, study: StudyRef, images: Sequence[bytes], *, start: int = 0
    ) -> list[ReferenceImageRecord]:
        """Store PNGs of the study's reference setting as indices ``start, start+1, …`` (replacing those indices).

        Index ``i`` is the reference image of the sample its trials' image ``i`` shows.
        """
        blobs = _pngs(images, start, f"the reference of study {study!r}")
        indices = list(range(start, start + len(blobs)))
        with self._session("cannot store reference images in", write=True) as session:
            study_id = self._study_row(session, study).id
            session.execute(
                delete(ReferenceImageModel).where(
                    ReferenceImageModel.study_id == study_id, ReferenceImageModel.index.in_(indices)
                )
            )
            if blobs:
                session.execute(
                    insert(ReferenceImageModel),
                    [{"study_id": study_id, "index": i, "png": b} for i, b in zip(indices, blobs, strict=True)],
                )
        return [ReferenceImageRecord(study_id, i, b) for i, b in zip(indices, blobs, strict=True)]

    def get_reference_images(self, study: StudyRef) -> list[ReferenceImageRecord]:
        """The reference setting's sample images of ``study``, by index (empty when none were stored)."""
        with self._session("cannot read reference images from") as session:
            study_id = self._study_row(session, study).id
            rows = session.scalars(
                select(ReferenceImageModel)
                .where(ReferenceImageModel.study_id == study_id)
                .order_by(ReferenceImageModel.index)
            )
            return [ReferenceImageRecord(r.study_id, r.index, bytes(r.png)) for r in rows]

    def image_bytes(self, study: StudyRef) -> int:
        """Bytes of every PNG stored for ``study``: its trials' sample images and its reference images."""
        with self._session("cannot read images from") as session:
            study_id = self._study_row(session, study).id
            trials = session.scalar(
                select(func.coalesce(func.sum(func.length(ImageModel.png)), 0))
                .join(TrialModel, TrialModel.id == ImageModel.trial_id)
                .where(TrialModel.study_id == study_id)
            )
            reference = session.scalar(
                select(func.coalesce(func.sum(func.length(ReferenceImageModel.png)), 0)).where(
                    ReferenceImageModel.study_id == study_id
                )
            )
            return int(trials or 0) + int(reference or 0)


def _pngs(images: Sequence[bytes], start: int, owner: str) -> list[bytes]:
    blobs = [bytes(b) for b in images]
    for offset, blob in enumerate(blobs):
        if not blob.startswith(_PNG_SIGNATURE):
            raise StoreError(f"image {start + offset} of {owner} is not a PNG; save it with format='PNG'")
    return blobs


def _reopen(url: str, options: dict[str, Any]) -> Store:
    return Store(url, **options)


def database_exists(url: str | None = None) -> bool:
    """Whether the database at ``url`` (default: ``$DIFFTUNE_STORAGE`` or ``sqlite:///difftune.db``) is there.

    ``False`` only for a SQLite file that does not exist — opening it with :class:`Store` would create
    it, which a reader (``difftune fronts``, the dashboard) should not do. In-memory SQLite and server
    databases count as there; connecting to them tells whether they answer. A URL that does not parse
    also counts as there, so that opening it reports the problem in :class:`Store`'s words.

    >>> database_exists("sqlite:///no/such/dir/difftune.db"), database_exists("sqlite://")
    (False, True)
    """
    text = url or default_url()
    try:
        parsed = make_url(text)
    except (ArgumentError, ValueError):
        return True
    if parsed.get_backend_name() != "sqlite":
        return True
    database = parsed.database or ""
    if not database or database == ":memory:" or database.startswith("file:") or parsed.query.get("mode") == "memory":
        return True
    return Path(database).exists()


def get_store(storage: Store | str | None = None) -> Store:
    """A :class:`Store` for ``storage``: a URL, an existing store (returned as is), or ``None`` for the default.

    The default is ``$DIFFTUNE_STORAGE``, else ``sqlite:///difftune.db`` in the working directory.
    """
    if isinstance(storage, Store):
        return storage
    return Store(storage)
