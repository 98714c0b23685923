"""The ``harmonica`` space: contract (tiny trainings), l1 grid, memoised routers, applying and removing a mask."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch

import difftune
from difftune.accel.cache import CacheMaskConfig
from difftune.errors import SpaceError
from difftune.evaluators import Sample
from difftune.search import harmonica
from difftune.spaces import HarmoniCaSpace, Space, SpaceContext, get_space, to_profile
from difftune.spaces.harmonica import L1_HIGH, L1_LOW, README_L1, _snap

from .contract import SpaceContract, run

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4
#: A few trajectories of two samples: enough to exercise training, a fraction of a second per router.
TINY = {"iterations": 2, "lambda_every": 2, "batch_size": 2}


def tiny_space(cache_dir: Any) -> HarmoniCaSpace:
    space = get_space("harmonica", **TINY, cache_dir=cache_dir)
    assert isinstance(space, HarmoniCaSpace)
    return space


class TestHarmoniCaSpace(SpaceContract):
    space_name = "harmonica"
    random_points = 4  # each new l1 trains a router
    applied_points = 2

    @classmethod
    def make_context(cls, pipe: Any) -> SpaceContext:
        return SpaceContext.from_pipeline(pipe, num_inference_steps=STEPS, spacing_samples=2)

    @pytest.fixture(scope="class")
    @classmethod
    def space(cls, tmp_path_factory: pytest.TempPathFactory) -> Space:
        return tiny_space(tmp_path_factory.mktemp("routers"))

    def test_encode_of_a_decoded_point_decodes_to_the_same(self, space: Space, context: SpaceContext) -> None:
        # A learned mask has no closed-form (l1, threshold): encoding is refused, with what to do instead.
        sections = space.decode(space.default_params(context), context)
        with pytest.raises(SpaceError, match="cannot encode"):
            space.encode(sections, context)


@pytest.fixture(scope="module")
def context(embedded_pipe) -> SpaceContext:
    samples = (Sample(3, 0), Sample(7, 1))
    return SpaceContext.from_pipeline(embedded_pipe, num_inference_steps=STEPS, spacing_samples=samples)


def test_variables_and_the_l1_grid(context):
    space = get_space("harmonica")
    l1, threshold = space.variables(context)
    assert (l1.name, l1.log, l1.low, l1.high) == ("l1", True, L1_LOW, L1_HIGH)
    assert (threshold.name, threshold.low, threshold.high, threshold.default) == ("threshold", 0.05, 0.9, 0.1)
    # The README's 7e-8 over 56 slots, scaled to the embedded model's 12 and snapped: 10^-6.5.
    assert l1.default == pytest.approx(10**-6.5) and l1.default == _snap(README_L1 * 56 / 12)
    assert [_snap(x) for x in (1e-6, 1.2e-6, 1.9e-6, 3e-4)] == [1e-6, 1e-6, 10**-5.75, 10**-3.5]
    repaired = space.repair({"l1": 2.2e-5, "threshold": 0.3}, context)
    assert repaired.params["l1"] == _snap(2.2e-5) and "snapped" in repaired.changes[0]
    assert space.repair(repaired.params, context).changes == ()


def test_decode_trains_once_per_l1_and_applies_reversibly(embedded_pipe, context, tmp_path, monkeypatch):
    calls = []
    train = harmonica.train_router

    def counting(*args, **kwargs):
        calls.append(kwargs["l1"])
        return train(*args, **kwargs)

    monkeypatch.setattr(harmonica, "train_router", counting)
    space = tiny_space(tmp_path)
    masks = [space.decode({"l1": 1e-4, "threshold": t}, context)["cache"] for t in (0.05, 0.3, 0.6, 0.9)]
    assert calls == [1e-4]  # one training, four thresholds
    arrays = [m.array for m in masks]
    assert all(isinstance(m, CacheMaskConfig) and m.components == ("attn1", "ff") for m in masks)
    assert all(a.shape == (STEPS, 6, 2) and a[0].all() for a in arrays)
    assert all((hi <= lo).all() for lo, hi in itertools.pairwise(arrays))  # a higher threshold reuses more

    before = run(embedded_pipe, STEPS)
    handle = difftune.apply_profile(embedded_pipe, to_profile({"cache": masks[2]}, context))
    try:
        cached = run(embedded_pipe, STEPS)
    finally:
        handle.remove()
    assert torch.isfinite(cached).all()
    if not masks[2].array.all():
        assert not torch.equal(cached, before)
    assert torch.equal(run(embedded_pipe, STEPS), before)
    assert "forward" not in embedded_pipe.transformer.__dict__

    # A new space object (a new study) loads the router from disk instead of training it.
    monkeypatch.setattr(harmonica, "_train", lambda *a, **k: pytest.fail("trained again"))
    assert tiny_space(tmp_path).decode({"l1": 1e-4, "threshold": 0.6}, context)["cache"] == masks[2]


def test_baselines_are_the_readme_setting_identity_and_fora(context, tmp_path):
    points = {p.name: p for p in tiny_space(tmp_path).baselines(context)}
    assert set(points) == {"harmonica_readme", "identity", "fora_2"}
    readme = points["harmonica_readme"]
    assert readme.params == {"l1": _snap(README_L1 * 56 / 12), "threshold": 0.1}
    assert points["identity"].sections["cache"].array.all()
    assert np.array_equal(points["fora_2"].sections["cache"].array[:, 0, 0], [True, False, True, False])


def test_a_context_without_the_pipeline_cannot_train(embedded_pipe, tmp_path):
    context = SpaceContext.from_pipeline(embedded_pipe, num_inference_steps=STEPS, keep_pipeline=False)
    with pytest.raises(SpaceError, match="keep_pipeline=True"):
        tiny_space(tmp_path).decode({}, context)
    assert {p.name for p in tiny_space(tmp_path).baselines(context)} == {"identity", "fora_2"}
