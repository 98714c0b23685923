"""calibrate → fronts → export → load_profile → apply_profile, and bad input that leaves the database alone."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import difftune
from difftune.cli import EXIT_BAD_INPUT, main

TINY = ["--budget", "4", "--steps", "6", "--samples", "2"]


# Tiny models on a busy 2-core box: one thread avoids thread hand-offs (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A database holding a tiny calibrated study 'tiny'."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        db = tmp_path_factory.mktemp("cal") / "d.db"
        main(["calibrate", *TINY, "--study", "tiny", "--storage", f"sqlite:///{db}"])
    finally:
        torch.set_num_threads(before)
    return db


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_error_line(err: str, message: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err


def test_calibrate_fronts_export_apply(calibrated, tmp_path, embedded_pipe, capsys):
    url = f"sqlite:///{calibrated}"
    main(["fronts", "--storage", url])
    out = capsys.readouterr().out
    assert "tiny" in out and "speedup" in out and "psnr" in out

    main(["fronts", "--study", "tiny", "--storage", url, "--json"])
    [front] = json.loads(capsys.readouterr().out)
    assert front["study"] == "tiny" and [o["name"] for o in front["objectives"]] == [
        "speedup",
        "psnr",
        "class_accuracy",
    ]
    assert front["points"] and all("speedup" in p["metrics"] for p in front["points"])

    path = tmp_path / "out" / "profile.json"
    main(["export", "--study", "tiny", "--select", "best psnr", "--storage", url, "--out", str(path)])
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines where the terminal width says
    assert "wrote" in out
    profile = difftune.load_profile(path)
    # the held-out line counts samples and names the seeds they used (one seed, or how many and their range)
    first, last = profile.provenance["held_out_seeds"]
    span = f"seed {first}" if first == last else rf"\d+ seeds, {first}–{last}"
    count = profile.provenance["held_out_samples"]
    assert re.search(rf"held-out: {count} samples \({span}; never seen by the search\)", out), out
    assert profile.provenance["study"] == "tiny" and profile.metrics["psnr"]["unit"] == "dB"
    assert profile.context.num_inference_steps == 6

    gen = torch.Generator().manual_seed(0)
    plain = embedded_pipe(class_labels=[3], num_inference_steps=6, generator=gen, output_type="pt").images
    handle = difftune.apply_profile(embedded_pipe, profile)
    try:
        gen = torch.Generator().manual_seed(0)
        tuned = embedded_pipe(class_labels=[3], num_inference_steps=6, generator=gen, output_type="pt").images
    finally:
        handle.remove()
    assert tuned.shape == plain.shape and torch.isfinite(torch.as_tensor(tuned)).all()


def test_calibrate_prints_the_front_and_the_next_commands(calibrated, capsys):
    # rerunning with the same budget resumes: nothing new to evaluate, the front is printed again
    main(["calibrate", *TINY, "--study", "tiny", "--storage", f"sqlite:///{calibrated}"])
    out = capsys.readouterr().out
    assert "Pareto front of 'tiny'" in out and "(0 new" in out
    assert "difftune fronts --study tiny" in out and "difftune export --study tiny" in out
    assert "difftune dashboard --storage" in out


def test_export_with_no_satisfying_point_names_the_closest(calibrated, tmp_path, capsys):
    before = _digest(calibrated)
    path = tmp_path / "p.json"
    args = ["export", "--study", "tiny", "--select", "fastest where psnr>=1000", "--out", str(path)]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--storage", f"sqlite:///{calibrated}"])
    assert exc.value.code == EXIT_BAD_INPUT
    _one_error_line(capsys.readouterr().err, "the closest is trial")
    assert not path.exists() and list(tmp_path.iterdir()) == []
    assert _digest(calibrated) == before


@pytest.mark.parametrize(
    "args,message",
    [
        (["calibrate", "--model", "./no/such/dir"], "no model './no/such/dir'"),
        (["calibrate", "--space", "warp"], "warp"),
        (["calibrate", "--searcher", "annealing"], "unknown searcher 'annealing'"),
        (["export", "--study", "tiny", "--select", "fastest where blurriness>=1"], "unknown metric 'blurriness'"),
        (["export", "--study", "tiny", "--select", "quickest"], "--select"),
        (["export", "--study", "nope", "--select", "fastest"], "nope"),
        (["fronts", "--study", "nope"], "nope"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_the_database_unchanged(calibrated, tmp_path, capsys, args, message):
    before = _digest(calibrated)
    extra = ["--out", str(tmp_path / "p.json")] if args[0] == "export" else []
    with pytest.raises(SystemExit) as exc:
        main([*args, *extra, "--storage", f"sqlite:///{calibrated}"])
    assert exc.value.code == EXIT_BAD_INPUT
    _one_error_line(capsys.readouterr().err, message)
    assert _digest(calibrated) == before
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "storage,message",
    [
        ("not a url", "not a url"),
        ("sqlite:////no/such/dir/d.db", "/no/such/dir/d.db"),
    ],
)
def test_bad_storage_is_one_line_and_creates_nothing(tmp_path, capsys, monkeypatch, storage, message):
    monkeypatch.chdir(tmp_path)
    for command in (["fronts"], ["export", "--study", "s", "--select", "fastest", "--out", "p.json"]):
        with pytest.raises(SystemExit) as exc:
            main([*command, "--storage", storage])
        assert exc.value.code == EXIT_BAD_INPUT
        _one_error_line(capsys.readouterr().err, message)
    assert list(tmp_path.iterdir()) == []


def test_fronts_without_a_database_does_not_create_one(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DIFFTUNE_STORAGE", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["fronts"])
    assert exc.value.code == EXIT_BAD_INPUT
    _one_error_line(capsys.readouterr().err, "run `difftune calibrate` first")
    assert not (tmp_path / "difftune.db").exists()


def test_calibrate_bad_input_in_a_subprocess_has_no_traceback(calibrated):
    before = _digest(calibrated)
    result = subprocess.run(
        [sys.executable, "-m", "difftune.cli", "calibrate", "--space", "warp", "--storage", f"sqlite:///{calibrated}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == EXIT_BAD_INPUT
    _one_error_line(result.stderr, "warp")
    assert "Traceback" not in result.stderr
    assert _digest(calibrated) == before
