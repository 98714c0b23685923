"""export: held-out re-measurement, --no-validate, nothing written on bad input, the diffusers format."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import diffusers
import pytest
import torch

import difftune
from difftune.accel.first_block_cache import FirstBlockCacheConfig
from difftune.accel.solver import SolverSchedule
from difftune.errors import DifftuneError, StoreError
from difftune.evaluators import SEED_RANGES
from difftune.search import run_study
from difftune.search.export import export_point
from difftune.spaces import SpaceContext, to_profile
from difftune.store import HELD_OUT, get_store

STEPS = 6


# Tiny models on a busy 2-core box: one thread avoids thread hand-offs (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def study_db(tmp_path_factory, embedded_pipe):
    """A tiny calibrated cache study 's' (identity, FORA 2, FORA 3) on 4 calibration samples."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        db = tmp_path_factory.mktemp("exp") / "d.db"
        run_study(
            pipeline=embedded_pipe,
            budget=3,
            storage=f"sqlite:///{db}",
            study="s",
            samples=4,
            num_inference_steps=STEPS,
            latency_repeats=1,
        )
    finally:
        torch.set_num_threads(before)
    return db


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copy_db(db: Path, tmp_path: Path) -> str:
    """A copy of the database (through SQLite's backup API: the original is in WAL mode)."""
    import sqlite3

    target = tmp_path / "copy.db"
    with sqlite3.connect(db) as source, sqlite3.connect(target) as dest:
        source.backup(dest)
    return f"sqlite:///{target}"


def test_export_re_measures_on_held_out_samples_and_stores_them(study_db, tmp_path, embedded_pipe):
    url = _copy_db(study_db, tmp_path)
    out = tmp_path / "p.json"
    # psnr<99 keeps the identity (PSNR 100) out: with one timed repeat on a busy machine it can time fastest
    select = "fastest where psnr<99"
    result = export_point(url, "s", select, out, pipeline=embedded_pipe, latency_repeats=1)
    assert result.path == out and result.validated
    profile = difftune.load_profile(out)  # round-trips through the validating loader
    assert profile.metrics == result.profile.metrics

    psnr = profile.metrics["psnr"]
    assert psnr["split"] == "held_out" and psnr["unit"] == "dB" and psnr["direction"] == "maximize"
    assert psnr["value"] == result.held_out["psnr"] and psnr["calibration"] == result.calibration["psnr"]
    # the fastest point reuses features, so its images differ from the reference: the held-out
    # images (other noise) give other figures than the calibration ones
    assert psnr["value"] < 99 and psnr["value"] != psnr["calibration"]

    prov = profile.provenance
    assert prov["study"] == "s" and prov["select"] == select and prov["trial"] == result.trial.number
    assert prov["held_out_samples"] == 4 and "created" in prov
    first, last = prov["held_out_seeds"]
    assert first in SEED_RANGES["held_out"] and last in SEED_RANGES["held_out"]
    assert not set(range(first, last + 1)) & set(SEED_RANGES["calibration"][:10])

    with get_store(url) as store:
        trial = store.get_trial(result.trial.id)
        assert trial.values(HELD_OUT) == pytest.approx(result.held_out)
        assert trial.value("psnr") == psnr["calibration"]  # the calibration figures are untouched
        [saved] = store.list_profiles("s")
        assert saved.trial_id == trial.id and json.loads(saved.text)["metrics"]["psnr"]["split"] == "held_out"

    # exporting again replaces the held-out timing figures instead of failing on the stored ones
    again = export_point(url, "s", "fastest", out, pipeline=embedded_pipe, latency_repeats=1)
    assert again.held_out["psnr"] == pytest.approx(result.held_out["psnr"])


def test_no_validate_keeps_the_calibration_figures(study_db, tmp_path):
    url = _copy_db(study_db, tmp_path)
    out = tmp_path / "p.json"
    result = export_point(url, "s", "best psnr", out, validate=False)
    profile = difftune.load_profile(out)
    assert not result.validated and result.held_out == {}
    for name, value in result.calibration.items():
        assert profile.metrics[name]["value"] == value and profile.metrics[name]["split"] == "calibration"
    with get_store(url) as store:
        assert store.get_trial(result.trial.id).values(HELD_OUT) == {}


def test_unsatisfiable_select_writes_nothing(study_db, tmp_path, embedded_pipe):
    before = _digest(study_db)
    out = tmp_path / "out" / "p.json"
    with pytest.raises(StoreError, match="the closest is trial"):
        export_point(f"sqlite:///{study_db}", "s", "fastest where psnr>=1000", out, pipeline=embedded_pipe)
    with pytest.raises(DifftuneError, match="select"):
        export_point(f"sqlite:///{tmp_path / 'never.db'}", "s", "quickest", out)
    assert not out.exists() and not (tmp_path / "never.db").exists()
    assert _digest(study_db) == before


def test_weights_changed_since_the_study_is_an_error(study_db, tmp_path, embedded_pipe):
    url = _copy_db(study_db, tmp_path)
    before = _digest(Path(url.removeprefix("sqlite:///")))
    changed = copy.deepcopy(embedded_pipe)
    with torch.no_grad():
        next(changed.transformer.parameters()).add_(1e-3)
    out = tmp_path / "p.json"
    with pytest.raises(DifftuneError, match=r"weights .* changed since study 's'"):
        export_point(url, "s", "fastest", out, pipeline=changed)
    assert not out.exists()
    assert _digest(Path(url.removeprefix("sqlite:///"))) == before


def _study_with(
    tmp_path: Path, pipe, sections: dict, space: str = "solver", memory: bool = False, **settings
) -> tuple[str, object]:
    """A store holding one complete trial of ``sections`` (calibration figures made up) in study 'p'."""
    url = f"sqlite:///{tmp_path / 'p.db'}"
    info = difftune.describe(pipe)
    profile = to_profile(sections, SpaceContext.from_pipeline(pipe, num_inference_steps=STEPS), name="point")
    with get_store(url) as store:
        model = store.create_model("embedded", info.family, info.fingerprint)
        study = store.create_study(
            "p",
            model_id=model.id,
            space=space,
            searcher="random",
            objectives=["speedup", "psnr", *(["weight_memory_mb"] if memory else []), "class_accuracy"],
            reference={
                "model": "embedded",
                "num_inference_steps": STEPS,
                "samples": 2,
                "metrics": ["psnr", *(["weight_memory_mb"] if memory else [])],
                **settings,
            },
        )
        trial = store.add_trial(study.id, {}, config={"profile": profile.to_dict()})
        made_up = {"speedup": 1.0, "psnr": 40.0, "class_accuracy": 1.0, **({"weight_memory_mb": 1.0} if memory else {})}
        store.set_trial_state(trial.id, "complete", metrics=made_up)
    return url, profile


def _images(pipe, **kwargs):
    generators = [torch.Generator().manual_seed(s) for s in (0, 1, 2)]
    return pipe(class_labels=[1, 4, 7], generator=generators, output_type="pt", **kwargs).images


def test_diffusers_format_reproduces_a_dpm_solver_profile(tmp_path, embedded_pipe):
    schedule = SolverSchedule.from_scheduler(embedded_pipe.scheduler, STEPS)  # DPM-Solver++(2M)'s steps
    url, profile = _study_with(tmp_path, embedded_pipe, {"solver": schedule})
    out = tmp_path / "export"
    result = export_point(url, "p", "fastest", out, format="diffusers", validate=False, pipeline=embedded_pipe)
    assert result.path == out and out.is_dir() and result.notes == ()
    assert difftune.load_profile(out / "profile.json").solver == schedule
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "DPMSolverMultistepScheduler" and config["algorithm_type"] == "dpmsolver++"
    call_kwargs = json.loads((out / "call_kwargs.json").read_text())
    assert call_kwargs["timesteps"] == [round(t) for t in schedule.timesteps]

    handle = difftune.apply_profile(embedded_pipe, profile)
    try:
        ours = _images(embedded_pipe, num_inference_steps=STEPS)
    finally:
        handle.remove()
    plain = copy.copy(embedded_pipe)
    native = diffusers.DPMSolverMultistepScheduler.from_pretrained(out, subfolder="scheduler")
    plain.scheduler = native
    theirs = _images(plain, **call_kwargs)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_diffusers_format_names_what_has_no_equivalent(tmp_path, embedded_pipe):
    info = difftune.describe(embedded_pipe)
    from difftune.accel.cache import CacheMaskConfig

    mask = [[[1 if s % 2 == 0 or b == 0 else 0 for _ in info.components] for b in info.blocks] for s in range(STEPS)]
    cache = CacheMaskConfig.from_dict({"kind": "mask", "components": list(info.components), "mask": mask})
    unipc = SolverSchedule.from_scheduler(embedded_pipe.scheduler, STEPS, corrector=True)
    url, _ = _study_with(tmp_path, embedded_pipe, {"solver": unipc, "cache": cache})
    out = tmp_path / "export"
    result = export_point(url, "p", "fastest", out, format="diffusers", validate=False, pipeline=embedded_pipe)
    [note] = result.notes
    assert "cache" in note and "solver" in note and "difftune.apply_profile" in note
    assert sorted(p.name for p in out.iterdir()) == ["diffusers_usage.json", "profile.json"]
    usage = json.loads((out / "diffusers_usage.json").read_text())
    assert set(usage["not_expressible"]) == {"solver", "cache"}


def test_an_analytical_first_step_has_no_diffusers_equivalent(embedded_pipe):
    import dataclasses

    from difftune.profile import ModelRef
    from difftune.search.export import diffusers_pieces

    info = difftune.describe(embedded_pipe)
    schedule = SolverSchedule.from_scheduler(embedded_pipe.scheduler, STEPS)  # expressible as it is
    afs = dataclasses.replace(schedule, analytic_first=True)
    for solver, expressible in ((schedule, True), (afs, False)):
        profile = difftune.Profile(
            name="p",
            model=ModelRef(info.name, info.family, info.fingerprint),
            context=difftune.ProfileContext(num_inference_steps=STEPS),
            solver=solver,
        )
        pieces = diffusers_pieces(profile, embedded_pipe)
        assert ("solver" in pieces.expressible) == expressible
    assert "analytical first step" in pieces.not_expressible["solver"]


def test_diffusers_format_first_block_cache(tmp_path, embedded_pipe):
    url, _ = _study_with(tmp_path, embedded_pipe, {"cache": FirstBlockCacheConfig(threshold=0.1)})
    out = tmp_path / "export"
    result = export_point(url, "p", "fastest", out, format="diffusers", validate=False, pipeline=embedded_pipe)
    assert result.notes == ()
    assert json.loads((out / "cache_config.json").read_text()) == {"class": "FirstBlockCacheConfig", "threshold": 0.1}
    # a second export replaces the directory in one rename, leaving no temporary directory behind
    export_point(url, "p", "fastest", out, format="diffusers", validate=False, pipeline=embedded_pipe)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "p.db"]


def _fake_held_out(psnr_by_trial):
    """A stand-in for export's held-out measurement: each trial's calibration figures, PSNR replaced."""
    import difftune.search.export as export_module

    measured = []

    def fake(pipe, profile, chosen, settings, calibration, latency_repeats):
        trial = int(profile.name.split()[-1]) if profile.name.startswith("trial") else None
        name = profile.name if trial is None else trial
        measured.append(name)
        return {**calibration, "psnr": psnr_by_trial.get(name, calibration["psnr"])}

    return export_module, fake, measured


def test_export_writes_the_first_candidate_that_keeps_the_selection_on_held_out_samples(
    study_db, tmp_path, monkeypatch
):
    url = _copy_db(study_db, tmp_path)
    front = get_store(url).pareto_front("s")
    by_speed = sorted(front, key=lambda t: -t.value("speedup"))
    bound = min(t.value("psnr") for t in by_speed) - 1.0  # every point meets it on calibration samples
    fastest, second = by_speed[0], by_speed[1]
    labels = {t.number: (t.config or {}).get("baseline") for t in front}
    module, fake, measured = _fake_held_out({labels[fastest.number]: bound - 3.0})  # the fastest breaks it
    monkeypatch.setattr(module, "_measure", fake)
    result = export_point(url, "s", f"fastest where psnr>={bound}", tmp_path / "p.json", samples=2)
    assert result.trial.number == second.number and [t.number for t in result.rejected] == [fastest.number]
    assert measured == [labels[fastest.number], labels[second.number]]
    assert result.profile.metrics["psnr"]["value"] >= bound
    # both candidates' held-out figures are kept in the store
    store = get_store(url)
    assert store.get_trial(fastest.id).value("psnr", HELD_OUT) == bound - 3.0


def test_export_writes_nothing_when_no_candidate_keeps_the_selection_on_held_out_samples(
    study_db, tmp_path, monkeypatch
):
    url = _copy_db(study_db, tmp_path)
    front = get_store(url).pareto_front("s")
    bound = min(t.value("psnr") for t in front) - 1.0
    labels = {(t.config or {}).get("baseline"): bound - 2.0 - t.number for t in front}
    module, fake, measured = _fake_held_out(labels)
    monkeypatch.setattr(module, "_measure", fake)
    out = tmp_path / "none" / "p.json"
    with pytest.raises(
        StoreError, match=r"on held-out samples \(tried trial .*nothing written\); the closest is trial"
    ):
        export_point(url, "s", f"fastest where psnr>={bound}", out, samples=2)
    assert len(measured) == len(front) and not out.exists()
    with pytest.raises(StoreError, match="tried trial"):
        export_point(url, "s", f"fastest where psnr>={bound}", out, samples=2, max_candidates=1)
    assert len(measured) == len(front) + 1


def test_export_for_another_step_count_re_measures_there_and_stores_nothing(study_db, tmp_path, embedded_pipe):
    url = _copy_db(study_db, tmp_path)
    out = tmp_path / "p8.json"
    result = export_point(
        url, "s", "fastest where psnr<99", out, pipeline=embedded_pipe, latency_repeats=1, steps=8, guidance_scale=3.0
    )
    profile = difftune.load_profile(out)
    assert (profile.context.num_inference_steps, profile.context.guidance_scale) == (8, 3.0)
    moved = profile.provenance["transferred"]
    assert moved["num_inference_steps"] == [STEPS, 8] and moved["guidance_scale"][1] == 3.0 and len(moved) == 2
    cache = profile.cache
    if hasattr(cache, "num_steps"):
        assert cache.num_steps == 8
    assert result.held_out["speedup"] > 0 and profile.metrics["psnr"]["value"] == result.held_out["psnr"]
    # the figures at 8 steps are not the study's held-out figures: nothing was stored for them
    with get_store(url) as store:
        assert store.get_trial(result.trial.id).values(HELD_OUT) == {}
    # it applies at 8 steps
    handle = difftune.apply_profile(embedded_pipe, profile)
    try:
        images = embedded_pipe(class_labels=[3], num_inference_steps=8, output_type="pt").images
    finally:
        handle.remove()
    assert torch.isfinite(images).all()


def test_moving_steps_needs_validation_and_a_movable_profile(study_db, tmp_path, embedded_pipe):
    import dataclasses

    from difftune.search.export import transfer_profile

    url = _copy_db(study_db, tmp_path)
    with pytest.raises(DifftuneError, match="re-measured"):
        export_point(url, "s", "best psnr", tmp_path / "x.json", validate=False, steps=8)
    with pytest.raises(DifftuneError, match="guidance-scale"):
        export_point(url, "s", "best psnr", tmp_path / "x.json", guidance_scale=float("nan"))
    assert not (tmp_path / "x.json").exists()
    context = SpaceContext.from_pipeline(embedded_pipe, num_inference_steps=STEPS)
    solver = SolverSchedule.from_scheduler(embedded_pipe.scheduler, STEPS)
    profile = to_profile({"solver": solver}, context)
    with pytest.raises(DifftuneError, match="solver section is tied to its step count"):
        transfer_profile(profile, 8)
    assert transfer_profile(profile, STEPS) is profile
    plain = dataclasses.replace(profile, solver=None)
    assert transfer_profile(plain, 9).context.num_inference_steps == 9


def test_a_joint_point_exports_all_four_sections_with_held_out_figures(tmp_path, embedded_pipe):
    from difftune.accel.quant import served_weight_memory
    from difftune.spaces import JointSpace

    context = SpaceContext.from_pipeline(embedded_pipe, num_inference_steps=STEPS, nfe_range=(3, STEPS))
    space = JointSpace()
    params = {
        **space.default_params(context),
        "nfe": STEPS,
        "use_cache": True,
        "use_sada": True,
        "use_quant": True,
        "sada_threshold": 0.02,
        "sada_max_downsample": 0,
        "q_w_rest": 8,
    }
    sections = space.decode(params, context)
    assert set(sections) == {"solver", "cache", "sparsity", "quantization"}
    url, _ = _study_with(tmp_path, embedded_pipe, sections, space="joint", memory=True)
    out = tmp_path / "joint.json"
    result = export_point(url, "p", "fastest", out, pipeline=embedded_pipe, latency_repeats=1)
    profile = difftune.load_profile(out)
    for name in ("solver", "cache", "sparsity", "quantization"):
        assert getattr(profile, name) == sections[name], name
    assert profile.metrics["psnr"]["split"] == "held_out" and result.validated
    # the held-out figures were measured with all four applied: fewer weights' bytes, other images than plain
    plain_mb = served_weight_memory(embedded_pipe).quantized_bytes / 2**20
    assert result.held_out["weight_memory_mb"] < plain_mb
    assert result.held_out["psnr"] < 99


def test_dpm_solver_v3_steps_have_no_diffusers_equivalent(embedded_pipe):
    import dataclasses

    import numpy as np

    from difftune.accel._ems import EMS
    from difftune.profile import ModelRef
    from difftune.search.export import diffusers_pieces

    info = difftune.describe(embedded_pipe)
    schedule = SolverSchedule.from_scheduler(embedded_pipe.scheduler, STEPS)
    lam = SolverSchedule.point_lambdas(schedule.timesteps, None, embedded_pipe.scheduler)
    grid = np.linspace(lam[0], lam[-2], 41)
    ones, zeros = np.ones((41, 1, 16, 16)), np.zeros((41, 1, 16, 16))
    table = EMS(grid, ones, zeros, zeros).table(lam)
    steps = tuple(dataclasses.replace(s, prediction="v3") for s in schedule.steps[:-1]) + schedule.steps[-1:]
    v3 = dataclasses.replace(schedule, steps=steps, ems=table)
    profile = difftune.Profile(
        name="p",
        model=ModelRef(info.name, info.family, info.fingerprint),
        context=difftune.ProfileContext(num_inference_steps=STEPS),
        solver=v3,
    )
    pieces = diffusers_pieces(profile, embedded_pipe)
    assert "solver" not in pieces.expressible and "DPM-Solver-v3" in pieces.not_expressible["solver"]


def test_export_fit_fits_the_solver_knobs_and_re_measures_the_fitted_schedule(tmp_path, embedded_pipe):
    schedule = SolverSchedule.from_scheduler(embedded_pipe.scheduler, STEPS)  # DPM-Solver++(2M)'s steps
    url, _ = _study_with(tmp_path, embedded_pipe, {"solver": schedule}, reference_steps=40)
    with pytest.raises(DifftuneError, match="--fit"):
        export_point(url, "p", "best psnr", tmp_path / "x.json", validate=False, fit=10)
    out = tmp_path / "fitted.json"
    result = export_point(url, "p", "best psnr", out, pipeline=embedded_pipe, latency_repeats=1, fit=30, fit_samples=4)
    profile = difftune.load_profile(out)
    fitted = profile.provenance["fitted"]
    assert fitted["evaluations"] == 30 and fitted["samples"] == 4 and fitted["reference_steps"] == 40
    before, after = fitted["calibration_mse"]
    assert after < before
    # the discrete decisions stay, the continuous ones moved
    assert profile.solver != schedule
    assert [(s.order, s.prediction, s.corrector) for s in profile.solver.steps] == [
        (s.order, s.prediction, s.corrector) for s in schedule.steps
    ]
    # held-out figures of the fitted schedule; no calibration figures (the study measured the unfitted one)
    assert profile.metrics["psnr"]["split"] == "held_out" and "calibration" not in profile.metrics["psnr"]
    assert result.held_out["psnr"] == profile.metrics["psnr"]["value"]
    with get_store(url) as store:  # the trial's own held-out figures are not the fitted schedule's
        assert store.get_trial(result.trial.id).values(HELD_OUT) == {}
    plain = export_point(url, "p", "best psnr", tmp_path / "plain.json", pipeline=embedded_pipe, latency_repeats=1)
    assert "fitted" not in plain.profile.provenance
    # on held-out seeds the fitted schedule is closer to the 40-step reference than the one it came from
    assert result.held_out["psnr"] > plain.held_out["psnr"], (result.held_out, plain.held_out)
