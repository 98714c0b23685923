"""Δ-DiT: which blocks run on cached steps, the deviation arithmetic, separate caches per denoiser call,
exact FLOP savings, refusal of other families, reversibility, config round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import difftune
from difftune.accel._registry import config_from_dict
from difftune.accel.cache import CachePolicy
from difftune.accel.delta_dit import DeltaDiTConfig
from difftune.accel.flops import count_flops
from tests.models.tiny_pipelines import build, torch_threads

STEPS = 6
DEPTH = 6  # the embedded model's blocks


def _run(pipe, steps=STEPS):
    with torch_threads(1):
        return pipe(
            class_labels=[1, 4, 7],
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images


def test_interval_one_is_bit_identical_and_remove_restores(embedded_pipe):
    base = _run(embedded_pipe)
    handle = DeltaDiTConfig(interval=1, switch_step=3, num_cached_blocks=2).apply(embedded_pipe)
    assert torch.equal(_run(embedded_pipe), base)
    handle.remove()
    handle = DeltaDiTConfig(interval=2, switch_step=3, num_cached_blocks=2).apply(embedded_pipe)
    cached = _run(embedded_pipe)
    handle.remove()
    assert not torch.equal(cached, base)
    assert torch.equal(_run(embedded_pipe), base)
    for module in embedded_pipe.transformer.modules():
        assert "forward" not in module.__dict__
    assert "set_timesteps" not in embedded_pipe.scheduler.__dict__


def test_rear_blocks_are_skipped_before_the_switch_and_front_blocks_after(embedded_pipe):
    """Interval 2 over 6 steps: full steps 0, 2, 4. Step 1 (< b = 3) skips the rear blocks 4-5, steps 3 and
    5 skip the front blocks 0-1. A hook on a child fires only when the block really runs."""
    blocks = embedded_pipe.transformer.transformer_blocks
    counts = [0] * DEPTH
    hooks = []
    for i, block in enumerate(blocks):
        hooks.append(block.ff.net[0].register_forward_hook(lambda m, a, out, i=i: counts.__setitem__(i, counts[i] + 1)))
    inputs: dict[int, list[torch.Tensor]] = {0: [], 4: []}
    outputs: dict[int, list[torch.Tensor]] = {1: [], 5: []}
    for i in inputs:
        hooks.append(blocks[i].register_forward_pre_hook(lambda m, args, i=i: inputs[i].append(args[0])))
    for i in outputs:
        hooks.append(blocks[i].register_forward_hook(lambda m, a, out, i=i: outputs[i].append(out)))
    handle = DeltaDiTConfig(interval=2, switch_step=3, num_cached_blocks=2).apply(embedded_pipe)
    try:
        _run(embedded_pipe)
    finally:
        handle.remove()
        for hook in hooks:
            hook.remove()
    assert counts == [4, 4, 6, 6, 5, 5]
    # The skipped range outputs this step's input plus the deviation (output − input) of the last full step.
    assert torch.equal(outputs[5][1], inputs[4][1] + (outputs[5][0] - inputs[4][0]))
    assert torch.equal(outputs[1][3], inputs[0][3] + (outputs[1][2] - inputs[0][2]))
    assert torch.equal(outputs[1][5], inputs[0][5] + (outputs[1][4] - inputs[0][4]))
    assert not torch.equal(outputs[1][3], outputs[1][2])  # the fresh input still flows through


def test_saved_flops_are_exactly_the_skipped_blocks(embedded_pipe):
    with torch_threads(1), FlopCounterMode(display=False) as counter:
        _run(embedded_pipe)
    prefix = type(embedded_pipe.transformer).__name__
    per_block = [sum(counter.get_flop_counts()[f"{prefix}.transformer_blocks.{i}"].values()) for i in range(DEPTH)]
    full = int(counter.get_total_flops())
    handle = DeltaDiTConfig(interval=3, switch_step=2, num_cached_blocks=3).apply(embedded_pipe)
    reduced = count_flops(lambda: _run(embedded_pipe))
    handle.remove()
    # full steps 0 and 3; step 1 skips blocks 3-5, steps 2, 4, 5 skip blocks 0-2 (one call per step)
    skipped = (sum(per_block[3:]) + 3 * sum(per_block[:3])) // STEPS
    assert reduced == full - skipped


def test_two_calls_per_step_keep_separate_caches(embedded_pipe):
    """Run the transformer by hand as a pipeline making two calls per step: each call's outputs must equal
    those of a run with that call alone, i.e. the deviations never mix."""
    transformer, scheduler = embedded_pipe.transformer, embedded_pipe.scheduler
    generator = torch.Generator().manual_seed(1)
    streams = [(torch.randn(2, 1, 16, 16, generator=generator), torch.tensor([d, d + 1])) for d in (2, 6)]

    def denoise(which):
        scheduler.set_timesteps(STEPS)
        xs = {i: streams[i][0] for i in which}
        outs: dict[int, list[torch.Tensor]] = {i: [] for i in which}
        with torch_threads(1), torch.no_grad():
            for t in scheduler.timesteps:
                for i in which:
                    eps = transformer(xs[i], timestep=t.reshape(1).expand(2), class_labels=streams[i][1]).sample
                    outs[i].append(eps)
                    xs[i] = xs[i] - 0.1 * eps
        return outs

    plain = denoise([0, 1])
    handle = DeltaDiTConfig(interval=2, switch_step=3, num_cached_blocks=3).apply(embedded_pipe)
    try:
        both, alone = denoise([0, 1]), {**denoise([0]), **denoise([1])}
    finally:
        handle.remove()
    for i in (0, 1):
        for step in range(STEPS):
            assert torch.equal(both[i][step], alone[i][step])
        assert not torch.equal(both[i][1], plain[i][1])


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_runs_on_tiny_dit_and_pixart(family):
    with torch_threads(1):
        pipe, kwargs = build(family)
    kwargs["num_inference_steps"] = 4

    def run():
        with torch_threads(1):
            return pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)}).images

    base = run()
    handle = DeltaDiTConfig(interval=1, switch_step=2, num_cached_blocks=1).apply(pipe)
    np.testing.assert_array_equal(run(), base)
    handle.remove()
    handle = DeltaDiTConfig(interval=2, switch_step=2, num_cached_blocks=1).apply(pipe)
    cached = run()
    reduced = count_flops(run)
    handle.remove()
    assert not np.array_equal(cached, base)
    assert reduced < count_flops(run)
    np.testing.assert_array_equal(run(), base)


@pytest.mark.parametrize("family", ["flux", "sd"])
def test_other_families_are_refused(family):
    with torch_threads(1):
        pipe, _ = build(family)
    with pytest.raises(difftune.ProfileError, match=f"{family} family"):
        DeltaDiTConfig(num_cached_blocks=1).apply(pipe)
    denoiser = getattr(pipe, difftune.describe(pipe).denoiser)
    assert all("forward" not in m.__dict__ for m in denoiser.modules())


def test_too_many_cached_blocks_is_refused(embedded_pipe):
    with pytest.raises(difftune.ProfileError, match=r"cache\.num_cached_blocks: this embedded model has 6 blocks"):
        DeltaDiTConfig(num_cached_blocks=7).apply(embedded_pipe)


def test_config_round_trips_through_json():
    for config in (DeltaDiTConfig(), DeltaDiTConfig(interval=3, switch_step=0, num_cached_blocks=21)):
        data = json.loads(json.dumps(config.to_dict()))
        assert data["policy"] == "delta_dit"
        assert CachePolicy.from_dict(data) == config
        assert config_from_dict("cache", data) == config


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"interval": 0}, "cache.interval: must be >= 1"),
        ({"switch_step": -1}, "cache.switch_step: must be >= 0"),
        ({"num_cached_blocks": 0}, "cache.num_cached_blocks: must be >= 1"),
        ({"num_cached_blocks": 1.5}, "cache.num_cached_blocks: expected an integer"),
        ({"b": 3}, "unknown key"),
    ],
)
def test_malformed_fields_are_named(fields, message):
    with pytest.raises(difftune.ProfileError, match=message):
        CachePolicy.from_dict({"kind": "policy", "policy": "delta_dit", **fields})
