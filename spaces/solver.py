"""The ``solver`` space: USF solver schedules — how many steps, where, and how each step integrates.

A point decodes to a :class:`~difftune.accel.SolverSchedule` (profile section ``solver``): one
timestep (in the pipeline scheduler's own units) and one :class:`~difftune.accel.SolverStep` per
model evaluation, sampled by :class:`~difftune.accel.USFScheduler`.

Parametrisation — *global knobs plus per-step overrides*, chosen so that the common good
schedules are a few coordinated values away (TPE and NSGA-II both struggle to discover "order 2
on every step" from a dozen independent per-step dimensions) while USF's per-step freedom stays
reachable:

- ``nfe`` — model evaluations, within the context's ``nfe_range``.
- Timestep placement (5 dimensions; 4 for flow-matching models):

  - ``grid``: ``"linspace"`` / ``"leading"`` / ``"trailing"`` are diffusers' integer spacings,
    exactly as ``DPMSolverMultistepScheduler`` computes them (so every diffusers baseline is a
    point of the space); ``"time_uniform"``, ``"logsnr_uniform"`` and ``"karras"`` are continuous
    grids, uniform in t, in λ = log(α/σ), or in σ^(1/ρ) (flow models: in the unshifted time, so
    that the model's shift still applies, and in the odds σ/(1−σ) for the last two).
    Flow-matching models have ``"flow_sigmas"`` (the grid diffusers' DPM-Solver and UniPC use
    with ``use_flow_sigmas``, static shift) instead of the integer spacings.
  - ``t_start`` (VP models): where sampling starts, as a fraction of the trained range. The
    integer spacings use it as diffusers' clipped start (``last_timestep = round(t_start·T)``,
    what ``lambda_min_clipped`` produces); continuous grids start at ``t_start·(T−1)``.
  - ``t_end``: the last evaluation's timestep as a fraction of T (continuous grids; USF's
    "end time"); the final step always goes on to the scheduler's final noise level.
  - ``warp``: a power warp of the grid's uniform coordinate, uᵢ = (i/(n−1))^warp; > 1 puts more
    steps at high noise, < 1 more near the end (continuous grids).
  - ``karras_rho``: the Karras grid's exponent.

- Per-step solver decisions (5 global + one override per step up to the largest NFE):

  - ``order`` (1–4; 4 is USF's Taylor update over four evaluations, or UniP-4 with the corrector),
    ``corrector`` (UniC on every step that has a next evaluation) — the
    defaults of every step; warm-up (order ≤ evaluations so far) and the last step's limits
    apply to them silently, as in diffusers.
  - ``prediction`` (``"data"`` / ``"noise"``, and ``"v3"`` — DPM-Solver-v3 — when the study computed
    the model's statistics, ``--ems N``) and ``prediction_switch``: steps from index
    ``prediction_switch`` on use the other prediction (noise ↔ data; v3 → data) (a value ≥ NFE never
    switches). A v3 step's corrector is USF's (UniC is defined for data and noise), and a last step
    landing on σ = 0 — outside the statistics' λ range — uses the data prediction.
  - ``step_i``: ``"auto"`` (the global order and corrector) or an explicit ``"1"``, ``"2"``,
    ``"3"``, ``"1c"``, ``"2c"``, ``"3c"`` (order, ``c`` = with corrector) for step i. Overrides of
    steps beyond the point's NFE are ignored. :meth:`SolverSpace.repair` lowers an explicit order
    above the available history, removes an explicit corrector from the last step and lowers the
    last step to order 1 where it lands on σ = 0 (the only order defined there), and says so.

  - ``relaxation`` c (−0.5 … 0.5, default 0): USF's relaxation of the first derivative,
    F′·(1 + c·h), on every step but UniP-3/4 ones (order ≥ 3 with the corrector).

- UNets only: ``skip_0`` … ``skip_{K−1}`` (0.5 … 1, default 1): USF's U-Net skip coefficients, one per
  skip connection the decoder takes (K = 12 for SD 1.x/2.x), in the order it consumes them.

Variables: 11 + max NFE for VP models (23 with the default ``nfe_range=(3, 12)``), one fewer for
flow-matching models. Default searcher: TPE (mixed categorical / continuous, conditional knobs).

Baselines: DPM-Solver++(2M), UniPC (bh2, order 2 with corrector) and DDIM at every NFE in range,
each at the spacing measured best for the model (:func:`~difftune.spaces.best_spacing`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from difftune.accel._ems import StoredArray
from difftune.accel.solver import CORRECTOR_KINDS, MAX_ORDER, SolverSchedule, SolverStep, USFScheduler, relaxable
from difftune.errors import ProfileError, SpaceError

from ._base import NamedPoint, Space, SpaceContext, Variable, register_space
from ._spacing import (
    METHODS,
    SpacingChoice,
    _stored_kwargs,
    baseline_schedule,
    best_spacing,
    default_spacing,
    spacing_candidates,
)

__all__ = ["CONTINUOUS_GRIDS", "FLOW_GRIDS", "SPACING_GRIDS", "STEP_CHOICES", "SolverSpace"]

#: diffusers' integer timestep spacings (VP models only).
SPACING_GRIDS = ("linspace", "leading", "trailing")
#: diffusers' multistep solvers' grid for flow-matching models (``use_flow_sigmas``; flow models only).
FLOW_GRIDS = ("flow_sigmas",)
_FIXED_GRIDS = SPACING_GRIDS + FLOW_GRIDS
#: Continuous grids with free start, end and warp.
CONTINUOUS_GRIDS = ("time_uniform", "logsnr_uniform", "karras")
#: USF's relaxation factor range (its searched schedules hold −0.38 … 0.5).
RELAXATION_RANGE = (-0.5, 0.5)
#: A step's override: ``"auto"`` (the global knobs) or order 1–3, ``"c"`` = with UniC corrector.
STEP_CHOICES = ("auto", "1", "2", "3", "1c", "2c", "3c")
#: The prediction steps after ``prediction_switch`` use.
_OTHER = {"data": "noise", "noise": "data", "v3": "data"}
_METHOD_NAMES = {"dpmsolver++": "DPM-Solver++(2M)", "unipc": "UniPC (bh2, order 2, corrector)", "ddim": "DDIM"}
_T_START = (0.8, 1.0)
_T_END_HIGH = 0.3
_DECIMALS = 4  # continuous timesteps are rounded so that profiles stay readable
_ATOL = 2 * 10.0**-_DECIMALS  # encode's fitted grids reproduce timesteps up to that rounding
_FIT = {"xatol": 1e-9}


SKIP_RANGE = (0.5, 1.0)


def skip_count(context: SpaceContext) -> int:
    """The skip connections a UNet's decoder takes (one per up-block ResNet); 0 for other denoisers."""
    info = context.info
    if not info.components or info.components[0] != "resnets":
        return 0
    return sum(len(b.components[0]) for b in info.block_info if b.kind == "up")


class _Timeline:
    """A model's noise schedule: timestep ↔ the coordinates the grids are uniform in."""

    def __init__(self, scheduler_config: Mapping[str, Any]):
        base = {k: v for k, v in scheduler_config.items() if k != "schedule"}
        usf = USFScheduler.from_schedule(None, base)
        config = usf.config
        self.flow = bool(config.use_flow_sigmas)
        self.T = int(config.num_train_timesteps)
        self.shift = float(config.shift)
        self.steps_offset = int(config.steps_offset)
        self.final_zero = self.flow or config.final_sigmas_type == "zero"
        self.table = np.zeros(0)
        if not self.flow:
            ab = usf.alphas_cumprod.double().numpy()
            self.table = np.sqrt((1 - ab) / ab)
        # The last evaluation must stay above the final noise level (σ = 0 for flow, σ_min for "sigma_min").
        self.t_end_min = 1.0 / self.T if (self.flow or not self.final_zero) else 0.0

    def start(self, grid: str, t_start: float) -> float:
        if not self.flow:
            return t_start * (self.T - 1)
        return float(self.T) if grid == "time_uniform" else float(self.T - 1)  # odds are infinite at σ = 1

    def noise(self, t: np.ndarray) -> np.ndarray:
        """VP: diffusers' σ; flow: the odds σ/(1−σ) (both λ = −log of it)."""
        if self.flow:
            s = np.asarray(t, dtype=np.float64) / self.T
            return s / (1 - s)
        return np.interp(np.asarray(t, dtype=np.float64), np.arange(len(self.table)), self.table)

    def from_noise(self, v: np.ndarray) -> np.ndarray:
        if self.flow:
            return v / (1 + v) * self.T
        return np.interp(v, self.table, np.arange(len(self.table), dtype=np.float64))

    def coordinate(self, grid: str, t: np.ndarray, rho: float) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        if grid == "time_uniform":
            if not self.flow:
                return t
            s, k = t / self.T, self.shift
            return s / (k - (k - 1) * s)  # undo the flow shift: uniform in the unshifted time
        if grid == "logsnr_uniform":
            return np.log(self.noise(t))
        return self.noise(t) ** (1.0 / rho)

    def from_coordinate(self, grid: str, c: np.ndarray, rho: float) -> np.ndarray:
        if grid == "time_uniform":
            if not self.flow:
                return c
            k = self.shift
            return k * c / (1 + (k - 1) * c) * self.T
        if grid == "logsnr_uniform":
            return self.from_noise(np.exp(c))
        return self.from_noise(np.maximum(c, 0.0) ** rho)

    def spacing(self, grid: str, n: int, t_start: float) -> np.ndarray:
        """``DPMSolverMultistepScheduler``'s timesteps for ``timestep_spacing=grid`` (may not be ``n`` long)."""
        if grid == "flow_sigmas":
            # DPMSolverMultistep / UniPC with use_flow_sigmas (static shift), through their float32 sigmas.
            sigmas = 1.0 - np.linspace(1, 1 / self.T, n + 1)
            sigmas = (self.shift * sigmas / (1 + (self.shift - 1) * sigmas))[::-1][:-1]
            return sigmas.astype(np.float32).astype(np.float64) * self.T
        last = round(t_start * self.T)
        if grid == "linspace":
            return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.float64)
        if grid == "leading":
            ratio = last // (n + 1)
            return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.float64) + self.steps_offset
        return np.arange(last, 0, -self.T / n).round().astype(np.float64) - 1

    def continuous(
        self, grid: str, n: int, t_start: float, t_end: float, warp: float, rho: float, *, rounded: bool = True
    ) -> np.ndarray:
        first, last = self.start(grid, t_start), max(t_end, self.t_end_min) * self.T
        # Round the ends first: the interior then follows from ends that encode recovers exactly.
        first, last = round(first, _DECIMALS), round(last, _DECIMALS)
        if n == 1:
            return np.array([round(first, _DECIMALS)])
        u = (np.arange(n) / (n - 1)) ** warp
        c0, c1 = self.coordinate(grid, np.array([first, last]), rho)
        t = self.from_coordinate(grid, c0 + u * (c1 - c0), rho)
        t[0], t[-1] = first, last
        return np.round(t, _DECIMALS) if rounded else t


def _valid_grid(t: np.ndarray, n: int, timeline: _Timeline) -> bool:
    t_max = timeline.T if timeline.flow else timeline.T - 1
    return (
        len(t) == n
        and bool(np.all(np.isfinite(t)))
        and bool(np.all(np.diff(t) < 0))
        and t.min() >= timeline.t_end_min * timeline.T - 1e-9
        and t.max() <= t_max
    )


#: The ``points`` choices: earlier evaluations (offsets back) that order-2 and order-3 steps estimate their
#: derivatives from (order 4 has three and uses all three).
ACTIVE_POINTS: dict[str, dict[int, tuple[int, ...]]] = {
    "recent": {},
    "skip": {2: (2,), 3: (1, 3)},
    "far": {2: (3,), 3: (2, 3)},
}


def _points(choice: str, order: int, corrector: bool, i: int) -> tuple[int, ...]:
    """The chosen active points of step ``i`` (its ``i`` earlier evaluations bound them), or ``()``."""
    points = ACTIVE_POINTS[choice].get(order, ()) if not corrector else ()
    return points if points and max(points) <= i else ()


def _analytic_step(prediction: str) -> SolverStep:
    """The step of an analytical first step as the space decodes it: first order, no corrector (its prediction
    type does not change the update: with x̂₀ = 0 every first-order exponential integrator gives
    x₁ = σ₁/σ₀ · x_T)."""
    return SolverStep(order=1, prediction=prediction)


def _parse_step(choice: str) -> tuple[int, bool]:
    return int(choice[0]), choice.endswith("c")


def _step_choice(order: int, corrector: bool) -> str:
    return f"{order}{'c' if corrector else ''}"


@register_space("solver")
class SolverSpace(Space):
    """USF solver schedules: NFE, timestep placement and per-step order / prediction / corrector.

    See the module docstring for the parametrisation. ``decode`` gives ``{"solver": SolverSchedule}``.

        >>> space = get_space("solver")
        >>> context = SpaceContext.from_pipeline(pipe, nfe_range=(3, 12))
        >>> schedule = space.decode({"nfe": 6, "grid": "logsnr_uniform", "order": 3, "corrector": True}, context)
    """

    default_searcher = "tpe"
    sections = ("solver",)
    #: The study computes DPM-Solver-v3's statistics for this space when asked (``--ems``).
    uses_ems = True

    def __init__(self) -> None:
        self._timelines: dict[tuple[Any, ...], _Timeline] = {}

    def _timeline(self, context: SpaceContext) -> _Timeline:
        key = tuple(sorted((k, repr(v)) for k, v in context.scheduler_config.items()))
        if key not in self._timelines:
            self._timelines[key] = _Timeline(context.scheduler_config)
        return self._timelines[key]

    # ---- variables -------------------------------------------------------------------------

    def variables(self, context: SpaceContext) -> list[Variable]:
        timeline = self._timeline(context)
        lo, hi = context.nfe_range
        if timeline.flow:
            grids: tuple[str, ...] = FLOW_GRIDS + CONTINUOUS_GRIDS
            own = "flow_sigmas"
        else:
            grids = SPACING_GRIDS + CONTINUOUS_GRIDS
            spacing = context.scheduler_config.get("timestep_spacing", "linspace")
            own = spacing if spacing in SPACING_GRIDS else "linspace"
        out = [
            Variable("nfe", "int", lo, hi, default=(lo + hi) // 2, help="model evaluations (steps)"),
            Variable("grid", "categorical", choices=grids, default=own, help="timestep placement family"),
        ]
        if not timeline.flow:
            out.append(
                Variable(
                    "t_start",
                    "float",
                    *_T_START,
                    default=1.0,
                    help="first timestep as a fraction of the trained range (diffusers' clipped start)",
                )
            )
        t_end_low = timeline.t_end_min
        out += [
            Variable(
                "t_end",
                "float",
                t_end_low,
                _T_END_HIGH,
                default=t_end_low,
                help="last evaluated timestep / T (continuous grids)",
            ),
            Variable(
                "warp", "float", 0.5, 2.0, log=True, default=1.0, help="power warp of the grid (continuous grids)"
            ),
            Variable("karras_rho", "float", 1.0, 10.0, default=7.0, help="Karras grid exponent"),
            Variable("order", "int", 1, MAX_ORDER, default=2, help="default multistep order of every step"),
            Variable(
                "prediction",
                "categorical",
                choices=("data", "noise", "v3") if context.ems is not None else ("data", "noise"),
                default="data",
                help="what the integrator integrates before prediction_switch",
            ),
            Variable(
                "prediction_switch",
                "int",
                1,
                hi,
                default=hi,
                help="steps from this index on use the other prediction (>= NFE: never)",
            ),
            Variable("corrector", "bool", default=False, help="UniC corrector on every step with a next evaluation"),
            Variable(
                "corrector_kind",
                "categorical",
                choices=CORRECTOR_KINDS,
                default="unic",
                help="the corrector steps' kind: UniPC's UniC (bh2) or USF's pseudo corrector (Taylor, one order up)",
            ),
            Variable(
                "points",
                "categorical",
                choices=tuple(ACTIVE_POINTS),
                default="recent",
                help="USF's active points of order-2/3 steps without the corrector: the most recent earlier "
                "evaluations, or skip the newest ('skip'), or the farthest ('far')",
            ),
            Variable(
                "analytic_first",
                "bool",
                default=False,
                help="USF's analytical first step: x̂₀ = 0 at the first timestep, one more grid step for no model call",
            ),
            *(
                [
                    Variable(
                        "afs_x0",
                        "categorical",
                        choices=("zero", "average"),
                        default="zero",
                        help="the analytical first step's x̂₀: 0 (USF's zero_x0) or the model's mean clean sample "
                        "(average_x0, from the study's --ems trajectories)",
                    )
                ]
                if context.ems is not None and context.ems.x0_mean is not None
                else []
            ),
            Variable(
                "relaxation",
                "float",
                *RELAXATION_RANGE,
                default=0.0,
                help="USF's relaxation c: first derivatives scaled by 1 + c·h (not on UniP-3/4 steps)",
            ),
        ]
        out += [
            Variable(
                f"skip_{k}",
                "float",
                *SKIP_RANGE,
                default=1.0,
                help=f"USF's U-Net skip coefficient of the decoder's skip connection {k} (0 = the deepest)",
            )
            for k in range(skip_count(context))
        ]
        out += [
            Variable(
                f"step_{i}",
                "categorical",
                choices=STEP_CHOICES,
                default="auto",
                help=f"step {i}: 'auto' (global order/corrector) or explicit order, 'c' = corrector",
            )
            for i in range(hi)
        ]
        return out

    # ---- repair ----------------------------------------------------------------------------

    def _repair(self, params: dict[str, Any], context: SpaceContext) -> list[str]:
        timeline = self._timeline(context)
        changes: list[str] = []
        n = int(params["nfe"])
        m = n + int(bool(params.get("analytic_first", False)))  # grid steps: the analytical one has no evaluation
        grid = params["grid"]
        if grid in _FIXED_GRIDS:
            t = timeline.spacing(grid, m, params.get("t_start", 1.0))
            if not _valid_grid(t, m, timeline):
                # diffusers' trailing spacing steps by T/n from a clipped start, which loses steps.
                changes.append(
                    f"t_start: {grid} spacing from {params['t_start']:g} gives {len(t)} valid timesteps, not {m}; "
                    "set to 1.0"
                )
                params["t_start"] = 1.0
        else:
            t_start = params.get("t_start", 1.0)
            t = timeline.continuous(grid, m, t_start, params["t_end"], params["warp"], params["karras_rho"])
            if not _valid_grid(t, m, timeline):
                changes.append(f"warp: {params['warp']:g} gives coinciding timesteps at {m} steps; set to 1.0")
                params["warp"] = 1.0
        for i in range(n):
            key = f"step_{i}"
            if params[key] == "auto":
                continue
            order, corrector = _parse_step(params[key])
            if order > i + 1:
                changes.append(
                    f"{key}: order {order} needs {order} evaluations but step {i} has {i + 1}; lowered to {i + 1}"
                )
                order = i + 1
            if i == n - 1 and corrector:
                changes.append(f"{key}: no corrector on the last step (no evaluation follows it); removed")
                corrector = False
            if i == n - 1 and timeline.final_zero and order > 1:
                changes.append(f"{key}: the last step lands on sigma 0, where only order 1 is defined; lowered to 1")
                order = 1
            params[key] = _step_choice(order, corrector)
        return changes

    # ---- decode / encode -------------------------------------------------------------------

    def _timesteps(self, params: Mapping[str, Any], timeline: _Timeline) -> np.ndarray:
        """The grid: one timestep per evaluation, and one more in front for an analytical first step."""
        n, grid = int(params["nfe"]) + int(bool(params.get("analytic_first", False))), params["grid"]
        t_start = params.get("t_start", 1.0)
        if grid in _FIXED_GRIDS:
            return timeline.spacing(grid, n, t_start)
        return timeline.continuous(grid, n, t_start, params["t_end"], params["warp"], params["karras_rho"])

    def _decode(self, params: Mapping[str, Any], context: SpaceContext) -> dict[str, Any]:
        timeline = self._timeline(context)
        t = self._timesteps(params, timeline)
        n = int(params["nfe"])
        other = _OTHER[params["prediction"]]
        steps = []
        for i in range(n):
            choice = params[f"step_{i}"]
            if choice == "auto":
                order = min(int(params["order"]), i + 1)
                corrector = bool(params["corrector"]) and i < n - 1
                if i == n - 1 and timeline.final_zero:
                    order = 1
            else:
                order, corrector = _parse_step(choice)
            prediction = params["prediction"] if i < params["prediction_switch"] else other
            if prediction == "v3" and i == n - 1 and timeline.final_zero:
                prediction = "data"  # σ = 0 lies outside the statistics' λ range
            kind = params.get("corrector_kind", "unic") if corrector else "unic"
            if prediction == "v3" and corrector:
                kind = "usf"  # UniC is defined for the data and noise predictions
            relaxation = float(params["relaxation"]) if relaxable(order, corrector, kind) else 0.0
            points = _points(params.get("points", "recent"), order, corrector and kind == "unic", i)
            steps.append(
                SolverStep(
                    order=order,
                    prediction=prediction,
                    corrector=corrector,
                    relaxation=relaxation,
                    points=points,
                    corrector_kind=kind,
                )
            )
        afs = bool(params.get("analytic_first", False))
        if afs:  # the analytical step: first order (x̂₀ = 0 moves x by σ₁/σ₀), no corrector
            steps.insert(0, _analytic_step(params["prediction"]))
        ems = None
        if any(s.prediction == "v3" for s in steps):
            if context.ems is None:
                raise SpaceError(
                    "space 'solver': prediction 'v3' needs the model's statistics (run the study with --ems N)"
                )
            ems = context.ems.table(SolverSchedule.point_lambdas(tuple(t), None, context.scheduler_config))
        first_x0 = None
        if afs and params.get("afs_x0", "zero") == "average":
            if context.ems is None or context.ems.x0_mean is None:
                raise SpaceError("space 'solver': afs_x0 'average' needs the model's mean sample (run with --ems N)")
            first_x0 = StoredArray(context.ems.x0_mean)
        skips = tuple(float(params[f"skip_{k}"]) for k in range(skip_count(context)))
        try:
            schedule = SolverSchedule(
                tuple(float(v) for v in t),
                tuple(steps),
                analytic_first=afs,
                ems=ems,
                first_x0=first_x0,
                skip_coefficients=skips if any(v != 1.0 for v in skips) else None,
            )
            return {"solver": schedule}
        except ProfileError as exc:  # repair should make this unreachable; say which point broke it
            raise SpaceError(f"solver point {dict(params)!r} decodes to an invalid schedule: {exc}") from exc

    def encode(self, sections: Mapping[str, Any], context: SpaceContext) -> dict[str, Any]:
        """Parameters whose decoding samples exactly like the ``solver`` schedule in ``sections``.

        Orders above what the scheduler can run (more than the evaluations so far; above 1 on a
        last step landing on σ = 0) are lowered first, as the scheduler lowers them at run time.
        Raises :class:`SpaceError` when the timesteps are on none of the space's grids (arbitrary
        placements; Karras grids with ρ ≠ the fitted one), the steps switch prediction more than
        once, or DC ratios are set (those belong to the ``dc`` space).
        """
        schedule = sections.get("solver")
        extra = sorted(k for k, v in sections.items() if k != "solver" and v is not None)
        if extra:
            raise SpaceError(f"space 'solver' encodes only the solver section, got {extra}")
        if isinstance(schedule, Mapping):
            schedule = SolverSchedule.from_dict(schedule)
        if not isinstance(schedule, SolverSchedule):
            raise SpaceError(f"space 'solver': expected a SolverSchedule in sections['solver'], got {schedule!r}")
        timeline = self._timeline(context)
        own_final = "zero" if timeline.final_zero else "sigma_min"
        if schedule.final_sigma not in (None, own_final):
            raise SpaceError(
                f"space 'solver': the schedule ends at {schedule.final_sigma}, the scheduler at {own_final}; "
                "the space's schedules end where the pipeline's scheduler does"
            )
        n = schedule.nfe
        lo, hi = context.nfe_range
        if not lo <= n <= hi:
            raise SpaceError(f"space 'solver': the schedule has {n} evaluations, outside nfe_range {context.nfe_range}")
        afs = schedule.analytic_first
        params = self.default_params(context)
        params["nfe"] = n
        if afs:
            params["analytic_first"] = True
        if schedule.first_x0 is not None:
            mean = context.ems.x0_mean if context.ems is not None else None
            if mean is None or not np.array_equal(schedule.first_x0.array, mean):
                raise SpaceError(
                    "space 'solver': the schedule's first_x0 is not this study's mean sample (the space's average_x0)"
                )
            params["afs_x0"] = "average"
        if schedule.skip_coefficients is not None:
            if len(schedule.skip_coefficients) != skip_count(context):
                raise SpaceError(
                    f"space 'solver': {len(schedule.skip_coefficients)} skip coefficients for a decoder with "
                    f"{skip_count(context)} skip connections"
                )
            params.update({f"skip_{k}": v for k, v in enumerate(schedule.skip_coefficients)})
        params.update(self._encode_grid(np.asarray(schedule.timesteps), schedule.num_steps, timeline, context))
        params.update(self._encode_steps(schedule.steps[int(afs) :], timeline, hi))
        target = self._normalised(schedule, timeline)
        same = False
        # the one choice of active points and corrector kind that gives the schedule's steps, if any
        for choice, kind in itertools.product(ACTIVE_POINTS, CORRECTOR_KINDS):
            params["points"], params["corrector_kind"] = choice, kind
            decoded = self._decode(self.repair(params, context).params, context)["solver"]
            same = decoded.steps == target.steps and np.allclose(
                decoded.timesteps, target.timesteps, rtol=0, atol=_ATOL
            )
            if same:
                break
        if not same:
            raise SpaceError("space 'solver': the schedule is not a point of the space (its decoding differs)")
        return params

    def _normalised(self, schedule: SolverSchedule, timeline: _Timeline) -> SolverSchedule:
        """``schedule`` with the orders the space would give it (at most the evaluations so far; 1 on a last step
        landing on σ = 0); an analytical first step as the space writes it."""
        afs = int(schedule.analytic_first)
        evaluated = schedule.steps[afs:]
        n = len(evaluated)
        steps = []
        for i, s in enumerate(evaluated):
            order = min(s.order, i + 1)
            if i == n - 1 and timeline.final_zero:
                order = 1
            points = s.points if order == s.order and (not s.points or max(s.points) <= i) else ()
            steps.append(
                SolverStep(order, s.prediction, s.corrector, s.dc_ratio, s.relaxation, points, s.corrector_kind)
            )
        if afs:
            steps.insert(
                0, dataclasses.replace(_analytic_step(evaluated[0].prediction), dc_ratio=schedule.steps[0].dc_ratio)
            )
        return dataclasses.replace(schedule, steps=tuple(steps), analytic_first=bool(afs), final_sigma=None)

    def _encode_grid(self, t: np.ndarray, n: int, timeline: _Timeline, context: SpaceContext) -> dict[str, Any]:
        variables = {v.name: v for v in self.variables(context)}
        if timeline.flow and np.array_equal(timeline.spacing("flow_sigmas", n, 1.0), t):
            return {"grid": "flow_sigmas"}
        if not timeline.flow:
            first = float(t[0])
            for grid in SPACING_GRIDS:
                if grid == "leading":
                    ratio = (first - timeline.steps_offset) / n
                    lasts = [int(ratio) * (n + 1) + k for k in range(n + 1)] if ratio.is_integer() else []
                    lasts = sorted(lasts, key=lambda v: abs(v - timeline.T))
                else:
                    lasts = [int(first) + 1]
                for last in lasts:
                    t_start = last / timeline.T
                    if variables["t_start"].contains(t_start) and np.array_equal(timeline.spacing(grid, n, t_start), t):
                        return {"grid": grid, "t_start": t_start}
        for grid in CONTINUOUS_GRIDS:
            found = self._fit_continuous(grid, t, n, timeline, variables)
            if found is not None:
                return found
        raise SpaceError(f"space 'solver': timesteps {t.tolist()} lie on none of the space's grids")

    def _fit_continuous(
        self, grid: str, t: np.ndarray, n: int, timeline: _Timeline, variables: Mapping[str, Variable]
    ) -> dict[str, Any] | None:
        """Start, end, warp (and ρ for Karras) of a continuous grid through ``t``, or ``None``."""
        params: dict[str, Any] = {"grid": grid, "karras_rho": variables["karras_rho"].default, "warp": 1.0}
        if timeline.flow:
            if abs(t[0] - timeline.start(grid, 1.0)) > 1e-9:
                return None
        else:
            params["t_start"] = float(t[0]) / (timeline.T - 1)
        params["t_end"] = max(float(t[-1]) / timeline.T, timeline.t_end_min)

        def decoded(rho: float, warp: float, rounded: bool = True) -> np.ndarray:
            t_start = params.get("t_start", 1.0)
            return timeline.continuous(grid, n, t_start, params["t_end"], warp, rho, rounded=rounded)

        def misfit(rho: float, warp: float) -> float:
            # Least squares on the unrounded grid: smooth, unlike the rounded one, so the 1-D fits converge.
            return float(((decoded(rho, warp, rounded=False) - t) ** 2).sum())

        def best_warp(rho: float) -> float:
            low, high = variables["warp"].bounds
            fit = minimize_scalar(lambda w: misfit(rho, w), bounds=(low, high), method="bounded", options=_FIT)
            return float(fit.x)

        if n > 2:
            from scipy.optimize import minimize_scalar

            if grid == "karras":
                low, high = variables["karras_rho"].bounds
                fit = minimize_scalar(
                    lambda r: misfit(r, best_warp(r)), bounds=(low, high), method="bounded", options=_FIT
                )
                params["karras_rho"] = float(fit.x)
            params["warp"] = best_warp(params["karras_rho"])
        if not all(variables[k].contains(v) for k, v in params.items() if k in variables):
            return None
        if not np.allclose(decoded(params["karras_rho"], params["warp"]), t, rtol=0, atol=_ATOL):
            return None
        return params

    def _encode_steps(self, steps: tuple[SolverStep, ...], timeline: _Timeline, max_nfe: int) -> dict[str, Any]:
        n = len(steps)
        if any(s.dc_ratio != 1.0 for s in steps):
            raise SpaceError("space 'solver': DC-Solver ratios are not part of this space (use the 'dc' space)")

        first = steps[0].prediction
        switch = next((i for i, s in enumerate(steps) if s.prediction != first), max_nfe)
        if any(s.prediction != _OTHER[first] for s in steps[switch:]):
            raise SpaceError(
                f"space 'solver': the prediction type switches more than once, or from {first} to another than "
                f"{_OTHER[first]}"
            )
        if first == "v3" and switch == n - 1 and timeline.final_zero:
            switch = max_nfe  # the last step's data prediction is the space's rule at σ = 0, not a switch
        wanted = []
        for i, s in enumerate(steps):
            order = min(s.order, i + 1)
            if i == n - 1 and timeline.final_zero:
                order = 1
            wanted.append((order, s.corrector))
        # the relaxation of every step that has one at the order it runs (UniP-3/4 steps have none)
        free = [relaxable(*w, s.corrector_kind) for s, w in zip(steps, wanted, strict=True)]
        relaxed = {s.relaxation for s, ok in zip(steps, free, strict=True) if ok} or {0.0}
        if len(relaxed) > 1 or any(s.relaxation for s, ok in zip(steps, free, strict=True) if not ok):
            raise SpaceError(f"space 'solver': one relaxation on every step but UniP-3/4 ones, got {sorted(relaxed)}")
        best: tuple[int, int, bool, list[str]] | None = None
        for order in (2, 1, 3, 4):
            for corrector in (False, True):
                choices = []
                for i, target in enumerate(wanted):
                    auto_order = 1 if (i == n - 1 and timeline.final_zero) else min(order, i + 1)
                    auto = (auto_order, corrector and i < n - 1)
                    choices.append("auto" if auto == target else _step_choice(*target))
                if any(c not in STEP_CHOICES for c in choices):
                    continue  # an order-4 step the global order does not give: no override can say it
                explicit = sum(c != "auto" for c in choices)
                if best is None or explicit < best[0]:
                    best = (explicit, order, corrector, choices)
        if best is None:
            raise SpaceError(
                "space 'solver': order 4 is only the default order of every step (step overrides are 1–3); this "
                "schedule mixes it with other orders"
            )
        _, order, corrector, choices = best
        out: dict[str, Any] = {
            "order": order,
            "corrector": corrector,
            "prediction": first,
            "prediction_switch": min(switch, max_nfe),
            "relaxation": relaxed.pop(),
        }
        out.update({f"step_{i}": choices[i] if i < n else "auto" for i in range(max_nfe)})
        return out

    # ---- baselines -------------------------------------------------------------------------

    def spacing(self, context: SpaceContext, method: str, nfe: int) -> SpacingChoice:
        """The spacing of a baseline: the context's mapping, else measured on its pipeline, else the scheduler's own."""
        given = context.spacings.get((method, nfe))
        if isinstance(given, SpacingChoice):
            return given
        if isinstance(given, Mapping):
            return SpacingChoice.from_dict(given)
        if isinstance(given, str):
            for label, kwargs in spacing_candidates(context.scheduler_config):
                if label == given:
                    return SpacingChoice(method, nfe, label, _stored_kwargs(kwargs), {}, measured=False)
            known = ", ".join(label for label, _ in spacing_candidates(context.scheduler_config))
            raise SpaceError(f"spacings[{(method, nfe)!r}]: unknown spacing {given!r}; known: {known}")
        if given is not None:
            raise SpaceError(f"spacings[{(method, nfe)!r}]: expected a SpacingChoice, dict or label, got {given!r}")
        if context.pipeline is not None:
            return best_spacing(
                context.pipeline,
                method,
                nfe,
                context.spacing_samples,
                guidance_scale=context.guidance_scale,
                call_kwargs={
                    **({"height": context.height} if context.height else {}),
                    **({"width": context.width} if context.width else {}),
                    **context.call_kwargs,
                },
            )
        return default_spacing(method, nfe, context.scheduler_config)

    def baselines(self, context: SpaceContext) -> list[NamedPoint]:
        """DPM-Solver++(2M), UniPC and DDIM at every NFE in range, each at its best spacing for the model."""
        lo, hi = context.nfe_range
        out = []
        for n in range(lo, hi + 1):
            for method in METHODS:
                choice = self.spacing(context, method, n)
                schedule = baseline_schedule(method, context.scheduler_config, n, choice.scheduler_kwargs)
                try:
                    params: dict[str, Any] | None = self.encode({"solver": schedule}, context)
                except SpaceError:
                    params = None
                if choice.measured:
                    how = f"measured best (MSE {choice.mse.get(choice.label, math.nan):.3g} vs the reference)"
                else:
                    how = "the scheduler's own, not measured"
                description = f"{_METHOD_NAMES[method]}, {n} steps, spacing {choice.label} ({how})"
                out.append(NamedPoint(f"{method}_nfe{n}", {"solver": schedule}, params, description))
        return out
