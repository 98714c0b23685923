"""A tiny real study (the embedded model): the runner's thumbnails, shown by the dashboard, and its export button."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from difftune.search import run_study
from difftune.search.runner import THUMBNAIL_PX, THUMBNAILS
from difftune.store import HELD_OUT, Store, TrialState
from tests.dashboard._helpers import images, texts

STUDY = "tiny"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def real_study(tmp_path_factory: pytest.TempPathFactory, embedded_pipe) -> str:
    """The embedded model's cache space: 3 trials (its first baselines) on 2 samples at 6 steps."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a busy 2-core box (tests/conftest.py's one_thread)
    try:
        url = f"sqlite:///{tmp_path_factory.mktemp('real') / 'real.db'}"
        result = run_study(
            pipeline=embedded_pipe,
            budget=3,
            samples=2,
            num_inference_steps=6,
            latency_repeats=1,
            storage=url,
            study=STUDY,
        )
        assert result.complete == 3
        return url
    finally:
        torch.set_num_threads(threads)


def test_the_runner_stores_small_png_thumbnails_per_trial_and_the_reference_once(real_study):
    from PIL import Image

    with Store(real_study) as store:
        trials = store.list_trials(STUDY)
        reference = store.get_reference_images(STUDY)
        used = store.image_bytes(STUDY)
        per_trial = {t.number: store.get_images(t.id) for t in trials}
    assert [r.index for r in reference] == [0, 1]  # the first batch's samples (2 samples, one batch)
    for number, stored in per_trial.items():
        assert [i.index for i in stored] == [0, 1], number
        assert 0 < len(stored) <= THUMBNAILS
        for image in stored:
            assert image.png.startswith(PNG)
            with Image.open(__import__("io").BytesIO(image.png)) as picture:
                assert max(picture.size) <= THUMBNAIL_PX and picture.format == "PNG"
    identity = per_trial[0]  # no acceleration: its images are the reference's
    assert [i.png for i in identity] == [r.png for r in reference]
    assert used == sum(len(i.png) for images in per_trial.values() for i in images) + sum(len(r.png) for r in reference)
    assert used < 10_000  # 16×16 digits: a few hundred bytes each


def test_point_page_shows_the_runners_thumbnails_beside_the_reference(open_app, real_study):
    app = open_app(real_study, study=STUDY, page="Point", trial=1)
    assert texts(app.header) == ["trial 1 · fora_2 (baseline)"]
    assert images(app) == [["sample 0", "sample 1"], ["sample 0", "sample 1"]]
    assert {m.label for m in app.metric} >= {"speedup", "psnr", "class_accuracy", "nfe"}


def test_export_button_writes_what_difftune_export_writes(open_app, real_study, tmp_path: Path):
    from difftune.cli import main

    with Store(real_study) as store:
        front = store.pareto_front(STUDY)
    select = "fastest where psnr>=0"
    app = open_app(real_study, study=STUDY)
    app.text_input(key="select-1").input(select).run()
    assert app.text_input(key="front-1-select").value == select
    assert (
        texts(app.code)[-1]
        == f"difftune export --study {STUDY} --storage '{real_study}' --select \"{select}\" --out profile.json"
    )
    # --no-validate: the same bytes as the command (but for the creation time)
    app.checkbox(key="front-1-validate").uncheck().run()
    app.button(key="front-1-run").click().run()
    assert not app.error, texts(app.error)
    exported = app.session_state["front-1-file"]
    assert exported.trial == front[0].number and exported.file_name == f"{STUDY}-trial{front[0].number}.json"
    assert [b.label for b in app.download_button] == [f"Download {exported.file_name}"]
    out = tmp_path / "cli.json"
    main(["export", "--study", STUDY, "--storage", real_study, "--select", select, "--out", str(out), "--no-validate"])
    ours, theirs = json.loads(exported.data), json.loads(out.read_text())
    for data in (ours, theirs):
        data["provenance"].pop("created")
    assert ours == theirs
    # validated (the default): re-measured on held-out samples, and the held-out figures are stored
    app.checkbox(key="front-1-validate").check().run()
    app.button(key="front-1-run").click().run()
    assert not app.error, texts(app.error)
    profile = json.loads(app.session_state["front-1-file"].data)
    assert profile["provenance"]["validated"] is True and profile["provenance"]["held_out_samples"] == 2
    assert profile["metrics"]["psnr"]["split"] == "held_out" and "calibration" in profile["metrics"]["psnr"]
    with Store(real_study) as store:
        trial = store.get_trial_by_number(STUDY, profile["provenance"]["trial"])
        assert trial.state is TrialState.COMPLETE and "psnr" in trial.values(HELD_OUT)
    app = open_app(real_study, study=STUDY, page="Point", trial=trial.number)
    assert any("Held-out figures were measured" in t for t in texts(app.caption))


def test_an_export_that_no_point_satisfies_is_one_line_and_offers_nothing(open_app, real_study):
    app = open_app(real_study, study=STUDY)
    app.text_input(key="select-1").input("fastest where psnr>=1000").run()
    assert "no point satisfies psnr>=1000" in texts(app.warning)[0]
    app.button(key="front-1-run").click().run()
    [error] = texts(app.error)
    assert error.startswith("error: no point satisfies psnr>=1000") and "\n" not in error
    assert not app.download_button and not app.exception


def test_a_front_points_page_exports_that_point(open_app, real_study):
    from difftune.store import rank_points

    with Store(real_study) as store:
        front = store.pareto_front(STUDY)
    target = front[-1]  # the slowest front point: the fastest would be picked by "fastest" alone
    app = open_app(real_study, study=STUDY, page="Point", trial=target.number)
    expr = app.text_input(key="point-1-select").value
    assert expr.startswith("fastest where ") and rank_points(front, expr)[0].number == target.number
    app.checkbox(key="point-1-validate").uncheck().run()
    app.button(key="point-1-run").click().run()
    assert app.session_state["point-1-file"].trial == target.number
    assert json.loads(app.session_state["point-1-file"].data)["provenance"]["trial"] == target.number
