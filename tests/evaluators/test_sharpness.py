"""sharpness: high-frequency energy ÷ the reference's, against hand-derived values."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from difftune.evaluators import MetricContext, build_metric, metric_spec
from difftune.evaluators.metrics import EvalBatch
from difftune.evaluators.sharpness import high_frequency_energy, sharpness_per_image


def _checkerboard(n: int = 8, amplitude: float = 0.5) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    board = ((yy + xx) % 2).float() * 2 - 1  # ±1
    return (0.5 + amplitude / 2 * board).expand(1, 3, n, n).clone()


def test_the_energy_of_a_checkerboard_by_hand():
    # Inside, every pixel differs from its 4 neighbours by ±a (a = amplitude): the Laplacian is ∓4a, squared 16a².
    # On the replicated border one neighbour equals the pixel: an edge pixel gets 3a (9a²), a corner 2a (4a²).
    a, n = 0.5, 8
    inner, edge, corner = (n - 2) ** 2, 4 * (n - 2), 4
    expected = (inner * 16 + edge * 9 + corner * 4) * a**2 / n**2
    assert torch.allclose(high_frequency_energy(_checkerboard(n, a)), torch.tensor([expected]))
    assert float(high_frequency_energy(torch.full((1, 3, 8, 8), 0.3))) == 0.0


def test_half_the_contrast_keeps_a_quarter_of_the_energy():
    full, half = _checkerboard(amplitude=0.5), _checkerboard(amplitude=0.25)
    assert torch.allclose(sharpness_per_image(half, full), torch.tensor([0.25]))


def test_blur_scores_below_one_noise_is_capped_at_one_flat_pairs_score_one():
    torch.manual_seed(0)
    image = torch.rand(4, 3, 32, 32)
    kernel = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 256).expand(3, 1, 5, 5)
    blurred = F.conv2d(F.pad(image, (2, 2, 2, 2), mode="replicate"), kernel, groups=3)
    assert torch.equal(sharpness_per_image(image, image), torch.ones(4))
    assert (sharpness_per_image(blurred, image) < 0.3).all()
    noisy = (image + 0.2 * torch.randn_like(image)).clamp(0, 1)
    assert torch.equal(sharpness_per_image(noisy, image), torch.ones(4))
    flat = torch.full((1, 3, 8, 8), 0.5)
    assert float(sharpness_per_image(flat, flat)) == 1.0


def test_the_metric_is_in_the_table_and_averages_over_batches():
    spec = metric_spec("sharpness")
    assert spec.direction == "maximize" and spec.unit == "ratio" and "blurrier" in spec.description
    bound = build_metric("sharpness", MetricContext(family="sd"))
    full, half = _checkerboard(amplitude=0.5), _checkerboard(amplitude=0.25)
    bound.update(EvalBatch(half, full, ["a"]))
    bound.update(EvalBatch(full, full, ["b"]))
    assert abs(bound.compute() - (0.25 + 1.0) / 2) < 1e-9 and bound.needs_reference
