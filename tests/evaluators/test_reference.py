"""The reference cache: computed once, then loaded without running the pipeline; keyed by model and setting."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

import difftune
from difftune.evaluators import (
    CalibrationSet,
    DenoiserCalls,
    Reference,
    ReferenceCache,
    ReferenceSetting,
    default_cache_dir,
)

STEPS = 4


@pytest.fixture
def cache(tmp_path):
    return ReferenceCache(tmp_path / "refs")


def _calls(reference: Reference, samples) -> tuple[int, torch.Tensor]:
    with DenoiserCalls(reference.pipe.transformer) as calls:
        images = reference.images(samples)
    return calls.calls, images


def test_second_request_does_not_run_the_pipeline(embedded_pipe, cache):
    samples = CalibrationSet(labels=range(10), seeds=1)[:6]
    ref = Reference.from_pipeline(embedded_pipe, cache=cache, batch_size=4, num_inference_steps=STEPS)
    n_first, first = _calls(ref, samples[:4])
    assert n_first == STEPS and first.shape == (4, 1, 16, 16)
    n_again, again = _calls(ref, samples[:4])
    assert n_again == 0 and torch.equal(again, first)
    # a larger rung computes only the new samples, in one batch
    n_more, more = _calls(ref, samples)
    assert n_more == STEPS and torch.equal(more[:4], first)
    # a new Reference object on the same cache (another process, the next night) hits it too
    fresh = Reference.from_pipeline(embedded_pipe, cache=cache, num_inference_steps=STEPS)
    assert _calls(fresh, samples)[0] == 0 and fresh.pipeline_calls == 0


def test_another_setting_or_model_misses_the_cache(embedded_pipe, cache):
    samples = CalibrationSet(labels=[1, 2], seeds=1)[:2]
    ref = Reference.from_pipeline(embedded_pipe, cache=cache, num_inference_steps=STEPS)
    ref.images(samples)
    other_steps = Reference.from_pipeline(embedded_pipe, cache=cache, num_inference_steps=STEPS + 1)
    assert other_steps.digest != ref.digest and _calls(other_steps, samples)[0] == STEPS + 1
    changed = copy.deepcopy(embedded_pipe)
    with torch.no_grad():
        next(changed.transformer.parameters()).add_(1e-3)
    other_model = Reference.from_pipeline(changed, cache=cache, copy=False, num_inference_steps=STEPS)
    assert other_model.fingerprint != ref.fingerprint and other_model.digest == ref.digest
    assert _calls(other_model, samples)[0] == STEPS
    assert cache.load("sha256:another", ref.digest, samples[0]) is None


def test_setting_digest_is_stable_and_covers_the_scheduler(embedded_pipe):
    a = ReferenceSetting.from_pipeline(embedded_pipe, num_inference_steps=20, guidance_scale=1.5)
    b = ReferenceSetting.from_pipeline(embedded_pipe, guidance_scale=1.5, num_inference_steps=20)
    assert a.digest() == b.digest()
    other = ReferenceSetting(a.call_kwargs, "EulerDiscreteScheduler", a.scheduler_config)
    assert other.digest() != a.digest()
    with pytest.raises(difftune.EvaluationError, match="per sample"):
        ReferenceSetting({"generator": 1})


def test_loading_checks_the_file(cache):
    sample = CalibrationSet(labels=[4], seeds=1)[0]
    cache.save("sha256:m", "d1", sample, torch.rand(1, 16, 16))
    assert cache.load("sha256:m", "d1", sample).shape == (1, 16, 16)
    with pytest.raises(difftune.EvaluationError, match=r"expected \(3, 16, 16\)"):
        cache.load("sha256:m", "d1", sample, shape=(3, 16, 16))
    path = cache.path("sha256:m", "d1", sample)
    save_file({"image": torch.rand(1, 16, 16).double()}, str(path), metadata=cache._metadata("sha256:m", "d1", sample))
    with pytest.raises(difftune.EvaluationError, match=r"float64.*delete it to recompute"):
        cache.load("sha256:m", "d1", sample)
    save_file({"image": torch.rand(1, 16, 16)}, str(path), metadata={"format": "something else"})
    with pytest.raises(difftune.EvaluationError, match="metadata"):
        cache.load("sha256:m", "d1", sample)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(difftune.EvaluationError, match="unreadable"):
        cache.load("sha256:m", "d1", sample)
    assert not list(path.parent.glob("*.tmp"))


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFTUNE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "references"
    monkeypatch.delenv("DIFFTUNE_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "difftune", "references")


def test_the_reference_shares_the_weights_but_stays_plain_under_a_trial_setting(embedded_pipe, cache):
    from difftune.accel.quant import QuantConfig, QuantSpec
    from difftune.evaluators import shared_weights_copy

    pipe = shared_weights_copy(embedded_pipe)  # a private pipeline for this test, itself sharing weights
    reference = Reference.from_pipeline(pipe, num_inference_steps=STEPS, cache=cache)
    ours, theirs = dict(pipe.transformer.named_parameters()), dict(reference.pipe.transformer.named_parameters())
    assert ours.keys() == theirs.keys()
    # the same storage (no second copy of the weights), but parameter and module objects of its own
    assert all(ours[k].data_ptr() == theirs[k].data_ptr() and ours[k] is not theirs[k] for k in ours)
    assert reference.pipe.transformer is not pipe.transformer and reference.pipe.scheduler is not pipe.scheduler

    samples = CalibrationSet(labels=[1, 7], seeds=1)
    plain = reference.run(samples)
    handle = QuantConfig(default=QuantSpec(weight_bits=4)).apply(pipe)  # swaps weight.data on the trial side
    try:
        quantized = Reference(pipe, reference.setting, cache=cache).run(samples)
        assert not torch.equal(quantized, plain)  # the trial's pipeline really changed
        assert torch.equal(reference.run(samples), plain)  # the reference's did not
    finally:
        handle.remove()
    assert torch.equal(Reference(pipe, reference.setting, cache=cache).run(samples), plain)


def test_reference_images_drawn_on_another_device_type_are_cached_apart(embedded_pipe):
    cpu = ReferenceSetting.from_pipeline(embedded_pipe, num_inference_steps=STEPS)
    assert cpu.device == "cpu" and "device" not in cpu.to_dict()  # CPU digests (and caches) are as before
    cuda = ReferenceSetting(cpu.call_kwargs, cpu.scheduler, cpu.scheduler_config, device="cuda")
    assert cuda.digest() != cpu.digest()


def test_image_steps_draw_the_images_with_more_steps_but_time_and_count_the_served_setting(embedded_pipe, cache):
    from difftune.errors import EvaluationError

    samples = CalibrationSet(labels=[3, 7], seeds=1)[:2]
    served = Reference.from_pipeline(embedded_pipe, cache=cache, num_inference_steps=STEPS)
    fine = Reference.from_pipeline(embedded_pipe, cache=cache, num_inference_steps=STEPS, image_steps=3 * STEPS)
    same_as_fine = Reference.from_pipeline(embedded_pipe, cache=cache, num_inference_steps=3 * STEPS)
    n_images, images = _calls(fine, samples)
    assert n_images == 3 * STEPS and fine.digest == same_as_fine.digest != served.digest
    assert torch.equal(images, same_as_fine.images(samples))  # one cache entry: the 12-step images
    assert not torch.equal(images, served.images(samples))
    with DenoiserCalls(fine.pipe.transformer) as calls:
        fine.runner(samples)()  # what latency times: the plain pipeline as served
    assert calls.calls == STEPS and fine.setting.call_kwargs["num_inference_steps"] == STEPS
    with pytest.raises(EvaluationError, match="image_steps must be an integer >= 1"):
        Reference.from_pipeline(embedded_pipe, cache=cache, num_inference_steps=STEPS, image_steps=0)
