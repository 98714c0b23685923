"""Solver schedules: USF per-step strategies, UniC correction and DC-Solver compensation in one scheduler.

A :class:`SolverSchedule` says, for every model evaluation, *where* it happens (a timestep in the
pipeline scheduler's own units) and *how* the next point is reached (:class:`SolverStep`: the
multistep order, whether the exponential integrator runs on the data or the noise prediction,
whether UniPC's corrector refines the result with the next evaluation, and a DC-Solver ratio).
:class:`USFScheduler` is a diffusers scheduler that samples on such a schedule, so it can replace
any pipeline's scheduler; with the right schedule it reproduces DPM-Solver++(2M/3M), DPM-Solver
and UniPC (bh2) on the same timesteps::

    >>> import difftune
    >>> from difftune.accel.solver import SolverSchedule, USFScheduler
    >>> pipe = difftune.load_pipeline("embedded")                      # holds a DPMSolverMultistepScheduler
    >>> schedule = SolverSchedule.from_scheduler(pipe.scheduler, 10)   # DPM-Solver++(2M)'s timesteps and orders
    >>> pipe.scheduler = USFScheduler.from_schedule(schedule, pipe.scheduler.config)
    >>> images = pipe(prompt="digit 3", num_inference_steps=10).images  # same images as before

The maths follows the papers' public code: DPM-Solver / DPM-Solver++ multistep updates in
λ = log(α/σ) (github.com/LuChengTHU/dpm-solver), UniP/UniC with B(h) = e^h − 1 ("bh2",
github.com/wl-zhao/UniPC), and DC-Solver's dynamic compensation (github.com/wl-zhao/DC-Solver);
the diffusers schedulers of the same algorithms were the reference for the equivalence tests.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput

from difftune.accel._ems import EMSTable, StoredArray
from difftune.accel._fields import as_float, as_int, as_str, check_keys
from difftune.accel._hooks import CompositeHandle, Handle, wrap_forward
from difftune.accel._registry import register_technique
from difftune.errors import ProfileError

__all__ = [
    "CORRECTOR_KINDS",
    "PREDICTIONS",
    "SolverSchedule",
    "SolverStep",
    "USFScheduler",
    "dynamic_compensation",
    "relaxable",
]

#: What the exponential integrator integrates: the data prediction x̂₀ (DPM-Solver++), the noise ε̂ (DPM-Solver), or
#: DPM-Solver-v3's g, built from ε̂ with the model's empirical statistics (the schedule's ``ems`` table).
PREDICTIONS = ("data", "noise", "v3")
MAX_ORDER = 4
#: How a corrector step re-integrates: UniPC's UniC (bh2) or USF's pseudo corrector (a Taylor update).
CORRECTOR_KINDS = ("unic", "usf")

_GRIDS = ("time_uniform", "logsnr_uniform", "karras", "linspace", "leading", "trailing")
_SPACINGS = ("linspace", "leading", "trailing")
_FINAL_SIGMAS = ("zero", "sigma_min")
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# Diffusers options under which a scheduler's sigmas are not a function of its (rounded) timesteps.
_SIGMA_FIRST_OPTIONS = (
    "use_flow_sigmas",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "use_lu_lambdas",
)


# --------------------------------------------------------------------------------------------
# The schedule: plain data, JSON round trip, validation
# --------------------------------------------------------------------------------------------


def relaxable(order: int, corrector: bool, corrector_kind: str = "unic") -> bool:
    """Whether a step's update has a separate first derivative for USF's relaxation: every one but
    UniP-3/4 (order ≥ 3 with UniPC's corrector; USF's corrector pairs with the Taylor predictor)."""
    return not (corrector and corrector_kind == "unic" and order >= 3)


@dataclass(frozen=True)
class SolverStep:
    """How one step moves from its model evaluation to the next timestep.

    Attributes:
        order: how many buffered model evaluations the multistep update uses (1–4; orders 1–3 are
            DPM-Solver(++)'s and UniPC's, order 4 USF's Taylor update over the last four). Higher orders
            are more accurate on smooth trajectories at the same cost, but amplify the error of a
            poor model output (guidance, few steps); the scheduler lowers it where too few earlier
            evaluations exist (warm-up) and on a step that lands on σ = 0.
        prediction: ``"data"`` integrates the x̂₀ prediction (DPM-Solver++; stays bounded under strong
            guidance), ``"noise"`` the ε̂ prediction (DPM-Solver; fine unguided, unstable with large
            guidance scales), ``"v3"`` DPM-Solver-v3's g (the model's empirical statistics make it nearly
            constant in λ; needs the schedule's ``ems`` table; no DC ratio, and its corrector is USF's).
        corrector: refine this step's result with UniC once the next evaluation exists. It costs
            no model call (it reuses the next step's) and raises the order of accuracy by one, but
            can overshoot with large guidance. Never on the last step: nothing evaluates after it.
        dc_ratio: DC-Solver's compensation ratio ρ for this step: before the predictor, the newest
            model output is replaced by the Lagrange interpolant of the buffered outputs at
            t′ = t_{i−1} + ρ (t_i − t_{i−1}). ``1.0`` changes nothing; tuned ratios (DC-Solver searches
            within 1 ± 0.5) offset the misalignment between predictor and corrector at few steps.
        relaxation: USF's "linear" relaxation c of the first derivative: the estimated F′ of the
            prediction (in λ) is scaled by 1 + c·h, h = λ_t − λ_s, in the DPM-Solver(++) and Taylor
            updates (orders 2–4; not in UniP-3/4, i.e. with the corrector at order ≥ 3, which has
            no separate derivative). ``0.0`` changes nothing; USF's searched schedules hold −0.38 … 0.5.
        points: USF's active points: which earlier evaluations the derivatives are estimated from, as
            offsets back from this step's (1 = the previous evaluation, up to 3), ``order − 1`` of them,
            increasing; the step then runs USF's Taylor update over them. ``()`` (default) is the
            ``order − 1`` most recent ones, the multistep methods' choice. Skipping a recent point
            (e.g. ``(2,)`` at order 2) widens the difference the derivative is taken over. Not with the
            corrector (UniP/UniC take consecutive points). Where the farthest point does not exist yet
            (warm-up) the step runs on the most recent points at the order available.
        corrector_kind: how the corrector re-integrates once the next evaluation exists: ``"unic"``
            (default; UniPC's UniC in its bh2 variant, as diffusers ships it) or ``"usf"`` (USF's pseudo
            corrector: the Taylor update from this step's start re-run one order higher, its derivatives
            estimated over the same points with the new evaluation among them; the model output kept for
            later steps is still the one at the uncorrected sample). Only with ``corrector=True``.
    """

    order: int = 2
    prediction: str = "data"
    corrector: bool = False
    dc_ratio: float = 1.0
    relaxation: float = 0.0
    points: tuple[int, ...] = ()
    corrector_kind: str = "unic"

    def __post_init__(self) -> None:
        self._check("step")

    def _check(self, where: str) -> None:
        as_int(self.order, f"{where}.order", minimum=1, maximum=MAX_ORDER)
        as_str(self.prediction, f"{where}.prediction", PREDICTIONS)
        if not isinstance(self.corrector, bool):
            raise ProfileError(f"{where}.corrector: expected true or false, got {self.corrector!r}")
        # Frozen: normalise an int ratio (JSON ``1``) to float so equal steps compare and hash equal.
        object.__setattr__(self, "dc_ratio", as_float(self.dc_ratio, f"{where}.dc_ratio"))
        object.__setattr__(self, "relaxation", as_float(self.relaxation, f"{where}.relaxation"))
        if self.relaxation != 0.0 and not relaxable(self.order, self.corrector, self.corrector_kind):
            raise ProfileError(
                f"{where}.relaxation: UniP-{self.order} (order >= 3 with the corrector) has no separate first "
                "derivative to relax; use 0, or order <= 2, or no corrector"
            )
        points = self.points
        if isinstance(points, (str, bytes)) or not isinstance(points, (tuple, list)):
            raise ProfileError(f"{where}.points: expected a list of offsets, got {points!r}")
        object.__setattr__(
            self,
            "points",
            tuple(as_int(v, f"{where}.points[{k}]", minimum=1, maximum=MAX_ORDER - 1) for k, v in enumerate(points)),
        )
        if self.points:
            if len(self.points) != self.order - 1 or list(self.points) != sorted(set(self.points)):
                raise ProfileError(
                    f"{where}.points: {list(self.points)} — give order - 1 = {self.order - 1} increasing offsets back "
                    f"from this step (1 = the previous evaluation, at most {MAX_ORDER - 1})"
                )
        as_str(self.corrector_kind, f"{where}.corrector_kind", CORRECTOR_KINDS)
        if self.points and self.corrector and self.corrector_kind == "unic":
            raise ProfileError(
                f"{where}.points: chosen active points need the Taylor update; UniPC's predictor-corrector takes the "
                "most recent points (use corrector_kind 'usf', or no corrector)"
            )
        if self.corrector_kind != "unic" and not self.corrector:
            raise ProfileError(f"{where}.corrector_kind: {self.corrector_kind!r} without the corrector; set corrector")
        if self.prediction == "v3":
            if self.corrector and self.corrector_kind == "unic":
                raise ProfileError(
                    f"{where}.corrector_kind: UniC is defined for the data and noise predictions; a v3 step's "
                    "corrector is USF's ('usf')"
                )
            if self.dc_ratio != 1.0:
                raise ProfileError(f"{where}.dc_ratio: DC-Solver compensates data or noise predictions, not v3; use 1")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "order": self.order,
            "prediction": self.prediction,
            "corrector": self.corrector,
            "dc_ratio": self.dc_ratio,
        }
        if self.relaxation != 0.0:  # written only when used: older profiles and memo keys stay as they were
            out["relaxation"] = self.relaxation
        if self.points:
            out["points"] = list(self.points)
        if self.corrector_kind != "unic":
            out["corrector_kind"] = self.corrector_kind
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "step") -> SolverStep:
        """Build from JSON; missing keys take the defaults, anything malformed raises :class:`ProfileError`."""
        if not isinstance(data, Mapping):
            raise ProfileError(f"{where}: expected an object, got {data!r}")
        names = ("order", "prediction", "corrector", "dc_ratio", "relaxation", "points", "corrector_kind")
        check_keys(data, set(names), where)
        step = cls.__new__(cls)
        defaults = cls()
        for name in names:
            object.__setattr__(step, name, data.get(name, getattr(defaults, name)))
        step._check(where)  # validated here, so the message names the field's place in the profile
        return step


@register_technique("solver", "usf")
@dataclass(frozen=True)
class SolverSchedule:
    """A solver schedule: one timestep and one :class:`SolverStep` per model evaluation.

    ``timesteps`` are in the units of the pipeline's own scheduler (0–999 for DDPM-trained models,
    σ×1000 for flow-matching ones), strictly decreasing in sampling order. The number of steps is
    the NFE: fewer is faster, and where the steps sit matters as much as how many there are.

    JSON form (the profile's ``solver`` section)::

        {"kind": "usf", "timesteps": [999.0, 899.0, ...],
         "steps": [{"order": 1, "prediction": "data", "corrector": false, "dc_ratio": 1.0}, ...]}
    """

    timesteps: tuple[float, ...]
    steps: tuple[SolverStep, ...]
    #: Where the last step lands: ``None`` (the pipeline scheduler's own ``final_sigmas_type``),
    #: ``"zero"`` (the clean sample) or ``"sigma_min"`` (the smallest training noise level, VP models
    #: only; DC-Solver's reference setting). Written to the profile only when set.
    final_sigma: str | None = None
    #: USF's analytical first step: at the first timestep the model is not called; its prediction is
    #: taken as x̂₀ = 0 (ε̂ = x_T/σ_T), which at pure noise is what a model trained on zero-mean data
    #: predicts on average. The step still moves the sample (x ← σ₁/σ₀·x_T at first order) and its
    #: x̂₀ = 0 is a buffered point for the next steps' multistep updates, so the schedule costs
    #: ``num_steps − 1`` evaluations (:attr:`nfe`). Written to the profile only when set.
    analytic_first: bool = False
    #: DPM-Solver-v3's statistics at this schedule's points (timesteps, then the final noise level): needed
    #: by ``"v3"`` steps, built by :meth:`difftune.accel._ems.EMS.table`. Written to the profile only when set.
    ems: EMSTable | None = None
    #: With :attr:`analytic_first`: the x̂₀ the first step assumes instead of 0 — USF's ``average_x0``, the mean
    #: clean sample (shape of one sample, e.g. C×H×W; :attr:`difftune.accel._ems.EMS.x0_mean`). None: zero.
    first_x0: StoredArray | None = None
    #: USF's U-Net skip coefficients: each skip connection a UNet's up blocks take is scaled by one of these
    #: (in the order the decoder consumes them: the deepest first), on every step; None: all 1. UNets only.
    skip_coefficients: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "timesteps", tuple(float(t) for t in self.timesteps))
        object.__setattr__(self, "steps", tuple(self.steps))
        self._check()

    def _check(self) -> None:
        ts = self.timesteps
        if not ts:
            raise ProfileError("solver.timesteps: empty; a schedule needs at least one model evaluation")
        for i, t in enumerate(ts):
            if not math.isfinite(t) or t < 0:
                raise ProfileError(f"solver.timesteps[{i}]: expected a finite number >= 0, got {t!r}")
            if i and t >= ts[i - 1]:
                raise ProfileError(
                    f"solver.timesteps[{i}]: {t} does not come after {ts[i - 1]}; timesteps must strictly decrease "
                    "(sampling order, one per model evaluation)"
                )
        if len(self.steps) != len(ts):
            raise ProfileError(f"solver.steps: {len(self.steps)} steps for {len(ts)} timesteps; give one per timestep")
        for i, step in enumerate(self.steps):
            if not isinstance(step, SolverStep):
                raise ProfileError(f"solver.steps[{i}]: expected a SolverStep, got {step!r}")
        if self.final_sigma is not None:
            as_str(self.final_sigma, "solver.final_sigma", _FINAL_SIGMAS)
        if not isinstance(self.analytic_first, bool):
            raise ProfileError(f"solver.analytic_first: expected true or false, got {self.analytic_first!r}")
        if self.analytic_first and len(ts) < 2:
            raise ProfileError(
                "solver.analytic_first: true on a one-timestep schedule; the analytical first step replaces the first "
                "model evaluation, so at least one more timestep must follow it"
            )
        if self.steps[-1].corrector:
            raise ProfileError(
                f"solver.steps[{len(ts) - 1}].corrector: true on the last step; the corrector needs the next model "
                "evaluation and none follows the last step"
            )
        if self.skip_coefficients is not None:
            values = self.skip_coefficients
            if isinstance(values, (str, bytes)) or not isinstance(values, (tuple, list)) or not values:
                raise ProfileError(f"solver.skip_coefficients: expected a non-empty list of numbers, got {values!r}")
            checked = tuple(as_float(v, f"solver.skip_coefficients[{k}]", minimum=0.0) for k, v in enumerate(values))
            if max(checked) > 1.0:
                raise ProfileError(f"solver.skip_coefficients: expected values in [0, 1] (USF's range), got {values!r}")
            object.__setattr__(self, "skip_coefficients", checked)
        if self.first_x0 is not None:
            if not isinstance(self.first_x0, StoredArray):
                raise ProfileError(f"solver.first_x0: expected a stored array, got {type(self.first_x0).__name__}")
            if not self.analytic_first:
                raise ProfileError("solver.first_x0: set without analytic_first; it is the analytical first step's x̂₀")
        if self.ems is not None and not isinstance(self.ems, EMSTable):
            raise ProfileError(f"solver.ems: expected an EMS table, got {type(self.ems).__name__}")
        v3 = [i for i, s in enumerate(self.steps) if s.prediction == "v3"]
        if v3 and self.ems is None:
            raise ProfileError(
                f"solver.steps[{v3[0]}].prediction: 'v3' needs the model's empirical statistics (solver.ems); compute "
                "them with difftune.search.ems.compute_ems, or use 'data'"
            )
        if self.ems is not None:
            if len(self.ems.lambdas) != len(ts) + 1:
                raise ProfileError(
                    f"solver.ems: {len(self.ems.lambdas)} points for {len(ts)} timesteps; expected one per timestep "
                    "and one for the final noise level"
                )
            for i in v3:
                for k in (i, i + 1):
                    if not self.ems.covers(k):
                        where = "the final noise level" if k == len(ts) else f"timestep {ts[k]:g}"
                        raise ProfileError(
                            f"solver.steps[{i}].prediction: 'v3' at {where}, outside the λ range of the statistics "
                            "(e.g. σ = 0); use 'data' for this step"
                        )

    @property
    def num_steps(self) -> int:
        """The number of sampling steps (timesteps); the pipeline's ``num_inference_steps``."""
        return len(self.timesteps)

    @property
    def nfe(self) -> int:
        """The model evaluations a run costs: one per timestep but the analytical first step's."""
        return len(self.timesteps) - int(self.analytic_first)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": "usf",
            "timesteps": list(self.timesteps),
            "steps": [s.to_dict() for s in self.steps],
        }
        if self.final_sigma is not None:
            out["final_sigma"] = self.final_sigma
        if self.analytic_first:
            out["analytic_first"] = True
        if self.ems is not None:
            out["ems"] = self.ems.to_dict()
        if self.first_x0 is not None:
            out["first_x0"] = self.first_x0.to_dict()
        if self.skip_coefficients is not None:
            out["skip_coefficients"] = list(self.skip_coefficients)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> SolverSchedule:
        """Build from JSON, validating every field; errors are :class:`ProfileError` naming the field."""
        if not isinstance(data, Mapping):
            raise ProfileError(f"solver: expected an object, got {data!r}")
        check_keys(
            data,
            {"kind", "timesteps", "steps", "final_sigma", "analytic_first", "ems", "first_x0", "skip_coefficients"},
            "solver",
        )
        if data.get("kind", "usf") != "usf":
            raise ProfileError(f"solver.kind: expected 'usf', got {data.get('kind')!r}")
        timesteps, steps = data.get("timesteps"), data.get("steps")
        if not isinstance(timesteps, Sequence) or isinstance(timesteps, str):
            raise ProfileError(f"solver.timesteps: expected a list of numbers, got {timesteps!r}")
        if not isinstance(steps, Sequence) or isinstance(steps, str):
            raise ProfileError(f"solver.steps: expected a list of objects, got {steps!r}")
        ts = tuple(as_float(t, f"solver.timesteps[{i}]") for i, t in enumerate(timesteps))
        final = data.get("final_sigma")
        if final is not None:
            as_str(final, "solver.final_sigma", _FINAL_SIGMAS)
        steps_ = tuple(SolverStep.from_dict(s, f"solver.steps[{i}]") for i, s in enumerate(steps))
        ems = EMSTable.from_dict(data["ems"]) if data.get("ems") is not None else None
        first = data.get("first_x0")
        first_x0 = StoredArray.from_dict(first, "solver.first_x0") if first is not None else None
        skips = data.get("skip_coefficients")
        return cls(ts, steps_, final, data.get("analytic_first", False), ems, first_x0, skips)

    @classmethod
    def from_scheduler(
        cls,
        scheduler: Any,
        num_inference_steps: int | None,
        order: int = 2,
        corrector: bool = False,
        prediction: str = "data",
        **set_timesteps_kwargs: Any,
    ) -> SolverSchedule:
        """The timesteps ``scheduler`` would sample on, with the per-step orders diffusers would run.

        With ``corrector=False`` the orders follow ``DPMSolverMultistepScheduler`` (warm-up, then
        order 1 on the last step when it lands on σ = 0 or when fewer than 15 steps run, and at
        most 2 on the step before that), so the schedule reproduces DPM-Solver++(``order``M), or
        DPM-Solver with ``prediction="noise"``. With ``corrector=True`` they follow
        ``UniPCMultistepScheduler`` (order ``min(order, steps left)`` and UniC on every step but the
        last, minus a UniPC scheduler's ``disable_corrector`` steps). ``scheduler`` is not modified.

        Timesteps are read from the scheduler; where its sigmas are not a function of its rounded
        timesteps (flow sigmas, Karras, …) they are read from the sigmas instead, so the noise
        levels match exactly and the model receives the unrounded timesteps.
        """
        as_int(order, "order", minimum=1, maximum=MAX_ORDER)
        probe = type(scheduler).from_config(scheduler.config)
        probe.set_timesteps(num_inference_steps, **set_timesteps_kwargs)
        config = scheduler.config
        n = len(probe.timesteps)
        sigmas = getattr(probe, "sigmas", None)
        if any(config.get(k) for k in _SIGMA_FIRST_OPTIONS) and sigmas is not None:
            usf = USFScheduler.from_schedule(None, scheduler)
            timesteps = usf._sigma_to_timestep(sigmas[:n].double().numpy())
        else:
            timesteps = probe.timesteps.double().cpu().numpy()
        if sigmas is not None:
            final_zero = float(sigmas[-1]) == 0.0
        else:
            final_zero = config.get("final_sigmas_type", "zero") == "zero"
        disabled = set(config.get("disable_corrector", None) or ()) if corrector else set()
        steps = _default_steps(
            n,
            order,
            prediction,
            corrector,
            lower_order_final=bool(config.get("lower_order_final", True)),
            final_zero=final_zero,
            euler_at_final=bool(config.get("euler_at_final", False)),
        )
        steps = tuple(SolverStep(s.order, s.prediction, s.corrector and i not in disabled) for i, s in enumerate(steps))
        return cls(tuple(float(t) for t in timesteps), steps)

    @staticmethod
    def point_lambdas(timesteps: Sequence[float], final_sigma: str | None, scheduler: Any) -> np.ndarray:
        """λ = log(α/σ) at ``timesteps`` and at the final noise level, for the model ``scheduler`` (a pipeline
        scheduler or its config) describes: where :meth:`difftune.accel._ems.EMS.table` reads the statistics."""
        probe = SolverSchedule(tuple(timesteps), tuple(SolverStep(order=1) for _ in timesteps), final_sigma)
        usf = USFScheduler.from_schedule(probe, scheduler)
        usf.set_timesteps(len(probe.timesteps))
        return np.array(usf._lambda, dtype=np.float64)

    def apply(self, pipe: Any, *, strict: bool = True) -> Handle:
        """Swap ``pipe.scheduler`` for a :class:`USFScheduler` on this schedule; ``remove()`` swaps it back.

        The noise schedule and the model's parameterisation are read from the pipeline's scheduler
        config. ``strict`` is accepted for the profile interface: a run with another number of
        steps than the schedule has always fails, since no schedule exists for it. With
        :attr:`analytic_first`, the denoiser's calls at the first step of a run return a placeholder
        of the output's shape without running the network (the scheduler does not read it).
        """
        original = pipe.scheduler
        scheduler = USFScheduler.from_schedule(self, original)
        pipe.scheduler = scheduler

        def undo() -> None:
            pipe.scheduler = original

        handle = CompositeHandle([Handle(undo)])
        if self.skip_coefficients is not None:
            try:
                handle.add(scale_unet_skips(pipe, self.skip_coefficients))
            except BaseException:
                handle.remove()
                raise
        if self.analytic_first:
            from difftune.models import adapter_for

            denoiser = adapter_for(pipe).denoiser(pipe)
            handle.add(wrap_forward(denoiser, functools.partial(_analytic_first_call, pipe, scheduler, denoiser)))
        return handle


def unet_skip_count(denoiser: Any) -> int:
    """The skip connections a UNet's up blocks take (one per up-block ResNet); 0 for a denoiser without up blocks."""
    return sum(len(getattr(block, "resnets", None) or ()) for block in getattr(denoiser, "up_blocks", None) or ())


def scale_unet_skips(pipe: Any, coefficients: Sequence[float]) -> Handle:
    """Scale every skip connection the pipeline's UNet decoder takes by its coefficient (USF's skip coefficients).

    An up block receives its skips as ``res_hidden_states_tuple`` and consumes them from the end; coefficient k
    belongs to the k-th skip consumed over the whole decoder (0 = the deepest). Each up block's forward gets the
    tuple scaled; the weights are not touched. ``remove()`` undoes it.
    """
    from difftune.models import adapter_for

    denoiser = adapter_for(pipe).denoiser(pipe)
    blocks = list(getattr(denoiser, "up_blocks", None) or ())
    count = unet_skip_count(denoiser)
    if not count:
        raise ProfileError(
            f"solver.skip_coefficients: the denoiser ({type(denoiser).__name__}) has no U-Net up blocks; skip "
            "coefficients scale a UNet's skip connections"
        )
    if len(coefficients) != count:
        raise ProfileError(
            f"solver.skip_coefficients: {len(coefficients)} coefficients, but this UNet's decoder takes {count} skip "
            "connections; the profile belongs to another model"
        )
    handles = []
    offset = 0
    for block in blocks:
        m = len(getattr(block, "resnets", None) or ())
        # the block pops its tuple from the end: tuple item j is consumed (m − 1 − j)-th
        mine = [float(coefficients[offset + m - 1 - j]) for j in range(m)]
        offset += m

        def scale(module: Any, args: tuple, kwargs: dict, mine: list[float] = mine) -> tuple[tuple, dict]:
            def scaled(skips: Any) -> tuple:
                return tuple(s if c == 1.0 else s * c for s, c in zip(skips, mine, strict=True))

            if "res_hidden_states_tuple" in kwargs:
                kwargs = {**kwargs, "res_hidden_states_tuple": scaled(kwargs["res_hidden_states_tuple"])}
            elif len(args) > 1:
                args = (args[0], scaled(args[1]), *args[2:])
            return args, kwargs

        handles.append(block.register_forward_pre_hook(scale, with_kwargs=True))

    def undo() -> None:
        for h in handles:
            h.remove()

    return Handle(undo)


def _analytic_first_call(
    pipe: Any, scheduler: USFScheduler, denoiser: Any, forward: Any, *args: Any, **kwargs: Any
) -> Any:
    """The denoiser's forward under an analytical first step: the first step's calls (before the scheduler has
    stepped in this run, from the grid's first timestep) are answered with zeros of the output's shape."""
    first = (
        pipe.scheduler is scheduler
        and scheduler.num_inference_steps is not None
        and scheduler._step_index is None
        and scheduler._begin_index in (None, 0)
    )
    if not first:
        return forward(*args, **kwargs)
    return placeholder_output(denoiser, args, kwargs)


def placeholder_output(denoiser: Any, args: tuple, kwargs: dict) -> Any:
    """Zeros shaped like ``denoiser(*args, **kwargs)``'s output, in its return form, without running it.

    The sample is the first argument (``hidden_states`` / ``sample``); an image-shaped one keeps its
    batch and size with the model's ``out_channels`` (twice the latent channels for learned-variance
    DiT / PixArt), a token sequence (Flux) its batch and length with ``patch_size² · out_channels``.
    """
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    sample = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
    if not isinstance(sample, torch.Tensor):
        raise ProfileError("solver.analytic_first: the denoiser was called without a sample tensor to shape its output")
    config = getattr(denoiser, "config", {}) or {}
    # the config's value, else the model's own attribute (DiT sets out_channels = in_channels when the config has none)
    channels = config.get("out_channels") or vars(denoiser).get("out_channels") or None
    if sample.dim() == 4:
        shape = (sample.shape[0], int(channels or sample.shape[1]), *sample.shape[2:])
    elif sample.dim() == 3 and channels:
        patch = int(config.get("patch_size", 1) or 1)
        shape = (*sample.shape[:2], patch * patch * int(channels))
    else:
        shape = tuple(sample.shape)
    dtype = getattr(denoiser, "dtype", sample.dtype)
    out = torch.zeros(shape, dtype=dtype, device=sample.device)
    if kwargs.get("return_dict", True) is False:
        return (out,)
    return Transformer2DModelOutput(sample=out)


def _default_steps(
    n: int,
    order: int,
    prediction: str,
    corrector: bool,
    *,
    lower_order_final: bool,
    final_zero: bool,
    euler_at_final: bool = False,
) -> tuple[SolverStep, ...]:
    """The per-step orders diffusers' DPM-Solver (no corrector) or UniPC (corrector) would run."""
    steps = []
    for i in range(n):
        p = min(order, i + 1)  # multistep warm-up: only i+1 evaluations exist at step i
        if corrector:
            if lower_order_final:
                p = min(p, n - i)
        else:
            short = lower_order_final and n < 15
            if i == n - 1 and (short or final_zero or euler_at_final):
                p = 1
            elif i == n - 2 and short:
                p = min(p, 2)
        steps.append(SolverStep(order=p, prediction=prediction, corrector=corrector and i < n - 1))
    return tuple(steps)


# --------------------------------------------------------------------------------------------
# DC-Solver dynamic compensation
# --------------------------------------------------------------------------------------------


def _lagrange_weights(nodes: Sequence[float], at: Any) -> list[Any]:
    weights = []
    for k, tk in enumerate(nodes):
        w: Any = 1.0
        for j, tj in enumerate(nodes):
            if j != k:
                w *= (at - tj) / (tk - tj)
        weights.append(w)
    return weights


def dynamic_compensation(
    outputs: Sequence[torch.Tensor], times: Sequence[float], ratio: float | torch.Tensor, dc_order: int = 2
) -> torch.Tensor:
    """DC-Solver's compensated model output: the Lagrange interpolant through the newest
    ``dc_order + 1`` buffered ``outputs`` (oldest first, at ``times``) evaluated at
    t′ = t_{i−1} + ``ratio`` · (t_i − t_{i−1}), t_i being the newest time.

    Follows ``DCSolverMultistepScheduler.dynamic_compensation`` in github.com/wl-zhao/DC-Solver
    (``diffusers/src/diffusers/schedulers/scheduling_dcsolver_multistep.py``): the interpolation
    runs over the scheduler's timesteps, not over λ. (The repository's ldm version, ``dc_solver.py``,
    uses continuous time t, an affine function of the timestep, which gives the same interpolant.)
    With fewer buffered outputs than ``dc_order + 1`` it uses those there are, as a multistep
    warm-up would. ``ratio = 1`` returns the newest output exactly, bit for bit.
    """
    if len(outputs) != len(times) or not outputs:
        raise ValueError(f"dynamic_compensation: {len(outputs)} outputs for {len(times)} times")
    k = min(dc_order + 1, len(outputs))
    if k < 2:
        return outputs[-1]
    # Interpolate in u = (t - t_{i-1}) / (t_i - t_{i-1}): the same polynomial (Lagrange is affine
    # invariant), but the newest node is exactly 1, the previous exactly 0 and t' is exactly
    # ``ratio``, so ratio = 1 yields weights exactly (0, …, 0, 1) even for non-integer timesteps.
    t_prev, t_new = float(times[-2]), float(times[-1])
    nodes = [(float(t) - t_prev) / (t_new - t_prev) for t in times[-k:]]
    # A tensor ratio stays a tensor, so DC-Solver's fitting can differentiate the result with respect to it.
    weights = _lagrange_weights(nodes, ratio if isinstance(ratio, torch.Tensor) else float(ratio))
    values = outputs[-k:]
    result = values[-1] * weights[-1]
    for w, v in zip(weights[:-1], values[:-1], strict=True):
        result = result + v * w
    return result


# --------------------------------------------------------------------------------------------
# Noise schedules
# --------------------------------------------------------------------------------------------


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Glide's cosine schedule (``squaredcos_cap_v2``), as diffusers discretises it."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    return torch.tensor(
        [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], dtype=torch.float32
    )


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale √ᾱ so the last timestep has zero SNR (arXiv 2305.08891, Algorithm 1)."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = torch.cat([ab[0:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def _shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class USFScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler that samples on a :class:`SolverSchedule` (USF): every step picks its
    own order, prediction type, UniC corrector and DC-Solver ratio, on any timestep grid.

    One model evaluation per timestep (``order = 1`` for pipelines). Per step, in UniPC's order of
    operations: the model output is converted to x̂₀ and ε̂; if the previous step asked for it, the
    incoming sample is corrected with UniC-p (B(h) = e^h − 1); the outputs are buffered; the
    step's DC ratio replaces the newest buffered output by its compensated value; then the
    multistep exponential-integrator predictor moves to the next timestep.

    With the steps diffusers would run (:meth:`SolverSchedule.from_scheduler`) it reproduces
    ``DPMSolverMultistepScheduler`` (``dpmsolver++`` or ``dpmsolver``, ``midpoint``, order 1–3) and
    ``UniPCMultistepScheduler`` (``bh2``). For orders ≤ 2 UniP's and DPM-Solver's multistep
    predictors coincide; at order 3 a step with the corrector uses UniP-3 (as UniPC pairs them) and
    one without uses DPM-Solver's 3M update.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr:
            the model's training noise schedule, as in diffusers (VP models).
        prediction_type: what the model predicts: ``"epsilon"``, ``"v_prediction"``, ``"sample"`` or
            ``"flow_prediction"`` (velocity v = ε − x₀; requires ``use_flow_sigmas``).
        use_flow_sigmas: a flow-matching model (SD3, Flux): σ = t / num_train_timesteps,
            x_t = (1 − σ) x₀ + σ ε.
        shift: flow-matching time shift σ ← shift·σ / (1 + (shift − 1)·σ) for parametric grids
            (``mu`` in :meth:`set_timesteps` overrides it with e^mu). Larger spends more steps at
            high noise, which high-resolution flow models need.
        timestep_spacing, steps_offset, lambda_min_clipped: diffusers' integer spacings, used by the
            ``"time_uniform"`` grid on VP models exactly as ``DPMSolverMultistepScheduler`` uses them.
        final_sigmas_type: ``"zero"`` ends at the clean sample (the last step is then first order);
            ``"sigma_min"`` stops at the smallest training noise level (VP models only).
        schedule: a :class:`SolverSchedule` (or its dict): fixes the timesteps and every step;
            :meth:`set_timesteps` then only checks the number of steps. ``None`` builds a schedule
            from the parametric knobs below for whatever grid is requested.
        grid: where a parametric schedule puts its steps: ``"time_uniform"`` (diffusers'
            ``timestep_spacing``; ``"linspace"``/``"leading"``/``"trailing"`` select one directly),
            ``"logsnr_uniform"`` (uniform in λ, DPM-Solver's choice for few steps on pixel models) or
            ``"karras"`` (denser at low noise, as EDM).
        karras_rho: the Karras grid's exponent; larger concentrates steps near σ_min.
        solver_order, predict_x0, corrector, lower_order_final: the per-step defaults of a
            parametric schedule (order, data/noise prediction, UniC on all but the last step, and
            diffusers' lowering of the order on the final steps).
        dc_order: degree of DC-Solver's interpolation (``dc_order + 1`` points, 1–3): higher follows
            curved trajectories better but extrapolates noisier outputs further.
    """

    _compatibles: ClassVar[list[str]] = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        rescale_betas_zero_snr: bool = False,
        use_flow_sigmas: bool = False,
        shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        lambda_min_clipped: float = -float("inf"),
        final_sigmas_type: str = "zero",
        schedule: dict[str, Any] | SolverSchedule | None = None,
        grid: str = "time_uniform",
        karras_rho: float = 7.0,
        solver_order: int = 2,
        predict_x0: bool = True,
        corrector: bool = False,
        lower_order_final: bool = True,
        dc_order: int = 2,
    ) -> None:
        if isinstance(schedule, SolverSchedule):
            self.register_to_config(schedule=schedule.to_dict())  # the config must stay JSON
            self._schedule: SolverSchedule | None = schedule
        else:
            self._schedule = None if schedule is None else SolverSchedule.from_dict(schedule)
        if self._schedule is not None and self._schedule.final_sigma not in (None, final_sigmas_type):
            # A schedule that says where it ends wins over the pipeline's convention (DC ratios are fitted for it).
            final_sigmas_type = self._schedule.final_sigma
            self.register_to_config(final_sigmas_type=final_sigmas_type)
        _check_choice("prediction_type", prediction_type, _PREDICTION_TYPES)
        _check_choice("timestep_spacing", timestep_spacing, _SPACINGS)
        _check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        _check_choice("grid", grid, _GRIDS)
        for name, value, lo, hi in (("solver_order", solver_order, 1, MAX_ORDER), ("dc_order", dc_order, 1, 3)):
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
        if not karras_rho > 0 or not shift > 0:
            raise ValueError(f"karras_rho and shift must be > 0, got karras_rho={karras_rho!r}, shift={shift!r}")
        if prediction_type == "flow_prediction" and not use_flow_sigmas:
            raise ValueError("prediction_type='flow_prediction' needs use_flow_sigmas=True (x_t = (1-σ)x₀ + σε)")

        if not use_flow_sigmas:
            if trained_betas is not None:
                betas = torch.tensor(np.asarray(trained_betas), dtype=torch.float32)
            elif beta_schedule == "linear":
                betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
            elif beta_schedule == "scaled_linear":
                betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
            elif beta_schedule == "squaredcos_cap_v2":
                betas = _cosine_betas(num_train_timesteps)
            else:
                raise ValueError(f"beta_schedule {beta_schedule!r} is not one of {', '.join(_BETA_SCHEDULES)}")
            if rescale_betas_zero_snr:
                betas = _rescale_zero_terminal_snr(betas)
            # float32 cumprod like diffusers, so the noise levels equal those of the schedulers it replaces.
            self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
            if rescale_betas_zero_snr:
                self.alphas_cumprod[-1] = 2**-24  # zero SNR would put the first sigma at infinity
            ab = self.alphas_cumprod.double().numpy()
            self._sigma_table: np.ndarray = np.sqrt((1 - ab) / ab)  # diffusers' σ = √((1−ᾱ)/ᾱ), increasing in t
        elif final_sigmas_type == "sigma_min":
            raise ValueError("final_sigmas_type='sigma_min' is for VP models; flow-matching sampling ends at sigma 0")

        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self.sigmas = torch.zeros(0)
        self._steps: tuple[SolverStep, ...] = ()
        self._t = np.zeros(0)
        self._begin_index: int | None = None
        self._reset_state()

    # ---- diffusers scheduler protocol -------------------------------------------------------

    @property
    def step_index(self) -> int | None:
        """The index of the next step to run; advances by one per :meth:`step`."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The first step's index when a pipeline starts mid-schedule (img2img); see :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def scale_model_input(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return sample

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)

    @property
    def schedule(self) -> SolverSchedule | None:
        """The schedule the scheduler is on: the configured one, or after :meth:`set_timesteps` the one it built."""
        if self._schedule is not None or not self._steps:
            return self._schedule
        return SolverSchedule(tuple(float(t) for t in self._t), self._steps)

    @classmethod
    def from_schedule(
        cls, schedule: SolverSchedule | Mapping[str, Any] | None, base_config: Any = None, **overrides: Any
    ) -> USFScheduler:
        """A scheduler on ``schedule`` for the model a pipeline scheduler (or its config) describes.

        From ``base_config`` (a scheduler or its config; DPM-Solver, UniPC, DDIM, Euler,
        FlowMatchEuler, … or a USFScheduler's) it takes the noise schedule and the model's
        parameterisation, and, for parametric use (``schedule=None``), the solver settings it can
        translate (``solver_order``, ``algorithm_type`` → ``predict_x0``, UniPC → ``corrector``,
        Karras / λ-uniform spacing → ``grid``). ``overrides`` are set last.
        """
        config = cls._translate_config(base_config)
        if schedule is not None:
            if isinstance(schedule, Mapping):
                schedule = SolverSchedule.from_dict(schedule)
            if schedule.final_sigma is not None:
                config["final_sigmas_type"] = schedule.final_sigma
            config["schedule"] = schedule.to_dict()
        config.update(overrides)
        return cls(**config)

    @classmethod
    def _translate_config(cls, base: Any) -> dict[str, Any]:
        if base is None:
            return {}
        class_name = type(base).__name__ if hasattr(base, "config") else None
        config: Mapping[str, Any] = base.config if hasattr(base, "config") else base
        class_name = class_name or str(config.get("_class_name", ""))
        params = set(inspect.signature(cls.__init__).parameters) - {"self"}
        out = {k: v for k, v in config.items() if k in params}
        if "flow_shift" in config and "shift" not in config:
            out["shift"] = config["flow_shift"]
        flow_match = class_name.startswith("FlowMatch") or (
            not class_name and "shift" in config and "beta_start" not in config
        )
        if flow_match:
            out.update(use_flow_sigmas=True, prediction_type="flow_prediction")
        if out.get("use_flow_sigmas"):
            # Flow sampling here always ends at σ = 0 (diffusers' flow "sigma_min" repeats the last σ: a no-op step).
            out.pop("final_sigmas_type", None)
        if config.get("algorithm_type") in ("dpmsolver", "sde-dpmsolver"):
            out["predict_x0"] = False
        if class_name == "UniPCMultistepScheduler":
            out["corrector"] = True
        if config.get("use_karras_sigmas"):
            out["grid"] = "karras"
        elif config.get("use_lu_lambdas"):
            out["grid"] = "logsnr_uniform"
        return out

    # ---- noise levels -----------------------------------------------------------------------

    def _timestep_to_sigma(self, t: np.ndarray) -> np.ndarray:
        """diffusers' σ at (possibly fractional) timesteps: linear interpolation of the training table."""
        if self.config.use_flow_sigmas:
            return np.asarray(t, dtype=np.float64) / self.config.num_train_timesteps
        table = self._sigma_table
        return np.interp(np.asarray(t, dtype=np.float64), np.arange(len(table)), table)

    def _sigma_to_timestep(self, sigma: np.ndarray) -> np.ndarray:
        """Exact inverse of :meth:`_timestep_to_sigma` (the table increases strictly with t)."""
        if self.config.use_flow_sigmas:
            return np.asarray(sigma, dtype=np.float64) * self.config.num_train_timesteps
        table = self._sigma_table
        return np.interp(np.asarray(sigma, dtype=np.float64), table, np.arange(len(table), dtype=np.float64))

    def _alpha_sigma(self, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.config.use_flow_sigmas:
            return 1.0 - sigma, sigma
        alpha = 1.0 / np.sqrt(sigma**2 + 1.0)
        return alpha, sigma * alpha

    def _grid(self, n: int, mu: float | None) -> np.ndarray:
        """Timesteps of a parametric grid with ``n`` evaluations."""
        config = self.config
        grid = config.grid
        N = config.num_train_timesteps
        if config.use_flow_sigmas:
            shift = math.exp(mu) if mu is not None else config.shift
            if grid in ("time_uniform", *_SPACINGS):
                # FlowMatchEulerDiscreteScheduler's grid (SD3): uniform from 1 down to its σ_min, which is
                # already shifted once by the configured shift, then shifted (again) as a whole.
                sigma_min = float(_shift_sigmas(np.array(1.0 / N), config.shift))
                sigmas = _shift_sigmas(np.linspace(1.0, sigma_min, n), shift)
            else:
                # Build λ-uniform and Karras grids on the odds σ/(1−σ), which plays the VP σ's role; the
                # ends stay one training step inside (0, 1) so that λ is finite.
                lo, hi = _shift_sigmas(np.array([1.0 / N, 1.0 - 1.0 / N]), shift)
                odds = self._continuous_grid(n, lo / (1 - lo), hi / (1 - hi))
                sigmas = odds / (1 + odds)
            return sigmas * N

        # Clip the noisiest end where λ < lambda_min_clipped (matters for the cosine schedule), as DPM-Solver does.
        lambdas = -np.log(self._sigma_table)
        clipped = int(np.searchsorted(lambdas[::-1], config.lambda_min_clipped))
        last = N - clipped
        if grid in ("time_uniform", *_SPACINGS):
            spacing = config.timestep_spacing if grid == "time_uniform" else grid
            if spacing == "linspace":
                return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.float64)
            if spacing == "leading":
                ratio = last // (n + 1)
                return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.float64) + config.steps_offset
            return np.arange(last, 0, -N / n).round().astype(np.float64) - 1  # trailing
        sigma_min, sigma_max = float(self._sigma_table[0]), float(self._sigma_table[last - 1])
        if config.final_sigmas_type == "sigma_min":
            # The grid's last point is the final noise level itself: no evaluation there, the last step lands on it.
            return self._sigma_to_timestep(self._continuous_grid(n + 1, sigma_min, sigma_max)[:-1])
        return self._sigma_to_timestep(self._continuous_grid(n, sigma_min, sigma_max))

    def _continuous_grid(self, n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
        """``n`` noise levels from ``sigma_max`` to ``sigma_min`` inclusive, λ-uniform or Karras."""
        if n == 1:
            return np.array([sigma_max])
        if self.config.grid == "logsnr_uniform":
            return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))
        inv_rho = 1.0 / self.config.karras_rho
        ramp = np.linspace(0, 1, n)
        hi, lo = sigma_max**inv_rho, sigma_min**inv_rho
        return (hi + ramp * (lo - hi)) ** self.config.karras_rho

    # ---- set_timesteps ------------------------------------------------------------------------

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[float] | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """Choose the grid for the next sampling run.

        Any grid is accepted: ``num_inference_steps`` on the configured ``grid``, explicit
        ``timesteps`` (model units, strictly decreasing, fractional allowed) or explicit
        ``sigmas`` (diffusers' σ: √((1−ᾱ)/ᾱ) for VP models, the flow σ otherwise), one per model
        evaluation; the final σ follows ``final_sigmas_type``. ``mu`` (Flux's dynamic shifting)
        replaces ``shift`` by e^mu for parametric flow grids.

        A scheduler built on a ``schedule`` always samples on that schedule: pipelines such as
        Flux pass their own default ``sigmas`` on every call, which must not override a tuned
        profile, so only the number of steps requested is checked (:class:`ProfileError` if it differs).
        """
        if timesteps is not None and sigmas is not None:
            raise ValueError("pass at most one of `timesteps` and `sigmas`")
        explicit = timesteps if timesteps is not None else sigmas
        if self._schedule is not None:
            requested = len(explicit) if explicit is not None else num_inference_steps
            if requested is not None and requested != self._schedule.num_steps:
                raise ProfileError(
                    f"num_inference_steps={requested}, but the solver schedule has {self._schedule.num_steps} steps: "
                    f"run the pipeline with num_inference_steps={self._schedule.num_steps}"
                )
            t = np.asarray(self._schedule.timesteps, dtype=np.float64)
            steps: tuple[SolverStep, ...] | None = self._schedule.steps
        else:
            if timesteps is not None:
                t = np.asarray([float(v) for v in timesteps], dtype=np.float64)
            elif sigmas is not None:
                t = self._custom_sigmas(np.asarray([float(v) for v in sigmas], dtype=np.float64))
            elif num_inference_steps is not None:
                if isinstance(num_inference_steps, bool) or int(num_inference_steps) < 1:
                    raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps!r}")
                t = self._grid(int(num_inference_steps), mu)
            else:
                raise ValueError("pass `num_inference_steps`, `timesteps` or `sigmas`")
            steps = None
        self._set_grid(t, steps, device)

    def _custom_sigmas(self, sigmas: np.ndarray) -> np.ndarray:
        if self.config.use_flow_sigmas:
            lo, hi = 0.0, 1.0
        else:
            lo, hi = float(self._sigma_table[0]), float(self._sigma_table[-1])
        bad = [float(s) for s in sigmas if not (math.isfinite(float(s)) and lo <= s <= hi)]
        if bad or not len(sigmas):
            raise ValueError(f"sigmas must be non-empty and within the model's range [{lo:.6g}, {hi:.6g}]; got {bad}")
        return self._sigma_to_timestep(sigmas)

    def _set_grid(self, t: np.ndarray, steps: tuple[SolverStep, ...] | None, device: Any) -> None:
        config = self.config
        n = len(t)
        t_max = config.num_train_timesteps if config.use_flow_sigmas else config.num_train_timesteps - 1
        if n == 0 or not np.all(np.isfinite(t)) or t.min() < 0 or t.max() > t_max:
            raise ValueError(f"timesteps must be finite and within [0, {t_max}], got {t.tolist()}")
        if np.any(np.diff(t) >= 0):
            raise ValueError(f"timesteps must strictly decrease (one per model evaluation), got {t.tolist()}")
        sig = self._timestep_to_sigma(t)
        if config.use_flow_sigmas and sig[-1] <= 0:
            raise ValueError("a flow-matching model cannot be evaluated at timestep 0 (σ = 0, nothing to denoise)")
        final = 0.0 if config.final_sigmas_type == "zero" else float(self._sigma_table[0])
        if final >= sig[-1]:
            raise ValueError(
                f"the last timestep {t[-1]:g} is already at sigma_min; end above it or use final_sigmas_type='zero'"
            )
        sig = np.append(sig, final)
        alpha, sigma_t = self._alpha_sigma(sig)
        with np.errstate(divide="ignore"):
            # λ = log(α/σ): +inf at σ = 0 (clean end), −inf at α = 0 (flow σ = 1, pure noise).
            lam = np.log(alpha) - np.log(sigma_t)
        if steps is None:
            steps = _default_steps(
                n,
                config.solver_order,
                "data" if config.predict_x0 else "noise",
                config.corrector,
                lower_order_final=config.lower_order_final,
                final_zero=final == 0.0,
            )
        self._t, self._alpha, self._sig, self._lambda, self._steps = t, alpha, sigma_t, lam, steps
        self._ems = self._schedule.ems if self._schedule is not None else None
        self._ems_cache: dict[tuple[Any, ...], Any] = {}
        if self._ems is not None:
            self._check_ems(self._ems, lam)
        integral = bool(np.all(t == np.round(t)))
        # Integer timesteps stay int64 as in diffusers' VP schedulers (some models embed them by lookup);
        # fractional ones are float32 like FlowMatchEulerDiscreteScheduler's.
        self.timesteps = torch.from_numpy(t.astype(np.int64) if integral else t.astype(np.float32)).to(device)
        self.sigmas = torch.from_numpy(sig.astype(np.float32))
        self.num_inference_steps = n
        self._begin_index = None
        self._reset_state()

    def _check_ems(self, table: EMSTable, lam: np.ndarray) -> None:
        """The table's points must be this model's: each covered one within half a statistics grid cell."""
        cell = float(table.source.get("grid_step", 0.0) or 0.0)
        for k, snapped in enumerate(table.lambdas):
            if snapped is None:
                continue
            if not math.isfinite(lam[k]) or (cell and abs(snapped - lam[k]) > 0.5 * cell + 1e-6):
                raise ProfileError(
                    f"solver.ems: point {k} was built for λ = {snapped:.4g}, but this model's noise schedule puts it "
                    f"at λ = {lam[k]:.4g}; the statistics belong to another noise schedule — recompute them for this "
                    "model"
                )

    def _reset_state(self) -> None:
        self._step_index: int | None = None
        self._x0: list[torch.Tensor] = []  # buffered data predictions, newest last
        self._eps: list[torch.Tensor] = []  # the same evaluations as noise predictions
        self._last_sample: torch.Tensor | None = None  # the sample the previous predictor started from
        self._pending: tuple[SolverStep, int] | None = None  # previous step and its order, if UniC is due

    def _init_step_index(self, timestep: float | torch.Tensor) -> None:
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        value = float(torch.as_tensor(timestep).reshape(-1)[0])
        matches = np.flatnonzero(self.timesteps.cpu().double().numpy() == value)
        if len(matches) == 0:  # e.g. a float32-rounded copy of a fractional timestep
            matches = np.flatnonzero(np.isclose(self._t, value, rtol=0, atol=1e-3))
        if len(matches) == 0:
            raise ValueError(
                f"timestep {value:g} is not on this scheduler's grid {self._t.tolist()}; call set_begin_index "
                "to start mid-schedule"
            )
        self._step_index = int(matches[0])

    # ---- stepping -----------------------------------------------------------------------------

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor]:
        """Advance ``sample`` from this step's timestep to the next (``generator`` is unused: the solver is an ODE)."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        assert i is not None
        if i >= self.num_inference_steps:
            raise ValueError(f"all {self.num_inference_steps} steps have run; call set_timesteps to sample again")
        step = self._steps[i]
        out_dtype = sample.dtype
        if sample.dtype in (torch.float16, torch.bfloat16):
            # Half precision loses the small differences multistep terms are made of; work in float32 as diffusers does.
            sample, model_output = sample.float(), model_output.float()
        if i == 0 and self._schedule is not None and self._schedule.analytic_first:
            # USF's analytical first step: x̂₀ = 0 (zero_x0) or the mean clean sample (average_x0) at the first
            # timestep, ε̂ = (x_T − α_T·x̂₀)/σ_T; the model output is not read.
            x0 = self._first_x0(sample)
            eps = (sample - float(self._alpha[0]) * x0) / float(self._sig[0])
        else:
            x0, eps = self._convert(model_output, sample, i)

        if self._pending is not None and self._last_sample is not None:
            # UniC: now that the model has seen the predicted sample, correct that prediction before stepping on
            # (UniPC's order; the model output itself stays the one computed at the uncorrected sample).
            prev, prev_order = self._pending
            if prev.prediction == "v3":
                model_t = self._v3_f(i, x0, eps)
            else:
                model_t = x0 if prev.prediction == "data" else eps
            correct = self._usf_corrector if prev.corrector_kind == "usf" else self._corrector
            sample = correct(i - 1, prev_order, prev.prediction, model_t, sample)

        self._x0.append(x0)
        self._eps.append(eps)
        keep = max(MAX_ORDER, self.config.dc_order + 1)
        del self._x0[:-keep], self._eps[:-keep]

        if step.dc_ratio != 1.0:
            self._compensate(i, step.prediction, step.dc_ratio)

        order = self._usable_order(i, step.order)
        points = step.points if order == step.order and self._reachable(i, step.points) else ()
        if not points and step.corrector_kind == "usf" and order > 1:
            points = tuple(range(1, order))  # a USF step predicts with its Taylor update too
        unipc = step.corrector and step.corrector_kind == "unic"  # UniPC pairs UniP with UniC; USF's is Taylor
        prev_sample = self._predictor(
            i, order, step.prediction, sample, unipc=unipc, relax=step.relaxation, points=points
        )
        self._pending = (step, order) if step.corrector else None
        self._last_sample = sample
        self._step_index = i + 1
        prev_sample = prev_sample.to(out_dtype)
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def _first_x0(self, sample: torch.Tensor) -> torch.Tensor:
        first = self._schedule.first_x0 if self._schedule is not None else None
        if first is None:
            return torch.zeros_like(sample)
        if tuple(first.array.shape) != tuple(sample.shape[1:]):
            raise ProfileError(
                f"solver.first_x0: shape {list(first.array.shape)}, but the samples are {list(sample.shape[1:])}; the "
                "profile belongs to another model or size"
            )
        return torch.from_numpy(first.array).to(sample.device, sample.dtype).expand_as(sample)

    def _convert(self, model_output: torch.Tensor, sample: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂₀, ε̂) of one evaluation, both at the sample the model saw."""
        a, s = float(self._alpha[i]), float(self._sig[i])
        kind = self.config.prediction_type
        if kind == "epsilon":
            return (sample - s * model_output) / a, model_output
        if kind == "v_prediction":
            return a * sample - s * model_output, a * model_output + s * sample
        if kind == "flow_prediction":  # v = ε − x₀ with α = 1 − σ
            return sample - s * model_output, sample + (1.0 - s) * model_output
        return model_output, (sample - a * model_output) / s  # "sample"

    def _buffer(self, prediction: str) -> list[torch.Tensor]:
        return self._x0 if prediction == "data" else self._eps

    def _usable_order(self, i: int, order: int) -> int:
        """The highest order ≤ ``order`` whose finite differences exist: enough buffered points, all at finite λ."""
        if not (math.isfinite(self._lambda[i + 1]) and math.isfinite(self._lambda[i])):
            # Landing on σ = 0 (λ = +∞) or leaving α = 0 (λ = −∞): higher-order terms vanish or are undefined in
            # the limit, only the first-order step is defined (this is why diffusers' last step is order 1).
            return 1
        p = 1
        while p < min(order, len(self._x0)) and math.isfinite(self._lambda[i - p]):
            p += 1
        return p

    def _reachable(self, i: int, points: tuple[int, ...]) -> bool:
        """Whether every chosen earlier evaluation is buffered and at a finite λ."""
        return bool(points) and max(points) < len(self._x0) and all(math.isfinite(self._lambda[i - j]) for j in points)

    def _coefficients(self, s: int, t: int, prediction: str) -> tuple[float, float, float, float]:
        """(h, hh, ratio, scale) of the exponential integrator from grid point ``s`` to ``t``.

        x_t = ratio·x_s − scale·[(e^hh − 1)·m_s + higher-order terms], with hh = −h, ratio = σ_t/σ_s,
        scale = α_t for the data prediction and hh = h, ratio = α_t/α_s, scale = σ_t for the noise one.
        """
        h = float(self._lambda[t] - self._lambda[s])
        a_s, a_t, s_s, s_t = (float(v) for v in (self._alpha[s], self._alpha[t], self._sig[s], self._sig[t]))
        if prediction == "data":
            return h, -h, s_t / s_s, a_t
        return h, h, (a_t / a_s if a_s > 0 else math.inf), s_t

    def _predictor(
        self,
        i: int,
        order: int,
        prediction: str,
        x: torch.Tensor,
        *,
        unipc: bool,
        relax: float = 0.0,
        points: tuple[int, ...] = (),
    ) -> torch.Tensor:
        if prediction == "v3":
            return self._v3(i, order, x, 1.0 + relax * float(self._lambda[i + 1] - self._lambda[i]), points)
        h, hh, ratio, scale = self._coefficients(i, i + 1, prediction)
        relaxed = 1.0 + relax * h  # USF's "linear" relaxation of the first derivative (1 when relax = 0)
        if not math.isfinite(h) or not math.isfinite(ratio):
            # The closed form of the first-order step, finite where h is not: x_t = α_t·x̂₀ + σ_t·ε̂.
            return float(self._alpha[i + 1]) * self._x0[-1] + float(self._sig[i + 1]) * self._eps[-1]
        if points and order > 1:
            return self._taylor(i, order, prediction, x, relaxed, points)
        m = self._buffer(prediction)
        m0 = m[-1]
        phi1 = math.expm1(hh)
        if order == 1:
            return ratio * x - (scale * phi1) * m0
        if order == 2:
            # DPM-Solver(++) 2M "midpoint"; UniP-2 with B(h) = e^h − 1 and ρ = 1/2 is the same update.
            r0 = float(self._lambda[i] - self._lambda[i - 1]) / h
            d1 = (m0 - m[-2]) / r0
            if relax:
                d1 = d1 * relaxed
            return ratio * x - (scale * phi1) * (m0 + 0.5 * d1)
        if unipc:
            rks = [float(self._lambda[i - k] - self._lambda[i]) / h for k in range(1, order)] + [1.0]
            rhos = _unipc_rhos(hh, rks, corrector=False)
            res = rhos[0] * (m[-2] - m0) / rks[0]
            for k in range(2, order):
                res = res + rhos[k - 1] * (m[-1 - k] - m0) / rks[k - 1]
            return ratio * x - (scale * phi1) * m0 - (scale * phi1) * res
        if order >= 4:
            return self._taylor(i, order, prediction, x, relaxed)
        # DPM-Solver(++) 3M.
        r0 = float(self._lambda[i] - self._lambda[i - 1]) / h
        r1 = float(self._lambda[i - 1] - self._lambda[i - 2]) / h
        d1_0 = (m0 - m[-2]) / r0
        d1_1 = (m[-2] - m[-3]) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        if relax:
            d1 = d1 * relaxed
        d2 = (d1_0 - d1_1) / (r0 + r1)
        return ratio * x - scale * (phi1 * m0 + (phi1 / hh - 1.0) * d1 + ((phi1 - hh) / hh**2 - 0.5) * d2)

    def _taylor(
        self, i: int, order: int, prediction: str, x: torch.Tensor, relaxed: float = 1.0, points: tuple[int, ...] = ()
    ) -> torch.Tensor:
        """USF's multistep update (thu-nics/USF ``uni_sampler.update``) at ``order``, from grid point ``i``.

        With h = λ_t − λ_s and φ₁(z) = (e^z − 1)/z, φ_{k+1}(z) = (φ_k(z) − 1/k!)/z:
        data: x_t = (σ_t/σ_s)·x_s + α_t·Σ_{k<p} h^{k+1}·φ_{k+1}(−h)·x̂₀⁽ᵏ⁾;
        noise: x_t = (α_t/α_s)·x_s − σ_t·Σ_{k<p} h^{k+1}·φ_{k+1}(h)·ε̂⁽ᵏ⁾ — the exponential integrator's
        Taylor expansion, exact when the prediction is a polynomial of degree < p in λ. The λ-derivatives
        F⁽ᵏ⁾ at λ_s come from the p − 1 earlier buffered points j (r_j = λ_j − λ_s): solve
        Σ_k r_j^k / k! · F⁽ᵏ⁾ = F_j − F_s (the reference's ``get_diff_derivative`` with its default
        active points ``[−p … −2]``); ``points`` choose other earlier evaluations (offsets back, USF's
        chosen active points).
        """
        m = self._buffer(prediction)
        offsets = points or tuple(range(1, order))
        r = [float(self._lambda[i - j] - self._lambda[i]) for j in offsets]
        deltas = [m[-1 - j] - m[-1] for j in offsets]
        return self._taylor_step(i, order, prediction, x, m[-1], r, deltas, relaxed)

    def _taylor_step(
        self,
        i: int,
        order: int,
        prediction: str,
        x: torch.Tensor,
        start: torch.Tensor,
        r: list[float],
        deltas: list[torch.Tensor],
        relaxed: float = 1.0,
    ) -> torch.Tensor:
        """The Taylor update from grid point ``i`` to ``i + 1`` with the prediction ``start`` at ``i`` and the
        points at λ_i + r_j differing from it by ``deltas`` (``order − 1`` of them)."""
        h = float(self._lambda[i + 1] - self._lambda[i])
        hh = -h if prediction == "data" else h
        phi, factorial, terms = math.exp(hh), 1.0, []
        for k in range(order):  # φ_{k+1}(hh), as the reference's recursion
            factorial *= max(k, 1)
            phi = (phi - 1.0 / factorial) / hh
            terms.append(h ** (k + 1) * phi)
        total = terms[0] * start
        for k, derivative in enumerate(_taylor_derivatives(order, r, deltas), start=1):
            total = total + (terms[k] * (relaxed if k == 1 else 1.0)) * derivative
        a_s, a_t, s_s, s_t = (float(v) for v in (self._alpha[i], self._alpha[i + 1], self._sig[i], self._sig[i + 1]))
        if prediction == "data":
            return (s_t / s_s) * x + a_t * total
        return (a_t / a_s) * x - s_t * total

    def _corrector(
        self, j: int, order: int, prediction: str, model_t: torch.Tensor, predicted: torch.Tensor
    ) -> torch.Tensor:
        """UniC-``order`` (bh2) for the step ``j`` → ``j + 1``, from its starting sample and the new evaluation."""
        x = self._last_sample
        assert x is not None
        h, hh, ratio, scale = self._coefficients(j, j + 1, prediction)
        if not math.isfinite(ratio):
            # Noise prediction leaving α = 0 has no finite UniC form; keep the predicted sample.
            return predicted
        m = self._buffer(prediction)  # not yet holding evaluation j + 1: m[-1] is at j
        m0 = m[-1]
        phi1 = math.expm1(hh)
        rks = [float(self._lambda[j - k] - self._lambda[j]) / h for k in range(1, order)] + [1.0]
        rhos = _unipc_rhos(hh, rks, corrector=True)
        res = rhos[-1] * (model_t - m0)
        for k in range(1, order):
            res = res + rhos[k - 1] * (m[-1 - k] - m0) / rks[k - 1]
        return ratio * x - (scale * phi1) * m0 - (scale * phi1) * res

    def _usf_corrector(
        self, j: int, order: int, prediction: str, model_t: torch.Tensor, predicted: torch.Tensor
    ) -> torch.Tensor:
        """USF's pseudo corrector for the step ``j`` → ``j + 1`` run at ``order``: the Taylor update from the
        step's starting sample at ``order + 1``, its derivatives at λ_j estimated from the new evaluation
        (at λ_{j+1}) and the ``order − 1`` earlier ones (thu-nics/USF ``get_diff_derivative(corrector=True)``
        with its default active points)."""
        x = self._last_sample
        assert x is not None
        r = [float(self._lambda[j + 1] - self._lambda[j])]
        r += [float(self._lambda[j - k] - self._lambda[j]) for k in range(1, order)]
        if prediction == "v3":
            # g relative to the step's start j: the new evaluation's f (``model_t``) and the buffered ones'.
            g = [self._v3_g(j, j - k, self._v3_f(j - k, self._x0[-1 - k], self._eps[-1 - k])) for k in range(order)]
            g_new = self._v3_g(j, j + 1, model_t)
            deltas = [g_new - g[0], *(g[k] - g[0] for k in range(1, order))]
            return self._v3_step(j, order + 1, x, g[0], r, deltas)
        _, _, ratio, _ = self._coefficients(j, j + 1, prediction)
        if not math.isfinite(ratio) or not math.isfinite(self._lambda[j + 1]):
            return predicted  # no finite update (leaving α = 0 with noise prediction): as UniC, keep the prediction
        m = self._buffer(prediction)  # not yet holding evaluation j + 1: m[-1] is at j
        deltas = [model_t - m[-1], *(m[-1 - k] - m[-1] for k in range(1, order))]
        return self._taylor_step(j, order + 1, prediction, x, m[-1], r, deltas)

    # ---- DPM-Solver-v3 ----------------------------------------------------------------------------

    def _ems_row(self, k: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Point ``k``'s l, L, S, B, I, C as float64 tensors on ``like``'s device (cached per run)."""
        key = ("row", k, like.device)
        if key not in self._ems_cache:
            table = self._ems
            assert table is not None
            if not table.covers(k):
                raise ProfileError(f"solver.ems: a v3 step needs point {k}, which the statistics do not cover")
            names = ("l", "L", "S", "B", "I", "C")
            self._ems_cache[key] = {name: torch.from_numpy(getattr(table, name)[k]).to(like.device) for name in names}
        return self._ems_cache[key]

    def _v3_f(self, k: int, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """f = (σ·ε̂ − l·x)/α at point ``k`` = (1 − l)·(σ/α)·ε̂ − l·x̂₀ (x = α·x̂₀ + σ·ε̂; no sample needed)."""
        row = self._ems_row(k, eps)
        l = row["l"].to(eps.dtype)  # noqa: E741 - the paper's name
        return (1.0 - l) * (float(self._sig[k]) / float(self._alpha[k])) * eps - l * x0

    def _v3_g(self, s: int, k: int, f: torch.Tensor) -> torch.Tensor:
        """g of point ``k`` relative to the start ``s``: e^{S_s−S_k}·f − e^{S_s}·(B_k − B_s)."""
        key = ("g", s, k, f.device, f.dtype)
        if key not in self._ems_cache:  # each pair's factors once per run
            rs, rk = self._ems_row(s, f), self._ems_row(k, f)
            scale = torch.exp(rs["S"] - rk["S"]).to(f.dtype)
            shift = (torch.exp(rs["S"]) * (rk["B"] - rs["B"])).to(f.dtype)
            self._ems_cache[key] = (scale, shift)
        scale, shift = self._ems_cache[key]
        return scale * f - shift

    def _v3(self, i: int, order: int, x: torch.Tensor, relaxed: float, points: tuple[int, ...]) -> torch.Tensor:
        """DPM-Solver-v3's multistep predictor from point ``i`` (the reference's ``dpmsolver_v3_prediction``)."""
        table = self._ems
        assert table is not None
        offsets = points or tuple(range(1, order))
        if not all(table.covers(i - j) for j in offsets):  # warm-up over points the statistics do not cover
            offsets = tuple(j for j in range(1, order) if table.covers(i - j))
            offsets = offsets[: next((n for n, j in enumerate(offsets) if j != n + 1), len(offsets))]
            order = len(offsets) + 1
        g_s = self._v3_g(i, i, self._v3_f(i, self._x0[-1], self._eps[-1]))
        g = [self._v3_g(i, i - j, self._v3_f(i - j, self._x0[-1 - j], self._eps[-1 - j])) for j in offsets]
        r = [float(self._lambda[i - j] - self._lambda[i]) for j in offsets]
        return self._v3_step(i, order, x, g_s, r, [gj - g_s for gj in g], relaxed)

    def _v3_step(
        self,
        i: int,
        order: int,
        x: torch.Tensor,
        g_s: torch.Tensor,
        r: list[float],
        deltas: list[torch.Tensor],
        relaxed: float = 1.0,
    ) -> torch.Tensor:
        """x_t = α_t/α_s·e^{L_s−L_t}·x_s − α_t·e^{−L_t−S_s}·(I_t−I_s)·g_s − α_t·e^{−L_t}·(C_t−C_s−B_s·(I_t−I_s))
        − Σ_k α_t·e^{L_s−L_t}·high_k·g⁽ᵏ⁾ for the step ``i`` → ``i + 1`` (g⁽ᵏ⁾ by the Taylor system over ``r``)."""
        key = ("step", i, x.device, x.dtype)
        if key not in self._ems_cache:  # the step's coefficients once per run
            table = self._ems
            assert table is not None
            rs, rt = self._ems_row(i, x), self._ems_row(i + 1, x)
            a_s, a_t = float(self._alpha[i]), float(self._alpha[i + 1])
            di = rt["I"] - rs["I"]
            base = a_t * torch.exp(rs["L"] - rt["L"])
            high = torch.from_numpy(table.high[i]).to(x.device)
            self._ems_cache[key] = (
                ((a_t / a_s) * torch.exp(rs["L"] - rt["L"])).to(x.dtype),
                (a_t * torch.exp(-rt["L"] - rs["S"]) * di).to(x.dtype),
                (a_t * torch.exp(-rt["L"]) * (rt["C"] - rs["C"] - rs["B"] * di)).to(x.dtype),
                [base * high[k] for k in range(len(high))],  # float64; the relaxation multiplies the first
            )
        c0, c1, c2, high_terms = self._ems_cache[key]
        out = c0 * x - c1 * g_s - c2
        for k, derivative in enumerate(_taylor_derivatives(order, r, deltas), start=1):
            out = out - (high_terms[k - 1] * (relaxed if k == 1 else 1.0)).to(x.dtype) * derivative
        return out

    def _compensate(self, i: int, prediction: str, ratio: float | torch.Tensor) -> None:
        """DC-Solver: replace the newest buffered output by its compensated value, for every later use.

        As in the reference's ``_step``, the compensated value stays in the buffer (later predictors and the
        next UniC use it as the output at t_i), while the corrector's fresh evaluation is never compensated.
        """
        m = self._buffer(prediction)
        k = min(self.config.dc_order + 1, len(m))
        times = [float(v) for v in self._t[i - k + 1 : i + 1]]
        new = dynamic_compensation(m[-k:], times, ratio, self.config.dc_order)
        delta = new - m[-1]
        m[-1] = new
        # Keep the other representation of the same evaluation consistent: ε = (x − α x₀)/σ at a fixed x.
        a, s = float(self._alpha[i]), float(self._sig[i])
        if prediction == "data":
            self._eps[-1] = self._eps[-1] - (a / s) * delta
        elif a > 0:
            self._x0[-1] = self._x0[-1] - (s / a) * delta

    # ---- training-style noising -----------------------------------------------------------------

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = α_t·x₀ + σ_t·ε at each sample's timestep (any value in model units, not only grid points)."""
        t = torch.as_tensor(timesteps).reshape(-1).double().cpu().numpy()
        alpha, sigma = self._alpha_sigma(self._timestep_to_sigma(t))
        shape = (-1,) + (1,) * (original_samples.dim() - 1)
        a = torch.from_numpy(alpha).to(original_samples.device, original_samples.dtype).reshape(shape)
        s = torch.from_numpy(sigma).to(original_samples.device, original_samples.dtype).reshape(shape)
        return a * original_samples + s * noise


def _derivative_weights(order: int, r: Sequence[float]) -> np.ndarray:
    """Finite-difference weights of the Taylor system Σ_k r_j^k/k!·F⁽ᵏ⁾ = F_j − F_s (USF's ``get_diff_derivative``):
    column k − 1 gives F⁽ᵏ⁾ = Σ_j weights[j, k − 1]·ΔF_j."""
    system = np.array([[rj**k / math.factorial(k) for rj in r] for k in range(1, order)])
    return np.linalg.solve(system, np.eye(order - 1))


def _taylor_derivatives(order: int, r: Sequence[float], deltas: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """F⁽ᵏ⁾ for k = 1 … order − 1 from the differences ``deltas`` to the points at offsets ``r`` in λ."""
    if order < 2:
        return []
    weights = _derivative_weights(order, r)
    out = []
    for k in range(1, order):
        derivative = float(weights[0, k - 1]) * deltas[0]
        for j in range(1, order - 1):
            derivative = derivative + float(weights[j, k - 1]) * deltas[j]
        out.append(derivative)
    return out


def _unipc_rhos(hh: float, rks: Sequence[float], *, corrector: bool) -> list[float]:
    """UniP / UniC weights of the divided differences for B(h) = e^hh − 1 ("bh2").

    ``rks`` are the ratios (λ_{s_k} − λ_{s_0}) / h of the earlier points followed by 1. Order p uses
    p − 1 earlier points; the predictor solves the leading (p−1)×(p−1) system (ρ = 1/2 at p = 2), the
    corrector the full p×p one including the new evaluation (ρ = 1/2 at p = 1).
    """
    p = len(rks)
    b_h = math.expm1(hh)
    h_phi_k = b_h / hh - 1.0
    factorial = 1.0
    rows, b = [], []
    for k in range(1, p + 1):
        rows.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    if corrector:
        if p == 1:
            return [0.5]
        return [float(v) for v in np.linalg.solve(np.array(rows), np.array(b))]
    if p == 2:
        return [0.5]
    return [float(v) for v in np.linalg.solve(np.array(rows)[:-1, :-1], np.array(b)[:-1])]


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")
