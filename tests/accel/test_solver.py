"""USF solver schedules: JSON round trip, diffusers equivalences, DC-Solver compensation, config round trip.

Equivalences run both schedulers step by step over a whole trajectory in float64 with a fixed,
deterministic, nonlinear fake denoiser; the tolerance (1e-5 relative) is far above the ~2e-7 that
diffusers' float32 noise levels leave, and far below the gap between two different solvers.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from difftune.accel._registry import config_from_dict
from difftune.accel.solver import SolverSchedule, SolverStep, USFScheduler, dynamic_compensation
from difftune.errors import ProfileError

torch.set_num_threads(1)

RTOL = 1e-5
SHAPE = (2, 3, 4, 4)

# DPM-Solver's "dpmsolver" algorithm type is deprecated in diffusers but is the reference for noise prediction.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


# ---- fake denoiser -------------------------------------------------------------------------


def _x0_fn(x: torch.Tensor, t: float) -> torch.Tensor:
    """A smooth, nonlinear "denoiser" depending on both the sample and the time."""
    return 0.9 * torch.tanh(0.8 * x + 0.1) + 0.05 * math.sin(t / 300.0) + 0.02 * x * math.cos(t / 170.0)


def make_model(scheduler) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """The fake model in ``scheduler``'s parameterisation (ε, v, x₀ or flow velocity) at its noise levels."""
    config = scheduler.config
    flow = bool(config.get("use_flow_sigmas")) or type(scheduler).__name__.startswith("FlowMatch")
    kind = "flow_prediction" if flow else config.get("prediction_type", "epsilon")
    if not flow:
        ab = scheduler.alphas_cumprod.double().numpy()
        table = np.sqrt((1 - ab) / ab)

    def model(x: torch.Tensor, t: float) -> torch.Tensor:
        t = float(t)
        if flow:
            s = t / config.num_train_timesteps
            a = 1.0 - s
        else:
            sigma = float(np.interp(t, np.arange(len(table)), table))
            a = 1.0 / math.sqrt(1 + sigma**2)
            s = sigma * a
        x0 = _x0_fn(x, t)
        eps = (x - a * x0) / s
        if kind == "epsilon":
            return eps
        if kind == "v_prediction":
            return a * eps - s * x0
        if kind == "sample":
            return x0
        return eps - x0  # flow velocity

    return model


def noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run(usf: USFScheduler, model, x: torch.Tensor) -> list[torch.Tensor]:
    """Every step's output; a scheduler built on a schedule needs no set_timesteps first."""
    if usf.num_inference_steps is None:
        usf.set_timesteps()
    out = []
    for t in usf.timesteps:
        x = usf.step(model(x, t), t, x).prev_sample
        out.append(x)
    return out


def lockstep_error(ref, usf: USFScheduler, model, seed: int = 0) -> float:
    """Max over all steps of max|x_ref − x_usf| / max|x_ref|; the model sees USF's (unrounded) timesteps."""
    ref.set_begin_index(0)  # diffusers' flow schedulers hold truncated int timesteps: index by position
    assert len(ref.timesteps) == len(usf.timesteps)
    x_ref = x_usf = noise(seed)
    worst = 0.0
    for i, t in enumerate(usf.timesteps):
        x_ref = ref.step(model(x_ref, t), ref.timesteps[i], x_ref).prev_sample
        x_usf = usf.step(model(x_usf, t), t, x_usf).prev_sample
        assert torch.isfinite(x_usf).all()
        worst = max(worst, float((x_ref - x_usf).abs().max() / x_ref.abs().max()))
    return worst


def equivalence(ref, n: int, **schedule_kwargs) -> float:
    """USF on ``SolverSchedule.from_scheduler(ref, n, …)`` against ``ref`` itself."""
    schedule = SolverSchedule.from_scheduler(ref, n, **schedule_kwargs)
    usf = USFScheduler.from_schedule(schedule, ref.config)
    ref.set_timesteps(n)
    usf.set_timesteps(n)
    return lockstep_error(ref, usf, make_model(ref))


# ---- (a)–(e): diffusers equivalences -------------------------------------------------------


@pytest.mark.parametrize("n", [5, 10, 20])  # 20: diffusers' "fewer than 15 steps" rules are off
@pytest.mark.parametrize("order", [1, 2, 3])
def test_data_prediction_equals_dpm_solver_pp(order, n):
    ref = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=order)
    assert equivalence(ref, n, order=order) <= RTOL


def test_dpm_solver_pp_2m_orders_are_one_on_first_and_last_step():
    schedule = SolverSchedule.from_scheduler(DPMSolverMultistepScheduler(), 10)
    assert [s.order for s in schedule.steps] == [1] + [2] * 8 + [1]
    assert not any(s.corrector for s in schedule.steps)
    assert [
        s.order for s in SolverSchedule.from_scheduler(DPMSolverMultistepScheduler(solver_order=3), 10, order=3).steps
    ] == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]


@pytest.mark.parametrize("n", [6, 10, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_corrector_equals_unipc_bh2(order, n):
    ref = UniPCMultistepScheduler(solver_type="bh2", predict_x0=True, solver_order=order)
    schedule = SolverSchedule.from_scheduler(ref, n, order=order, corrector=True)
    assert [s.corrector for s in schedule.steps] == [True] * (n - 1) + [False]
    assert equivalence(ref, n, order=order, corrector=True) <= RTOL


def test_unipc_disable_corrector_is_respected():
    ref = UniPCMultistepScheduler(solver_order=2, disable_corrector=[0, 1])
    schedule = SolverSchedule.from_scheduler(ref, 8, corrector=True)
    assert [s.corrector for s in schedule.steps] == [False, False] + [True] * 5 + [False]
    assert equivalence(ref, 8, corrector=True) <= RTOL


@pytest.mark.parametrize("order", [1, 2, 3])
def test_noise_prediction_equals_dpm_solver(order):
    # DPM-Solver (noise) cannot step onto σ = 0, so diffusers requires final_sigmas_type="sigma_min".
    ref = DPMSolverMultistepScheduler(algorithm_type="dpmsolver", solver_order=order, final_sigmas_type="sigma_min")
    assert equivalence(ref, 10, order=order, prediction="noise") <= RTOL


def test_noise_prediction_with_corrector_equals_unipc_noise():
    ref = UniPCMultistepScheduler(solver_order=2, predict_x0=False, final_sigmas_type="sigma_min")
    assert equivalence(ref, 10, corrector=True, prediction="noise") <= RTOL


SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_model_parameterisations_equal_dpm_solver_pp(prediction_type):
    ref = DPMSolverMultistepScheduler(prediction_type=prediction_type, **SD_BETAS)
    assert equivalence(ref, 10) <= RTOL


def test_v_prediction_with_corrector_equals_unipc():
    ref = UniPCMultistepScheduler(prediction_type="v_prediction", solver_order=3, **SD_BETAS)
    assert equivalence(ref, 10, order=3, corrector=True) <= RTOL


FLOW = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0}


def test_flow_matching_equals_dpm_solver_pp_with_flow_sigmas():
    ref = DPMSolverMultistepScheduler(solver_order=2, **FLOW)
    assert equivalence(ref, 10) <= RTOL


def test_flow_matching_with_corrector_equals_unipc_with_flow_sigmas():
    ref = UniPCMultistepScheduler(solver_order=2, **FLOW)
    assert equivalence(ref, 10, corrector=True) <= RTOL


def test_flow_matching_order_one_equals_flow_match_euler():
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert SolverSchedule.from_scheduler(ref, 8, order=1).timesteps[0] == 1000.0  # starts at pure noise, α = 0
    assert equivalence(ref, 8, order=1) <= RTOL
    # The parametric grid of a flow USFScheduler is FlowMatchEuler's too.
    usf = USFScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", shift=3.0, solver_order=1)
    usf.set_timesteps(8)
    ref.set_timesteps(8)
    assert lockstep_error(ref, usf, make_model(ref)) <= RTOL


def test_tolerance_separates_different_solvers():
    """Negative control: the fake model is sensitive enough that a different solver fails the tolerance."""
    ref = DPMSolverMultistepScheduler(solver_order=2)
    ref.set_timesteps(10)
    usf = USFScheduler(solver_order=3)
    usf.set_timesteps(10)
    assert lockstep_error(ref, usf, make_model(ref)) > 100 * RTOL
    # … and so does UniP-3 against DPM-Solver++(3M): the corrector flag picks the predictor at order 3.
    schedule = SolverSchedule.from_scheduler(DPMSolverMultistepScheduler(solver_order=3), 10, order=3)
    with_unip = SolverSchedule(
        schedule.timesteps,
        tuple(SolverStep(s.order, s.prediction, corrector=i < 9) for i, s in enumerate(schedule.steps)),
    )
    a = run(USFScheduler.from_schedule(schedule), make_model(ref), noise())[-1]
    b = run(USFScheduler.from_schedule(with_unip), make_model(ref), noise())[-1]
    assert float((a - b).abs().max() / a.abs().max()) > 100 * RTOL


def test_mixed_schedules_converge_to_the_ode_solution():
    """Per-step mixes of order, prediction, corrector and DC ratio are all consistent solvers of the same ODE.

    For Gaussian data x₀ ~ N(μ, s²) the exact denoiser is D(y, σ) = μ + s²/(s² + σ²)·(y − μ) with y = x/α, and
    the probability-flow ODE has the closed-form solution y(σ) − μ = (y_T − μ)·√(s² + σ²)/√(s² + σ_T²).
    """
    usf = USFScheduler(grid="logsnr_uniform", final_sigmas_type="sigma_min")
    ab = usf.alphas_cumprod.double().numpy()
    table = np.sqrt((1 - ab) / ab)
    mu, s = 0.3, 0.5

    def model(x: torch.Tensor, t: float) -> torch.Tensor:
        sigma = float(np.interp(float(t), np.arange(1000), table))
        alpha = 1 / math.sqrt(1 + sigma**2)
        x0 = mu + s**2 / (s**2 + sigma**2) * (x / alpha - mu)
        return (x - alpha * x0) / (sigma * alpha)  # ε

    def error(steps: list[SolverStep]) -> float:
        usf.set_timesteps(len(steps))
        schedule = SolverSchedule(tuple(usf._t), tuple(steps))
        x = noise()
        out = run(USFScheduler.from_schedule(schedule, usf.config), model, x)[-1]
        sigma_T, sigma_min = table[999], table[0]  # the λ-uniform grid runs from t = 999 to σ_min
        y = mu + (x * math.sqrt(1 + sigma_T**2) - mu) * math.sqrt(s**2 + sigma_min**2) / math.sqrt(s**2 + sigma_T**2)
        truth = y / math.sqrt(1 + sigma_min**2)
        return float((out - truth).abs().max() / truth.abs().max())

    euler = error([SolverStep(1)] * 20)
    mixed = error(
        [SolverStep(1), SolverStep(2, "noise", True), SolverStep(3, "data", True, 0.98)]
        + [SolverStep(3 - i % 2, ("data", "noise")[i % 3 == 0], i % 4 != 0, 1.0 + 0.01 * (i % 2)) for i in range(16)]
        + [SolverStep(1)]
    )
    assert mixed < euler / 10 and mixed < 5e-3, (mixed, euler)


def test_half_precision_steps_in_float32():
    usf = USFScheduler(corrector=True)
    usf.set_timesteps(6)
    model = make_model(usf)
    x16 = x32 = noise().to(torch.float16)
    for t in usf.timesteps:
        x16 = usf.step(model(x16.double(), t).half(), t, x16).prev_sample
    assert x16.dtype == torch.float16
    usf.set_timesteps(6)
    x32 = x32.double()
    for t in usf.timesteps:
        x32 = usf.step(model(x32, t), t, x32).prev_sample
    torch.testing.assert_close(x16.double(), x32, rtol=0, atol=2e-2)


# ---- (g): explicit grids -------------------------------------------------------------------

CUSTOM = [999, 850, 600, 400, 250, 120, 40]


def test_custom_timesteps_equal_dpm_solver_pp_custom_timesteps():
    ref = DPMSolverMultistepScheduler(solver_order=2)
    ref.set_timesteps(timesteps=CUSTOM)
    usf = USFScheduler(solver_order=2)
    usf.set_timesteps(timesteps=CUSTOM)
    assert lockstep_error(ref, usf, make_model(ref)) <= RTOL
    # The same grid as a schedule (the profile form) runs the same steps, bit for bit.
    ref.set_timesteps(timesteps=CUSTOM)
    schedule = SolverSchedule.from_scheduler(ref, None, timesteps=CUSTOM)
    assert schedule.timesteps == tuple(float(t) for t in CUSTOM)
    from_profile = USFScheduler.from_schedule(schedule, ref.config)
    from_profile.set_timesteps(len(CUSTOM))
    usf.set_timesteps(timesteps=CUSTOM)
    x = noise()
    assert torch.equal(run(from_profile, make_model(ref), x)[-1], run(usf, make_model(ref), x)[-1])


@pytest.mark.parametrize("grid,option", [("karras", "use_karras_sigmas"), ("logsnr_uniform", "use_lu_lambdas")])
def test_parametric_grids_place_diffusers_noise_levels(grid, option):
    ref = DPMSolverMultistepScheduler(**{option: True})
    ref.set_timesteps(12)
    usf = USFScheduler(grid=grid)
    usf.set_timesteps(12)
    # diffusers rounds these timesteps but keeps the exact sigmas; USF keeps the timesteps exact instead.
    np.testing.assert_allclose(usf.sigmas.numpy(), ref.sigmas.numpy(), rtol=1e-6)
    np.testing.assert_allclose(usf.timesteps.numpy(), ref.timesteps.numpy(), atol=0.5)
    assert usf.timesteps.dtype == torch.float32
    # Through from_scheduler the noise levels, hence the solution, match diffusers'.
    schedule = SolverSchedule.from_scheduler(ref, 12)
    np.testing.assert_allclose(schedule.timesteps, usf.timesteps.numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_spacings_equal_dpm_solver_pp(spacing):
    ref = DPMSolverMultistepScheduler(timestep_spacing=spacing, steps_offset=1)
    ref.set_timesteps(8)
    usf = USFScheduler(timestep_spacing=spacing, steps_offset=1)
    usf.set_timesteps(8)
    assert torch.equal(usf.timesteps, ref.timesteps)
    assert lockstep_error(ref, usf, make_model(ref)) <= RTOL


def test_custom_sigmas_for_a_vp_model_and_any_grid_with_custom_timesteps():
    usf = USFScheduler(grid="karras")  # diffusers refuses custom timesteps together with Karras sigmas
    usf.set_timesteps(timesteps=[980.5, 700.25, 310.0, 12.5])
    assert usf.timesteps.tolist() == [980.5, 700.25, 310.0, 12.5]
    sigmas = [14.0, 4.0, 1.0, 0.25, 0.05]
    usf.set_timesteps(sigmas=sigmas)  # diffusers' UniPC takes custom sigmas only for flow models
    np.testing.assert_allclose(usf.sigmas.numpy()[:-1], sigmas, rtol=1e-6)
    assert usf.sigmas[-1] == 0
    out = run(usf, make_model(usf), noise())[-1]
    assert torch.isfinite(out).all()


def test_invalid_grids_are_refused():
    usf = USFScheduler()
    with pytest.raises(ValueError, match="strictly decrease"):
        usf.set_timesteps(timesteps=[500, 600])
    with pytest.raises(ValueError, match="within"):
        usf.set_timesteps(timesteps=[1200, 10])
    with pytest.raises(ValueError, match="sigmas"):
        usf.set_timesteps(sigmas=[1e6, 1.0])
    with pytest.raises(ValueError, match="sigma_min"):
        USFScheduler(final_sigmas_type="sigma_min").set_timesteps(timesteps=[500, 0])
    with pytest.raises(ValueError, match="grid"):
        USFScheduler(grid="cosine")
    with pytest.raises(ValueError, match="flow"):
        USFScheduler(prediction_type="flow_prediction")


# ---- DC-Solver compensation ----------------------------------------------------------------


def test_dc_ratio_one_reproduces_the_newest_output_exactly():
    outputs = [torch.randn(5, generator=torch.Generator().manual_seed(i), dtype=torch.float32) for i in range(4)]
    times = [0.713, 0.5021, 0.3333, 0.1]  # non-integer: t' = t_{i-1} + 1·(t_i − t_{i-1}) is not exact in floats
    for dc_order in (1, 2, 3):
        assert torch.equal(dynamic_compensation(outputs, times, 1.0, dc_order), outputs[-1])


def test_dc_interpolation_is_lagrange_in_time():
    # Hand-derived: nodes 999, 899, 799, t' = 899 + 0.5·(799 − 899) = 849;
    # weights (849−899)(849−799)/((999−899)(999−799)) = −0.125, (849−999)(849−799)/((899−999)(899−799)) = 0.75,
    # (849−999)(849−899)/((799−999)(799−899)) = 0.375.
    e = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])]
    weights = dynamic_compensation(e, [999.0, 899.0, 799.0], 0.5, dc_order=2)
    torch.testing.assert_close(weights, torch.tensor([-0.125, 0.75, 0.375]), rtol=0, atol=1e-7)

    # A polynomial model output of degree ≤ dc_order is reproduced at t' for any ratio.
    a, b, c, d = (torch.randn(6, generator=torch.Generator().manual_seed(k), dtype=torch.float64) for k in range(4))
    times = [999.0, 899.0, 799.0, 699.0]
    for dc_order, poly in (
        (1, lambda t: a + b * t),
        (2, lambda t: a + b * t + c * t**2),
        (3, lambda t: a + b * t / 1e3 + c * (t / 1e3) ** 2 + d * (t / 1e3) ** 3),
    ):
        for ratio in (0.6, 1.0, 1.3):
            t_prime = times[-2] + ratio * (times[-1] - times[-2])
            value = dynamic_compensation([poly(t) for t in times], times, ratio, dc_order)
            torch.testing.assert_close(value, poly(t_prime), rtol=1e-10, atol=1e-10)


def _with(schedule: SolverSchedule, **changes: dict[int, object]) -> SolverSchedule:
    steps = list(schedule.steps)
    for name, per_step in changes.items():
        for i, value in per_step.items():
            steps[i] = SolverStep(**{**steps[i].to_dict(), name: value})
    return SolverSchedule(schedule.timesteps, tuple(steps))


def test_all_dc_ratios_one_is_bit_identical_to_no_compensation():
    base = SolverSchedule.from_scheduler(UniPCMultistepScheduler(solver_order=3), 10, order=3, corrector=True)
    ones = _with(base, dc_ratio={i: 1 for i in range(10)})  # JSON ints, normalised to 1.0
    assert ones == base
    model = make_model(DPMSolverMultistepScheduler())
    plain = run(USFScheduler.from_schedule(base, dc_order=1), model, noise())
    for dc_order in (1, 2, 3):
        usf = USFScheduler.from_schedule(ones, dc_order=dc_order)
        assert all(torch.equal(p, q) for p, q in zip(run(usf, model, noise()), plain, strict=True))
    # The knob is live: a ratio ≠ 1 changes the result.
    moved = run(USFScheduler.from_schedule(_with(base, dc_ratio={4: 0.8})), model, noise())
    assert not torch.equal(moved[-1], plain[-1])


def test_compensated_output_replaces_the_buffered_one_for_later_steps():
    """With an x̂₀ that is a quadratic in t, compensating step k equals a model that answered x̂₀(t′) there."""
    a, b, c = (torch.randn(SHAPE, generator=torch.Generator().manual_seed(k), dtype=torch.float64) for k in range(3))

    def poly(t: float) -> torch.Tensor:
        u = t / 1000.0
        return a + b * u + c * u**2

    base = SolverSchedule.from_scheduler(DPMSolverMultistepScheduler(solver_order=3), 10, order=3)
    k, ratio = 5, 0.7
    t = base.timesteps
    t_prime = t[k - 1] + ratio * (t[k] - t[k - 1])
    compensated = USFScheduler.from_schedule(_with(base, dc_ratio={k: ratio}), prediction_type="sample")
    moved_model = USFScheduler.from_schedule(base, prediction_type="sample")
    x = noise()
    out_dc = run(compensated, lambda x, s: poly(float(s)), x)
    out_moved = run(moved_model, lambda x, s: poly(t_prime if float(s) == t[k] else float(s)), x)
    for p, q in zip(out_dc, out_moved, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-9)


def test_corrector_is_left_alone_by_compensation():
    base = SolverSchedule.from_scheduler(UniPCMultistepScheduler(solver_order=2), 8, corrector=True)
    k = 4
    plain, dc = USFScheduler.from_schedule(base), USFScheduler.from_schedule(_with(base, dc_ratio={k: 1.3}))
    plain.set_timesteps(8)
    dc.set_timesteps(8)
    model = make_model(plain)
    x = noise()
    for i, t in enumerate(plain.timesteps[: k + 1]):
        out = model(x, t)
        x_plain = plain.step(out, t, x).prev_sample
        x_dc = dc.step(out, t, x).prev_sample
        if i < k:
            assert torch.equal(x_plain, x_dc)
            x = x_plain
    # At step k the UniC-corrected sample (computed from the fresh model output) is the same …
    assert torch.equal(plain._last_sample, dc._last_sample)
    # … while the predictor, which sees the compensated output, moves.
    assert not torch.equal(x_plain, x_dc)


# ---- the schedule as data ------------------------------------------------------------------


def test_schedule_round_trips_through_json():
    schedule = SolverSchedule(
        (999.0, 800.5, 500.0, 200.0, 10.0),
        (
            SolverStep(1),
            SolverStep(2, "noise", True, 0.9),
            SolverStep(3, "data", True, 1.2),
            SolverStep(2),
            SolverStep(1, "noise"),
        ),
    )
    data = json.loads(json.dumps(schedule.to_dict()))
    assert data["kind"] == "usf" and data["steps"][1] == {
        "order": 2,
        "prediction": "noise",
        "corrector": True,
        "dc_ratio": 0.9,
    }
    assert SolverSchedule.from_dict(data) == schedule
    assert config_from_dict("solver", data) == schedule  # the profile's solver section
    assert SolverStep.from_dict({"order": 1}) == SolverStep(order=1)
    assert schedule.num_steps == 5


def _profile_dict(**changes):
    data = {
        "kind": "usf",
        "timesteps": [999.0, 500.0, 100.0],
        "steps": [{"order": 1, "prediction": "data", "corrector": False, "dc_ratio": 1.0} for _ in range(3)],
    }
    for path, value in changes.items():
        if path.startswith("step_"):
            data["steps"][1][path[5:]] = value
        else:
            data[path] = value
    return data


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"step_order": 5}, r"solver\.steps\[1\]\.order.*<= 4"),
        ({"step_order": 0}, r"solver\.steps\[1\]\.order"),
        ({"step_order": True}, r"solver\.steps\[1\]\.order"),
        ({"step_prediction": "velocity"}, r"solver\.steps\[1\]\.prediction.*'velocity'"),
        ({"step_corrector": "yes"}, r"solver\.steps\[1\]\.corrector.*'yes'"),
        ({"step_dc_ratio": float("nan")}, r"solver\.steps\[1\]\.dc_ratio"),
        ({"step_dc_ratios": 1.0}, r"solver\.steps\[1\].*'dc_ratios'"),
        ({"timesteps": [999.0, 999.0, 100.0]}, r"solver\.timesteps\[1\].*strictly decrease"),
        ({"timesteps": [999.0, 500.0, -1.0]}, r"solver\.timesteps\[2\]"),
        ({"timesteps": [999.0, "500", 100.0]}, r"solver\.timesteps\[1\]"),
        ({"timesteps": [999.0, 500.0]}, r"solver\.steps: 3 steps for 2 timesteps"),
        ({"kind": "dpm"}, r"solver\.kind"),
        ({"extra": 1}, r"solver: unknown key"),
    ],
)
def test_malformed_schedules_name_the_field(changes, match):
    with pytest.raises(ProfileError, match=match):
        SolverSchedule.from_dict(_profile_dict(**changes))


def test_corrector_on_the_last_step_is_refused():
    data = _profile_dict()
    data["steps"][-1]["corrector"] = True
    with pytest.raises(ProfileError, match=r"steps\[2\]\.corrector.*last step"):
        SolverSchedule.from_dict(data)


def test_from_scheduler_leaves_the_scheduler_alone():
    ref = DPMSolverMultistepScheduler()
    SolverSchedule.from_scheduler(ref, 10)
    assert ref.num_inference_steps is None


def test_a_schedule_fixes_the_number_of_steps():
    dpm = DPMSolverMultistepScheduler()
    usf = USFScheduler.from_schedule(SolverSchedule.from_scheduler(dpm, 6))
    dpm.set_timesteps(6)
    usf.set_timesteps(sigmas=np.linspace(1, 1 / 6, 6))  # Flux passes its default sigmas: the schedule wins
    assert torch.equal(usf.timesteps, dpm.timesteps)
    with pytest.raises(ProfileError, match="num_inference_steps=6"):
        usf.set_timesteps(8)


def test_step_needs_a_timestep_on_the_grid():
    usf = USFScheduler()
    usf.set_timesteps(4)
    with pytest.raises(ValueError, match="not on this scheduler's grid"):
        usf.step(noise(), 123, noise())
    usf.set_begin_index(2)  # img2img: start mid-schedule
    usf.step(noise(), usf.timesteps[2], noise())
    assert usf.step_index == 3


def test_add_noise_equals_diffusers():
    ref, usf = DPMSolverMultistepScheduler(**SD_BETAS), USFScheduler(**SD_BETAS)
    ref.set_timesteps(20)  # diffusers looks the noise level up by position in its grid
    x, eps, t = noise(0)[:1].repeat(3, 1, 1, 1), noise(1)[:1].repeat(3, 1, 1, 1), ref.timesteps[[0, 7, 19]]
    torch.testing.assert_close(usf.add_noise(x, eps, t), ref.add_noise(x, eps, t), rtol=1e-6, atol=1e-6)


# ---- configs: diffusers' save / reload check -----------------------------------------------

CONFIGS = [
    {},
    {"solver_order": 3, "corrector": True, "grid": "logsnr_uniform", "prediction_type": "v_prediction"},
    {
        "predict_x0": False,
        "final_sigmas_type": "sigma_min",
        "beta_schedule": "squaredcos_cap_v2",
        "lambda_min_clipped": -5.1,
        "grid": "karras",
        "karras_rho": 5.0,
    },
    {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "shift": 3.0, "corrector": True},
    {
        "schedule": _with(
            SolverSchedule.from_scheduler(UniPCMultistepScheduler(), 7, corrector=True),
            dc_ratio={3: 0.9, 4: 1.1},
            prediction={5: "noise"},
        ).to_dict(),
        "dc_order": 3,
        "trained_betas": np.linspace(1e-4, 0.02, 1000).tolist(),
        "rescale_betas_zero_snr": True,
    },
]


@pytest.mark.parametrize("config", CONFIGS)
def test_config_round_trips_and_reloaded_scheduler_steps_identically(config, tmp_path):
    first = USFScheduler(**config)
    first.save_config(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unexpected config key" complaints
        reloaded = USFScheduler.from_pretrained(tmp_path)

    def public(c):
        return {k: v for k, v in c.items() if not k.startswith("_")}

    assert public(reloaded.config) == json.loads(json.dumps(public(first.config)))
    again = USFScheduler.from_config(first.config)
    outputs = []
    for scheduler in (first, reloaded, again):
        scheduler.set_timesteps(7)
        outputs.append(run(scheduler, make_model(scheduler), noise()))
    for other in outputs[1:]:
        assert all(torch.equal(p, q) for p, q in zip(outputs[0], other, strict=True))


def test_from_schedule_reads_a_pipeline_scheduler_config():
    dpm = DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_order=3, use_karras_sigmas=True, **SD_BETAS
    )
    usf = USFScheduler.from_schedule(None, dpm.config)
    assert (usf.config.predict_x0, usf.config.solver_order, usf.config.grid) == (False, 3, "karras")
    assert usf.config.beta_schedule == "scaled_linear"
    flow = USFScheduler.from_schedule(None, FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert flow.config.use_flow_sigmas and flow.config.prediction_type == "flow_prediction"
    assert flow.config.shift == 3.0
    unipc = UniPCMultistepScheduler(flow_shift=2.0)
    # A scheduler names its class; so does a config loaded from disk.
    for base in (unipc, {**unipc.config, "_class_name": "UniPCMultistepScheduler"}):
        assert USFScheduler.from_schedule(None, base).config.corrector
        assert USFScheduler.from_schedule(None, base).config.shift == 2.0


# ---- end to end on the embedded pipeline ---------------------------------------------------


def test_embedded_pipeline_gives_dpm_solver_pp_images(embedded_pipe):
    def images():
        return embedded_pipe(
            class_labels=[0, 3, 7, 9],
            num_inference_steps=10,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).images

    original = embedded_pipe.scheduler
    assert isinstance(original, DPMSolverMultistepScheduler)
    reference = images()
    embedded_pipe.scheduler = USFScheduler.from_schedule(SolverSchedule.from_scheduler(original, 10), original.config)
    try:
        swapped = images()
    finally:
        embedded_pipe.scheduler = original
    torch.testing.assert_close(swapped, reference, rtol=0, atol=1e-4)

    # The profile path: apply swaps the scheduler, remove puts the very same object back.
    handle = SolverSchedule.from_scheduler(original, 10).apply(embedded_pipe)
    try:
        assert isinstance(embedded_pipe.scheduler, USFScheduler)
        torch.testing.assert_close(images(), reference, rtol=0, atol=1e-4)
    finally:
        handle.remove()
    assert embedded_pipe.scheduler is original
    assert embedded_pipe.config["scheduler"] == ("diffusers", "DPMSolverMultistepScheduler")
    assert torch.equal(images(), reference)


# ---- order 4: USF's Taylor update -----------------------------------------------------------


class _PolynomialModel:
    """A prediction that is a polynomial of ``degree`` in λ (x̂₀ for ``"data"``, ε̂ for ``"noise"``; the model
    returns ε̂) on ``usf``'s grid, and the exact exponential-integrator step it implies, by hand: data
    x_t = (σ_t/σ_s)x_s + σ_t∫e^u P with ∫e^u P = e^u Σ (−1)^d P⁽ᵈ⁾; noise x_t = (α_t/α_s)x_s − α_t∫e^{−u} Q with
    ∫e^{−u} Q = −e^{−u} Σ Q⁽ᵈ⁾."""

    def __init__(self, usf: USFScheduler, prediction: str, degree: int, seed: int):
        self.prediction, self.degree = prediction, degree
        self.lam, self.alpha, self.sig = (np.asarray(v, dtype=float) for v in (usf._lambda, usf._alpha, usf._sig))
        g = torch.Generator().manual_seed(seed)
        self.coeffs = [0.3 * torch.randn(SHAPE, generator=g, dtype=torch.float64) / (k + 1) for k in range(degree + 1)]

    def poly(self, u: float, derivative: int = 0) -> torch.Tensor:
        out = torch.zeros(SHAPE, dtype=torch.float64)
        for k in range(derivative, self.degree + 1):
            out = out + math.perm(k, derivative) * u ** (k - derivative) * self.coeffs[k]
        return out

    def __call__(self, x: torch.Tensor, i: int) -> torch.Tensor:
        p = self.poly(self.lam[i])
        return p if self.prediction == "noise" else (x - self.alpha[i] * p) / self.sig[i]

    def exact(self, x: torch.Tensor, s: int, t: int) -> torch.Tensor:
        lam, alpha, sig = self.lam, self.alpha, self.sig
        sign = -1.0 if self.prediction == "data" else 1.0
        terms = [sum((sign**d) * self.poly(lam[k], d) for d in range(self.degree + 1)) for k in (s, t)]
        if self.prediction == "data":
            return (sig[t] / sig[s]) * x + sig[t] * (math.exp(lam[t]) * terms[1] - math.exp(lam[s]) * terms[0])
        return (alpha[t] / alpha[s]) * x - alpha[t] * (-math.exp(-lam[t]) * terms[1] + math.exp(-lam[s]) * terms[0])


@pytest.mark.parametrize("prediction", ["data", "noise"])
def test_order_4_is_exact_when_the_prediction_is_a_cubic_in_lambda(prediction):
    """USF's order-p update is the exponential integrator's Taylor expansion: with a prediction that is a
    cubic in λ, a step of order 4 (three earlier points) lands on the exact solution, order 3 does not.

    Exact, by hand: data x_t = (σ_t/σ_s)x_s + σ_t∫e^u P(u)du with ∫e^u P = e^u(P − P′ + P″ − P‴); noise
    x_t = (α_t/α_s)x_s − α_t∫e^{−u} Q(u)du with ∫e^{−u} Q = −e^{−u}(Q + Q′ + Q″ + Q‴).
    """
    usf = USFScheduler(grid="logsnr_uniform", final_sigmas_type="sigma_min")
    usf.set_timesteps(8)
    grid = tuple(usf._t)
    model = _PolynomialModel(usf, prediction, degree=3, seed=3)
    exact = model.exact

    def step_error(order: int) -> float:
        steps = [SolverStep(1, prediction), SolverStep(2, prediction), SolverStep(3, prediction)]
        steps += [SolverStep(order, prediction)] * 4 + [SolverStep(1, prediction)]
        scheduler = USFScheduler.from_schedule(SolverSchedule(grid, tuple(steps)), usf.config)
        scheduler.set_timesteps()
        x = noise()
        worst = 0.0
        for i, t in enumerate(scheduler.timesteps[:-1]):
            out = scheduler.step(model(x, i), t, x).prev_sample
            if i >= 3:  # three earlier evaluations exist: the order-4 steps
                truth = exact(x, i, i + 1)
                worst = max(worst, float((out - truth).abs().max() / truth.abs().max()))
            x = out
        return worst

    assert step_error(4) < 1e-10
    assert step_error(3) > 1e-6  # the test can fail: one order less is not exact on a cubic


def test_relaxation_scales_the_first_derivative_by_one_plus_c_h():
    """USF's "linear" relaxation, checked against the update written out by hand: at order 4 (Taylor) the
    step moves by α_t·h²·φ₂(−h)·(c·h)·F′ from the unrelaxed one (data prediction, F′ = x̂₀'s λ-derivative);
    at order 2 (DPM-Solver++ 2M) by −α_t·(e^{−h} − 1)·½·(c·h)·d₁ with d₁ = (F_s − F_{s−1})·h/(λ_s − λ_{s−1})."""
    usf = USFScheduler(grid="logsnr_uniform", final_sigmas_type="sigma_min")
    usf.set_timesteps(8)
    grid = tuple(usf._t)
    lam, alpha, sig = (np.asarray(v, dtype=float) for v in (usf._lambda, usf._alpha, usf._sig))
    g = torch.Generator().manual_seed(5)
    coeffs = [0.3 * torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(4)]

    def x0_of(u: float, derivative: int = 0) -> torch.Tensor:
        return sum(math.perm(k, derivative) * u ** (k - derivative) * coeffs[k] for k in range(derivative, 4))

    def outputs(order: int, c: float) -> list[torch.Tensor]:
        steps = [SolverStep(min(i + 1, order), relaxation=c if i == 4 else 0.0) for i in range(7)] + [SolverStep(1)]
        scheduler = USFScheduler.from_schedule(SolverSchedule(grid, tuple(steps)), usf.config)
        scheduler.set_timesteps()
        x, out = noise(), []
        for i, t in enumerate(scheduler.timesteps[:-1]):
            x = scheduler.step((x - alpha[i] * x0_of(lam[i])) / sig[i], t, x).prev_sample
            out.append(x)
        return out

    c, s, t = 0.4, 4, 5  # step 4 (grid point 4 → 5) is the relaxed one
    h = lam[t] - lam[s]
    phi2 = (math.expm1(-h) / -h - 1.0) / -h
    plain, relaxed = outputs(4, 0.0), outputs(4, c)
    assert torch.equal(plain[3], relaxed[3])  # earlier steps untouched
    moved = alpha[t] * h**2 * phi2 * (c * h) * x0_of(lam[s], 1)  # order 4 on a cubic: F′ estimated exactly
    torch.testing.assert_close(relaxed[4] - plain[4], moved, rtol=1e-9, atol=1e-12)
    plain2, relaxed2 = outputs(2, 0.0), outputs(2, c)
    d1 = (x0_of(lam[s]) - x0_of(lam[s - 1])) * h / (lam[s] - lam[s - 1])
    moved2 = -alpha[t] * math.expm1(-h) * 0.5 * (c * h) * d1
    torch.testing.assert_close(relaxed2[4] - plain2[4], moved2, rtol=1e-9, atol=1e-12)


def test_relaxation_is_written_only_when_used_and_refused_on_unip_3():
    assert "relaxation" not in SolverStep(2).to_dict()
    step = SolverStep(2, relaxation=-0.25)
    assert step.to_dict()["relaxation"] == -0.25 and SolverStep.from_dict(step.to_dict()) == step
    with pytest.raises(ProfileError, match=r"step\.relaxation: UniP-3"):
        SolverStep(3, corrector=True, relaxation=0.1)
    with pytest.raises(ProfileError, match=r"steps\[0\]\.relaxation"):
        SolverSchedule.from_dict({"kind": "usf", "timesteps": [999, 1], "steps": [{"relaxation": "big"}, {}]})


@pytest.mark.parametrize("prediction", ["data", "noise"])
@pytest.mark.parametrize(("degree", "points"), [(1, (2,)), (1, (3,)), (2, (1, 3)), (2, (2, 3)), (3, (1, 2, 3))])
def test_chosen_active_points_are_exact_on_a_polynomial_of_lower_degree(prediction, degree, points):
    """USF's chosen active points: the Taylor update estimates the derivatives from the earlier evaluations at
    ``points`` (offsets back) instead of the most recent ones; on a prediction that is a polynomial of degree
    ``len(points)`` in λ it is still exact (hand-derived antiderivatives as above), and one point fewer is not."""
    usf = USFScheduler(grid="logsnr_uniform", final_sigmas_type="sigma_min")
    usf.set_timesteps(8)
    grid = tuple(usf._t)
    model = _PolynomialModel(usf, prediction, degree, seed=5)
    exact = model.exact

    def step_error(chosen: tuple[int, ...]) -> float:
        order = len(chosen) + 1
        steps = [SolverStep(1, prediction), SolverStep(2, prediction), SolverStep(3, prediction)]
        steps += [SolverStep(order, prediction, points=chosen)] * 4 + [SolverStep(1, prediction)]
        scheduler = USFScheduler.from_schedule(SolverSchedule(grid, tuple(steps)), usf.config)
        scheduler.set_timesteps()
        x = noise()
        worst = 0.0
        for i, t in enumerate(scheduler.timesteps[:-1]):
            out = scheduler.step(model(x, i), t, x).prev_sample
            if i >= 3:  # three earlier evaluations exist: every chosen point is buffered
                truth = exact(x, i, i + 1)
                worst = max(worst, float((out - truth).abs().max() / truth.abs().max()))
            x = out
        return worst

    assert step_error(points) < 1e-10
    assert step_error(points[1:] if len(points) > 1 else ()) > 1e-6  # one point fewer: not exact


def test_chosen_active_points_are_checked_and_written_only_when_set():
    assert "points" not in SolverStep(3).to_dict()
    step = SolverStep.from_dict({"order": 3, "points": [1, 3]})
    assert step.points == (1, 3) and step.to_dict()["points"] == [1, 3]
    for bad, match in (
        ({"order": 3, "points": [1]}, "order - 1 = 2"),
        ({"order": 3, "points": [3, 1]}, "increasing"),
        ({"order": 2, "points": [4]}, "points\\[0\\]"),
        ({"order": 3, "points": [1, 3], "corrector": True}, "Taylor update"),
        ({"order": 2, "points": "1"}, "list of offsets"),
    ):
        with pytest.raises(ProfileError, match=match):
            SolverStep.from_dict(bad)
    # the default points at order 4 are (1, 2, 3): the same update bit for bit
    usf = USFScheduler(grid="logsnr_uniform", final_sigmas_type="sigma_min")
    usf.set_timesteps(7)
    grid = tuple(usf._t)
    runs = []
    for points in ((), (1, 2, 3)):
        steps = [SolverStep(1), SolverStep(2), SolverStep(3)] + [SolverStep(4, points=points)] * 3 + [SolverStep(1)]
        scheduler = USFScheduler.from_schedule(SolverSchedule(grid, tuple(steps)), usf.config)
        scheduler.set_timesteps()
        x = noise()
        for t in scheduler.timesteps:
            x = scheduler.step(0.3 * x, t, x).prev_sample
        runs.append(x)
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("prediction", ["data", "noise"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_usf_pseudo_corrector_is_the_taylor_update_one_order_higher(prediction, order):
    """USF's pseudo corrector (thu-nics/USF ``update(corrector=True)``): once the next evaluation exists, the step
    is re-run from its start with the Taylor update of order p + 1, the new evaluation among its points. On a
    prediction that is a polynomial of degree p in λ the corrected sample is exact (hand-derived antiderivatives);
    on degree p + 1 it is not; and it is not UniC."""
    usf = USFScheduler(grid="logsnr_uniform", final_sigmas_type="sigma_min")
    usf.set_timesteps(8)
    grid = tuple(usf._t)

    def corrected_error(degree: int, kind: str) -> float:
        model = _PolynomialModel(usf, prediction, degree, seed=7)
        exact = model.exact

        steps = [SolverStep(min(k + 1, order), prediction, True, corrector_kind=kind) for k in range(7)]
        scheduler = USFScheduler.from_schedule(SolverSchedule(grid, (*steps, SolverStep(1, prediction))), usf.config)
        scheduler.set_timesteps()
        x = noise()
        worst, start = 0.0, None
        for i, t in enumerate(scheduler.timesteps[:-1]):
            predicted = scheduler.step(model(x, i), t, x).prev_sample
            corrected = scheduler._last_sample  # x_i after correcting step i - 1 with the evaluation at x_i
            if start is not None and i >= order:  # step i - 1 ran at the full order
                truth = exact(start, i - 1, i)
                worst = max(worst, float((corrected - truth).abs().max() / truth.abs().max()))
            start, x = corrected, predicted
        return worst

    assert corrected_error(order, "usf") < 1e-10
    assert corrected_error(order + 1, "usf") > 1e-7  # the test can fail: one degree more is not exact
    assert abs(corrected_error(order + 1, "unic") - corrected_error(order + 1, "usf")) > 1e-9  # not UniC


def test_usf_corrector_kind_is_checked_and_written_only_when_set():
    assert "corrector_kind" not in SolverStep(2, corrector=True).to_dict()
    step = SolverStep.from_dict({"order": 3, "corrector": True, "corrector_kind": "usf", "points": [1, 3]})
    assert step.to_dict()["corrector_kind"] == "usf" and step.points == (1, 3)
    assert SolverStep(3, corrector=True, corrector_kind="usf", relaxation=0.2).relaxation == 0.2  # Taylor: relaxable
    with pytest.raises(ProfileError, match="without the corrector"):
        SolverStep(2, corrector_kind="usf")
    with pytest.raises(ProfileError, match="corrector_kind"):
        SolverStep.from_dict({"order": 2, "corrector": True, "corrector_kind": "bh1"})
