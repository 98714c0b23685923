"""Claiming trials: how several workers share one study's budget without overshooting or duplicating.

A worker never inserts a trial by itself: it *claims* one. :meth:`ClaimsMixin.claim_trial` runs in one
write transaction that first locks the study's row (``SELECT … FOR UPDATE`` on PostgreSQL; SQLite
serialises writers with ``BEGIN IMMEDIATE``), then

1. counts the study's trials that use its budget — running, complete, pruned, and failed except
   *interrupted* ones (their worker died; their point is retried) — and returns ``None`` when the
   study's budget is reached;
2. takes the first candidate whose claim key (``"baseline:fora_3"``, ``"retry:17"``) no trial holds;
   a unique index on ``(study_id, claim)`` makes a duplicate impossible even if two writers raced;
3. otherwise inserts a running trial for the searcher to fill (:meth:`ClaimsMixin.update_trial`).

A trial whose worker is gone (its process is dead on this host, or it sent no heartbeat for the
grace period) is put in the state ``interrupted`` by :meth:`ClaimsMixin.interrupt_trials` (its error
says why), its claim key gets a suffix so that the key is free for the retry, and it stops counting
against the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, or_, select

from difftune.errors import StoreError
from difftune.store._models import StudyModel, TrialModel
from difftune.store._records import TrialRecord, TrialState

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from sqlalchemy.orm import Session

__all__ = ["INTERRUPTED", "Candidate", "Claim", "ClaimsMixin"]

#: The state of a trial whose worker died: such trials are retried, not counted.
INTERRUPTED = TrialState.INTERRUPTED
_CLAIM_LENGTH = 256


@dataclass(frozen=True)
class Candidate:
    """A trial a worker would like to run if nobody holds it yet: a named baseline, a retry, …"""

    key: str
    params: Mapping[str, Any]
    config: Mapping[str, Any] | None = None
    #: what the claimed trial is (baseline, seed, retry; a trial claimed without a candidate is searched)
    kind: str = "baseline"


@dataclass(frozen=True)
class Claim:
    """What :meth:`ClaimsMixin.claim_trial` gave: the running trial, and the candidate key (None: searched)."""

    trial: TrialRecord
    key: str | None


def _budget_filter() -> Any:
    counted = [s.value for s in TrialState if s.is_finished() and s is not TrialState.INTERRUPTED]
    return TrialModel.state.in_(counted)


class ClaimsMixin:
    """The claiming half of :class:`~difftune.store.Store` (see the module docstring)."""

    if TYPE_CHECKING:

        @property
        def url(self) -> str: ...

        def _session(self, action: str, *, write: bool = False) -> AbstractContextManager[Session]: ...
        def _study_row(self, session: Session, study: int | str) -> StudyModel: ...
        def _trial_row(self, session: Session, trial_id: int) -> TrialModel: ...
        def _retry_conflicts(self, attempt: int) -> None: ...

    def set_study_budget(self, study: int | str, budget: int | None) -> None:
        """The number of finished trials the study must hold (what workers stop at); None: no limit."""
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise StoreError(f"budget: expected an integer >= 1 or None, got {budget!r}")
        with self._session("cannot set a study's budget in", write=True) as session:
            self._study_row(session, study).budget = budget

    def count_budget_trials(self, study: int | str) -> int:
        """Finished trials that count against the budget: every finished trial but the interrupted ones."""
        with self._session("cannot count trials in") as session:
            study_id = self._study_row(session, study).id
            query = (
                select(func.count()).select_from(TrialModel).where(TrialModel.study_id == study_id, _budget_filter())
            )
            return int(session.scalar(query) or 0)

    def claim_keys(self, study: int | str) -> set[str]:
        """Every claim key the study's trials hold (interrupted trials' keys carry a suffix)."""
        with self._session("cannot read claims from") as session:
            study_id = self._study_row(session, study).id
            rows = session.scalars(
                select(TrialModel.claim).where(TrialModel.study_id == study_id, TrialModel.claim.is_not(None))
            )
            return {str(r) for r in rows}

    def claim_trial(
        self,
        study: int | str,
        *,
        worker_id: str | None = None,
        candidates: Sequence[Candidate] = (),
        config: Mapping[str, Any] | None = None,
    ) -> Claim | None:
        """A new running trial for this worker, or None when the study's budget is used up.

        The first of ``candidates`` whose key no trial holds is claimed (its params and config are
        stored); else a trial with empty params and ``config`` is inserted for the searcher to fill in
        with :meth:`update_trial`. Running trials count against the budget, so several workers
        never start more trials than the budget allows.
        """
        from difftune.store._storage import _check_kind, _Conflict, _json, _now, _trial_record

        for c in candidates:
            if not c.key or len(c.key) > _CLAIM_LENGTH:
                raise StoreError(f"claim key must be 1-{_CLAIM_LENGTH} characters, got {c.key!r}")
            _check_kind(c.kind)
        for attempt in range(20):
            try:
                with self._session("cannot claim a trial in", write=True) as session:
                    study_id = self._study_row(session, study).id
                    # Lock the study's row: claims of one study are serialised (a no-op on SQLite,
                    # whose write transactions are serialised already).
                    budget = session.scalar(
                        select(StudyModel.budget).where(StudyModel.id == study_id).with_for_update()
                    )
                    used = session.scalar(
                        select(func.count())
                        .select_from(TrialModel)
                        .where(
                            TrialModel.study_id == study_id,
                            or_(TrialModel.state == TrialState.RUNNING.value, _budget_filter()),
                        )
                    )
                    if budget is not None and int(used or 0) >= budget:
                        return None
                    taken = set(
                        session.scalars(
                            select(TrialModel.claim).where(
                                TrialModel.study_id == study_id, TrialModel.claim.is_not(None)
                            )
                        )
                    )
                    chosen = next((c for c in candidates if c.key not in taken), None)
                    last = session.scalar(select(func.max(TrialModel.number)).where(TrialModel.study_id == study_id))
                    now = _now()
                    if chosen is not None:
                        params = _json(dict(chosen.params), "trial params")
                        cfg = None if chosen.config is None else _json(dict(chosen.config), "trial config")
                    else:
                        params, cfg = {}, None if config is None else _json(dict(config), "trial config")
                    row = TrialModel(
                        study_id=study_id,
                        number=0 if last is None else last + 1,
                        state=TrialState.RUNNING.value,
                        params=params,
                        config=cfg,
                        claim=None if chosen is None else chosen.key,
                        kind="searched" if chosen is None else chosen.kind,
                        started_at=now,
                        worker_id=worker_id,
                        heartbeat_at=now,
                    )
                    session.add(row)
                    session.flush()
                    return Claim(_trial_record(row), None if chosen is None else chosen.key)
            except _Conflict:
                self._retry_conflicts(attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def update_trial(
        self, trial_id: int, *, params: Mapping[str, Any] | None = None, config: Mapping[str, Any] | None = None
    ) -> TrialRecord:
        """Fill in a running trial's params and/or config (a searched trial after the searcher's ask)."""
        from difftune.store._storage import _json, _trial_record

        with self._session("cannot update a trial in", write=True) as session:
            row = self._trial_row(session, trial_id)
            if TrialState(row.state) is not TrialState.RUNNING:
                raise StoreError(f"trial {row.number} is {row.state}; only a running trial's params can change")
            if params is not None:
                row.params = _json(dict(params), "trial params")
            if config is not None:
                row.config = _json(dict(config), "trial config")
            session.flush()
            return _trial_record(row)

    def interrupt_trials(
        self,
        study: int | str,
        *,
        grace_period: float,
        alive: Callable[[str | None], bool | None] = lambda worker: None,
        trial_ids: Sequence[int] | None = None,
        reason: str | None = None,
    ) -> list[TrialRecord]:
        """Mark the running trials whose worker is gone ``interrupted`` (retried, not counted).

        A trial is interrupted when ``alive(worker_id)`` is False (e.g. its process no longer exists
        on this host), or when its last heartbeat is older than ``grace_period`` seconds; with
        ``trial_ids`` exactly those running trials are (the caller's own, e.g. on Ctrl-C).
        """
        from difftune.store._storage import _now, _trial_record

        cutoff = _now() - timedelta(seconds=grace_period)
        with self._session("cannot fail interrupted trials in", write=True) as session:
            study_id = self._study_row(session, study).id
            query = select(TrialModel).where(
                TrialModel.study_id == study_id, TrialModel.state == TrialState.RUNNING.value
            )
            if trial_ids is not None:
                query = query.where(TrialModel.id.in_(list(trial_ids)))
            now, out = _now(), []
            for row in session.scalars(query.with_for_update()).all():
                beat = row.heartbeat_at or row.started_at
                if trial_ids is not None:
                    why = reason or "stopped"
                elif alive(row.worker_id) is False:
                    why = f"worker {row.worker_id} is no longer running"
                elif beat < cutoff:
                    why = f"worker {row.worker_id or '?'} sent no heartbeat for {grace_period:g} s"
                else:
                    continue
                row.state = TrialState.INTERRUPTED.value
                row.finished_at = now
                row.error = why
                if row.claim is not None:  # free the key for the retry
                    row.claim = f"{row.claim}@{row.number}"[:_CLAIM_LENGTH]
                out.append(row)
            session.flush()
            return [_trial_record(r) for r in out]
