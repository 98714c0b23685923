"""End-to-end checks of the tiny offline diffusers pipelines."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from tests.models.tiny_pipelines import FAMILIES, IMAGE_SIZE, build, torch_threads


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def _run(family: str, seed: int) -> np.ndarray:
    pipe, kwargs = build(family, seed=seed)
    return np.asarray(pipe(**kwargs).images)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipeline_runs_and_is_deterministic(family: str) -> None:
    images = _run(family, seed=0)

    assert images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert images.dtype == np.float32
    assert np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0
    np.testing.assert_array_equal(_run(family, seed=0), images)
    assert not np.array_equal(_run(family, seed=1), images)
