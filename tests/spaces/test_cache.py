"""The ``cache`` space: contract, FORA equivalence, identity repair, FLOP monotonicity, family baselines."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np
import pytest
import torch

from difftune.accel.cache import CacheMaskConfig, FORAConfig
from difftune.accel.first_block_cache import FirstBlockCacheConfig
from difftune.accel.flops import component_flops
from difftune.errors import SpaceError
from difftune.models import BlockInfo
from difftune.spaces import CacheSpace, SpaceContext, get_space, recompute_rows

from .contract import SpaceContract

STEPS = 10


class TestCacheSpace(SpaceContract):
    space_name = "cache"

    @classmethod
    def make_context(cls, pipe: Any) -> SpaceContext:
        return SpaceContext.from_pipeline(pipe, num_inference_steps=STEPS, keep_pipeline=False)


@pytest.fixture(scope="module")
def context(embedded_pipe) -> SpaceContext:
    return SpaceContext.from_pipeline(embedded_pipe, num_inference_steps=20, keep_pipeline=False)


def test_groups_and_variable_count(context):
    space = get_space("cache")
    assert space.groups(context) == [(0, 3), (3, 6)]
    names = [v.name for v in space.variables(context)]
    assert len(names) == 2 * 2 + 2 * 2 + 1
    assert names[:4] == ["interval_0", "warmup_0", "cache_0_attn1", "cache_0_ff"]
    assert [len(range(*g)) for g in CacheSpace(groups=4).groups(context)] == [2, 2, 1, 1]


@pytest.mark.parametrize("k", [2, 3, 4])
def test_fora_baseline_is_foras_mask_and_a_point_of_the_space(context, k):
    space = get_space("cache")
    point = next(p for p in space.baselines(context) if p.name == f"fora_{k}")
    assert point.sections["cache"] == FORAConfig(interval=k).to_mask(context.info, 20)
    assert point.params is not None and point.params["interval_0"] == point.params["interval_1"] == k
    assert space.decode(point.params, context) == dict(point.sections)
    assert space.encode({"cache": FORAConfig(interval=k)}, context) == point.params


def test_identity_baseline_and_repair_never_yields_the_identity(context):
    space = get_space("cache")
    identity = next(p for p in space.baselines(context) if p.name == "identity")
    assert identity.sections["cache"].array.all() and identity.params is None
    off = {f"cache_{g}_{c}": False for g in range(2) for c in context.info.components}
    for params in (off, {"interval_0": 1, "interval_1": 1}, {"refresh": 1}, {"warmup_0": 10, "interval_1": 1}):
        repaired = space.repair(params, context)
        assert repaired.changes
        assert not space.decode(params, context)["cache"].array.all()
    assert not space.repair(space.default_params(context), context).changes
    with pytest.raises(SpaceError, match="identity"):
        space.encode(dict(identity.sections), context)


def test_step_zero_always_computes_and_components_left_out_always_compute(context):
    space = get_space("cache")
    rng = np.random.default_rng(3)
    for _ in range(50):
        params = space.repair(space.sample(context, rng), context).params
        mask = space.decode(params, context)["cache"].array
        assert mask[0].all()
        for g, (a, b) in enumerate(space.groups(context)):
            for k, c in enumerate(context.info.components):
                if not params[f"cache_{g}_{c}"]:
                    assert mask[:, a:b, k].all()


def test_recompute_rows():
    assert recompute_rows(8, 3, 0, 0).astype(int).tolist() == [1, 0, 0, 1, 0, 0, 1, 0]
    assert recompute_rows(8, 3, 2, 0).astype(int).tolist() == [1, 1, 0, 0, 1, 0, 0, 1]
    # After a forced refresh the interval counts again from there.
    assert recompute_rows(9, 3, 0, 4).astype(int).tolist() == [1, 0, 0, 1, 1, 0, 0, 1, 1]


def test_flop_ideal_speedup_is_monotone_in_the_interval(embedded_pipe, context):
    torch.set_num_threads(1)
    flops = component_flops(
        embedded_pipe, lambda: embedded_pipe(class_labels=[1], num_inference_steps=2, output_type="pt")
    )
    space = get_space("cache")
    top = space.max_interval(context)
    for fixed in ({}, {"warmup_0": 3, "warmup_1": 2, "refresh": 4}, {"cache_0_ff": False, "interval_1": 3}):
        speedups = []
        for k in range(1, top + 1):
            mask = space.decode({**fixed, "interval_0": k}, context)["cache"].array
            speedups.append(flops.ideal_speedup(mask))
        assert all(b >= a - 1e-12 for a, b in itertools.pairwise(speedups)), (fixed, speedups)
        assert speedups[-1] > speedups[1]


def test_encode_refuses_settings_outside_the_space(context):
    space = get_space("cache")
    with pytest.raises(SpaceError, match="FirstBlockCacheConfig"):
        space.encode({"cache": FirstBlockCacheConfig(threshold=0.1)}, context)
    mask = np.ones(context.info.mask_shape(20), dtype=bool)
    mask[5, 1, 0] = False  # one block of a group differs from the others
    with pytest.raises(SpaceError, match="not a point"):
        space.encode({"cache": CacheMaskConfig.from_array(context.info.components, mask)}, context)


def _fake_context(context: SpaceContext, family: str, kinds: list[str]) -> SpaceContext:
    blocks = tuple(BlockInfo(f"b.{i}", kind, ((f"b.{i}.x",),)) for i, kind in enumerate(kinds))
    info = dataclasses.replace(
        context.info,
        family=family,
        blocks=tuple(b.name for b in blocks),
        block_info=blocks,
        components=("x",),
        branches=(("down_blocks.0", "up_blocks.2"),) if family == "sd" else (),
    )
    return context.replace(info=info)


def test_family_specific_baselines(context):
    space = get_space("cache")
    names = {p.name for p in space.baselines(context)}
    assert {"identity", "fora_2", "fora_3", "fora_4", "first_block_cache_0.1"} <= names
    assert not any(n.startswith("deepcache") for n in names)
    unet = _fake_context(context, "sd", ["down", "down", "mid", "up", "up"])
    names = {p.name for p in space.baselines(unet)}
    assert {"deepcache_2", "deepcache_3", "deepcache_5"} <= names
    assert not any(n.startswith("first_block_cache") for n in names)
    flux = _fake_context(context, "flux", ["double"] * 3 + ["single"] * 6)
    assert "first_block_cache_0.05" in {p.name for p in space.baselines(flux)}
    assert [len(range(*g)) for g in space.groups(flux)] == [3, 3, 3]
