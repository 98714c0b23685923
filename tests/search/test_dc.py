"""DC-Solver fitting and CPR: differentiable compensation, the reference's base schedule against diffusers'
UniPC, the ground-truth rule, the model function learnt from the pipeline's calls, fitted ratios that beat
ρ = 1 on held-out seeds, and a cascade polynomial that predicts ratios for an NFE it never saw."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler

from difftune.accel._hooks import wrap_forward
from difftune.accel.solver import SolverSchedule, SolverStep, USFScheduler, dynamic_compensation
from difftune.errors import ProfileError, SpaceError
from difftune.evaluators import Sample, batch_kwargs
from difftune.search.dc import (
    CascadePolynomial,
    _features,
    _ModelFunction,
    _reference_grid,
    _Targets,
    fit_cpr,
    fit_dc_ratios,
    reference_schedule,
    with_ratios,
)
from tests.accel.test_solver import RTOL, lockstep_error, make_model

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = [Sample(c, c) for c in (0, 3, 5, 8)]
HELD_OUT = [Sample(i % 10, 5000 + i) for i in range(20)]


def _sample(pipe, schedule: SolverSchedule, samples, guidance: float = 1.5) -> torch.Tensor:
    handle = schedule.apply(pipe)
    try:
        kwargs = {"num_inference_steps": schedule.num_steps, "guidance_scale": guidance, "output_type": "pt"}
        return pipe(**batch_kwargs(samples), **kwargs).images
    finally:
        handle.remove()


def _ddim(steps: int = 200, final: str | None = "sigma_min") -> SolverSchedule:
    grid = _reference_grid(999.0, steps)
    return SolverSchedule(tuple(float(t) for t in grid), tuple(SolverStep(order=1) for _ in grid), final)


# ---- the pieces -----------------------------------------------------------------------------


def test_a_tensor_ratio_gives_the_float_result_and_its_exact_derivative():
    g = torch.Generator().manual_seed(0)
    outputs = [torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    times = [900.0, 700.0, 450.0]
    rho = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    value = dynamic_compensation(outputs, times, rho)
    assert torch.equal(value.detach(), dynamic_compensation(outputs, times, 0.8))
    (grad,) = torch.autograd.grad(value.sum(), [rho])
    eps = 1e-6
    numeric = (dynamic_compensation(outputs, times, 0.8 + eps) - dynamic_compensation(outputs, times, 0.8 - eps)).sum()
    assert float(grad) == pytest.approx(float(numeric) / (2 * eps), rel=1e-6)
    assert torch.equal(dynamic_compensation(outputs, times, torch.tensor(1.0, dtype=torch.float64)), outputs[-1])


def test_the_reference_schedule_is_diffusers_unipc_ending_at_sigma_min():
    # The reference's SD setting: UniPC bh2 order 2, corrector disabled at step 0, final_sigmas_type="sigma_min".
    ref = UniPCMultistepScheduler(solver_order=2, disable_corrector=[0], final_sigmas_type="sigma_min")
    schedule = reference_schedule(ref, 6)
    assert schedule.final_sigma == "sigma_min"
    assert [s.corrector for s in schedule.steps] == [False, True, True, True, True, False]
    usf = USFScheduler.from_schedule(schedule, UniPCMultistepScheduler().config)  # its own end wins
    ref.set_timesteps(6)
    usf.set_timesteps(6)
    assert np.array_equal(ref.timesteps.numpy(), usf.timesteps.numpy())
    assert lockstep_error(ref, usf, make_model(ref)) <= RTOL
    # and it is not the zero-ending UniPC: the end matters
    zero = UniPCMultistepScheduler(solver_order=2, disable_corrector=[0])
    zero.set_timesteps(6)
    usf.set_timesteps(6)
    assert lockstep_error(zero, usf, make_model(zero)) > 100 * RTOL


def test_final_sigma_round_trips_and_is_validated():
    schedule = reference_schedule(UniPCMultistepScheduler(), 4)
    data = json.loads(json.dumps(schedule.to_dict()))
    assert data["final_sigma"] == "sigma_min" and SolverSchedule.from_dict(data) == schedule
    plain = SolverSchedule(schedule.timesteps, schedule.steps)
    assert "final_sigma" not in plain.to_dict()  # profiles without it are unchanged
    with pytest.raises(ProfileError, match="final_sigma"):
        SolverSchedule.from_dict({**data, "final_sigma": "middle"})


def test_the_ground_truth_is_the_ddim_latent_just_past_the_target_time():
    grid = np.array([900.0, 600.0, 300.0])
    # The reference keeps the latent after each DDIM step and takes the last step starting at or above t.
    assert _Targets.index(grid, 600.0) == 2  # the step from 600 ends at 300: latents[2]
    assert _Targets.index(grid, 599.0) == 2
    assert _Targets.index(grid, 601.0) == 1
    assert _Targets.index(grid, 100.0) == 3  # past the last step: the final latent
    assert _reference_grid(999.0, 4).tolist() == [999.0, 749.0, 500.0, 250.0]


def _identify(pipe, call) -> tuple[_ModelFunction, float]:
    """Run the pipeline's first step with a recorder and return the model function and its error at step 0."""
    model = _ModelFunction()
    seen: dict[str, torch.Tensor] = {}

    class Probe(USFScheduler):
        def step(self, model_output, timestep, sample, *args, **kwargs):
            if self._step_index is None:
                model.identify(sample, model_output)
                with torch.no_grad():
                    seen["error"] = (model(sample.float()) - model_output.float()).abs().max()
                    seen["scale"] = model_output.abs().max()
                model.calls_this_step = 0
            return super().step(model_output, timestep, sample, *args, **kwargs)

    def record(forward, *args, **kwargs):
        out = forward(*args, **kwargs)
        model.record(forward, args, kwargs, out)
        return out

    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    handle = wrap_forward(denoiser, record)
    original = pipe.scheduler
    pipe.scheduler = Probe.from_schedule(None, original)
    try:
        pipe(**call)
    finally:
        pipe.scheduler = original
        handle.remove()
    return model, float(seen["error"] / seen["scale"])


def test_the_model_function_reproduces_the_guided_output_of_each_pipeline(embedded_pipe):
    # The embedded pipeline stacks (cond, uncond); diffusers' SD stacks (uncond, cond).
    model, error = _identify(embedded_pipe, {**batch_kwargs(TRAIN[:2]), "num_inference_steps": 2, "guidance_scale": 3})
    # uncond + 3·(cond − uncond) with cond first: weights (3, −2) on the two halves.
    assert model.copies == 2 and model.combine == pytest.approx((3.0, -2.0), rel=1e-4)
    assert error < 1e-6
    model, error = _identify(embedded_pipe, {**batch_kwargs(TRAIN[:2]), "num_inference_steps": 2, "guidance_scale": 1})
    assert model.copies == 1 and model.combine is None and error < 1e-6

    # A bfloat16 pipeline combines its halves in bfloat16: still identified, within that precision.
    import difftune
    from tests.models.tiny_pipelines import build

    half = difftune.load_pipeline("embedded", torch_dtype=torch.bfloat16)
    half.set_progress_bar_config(disable=True)
    model, error = _identify(half, {**batch_kwargs(TRAIN[:2]), "num_inference_steps": 2, "guidance_scale": 3})
    assert model.combine == pytest.approx((3.0, -2.0), rel=0.05) and error < 0.05

    sd, kwargs = build("sd")
    call = {**kwargs, "num_inference_steps": 2, "guidance_scale": 5.0, "output_type": "latent"}
    model, error = _identify(sd, call)
    assert model.combine == pytest.approx((-4.0, 5.0), rel=1e-4)  # uncond first: weights (1 − 5, 5)
    assert error < 1e-5
    with pytest.raises(SpaceError, match="guidance rescale"):
        _identify(sd, {**call, "guidance_rescale": 0.7})


# ---- fitting ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def held_out_reference(embedded_pipe) -> torch.Tensor:
    return _sample(embedded_pipe, _ddim(), HELD_OUT)


def test_fitted_ratios_beat_rho_one_on_held_out_seeds_and_are_cached(embedded_pipe, held_out_reference, tmp_path):
    schedule = reference_schedule(embedded_pipe.scheduler, 6)
    fit = fit_dc_ratios(embedded_pipe, schedule, TRAIN, guidance_scale=1.5, cache_dir=tmp_path)
    assert fit.ratios[:2] == (1.0, 1.0) and all(r != 1.0 for r in fit.ratios[2:])
    assert [s.dc_ratio for s in fit.schedule.steps] == list(fit.ratios)
    assert fit.schedule.final_sigma == "sigma_min" and fit.schedule.timesteps == schedule.timesteps
    fitted = [i for i in range(6) if i >= 2]
    assert all(fit.final_loss[i] < fit.initial_loss[i] for i in fitted)  # the descent went downhill
    plain = float(((_sample(embedded_pipe, schedule, HELD_OUT) - held_out_reference) ** 2).mean())
    dc = float(((_sample(embedded_pipe, fit.schedule, HELD_OUT) - held_out_reference) ** 2).mean())
    assert dc < 0.95 * plain  # measured 0.84 (these 4 samples; 0.87 with 10)
    again = fit_dc_ratios(embedded_pipe, schedule, TRAIN, guidance_scale=1.5, cache_dir=tmp_path)
    assert again.from_cache and again.ratios == fit.ratios
    other = fit_dc_ratios(embedded_pipe, schedule, TRAIN, guidance_scale=1.5, cache_dir=tmp_path, target="next")
    assert not other.from_cache and other.ratios[:4] == fit.ratios[:4] and other.ratios[4] != fit.ratios[4]


def test_bad_arguments_are_refused_before_any_run(embedded_pipe):
    schedule = reference_schedule(embedded_pipe.scheduler, 5)
    for kwargs, match in (
        ({"iterations": 0}, "iterations"),
        ({"lr": -1.0}, "lr"),
        ({"bound": "sigmoid"}, "bound"),
        ({"target": "last"}, "target"),
    ):
        with pytest.raises(SpaceError, match=match):
            fit_dc_ratios(embedded_pipe, schedule, TRAIN, **kwargs)
    with pytest.raises(SpaceError, match="samples"):
        fit_dc_ratios(embedded_pipe, schedule, [])


# ---- CPR -------------------------------------------------------------------------------------


def _reference_predict(coeffs: np.ndarray, cfg: float, nfe: int, step: int) -> float:
    """The reference's ``cascade_polynomial_regression.predict``, written out."""
    c = coeffs.reshape(4, 3, 3)
    m, g, x = nfe / 50, cfg / 12, step / nfe
    c1 = c[..., 0] * m**2 + c[..., 1] * m + c[..., 2]  # 4 × 3
    c2 = c1[:, 0] * g**2 + c1[:, 1] * g + c1[:, 2]  # 4
    return float(sum(c2[k] * x**k for k in range(4)))


def test_cpr_evaluates_the_reference_cascade_and_recovers_it_by_least_squares(tmp_path):
    rng = np.random.default_rng(0)
    coeffs = rng.normal(size=36)
    cpr = CascadePolynomial(tuple(coeffs))
    assert cpr.ratios(6, 7.5)[:2] == [1.0, 1.0]
    for step in (3, 4, 6):
        assert cpr.ratio(6, 7.5, step) == pytest.approx(_reference_predict(coeffs, 7.5, 6, step), rel=1e-12)
    assert float(_features(5, 3.0, 4) @ coeffs) == pytest.approx(_reference_predict(coeffs, 3.0, 5, 4), rel=1e-12)
    fits = [(n, g, cpr.ratios(n, g)) for n in (4, 5, 6, 8, 10, 12) for g in (1.5, 4.0, 7.5)]
    fitted = fit_cpr(fits, fingerprint="abc", ridge=0.0)
    assert fitted.settings[0] == (4, 1.5)
    assert np.allclose(fitted.ratios(7, 3.0), cpr.ratios(7, 3.0), atol=1e-8)  # a setting never fitted
    path = fitted.save(CascadePolynomial.path_for("abc", tmp_path))
    assert path == tmp_path / "abc" / "cpr.json"
    assert CascadePolynomial.load(path) == fitted
    # The default ridge barely moves a well-determined fit, and keeps an underdetermined one near ratio 1.
    assert np.allclose(fit_cpr(fits).ratios(7, 3.0), cpr.ratios(7, 3.0), atol=0.05)
    one = [(5, 1.5, [1.0, 1.0, 0.8, 0.8, 1.2])]
    assert np.allclose(fit_cpr(one).ratios(5, 1.5), one[0][2], atol=0.1)  # shrunk a little towards 1
    assert all(0.5 < r < 1.5 for r in fit_cpr(one).ratios(12, 7.5))
    with pytest.raises(SpaceError, match="ridge"):
        fit_cpr(one, ridge=-1.0)
    with pytest.raises(SpaceError, match="36"):
        CascadePolynomial((1.0,) * 35)
    with pytest.raises(SpaceError, match="ratios given"):
        fit_cpr([(5, 1.5, [1.0, 1.0, 1.0])])


def test_cpr_predicted_ratios_beat_rho_one_at_an_nfe_never_fitted(embedded_pipe, held_out_reference, tmp_path):
    fits = []
    for guidance in (1.5, 3.0):
        for n in (5, 6, 8):
            schedule = reference_schedule(embedded_pipe.scheduler, n)
            fit = fit_dc_ratios(embedded_pipe, schedule, TRAIN, guidance_scale=guidance, cache_dir=tmp_path)
            fits.append((n, guidance, fit.ratios))
    cpr = fit_cpr(fits)
    schedule = reference_schedule(embedded_pipe.scheduler, 7)
    predicted = with_ratios(schedule, cpr.ratios(7, 1.5))
    plain = float(((_sample(embedded_pipe, schedule, HELD_OUT) - held_out_reference) ** 2).mean())
    dc = float(((_sample(embedded_pipe, predicted, HELD_OUT) - held_out_reference) ** 2).mean())
    assert dc < 0.9 * plain  # measured 0.83 here (0.74 from 10 settings × 10 samples); nothing fitted at NFE 7


def test_the_cpr_command_stores_the_models_polynomial_and_the_dc_space_uses_it(
    embedded_pipe, tmp_path, monkeypatch, capsys
):
    from difftune.cli import main
    from difftune.models import describe
    from difftune.search.dc import model_cpr
    from difftune.spaces import SpaceContext, get_space

    monkeypatch.setenv("DIFFTUNE_CACHE", str(tmp_path))
    main(["cpr", "--nfe", "4,5", "--guidance", "1.5,3", "--samples", "2", "--predict", "6@1.5"])
    out = capsys.readouterr().out
    assert "wrote the model's CPR" in out and "predicted at NFE 6, guidance 1.5: [1.000, 1.000," in out
    cpr = model_cpr(describe(embedded_pipe).fingerprint)
    assert cpr is not None and cpr.settings == ((4, 1.5), (5, 1.5), (4, 3.0), (5, 3.0))
    ctx = SpaceContext.from_pipeline(embedded_pipe, nfe_range=(5, 6), spacing_samples=2, guidance_scale=1.5)
    points = {p.name: p for p in get_space("dc").baselines(ctx)}
    predicted = points["dc_cpr_nfe6"].sections["solver"]
    assert [s.dc_ratio for s in predicted.steps] == pytest.approx(cpr.ratios(6, 1.5))
    with pytest.raises(SystemExit) as exit_info:
        main(["cpr", "--nfe", "2,4"])
    assert exit_info.value.code == 2
