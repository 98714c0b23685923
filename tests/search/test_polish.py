"""Free timestep placement (search/polish.py) on the embedded model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difftune.accel.solver import SolverSchedule, SolverStep
from difftune.errors import SpaceError
from difftune.evaluators import Sample, batch_kwargs
from difftune.search.polish import polish_timesteps

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
