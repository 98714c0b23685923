"""The dashboard's data layer (no Streamlit): front points, schedules, hypervolume history, --select for a point."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from difftune.dashboard import _data
from difftune.search.runner import front_hypervolume
from difftune.store import Store, rank_points
from tests.dashboard._seed import CACHE_FRONT, CACHE_STUDY, CACHE_TRIALS, JOINT_STUDY, png


@pytest.fixture(scope="module")
def cache_study(seeded_db):
    with Store(f"sqlite:///{seeded_db}") as store:
        study = store.get_study(CACHE_STUDY)
        yield study, store.list_trials(study.id), store.pareto_front(study.id)


def test_plot_points_classify_front_dominated_and_filtered_points(cache_study):
    _, trials, front = cache_study
    points = _data.plot_points(trials, [t.id for t in front], "speedup", "psnr")
    status = {p.number: p.status for p in points}
    assert {n for n, s in status.items() if s == "front"} == set(CACHE_FRONT)
    assert status[2] == "dominated" and 17 not in status  # the interrupted trial has no figures
    bounded = _data.plot_points(trials, [t.id for t in front], "speedup", "psnr", constraints=["psnr>=45"])
    assert {p.number: p.status for p in bounded}[1] == "front"
    assert {p.number: p.status for p in bounded}[2] == "infeasible"  # misses the study's bound, not dominated
    only = _data.plot_points(
        trials, [t.id for t in front], "speedup", "psnr", select="best psnr where speedup>=2", show_dominated=False
    )
    assert sorted(p.number for p in only) == [12, 13, 15]
    line = _data.front_line(points, _data.metric_of("speedup"), _data.metric_of("psnr"))
    assert [p.number for p in line] == list(reversed(CACHE_FRONT))


def test_select_expression_for_picks_exactly_that_front_point(cache_study):
    study, trials, front = cache_study
    for trial in front:
        expr = _data.select_expression_for(trial, front, study.objectives)
        assert expr.startswith("fastest")
        assert rank_points(front, expr)[0].number == trial.number, expr
    assert (
        _data.select_expression_for(front[3], front, study.objectives) == "fastest where psnr>=31 and class_accuracy>=1"
    )
    dominated = next(t for t in trials if t.number == 2)
    assert _data.select_expression_for(dominated, front, study.objectives) == ""
    assert _data.default_select(study, front) == "fastest where psnr>=38.7"


def test_hypervolume_history_ends_at_the_runners_figure(cache_study):
    study, trials, front = cache_study
    history = _data.hypervolume_history(study, trials)
    assert [p.number for p in history] == sorted(n for n, *_ in CACHE_TRIALS)
    values = [p.hypervolume for p in history]
    assert values == sorted(values)
    assert values[-1] == pytest.approx(front_hypervolume(study.objectives, front))
    assert history[0].hypervolume == 0.0  # identity: speedup 1× is the reference point
    assert 0 < _data.handmade_hypervolume(study, trials) < values[-1]


def test_section_summaries_and_schedules(seeded_db):
    with Store(f"sqlite:///{seeded_db}") as store:
        joint = {t.number: _data.profile_of(t) for t in store.list_trials(JOINT_STUDY)}
    assert joint[4] is None  # a running trial before its decoding was stored
    assert _data.section_summaries(None) == ["no stored profile"]
    solver, sada, quant, policy = (joint[n] for n in range(4))
    assert _data.section_summaries(solver)[1] == "cache mask: 4 steps × 6 blocks × 2 components, 29 % reused"
    rows = _data.solver_rows(solver["solver"])
    assert [r["timestep"] for r in rows] == [999.0, 749.0, 499.0, 249.0] and rows[2]["prediction"] == "noise"
    phases = _data.sada_phases(sada["sparsity"], 50)
    assert phases[9:12] == ["computed", "momentum", "momentum"]
    assert phases[24:29] == ["computed", "lagrange", "lagrange", "lagrange", "computed"]
    assert phases[47:] == ["computed"] * 3
    assert _data.section_summaries(sada)[0] == "SADA: τ=0.0, steps 10–47, ≤4 skipped in a row"
    assert _data.section_summaries(quant)[0] == "quantization: W8A16 by default, 2 layers differ (simulated)"
    assert _data.quant_rows(quant["quantization"])[2] == {
        "layer": "transformer_blocks.0.ff",
        "weight_bits": 4,
        "activation_bits": 16,
    }
    assert _data.section_summaries(policy)[0] == "cache policy: fora (interval=3)"
    plain = {"context": {"num_inference_steps": 20}}
    assert _data.section_summaries(plain) == ["no acceleration: the plain pipeline at 20 steps"]


def test_enlarge_keeps_pixels_crisp():
    from PIL import Image

    small = png(200, size=16)
    big = Image.open(io.BytesIO(_data.enlarge(small, 96)))
    assert big.size == (96, 96) and big.getpixel((0, 0)) == Image.open(io.BytesIO(small)).getpixel((0, 0))
    large = png(10, size=128)
    assert _data.enlarge(large, 96) == large


def test_the_dashboard_package_imports_neither_streamlit_nor_the_store():
    code = (
        "import sys, difftune.dashboard as d; d.streamlit_command(); "
        "print(' '.join(m for m in ('streamlit', 'sqlalchemy', 'plotly') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
