"""TaylorSeer: the refresh schedule, hand-derived forecasts, order 0 = FORA, equality with diffusers'
apply_taylorseer_cache (embedded DiT, Flux with two calls per step), UNets, reversibility, config round trip."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache
from diffusers.hooks.hooks import CacheContext, _set_cache_context

import difftune
from difftune.accel._registry import config_from_dict
from difftune.accel.cache import CachePolicy, FORAConfig, apply_cache_schedule
from difftune.accel.flops import count_flops
from difftune.accel.taylorseer import TaylorSeerConfig
from tests.models.tiny_pipelines import build, torch_threads

STEPS = 6


def _run(pipe, steps=STEPS):
    with torch_threads(1):
        return pipe(
            class_labels=[1, 4, 7],
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images


def _component_patterns(pipe):
    info = difftune.describe(pipe)
    return [re.escape(path) for block in info.block_info for paths in block.components for path in paths]


def test_schedule_is_warmup_then_every_interval_from_the_last_warmup_step():
    def full(config, n=12):
        return [s for s in range(n) if config.is_full_step(s)]

    assert full(TaylorSeerConfig(interval=4, order=2, warmup=3)) == [0, 1, 2, 6, 10]
    assert full(TaylorSeerConfig(interval=3, order=1, warmup=1)) == [0, 3, 6, 9]  # FORA's steps
    assert full(TaylorSeerConfig(interval=1, order=2, warmup=1)) == list(range(12))


def test_interval_one_is_bit_identical_and_remove_restores(embedded_pipe):
    base = _run(embedded_pipe)
    handle = TaylorSeerConfig(interval=1, order=2, warmup=1).apply(embedded_pipe)
    assert torch.equal(_run(embedded_pipe), base)
    handle.remove()
    handle = TaylorSeerConfig(interval=2, order=1, warmup=1).apply(embedded_pipe)
    cached = _run(embedded_pipe)
    handle.remove()
    assert not torch.equal(cached, base)
    assert torch.equal(_run(embedded_pipe), base)
    for module in embedded_pipe.transformer.modules():
        assert "forward" not in module.__dict__
    assert "set_timesteps" not in embedded_pipe.scheduler.__dict__


@pytest.mark.parametrize("interval", [2, 3])
def test_order_zero_equals_the_fora_mask(embedded_pipe, interval):
    info = difftune.describe(embedded_pipe)
    handle = TaylorSeerConfig(interval=interval, order=0, warmup=1).apply(embedded_pipe)
    taylor = _run(embedded_pipe)
    handle.remove()
    handle = apply_cache_schedule(embedded_pipe, FORAConfig(interval).to_mask(info, STEPS))
    fora = _run(embedded_pipe)
    handle.remove()
    assert torch.equal(taylor, fora)


def test_forecast_is_the_hand_derived_taylor_expansion(embedded_pipe):
    """Interval 3, order 1, warm-up 1 over 6 steps: full steps 0 and 3. Steps 1-2 have one full step of
    history and reuse y0; steps 4-5 extrapolate linearly: y3 + (y3 − y0)/3 · (s − 3)."""
    module = embedded_pipe.transformer.transformer_blocks[2].ff
    ran, returned = [], []
    hooks = [
        module.net[0].register_forward_hook(lambda m, a, out: ran.append(1)),
        module.register_forward_hook(lambda m, a, out: returned.append(out)),
    ]
    handle = TaylorSeerConfig(interval=3, order=1, warmup=1).apply(embedded_pipe)
    try:
        _run(embedded_pipe)
    finally:
        handle.remove()
        for hook in hooks:
            hook.remove()
    assert len(ran) == 2 and len(returned) == STEPS
    y0, y3 = returned[0], returned[3]
    assert returned[1] is y0 and returned[2] is y0
    slope = (y3 - y0) / 3
    for step in (4, 5):
        assert torch.equal(returned[step], y3 + slope * (step - 3))
    assert not torch.equal(returned[4], y3)


@pytest.mark.parametrize("order,warmup", [(1, 2), (2, 2), (2, 3)])
def test_equals_diffusers_taylorseer_on_the_embedded_dit(embedded_pipe, order, warmup):
    """With interval 2 the reference schedule and diffusers' (which counts from warm-up + 1) coincide."""
    base = _run(embedded_pipe)
    handle = TaylorSeerConfig(interval=2, order=order, warmup=warmup).apply(embedded_pipe)
    ours = _run(embedded_pipe)
    handle.remove()

    reference = copy.deepcopy(embedded_pipe)  # diffusers' hooks are installed on a copy, never removed
    transformer = reference.transformer
    config = TaylorSeerCacheConfig(
        cache_interval=2,
        disable_cache_before_step=warmup,
        max_order=order,
        taylor_factors_dtype=torch.float32,
        cache_identifiers=_component_patterns(embedded_pipe),
    )
    apply_taylorseer_cache(transformer, config)
    inner = transformer.forward

    def in_context(*args, **kwargs):  # what diffusers' own pipelines do with `cache_context("cond")`
        _set_cache_context(transformer, CacheContext("cond"))
        try:
            return inner(*args, **kwargs)
        finally:
            _set_cache_context(transformer, None)

    transformer.forward = in_context
    theirs = _run(reference)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, base)


def test_equals_diffusers_on_flux_with_two_calls_per_step():
    """Tiny Flux with true CFG: diffusers keys its state by cache_context name, difftune by call index."""
    with torch_threads(1):
        pipe, kwargs = build("flux")
    kwargs["num_inference_steps"] = 6

    def run():
        with torch_threads(1):
            return pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)}).images

    base = run()
    handle = TaylorSeerConfig(interval=2, order=2, warmup=2).apply(pipe)
    ours = run()
    reduced = count_flops(run)
    handle.remove()
    pipe.transformer.enable_cache(
        TaylorSeerCacheConfig(
            cache_interval=2,
            disable_cache_before_step=2,
            max_order=2,
            taylor_factors_dtype=torch.float32,
            cache_identifiers=_component_patterns(pipe),
        )
    )
    try:
        theirs = run()
    finally:
        pipe.transformer.disable_cache()
    np.testing.assert_array_equal(ours, theirs)
    assert not np.array_equal(ours, base)
    assert reduced < count_flops(run)
    np.testing.assert_array_equal(run(), base)


@pytest.mark.parametrize("family", ["sd", "pixart"])
def test_runs_on_unets_and_pixart_with_fewer_flops(family):
    with torch_threads(1):
        pipe, kwargs = build(family)
    kwargs["num_inference_steps"] = 5

    def run():
        with torch_threads(1):
            return pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)}).images

    base = run()
    handle = TaylorSeerConfig(interval=2, order=1, warmup=1).apply(pipe)
    cached = run()
    reduced = count_flops(run)
    handle.remove()
    assert not np.array_equal(cached, base)
    assert reduced < count_flops(run)
    np.testing.assert_array_equal(run(), base)
    denoiser = getattr(pipe, difftune.describe(pipe).denoiser)
    assert all("forward" not in m.__dict__ for m in denoiser.modules())


def test_config_round_trips_through_json():
    for config in (TaylorSeerConfig(), TaylorSeerConfig(interval=3, order=0, warmup=1)):
        data = json.loads(json.dumps(config.to_dict()))
        assert data["policy"] == "taylorseer"
        assert CachePolicy.from_dict(data) == config
        assert config_from_dict("cache", data) == config


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"interval": 0}, "cache.interval: must be >= 1"),
        ({"order": -1}, "cache.order: must be >= 0"),
        ({"order": 1.0}, "cache.order: expected an integer"),
        ({"warmup": 0}, "cache.warmup: must be >= 1"),
        ({"max_order": 2}, "unknown key"),
    ],
)
def test_malformed_fields_are_named(fields, message):
    with pytest.raises(difftune.ProfileError, match=message):
        CachePolicy.from_dict({"kind": "policy", "policy": "taylorseer", **fields})
