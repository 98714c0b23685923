"""The store contract: what every backend must do. Subclass it with a ``url`` fixture (see test_store.py).

Like Optuna's ``StorageTestCase``: one class of tests, run once per backend.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import pickle
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from difftune.errors import StoreError
from difftune.store import (
    HELD_OUT,
    MetricRecord,
    MetricSpec,
    Store,
    StudyStatus,
    TrialState,
    select_point,
)
from tests.store._helpers import complete, make_study, png_bytes, write_same_numbers, write_trials


class StoreContract:
    """Tests every :class:`Store` backend must pass. Subclasses provide the ``url`` fixture."""

    #: Whether several processes can open the same database (not an in-memory SQLite database).
    shared_between_processes = True

    @pytest.fixture
    def url(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    @pytest.fixture
    def store(self, url: str) -> Iterator[Store]:
        store = Store(url)
        yield store
        store.close()

    # -- models --------------------------------------------------------------------------------

    def test_create_model_is_get_or_create_by_fingerprint(self, store: Store) -> None:
        first = store.create_model("embedded", "embedded", "sha256:aa")
        again = store.create_model("embedded-renamed", "embedded", "sha256:aa")
        other = store.create_model("embedded", "embedded", "sha256:bb")
        assert again == first
        assert other.id != first.id
        assert store.get_model(first.id) == first
        assert store.find_model("sha256:bb") == other
        assert store.find_model("sha256:none") is None
        assert store.list_models() == [first, other]
        assert first.created_at.tzinfo is not None

    def test_unknown_model_id_is_a_store_error(self, store: Store) -> None:
        with pytest.raises(StoreError, match="no model with id 99"):
            store.get_model(99)
        with pytest.raises(StoreError, match="create_model"):
            store.create_study("x", model_id=99, space="cache", searcher="nsga2", objectives=["psnr"])

    # -- studies -------------------------------------------------------------------------------

    def test_create_and_get_study_by_id_and_name(self, store: Store) -> None:
        study = make_study(
            store, objectives=["speedup", ("latency_ms", "min"), MetricSpec("custom", "maximize", "pts")]
        )
        assert study.objectives == (
            MetricSpec("speedup", "maximize", "×"),
            MetricSpec("latency_ms", "minimize", "ms"),
            MetricSpec("custom", "maximize", "pts"),
        )
        assert study.status is StudyStatus.RUNNING
        assert store.get_study(study.id) == study == store.get_study("demo")
        assert store.list_studies() == [study]

    def test_study_keeps_reference_and_optuna_name(self, store: Store) -> None:
        model = store.create_model("m", "embedded", "fp")
        store.create_study(
            "s",
            model_id=model.id,
            space="solver",
            searcher="tpe",
            objectives=["speedup"],
            reference={"solver": "dpmpp_2m", "nfe": 20},
            optuna_study_name="difftune-s",
        )
        again = store.get_study("s")
        assert again.reference == {"solver": "dpmpp_2m", "nfe": 20}
        assert again.optuna_study_name == "difftune-s"
        assert (again.space, again.searcher) == ("solver", "tpe")

    def test_unknown_study_lists_the_known_ones(self, store: Store) -> None:
        make_study(store, "alpha")
        with pytest.raises(StoreError, match=r"no study 'beta'.*known studies: alpha"):
            store.get_study("beta")
        with pytest.raises(StoreError, match="no study 42"):
            store.list_trials(42)

    def test_duplicate_study_name_needs_load_if_exists(self, store: Store) -> None:
        study = make_study(store)
        with pytest.raises(StoreError, match=r"already exists.*load_if_exists"):
            make_study(store)
        resumed = store.create_study(
            "demo",
            model_id=study.model_id,
            space="cache",
            searcher="tpe",  # a resumed study may switch searchers
            objectives=["speedup", "psnr"],
            load_if_exists=True,
        )
        assert resumed == study
        assert len(store.list_studies()) == 1

    def test_resume_with_other_space_or_objectives_is_refused(self, store: Store) -> None:
        study = make_study(store)
        with pytest.raises(StoreError, match=r"cannot resume study 'demo'.*space 'cache' \(asked 'solver'\)"):
            store.create_study(
                "demo",
                model_id=study.model_id,
                space="solver",
                searcher="nsga2",
                objectives=["speedup", "psnr"],
                load_if_exists=True,
            )
        with pytest.raises(StoreError, match="objectives"):
            store.create_study(
                "demo",
                model_id=study.model_id,
                space="cache",
                searcher="nsga2",
                objectives=["psnr"],
                load_if_exists=True,
            )

    def test_bad_objectives_are_refused(self, store: Store) -> None:
        model = store.create_model("m", "embedded", "fp")
        with pytest.raises(StoreError, match=r"unknown metric 'speed'.*known: .*speedup"):
            store.create_study("s", model_id=model.id, space="cache", searcher="nsga2", objectives=["speed"])
        with pytest.raises(StoreError, match="at least one objective"):
            store.create_study("s", model_id=model.id, space="cache", searcher="nsga2", objectives=[])
        with pytest.raises(StoreError, match="direction"):
            store.create_study("s", model_id=model.id, space="cache", searcher="nsga2", objectives=[("psnr", "up")])

    def test_set_study_status(self, store: Store) -> None:
        study = make_study(store)
        assert store.set_study_status("demo", "finished").status is StudyStatus.FINISHED
        assert store.get_study(study.id).status is StudyStatus.FINISHED
        with pytest.raises(StoreError, match="unknown study status 'done'; known: running, finished, stopped"):
            store.set_study_status(study.id, "done")

    # -- trials --------------------------------------------------------------------------------

    def test_add_trial_numbers_from_zero(self, store: Store) -> None:
        study = make_study(store)
        trials = [store.add_trial(study.id, {"x": i}, worker_id="w0") for i in range(3)]
        assert [t.number for t in trials] == [0, 1, 2]
        first = trials[0]
        assert first.state is TrialState.RUNNING
        assert first.params == {"x": 0}
        assert first.worker_id == "w0"
        assert first.finished_at is None and first.heartbeat_at is not None
        assert store.get_trial(first.id) == first
        assert store.get_trial_by_number("demo", 2) == trials[2]

    def test_explicit_number_is_retry_safe_and_unique(self, store: Store) -> None:
        study = make_study(store)
        trial = store.add_trial(study.id, {"x": 1}, number=7, config={"cache": {"kind": "policy"}})
        again = store.add_trial(study.id, {"x": 1}, number=7, config={"cache": {"kind": "policy"}})
        assert again == trial
        with pytest.raises(StoreError, match=r"trial number 7 .* already exists with other params"):
            store.add_trial(study.id, {"x": 2}, number=7)
        assert store.add_trial(study.id, {"x": 3}).number == 8
        assert store.count_trials(study.id) == 2

    def test_params_must_be_json(self, store: Store) -> None:
        study = make_study(store)
        with pytest.raises(StoreError, match="trial params: not storable as JSON"):
            store.add_trial(study.id, {"x": object()})
        with pytest.raises(StoreError, match="not storable as JSON"):
            store.add_trial(study.id, {"x": float("nan")})
        assert store.count_trials(study.id) == 0

    def test_complete_stores_metrics_with_unit_and_direction(self, store: Store) -> None:
        study = make_study(store)
        trial = store.add_trial(study.id, {"x": 1}, config={"solver": None})
        done = store.set_trial_state(
            trial.id,
            TrialState.COMPLETE,
            metrics=[
                MetricRecord.known("speedup", 2.5),
                MetricRecord.known("psnr", float("inf")),  # an exact match
                MetricRecord("custom", 3.0, "pts", "maximize"),
            ],
        )
        assert done.state is TrialState.COMPLETE
        assert done.finished_at is not None and done.finished_at >= done.started_at
        assert done.values() == {"custom": 3.0, "psnr": float("inf"), "speedup": 2.5}
        assert done.metric("speedup") == MetricRecord("speedup", 2.5, "×", "maximize")
        assert done.config == {"solver": None}
        assert store.get_trial(trial.id) == done

    def test_completion_is_atomic(self, store: Store) -> None:
        study = make_study(store)
        trial = store.add_trial(study.id, {})
        store.record_metrics(trial.id, {"psnr": 30.0})
        with pytest.raises(StoreError, match=r"already has psnr \(calibration\) = 30.0"):
            store.set_trial_state(trial.id, "complete", metrics={"speedup": 2.0, "psnr": 31.0})
        after = store.get_trial(trial.id)
        assert after.state is TrialState.RUNNING
        assert after.values() == {"psnr": 30.0}  # speedup was not stored either

    def test_nan_metric_is_refused_before_anything_is_written(self, store: Store) -> None:
        study = make_study(store)
        trial = store.add_trial(study.id, {})
        with pytest.raises(StoreError, match="psnr is NaN: record the trial as failed"):
            store.set_trial_state(trial.id, "complete", metrics={"speedup": 2.0, "psnr": float("nan")})
        assert store.get_trial(trial.id).state is TrialState.RUNNING
        assert store.get_trial(trial.id).metrics == ()

    def test_failed_trial_is_stored_with_its_reason(self, store: Store) -> None:
        study = make_study(store)
        trial = store.add_trial(study.id, {"x": 1})
        with pytest.raises(StoreError, match="needs its reason"):
            store.set_trial_state(trial.id, "failed")
        failed = store.set_trial_state(trial.id, "failed", error="EvaluationError: NaN in the output at step 3")
        assert failed.state is TrialState.FAILED
        assert failed.error == "EvaluationError: NaN in the output at step 3"
        assert store.list_trials(study.id, "failed") == [failed]

    def test_pruned_trial_keeps_partial_metrics(self, store: Store) -> None:
        study = make_study(store)
        trial = store.add_trial(study.id, {})
        pruned = store.set_trial_state(trial.id, "pruned", metrics={"psnr": 12.0}, error="rung 1: psnr below 20")
        assert pruned.state is TrialState.PRUNED
        assert pruned.values() == {"psnr": 12.0}
        assert pruned.error == "rung 1: psnr below 20"

    def test_finished_trial_state_cannot_change_but_retry_is_harmless(self, store: Store) -> None:
        study = make_study(store)
        done = complete(store, study.id, {"speedup": 2.0, "psnr": 30.0})
        again = store.set_trial_state(done.id, "complete", metrics={"speedup": 2.0, "psnr": 30.0})
        assert again == done
        with pytest.raises(StoreError, match=r"already complete.*cannot change"):
            store.set_trial_state(done.id, "failed", error="late")
        with pytest.raises(StoreError, match="unknown trial state 'done'; known: running, complete, failed, pruned"):
            store.set_trial_state(done.id, "done")

    def test_record_metrics_on_held_out_split_and_replace(self, store: Store) -> None:
        study = make_study(store)
        done = complete(store, study.id, {"speedup": 2.0, "psnr": 30.0})
        updated = store.record_metrics(done.id, {"psnr": 28.0}, split=HELD_OUT)
        assert updated.values() == {"psnr": 30.0, "speedup": 2.0}
        assert updated.values(HELD_OUT) == {"psnr": 28.0}
        assert store.record_metrics(done.id, {"psnr": 28.0}, split=HELD_OUT) == updated
        with pytest.raises(StoreError, match="replace=True"):
            store.record_metrics(done.id, {"psnr": 27.0}, split=HELD_OUT)
        replaced = store.record_metrics(done.id, {"psnr": 27.0}, split=HELD_OUT, replace=True)
        assert replaced.value("psnr", HELD_OUT) == 27.0
        with pytest.raises(StoreError, match="split must be one of calibration, held_out"):
            store.record_metrics(done.id, {"psnr": 1.0}, split="test")

    def test_screening_rung_metrics_live_beside_the_full_ones_and_never_make_a_front(self, store: Store) -> None:
        study = make_study(store)
        # A promoted trial: screened (rung -1), then measured in full (rung 0) with other values.
        promoted = store.add_trial(study.id, {"x": 1})
        store.record_metrics(promoted.id, {"speedup": 9.0, "psnr": 99.0}, rung=-1)
        done = store.set_trial_state(promoted.id, "complete", metrics={"speedup": 2.0, "psnr": 30.0})
        assert done.values() == {"speedup": 2.0, "psnr": 30.0}
        assert done.values(rung=-1) == {"speedup": 9.0, "psnr": 99.0} and done.rungs == (-1, 0)
        assert done.value("psnr", rung=-1) == 99.0 and done.metric("psnr").rung == 0
        # A complete trial holding screening figures only (and a pruned one) is on no front.
        screened_only = store.add_trial(study.id, {"x": 2})
        store.set_trial_state(screened_only.id, "complete", metrics={"speedup": 50.0, "psnr": 50.0}, rung=-1)
        pruned = store.add_trial(study.id, {"x": 3})
        store.set_trial_state(pruned.id, "pruned", metrics={"speedup": 40.0, "psnr": 60.0}, rung=-1, error="screened")
        other = complete(store, study.id, {"speedup": 1.0, "psnr": 40.0})
        assert {t.id for t in store.pareto_front(study.id)} == {done.id, other.id}
        assert store.get_trial(pruned.id).values() == {} and store.get_trial(pruned.id).error == "screened"
        with pytest.raises(StoreError, match="rung must be 0"):
            store.record_metrics(done.id, {"psnr": 1.0}, rung=1)

    def test_unknown_trial_is_a_store_error(self, store: Store) -> None:
        make_study(store)
        with pytest.raises(StoreError, match="no trial with id 12345"):
            store.get_trial(12345)
        with pytest.raises(StoreError, match="has no trial number 3"):
            store.get_trial_by_number("demo", 3)

    def test_list_and_count_trials_by_state(self, store: Store) -> None:
        study = make_study(store)
        other = make_study(store, "other")
        done = complete(store, study.id, {"speedup": 2.0, "psnr": 30.0})
        running = store.add_trial(study.id, {})
        failed = store.set_trial_state(store.add_trial(study.id, {}).id, "failed", error="oom")
        pruned = store.set_trial_state(store.add_trial(study.id, {}).id, "pruned")
        complete(store, other.id, {"speedup": 1.0, "psnr": 40.0})
        assert [t.id for t in store.list_trials("demo")] == [done.id, running.id, failed.id, pruned.id]
        assert store.list_trials("demo", TrialState.COMPLETE) == [done]
        assert store.list_trials("demo", ["failed", "pruned"]) == [failed, pruned]
        assert store.count_trials("demo") == 4
        assert store.count_trials("demo", "running") == 1
        assert store.count_finished_trials("demo") == 3
        assert store.count_finished_trials("other") == 1

    def test_heartbeat_and_stale_trials(self, store: Store) -> None:
        study = make_study(store)
        trial = store.add_trial(study.id, {}, worker_id="gpu-3")
        store.heartbeat(trial.id)
        beat = store.get_trial(trial.id).heartbeat_at
        assert beat is not None and beat >= trial.started_at
        assert store.fail_stale_trials(study.id, grace_period=3600) == []
        stale = store.fail_stale_trials(study.id, grace_period=-1)
        assert [t.id for t in stale] == [trial.id]
        assert stale[0].state is TrialState.FAILED
        assert "gpu-3 sent no heartbeat" in (stale[0].error or "")

    # -- records -------------------------------------------------------------------------------

    def test_records_are_frozen_detached_and_picklable(self, store: Store) -> None:
        study = make_study(store)
        params = {"nested": {"a": [1, 2]}}
        trial = store.add_trial(study.id, params)
        params["nested"]["a"].append(3)  # type: ignore[index]
        assert store.get_trial(trial.id).params == {"nested": {"a": [1, 2]}}
        done = store.set_trial_state(trial.id, "complete", metrics={"speedup": 2.0, "psnr": 30.0})
        for record in (study, done, done.metrics[0], store.get_model(study.model_id)):
            assert dataclasses.is_dataclass(record)
            with pytest.raises(dataclasses.FrozenInstanceError):
                record.id = 5  # type: ignore[misc,union-attr]
            assert pickle.loads(pickle.dumps(record)) == record
        done.params["nested"] = None
        assert store.get_trial(trial.id).params == {"nested": {"a": [1, 2]}}

    def test_timestamps_are_utc(self, store: Store) -> None:
        before = datetime.now(UTC) - timedelta(seconds=1)
        study = make_study(store)
        assert before <= study.created_at <= datetime.now(UTC) + timedelta(seconds=1)
        assert study.created_at.utcoffset() == timedelta(0)

    # -- fronts --------------------------------------------------------------------------------

    def test_pareto_front_on_a_hand_computed_study(self, store: Store) -> None:
        study = make_study(store)
        # (speedup, psnr), both maximised. Front: a (fast), b, d (best psnr); c is dominated by b, e by a.
        a = complete(store, study.id, {"speedup": 4.0, "psnr": 25.0})
        b = complete(store, study.id, {"speedup": 3.0, "psnr": 31.0})
        c = complete(store, study.id, {"speedup": 2.5, "psnr": 30.0})
        d = complete(store, study.id, {"speedup": 1.5, "psnr": 38.0})
        e = complete(store, study.id, {"speedup": 4.0, "psnr": 24.0})
        store.add_trial(study.id, {})  # running: not on any front
        store.set_trial_state(store.add_trial(study.id, {}).id, "pruned", metrics={"speedup": 9.0, "psnr": 99.0})
        complete(store, study.id, {"speedup": 10.0})  # lacks psnr: not comparable
        front = store.pareto_front("demo")
        assert [t.id for t in front] == [a.id, b.id, d.id]  # best speedup first
        assert front[0].values() == {"speedup": 4.0, "psnr": 25.0}
        constrained = store.pareto_front(study.id, constraints=["psnr>=30"])
        assert [t.id for t in constrained] == [b.id, d.id]
        by_psnr = store.pareto_front(study.id, [("psnr", "maximize")])
        assert [t.id for t in by_psnr] == [d.id]
        slow_and_bad = store.pareto_front(study.id, [("speedup", "minimize"), ("psnr", "minimize")])
        assert {t.id for t in slow_and_bad} == {d.id, c.id, e.id}
        assert select_point(front, "fastest where psnr>=30") == b

    def test_pareto_front_of_an_empty_study_and_unknown_metric(self, store: Store) -> None:
        study = make_study(store)
        assert store.pareto_front(study.id) == []
        complete(store, study.id, {"speedup": 2.0, "psnr": 30.0})
        with pytest.raises(StoreError, match=r"no trial of this study has metric 'fid'.*recorded: psnr, speedup"):
            store.pareto_front(study.id, ["speedup", "fid"])

    def test_record_and_read_fronts(self, store: Store) -> None:
        study = make_study(store)
        assert store.latest_front("demo") is None
        a = complete(store, study.id, {"speedup": 4.0, "psnr": 25.0})
        b = complete(store, study.id, {"speedup": 3.0, "psnr": 31.0})
        first = store.record_front("demo", [a.id])
        second = store.record_front("demo", [t.id for t in store.pareto_front("demo")])
        assert second.trial_ids == (a.id, b.id)
        assert second.objectives == study.objectives
        assert store.latest_front(study.id) == second
        assert store.list_fronts("demo") == [first, second]
        other = make_study(store, "other")
        foreign = complete(store, other.id, {"speedup": 1.0, "psnr": 1.0})
        with pytest.raises(StoreError, match=rf"trials \[{foreign.id}\] are not in this study"):
            store.record_front("demo", [a.id, foreign.id])

    # -- profiles and images -------------------------------------------------------------------

    def test_save_exported_profile(self, store: Store) -> None:
        from difftune.profile import ModelRef, Profile, ProfileContext

        study = make_study(store)
        trial = complete(store, study.id, {"speedup": 2.0, "psnr": 30.0})
        profile = Profile(
            name="demo-fast",
            model=ModelRef("embedded", "embedded", "fp-1"),
            context=ProfileContext(num_inference_steps=10),
            metrics={"speedup": {"value": 2.0, "unit": "×"}},
            provenance={"study": "demo", "trial": trial.number},
        )
        saved = store.save_profile("demo", profile, trial_id=trial.id, path="out/profile.json")
        assert saved.text == profile.to_json()
        assert saved.path == "out/profile.json"
        assert store.get_profile(saved.id) == saved
        assert store.list_profiles(study.id) == [saved]
        assert saved.profile().to_dict() == profile.to_dict()
        plain = store.save_profile(study.id, {"name": "raw"})
        assert plain.data() == {"name": "raw"} and plain.trial_id is None
        with pytest.raises(StoreError, match="not JSON"):
            store.save_profile(study.id, "{not json")
        other = make_study(store, "other")
        with pytest.raises(StoreError, match="is not in study"):
            store.save_profile(other.id, profile, trial_id=trial.id)

    def test_sample_images(self, store: Store) -> None:
        study = make_study(store)
        trial = store.add_trial(study.id, {})
        pngs = [png_bytes(v) for v in (0, 128, 255)]
        store.add_images(trial.id, pngs[:2])
        store.add_image(trial.id, 1, pngs[2])  # replaces index 1
        images = store.get_images(trial.id)
        assert [(i.index, i.png) for i in images] == [(0, pngs[0]), (1, pngs[2])]
        assert images[0].trial_id == trial.id
        with pytest.raises(StoreError, match="not a PNG"):
            store.add_image(trial.id, 5, b"GIF89a")
        with pytest.raises(StoreError, match="no trial with id"):
            store.get_images(trial.id + 100)

    def test_reference_images_and_image_bytes_per_study(self, store: Store) -> None:
        study, other = make_study(store), make_study(store, "other")
        assert store.get_reference_images(study.id) == [] and store.image_bytes(study.id) == 0
        pngs = [png_bytes(v, size=8) for v in (0, 128, 255)]
        trial = store.add_trial(study.id, {})
        store.add_images(trial.id, pngs[:2])
        store.add_images(store.add_trial(other.id, {}).id, pngs)  # another study's images do not count
        stored = store.add_reference_images(study.name, pngs[:2])
        store.add_reference_images(study.id, pngs[2:], start=1)  # replaces index 1
        assert stored[0].study_id == study.id
        assert [(i.index, i.png) for i in store.get_reference_images(study.name)] == [(0, pngs[0]), (1, pngs[2])]
        assert store.image_bytes(study.name) == len(pngs[0]) + len(pngs[1]) + len(pngs[0]) + len(pngs[2])
        with pytest.raises(StoreError, match="not a PNG"):
            store.add_reference_images(study.id, [b"GIF89a"])
        with pytest.raises(StoreError, match="no study 'nope'"):
            store.get_reference_images("nope")

    # -- processes -----------------------------------------------------------------------------

    def test_store_pickles_as_its_url(self, store: Store, url: str) -> None:
        if not self.shared_between_processes:
            pytest.skip("an in-memory database is private to its process")
        make_study(store)
        clone = pickle.loads(pickle.dumps(store))
        try:
            assert clone.get_study("demo") == store.get_study("demo")
        finally:
            clone.close()

    def test_concurrent_writers_record_every_trial_exactly_once(self, store: Store, url: str) -> None:
        if not self.shared_between_processes:
            pytest.skip("an in-memory database is private to its process")
        make_study(store, "race")
        make_study(store, "same-numbers")
        store.close()  # forked workers must not share our connections
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        context = multiprocessing.get_context(method)
        workers, per_worker = 3, 20
        with context.Pool(workers) as pool:
            auto = pool.starmap(write_trials, [(url, "race", w, per_worker) for w in range(workers)], chunksize=1)
            same = pool.starmap(
                write_same_numbers, [(url, "same-numbers", w, range(10)) for w in range(workers)], chunksize=1
            )
        trials = store.list_trials("race")
        assert [t.number for t in trials] == list(range(workers * per_worker))
        assert sorted((t.params["worker"], t.params["i"]) for t in trials) == [
            (w, i) for w in range(workers) for i in range(per_worker)
        ]
        assert all(t.state is TrialState.COMPLETE and len(t.metrics) == 2 for t in trials)
        assert sorted(i for ids in auto for i in ids) == sorted(t.id for t in trials)
        shared = store.list_trials("same-numbers")
        assert [t.number for t in shared] == list(range(10))
        assert same[0] == same[1] == same[2] == [t.id for t in shared]
