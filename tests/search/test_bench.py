"""The figures of `difftune bench front` from hand-made fronts, and `run_benchmark`'s option filtering."""

from __future__ import annotations

import math

import pytest

from difftune.benchmarks import BENCHMARKS, run_benchmark
from difftune.errors import DifftuneError
from difftune.search._bench import HV_REFERENCE_POINT, _fastest, _front_2d, _hv


def test_front_2d_keeps_the_non_dominated_points():
    points = [(2.0, 30.0), (1.5, 35.0), (1.5, 29.0), (3.0, 25.0), (2.0, 28.0)]
    assert _front_2d(points) == [0, 1, 3]
    assert _front_2d([]) == []


def test_hypervolume_against_speedup_1_psnr_20_by_hand():
    assert HV_REFERENCE_POINT == (1.0, 20.0)
    # one point: a rectangle (2 - 1) x (30 - 20)
    assert _hv([(2.0, 30.0)]) == pytest.approx(10.0)
    # two points: union of (1..2 x 20..30) and (1..3 x 20..25) = 10 + 1 x 5
    assert _hv([(2.0, 30.0), (3.0, 25.0)]) == pytest.approx(15.0)
    # a point below the reference point adds nothing
    assert _hv([(2.0, 30.0), (0.5, 40.0), (5.0, 19.0)]) == pytest.approx(10.0)
    assert _hv([]) == 0.0


def test_fastest_point_above_the_psnr_floor():
    points = [(12.0, 29.9), (10.0, 30.5), (8.0, 33.0)]
    assert _fastest(points) == 10.0
    assert math.isnan(_fastest([(12.0, 29.0)]))


def test_run_benchmark_passes_only_the_options_a_benchmark_takes(monkeypatch):
    seen = {}

    def fake_store(budget: int = 16, samples: int = 20) -> list:
        seen.update(budget=budget, samples=samples)
        return []

    import difftune.search._bench  # noqa: F401  (registers front and store)

    assert "front" in BENCHMARKS and "store" in BENCHMARKS
    monkeypatch.setitem(BENCHMARKS, "store", fake_store)
    run_benchmark("store", budget=3, samples=None, batch=16, progress=print)
    assert seen == {"budget": 3, "samples": 20}  # None keeps the default, unknown options are dropped
    with pytest.raises(DifftuneError, match="unknown benchmark 'nope'"):
        run_benchmark("nope")


def test_seeds_count_among_the_hand_made_points_not_the_searched_ones():
    from types import SimpleNamespace

    from difftune.search._bench import split_points

    trials = [
        SimpleNamespace(number=0, kind="baseline", config={"baseline": "identity"}),
        SimpleNamespace(number=1, kind="baseline", config={"baseline": "unipc_nfe5"}),
        SimpleNamespace(number=2, kind="seed", config={"seed": "unipc4_reuse1"}),
        SimpleNamespace(number=3, kind="searched", config={"baseline": None}),
        SimpleNamespace(number=4, kind="retry", config={"baseline": None, "retry_of": 3}),
    ]
    hand_made, searched = split_points(trials)
    assert [t.number for t in hand_made] == [1, 2] and [t.number for t in searched] == [3, 4]


def test_hypervolume_curve_and_when_it_reaches_a_target():
    from types import SimpleNamespace

    from difftune.search._bench import evaluations_to_reach, hypervolume_curve
    from difftune.store import MetricSpec

    specs = (MetricSpec.parse("speedup"), MetricSpec.parse("psnr"))

    def trial(speedup: float, psnr: float) -> SimpleNamespace:
        return SimpleNamespace(values=lambda: {"speedup": speedup, "psnr": psnr})

    # HV against (1×, 20 dB): 10, then + 1 × 5 = 15, then a dominated point adds nothing, then 3 × 20 = 60.
    curve = hypervolume_curve(specs, [trial(2, 30), trial(3, 25), trial(1.5, 22), trial(4, 40)])
    assert curve == pytest.approx([10.0, 15.0, 15.0, 60.0])
    assert evaluations_to_reach(curve, 15.0) == 2
    assert evaluations_to_reach(curve, 16.0) == 4
    assert evaluations_to_reach(curve, 61.0) is None


@pytest.mark.usefixtures("one_thread")
def test_bench_search_runs_both_arms_in_stores_of_their_own(tmp_path):
    from difftune.search._bench import bench_search
    from difftune.store import TrialState, get_store

    figures = bench_search(
        budget=6, seeded_budget=16, screen=1, population=4, samples=2, steps=4, spaces=(), storage_dir=str(tmp_path)
    )
    by_name = {f.name.split(":")[0]: f for f in figures}
    reach = figures[0]
    assert reach.target == "<= 0.25" and "(a) random start" in reach.detail
    with get_store(f"sqlite:///{tmp_path / 'bench_search_random.db'}") as store:
        random_trials = store.list_trials("random")
        assert {t.kind for t in random_trials} == {"searched"}  # no hand-made generation 0
        assert len(random_trials) == 6
    with get_store(f"sqlite:///{tmp_path / 'bench_search_seeded.db'}") as store:
        seeded = store.list_trials("seeded")
        assert {"baseline", "seed"} <= {t.kind for t in seeded}
        # every candidate was screened, but for copies of a trial measured before (memoised: no evaluation)
        assert all(t.values(rung=-1) for t in seeded if not t.config.get("memo_of"))
        pruned = [t for t in seeded if t.state is TrialState.PRUNED]
    assert f"{len(pruned)} screened out on 1 samples" in figures[1].detail
    assert {"seeded ecad", "random-start ecad"} <= set(by_name)


def test_joint_hypervolume_by_hand():
    from types import SimpleNamespace

    from difftune.search._bench_joint import HV_REFERENCE, PSNR_CAP, joint_hypervolume

    def trial(**values):
        return SimpleNamespace(values=lambda: values)

    assert HV_REFERENCE == (0.5, 20.0, 0.5) and PSNR_CAP == 50.0
    plain = trial(speedup=2.5, psnr=30.0, weight_memory_mb=8.0)  # compression 1: (2.5-0.5)(30-20)(1-0.5)
    assert joint_hypervolume([plain], plain_mb=8.0) == pytest.approx(10.0)
    assert joint_hypervolume([plain], plain_mb=8.0, axes=2) == pytest.approx(20.0)
    # a quantized point that runs no faster: 4x smaller weights, (1-0.5)(40-20)(4-0.5) = 35; the union with
    # the first box is 10 + 35 - overlap (0.5 x 10 x 0.5 = 2.5)
    small = trial(speedup=1.0, psnr=40.0, weight_memory_mb=2.0)
    assert joint_hypervolume([plain, small], plain_mb=8.0) == pytest.approx(42.5)
    # the identity's PSNR is capped, and a point without a PSNR adds nothing
    identity = trial(speedup=1.0, psnr=100.0, weight_memory_mb=8.0)
    assert joint_hypervolume([identity, trial(speedup=3.0)], plain_mb=8.0) == pytest.approx(0.5 * 30 * 0.5)


def test_bench_joint_runs_every_study_and_reports_the_stacks(tmp_path):
    from difftune.search._bench_joint import bench_joint

    url = f"sqlite:///{tmp_path / 'bj.db'}"
    figures = bench_joint(budget=18, samples=2, steps=6, nfe=(5, 6), sada_budget=4, sada_steps=8, storage=url)
    names = [f.name for f in figures]
    assert names[0].startswith("hypervolume: joint front ÷ best single-space front") and figures[0].target == ">= 1.1"
    assert "budget 18 evaluations per study" in figures[0].detail
    assert all(s in figures[0].detail for s in ("solver", "cache", "sada", "quant"))
    assert any(n.startswith("SADA at 8 steps") for n in names)
    assert names[-1].startswith("quant front") and "baseline" in figures[-1].detail
    from difftune.store import get_store

    with get_store(url) as store:
        studies = {s.name for s in store.list_studies()}
        joint = store.list_trials("bj-joint")
    assert studies == {"bj-solver", "bj-cache", "bj-sada", "bj-quant", "bj-joint", "bj-sada50"}
    stacks = [t for t in joint if str((t.config or {}).get("baseline", "")).startswith("stack_")]
    assert stacks and len(joint) == 18 + 3
    assert sum(f.name.startswith("stack_psnr") for f in figures) == len({t.config["baseline"] for t in stacks})
