"""Where the steps go: Align Your Steps (published schedules) and GITS (searched from one teacher run).

Both return timesteps in the units of the pipeline's own scheduler (0–999 for DDPM-trained models,
σ×1000 for flow-matching ones), strictly decreasing, one per model evaluation, and a
:class:`~difftune.accel.solver.SolverSchedule` on them::

    >>> import difftune
    >>> from difftune.accel.placements import ays_schedule, gits_schedule
    >>> sd = ays_schedule("sd", 10)                                  # AYS' published SD-1.5 schedule
    >>> pipe = difftune.load_pipeline("embedded")
    >>> schedule = gits_schedule(pipe, 6, order=1, call_kwargs={"class_labels": [0, 3, 7, 9]})
    >>> handle = schedule.apply(pipe)
    >>> images = pipe(class_labels=[1, 2], num_inference_steps=6).images

* AYS (Sabour et al. 2024, "Align Your Steps"): optimised 10-step schedules for SD-1.5 and SDXL,
  the ones diffusers ships as ``AysSchedules``. Other step counts log-linearly interpolate the
  10-step σs, as the paper recommends and ComfyUI's ``AlignYourStepsScheduler`` does.
* GITS (Chen et al. 2024, "On the Trajectory Regularity of ODE-based Diffusion Sampling",
  github.com/zju-pi/diff-sampler): sampling trajectories of one model are nearly alike, so one fine
  teacher trajectory tells where a coarse Euler step errs least. With x_i on the fine grid and d_i
  the ODE direction there, cost[i][j] = ‖x_i + (t_j − t_i)·d_i − x_j‖ is the error of one Euler step
  from point i to point j, and a dynamic program picks the K steps whose summed cost is least. The
  only model calls are the teacher's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from difftune.accel.solver import MAX_ORDER, SolverSchedule, SolverStep, USFScheduler, _default_steps
from difftune.errors import ProfileError

__all__ = [
    "AYS_FAMILIES",
    "GITS_REFERENCE",
    "ays_schedule",
    "ays_sigmas",
    "ays_timesteps",
    "gits_dp",
    "gits_schedule",
    "gits_timesteps",
]

# The published 10-step schedules, as diffusers' ``AysSchedules`` ships them (sigmas end with the final 0).
_AYS_TIMESTEPS: dict[str, tuple[float, ...]] = {
    "sd": (999, 850, 736, 645, 545, 455, 343, 233, 124, 24),
    "sdxl": (999, 845, 730, 587, 443, 310, 193, 116, 53, 13),
}
_AYS_SIGMAS: dict[str, tuple[float, ...]] = {
    "sd": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.0),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.38, 0.234, 0.113, 0.0),
}
#: Model families with a published AYS schedule (both SD-1.5 and SDXL use scaled_linear β 0.00085–0.012).
AYS_FAMILIES = tuple(_AYS_TIMESTEPS)
_AYS_NOISE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}

_TEACHER_GRIDS = ("time_uniform", "logsnr_uniform", "karras")
_SPACES = ("model", "ve")


# --------------------------------------------------------------------------------------------
# AYS
# --------------------------------------------------------------------------------------------


def _ays_family(family: str) -> str:
    key = str(family).lower()
    if key not in _AYS_TIMESTEPS:
        raise ProfileError(
            f"no published Align Your Steps schedule for model family {family!r}: AYS ships schedules for "
            f"{', '.join(AYS_FAMILIES)} only (its video schedule is for SVD's EDM σs); use gits_schedule to "
            "search one for this model instead"
        )
    return key


def ays_sigmas(family: str, num_steps: int) -> list[float]:
    """AYS' noise levels (diffusers' σ = √((1−ᾱ)/ᾱ)) of the ``num_steps`` model evaluations.

    10 steps returns the published σs; other counts interpolate the 10 published nonzero σs
    log-linearly over an even ramp (``exp(interp(linspace(0, 1, num_steps), linspace(0, 1, 10),
    log σ))``, the paper's recipe and ComfyUI's ``loglinear_interp``), so the first and last σ stay
    and the spacing in log σ follows the optimised one. The final σ = 0 is implicit.
    """
    key = _ays_family(family)
    n = _check_steps(num_steps)
    published = np.asarray(_AYS_SIGMAS[key][:-1], dtype=np.float64)
    if n == len(published):
        return [float(s) for s in published]
    if n == 1:
        return [float(published[0])]
    ramp = np.linspace(0.0, 1.0, len(published))
    log_sigmas = np.interp(np.linspace(0.0, 1.0, n), ramp, np.log(published))
    return [float(s) for s in np.exp(log_sigmas)]


def ays_timesteps(family: str, num_steps: int = 10) -> list[float]:
    """AYS timesteps (0–999, decreasing) for ``family`` (``"sd"`` or ``"sdxl"``) and ``num_steps`` evaluations.

    10 steps returns the published integer timesteps exactly. Other counts map :func:`ays_sigmas`
    to (fractional) timesteps through the families' training noise schedule (scaled_linear,
    β 0.00085–0.012) and keep the published first and last timesteps (999 and 24 / 13), so only the
    interior is interpolated. More steps are slower but closer to the ODE solution; AYS' gain over
    uniform placement is largest at few steps. Raises :class:`ProfileError` for other families.
    """
    key = _ays_family(family)
    n = _check_steps(num_steps)
    published = _AYS_TIMESTEPS[key]
    if n == len(published):
        return [float(t) for t in published]
    converter = USFScheduler(**_AYS_NOISE)
    t = converter._sigma_to_timestep(np.asarray(ays_sigmas(key, n), dtype=np.float64))
    t[0] = published[0]
    if n > 1:
        t[-1] = published[-1]
    return [float(v) for v in t]


def ays_schedule(family: str, num_steps: int = 10, order: int = 2, corrector: bool = False) -> SolverSchedule:
    """A :class:`SolverSchedule` on :func:`ays_timesteps` with DPM-Solver++(``order``M) steps.

    ``order`` (1–3): higher is more accurate at the same NFE on smooth trajectories but amplifies
    errors under strong guidance (AYS was optimised for DPM-Solver++(2M), the default).
    ``corrector`` adds UniC on all steps but the last (UniPC): one more order of accuracy at no
    model call, at some risk of overshoot with large guidance.
    """
    timesteps = ays_timesteps(family, num_steps)
    steps = _default_steps(
        len(timesteps), _check_order(order), "data", bool(corrector), lower_order_final=True, final_zero=True
    )
    return SolverSchedule(tuple(timesteps), steps)


# --------------------------------------------------------------------------------------------
# GITS
# --------------------------------------------------------------------------------------------


def gits_dp(cost: np.ndarray, num_steps: int, coeff: float = 1.0) -> list[int]:
    """The path 0 = i_0 < i_1 < … < i_K = N through the fine grid with least Σ cost[i_k, i_{k+1}].

    ``cost`` is (N+1)×(N+1); only entries above the diagonal are read (cost[i, j] of a step from
    fine point i to a later point j). ``num_steps`` = K edges (K ≤ N), so K + 1 indices are returned,
    first 0 and last N. O(K·N²) time, exact (ties go to the earliest predecessor).

    ``coeff`` ≠ 1 is GITS' reference recursion (zju-pi/diff-sampler, ``gits_utils.dp``): V[j][1] =
    cost[j][N], V[j][k] = min over j < i < N of cost[j][i] + coeff·V[i][k−1], i.e. the m-th step's
    cost counts coeff^m (m = 0 for the first step): with coeff > 1 (the reference's 1.15) errors late
    in the trajectory, which nothing corrects afterwards, weigh more. The path is read forward from 0,
    each step to the first point that attains V, as the reference does.
    """
    c = np.asarray(cost, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] < 2:
        raise ValueError(f"cost must be a square matrix of at least 2×2, got shape {c.shape}")
    n = c.shape[0] - 1
    k = _check_steps(num_steps)
    if k > n:
        raise ValueError(f"num_steps={k} exceeds the {n} steps of the fine grid")
    upper = np.where(np.triu(np.ones_like(c, dtype=bool), 1), c, np.inf)
    if np.any(np.isnan(upper)):
        raise ValueError("cost holds NaN above the diagonal")
    if not (isinstance(coeff, (int, float)) and math.isfinite(coeff) and coeff > 0):
        raise ValueError(f"coeff must be a positive number, got {coeff!r}")
    if coeff != 1.0:
        return _gits_dp_weighted(upper, k, float(coeff))
    # best[m][j]: least cost of reaching fine point j from 0 in exactly m steps.
    best = np.full((k + 1, n + 1), np.inf)
    best[0, 0] = 0.0
    parent = np.zeros((k + 1, n + 1), dtype=np.int64)
    for m in range(1, k + 1):
        totals = best[m - 1][:, None] + upper  # totals[i, j]: reach i in m-1 steps, then step i → j
        parent[m] = np.argmin(totals, axis=0)
        best[m] = totals[parent[m], np.arange(n + 1)]
    if not math.isfinite(best[k, n]):
        raise ValueError(f"no path of {k} steps with finite cost from fine point 0 to {n}")
    path = [n]
    for m in range(k, 0, -1):
        path.append(int(parent[m, path[-1]]))
    return path[::-1]


def _gits_dp_weighted(upper: np.ndarray, k: int, coeff: float) -> list[int]:
    """:func:`gits_dp` with a weight ``coeff`` per later step, by the reference's backward recursion."""
    n = upper.shape[0] - 1
    # value[j, m]: least weighted cost of reaching the end from fine point j in exactly m steps.
    value = np.full((n + 1, k + 1), np.inf)
    value[:n, 1] = upper[:n, n]
    for m in range(2, k + 1):
        for j in range(n - 1):
            value[j, m] = np.min(upper[j, j + 1 : n] + coeff * value[j + 1 : n, m - 1], initial=np.inf)
    if not math.isfinite(value[0, k]):
        raise ValueError(f"no path of {k} steps with finite cost from fine point 0 to {n}")
    path, here = [0], 0
    for m in range(k, 1, -1):
        totals = upper[here, here + 1 : n] + coeff * value[here + 1 : n, m - 1]
        here = here + 1 + int(np.flatnonzero(totals == value[here, m])[0])
        path.append(here)
    return [*path, n]


def _euler_cost(
    x0: torch.Tensor, eps: torch.Tensor, xs: torch.Tensor, alpha: np.ndarray, sigma: np.ndarray
) -> np.ndarray:
    """cost[i, j] = mean over samples of ‖α_j·x̂₀_i + σ_j·ε̂_i − x_j‖ for i < j (0 elsewhere).

    That is the error, in the model's x, of one DDIM (= Euler in x̃ = x/α, t = σ/α) step from fine
    point i to j, since x̃_i + (t_j − t_i)·ε̂_i = x̂₀_i + t_j·ε̂_i. Written with x̂₀ so that it stays
    finite where α_i = 0 (a flow model's pure-noise start). ``x0`` / ``eps``: (N, B, …) predictions
    at the first N points; ``xs``: (N+1, B, …) points; ``alpha`` / ``sigma``: the N+1 noise levels.
    """
    n = xs.shape[0] - 1
    x0f, epsf, xf = x0.double().flatten(2), eps.double().flatten(2), xs.double().flatten(2)
    a = torch.from_numpy(np.asarray(alpha, dtype=np.float64)).reshape(-1, 1, 1)
    s = torch.from_numpy(np.asarray(sigma, dtype=np.float64)).reshape(-1, 1, 1)
    cost = np.zeros((n + 1, n + 1))
    for i in range(n):
        pred = a[i + 1 :] * x0f[i].unsqueeze(0) + s[i + 1 :] * epsf[i].unsqueeze(0)
        cost[i, i + 1 :] = torch.linalg.vector_norm(pred - xf[i + 1 :], dim=-1).mean(dim=-1).numpy()
    return cost


def _deviation(points: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Each point's distance from the straight line through ``start`` and ``end`` (per sample).

    ``points``: (M, B, …); ``start`` / ``end``: (B, …). GITS' ``cal_deviation``: the component of
    ``end − point`` perpendicular to ``end − start``. Returns (M, B)."""
    p, a, b = points.flatten(2), start.flatten(1), end.flatten(1)
    unit = (b - a) / torch.linalg.vector_norm(b - a, dim=-1, keepdim=True)
    to_end = b.unsqueeze(0) - p
    along = (to_end * unit.unsqueeze(0)).sum(-1, keepdim=True)
    return torch.linalg.vector_norm(to_end - along * unit.unsqueeze(0), dim=-1)


def _deviation_cost(
    x0: torch.Tensor, eps: torch.Tensor, xs: torch.Tensor, alpha: np.ndarray, sigma: np.ndarray
) -> np.ndarray:
    """GITS' ``dev`` metric: cost[i, j] = mean dev(x̃_i + (t_j − t_i)·d_i) − mean dev(x̃_j) for i < j.

    In EDM's space x̃ = x/α, t = σ/α, where the Euler step from i is x̂₀_i + t_j·ε̂_i; dev is the
    distance from the straight line joining the teacher trajectory's start and end (the clean end has
    deviation 0). Trajectories of one model are nearly straight, so a step that leaves the line where
    the teacher does not costs, and one that cuts a curve the teacher also cut costs little (the cost
    may be negative). Means over the samples, as the reference takes them before subtracting.
    """
    if np.any(np.asarray(alpha) <= 0):
        raise ValueError(
            "GITS' 'dev' metric measures deviation from the line through x_T in EDM's x/α space, which is at "
            "infinity where α = 0 (a flow model's σ = 1 start); use metric='l2'"
        )
    n = xs.shape[0] - 1
    a = torch.from_numpy(np.asarray(alpha, dtype=np.float64)).reshape(-1, *([1] * (xs.dim() - 1)))
    t = np.asarray(sigma, dtype=np.float64) / np.asarray(alpha, dtype=np.float64)
    tilde = xs.double() / a
    start, end = tilde[0], tilde[n]
    teacher = _deviation(tilde, start, end).mean(dim=1).numpy()
    teacher[n] = 0.0
    cost = np.zeros((n + 1, n + 1))
    for i in range(n):
        steps = x0[i].double().unsqueeze(0) + torch.from_numpy(t[i + 1 :]).reshape(-1, *([1] * x0[i].dim())) * eps[
            i
        ].double().unsqueeze(0)
        cost[i, i + 1 :] = _deviation(steps, start, end).mean(dim=1).numpy() - teacher[i + 1 :]
    return cost


class _Recorder(USFScheduler):
    """A USFScheduler that keeps, per evaluation, the sample the model saw and its x̂₀ / ε̂ predictions."""

    def _reset_state(self) -> None:
        super()._reset_state()
        self.records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.final: torch.Tensor | None = None

    def _convert(self, model_output: torch.Tensor, sample: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x0, eps = super()._convert(model_output, sample, i)
        self.records.append((sample.detach().double().cpu(), x0.detach().double().cpu(), eps.detach().double().cpu()))
        return x0, eps

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = super().step(model_output, timestep, sample, *args, **kwargs)
        if self._step_index == self.num_inference_steps:  # the clean end of the trajectory
            prev = out.prev_sample if hasattr(out, "prev_sample") else out[0]
            self.final = prev.detach().double().cpu()
        return out


#: Adams–Bashforth coefficients of improved PNDM (Zhang & Chen 2023) for orders 1–4, newest direction first.
_IPNDM_COEFFICIENTS: tuple[tuple[float, ...], ...] = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


class _IPNDMTeacher(_Recorder):
    """GITS' reference teacher: improved PNDM — Adams–Bashforth with fixed coefficients, order 1, 2, 3
    then 4 — in EDM's x̃ = x/α, t = σ/α, where the ODE direction is ε̂ (zju-pi/diff-sampler,
    ``solvers.ipndm_sampler``). Written with x̃_i = x̂₀_i + t_i·ε̂_i, so a flow model's α = 0 start stays
    finite; records every evaluation as :class:`_Recorder` does."""

    def _reset_state(self) -> None:
        super()._reset_state()
        self._directions: list[torch.Tensor] = []

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        from diffusers.schedulers.scheduling_utils import SchedulerOutput

        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        assert i is not None
        out_dtype = sample.dtype
        x0, eps = self._convert(model_output.float(), sample.float(), i)
        self._directions.insert(0, eps)
        del self._directions[4:]
        coefficients = _IPNDM_COEFFICIENTS[min(len(self._directions), 4) - 1]
        direction = sum(c * d for c, d in zip(coefficients, self._directions, strict=False))
        t_cur = float(self._sig[i]) / float(self._alpha[i]) if self._alpha[i] > 0 else math.inf
        t_next = float(self._sig[i + 1]) / float(self._alpha[i + 1])
        if math.isinf(t_cur):  # the first step from a flow model's pure noise: Euler, x̂₀ + t·ε̂
            tilde_next = x0 + t_next * eps
        else:
            tilde_next = x0 + t_cur * eps + (t_next - t_cur) * direction
        prev = (float(self._alpha[i + 1]) * tilde_next).to(out_dtype)
        self._step_index = i + 1
        if self._step_index == self.num_inference_steps:
            self.final = prev.detach().double().cpu()
        return SchedulerOutput(prev_sample=prev)


#: GITS as its reference code runs it (zju-pi/diff-sampler gits-main: ``--metric dev --coeff 1.15``,
#: an iPNDM teacher on EDM's ρ = 7 grid of 21 points, the cost in EDM space): pass to
#: :func:`gits_timesteps` / :func:`gits_schedule` as ``**GITS_REFERENCE``. Here the 21 points are 20
#: teacher evaluations and the clean end (the reference stops at σ_min instead); it warms up on 256
#: trajectories, which ``samples`` (× the prompts or labels of ``call_kwargs``) sets.
GITS_REFERENCE: Mapping[str, Any] = {
    "teacher": "ipndm",
    "teacher_grid": "karras",
    "teacher_steps": 20,
    "metric": "dev",
    "coeff": 1.15,
    "space": "ve",
}


def gits_timesteps(
    pipe: Any,
    num_steps: int,
    *,
    teacher_steps: int = 60,
    teacher_grid: str = "time_uniform",
    teacher_order: int = 1,
    space: str = "model",
    samples: int = 4,
    call_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    teacher: str = "usf",
    metric: str = "l2",
    coeff: float = 1.0,
) -> list[float]:
    """GITS timesteps for ``pipe`` with ``num_steps`` model evaluations, in its scheduler's units.

    One teacher run samples ``samples`` images per prompt on ``teacher_steps`` fine timesteps (the
    pipeline's denoiser, guidance and all, on a :class:`USFScheduler` built from its scheduler's
    config); the fine grid's points are the teacher's evaluation timesteps followed by the clean
    end (σ = 0). With x_i the sample at fine point i and d_i its ODE direction, a dynamic program
    (:func:`gits_dp`) chooses the ``num_steps`` Euler steps from the first fine point to the clean
    end with least Σ ‖x_i + (t_j − t_i)·d_i − x_j‖; the timesteps returned are the fine points each
    chosen step starts from. No model call beyond the teacher's ``teacher_steps``·``samples``.

    The ODE is written as GITS/EDM write it: x̃ = x/α and t = σ/α (diffusers' σ for VP models,
    σ/(1−σ) for flow ones), so d = ε̂ and the Euler step is DDIM, i.e. the order-1 step of
    :class:`USFScheduler`. ``space`` says where the error is measured: ``"model"`` (default)
    in the pipeline's own x = α·x̃, ``"ve"`` in x̃ as in the paper (which weighs high-noise errors
    far more, since x̃ grows with σ; on the embedded pixel model, σ_max ≈ 157, it crowds every
    step into high noise and is ~25× worse than ``"model"``).

    Knobs:
        teacher_steps: fine-grid size N. More makes the teacher closer to the true ODE and gives
            the DP more candidate positions, at N model calls per sample (once, offline).
        teacher_grid: where the fine points sit: ``"time_uniform"`` (the scheduler's uniform
            spacing), ``"logsnr_uniform"`` or ``"karras"`` (GITS' EDM grid, dense at low noise).
            The result can only use these points, so the grid bounds what GITS can find.
        teacher_order: solver order (1–3) of the teacher's own steps; higher makes the fine
            trajectory more accurate at the same cost. The cost itself always models Euler steps.
        samples: images per prompt in the calibration batch; more averages the cost over more
            trajectories (GITS needs few: trajectories of one model are alike) at linear cost.
        call_kwargs: the rest of the pipeline call (``prompt`` or ``class_labels``,
            ``guidance_scale``, ``output_type="latent"`` for latent pipelines, …); defaults to
            ``{"prompt": ""}``. Calibrate with the guidance scale you will sample with.
        seed: the calibration noise.
        teacher: ``"usf"`` (default: :class:`USFScheduler` multistep of ``teacher_order``) or
            ``"ipndm"`` (the reference's improved PNDM, orders 1–4, in EDM space).
        metric: ``"l2"`` (default: the Euler step's error, mean over samples, in ``space``) or
            ``"dev"`` (the reference's: how far the Euler step leaves the straight line from the
            trajectory's start to its end, minus how far the teacher is from it there; EDM space
            always, ``space`` is ignored; not for flow models).
        coeff: the weight per later step in the dynamic program (:func:`gits_dp`; the reference 1.15).

    ``**GITS_REFERENCE`` sets the reference's choices: iPNDM teacher, 20 Karras (EDM ρ = 7)
    evaluations, ``dev`` metric, coeff 1.15.
    """
    if teacher not in ("usf", "ipndm"):
        raise ValueError(f"teacher={teacher!r} is not one of usf, ipndm")
    if metric not in ("l2", "dev"):
        raise ValueError(f"metric={metric!r} is not one of l2, dev")
    k = _check_steps(num_steps)
    n = _check_steps(teacher_steps)
    if k > n:
        raise ValueError(f"num_steps={k} exceeds teacher_steps={n}: GITS picks a subset of the teacher's steps")
    if teacher_grid not in _TEACHER_GRIDS:
        raise ValueError(f"teacher_grid={teacher_grid!r} is not one of {', '.join(_TEACHER_GRIDS)}")
    if space not in _SPACES:
        raise ValueError(f"space={space!r} is not one of {', '.join(_SPACES)}")
    samples = _check_steps(samples)
    order = _check_order(teacher_order)

    original = pipe.scheduler
    probe = USFScheduler.from_schedule(None, original, grid=teacher_grid, final_sigmas_type="zero")
    fine = probe._grid(n, None)
    if len(fine) != n or np.any(np.diff(fine) >= 0):
        raise ValueError(
            f"the {teacher_grid} grid with {n} steps is not strictly decreasing for this scheduler "
            f"({fine.tolist()}); use fewer teacher_steps or another teacher_grid"
        )
    steps = _default_steps(n, order, "data", False, lower_order_final=True, final_zero=True)
    recorder_class = _IPNDMTeacher if teacher == "ipndm" else _Recorder
    recorder = recorder_class.from_schedule(SolverSchedule(tuple(float(t) for t in fine), steps), original)
    kwargs: dict[str, Any] = dict(call_kwargs) if call_kwargs is not None else {"prompt": ""}
    kwargs.update(
        num_inference_steps=n, num_images_per_prompt=samples, generator=torch.Generator().manual_seed(int(seed))
    )
    pipe.scheduler = recorder
    try:
        pipe(**kwargs)
    finally:
        pipe.scheduler = original
    if len(recorder.records) != n or recorder.final is None:
        raise ValueError(f"the teacher run made {len(recorder.records)} scheduler steps, expected {n}")

    alpha = np.append(recorder._alpha[:n], 1.0)  # the clean end: α = 1, σ = 0
    sigma = np.append(recorder._sig[:n], 0.0)
    xs = torch.stack([r[0] for r in recorder.records] + [recorder.final])
    x0 = torch.stack([r[1] for r in recorder.records])
    eps = torch.stack([r[2] for r in recorder.records])
    if metric == "dev":
        cost = _deviation_cost(x0, eps, xs, alpha, sigma)
    else:
        cost = _euler_cost(x0, eps, xs, alpha, sigma)
        if space == "ve":
            cost[:, 1:] = cost[:, 1:] / alpha[None, 1:]  # ‖x̃_i + (t_j − t_i)·d_i − x̃_j‖, the paper's form
    path = gits_dp(cost, k, coeff=coeff)
    return [float(fine[i]) for i in path[:-1]]


def gits_schedule(
    pipe: Any,
    num_steps: int,
    order: int = 1,
    corrector: bool = False,
    **gits_kwargs: Any,
) -> SolverSchedule:
    """A :class:`SolverSchedule` on :func:`gits_timesteps` (``gits_kwargs`` go there).

    ``order=1`` (default) runs exactly the Euler/DDIM steps GITS optimised the placement for.
    Higher orders (DPM-Solver++ multistep) and ``corrector`` (UniC) often help further at the same
    NFE, but the placement was not chosen for them.
    """
    timesteps = gits_timesteps(pipe, num_steps, **gits_kwargs)
    steps: tuple[SolverStep, ...] = _default_steps(
        len(timesteps), _check_order(order), "data", bool(corrector), lower_order_final=True, final_zero=True
    )
    return SolverSchedule(tuple(timesteps), steps)


def _check_steps(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"expected a positive integer number of steps, got {value!r}")
    return int(value)


def _check_order(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_ORDER:
        raise ValueError(f"order must be an integer in [1, {MAX_ORDER}], got {value!r}")
    return int(value)
