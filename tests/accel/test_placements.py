"""Step placements: AYS' published schedules and interpolation, GITS' dynamic program and its search."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_utils import AysSchedules

from difftune.accel.placements import ays_schedule, ays_sigmas, ays_timesteps, gits_dp, gits_schedule, gits_timesteps
from difftune.accel.solver import SolverSchedule, SolverStep, USFScheduler
from difftune.errors import ProfileError

torch.set_num_threads(1)


# ---- AYS -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "name"), [("sd", "StableDiffusion"), ("sdxl", "StableDiffusionXL")])
def test_ays_ten_steps_are_the_published_ones(family, name):
    assert ays_timesteps(family, 10) == [float(t) for t in AysSchedules[f"{name}Timesteps"]]
    assert ays_sigmas(family, 10) == pytest.approx(AysSchedules[f"{name}Sigmas"][:-1], abs=0)
    schedule = ays_schedule(family, 10)
    assert schedule.timesteps == tuple(float(t) for t in AysSchedules[f"{name}Timesteps"])
    assert [s.order for s in schedule.steps] == [1] + [2] * 8 + [1]  # DPM-Solver++(2M), as diffusers runs it
    corrected = ays_schedule(family, 10, order=3, corrector=True)
    assert [s.corrector for s in corrected.steps] == [True] * 9 + [False]


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("n", [5, 20])
def test_ays_interpolation_is_monotone_and_keeps_the_ends(family, n):
    published_sigmas = ays_sigmas(family, 10)
    sigmas = ays_sigmas(family, n)
    assert len(sigmas) == n
    assert np.all(np.diff(sigmas) < 0)
    assert sigmas[0] == pytest.approx(published_sigmas[0]) and sigmas[-1] == pytest.approx(published_sigmas[-1])
    published = ays_timesteps(family, 10)
    t = ays_timesteps(family, n)
    assert len(t) == n and np.all(np.diff(t) < 0)
    assert (t[0], t[-1]) == (published[0], published[-1])
    assert all(0 < v <= 999 for v in t)
    SolverSchedule(tuple(t), ays_schedule(family, n).steps)  # a valid schedule


def test_ays_sigma_to_timestep_matches_the_published_timesteps():
    # The published timesteps are the published σs on SD's noise schedule, up to rounding.
    converter = USFScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    for family in ("sd", "sdxl"):
        t = converter._sigma_to_timestep(np.array(ays_sigmas(family, 10)))
        np.testing.assert_allclose(t, ays_timesteps(family, 10), atol=1.5)


@pytest.mark.parametrize("family", ["flux", "sd3", "embedded", "video"])
def test_ays_unknown_family_is_a_profile_error(family):
    with pytest.raises(ProfileError, match="no published Align Your Steps schedule"):
        ays_timesteps(family, 10)
    with pytest.raises(ProfileError):
        ays_schedule(family, 10)


# ---- GITS dynamic program ------------------------------------------------------------------


def _path_cost(cost: np.ndarray, path: list[int]) -> float:
    return float(sum(cost[a, b] for a, b in itertools.pairwise(path)))


def test_gits_dp_hand_checked():
    # Fine points 0..3; two steps. Paths: 0-1-3 (1+1=2), 0-2-3 (5+0.5=5.5); the direct 0-3 has one step only.
    cost = np.array([[0, 1, 5, 9], [0, 0, 1, 1], [0, 0, 0, 0.5], [0, 0, 0, 0]], dtype=float)
    assert gits_dp(cost, 2) == [0, 1, 3]
    assert gits_dp(cost, 1) == [0, 3]
    assert gits_dp(cost, 3) == [0, 1, 2, 3]


@pytest.mark.parametrize("seed", range(5))
def test_gits_dp_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 7
    cost = rng.random((n + 1, n + 1))
    for k in range(1, n + 1):
        path = gits_dp(cost, k)
        assert path[0] == 0 and path[-1] == n and len(path) == k + 1 and np.all(np.diff(path) > 0)
        brute = min(_path_cost(cost, [0, *inner, n]) for inner in itertools.combinations(range(1, n), k - 1))
        assert _path_cost(cost, path) == pytest.approx(brute, rel=1e-12)


def test_gits_dp_on_straight_lines_costs_nothing():
    # A trajectory that is a straight line: every Euler step is exact, so any path costs zero.
    t = np.linspace(1.0, 0.0, 9)
    direction = np.array([0.3, -1.2, 2.0])
    xs = [np.array([1.0, 2.0, 3.0]) + ti * direction for ti in t]
    cost = np.zeros((len(t), len(t)))
    for i, j in itertools.combinations(range(len(t)), 2):
        cost[i, j] = np.linalg.norm(xs[i] + (t[j] - t[i]) * direction - xs[j])
    for k in (1, 3, 8):
        path = gits_dp(cost, k)
        assert len(path) == k + 1 and path[0] == 0 and path[-1] == 8 and np.all(np.diff(path) > 0)
        assert _path_cost(cost, path) == pytest.approx(0.0, abs=1e-12)


def test_gits_dp_rejects_bad_input():
    with pytest.raises(ValueError, match="exceeds"):
        gits_dp(np.zeros((3, 3)), 3)
    with pytest.raises(ValueError, match="square"):
        gits_dp(np.zeros((3, 4)), 1)


# ---- GITS on the embedded pipeline ---------------------------------------------------------

CALIBRATION = {"class_labels": [0, 3, 7, 9]}


def _images(pipe, steps, schedule=None):
    handle = schedule.apply(pipe) if schedule is not None else None
    try:
        return pipe(
            class_labels=list(range(10)) * 2,
            num_inference_steps=steps,
            output_type="pt",
            generator=torch.Generator().manual_seed(123),
        ).images.double()
    finally:
        if handle is not None:
            handle.remove()


def _order1(timesteps):
    return SolverSchedule(tuple(float(t) for t in timesteps), tuple(SolverStep(order=1) for _ in timesteps))


def test_gits_on_the_embedded_pipeline(embedded_pipe):
    original = embedded_pipe.scheduler
    t6 = gits_timesteps(embedded_pipe, 6, teacher_steps=40, samples=4, call_kwargs=CALIBRATION)
    assert embedded_pipe.scheduler is original
    assert len(t6) == 6 and t6[0] == 999.0 and np.all(np.diff(t6) < 0) and all(0 < t <= 999 for t in t6)
    schedule = gits_schedule(embedded_pipe, 6, teacher_steps=40, samples=4, call_kwargs=CALIBRATION)
    assert schedule.timesteps == tuple(t6) and all(s.order == 1 for s in schedule.steps)

    # Measured (see the report): at 10 steps GITS' placement beats uniform time placement clearly
    # (MSE 5.7e-4 vs 7.7e-4 against 100 steps); at 6 steps they are about even (1.755e-3 vs 1.762e-3),
    # so only the 10-step comparison is asserted.
    reference = _images(embedded_pipe, 100)
    t10 = gits_timesteps(embedded_pipe, 10, teacher_steps=40, samples=4, call_kwargs=CALIBRATION)
    uniform = USFScheduler.from_schedule(None, original, grid="time_uniform")._grid(10, None)
    gits_mse = float(((_images(embedded_pipe, 10, _order1(t10)) - reference) ** 2).mean())
    uniform_mse = float(((_images(embedded_pipe, 10, _order1(uniform)) - reference) ** 2).mean())
    assert gits_mse < 0.9 * uniform_mse
