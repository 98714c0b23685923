"""The ``bac`` space: the Adaptive Caching Scheduler against brute force, Bubbling Union by hand, the space."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch

import difftune
from difftune.errors import SpaceError
from difftune.spaces import (
    SpaceContext,
    adaptive_caching_schedule,
    bac_mask,
    bubbling_union,
    clear_bac_cache,
    get_space,
    mean_pairwise_l1,
    schedule_value,
    to_profile,
)
from difftune.spaces.bac import default_k, segment_costs

from .contract import SpaceContract, run

STEPS = 6

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    """Trajectories recorded here go to a temporary cache, and the process memo starts empty."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIFFTUNE_CACHE", str(tmp_path_factory.mktemp("difftune-cache")))
        clear_bac_cache()
        yield
        clear_bac_cache()


def _context(pipe: Any, steps: int = STEPS) -> SpaceContext:
    return SpaceContext.from_pipeline(pipe, num_inference_steps=steps, spacing_samples=2)


# ---- the Adaptive Caching Scheduler ---------------------------------------------------------------


def _brute_force(similarity: np.ndarray, k: int) -> tuple[float, list[list[int]]]:
    """The best value over every set of k update steps that contains step 0, and every set reaching it."""
    steps = similarity.shape[0]
    values = {
        (0, *rest): schedule_value(similarity, [0, *rest]) for rest in itertools.combinations(range(1, steps), k - 1)
    }
    best = max(values.values())
    return best, [list(s) for s, v in values.items() if np.isclose(v, best, rtol=0, atol=1e-9)]


@pytest.mark.parametrize("steps", range(1, 9))
def test_the_dp_finds_the_brute_force_optimum(steps):
    rng = np.random.default_rng(steps)
    for trial in range(6):
        similarity = rng.uniform(-1, 1, size=(steps, steps))
        if trial % 2:
            similarity = (similarity + similarity.T) / 2  # symmetric, as recorded similarities are
        for k in range(1, steps + 1):
            chosen = adaptive_caching_schedule(similarity, k)
            best, argmax = _brute_force(similarity, k)
            assert len(chosen) == k and chosen[0] == 0 and chosen == sorted(set(chosen))
            assert schedule_value(similarity, chosen) == pytest.approx(best, abs=1e-9)
            assert chosen in argmax


def test_minimising_a_distance_is_maximising_its_negative():
    rng = np.random.default_rng(7)
    points = rng.normal(size=(7, 3))
    distance = np.abs(points[:, None] - points[None]).sum(-1)
    for k in range(1, 8):
        chosen = adaptive_caching_schedule(-distance, k)
        lowest = min(-schedule_value(-distance, [0, *rest]) for rest in itertools.combinations(range(1, 7), k - 1))
        assert -schedule_value(-distance, chosen) == pytest.approx(lowest)


def test_ties_go_to_the_smallest_segment_end_as_in_the_reference():
    # Every schedule of a constant matrix has the same value; the reference's strict ">" keeps the
    # first (smallest) j at every stage, so the update steps are the earliest ones.
    for k in range(1, 6):
        assert adaptive_caching_schedule(np.ones((5, 5)), k) == list(range(k))


def test_costs_and_the_extremes_of_k():
    s = np.arange(16, dtype=float).reshape(4, 4)
    cost = segment_costs(s)
    assert cost[1, 3] == s[1, 1] + s[1, 2] + s[1, 3]
    assert cost[0, 0] == s[0, 0]
    assert adaptive_caching_schedule(s, 1) == [0]
    assert adaptive_caching_schedule(s, 4) == [0, 1, 2, 3]
    for bad in (0, 5, 2.5, True):
        with pytest.raises(SpaceError, match="k: expected"):
            adaptive_caching_schedule(s, bad)  # type: ignore[arg-type]
    with pytest.raises(SpaceError, match="T×T"):
        adaptive_caching_schedule(np.ones((3, 4)), 1)
    with pytest.raises(SpaceError, match="NaN"):
        adaptive_caching_schedule(np.full((3, 3), np.nan), 1)


# ---- Bubbling Union ----------------------------------------------------------------------------------

# Three layers of (attn, ff). Ranked by error: 0.ff, 1.attn, 2.attn, 2.ff, 1.ff, 0.attn.
STEPS_OF = {"0.attn": [0, 4], "0.ff": [0, 2], "1.attn": [0, 1], "1.ff": [0, 5], "2.attn": [0, 3], "2.ff": [0, 6]}
LAYER = {u: int(u[0]) for u in STEPS_OF}
FFN = {u: u.endswith(".ff") for u in STEPS_OF}
ERRORS = {"0.attn": 0.1, "0.ff": 0.9, "1.attn": 0.8, "1.ff": 0.2, "2.attn": 0.7, "2.ff": 0.3}


def test_bubbling_union_by_hand():
    out = bubbling_union(STEPS_OF, LAYER, FFN, ERRORS, 3)
    # Taken: 0.ff, 1.attn, 2.attn. Each gains the steps of every FFN of its layer or deeper:
    # 0.ff ∪ {0.ff, 1.ff, 2.ff} = {0, 2, 5, 6}; 1.attn ∪ {1.ff, 2.ff} = {0, 1, 5, 6}; 2.attn ∪ {2.ff} = {0, 3, 6}.
    assert out == {
        "0.attn": [0, 4],
        "0.ff": [0, 2, 5, 6],
        "1.attn": [0, 1, 5, 6],
        "1.ff": [0, 5],
        "2.attn": [0, 3, 6],
        "2.ff": [0, 6],
    }
    # Every unit taken: the shallowest attention gains every FFN's steps; the deepest FFN keeps its own.
    everything = bubbling_union(STEPS_OF, LAYER, FFN, ERRORS, 99)
    assert everything["0.attn"] == [0, 2, 4, 5, 6] and everything["2.ff"] == [0, 6]


def test_bubbling_union_needs_two_units_as_in_the_reference():
    for n in (0, 1):
        assert bubbling_union(STEPS_OF, LAYER, FFN, ERRORS, n) == STEPS_OF
    with pytest.raises(SpaceError, match="n: expected"):
        bubbling_union(STEPS_OF, LAYER, FFN, ERRORS, -1)


def test_bubbling_union_breaks_ties_in_mapping_order():
    flat = dict.fromkeys(STEPS_OF, 1.0)
    out = bubbling_union(STEPS_OF, LAYER, FFN, flat, 2)  # 0.attn and 0.ff: the first two
    assert out["0.attn"] == [0, 2, 4, 5, 6] and out["0.ff"] == [0, 2, 5, 6] and out["1.attn"] == [0, 1]


def test_mean_pairwise_l1_is_the_mean_over_pairs_of_steps():
    rng = np.random.default_rng(0)
    d = rng.uniform(0, 1, size=(2, 3, 4, 4))
    d = d + d.transpose(0, 1, 3, 2)
    expected = np.mean([d[..., i, j] for i in range(4) for j in range(i + 1, 4)], axis=0)
    np.testing.assert_allclose(mean_pairwise_l1(-d), expected)


# ---- the mask -------------------------------------------------------------------------------------


def test_bac_mask_shape_identity_and_bubbling_union():
    rng = np.random.default_rng(1)
    s = rng.uniform(size=(3, 2, 8, 8))
    assert bac_mask(s, 8).all()  # K = T: every unit updates every step, the plain pipeline
    mask = bac_mask(s, 3)
    assert mask.shape == (8, 3, 2) and mask[0].all() and (mask.sum(0) == 3).all()
    ffn = np.array([[False, True]] * 3)
    errors = rng.uniform(size=(3, 2))
    union = bac_mask(s, 3, 6, errors=errors, ffn=ffn)
    assert (union >= mask).all() and union[:, 0, 0].sum() >= 3
    # Block 0's attention gains every FFN's update steps.
    assert (union[:, 0, 0] == mask[:, 0, 0] | mask[:, :, 1].any(axis=1)).all()
    absent = np.ones((3, 2), dtype=bool)
    absent[1, 0] = False
    assert bac_mask(s, 2, present=absent)[:, 1, 0].all()  # an inert slot stays 1
    with pytest.raises(SpaceError, match="errors"):
        bac_mask(s, 3, 2)


# ---- the space ------------------------------------------------------------------------------------


class TestBACSpace(SpaceContract):
    space_name = "bac"

    @classmethod
    def make_context(cls, pipe: Any) -> SpaceContext:
        return _context(pipe)


@pytest.fixture(scope="module")
def context(embedded_pipe) -> SpaceContext:
    return _context(embedded_pipe)


def test_variables_and_defaults(context):
    space = get_space("bac")
    variables = {v.name: v for v in space.variables(context)}
    assert list(variables) == ["k", "n", "metric"]
    assert (variables["k"].low, variables["k"].high, variables["k"].default) == (1, STEPS, default_k(STEPS))
    assert (variables["n"].low, variables["n"].high, variables["n"].default) == (0, 12, 5)
    assert variables["metric"].choices == ("cosine", "l1", "mse")
    assert default_k(20) == 6 and default_k(100) == 30 and default_k(2) == 1
    assert space.default_searcher == "tpe"


def test_decode_gives_a_mask_with_step_zero_computed_and_k_equal_t_is_the_identity(context):
    space = get_space("bac")
    info = context.info
    for metric in ("cosine", "l1", "mse"):
        for k, n in ((1, 0), (2, 0), (3, 5), (STEPS - 1, 12)):
            mask = space.decode({"k": k, "n": n, "metric": metric}, context)["cache"].array
            assert mask.shape == info.mask_shape(STEPS) and mask[0].all()
            assert (mask.sum(axis=0) >= k).all()
            if n < 2:
                assert (mask.sum(axis=0) == k).all()
        assert space.decode({"k": STEPS, "n": 5, "metric": metric}, context)["cache"].array.all()


def test_baselines_are_named_points_of_the_space(embedded_pipe):
    space = get_space("bac")
    context = _context(embedded_pipe, steps=20)
    points = {p.name: p for p in space.baselines(context)}
    assert list(points) == ["bac_k5", "bac_k10", "bac_k15", "bac_reference"]
    assert points["bac_reference"].params == {"k": 6, "n": 5, "metric": "cosine"}
    for point in points.values():
        assert point.params is not None
        assert space.decode(point.params, context) == dict(point.sections)
    assert (points["bac_k10"].sections["cache"].array.sum(axis=0) == 10).all()


def test_applying_a_decoded_profile_runs_and_remove_restores_the_pipeline(embedded_pipe, context):
    space = get_space("bac")
    before = run(embedded_pipe, STEPS)
    profile = to_profile(space.decode({"k": 3, "n": 5, "metric": "cosine"}, context), context)
    handle = difftune.apply_profile(embedded_pipe, profile)
    try:
        cached = run(embedded_pipe, STEPS)
    finally:
        handle.remove()
    assert torch.isfinite(cached).all() and not torch.equal(cached, before)
    assert torch.equal(run(embedded_pipe, STEPS), before)


def test_decode_needs_the_pipeline(embedded_pipe):
    context = SpaceContext.from_pipeline(embedded_pipe, num_inference_steps=STEPS, keep_pipeline=False)
    space = get_space("bac")
    assert [v.name for v in space.variables(context)] == ["k", "n", "metric"]  # no pipeline needed
    with pytest.raises(SpaceError, match="keep_pipeline=True"):
        space.decode({}, context)


def test_encode_refuses_settings_outside_the_space(context):
    from difftune.accel.cache import CacheMaskConfig, FORAConfig

    space = get_space("bac")
    with pytest.raises(SpaceError, match="not a mask schedule"):
        space.encode({"cache": FORAConfig(interval=2)}, context)
    odd = np.ones(context.info.mask_shape(STEPS), dtype=bool)
    odd[1:, 0, 0] = False
    odd[1:, 1, 1] = False
    odd[3, 1, 1] = True  # two units on different k: no single k gives it
    with pytest.raises(SpaceError, match="not a BAC schedule"):
        space.encode({"cache": CacheMaskConfig.from_array(context.info.components, odd)}, context)
