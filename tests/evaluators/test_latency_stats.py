"""Latency statistics (median / min), speedup by either, and the reference's accumulated timings — on fake timers."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from difftune.errors import EvaluationError
from difftune.evaluators import (
    ABResult,
    CalibrationSet,
    Latency,
    LatencyOptions,
    Reference,
    ReferenceCache,
    Rung,
    evaluate,
)
from difftune.evaluators import latency as latency_module
from difftune.evaluators.latency import measure, measure_ab


class FakeTimer:
    """Stands in for ``_timer(device)``: each timing calls ``fn`` once and reports the next duration."""

    def __init__(self, durations: Iterable[float]) -> None:
        self.durations = iter(durations)
        self.timed: list[Callable[[], Any]] = []

    def __call__(self, device: Any) -> Callable[[Callable[[], Any]], float]:
        def time(fn: Callable[[], Any]) -> float:
            fn()
            self.timed.append(fn)
            return next(self.durations)

        return time


def _fake_timer(monkeypatch: pytest.MonkeyPatch, durations: Iterable[float]) -> FakeTimer:
    timer = FakeTimer(durations)
    monkeypatch.setattr(latency_module, "_timer", timer)
    return timer


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


# -- Latency and ABResult ------------------------------------------------------------------------


def test_from_samples_median_min_and_quantiles() -> None:
    lat = Latency.from_samples([30.0, 10.0, 50.0, 20.0, 40.0], "cpu")
    assert (lat.median_ms, lat.min_ms, lat.p10_ms, lat.p90_ms, lat.repeats) == (30.0, 10.0, 10.0, 50.0, 5)
    assert lat.statistic("median") == 30.0 and lat.statistic("min") == 10.0
    even = Latency.from_samples([4.0, 1.0, 3.0, 2.0], "cpu")
    assert even.statistic("median") == 2.5 and even.statistic("min") == 1.0
    with pytest.raises(ValueError, match="statistic must be 'median'"):
        lat.statistic("mean")
    # older records without a min
    assert math.isnan(Latency(1.0, 1.0, 1.0, 1, "cpu").statistic("min"))


def test_speedup_by_median_and_min_by_hand() -> None:
    ab = ABResult(Latency.from_samples([100.0, 80.0, 120.0], "cpu"), Latency.from_samples([50.0, 20.0, 60.0], "cpu"))
    assert ab.speedup_by("median") == ab.speedup == 100.0 / 50.0 == 2.0
    assert ab.speedup_by("min") == 80.0 / 20.0 == 4.0
    assert ab.ratio == 0.5
    with pytest.raises(ValueError, match="statistic"):
        ab.speedup_by("p90")


def test_measure_uses_the_timer_after_untimed_warmups(monkeypatch: pytest.MonkeyPatch) -> None:
    timer = _fake_timer(monkeypatch, [7.0, 3.0, 5.0, 9.0])
    fn = Counter()
    lat = measure(fn, warmup=2, repeats=4)
    assert fn.calls == 2 + 4 and len(timer.timed) == 4
    assert (lat.median_ms, lat.min_ms, lat.repeats, lat.device) == (6.0, 3.0, 4, "cpu")


def test_measure_ab_alternates_and_reports_both_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    # timing order: a, b, | b, a, | a, b, | b, a, | a, b
    durations = [10.0, 4.0, 5.0, 12.0, 9.0, 3.0, 6.0, 11.0, 14.0, 7.0]
    timer = _fake_timer(monkeypatch, durations)
    fn_a, fn_b = Counter(), Counter()
    ab = measure_ab(fn_a, fn_b, warmup=1, repeats=5)
    assert [("a" if f is fn_a else "b") for f in timer.timed] == list("abbaabbaab")
    assert fn_a.calls == fn_b.calls == 1 + 5
    # a: 10, 12, 9, 11, 14 — b: 4, 5, 3, 6, 7
    assert (ab.a.median_ms, ab.a.min_ms) == (11.0, 9.0)
    assert (ab.b.median_ms, ab.b.min_ms) == (5.0, 3.0)
    assert ab.speedup_by("median") == pytest.approx(11.0 / 5.0)
    assert ab.speedup_by("min") == pytest.approx(9.0 / 3.0)


def test_paired_speedup_is_the_median_ratio_of_back_to_back_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    # A load spike hits the 2nd pair only (both of its runs 3x slower): every back-to-back ratio is 2.
    # timing order: a, b, | b, a, | a, b
    durations = [10.0, 5.0, 15.0, 30.0, 12.0, 6.0]
    _fake_timer(monkeypatch, durations)
    ab = measure_ab(Counter(), Counter(), warmup=0, repeats=3)
    assert ab.a_ms == (10.0, 30.0, 12.0) and ab.b_ms == (5.0, 15.0, 6.0)
    assert ab.speedup_by("paired") == pytest.approx(2.0)
    # a spike on one side of a single pair moves the paired median less than it moves the medians
    durations = [10.0, 5.0, 5.0, 40.0, 10.0, 5.0, 5.0, 10.0, 10.0, 5.0]
    _fake_timer(monkeypatch, durations)
    ab = measure_ab(Counter(), Counter(), warmup=0, repeats=5)
    assert ab.speedup_by("paired") == pytest.approx(2.0)
    assert ab.speedup_by("median") == pytest.approx(2.0)
    assert ab.b.statistic("paired") == ab.b.min_ms == 5.0
    # without raw runs (a Latency pair built elsewhere) "paired" falls back to the ratio of minimums
    from difftune.evaluators.latency import ABResult

    assert ABResult(ab.a, ab.b).speedup_by("paired") == pytest.approx(ab.a.min_ms / ab.b.min_ms)


def test_paired_ratio_is_the_median_of_b_over_a_per_pair(monkeypatch: pytest.MonkeyPatch) -> None:
    # load rises through the run (a, b | b, a | …): every back-to-back ratio is 1.02
    durations = [100.0, 102.0, 153.0, 150.0, 200.0, 204.0, 255.0, 250.0, 300.0, 306.0]
    _fake_timer(monkeypatch, durations)
    ab = measure_ab(Counter(), Counter(), warmup=0, repeats=5)
    assert ab.ratio_by("paired") == pytest.approx(1.02)
    assert ab.ratio_by("median") == pytest.approx(204.0 / 200.0)
    assert ab.ratio_by("min") == pytest.approx(102.0 / 100.0)
    durations = [100.0, 150.0, 100.0, 100.0, 100.0, 100.0]  # a spike on b's side of the first pair
    _fake_timer(monkeypatch, durations)
    ab = measure_ab(Counter(), Counter(), warmup=0, repeats=3)
    assert ab.ratio_by("paired") == pytest.approx(1.0)


# -- LatencyOptions --------------------------------------------------------------------------------


def test_latency_options_check_the_statistic() -> None:
    assert LatencyOptions().statistic == "median" and LatencyOptions().reuse_reference is False
    assert LatencyOptions(statistic="min", reuse_reference=True).statistic == "min"
    for bad in ("mean", "MIN", ""):
        with pytest.raises(EvaluationError, match="statistic"):
            LatencyOptions(statistic=bad)


# -- Reference.latency -----------------------------------------------------------------------------


@pytest.fixture
def bare_reference(monkeypatch: pytest.MonkeyPatch) -> tuple[Reference, Counter]:
    """A Reference without a pipeline whose runner counts its runs."""
    ref = Reference.__new__(Reference)
    ref.pipeline_calls = 0
    ref._latency = {}
    runs = Counter()
    monkeypatch.setattr(Reference, "runner", lambda self, samples: runs)
    return ref, runs


def test_reference_latency_adds_one_run_per_call(monkeypatch: pytest.MonkeyPatch, bare_reference) -> None:
    ref, runs = bare_reference
    timer = _fake_timer(monkeypatch, [50.0, 40.0, 60.0, 30.0, 70.0, 45.0])
    samples = CalibrationSet(labels=range(4), seeds=1)[:2]

    first = ref.latency(samples, warmup=2, repeats=3)
    assert runs.calls == 2 + 3 and len(timer.timed) == 3
    assert (first.repeats, first.median_ms, first.min_ms) == (3, 50.0, 40.0)

    second = ref.latency(samples, warmup=2, repeats=3)
    assert runs.calls == 6 and len(timer.timed) == 4  # exactly one more run, no warm-up
    assert (second.repeats, second.median_ms, second.min_ms) == (4, 45.0, 30.0)  # 30, 40, 50, 60

    third = ref.latency(samples, warmup=2, repeats=3)
    assert runs.calls == 7
    assert (third.repeats, third.median_ms, third.min_ms, third.p90_ms) == (5, 50.0, 30.0, 70.0)

    # another batch is timed afresh: warm-up and repeats again
    other = ref.latency(samples[:1], warmup=1, repeats=1)
    assert runs.calls == 7 + 1 + 1 and (other.repeats, other.median_ms) == (1, 45.0)
    # earlier results are snapshots, not views of the growing list
    assert first.repeats == 3 and second.repeats == 4


def test_reference_latency_times_at_least_once(monkeypatch: pytest.MonkeyPatch, bare_reference) -> None:
    ref, runs = bare_reference
    _fake_timer(monkeypatch, [8.0, 6.0])
    samples = CalibrationSet(labels=range(2), seeds=1)[:1]
    assert ref.latency(samples, warmup=0, repeats=0).repeats == 1 and runs.calls == 1
    assert ref.latency(samples, warmup=0, repeats=0).min_ms == 6.0 and runs.calls == 2


# -- evaluate() with the options -------------------------------------------------------------------


def test_evaluate_reuses_the_reference_timings_and_reports_the_min(
    monkeypatch: pytest.MonkeyPatch, embedded_pipe, tmp_path
) -> None:
    reference = Reference.from_pipeline(
        embedded_pipe, cache=ReferenceCache(tmp_path), batch_size=2, num_inference_steps=4
    )
    samples = Rung(2).select(CalibrationSet(labels=range(10), seeds=1))
    ref_times = iter([100.0, 90.0, 80.0, 120.0])
    own_times = iter([40.0, 30.0, 45.0, 35.0])
    timed: list[str] = []

    def fake_timer(device: Any) -> Callable[[Callable[[], Any]], float]:
        def time(fn: Callable[[], Any]) -> float:
            before = reference.pipeline_calls
            fn()
            side = "ref" if reference.pipeline_calls > before else "own"
            timed.append(side)
            return next(ref_times if side == "ref" else own_times)

        return time

    monkeypatch.setattr(latency_module, "_timer", fake_timer)
    options = LatencyOptions(warmup=1, repeats=2, statistic="min", reuse_reference=True)
    first = evaluate(embedded_pipe, samples, reference, metrics=["latency_ms", "speedup"], latency=options)
    assert timed == ["ref", "ref", "own", "own"]
    assert first["latency_ms"] == 30.0 and first["speedup"] == pytest.approx(90.0 / 30.0)
    calls = reference.pipeline_calls
    second = evaluate(embedded_pipe, samples, reference, metrics=["latency_ms", "speedup"], latency=options)
    assert timed[4:] == ["ref", "own", "own"]  # one reference run, the trial's warm-up and repeats
    assert reference.pipeline_calls == calls + 1
    # reference runs so far: 100, 90, 80 → min 80; this trial: 45, 35 → min 35
    assert second["latency_ms"] == 35.0 and second["speedup"] == pytest.approx(80.0 / 35.0)


def test_evaluate_by_median_alternates_with_the_reference(
    monkeypatch: pytest.MonkeyPatch, embedded_pipe, tmp_path
) -> None:
    reference = Reference.from_pipeline(
        embedded_pipe, cache=ReferenceCache(tmp_path), batch_size=2, num_inference_steps=4
    )
    samples = Rung(2).select(CalibrationSet(labels=range(10), seeds=1))
    timer = _fake_timer(monkeypatch, [100.0, 50.0, 40.0, 60.0, 110.0, 30.0])  # a b b a a b
    options = LatencyOptions(warmup=0, repeats=3, statistic="median")
    calls = reference.pipeline_calls
    m = evaluate(embedded_pipe, samples, reference, metrics=["latency_ms", "speedup"], latency=options)
    assert len(timer.timed) == 6 and reference.pipeline_calls == calls + 3
    assert m["latency_ms"] == 40.0  # median of 50, 40, 30
    assert m["speedup"] == pytest.approx(100.0 / 40.0)  # median of 100, 60, 110 over 40


def test_speedup_spread_by_hand():
    from difftune.evaluators import ABResult, Latency

    a_ms, b_ms = (100.0, 110.0, 90.0), (50.0, 50.0, 50.0)  # paired ratios 2.0, 2.2, 1.8
    ab = ABResult(Latency.from_samples(list(a_ms), "cpu"), Latency.from_samples(list(b_ms), "cpu"), a_ms, b_ms)
    assert ab.speedup_by("paired") == pytest.approx(2.0)
    assert ab.speedup_spread("paired") == pytest.approx(0.2)  # half the range of 3 ratios
    a4, b4 = (100.0, 104.0, 108.0, 140.0), (50.0, 50.0, 50.0, 50.0)  # ratios 2.0, 2.08, 2.16, 2.8
    ab4 = ABResult(Latency.from_samples(list(a4), "cpu"), Latency.from_samples(list(b4), "cpu"), a4, b4)
    q1, _, q3 = statistics.quantiles([2.0, 2.08, 2.16, 2.8], n=4)
    assert ab4.speedup_spread("paired") == pytest.approx((q3 - q1) / 2)
    # ratio of medians: the two sides' relative half-spreads (p10–p90) in quadrature; b has none here
    rel_a = (ab.a.p90_ms - ab.a.p10_ms) / (2 * ab.a.median_ms)
    assert ab.speedup_spread("median") == pytest.approx(ab.speedup_by("median") * rel_a)
