"""Free placement and continuous fitting: move a solver schedule's timesteps, and fit its per-step continuous knobs,
to where its images come closest to a fine reference.

USF's decision space includes the timestep grid itself (free placement of every step; its evolution
jitters each timestep) and per-step continuous choices (the relaxation factor of the first derivative);
DC-Solver's compensation ratios are one per step, fitted against a fine trajectory. The ``solver`` space
searches placements as parametric grids (family, start, end, warp) and the continuous knobs on coarse
grids, which keeps its points encodable; this module then frees them around a searched schedule, with
every discrete decision (orders, predictions, correctors, active points, analytical first step) fixed:

- :func:`polish_timesteps` moves the evaluation points (all but the first, which stays the noisiest
  point, and the analytical first step's) by Nelder–Mead in log σ (log odds for flow-matching models);
- :func:`polish_schedule` fits the timesteps together with each step's relaxation factor and each DC
  ratio (steps 3 on, data or noise prediction: the reference fixes the first two at 1) by CMA-ES.

Both minimise the MSE of the pipeline's images against the plain pipeline at ``reference_steps`` on
calibration samples — one pipeline run per evaluation, no gradients. Points that would cross or
leave the trained range, and knobs outside their ranges (relaxation −1…1.5, ratio 0.5…1.5), score as
infinitely bad. DPM-Solver-v3 steps get their statistics' rows rebuilt for the new points (pass the
:class:`~difftune.accel._ems.EMS`).

Use more calibration samples than a study does (40 or more): with 10, the placement fits those
samples' noise (embedded model, NFE 5: on 10 samples the calibration MSE fell to 0.19 of the start's
and the held-out MSE reached 0.45 of DPM-Solver++'s best spacing; on 40 samples 0.28 and 0.38)::

    >>> from difftune.search.polish import polish_schedule
    >>> result = polish_schedule(pipe, schedule, samples, reference_steps=200, evaluations=300)
    >>> result.schedule, result.initial_mse, result.final_mse
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from difftune.accel.solver import SolverSchedule, USFScheduler, relaxable
from difftune.errors import SpaceError
from difftune.search._common import positive_int

__all__ = ["KNOBS", "PolishResult", "polish_schedule", "polish_timesteps"]

#: What :func:`polish_schedule` can fit: the free timesteps, the steps' relaxation factors, the DC ratios.
KNOBS = ("timesteps", "relaxation", "dc_ratio")
#: The ranges of the continuous knobs (USF's searched relaxations hold −0.38 … 0.5; DC-Solver searches 1 ± 0.5).
RELAXATION_RANGE = (-1.0, 1.5)
DC_RATIO_RANGE = (0.5, 1.5)
#: What CMA-ES is told for a candidate that cannot run (it needs finite values to rank).
_WORST = 1e9
#: With ``min_sharpness``: a candidate's MSE is scaled by 1 + this × its sharpness shortfall (0.01 short: ×1.2).
_SHARPNESS_PENALTY = 20.0


@dataclass(frozen=True)
class PolishResult:
    """A polished schedule and how it got there (MSE against the fine reference on the samples given)."""

    schedule: SolverSchedule
    initial_mse: float
    final_mse: float
    evaluations: int
    seconds: float
    #: The knobs that were fitted (a subset of :data:`KNOBS`).
    knobs: tuple[str, ...] = ("timesteps",)
    #: The kept schedule's sharpness against the target on the samples (:mod:`difftune.evaluators.sharpness`).
    sharpness: float = math.nan


def _coordinates(usf: USFScheduler) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    """timesteps ↔ an unbounded coordinate: log σ (VP) or the log odds log(σ/(1 − σ)) (flow matching)."""

    def to_z(t: np.ndarray) -> np.ndarray:
        sigma = usf._timestep_to_sigma(t)
        return np.log(sigma / (1.0 - sigma)) if usf.config.use_flow_sigmas else np.log(sigma)

    def to_t(z: np.ndarray) -> np.ndarray:
        sigma = 1.0 / (1.0 + np.exp(-z)) if usf.config.use_flow_sigmas else np.exp(z)
        return usf._sigma_to_timestep(sigma)

    return to_z, to_t


def polish_timesteps(
    pipe: Any,
    schedule: SolverSchedule,
    samples: Sequence[Any],
    *,
    reference_steps: int = 200,
    evaluations: int = 150,
    ems: Any = None,
    guidance_scale: float | None = None,
    call_kwargs: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> PolishResult:
    """Move ``schedule``'s free timesteps to minimise the MSE against ``reference_steps`` plain steps on ``samples``.

    Nelder–Mead in log σ over the evaluation points but the first (and the analytical step's); every
    per-step decision stays.

    Args:
        pipe: the pipeline (its scheduler is swapped per evaluation and restored).
        schedule: the schedule to polish; its per-step decisions, first timestep and analytical first step stay.
        samples: :class:`~difftune.evaluators.Sample` s (use more than a study's; never held-out ones).
        reference_steps: steps of the plain pipeline whose images are the target (cached on disk).
        evaluations: pipeline runs Nelder–Mead may make (the starting point is one of them).
        ems: the DPM-Solver-v3 statistics, needed when the schedule has v3 steps.
        guidance_scale, call_kwargs: the call (as the study's).

    Raises:
        SpaceError: bad arguments, fewer than one free timestep, or v3 steps without ``ems``.
    """
    return _polish(
        pipe,
        schedule,
        samples,
        knobs=("timesteps",),
        optimizer="nelder-mead",
        free_start=False,
        min_sharpness=None,
        reference_steps=reference_steps,
        evaluations=evaluations,
        ems=ems,
        guidance_scale=guidance_scale,
        call_kwargs=call_kwargs,
        progress=progress,
        seed=0,
    )


def polish_schedule(
    pipe: Any,
    schedule: SolverSchedule,
    samples: Sequence[Any],
    *,
    knobs: Sequence[str] = KNOBS,
    reference_steps: int = 200,
    evaluations: int = 300,
    free_start: bool = True,
    min_sharpness: float | None = None,
    seed: int = 0,
    ems: Any = None,
    guidance_scale: float | None = None,
    call_kwargs: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> PolishResult:
    """Fit ``schedule``'s free timesteps, relaxation factors and DC ratios together by CMA-ES.

    The vector CMA-ES moves is the free timesteps in log σ (as :func:`polish_timesteps`), then the
    relaxation factor of every step that has one (order ≥ 2, not UniP-3/4), then the DC ratio of every
    data- or noise-prediction step from the third on; knobs not named in ``knobs`` stay as they are.
    Every evaluation is one pipeline run on ``samples`` against the plain pipeline at ``reference_steps``.

    Embedded model, NFE 4, 40 calibration samples, 300 runs (~60 s on 2 cores), MSE on 40 held-out
    seeds vs 200 steps: a UniPC grid with an analytical first step went from 0.66 of DPM-Solver++'s
    best spacing to 0.20 with its timesteps fitted alone and 0.13 with the three knobs.

    Args:
        knobs: which of :data:`KNOBS` to fit.
        evaluations: pipeline runs CMA-ES may make (the starting point is one of them).
        free_start: move the first timestep (where the pure noise is taken to sit: diffusers' "leading"
            spacing starts below the trained maximum and is often the best baseline at few steps) and the
            analytical first step's first evaluation too; ``False`` keeps them, as :func:`polish_timesteps`.
        min_sharpness: a guard against blur (MSE-optimal schedules drift towards the posterior mean): a
            candidate whose images' sharpness against the target falls below it has its MSE scaled up by
            1 + 20 × the shortfall for CMA-ES, and the kept schedule is the lowest-MSE one that keeps it
            (the lowest-MSE one if none does; :attr:`PolishResult.sharpness` says). E.g. a baseline's
            sharpness on the same samples.
        seed: CMA-ES's seed (the fit is reproducible for a given seed and machine).
        pipe, schedule, samples, reference_steps, ems, guidance_scale, call_kwargs: as :func:`polish_timesteps`.

    Raises:
        SpaceError: bad arguments, an unknown knob, nothing to fit, or v3 steps without ``ems``.
    """
    return _polish(
        pipe,
        schedule,
        samples,
        knobs=tuple(knobs),
        optimizer="cma",
        free_start=free_start,
        min_sharpness=min_sharpness,
        reference_steps=reference_steps,
        evaluations=evaluations,
        ems=ems,
        guidance_scale=guidance_scale,
        call_kwargs=call_kwargs,
        progress=progress,
        seed=seed,
    )


def _knob_steps(schedule: SolverSchedule, knobs: Sequence[str]) -> tuple[list[int], list[int]]:
    """The steps whose relaxation, and whose DC ratio, the fit moves."""
    relax = [
        i
        for i, step in enumerate(schedule.steps)
        if "relaxation" in knobs
        and i >= 1
        and step.order >= 2
        and relaxable(step.order, step.corrector, step.corrector_kind)
    ]
    ratio = [
        i
        for i, step in enumerate(schedule.steps)
        if "dc_ratio" in knobs and i >= 2 and step.prediction in ("data", "noise")
    ]
    return relax, ratio


def _polish(
    pipe: Any,
    schedule: SolverSchedule,
    samples: Sequence[Any],
    *,
    knobs: tuple[str, ...],
    optimizer: str,
    free_start: bool,
    min_sharpness: float | None,
    reference_steps: int,
    evaluations: int,
    ems: Any,
    guidance_scale: float | None,
    call_kwargs: Mapping[str, Any] | None,
    progress: Callable[[str], None] | None,
    seed: int,
) -> PolishResult:
    from difftune.evaluators import Reference, batch_kwargs
    from difftune.evaluators.sharpness import sharpness_per_image

    evaluations = positive_int("evaluations", evaluations)
    if min_sharpness is not None and (
        isinstance(min_sharpness, bool)
        or not isinstance(min_sharpness, (int, float))
        or not 0.0 <= float(min_sharpness) <= 1.0
    ):
        raise SpaceError(
            f"min_sharpness: expected a number in [0, 1] (sharpness is capped at 1), got {min_sharpness!r}"
        )
    reference_steps = positive_int("reference_steps", reference_steps)
    if not isinstance(schedule, SolverSchedule):
        raise SpaceError(f"schedule: expected a SolverSchedule, got {schedule!r}")
    unknown = [k for k in knobs if k not in KNOBS]
    if unknown or not knobs:
        raise SpaceError(f"knobs: expected some of {list(KNOBS)}, got {list(knobs)}")
    pool = list(samples)
    if not pool:
        raise SpaceError("samples: expected at least one calibration sample")
    v3 = any(s.prediction == "v3" for s in schedule.steps)
    if v3 and ems is None:
        raise SpaceError("the schedule has DPM-Solver-v3 steps: pass the statistics (ems=) to rebuild their rows")
    # the noisiest point, and the analytical step's first evaluation, unless they move too
    fixed = 0 if free_start else 1 + int(schedule.analytic_first)
    free = schedule.num_steps - fixed if "timesteps" in knobs else 0
    if "timesteps" in knobs and free < 1:
        raise SpaceError(f"the schedule has {schedule.num_steps} timesteps and none free to move")
    relax, ratio = _knob_steps(schedule, knobs)
    if free + len(relax) + len(ratio) == 0:
        raise SpaceError(
            f"the schedule has no {' or '.join(knobs)} to fit (see polish_schedule for which steps have one)"
        )

    call: dict[str, Any] = dict(call_kwargs or {})
    if guidance_scale is not None:
        call["guidance_scale"] = float(guidance_scale)
    reference = Reference.from_pipeline(pipe, num_inference_steps=reference_steps, batch_size=len(pool), **call)
    target = reference.images(pool)
    usf = USFScheduler.from_schedule(schedule, pipe.scheduler)
    t_max = float(usf.config.num_train_timesteps - 1)
    t_min = 1.0 if usf.config.use_flow_sigmas else 0.0
    to_z, to_t = _coordinates(usf)
    head = np.asarray(schedule.timesteps[: schedule.num_steps - free], dtype=np.float64)
    bar = getattr(pipe, "_progress_bar_config", None)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)

    def build(x: np.ndarray) -> SolverSchedule | None:
        x = np.asarray(x, dtype=np.float64)
        t = np.concatenate([head, to_t(np.sort(x[:free])[::-1])])
        if not np.all(np.isfinite(t)) or t.min() < t_min or t.max() > t_max or np.any(np.diff(t) >= -1e-6):
            return None
        c = x[free : free + len(relax)]
        rho = 1.0 + x[free + len(relax) :]
        if np.any(c < RELAXATION_RANGE[0]) or np.any(c > RELAXATION_RANGE[1]):
            return None
        if np.any(rho < DC_RATIO_RANGE[0]) or np.any(rho > DC_RATIO_RANGE[1]):
            return None
        steps = list(schedule.steps)
        for i, value in zip(relax, c, strict=True):
            steps[i] = dataclasses.replace(steps[i], relaxation=float(value))
        for i, value in zip(ratio, rho, strict=True):
            steps[i] = dataclasses.replace(steps[i], dc_ratio=float(value))
        timesteps = tuple(float(v) for v in t)
        table = None
        if v3:
            table = ems.table(SolverSchedule.point_lambdas(timesteps, schedule.final_sigma, pipe.scheduler))
        try:
            return dataclasses.replace(schedule, timesteps=timesteps, steps=tuple(steps), ems=table)
        except Exception:  # e.g. a v3 step moved outside its statistics' range
            return None

    def measure(candidate: SolverSchedule) -> tuple[float, float]:
        """(MSE, sharpness) of the candidate's images against the target."""
        handle = candidate.apply(pipe)
        try:
            with torch.no_grad():
                out = pipe(**batch_kwargs(pool), **call, num_inference_steps=candidate.num_steps, output_type="pt")
        finally:
            handle.remove()
        images = out.images.float().cpu()
        value = float(((images - target) ** 2).mean())
        if not math.isfinite(value):
            return math.inf, 0.0
        return value, float(sharpness_per_image(images.clamp(0, 1), target).mean())

    count = 0
    # the kept point: feasible (sharp enough) before not, then the lowest MSE
    best: tuple[tuple[bool, float], SolverSchedule, float] = ((True, math.inf), schedule, math.nan)
    seen: dict[tuple[float, ...], float] = {}
    raw: dict[tuple[float, ...], float] = {}

    def objective(x: np.ndarray) -> float:
        nonlocal count, best
        key = tuple(float(v) for v in x)
        if key in seen:  # Nelder–Mead re-evaluates its starting point
            return seen[key]
        candidate = build(x)
        if candidate is None or count >= evaluations:
            return math.inf
        count += 1
        value, sharp = measure(candidate)
        shortfall = 0.0 if min_sharpness is None else max(0.0, min_sharpness - sharp)
        raw[key] = value
        seen[key] = value * (1.0 + _SHARPNESS_PENALTY * shortfall)
        if (shortfall > 0, value) < best[0]:
            best = ((shortfall > 0, value), candidate, sharp)
        if progress is not None and count % 10 == 0:
            progress(f"polish: {count}/{evaluations} evaluations, best MSE {best[0][1]:.3g}")
        return seen[key]

    started = time.perf_counter()
    try:
        x0 = np.concatenate(
            [
                to_z(np.asarray(schedule.timesteps[schedule.num_steps - free :], dtype=np.float64)),
                [schedule.steps[i].relaxation for i in relax],
                [schedule.steps[i].dc_ratio - 1.0 for i in ratio],
            ]
        )
        objective(x0)
        initial = raw.get(tuple(float(v) for v in x0), math.inf)
        if not math.isfinite(initial):
            raise SpaceError(
                "the schedule's own images are not finite (or its knobs are outside their ranges); nothing to polish"
            )
        if evaluations > 1 and optimizer == "nelder-mead":
            from scipy.optimize import minimize

            minimize(
                objective,
                x0,
                method="Nelder-Mead",
                options={"maxfev": evaluations - 1, "xatol": 1e-4, "fatol": 1e-9 * initial},
            )
        elif evaluations > 1:
            import cma

            options = {"maxfevals": evaluations - 1, "verbose": -9, "seed": seed + 1, "tolfun": 1e-9 * initial}
            es = cma.CMAEvolutionStrategy(x0, 0.15, options)
            while not es.stop() and count < evaluations:
                xs = es.ask()
                es.tell(xs, [min(objective(x), _WORST) for x in xs])
    finally:
        if bar is None:
            pipe.__dict__.pop("_progress_bar_config", None)
        else:
            pipe._progress_bar_config = bar
    return PolishResult(best[1], initial, best[0][1], count, time.perf_counter() - started, knobs, best[2])
