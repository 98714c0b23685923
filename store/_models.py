"""SQLAlchemy models of difftune's tables.

Every table is prefixed ``difftune_`` because Optuna's own tables (``studies``, ``trials``, …) live
in the same database. These classes never leave :mod:`difftune.store`: the repository turns rows
into the frozen records of :mod:`difftune.store._records`.

Schema changes go through a new Alembic revision in ``store/migrations/versions`` (named after the
release that introduces it); the migration test checks that the revisions build exactly this schema.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "Base",
    "FrontModel",
    "ImageModel",
    "ModelModel",
    "ProfileModel",
    "ReferenceImageModel",
    "StudyModel",
    "TrialMetricModel",
    "TrialModel",
]

#: Optuna uses double precision for trial values; so do we (latencies and PSNRs need more than 24 bits).
FLOAT_PRECISION = 53

# Deterministic constraint names, so later revisions can alter them by name (SQLite batch mode needs it).
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored in UTC and always read back timezone-aware.

    SQLite keeps no zone; PostgreSQL does. Storing UTC everywhere makes the two backends return the
    same values.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware datetime")
        value = value.astimezone(UTC)
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base of difftune's tables (``Base.metadata`` is what the migrations must build)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ModelModel(Base):
    """A model known by its weights: the fingerprint is unique, the name is a label."""

    __tablename__ = "difftune_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(256), index=True)
    family: Mapped[str] = mapped_column(String(32))
    fingerprint: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class StudyModel(Base):
    """A study: one search space on one model, with the objectives its fronts trade off."""

    __tablename__ = "difftune_studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(256), unique=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("difftune_models.id"), index=True)
    space: Mapped[str] = mapped_column(String(64))
    searcher: Mapped[str] = mapped_column(String(64))
    # [{"name", "direction", "unit"}, ...]
    objectives: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    # The setting speedups are measured against (e.g. the default solver at the reference NFE).
    reference: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    optuna_study_name: Mapped[str | None] = mapped_column(String(512), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(String(16))
    #: finished trials the study must hold (workers stop there); None: no limit
    budget: Mapped[int | None] = mapped_column(Integer, nullable=True)

    __table_args__ = (CheckConstraint("status IN ('running', 'finished', 'stopped')", name="status"),)


class TrialModel(Base):
    """One evaluated point. ``(study_id, number)`` is unique: two workers cannot both record trial N."""

    __tablename__ = "difftune_trials"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("difftune_studies.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    config: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String(256), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    #: what a worker claimed this trial as ("baseline:fora_3", "retry:17"); unique within a study
    claim: Mapped[str | None] = mapped_column(String(256), nullable=True)
    #: baseline (a named hand-made method), seed (a hand-made starting point), searched, retry, or warm
    #: (an earlier study's point re-measured to warm-start this one)
    kind: Mapped[str] = mapped_column(String(16), server_default="searched", default="searched")
    #: hash of the applied profile and the measurement's context: equal keys measured the same thing
    memo_key: Mapped[str | None] = mapped_column(String(64), nullable=True)

    __table_args__ = (
        UniqueConstraint("study_id", "number"),
        # Listing and counting a study's trials by state; on SQLite it also covers the id.
        Index("ix_difftune_trials_study_id_state", "study_id", "state"),
        # A baseline or a retry is claimed once per study (NULL claims — searched trials — repeat).
        Index("uq_difftune_trials_study_id_claim", "study_id", "claim", unique=True),
        # A memoised result is looked up by its key across every study.
        Index("ix_difftune_trials_memo_key", "memo_key"),
        CheckConstraint("state IN ('running', 'complete', 'failed', 'pruned', 'interrupted')", name="state"),
        CheckConstraint("kind IN ('baseline', 'seed', 'searched', 'retry', 'warm')", name="kind"),
    )


class TrialMetricModel(Base):
    """One metric value of one trial on one split, with its unit and better direction."""

    __tablename__ = "difftune_trial_metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("difftune_trials.id", ondelete="CASCADE"))
    # Denormalised from the trial so that a front query reads one index range per metric instead of
    # joining 100,000 trials (see difftune.store._pareto).
    study_id: Mapped[int] = mapped_column(ForeignKey("difftune_studies.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float(precision=FLOAT_PRECISION))
    unit: Mapped[str] = mapped_column(String(32))
    direction: Mapped[str] = mapped_column(String(8))
    split: Mapped[str] = mapped_column(String(16))
    # 0: the full evaluation; -1: a multi-fidelity study's screening on a prefix of the calibration set.
    rung: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")

    __table_args__ = (
        UniqueConstraint("trial_id", "split", "rung", "name"),
        # Covering index of the front query: (study, split, rung, metric) -> (trial, value) without table reads.
        Index("ix_difftune_trial_metrics_front", "study_id", "split", "rung", "name", "trial_id", "value"),
        CheckConstraint("direction IN ('minimize', 'maximize')", name="direction"),
        CheckConstraint("split IN ('calibration', 'held_out')", name="split"),
        CheckConstraint("rung <= 0", name="rung"),
    )


class FrontModel(Base):
    """A Pareto front as computed at one time: which trials were on it, under which objectives."""

    __tablename__ = "difftune_fronts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("difftune_studies.id", ondelete="CASCADE"))
    computed_at: Mapped[datetime] = mapped_column(UTCDateTime())
    trial_ids: Mapped[list[int]] = mapped_column(JSON)
    objectives: Mapped[list[dict[str, Any]]] = mapped_column(JSON)

    __table_args__ = (Index("ix_difftune_fronts_study_id_computed_at", "study_id", "computed_at"),)


class ProfileModel(Base):
    """An exported profile: the JSON text exactly as written to ``path``."""

    __tablename__ = "difftune_profiles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("difftune_studies.id", ondelete="CASCADE"), index=True)
    trial_id: Mapped[int | None] = mapped_column(
        ForeignKey("difftune_trials.id", ondelete="SET NULL"), nullable=True, index=True
    )
    text: Mapped[str] = mapped_column(Text)
    path: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ImageModel(Base):
    """Sample image ``index`` a trial generated, as PNG bytes (shown next to the front)."""

    __tablename__ = "difftune_images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("difftune_trials.id", ondelete="CASCADE"))
    # "index" is an SQL keyword; the column is named image_index.
    index: Mapped[int] = mapped_column("image_index", Integer)
    png: Mapped[bytes] = mapped_column(LargeBinary)

    __table_args__ = (UniqueConstraint("trial_id", "image_index"),)


class ReferenceImageModel(Base):
    """Sample image ``index`` of a study's reference setting (no trial draws it), as PNG bytes."""

    __tablename__ = "difftune_reference_images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("difftune_studies.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column("image_index", Integer)
    png: Mapped[bytes] = mapped_column(LargeBinary)

    __table_args__ = (UniqueConstraint("study_id", "image_index"),)
