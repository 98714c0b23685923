"""What the dashboard shows, computed from the store's frozen records (no Streamlit here, so it is tested alone).

Everything is read through :mod:`difftune.store`; a trial's settings come from the profile the runner
stored with it (``trial.config["profile"]``, the JSON of :class:`difftune.Profile`), read as plain
JSON so that a profile this difftune cannot apply is still shown.
"""

from __future__ import annotations

import io
import json
import math
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difftune.errors import DifftuneError
from difftune.metric_table import METRIC_TABLE
from difftune.store import (
    HELD_OUT,
    METRICS,
    TRIAL_KINDS,
    MetricSpec,
    Store,
    StudyRecord,
    TrialRecord,
    TrialState,
    meets,
    non_dominated,
    parse_constraint,
    parse_select,
    rank_points,
)

__all__ = [
    "KIND_STYLE",
    "X_METRICS",
    "ExportedFile",
    "HypervolumePoint",
    "PlotPoint",
    "default_select",
    "enlarge",
    "export_file",
    "fmt",
    "front_line",
    "handmade_hypervolume",
    "hypervolume_history",
    "mask_of",
    "metric_of",
    "metric_rows",
    "plot_points",
    "point_label",
    "point_title",
    "profile_of",
    "quality_metrics",
    "quant_rows",
    "sada_phases",
    "sada_rows",
    "section_summaries",
    "select_expression_for",
    "solver_rows",
    "study_constraints",
    "study_row",
    "x_metrics",
]

#: Marker symbol and colour of each trial kind, so hand-made points never pass for search results.
KIND_STYLE: Mapping[str, tuple[str, str]] = {
    "baseline": ("square", "#1f77b4"),
    "seed": ("diamond", "#ff7f0e"),
    "searched": ("circle", "#2ca02c"),
    "retry": ("circle-dot", "#9467bd"),
    "warm": ("triangle-up", "#8c564b"),
}
#: The speed axis: speedup against the study's reference setting, or the latency itself.
X_METRICS = ("speedup", "latency_ms")
_COST = {row.name for row in METRIC_TABLE if row.kind == "cost"}


def metric_of(name: str, trials: Iterable[TrialRecord] = ()) -> MetricSpec:
    """Metric ``name``'s direction and unit as stored with these trials, else as difftune knows it."""
    for trial in trials:
        stored = trial.metric(name)
        if stored is not None:
            return MetricSpec(name, stored.direction, stored.unit)
    return METRICS.get(name) or MetricSpec(name, "maximize", "")


def fmt(value: float | None, unit: str = "") -> str:
    """A figure with 4 significant digits and its unit (``"2.31 ×"``, ``"31.2 dB"``); ``""`` for None."""
    if value is None:
        return ""
    text = f"{value:.4g}"
    return f"{text} {unit}".strip() if unit and unit not in ("fraction", "ratio") else text


# -- trials ------------------------------------------------------------------------------------------


def point_label(trial: TrialRecord) -> str:
    """The hand-made method's name of a baseline or seed, ``"retry of trial N"`` for a retry, ``"warm: <study>#N"``
    for a warm-start point, else ``""``."""
    config = trial.config or {}
    if trial.kind == "retry":
        return f"retry of trial {config.get('retry_of', '?')}"
    if trial.kind == "warm":
        return f"warm: {config.get('warm', '?')}"
    return str(config.get("baseline") or config.get("seed") or "")


def point_title(trial: TrialRecord) -> str:
    """``"trial 7 · fora_3 (baseline)"``, ``"trial 12 (searched)"``, ``"trial 18 (retry of trial 17)"``."""
    label = point_label(trial)
    if trial.kind == "retry":
        return f"trial {trial.number} ({label})"
    return f"trial {trial.number}{f' · {label}' if label else ''} ({trial.kind})"


def study_constraints(study: StudyRecord) -> tuple[str, ...]:
    """The bounds stored with the study (``calibrate --constraint``); its fronts show only points meeting them."""
    return tuple(str(c) for c in (study.reference or {}).get("constraints") or ())


def quality_metrics(study: StudyRecord, trials: Sequence[TrialRecord]) -> list[str]:
    """The stored metrics a front's y axis can show (every one that is not a cost): the study's objectives
    first, then the others by name."""
    stored = {name for t in trials for name in t.values()}
    stored |= {name for t in trials for name in t.values(HELD_OUT)}
    objectives = [o.name for o in study.objectives if o.name in stored and o.name not in _COST]
    rest = sorted(n for n in stored if n not in _COST and n not in objectives)
    return objectives + rest


def x_metrics(trials: Sequence[TrialRecord]) -> list[str]:
    """The speed metrics the trials have: ``speedup`` and / or ``latency_ms``."""
    stored = {name for t in trials for name in t.values()}
    return [n for n in X_METRICS if n in stored]


def study_row(store: Store, study: StudyRecord) -> dict[str, Any]:
    """One row of the studies table: what the study is, how far it got, and its front's size."""
    counts = {state: store.count_trials(study.id, state) for state in TrialState}
    settings = study.reference or {}
    try:
        front = len(store.pareto_front(study.id, constraints=study_constraints(study)))
    except DifftuneError:  # a study none of whose trials measured its objectives yet has no front
        front = 0
    finished = store.count_budget_trials(study.id)
    return {
        "study": study.name,
        "space": study.space,
        "searcher": study.searcher,
        "status": study.status.value,
        "finished": f"{finished} / {study.budget}" if study.budget else str(finished),
        "complete": counts[TrialState.COMPLETE],
        "failed": counts[TrialState.FAILED],
        "running": counts[TrialState.RUNNING],
        "front": front,
        "objectives": ", ".join(f"{o.name} {'↑' if o.direction == 'maximize' else '↓'}" for o in study.objectives),
        "device": " ".join(str(v) for v in (settings.get("device") or "cpu", settings.get("dtype") or "") if v),
        "created": study.created_at.strftime("%Y-%m-%d %H:%M"),
    }


# -- the front ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlotPoint:
    """One trial on the front chart; ``status`` is ``front``, ``dominated``, ``infeasible`` (misses a bound of
    the study) or ``failed``."""

    number: int
    kind: str
    x: float
    y: float
    status: str
    hover: str


def plot_points(
    trials: Sequence[TrialRecord],
    front_ids: Iterable[int],
    x: str,
    y: str,
    *,
    constraints: Sequence[str] = (),
    select: str | None = None,
    kinds: Iterable[str] = TRIAL_KINDS,
    show_dominated: bool = True,
    show_failed: bool = True,
) -> list[PlotPoint]:
    """The trials that have both ``x`` and ``y``, classified for the chart.

    ``select`` (a ``--select`` expression) keeps only the points that meet its constraints; ``kinds``
    only those kinds. Dominated and infeasible points are dropped unless ``show_dominated``, failed
    (and pruned or interrupted) ones unless ``show_failed``.
    """
    on_front = set(front_ids)
    rules = [parse_constraint(c) for c in constraints]
    wanted = set(kinds)
    selection = parse_select(select) if select else None
    specs = {name: metric_of(name, trials) for name in (x, y)}
    out = []
    for trial in trials:
        values = trial.values()
        if x not in values or y not in values or trial.kind not in wanted:
            continue
        if selection is not None and not meets(selection, values):
            continue
        if trial.state is TrialState.COMPLETE:
            if trial.id in on_front:
                status = "front"
            elif not all(r.metric in values and r.satisfied(values[r.metric]) for r in rules):
                status = "infeasible"
            else:
                status = "dominated"
        elif trial.state is TrialState.RUNNING:
            continue
        else:
            status = "failed"
        if status in ("dominated", "infeasible") and not show_dominated:
            continue
        if status == "failed" and not show_failed:
            continue
        out.append(PlotPoint(trial.number, trial.kind, values[x], values[y], status, _hover(trial, status, specs)))
    return out


def _hover(trial: TrialRecord, status: str, axes: Mapping[str, MetricSpec]) -> str:
    values = trial.values()
    figures = " · ".join(f"{name} {fmt(values[name], spec.unit)}" for name, spec in axes.items())
    where = {"front": "on the front", "dominated": "dominated", "infeasible": "misses a bound", "failed": "failed"}
    lines = [f"<b>{point_title(trial)}</b> — {where[status]}", figures]
    extra = [f"{n} {fmt(values[n])}" for n in ("nfe", "latency_ms") if n in values and n not in axes]
    if extra:
        lines.append(" · ".join(extra))
    lines += section_summaries(profile_of(trial))
    if trial.error:
        lines.append(f"error: {trial.error[:120]}")
    return "<br>".join(lines)


def front_line(points: Sequence[PlotPoint], x: MetricSpec, y: MetricSpec) -> list[PlotPoint]:
    """The points no other shown complete, feasible point beats on both axes, by ``x`` (the chart's 2-D front)."""
    candidates = [p for p in points if p.status in ("front", "dominated")]
    if not candidates:
        return []
    mask = non_dominated([[p.x, p.y] for p in candidates], [x.direction, y.direction])
    return sorted((p for p, keep in zip(candidates, mask, strict=True) if keep), key=lambda p: (p.x, p.y))


# -- a trial's settings ------------------------------------------------------------------------------


def profile_of(trial: TrialRecord) -> dict[str, Any] | None:
    """The profile JSON the runner stored with ``trial`` (``None`` before its decoding was stored)."""
    profile = (trial.config or {}).get("profile")
    return profile if isinstance(profile, dict) else None


def mask_of(cache: Mapping[str, Any] | None) -> tuple[list[str], list[list[list[int]]]] | None:
    """A cache mask section's component names and its steps × blocks × components mask (``None`` for a policy)."""
    if not isinstance(cache, Mapping) or cache.get("kind") != "mask":
        return None
    mask = cache.get("mask") or []
    components = [str(c) for c in cache.get("components") or []]
    return components, [[[int(v) for v in block] for block in step] for step in mask]


def _reused_share(mask: Sequence[Sequence[Sequence[int]]]) -> float:
    cells = [v for step in mask for block in step for v in block]
    return 1.0 - sum(cells) / len(cells) if cells else 0.0


def _run(values: Sequence[Any]) -> str:
    return "·".join(str(v) for v in values)


def section_summaries(profile: Mapping[str, Any] | None) -> list[str]:
    """One line per acceleration section of ``profile``: what it does, in a few words (the chart's hover)."""
    if not profile:
        return ["no stored profile"]
    steps = (profile.get("context") or {}).get("num_inference_steps")
    lines = []
    solver = profile.get("solver")
    if isinstance(solver, Mapping):
        rows = solver_rows(solver)
        correctors = sum(1 for r in rows if r["corrector"])
        ratios = [r["dc_ratio"] for r in rows if r["dc_ratio"] != 1.0]
        text = f"solver: {len(rows)} steps, orders {_run([r['order'] for r in rows])}"
        predictions = sorted({str(r["prediction"]) for r in rows})
        text += f", {'/'.join(predictions)} prediction"
        if correctors:
            text += f", UniC on {correctors}"
        if ratios:
            text += f", DC ratios {min(ratios):.3g}–{max(ratios):.3g}"
        lines.append(text)
    cache = profile.get("cache")
    grid = mask_of(cache)
    if grid is not None:
        components, mask = grid
        blocks = len(mask[0]) if mask else 0
        lines.append(
            f"cache mask: {len(mask)} steps × {blocks} blocks × {len(components)} components, "
            f"{100 * _reused_share(mask):.0f} % reused"
        )
    elif isinstance(cache, Mapping):
        settings = ", ".join(f"{k}={v}" for k, v in cache.items() if k not in ("kind", "policy"))
        lines.append(f"cache policy: {cache.get('policy', '?')}{f' ({settings})' if settings else ''}")
    sparsity = profile.get("sparsity")
    if isinstance(sparsity, Mapping):
        start, end = _acc_range(sparsity)
        most = sparsity.get("max_interval")
        lines.append(f"SADA: τ={sparsity.get('threshold')}, steps {start}–{end}, ≤{most} skipped in a row")
    quant = profile.get("quantization")
    if isinstance(quant, Mapping):
        default = quant.get("default") or {}
        layers = quant.get("layers") or {}
        lines.append(
            f"quantization: W{default.get('weight_bits', 16)}A{default.get('activation_bits', 16)} by default"
            f"{f', {len(layers)} layers differ' if layers else ''} ({quant.get('backend', 'simulated')})"
        )
    if not lines:
        lines.append(f"no acceleration: the plain pipeline at {steps} steps")
    elif steps is not None and not isinstance(solver, Mapping):
        lines.append(f"{steps} denoising steps")
    return lines


def _acc_range(sparsity: Mapping[str, Any]) -> tuple[int, int]:
    acc = sparsity.get("acc_range")
    return (int(acc[0]), int(acc[1])) if isinstance(acc, Sequence) and len(acc) == 2 else (0, 0)


def solver_rows(solver: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per model evaluation of a solver section: its timestep and decisions."""
    timesteps = list(solver.get("timesteps") or [])
    steps = list(solver.get("steps") or [])
    rows = []
    for index, timestep in enumerate(timesteps):
        step = steps[index] if index < len(steps) and isinstance(steps[index], Mapping) else {}
        rows.append(
            {
                "step": index,
                "timestep": float(timestep),
                "order": int(step.get("order", 1)),
                "prediction": str(step.get("prediction", "data")),
                "corrector": bool(step.get("corrector", False)),
                "dc_ratio": float(step.get("dc_ratio", 1.0)),
            }
        )
    return rows


#: What each SADA knob does (difftune.accel.sada.SADAConfig), shown beside its value.
SADA_MEANINGS: Mapping[str, str] = {
    "threshold": "τ: skip the next step when the mean momentum is ≤ τ (larger skips more)",
    "acc_range": "steps start … end−1 may skip the step after them (start is raised to 3)",
    "max_interval": "at most this many skipped steps in a row; token caches refresh this often",
    "lagrange_term": "points of the Lagrange extrapolation of x̂₀ (0: no Lagrange phase)",
    "lagrange_step": "the Lagrange phase starts here: every step n with n % lagrange_int ≠ 0 skips the next",
    "lagrange_int": "spacing of the Lagrange nodes and period of computed steps in that phase",
    "sx": "token-pruning window: columns",
    "sy": "token-pruning window: rows",
    "max_downsample": "token pruning on blocks at most this many times coarser than the latent (0: off)",
    "max_fix": "at most this many tokens computed for their momentum",
}


def sada_rows(sparsity: Mapping[str, Any]) -> list[dict[str, str]]:
    """The SADA section's settings with what each does."""
    return [
        {"setting": key, "value": json.dumps(value), "meaning": SADA_MEANINGS.get(key, "")}
        for key, value in sparsity.items()
        if key != "kind"
    ]


def sada_phases(sparsity: Mapping[str, Any], steps: int) -> list[str]:
    """Per step, which rule SADA applies after it: ``computed`` (never skips the next step), ``momentum``
    (skips it when the stability criterion holds) or ``lagrange`` (skips it on the Lagrange schedule).

    The skips themselves are decided while the pipeline runs, from the trajectory; these are the windows.
    """
    start, end = _acc_range(sparsity)
    start = max(start, 3)
    term = int(sparsity.get("lagrange_term") or 0)
    lagrange_step = int(sparsity.get("lagrange_step") or 0)
    lagrange_int = max(int(sparsity.get("lagrange_int") or 1), 1)
    phases = []
    for n in range(steps):
        if not start <= n < end:
            phases.append("computed")
        elif term and n >= lagrange_step:
            phases.append("lagrange" if n % lagrange_int else "computed")
        else:
            phases.append("momentum")
    return phases


def quant_rows(quant: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The quantization section as rows: the default first, then each layer with its overrides applied."""
    default = dict(quant.get("default") or {})
    base = {"weight_bits": 16, "activation_bits": 16, **default}
    rows = [{"layer": "(every other layer)", **base}]
    for path, override in sorted((quant.get("layers") or {}).items()):
        rows.append({"layer": str(path), **base, **dict(override or {})})
    return rows


# -- metrics -----------------------------------------------------------------------------------------


def metric_rows(trial: TrialRecord, objectives: Sequence[MetricSpec] = ()) -> list[dict[str, Any]]:
    """The trial's metrics: calibration and held-out figures side by side, the objectives first."""
    calibration, held = trial.values(), trial.values(HELD_OUT)
    objective_names = [o.name for o in objectives]
    names = [n for n in objective_names if n in calibration or n in held]
    names += sorted(n for n in {*calibration, *held} if n not in names)
    rows = []
    for name in names:
        record = trial.metric(name) or trial.metric(name, HELD_OUT)
        assert record is not None
        cal, out = calibration.get(name), held.get(name)
        rows.append(
            {
                "metric": name + (" (objective)" if name in objective_names else ""),
                "unit": record.unit,
                "better": "↑" if record.direction == "maximize" else "↓",
                "calibration": cal,
                "held-out": out,
                "held-out − calibration": None if cal is None or out is None else out - cal,
            }
        )
    return rows


# -- hypervolume -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HypervolumePoint:
    """The hypervolume of the front of the feasible complete trials numbered up to ``number``; ``improved``: trial
    ``number`` raised it."""

    number: int
    hypervolume: float
    kind: str
    improved: bool


def _feasible(study: StudyRecord, trials: Sequence[TrialRecord]) -> list[TrialRecord]:
    rules = [parse_constraint(c) for c in study_constraints(study)]
    names = [o.name for o in study.objectives]
    out = []
    for trial in sorted(trials, key=lambda t: t.number):
        values = trial.values()
        if trial.state is not TrialState.COMPLETE or not all(n in values for n in names):
            continue
        if all(r.metric in values and r.satisfied(values[r.metric]) for r in rules):
            out.append(trial)
    return out


def hypervolume_history(study: StudyRecord, trials: Sequence[TrialRecord]) -> list[HypervolumePoint]:
    """Per feasible complete trial, in trial-number order, the hypervolume of the front so far.

    The reference point and the hypervolume are the runner's (:func:`difftune.search.runner.front_hypervolume`,
    the figure ``calibrate``'s progress bar shows), taken over the non-dominated trials so far.
    """
    from difftune.search.runner import front_hypervolume

    specs = list(study.objectives)
    directions = [s.direction for s in specs]
    front: list[TrialRecord] = []
    value = 0.0
    out = []
    for trial in _feasible(study, trials):
        candidates = [*front, trial]
        mask = non_dominated([[t.values()[s.name] for s in specs] for t in candidates], directions)
        front = [t for t, keep in zip(candidates, mask, strict=True) if keep]
        before = value
        if mask[-1]:  # the new trial is on the front: the volume may have grown
            value = front_hypervolume(specs, front)
        out.append(HypervolumePoint(trial.number, value, trial.kind, value > before))
    return out


def handmade_hypervolume(study: StudyRecord, trials: Sequence[TrialRecord]) -> float:
    """The hypervolume of the hand-made points alone (baselines and seeds): what the search started from."""
    from difftune.search.runner import front_hypervolume

    handmade = [t for t in _feasible(study, trials) if t.kind in ("baseline", "seed")]
    if not handmade:
        return 0.0
    specs = list(study.objectives)
    mask = non_dominated([[t.values()[s.name] for s in specs] for t in handmade], [s.direction for s in specs])
    return front_hypervolume(specs, [t for t, keep in zip(handmade, mask, strict=True) if keep])


# -- export ------------------------------------------------------------------------------------------


def _bound(value: float, digits: int, op: str) -> float:
    """``value`` rounded to ``digits`` significant digits, towards the side ``op`` keeps (down for ``>=``)."""
    if value == 0 or not math.isfinite(value):
        return value
    scale = 10 ** (digits - 1 - math.floor(math.log10(abs(value))))
    rounded = (math.floor if op == ">=" else math.ceil)(value * scale) / scale
    return rounded


def select_expression_for(trial: TrialRecord, front: Sequence[TrialRecord], objectives: Sequence[MetricSpec]) -> str:
    """The shortest ``--select`` expression whose pick on the calibration figures is ``trial`` (a front point):
    ``fastest`` (or the best first objective) where every other objective is at least as good as the trial's,
    rounded to as few digits as keep the pick. ``""`` when no expression picks it (it is not on the front)."""
    if trial.id not in {t.id for t in front}:
        return ""
    values = trial.values()
    names = [o.name for o in objectives]
    speed = [n for n in X_METRICS if n in names]
    goal_metric = speed[0] if speed else names[0]
    goal = "fastest" if speed else f"best {goal_metric}"
    others = [o for o in objectives if o.name != goal_metric and o.name in values]
    for digits in range(2, 18):
        parts = []
        for spec in others:
            op = ">=" if spec.direction == "maximize" else "<="
            parts.append(f"{spec.name}{op}{_number(_bound(values[spec.name], digits, op), digits)}")
        expr = f"{goal} where {' and '.join(parts)}" if parts else goal
        try:
            if rank_points(front, expr)[0].id == trial.id:
                return expr
        except DifftuneError:  # a bound that admits no point: try more digits
            continue
    return ""


def _number(value: float, digits: int) -> str:
    text = f"{value:.{digits}g}"
    return repr(float(text)) if "e" in text and 1e-4 <= abs(value) < 1e16 else text


@dataclass(frozen=True)
class ExportedFile:
    """What the export button offers for download, and what the export did."""

    file_name: str
    data: bytes
    mime: str
    trial: int  # the trial whose profile was written
    select: str
    format: str
    validated: bool
    held_out: dict[str, float] = field(default_factory=dict)
    rejected: tuple[int, ...] = ()  # trials re-measured first that missed the selection on held-out samples
    messages: tuple[str, ...] = ()  # warnings and notes, as `difftune export` prints them


def export_file(
    store: Store,
    study: str,
    select: str,
    *,
    format: str = "difftune",
    validate: bool = True,
    progress: Callable[[str], None] | None = None,
    pipeline: Any = None,
) -> ExportedFile:
    """Run :func:`difftune.search.export.export_point` — what ``difftune export`` runs, with the same
    held-out re-measurement — into a temporary path and return the bytes it wrote (a ``diffusers``
    directory as a zip).

    Raises:
        DifftuneError: as ``difftune export`` (a malformed selection, no point meeting it, …); nothing is
            offered then.
    """
    from difftune.search.export import export_point

    with tempfile.TemporaryDirectory(prefix="difftune-export-") as tmp:
        out = Path(tmp) / ("profile.json" if format == "difftune" else "profile")
        result = export_point(
            store, study, select, out, format=format, validate=validate, progress=progress, pipeline=pipeline
        )
        stem = f"{study}-trial{result.trial.number}"
        if format == "difftune":
            data, name, mime = out.read_bytes(), f"{stem}.json", "application/json"
        else:
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
                for path in sorted(out.rglob("*")):
                    if path.is_file():
                        archive.write(path, Path(f"{stem}-{format}") / path.relative_to(out))
            data, name, mime = buffer.getvalue(), f"{stem}-{format}.zip", "application/zip"
    return ExportedFile(
        file_name=name,
        data=data,
        mime=mime,
        trial=result.trial.number,
        select=select,
        format=format,
        validated=result.validated,
        held_out=dict(result.held_out),
        rejected=tuple(t.number for t in result.rejected),
        messages=tuple(result.warnings) + tuple(result.notes),
    )


def default_select(study: StudyRecord, front: Sequence[TrialRecord]) -> str:
    """A ``--select`` expression to start from: the fastest point at least as good as the front's median in the
    study's first quality objective (``"fastest where psnr>=31"``), else the best first objective."""
    names = [o.name for o in study.objectives]
    quality = [o for o in study.objectives if o.name not in _COST]
    if not front or not quality or not any(n in X_METRICS for n in names):
        return f"best {names[0]}"
    spec = quality[0]
    values = sorted(v for t in front if (v := t.value(spec.name)) is not None and math.isfinite(v))
    if not values:
        return "fastest"
    median = values[len(values) // 2]
    op = ">=" if spec.direction == "maximize" else "<="
    return f"fastest where {spec.name}{op}{_number(_bound(median, 3, op), 3)}"


def enlarge(png: bytes, min_px: int = 96) -> bytes:
    """``png`` scaled up by a whole factor (nearest neighbour: pixels stay crisp) until its longer side reaches
    ``min_px``; larger images are returned as they are."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        longest = max(image.size)
        if longest >= min_px:
            return png
        factor = -(-min_px // longest)
        big = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
        buffer = io.BytesIO()
        big.save(buffer, format="PNG")
        return buffer.getvalue()
