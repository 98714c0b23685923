"""DC-Solver: per-step compensation ratios fitted through the denoiser, and cascade polynomial regression.

DC-Solver (Zhao et al., ECCV 2024; code wl-zhao/DC-Solver) replaces, just before each UniPC
predictor, the newest model output by the Lagrange interpolant of the last ``dc_order + 1`` outputs
at t′ = t_{i−1} + ρ_i (t_i − t_{i−1}) (:func:`difftune.accel.solver.dynamic_compensation`). The ratios
ρ_i are fitted per schedule, as the reference's ``find_optim_ratio`` / ``_step_search`` do
(``diffusers/src/diffusers/schedulers/scheduling_dcsolver_multistep.py``):

- **ground truth**: one DDIM trajectory of ``reference_steps`` (200) steps from the same noise and
  conditions, time-uniform from the schedule's first timestep, ending where the schedule ends;
- **greedy, step by step**: ρ_0 = ρ_1 = 1 (the reference's warm-up); for every later step i, ρ_i
  starts at 1 and takes ``iterations`` (20) AdamW steps (lr 0.1, torch's default weight decay) on
  the MSE between the sample after this step's predictor *and the next step's UniC corrector* —
  which evaluates the denoiser at the predicted sample, so the gradient goes through the denoiser —
  and the DDIM latent just past t_{i+1} (the reference's ``ts >= t`` rule on latents recorded after
  each DDIM step); the last two steps are compared with DDIM's final latent (``target="next"``:
  only the last — on the embedded model that fits better, see the README). A step without a
  corrector (DPM-Solver++ schedules, the last step) is compared after its predictor alone. Sampling
  then goes on with the fitted ratio, so later ratios are fitted on the compensated trajectory;
- ratios are unbounded (``bound="none"``, the reference's default) or ``1 + 0.5·tanh(p)``
  (``bound="tanh"``).

**Final σ.** The reference's Stable Diffusion setup ends sampling at σ(ᾱ₀) (``final_sigmas_type=
"sigma_min"``), not at 0, and disables the corrector at step 0; :func:`reference_schedule` builds
that UniPC schedule (its ``final_sigma`` field makes every pipeline it is applied to end there too),
and the fitted ratios belong to the schedule they were fitted on, final σ included.

The reference's diffusers version needs a modified pipeline that hands its scheduler a model
function. difftune fits on any pipeline: the denoiser's own calls are recorded, and at step 0 the
scheduler checks how the pipeline turns a sample into the denoiser's input (the sample itself, or
k stacked copies for batched guidance) and the raw output into the model output it steps with (the
output, its first ``C`` channels for learned-σ models, or ``u + g·(c − u)`` — with the halves in
either order, one affine family ``(1 − w)·h₀ + w·h₁`` whose w is solved from the data). A pipeline
whose combination is none of these (guidance rescale, separate guidance passes) is refused with
that reason.

**CPR** (:class:`CascadePolynomial`): the ratio of step ``s`` (1-based) is a cubic in s/NFE; each of
its 4 coefficients is a quadratic in CFG/12; each of those 3 coefficients a quadratic in NFE/50 —
36 numbers, fitted by least squares on ratios found at several (NFE, guidance) settings (steps
1–2, fixed at 1, are not fitted) and stored per model, to predict ratios for settings never fitted.
The reference ships coefficients for SD-2.1 but not the code that fits them; the model is linear in
its 36 coefficients, so the least-squares solution (minimum norm where the settings cannot tell all
36 apart) is the global optimum. Fits and polynomials are cached on disk under
``<difftune cache>/dc``, keyed by model fingerprint, schedule, call and settings::

    >>> import difftune
    >>> from difftune.search.dc import fit_dc_ratios, reference_schedule
    >>> pipe = difftune.load_pipeline("embedded")
    >>> samples = difftune.evaluators.CalibrationSet.for_pipeline(pipe)[:10]
    >>> fit = fit_dc_ratios(pipe, reference_schedule(pipe.scheduler, 5), samples)
    >>> fit.ratios                                   # ρ per step; the first two are 1
    >>> handle = fit.schedule.apply(pipe)            # sample with them; handle.remove() undoes it
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difftune.accel._hooks import CompositeHandle, wrap_forward
from difftune.accel.solver import SolverSchedule, SolverStep, USFScheduler
from difftune.errors import EvaluationError, SpaceError
from difftune.search._common import jsonable, positive_int, prediction_tensor, safe_name

__all__ = [
    "BOUNDS",
    "CPR_RIDGE",
    "DEFAULT_ITERATIONS",
    "DEFAULT_LR",
    "DEFAULT_REFERENCE_STEPS",
    "FORMAT",
    "TARGETS",
    "CascadePolynomial",
    "DCFit",
    "default_dc_dir",
    "fit_cpr",
    "fit_dc_ratios",
    "fit_model_cpr",
    "model_cpr",
    "reference_schedule",
]

FORMAT = "difftune-dc/1"
#: AdamW iterations per fitted step (the reference's diffusers default ``num_iters``).
DEFAULT_ITERATIONS = 20
#: AdamW learning rate (the reference's).
DEFAULT_LR = 0.1
#: DDIM steps of the ground-truth trajectory (the reference's).
DEFAULT_REFERENCE_STEPS = 200
#: How a ratio is parametrised: free, or ``1 + 0.5·tanh(p)``.
BOUNDS = ("none", "tanh")
#: Which steps are compared with the final latent: the last two (the reference) or the last one.
TARGETS = ("reference", "next")
#: Steps whose ratio stays 1 (the reference fits from step index 2 on).
_WARMUP = 2


def default_dc_dir() -> Path:
    """``<difftune cache>/dc``: fitted ratios and CPR polynomials, beside the reference images."""
    from difftune.evaluators import default_cache_dir

    return default_cache_dir().parent / "dc"


def reference_schedule(scheduler: Any, num_steps: int, *, final_sigma: str | None = "sigma_min") -> SolverSchedule:
    """The reference's base schedule for ``num_steps``: UniPC (bh2, order 2), no corrector at step 0,
    on the pipeline scheduler's own timestep spacing, ending at σ_min (``final_sigma=None`` keeps the
    scheduler's own end; flow-matching models always end at 0)."""
    config = dict(getattr(scheduler, "config", scheduler))
    flow = USFScheduler.from_schedule(None, config).config.use_flow_sigmas
    final = None if flow else final_sigma
    overrides: dict[str, Any] = {"corrector": True, "solver_order": 2, "predict_x0": True}
    if final is not None:
        overrides["final_sigmas_type"] = final
    base = USFScheduler.from_schedule(None, config, **overrides)
    base.set_timesteps(num_steps)
    schedule = base.schedule
    assert schedule is not None
    steps = list(schedule.steps)
    steps[0] = replace(steps[0], corrector=False)  # the reference's disable_corrector=[0]
    return SolverSchedule(schedule.timesteps, tuple(steps), final)


# --------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class DCFit:
    """Fitted DC ratios for one schedule.

    Attributes:
        schedule: the input schedule with every step's ``dc_ratio`` set (apply it to sample).
        ratios: ρ per step (1 where not fitted: the first two steps).
        initial_loss, final_loss: per step, the fitting loss at ρ = 1 and at the last iteration
            (NaN where not fitted).
        seconds: wall time of the fit (ground truth included); 0 when loaded.
        from_cache: loaded from ``path`` rather than fitted now.
    """

    schedule: SolverSchedule
    ratios: tuple[float, ...]
    initial_loss: tuple[float, ...]
    final_loss: tuple[float, ...]
    seconds: float
    from_cache: bool = False
    path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule.to_dict(),
            "ratios": list(self.ratios),
            "initial_loss": [_json_float(v) for v in self.initial_loss],
            "final_loss": [_json_float(v) for v in self.final_loss],
            "seconds": self.seconds,
        }


def _json_float(value: float) -> float | None:
    return None if not math.isfinite(value) else float(value)


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def with_ratios(schedule: SolverSchedule, ratios: Sequence[float]) -> SolverSchedule:
    """``schedule`` with ``dc_ratio`` of step i set to ``ratios[i]``."""
    if len(ratios) != schedule.num_steps:
        raise SpaceError(f"{len(ratios)} DC ratios for a {schedule.num_steps}-step schedule")
    steps = tuple(replace(s, dc_ratio=float(r)) for s, r in zip(schedule.steps, ratios, strict=True))
    return SolverSchedule(schedule.timesteps, steps, schedule.final_sigma)


# --------------------------------------------------------------------------------------------
# The model function: learnt from the pipeline's own denoiser calls
# --------------------------------------------------------------------------------------------


class _ModelFunction:
    """x ↦ the model output the scheduler would receive at x, through the denoiser (differentiable).

    Built from the latest recorded denoiser call: its input argument is replaced by the copies of x
    the pipeline would pass, and the raw output combined the way :meth:`identify` found."""

    def __init__(self) -> None:
        self.forward: Callable[..., Any] | None = None
        self.args: tuple[Any, ...] = ()
        self.kwargs: dict[str, Any] = {}
        self.output: torch.Tensor | None = None
        self.calls_this_step = 0
        self.where: tuple[str, Any] | None = None  # ("arg", index) or ("kw", name) of the sample input
        self.copies = 1
        self.channels: int | None = None  # learned σ: keep the first C channels
        self.combine: tuple[float, float] | None = None  # guidance: the weights of the two halves (sum 1)

    def record(self, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        self.forward, self.args, self.kwargs = forward, args, dict(kwargs)
        self.output = prediction_tensor(out, "dc")
        self.calls_this_step += 1

    def _inputs(self) -> list[tuple[tuple[str, Any], torch.Tensor]]:
        items: list[tuple[tuple[str, Any], torch.Tensor]] = [
            (("arg", i), a) for i, a in enumerate(self.args) if isinstance(a, torch.Tensor)
        ]
        items += [(("kw", k), v) for k, v in self.kwargs.items() if isinstance(v, torch.Tensor)]
        return items

    def identify(self, sample: torch.Tensor, model_output: torch.Tensor) -> None:
        """Find how the pipeline feeds ``sample`` to the denoiser and turns its output into ``model_output``."""
        if self.forward is None or self.output is None:
            raise SpaceError("dc: the pipeline called the scheduler before its denoiser; cannot fit through it")
        if self.calls_this_step != 1:
            raise SpaceError(
                f"dc: the pipeline called its denoiser {self.calls_this_step} times in one step (separate guidance "
                "passes?); DC fitting needs the guided output from one denoiser call per step"
            )
        s = sample.detach()
        for where, value in self._inputs():
            if value.shape[1:] != s.shape[1:] or value.shape[0] % s.shape[0]:
                continue
            k = value.shape[0] // s.shape[0]
            if all(torch.equal(chunk.to(s.dtype), s) for chunk in value.chunk(k)):
                self.where, self.copies = where, k
                break
        else:
            raise SpaceError(
                "dc: none of the denoiser's inputs is the scheduler's sample (or stacked copies of it); the pipeline "
                "transforms the sample in a way DC fitting cannot differentiate through"
            )
        raw = self.output.detach().float()
        target = model_output.detach().float()
        channels = s.shape[1] if raw.dim() > 1 and raw.shape[1] == 2 * s.shape[1] and raw.dim() == 4 else None
        if channels is not None:
            raw = raw[:, :channels]
        self.channels = channels
        # Half-precision pipelines combine their halves in fp16/bf16: allow a few of that dtype's ulps.
        rel = max(1e-4, 8 * torch.finfo(self.output.dtype).eps) if self.output.is_floating_point() else 1e-4
        tol = rel * float(target.abs().max().clamp_min(1e-6))
        if self.copies == 1:
            if raw.shape == target.shape and float((raw - target).abs().max()) <= tol:
                self.combine = None
                return
            raise SpaceError(
                "dc: the model output the scheduler got is not the denoiser's output; cannot fit through it"
            )
        if self.copies != 2:
            raise SpaceError(f"dc: the denoiser got {self.copies} copies of the sample; expected 1 or 2 (guidance)")
        # u + g·(c − u) with the halves in either order is one affine family: w·h₀ + (1 − w)·h₁ (w = 1 − g or g).
        h0, h1 = raw.chunk(2)
        d = h1 - h0
        denom = float((d * d).sum())
        g = float(((target - h0) * d).sum()) / denom if denom > 0 else 1.0
        if float((h0 + g * d - target).abs().max()) <= tol:
            self.combine = (1.0 - g, g)
            return
        raise SpaceError(
            "dc: the pipeline combines its guidance halves in a way other than u + g·(c − u) (guidance rescale?); "
            "DC fitting cannot reproduce its model output"
        )

    def inputs_for(self, x: torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
        assert self.where is not None
        kind, key = self.where
        current = self.args[key] if kind == "arg" else self.kwargs[key]
        value = torch.cat([x] * self.copies) if self.copies > 1 else x
        value = value.to(current.dtype)
        args, kwargs = list(self.args), dict(self.kwargs)
        if kind == "arg":
            args[key] = value
        else:
            kwargs[key] = value
        return tuple(args), kwargs

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        assert self.forward is not None
        args, kwargs = self.inputs_for(x)
        raw = prediction_tensor(self.forward(*args, **kwargs), "dc").float()
        if self.channels is not None:
            raw = raw[:, : self.channels]
        if self.combine is None:
            return raw
        w0, w1 = self.combine
        h0, h1 = raw.chunk(2)
        return h0 + w1 * (h1 - h0) if w0 + w1 == 1.0 else w0 * h0 + w1 * h1


# --------------------------------------------------------------------------------------------
# The fitting scheduler
# --------------------------------------------------------------------------------------------


class _Targets:
    """The ground truth: the DDIM latents the loss of each step compares with."""

    def __init__(self, reference_t: np.ndarray, latents: dict[int, torch.Tensor], final: torch.Tensor) -> None:
        self.reference_t = reference_t
        self.latents = latents
        self.final = final

    @staticmethod
    def index(reference_t: np.ndarray, t: float) -> int:
        """The reference's rule: the latent recorded after the last DDIM step starting at or above ``t``."""
        at_or_above = np.flatnonzero(reference_t >= t - 1e-9)
        k = int(at_or_above.max()) if len(at_or_above) else -1
        return k + 1  # latents[k + 1] is the sample after DDIM step k (len(reference_t) = the final one)


class _FitScheduler(USFScheduler):
    """A USFScheduler that fits each step's DC ratio before stepping with it."""

    def _reset_state(self) -> None:
        super()._reset_state()
        self.fitter: _Fitter | None = getattr(self, "fitter", None)
        self._override: torch.Tensor | None = None

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self._step_index is None:
            self._init_step_index(timestep)
        fitter = self.fitter
        assert fitter is not None
        if self._override is not None:
            # The ratio of the previous step was fitted during this step's denoiser call, which then evaluated the
            # model at the sample the fitted ratio gives: step on from that sample, not the one the pipeline held.
            sample, self._override = self._override.to(sample.dtype), None
        if self._step_index == 0:
            fitter.model.identify(sample, model_output)
        fitter.model.calls_this_step = 0
        return super().step(model_output, timestep, sample, *args, **kwargs)

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
        fitter = self.fitter
        assert fitter is not None
        if i < _WARMUP or i in fitter.ratios:
            return super()._predictor(i, order, prediction, x, unipc=unipc, relax=relax, points=points)
        if relax or points:
            raise SpaceError("dc: ratios are fitted on schedules without USF relaxation or chosen active points")
        job = _Job(self, i, order, prediction, x, unipc)
        if job.needs_model:
            fitter.pending = job  # fitted in the next denoiser call, which evaluates the corrector's model output
            return super()._predictor(i, order, prediction, x, unipc=unipc)
        fitter.run(job, None)
        return job.finish()


@dataclass
class _Job:
    """One step's ratio fit: everything the loss needs, captured at the step's predictor."""

    scheduler: _FitScheduler
    i: int
    order: int
    prediction: str
    x: torch.Tensor
    unipc: bool
    x0: list[torch.Tensor] = field(init=False)
    eps: list[torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.x0, self.eps = list(self.scheduler._x0), list(self.scheduler._eps)
        n = self.scheduler.num_inference_steps
        assert n is not None
        self.last = self.i == n - 1
        steps = self.scheduler._steps
        self.needs_model = bool(steps[self.i].corrector) and not self.last

    def _restore(self) -> None:
        self.scheduler._x0[:] = self.x0
        self.scheduler._eps[:] = self.eps

    def sample(self, ratio: Any, model: _ModelFunction | None) -> torch.Tensor:
        """The sample this step ends on with ``ratio``: predictor, then (if due) the next step's UniC."""
        s = self.scheduler
        self._restore()
        s._compensate(self.i, self.prediction, ratio)
        out = USFScheduler._predictor(s, self.i, self.order, self.prediction, self.x, unipc=self.unipc)
        if model is not None:
            x0, eps = s._convert(model(out), out, self.i + 1)
            model_t = x0 if self.prediction == "data" else eps
            saved = s._last_sample
            s._last_sample = self.x
            try:
                out = s._corrector(self.i, self.order, self.prediction, model_t, out)
            finally:
                s._last_sample = saved
        return out

    def finish(self) -> torch.Tensor:
        """Leave the buffers compensated with the fitted ratio; the predictor's result with it."""
        s = self.scheduler
        assert s.fitter is not None
        self._restore()
        ratio = s.fitter.ratios[self.i]
        if ratio != 1.0:
            s._compensate(self.i, self.prediction, ratio)
        return USFScheduler._predictor(s, self.i, self.order, self.prediction, self.x, unipc=self.unipc)


class _Fitter:
    def __init__(
        self,
        targets: _Targets,
        schedule_t: np.ndarray,
        iterations: int,
        lr: float,
        bound: str,
        num_steps: int,
        final_from: int,
    ) -> None:
        self.targets = targets
        self.final_from = final_from
        self.schedule_t = schedule_t
        self.iterations = iterations
        self.lr = lr
        self.bound = bound
        self.num_steps = num_steps
        self.model = _ModelFunction()
        self.pending: _Job | None = None
        self.ratios: dict[int, float] = {}
        self.losses: dict[int, tuple[float, float]] = {}

    def target(self, i: int, like: torch.Tensor) -> torch.Tensor:
        if i >= self.final_from:
            gt = self.targets.final
        else:
            k = _Targets.index(self.targets.reference_t, float(self.schedule_t[i + 1]))
            gt = self.targets.latents[k] if k < len(self.targets.reference_t) else self.targets.final
        return gt.to(device=like.device, dtype=torch.float32)

    def run(self, job: _Job, model: _ModelFunction | None) -> None:
        gt = self.target(job.i, job.x)
        init = 0.0 if self.bound == "tanh" else 1.0  # both start at ratio 1
        param = torch.nn.Parameter(torch.full((1,), init, device=job.x.device))
        optimizer = torch.optim.AdamW([param], lr=self.lr)
        losses = []
        with torch.enable_grad():
            for _ in range(self.iterations):
                optimizer.zero_grad()
                ratio = torch.tanh(param) * 0.5 + 1.0 if self.bound == "tanh" else param
                loss = torch.nn.functional.mse_loss(job.sample(ratio, model).float(), gt)
                if not torch.isfinite(loss):
                    raise EvaluationError(
                        f"dc: the fitting loss of step {job.i} became {float(loss)} at ratio {float(ratio):g}; "
                        "lower lr or use bound='tanh'"
                    )
                (grad,) = torch.autograd.grad(loss, [param])
                param.grad = grad
                optimizer.step()
                losses.append(float(loss.detach()))
        ratio = torch.tanh(param) * 0.5 + 1.0 if self.bound == "tanh" else param
        self.ratios[job.i] = float(ratio.detach())
        self.losses[job.i] = (losses[0], losses[-1])

    def on_denoise(self, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        job, self.pending = self.pending, None
        if job is not None:
            # The model function is this very call with the sample input replaced.
            self.model.forward, self.model.args, self.model.kwargs = forward, args, dict(kwargs)
            self.run(job, self.model)
            with torch.no_grad():
                best = job.finish()
            job.scheduler._override = best
            args, kwargs = self.model.inputs_for(best)
        out = forward(*args, **kwargs)
        self.model.record(forward, args, kwargs, out)
        return out


# --------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------


class _Keeper(USFScheduler):
    """A DDIM (order-1) USFScheduler that keeps the samples at chosen steps and the final one."""

    def _reset_state(self) -> None:
        super()._reset_state()
        self.keep: set[int] = getattr(self, "keep", set())
        self.kept: dict[int, torch.Tensor] = {}
        self.final: torch.Tensor | None = None

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        assert i is not None
        if i in self.keep:
            self.kept[i] = sample.detach().float().cpu()
        out = super().step(model_output, timestep, sample, *args, **kwargs)
        if self._step_index == self.num_inference_steps:
            prev = out.prev_sample if hasattr(out, "prev_sample") else out[0]
            self.final = prev.detach().float().cpu()
        return out


def _reference_grid(first: float, steps: int) -> np.ndarray:
    """``steps`` time-uniform timesteps from ``first`` down (DDIM's linspace spacing; integers when ``first`` is)."""
    t = np.linspace(0.0, first, steps + 1)[::-1][:-1]
    return t.round() if float(first).is_integer() else t


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------


def _run(pipe: Any, scheduler: Any, call: Mapping[str, Any], samples: Sequence[Any]) -> None:
    from difftune.evaluators import batch_kwargs

    original = pipe.scheduler
    output_type = "latent" if getattr(pipe, "vae", None) is not None else "pt"
    pipe.scheduler = scheduler
    try:
        pipe(**{**dict(call), **batch_kwargs(list(samples)), "output_type": output_type})
    finally:
        pipe.scheduler = original


def fit_dc_ratios(
    pipe: Any,
    schedule: SolverSchedule,
    samples: Sequence[Any],
    *,
    guidance_scale: float | None = None,
    call_kwargs: Mapping[str, Any] | None = None,
    iterations: int = DEFAULT_ITERATIONS,
    lr: float = DEFAULT_LR,
    reference_steps: int = DEFAULT_REFERENCE_STEPS,
    bound: str = "none",
    target: str = "reference",
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
) -> DCFit:
    """Fit DC-Solver's ratio of every step of ``schedule`` on ``pipe`` (see the module docstring).

    Args:
        pipe: the pipeline (its scheduler is swapped and its denoiser wrapped during the fit, then restored).
        schedule: the schedule to compensate (e.g. :func:`reference_schedule`); its own ratios are ignored.
        samples: :class:`~difftune.evaluators.Sample` s — conditions and fixed noise (the reference: 10).
        guidance_scale: the call's guidance (None = the pipeline's default); ratios depend on it.
        call_kwargs: the call's other kwargs (``height``, ``negative_prompt``, …).
        iterations, lr: AdamW per fitted step.
        reference_steps: DDIM steps of the ground truth.
        bound: ``"none"`` (free ratios, the reference's default) or ``"tanh"`` (within 1 ± 0.5).
        target: ``"reference"`` (the last two steps are compared with DDIM's final latent, as the
            reference does) or ``"next"`` (only the last; the step before is compared with the latent
            past its own next timestep like every other step).
        cache_dir: where fits are kept (default :func:`default_dc_dir`); use_cache: False refits.

    Raises:
        SpaceError: a bad argument, or a pipeline DC fitting cannot differentiate through.
        EvaluationError: the loss became NaN or infinite.
    """
    from difftune.models import describe

    if isinstance(schedule, Mapping):
        schedule = SolverSchedule.from_dict(schedule)
    if not isinstance(schedule, SolverSchedule):
        raise SpaceError(f"schedule: expected a SolverSchedule, got {schedule!r}")
    iterations = positive_int("iterations", iterations)
    reference_steps = positive_int("reference_steps", reference_steps)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 or not math.isfinite(lr):
        raise SpaceError(f"lr: expected a positive number, got {lr!r}")
    if bound not in BOUNDS:
        raise SpaceError(f"bound: expected one of {', '.join(BOUNDS)}, got {bound!r}")
    if target not in TARGETS:
        raise SpaceError(f"target: expected one of {', '.join(TARGETS)}, got {target!r}")
    pool = list(samples)
    if not pool:
        raise SpaceError("samples: expected at least one calibration sample, got none")
    plain = with_ratios(schedule, [1.0] * schedule.num_steps)
    n = plain.num_steps
    info = describe(pipe)
    call: dict[str, Any] = {**dict(call_kwargs or {}), "num_inference_steps": n}
    if guidance_scale is not None:
        call["guidance_scale"] = float(guidance_scale)
    scheduler_config = dict(getattr(pipe.scheduler, "config", {}) or {})
    key = json.dumps(
        jsonable(
            {
                "format": FORMAT,
                "fingerprint": info.fingerprint,
                "scheduler": [type(pipe.scheduler).__name__, scheduler_config],
                "schedule": plain.to_dict(),
                "call": call,
                "samples": [[type(s.condition).__name__, s.condition, s.seed] for s in pool],
                "settings": {
                    "iterations": iterations,
                    "lr": float(lr),
                    "reference": reference_steps,
                    "bound": bound,
                    "target": target,
                },
            }
        ),
        sort_keys=True,
        ensure_ascii=False,
    )
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_dc_dir()
    path = root / safe_name(info.fingerprint) / f"fit-{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
    if use_cache:
        cached = _load_fit(path, key, n)
        if cached is not None:
            return cached

    started = time.perf_counter()
    if n <= _WARMUP:
        ratios = [1.0] * n
        losses: dict[int, tuple[float, float]] = {}
    else:
        ratios, losses = _fit(pipe, info, plain, pool, call, iterations, float(lr), reference_steps, bound, target)
    result = DCFit(
        schedule=with_ratios(plain, ratios),
        ratios=tuple(ratios),
        initial_loss=tuple(losses.get(i, (math.nan, math.nan))[0] for i in range(n)),
        final_loss=tuple(losses.get(i, (math.nan, math.nan))[1] for i in range(n)),
        seconds=time.perf_counter() - started,
        path=path,
    )
    _save_fit(path, key, result)
    return result


def _fit(
    pipe: Any,
    info: Any,
    schedule: SolverSchedule,
    samples: list[Any],
    call: dict[str, Any],
    iterations: int,
    lr: float,
    reference_steps: int,
    bound: str,
    target: str,
) -> tuple[list[float], dict[int, tuple[float, float]]]:
    n = schedule.num_steps
    t = np.asarray(schedule.timesteps, dtype=np.float64)
    grid = _reference_grid(t[0], reference_steps)
    final_from = n - 2 if target == "reference" else n - 1
    keep = {_Targets.index(grid, float(t[i + 1])) for i in range(_WARMUP, final_from)}
    keep = {k for k in keep if k < len(grid)}
    overrides = {"final_sigmas_type": schedule.final_sigma} if schedule.final_sigma is not None else {}
    ddim = SolverSchedule(tuple(float(v) for v in grid), tuple(SolverStep(order=1) for _ in grid), schedule.final_sigma)
    keeper = _Keeper.from_schedule(ddim, pipe.scheduler, **overrides)
    keeper.keep = keep
    bar = getattr(pipe, "_progress_bar_config", None)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    try:
        _run(pipe, keeper, {**call, "num_inference_steps": reference_steps}, samples)
        if keeper.final is None or set(keeper.kept) != keep:
            raise EvaluationError(
                f"dc: the ground-truth run made {len(keeper.kept)} of {len(keep)} recorded steps; the pipeline must "
                "call its scheduler once per step"
            )
        targets = _Targets(grid, keeper.kept, keeper.final)
        fitter = _Fitter(targets, t, iterations, lr, bound, n, final_from)
        scheduler = _FitScheduler.from_schedule(schedule, pipe.scheduler)
        scheduler.fitter = fitter
        denoiser = getattr(pipe, info.denoiser)
        handle = CompositeHandle([wrap_forward(denoiser, fitter.on_denoise)])
        try:
            _run(pipe, scheduler, call, samples)
        finally:
            handle.remove()
    finally:
        if bar is None:
            pipe.__dict__.pop("_progress_bar_config", None)
        else:
            pipe._progress_bar_config = bar
    missing = [i for i in range(_WARMUP, n) if i not in fitter.ratios]
    if missing:
        raise EvaluationError(f"dc: steps {missing} were never fitted; the pipeline stopped early")
    return [fitter.ratios.get(i, 1.0) for i in range(n)], fitter.losses


# --------------------------------------------------------------------------------------------
# Cache on disk
# --------------------------------------------------------------------------------------------


def _load_fit(path: Path, key: str, n: int) -> DCFit | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT or data.get("key") != key:
            return None
        schedule = SolverSchedule.from_dict(data["schedule"])
        ratios = tuple(float(r) for r in data["ratios"])
        if schedule.num_steps != n or len(ratios) != n:
            return None
        return DCFit(
            schedule=schedule,
            ratios=ratios,
            initial_loss=tuple(_float(v) for v in data["initial_loss"]),
            final_loss=tuple(_float(v) for v in data["final_loss"]),
            seconds=float(data.get("seconds", math.nan)),
            from_cache=True,
            path=path,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save_fit(path: Path, key: str, result: DCFit) -> Path:
    from difftune._atomic import atomic_write

    text = json.dumps({"format": FORMAT, "key": key, **result.to_dict()}, indent=1)
    return atomic_write(path, lambda tmp: tmp.write_text(text))


# --------------------------------------------------------------------------------------------
# Cascade polynomial regression
# --------------------------------------------------------------------------------------------


def _features(nfe: float, cfg: float, step: float) -> np.ndarray:
    """The 36 monomials of the reference's cascade: x^k · (CFG/12)^(2−j) · (NFE/50)^(2−r), index k·9 + j·3 + r."""
    x, g, m = step / nfe, cfg / 12.0, nfe / 50.0
    return np.array(
        [x**k * g ** (2 - j) * m ** (2 - r) for k in range(4) for j in range(3) for r in range(3)], dtype=np.float64
    )


@dataclass(frozen=True)
class CascadePolynomial:
    """DC-Solver's CPR: 36 coefficients that predict every step's ratio from (NFE, guidance).

    ``coefficients`` are laid out as the reference's ``cpr_coeffs`` (``reshape(4, 3, 3)``: power of
    step/NFE, then the quadratic in CFG/12, then the one in NFE/50, highest power first), so the
    reference's SD-2.1 file loads as ``CascadePolynomial(tuple(np.load(path)))``.
    """

    coefficients: tuple[float, ...]
    #: The (nfe, guidance) settings it was fitted on (empty when given).
    settings: tuple[tuple[int, float], ...] = ()
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        coefficients = tuple(float(c) for c in self.coefficients)
        if len(coefficients) != 36 or not all(math.isfinite(c) for c in coefficients):
            raise SpaceError(f"CPR: expected 36 finite coefficients, got {len(coefficients)}")
        object.__setattr__(self, "coefficients", coefficients)

    def ratio(self, nfe: int, guidance: float, step: int) -> float:
        """The ratio of 1-based ``step`` (steps 1 and 2 are 1, as in the reference)."""
        if step < _WARMUP + 1:
            return 1.0
        return float(_features(nfe, guidance, step) @ np.asarray(self.coefficients))

    def ratios(self, nfe: int, guidance: float) -> list[float]:
        """One ratio per step of an ``nfe``-step schedule at ``guidance``."""
        return [self.ratio(nfe, guidance, s) for s in range(1, int(nfe) + 1)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "kind": "cpr",
            "coefficients": list(self.coefficients),
            "settings": [list(s) for s in self.settings],
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CascadePolynomial:
        if not isinstance(data, Mapping) or data.get("kind") != "cpr":
            raise SpaceError(f"CPR: not a cascade polynomial: {data!r:.80}")
        settings = tuple((int(n), float(g)) for n, g in data.get("settings", ()))
        return cls(tuple(data["coefficients"]), settings, data.get("fingerprint"))

    def save(self, path: str | Path) -> Path:
        from difftune._atomic import atomic_write

        text = json.dumps(self.to_dict(), indent=1)
        return atomic_write(path, lambda tmp: tmp.write_text(text))

    @classmethod
    def load(cls, path: str | Path) -> CascadePolynomial:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SpaceError(f"CPR: cannot read {path}: {exc}") from exc

    @staticmethod
    def path_for(fingerprint: str, cache_dir: str | Path | None = None) -> Path:
        """Where the model's polynomial is stored: ``<dc dir>/<fingerprint>/cpr.json``."""
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_dc_dir()
        return root / safe_name(fingerprint) / "cpr.json"


#: CPR's default ridge weight (on column-scaled monomials, per fitted ratio), pulling predictions towards 1.
CPR_RIDGE = 1e-3
#: The index of the constant monomial x⁰·(CFG/12)⁰·(NFE/50)⁰ in :func:`_features`.
_CONSTANT = 8


def fit_cpr(
    fits: Sequence[tuple[int, float, Sequence[float]]],
    *,
    fingerprint: str | None = None,
    ridge: float = CPR_RIDGE,
) -> CascadePolynomial:
    """CPR through ``(nfe, guidance, ratios)`` triples (steps 1–2 are skipped, as they are fixed).

    Least squares on ratio − 1 with a small ridge penalty (``ridge`` × the number of fitted ratios):
    36 coefficients from a handful of settings are otherwise underdetermined, and the minimum-norm
    solution can swing wildly between them — on the embedded model, leaving NFE 8 out of fits at
    {4, 5, 6, 8, 10} × guidance {1.5, 3} made least squares on column-scaled monomials predict a
    ratio of 7.7 there (MSE × 1059), while the default predicted ratios whose held-out MSE is 0.705
    of ρ = 1's (the ratios fitted at NFE 8 themselves: 0.693); leaving out NFE 4 / 5 / 6: 1.06 / 0.89
    / 0.82 (fitted: 1.03 / 0.95 / 0.87). ``ridge=0`` is plain least squares (minimum norm where
    underdetermined).
    """
    rows, values, settings = [], [], []
    for nfe, guidance, ratios in fits:
        if len(ratios) != nfe:
            raise SpaceError(f"CPR: {len(ratios)} ratios given for NFE {nfe}")
        settings.append((int(nfe), float(guidance)))
        for step in range(_WARMUP + 1, int(nfe) + 1):
            rows.append(_features(nfe, guidance, step))
            values.append(float(ratios[step - 1]))
    if not rows:
        raise SpaceError("CPR: no fitted ratios to regress (every setting has NFE <= 2)")
    a, b = np.stack(rows), np.asarray(values)
    if not np.all(np.isfinite(b)):
        raise SpaceError("CPR: a fitted ratio is not finite")
    if not (ridge >= 0 and math.isfinite(ridge)):
        raise SpaceError(f"CPR: ridge must be a finite number >= 0, got {ridge!r}")
    # No column scaling: the reference already scales CFG by 12 and NFE by 50, so every monomial is at most
    # about 1 and the penalty weighs the coefficients as the cascade uses them. (Scaling each column by its
    # largest fitted value lets a monomial that is tiny at the fitted settings, such as (CFG/12)² at CFG 1.5,
    # take a huge coefficient that explodes at a larger guidance.)
    if ridge > 0:
        gram = a.T @ a + ridge * len(b) * np.eye(a.shape[1])
        coefficients = np.linalg.solve(gram, a.T @ (b - 1.0))
    else:
        coefficients, *_ = np.linalg.lstsq(a, b - 1.0, rcond=None)
    coefficients[_CONSTANT] += 1.0  # fitted around ratio 1: the constant monomial carries it
    return CascadePolynomial(tuple(coefficients), tuple(settings), fingerprint)


def fit_model_cpr(
    pipe: Any,
    settings: Sequence[tuple[int, float]],
    samples: Sequence[Any],
    *,
    call_kwargs: Mapping[str, Any] | None = None,
    final_sigma: str | None = "sigma_min",
    cache_dir: str | Path | None = None,
    progress: Callable[[int, float, DCFit], None] | None = None,
    **fit_kwargs: Any,
) -> tuple[CascadePolynomial, Path]:
    """Fit DC ratios at every ``(nfe, guidance)`` of ``settings`` on the reference's UniPC schedule
    (:func:`reference_schedule`; fits are cached), fit CPR through them and store it as the model's
    polynomial (:meth:`CascadePolynomial.path_for` its fingerprint). Returns the polynomial and its path."""
    from difftune.models import describe

    if not settings:
        raise SpaceError("CPR: give at least one (nfe, guidance) setting to fit ratios at")
    fits = []
    for nfe, guidance in settings:
        schedule = reference_schedule(pipe.scheduler, int(nfe), final_sigma=final_sigma)
        fit = fit_dc_ratios(
            pipe, schedule, samples, guidance_scale=guidance, call_kwargs=call_kwargs, cache_dir=cache_dir, **fit_kwargs
        )
        fits.append((int(nfe), float(guidance), fit.ratios))
        if progress is not None:
            progress(int(nfe), float(guidance), fit)
    fingerprint = describe(pipe).fingerprint
    cpr = fit_cpr(fits, fingerprint=fingerprint)
    return cpr, cpr.save(CascadePolynomial.path_for(fingerprint, cache_dir))


def model_cpr(fingerprint: str, cache_dir: str | Path | None = None) -> CascadePolynomial | None:
    """The polynomial stored for the model with ``fingerprint`` (:func:`fit_model_cpr`), or None."""
    path = CascadePolynomial.path_for(fingerprint, cache_dir)
    return CascadePolynomial.load(path) if path.is_file() else None
