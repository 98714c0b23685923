"""FID in the digit classifier's feature space: real ≪ blurred ≪ noise, and why PSNR alone is not enough."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import difftune
from difftune.evaluators import ClassifierFID, MetricContext, build_metric, psnr_per_image


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = math.ceil(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    out = F.pad(images, (radius,) * 4, mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1))
    return F.conv2d(out, k.view(1, 1, -1, 1))


def other_digit_of_same_class(labels: torch.Tensor) -> torch.Tensor:
    """An index permutation mapping every image to a *different* real image of the same class."""
    perm = torch.arange(len(labels))
    for label in labels.unique():
        idx = torch.nonzero(labels == label).flatten()
        perm[idx] = idx.roll(1)
    return perm


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    metric = ClassifierFID(real=real)
    metric.update(fake)
    return float(metric.compute())


@pytest.fixture
def fid_figures(real_digits):
    (real, _), (held_out, labels) = real_digits
    blurred = gaussian_blur(held_out, 1.0)
    noise = torch.rand(held_out.shape, generator=torch.Generator().manual_seed(0))
    class_means = torch.stack([held_out[labels == k].mean(0) for k in range(10)])[labels]
    return {
        "held_out": fid(real, held_out),
        "blurred": fid(real, blurred),
        "class_means": fid(real, class_means),
        "noise": fid(real, noise),
    }


def test_fid_orders_real_blurred_noise(fid_figures):
    f = fid_figures
    assert f["held_out"] < 20
    assert f["blurred"] > 5 * f["held_out"]
    assert f["class_means"] > 5 * f["held_out"]
    assert f["noise"] > f["blurred"]


def test_psnr_prefers_the_blur_that_fid_rejects(real_digits):
    """The case for FID: against the real image of a sample, a blurred copy (or the class mean, the
    posterior mean given the label) scores a far higher PSNR than another perfectly real digit of the
    same class — so a PSNR-only search would drift to blur — while FID says the opposite."""
    (real, _), (held_out, labels) = real_digits
    blurred = gaussian_blur(held_out, 1.0)
    class_means = torch.stack([held_out[labels == k].mean(0) for k in range(10)])[labels]
    sharp_alternative = held_out[other_digit_of_same_class(labels)]
    psnr = {
        name: float(psnr_per_image(x, held_out).mean())
        for name, x in {"blurred": blurred, "class_means": class_means, "sharp": sharp_alternative}.items()
    }
    assert psnr["blurred"] > psnr["sharp"] + 5
    assert psnr["class_means"] > psnr["sharp"]  # the MSE-optimal guess given the label
    mse_means = float((class_means - held_out).square().mean())
    assert mse_means < 0.8 * float((sharp_alternative - held_out).square().mean())
    assert fid(real, sharp_alternative) * 5 < fid(real, blurred)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")
def test_real_statistics_of_a_split_are_cached_and_survive_reset(real_digits):
    _, (held_out, _) = real_digits
    metric = ClassifierFID(real="all")
    real_sum = metric.real_features_sum.clone()
    metric.update(held_out[:100])
    first = float(metric.compute())
    metric.reset()
    assert torch.equal(metric.real_features_sum, real_sum)
    metric.update(held_out[:100])
    assert float(metric.compute()) == pytest.approx(first)
    again = ClassifierFID(real="all")
    assert torch.equal(again.real_features_sum, real_sum)
    with pytest.raises(difftune.EvaluationError, match="at least 2"):
        ClassifierFID().compute()


def test_fid_for_other_families_needs_inception_weights():
    from difftune.evaluators import inception_fid_unavailable_reason

    if inception_fid_unavailable_reason() is None:
        pytest.skip("InceptionV3 FID is available here")
    with pytest.raises(difftune.EvaluationError, match=r"torch-fidelity|Inception"):
        build_metric("fid", MetricContext(family="sd"))
