"""StepTracker reads the timestep of each denoiser call without stalling a GPU's launch queue."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from difftune.accel._hooks import StepTracker


class Denoiser(torch.nn.Module):
    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return sample


def test_views_of_the_schedulers_timesteps_are_read_from_a_cpu_copy():
    scheduler = SimpleNamespace(timesteps=torch.tensor([999.0, 750.0, 500.0, 250.0, 1.0]))
    tracker = StepTracker(Denoiser(), scheduler)
    # t.expand(batch), as pipelines pass it: same storage, offset 3
    assert tracker._timesteps_mirror(scheduler.timesteps[3].expand(4)) == 250.0
    assert tracker._timesteps_mirror(scheduler.timesteps[0]) == 999.0
    # a copy (t * 1, t.to(dtype), t / 1000) is not a view: read directly, never guessed
    assert tracker._timesteps_mirror(scheduler.timesteps[3] * 1) is None
    assert tracker._timesteps_mirror(scheduler.timesteps[3].to(torch.float16)) is None
    # an in-place change of the timesteps, or a new tensor from set_timesteps, refreshes the copy
    scheduler.timesteps[3] = 260.0
    assert tracker._timesteps_mirror(scheduler.timesteps[3]) == 260.0
    scheduler.timesteps = torch.tensor([900.0, 100.0])
    assert tracker._timesteps_mirror(scheduler.timesteps[1]) == 100.0
    # strided timesteps (every other entry of a longer tensor)
    scheduler.timesteps = torch.arange(10.0, 0.0, -1.0)[::2]
    assert tracker._timesteps_mirror(scheduler.timesteps[2]) == 6.0
    tracker.remove()


def test_steps_are_counted_the_same_way_from_the_copy():
    scheduler = SimpleNamespace(timesteps=torch.tensor([999.0, 500.0, 1.0]))
    tracker = StepTracker(Denoiser(), scheduler)

    def from_copy(value: torch.Tensor) -> float:  # what a GPU run does (CPU tensors are read directly)
        found = tracker._timesteps_mirror(value)
        assert found is not None
        return found

    tracker._value = from_copy
    seen = []
    tracker.add_listener(SimpleNamespace(reset=lambda: None, on_call=lambda tr: seen.append((tr.step, tr.call))))
    x = torch.zeros(2)
    for t in scheduler.timesteps:
        tracker.denoiser(x, t.expand(2))
        tracker.denoiser(x, t)  # a separate unconditional pass: call 1 of the same step
    assert seen == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    tracker.remove()


@pytest.mark.cuda
def test_no_host_synchronisation_per_denoiser_call_on_cuda():
    scheduler = SimpleNamespace(timesteps=torch.tensor([999.0, 500.0, 1.0], device="cuda"))
    tracker = StepTracker(Denoiser(), scheduler)
    x = torch.zeros(2, device="cuda")
    tracker.denoiser(x, scheduler.timesteps[0])  # the one copy per run
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in scheduler.timesteps[1:]:
            tracker.denoiser(x, t.expand(2))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tracker.step == 2
    tracker.remove()


def _steps_seen(scheduler, calls, set_timesteps=True):
    tracker = StepTracker(Denoiser(), scheduler)
    seen = []
    tracker.add_listener(SimpleNamespace(reset=lambda: None, on_call=lambda tr: seen.append(tr.step)))
    if scheduler is not None and set_timesteps:
        tracker.start_run(len(scheduler.timesteps))  # what the wrapped set_timesteps does
    x = torch.zeros(2)
    for t in calls:
        tracker.denoiser(x, t)
    tracker.remove()
    return seen


def test_a_step_skipped_without_a_denoiser_call_still_advances_the_step():
    scheduler = SimpleNamespace(timesteps=torch.tensor([999.0, 750.0, 500.0, 250.0, 1.0]))
    ts = scheduler.timesteps
    # SADA skips step 2 (no call at 500): the call at 250 is step 3, not the third call
    assert _steps_seen(scheduler, [ts[0], ts[1], ts[3], ts[4]]) == [0, 1, 3, 4]
    # counted from the run's first timestep (img2img starts part-way down the schedule)
    assert _steps_seen(scheduler, [ts[1], ts[2], ts[4]]) == [0, 1, 3]
    # Flux pipelines pass t / 1000
    assert _steps_seen(scheduler, [ts[0] / 1000, ts[2] / 1000, ts[3] / 1000]) == [0, 2, 3]


def test_repeated_or_unknown_timesteps_fall_back_to_counting_steps():
    heun = SimpleNamespace(timesteps=torch.tensor([999.0, 500.0, 500.0, 1.0]))  # two calls at 500
    assert _steps_seen(heun, [999.0, 500.0, 1.0]) == [0, 1, 2]
    plain = SimpleNamespace(timesteps=torch.tensor([999.0, 500.0, 1.0]))
    assert _steps_seen(plain, [998.0, 400.0, 3.0]) == [0, 1, 2]  # not the scheduler's values
    assert _steps_seen(None, [999.0, 500.0, 1.0]) == [0, 1, 2]  # no scheduler at all
    # a run that did not begin with set_timesteps (a denoiser called directly): the timesteps may not be its own
    assert _steps_seen(plain, [999.0, 1.0], set_timesteps=False) == [0, 1]


class _Scheduler:
    """Makes a new timesteps tensor at every ``set_timesteps`` over the same memory (``torch.from_numpy`` of
    a reused array): a new tensor at the old one's address, at version 0, of the same length."""

    def __init__(self) -> None:
        self.timesteps: torch.Tensor | None = None
        self._values = np.zeros(5, dtype=np.float32)

    def set_timesteps(self, values: list[float]) -> None:
        self._values[:] = values
        self.timesteps = torch.from_numpy(self._values)


def test_new_timesteps_of_the_same_length_are_read_afresh():
    """A run's timesteps are looked up by value: a new tensor of the same length (another spacing, custom
    timesteps) must not be taken for the last run's, even where it lands at the same address."""
    scheduler = _Scheduler()
    tracker = StepTracker(Denoiser(), scheduler)
    seen: list[int] = []
    tracker.add_listener(SimpleNamespace(reset=lambda: None, on_call=lambda tr: seen.append(tr.step)))
    x = torch.zeros(2)
    runs = ([999.0, 750.0, 500.0, 250.0, 1.0], [999.0, 800.0, 600.0, 400.0, 1.0], [990.0, 700.0, 450.0, 200.0, 5.0])
    for values in runs * 3:
        scheduler.set_timesteps(values)
        seen.clear()
        for i in (0, 1, 3, 4):  # step 2 skipped without a call, as SADA does
            tracker.denoiser(x, torch.tensor(values[i]).expand(2))
        assert seen == [0, 1, 3, 4], values
    tracker.remove()
