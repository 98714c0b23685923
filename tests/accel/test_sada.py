"""SADA: exactness when off, real skipping, the criterion by hand, Lagrange, schedulers, families, JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

import difftune
from difftune.accel import config_from_dict
from difftune.accel.sada import (
    SADAConfig,
    _join,
    _view_for,
    apply_sada,
    lagrange_extrapolate,
    multistep_prediction,
    stability_momentum,
)
from difftune.accel.solver import SolverSchedule, USFScheduler
from tests.models.tiny_pipelines import build, torch_threads

LABELS = [1, 4, 7]
STEPS = 50
STEP_ONLY = {"max_downsample": 0}  # no token pruning: step-wise decisions alone


def _run(pipe, steps=STEPS, labels=LABELS):
    with torch_threads(1):
        return pipe(
            class_labels=labels,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


@pytest.fixture
def pipe(embedded_pipe):
    """The session's embedded pipeline, with its own scheduler put back after the test."""
    scheduler = embedded_pipe.scheduler
    yield embedded_pipe
    embedded_pipe.scheduler = scheduler


def _count_calls(pipe):
    calls = []
    hook = pipe.transformer.pos_embed.register_forward_hook(lambda m, a, out: calls.append(1))
    return calls, hook


# --- the maths ------------------------------------------------------------------------------------


def test_momentum_by_hand_on_a_toy_trajectory():
    # x_n = 1, f_n = 3, f_{n-1} = 2, f_{n-2} = 0, δ = 0.1:
    # x̃ = 1 − 0.1·(0.625·3 + 0.75·2 − 0.375·0) = 0.6625; the solver lands on 0.5, so the residual is −0.1625;
    # the second difference is (3 − 2) − (2 − 0) = −1, so the momentum is +0.1625 (unstable: compute).
    x, drifts = torch.tensor([1.0, 1.0]), (torch.tensor([3.0, 3.0]), torch.tensor([2.0, 2.0]), torch.tensor([0.0, 1.0]))
    predicted = multistep_prediction(x, drifts, 0.1)
    assert predicted[0].item() == pytest.approx(0.6625)
    momentum = stability_momentum(torch.tensor([0.5, 0.5]), predicted, drifts)
    assert momentum[0].item() == pytest.approx(0.1625)
    # second element: f_{n-2} = 1 → x̃ = 0.7, residual −0.2, second difference 0 → momentum 0 (stable)
    assert momentum[1].item() == pytest.approx(0.0)
    # linear drift and a solver that follows x̃ exactly: zero residual, zero momentum
    assert stability_momentum(predicted, predicted, drifts).abs().max() == 0


@pytest.mark.parametrize("terms", [1, 2, 3, 4])
def test_lagrange_is_exact_on_polynomials_below_its_degree(terms):
    nodes = [13, 17, 21, 25][-terms:]
    rng = np.random.default_rng(terms)
    coefficients = torch.from_numpy(rng.normal(size=(terms, 5)))  # degree terms − 1, one polynomial per element

    def poly(t, coeffs=coefficients):
        return sum(c * float(t) ** k for k, c in enumerate(coeffs))

    values = [poly(t) for t in nodes]
    for at in (26, 27, 28, 13):
        torch.testing.assert_close(lagrange_extrapolate(nodes, values, at), poly(at), rtol=1e-9, atol=1e-9)
    too_high = [v + float(t) ** terms for v, t in zip(values, nodes, strict=True)]
    assert not torch.allclose(lagrange_extrapolate(nodes, too_high, 27), poly(27) + 27.0**terms)


# --- exactness and reversibility --------------------------------------------------------------------


def test_off_is_bit_identical_and_remove_restores(pipe):
    base = _run(pipe)
    for config in (
        SADAConfig(acc_range=(10, 10)),  # empty range: nothing skipped, nothing pruned
        SADAConfig(threshold=-math.inf, lagrange_term=0, **STEP_ONLY),  # never stable enough
    ):
        handle = config.apply(pipe)
        assert torch.equal(_run(pipe), base)
        assert handle.stats.skipped == () and handle.stats.steps == STEPS
        handle.remove()
    handle = SADAConfig().apply(pipe)
    accelerated = _run(pipe)
    assert handle.stats.skipped
    handle.remove()
    assert not torch.equal(accelerated, base)
    assert torch.equal(_run(pipe), base)
    assert "step" not in pipe.scheduler.__dict__ and "set_timesteps" not in pipe.scheduler.__dict__
    for module in pipe.transformer.modules():
        assert "forward" not in module.__dict__


def test_real_denoiser_calls_equal_the_steps_not_skipped(pipe):
    calls, hook = _count_calls(pipe)
    handle = SADAConfig(**STEP_ONLY).apply(pipe)
    try:
        _run(pipe)
        stats = handle.stats
        first = len(calls)
        _run(pipe)  # a second run starts afresh and decides the same
        assert handle.stats == stats
    finally:
        handle.remove()
        hook.remove()
    assert stats.steps == STEPS and len(stats.skipped) >= 10
    assert first == STEPS - len(stats.skipped) and len(calls) == 2 * first
    assert set(stats.lagrange) <= set(stats.skipped)
    assert all(11 <= s <= 47 for s in stats.skipped)  # decided in [10, 47) about the next step


def _runs(steps):
    runs, length = [], 0
    for i in range(STEPS):
        length = length + 1 if i in steps else 0
        runs.append(length)
    return max(runs)


@pytest.mark.parametrize("max_interval", [1, 2, 3])
def test_max_interval_caps_consecutive_skips(pipe, max_interval):
    # τ = +∞: every evaluated step is "stable", so only max_interval and acc_range limit skipping.
    config = SADAConfig(threshold=math.inf, acc_range=(5, 30), max_interval=max_interval, lagrange_term=0, **STEP_ONLY)
    handle = config.apply(pipe)
    _run(pipe)
    skipped = handle.stats.skipped
    handle.remove()
    # the rule by hand: from step 5 on, skip the next step until max_interval skips in a row, then compute one
    expected, run = [], 0
    for n in range(5, 30):
        if run >= max_interval:
            run = 0
        else:
            run += 1
            expected.append(n + 1)
    assert list(skipped) == expected
    assert _runs(set(skipped)) == max_interval


def test_criterion_matches_a_hand_recomputation(pipe):
    """Record what the pipeline hands the scheduler and recompute the momentum with the VP drift by hand."""
    config = SADAConfig(acc_range=(3, 40), lagrange_term=0, **STEP_ONLY)
    handle = apply_sada(pipe, config)
    scheduler, inner = pipe.scheduler, pipe.scheduler.step
    seen = []

    def record(model_output, timestep, sample, *args, **kwargs):
        out = inner(model_output, timestep, sample, *args, **kwargs)
        seen.append((int(timestep), model_output.clone(), sample.clone(), out.prev_sample.clone()))
        return out

    scheduler.step = record
    try:
        _run(pipe)
    finally:
        scheduler.step = inner  # SADA's wrapper again, so its handle can take it off
        stats = handle.stats
        handle.remove()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)  # the embedded model's linear schedule
    drifts, means = [], []
    for n, (t, eps, x, x_next) in enumerate(seen):
        # the scheduler's own noise level (float32, as it samples with it): σ_VP = σ / √(1 + σ²)
        sigma = float(scheduler.sigmas[n]) / math.sqrt(1 + float(scheduler.sigmas[n]) ** 2)
        # dx/dt of the VP probability-flow ODE in t = timestep / 1000, where β(t) = 1000·β_i
        drifts.append(0.5 * 1000 * betas[t] * (eps / sigma - x))
        if len(drifts) >= 3 and len(means) < STEPS - 3:
            f0, f1, f2 = drifts[-1], drifts[-2], drifts[-3]
            predicted = x - (0.625 * f0 + 0.75 * f1 - 0.375 * f2) / 1000  # δ = one training timestep
            means.append(float(((x_next - predicted) * ((f0 - f1) - (f1 - f2))).mean()))
    assert [n for n, _ in stats.momentum] == list(range(2, STEPS - 1))
    np.testing.assert_allclose([m for _, m in stats.momentum], means, rtol=2e-3, atol=1e-9)
    expected, run = [], 0
    for n, mean in stats.momentum:
        if run >= config.max_interval:
            run = 0
        elif mean <= 0 and 3 <= n < 40:
            run += 1
            expected.append(n + 1)
        else:
            run = 0
    assert list(stats.skipped) == expected and expected


def test_lagrange_phase_skips_three_of_every_four_steps(pipe):
    config = SADAConfig(threshold=-math.inf, acc_range=(10, 47), lagrange_step=24, **STEP_ONLY)
    handle = config.apply(pipe)
    _run(pipe)
    stats = handle.stats
    handle.remove()
    # decisions at n in [24, 47) with n % 4 != 0 skip n + 1; the computed steps are 25, 29, …, 45
    expected = [n + 1 for n in range(24, 47) if n % 4 != 0]
    assert list(stats.skipped) == expected and list(stats.lagrange) == expected


# --- schedulers and prediction types -----------------------------------------------------------------


def _schedulers():
    vp = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    return [
        ("dpm-eps", DPMSolverMultistepScheduler(**vp)),
        ("dpm-v", DPMSolverMultistepScheduler(prediction_type="v_prediction", **vp)),
        ("dpm-x0", DPMSolverMultistepScheduler(prediction_type="sample", **vp)),
        ("dpm-flow", DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True)),
        ("euler-eps", EulerDiscreteScheduler(**vp)),
        ("euler-v", EulerDiscreteScheduler(prediction_type="v_prediction", **vp)),
        ("flow-euler", FlowMatchEulerDiscreteScheduler(shift=3.0)),
        ("usf-eps", USFScheduler(**vp)),
        ("usf-flow", USFScheduler(prediction_type="flow_prediction", use_flow_sigmas=True)),
    ]


@pytest.mark.parametrize("name,scheduler", _schedulers(), ids=[n for n, _ in _schedulers()])
def test_a_skipped_step_hands_the_scheduler_the_intended_x0(name, scheduler):
    """The output fed on a skipped step must make the scheduler's own x̂₀ equal the synthesised one."""
    scheduler.set_timesteps(10)
    view = _view_for(scheduler)
    n = 3
    p = view.point(n)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    noise = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    sample = (p.alpha * x0 + p.sigma * noise) / p.scale  # the scheduler's own space
    target = x0 + 0.1 * torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    fed = _join(target, sample * p.scale, p, view.prediction)
    if name.startswith("dpm"):
        scheduler._step_index = n
        got = scheduler.convert_model_output(fed, sample=sample)
    elif name.startswith("euler"):
        scheduler._step_index = n
        got = scheduler.step(fed, scheduler.timesteps[n], sample).pred_original_sample
    elif name.startswith("usf"):
        got = scheduler._convert(fed, sample, n)[0]
    else:  # flow Euler: x_{n+1} = x + (σ_{n+1} − σ_n)·v must equal (1 − σ')x̂₀ + σ'ε̂
        scheduler._step_index = n
        nxt = float(scheduler.sigmas[n + 1])
        eps = (sample - (1 - p.sigma) * target) / p.sigma
        got_next = scheduler.step(fed.float(), scheduler.timesteps[n], sample.float()).prev_sample
        torch.testing.assert_close(got_next.double(), (1 - nxt) * target + nxt * eps, rtol=1e-4, atol=1e-4)
        return
    torch.testing.assert_close(got.double(), target, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["euler", "usf"])
def test_embedded_with_other_schedulers(pipe, kind):
    if kind == "euler":
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    else:
        schedule = SolverSchedule.from_scheduler(pipe.scheduler, STEPS)
        pipe.scheduler = USFScheduler.from_schedule(schedule, pipe.scheduler)
    base = _run(pipe)
    calls, hook = _count_calls(pipe)
    handle = SADAConfig(**STEP_ONLY).apply(pipe)
    out = _run(pipe)
    stats = handle.stats
    handle.remove()
    hook.remove()
    assert len(stats.skipped) >= 10 and len(calls) == STEPS - len(stats.skipped)
    assert _psnr(out, base) > 30
    assert torch.equal(_run(pipe), base)


def test_scheduler_replaced_after_apply_is_an_error(pipe):
    handle = SADAConfig().apply(pipe)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    try:
        with pytest.raises(difftune.DifftuneError, match="apply it again"):
            _run(pipe, steps=5)
    finally:
        handle.remove()


# --- token pruning -------------------------------------------------------------------------------------


def test_token_pruning_computes_only_the_kept_tokens(pipe):
    """τ = −∞ and no Lagrange phase: every step is computed; in acc_range the block caches refresh every
    max_interval steps and the other steps run the blocks on the kept tokens only."""
    config = SADAConfig(threshold=-math.inf, acc_range=(10, 20), lagrange_term=0, max_fix=0)
    seen = []
    hook = pipe.transformer.transformer_blocks[2].attn1.to_q.register_forward_hook(
        lambda m, a, out: seen.append(a[0].shape[1])
    )
    handle = config.apply(pipe)
    try:
        out = _run(pipe)
        stats = handle.stats
    finally:
        handle.remove()
        hook.remove()
    pruned_steps = [n for n in range(10, 20) if (n - 10) % 4]
    # 4×4 tokens, one 3×3 window: one token is computed, the others come from the cache (max_fix = 0)
    assert [(n, k, t) for n, k, t in stats.pruned] == [(n, 1, 16) for n in pruned_steps]
    assert seen == [1 if n in pruned_steps else 16 for n in range(STEPS)]
    assert stats.skipped == () and torch.isfinite(out).all()
    # protecting tokens with momentum ≥ 0 computes more of them
    handle = SADAConfig(threshold=-math.inf, acc_range=(10, 20), lagrange_term=0).apply(pipe)
    _run(pipe)
    assert all(k >= 1 for _, k, _ in handle.stats.pruned)
    handle.remove()


# --- other families ------------------------------------------------------------------------------------


def test_flux_two_calls_per_step_and_no_pruning():
    with torch_threads(1):
        pipe, kwargs = build("flux")
        kwargs["num_inference_steps"] = 12
        with pytest.raises(difftune.ProfileError, match="max_downsample"):
            SADAConfig(acc_range=(3, 10)).apply(pipe)
        base = pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)}).images
        calls = []
        hook = pipe.transformer.x_embedder.register_forward_hook(lambda m, a, out: calls.append(1))
        config = SADAConfig(threshold=math.inf, acc_range=(3, 10), lagrange_term=0, max_interval=2, **STEP_ONLY)
        handle = config.apply(pipe)
        out = pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)}).images
        stats = handle.stats
        handle.remove()
        hook.remove()
        again = pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)}).images
    assert stats.skipped == (4, 5, 7, 8, 10)  # decided at 3, 4 | 6, 7 | 9 (max_interval 2)
    assert len(calls) == 2 * (12 - len(stats.skipped))  # true CFG: two denoiser calls per computed step
    assert np.isfinite(out).all() and not np.array_equal(out, base)
    assert np.array_equal(again, base)


def test_sd_unet_with_ddim_skips_and_prunes_its_transformer_blocks():
    with torch_threads(1):
        pipe, kwargs = build("sd")
        kwargs["num_inference_steps"] = 12
        base = pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)}).images
        handle = SADAConfig(threshold=-math.inf, acc_range=(3, 11), lagrange_term=0, max_fix=16).apply(pipe)
        pruned = pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)}).images
        pruned_stats = handle.stats
        handle.remove()
        handle = SADAConfig(threshold=math.inf, acc_range=(3, 11), lagrange_term=0, **STEP_ONLY).apply(pipe)
        skipped = pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)}).images
        skip_stats = handle.stats
        handle.remove()
        again = pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)}).images
    # 16×16 latent: the first level's 256 tokens are pruned (downsample 1), the 8×8 level is not
    assert [n for n, _, _ in pruned_stats.pruned] == [4, 5, 6, 8, 9, 10]
    assert all(t == 256 and k < t for _, k, t in pruned_stats.pruned)
    assert skip_stats.skipped == (4, 5, 6, 7, 9, 10, 11)
    assert np.isfinite(pruned).all() and np.isfinite(skipped).all()
    assert np.array_equal(again, base)


# --- the profile section -----------------------------------------------------------------------------


def test_json_round_trip_and_profile_section():
    config = SADAConfig(threshold=-1e-4, acc_range=(3, 18), max_interval=3, lagrange_step=12, max_fix=0)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["kind"] == "sada" and data["acc_range"] == [3, 18]
    assert SADAConfig.from_dict(data) == config
    assert config_from_dict("sparsity", data) == config
    assert config_from_dict("sparsity", {"kind": "sada"}) == SADAConfig()
    assert SADAConfig.from_dict({"kind": "sada", "threshold": 0}).threshold == 0.0


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("acc_range", [3], "sparsity.acc_range"),
        ("acc_range", [3, "18"], r"sparsity.acc_range\[1\]"),
        ("threshold", "0", "sparsity.threshold"),
        ("threshold", None, "sparsity.threshold"),
        ("max_interval", 0, "sparsity.max_interval"),
        ("lagrange_int", 1, "sparsity.lagrange_int"),
        ("lagrange_step", 22, "sparsity.lagrange_step.*multiple of lagrange_int=4"),
        ("lagrange_term", -1, "sparsity.lagrange_term"),
        ("sx", 0, "sparsity.sx"),
        ("sy", 2.5, "sparsity.sy"),
        ("max_downsample", True, "sparsity.max_downsample"),
        ("max_fix", -5, "sparsity.max_fix"),
        ("speed", 2, "unknown key.*'speed'"),
    ],
)
def test_malformed_fields_are_named(field, value, match):
    with pytest.raises(difftune.ProfileError, match=match):
        config_from_dict("sparsity", {"kind": "sada", field: value})


def test_lagrange_step_need_not_divide_when_lagrange_is_off():
    assert SADAConfig(lagrange_term=0, lagrange_step=22).lagrange_step == 22


def test_infinite_thresholds_survive_strict_json():
    import json

    from difftune.accel.sada import SADAConfig

    for value in (float("inf"), float("-inf")):
        config = SADAConfig(threshold=value)
        text = json.dumps(config.to_dict(), allow_nan=False)
        assert SADAConfig.from_dict(json.loads(text)) == config


def test_hooks_after_sada_see_the_schedulers_step_not_the_call_count(pipe):
    """Hooks on the denoiser index the scheduler's steps whether or not SADA's skipped calls reach them."""
    from difftune.accel._hooks import StepTracker

    outer: list[int] = []
    inner: list[int] = []

    def listener(seen):
        return type("L", (), {"reset": lambda self: None, "on_call": lambda self, tr: seen.append(tr.step)})()

    below = StepTracker(pipe.transformer, pipe.scheduler)  # a hook applied before SADA: SADA's skips bypass it
    below.add_listener(listener(inner))
    handle = SADAConfig(**STEP_ONLY).apply(pipe)
    above = StepTracker(pipe.transformer, pipe.scheduler)  # after SADA (a profile's cache section): sees every call
    above.add_listener(listener(outer))
    try:
        _run(pipe)
        stats = handle.stats
    finally:
        above.remove()
        handle.remove()
        below.remove()
    assert len(stats.skipped) >= 10
    assert inner == [s for s in range(STEPS) if s not in stats.skipped]
    assert outer == list(range(STEPS))
