"""Every page of the dashboard in Streamlit's AppTest, on the seeded database: what it shows, not just that it runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from difftune.search.runner import front_hypervolume
from difftune.store import Store
from tests.dashboard._helpers import chart, charts, drawn_trials, images, texts
from tests.dashboard._seed import CACHE_FRONT, CACHE_STUDY, CACHE_TRIALS, JOINT_STUDY, seed

FRONT_CHART = "front-chart-1"  # the first study's id is 1


def test_the_newest_study_opens_on_its_front_and_the_sidebar_lists_every_study(open_app, seeded_url):
    app = open_app(seeded_url)
    assert texts(app.title)[0] == JOINT_STUDY  # created last
    assert app.sidebar.selectbox(key="study").options == [JOINT_STUDY, CACHE_STUDY]
    assert app.sidebar.radio(key="page").value == "Front"
    assert any(f"{JOINT_STUDY} is running: 4 of 10 trials finished" in t for t in texts(app.sidebar.info))
    assert app.query_params["study"] == [JOINT_STUDY] or app.query_params["study"] == JOINT_STUDY
    # the model filter keeps only that model's studies
    app.sidebar.selectbox(key="model").set_value(1).run()  # the embedded model (id 1)
    assert app.sidebar.selectbox(key="study").options == [CACHE_STUDY]
    assert texts(app.title)[0] == CACHE_STUDY


def test_front_draws_kinds_apart_front_solid_dominated_faint_and_the_front_table(open_app, seeded_url):
    app = open_app(seeded_url, study=CACHE_STUDY)
    assert texts(app.title)[0] == CACHE_STUDY
    caption = texts(app.caption)[0]
    assert "cache space · nsga2 · cpu float32 · 20 reference steps · 19 complete" in caption
    assert f"{len(CACHE_FRONT)} on the front" in caption
    figure = chart(app, FRONT_CHART)
    traces = drawn_trials(figure)
    complete = {n for n, *_ in CACHE_TRIALS}
    assert sorted(n for numbers in traces.values() for n in numbers) == sorted(complete)  # each trial once
    solid = {n for name, numbers in traces.items() if "dominated" not in name for n in numbers}
    assert solid == set(CACHE_FRONT)
    assert set(traces) == {"baseline", "baseline (dominated)", "searched", "searched (dominated)", "retry"}
    assert set(traces["baseline"]) == {0, 1, 4} and set(traces["retry"]) == {18}
    markers = {t["name"]: t["marker"] for t in figure["data"] if "marker" in t}
    assert markers["baseline"]["symbol"] == "square" and markers["searched"]["symbol"] == "circle"
    assert markers["baseline (dominated)"]["opacity"] < markers["baseline"]["opacity"] == 1.0
    hover = next(t for t in figure["data"] if t.get("name") == "baseline")["text"]
    assert any("fora_2" in h and "cache mask: 20 steps × 6 blocks × 2 components" in h for h in hover)
    assert figure["layout"]["xaxis"]["title"]["text"].startswith("speedup (×)")
    assert figure["layout"]["yaxis"]["title"]["text"].startswith("psnr (dB)")
    table = app.dataframe[0].value
    assert list(table["trial"]) == list(CACHE_FRONT)  # fastest first
    assert table.loc[table["trial"] == 1, "method"].item() == "fora_2"
    settings = dict(zip(table["trial"], table["settings"], strict=True))
    assert settings[1].startswith("cache mask: 20 steps × 6 blocks × 2 components, ")
    assert settings[4].startswith("cache policy: first_block_cache (threshold=0.05)")
    assert any("did not complete" in e.label for e in app.expander)


def test_front_axes_kinds_and_hiding_dominated_points(open_app, seeded_url):
    app = open_app(seeded_url, study=CACHE_STUDY)
    app.checkbox(key="dom-1").uncheck().run()
    assert {n for numbers in drawn_trials(chart(app, FRONT_CHART)).values() for n in numbers} == set(CACHE_FRONT)
    for kind in ("seed", "searched", "retry"):
        app.checkbox(key=f"kind-{kind}-1").uncheck()
    app.run()
    assert drawn_trials(chart(app, FRONT_CHART)) == {"baseline": [0, 1, 4]}
    app.radio(key="x-1").set_value("latency_ms").run()
    app.selectbox(key="y-1").set_value("class_accuracy").run()
    layout = chart(app, FRONT_CHART)["layout"]
    assert layout["xaxis"]["title"]["text"].startswith("latency_ms (ms) — ↓ better")
    assert layout["yaxis"]["title"]["text"].startswith("class_accuracy")
    assert app.selectbox(key="y-1").options == ["psnr", "class_accuracy"]  # quality metrics only


def test_a_select_filter_hides_points_missing_its_bounds_and_stars_its_pick(open_app, seeded_url):
    app = open_app(seeded_url, study=CACHE_STUDY)
    app.text_input(key="select-1").input("fastest where psnr>=40").run()
    assert texts(app.success) == [
        "`fastest where psnr>=40` picks trial 9 (searched): 1.48 × speedup, 41.3 dB psnr, 1 class_accuracy"
    ]
    traces = drawn_trials(chart(app, FRONT_CHART))
    shown = {n for numbers in traces.values() for n in numbers}
    assert shown == {n for n, *_, psnr, _acc in CACHE_TRIALS if psnr >= 40}
    assert traces["--select pick (trial 9)"] == [9]
    # the export panel starts from the filter
    assert app.text_input(key="front-1-select").value == "fastest where psnr>=40"
    app.text_input(key="select-1").input("fastest where bogus>=1").run()
    assert "unknown metric 'bogus'" in texts(app.warning)[0]
    assert not app.success


def test_point_page_shows_the_schedule_images_and_metrics_of_the_chosen_trial(open_app, seeded_url):
    app = open_app(seeded_url, study=CACHE_STUDY, page="Point", trial=9)
    assert texts(app.header) == ["trial 9 (searched)"]
    assert "on the Pareto front" in texts(app.markdown)[0]
    tiles = {m.label: m.value for m in app.metric}
    assert tiles == {
        "speedup": "1.48 ×",
        "psnr": "41.3 dB",
        "class_accuracy": "1",
        "latency_ms": "310.8 ms",
        "nfe": "20 calls",
    }
    assert images(app) == [["sample 0", "sample 1"], ["sample 0", "sample 1"]]  # its own, then the reference's
    mask = chart(app, "mask-chart")
    heatmaps = [t for t in mask["data"] if t["type"] == "heatmap"]
    assert len(heatmaps) == 2 and len(heatmaps[0]["z"]) == 6 and len(heatmaps[0]["z"][0]) == 20  # blocks × steps
    metrics = app.dataframe[0].value
    assert metrics.loc[metrics["metric"] == "psnr (objective)", "calibration"].item() == pytest.approx(41.3)
    assert app.query_params["trial"] in ("9", ["9"])
    # another point, by the selectbox
    app.selectbox(key="trial").set_value(1).run()
    assert texts(app.header) == ["trial 1 · fora_2 (baseline)"]


def test_point_page_draws_solver_sada_quantization_and_held_out_figures(open_app, seeded_url):
    app = open_app(seeded_url, study=JOINT_STUDY, page="Point", trial=0)
    assert charts(app) == ["solver-chart", "mask-chart"]
    steps = app.dataframe[0].value
    assert list(steps["order"]) == [1, 2, 3, 1] and list(steps["dc_ratio"]) == [1.0, 1.05, 0.97, 1.15]
    assert list(steps["corrector"]) == [True, True, False, False]
    assert "- solver: 4 steps, orders 1·2·3·1, data/noise prediction, UniC on 2, DC ratios 0.97–1.15" in texts(
        app.markdown
    )
    app.selectbox(key="trial").set_value(1).run()
    assert texts(app.header) == ["trial 1 · sada_default (seed)"]
    assert charts(app) == ["sada-chart"]
    sada = app.dataframe[0].value
    assert sada.loc[sada["setting"] == "acc_range", "value"].item() == "[10, 47]"
    phases = chart(app, "sada-chart")["data"][0]["customdata"][0]
    assert phases[:10] == ["computed"] * 10 and phases[10] == "momentum" and phases[25] == "lagrange"
    app.selectbox(key="trial").set_value(2).run()
    assert charts(app) == ["quant-chart"]
    bits = app.dataframe[0].value
    assert list(bits["layer"]) == ["(every other layer)", "proj_out", "transformer_blocks.0.ff"]
    assert list(bits["weight_bits"]) == [8, 16, 4]
    app.selectbox(key="trial").set_value(3).run()
    assert any("Cache policy" in t and "fora" in t for t in texts(app.markdown))
    tiles = {m.label: (m.value, m.proto.delta) for m in app.metric}
    assert tiles["psnr"] == ("33.5 dB", "held-out 32 dB")
    metrics = app.dataframe[-1].value
    row = metrics.loc[metrics["metric"] == "psnr (objective)"]
    assert row["held-out"].item() == 32.0 and row["held-out − calibration"].item() == pytest.approx(-1.5)
    assert any("Held-out figures were measured" in t for t in texts(app.caption))
    app.selectbox(key="trial").set_value(4).run()  # still running: no figures, no error
    assert "running" in texts(app.markdown)[0] and not app.error


def test_compare_page_puts_two_points_side_by_side(open_app, seeded_url):
    app = open_app(seeded_url, study=CACHE_STUDY, page="Compare")
    assert app.selectbox(key="compare_a").value == CACHE_FRONT[0]
    app.selectbox(key="compare_a").set_value(9).run()
    app.selectbox(key="compare_b").set_value(1).run()
    assert texts(app.subheader)[:2] == ["trial 9 (searched)", "trial 1 · fora_2 (baseline)"]
    assert images(app) == [["sample 0", "sample 1"]] * 2 + [["reference 0", "reference 1"]]
    table = app.dataframe[0].value
    psnr = table.loc[table["metric"] == "psnr"]
    assert psnr["A: trial 9"].item() == 41.3 and psnr["B: trial 1"].item() == 43.5
    assert psnr["B − A"].item() == pytest.approx(2.2)


def test_hypervolume_page_follows_the_runner(open_app, seeded_url):
    app = open_app(seeded_url, study=CACHE_STUDY, page="Hypervolume")
    with Store(seeded_url) as store:
        study = store.get_study(CACHE_STUDY)
        expected = front_hypervolume(study.objectives, store.pareto_front(CACHE_STUDY))
    assert app.metric[0].value == f"{expected:.4g}"
    figure = chart(app, "hv-chart")
    line = figure["data"][0]
    assert line["x"] == sorted(n for n, *_ in CACHE_TRIALS)
    assert line["y"] == sorted(line["y"]) and line["y"][-1] == pytest.approx(expected)
    assert "reference point (speedup 1 ×, psnr 20 dB, class_accuracy 0.5)" in texts(app.caption)[0]
    raised = app.dataframe[0].value
    assert list(raised["kind"])[:2] == ["baseline", "baseline"] and "searched" in set(raised["kind"])


def test_studies_page_lists_models_and_their_studies(open_app, seeded_url):
    app = open_app(seeded_url, page="Studies")
    assert texts(app.subheader) == ["embedded (embedded)", "DiT-XL-2-256 (dit)"]
    cache = app.dataframe[0].value.iloc[0]
    assert (cache["study"], cache["status"], cache["finished"], cache["front"]) == (
        CACHE_STUDY,
        "finished",
        "19 / 20",
        len(CACHE_FRONT),
    )
    joint = app.dataframe[1].value.iloc[0]
    assert (joint["study"], joint["running"], joint["device"]) == (JOINT_STUDY, 1, "cuda float16")


def test_new_trials_of_a_running_study_appear_on_refresh(open_app, seeded_url):
    app = open_app(seeded_url, study=JOINT_STUDY)
    assert "4 complete" in texts(app.caption)[0]
    with Store(seeded_url) as store:  # a worker finishes its trial meanwhile
        [running] = store.list_trials(JOINT_STUDY, "running")
        store.set_trial_state(running.id, "complete", metrics={"speedup": 12.0, "psnr": 29.0, "class_accuracy": 1.0})
    app.sidebar.button[0].click().run()  # Refresh
    assert "5 complete" in texts(app.caption)[0]
    assert 4 in {n for numbers in drawn_trials(chart(app, "front-chart-2")).values() for n in numbers}


def test_an_empty_database_says_how_to_run_a_first_calibration(open_app, tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    Store(url).close()
    app = open_app(url)
    assert texts(app.info) == [f"The database at `{url}` holds no studies yet."]
    assert texts(app.code) == [f"difftune calibrate --storage '{url}'"]
    assert not app.error


def test_a_missing_database_is_not_created(open_app, tmp_path: Path):
    path = tmp_path / "nothing-here.db"
    app = open_app(f"sqlite:///{path}")
    assert texts(app.info) == [f"There is no database at `sqlite:///{path}` yet."]
    assert "difftune calibrate" in texts(app.code)[0]
    assert not path.exists()


@pytest.mark.parametrize("content", [b"this is not a database" * 100, b""], ids=["garbage", "directory"])
def test_an_unreadable_database_is_one_line_not_a_traceback(open_app, tmp_path: Path, content: bytes):
    path = tmp_path / "broken.db"
    if content:
        path.write_bytes(content)
    else:
        path.mkdir()  # a directory where the file should be
    app = open_app(f"sqlite:///{path}")
    [error] = texts(app.error)
    assert error.startswith("error: cannot open storage sqlite:///") and "\n" not in error
    assert not app.exception and not app.info


def test_a_seeded_database_opened_twice_keeps_its_bytes(open_app, seeded_url):
    """Reading is all the pages do (the export aside): the file is unchanged after a tour."""
    path = Path(seeded_url.removeprefix("sqlite:///"))
    with Store(seeded_url):
        pass  # fold the WAL back
    before = path.read_bytes()
    for page in ("Studies", "Front", "Point", "Compare", "Hypervolume"):
        open_app(seeded_url, study=CACHE_STUDY, page=page)
    with Store(seeded_url):
        pass
    assert path.read_bytes() == before


def test_seed_is_importable_without_streamlit(tmp_path: Path):
    seed(f"sqlite:///{tmp_path / 'again.db'}")
