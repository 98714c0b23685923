"""HarmoniCa router training: exact blending at w = 1, the frozen first step, l1 sparsity, the loss, the disk cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import difftune
from difftune.accel.cache import CacheMaskConfig, apply_cache_schedule
from difftune.errors import SpaceError
from difftune.evaluators import Sample
from difftune.search import harmonica
from difftune.search.harmonica import FIRST_LOGIT, LOGIT_BOUND, RouterResult, train_router

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 5
SAMPLES = (Sample(3, 0), Sample(7, 1))


def short(pipe, tmp_path, **options) -> RouterResult:
    settings = {"iterations": 4, "lambda_every": 4, "batch_size": 2, "lr": 0.1, "l1": 1e-4, **options}
    return train_router(pipe, SAMPLES, num_inference_steps=STEPS, cache_dir=tmp_path, **settings)


def hooked(pipe) -> list[str]:
    """Modules and scheduler methods of ``pipe`` that carry an instance-level wrapper."""
    info = difftune.describe(pipe)
    denoiser = getattr(pipe, info.denoiser)
    found = [name or "denoiser" for name, m in denoiser.named_modules() if "forward" in m.__dict__]
    return found + [name for name in ("set_timesteps", "step") if name in pipe.scheduler.__dict__]


def test_blending_with_all_weights_one_reproduces_the_plain_trajectory(embedded_pipe):
    info = difftune.describe(embedded_pipe)
    run = harmonica._Runner(embedded_pipe, {"num_inference_steps": STEPS})
    plain = run(SAMPLES)
    session = harmonica._Session(embedded_pipe, info, STEPS, harmonica.TRAIN_THRESHOLD)
    try:
        session.fixed = torch.ones(info.mask_shape(STEPS))
        blended = run(SAMPLES)
        assert session.blender.store  # the hooks ran: cached outputs were blended in
    finally:
        session.remove()
    assert torch.equal(blended, plain)
    assert hooked(embedded_pipe) == []


def test_training_freezes_the_first_step_clamps_and_restores_the_pipeline(embedded_pipe, tmp_path):
    run = harmonica._Runner(embedded_pipe, {"num_inference_steps": STEPS})
    before = run(SAMPLES)
    result = short(embedded_pipe, tmp_path)
    assert result.logits.shape == (STEPS, 6, 2) and result.components == ("attn1", "ff")
    assert (result.logits[0] == FIRST_LOGIT).all()
    assert np.abs(result.logits).max() <= LOGIT_BOUND
    init = torch.randn((STEPS - 1, 6, 2), generator=torch.Generator().manual_seed(0)).numpy()
    assert not np.allclose(result.logits[1:], init)  # the other steps' routers did learn
    assert result.lambdas[0] == 0 and (result.lambdas[1:] >= 0).all() and result.lambdas[1:].sum() > 0
    assert hooked(embedded_pipe) == []
    assert torch.equal(run(SAMPLES), before)


def test_a_larger_l1_caches_more(embedded_pipe, tmp_path):
    dense = short(embedded_pipe, tmp_path, l1=1e-9)
    sparse = short(embedded_pipe, tmp_path, l1=1e-2)
    assert sparse.probabilities[1:].sum() < dense.probabilities[1:].sum()
    assert sparse.mask_array(0.5).sum() < dense.mask_array(0.5).sum()
    assert sparse.recompute_fraction(0.5) < dense.recompute_fraction(0.5)


def test_the_loss_decreases_over_iterations(embedded_pipe, tmp_path):
    result = short(embedded_pipe, tmp_path, iterations=8, lambda_every=8, l1=1e-5)
    assert len(result.losses) == 8 and np.isfinite(result.losses).all()
    assert result.losses[-2:].mean() < result.losses[:2].mean()


def test_the_same_training_loads_from_disk_without_training(embedded_pipe, tmp_path, monkeypatch):
    calls = []
    train = harmonica._train

    def counting(*args, **kwargs):
        calls.append(1)
        return train(*args, **kwargs)

    monkeypatch.setattr(harmonica, "_train", counting)
    first = short(embedded_pipe, tmp_path, iterations=2)
    again = short(embedded_pipe, tmp_path, iterations=2)
    assert len(calls) == 1 and not first.from_cache and again.from_cache
    assert again.path == first.path and first.path is not None and first.path.suffix == ".safetensors"
    assert np.array_equal(again.logits, first.logits) and np.array_equal(again.active, first.active)
    assert np.array_equal(again.losses, first.losses) and again.seconds == pytest.approx(first.seconds)
    assert again.mask(0.3) == first.mask(0.3)
    short(embedded_pipe, tmp_path, iterations=2, l1=2e-4)  # another l1: another router
    short(embedded_pipe, tmp_path, iterations=2, use_cache=False)  # asked to retrain
    assert len(calls) == 3


def test_the_mask_is_a_cache_schedule_that_applies(embedded_pipe, tmp_path):
    result = short(embedded_pipe, tmp_path, iterations=2)
    mask = result.mask(0.5)
    assert isinstance(mask, CacheMaskConfig) and mask.array.shape == (STEPS, 6, 2)
    assert mask.array[0].all()
    expected = result.probabilities > 0.5
    expected[0] = True  # step 0 always computes
    assert np.array_equal(mask.array, expected)
    handle = apply_cache_schedule(embedded_pipe, mask)
    try:
        images = embedded_pipe(class_labels=[3], num_inference_steps=STEPS, output_type="pt").images
    finally:
        handle.remove()
    assert torch.isfinite(images).all()
    with pytest.raises(SpaceError, match="threshold"):
        result.mask(1.5)


@pytest.mark.parametrize(
    ("option", "value"),
    [("l1", -1.0), ("lr", 0.0), ("iterations", 0), ("num_inference_steps", 1), ("batch_size", 1.5)],
)
def test_bad_arguments_name_the_argument(embedded_pipe, tmp_path, option, value):
    settings = {"num_inference_steps": STEPS, "l1": 1e-4, "cache_dir": tmp_path, option: value}
    with pytest.raises(SpaceError, match=option):
        train_router(embedded_pipe, SAMPLES, **settings)
