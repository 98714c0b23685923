"""``sharpness``: a blur guard that needs no weights.

Acceleration errors in diffusion sampling tend to average plausible outputs — reused features,
too few solver steps and skipped steps all pull the image towards a smoother posterior mean — and
PSNR rewards that: a blurred image is closer, in L2, to the reference than another sharp sample is.
``sharpness`` measures what blur removes: the high-frequency energy of each image (the mean squared
response of the 3×3 Laplacian on its luminance) divided by the reference image's, capped at 1 and
averaged over images.

- 1: as much fine detail as the reference; < 1: blurrier (a Gaussian blur of σ = 1 px leaves ~0.1–0.3
  of a natural image's Laplacian energy).
- The cap: extra high-frequency energy (noise, ringing) does not score above 1, so maximising
  sharpness never rewards noise; PSNR and the other fidelity metrics penalise noise.

Example::

    >>> import torch
    >>> x = torch.rand(2, 3, 32, 32)
    >>> float(sharpness_per_image(x, x).mean())
    1.0
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from .metrics import BoundMetric, EvalBatch, MetricContext, register_metric_factory

__all__ = ["Sharpness", "high_frequency_energy", "sharpness_per_image"]

#: The discrete Laplacian (4-neighbour): its response is the image's second derivative.
_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
#: Energies below this (a flat image) count as equal: 0/0 is "as sharp as the reference".
_EPS = 1e-12


def high_frequency_energy(images: torch.Tensor) -> torch.Tensor:
    """Mean squared Laplacian response of each image's luminance (channel mean): (N,) for N×C×H×W in [0, 1].

    Borders are replicated, so a constant image has energy 0.
    """
    if images.dim() != 4:
        raise ValueError(f"expected N×C×H×W images, got shape {tuple(images.shape)}")
    gray = images.float().mean(dim=1, keepdim=True)
    kernel = _LAPLACIAN.to(gray.device).view(1, 1, 3, 3)
    response = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernel)
    return response.square().flatten(1).mean(1)


def sharpness_per_image(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``min(1, E(preds) / E(target))`` per image pair, E = :func:`high_frequency_energy`: (N,)."""
    if preds.shape != target.shape:
        raise ValueError(f"sharpness: images {tuple(preds.shape)} and reference {tuple(target.shape)} differ in shape")
    own, ref = high_frequency_energy(preds), high_frequency_energy(target)
    ratio = torch.where(ref > _EPS, own / ref.clamp(min=_EPS), torch.ones_like(own))
    return ratio.clamp(max=1.0)


class Sharpness(Metric):
    """Mean over images of :func:`sharpness_per_image` (``update(preds, target)`` per batch)."""

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    total: torch.Tensor
    count: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        values = sharpness_per_image(preds, target)
        self.total += values.double().sum()
        self.count += values.numel()

    def compute(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1)


@register_metric_factory("sharpness")
def _build_sharpness(context: MetricContext) -> BoundMetric:
    metric = Sharpness().to(context.device)

    def feed(batch: EvalBatch) -> None:
        metric.update(batch.images, batch.require_reference("sharpness"))

    return BoundMetric(metric, feed, needs_reference=True)
