"""The study runner: budget of finished trials, resume without duplicates, failed trials, bad input."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import pytest
import torch

import difftune
from difftune.errors import EvaluationError, SpaceError
from difftune.search import run_study
from difftune.store import TrialState, get_store

TINY = {"samples": 2, "num_inference_steps": 6, "latency_repeats": 1}


# Tiny models on a busy 2-core box: one thread avoids thread hand-offs (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_budget_is_finished_trials_and_a_rerun_resumes(tmp_path, embedded_pipe):
    url = f"sqlite:///{tmp_path / 'd.db'}"
    events = []
    first = run_study(pipeline=embedded_pipe, budget=4, storage=url, study="s", progress=events.append, **TINY)
    assert first.finished == 4 and first.new_trials == 4
    assert [e.finished for e in events] == [1, 2, 3, 4] and all(e.budget == 4 for e in events)
    assert first.front and all(t.state is TrialState.COMPLETE for t in first.front)

    second = run_study(pipeline=embedded_pipe, budget=9, storage=url, study="s", **TINY)
    assert second.finished == 9 and second.new_trials == 5

    with get_store(url) as store:
        trials = store.list_trials("s")
        assert store.count_finished_trials("s") == 9 and len(trials) == 9
        assert len(store.list_fronts("s")) == 2
        assert store.get_study("s").status.value == "finished"
    baselines = [t.config["baseline"] for t in trials if t.config and t.config.get("baseline")]
    assert len(baselines) == len(set(baselines)) and "identity" in baselines
    numbers = [t.config["searcher_number"] for t in trials if t.config.get("searcher_number") is not None]
    assert len(numbers) == len(set(numbers))
    assert len(numbers) + len(baselines) == 9  # every trial is a baseline or a searched point
    for trial in trials:
        assert {"speedup", "psnr", "class_accuracy", "latency_ms", "nfe"} <= set(trial.values())
        # the stored profile is a valid, deployable profile for this model
        profile = difftune.load_profile(trial.config["profile"])
        assert profile.model.fingerprint == difftune.describe(embedded_pipe).fingerprint

    import optuna

    optuna_study = optuna.load_study(study_name="difftune:s", storage=url)
    searched = {t.number for t in optuna_study.trials if "difftune:baseline" not in t.user_attrs}
    assert searched == set(numbers) and all(
        t.state.is_finished() for t in optuna_study.trials
    )  # searched points were told; baselines the sampler can use were added as finished trials


def test_a_trial_that_raises_is_stored_failed_and_the_study_goes_on(tmp_path, embedded_pipe, monkeypatch):
    import difftune.evaluators as evaluators

    real = evaluators.evaluate
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise EvaluationError("the pipeline produced NaN in 2 of 2 images")
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluators, "evaluate", flaky)
    url = f"sqlite:///{tmp_path / 'd.db'}"
    result = run_study(pipeline=embedded_pipe, budget=4, storage=url, study="f", **TINY)
    assert result.finished == 4 and result.failed == 1
    with get_store(url) as store:
        failed = store.list_trials("f", TrialState.FAILED)
        assert len(failed) == 1
        assert failed[0].error == "EvaluationError: the pipeline produced NaN in 2 of 2 images"
        assert failed[0].metrics == ()
        assert store.count_trials("f", TrialState.COMPLETE) == 3
    # the pipeline is left as it was found: no hooks from the failed trial
    out = embedded_pipe(class_labels=[1], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert len(out.images) == 1


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"space": "nope"}, "nope"),
        ({"searcher": "annealing"}, "unknown searcher 'annealing'"),
        ({"objectives": ["speedup", "psnr"]}, "distribution, conditioning or blur-guard metric"),
        ({"objectives": ["speedup", "blurriness", "fid"]}, "unknown metric 'blurriness'"),
        ({"objectives": ["speedup", "psnr", "clip_score"]}, "clip_score"),
        ({"constraints": ["lpips<=0.1"]}, "lpips"),
        ({"constraints": ["psnr>>3"]}, "cannot parse constraint"),
        ({"device": "gpu"}, "expected cpu, cuda, cuda:N or mps"),
        ({"dtype": "int4"}, "--dtype 'int4'"),
        ({"negative_prompt": "blurry"}, "--negative-prompt"),
        ({"prompts": ["a red fox"]}, "--prompts"),
    ],
)
def test_bad_input_leaves_the_database_unchanged(tmp_path, embedded_pipe, kwargs, message):
    db = tmp_path / "d.db"
    url = f"sqlite:///{db}"
    run_study(pipeline=embedded_pipe, budget=1, storage=url, study="ok", **TINY)
    before = _digest(db)
    with pytest.raises(difftune.DifftuneError, match=message):
        run_study(pipeline=embedded_pipe, budget=3, storage=url, study="ok", **{**TINY, **kwargs})
    assert _digest(db) == before


def test_resuming_with_other_objectives_is_refused(tmp_path, embedded_pipe):
    url = f"sqlite:///{tmp_path / 'd.db'}"
    run_study(pipeline=embedded_pipe, budget=1, storage=url, study="o", **TINY)
    with pytest.raises(difftune.StoreError, match="cannot resume study 'o'"):
        run_study(pipeline=embedded_pipe, budget=2, storage=url, study="o", objectives=["speedup", "fid"], **TINY)


def test_budget_must_be_positive():
    with pytest.raises(SpaceError, match="budget"):
        run_study(budget=0)


@pytest.mark.parametrize("space", ["solver", "joint"])
def test_solver_and_joint_spaces_run_baselines_then_searched_points(tmp_path, embedded_pipe, space):
    url = f"sqlite:///{tmp_path / 'd.db'}"
    # NFE 3-4: DPM-Solver++ / UniPC / DDIM at 3 and 4 evaluations are the (6) solver baselines
    result = run_study(pipeline=embedded_pipe, space=space, budget=9, storage=url, study="j", nfe_range=(3, 4), **TINY)
    assert result.finished == 9 and result.failed == 0
    with get_store(url) as store:
        trials = store.list_trials("j")
        assert store.get_study("j").reference["nfe_range"] == [3, 4]
    names = [t.config.get("baseline") for t in trials]
    solver_baselines = [f"{m}_nfe{n}" for n in (3, 4) for m in ("dpmsolver++", "unipc", "ddim")]
    assert names[:6] == solver_baselines  # the space's baselines run first, in order
    for trial in trials:
        profile = difftune.load_profile(trial.config["profile"])
        nfe = trial.values()["nfe"]
        if trial.config.get("baseline") in solver_baselines or trial.config.get("searcher_number") is not None:
            # a solver schedule of 3 or 4 evaluations: the measured NFE is its evaluations (an analytical first
            # step is a grid step without one), and the call runs every grid step
            assert profile.solver is not None and profile.solver.nfe == nfe in (3, 4)
            assert (
                profile.context.num_inference_steps == profile.solver.num_steps == nfe + profile.solver.analytic_first
            )
            if profile.cache is not None:  # joint: the mask covers exactly the schedule's steps
                assert profile.cache.array.shape[0] == nfe


def test_nfe_range_is_checked_before_the_database_is_touched(tmp_path):
    with pytest.raises(SpaceError, match="nfe_range"):
        run_study(budget=1, nfe_range=(5, 3), storage=f"sqlite:///{tmp_path / 'd.db'}")
    assert not (tmp_path / "d.db").exists()


def test_a_heartbeat_that_cannot_be_written_is_logged_not_swallowed(caplog):
    import time

    from difftune.search.runner import _Heartbeat

    class BusyStore:
        def heartbeat(self, trial_id):
            raise difftune.StoreError("database is locked")

    with caplog.at_level("WARNING", logger="difftune.search"), _Heartbeat(BusyStore(), 7, interval=0.01):
        time.sleep(0.1)
    assert any("heartbeat of trial id 7 not written" in r.getMessage() for r in caplog.records)
    assert "database is locked" in caplog.text


def test_thumbnails_stop_at_the_study_bound_and_a_store_error_never_fails_a_trial(
    tmp_path, embedded_pipe, monkeypatch, caplog
):
    import difftune.search.runner as runner
    from difftune.store import Store

    url = f"sqlite:///{tmp_path / 'd.db'}"
    monkeypatch.setattr(runner, "THUMBNAIL_STUDY_BYTES", 1)  # the reference's thumbnails already exceed it
    result = run_study(pipeline=embedded_pipe, budget=2, storage=url, study="b", **TINY)
    assert result.complete == 2
    assert [n for n in result.notes if n.startswith("thumbnails stopped at trial 0")]
    with get_store(url) as store:
        assert len(store.get_reference_images("b")) == 2  # stored once per study, whatever the bound
        assert all(store.get_images(t.id) == [] for t in store.list_trials("b"))

    monkeypatch.undo()

    def broken(self, *args, **kwargs):
        raise difftune.StoreError("database is locked")

    monkeypatch.setattr(Store, "add_images", broken)
    with caplog.at_level("WARNING", logger="difftune.search"):
        result = run_study(pipeline=embedded_pipe, budget=2, storage=url, study="e", memo=False, **TINY)
    assert result.complete == 2 and result.new_failed == 0
    assert "thumbnails of trial 0 not stored: StoreError: database is locked" in caplog.text


def test_a_pymoo_study_runs_through_the_same_runner_and_resumes_from_the_store(tmp_path, embedded_pipe):
    """No runner code knows which library searches: pymoo's NSGA-II keeps no state of its own, so a
    resumed study rebuilds it from the stored trials (and never asks to measure a stored point again)."""
    url = f"sqlite:///{tmp_path / 'p.db'}"
    first = run_study(pipeline=embedded_pipe, budget=9, storage=url, study="p", searcher="pymoo-nsga2", **TINY)
    assert first.finished == 9 and first.study.searcher == "pymoo-nsga2"
    second = run_study(pipeline=embedded_pipe, budget=12, storage=url, study="p", searcher="pymoo-nsga2", **TINY)
    assert second.new_trials == 3 and not second.failed
    with get_store(url) as store:
        trials = store.list_trials("p")
    searched = [t for t in trials if t.kind == "searched"]
    assert len(searched) == 12 - 7  # after the cache space's 7 baselines
    keys = [tuple(sorted(t.params.items())) for t in trials if t.params]
    assert len(keys) == len(set(keys))  # memoised: no point measured twice, across the restart too
    assert all(t.state is TrialState.COMPLETE for t in trials)


def test_a_short_nsga2_study_evolves_generations_and_keeps_its_population(tmp_path, embedded_pipe, monkeypatch):
    from difftune.search import pymoo_searcher
    from difftune.search.pymoo_searcher import PymooSearcher
    from difftune.search.settings import StudySettings

    # ECAD's 72 only when the budget holds four generations of it; else budget // 4, at least 8
    assert [PymooSearcher.default_population(b) for b in (10, 60, 287, 288)] == [8, 15, 71, None]
    built = []
    original = PymooSearcher.__init__

    @functools.wraps(original)  # keeps the signature the runner inspects
    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append(self.population_size)

    monkeypatch.setattr(pymoo_searcher.PymooSearcher, "__init__", spy)
    url = f"sqlite:///{tmp_path / 'p.db'}"
    run_study(pipeline=embedded_pipe, space="ecad", budget=9, storage=url, study="e", **TINY)
    store = get_store(url)
    try:
        assert StudySettings.from_dict(store.get_study("e").reference).population == 8
    finally:
        store.close()
    # resuming with a larger budget keeps the population the study was created with
    run_study(pipeline=embedded_pipe, space="ecad", budget=10, storage=url, study="e", **TINY)
    assert built == [8, 8]
    with pytest.raises(difftune.DifftuneError, match="population"):
        run_study(pipeline=embedded_pipe, space="ecad", budget=10, storage=url, study="e", population=20, **TINY)
    # an explicit population; and none for a searcher that has no population
    run_study(pipeline=embedded_pipe, space="ecad", budget=1, storage=url, study="f", population=30, **TINY)
    assert built[-1] == 30
    with pytest.raises(SpaceError, match="has no population"):
        run_study(pipeline=embedded_pipe, budget=1, storage=url, study="g", searcher="tpe", population=10, **TINY)


def test_a_second_study_reuses_what_the_first_measured_and_only_that(tmp_path, embedded_pipe, monkeypatch):
    import difftune.evaluators as evaluators

    url = f"sqlite:///{tmp_path / 'm.db'}"
    first = run_study(pipeline=embedded_pipe, budget=3, storage=url, study="a", **TINY)
    assert first.complete == 3
    store = get_store(url)
    try:
        measured = {t.config["baseline"]: t for t in store.list_trials("a")}
        assert all(t.memo_key and len(t.memo_key) == 64 for t in measured.values())
    finally:
        store.close()

    # Another study of the same model, call and samples: its baselines are not run again.
    def measured_again(*args, **kwargs):
        raise EvaluationError("a memoised trial was measured")  # fails the trial (pytest.fail would stop the run)

    monkeypatch.setattr(evaluators, "evaluate", measured_again)
    second = run_study(pipeline=embedded_pipe, budget=3, storage=url, study="b", **TINY)
    assert second.complete == 3 and second.failed == 0
    store = get_store(url)
    try:
        for trial in store.list_trials("b"):
            source = measured[trial.config["baseline"]]
            assert trial.config["memo_of"] == {"study_id": source.study_id, "trial": source.number}
            assert trial.values() == source.values() and trial.memo_key == source.memo_key
            assert [i.png for i in store.get_images(trial.id)] == [i.png for i in store.get_images(source.id)]
    finally:
        store.close()

    # Another step count, or memo=False: measured (here, the patched evaluate fails the trials).
    other = run_study(pipeline=embedded_pipe, budget=1, storage=url, study="c", **{**TINY, "num_inference_steps": 5})
    assert other.failed == 1 and "memoised trial was measured" in next(iter(other.failures))
    fresh = run_study(pipeline=embedded_pipe, budget=1, storage=url, study="d", memo=False, **TINY)
    assert fresh.failed == 1
