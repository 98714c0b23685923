"""Free timestep placement: move a solver schedule's timesteps to where its images come closest to a fine reference.

USF's decision space includes the timestep grid itself (free placement of every step; its evolution
jitters each timestep). The ``solver`` space searches placements as parametric grids (family, start,
end, warp), which keeps its points encodable; :func:`polish_timesteps` then frees them: with every
per-step decision fixed, the schedule's evaluation points (all but the first, which stays the noisiest
point, and the analytical first step's) are moved by Nelder–Mead in log σ (log odds for flow-matching
models) to minimise the MSE of the pipeline's images against the plain pipeline at
``reference_steps`` on calibration samples — one pipeline run per evaluation, no gradients. Points
that would cross or leave the trained range score as infinitely bad. DPM-Solver-v3 steps get their
statistics' rows rebuilt for the new points (pass the :class:`~difftune.accel._ems.EMS`).

Use more calibration samples than a study does (40 or more): with 10, the placement fits those
samples' noise (embedded model, NFE 5: on 10 samples the calibration MSE fell to 0.19 of the start's
and the held-out MSE reached 0.45 of DPM-Solver++'s best spacing; on 40 samples 0.28 and 0.38)::

    >>> from difftune.search.polish import polish_timesteps
    >>> result = polish_timesteps(pipe, schedule, samples, reference_steps=200, evaluations=150)
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

from difftune.accel.solver import SolverSchedule, USFScheduler
from difftune.errors import SpaceError
from difftune.search._common import positive_int

__all__ = ["PolishResult", "polish_timesteps"]


@dataclass(frozen=True)
class PolishResult:
    """A polished schedule and how it got there (MSE against the fine reference on the samples given)."""

    schedule: SolverSchedule
    initial_mse: float
    final_mse: float
    evaluations: int
    seconds: float


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
    from scipy.optimize import minimize

    from difftune.evaluators import Reference, batch_kwargs

    evaluations = positive_int("evaluations", evaluations)
    reference_steps = positive_int("reference_steps", reference_steps)
    if not isinstance(schedule, SolverSchedule):
        raise SpaceError(f"schedule: expected a SolverSchedule, got {schedule!r}")
    pool = list(samples)
    if not pool:
        raise SpaceError("samples: expected at least one calibration sample")
    v3 = any(s.prediction == "v3" for s in schedule.steps)
    if v3 and ems is None:
        raise SpaceError("the schedule has DPM-Solver-v3 steps: pass the statistics (ems=) to rebuild their rows")
    fixed = 1 + int(schedule.analytic_first)  # the noisiest point, and the analytical step's first evaluation
    free = schedule.num_steps - fixed
    if free < 1:
        raise SpaceError(f"the schedule has {schedule.num_steps} timesteps and none free to move")

    call: dict[str, Any] = dict(call_kwargs or {})
    if guidance_scale is not None:
        call["guidance_scale"] = float(guidance_scale)
    reference = Reference.from_pipeline(pipe, num_inference_steps=reference_steps, batch_size=len(pool), **call)
    target = reference.images(pool)
    usf = USFScheduler.from_schedule(schedule, pipe.scheduler)
    t_max = float(usf.config.num_train_timesteps - 1)
    t_min = 1.0 if usf.config.use_flow_sigmas else 0.0
    to_z, to_t = _coordinates(usf)
    head = np.asarray(schedule.timesteps[:fixed], dtype=np.float64)
    bar = getattr(pipe, "_progress_bar_config", None)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)

    def build(z: np.ndarray) -> SolverSchedule | None:
        t = np.concatenate([head, to_t(np.sort(np.asarray(z, dtype=np.float64))[::-1])])
        if not np.all(np.isfinite(t)) or t.min() < t_min or t.max() > t_max or np.any(np.diff(t) >= -1e-6):
            return None
        timesteps = tuple(float(v) for v in t)
        table = None
        if v3:
            table = ems.table(SolverSchedule.point_lambdas(timesteps, schedule.final_sigma, pipe.scheduler))
        try:
            return dataclasses.replace(schedule, timesteps=timesteps, ems=table)
        except Exception:  # e.g. a v3 step moved outside its statistics' range
            return None

    def mse(candidate: SolverSchedule) -> float:
        handle = candidate.apply(pipe)
        try:
            with torch.no_grad():
                out = pipe(**batch_kwargs(pool), **call, num_inference_steps=candidate.num_steps, output_type="pt")
        finally:
            handle.remove()
        value = float(((out.images.float().cpu() - target) ** 2).mean())
        return value if math.isfinite(value) else math.inf

    count = 0
    best: tuple[float, SolverSchedule] = (math.inf, schedule)
    seen: dict[tuple[float, ...], float] = {}

    def objective(z: np.ndarray) -> float:
        nonlocal count, best
        key = tuple(float(v) for v in z)
        if key in seen:  # Nelder–Mead re-evaluates its starting point
            return seen[key]
        candidate = build(z)
        if candidate is None:
            return math.inf
        count += 1
        value = seen[key] = mse(candidate)
        if value < best[0]:
            best = (value, candidate)
        if progress is not None and count % 10 == 0:
            progress(f"polish: {count}/{evaluations} evaluations, best MSE {best[0]:.3g}")
        return value

    started = time.perf_counter()
    try:
        z0 = to_z(np.asarray(schedule.timesteps[fixed:], dtype=np.float64))
        initial = objective(z0)
        if not math.isfinite(initial):
            raise SpaceError("the schedule's own images are not finite; nothing to polish")
        if evaluations > 1:
            minimize(
                objective,
                z0,
                method="Nelder-Mead",
                options={"maxfev": evaluations - 1, "xatol": 1e-4, "fatol": 1e-9 * initial},
            )
    finally:
        if bar is None:
            pipe.__dict__.pop("_progress_bar_config", None)
        else:
            pipe._progress_bar_config = bar
    return PolishResult(best[1], initial, best[0], count, time.perf_counter() - started)
