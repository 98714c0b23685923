"""The GPU measurement path (skipped without CUDA; scripts/gpu_check.py is the longer check)."""

from __future__ import annotations

import pytest
import torch

from difftune.search.runner import run_study

pytestmark = pytest.mark.cuda


def test_a_study_on_cuda_times_with_events_and_reads_peak_memory_per_trial(tmp_path):
    result = run_study(
        "embedded",
        "cache",
        budget=3,
        storage=f"sqlite:///{tmp_path / 'g.db'}",
        device="cuda",
        num_inference_steps=6,
        samples=4,
    )
    assert result.failed == 0, result.failures
    assert result.study.reference["device"].startswith("cuda")
    for trial in result.front:
        values = trial.values()
        assert values["peak_memory_mb"] > 0 and values["latency_ms"] > 0
    assert result.front[0].config["profile"]["provenance"]["device"].startswith("cuda")


def test_float16_on_cuda_is_stored_and_used(tmp_path):
    result = run_study(
        "embedded",
        "cache",
        budget=2,
        storage=f"sqlite:///{tmp_path / 'h.db'}",
        device="cuda",
        dtype="float16",
        num_inference_steps=6,
        samples=4,
    )
    assert result.failed == 0, result.failures
    assert result.study.reference["dtype"] == "float16"
    assert torch.cuda.max_memory_allocated() > 0


def test_the_shared_digit_classifier_serves_cuda_and_cpu_metrics_in_one_process():
    """The committed classifier is one module per process: a CUDA metric moves it, a CPU one still works."""
    from difftune.evaluators import MetricContext, build_metric
    from difftune.evaluators.metrics import EvalBatch
    from difftune.models.embedded.data import load_split

    images, labels = load_split("classifier")
    images, labels = (images[:64] + 1) / 2, [int(c) for c in labels[:64]]
    values = {}
    for device in ("cuda", "cpu", "cuda"):
        context = MetricContext(family="embedded", device=torch.device(device))
        for name in ("class_accuracy", "fid"):
            metric = build_metric(name, context)
            metric.update(EvalBatch(images.to(device), None, labels))
            values.setdefault(name, []).append(float(metric.compute()))
    for name, got in values.items():
        assert max(got) - min(got) < 1e-3, (name, got)
    assert values["class_accuracy"][0] > 0.9
