"""A user's own pipeline, as a directory on disk: calibrate → fronts → export → apply in a fresh process.

Tiny random SD, PixArt and Flux pipelines are written with ``save_pretrained`` and go through the CLI
exactly as a user's would (``--model DIR --prompts FILE`` and the call options), in the cache and the
solver space; then the bad inputs a new user hits, each an exit code and one line, the database untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from difftune.cli import EXIT_BAD_INPUT, main
from tests.models import tiny_pipelines

pytestmark = pytest.mark.usefixtures("one_thread")

#: The call options each tiny pipeline needs beside the prompts (a user passes the same for a real one:
#: resolution binning only knows PixArt's real sizes; a short T5 context keeps the tiny models fast).
CALL_ARGS = {
    "sd": [],
    "pixart": ["--call-arg", "max_sequence_length=32", "--call-arg", "use_resolution_binning=false"],
    "flux": ["--call-arg", "max_sequence_length=32"],
}
FAST = ["--steps", "6", "--samples", "2", "--height", "32", "--width", "32"]
PROMPTS = "# two prompts for the tiny models\na photo of a cat\na painting of a dog\n"


@pytest.fixture(scope="module")
def own_models(tmp_path_factory):
    """Tiny SD, PixArt and Flux pipeline directories and a prompt file."""
    root = tmp_path_factory.mktemp("own")
    for family in CALL_ARGS:
        pipe, _ = tiny_pipelines.build(family)
        pipe.save_pretrained(root / family)
    (root / "prompts.txt").write_text(PROMPTS, encoding="utf-8")
    return root


def _capture_stdout():
    """The CLI's console writes to sys.stdout as it is when each print happens: redirect it."""
    import contextlib
    import io

    buffer = io.StringIO()

    @contextlib.contextmanager
    def capture():
        with contextlib.redirect_stdout(buffer):
            yield buffer

    return capture()


def _sd_args(root: Path, *more: str) -> list[str]:
    """``calibrate`` of the tiny SD directory with the prompt file and the fast settings, then ``more``."""
    return ["calibrate", "--model", str(root / "sd"), "--prompts", str(root / "prompts.txt"), *FAST, *more]


def _one_error_line(err: str, message: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err


STARTS: list[str] = []  # what calibrate printed at the start of each study


@pytest.fixture(scope="module")
def calibrated(own_models):
    """Every family calibrated in the cache space (identity, FORA 2) and the solver space (3 NFE baselines)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    url = f"sqlite:///{own_models / 'studies.db'}"
    try:
        for family, extra in CALL_ARGS.items():
            common = ["--model", str(own_models / family), "--prompts", str(own_models / "prompts.txt"), *FAST, *extra]
            # psnr<99 keeps the identity (PSNR 100) off the cache front: on a busy machine three timed repeats
            # may not tell FORA 2 faster beyond the noise, and the identity would then stand alone
            with _capture_stdout() as out:
                cache = ["--space", "cache", "--budget", "2", "--study", f"{family}-cache", "--constraint", "psnr<99"]
                main(["calibrate", *common, *cache, "--storage", url])
            STARTS.append(out.getvalue())
            solver = ["--space", "solver", "--nfe", "3:3", "--budget", "2", "--study", f"{family}-solver"]
            main(["calibrate", *common, *solver, "--storage", url])
    finally:
        torch.set_num_threads(before)
    return own_models, url


def test_own_models_calibrate_store_their_settings_and_export(calibrated, capsys):
    root, url = calibrated
    capsys.readouterr()
    # the start line names the device and call, and the metrics whose weights are not here, with why
    assert all("on device cpu, dtype float32, 32×32, 6 steps" in " ".join(s.split()) for s in STARTS), STARTS
    assert all("not measured here: lpips" in s and "not measured here: clip_score" in s for s in STARTS)
    main(["fronts", "--storage", url, "--json"])
    fronts = {f["study"]: f for f in json.loads(capsys.readouterr().out)}
    assert set(fronts) == {f"{f}-{s}" for f in CALL_ARGS for s in ("cache", "solver")}
    for name, front in fronts.items():
        assert [o["name"] for o in front["objectives"]] == ["speedup", "psnr", "sharpness"], name
        assert front["device"] == "cpu" and front["points"], name
        for point in front["points"]:
            assert point["kind"] == "baseline" and point["baseline"]  # a budget of 2: the first baselines
            assert {"speedup", "psnr", "sharpness", "latency_ms", "nfe"} <= set(point["metrics"])
            assert "class_accuracy" not in point["metrics"]

    from difftune.store import get_store

    store = get_store(url)
    try:
        settings = store.get_study("pixart-cache").reference
    finally:
        store.close()
    assert settings["prompts"] == ["a photo of a cat", "a painting of a dog"]
    assert settings["call_args"] == {"max_sequence_length": 32, "use_resolution_binning": False}
    assert settings["height"] == 32 and settings["model"] == str((root / "pixart").resolve())

    for family in CALL_ARGS:
        # the cache study's FORA point (its constraint keeps the identity out) and the solver study's fastest
        for space, select in (("cache", "fastest"), ("solver", "fastest")):
            out = root / f"{family}-{space}.json"
            main(["export", "--study", f"{family}-{space}", "--select", select, "--storage", url, "--out", str(out)])
            profile = json.loads(out.read_text())
            assert profile["metrics"]["psnr"]["split"] == "held_out"
            assert profile["context"]["height"] == 32 and profile["context"]["width"] == 32
            assert profile["provenance"]["device"] == "cpu" and profile["provenance"]["dtype"] == "float32"
            assert (profile["cache"] if space == "cache" else profile["solver"]) is not None


APPLY = r"""
import json, sys, torch
import difftune

root, family, extra = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
torch.set_num_threads(1)
pipe = difftune.load_pipeline(f"{root}/{family}")
pipe.set_progress_bar_config(disable=True)
out = {}
for space in ("cache", "solver"):
    profile = difftune.load_profile(f"{root}/{family}-{space}.json")
    steps = profile.context.num_inference_steps
    kwargs = dict(prompt=["a cat"], num_inference_steps=steps, height=32, width=32, output_type="pt", **extra)
    def run():
        return pipe(generator=torch.Generator().manual_seed(5), **kwargs).images
    plain = run()
    handle = difftune.apply_profile(pipe, profile)
    tuned = run()
    scheduler = type(pipe.scheduler).__name__
    handle.remove()
    again = run()
    out[space] = {
        "finite": bool(torch.isfinite(tuned).all()),
        "changed": float((tuned - plain).abs().max()),
        "restored": bool(torch.equal(again, plain)),
        "scheduler": scheduler,
        "steps": steps,
    }
print(json.dumps(out))
"""


@pytest.mark.parametrize("family", list(CALL_ARGS))
def test_exported_profiles_apply_in_a_fresh_process(calibrated, family):
    root, _ = calibrated
    if not (root / f"{family}-cache.json").exists():
        pytest.skip("needs the export test's profiles (run the module in order)")
    extra = {"sd": {}, "pixart": {"max_sequence_length": 32, "use_resolution_binning": False}}.get(
        family, {"max_sequence_length": 32}
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", APPLY, str(root), family, json.dumps(extra)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for space in ("cache", "solver"):
        assert result[space]["finite"] and result[space]["restored"], result
    assert result["cache"]["changed"] > 0  # FORA reuses features: not the plain output
    assert result["solver"]["scheduler"] == "USFScheduler" and result["solver"]["steps"] == 3


# ---- bad input: exit 2, one line, nothing written ---------------------------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (["--objectives", "speedup,psnr,class_accuracy"], "class_accuracy needs a classifier"),
        (["--constraint", "lpips<=0.1"], "lpips"),
        (["--objectives", "speedup,psnr"], "blur-guard metric"),
        (["--objectives", "speedup,psnr:min,sharpness:sideways"], "direction must be"),
        (["--call-arg", "max_sequence_length"], "expected KEY=VALUE"),
        (["--call-arg", "no_such_argument=1"], "--call-arg no_such_argument: StableDiffusionPipeline takes no"),
        (["--dtype", "int8"], "--dtype 'int8'"),
        (["--device", "tpu"], "expected cpu, cuda, cuda:N or mps"),
        (["--revision", "main"], "revision"),
    ],
)
def test_bad_input_for_an_own_model_is_exit_2_and_creates_no_database(own_models, tmp_path, capsys, args, message):
    db = tmp_path / "never.db"
    with pytest.raises(SystemExit) as exc:
        main(_sd_args(own_models, *args, "--budget", "2", "--storage", f"sqlite:///{db}"))
    assert exc.value.code == EXIT_BAD_INPUT
    _one_error_line(capsys.readouterr().err, message)
    assert not db.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_a_device_the_machine_lacks_is_exit_2_never_a_cpu_run(own_models, tmp_path, capsys):
    db = tmp_path / "never.db"
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--model", str(own_models / "sd"), "--device", "cuda", "--storage", f"sqlite:///{db}"])
    assert exc.value.code == EXIT_BAD_INPUT
    _one_error_line(capsys.readouterr().err, "no usable CUDA device")
    assert not db.exists()


def test_bad_prompt_files_are_exit_2(own_models, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    for path, message in ((tmp_path / "missing.txt", "does not exist"), (empty, "holds no prompts")):
        with pytest.raises(SystemExit) as exc:
            main(["calibrate", "--model", str(own_models / "sd"), "--prompts", str(path), "--storage", "sqlite://"])
        assert exc.value.code == EXIT_BAD_INPUT
        _one_error_line(capsys.readouterr().err, message)


def test_a_run_whose_trials_all_fail_exits_1_with_the_reasons(own_models, tmp_path, capsys, monkeypatch):
    import difftune.evaluators

    def broken(*args, **kwargs):
        raise difftune.EvaluationError("the GPU caught fire")

    monkeypatch.setattr(difftune.evaluators, "evaluate", broken)
    with pytest.raises(SystemExit) as exc:
        main(_sd_args(own_models, "--budget", "3", "--storage", f"sqlite:///{tmp_path / 'f.db'}"))
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "every trial of this run failed (3 of 3)" in err and "3 × EvaluationError: the GPU caught fire" in err


def test_constraints_keep_infeasible_points_off_the_front(own_models, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    main(_sd_args(own_models, "--budget", "3", "--constraint", "psnr>=99", "--study", "c", "--storage", url))
    out = " ".join(capsys.readouterr().out.split())  # rich wraps the table's title
    assert "feasible points only: psnr>=99" in out
    main(["fronts", "--study", "c", "--storage", url, "--json"])
    [front] = json.loads(capsys.readouterr().out)
    assert front["constraints"] == ["psnr>=99"]
    # identity (PSNR 100) is the only feasible point; FORA 2 and 3 are faster but miss the bound
    assert [p["baseline"] for p in front["points"]] == ["identity"]

    # a worker on another kind of device is refused: its timings would not compare
    with pytest.raises(SystemExit) as exc:
        main(["worker", "--study", "c", "--storage", url, "--device", "cuda"])
    assert exc.value.code == EXIT_BAD_INPUT
    _one_error_line(capsys.readouterr().err, "measures on cpu")
