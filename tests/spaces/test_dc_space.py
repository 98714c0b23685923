"""The ``dc`` space: contract (tiny fits), variables, the reference baselines, refusals."""

from __future__ import annotations

from typing import Any

import pytest

from difftune.errors import SpaceError
from difftune.spaces import DCSpace, Space, SpaceContext, get_space

from .contract import SpaceContract

pytestmark = pytest.mark.usefixtures("one_thread")

#: Few iterations and a short ground truth: the contract exercises fitting, not its quality.
TINY = {"iterations": 3, "reference_steps": 40}


class TestDCSpace(SpaceContract):
    space_name = "dc"
    random_points = 4  # each new (nfe, base, final, target, bound) fits once
    applied_points = 2

    @classmethod
    def make_context(cls, pipe: Any) -> SpaceContext:
        return SpaceContext.from_pipeline(pipe, nfe_range=(4, 5), spacing_samples=2)

    @pytest.fixture(scope="class")
    @classmethod
    def space(cls, tmp_path_factory: pytest.TempPathFactory) -> Space:
        return get_space("dc", **TINY, cache_dir=tmp_path_factory.mktemp("dc"))

    def test_encode_of_a_decoded_point_decodes_to_the_same(self, space: Space, context: SpaceContext) -> None:
        # Fitted ratios have no closed-form point: encoding is refused, with what to do instead.
        sections = space.decode(space.default_params(context), context)
        with pytest.raises(SpaceError, match="cannot encode"):
            space.encode(sections, context)


def test_points_fit_their_own_base_schedule_and_end(embedded_pipe, tmp_path):
    space = get_space("dc", **TINY, cache_dir=tmp_path)
    assert isinstance(space, DCSpace)
    ctx = SpaceContext.from_pipeline(embedded_pipe, nfe_range=(5, 6), spacing_samples=2)
    names = [v.name for v in space.variables(ctx)]
    assert names == ["nfe", "base", "final_sigma", "target", "bound"]
    params = {"nfe": 5, "base": "dpmsolver++", "final_sigma": "scheduler", "target": "next", "bound": "tanh"}
    schedule = space.decode(params, ctx)["solver"]
    assert schedule.final_sigma is None and schedule.num_steps == 5
    assert not any(s.corrector for s in schedule.steps)  # DPM-Solver++(2M): no UniC
    assert schedule.steps[0].dc_ratio == schedule.steps[1].dc_ratio == 1.0
    assert all(0.5 <= s.dc_ratio <= 1.5 for s in schedule.steps)  # tanh bound
    reference = space.decode({**params, "base": "unipc", "final_sigma": "sigma_min", "bound": "none"}, ctx)["solver"]
    assert reference.final_sigma == "sigma_min"
    assert [s.corrector for s in reference.steps] == [False, True, True, True, False]  # no UniC at step 0 nor last
    names = [p.name for p in space.baselines(ctx)]
    assert names == ["unipc_nfe5", "dc_reference_nfe5", "unipc_nfe6", "dc_reference_nfe6"]


def test_without_the_pipeline_decoding_says_how_to_build_the_context(embedded_pipe):
    ctx = SpaceContext.from_pipeline(embedded_pipe, nfe_range=(4, 5), keep_pipeline=False)
    space = get_space("dc")
    with pytest.raises(SpaceError, match="keep_pipeline=True"):
        space.decode(space.default_params(ctx), ctx)
    assert [p.name for p in space.baselines(ctx)] == ["unipc_nfe4", "unipc_nfe5"]  # the fitted ones need it
