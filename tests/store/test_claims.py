"""Claiming trials: a study's budget, candidate keys, interrupted trials, and the v0.2.0.a / v0.3.0.a migrations.

Tests taking ``db`` or ``store`` run on SQLite and on PostgreSQL (when $DIFFTUNE_TEST_POSTGRES_URL is set).
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from difftune.errors import StoreError
from difftune.store import INTERRUPTED, Candidate, Claim, Store, TrialState, current_revision, head_revision, upgrade
from difftune.store._models import TrialModel
from difftune.store._storage import _Conflict
from tests.store._helpers import make_study

BASELINE_A = Candidate("baseline:a", {"interval": 2}, {"cache": {"interval": 2}})
BASELINE_B = Candidate("baseline:b", {"interval": 3})


@pytest.fixture
def store(db: str) -> Iterator[Store]:
    store = Store(db)
    yield store
    store.close()


def _claim(store: Store, study: str, **kwargs: object) -> Claim:
    claim = store.claim_trial(study, **kwargs)  # type: ignore[arg-type]
    assert claim is not None
    return claim


# -- the budget ------------------------------------------------------------------------------------


def test_budget_counts_running_and_failed_trials_but_not_interrupted_ones(db: str) -> None:
    with Store(db) as store:
        study = make_study(store, "budget")
        assert store.get_study("budget").budget is None
        store.set_study_budget("budget", 3)
        assert store.get_study(study.id).budget == 3

        claims = [_claim(store, "budget", worker_id="w1") for _ in range(3)]
        assert [c.trial.number for c in claims] == [0, 1, 2]
        assert all(c.key is None and c.trial.state is TrialState.RUNNING for c in claims)
        assert all(c.trial.worker_id == "w1" and c.trial.params == {} for c in claims)
        assert store.claim_trial("budget") is None  # 3 running trials use the whole budget
        assert store.count_budget_trials("budget") == 0  # ... but none is finished yet

        store.set_trial_state(claims[0].trial.id, "failed", error="out of memory")
        assert store.claim_trial("budget") is None  # a failed trial still counts
        assert store.count_budget_trials("budget") == 1

        [interrupted] = store.interrupt_trials(
            "budget", grace_period=3600, trial_ids=[claims[1].trial.id], reason="ctrl-c"
        )
        assert interrupted.id == claims[1].trial.id and interrupted.state is TrialState.INTERRUPTED
        assert interrupted.error == "ctrl-c"
        assert store.count_budget_trials("budget") == 1  # interrupted trials are not counted

        fourth = _claim(store, "budget")  # the interrupted trial freed a slot
        assert fourth.trial.number == 3
        assert store.claim_trial("budget") is None

        store.set_trial_state(claims[2].trial.id, "complete", metrics={"speedup": 2.0, "psnr": 30.0})
        store.set_trial_state(fourth.trial.id, "pruned")
        # failed #0 + complete #2 + pruned #3; interrupted #1 is left out
        assert store.count_budget_trials("budget") == 3
        assert store.count_trials("budget") == 4
        assert store.claim_trial("budget") is None

        store.set_study_budget("budget", None)  # no limit
        assert _claim(store, "budget").trial.number == 4


def test_budget_must_be_a_positive_integer_or_none(store: Store) -> None:
    make_study(store, "s")
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(StoreError, match="budget"):
            store.set_study_budget("s", bad)  # type: ignore[arg-type]
    assert store.get_study("s").budget is None
    with pytest.raises(StoreError, match="no study 'nope'"):
        store.claim_trial("nope")


# -- candidates ------------------------------------------------------------------------------------


def test_candidates_are_claimed_once_and_retried_after_an_interruption(store: Store) -> None:
    make_study(store, "c")
    first = _claim(store, "c", candidates=[BASELINE_A, BASELINE_B], worker_id="w")
    assert first.key == "baseline:a"
    assert first.trial.params == {"interval": 2} and first.trial.config == {"cache": {"interval": 2}}

    second = _claim(store, "c", candidates=[BASELINE_A, BASELINE_B])
    assert second.key == "baseline:b"  # a taken key is skipped
    assert second.trial.params == {"interval": 3} and second.trial.config is None

    searched = _claim(store, "c", candidates=[BASELINE_A], config={"solver": {"nfe": 5}})
    assert searched.key is None  # every candidate is taken: a trial for the searcher
    assert searched.trial.params == {} and searched.trial.config == {"solver": {"nfe": 5}}
    assert _claim(store, "c").key is None  # NULL claims may repeat
    assert store.claim_keys("c") == {"baseline:a", "baseline:b"}

    [gone] = store.interrupt_trials("c", grace_period=3600, trial_ids=[first.trial.id])
    assert gone.error == "stopped" and gone.state is INTERRUPTED
    assert store.claim_keys("c") == {"baseline:a@0", "baseline:b"}  # suffixed by the trial's number

    retry = _claim(store, "c", candidates=[BASELINE_A, BASELINE_B])
    assert retry.key == "baseline:a" and retry.trial.number == 4
    assert retry.trial.params == {"interval": 2}
    assert store.claim_keys("c") == {"baseline:a@0", "baseline:a", "baseline:b"}
    assert [t.number for t in store.list_trials("c", states="running")] == [1, 2, 3, 4]


def test_the_unique_index_refuses_a_duplicate_claim(store: Store) -> None:
    study = make_study(store, "u")
    taken = _claim(store, "u", candidates=[BASELINE_B])
    with pytest.raises(_Conflict) as info, store._session("cannot add a trial to", write=True) as session:
        session.add(
            TrialModel(
                study_id=study.id,
                number=taken.trial.number + 1,
                state="running",
                params={},
                claim="baseline:b",
                started_at=taken.trial.started_at,
            )
        )
    assert isinstance(info.value, StoreError)
    assert [t.id for t in store.list_trials("u")] == [taken.trial.id]  # rolled back
    # the same key in another study is fine
    make_study(store, "other", fingerprint="fp-2")
    assert _claim(store, "other", candidates=[BASELINE_B]).key == "baseline:b"


def test_claim_keys_are_checked(store: Store) -> None:
    make_study(store, "k")
    for key in ("", "x" * 257):
        with pytest.raises(StoreError, match="claim key"):
            store.claim_trial("k", candidates=[Candidate(key, {})])
    assert store.count_trials("k") == 0
    assert _claim(store, "k", candidates=[Candidate("x" * 256, {})]).key == "x" * 256


def claim_until_done(url: str, study: str, worker: int, keys: list[str]) -> list[str | None]:
    """One worker process: claim (and complete) trials until the budget is used up; returns the keys claimed."""
    candidates = [Candidate(k, {"key": k}) for k in keys]
    store = Store(url)
    try:
        out: list[str | None] = []
        while (claim := store.claim_trial(study, worker_id=f"w{worker}", candidates=candidates)) is not None:
            out.append(claim.key)
            store.set_trial_state(claim.trial.id, "complete", metrics={"speedup": 1.0, "psnr": 30.0 + worker})
        return out
    finally:
        store.close()


def test_concurrent_workers_claim_each_key_once_and_stop_at_the_budget(db: str) -> None:
    url = db
    keys = [f"baseline:{i}" for i in range(8)]
    with Store(url) as store:
        make_study(store, "race")
        store.set_study_budget("race", 12)
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    workers = 3
    with multiprocessing.get_context(method).Pool(workers) as pool:
        results = pool.starmap(claim_until_done, [(url, "race", w, keys) for w in range(workers)], chunksize=1)
    claimed = [k for r in results for k in r]
    assert len(claimed) == 12  # exactly the budget, never more
    assert sorted(k for k in claimed if k is not None) == sorted(keys)  # each key once
    assert claimed.count(None) == 4
    with Store(url) as store:
        trials = store.list_trials("race")
        assert [t.number for t in trials] == list(range(12))
        assert all(t.state is TrialState.COMPLETE for t in trials)
        assert store.claim_keys("race") == set(keys)
        assert store.count_budget_trials("race") == 12
        assert store.claim_trial("race", candidates=[Candidate("baseline:new", {})]) is None


# -- interrupted trials ----------------------------------------------------------------------------


def test_interrupt_trials_of_dead_workers_and_stale_heartbeats(store: Store) -> None:
    make_study(store, "i")
    done = _claim(store, "i", worker_id="dead-worker", candidates=[BASELINE_A])
    done_record = store.set_trial_state(done.trial.id, "complete", metrics={"speedup": 1.5, "psnr": 31.0})
    dead = _claim(store, "i", worker_id="dead-worker", candidates=[BASELINE_B])
    live = _claim(store, "i", worker_id="live-worker")
    anonymous = _claim(store, "i")

    [failed] = store.interrupt_trials("i", grace_period=3600, alive=lambda w: w != "dead-worker")
    assert failed.id == dead.trial.id and failed.state is TrialState.INTERRUPTED
    assert failed.error == "worker dead-worker is no longer running"
    assert failed.finished_at is not None
    assert store.claim_keys("i") == {"baseline:a", f"baseline:b@{dead.trial.number}"}
    assert store.get_trial(done.trial.id) == done_record  # finished: untouched
    assert {t.id for t in store.list_trials("i", states="running")} == {live.trial.id, anonymous.trial.id}
    # nothing else is dead, and every heartbeat is recent
    assert store.interrupt_trials("i", grace_period=3600, alive=lambda w: w != "dead-worker") == []
    assert store.interrupt_trials("i", grace_period=3600) == []

    time.sleep(0.01)
    stale = store.interrupt_trials("i", grace_period=0, alive=lambda w: True)
    assert sorted(t.id for t in stale) == sorted([live.trial.id, anonymous.trial.id])
    errors = {t.id: t.error for t in stale}
    assert errors[live.trial.id] == "worker live-worker sent no heartbeat for 0 s"
    assert errors[anonymous.trial.id] == "worker ? sent no heartbeat for 0 s"
    assert store.get_trial(done.trial.id) == done_record
    assert store.get_trial(dead.trial.id).error == failed.error  # already failed: not failed again
    assert store.count_trials("i", "running") == 0
    assert store.count_budget_trials("i") == 1  # only the complete one


def test_a_fresh_heartbeat_keeps_a_trial_running(store: Store) -> None:
    make_study(store, "h")
    claim = _claim(store, "h", worker_id="w")
    time.sleep(0.05)
    store.heartbeat(claim.trial.id)
    assert store.interrupt_trials("h", grace_period=0.04) == []
    assert store.get_trial(claim.trial.id).state is TrialState.RUNNING


# -- update_trial ----------------------------------------------------------------------------------


def test_update_trial_fills_a_running_trial_and_refuses_a_finished_one(store: Store) -> None:
    make_study(store, "up")
    claim = _claim(store, "up", config={"old": 1})
    updated = store.update_trial(claim.trial.id, params={"nfe": 5, "grid": "leading"})
    assert updated.params == {"nfe": 5, "grid": "leading"} and updated.config == {"old": 1}
    updated = store.update_trial(claim.trial.id, config={"solver": {"steps": 5}})
    assert updated.params == {"nfe": 5, "grid": "leading"} and updated.config == {"solver": {"steps": 5}}
    assert store.get_trial(claim.trial.id) == updated
    store.set_trial_state(claim.trial.id, "complete", metrics={"speedup": 1.0, "psnr": 30.0})
    with pytest.raises(StoreError, match="only a running trial"):
        store.update_trial(claim.trial.id, params={"nfe": 6})
    assert store.get_trial(claim.trial.id).params == {"nfe": 5, "grid": "leading"}
    with pytest.raises(StoreError, match="JSON"):
        store.update_trial(_claim(store, "up").trial.id, params={"x": object()})
    with pytest.raises(StoreError, match="no trial with id 999"):
        store.update_trial(999, params={})


# -- the migration ---------------------------------------------------------------------------------


def test_a_v010_database_is_upgraded_keeping_its_study_and_trial(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    assert upgrade(url, "v0.1.0.a") == "v0.1.0.a"
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO difftune_models (id, name, family, fingerprint, created_at) "
                    "VALUES (1, 'old', 'embedded', 'fp-old', '2025-01-01 00:00:00.000000')"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO difftune_studies "
                    "(id, name, model_id, space, searcher, objectives, created_at, status) "
                    "VALUES (1, 'legacy', 1, 'cache', 'nsga2', "
                    """'[{"name": "psnr", "direction": "maximize", "unit": "dB"}]', """
                    "'2025-01-01 00:00:00.000000', 'running')"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO difftune_trials (id, study_id, number, state, params, started_at, worker_id) "
                    """VALUES (1, 1, 0, 'running', '{"interval_0": 3}', '2025-01-01 00:00:00.000000', 'w0')"""
                )
            )
    finally:
        engine.dispose()
    assert current_revision(url) == "v0.1.0.a"

    with Store(url) as store:
        assert current_revision(url) == head_revision()
        study = store.get_study("legacy")
        assert (study.id, study.space, study.budget) == (1, "cache", None)
        [trial] = store.list_trials("legacy")
        assert (trial.id, trial.number, trial.state, trial.params) == (1, 0, TrialState.RUNNING, {"interval_0": 3})
        assert store.claim_keys("legacy") == set()
        # the old trial's heartbeat (2025) is stale: it is interrupted, and the new columns work
        [old] = store.interrupt_trials("legacy", grace_period=60)
        assert old.id == 1 and old.error == "worker w0 sent no heartbeat for 60 s" and old.state is INTERRUPTED
        store.set_study_budget("legacy", 1)
        claim = _claim(store, "legacy", candidates=[BASELINE_A])
        assert (claim.key, claim.trial.number) == ("baseline:a", 1)
        assert store.claim_trial("legacy") is None

    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT id, claim FROM difftune_trials ORDER BY id")).all()
            budget = connection.execute(text("SELECT budget FROM difftune_studies")).scalar_one()
    finally:
        engine.dispose()
    assert [tuple(r) for r in rows] == [(1, None), (2, "baseline:a")]
    assert budget == 1


def test_a_v020_database_gets_trial_kinds_and_interrupted_states(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'v020.db'}"
    assert upgrade(url, "v0.2.0.a") == "v0.2.0.a"
    engine = create_engine(url)
    rows = [  # (number, state, config, error)
        (0, "complete", '{"baseline": "fora_2"}', None),
        (1, "complete", '{"seed": "unipc_4"}', None),
        (2, "failed", '{"baseline": null, "optuna_number": 0}', "interrupted: worker w1 is no longer running"),
        (3, "complete", '{"baseline": null, "retry_of": 2}', None),
        (4, "failed", "null", "RuntimeError: boom"),
    ]
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO difftune_models (id, name, family, fingerprint, created_at) "
                    "VALUES (1, 'm', 'embedded', 'fp', '2025-01-01 00:00:00.000000')"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO difftune_studies (id, name, model_id, space, searcher, objectives, created_at, "
                    """status) VALUES (1, 's', 1, 'cache', 'nsga2', '[{"name": "psnr", "direction": "maximize", """
                    """"unit": "dB"}]', '2025-01-01 00:00:00.000000', 'running')"""
                )
            )
            for number, state, config, error in rows:
                connection.execute(
                    text(
                        "INSERT INTO difftune_trials (study_id, number, state, params, config, error, started_at) "
                        "VALUES (1, :n, :state, '{}', :config, :error, '2025-01-01 00:00:00.000000')"
                    ),
                    {"n": number, "state": state, "config": config, "error": error},
                )
    finally:
        engine.dispose()
    with Store(url) as store:
        assert current_revision(url) == head_revision()
        trials = {t.number: t for t in store.list_trials("s")}
    assert [trials[n].kind for n in range(5)] == ["baseline", "seed", "searched", "retry", "searched"]
    assert trials[2].state is INTERRUPTED and trials[2].error == "worker w1 is no longer running"
    assert trials[4].state is TrialState.FAILED and trials[4].error == "RuntimeError: boom"
    with Store(url) as store:
        assert store.count_budget_trials("s") == 4  # the interrupted trial does not count
