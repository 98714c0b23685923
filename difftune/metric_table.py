"""The one table of every metric difftune stores: name, direction, unit, description, kind.

The evaluators (which measure them) and the store (which keeps them, without importing torchmetrics)
both read it, so a metric is defined once. ``kind``: ``cost`` (measured from running the pipeline),
``reference`` (each image against the reference setting's image of the same sample),
``distribution`` (the set of images against a distribution) or ``conditioning`` (each image against
its prompt or label).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["METRIC_TABLE", "MetricRow"]


@dataclass(frozen=True)
class MetricRow:
    """One metric: ``direction`` is ``"maximize"`` or ``"minimize"``; ``unit`` is ``""`` when unitless."""

    name: str
    direction: str
    unit: str
    description: str
    kind: str = "reference"


_MAX, _MIN = "maximize", "minimize"

METRIC_TABLE: tuple[MetricRow, ...] = (
    MetricRow("nfe", _MIN, "calls", "denoiser evaluations per sampling run (calls that ran the network)", "cost"),
    MetricRow("latency_ms", _MIN, "ms", "median wall time of one pipeline call on the latency batch", "cost"),
    MetricRow("speedup", _MAX, "×", "reference latency / this latency, timed alternately in the same run", "cost"),
    MetricRow(
        "speedup_spread",
        _MIN,
        "×",
        "timing noise of speedup: half the spread of the paired (or per-side) speedup estimates; fronts treat "
        "speedups closer than it as equal",
        "cost",
    ),
    MetricRow("peak_memory_mb", _MIN, "MiB", "peak CUDA memory allocated during the trial's pipeline calls", "cost"),
    MetricRow("flops_ratio", _MIN, "ratio", "FLOPs of one pipeline call / the reference setting's", "cost"),
    MetricRow(
        "weight_memory_mb",
        _MIN,
        "MiB",
        "the denoiser's weights as served: quantized layers at their bit-widths plus scales (torchao's own storage "
        "where its kernels run), every other parameter as it is",
        "cost",
    ),
    MetricRow("psnr", _MAX, "dB", "peak signal-to-noise ratio vs the reference image (mean over images)"),
    MetricRow("ssim", _MAX, "", "structural similarity vs the reference image (mean over images)"),
    MetricRow("mse", _MIN, "", "mean squared error vs the reference image, images in [0, 1]"),
    MetricRow("lpips", _MIN, "", "learned perceptual distance vs the reference image (needs backbone weights)"),
    MetricRow("clip_score", _MAX, "", "CLIP image-text agreement ×100 (needs local CLIP weights)", "conditioning"),
    MetricRow(
        "image_reward",
        _MAX,
        "",
        "ImageReward human-preference score of each image for its prompt (needs the image-reward package and weights)",
        "conditioning",
    ),
    MetricRow("fid", _MIN, "", "Fréchet distance of the images' features to the real distribution", "distribution"),
    MetricRow("class_accuracy", _MAX, "fraction", "share of images classified as the requested class", "conditioning"),
    MetricRow(
        "sharpness",
        _MAX,
        "ratio",
        "high-frequency (Laplacian) energy of each image ÷ the reference image's, capped at 1, mean over images: "
        "< 1 is blurrier than the reference; needs no weights",
    ),
)
