"""USF's analytical first step: x̂₀ = 0 at the first timestep, no model call there."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from difftune.accel.solver import SolverSchedule, SolverStep, USFScheduler, placeholder_output
from difftune.errors import ProfileError
from difftune.models import adapter_for
from tests.models.tiny_pipelines import FAMILIES, build


def _schedule(n: int = 5, analytic_first: bool = True, order: int = 2, corrector: bool = False) -> SolverSchedule:
    base = DPMSolverMultistepScheduler()
    plain = SolverSchedule.from_scheduler(base, n, order=order, corrector=corrector)
    return dataclasses.replace(plain, analytic_first=analytic_first)


def test_the_json_form_round_trips_and_is_checked():
    schedule = _schedule()
    data = schedule.to_dict()
    assert data["analytic_first"] is True and schedule.nfe == schedule.num_steps - 1
    assert SolverSchedule.from_dict(data) == schedule
    assert "analytic_first" not in _schedule(analytic_first=False).to_dict()  # older profiles stay as they were
    with pytest.raises(ProfileError, match="analytic_first: expected true or false"):
        SolverSchedule.from_dict({**data, "analytic_first": "yes"})
    with pytest.raises(ProfileError, match="one-timestep"):
        SolverSchedule((999.0,), (SolverStep(order=1),), analytic_first=True)


@pytest.mark.parametrize(("order", "corrector"), [(1, False), (2, False), (3, True), (4, False)])
def test_the_scheduler_equals_a_model_that_predicts_zero_at_the_first_step(order, corrector):
    """The reference's zero_x0 AFS (thu-nics/USF uni_sampler.py): the first evaluation is replaced by x̂₀ = 0, i.e.
    ε̂ = x_T/σ_T, and the rest of the run uses it as a buffered point. Run the same grid with a model that outputs
    exactly that at the first step: the trajectories agree."""
    schedule = _schedule(6, order=order, corrector=corrector)
    torch.manual_seed(0)
    x_t = torch.randn(2, 3, 8, 8)
    model = lambda x, t: 0.3 * x + 0.01 * t / 1000.0  # noqa: E731 — a smooth toy ε-model

    def run(s: SolverSchedule, first_output) -> torch.Tensor:
        sched = USFScheduler.from_schedule(s, DPMSolverMultistepScheduler())
        sched.set_timesteps(s.num_steps)
        x = x_t.clone()
        for i, t in enumerate(sched.timesteps):
            out = first_output(x, sched) if i == 0 else model(x, float(t))
            x = sched.step(out, t, x).prev_sample
        return x

    afs = run(schedule, lambda x, _: torch.full_like(x, float("nan")))  # the first output is never read
    plain = dataclasses.replace(schedule, analytic_first=False)
    reference = run(plain, lambda x, sched: x / float(sched._sig[0]))  # ε = x/σ ⇔ x̂₀ = 0
    assert torch.isfinite(afs).all()
    torch.testing.assert_close(afs, reference, rtol=1e-6, atol=1e-6)
    # and it is not the run with the model's own first output
    assert (run(plain, lambda x, _: model(x, 999.0)) - afs).abs().max() > 1e-3


def test_the_first_step_moves_the_sample_by_the_noise_ratio():
    """Hand-derived: with x̂₀ = 0 a first-order data-prediction step gives x₁ = σ₁/σ₀ · x_T (VP: σ = √(1−ᾱ))."""
    schedule = _schedule(4, order=1)
    sched = USFScheduler.from_schedule(schedule, DPMSolverMultistepScheduler())
    sched.set_timesteps(schedule.num_steps)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x1 = sched.step(torch.zeros_like(x), sched.timesteps[0], x).prev_sample
    ratio = float(sched._sig[1]) / float(sched._sig[0])
    torch.testing.assert_close(x1, ratio * x, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_placeholder_has_the_shape_and_form_of_the_denoisers_output(family):
    pipe, kwargs = build(family)
    denoiser = adapter_for(pipe).denoiser(pipe)
    seen: list = []

    def capture(module, args, kw, output):
        seen.append((args, dict(kw), output))

    hook = denoiser.register_forward_hook(capture, with_kwargs=True)
    try:
        pipe(**kwargs)
    finally:
        hook.remove()
    args, kw, output = seen[0]
    real = output[0] if isinstance(output, tuple) else output.sample
    fake = placeholder_output(denoiser, args, kw)
    fake_tensor = fake[0] if isinstance(fake, tuple) else fake.sample
    assert isinstance(fake, tuple) == isinstance(output, tuple)
    assert fake_tensor.shape == real.shape and fake_tensor.dtype == real.dtype and not fake_tensor.any()


def test_a_pipeline_skips_the_first_call_and_draws_what_the_zero_prediction_gives(embedded_pipe):
    pipe = embedded_pipe
    plain = SolverSchedule.from_scheduler(pipe.scheduler, 6, order=2)
    afs = dataclasses.replace(plain, analytic_first=True)

    def images(schedule: SolverSchedule, first=None) -> tuple[torch.Tensor, int, int]:
        from difftune.evaluators.evaluate import DenoiserCalls

        handle = schedule.apply(pipe)
        denoiser = pipe.transformer
        extra = None
        if first is not None:
            from difftune.accel._hooks import wrap_forward

            extra = wrap_forward(denoiser, first)
        try:
            with DenoiserCalls(denoiser) as counter:
                out = pipe(
                    class_labels=[3, 8],
                    generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
                    num_inference_steps=schedule.num_steps,
                    output_type="pt",
                ).images
        finally:
            if extra is not None:
                extra.remove()
            handle.remove()
        return out, counter.calls, counter.skipped

    out, calls, skipped = images(afs)
    assert (calls, skipped) == (5, 1)  # five evaluations on a six-step grid

    def zero_x0_at_first(forward, hidden_states, *args, **kwargs):
        sched = pipe.scheduler
        if sched._step_index is not None:
            return forward(hidden_states, *args, **kwargs)
        real = forward(hidden_states, *args, **kwargs)  # for its shape (learned-sigma channels)
        eps = hidden_states / float(sched._sig[0])
        sample = torch.cat([eps, torch.zeros_like(real.sample[:, eps.shape[1] :])], dim=1)
        return type(real)(sample=sample)

    reference, calls, _ = images(plain, zero_x0_at_first)
    assert calls == 6
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    own, _, _ = images(plain)
    assert (own - out).abs().max() > 1e-3  # the first model call mattered; AFS replaced it


def test_sada_refuses_a_schedule_without_a_first_output(embedded_pipe):
    from difftune.accel.sada import SADAConfig

    schedule = dataclasses.replace(SolverSchedule.from_scheduler(embedded_pipe.scheduler, 8), analytic_first=True)
    handle = schedule.apply(embedded_pipe)
    try:
        with pytest.raises(ProfileError, match="analytic_first"):
            SADAConfig().apply(embedded_pipe)
    finally:
        handle.remove()
    assert not isinstance(embedded_pipe.scheduler, USFScheduler)
    assert "forward" not in embedded_pipe.transformer.__dict__


def test_a_cache_over_an_analytic_schedule_recomputes_what_step_0_never_cached(embedded_pipe):
    """Block caches see no block call at the analytical step; a step that would reuse step 0's outputs finds
    nothing cached and recomputes, so FORA 2 over a 6-step AFS schedule runs the blocks at steps 1, 2, 4."""
    from difftune.accel.cache import FORAConfig
    from difftune.evaluators.evaluate import DenoiserCalls

    pipe = embedded_pipe
    schedule = dataclasses.replace(SolverSchedule.from_scheduler(pipe.scheduler, 6), analytic_first=True)
    ran: list[int] = []
    inner = pipe.transformer.transformer_blocks[-1].ff.net[0]  # runs only where the last block's MLP is computed
    hook = inner.register_forward_pre_hook(lambda *_: ran.append(pipe.scheduler.step_index))
    handles = [schedule.apply(pipe), FORAConfig(2).apply(pipe)]
    try:
        with DenoiserCalls(pipe.transformer) as counter:
            out = pipe(
                class_labels=[2], generator=torch.Generator().manual_seed(0), num_inference_steps=6, output_type="pt"
            )
    finally:
        for handle in reversed(handles):
            handle.remove()
        hook.remove()
    assert torch.isfinite(out.images).all()
    assert counter.skipped == 1 and counter.calls == 5
    assert sorted(set(ran)) == [1, 2, 4]
