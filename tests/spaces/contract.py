"""``SpaceContract``: the tests every search space passes, subclassed once per space.

A subclass sets ``space_name`` and may override :meth:`SpaceContract.make_context` (e.g. a small
NFE range so that running every baseline stays cheap) and :meth:`SpaceContract.assert_same`
(how two decodings compare). Everything runs on the embedded model, a few samples, few steps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

import difftune
from difftune.errors import SpaceError
from difftune.profile import Profile
from difftune.spaces import Space, SpaceContext, get_space, spaces, to_profile
from difftune.spaces._base import SEARCHERS

torch.set_num_threads(1)


def run(pipe: Any, steps: int, labels: tuple[int, ...] = (3, 7)) -> torch.Tensor:
    return pipe(
        class_labels=list(labels),
        num_inference_steps=steps,
        generator=[torch.Generator().manual_seed(i) for i in range(len(labels))],
        output_type="pt",
    ).images


class SpaceContract:
    """Shared contract of every :class:`~difftune.spaces.Space`."""

    space_name: ClassVar[str]
    random_points: ClassVar[int] = 40  # decoded and round-tripped (cheap)
    applied_points: ClassVar[int] = 3  # of those, applied to the pipeline and sampled

    @classmethod
    def make_context(cls, pipe: Any) -> SpaceContext:
        return SpaceContext.from_pipeline(pipe, keep_pipeline=False)

    def assert_same(self, a: Mapping[str, Any], b: Mapping[str, Any]) -> None:
        assert dict(a) == dict(b)

    @pytest.fixture(scope="class")
    @classmethod
    def context(cls, embedded_pipe: Any) -> SpaceContext:
        return cls.make_context(embedded_pipe)

    @pytest.fixture(scope="class")
    @classmethod
    def space(cls) -> Space:
        return get_space(cls.space_name)

    def points(self, space: Space, context: SpaceContext, count: int) -> list[dict[str, Any]]:
        rng = np.random.default_rng(1234)
        return [space.sample(context, rng) for _ in range(count)]

    # ---- registry and variables ---------------------------------------------------------------

    def test_registered_by_name(self, space: Space) -> None:
        assert self.space_name in spaces()
        assert space.name == self.space_name
        assert type(get_space(self.space_name)) is type(space)
        assert space.default_searcher in SEARCHERS
        assert space.sections

    def test_unknown_space_name_lists_known_ones(self) -> None:
        with pytest.raises(SpaceError) as info:
            get_space(self.space_name + "-nope")
        assert self.space_name in str(info.value)

    def test_every_variable_is_valid(self, space: Space, context: SpaceContext) -> None:
        variables = space.variables(context)
        names = [v.name for v in variables]
        assert len(names) == len(set(names))
        rng = np.random.default_rng(0)
        for v in variables:
            assert v.contains(v.default), v
            dist = v.to_optuna_distribution()
            pymoo_var = v.to_pymoo_variable()
            assert pymoo_var is not None
            for value in [v.default, *(v.sample(rng) for _ in range(20))]:
                assert v.contains(value), (v, value)
                assert dist._contains(dist.to_internal_repr(value)), (v, value)
                assert v.from_number(v.to_number(value)) == v.canonical(value)
                low, high = v.bounds
                assert low <= v.to_number(value) <= high

    # ---- repair and decode --------------------------------------------------------------------

    def test_unknown_parameter_is_an_error(self, space: Space, context: SpaceContext) -> None:
        with pytest.raises(SpaceError, match="no_such_knob"):
            space.repair({**space.default_params(context), "no_such_knob": 1}, context)

    def test_repair_fills_missing_and_clamps_out_of_range(self, space: Space, context: SpaceContext) -> None:
        variables = space.variables(context)
        numeric = next((v for v in variables if v.kind in ("int", "float")), None)
        if numeric is not None:
            repaired = space.repair({numeric.name: 1e9}, context)
            assert repaired.params[numeric.name] == numeric.high
            assert any(numeric.name in c for c in repaired.changes)
        else:  # a genome of booleans (ecad): a value that is no bool becomes the default
            flag = variables[0]
            repaired = space.repair({flag.name: "yes"}, context)
            assert repaired.params[flag.name] == flag.default
            assert any(flag.name in c for c in repaired.changes)
        assert set(repaired.params) == {v.name for v in variables}
        space.decode({}, context)  # everything missing still decodes

    def test_random_points_repair_decode_and_round_trip_a_profile(self, space: Space, context: SpaceContext) -> None:
        variables = {v.name: v for v in space.variables(context)}
        for params in self.points(space, context, self.random_points):
            repaired = space.repair(params, context)
            assert all(variables[k].contains(v) for k, v in repaired.params.items())
            assert space.repair(repaired.params, context).changes == ()  # repair is idempotent
            sections = space.decode(params, context)
            assert set(sections) <= set(space.sections)
            profile = to_profile(sections, context, name="point")
            again = Profile.from_dict(json.loads(profile.to_json()))
            assert again == profile

    def test_random_points_apply_to_the_pipeline_and_sample(self, space: Space, context: SpaceContext, embedded_pipe):
        scheduler = embedded_pipe.scheduler
        for params in self.points(space, context, self.applied_points):
            profile = to_profile(space.decode(params, context), context)
            handle = difftune.apply_profile(embedded_pipe, profile)
            try:
                images = run(embedded_pipe, profile.context.num_inference_steps)
            finally:
                handle.remove()
            assert torch.isfinite(images).all()
        assert embedded_pipe.scheduler is scheduler

    def test_encode_of_a_decoded_point_decodes_to_the_same(self, space: Space, context: SpaceContext) -> None:
        encoded = 0
        for params in self.points(space, context, self.random_points):
            sections = space.decode(params, context)
            try:
                point = space.encode(sections, context)
            except SpaceError:
                continue  # not every decodable setting need be encodable, but most should be
            encoded += 1
            self.assert_same(space.decode(point, context), sections)
        assert encoded >= self.random_points // 2

    # ---- baselines ----------------------------------------------------------------------------

    def baselines(self, space: Space, context: SpaceContext) -> list:
        return space.baselines(context)

    def test_baselines_decode_round_trip_and_apply(self, space: Space, context: SpaceContext, embedded_pipe) -> None:
        points = self.baselines(space, context)
        assert points
        assert len({p.name for p in points}) == len(points)
        for point in points:
            assert set(point.sections) <= set(space.sections)
            if point.params is not None:
                self.assert_same(space.decode(point.params, context), point.sections)
            profile = to_profile(point.sections, context, name=point.name)
            assert Profile.from_dict(json.loads(profile.to_json())) == profile
            handle = difftune.apply_profile(embedded_pipe, profile)
            try:
                images = run(embedded_pipe, profile.context.num_inference_steps, labels=(5,))
            finally:
                handle.remove()
            assert torch.isfinite(images).all(), point.name
            assert not math.isnan(float(images.mean()))
