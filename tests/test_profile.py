"""Profiles: JSON round trip, validation with named fields, apply/remove exactness, model checks."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

import difftune
from difftune.accel.cache import CacheMaskConfig, FORAConfig
from difftune.profile import SCHEMA_VERSION, ModelRef, Profile, ProfileContext

STEPS = 6


def make_profile(pipe, cache=None, steps=STEPS, **overrides) -> Profile:
    info = difftune.describe(pipe)
    if cache is None:
        mask = np.ones(info.mask_shape(steps), dtype=bool)
        mask[1::2, 2:] = False
        cache = CacheMaskConfig.from_array(info.components, mask)
    fields = {
        "name": "test",
        "model": ModelRef(name="embedded", family=info.family, fingerprint=info.fingerprint),
        "context": ProfileContext(num_inference_steps=steps, guidance_scale=1.5),
        "cache": cache,
        "metrics": {"speedup": {"value": 1.4, "unit": "x", "direction": "maximize"}},
        "provenance": {"study": "s", "trial": 3, "versions": {"torch": torch.__version__}},
    }
    fields.update(overrides)
    return Profile(**fields)


def _run(pipe, steps=STEPS):
    return pipe(
        class_labels=[0, 5], num_inference_steps=steps, generator=torch.Generator().manual_seed(2), output_type="pt"
    ).images


def test_round_trip_through_a_file(embedded_pipe, tmp_path):
    profile = make_profile(embedded_pipe)
    path = profile.save(tmp_path / "p.json")
    assert difftune.load_profile(path) == profile
    assert difftune.load_profile(json.loads(path.read_text())) == profile
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]  # no temporary file left behind


def test_apply_then_remove_restores_the_pipeline_exactly(embedded_pipe):
    base = _run(embedded_pipe)
    profile = make_profile(embedded_pipe)
    handle = difftune.apply_profile(embedded_pipe, profile)
    accelerated = _run(embedded_pipe)
    handle.remove()
    handle.remove()  # idempotent
    assert not torch.equal(accelerated, base)
    assert torch.equal(_run(embedded_pipe), base)
    # the same as applying the section directly
    direct = profile.cache.apply(embedded_pipe)
    assert torch.equal(_run(embedded_pipe), accelerated)
    direct.remove()


def test_profile_for_other_weights_is_refused_unless_not_strict(embedded_pipe):
    other = make_profile(embedded_pipe, model=ModelRef("x", "embedded", "sha256:" + "0" * 32))
    with pytest.raises(difftune.ProfileError, match="other weights"):
        difftune.apply_profile(embedded_pipe, other)
    with pytest.warns(UserWarning, match="other weights"):
        handle = difftune.apply_profile(embedded_pipe, other, strict=False)
    handle.remove()
    wrong_family = make_profile(embedded_pipe, model=ModelRef("x", "sdxl", "sha256:0"))
    with pytest.raises(difftune.ProfileError, match="sdxl model"):
        difftune.apply_profile(embedded_pipe, wrong_family)


def test_policy_profiles_apply(embedded_pipe):
    profile = make_profile(embedded_pipe, cache=FORAConfig(interval=2))
    handle = difftune.apply_profile(embedded_pipe, profile)
    assert not torch.equal(_run(embedded_pipe), _run_after_remove(handle, embedded_pipe))


def _run_after_remove(handle, pipe):
    handle.remove()
    return _run(pipe)


def test_newer_schema_is_refused(embedded_pipe):
    data = make_profile(embedded_pipe).to_dict()
    data["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(difftune.ProfileError, match="upgrade difftune"):
        difftune.load_profile(data)


def test_not_json_and_pickles_are_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 1,\n "name": }')
    with pytest.raises(difftune.ProfileError, match=r"not valid JSON.*line 2"):
        difftune.load_profile(bad)
    pickled = tmp_path / "p.pkl"
    pickled.write_bytes(pickle.dumps({"schema_version": 1}))
    with pytest.raises(difftune.ProfileError):
        difftune.load_profile(pickled)
    with pytest.raises(difftune.ProfileError, match="no profile at"):
        difftune.load_profile(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d.pop("model"), "profile.model: missing"),
        (lambda d: d["model"].update(family="sd9"), "model.family: 'sd9' is not one of"),
        (lambda d: d["context"].update(num_inference_steps=0), "context.num_inference_steps: must be >= 1"),
        (lambda d: d["context"].update(num_inference_steps=7), "cache: has 6 steps but context"),
        (lambda d: d["context"].update(guidance_scale="high"), "context.guidance_scale"),
        (lambda d: d.update(cache={"kind": "weird"}), "cache.kind: unknown kind 'weird'; known kinds: mask, policy"),
        (lambda d: d.update(sparsity=[1]), "sparsity: expected an object"),
        (lambda d: d["metrics"].update(psnr={"value": 30}), "metrics.psnr.unit: missing"),
        (lambda d: d["metrics"].update(psnr={"value": float("nan"), "unit": "dB"}), "metrics.psnr.value"),
        (lambda d: d.update(extra=1), "unknown key"),
    ],
)
def test_malformed_profiles_name_the_bad_field(embedded_pipe, change, message):
    data = make_profile(embedded_pipe).to_dict()
    change(data)
    with pytest.raises(difftune.ProfileError, match=message):
        difftune.load_profile(data)
