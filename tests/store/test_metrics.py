"""The store's table of known metrics is the evaluators' registry: both read difftune.metric_table."""

from __future__ import annotations

import pytest

from difftune.errors import StoreError
from difftune.store import METRICS, MetricRecord, MetricSpec, metric_spec


def test_store_metrics_match_the_evaluators_registry() -> None:
    registry = pytest.importorskip("difftune.evaluators.metrics")
    theirs = {s.name: (s.direction, s.unit) for s in registry.metric_specs()}
    ours = {s.name: (s.direction, s.unit) for s in METRICS.values()}
    assert ours == {name: theirs[name] for name in ours if name in theirs}
    assert set(ours) <= set(theirs)


def test_interface_names_are_known() -> None:
    # INTERFACE.md's names, with weight_memory_mb (the quant space's memory objective).
    names = (
        "nfe latency_ms speedup peak_memory_mb flops_ratio psnr ssim mse lpips clip_score image_reward fid "
        "class_accuracy sharpness speedup_spread weight_memory_mb"
    )
    assert set(METRICS) == set(names.split())


def test_metric_spec_and_records() -> None:
    assert metric_spec("latency_ms") == MetricSpec("latency_ms", "minimize", "ms")
    with pytest.raises(StoreError, match=r"unknown metric 'psnrr'; known: .*psnr.*MetricRecord"):
        metric_spec("psnrr")
    assert MetricSpec.parse(("psnr", "min")) == MetricSpec("psnr", "minimize", "dB")
    with pytest.raises(StoreError, match="value must be a number"):
        MetricRecord("x", "1", "", "minimize")  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="given twice"):
        MetricRecord.collect([MetricRecord.known("psnr", 1.0), MetricRecord.known("psnr", 2.0)])
