"""USF's U-Net skip coefficients on a tiny Stable Diffusion pipeline: scaling, order, validation, the space."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difftune.accel.solver import SolverSchedule, SolverStep, unet_skip_count
from difftune.errors import ProfileError
from difftune.spaces import SpaceContext, get_space
from tests.models.tiny_pipelines import build

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def sd():
    pipe, kwargs = build("sd")
    pipe.set_progress_bar_config(disable=True)
    return pipe, kwargs


def _schedule(pipe, steps: int, skips=None) -> SolverSchedule:
    base = SolverSchedule.from_scheduler(pipe.scheduler, steps)
    return SolverSchedule(base.timesteps, base.steps, skip_coefficients=skips)


def _images(pipe, kwargs, schedule, hook=None):
    handle = schedule.apply(pipe)
    extra = hook() if hook is not None else None
    try:
        call = {**kwargs, "num_inference_steps": schedule.num_steps, "output_type": "np"}
        call["generator"] = torch.Generator().manual_seed(0)  # the same noise every call
        return pipe(**call).images
    finally:
        handle.remove()
        if extra is not None:
            extra.remove()


def test_skip_coefficients_scale_the_skip_the_decoder_takes_in_order(sd):
    pipe, kwargs = sd
    count = unet_skip_count(pipe.unet)
    assert count == sum(len(b.resnets) for b in pipe.unet.up_blocks) > 2
    plain = _images(pipe, kwargs, _schedule(pipe, 3))
    ones = _images(pipe, kwargs, _schedule(pipe, 3, [1.0] * count))
    assert np.array_equal(plain, ones)  # multiplying by 1 is skipped: bit-identical
    for k in (0, count - 1):
        coefficients = [1.0] * count
        coefficients[k] = 0.5
        scaled = _images(pipe, kwargs, _schedule(pipe, 3, coefficients))
        assert np.abs(scaled - plain).max() > 1e-4
        # Independently: skip k is the k-th the decoder consumes; its resnet sees [hidden, skip] concatenated, so
        # halving the second part of that resnet's input is the same change.
        blocks = [(b, j) for b in pipe.unet.up_blocks for j in range(len(b.resnets))]
        block, j = blocks[k]
        resnet = block.resnets[j]
        skip_channels = resnet.conv1.in_channels - (
            block.resnets[j - 1].conv2.out_channels if j else _hidden_channels(pipe.unet, block)
        )

        def hook(resnet=resnet, skip_channels=skip_channels):
            def halve(module, args, kwargs):
                x = args[0]
                x = torch.cat([x[:, :-skip_channels], 0.5 * x[:, -skip_channels:]], dim=1)
                return (x, *args[1:]), kwargs

            return resnet.register_forward_pre_hook(halve, with_kwargs=True)

        by_hand = _images(pipe, kwargs, _schedule(pipe, 3), hook)
        np.testing.assert_allclose(scaled, by_hand, rtol=0, atol=1e-6)


def _hidden_channels(unet, block) -> int:
    """Channels entering an up block: the previous up block's output, or the mid block's for the first."""
    index = list(unet.up_blocks).index(block)
    if index == 0:
        return unet.config.block_out_channels[-1]
    return list(unet.up_blocks)[index - 1].resnets[-1].conv2.out_channels


def test_bad_skip_coefficients_are_refused(sd, embedded_pipe):
    pipe, _ = sd
    count = unet_skip_count(pipe.unet)
    schedule = _schedule(pipe, 3, [0.9] * count)
    assert SolverSchedule.from_dict(schedule.to_dict()) == schedule
    with pytest.raises(ProfileError, match=r"skip_coefficients: expected values in \[0, 1\]"):
        _schedule(pipe, 3, [1.5] * count)
    with pytest.raises(ProfileError, match=r"skip_coefficients\[0\]: expected a finite number"):
        _schedule(pipe, 3, ["a"] * count)
    with pytest.raises(ProfileError, match=f"2 coefficients, but this UNet's decoder takes {count}"):
        _schedule(pipe, 3, [0.9, 0.9]).apply(pipe)
    assert type(pipe.scheduler).__name__ != "USFScheduler"  # a refused profile leaves the pipeline as it was
    on_dit = SolverSchedule((999.0, 500.0), (SolverStep(1), SolverStep(1)), skip_coefficients=(0.9,) * count)
    with pytest.raises(ProfileError, match="has no U-Net up blocks"):
        on_dit.apply(embedded_pipe)
    assert type(embedded_pipe.scheduler).__name__ != "USFScheduler"


def test_the_solver_space_searches_skip_coefficients_of_unets_only(sd, embedded_pipe):
    pipe, _ = sd
    space = get_space("solver")
    context = SpaceContext.from_pipeline(pipe, nfe_range=(3, 5), keep_pipeline=False)
    names = [v.name for v in space.variables(context)]
    count = unet_skip_count(pipe.unet)
    assert [n for n in names if n.startswith("skip_")] == [f"skip_{k}" for k in range(count)]
    dit = SpaceContext.from_pipeline(embedded_pipe, nfe_range=(3, 5), keep_pipeline=False)
    assert not any(v.name.startswith("skip_") for v in space.variables(dit))
    params = {**space.default_params(context), "nfe": 4, "skip_0": 0.8, f"skip_{count - 1}": 0.6}
    schedule = space.decode(params, context)["solver"]
    assert schedule.skip_coefficients == (0.8,) + (1.0,) * (count - 2) + (0.6,)
    assert space.decode(space.default_params(context), context)["solver"].skip_coefficients is None
    again = space.decode(space.encode({"solver": schedule}, context), context)["solver"]
    assert again == schedule
