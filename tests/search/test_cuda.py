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
    assert result.failed == 0 and result.study.reference["device"].startswith("cuda")
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
    assert result.study.reference["dtype"] == "float16" and result.failed == 0
    assert torch.cuda.max_memory_allocated() > 0
