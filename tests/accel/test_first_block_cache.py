"""First Block Cache: equal decisions and images to diffusers' apply_first_block_cache (embedded DiT, Flux with
two calls per step), the residual arithmetic, SD3's text-less last block, refusal of UNets, config round trip."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig as DiffusersFBC
from diffusers.hooks import apply_first_block_cache
from diffusers.hooks.hooks import CacheContext, _set_cache_context

import difftune
from difftune.accel._registry import config_from_dict
from difftune.accel.cache import CachePolicy
from difftune.accel.first_block_cache import FirstBlockCacheConfig
from difftune.accel.flops import count_flops
from tests.models.tiny_pipelines import build, torch_threads

STEPS = 10


def _run(pipe, steps=STEPS):
    with torch_threads(1):
        return pipe(
            class_labels=[1, 4, 7],
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images


def _runs_of_block_1(transformer):
    """The denoiser calls (0, 1, …) in which block 1 really runs (a hook on a child fires only then)."""
    calls: list[int] = []
    ran: list[int] = []
    hooks = [
        transformer.register_forward_pre_hook(lambda m, a: calls.append(len(calls))),
        transformer.transformer_blocks[1].ff.net[0].register_forward_hook(lambda m, a, out: ran.append(calls[-1])),
    ]
    return ran, hooks


def test_threshold_zero_is_bit_identical_and_remove_restores(embedded_pipe):
    base = _run(embedded_pipe)
    handle = FirstBlockCacheConfig(threshold=0.0).apply(embedded_pipe)
    assert torch.equal(_run(embedded_pipe), base)
    handle.remove()
    handle = FirstBlockCacheConfig(threshold=0.2).apply(embedded_pipe)
    cached = _run(embedded_pipe)
    handle.remove()
    assert not torch.equal(cached, base)
    assert torch.equal(_run(embedded_pipe), base)
    for module in embedded_pipe.transformer.modules():
        assert "forward" not in module.__dict__
    assert "set_timesteps" not in embedded_pipe.scheduler.__dict__


@pytest.mark.parametrize("threshold", [0.1, 0.3])
def test_equals_diffusers_first_block_cache_on_the_embedded_dit(embedded_pipe, threshold):
    ran, hooks = _runs_of_block_1(embedded_pipe.transformer)
    handle = FirstBlockCacheConfig(threshold=threshold).apply(embedded_pipe)
    try:
        ours = _run(embedded_pipe)
    finally:
        handle.remove()
        for hook in hooks:
            hook.remove()

    reference = copy.deepcopy(embedded_pipe)  # diffusers' hooks are installed on a copy, never removed
    transformer = reference.transformer
    ran_reference, _ = _runs_of_block_1(transformer)
    apply_first_block_cache(transformer, DiffusersFBC(threshold=threshold))
    inner = transformer.forward

    def in_context(*args, **kwargs):  # what diffusers' own pipelines do with `cache_context("cond")`
        _set_cache_context(transformer, CacheContext("cond"))
        try:
            return inner(*args, **kwargs)
        finally:
            _set_cache_context(transformer, None)

    transformer.forward = in_context
    theirs = _run(reference)
    assert 1 < len(ran) < STEPS  # some steps skipped, some recomputed
    assert ran == ran_reference
    assert torch.equal(ours, theirs)


def test_equals_diffusers_on_flux_with_two_calls_per_step():
    """Tiny Flux with true CFG runs cond and uncond as two calls per step; diffusers keys its state by the
    pipeline's cache_context names, difftune by the call index: decisions and images must agree."""
    with torch_threads(1):
        pipe, kwargs = build("flux")
    kwargs["num_inference_steps"] = 6

    def run():
        with torch_threads(1):
            return pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)}).images

    base = run()
    ran, hooks = _runs_of_block_1(pipe.transformer)
    handle = FirstBlockCacheConfig(threshold=0.5).apply(pipe)
    try:
        ours = run()
    finally:
        for hook in hooks:
            hook.remove()
    ours_again = run()
    handle.remove()
    ran_reference, hooks = _runs_of_block_1(pipe.transformer)
    pipe.transformer.enable_cache(DiffusersFBC(threshold=0.5))
    try:
        theirs = run()
    finally:
        pipe.transformer.disable_cache()
        for hook in hooks:
            hook.remove()
    # both calls compute at step 0; later the cond and uncond calls of a step decide differently
    assert ran[:2] == [0, 1] and 2 < len(ran) < 12 and any(c % 2 == 0 and c + 1 not in ran for c in ran)
    assert ran == ran_reference
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(ours, ours_again)  # a new run starts from an empty cache
    assert not np.array_equal(ours, base)


def test_skipped_steps_add_the_cached_residual_to_the_first_block_output(embedded_pipe):
    """With an unreachable threshold every step after the first reuses step 0's residual: the last block
    returns first-block output + (final output − first-block output at step 0); blocks 1-5 run once."""
    blocks = embedded_pipe.transformer.transformer_blocks
    counts = [0] * len(blocks)
    hooks = [
        block.ff.net[0].register_forward_hook(lambda m, a, out, i=i: counts.__setitem__(i, counts[i] + 1))
        for i, block in enumerate(blocks)
    ]
    first_inputs: list[tuple[tuple, dict]] = []
    last: list[torch.Tensor] = []
    hooks.append(blocks[0].register_forward_pre_hook(lambda m, a, k: first_inputs.append((a, k)), with_kwargs=True))
    hooks.append(blocks[-1].register_forward_hook(lambda m, a, out: last.append(out)))
    handle = FirstBlockCacheConfig(threshold=1e9).apply(embedded_pipe)
    try:
        cached_flops = count_flops(lambda: _run(embedded_pipe, steps=4))
    finally:
        handle.remove()
        for hook in hooks:
            hook.remove()
    assert counts == [4, 1, 1, 1, 1, 1]
    with torch.no_grad(), torch_threads(1):
        heads = [blocks[0](*args, **kwargs) for args, kwargs in first_inputs]  # block 0's real outputs
    for step in range(1, 4):
        assert torch.equal(last[step], heads[step] + (last[0] - heads[0]))
    assert cached_flops < count_flops(lambda: _run(embedded_pipe, steps=4))


def test_sd3_last_block_without_text_stream_is_supported():
    with torch_threads(1):
        pipe, kwargs = build("sd3")
    kwargs["num_inference_steps"] = 4

    def run():
        with torch_threads(1):
            return pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)}).images

    base = run()
    handle = FirstBlockCacheConfig(threshold=0.0).apply(pipe)
    np.testing.assert_array_equal(run(), base)
    handle.remove()
    handle = FirstBlockCacheConfig(threshold=1e9).apply(pipe)
    cached = run()
    reduced = count_flops(run)
    handle.remove()
    assert not np.array_equal(cached, base)
    assert reduced < count_flops(run)
    np.testing.assert_array_equal(run(), base)


def test_unets_are_refused():
    with torch_threads(1):
        pipe, _ = build("sd")
    with pytest.raises(difftune.ProfileError, match="sd family"):
        FirstBlockCacheConfig().apply(pipe)
    assert all("forward" not in m.__dict__ for m in pipe.unet.modules())


def test_config_round_trips_through_json():
    for config in (FirstBlockCacheConfig(), FirstBlockCacheConfig(threshold=0.17)):
        data = json.loads(json.dumps(config.to_dict()))
        assert data == {"kind": "policy", "policy": "first_block_cache", "threshold": config.threshold}
        assert CachePolicy.from_dict(data) == config
        assert config_from_dict("cache", data) == config


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"threshold": -0.1}, "cache.threshold: must be >= 0"),
        ({"threshold": "high"}, "cache.threshold: expected a finite number"),
        ({"threshold": float("nan")}, "cache.threshold: expected a finite number"),
        ({"treshold": 0.1}, "unknown key"),
    ],
)
def test_malformed_fields_are_named(fields, message):
    with pytest.raises(difftune.ProfileError, match=message):
        CachePolicy.from_dict({"kind": "policy", "policy": "first_block_cache", **fields})
