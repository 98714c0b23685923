"""The frozen records the store returns, and the metric vocabulary they use.

Every :class:`~difftune.store.Store` method returns these plain snapshots, never ORM rows: they can
be pickled to other processes, compared, and held after the session that read them has closed.
Mutable containers inside them (``params``, ``config``) are fresh copies; changing them does not
change the database.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from difftune.errors import StoreError
from difftune.metric_table import METRIC_TABLE

if TYPE_CHECKING:
    from difftune.profile import Profile

__all__ = [
    "CALIBRATION",
    "DIRECTIONS",
    "HELD_OUT",
    "METRICS",
    "SPLITS",
    "Direction",
    "FrontRecord",
    "ImageRecord",
    "MetricRecord",
    "MetricSpec",
    "ModelRecord",
    "ProfileRecord",
    "ReferenceImageRecord",
    "StudyRecord",
    "StudyStatus",
    "TrialRecord",
    "TrialState",
    "metric_spec",
]

Direction = Literal["minimize", "maximize"]
DIRECTIONS: tuple[Direction, ...] = ("minimize", "maximize")

#: The split a metric was measured on: the calibration set the search optimises, or held-out data.
CALIBRATION = "calibration"
HELD_OUT = "held_out"
SPLITS = (CALIBRATION, HELD_OUT)

#: The rung of a full evaluation. A multi-fidelity study first screens a candidate on a prefix of the
#: calibration set: those metrics are stored at rung -1 (a cheaper rung would be -2), and only rung 0
#: counts for fronts, selection and export.
FULL_RUNG = 0


class TrialState(str, Enum):
    """Where a trial is in its life; every state but ``RUNNING`` is final.

    ``INTERRUPTED``: its worker died (killed, lost machine, Ctrl-C); it does not count against the
    study's budget, and its point is retried.
    """

    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"
    PRUNED = "pruned"
    INTERRUPTED = "interrupted"

    def is_finished(self) -> bool:
        """Whether the trial has ended (complete, failed, pruned or interrupted)."""
        return self is not TrialState.RUNNING

    @classmethod
    def parse(cls, value: TrialState | str) -> TrialState:
        """``value`` as a state; an unknown name raises :class:`StoreError` listing the known ones."""
        if isinstance(value, TrialState):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise StoreError(f"unknown trial state {value!r}; known: {', '.join(s.value for s in cls)}") from None


#: What a trial is: a named hand-made method, a hand-made starting point for the searcher, a point the
#: searcher proposed, the re-run of an interrupted trial's point, or a point an earlier study's search
#: found, re-measured to warm-start this one (``difftune nightly``).
TRIAL_KINDS = ("baseline", "seed", "searched", "retry", "warm")


class StudyStatus(str, Enum):
    """``RUNNING`` while workers may add trials; ``FINISHED`` once its budget is spent; ``STOPPED`` by a user."""

    RUNNING = "running"
    FINISHED = "finished"
    STOPPED = "stopped"

    @classmethod
    def parse(cls, value: StudyStatus | str) -> StudyStatus:
        """``value`` as a status; an unknown name raises :class:`StoreError` listing the known ones."""
        if isinstance(value, StudyStatus):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise StoreError(f"unknown study status {value!r}; known: {', '.join(s.value for s in cls)}") from None


def _direction(value: str, where: str) -> Direction:
    text = str(value).lower()
    if text in ("min", "minimize", "lower"):
        return "minimize"
    if text in ("max", "maximize", "higher"):
        return "maximize"
    raise StoreError(f"{where}: direction must be 'minimize' or 'maximize', got {value!r}")


@dataclass(frozen=True)
class MetricSpec:
    """A metric's name, the direction that is better, and its unit: a study objective or a known metric."""

    name: str
    direction: Direction
    unit: str

    def to_dict(self) -> dict[str, str]:
        """``{"name", "direction", "unit"}``, as stored in a study's objectives."""
        return {"name": self.name, "direction": self.direction, "unit": self.unit}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MetricSpec:
        """The inverse of :meth:`to_dict`."""
        name = str(data["name"])
        return cls(name, _direction(data["direction"], name), str(data.get("unit", "")))

    @classmethod
    def parse(cls, value: MetricSpec | str | tuple[str, str] | Sequence[str]) -> MetricSpec:
        """A spec from a known metric's name, a ``(name, direction)`` pair, or a spec.

        >>> MetricSpec.parse("psnr")
        MetricSpec(name='psnr', direction='maximize', unit='dB')
        >>> MetricSpec.parse(("latency_ms", "min")).direction
        'minimize'
        """
        if isinstance(value, MetricSpec):
            return value
        if isinstance(value, str):
            return metric_spec(value)
        items = list(value)
        if len(items) != 2:
            raise StoreError(f"an objective is a metric name or a (name, direction) pair, got {value!r}")
        name, direction = str(items[0]), _direction(items[1], str(items[0]))
        known = METRICS.get(name)
        return cls(name, direction, known.unit if known else "")


#: The metrics difftune's evaluators report (INTERFACE.md, "Names"), with direction and unit ("" when
#: unitless): :data:`difftune.metric_table.METRIC_TABLE`, the one table the evaluators read too.
METRICS: Mapping[str, MetricSpec] = MappingProxyType(
    {row.name: MetricSpec(row.name, _direction(row.direction, row.name), row.unit) for row in METRIC_TABLE}
)


def metric_spec(name: str) -> MetricSpec:
    """The known metric ``name``; an unknown name raises :class:`StoreError` listing the known ones."""
    try:
        return METRICS[name]
    except KeyError:
        raise StoreError(
            f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))} "
            "(for another metric pass a MetricRecord with its direction and unit)"
        ) from None


@dataclass(frozen=True)
class MetricRecord:
    """One measured value of a trial: ``value`` in ``unit``, better in ``direction``, on ``split``."""

    name: str
    value: float
    unit: str
    direction: Direction
    split: str = CALIBRATION
    #: :data:`FULL_RUNG`, or a negative screening rung
    rung: int = FULL_RUNG

    def __post_init__(self) -> None:
        if not isinstance(self.value, (int, float)) or isinstance(self.value, bool):
            raise StoreError(f"metric {self.name}: value must be a number, got {self.value!r}")
        if math.isnan(self.value):
            raise StoreError(f"metric {self.name} is NaN: record the trial as failed with the reason instead")
        if self.direction not in DIRECTIONS:
            raise StoreError(f"metric {self.name}: direction must be 'minimize' or 'maximize', got {self.direction!r}")
        if self.split not in SPLITS:
            raise StoreError(f"metric {self.name}: split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if isinstance(self.rung, bool) or not isinstance(self.rung, int) or self.rung > FULL_RUNG:
            raise StoreError(
                f"metric {self.name}: rung must be 0 (full) or a negative screening rung, got {self.rung!r}"
            )

    @classmethod
    def known(cls, name: str, value: float, split: str = CALIBRATION, rung: int = FULL_RUNG) -> MetricRecord:
        """A value of one of the :data:`METRICS`, with that metric's direction and unit."""
        spec = metric_spec(name)
        return cls(name, float(value), spec.unit, spec.direction, split, rung)

    @classmethod
    def collect(
        cls,
        metrics: Mapping[str, float | MetricRecord] | Iterable[MetricRecord],
        split: str = CALIBRATION,
        rung: int = FULL_RUNG,
    ) -> list[MetricRecord]:
        """Normalise ``{name: value}`` (known metrics) or records into a list without duplicate names."""
        items: list[MetricRecord] = []
        if isinstance(metrics, Mapping):
            for name, value in metrics.items():
                items.append(value if isinstance(value, MetricRecord) else cls.known(str(name), value, split, rung))
        else:
            items = list(metrics)
        seen: set[tuple[str, str, int]] = set()
        for item in items:
            if not isinstance(item, MetricRecord):
                raise StoreError(f"metrics: expected MetricRecord or a {{name: value}} mapping, got {item!r}")
            key = (item.name, item.split, item.rung)
            if key in seen:
                raise StoreError(f"metric {item.name} ({item.split}, rung {item.rung}) given twice")
            seen.add(key)
        return items


@dataclass(frozen=True)
class ModelRecord:
    """A model the store has seen; ``fingerprint`` is :func:`difftune.describe`'s weight hash."""

    id: int
    name: str
    family: str
    fingerprint: str
    created_at: datetime


@dataclass(frozen=True)
class StudyRecord:
    """A search over one space for one model; ``objectives`` are the metrics its fronts trade off."""

    id: int
    name: str
    model_id: int
    space: str
    searcher: str
    objectives: tuple[MetricSpec, ...]
    reference: dict[str, Any] | None
    optuna_study_name: str | None
    created_at: datetime
    status: StudyStatus
    budget: int | None = None


@dataclass(frozen=True)
class TrialRecord:
    """One evaluated point of a study, with every metric recorded for it.

    ``params`` is the searcher's point, ``config`` the decoded acceleration config (JSON), ``error``
    why a failed or pruned trial stopped.
    """

    id: int
    study_id: int
    number: int
    state: TrialState
    params: dict[str, Any]
    config: dict[str, Any] | None
    error: str | None
    started_at: datetime
    finished_at: datetime | None
    worker_id: str | None
    heartbeat_at: datetime | None
    metrics: tuple[MetricRecord, ...] = ()
    #: one of :data:`TRIAL_KINDS`
    kind: str = "searched"
    #: hash of the applied profile and the measurement's context (complete trials since v0.5.0.a)
    memo_key: str | None = None

    def values(self, split: str = CALIBRATION, rung: int = FULL_RUNG) -> dict[str, float]:
        """``{metric: value}`` measured on ``split`` (at ``rung``: the full evaluation by default)."""
        return {m.name: m.value for m in self.metrics if m.split == split and m.rung == rung}

    def value(self, name: str, split: str = CALIBRATION, rung: int = FULL_RUNG) -> float | None:
        """The value of metric ``name`` on ``split``, or ``None`` when it was not measured."""
        for m in self.metrics:
            if m.name == name and m.split == split and m.rung == rung:
                return m.value
        return None

    def metric(self, name: str, split: str = CALIBRATION, rung: int = FULL_RUNG) -> MetricRecord | None:
        """The full record (unit, direction) of metric ``name`` on ``split``, or ``None``."""
        for m in self.metrics:
            if m.name == name and m.split == split and m.rung == rung:
                return m
        return None

    @property
    def rungs(self) -> tuple[int, ...]:
        """The rungs this trial has metrics at, cheapest first (``(-1, 0)``: screened, then promoted)."""
        return tuple(sorted({m.rung for m in self.metrics}))


@dataclass(frozen=True)
class FrontRecord:
    """A Pareto front as computed at ``computed_at``: the trials on it and the objectives it used."""

    id: int
    study_id: int
    computed_at: datetime
    trial_ids: tuple[int, ...]
    objectives: tuple[MetricSpec, ...]


@dataclass(frozen=True)
class ProfileRecord:
    """An exported profile: its JSON text exactly as written, and where it was written (if anywhere)."""

    id: int
    study_id: int
    trial_id: int | None
    text: str
    path: str | None
    created_at: datetime

    def data(self) -> dict[str, Any]:
        """The profile's JSON, parsed (not validated)."""
        data = json.loads(self.text)
        if not isinstance(data, dict):
            raise StoreError(f"profile {self.id} does not hold a JSON object")
        return data

    def profile(self) -> Profile:
        """The validated :class:`difftune.Profile` (imports the runtime)."""
        from difftune.profile import load_profile

        return load_profile(self.data())


@dataclass(frozen=True)
class ImageRecord:
    """Sample image ``index`` of a trial, as PNG bytes."""

    trial_id: int
    index: int
    png: bytes


@dataclass(frozen=True)
class ReferenceImageRecord:
    """Sample image ``index`` of a study's reference setting, as PNG bytes: what its trials' image ``index`` is
    compared with (the same prompt or label and seed)."""

    study_id: int
    index: int
    png: bytes
