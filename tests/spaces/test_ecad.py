"""The ``ecad`` space: ECAD's bit genome, its hand-made schedules, and a study driven by pymoo's NSGA-II."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from difftune.accel.cache import CacheMaskConfig, FORAConfig
from difftune.errors import SpaceError
from difftune.spaces import SpaceContext, get_space
from difftune.spaces.ecad import bit_name, delta_dit_mask, even_mask, tgate_mask

from .contract import SpaceContract

STEPS = 6


class TestEcadSpace(SpaceContract):
    space_name = "ecad"

    @classmethod
    def make_context(cls, pipe: Any) -> SpaceContext:
        return SpaceContext.from_pipeline(pipe, num_inference_steps=STEPS, keep_pipeline=False)


@pytest.fixture(scope="module")
def context(embedded_pipe) -> SpaceContext:
    return SpaceContext.from_pipeline(embedded_pipe, num_inference_steps=STEPS, keep_pipeline=False)


def test_the_genome_is_one_bit_per_cell_after_step_0(context):
    space = get_space("ecad")
    variables = space.variables(context)
    info = context.info
    assert len(variables) == (STEPS - 1) * len(info.blocks) * len(info.components) == 60
    assert all(v.kind == "bool" and v.default is True for v in variables)
    assert space.default_searcher == "pymoo-nsga2"
    # step 0 always recomputes, whatever the bits say
    params = {v.name: False for v in variables}
    mask = space.decode(params, context)["cache"].array
    assert mask[0].all() and not mask[1:].any()
    params[bit_name(3, 2, info.components[1])] = True
    mask = space.decode(params, context)["cache"].array
    assert mask[3, 2, 1] and mask[1:].sum() == 1


def test_encode_decode_round_trip_and_foreign_settings_are_refused(context):
    space = get_space("ecad")
    fora = FORAConfig(interval=3).to_mask(context.info, STEPS)
    assert np.array_equal(space.decode(space.encode({"cache": fora}, context), context)["cache"].array, fora.array)
    with pytest.raises(SpaceError, match="is not this model's"):
        space.encode({"cache": CacheMaskConfig.from_array(context.info.components, np.ones((4, 6, 2)))}, context)


def test_hand_made_schedules_by_hand():
    shape = (6, 4, 2)
    dit = delta_dit_mask(shape, boundary=2, interval=3)
    assert dit[0].all() and dit[3].all()  # step 0 and the refresh step
    assert not dit[1, 2:].any() and dit[1, :2].all()  # early: rear blocks cached
    assert not dit[4, :2].any() and dit[4, 2:].all()  # late: front blocks cached
    gate = tgate_mask(shape, ("attn1", "ff"), gate=2)
    assert gate[:3].all() and not gate[3:, :, 0].any() and gate[3:, :, 1].all()
    even = even_mask(shape, slot=1, interval=2)
    assert even[:, :, 0].all() and [bool(even[s, 0, 1]) for s in range(6)] == [True, False, True, False, True, False]


def test_the_baselines_are_points_of_the_genome(context):
    space = get_space("ecad")
    names = [b.name for b in space.baselines(context)]
    assert names[:4] == ["identity", "fora_2", "fora_3", "fora_4"]
    assert {"delta_dit_b3_2", "tgate_2", "even_attn1_2", "even_ff_2"} <= set(names)
    for point in space.baselines(context):
        assert point.params is not None and len(point.params) == 60
        decoded = space.decode(point.params, context)["cache"].array
        assert np.array_equal(decoded, point.sections["cache"].array)


def test_bac_schedules_seed_generation_0(embedded_pipe, context):
    from difftune.spaces import BACSpace

    full = SpaceContext.from_pipeline(embedded_pipe, num_inference_steps=STEPS)
    space = get_space("ecad")
    seeds = space.seeds(full)
    bac = BACSpace().baselines(full)
    assert [s.name for s in seeds] == [f"seed_{b.name}" for b in bac]
    for seed, point in zip(seeds, bac, strict=True):
        assert np.array_equal(seed.sections["cache"].array, point.sections["cache"].array)
        assert np.array_equal(space.decode(seed.params, full)["cache"].array, point.sections["cache"].array)
    assert space.seeds(context) == []  # no pipeline, no trajectories to record


def test_an_ecad_study_seeds_pymoo_with_the_hand_made_schedules(tmp_path, embedded_pipe, one_thread):
    from difftune.search import run_study
    from difftune.store import get_store

    url = f"sqlite:///{tmp_path / 'e.db'}"
    tiny = {"samples": 2, "num_inference_steps": STEPS, "latency_repeats": 1}
    result = run_study(pipeline=embedded_pipe, space="ecad", budget=16, storage=url, study="e", **tiny)
    assert result.study.searcher == "pymoo-nsga2" and result.finished == 16 and not result.failed
    with get_store(url) as store:
        trials = store.list_trials("e")
    kinds = [t.kind for t in trials]
    full = SpaceContext.from_pipeline(embedded_pipe, num_inference_steps=STEPS)
    baselines, seeds = len(get_space("ecad").baselines(full)), len(get_space("ecad").seeds(full))
    assert seeds == 4 and baselines + seeds < 16
    assert kinds == ["baseline"] * baselines + ["seed"] * seeds + ["searched"] * (16 - baselines - seeds)
    hand_made = {tuple(sorted(t.params.items())) for t in trials if t.kind != "searched"}
    searched = [tuple(sorted(t.params.items())) for t in trials if t.kind == "searched"]
    # pymoo never asks to measure a hand-made schedule (or one of its own) again
    assert len(set(searched)) == len(searched) and not hand_made & set(searched)


def _ecad_file(steps: int, blocks: int, components: tuple[str, ...], cached: set[tuple[int, int, str]]) -> dict:
    """A schedule in ECAD's published layout (AniAggarwal/ecad schedules/…/*.json), written by hand."""
    schedule = {
        f"{s:03d}": {str(b): {c: (s, b, c) not in cached for c in components} for b in range(blocks)}
        for s in range(steps)
    }
    return {
        "cache_schedule": {
            "num_blocks": blocks,
            "num_inference_steps": steps,
            "name": "hand_made",
            "attributes": {"num_affected_blocks": 1},
            "schedule": schedule,
        },
        "metrics": {"by_inference_step": {}, "total_flops": 1, "total_macs": 1},
    }


def test_ecad_files_read_and_write_as_masks():
    from difftune.spaces.ecad import from_ecad_json, to_ecad_json

    data = _ecad_file(4, 3, ("attn1", "ff"), {(1, 0, "ff"), (3, 2, "attn1")})
    cache = from_ecad_json(data, ("attn1", "ff"))
    mask = cache.array
    assert mask.shape == (4, 3, 2) and mask.sum() == 24 - 2 and not mask[1, 0, 1] and not mask[3, 2, 0]
    again = from_ecad_json(to_ecad_json(cache, "x"), ("attn1", "ff"))
    assert np.array_equal(again.array, mask)
    # the model's slot order wins over the file's
    assert from_ecad_json(data, ("ff", "attn1")).components == ("ff", "attn1")
    with pytest.raises(SpaceError, match=r"its components \['attn1', 'ff'\] are not this model's"):
        from_ecad_json(data, ("attn1", "attn2", "ff"))
    broken = _ecad_file(4, 3, ("attn1", "ff"), set())
    broken["cache_schedule"]["num_inference_steps"] = 5
    with pytest.raises(SpaceError, match="num_inference_steps says 5 but the schedule has 4"):
        from_ecad_json(broken)
    with pytest.raises(SpaceError, match="not an ECAD schedule"):
        from_ecad_json({"schedule": {}})


def test_import_ecad_then_export_ecad_round_trip_through_the_cli(tmp_path, embedded_pipe, capsys, one_thread):
    import json

    import difftune
    from difftune.cli import main

    source = tmp_path / "schedule.json"
    source.write_text(json.dumps(_ecad_file(STEPS, 6, ("attn1", "ff"), {(2, b, "ff") for b in range(6)})))
    profile_path = tmp_path / "imported.json"
    main(["import", "ecad", str(source), "--out", str(profile_path)])
    printed = " ".join(capsys.readouterr().out.split())
    assert "ECAD schedule 'hand_made', 6 steps × 6 blocks" in printed and "8% of the cells reused" in printed
    profile = difftune.load_profile(profile_path)
    assert profile.context.num_inference_steps == STEPS and not profile.cache.array[2, :, 1].any()
    handle = difftune.apply_profile(embedded_pipe, profile)  # a deployable profile for this model
    handle.remove()

    url = f"sqlite:///{tmp_path / 'e.db'}"
    tiny = ["--steps", str(STEPS), "--samples", "2", "--budget", "3", "--storage", url]
    main(["calibrate", "--space", "ecad", "--study", "e", *tiny])
    out = tmp_path / "exported.json"
    main(["export", "--study", "e", "--select", "fastest", "--storage", url, "--out", str(out), "--format", "ecad"])
    data = json.loads(out.read_text())
    from difftune.spaces.ecad import from_ecad_json

    exported = from_ecad_json(data, ("attn1", "ff"))
    assert np.array_equal(exported.array, difftune.load_profile(data["difftune_profile"]).cache.array)
    assert data["cache_schedule"]["num_inference_steps"] == STEPS and "psnr" in data["metrics"]["difftune"]
