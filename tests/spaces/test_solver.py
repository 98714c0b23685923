"""The ``solver`` space: contract, diffusers equivalence of its baselines, repair, spacing measurement."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

import difftune
from difftune.errors import SpaceError
from difftune.spaces import (
    SolverSpace,
    SpaceContext,
    SpacingChoice,
    baseline_schedule,
    best_spacing,
    get_space,
    to_profile,
)

from .contract import SpaceContract, run

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


class TestSolverSpace(SpaceContract):
    space_name = "solver"

    @classmethod
    def make_context(cls, pipe: Any) -> SpaceContext:
        # A short NFE range keeps "run every baseline" cheap; the unmeasured spacing is the scheduler's own.
        return SpaceContext.from_pipeline(pipe, nfe_range=(3, 5), keep_pipeline=False)

    def assert_same(self, a, b) -> None:
        # Continuous grids are re-fitted by encode: timesteps agree up to their 4-decimal rounding.
        x, y = a["solver"], b["solver"]
        assert x.steps == y.steps
        np.testing.assert_allclose(x.timesteps, y.timesteps, rtol=0, atol=2e-4)


@pytest.fixture(scope="module")
def context(embedded_pipe) -> SpaceContext:
    return SpaceContext.from_pipeline(embedded_pipe, nfe_range=(3, 12), keep_pipeline=False)


def _cosine_context(context: SpaceContext) -> SpaceContext:
    return context.replace(scheduler_config={**context.scheduler_config, "beta_schedule": "squaredcos_cap_v2"})


def test_variable_count(context):
    names = [v.name for v in get_space("solver").variables(context)]
    assert len(names) == 14 + 12
    assert names[-1] == "step_11"


def _images(pipe, steps):
    return run(pipe, steps, labels=(1, 4, 8))


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_dpmsolver_baseline_equals_diffusers_at_its_spacing(embedded_pipe, context, spacing):
    n = 5
    ctx = context.replace(nfe_range=(n, n), spacings={("dpmsolver++", n): spacing, ("unipc", n): spacing})
    points = {p.name: p for p in get_space("solver").baselines(ctx)}
    original = embedded_pipe.scheduler
    for name, cls in (("dpmsolver++", DPMSolverMultistepScheduler), ("unipc", UniPCMultistepScheduler)):
        point = points[f"{name}_nfe{n}"]
        assert point.params is not None
        handle = difftune.apply_profile(embedded_pipe, to_profile(point.sections, ctx))
        try:
            ours = _images(embedded_pipe, n)
        finally:
            handle.remove()
        embedded_pipe.scheduler = cls.from_config(original.config, timestep_spacing=spacing)
        try:
            theirs = _images(embedded_pipe, n)
        finally:
            embedded_pipe.scheduler = original
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_measured_best_spacing_baseline_equals_diffusers(embedded_pipe, context):
    n = 5
    choice = best_spacing(embedded_pipe, "dpmsolver++", n, samples=2)
    assert choice.measured and choice.label in choice.mse
    assert choice.mse[choice.label] == min(choice.mse.values())
    assert best_spacing(embedded_pipe, "dpmsolver++", n, samples=2) is choice  # cached per model, method, NFE
    ctx = context.replace(nfe_range=(n, n), spacings={("dpmsolver++", n): choice.to_dict()})
    point = next(p for p in get_space("solver").baselines(ctx) if p.name == f"dpmsolver++_nfe{n}")
    assert "measured" in point.description
    handle = difftune.apply_profile(embedded_pipe, to_profile(point.sections, ctx))
    try:
        ours = _images(embedded_pipe, n)
    finally:
        handle.remove()
    original = embedded_pipe.scheduler
    embedded_pipe.scheduler = DPMSolverMultistepScheduler.from_config(original.config, **choice.scheduler_kwargs)
    try:
        theirs = _images(embedded_pipe, n)
    finally:
        embedded_pipe.scheduler = original
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert SpacingChoice.from_dict(choice.to_dict()) == choice


def test_baselines_measure_lazily_with_a_pipeline(embedded_pipe):
    ctx = SpaceContext.from_pipeline(embedded_pipe, nfe_range=(4, 4), spacing_samples=2)
    points = get_space("solver").baselines(ctx)
    assert [p.name for p in points] == ["dpmsolver++_nfe4", "unipc_nfe4", "ddim_nfe4"]
    assert all("measured best" in p.description for p in points)
    assert all(p.params is not None for p in points)


def test_repair_lowers_order_above_history_and_drops_last_corrector(context):
    space = get_space("solver")
    params = {"nfe": 4, "step_0": "3c", "step_1": "3", "step_2": "2c", "step_3": "2c", "step_7": "3c"}
    repaired = space.repair(params, context)
    assert repaired.params["step_0"] == "1c"
    assert repaired.params["step_1"] == "2"
    assert repaired.params["step_2"] == "2c"
    assert repaired.params["step_3"] == "1"  # no corrector, and order 1 landing on sigma 0
    assert repaired.params["step_7"] == "3c"  # beyond the NFE: ignored, left alone
    text = " ".join(repaired.changes)
    assert "step_0" in text and "step_1" in text and "corrector" in text
    schedule = space.decode(params, context)["solver"]
    assert [(s.order, s.corrector) for s in schedule.steps] == [(1, True), (2, False), (2, True), (1, False)]


def test_global_knobs_and_prediction_switch(context):
    space = get_space("solver")
    schedule = space.decode(
        {"nfe": 6, "order": 3, "corrector": True, "prediction": "noise", "prediction_switch": 4}, context
    )["solver"]
    assert [s.order for s in schedule.steps] == [1, 2, 3, 3, 3, 1]
    assert [s.corrector for s in schedule.steps] == [True] * 5 + [False]
    assert [s.prediction for s in schedule.steps] == ["noise"] * 4 + ["data"] * 2


@pytest.mark.parametrize("grid", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("clip", [-math.inf, -5.1])
def test_spacing_grids_are_diffusers_spacings_also_clipped_on_a_cosine_model(context, grid, clip):
    space = get_space("solver")
    ctx = _cosine_context(context)
    for n in (3, 7, 12):
        kwargs = {"timestep_spacing": grid, "lambda_min_clipped": clip}
        try:
            schedule = baseline_schedule("dpmsolver++", ctx.scheduler_config, n, kwargs)
        except SpaceError:
            continue  # diffusers' trailing from a clipped start loses steps: not a baseline
        params = space.encode({"solver": schedule}, ctx)  # may name another grid with the same timesteps
        assert space.decode(params, ctx)["solver"] == schedule


def test_continuous_grids_keep_their_ends_and_warp(context):
    space = get_space("solver")
    for grid in ("time_uniform", "logsnr_uniform", "karras"):
        base = {"nfe": 8, "grid": grid, "t_start": 0.9, "t_end": 0.01}
        t1 = np.array(space.decode({**base, "warp": 1.0}, context)["solver"].timesteps)
        t2 = np.array(space.decode({**base, "warp": 1.8}, context)["solver"].timesteps)
        assert t1[0] == t2[0] == pytest.approx(0.9 * 999, abs=1e-4)
        assert t1[-1] == t2[-1] == pytest.approx(10.0)
        assert (t2[1:-1] > t1[1:-1]).all()  # warp > 1: more steps at high noise


def test_flow_matching_model_has_no_integer_spacings(context):
    config = {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": False,
    }
    ctx = context.replace(scheduler_config=config)
    space = get_space("solver")
    variables = {v.name: v for v in space.variables(ctx)}
    assert "t_start" not in variables and len(variables) == 13 + 12
    assert set(variables["grid"].choices) == {"flow_sigmas", "time_uniform", "logsnr_uniform", "karras"}
    rng = np.random.default_rng(0)
    for _ in range(30):
        schedule = space.decode(space.sample(ctx, rng), ctx)["solver"]
        assert 0 < schedule.timesteps[-1] < schedule.timesteps[0] <= 1000
    # FlowMatchEuler's own grid is the time-uniform grid with the default warp.
    schedule = space.decode({"nfe": 4, "grid": "time_uniform", "t_end": 0.001}, ctx)["solver"]
    assert schedule.timesteps[0] == 1000.0
    points = space.baselines(ctx.replace(nfe_range=(4, 4)))
    assert [p.name for p in points] == ["dpmsolver++_nfe4", "unipc_nfe4", "ddim_nfe4"]
    for point in points:
        assert point.params is not None and point.params["grid"] == "flow_sigmas"
        assert space.decode(point.params, ctx) == dict(point.sections)


def test_encode_refuses_what_is_not_in_the_space(context):
    space = get_space("solver")
    schedule = space.decode({"nfe": 5}, context)["solver"]
    with pytest.raises(SpaceError, match="nfe_range"):
        space.encode({"solver": schedule}, context.replace(nfe_range=(6, 12)))
    odd = type(schedule)((999.0, 700.0, 650.0, 100.0, 3.0), schedule.steps)
    with pytest.raises(SpaceError, match="grids"):
        space.encode({"solver": odd}, context)
    assert isinstance(get_space("solver"), SolverSpace)


def test_order_4_is_a_global_order_that_encodes_back(context):
    import dataclasses

    space = get_space("solver")
    assert next(v for v in space.variables(context) if v.name == "order").high == 4
    params = {"nfe": 7, "order": 4, "step_5": "2c"}
    schedule = space.decode(params, context)["solver"]
    assert [s.order for s in schedule.steps] == [1, 2, 3, 4, 4, 2, 1]  # warm-up, the override, the σ = 0 end
    assert space.decode(space.encode({"solver": schedule}, context), context)["solver"] == schedule
    # mixed with other orders through overrides of 1-3
    mixed = [dataclasses.replace(s, order=o) for s, o in zip(schedule.steps, [1, 2, 2, 4, 3, 2, 1], strict=True)]
    mixed_schedule = dataclasses.replace(schedule, steps=tuple(mixed))
    assert space.decode(space.encode({"solver": mixed_schedule}, context), context)["solver"] == mixed_schedule
    # an order-4 step with the corrector beside one without: no override can say "4" or "4c"
    steps = [dataclasses.replace(s, order=4 if i in (3, 4) else s.order, corrector=i == 3) for i, s in enumerate(mixed)]
    with pytest.raises(SpaceError, match="order 4 is only the default order"):
        space.encode({"solver": dataclasses.replace(schedule, steps=tuple(steps))}, context)


def test_relaxation_goes_to_every_step_but_unip_3_and_encodes_back(context):
    space = get_space("solver")
    params = {"nfe": 6, "order": 3, "corrector": True, "relaxation": 0.25, "step_4": "2"}
    schedule = space.decode(params, context)["solver"]
    # orders 1, 2, 3c, 3c, 2 (override, no corrector), 1: UniP-3 steps (2 and 3) have no relaxation
    assert [s.relaxation for s in schedule.steps] == [0.25, 0.25, 0.0, 0.0, 0.25, 0.25]
    encoded = space.encode({"solver": schedule}, context)
    assert encoded["relaxation"] == 0.25 and space.decode(encoded, context)["solver"] == schedule
    import dataclasses

    uneven = dataclasses.replace(
        schedule, steps=(dataclasses.replace(schedule.steps[0], relaxation=0.1), *schedule.steps[1:])
    )
    with pytest.raises(SpaceError, match="one relaxation on every step"):
        space.encode({"solver": uneven}, context)


def test_the_analytical_first_step_adds_a_grid_step_without_an_evaluation(embedded_pipe, context):
    from difftune.evaluators.evaluate import DenoiserCalls

    space = get_space("solver")
    params = {"nfe": 5, "order": 2, "analytic_first": True, "grid": "logsnr_uniform"}
    schedule = space.decode(params, context)["solver"]
    plain = space.decode({**params, "analytic_first": False}, context)["solver"]
    assert schedule.analytic_first and schedule.nfe == 5 and schedule.num_steps == 6
    # the grid is the 6-point grid, the analytical step first order, the evaluations as without it
    assert (
        schedule.timesteps == space.decode({**params, "nfe": 6, "analytic_first": False}, context)["solver"].timesteps
    )
    assert schedule.steps[0].order == 1 and not schedule.steps[0].corrector
    assert schedule.steps[1:] == plain.steps
    assert space.decode(space.encode({"solver": schedule}, context), context)["solver"] == schedule
    profile = to_profile({"solver": schedule}, context)
    assert profile.context.num_inference_steps == 6
    handle = difftune.apply_profile(embedded_pipe, profile)
    try:
        with DenoiserCalls(embedded_pipe.transformer) as counter:
            _images(embedded_pipe, 6)
    finally:
        handle.remove()
    assert (counter.calls, counter.skipped) == (5, 1)
    # the joint space keeps it off: its masks and DC ratios are per evaluation
    joint = get_space("joint")
    assert "analytic_first" not in {v.name for v in joint.variables(context)}
    with pytest.raises(SpaceError, match="analytical first step is searched in the solver space"):
        joint.encode({"solver": schedule}, context)


def test_active_points_go_to_order_2_and_3_steps_without_the_corrector_and_encode_back(context):
    space = get_space("solver")
    params = {"nfe": 7, "order": 3, "points": "skip", "step_5": "2c"}
    schedule = space.decode(params, context)["solver"]
    # orders 1, 2, 3, 3, 3, 2c, 1: offsets need that many earlier evaluations; no points with the corrector
    assert [s.points for s in schedule.steps] == [(), (), (), (1, 3), (1, 3), (), ()]
    assert space.decode(space.encode({"solver": schedule}, context), context)["solver"] == schedule
    far = space.decode({**params, "points": "far"}, context)["solver"]
    assert [s.points for s in far.steps][3:5] == [(2, 3), (2, 3)] and far != schedule
    assert space.encode({"solver": far}, context)["points"] == "far"
    # points no choice gives are not in the space
    import dataclasses

    odd = dataclasses.replace(
        schedule,
        steps=(*schedule.steps[:3], dataclasses.replace(schedule.steps[3], points=(2, 3)), *schedule.steps[4:]),
    )
    with pytest.raises(SpaceError, match="not a point of the space"):
        space.encode({"solver": odd}, context)


def test_usf_corrector_kind_goes_to_every_corrector_step_and_encodes_back(context):
    space = get_space("solver")
    params = {"nfe": 6, "order": 3, "corrector": True, "corrector_kind": "usf", "relaxation": 0.2, "points": "skip"}
    schedule = space.decode(params, context)["solver"]
    kinds = [s.corrector_kind for s in schedule.steps]
    assert kinds == ["usf"] * 5 + ["unic"]  # the last step has no corrector
    # a USF step predicts with the Taylor update: relaxation and chosen points reach its order-3 steps
    assert [s.relaxation for s in schedule.steps] == [0.2] * 6
    assert [s.points for s in schedule.steps][3:5] == [(1, 3), (1, 3)]
    assert space.decode(space.encode({"solver": schedule}, context), context)["solver"] == schedule
    unic = space.decode({**params, "corrector_kind": "unic"}, context)["solver"]
    assert [s.relaxation for s in unic.steps][2:5] == [0.0, 0.0, 0.0]  # UniP-3 steps: none
