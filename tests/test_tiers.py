"""Quality tiers: a bundle of named profiles, switched per request on one loaded pipeline, and its export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import difftune
from difftune.accel.cache import CacheMaskConfig, FORAConfig
from difftune.accel.solver import SolverSchedule
from difftune.cli import main
from difftune.errors import ProfileError
from difftune.profile import ModelRef, Profile, ProfileContext
from difftune.tiers import TierBundle, TierSwitch, load_tiers

pytestmark = pytest.mark.usefixtures("one_thread")


def _profile(pipe, name: str, steps: int, **sections) -> Profile:
    info = difftune.describe(pipe)
    return Profile(
        name=name,
        model=ModelRef(name=info.name, family=info.family, fingerprint=info.fingerprint),
        context=ProfileContext(num_inference_steps=steps),
        **sections,
    )


@pytest.fixture
def bundle(embedded_pipe) -> TierBundle:
    info = difftune.describe(embedded_pipe)
    mask = np.ones(info.mask_shape(8), dtype=bool)
    mask[1::2] = False
    return TierBundle(
        {
            "lossless": _profile(embedded_pipe, "a", 8),
            "balanced": _profile(embedded_pipe, "b", 8, cache=CacheMaskConfig.from_array(info.components, mask)),
            "fast": _profile(
                embedded_pipe,
                "c",
                4,
                solver=SolverSchedule.from_scheduler(embedded_pipe.scheduler, 4),
                cache=FORAConfig(interval=2),
            ),
        }
    )


def _images(pipe, **kwargs) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    return pipe(class_labels=[3, 8], generator=generators, output_type="pt", **kwargs).images


def test_switching_tiers_on_one_pipeline_equals_applying_each_alone(embedded_pipe, bundle, tmp_path):
    expected = {}
    for name in bundle.names:  # each tier applied on its own, then removed
        handle = difftune.apply_profile(embedded_pipe, bundle[name])
        expected[name] = _images(embedded_pipe, num_inference_steps=bundle[name].context.num_inference_steps)
        handle.remove()
    plain = _images(embedded_pipe, num_inference_steps=8)
    path = bundle.save(tmp_path / "tiers.json")
    switch = TierSwitch(embedded_pipe, path)
    assert switch.current is None and switch.bundle == bundle
    for name in ["fast", "balanced", "fast", "lossless", "balanced"]:  # switches in any order
        switch.use(name)
        assert switch.current == name
        assert switch.call_kwargs() == {"num_inference_steps": bundle[name].context.num_inference_steps}
        assert torch.equal(_images(embedded_pipe, **switch.call_kwargs()), expected[name]), name
    assert not torch.equal(expected["fast"], expected["lossless"])
    assert switch.use("balanced") == "balanced"  # already active: nothing changes
    switch.close()
    assert switch.current is None and torch.equal(_images(embedded_pipe, num_inference_steps=8), plain)
    assert type(embedded_pipe.scheduler).__name__ != "USFScheduler"  # the fast tier's scheduler is gone too
    with pytest.raises(ProfileError, match="no tier 'turbo'; this bundle has lossless, balanced, fast"):
        switch.use("turbo")


def test_bundles_are_validated_with_the_tier_named(embedded_pipe, bundle, tmp_path):
    data = bundle.to_dict()
    assert list(data["tiers"]) == ["lossless", "balanced", "fast"]
    assert load_tiers(json.loads(json.dumps(data))) == bundle
    with pytest.raises(ProfileError, match="kind 'difftune-tiers'"):
        load_tiers({"tiers": data["tiers"]})
    with pytest.raises(ProfileError, match="version 7"):
        load_tiers({**data, "version": 7})
    broken = json.loads(json.dumps(data))
    broken["tiers"]["fast"]["context"]["num_inference_steps"] = 5
    with pytest.raises(ProfileError, match="tier 'fast': solver: has 4 steps"):
        load_tiers(broken)
    other = _profile(embedded_pipe, "x", 8)
    other = Profile(name="x", model=ModelRef("other", "embedded", "sha256:other"), context=other.context)
    with pytest.raises(ProfileError, match="same model weights"):
        TierBundle({"a": bundle["lossless"], "b": other})
    with pytest.raises(ProfileError, match="tuned for other"):
        TierSwitch(embedded_pipe, TierBundle({"b": other}))
    with pytest.raises(ProfileError, match="no tier bundle at"):
        load_tiers(tmp_path / "missing.json")


def test_the_tiers_command_exports_each_tier_on_held_out_samples(embedded_pipe, tmp_path, capsys):
    from difftune.search import run_study

    url = f"sqlite:///{tmp_path / 'd.db'}"
    run_study(pipeline=embedded_pipe, budget=3, storage=url, study="s", samples=4, num_inference_steps=6)
    out = tmp_path / "tiers.json"
    main(["tiers", "--study", "s", "--storage", url, "--out", str(out),
          "--tier", "fast=fastest where psnr<99", "--tier", "lossless=best psnr"])  # fmt: skip
    # rich wraps at the console's width, where the temporary path's length puts the break
    printed = " ".join(capsys.readouterr().out.split())
    assert f"wrote {out} (2 tiers: fast, lossless)" in printed
    bundle = load_tiers(out)
    assert bundle.names == ["fast", "lossless"]
    assert [p.name for p in bundle.tiers.values()] == ["fast", "lossless"]
    fast, lossless = bundle["fast"], bundle["lossless"]
    assert fast.metrics["psnr"]["split"] == "held_out" and fast.metrics["psnr"]["value"] < 99
    assert lossless.metrics["psnr"]["value"] >= fast.metrics["psnr"]["value"]
    switch = TierSwitch(embedded_pipe, bundle)  # the tiers apply to the study's model
    switch.use("fast")
    switch.close()
    with pytest.raises(SystemExit) as exit_info:
        main(["tiers", "--study", "s", "--storage", url, "--tier", "bad"])
    assert exit_info.value.code == 2
