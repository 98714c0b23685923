"""Reliability of the study runner: a killed calibrate resumes, several workers share one budget,
failing trials are stored failed with their reason, Ctrl-C interrupts a trial that is retried later."""

from __future__ import annotations

import hashlib
import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from difftune.cli import EXIT_BAD_INPUT, main
from difftune.search import run_study
from difftune.store import TrialState, get_store

TINY = {"samples": 2, "num_inference_steps": 6, "latency_repeats": 1}
TINY_CLI = ["--steps", "6", "--samples", "2"]
TIMEOUT_S = 600


# Tiny models on a busy 2-core box: one thread avoids thread hand-offs (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DIFFTUNE_VERBOSE", "DIFFTUNE_STORAGE")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _difftune(*args: str) -> list[str]:
    return [sys.executable, "-m", "difftune.cli", *args]


def _run(args: list[str], tmp_path: Path, name: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, f"{name} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _states(db: Path) -> dict[str, int]:
    """Trial counts by state, read without opening a Store (which might create the schema)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            rows = con.execute("SELECT state, count(*) FROM difftune_trials GROUP BY state").fetchall()
            searched = con.execute(
                "SELECT count(*) FROM difftune_trials WHERE state = 'running' AND config LIKE '%searcher_number%'"
            ).fetchone()
    except sqlite3.Error:
        return {}  # not created yet, or locked for a moment
    return {**{str(state): int(n) for state, n in rows}, "running searched": int(searched[0])}


def _assert_consistent(store, study: str, budget: int) -> list:
    """What every run must leave: the budget met exactly, nothing running, nothing run twice."""
    trials = store.list_trials(study)
    assert store.count_budget_trials(study) == budget
    assert store.count_trials(study, TrialState.RUNNING) == 0
    assert all(t.state.is_finished() for t in trials)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    done = [t.config["baseline"] for t in trials if t.config and t.config.get("baseline") and _counts(t)]
    assert len(done) == len(set(done)), f"a baseline ran twice: {sorted(done)}"
    searcher_numbers = [
        t.config["searcher_number"] for t in trials if t.config and t.config.get("searcher_number") is not None
    ]
    assert len(searcher_numbers) == len(set(searcher_numbers))
    return trials


def _counts(trial) -> bool:
    return trial.state is not TrialState.INTERRUPTED


def _assert_optuna_settled(url: str, study: str) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = optuna.load_study(study_name=f"difftune:{study}", storage=url).trials
    running = [t.number for t in trials if t.state is optuna.trial.TrialState.RUNNING]
    assert running == [], f"Optuna trials left running: {running}"


# ---- 1. kill -9 in the middle of a trial, then resume -------------------------------------------


def test_kill_9_mid_trial_then_rerun_resumes_and_retries_the_point(tmp_path):
    # Killed while a searched point (after the space's 7 baselines) runs: the harder case, whose
    # Optuna trial must be failed and whose params are retried as retry:<n>. A killed baseline is
    # retried by its own key (test_ctrl_c_…, the same path).
    db = tmp_path / "k.db"
    url = f"sqlite:///{db}"
    args = _difftune("calibrate", "--space", "cache", "--budget", "8", *TINY_CLI, "--study", "k", "--storage", url)
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(args, env=_env(), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            states = _states(db)
            if states.get("complete", 0) >= 3 and states.get("running searched", 0) == 1:
                break
            assert proc.poll() is None, f"calibrate ended ({proc.returncode}) before it could be killed: {states}"
            assert time.monotonic() < deadline, f"no running trial after 3 complete ones: {states}"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None and proc.returncode is None:
            proc.kill()
        proc.wait(timeout=60)  # reaped: the dead pid is noticed at once on this host
        log.close()
    assert proc.returncode == -signal.SIGKILL

    with get_store(url) as store:
        before = store.list_trials("k")
    running = [t for t in before if t.state is TrialState.RUNNING]
    complete = {t.id: t for t in before if t.state is TrialState.COMPLETE}
    assert len(running) == 1 and len(complete) >= 3
    [killed] = running
    snapshot = {i: (t.number, dict(t.params), t.values()) for i, t in complete.items()}

    _run(args, tmp_path, "the resumed calibrate")

    with get_store(url) as store:
        trials = _assert_consistent(store, "k", 8)
        by_id = {t.id: t for t in trials}
        for trial_id, (number, params, values) in snapshot.items():
            t = by_id[trial_id]
            assert (t.number, dict(t.params), t.values(), t.state) == (number, params, values, TrialState.COMPLETE)
        after = by_id[killed.id]
        assert after.state is TrialState.INTERRUPTED, (after.state, after.error)
        assert "no longer running" in after.error
        later = [t for t in trials if t.number > killed.number]
        assert killed.config.get("searcher_number") is not None and killed.params
        retries = [t for t in later if (t.config or {}).get("retry_of") == killed.number]
        assert len(retries) == 1, f"the killed trial {killed.number} ({killed.config}) was retried {len(retries)} times"
        assert dict(retries[0].params) == dict(killed.params) and retries[0].state.is_finished()
        assert retries[0].config.get("searcher_number") is None  # evaluated outside ask/tell
        assert len(trials) == 9  # 8 counted + the interrupted one
        assert store.get_study("k").status.value == "finished"
    _assert_optuna_settled(url, "k")


# ---- 2./3. three workers share one budget ---------------------------------------------------------


def _three_workers(tmp_path: Path, url: str, embedded_pipe) -> None:
    run_study(pipeline=embedded_pipe, budget=1, storage=url, study="w", **TINY)
    with get_store(url) as store:
        store.set_study_budget("w", 9)
    logs = [(tmp_path / f"worker{i}.log").open("w+") for i in range(3)]
    procs = [
        subprocess.Popen(
            _difftune("worker", "--study", "w", "--storage", url),
            env=_env(),
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for log in logs
    ]
    outputs = []
    try:
        for proc, log in zip(procs, logs, strict=True):
            proc.wait(timeout=TIMEOUT_S)
            log.seek(0)
            outputs.append(log.read())
    finally:
        for proc, log in zip(procs, logs, strict=True):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out
    ran = [re.search(r"worker ran (\d+) trials", out) for out in outputs]
    assert all(ran), outputs
    assert sum(int(m.group(1)) for m in ran) == 8, outputs  # 1 trial was calibrate's

    with get_store(url) as store:
        trials = _assert_consistent(store, "w", 9)
        assert len(trials) == 9  # no overshoot: nothing extra running, failed or interrupted
        assert all(_counts(t) for t in trials)
        workers = {t.worker_id for t in trials}
        assert len(workers) >= 2  # calibrate's and at least one worker's
    _assert_optuna_settled(url, "w")


def test_three_workers_on_sqlite_share_the_budget_exactly(tmp_path, embedded_pipe):
    _three_workers(tmp_path, f"sqlite:///{tmp_path / 'w.db'}", embedded_pipe)


def test_three_workers_on_postgresql_share_the_budget_exactly(tmp_path, embedded_pipe, postgres_url):
    _three_workers(tmp_path, postgres_url, embedded_pipe)


# ---- 4. trials that fail for a reason ---------------------------------------------------------------


def test_exception_nan_and_oom_trials_are_stored_failed_and_counted(tmp_path, embedded_pipe, monkeypatch):
    import difftune.evaluators as evaluators

    evaluate_module = sys.modules["difftune.evaluators.evaluate"]
    real_evaluate, real_generate = evaluators.evaluate, evaluate_module.generate
    calls = {"n": 0}

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def faulty(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom in the pipeline")
        if calls["n"] == 3:
            return {**real_evaluate(*args, **kwargs), "psnr": float("nan")}
        if calls["n"] == 4:  # the pipeline itself runs out of memory: evaluate's own conversion is exercised
            monkeypatch.setattr(evaluate_module, "generate", out_of_memory)
            try:
                return real_evaluate(*args, **kwargs)
            finally:
                monkeypatch.setattr(evaluate_module, "generate", real_generate)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(evaluators, "evaluate", faulty)
    url = f"sqlite:///{tmp_path / 'f.db'}"
    result = run_study(pipeline=embedded_pipe, budget=6, storage=url, study="f", **TINY)
    assert result.finished == 6 and result.failed == 3 and result.new_trials == 6

    with get_store(url) as store:
        trials = _assert_consistent(store, "f", 6)
        by_number = {t.number: t for t in trials}
        errors = [by_number[n].error for n in (1, 2, 3)]
        assert [by_number[n].state for n in (1, 2, 3)] == [TrialState.FAILED] * 3
        assert errors[0] == "RuntimeError: boom in the pipeline"
        assert errors[1] == "EvaluationError: metric psnr produced NaN"
        assert errors[2].startswith("EvaluationError: out of memory while evaluating (OutOfMemoryError: CUDA out")
        assert all(by_number[n].metrics == () for n in (1, 2, 3))
        assert store.count_trials("f", TrialState.COMPLETE) == 3 and len(trials) == 6
        assert store.get_study("f").status.value == "finished"
        # NaN never reached the front
        assert all(math.isfinite(v) for t in store.pareto_front("f") for v in t.values().values())
    _assert_optuna_settled(url, "f")
    out = embedded_pipe(class_labels=[1], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert len(out.images) == 1  # no hooks left behind by the failed trials


# ---- 5. a worker given bad input ------------------------------------------------------------------------


def _one_error_line(err: str, *messages: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert all(m in lines[0] for m in messages), err


def test_worker_on_a_missing_database_is_exit_2_and_creates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["worker", "--study", "nope", "--storage", f"sqlite:///{tmp_path / 'missing.db'}"])
    assert exc.value.code == EXIT_BAD_INPUT
    _one_error_line(capsys.readouterr().err, "missing.db")
    assert list(tmp_path.iterdir()) == []


def test_worker_on_an_unknown_study_is_exit_2_naming_the_known_ones(tmp_path, embedded_pipe, capsys):
    db = tmp_path / "d.db"
    run_study(pipeline=embedded_pipe, budget=1, storage=f"sqlite:///{db}", study="known", **TINY)
    files = sorted(tmp_path.iterdir())  # d.db, and its -wal/-shm while this process keeps it open
    before = {p.name: _digest(p) for p in files if not p.name.endswith("-shm")}
    with pytest.raises(SystemExit) as exc:
        main(["worker", "--study", "nope", "--storage", f"sqlite:///{db}"])
    assert exc.value.code == EXIT_BAD_INPUT
    _one_error_line(capsys.readouterr().err, "'nope'", "known")
    assert sorted(tmp_path.iterdir()) == files
    assert {p.name: _digest(p) for p in files if not p.name.endswith("-shm")} == before


# ---- 6. Ctrl-C inside a trial ---------------------------------------------------------------------------------


def test_ctrl_c_in_a_trial_stores_it_interrupted_and_the_next_run_retries_it(tmp_path, embedded_pipe, monkeypatch):
    import difftune.evaluators as evaluators

    real = evaluators.evaluate
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluators, "evaluate", interrupted)
    url = f"sqlite:///{tmp_path / 'c.db'}"
    with pytest.raises(KeyboardInterrupt):
        run_study(pipeline=embedded_pipe, budget=4, storage=url, study="c", **TINY)
    with get_store(url) as store:
        trials = store.list_trials("c")
        assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.INTERRUPTED]
        stopped = trials[1]
        assert stopped.error == "KeyboardInterrupt"
        assert store.count_budget_trials("c") == 1 and store.count_trials("c", TrialState.RUNNING) == 0
    _assert_optuna_settled(url, "c")

    monkeypatch.setattr(evaluators, "evaluate", real)
    result = run_study(pipeline=embedded_pipe, budget=4, storage=url, study="c", **TINY)
    assert result.finished == 4 and result.new_trials == 3  # the retry and two more
    with get_store(url) as store:
        trials = _assert_consistent(store, "c", 4)  # a baseline retried once, not also as retry:<n>
        assert len(trials) == 5
        retried = [
            t
            for t in trials[2:]
            if (stopped.config.get("baseline") and t.config.get("baseline") == stopped.config["baseline"])
            or t.config.get("retry_of") == stopped.number
        ]
        assert len(retried) == 1 and retried[0].state is TrialState.COMPLETE
        assert dict(retried[0].params) == dict(stopped.params)
    _assert_optuna_settled(url, "c")
