"""DPM-Solver-v3 in the ``solver`` space and in studies: statistics computed on the embedded model and cached,
the ``v3`` prediction offered only with them, decoded schedules that run, and the study setting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difftune.errors import DifftuneError, SpaceError
from difftune.evaluators import Sample, batch_kwargs
from difftune.spaces import SpaceContext, get_space

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def ems(embedded_pipe, tmp_path_factory):
    from difftune.search.ems import compute_ems, ems_samples

    root = tmp_path_factory.mktemp("ems")
    samples = ems_samples([Sample(i % 10, i) for i in range(10)], 24)
    first = compute_ems(embedded_pipe, samples, grid_steps=60, batch_size=12, cache_dir=root)
    return first, root, samples


def test_statistics_are_cached_and_recomputed_the_same(embedded_pipe, ems):
    from difftune.search.ems import compute_ems

    first, root, samples = ems
    files = list(root.rglob("ems-*.safetensors"))
    assert len(files) == 1 and first.source["samples"] == 24 and first.steps == 60
    assert first.l.shape == (61, 1, 16, 16)
    # l is the diagonal of σ·∇ε̂: 1 at pure noise (ε̂ ≈ x), below 1 where the model denoises
    assert abs(float(first.l[0].mean()) - 1.0) < 0.02 and float(first.l[-1].mean()) < 0.9
    again = compute_ems(embedded_pipe, samples, grid_steps=60, batch_size=12, cache_dir=root)
    assert again.source["seconds"] == first.source["seconds"]  # read from the file, not recomputed
    fresh = compute_ems(embedded_pipe, samples, grid_steps=60, batch_size=12, cache_dir=root, use_cache=False)
    for name in ("l", "s", "b"):
        np.testing.assert_allclose(getattr(fresh, name), getattr(first, name), rtol=1e-9, atol=1e-12)
    with pytest.raises(SpaceError, match="at least 2"):
        compute_ems(embedded_pipe, samples[:1], cache_dir=root)


def test_v3_is_offered_only_with_statistics(embedded_pipe, ems):
    space = get_space("solver")
    plain = SpaceContext.from_pipeline(embedded_pipe, nfe_range=(3, 8), keep_pipeline=False)
    with_ems = plain.replace(ems=ems[0])
    choices = {c.name: c.choices for c in space.variables(plain)}["prediction"]
    assert choices == ("data", "noise")
    assert {c.name: c.choices for c in space.variables(with_ems)}["prediction"] == ("data", "noise", "v3")
    params = space.default_params(plain)
    params.update(nfe=5, prediction="v3")
    # repair makes it a valid value and says so; decoding a v3 point without statistics is refused
    assert any("prediction: 'v3' is not a valid value" in c for c in space.repair(params, plain).changes)
    with pytest.raises(SpaceError, match="--ems"):
        space._decode({**space.repair(params, plain).params, "prediction": "v3"}, plain)


def _mse(pipe, schedule, held, reference) -> float:
    handle = schedule.apply(pipe)
    try:
        out = pipe(**batch_kwargs(held), num_inference_steps=schedule.num_steps, output_type="pt").images
    finally:
        handle.remove()
    return float(((out - reference) ** 2).mean())


def test_v3_points_decode_encode_and_beat_the_data_prediction(embedded_pipe, ems):
    space = get_space("solver")
    context = SpaceContext.from_pipeline(embedded_pipe, nfe_range=(3, 8), keep_pipeline=False).replace(ems=ems[0])
    params = space.default_params(context)
    params.update(nfe=5, grid="logsnr_uniform", order=2, prediction="v3", corrector=True, corrector_kind="unic")
    params = dict(space.repair(params, context).params)
    schedule = space.decode(params, context)["solver"]
    kinds = [(s.prediction, s.corrector, s.corrector_kind) for s in schedule.steps]
    # v3 steps take USF's corrector; the last step lands on σ = 0, outside the statistics: data, order 1
    assert kinds[:4] == [("v3", True, "usf")] * 4 and kinds[4] == ("data", False, "unic")
    assert schedule.ems is not None and schedule.ems.lambdas[-1] is None
    again = space.decode(space.repair(space.encode({"solver": schedule}, context), context).params, context)
    assert again["solver"].steps == schedule.steps
    # USF's average_x0: the analytical first step starts from the statistics' mean sample
    assert "afs_x0" in {v.name for v in space.variables(context)}
    averaged = space.decode({**params, "analytic_first": True, "afs_x0": "average"}, context)["solver"]
    np.testing.assert_array_equal(averaged.first_x0.array, ems[0].x0_mean)
    assert float(np.abs(ems[0].x0_mean).mean()) > 0.05  # digits: a dark background, not zero
    encoded = space.encode({"solver": averaged}, context)
    assert encoded["afs_x0"] == "average" and space.decode(encoded, context)["solver"] == averaged

    held = [Sample(i % 10, 900_000 + i) for i in range(10)]
    reference = embedded_pipe(**batch_kwargs(held), num_inference_steps=200, output_type="pt").images
    params.update(corrector=False)
    v3 = space.decode(space.repair(params, context).params, context)["solver"]
    params.update(prediction="data")
    data = space.decode(space.repair(params, context).params, context)["solver"]
    assert [s.prediction for s in v3.steps] == ["v3"] * 4 + ["data"]
    mse_v3, mse_data = _mse(embedded_pipe, v3, held, reference), _mse(embedded_pipe, data, held, reference)
    assert torch.isfinite(torch.tensor(mse_v3)) and mse_v3 < 0.7 * mse_data, (mse_v3, mse_data)


def test_ems_is_a_study_setting(tmp_path):
    from difftune.search.runner import run_study
    from difftune.search.settings import StudySettings

    with pytest.raises(DifftuneError, match="--ems 1"):
        StudySettings(ems=1)
    assert StudySettings.from_dict({"model": "embedded"}).ems == 0  # studies made before the setting: off
    assert "ems" in StudySettings.COMPARED
    with pytest.raises(SpaceError, match="for the solver space, not 'cache'"):
        run_study(space="cache", budget=1, ems=8, storage=f"sqlite:///{tmp_path / 'x.db'}")


def test_a_study_can_measure_fidelity_against_more_steps_than_it_times(tmp_path):
    from difftune.errors import StoreError
    from difftune.search.runner import run_study
    from difftune.search.settings import StudySettings
    from difftune.store import TrialState, get_store

    with pytest.raises(DifftuneError, match="--reference-steps"):
        StudySettings(reference_steps=0)
    assert "reference_steps" in StudySettings.COMPARED
    url = f"sqlite:///{tmp_path / 's.db'}"
    common = {"space": "cache", "budget": 1, "storage": url, "num_inference_steps": 4, "samples": 2, "memo": False}
    run_study(study="fine", reference_steps=40, **common)
    run_study(study="served", **common)
    with get_store(url) as store:
        fine, served = (store.list_trials(name, TrialState.COMPLETE)[0] for name in ("fine", "served"))
    # the first baseline is the plain pipeline itself: identical to the served reference, not to 40 steps
    assert fine.config.get("baseline") == served.config.get("baseline") == "identity"
    assert served.values()["psnr"] >= 99 and fine.values()["psnr"] < 40
    with pytest.raises(StoreError, match="reference_steps 40"):
        run_study(study="fine", reference_steps=50, **{**common, "budget": 2})


def test_a_v3_profile_saves_loads_and_applies(embedded_pipe, ems, tmp_path):
    import difftune
    from difftune.spaces import to_profile

    space = get_space("solver")
    context = SpaceContext.from_pipeline(embedded_pipe, nfe_range=(3, 8), keep_pipeline=False).replace(ems=ems[0])
    params = {**space.default_params(context), "nfe": 5, "prediction": "v3", "analytic_first": True}
    params.update(afs_x0="average", grid="logsnr_uniform")
    profile = to_profile(space.decode(params, context), context, name="v3")
    profile.save(tmp_path / "v3.json")
    loaded = difftune.load_profile(tmp_path / "v3.json")
    assert loaded.solver == profile.solver and loaded.solver.first_x0 is not None
    assert [s.prediction for s in loaded.solver.steps] == ["v3"] * 5 + ["data"]
    handle = difftune.apply_profile(embedded_pipe, loaded)
    try:
        out = embedded_pipe(
            class_labels=[3, 7], num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="pt"
        ).images
    finally:
        handle.remove()
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()
    direct = loaded.solver.apply(embedded_pipe)
    try:
        again = embedded_pipe(
            class_labels=[3, 7], num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="pt"
        ).images
    finally:
        direct.remove()
    assert torch.equal(out, again)  # the profile path runs the very schedule
