"""Feature trajectories: the per-component T×T similarities BAC schedules from, and their on-disk cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difftune.errors import EvaluationError
from difftune.evaluators import (
    CalibrationSet,
    DenoiserCalls,
    component_similarity,
    default_trajectory_dir,
    pairwise_similarity,
)
from difftune.models import adapter_for, describe

STEPS = 6


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFTUNE_CACHE", str(tmp_path))
    return default_trajectory_dir()


@pytest.fixture(scope="module")
def samples(embedded_pipe):
    return CalibrationSet.for_pipeline(embedded_pipe, seeds=1)[:2]


def test_pairwise_similarity_is_each_metric_averaged_over_rows():
    x = torch.randn(4, 3, 10, generator=torch.Generator().manual_seed(0))
    s = pairwise_similarity(x)
    for i in range(4):
        for j in range(4):
            cos = torch.nn.functional.cosine_similarity(x[i], x[j], dim=-1).mean()
            assert s["cosine"][i, j] == pytest.approx(float(cos), abs=1e-6)
            assert s["l1"][i, j] == pytest.approx(-float((x[i] - x[j]).abs().mean()), abs=1e-6)
            assert s["mse"][i, j] == pytest.approx(-float((x[i] - x[j]).square().mean()), abs=1e-6)
    np.testing.assert_allclose(np.diag(s["cosine"]), 1.0)
    assert (np.diag(s["l1"]) == 0).all() and (np.diag(s["mse"]) == 0).all()


def test_recorded_similarities_on_the_embedded_model(embedded_pipe, samples, cache_root):
    info = describe(embedded_pipe)
    cos = component_similarity(embedded_pipe, samples, {}, STEPS, "cosine")
    assert cos.shape == (len(info.blocks), len(info.components), STEPS, STEPS)
    np.testing.assert_allclose(np.diagonal(cos, axis1=2, axis2=3), 1.0, atol=1e-9)
    np.testing.assert_allclose(cos, cos.transpose(0, 1, 3, 2), atol=1e-12)
    assert (cos <= 1 + 1e-9).all() and (cos >= -1 - 1e-9).all()
    # Features drift along the trajectory: the first and last steps are further apart than neighbours.
    assert (cos[..., 0, -1] < cos[..., 0, 1]).all()
    for metric in ("l1", "mse"):
        s = component_similarity(embedded_pipe, samples, {}, STEPS, metric)
        np.testing.assert_array_equal(s, s.transpose(0, 1, 3, 2))
        assert (np.diagonal(s, axis1=2, axis2=3) == 0).all() and (s <= 0).all()
    files = sorted(p.name for p in cache_root.rglob("*.safetensors"))
    assert len(files) == 3 and {f.rsplit("-", 1)[1] for f in files} == {
        "cosine.safetensors",
        "l1.safetensors",
        "mse.safetensors",
    }


def test_a_second_call_loads_the_cache_without_running_the_pipeline(embedded_pipe, samples, cache_root):
    first = component_similarity(embedded_pipe, samples, {}, STEPS, "l1")
    denoiser = adapter_for(embedded_pipe).denoiser(embedded_pipe)
    with DenoiserCalls(denoiser) as calls:
        again = component_similarity(embedded_pipe, samples, {}, STEPS, "l1")
        other = component_similarity(embedded_pipe, samples, {}, STEPS, "cosine")  # written by the same run
    assert calls.calls == 0 and calls.skipped == 0
    np.testing.assert_array_equal(first, again)
    assert other.shape == first.shape
    # Other samples are another key: recorded anew.
    with DenoiserCalls(denoiser) as calls:
        component_similarity(embedded_pipe, samples[:1], {}, STEPS, "l1")
    assert calls.calls == STEPS


def test_a_cached_file_of_another_request_is_refused(embedded_pipe, samples, cache_root):
    component_similarity(embedded_pipe, samples, {}, STEPS, "mse")
    path = next(p for p in cache_root.rglob("*-mse.safetensors"))
    cosine = next(p for p in cache_root.rglob("*-cosine.safetensors"))
    path.write_bytes(cosine.read_bytes())  # right shape, wrong metric
    with pytest.raises(EvaluationError, match="delete the file"):
        component_similarity(embedded_pipe, samples, {}, STEPS, "mse")


def test_bad_arguments(embedded_pipe, samples, cache_root):
    with pytest.raises(EvaluationError, match="cosine, l1, mse"):
        component_similarity(embedded_pipe, samples, {}, STEPS, "l2")
    with pytest.raises(EvaluationError, match="no samples"):
        component_similarity(embedded_pipe, [], {}, STEPS)
    with pytest.raises(EvaluationError, match="disagrees"):
        component_similarity(embedded_pipe, samples, {"num_inference_steps": 4}, STEPS)
