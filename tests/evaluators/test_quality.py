"""PSNR / SSIM / MSE against hand-computed values and torchmetrics' functional API; LPIPS without its nets."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional import mean_squared_error
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

import difftune
from difftune.evaluators import (
    MSE,
    PSNR,
    PSNR_MAX_DB,
    SSIM,
    MetricContext,
    build_metric,
    lpips_unavailable_reason,
    psnr_per_image,
)


def _const(*values: float, size: int = 4) -> torch.Tensor:
    return torch.stack([torch.full((1, size, size), v) for v in values])


def test_hand_computed_values_on_constant_images():
    preds, target = _const(0.5, 0.5), _const(0.6, 0.7)  # differences 0.1 and 0.2
    psnr, mse = PSNR(), MSE()
    psnr.update(preds, target)
    mse.update(preds, target)
    # per image: 10·log10(1/0.01) = 20 dB and 10·log10(1/0.04) ≈ 13.979 dB; the mean of the two
    assert float(psnr.compute()) == pytest.approx((20.0 + 10 * math.log10(25.0)) / 2, abs=1e-4)
    assert float(mse.compute()) == pytest.approx((0.01 + 0.04) / 2, abs=1e-6)
    # SSIM of constants a, b (zero variances): (2ab + C1) / (a² + b² + C1) with C1 = 0.01²
    ssim = SSIM(kernel_size=3, sigma=1.0)
    ssim.update(_const(0.5, size=8), _const(0.6, size=8))
    c1 = 0.01**2
    assert float(ssim.compute()) == pytest.approx((2 * 0.5 * 0.6 + c1) / (0.25 + 0.36 + c1), abs=1e-4)


def test_identical_images_are_capped_not_infinite():
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(psnr_per_image(x, x), torch.full((3,), PSNR_MAX_DB))
    ssim = SSIM()
    ssim.update(x, x)
    assert float(ssim.compute()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")
def test_agree_with_torchmetrics_functional_and_accumulate_over_batches():
    g = torch.Generator().manual_seed(1)
    target = torch.rand(6, 1, 16, 16, generator=g)
    preds = (target + 0.1 * torch.randn(6, 1, 16, 16, generator=g)).clamp(0, 1)
    per_image_psnr = torch.stack([peak_signal_noise_ratio(preds[i], target[i], data_range=1.0) for i in range(6)])
    expected = {
        PSNR: per_image_psnr.mean(),
        SSIM: structural_similarity_index_measure(preds, target, data_range=1.0),
        MSE: mean_squared_error(preds, target),
    }
    for cls, value in expected.items():
        whole, parts = cls(), cls()
        whole.update(preds, target)
        parts.update(preds[:2], target[:2])
        parts.update(preds[2:], target[2:])
        assert float(whole.compute()) == pytest.approx(float(value), rel=1e-5), cls.__name__
        assert float(parts.compute()) == pytest.approx(float(value), rel=1e-5), cls.__name__
        parts.reset()
        with pytest.raises(difftune.EvaluationError, match="no images"):
            parts.compute()
    assert PSNR.higher_is_better and SSIM.higher_is_better and not MSE.higher_is_better


def test_shape_mismatch_is_an_evaluation_error():
    with pytest.raises(difftune.EvaluationError, match="differ in shape"):
        PSNR().update(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 9))


@pytest.mark.skipif(lpips_unavailable_reason() is None, reason="LPIPS nets are available here")
def test_lpips_without_its_nets_names_what_is_missing():
    with pytest.raises(difftune.EvaluationError, match="torchvision") as info:
        build_metric("lpips", MetricContext(family="embedded"))
    assert "pip install" in str(info.value) or ".pth" in str(info.value)
