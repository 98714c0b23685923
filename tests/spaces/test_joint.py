"""The ``joint`` space: contract, variables of both spaces, cache masks over the solver's steps, baselines."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

from difftune.accel.cache import CacheMaskConfig
from difftune.accel.first_block_cache import FirstBlockCacheConfig
from difftune.accel.sada import SADAConfig
from difftune.accel.solver import SolverSchedule
from difftune.errors import SpaceError
from difftune.spaces import CacheSpace, JointSpace, SolverSpace, SpaceContext, get_space, to_profile
from difftune.spaces.joint import SADA_MIN_NFE
from difftune.spaces.quant import QuantSpace
from difftune.spaces.sada import SADASpace

from .contract import SpaceContract
from .contract import run as _run

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

NFE_MAX = 8


class TestJointSpace(SpaceContract):
    space_name = "joint"

    @classmethod
    def make_context(cls, pipe: Any) -> SpaceContext:
        # Few NFEs and steps keep "run every baseline" cheap; spacings are the scheduler's own (no measuring).
        # NFE 5-7 reaches SADA's minimum (6), so random points apply all four sections.
        return SpaceContext.from_pipeline(pipe, num_inference_steps=6, nfe_range=(5, 7), keep_pipeline=False)

    def assert_same(self, a, b) -> None:
        assert set(a) == set(b)
        x, y = a["solver"], b["solver"]
        assert x.steps == y.steps
        np.testing.assert_allclose(x.timesteps, y.timesteps, rtol=0, atol=2e-4)
        assert a.get("cache") == b.get("cache")
        assert a.get("sparsity") == b.get("sparsity")
        assert a.get("quantization") == b.get("quantization")


@pytest.fixture(scope="module")
def context(embedded_pipe) -> SpaceContext:
    return SpaceContext.from_pipeline(
        embedded_pipe, num_inference_steps=20, nfe_range=(2, NFE_MAX), keep_pipeline=False
    )


@pytest.fixture(scope="module")
def space() -> JointSpace:
    space = get_space("joint")
    assert isinstance(space, JointSpace)
    return space


def _point(space: JointSpace, context: SpaceContext, **params: Any) -> dict[str, Any]:
    return {**space.default_params(context), **params}


def _cache_only(params: dict[str, Any], context: SpaceContext) -> dict[str, Any]:
    names = {v.name for v in CacheSpace().variables(context)}
    return {k: v for k, v in params.items() if k in names}


def test_variables_are_the_solvers_then_each_parts_behind_its_switch(space, context):
    names = [v.name for v in space.variables(context)]
    solver = [v.name for v in SolverSpace().variables(context) if v.name != "analytic_first"]
    cache_vars = CacheSpace().variables(context.replace(num_inference_steps=NFE_MAX))
    sada = [f"sada_{v.name}" for v in SADASpace().variables(context)]
    quant = [f"q_{v.name}" for v in QuantSpace().variables(context)]
    assert names == [
        *solver,
        "dc_ratio",
        "dc_last",
        "use_cache",
        *(v.name for v in cache_vars),
        "use_sada",
        *sada,
        "use_quant",
        *quant,
    ]
    assert len(sada) == 11 and len(quant) == 2 * 7 + 4
    assert len(names) == len(set(names)) == 13 + NFE_MAX + 2 + 1 + 2 * (2 + 2) + 1 + 1 + 11 + 1 + 18
    assert JointSpace(parts=("solver", "cache")).default_params(context).keys() == set(names[: names.index("use_sada")])
    by_name = {v.name: v for v in space.variables(context)}
    assert by_name["use_cache"].kind == "bool" and by_name["use_cache"].default is False
    # ranges of the largest NFE (8 steps), not of num_inference_steps (20)
    assert by_name["warmup_0"].high == NFE_MAX // 2 == 4
    assert by_name["interval_1"].high == NFE_MAX - 1 == 7
    assert (by_name["nfe"].low, by_name["nfe"].high) == (2, NFE_MAX)
    with pytest.raises(SpaceError, match="at least 2"):
        space.variables(context.replace(nfe_range=(1, 1)))


def test_decode_without_cache_is_the_solver_schedule_alone(space, context):
    for nfe in (2, 5, NFE_MAX):
        params = _point(space, context, nfe=nfe, use_cache=False, interval_0=3)
        sections = space.decode(params, context)
        assert set(sections) == {"solver"}
        schedule = sections["solver"]
        assert isinstance(schedule, SolverSchedule)
        assert len(schedule.timesteps) == len(schedule.steps) == nfe
        solver_params = {k: v for k, v in params.items() if k in {v.name for v in SolverSpace().variables(context)}}
        assert schedule == SolverSpace().decode(solver_params, context)["solver"]


@pytest.mark.parametrize("nfe", [2, 3, 5, NFE_MAX])
def test_decode_with_cache_is_a_mask_over_the_nfe_steps(space, context, nfe):
    params = _point(space, context, nfe=nfe, use_cache=True, interval_0=2, interval_1=3, cache_1_ff=False)
    sections = space.decode(params, context)
    assert set(sections) == {"solver", "cache"}
    mask = sections["cache"]
    assert isinstance(mask, CacheMaskConfig)
    assert mask.array.shape == (nfe, 6, 2) == context.info.mask_shape(nfe)
    assert len(sections["solver"].timesteps) == nfe == mask.num_steps
    own = CacheSpace().decode(_cache_only(params, context), context.replace(num_inference_steps=nfe))["cache"]
    np.testing.assert_array_equal(mask.array, own.array)
    # by hand: group 0 (blocks 0-2) recomputes every 2nd step; group 1's attn1 every 3rd (capped to the
    # nfe's largest interval, max(2, min(nfe - 1, 10))), its ff (not cached) every step
    interval_1 = min(3, max(2, nfe - 1))
    every_2nd = [i % 2 == 0 for i in range(nfe)]
    every_3rd = [i % interval_1 == 0 for i in range(nfe)]
    for block in range(3):
        for k in range(2):
            assert mask.array[:, block, k].tolist() == every_2nd
    for block in range(3, 6):
        assert mask.array[:, block, 0].tolist() == every_3rd
        assert mask.array[:, block, 1].all()


def test_repair_clamps_the_cache_to_the_points_nfe_and_is_idempotent(space, context):
    params = _point(space, context, nfe=4, use_cache=True, warmup_0=4, interval_1=7, refresh=5)
    repaired = space.repair(params, context)
    assert repaired.params["warmup_0"] == 4 // 2  # 4 was within the variable's range (8 // 2) but not nfe 4's
    assert repaired.params["interval_1"] == 3  # max(2, min(4 - 1, 10))
    assert repaired.params["refresh"] == 3
    assert any("warmup_0" in c and "(at nfe 4)" in c for c in repaired.changes)
    assert space.repair(repaired.params, context).changes == ()
    assert space.repair(repaired.params, context).params == repaired.params
    # without the cache the cache variables only keep the largest NFE's ranges
    off = space.repair(_point(space, context, nfe=4, use_cache=False, warmup_0=4), context)
    assert off.params["warmup_0"] == 4 and off.changes == ()
    # above the range: clamped to the largest NFE first, then to the point's
    wild = space.repair(_point(space, context, nfe=3, use_cache=True, warmup_1=99), context)
    assert wild.params["warmup_1"] == 1
    assert space.repair(wild.params, context).changes == ()


def test_random_points_are_valid_and_their_profile_has_nfe_steps(space, context):
    rng = np.random.default_rng(7)
    variables = {v.name: v for v in space.variables(context)}
    with_cache = 0
    for _ in range(60):
        params = space.sample(context, rng)
        repaired = space.repair(params, context).params
        assert all(variables[k].contains(v) for k, v in repaired.items())
        assert space.repair(repaired, context).changes == ()
        sections = space.decode(params, context)
        nfe = int(repaired["nfe"])
        on = {"cache": repaired["use_cache"], "sparsity": repaired["use_sada"], "quantization": repaired["use_quant"]}
        assert set(sections) == {"solver", *(k for k, v in on.items() if v)}
        assert not (repaired["use_sada"] and nfe < SADA_MIN_NFE)
        assert len(sections["solver"].timesteps) == nfe
        if repaired["use_cache"]:
            with_cache += 1
            mask = sections["cache"].array
            assert mask.shape == (nfe, 6, 2)
            assert mask[0].all() and not mask.all()  # step 0 computes; something is reused
        assert to_profile(sections, context, name="p").context.num_inference_steps == nfe
    assert 10 < with_cache < 50


def test_encode_of_a_decoded_point_decodes_back_to_the_same_sections(space, context):
    rng = np.random.default_rng(11)
    seen = {True: 0, False: 0}
    for _ in range(40):
        sections = space.decode(space.sample(context, rng), context)
        try:
            params = space.encode(sections, context)
        except SpaceError:
            continue
        seen["cache" in sections] += 1
        assert params["use_cache"] is ("cache" in sections)
        TestJointSpace().assert_same(space.decode(params, context), sections)
    assert seen[True] >= 5 and seen[False] >= 5
    # a hand-made point with a cache
    sections = space.decode(_point(space, context, nfe=6, use_cache=True, interval_0=3, warmup_1=2), context)
    TestJointSpace().assert_same(space.decode(space.encode(sections, context), context), sections)


def test_encode_refuses_what_is_not_a_joint_point(space, context):
    sections = space.decode(_point(space, context, nfe=4, use_cache=True), context)
    with pytest.raises(SpaceError, match="always has a solver"):
        space.encode({"cache": sections["cache"]}, context)
    with pytest.raises(SpaceError, match="sparsity"):
        JointSpace(parts=("solver", "cache")).encode({**sections, "sparsity": object()}, context)
    with pytest.raises(SpaceError, match="at least 6 evaluations"):
        space.encode({**sections, "sparsity": SADAConfig()}, context)
    wrong_steps = space.decode(_point(space, context, nfe=5, use_cache=True), context)["cache"]
    with pytest.raises(SpaceError, match="mask shape"):
        space.encode({"solver": sections["solver"], "cache": wrong_steps}, context)


def test_baselines_are_the_solvers_without_cache_and_the_caches_without_params(space, context):
    points = space.baselines(context)
    by_name = {p.name: p for p in points}
    assert len(by_name) == len(points)
    solver_points = SolverSpace().baselines(context)
    assert len(solver_points) == 3 * (NFE_MAX - 2 + 1)
    for expected in solver_points:
        point = by_name[expected.name]
        assert point.sections == expected.sections and set(point.sections) == {"solver"}
        assert point.params is not None and point.params["use_cache"] is False
        assert set(point.params) == {v.name for v in space.variables(context)}
        decoded = space.decode(point.params, context)
        assert set(decoded) == {"solver"}
        TestJointSpace().assert_same(decoded, point.sections)
    cache_names = [p.name for p in CacheSpace().baselines(context) if p.name != "identity"]
    assert cache_names == ["fora_2", "fora_3", "fora_4", *(f"first_block_cache_{t:g}" for t in (0.05, 0.1, 0.2))]
    for name in cache_names:
        point = by_name[name]
        assert point.params is None and set(point.sections) == {"cache"}
    assert by_name["fora_3"].sections["cache"].array.shape == (20, 6, 2)  # at the reference's steps
    assert by_name["first_block_cache_0.1"].sections["cache"] == FirstBlockCacheConfig(threshold=0.1)
    assert "identity" not in by_name
    extra = ["sada_sd2", "w8a16", "w4a16_g32"]  # SADA's column for the family, two weight-only settings
    assert [p.name for p in points] == [p.name for p in solver_points] + cache_names + extra
    assert by_name["sada_sd2"].sections == SADASpace().baselines(context)[1].sections  # at 20 steps
    assert set(by_name["w8a16"].sections) == {"quantization"} and by_name["w8a16"].params is None
    assert [p.name for p in JointSpace(parts=("solver", "cache")).baselines(context)] == [
        p.name for p in points[: -len(extra)]
    ]


def test_dc_ratios_go_to_the_middle_and_last_steps_and_encode_back(space, context):
    params = {**space.default_params(context), "nfe": 5, "grid": "leading", "dc_ratio": 0.8, "dc_last": 1.25}
    schedule = space.decode(params, context)["solver"]
    # DC-Solver keeps the first two ratios at 1; steps 2-3 take dc_ratio, the last step dc_last
    assert [s.dc_ratio for s in schedule.steps] == [1.0, 1.0, 0.8, 0.8, 1.25]
    encoded = space.encode({"solver": schedule}, context)
    assert (encoded["dc_ratio"], encoded["dc_last"]) == (0.8, 1.25)
    assert space.decode(encoded, context)["solver"] == schedule
    # a ratio on a first step is not a point of the space
    bad = dataclasses.replace(
        schedule, steps=(dataclasses.replace(schedule.steps[0], dc_ratio=1.1), *schedule.steps[1:])
    )
    with pytest.raises(SpaceError, match="DC ratios"):
        space.encode({"solver": bad}, context)
    # three steps: the last (third) step is the only one with three buffered outputs
    three = space.decode({**params, "nfe": 3}, context)["solver"]
    assert [s.dc_ratio for s in three.steps] == [1.0, 1.0, 1.25]


def test_seeds_are_points_of_the_space_with_a_light_cache(space, context):
    seeds = space.seeds(context)
    names = [f"unipc_nfe{n}+step1_cache" for n in range(4, 7)]
    assert [s.name for s in seeds] == [*names[:2], "unipc_nfe5+step1_cache+w8a16", names[2]]
    w8 = seeds[2].sections["quantization"]
    assert (w8.default.weight_bits, w8.default.activation_bits, w8.layers) == (8, 16, {})
    assert seeds[2].sections["cache"] == seeds[1].sections["cache"]
    for seed in seeds:
        # a seed is a point of the space: its params decode to its sections exactly
        decoded = space.decode(seed.params, context)
        assert decoded["solver"] == seed.sections["solver"]
        assert (decoded["cache"].array == seed.sections["cache"].array).all()
        mask = seed.sections["cache"].array
        n = mask.shape[0]
        reused = [i for i in range(n) if not mask[i].any()]
        assert reused == [i for i in range(n) if i % 3 == 1]  # steps 1, 4, …: everything reused
        assert mask[[i for i in range(n) if i not in reused]].all()
        assert seed.sections["solver"].steps[-1].dc_ratio == 1.15
    assert not set(s.name for s in seeds) & set(b.name for b in space.baselines(context))


# --- sparsity and quantization in the joint point ------------------------------------------------


def test_sada_below_its_minimum_nfe_is_switched_off_with_a_sentence(space, context):
    repaired = space.repair(_point(space, context, nfe=SADA_MIN_NFE - 1, use_sada=True), context)
    assert repaired.params["use_sada"] is False
    (sentence,) = [c for c in repaired.changes if c.startswith("use_sada")]
    assert f"{SADA_MIN_NFE - 1} evaluation(s)" in sentence and "set to False" in sentence
    kept = space.repair(_point(space, context, nfe=SADA_MIN_NFE, use_sada=True), context)
    assert kept.params["use_sada"] is True and kept.changes == ()
    # the quantization part's own repair, named with the joint space's parameter
    fixed = space.repair(_point(space, context, use_quant=True, q_granularity="channel", q_group_size=32), context)
    assert fixed.params["q_group_size"] == 128 and any(c.startswith("q_group_size: 32") for c in fixed.changes)


def test_sada_and_quant_decode_as_their_own_spaces_at_the_points_nfe(space, context):
    sada = {"threshold": 0.004, "acc_start": 0.3, "acc_end": 0.9, "lagrange_term": 2, "lagrange_int": 2}
    quant = {"w_0": 4, "a_1": 8, "w_rest": 8, "granularity": "group", "group_size": 32}
    params = _point(
        space,
        context,
        nfe=8,
        use_sada=True,
        use_quant=True,
        **{f"sada_{k}": v for k, v in sada.items()},
        **{f"q_{k}": v for k, v in quant.items()},
    )
    sections = space.decode(params, context)
    assert set(sections) == {"solver", "sparsity", "quantization"}
    at_8 = context.replace(num_inference_steps=8)
    assert sections["sparsity"] == SADASpace().decode(sada, at_8)["sparsity"]
    assert sections["sparsity"].acc_range == (round(0.3 * 8), round(0.9 * 8))  # shares of the 8 evaluations
    assert sections["quantization"] == QuantSpace().decode(quant, context)["quantization"]
    assert space.decode(space.encode(sections, context), context) == sections


def test_default_objectives_add_weight_memory_when_quantization_is_a_part():
    assert JointSpace().default_objectives("embedded") == (
        ("speedup", "maximize"),
        ("psnr", "maximize"),
        ("weight_memory_mb", "minimize"),
        ("class_accuracy", "maximize"),
    )
    assert JointSpace().default_objectives("sdxl")[-1] == ("sharpness", "maximize")
    assert JointSpace(parts=("solver", "cache", "sparsity")).default_objectives("embedded") is None
    with pytest.raises(SpaceError, match="must include 'solver'"):
        JointSpace(parts=("cache",))


def test_a_stack_of_single_space_points_is_each_part_on_the_solvers_evaluations(space, context):
    solver_params = dict(SolverSpace().baselines(context)[3 * (6 - 2) + 1].params)  # unipc_nfe6
    assert solver_params["nfe"] == 6
    cache_params = {**CacheSpace().default_params(context), "interval_0": 3, "warmup_1": 6}  # at 20 steps
    sada_params = {**SADASpace().default_params(context), "threshold": 0.003}
    quant_params = {**QuantSpace().default_params(context), "w_2": 4}
    point = space.stack(
        {
            "solver": ("unipc_nfe6", solver_params),
            "cache": ("#12", cache_params),
            "sada": ("#3", sada_params),
            "quant": ("#7", quant_params),
        },
        context,
    )
    assert point.name == "stack[solver:unipc_nfe6 + cache:#12 + sada:#3 + quant:#7]"
    at_6 = context.replace(num_inference_steps=6)
    assert point.sections["solver"] == SolverSpace().decode(solver_params, context)["solver"]
    # the cache's knobs on 6 evaluations: warm-up 6 is clamped to the NFE's range, and the repair is told
    assert point.sections["cache"] == CacheSpace().decode({**cache_params, "warmup_1": 3}, at_6)["cache"]
    assert "warmup_1" in point.description and "repaired" in point.description
    assert point.sections["sparsity"] == SADASpace().decode(sada_params, at_6)["sparsity"]
    assert point.sections["quantization"] == QuantSpace().decode(quant_params, context)["quantization"]
    assert space.decode(point.params, context) == point.sections  # a point of the space
    with pytest.raises(SpaceError, match="cannot stack points of \\['ecad'\\]"):
        space.stack({"ecad": ("#1", {})}, context)
    with pytest.raises(SpaceError, match="cannot stack points of \\['quant'\\]"):
        JointSpace(parts=("solver", "cache")).stack({"quant": ("#7", quant_params)}, context)


def test_a_point_with_all_four_parts_applies_each_of_them_and_removes_exactly(space, embedded_pipe):
    import difftune
    from difftune.accel.quant import served_weight_memory
    from difftune.accel.sada import SADAHandle
    from difftune.accel.solver import USFScheduler

    context = SpaceContext.from_pipeline(embedded_pipe, num_inference_steps=20, nfe_range=(3, 10))
    full = _point(
        space,
        context,
        nfe=10,
        grid="uniform",
        use_cache=True,
        use_sada=True,
        use_quant=True,
        sada_threshold=0.02,  # skip wherever it may
        sada_max_downsample=0,
        q_w_rest=8,
    )

    def run(params):
        profile = to_profile(space.decode(params, context), context, name="p")
        handle = difftune.apply_profile(embedded_pipe, profile)
        try:
            images = _run(embedded_pipe, 10)
            sada = [h for h in handle.handles if isinstance(h, SADAHandle)]
            state = (
                isinstance(embedded_pipe.scheduler, USFScheduler),
                sada[0].stats.skipped if sada else (),
                served_weight_memory(embedded_pipe).quantized_bytes,
            )
        finally:
            handle.remove()
        return images, state

    plain_bytes = served_weight_memory(embedded_pipe).quantized_bytes
    images, (usf, skipped, weight_bytes) = run(full)
    assert usf and skipped and weight_bytes < plain_bytes
    assert torch.isfinite(images).all()
    for flag in ("use_cache", "use_sada", "use_quant"):  # every part changes the images
        without, _ = run({**full, flag: False})
        assert not torch.equal(without, images), flag
    assert served_weight_memory(embedded_pipe).quantized_bytes == plain_bytes
