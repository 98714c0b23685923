"""The naive stack: single-space studies' best points turned on together, against the joint front.

Caching, sparsity, quantization and fewer solver steps each cost some quality; stacked, their errors
interact (CacheQuant: quantization alone −0.76 FID, caching alone −4.71, both naively −11.99). A
user who tuned each technique in its own study would stack their best points. :func:`stacked_points`
builds those stacks as points of the ``joint`` space — for each PSNR floor F in ``floors``, every
named study's pick by ``fastest where psnr>=F`` (``smallest where psnr>=F`` for a ``quant`` study),
all turned on in one profile — and a joint study evaluates them as baselines named ``stack_psnrF``
(``difftune calibrate --space joint --stack-from S1,S2,…``), measured as a whole like every point.
:func:`stack_report` then sets each stack beside the joint study's own searched points: the best
PSNR a searched point reaches at least as fast (and, when the study minimises weight memory, at
most as large) and the fastest searched point at least as good (and as small), so users see what
stacking loses and what a joint search recovers.

    >>> rows = stack_report(store, "embedded-joint")
    >>> print(format_stack_report(rows))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from difftune.errors import SpaceError, StoreError

__all__ = [
    "STACKABLE",
    "STACK_FLOORS",
    "StackRow",
    "check_stack_sources",
    "format_stack_report",
    "stack_report",
    "stacked_points",
]

#: PSNR floors (dB) at which each single study's pick is made: one stack per floor.
STACK_FLOORS = (25.0, 30.0, 35.0)
#: Spaces whose points are points of a joint space's parts.
STACKABLE = ("solver", "cache", "sada", "quant")
#: The unaccelerated setting of each space: stacking it would turn a part on that does nothing.
_PLAIN = {"identity", "w16a16", "sada_off"}
_PREFIX = "stack_psnr"


def _goal(space: str) -> str:
    return "smallest" if space == "quant" else "fastest"


def check_stack_sources(store: Any, studies: Sequence[str], fingerprint: str) -> list[Any]:
    """The named studies' records, checked: they exist, are ``solver`` / ``cache`` / ``sada`` / ``quant``
    studies (one per space) of the model with ``fingerprint``; :class:`SpaceError` names what is wrong."""
    if not studies:
        raise SpaceError("--stack-from: name at least one study (e.g. embedded-solver,embedded-cache)")
    out: list[Any] = []
    spaces: dict[str, str] = {}
    for name in studies:
        try:
            record = store.get_study(name)
        except StoreError as exc:
            raise SpaceError(f"--stack-from: {exc}") from None
        if record.space not in STACKABLE:
            raise SpaceError(
                f"--stack-from: study {name!r} searched the {record.space!r} space; only the points of "
                f"{', '.join(STACKABLE)} studies are points of the joint space's parts"
            )
        if record.space in spaces:
            raise SpaceError(
                f"--stack-from: studies {spaces[record.space]!r} and {name!r} both searched {record.space!r}"
            )
        spaces[record.space] = name
        model = store.get_model(record.model_id)
        if model.fingerprint != fingerprint:
            raise SpaceError(
                f"--stack-from: study {name!r} tuned other weights ({model.name}, {model.fingerprint}) than this "
                f"study's model ({fingerprint})"
            )
        out.append(record)
    return out


def _label(trial: Any) -> str:
    config = trial.config or {}
    if trial.kind == "baseline":
        return str(config.get("baseline"))
    if trial.kind == "seed":
        return str(config.get("seed"))
    return f"#{trial.number}"


def _params_of(trial: Any, space: Any, context: Any) -> dict[str, Any] | None:
    """The trial's point in its own space: its parameters, or its sections encoded (a sections-only
    baseline such as FORA); None when the space cannot hold them."""
    if trial.params:
        return dict(trial.params)
    from difftune.profile import Profile

    profile = (trial.config or {}).get("profile")
    if not profile:
        return None
    loaded = Profile.from_dict(profile)
    sections = {name: getattr(loaded, name) for name in space.sections}
    try:
        return dict(space.encode(sections, context))
    except SpaceError:
        return None


def stacked_points(
    store: Any,
    space: Any,
    context: Any,
    studies: Sequence[str],
    *,
    fingerprint: str,
    floors: Sequence[float] = STACK_FLOORS,
) -> list[Any]:
    """One joint point per PSNR floor: each named study's pick at that floor, all turned on.

    A study with no front point at a floor (or only its unaccelerated setting) leaves its part off
    that stack; a stack needs two parts. Stacks that come out the same are kept once.
    """
    from difftune.search.settings import StudySettings
    from difftune.spaces import get_space
    from difftune.store import rank_points

    picks: dict[float, dict[str, tuple[str, Mapping[str, Any]]]] = {float(f): {} for f in floors}
    records = check_stack_sources(store, studies, fingerprint)
    for record in records:
        single = get_space(record.space)
        steps = StudySettings.from_dict(record.reference or {}).num_inference_steps
        single_context = context.replace(num_inference_steps=steps)
        front = [t for t in store.pareto_front(record.id) if (t.config or {}).get("baseline") not in _PLAIN]
        for floor in picks:
            try:
                ranked = rank_points(front, f"{_goal(record.space)} where psnr>={floor:g}")
            except StoreError:
                continue
            for trial in ranked:
                params = _params_of(trial, single, single_context)
                if params is not None:
                    picks[floor][record.space] = (f"{record.name} {_label(trial)}", params)
                    break
    out, seen = [], []
    for floor, chosen in picks.items():
        if len(chosen) < 2:
            continue
        point = space.stack(chosen, context, name=f"{_PREFIX}{floor:g}")
        missing = [r.name for r in records if r.space not in chosen]
        left_out = (
            f"; left out: {', '.join(missing)} (no front point at ≥ {floor:g} dB that the joint space can hold)"
            if missing
            else ""
        )
        description = f"each part ≥ {floor:g} dB PSNR in its own study; {point.description}{left_out}"
        point = dataclasses.replace(point, description=description)
        if point.sections not in seen:
            seen.append(point.sections)
            out.append(point)
    return out


@dataclass(frozen=True)
class StackRow:
    """One stack of a joint study beside the joint search's best comparable point.

    Attributes:
        name: the stack's baseline name (``stack_psnr30``); description: what it stacks.
        values: its measured figures (calibration split).
        joint: the searched point with the highest PSNR among those at least as fast (and no larger in
            weight memory, when the study minimises it), or None; joint_values: its figures.
        same_quality: the fastest searched point with at least the stack's PSNR (and no larger
            weights), or None; same_quality_values: its figures.
    """

    name: str
    description: str
    values: Mapping[str, float]
    joint: int | None
    joint_values: Mapping[str, float]
    same_quality: int | None = None
    same_quality_values: Mapping[str, float] = field(default_factory=dict)

    @property
    def speedup_ratio(self) -> float:
        """The fastest searched joint point at the stack's PSNR ÷ the stack's speedup; NaN without one."""
        if self.same_quality is None:
            return math.nan
        return float(self.same_quality_values["speedup"]) / float(self.values.get("speedup", math.nan))

    @property
    def psnr_gain(self) -> float:
        """Joint PSNR − stack PSNR (dB); NaN without a comparable joint point."""
        if self.joint is None:
            return math.nan
        return float(self.joint_values.get("psnr", math.nan)) - float(self.values.get("psnr", math.nan))


def stack_report(store: Any, study: Any) -> list[StackRow]:
    """Every complete ``stack_psnr…`` baseline of the joint ``study`` with its best comparable searched point."""
    from difftune.store import TrialState

    record = store.get_study(study)
    minimise_memory = any(o.name == "weight_memory_mb" for o in record.objectives)
    trials = store.list_trials(record.id, TrialState.COMPLETE)
    searched = [t for t in trials if t.kind in ("searched", "retry")]
    rows = []
    for t in trials:
        name = str((t.config or {}).get("baseline", ""))
        if t.kind != "baseline" or not name.startswith(_PREFIX):
            continue
        values = t.values()
        speed, memory = values.get("speedup", math.nan), values.get("weight_memory_mb", math.inf)
        psnr = values.get("psnr", math.inf)
        best = fastest = None
        for s in searched:
            v = s.values()
            if "psnr" not in v or "speedup" not in v:
                continue
            if minimise_memory and v.get("weight_memory_mb", math.inf) > memory:
                continue
            if v["speedup"] >= speed and (best is None or v["psnr"] > best.values()["psnr"]):
                best = s
            if v["psnr"] >= psnr and (fastest is None or v["speedup"] > fastest.values()["speedup"]):
                fastest = s
        description = str((t.config or {}).get("description") or "")
        joint, joint_values = (None, {}) if best is None else (best.number, best.values())
        same, same_values = (None, {}) if fastest is None else (fastest.number, fastest.values())
        rows.append(StackRow(name, description, values, joint, joint_values, same, same_values))
    return sorted(rows, key=lambda r: r.name)


def format_stack_report(rows: Sequence[StackRow]) -> str:
    """Lines for a terminal: each stack's speed / memory / PSNR, and the joint search's comparable point."""

    def figures(v: Mapping[str, float]) -> str:
        memory = f", {v['weight_memory_mb']:.2f} MB" if "weight_memory_mb" in v else ""
        return f"{v.get('speedup', math.nan):.2f}×{memory}, {v.get('psnr', math.nan):.1f} dB"

    lines = []
    for row in rows:
        line = f"{row.name}: {figures(row.values)}"
        if row.joint is None:
            line += " — no searched joint point is as fast (and as small)"
        else:
            line += f" — joint #{row.joint}: {figures(row.joint_values)} ({row.psnr_gain:+.1f} dB)"
        if row.same_quality is not None and row.same_quality != row.joint:
            line += (
                f"; at its PSNR: joint #{row.same_quality} {figures(row.same_quality_values)} "
                f"({row.speedup_ratio:.2f}× its speed)"
            )
        lines.append(line)
        if row.description:
            lines.append(f"    {row.description}")
    return "\n".join(lines)
