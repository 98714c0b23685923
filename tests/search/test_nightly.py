"""``difftune nightly``: configuration checks, the lock, warm start, re-validation, resume and exit codes."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest
import torch

from difftune.cli import main
from difftune.search.nightly import (
    EXIT_OK,
    EXIT_REGRESSION,
    ConfigError,
    NightlyLocked,
    _Lock,
    _worse,
    load_config,
    run_nightly,
)
from difftune.store import TrialState, get_store

REPO = Path(__file__).resolve().parents[2]

# Objectives without timing (flops_ratio) make the fronts — and so the warm start — the same on every machine.
CONFIG = """
output = "out"
[tolerance]
speedup = 0.9
psnr = 1.0
[[models]]
name = "digits"
model = "embedded"
device = "cpu"
steps = 10
samples = 4
[[models.spaces]]
space = "cache"
budget = 12
objectives = ["flops_ratio", "psnr", "class_accuracy"]
[[models.profiles]]
name = "balanced"
space = "cache"
select = "best psnr where flops_ratio<=0.7"
"""


def write(tmp_path: Path, text: str = CONFIG) -> Path:
    path = tmp_path / "nightly.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (("steps = 10", "stpes = 10"), "unknown key(s) stpes"),
        (("budget = 12", "budget = 0"), "spaces[0].budget"),
        (("budget = 12", "budget = 12\nems = 64"), "spaces[0].ems"),
        (('space = "cache"\nbudget', 'space = "cahce"\nbudget'), "spaces[0].space"),
        (("flops_ratio<=0.7", "flops_ratio<<0.7"), "profiles[0].select"),
        (('space = "cache"\nselect', 'space = "solver"\nselect'), "is not searched for this model"),
        (('select = "best psnr where flops_ratio<=0.7"', 'select = "best psnr"\nfit = -5'), "profiles[0].fit"),
        (("speedup = 0.9", "speedup = -1"), "tolerance.speedup"),
        (("[tolerance]", "[tolerance]\nfrobs = 1"), "tolerance.frobs"),
        (('model = "embedded"', 'model = "./no/such/model"'), "does not exist"),
        (("samples = 4", "samples = 1"), "samples"),
        (('output = "out"', 'output = "out'), "not valid TOML"),
        (('output = "out"', "output = 1"), "output: expected a folder"),
    ],
)
def test_a_bad_configuration_names_the_key(tmp_path, change, named):
    old, new = change
    assert old in CONFIG
    path = write(tmp_path, CONFIG.replace(old, new, 1))
    with pytest.raises(ConfigError, match=r"nightly\.toml") as info:
        load_config(path)
    assert named in str(info.value)


def test_the_example_configuration_loads():
    cfg = load_config(REPO / "examples" / "nightly-embedded.toml")
    (model,) = cfg.models
    assert model.model == "embedded" and model.time_limit_s == 20 * 60
    assert [s.space for s in model.spaces] == ["cache", "solver"]
    assert [s.ems for s in model.spaces] == [0, 64]
    assert [p.name for p in model.profiles] == ["balanced", "fast"]
    assert [p.fit for p in model.profiles] == [0, 300]
    assert cfg.output == (REPO / "nightly").resolve()
    assert cfg.storage == f"sqlite:///{cfg.output / 'difftune.db'}"


def test_tolerances_are_relative_for_speedup_and_absolute_for_the_rest():
    tol = {"speedup": 0.1, "psnr": 1.0, "mse": 0.001}
    assert _worse({"speedup": 2.0, "psnr": 30.0}, {"speedup": 1.85, "psnr": 29.2}, tol) == []
    worse = _worse({"speedup": 2.0, "psnr": 30.0, "mse": 0.002}, {"speedup": 1.7, "psnr": 28.5, "mse": 0.0035}, tol)
    assert [w.split()[0] for w in worse] == ["speedup", "psnr", "mse"]
    # better is never a regression
    assert _worse({"speedup": 2.0, "psnr": 30.0, "mse": 0.002}, {"speedup": 3.0, "psnr": 40.0, "mse": 0.0}, tol) == []


def test_the_lock_refuses_a_live_night_and_takes_over_a_dead_one(tmp_path):
    lock = tmp_path / "nightly.lock"
    import socket

    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "x"}))
    with pytest.raises(NightlyLocked, match=f"pid {os.getpid()}"):
        with _Lock(tmp_path):
            pass
    assert lock.exists()  # a live night's lock is left alone
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": "x"}))
    with _Lock(tmp_path) as taken:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert "stale" in (taken.stale or "")
    assert not lock.exists()


def test_the_cli_exits_2_on_a_bad_configuration_and_on_a_held_lock(tmp_path, capsys):
    bad = write(tmp_path, CONFIG.replace("budget = 12", "budget = twelve"))
    with pytest.raises(SystemExit) as info:
        main(["nightly", "--config", str(bad)])
    assert info.value.code == 2
    assert "not valid TOML" in capsys.readouterr().err
    good = write(tmp_path)
    import socket

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "nightly.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    with pytest.raises(SystemExit) as info:
        main(["nightly", "--config", str(good)])
    assert info.value.code == 2
    assert "another night is running" in capsys.readouterr().err
    assert not (tmp_path / "out" / "nights").exists()  # nothing ran


class _Interrupt(BaseException):
    pass


@pytest.mark.slow
def test_nights_resume_warm_start_flag_regressions_and_fresh_models(tmp_path, embedded_pipe):
    path = write(tmp_path)
    cfg = load_config(path)
    url = cfg.storage
    today = date(2026, 11, 30)

    # night 1, interrupted after its fourth trial, then resumed by the next invocation
    seen: list[str] = []

    def stop_at_fourth(line: str) -> None:
        seen.append(line)
        if sum(": trial " in s for s in seen) == 4:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        run_nightly(cfg, pipelines={"digits": embedded_pipe}, progress=stop_at_fourth, today=today)
    state = json.loads((tmp_path / "out" / "nights" / "2026-11-30" / "state.json").read_text())
    assert state["status"] == "running" and not (tmp_path / "out" / "nightly.lock").exists()
    first = run_nightly(cfg, pipelines={"digits": embedded_pipe}, today=today)
    assert first.night == "2026-11-30" and first.resumed and first.exit_code == EXIT_OK
    store = get_store(url)
    try:
        study1 = store.get_study("digits-cache-2026-11-30")
        trials1 = store.list_trials(study1.id)
        assert len([t for t in trials1 if t.state is TrialState.COMPLETE]) == 12  # the budget, not 12 + 4
        front1 = store.pareto_front(study1.id)
    finally:
        store.close()
    searched_on_front = {f"digits-cache-2026-11-30#{t.number}" for t in front1 if t.kind == "searched"}
    assert searched_on_front, "the deterministic front of this configuration holds a searched point"
    deployed = tmp_path / "out" / "profiles" / "digits" / "balanced.json"
    assert json.loads(deployed.read_text())["provenance"]["study"] == "digits-cache-2026-11-30"
    png = tmp_path / "out" / "nights" / "2026-11-30" / "digits.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # night 2 from a cron-like invocation: a bare environment, another working directory
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    cron = subprocess.run(
        [sys.executable, "-m", "difftune.cli", "nightly", "--config", str(path)],
        cwd="/",
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert cron.returncode == 0, cron.stdout + cron.stderr
    assert "Traceback" not in cron.stderr
    second = sorted(p.name for p in (tmp_path / "out" / "nights").iterdir())[-1]
    assert second != "2026-11-30"
    store = get_store(url)
    try:
        study2 = store.get_study(f"digits-cache-{second}")
        warm = [t for t in store.list_trials(study2.id) if t.kind == "warm"]
    finally:
        store.close()
    # last night's searched front points were measured again first, tonight, and not copied from the memo
    assert {t.config["warm"] for t in warm} == searched_on_front
    assert min(t.number for t in warm) == 0
    assert all("memo_of" not in (t.config or {}) and t.state is TrialState.COMPLETE for t in warm)
    report = (tmp_path / "out" / "nights" / second / "report.md").read_text()
    assert "Previous night: 2026-11-30" in report
    assert f"Warm start: {len(warm)} point(s) of last night's front (`digits-cache-2026-11-30`)" in report
    assert "Hypervolume (one reference for both nights)" in report
    assert "| balanced | **ok**: within tolerance" in report
    assert "## Regressions\n\nNone." in report

    # night 3: a forced regression — the profile in service promises 10 dB more than it holds
    data = json.loads(deployed.read_text())
    data["metrics"]["psnr"]["value"] += 10.0
    deployed.write_text(json.dumps(data))
    with pytest.raises(SystemExit) as info:
        main(["nightly", "--config", str(path), "--night", "forced"])
    assert info.value.code == EXIT_REGRESSION
    state = json.loads((tmp_path / "out" / "nights" / "forced" / "state.json").read_text())
    check = state["models"]["digits"]["revalidated"]["balanced"]
    assert check["status"] == "regressed" and check["reason"].startswith("psnr ")
    assert abs(check["recorded"]["psnr"] - check["measured"]["psnr"] - 10.0) < 1.0
    report = (tmp_path / "out" / "nights" / "forced" / "report.md").read_text()
    assert "- digits/balanced: psnr" in report and "exit code **1** (regression)" in report

    # night 4: other weights — fresh study without warm start, the profile in service flagged
    changed = copy.deepcopy(embedded_pipe)
    with torch.no_grad():
        next(changed.transformer.parameters()).add_(1e-3)
    fourth = run_nightly(cfg, pipelines={"digits": changed}, night="weights")
    assert fourth.exit_code == EXIT_REGRESSION
    entry = fourth.state["models"]["digits"]
    assert "fingerprint changed" in entry["fresh"]
    assert entry["revalidated"]["balanced"]["status"] == "model_changed"
    assert "warm_from" not in entry["spaces"]["cache"]
    store = get_store(url)
    try:
        assert not [t for t in store.list_trials(store.get_study("digits-cache-weights").id) if t.kind == "warm"]
    finally:
        store.close()


@pytest.mark.slow
def test_a_time_limit_stops_starting_trials(tmp_path, embedded_pipe):
    from difftune.search.runner import run_study

    result = run_study(
        "embedded",
        "cache",
        budget=2,
        storage=f"sqlite:///{tmp_path / 'db.sqlite'}",
        num_inference_steps=4,
        samples=2,
        pipeline=embedded_pipe,
        time_limit_s=1e-3,  # over before the first trial could start
    )
    assert result.new_trials == 0 and result.finished == 0
    assert "stopped at the time limit after 0 trials of this run (0 of 2 done)" in result.notes
    assert result.study.status != "finished"
    # the study resumes where the limit stopped it
    again = run_study(
        "embedded",
        "cache",
        budget=2,
        storage=f"sqlite:///{tmp_path / 'db.sqlite'}",
        num_inference_steps=4,
        samples=2,
        pipeline=embedded_pipe,
    )
    assert again.new_trials == 2 and again.study.status == "finished"


def test_the_front_plot_draws_identical_images_at_the_psnr_cap():
    from difftune.search.nightly import PSNR_SHOWN, _axis_label, _shown
    from difftune.store import MetricSpec

    assert _shown("psnr", 100.0) == PSNR_SHOWN and _shown("psnr", 31.5) == 31.5 and _shown("speedup", 100.0) == 100.0
    assert f"drawn at {PSNR_SHOWN:g}" in _axis_label(MetricSpec("psnr", "maximize", "dB"))
    assert _axis_label(MetricSpec("speedup", "maximize", "×")) == "speedup (maximize)"
