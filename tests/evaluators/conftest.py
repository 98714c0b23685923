from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The CPU is shared: evaluator tests run torch on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def real_digits():
    """(images in [0, 1], labels) of the generator split and of the held-out (classifier) split."""
    from difftune.models.embedded.data import load_split

    (gx, gy), (cx, cy) = load_split("generator"), load_split("classifier")
    return ((gx + 1) / 2, gy), ((cx + 1) / 2, cy)
