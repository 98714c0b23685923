"""The ``--select`` grammar: pick one Pareto point by a goal and constraints.

::

    select      := goal [ "where" constraint { "and" constraint } ]
    goal        := "fastest"            max speedup (or, without speedup, min latency_ms)
                 | "smallest"           min weight_memory_mb (quantization studies), else min peak_memory_mb
                 | "best" METRIC        the metric's own direction
                 | "lowest" METRIC | "highest" METRIC
    constraint  := METRIC (">=" | "<=" | ">" | "<" | "==") NUMBER

>>> parse_select("fastest where psnr>=30 and ssim>=0.9").constraints
(Constraint(metric='psnr', op='>=', bound=30.0), Constraint(metric='ssim', op='>=', bound=0.9))
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from difftune.errors import StoreError
from difftune.store._records import CALIBRATION, METRICS, Direction, TrialRecord

__all__ = [
    "Constraint",
    "Goal",
    "Selection",
    "meets",
    "no_point_error",
    "parse_constraint",
    "parse_select",
    "rank_points",
    "select_point",
]

_OPS = (">=", "<=", "==", ">", "<")
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?inf"
_CONSTRAINT = re.compile(rf"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|=|>|<)\s*({_NUMBER})\s*$", re.IGNORECASE)
_GRAMMAR = (
    "write GOAL [where METRIC>=VALUE [and ...]] with GOAL one of fastest, smallest, best METRIC, "
    "lowest METRIC, highest METRIC, e.g. 'fastest where psnr>=30' or 'best psnr where speedup>=2'"
)


@dataclass(frozen=True)
class Constraint:
    """``metric op bound``, e.g. ``psnr >= 30``."""

    metric: str
    op: str
    bound: float

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise StoreError(f"constraint {self.metric}: operator must be one of {', '.join(_OPS)}, got {self.op!r}")

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.bound:g}"

    def satisfied(self, value: float) -> bool:
        """Whether ``value`` meets the constraint."""
        return self.violation(value) == 0.0

    def violation(self, value: float) -> float:
        """How far ``value`` is from meeting the constraint (0 when it does), in the metric's unit."""
        if self.op == ">=":
            return max(0.0, self.bound - value)
        if self.op == "<=":
            return max(0.0, value - self.bound)
        if self.op == ">":
            return 0.0 if value > self.bound else max(self.bound - value, math.ulp(self.bound))
        if self.op == "<":
            return 0.0 if value < self.bound else max(value - self.bound, math.ulp(self.bound))
        return 0.0 if math.isclose(value, self.bound, rel_tol=1e-9, abs_tol=1e-12) else abs(value - self.bound)


def parse_constraint(value: Constraint | str) -> Constraint:
    """``"psnr>=30"`` as a :class:`Constraint` (a constraint is returned as is)."""
    if isinstance(value, Constraint):
        return value
    match = _CONSTRAINT.match(str(value))
    if match is None:
        raise StoreError(f"cannot parse constraint {value!r}: write METRIC OP NUMBER, e.g. psnr>=30 (OP: >= <= > < ==)")
    metric, op, bound = match.groups()
    return Constraint(metric, "==" if op == "=" else op, float(bound))


@dataclass(frozen=True)
class Goal:
    """What to optimise among the points that meet the constraints.

    ``metric`` is ``None`` for ``fastest`` (speedup or latency_ms, whichever the points have) and
    ``smallest`` (weight_memory_mb or peak_memory_mb);
    ``direction`` is ``None`` for ``best METRIC`` (the metric's own direction).
    """

    word: str
    metric: str | None = None
    direction: Direction | None = None

    def __str__(self) -> str:
        return (
            self.word if self.metric is None or self.word in ("fastest", "smallest") else f"{self.word} {self.metric}"
        )


@dataclass(frozen=True)
class Selection:
    """A parsed ``--select`` expression."""

    goal: Goal
    constraints: tuple[Constraint, ...] = ()

    def __str__(self) -> str:
        where = " and ".join(str(c) for c in self.constraints)
        return f"{self.goal} where {where}" if where else str(self.goal)


def _bad(expr: str, why: str) -> StoreError:
    return StoreError(f"cannot parse --select {expr!r}: {why}; {_GRAMMAR}")


def _parse_goal(text: str, expr: str) -> Goal:
    words = text.split()
    if not words:
        raise _bad(expr, "no goal")
    head = words[0].lower()
    if head in ("fastest", "smallest"):
        if len(words) != 1:
            raise _bad(expr, f"{head!r} takes no metric")
        return Goal("fastest") if head == "fastest" else Goal("smallest")
    directions: dict[str, Direction | None] = {
        "best": None,
        "lowest": "minimize",
        "min": "minimize",
        "highest": "maximize",
        "max": "maximize",
    }
    if head not in directions:
        raise _bad(expr, f"unknown goal {words[0]!r}")
    if len(words) != 2 or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", words[1]):
        raise _bad(expr, f"{head!r} needs one metric name, e.g. '{head} psnr'")
    return Goal(head, words[1], directions[head])


def parse_select(expr: str | Selection) -> Selection:
    """Parse a ``--select`` expression (grammar in this module's docstring).

    >>> str(parse_select("best psnr where speedup>=2"))
    'best psnr where speedup>=2'

    Raises:
        StoreError: the expression does not parse; the message shows the grammar.
    """
    if isinstance(expr, Selection):
        return expr
    text = str(expr).strip()
    parts = re.split(r"\s+where(?:\s+|$)", text, maxsplit=1, flags=re.IGNORECASE)
    goal = _parse_goal(parts[0], text)
    constraints: list[Constraint] = []
    if len(parts) == 2:
        if not parts[1].strip():
            raise _bad(text, "'where' needs at least one constraint")
        for piece in re.split(r"\s+and\s+", parts[1].strip(), flags=re.IGNORECASE):
            try:
                constraints.append(parse_constraint(piece))
            except StoreError:
                raise _bad(text, f"{piece.strip()!r} is not a constraint like psnr>=30") from None
    return Selection(goal, tuple(constraints))


def _direction_of(metric: str, records: Sequence[TrialRecord], split: str) -> Direction:
    for record in records:
        stored = record.metric(metric, split)
        if stored is not None:
            return stored.direction
    return METRICS[metric].direction if metric in METRICS else "maximize"


def _describe(record: TrialRecord, names: Iterable[str], split: str) -> str:
    values = record.values(split)
    shown = ", ".join(f"{n}={values[n]:.4g}" for n in dict.fromkeys(names) if n in values)
    return f"trial {record.number} ({shown})"


def _resolve(
    records: Sequence[TrialRecord], selection: Selection, split: str
) -> tuple[str, Direction, list[TrialRecord]]:
    """The goal's metric and direction, and the records that have every metric the selection names."""
    if not records:
        raise StoreError(
            f"nothing to select {selection} from: the study has no complete trials yet; run a search first"
        )
    known = sorted({name for r in records for name in r.values(split)})

    def unknown(metric: str) -> StoreError:
        return StoreError(
            f"unknown metric {metric!r} in --select {str(selection)!r}; known metrics of these trials: "
            f"{', '.join(known) or 'none'}"
        )

    goal = selection.goal
    direction: Direction
    if goal.metric is None and goal.word == "smallest":
        # The weights as served where the trials measured them (a quantization study), else the CUDA peak.
        metric = "weight_memory_mb" if "weight_memory_mb" in known else "peak_memory_mb"
        if metric not in known:
            raise unknown(metric)
        direction = "minimize"
    elif goal.metric is None:  # fastest
        if "speedup" in known:
            metric, direction = "speedup", "maximize"
        elif "latency_ms" in known:
            metric, direction = "latency_ms", "minimize"
        else:
            raise unknown("speedup")
    else:
        metric = goal.metric
        if metric not in known:
            raise unknown(metric)
        direction = goal.direction or _direction_of(metric, records, split)
    for constraint in selection.constraints:
        if constraint.metric not in known:
            raise unknown(constraint.metric)
    needed = [metric, *(c.metric for c in selection.constraints)]
    candidates = [r for r in records if all(r.value(n, split) is not None for n in needed)]
    if not candidates:
        raise StoreError(f"no trial has all of {', '.join(dict.fromkeys(needed))} measured on {split}")
    return metric, direction, candidates


def meets(selection: Selection | str, values: Mapping[str, float]) -> bool:
    """Whether ``values`` (metric → value) satisfy every constraint of ``selection`` (a missing metric does not)."""
    parsed = parse_select(selection) if isinstance(selection, str) else selection
    return all(c.metric in values and c.satisfied(values[c.metric]) for c in parsed.constraints)


def rank_points(
    records: Sequence[TrialRecord], expr: str | Selection, *, split: str = CALIBRATION
) -> list[TrialRecord]:
    """The records meeting ``expr``'s constraints on ``split``, best goal first (ties: lower trial number).

    Raises:
        StoreError: as :func:`select_point` — a malformed expression, an unknown metric, or no record
            meeting the constraints (naming the closest).
    """
    selection = parse_select(expr)
    records = list(records)
    metric, direction, candidates = _resolve(records, selection, split)
    feasible = [r for r in candidates if meets(selection, r.values(split))]
    if feasible:
        sign = -1.0 if direction == "maximize" else 1.0
        return sorted(feasible, key=lambda r: (sign * r.values(split)[metric], r.number))
    raise no_point_error(candidates, selection, metric, split)


def no_point_error(
    candidates: Sequence[TrialRecord], selection: Selection, metric: str, split: str, what: str = ""
) -> StoreError:
    """The error for a selection no candidate meets: it names the closest candidate (the smallest sum of
    violations, each divided by the metric's spread) and what it misses."""
    scales = _scales(candidates, [c.metric for c in selection.constraints], split)

    def distance(record: TrialRecord) -> float:
        values = record.values(split)
        return sum(
            (c.violation(values[c.metric]) if c.metric in values else math.inf) / scales[c.metric]
            for c in selection.constraints
        )

    closest = min(candidates, key=lambda r: (distance(r), r.number))
    values = closest.values(split)
    missed = ", ".join(
        f"{c} (off by {c.violation(values[c.metric]):.4g})" if c.metric in values else f"{c} (not measured)"
        for c in selection.constraints
        if c.metric not in values or not c.satisfied(values[c.metric])
    )
    return StoreError(
        f"no point satisfies {' and '.join(str(c) for c in selection.constraints)}{what}; the closest is "
        f"{_describe(closest, [metric, *(c.metric for c in selection.constraints)], split)}, which misses {missed}: "
        "relax the constraint or run a longer search"
    )


def select_point(records: Sequence[TrialRecord], expr: str | Selection, *, split: str = CALIBRATION) -> TrialRecord:
    """The record ``expr`` picks among ``records`` (usually a study's Pareto front).

    Ties on the goal go to the lower trial number.

    Raises:
        StoreError: the expression does not parse; it names a metric the records do not have (the
            message lists the known ones); or no record meets the constraints (the message names
            the closest one, by the smallest sum of violations each divided by the metric's spread,
            and its values).
    """
    return rank_points(records, expr, split=split)[0]


def _scales(records: Sequence[TrialRecord], metrics: Iterable[str], split: str) -> Mapping[str, float]:
    """Per metric, the spread of its finite values (1 when they are all equal): violations count in units of it."""
    scales: dict[str, float] = {}
    for metric in metrics:
        finite = [v for r in records if (v := r.value(metric, split)) is not None and math.isfinite(v)]
        spread = max(finite) - min(finite) if finite else 0.0
        scales[metric] = spread if spread > 0 else 1.0
    return scales
