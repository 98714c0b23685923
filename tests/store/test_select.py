"""The --select grammar: parsing, and choosing a point on small hand-computed fronts."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from difftune.errors import StoreError
from difftune.store import (
    Constraint,
    Goal,
    MetricRecord,
    Selection,
    TrialRecord,
    TrialState,
    parse_constraint,
    parse_select,
    select_point,
)

NOW = datetime(2025, 1, 1, tzinfo=UTC)


def record(number: int, **values: float) -> TrialRecord:
    metrics = tuple(
        MetricRecord.known(name, value) if name != "custom" else MetricRecord(name, value, "pts", "minimize")
        for name, value in values.items()
    )
    return TrialRecord(number + 100, 1, number, TrialState.COMPLETE, {}, None, None, NOW, NOW, None, None, metrics)


# A front of (speedup, psnr, peak_memory_mb): faster points have lower PSNR.
FRONT = [
    record(0, speedup=4.0, psnr=24.0, peak_memory_mb=900.0, latency_ms=250.0),
    record(1, speedup=3.0, psnr=29.0, peak_memory_mb=700.0, latency_ms=333.0),
    record(2, speedup=2.0, psnr=33.0, peak_memory_mb=1000.0, latency_ms=500.0),
    record(3, speedup=1.2, psnr=40.0, peak_memory_mb=800.0, latency_ms=833.0),
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("fastest", Selection(Goal("fastest"))),
        ("best psnr", Selection(Goal("best", "psnr"))),
        ("smallest", Selection(Goal("smallest"))),
        ("lowest lpips", Selection(Goal("lowest", "lpips", "minimize"))),
        ("highest ssim", Selection(Goal("highest", "ssim", "maximize"))),
        ("fastest where psnr>=30", Selection(Goal("fastest"), (Constraint("psnr", ">=", 30.0),))),
        ("  Fastest  WHERE psnr >= 30  ", Selection(Goal("fastest"), (Constraint("psnr", ">=", 30.0),))),
        (
            "best psnr where speedup>=2 and peak_memory_mb<1e3 AND lpips <= 0.1",
            Selection(
                Goal("best", "psnr"),
                (
                    Constraint("speedup", ">=", 2.0),
                    Constraint("peak_memory_mb", "<", 1000.0),
                    Constraint("lpips", "<=", 0.1),
                ),
            ),
        ),
        ("fastest where nfe=10", Selection(Goal("fastest"), (Constraint("nfe", "==", 10.0),))),
        ("fastest where psnr>-inf", Selection(Goal("fastest"), (Constraint("psnr", ">", float("-inf")),))),
    ],
)
def test_parse_select(text: str, expected: Selection) -> None:
    assert parse_select(text) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "no goal"),
        ("quickest", "unknown goal 'quickest'"),
        ("best", "'best' needs one metric name"),
        ("best psnr ssim", "'best' needs one metric name"),
        ("fastest psnr", "'fastest' takes no metric"),
        ("fastest where", "'where' needs at least one constraint"),
        ("fastest where psnr", "'psnr' is not a constraint like psnr>=30"),
        ("fastest where psnr>=thirty", "'psnr>=thirty' is not a constraint"),
        ("fastest where psnr>=30 or ssim>=0.9", "is not a constraint"),
    ],
)
def test_parse_errors_show_the_grammar(text: str, why: str) -> None:
    with pytest.raises(StoreError) as info:
        parse_select(text)
    message = str(info.value)
    assert why in message
    assert "e.g. 'fastest where psnr>=30'" in message


def test_str_round_trips() -> None:
    for text in ("fastest", "best psnr where speedup>=2", "lowest lpips where speedup>2.5 and nfe<=10"):
        assert str(parse_select(text)) == text
        assert parse_select(str(parse_select(text))) == parse_select(text)


def test_constraints() -> None:
    assert parse_constraint("psnr>=30").satisfied(30.0)
    assert not parse_constraint("psnr>30").satisfied(30.0)
    assert parse_constraint("psnr>30").violation(30.0) > 0
    assert parse_constraint("latency_ms<=100").violation(130.0) == 30.0
    assert parse_constraint("nfe==10").satisfied(10.0 + 1e-12)
    with pytest.raises(StoreError, match="write METRIC OP NUMBER"):
        parse_constraint("psnr => 30")


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("fastest", 0),
        ("fastest where psnr>=30", 2),
        ("fastest where psnr>=29", 1),
        ("fastest where psnr>29", 2),
        ("best psnr", 3),
        ("best psnr where speedup>=2", 2),
        ("highest psnr where speedup>=2 and peak_memory_mb<=800", 1),
        ("lowest psnr", 0),
        ("smallest", 1),
        ("smallest where psnr>=30", 3),
        ("lowest latency_ms where psnr>=33", 2),
    ],
)
def test_select_point_on_a_hand_computed_front(text: str, number: int) -> None:
    assert select_point(FRONT, text).number == number


def test_fastest_falls_back_to_latency() -> None:
    front = [record(0, latency_ms=300.0, psnr=25.0), record(1, latency_ms=200.0, psnr=22.0)]
    assert select_point(front, "fastest").number == 1
    assert select_point(front, "fastest where psnr>=24").number == 0


def test_smallest_is_the_served_weights_where_trials_measured_them() -> None:
    front = [
        record(0, weight_memory_mb=8.1, peak_memory_mb=100.0, psnr=100.0),
        record(1, weight_memory_mb=1.1, peak_memory_mb=120.0, psnr=22.0),
        record(2, weight_memory_mb=2.1, peak_memory_mb=90.0, psnr=45.0),
    ]
    assert select_point(front, "smallest").number == 1
    assert select_point(front, "smallest where psnr>=40").number == 2
    assert select_point([record(0, peak_memory_mb=5.0), record(1, peak_memory_mb=4.0)], "smallest").number == 1


def test_best_uses_the_stored_direction() -> None:
    front = [record(0, custom=5.0, psnr=20.0), record(1, custom=3.0, psnr=10.0)]  # custom is minimised
    assert select_point(front, "best custom").number == 1
    assert select_point(front, "highest custom").number == 0


def test_ties_go_to_the_lower_trial_number() -> None:
    front = [record(5, speedup=2.0, psnr=30.0), record(2, speedup=2.0, psnr=31.0)]
    assert select_point(front, "fastest").number == 2


def test_no_feasible_point_names_the_closest() -> None:
    # psnr spread 16 dB, speedup spread 2.8x: trial 3 misses speedup>=2 by 0.8/2.8 = 0.29 spreads,
    # trial 2 misses psnr>=36 by 3/16 = 0.19: trial 2 is closest.
    with pytest.raises(StoreError) as info:
        select_point(FRONT, "best psnr where psnr>=36 and speedup>=2")
    message = str(info.value)
    assert "no point satisfies psnr>=36 and speedup>=2" in message
    assert "the closest is trial 2 (psnr=33, speedup=2)" in message
    assert "misses psnr>=36 (off by 3)" in message
    assert "relax the constraint" in message


def test_unknown_metric_lists_the_known_ones() -> None:
    with pytest.raises(
        StoreError,
        match=r"unknown metric 'fid'.*known metrics of these trials: latency_ms, peak_memory_mb, psnr, speedup",
    ):
        select_point(FRONT, "best fid")
    with pytest.raises(StoreError, match="unknown metric 'psnrr'"):
        select_point(FRONT, "fastest where psnrr>=30")
    with pytest.raises(StoreError, match="unknown metric 'speedup'"):
        select_point([record(0, psnr=30.0)], "fastest")


def test_nothing_to_select_from() -> None:
    with pytest.raises(StoreError, match="no complete trials yet"):
        select_point([], "fastest")
