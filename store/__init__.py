"""difftune.store: SQLAlchemy models, Alembic migrations and the repository API of frozen records.

One database holds difftune's tables (prefixed ``difftune_``) next to Optuna's own study storage::

    from difftune.store import get_store, select_point

    store = get_store("sqlite:///difftune.db")       # creates or upgrades the schema
    front = store.pareto_front("nightly-embedded-cache", constraints=["psnr>=30"])
    point = select_point(front, "fastest where psnr>=30")

Every method returns frozen records (:class:`TrialRecord`, …), never ORM rows, and raises
:class:`~difftune.StoreError` with a one-line message that names the database and what to do.
"""

from __future__ import annotations

from difftune.store._claims import INTERRUPTED, Candidate, Claim
from difftune.store._engine import DEFAULT_URL, ENV_VAR, default_url, mask_url
from difftune.store._migrate import VERSION_TABLE, current_revision, head_revision, upgrade
from difftune.store._pareto import SPEEDUP_NOISE_FLOOR, hypervolume, noise_dominated, non_dominated
from difftune.store._records import (
    CALIBRATION,
    HELD_OUT,
    METRICS,
    TRIAL_KINDS,
    Direction,
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
    metric_spec,
)
from difftune.store._select import (
    Constraint,
    Goal,
    Selection,
    meets,
    no_point_error,
    parse_constraint,
    parse_select,
    rank_points,
    select_point,
)
from difftune.store._storage import Store, database_exists, get_store

__all__ = [
    "CALIBRATION",
    "DEFAULT_URL",
    "ENV_VAR",
    "HELD_OUT",
    "INTERRUPTED",
    "METRICS",
    "SPEEDUP_NOISE_FLOOR",
    "TRIAL_KINDS",
    "VERSION_TABLE",
    "Candidate",
    "Claim",
    "Constraint",
    "Direction",
    "FrontRecord",
    "Goal",
    "ImageRecord",
    "MetricRecord",
    "MetricSpec",
    "ModelRecord",
    "ProfileRecord",
    "ReferenceImageRecord",
    "Selection",
    "Store",
    "StudyRecord",
    "StudyStatus",
    "TrialRecord",
    "TrialState",
    "current_revision",
    "database_exists",
    "default_url",
    "get_store",
    "head_revision",
    "hypervolume",
    "mask_url",
    "meets",
    "metric_spec",
    "no_point_error",
    "noise_dominated",
    "non_dominated",
    "parse_constraint",
    "parse_select",
    "rank_points",
    "select_point",
    "upgrade",
]
