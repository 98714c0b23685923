"""The metric registry: every INTERFACE name with its direction and unit; unknown names list the known ones."""

from __future__ import annotations

import pytest

import difftune
from difftune.evaluators import MetricContext, MetricSpec, build_metric, metric_spec, metric_specs

INTERFACE_METRICS = {
    "nfe": "minimize",
    "latency_ms": "minimize",
    "speedup": "maximize",
    "peak_memory_mb": "minimize",
    "flops_ratio": "minimize",
    "psnr": "maximize",
    "ssim": "maximize",
    "mse": "minimize",
    "lpips": "minimize",
    "clip_score": "maximize",
    "fid": "minimize",
    "class_accuracy": "maximize",
}


def test_every_interface_metric_is_registered_with_its_direction_and_unit():
    specs = {s.name: s for s in metric_specs()}
    assert set(INTERFACE_METRICS) <= set(specs)
    for name, direction in INTERFACE_METRICS.items():
        spec = metric_spec(name)
        assert spec.direction == direction
        assert isinstance(spec.unit, str) and spec.description
    assert metric_spec("psnr").unit == "dB" and metric_spec("latency_ms").unit == "ms"
    assert metric_spec("psnr").better(30.0, 20.0) and metric_spec("fid").better(3.0, 5.0)


def test_unknown_metric_lists_the_known_ones():
    with pytest.raises(difftune.EvaluationError, match=r"unknown metric 'blurriness'.*psnr.*class_accuracy"):
        metric_spec("blurriness")


def test_cost_metrics_have_no_image_factory():
    with pytest.raises(difftune.EvaluationError, match="measured by evaluate"):
        build_metric("latency_ms", MetricContext(family="embedded"))


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="direction"):
        MetricSpec("x", "up", "", "")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind"):
        MetricSpec("x", "maximize", "", "", kind="vibes")
