"""DeepCache: which UNet modules really run on cached steps, equality with the equivalent cache mask,
the reference's non-uniform schedule, separate caches per denoiser call, reversibility, FLOPs, config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import difftune
from difftune.accel._registry import config_from_dict
from difftune.accel.cache import CacheMaskConfig, CachePolicy, apply_cache_schedule
from difftune.accel.deepcache import DeepCacheConfig, nonuniform_full_steps
from difftune.accel.flops import count_flops
from tests.models.tiny_pipelines import build, torch_threads

STEPS = 4


@pytest.fixture(scope="module")
def sd():
    with torch_threads(1):
        pipe, kwargs = build("sd")
    return pipe, {**kwargs, "num_inference_steps": STEPS}


def _run(pipe, kwargs, **overrides):
    with torch_threads(1):
        return pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0), **overrides}).images


def _count_runs(unet, paths):
    """Forward hooks on children: they fire only when the module's own forward really runs."""
    counts = dict.fromkeys(paths, 0)
    hooks = []
    for path in paths:

        def hook(module, args, out, path=path):
            counts[path] += 1

        hooks.append(unet.get_submodule(path).register_forward_hook(hook))
    return counts, hooks


def test_interval_one_is_bit_identical_and_remove_restores(sd):
    pipe, kwargs = sd
    base = _run(pipe, kwargs)
    handle = DeepCacheConfig(interval=1, branch=0, layer=0).apply(pipe)
    np.testing.assert_array_equal(_run(pipe, kwargs), base)
    handle.remove()
    handle = DeepCacheConfig(interval=2, branch=0, layer=0).apply(pipe)
    cached = _run(pipe, kwargs)
    handle.remove()
    assert not np.array_equal(cached, base)
    np.testing.assert_array_equal(_run(pipe, kwargs), base)
    for module in pipe.unet.modules():
        assert "forward" not in module.__dict__
    assert "set_timesteps" not in pipe.scheduler.__dict__


# Tiny SD: down blocks 0-2 have 2 resnets (+ downsampler for 0, 1); up blocks have 3 resnets; branch 0 pairs
# down_blocks.0 with up_blocks.2 (CrossAttnUpBlock2D). Up layer idx has r = 2 - idx. Interval 2 over 4 steps:
# full steps 0 and 2, so a cached module runs 2 times and a fresh one 4 times.
@pytest.mark.parametrize(
    "layer,expected",
    [
        (
            0,  # only up layer r = 0 (idx 2) is fresh; the whole down block 0 is reused
            {
                "conv_in": 4,
                "down_blocks.0.resnets.0.conv1": 2,
                "down_blocks.0.downsamplers.0.conv": 2,
                "down_blocks.1.resnets.0.conv1": 2,
                "mid_block.resnets.0.conv1": 2,
                "up_blocks.0.resnets.0.conv1": 2,
                "up_blocks.1.attentions.0.proj_in": 2,
                "up_blocks.2.resnets.0.conv1": 2,
                "up_blocks.2.resnets.1.conv1": 2,
                "up_blocks.2.attentions.1.proj_in": 2,
                "up_blocks.2.resnets.2.conv1": 4,
                "up_blocks.2.attentions.2.proj_in": 4,
            },
        ),
        (
            1,  # down layer 0 feeds up layer r = 1: both fresh
            {
                "down_blocks.0.resnets.0.conv1": 4,
                "down_blocks.0.attentions.0.proj_in": 4,
                "down_blocks.0.resnets.1.conv1": 2,
                "down_blocks.0.downsamplers.0.conv": 2,
                "up_blocks.2.resnets.0.conv1": 2,
                "up_blocks.2.resnets.1.conv1": 4,
                "up_blocks.2.attentions.1.proj_in": 4,
                "up_blocks.2.resnets.2.conv1": 4,
            },
        ),
        (
            None,  # the whole pair runs; only its downsampler (which feeds deeper levels only) is reused
            {
                "down_blocks.0.resnets.1.conv1": 4,
                "down_blocks.0.downsamplers.0.conv": 2,
                "down_blocks.1.resnets.0.conv1": 2,
                "up_blocks.1.resnets.2.conv1": 2,
                "up_blocks.2.resnets.0.conv1": 4,
                "up_blocks.2.attentions.0.proj_in": 4,
            },
        ),
    ],
)
def test_cached_steps_run_only_the_shallow_branch(sd, layer, expected):
    pipe, kwargs = sd
    counts, hooks = _count_runs(pipe.unet, expected)
    returned = []
    hooks.append(pipe.unet.mid_block.register_forward_hook(lambda m, a, out: returned.append(out)))
    handle = DeepCacheConfig(interval=2, branch=0, layer=layer).apply(pipe)
    try:
        _run(pipe, kwargs)
    finally:
        handle.remove()
        for hook in hooks:
            hook.remove()
    assert counts == expected
    # a cached step returns the very tensor of the last full step
    assert returned[1] is returned[0] and returned[3] is returned[2] and returned[2] is not returned[0]


def test_whole_branch_equals_the_mask_that_reuses_the_deeper_blocks(sd):
    """Branch 1 run whole = reuse every component of down_blocks.2, mid_block and up_blocks.0 at odd steps;
    DeepCache also skips the modules outside the mask slots (down_blocks.1's downsampler, up_blocks.0's
    upsampler), whose outputs only feed reused modules: same images, fewer FLOPs."""
    pipe, kwargs = sd
    info = difftune.describe(pipe)
    mask = np.ones(info.mask_shape(STEPS), dtype=bool)
    for name in ("down_blocks.2", "mid_block", "up_blocks.0"):
        mask[1::2, info.blocks.index(name)] = False
    handle = apply_cache_schedule(pipe, CacheMaskConfig.from_array(info.components, mask))
    masked = _run(pipe, kwargs)
    mask_flops = count_flops(lambda: _run(pipe, kwargs))
    handle.remove()
    handle = DeepCacheConfig(interval=2, branch=1).apply(pipe)
    deep = _run(pipe, kwargs)
    deep_flops = count_flops(lambda: _run(pipe, kwargs))
    handle.remove()
    full = count_flops(lambda: _run(pipe, kwargs))
    np.testing.assert_array_equal(deep, masked)
    assert deep_flops < mask_flops < full


def test_shallower_branches_and_layers_execute_fewer_flops(sd):
    pipe, kwargs = sd
    flops = {}
    for branch, layer in [(0, 0), (0, 1), (0, None), (1, None), (2, None)]:
        handle = DeepCacheConfig(interval=2, branch=branch, layer=layer).apply(pipe)
        flops[branch, layer] = count_flops(lambda: _run(pipe, kwargs))
        handle.remove()
    full = count_flops(lambda: _run(pipe, kwargs))
    order = [flops[0, 0], flops[0, 1], flops[0, None], flops[1, None], flops[2, None], full]
    assert order == sorted(order) and len(set(order)) == len(order)


def test_nonuniform_schedule_reproduces_the_reference():
    # Values of DeepCache's sample_from_quad_center(num_steps, ceil(num_steps / interval), center, pow),
    # including the real part of its complex power of the negative end point.
    assert nonuniform_full_steps(50, 5, center=15, power=1.4) == [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]
    assert nonuniform_full_steps(10, 2, center=4, power=1.4) == [0, 2, 4, 5, 7]
    assert nonuniform_full_steps(8, 1, center=3, power=1.4) == list(range(8))
    with pytest.raises(difftune.ProfileError, match=r"cache\.center"):
        nonuniform_full_steps(6, 2, center=3, power=1.4)


def test_nonuniform_mode_refreshes_on_the_reference_steps(sd):
    pipe, kwargs = sd
    steps = nonuniform_full_steps(8, 2, center=3, power=1.4)
    assert steps == [0, 2, 3, 5]
    counts, hooks = _count_runs(pipe.unet, ["mid_block.resnets.0.conv1", "conv_in"])
    handle = DeepCacheConfig(interval=2, branch=0, skip_mode="non-uniform", center=3, power=1.4).apply(pipe)
    try:
        _run(pipe, kwargs, num_inference_steps=8)
    finally:
        handle.remove()
        for hook in hooks:
            hook.remove()
    assert counts == {"mid_block.resnets.0.conv1": len(steps), "conv_in": 8}


def test_two_calls_per_step_keep_separate_caches(sd):
    """Run the UNet by hand as a pipeline making two calls per step (cond, then uncond): each call's
    outputs must equal those of a run with that call alone, i.e. the caches never mix."""
    pipe, _ = sd
    unet, scheduler = pipe.unet, pipe.scheduler
    generator = torch.Generator().manual_seed(1)
    streams = [
        (torch.randn(1, 4, 16, 16, generator=generator), torch.randn(1, 8, 32, generator=generator)) for _ in range(2)
    ]

    def denoise(which):
        scheduler.set_timesteps(STEPS)
        xs = {i: streams[i][0] for i in which}
        outs: dict[int, list[torch.Tensor]] = {i: [] for i in which}
        with torch_threads(1), torch.no_grad():
            for t in scheduler.timesteps:
                for i in which:
                    eps = unet(xs[i], t, encoder_hidden_states=streams[i][1]).sample
                    outs[i].append(eps)
                    xs[i] = xs[i] - 0.1 * eps
        return outs

    plain = denoise([0, 1])
    handle = DeepCacheConfig(interval=2, branch=0, layer=0).apply(pipe)
    try:
        both, alone = denoise([0, 1]), {**denoise([0]), **denoise([1])}
    finally:
        handle.remove()
    for i in (0, 1):
        for step in range(STEPS):
            assert torch.equal(both[i][step], alone[i][step])
        assert not torch.equal(both[i][1], plain[i][1])  # step 1 really reused features
    assert not torch.equal(both[0][1], both[1][1])


def test_runs_on_sdxl_with_fewer_flops():
    with torch_threads(1):
        pipe, kwargs = build("sdxl")
    base = _run(pipe, kwargs)
    handle = DeepCacheConfig(interval=2, branch=0, layer=0).apply(pipe)
    cached = _run(pipe, kwargs)
    reduced = count_flops(lambda: _run(pipe, kwargs))
    handle.remove()
    assert reduced < count_flops(lambda: _run(pipe, kwargs))
    assert not np.array_equal(cached, base)
    np.testing.assert_array_equal(_run(pipe, kwargs), base)


def test_non_unet_models_and_bad_branches_are_refused(sd, embedded_pipe):
    with pytest.raises(difftune.ProfileError, match="family embedded"):
        DeepCacheConfig().apply(embedded_pipe)
    assert all("forward" not in m.__dict__ for m in embedded_pipe.transformer.modules())
    pipe, _ = sd
    with pytest.raises(difftune.ProfileError, match=r"cache.branch: .* 3 skip branches"):
        DeepCacheConfig(branch=3).apply(pipe)
    with pytest.raises(difftune.ProfileError, match=r"cache.layer: .* 3 layers"):
        DeepCacheConfig(branch=0, layer=3).apply(pipe)


def test_config_round_trips_through_json():
    for config in (DeepCacheConfig(), DeepCacheConfig(interval=5, branch=1, layer=2, skip_mode="non-uniform")):
        data = json.loads(json.dumps(config.to_dict()))
        assert data["policy"] == "deepcache"
        assert CachePolicy.from_dict(data) == config
        assert config_from_dict("cache", data) == config


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"interval": 0}, "cache.interval: must be >= 1"),
        ({"branch": -1}, "cache.branch: must be >= 0"),
        ({"layer": "deep"}, "cache.layer: expected an integer"),
        ({"skip_mode": "quadratic"}, "cache.skip_mode: 'quadratic' is not one of"),
        ({"power": 1.0}, "cache.power: must be > 1"),
        ({"center": 2.5}, "cache.center: expected an integer"),
        ({"brnach": 1}, "unknown key"),
    ],
)
def test_malformed_fields_are_named(fields, message):
    with pytest.raises(difftune.ProfileError, match=message):
        CachePolicy.from_dict({"kind": "policy", "policy": "deepcache", **fields})
