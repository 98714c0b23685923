"""DPM-Solver-v3 in the USF scheduler: degenerate statistics = DPM-Solver++, the reference's update step by step,
the statistics' estimator on Gaussian data (closed form), profile validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difftune.accel._ems import EMS, EMSTable
from difftune.accel.solver import SolverSchedule, SolverStep, USFScheduler
from difftune.errors import ProfileError

from .test_solver import SHAPE, make_model, noise, run

torch.set_num_threads(1)

N_STEPS = 8


def _scheduler() -> USFScheduler:
    usf = USFScheduler(grid="logsnr_uniform", final_sigmas_type="sigma_min")
    usf.set_timesteps(N_STEPS)
    return usf


def _grid(usf: USFScheduler, n: int) -> np.ndarray:
    lo, hi = float(-np.log(usf._sigma_table[999])), float(-np.log(usf._sigma_table[0]))
    return np.linspace(lo, hi, n + 1)


def _random_ems(usf: USFScheduler, n: int = 600, seed: int = 0) -> EMS:
    """Smooth l, s, b with per-element variation (a model whose statistics are not DPM-Solver++'s)."""
    lam = _grid(usf, n)
    rng = np.random.default_rng(seed)
    shape = SHAPE[1:]
    a, c, d = (rng.uniform(-1, 1, shape) for _ in range(3))
    x = lam.reshape(-1, 1, 1, 1)
    l = 1.0 / (1.0 + 0.3 * np.exp(0.8 * x)) + 0.05 * a * np.sin(x)  # noqa: E741
    s = -0.2 + 0.1 * c * np.cos(0.5 * x)
    b = 0.05 * d * np.exp(-0.1 * x * x)
    return EMS(lam, l, s, b, {"grid_step": float(lam[1] - lam[0])})


def _schedule(usf: USFScheduler, steps, ems: EMS | None) -> SolverSchedule:
    t = tuple(float(v) for v in usf._t)
    table = ems.table(SolverSchedule.point_lambdas(t, "sigma_min", usf.config)) if ems is not None else None
    return SolverSchedule(t, tuple(steps), "sigma_min", ems=table)


# ---- degenerate statistics --------------------------------------------------------------------


@pytest.mark.parametrize("order", [1, 2, 3])
def test_degenerate_statistics_are_dpm_solver_pp(order):
    """l = 1, s = b = 0 makes f = −x̂₀ and g = f: v3 is DPM-Solver++'s Taylor update (the paper's Appendix A.2),
    up to the trapezoid rule on the statistics grid."""
    usf = _scheduler()
    lam = _grid(usf, 4000)
    ones, zeros = np.ones((len(lam), *SHAPE[1:])), np.zeros((len(lam), *SHAPE[1:]))
    ems = EMS(lam, ones, zeros, zeros, {"grid_step": float(lam[1] - lam[0])})
    model = make_model(usf)
    data = [SolverStep(min(order, i + 1), "data", points=tuple(range(1, min(order, i + 1)))) for i in range(N_STEPS)]
    v3 = [SolverStep(min(order, i + 1), "v3") for i in range(N_STEPS)]
    a = run(USFScheduler.from_schedule(_schedule(usf, data, None), usf.config), model, noise())[-1]
    b = run(USFScheduler.from_schedule(_schedule(usf, v3, ems), usf.config), model, noise())[-1]
    assert float((a - b).abs().max() / a.abs().max()) < 5e-6
    # … and statistics that are not degenerate change the result far beyond that.
    c = run(USFScheduler.from_schedule(_schedule(usf, v3, _random_ems(usf)), usf.config), model, noise())[-1]
    assert float((a - c).abs().max() / a.abs().max()) > 1e-3


# ---- the reference's update, transcribed ------------------------------------------------------


def _trapezoid(a, x, b, cumsum=True):
    """thu-nics/USF ``weighted_cumsumexp_trapezoid`` (∫ b·e^a dx), as written there."""
    a_max = np.amax(a, axis=0, keepdims=True)
    tmp = b * np.exp(a - a_max) if b is not None else np.exp(a - a_max)
    out = 0.5 * (x[1:] - x[:-1]) * (tmp[1:] + tmp[:-1])
    if not cumsum:
        return np.sum(out, axis=0) * np.exp(a_max)
    out = np.cumsum(out, axis=0)
    out *= np.exp(a_max)
    return np.concatenate([np.zeros_like(out[[0]]), out], axis=0)


class _Reference:
    """The reference sampler's v3 branch (``statistics_init``, ``get_g``, ``update`` with
    ``dpmsolver_v3_prediction``, ``get_diff_derivative``, the ``sample`` loop with the pseudo corrector),
    on the scheduler's noise levels; an independent transcription, in numpy/torch float64."""

    def __init__(self, usf: USFScheduler, ems: EMS):
        self.alpha, self.sigma, self.lam = usf._alpha, usf._sig, usf._lambda
        l, s, b = ems.l, ems.s, ems.b  # noqa: E741
        ts = ems.lambdas[:, None, None, None]
        self.steps = l.shape[0] - 1
        self.lambda_T, self.lambda_0 = ts[0].item(), ts[-1].item()
        z, o = np.zeros_like(l), np.ones_like(l)
        self.L = _trapezoid(z, ts, l)
        self.S = _trapezoid(z, ts, s)
        self.I = _trapezoid(self.L + self.S, ts, o)
        self.B = _trapezoid(-self.S, ts, b)
        self.C = _trapezoid(self.L + self.S, ts, self.B)
        self.l, self.ts = l, ts

    def index(self, k):
        lam = self.lam[k]
        return round(self.steps * (lam - self.lambda_T) / (self.lambda_0 - self.lambda_T))

    def f(self, x, eps, k):
        return (self.sigma[k] * eps - torch.from_numpy(self.l[self.index(k)]) * x) / self.alpha[k]

    def g(self, f_t, i_s, i_t):
        t = torch.from_numpy
        return t(np.exp(self.S[i_s] - self.S[i_t])) * f_t - t(np.exp(self.S[i_s]) * (self.B[i_t] - self.B[i_s]))

    def high(self, i_s, i_t, n):
        a = self.L[i_s : i_t + 1] + self.S[i_s : i_t + 1] - self.L[i_s] - self.S[i_s]
        x = self.ts[i_s : i_t + 1]
        b = (self.ts[i_s : i_t + 1] - self.ts[i_s]) ** n / math.factorial(n)
        return _trapezoid(a, x, b, cumsum=False)[0]

    def derivative(self, lam_list, g_list, order, start, active):
        dh = torch.tensor([lam_list[k] - lam_list[start] for k in active])
        dF = torch.stack([g_list[k] - g_list[start] for k in active], dim=1)
        coef = torch.stack([dh.pow(i) / math.factorial(i) for i in range(1, len(active) + 1)])
        e = torch.zeros(len(active), dtype=torch.float64)
        e[order - 1] = 1.0
        return torch.einsum("k,bkchw->bchw", torch.linalg.solve(coef, e), dF)

    def update(self, xs, fs, ks, k_t, order, start, corrector, relax=0.0):
        t = torch.from_numpy
        idx = [self.index(k) for k in ks]
        i_s, i_t = idx[start], self.index(k_t)
        g_list = [self.g(f, i_s, i) for f, i in zip(fs, idx, strict=True)]
        a_s, a_t = self.alpha[ks[start]], self.alpha[k_t]
        L, S, I, B, C = self.L, self.S, self.I, self.B, self.C  # noqa: E741
        x_t = (
            a_t / a_s * t(np.exp(L[i_s] - L[i_t])) * xs[start]
            - a_t * t(np.exp(-L[i_t] - S[i_s]) * (I[i_t] - I[i_s])) * g_list[start]
            - a_t * t(np.exp(-L[i_t]) * (C[i_t] - C[i_s] - B[i_s] * (I[i_t] - I[i_s])))
        )
        lam_list = [self.lam[k] for k in ks]
        if corrector:  # active points: the new evaluation, then the ones before the start
            active = [-1] + [start - 1 - j for j in range(order - 2)]
        else:
            active = [start - 1 - j for j in range(order - 1)]
        h = self.lam[k_t] - self.lam[ks[start]]
        for n in range(1, order):
            d = self.derivative(lam_list, g_list, n, start, active)
            if n == 1:
                d = d * (1 + relax * h)
            x_t = x_t - a_t * t(np.exp(L[i_s] - L[i_t]) * self.high(i_s, i_t, n)) * d
        return x_t

    def sample(self, model, x, ts, orders, correctors, relax=0.0):
        """``orders[i]``: step i's predictor order; ``correctors[i]``: pseudo-correct it at order + 1."""
        eps = model(x, ts[0])
        xs, fs, ks = [x], [self.f(x, eps, 0)], [0]
        for i in range(len(ts)):
            x = self.update(xs, fs, ks, i + 1, orders[i], -1, False, relax)
            if i == len(ts) - 1:
                break
            xs.append(x)
            ks.append(i + 1)
            eps = model(x, ts[i + 1])
            fs.append(self.f(x, eps, i + 1))
            if correctors[i]:
                x = self.update(xs, fs, ks, i + 1, orders[i] + 1, -2, True)
                xs[-1] = x
        return x


def test_v3_follows_the_reference_update_step_by_step():
    usf = _scheduler()
    ems = _random_ems(usf)
    model = make_model(usf)
    ts = [float(v) for v in usf._t]
    for orders, correctors, relax in (
        ([1, 2, 3, 3, 3, 3, 2, 1], [False] * 8, 0.0),
        ([1, 2, 2, 3, 3, 2, 2, 1], [False, True, False, True, True, False, False, False], 0.0),
        ([1, 2, 3, 3, 3, 3, 3, 1], [False] * 8, 0.3),
    ):
        steps = [
            SolverStep(p, "v3", corrector=c, corrector_kind="usf" if c else "unic", relaxation=relax if p > 1 else 0.0)
            for p, c in zip(orders, correctors, strict=True)
        ]
        ours = run(USFScheduler.from_schedule(_schedule(usf, steps, ems), usf.config), model, noise())[-1]
        reference = _Reference(usf, ems).sample(model, noise(), ts, orders, correctors, relax)
        assert float((ours - reference).abs().max() / reference.abs().max()) < 1e-7, (orders, correctors)


# ---- the statistics' estimator on Gaussian data -------------------------------------------------


def test_estimated_statistics_on_gaussian_data_match_the_closed_form_and_make_v3_exact():
    """x₀ ~ N(μ, c²) per element: ε̂(x) = σ(x − αμ)/(α²c² + σ²) is linear, so l = σ²/(α²c² + σ²) = 1/(1 + c²e^{2λ})
    exactly, f = −l·μ does not vary over samples (s = 0) and b = f′ = −μ·dl/dλ. With those statistics g is constant,
    so even first-order v3 steps follow the ODE's closed-form solution."""
    from difftune.search.ems import _Accumulator, _grid, _Recorder

    mu, c = 0.3, 0.5
    base = USFScheduler()
    probe = _Recorder.from_schedule(None, base, final_sigmas_type="zero")
    lambdas, timesteps = _grid(probe, 80)
    steps = (*tuple(SolverStep(min(2, i + 1)) for i in range(len(timesteps) - 1)), SolverStep(1))
    recorder = _Recorder.from_schedule(SolverSchedule(tuple(timesteps), steps), base, final_sigmas_type="zero")
    recorder.set_timesteps(len(timesteps))

    def eps_of(x: torch.Tensor, k: int) -> torch.Tensor:
        a, s = float(recorder._alpha[k]), float(recorder._sig[k])
        return s * (x - a * mu) / (a * a * c * c + s * s)

    class Model:
        k = 0

        def identify(self, sample, output):
            pass

        def __call__(self, x):
            return eps_of(x, self.k)

    model = Model()
    acc = _Accumulator(recorder, model, probes=1, delta=5e-3, seed=0)
    recorder.on_step = acc.on_step
    for batch in range(2):
        recorder.set_timesteps(len(timesteps))
        x = torch.randn((8, *SHAPE[1:]), generator=torch.Generator().manual_seed(batch), dtype=torch.float64)
        for k, t in enumerate(recorder.timesteps):
            model.k = k
            x = recorder.step(eps_of(x, k), t, x).prev_sample
        acc.finish_batch(lambdas)
    l, s, b = acc.statistics(lambdas)  # noqa: E741
    e2 = np.exp(2 * lambdas).reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(l, np.broadcast_to(1 / (1 + c * c * e2), l.shape), rtol=1e-5)
    assert np.abs(s).max() == 0.0
    b_true = mu * 2 * c * c * e2 / (1 + c * c * e2) ** 2
    # f′ comes from finite differences along the 81-point grid: b is right to about 1 % of its peak (0.15)
    b_true = np.broadcast_to(b_true, b.shape)
    assert np.abs(b - b_true).max() < 0.02 * np.abs(b_true).max()
    assert np.linalg.norm(b - b_true) < 0.01 * np.linalg.norm(b_true)

    ems = EMS(lambdas, l, s, b, {"grid_step": float(lambdas[1] - lambdas[0])})
    usf = USFScheduler(grid="logsnr_uniform", final_sigmas_type="sigma_min")
    usf.set_timesteps(4)
    table = usf._sigma_table

    def model_fn(x: torch.Tensor, t: float) -> torch.Tensor:
        sigma = float(np.interp(float(t), np.arange(1000), table))
        alpha = 1 / math.sqrt(1 + sigma**2)
        x0 = mu + c**2 / (c**2 + sigma**2) * (x / alpha - mu)
        return (x - alpha * x0) / (sigma * alpha)

    x = noise()
    sigma_T, sigma_min = table[999], table[0]
    y = mu + (x * math.sqrt(1 + sigma_T**2) - mu) * math.sqrt(c**2 + sigma_min**2) / math.sqrt(c**2 + sigma_T**2)
    truth = y / math.sqrt(1 + sigma_min**2)

    def error(prediction: str) -> float:
        sched = _schedule(usf, [SolverStep(1, prediction)] * 4, ems if prediction == "v3" else None)
        out = run(USFScheduler.from_schedule(sched, usf.config), model_fn, x)[-1]
        return float((out - truth).abs().max() / truth.abs().max())

    assert error("v3") < 2e-3 < 0.1 * error("data"), (error("v3"), error("data"))


# ---- validation ---------------------------------------------------------------------------------


def test_v3_profiles_round_trip_and_bad_ones_are_refused():
    usf = _scheduler()
    ems = _random_ems(usf, n=100)
    steps = [SolverStep(min(2, i + 1), "v3") for i in range(N_STEPS)]
    schedule = _schedule(usf, steps, ems)
    again = SolverSchedule.from_dict(schedule.to_dict())
    assert again == schedule and isinstance(again.ems, EMSTable)
    np.testing.assert_array_equal(again.ems.C, schedule.ems.C)

    with pytest.raises(ProfileError, match=r"solver.steps\[0\].prediction: 'v3' needs the model's empirical"):
        SolverSchedule(schedule.timesteps, tuple(steps), "sigma_min")
    with pytest.raises(ProfileError, match="UniC is defined for the data and noise"):
        SolverStep(2, "v3", corrector=True)
    with pytest.raises(ProfileError, match="dc_ratio: DC-Solver compensates data or noise"):
        SolverStep(2, "v3", dc_ratio=0.9)
    # The last step landing on σ = 0 lies outside the statistics' λ range.
    t = schedule.timesteps
    at_zero = ems.table(SolverSchedule.point_lambdas(t, "zero", usf.config))
    with pytest.raises(ProfileError, match=r"steps\[7\].prediction: 'v3' at the final noise level, outside"):
        SolverSchedule(t, tuple(steps), "zero", ems=at_zero)
    data = schedule.to_dict()
    data["ems"]["l"]["float64"] = "not base64!"
    with pytest.raises(ProfileError, match=r"solver.ems.l.float64: not base64"):
        SolverSchedule.from_dict(data)
    data = schedule.to_dict()
    data["ems"]["high"]["shape"] = [1, 2]
    with pytest.raises(ProfileError, match=r"solver.ems.high: \d+ bytes for shape \[1, 2\]"):
        SolverSchedule.from_dict(data)
    # Statistics built for another noise schedule are refused when the scheduler sets its grid.
    other = USFScheduler.from_schedule(schedule, usf.config, beta_schedule="scaled_linear", beta_end=0.012)
    with pytest.raises(ProfileError, match="statistics belong to another noise schedule"):
        other.set_timesteps(N_STEPS)


# ---- USF's average_x0 analytical first step -------------------------------------------------------


def test_average_x0_first_step_is_a_model_predicting_that_mean_at_step_0():
    from difftune.accel._ems import StoredArray

    usf = _scheduler()
    model = make_model(usf)
    mean = np.random.default_rng(1).normal(0, 0.3, SHAPE[1:])
    t = tuple(float(v) for v in usf._t)
    steps = tuple(SolverStep(min(2, i + 1)) for i in range(N_STEPS))
    afs = SolverSchedule(t, steps, "sigma_min", analytic_first=True, first_x0=StoredArray(mean))
    plain = SolverSchedule(t, steps, "sigma_min")
    a0, s0 = float(usf._alpha[0]), float(usf._sig[0])

    def first_predicts_mean(x, tt):
        if float(tt) == t[0]:
            return (x - a0 * torch.from_numpy(mean)) / s0  # ε̂ whose x̂₀ is the mean
        return model(x, tt)

    a = run(USFScheduler.from_schedule(afs, usf.config), model, noise())[-1]
    b = run(USFScheduler.from_schedule(plain, usf.config), first_predicts_mean, noise())[-1]
    assert float((a - b).abs().max()) < 1e-10
    zero = run(USFScheduler.from_schedule(SolverSchedule(t, steps, "sigma_min", True), usf.config), model, noise())
    assert float((a - zero[-1]).abs().max()) > 1e-3  # the mean matters

    assert SolverSchedule.from_dict(afs.to_dict()) == afs
    with pytest.raises(ProfileError, match="first_x0: set without analytic_first"):
        SolverSchedule(t, steps, "sigma_min", first_x0=StoredArray(mean))
    wrong = SolverSchedule(t, steps, "sigma_min", analytic_first=True, first_x0=StoredArray(np.zeros((1, 4, 4))))
    with pytest.raises(ProfileError, match=r"first_x0: shape \[1, 4, 4\], but the samples are \[3, 4, 4\]"):
        run(USFScheduler.from_schedule(wrong, usf.config), model, noise())
