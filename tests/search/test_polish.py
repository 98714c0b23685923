"""Free timestep placement (search/polish.py) on the embedded model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difftune.accel.solver import SolverSchedule, SolverStep
from difftune.errors import SpaceError
from difftune.evaluators import Sample, batch_kwargs
from difftune.search.polish import KNOBS, polish_schedule, polish_timesteps

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_polish_moves_the_free_timesteps_closer_to_the_fine_reference(embedded_pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFTUNE_CACHE", str(tmp_path))
    samples = [Sample(i % 10, i) for i in range(8)]
    # 4 evaluations after an analytical first step, order 2, on a λ-uniform grid
    sigmas = np.exp(np.linspace(np.log(157.4), np.log(0.01), 5))
    from difftune.accel.solver import USFScheduler

    t = USFScheduler.from_schedule(None, embedded_pipe.scheduler)._sigma_to_timestep(sigmas)
    t[0] = 999.0
    steps = (SolverStep(1), SolverStep(1), SolverStep(2), SolverStep(2), SolverStep(1))
    start = SolverSchedule(tuple(float(v) for v in t), steps, analytic_first=True)
    result = polish_timesteps(embedded_pipe, start, samples, reference_steps=50, evaluations=40)
    polished = result.schedule
    assert result.evaluations <= 40 and result.final_mse < 0.7 * result.initial_mse, result
    assert polished.steps == start.steps and polished.timesteps[0] == start.timesteps[0]
    assert np.all(np.diff(polished.timesteps) < 0) and polished.timesteps != start.timesteps
    # the figure is what the returned schedule draws, against the 50-step plain pipeline
    reference = embedded_pipe(**batch_kwargs(samples), num_inference_steps=50, output_type="pt").images
    handle = polished.apply(embedded_pipe)
    try:
        out = embedded_pipe(**batch_kwargs(samples), num_inference_steps=5, output_type="pt").images
    finally:
        handle.remove()
    assert abs(float(((out - reference) ** 2).mean()) - result.final_mse) < 1e-9
    assert torch.isfinite(out).all()


def test_polish_refuses_what_it_cannot_move(embedded_pipe):
    samples = [Sample(1, 0)]
    single = SolverSchedule((999.0,), (SolverStep(1),))
    with pytest.raises(SpaceError, match="none free to move"):
        polish_timesteps(embedded_pipe, single, samples)
    afs = SolverSchedule((999.0, 500.0), (SolverStep(1), SolverStep(1)), analytic_first=True)
    with pytest.raises(SpaceError, match="none free to move"):
        polish_timesteps(embedded_pipe, afs, samples)
    with pytest.raises(SpaceError, match="evaluations"):
        polish_timesteps(embedded_pipe, afs, samples, evaluations=0)


def _afs_start(pipe: object, nfe: int) -> SolverSchedule:
    """``nfe`` evaluations after an analytical first step, UniPC order 2 with the corrector, λ-uniform grid."""
    from difftune.accel.solver import USFScheduler

    sigmas = np.exp(np.linspace(np.log(157.4), np.log(0.01), nfe + 1))
    t = USFScheduler.from_schedule(None, pipe.scheduler)._sigma_to_timestep(sigmas)  # type: ignore[attr-defined]
    t[0] = 999.0
    steps = (SolverStep(1, corrector=True), *(SolverStep(2, corrector=i < nfe) for i in range(1, nfe + 1)))
    return SolverSchedule(tuple(float(v) for v in t), steps, analytic_first=True)


def _drawn_mse(pipe, schedule, samples, reference) -> float:
    handle = schedule.apply(pipe)
    try:
        out = pipe(**batch_kwargs(samples), num_inference_steps=schedule.num_steps, output_type="pt").images
    finally:
        handle.remove()
    assert torch.isfinite(out).all()
    return float(((out - reference) ** 2).mean())


def test_polish_schedule_fits_timesteps_relaxations_and_dc_ratios(embedded_pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFTUNE_CACHE", str(tmp_path))
    samples = [Sample(i % 10, i) for i in range(8)]
    start = _afs_start(embedded_pipe, 4)
    result = polish_schedule(embedded_pipe, start, samples, reference_steps=50, evaluations=60, seed=3)
    fitted = result.schedule
    assert result.knobs == KNOBS and result.evaluations <= 60
    assert result.final_mse < 0.7 * result.initial_mse, result  # seeds 0, 1, 3: 0.38, 0.54, 0.50
    # the discrete decisions and the fixed points stay; the continuous knobs moved, within their ranges
    assert [(s.order, s.prediction, s.corrector) for s in fitted.steps] == [
        (s.order, s.prediction, s.corrector) for s in start.steps
    ]
    # every timestep may move (the first too: free_start), staying decreasing within the trained range
    assert np.all(np.diff(fitted.timesteps) < 0) and fitted.timesteps[0] <= 999.0 and fitted.timesteps[-1] >= 0.0
    relaxations = [s.relaxation for s in fitted.steps]
    ratios = [s.dc_ratio for s in fitted.steps]
    assert relaxations[0] == 0.0 and any(r != 0.0 for r in relaxations[1:4])  # step 0 has one point only
    assert ratios[:2] == [1.0, 1.0] and any(r != 1.0 for r in ratios[2:])  # DC-Solver fixes the first two
    assert all(-1.0 <= r <= 1.5 for r in relaxations) and all(0.5 <= r <= 1.5 for r in ratios)
    # the figure is what the returned schedule draws against the 50-step plain pipeline
    reference = embedded_pipe(**batch_kwargs(samples), num_inference_steps=50, output_type="pt").images
    assert abs(_drawn_mse(embedded_pipe, fitted, samples, reference) - result.final_mse) < 1e-9
    # the same seed fits the same schedule
    again = polish_schedule(embedded_pipe, start, samples, reference_steps=50, evaluations=60, seed=3)
    assert again.schedule == fitted


def test_polish_schedule_fits_only_the_knobs_named(embedded_pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFTUNE_CACHE", str(tmp_path))
    samples = [Sample(i % 10, i) for i in range(4)]
    start = _afs_start(embedded_pipe, 3)
    result = polish_schedule(embedded_pipe, start, samples, knobs=("dc_ratio",), reference_steps=30, evaluations=20)
    assert result.schedule.timesteps == start.timesteps
    assert [s.relaxation for s in result.schedule.steps] == [0.0] * 4
    assert result.final_mse <= result.initial_mse
    kept = polish_schedule(
        embedded_pipe, start, samples, knobs=("timesteps",), free_start=False, reference_steps=30, evaluations=12
    )
    assert kept.schedule.timesteps[:2] == start.timesteps[:2] and kept.schedule.steps == start.steps
    with pytest.raises(SpaceError, match="knobs"):
        polish_schedule(embedded_pipe, start, samples, knobs=("warp",))
    first_order = SolverSchedule((999.0, 500.0, 100.0), (SolverStep(1),) * 3)
    with pytest.raises(SpaceError, match="no relaxation to fit"):
        polish_schedule(embedded_pipe, first_order, samples, knobs=("relaxation",))


def test_polish_schedule_keeps_a_sharpness_guard_the_start_meets(embedded_pipe, tmp_path, monkeypatch):
    from difftune.evaluators.sharpness import sharpness_per_image

    monkeypatch.setenv("DIFFTUNE_CACHE", str(tmp_path))
    samples = [Sample(i % 10, i) for i in range(6)]
    start = _afs_start(embedded_pipe, 3)
    reference = embedded_pipe(**batch_kwargs(samples), num_inference_steps=50, output_type="pt").images

    def sharpness(schedule: SolverSchedule) -> float:
        handle = schedule.apply(embedded_pipe)
        try:
            out = embedded_pipe(**batch_kwargs(samples), num_inference_steps=schedule.num_steps, output_type="pt")
        finally:
            handle.remove()
        return float(sharpness_per_image(out.images, reference).mean())

    free = polish_schedule(embedded_pipe, start, samples, reference_steps=50, evaluations=40, seed=0)
    assert abs(free.sharpness - sharpness(free.schedule)) < 1e-6
    # a guard the start meets (its own sharpness, 0.99; the unguarded fit kept 0.88): the kept schedule meets it
    guard = sharpness(start)
    assert guard > free.sharpness, (guard, free.sharpness)
    kept = polish_schedule(
        embedded_pipe, start, samples, reference_steps=50, evaluations=40, seed=0, min_sharpness=guard
    )
    assert kept.sharpness >= guard and abs(kept.sharpness - sharpness(kept.schedule)) < 1e-6
    assert kept.final_mse <= kept.initial_mse
    with pytest.raises(SpaceError, match="min_sharpness"):
        polish_schedule(embedded_pipe, start, samples, min_sharpness=1.5)
