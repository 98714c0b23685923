"""evaluate() on the embedded pipeline: every metric finite, NFE by counting, failures as EvaluationError."""

from __future__ import annotations

import math

import pytest
import torch

import difftune
from difftune.accel.sada import SADAConfig
from difftune.evaluators import (
    DEFAULT_RUNGS,
    CalibrationSet,
    DenoiserCalls,
    LatencyOptions,
    Reference,
    ReferenceCache,
    Rung,
    evaluate,
    make_rungs,
)
from difftune.evaluators.evaluate import _check_value

STEPS = 12
FAST = LatencyOptions(warmup=0, repeats=1)
ALL = ["nfe", "flops_ratio", "latency_ms", "speedup", "peak_memory_mb", "psnr", "ssim", "mse", "fid", "class_accuracy"]


@pytest.fixture
def pipe(embedded_pipe):
    """The session's pipeline; whatever a test applies, the test removes."""
    return embedded_pipe


@pytest.fixture
def reference(pipe, tmp_path):
    return Reference.from_pipeline(pipe, cache=ReferenceCache(tmp_path), batch_size=4, num_inference_steps=STEPS)


@pytest.fixture
def samples():
    return Rung(4).select(CalibrationSet(labels=range(10), seeds=1))


def test_plain_setting_returns_every_metric(pipe, reference, samples):
    m = evaluate(pipe, samples, reference, metrics=ALL, latency=FAST)
    assert list(m) == ALL
    assert m["peak_memory_mb"] is None  # CPU
    assert all(math.isfinite(v) for k, v in m.items() if k != "peak_memory_mb")
    assert m["nfe"] == STEPS and m["flops_ratio"] == pytest.approx(1.0)
    assert m["psnr"] >= 60 and m["ssim"] == pytest.approx(1.0, abs=1e-4) and m["mse"] < 1e-8
    assert m["latency_ms"] > 0 and 0.2 < m["speedup"] < 5
    assert m["fid"] >= 0 and 0 <= m["class_accuracy"] <= 1


def test_fewer_steps_and_sada_lower_nfe_and_flops(pipe, reference, samples):
    cheap = ["nfe", "flops_ratio", "psnr"]
    fewer = evaluate(pipe, samples, reference, metrics=cheap, call_kwargs={"num_inference_steps": STEPS // 2})
    assert fewer["nfe"] == STEPS // 2 and fewer["flops_ratio"] == pytest.approx(0.5, abs=0.01)
    assert fewer["psnr"] < 60
    handle = SADAConfig(threshold=math.inf, acc_range=(3, STEPS - 1), lagrange_term=0, max_downsample=0).apply(pipe)
    try:
        sada = evaluate(pipe, samples, reference, metrics=cheap)
    finally:
        handle.remove()
    assert sada["nfe"] < STEPS and sada["flops_ratio"] < 1.0
    assert math.isfinite(sada["psnr"])


def test_denoiser_calls_skip_what_sada_answers_from_its_cache(pipe):
    handle = SADAConfig(threshold=math.inf, acc_range=(3, STEPS - 1), lagrange_term=0, max_downsample=0).apply(pipe)
    try:
        with DenoiserCalls(pipe.transformer) as calls:
            pipe(class_labels=[1, 2], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))
        skipped = len(handle.stats.skipped)
    finally:
        handle.remove()
    assert skipped > 0 and calls.skipped == skipped and calls.calls == STEPS - skipped


def test_nan_in_the_images_is_an_evaluation_error(pipe, reference, samples):
    def poison(module, args, output):
        return type(output)(sample=output.sample * float("nan"))

    hook = pipe.transformer.register_forward_hook(poison)
    try:
        with pytest.raises(difftune.EvaluationError, match="produced NaN in 4 of 4 images"):
            evaluate(pipe, samples, reference, metrics=["psnr"])
    finally:
        hook.remove()


def test_nan_or_inf_metric_values_are_evaluation_errors():
    assert _check_value("psnr", 31.5) == 31.5
    with pytest.raises(difftune.EvaluationError, match="fid produced NaN"):
        _check_value("fid", float("nan"))
    with pytest.raises(difftune.EvaluationError, match="produced inf"):
        _check_value("speedup", float("inf"))


def test_out_of_memory_is_an_evaluation_error(pipe, reference, samples):
    def oom(module, args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    hook = pipe.transformer.register_forward_pre_hook(oom)
    try:
        with pytest.raises(difftune.EvaluationError, match="out of memory"):
            evaluate(pipe, samples, reference, metrics=["nfe"])
    finally:
        hook.remove()


def test_bad_requests(pipe, reference, samples):
    with pytest.raises(difftune.EvaluationError, match="unknown metric 'blurriness'"):
        evaluate(pipe, samples, reference, metrics=["blurriness"])
    with pytest.raises(difftune.EvaluationError, match="no samples"):
        evaluate(pipe, [], reference, metrics=["nfe"])


def test_rungs():
    assert [r.n_samples for r in DEFAULT_RUNGS] == [8, 32]
    assert not DEFAULT_RUNGS[0].measure_latency and DEFAULT_RUNGS[-1].measure_latency
    cal = CalibrationSet(labels=range(10), seeds=4)
    small, large = make_rungs(8, 32, metrics=["nfe", "fid"])
    assert small.select(cal) == large.select(cal)[:8] and small.metrics == ("nfe", "fid")
    with pytest.raises(difftune.EvaluationError, match="strictly increase"):
        make_rungs(32, 8)
    with pytest.raises(difftune.EvaluationError, match="only 40"):
        Rung(64).select(cal)
    with pytest.raises(difftune.EvaluationError, match="unknown metric"):
        Rung(8, metrics=("blurriness",))
