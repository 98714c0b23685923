"""The command line: models, generate, and one-line errors with a non-zero exit on bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from difftune.cli import EXIT_BAD_INPUT, main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "difftune.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_commands():
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("models", "generate"):
        assert command in out.stdout


def test_models_lists_the_embedded_default(capsys):
    main(["models"])
    out = capsys.readouterr().out
    assert "embedded" in out and "ships" in out and "stabilityai/stable-diffusion-xl-base-1.0" in out


def test_generate_writes_a_grid(tmp_path, capsys):
    out = tmp_path / "sub" / "grid.png"
    main(["generate", "--prompt", "digit 3", "7", "--per-prompt", "3", "--steps", "3", "--out", str(out)])
    image = Image.open(out)
    # 2 rows × 3 columns of 16-px digits upscaled ×4, with 2-px gutters
    assert image.size == (3 * 64 + 4 * 2, 2 * 64 + 3 * 2)
    assert "wrote" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["grid.png"]


def test_generate_is_reproducible_and_seed_dependent(tmp_path):
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for path, seed in zip(paths, (5, 5, 6), strict=True):
        main(["generate", "-p", "1", "--per-prompt", "2", "--steps", "3", "--seed", str(seed), "--out", str(path)])
    a, b, c = (Image.open(p).tobytes() for p in paths)
    assert a == b and a != c


@pytest.mark.parametrize(
    "args,message",
    [
        (["--prompt", "digit x"], "not a class of the embedded model"),
        (["--prompt", "3", "--model", "./no/such/dir"], "no model './no/such/dir'"),
        (["--prompt", "3", "--model", "someone/uncached-model"], "never downloads"),
        (["--prompt", "3", "--scheduler", "heun9"], "unknown scheduler 'heun9'"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(tmp_path, args, message):
    out = tmp_path / "grid.png"
    result = run_cli("generate", *args, "--steps", "2", "--out", str(out))
    assert result.returncode == EXIT_BAD_INPUT
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_generate_with_a_profile_uses_its_context(tmp_path, embedded_pipe, capsys):
    from tests.test_profile import make_profile

    profile = make_profile(embedded_pipe, steps=4)
    profile.save(tmp_path / "p.json")
    plain, tuned = tmp_path / "plain.png", tmp_path / "tuned.png"
    main(["generate", "-p", "3", "--steps", "4", "--guidance-scale", "1.5", "--out", str(plain)])
    main(["generate", "-p", "3", "--profile", str(tmp_path / "p.json"), "--out", str(tuned)])
    assert "profile 'test'" in capsys.readouterr().out
    assert Image.open(plain).tobytes() != Image.open(tuned).tobytes()


@pytest.mark.parametrize("content,message", [("{not json", "not valid JSON"), ('{"schema_version": 1}', "missing")])
def test_generate_with_a_bad_profile_fails_cleanly(tmp_path, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    result = run_cli("generate", "-p", "3", "--profile", str(bad), "--out", str(tmp_path / "g.png"))
    assert result.returncode == EXIT_BAD_INPUT
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["calibrate", "--bogus"], "No such option: --bogus"),
        (["frontz"], "Did you mean 'fronts'?"),
        (["calibrate", "--budget", "0"], "Invalid value for '--budget'"),
    ],
)
def test_usage_errors_are_the_usual_message_with_exit_2_not_a_traceback(args, message, capsys):
    from difftune.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Usage: difftune" in err and "Traceback" not in err


def test_ems_on_a_space_without_v3_is_one_line_exit_2(tmp_path):
    result = run_cli(
        "calibrate", "--space", "cache", "--ems", "8", "--budget", "1", "--storage", f"sqlite:///{tmp_path / 'd.db'}"
    )
    assert result.returncode == EXIT_BAD_INPUT
    assert "for the solver space, not 'cache'" in result.stderr and "Traceback" not in result.stderr


def test_an_unwritable_output_is_one_line(tmp_path, capsys):
    from difftune.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--prompt", "3", "--steps", "2", "--per-prompt", "1", "--out", str(blocker / "grid.png")])
    assert exc.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot write") and str(blocker) in lines[0]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("device,message", [("cuda", "no usable CUDA device"), ("gpu0", "expected cpu, cuda")])
def test_bench_on_a_device_this_machine_lacks_is_one_line_exit_2(device, message):
    result = run_cli("bench", "runtime", "--device", device)
    assert result.returncode == EXIT_BAD_INPUT
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "running benchmark" not in result.stdout  # refused before anything is loaded or timed


def test_fronts_say_where_each_point_came_from():
    from types import SimpleNamespace as NS

    from difftune.cli import _point_label

    study = NS(id=3, space="ecad", searcher="pymoo-nsga2")
    assert _point_label(NS(kind="baseline", config={"baseline": "fora_2"}), study) == "fora_2"
    assert _point_label(NS(kind="seed", config={"seed": "unipc_nfe4"}), study) == "unipc_nfe4"
    assert _point_label(NS(kind="retry", config={"retry_of": 7}), study) == "of trial 7"
    assert _point_label(NS(kind="searched", config={}), study) == "ecad search (pymoo-nsga2)"
    same = NS(kind="searched", config={"memo_of": {"study_id": 3, "trial": 12}})
    assert _point_label(same, study) == "ecad search (pymoo-nsga2) · figures of trial 12"
    other = NS(kind="baseline", config={"baseline": "identity", "memo_of": {"study_id": 1, "trial": 0}})
    assert _point_label(other, study) == "identity · figures of study 1 trial 0"


def test_loading_a_saved_pipeline_prints_no_library_chatter(tmp_path):
    """transformers 5 shows a "Loading weights" bar per text encoder and, for a saved ``CLIPImageProcessor``
    without torchvision, a fallback notice: neither reaches a command's stderr unless DIFFTUNE_VERBOSE=1."""
    import json
    import os

    from transformers import CLIPImageProcessorPil

    from tests.models.tiny_pipelines import build

    pipe, _ = build("sd")
    pipe.register_modules(feature_extractor=CLIPImageProcessorPil(crop_size=32, size=32))
    folder = tmp_path / "tiny-sd"
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]  # as pipelines saved before v5 name it
    (folder / "model_index.json").write_text(json.dumps(index))
    args = [sys.executable, "-m", "difftune.cli", "generate", "--model", str(folder), "--prompt", "a cat"]
    args += ["--steps", "2", "--out", str(tmp_path / "g.png")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIFFTUNE_VERBOSE", "TRANSFORMERS_", "HF_HUB_"))}
    quiet = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert "Loading" not in quiet.stderr and "torchvision" not in quiet.stderr, quiet.stderr
    loud = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**env, "DIFFTUNE_VERBOSE": "1"})
    assert loud.returncode == 0 and "Loading weights" in loud.stderr
