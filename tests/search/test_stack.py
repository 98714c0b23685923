"""Naive stacks of single-space studies' best points (``--stack-from``) and the report beside the joint front."""

from __future__ import annotations

import math
from typing import Any

import pytest

import difftune
from difftune.errors import SpaceError
from difftune.search.stack import check_stack_sources, format_stack_report, stack_report, stacked_points
from difftune.spaces import CacheSpace, JointSpace, QuantSpace, SADASpace, SolverSpace, SpaceContext, to_profile
from difftune.store import Store

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

SPEED = (("speedup", "maximize"), ("psnr", "maximize"), ("class_accuracy", "maximize"))
MEMORY = (("weight_memory_mb", "minimize"), ("psnr", "maximize"), ("class_accuracy", "maximize"))


@pytest.fixture(scope="module")
def context(embedded_pipe) -> SpaceContext:
    return SpaceContext.from_pipeline(embedded_pipe, num_inference_steps=20, nfe_range=(4, 8), keep_pipeline=False)


@pytest.fixture(scope="module")
def fingerprint(embedded_pipe) -> str:
    return difftune.describe(embedded_pipe).fingerprint


def _study(store: Store, name: str, space: str, fingerprint: str, objectives=SPEED, model: str = "embedded") -> Any:
    record = store.create_model(model, "embedded", fingerprint)
    return store.create_study(
        name,
        model_id=record.id,
        space=space,
        searcher="tpe",
        objectives=objectives,
        reference={"model": "embedded", "num_inference_steps": 20, "samples": 8},
    )


def _trial(store: Store, study: Any, kind: str, name: str, params: dict, sections: dict, context, **values) -> Any:
    config: dict[str, Any] = {"profile": to_profile(sections, context, name=name or "p").to_dict()}
    if kind in ("baseline", "seed"):
        config[kind] = name or "hand-made"
    trial = store.add_trial(study.id, params, config=config, kind=kind)
    return store.set_trial_state(trial.id, "complete", metrics={"class_accuracy": 1.0, **values})


def _single_studies(store: Store, context: SpaceContext, fingerprint: str) -> dict[str, Any]:
    """solver, cache, sada and quant studies with figures like the embedded model's (20 steps)."""
    solver_points = {p.name: p for p in SolverSpace().baselines(context)}
    solver = _study(store, "e-solver", "solver", fingerprint)
    for name, speed, psnr in (("dpmsolver++_nfe4", 5.0, 26.0), ("unipc_nfe5", 4.1, 31.5), ("unipc_nfe8", 2.7, 37.2)):
        p = solver_points[name]
        _trial(store, solver, "baseline", name, dict(p.params), p.sections, context, speedup=speed, psnr=psnr)
    cache = _study(store, "e-cache", "cache", fingerprint)
    cache_points = {p.name: p for p in CacheSpace().baselines(context)}
    for name, speed, psnr in (("identity", 1.0, 100.0), ("fora_3", 2.1, 34.6), ("first_block_cache_0.1", 1.66, 37.5)):
        p = cache_points[name]  # sections-only baselines: FORA is a mask the space encodes, FBC a policy it cannot
        _trial(store, cache, "baseline", name, {}, p.sections, context, speedup=speed, psnr=psnr)
    searched = {**CacheSpace().default_params(context), "interval_0": 2, "interval_1": 2}
    _trial(
        store, cache, "searched", "", searched, CacheSpace().decode(searched, context), context, speedup=1.9, psnr=31
    )
    sada = _study(store, "e-sada", "sada", fingerprint)
    for speed, psnr, threshold in ((2.2, 26.5, 0.004), (1.39, 47.9, 0.0005)):
        params = {**SADASpace().default_params(context), "threshold": threshold}
        _trial(
            store, sada, "searched", "", params, SADASpace().decode(params, context), context, speedup=speed, psnr=psnr
        )
    quant = _study(store, "e-quant", "quant", fingerprint, objectives=MEMORY)
    quant_points = {p.name: p for p in QuantSpace().baselines(context)}
    for name, memory, psnr in (("w16a16", 8.1, 100.0), ("w8a16", 2.14, 48.0), ("w4a16", 1.14, 24.3)):
        p = quant_points[name]
        _trial(store, quant, "baseline", name, dict(p.params), p.sections, context, weight_memory_mb=memory, psnr=psnr)
    half = {**QuantSpace().default_params(context), **{f"w_{k}": 4 for k in range(3)}, "w_rest": 8}
    _trial(
        store, quant, "seed", "", half, QuantSpace().decode(half, context), context, weight_memory_mb=1.65, psnr=34.6
    )
    return {"solver": solver_points, "cache": cache_points, "half": half, "searched_cache": searched}


def _joint(solver_params: dict) -> dict:
    """A solver-space point as joint-space parameters (the joint space has no analytical first step)."""
    assert not solver_params.get("analytic_first")
    return {k: v for k, v in solver_params.items() if k != "analytic_first"}


def test_each_floor_stacks_every_studys_pick_at_that_floor(tmp_path, context, fingerprint):
    with Store(f"sqlite:///{tmp_path / 's.db'}") as store:
        made = _single_studies(store, context, fingerprint)
        names = ["e-solver", "e-cache", "e-sada", "e-quant"]
        points = stacked_points(store, JointSpace(), context, names, fingerprint=fingerprint, floors=(25, 35, 60))
    by_name = {p.name: p for p in points}
    assert list(by_name) == ["stack_psnr25", "stack_psnr35"]  # at 60 dB only the plain settings qualify
    low, high = by_name["stack_psnr25"], by_name["stack_psnr35"]
    # 25 dB: the fastest solver point (DPM-Solver++ at 4), FORA 3 (a mask encoded into the cache space's
    # knobs, faster than the searched mask), the faster SADA point, the smallest quantization (W4A16 misses)
    assert low.params["nfe"] == 4 and low.params["use_cache"] and low.params["use_quant"]
    assert (
        low.sections["solver"]
        == JointSpace().decode(_joint(made["solver"]["dpmsolver++_nfe4"].params), context)["solver"]
    )
    fora = CacheSpace().encode({"cache": made["cache"]["fora_3"].sections["cache"]}, context)
    at_4 = context.replace(num_inference_steps=4)
    assert low.sections["cache"] == CacheSpace().decode(fora, at_4)["cache"]
    assert low.sections["quantization"] == QuantSpace().decode(made["half"], context)["quantization"]
    # SADA's pick is repaired off at 4 evaluations, and the description says so
    assert not low.params["use_sada"] and "sparsity" not in low.sections
    assert "use_sada: SADA decides" in low.description and "e-sada #" in low.description
    assert low.description.startswith("each part ≥ 25 dB PSNR in its own study")
    # 35 dB: UniPC-8; no cache (FORA 3 misses, FirstBlockCache is a policy, the identity is no pick); W8A16
    assert high.params["nfe"] == 8 and not high.params["use_cache"] and high.params["use_sada"]
    assert (
        high.sections["sparsity"]
        == SADASpace().decode(
            {**SADASpace().default_params(context), "threshold": 0.0005}, context.replace(num_inference_steps=8)
        )["sparsity"]
    )
    w8 = high.sections["quantization"]
    assert (w8.default.weight_bits, w8.default.activation_bits) == (8, 16)
    assert (
        "cache e-cache" not in high.description and "left out: e-cache (no front point at ≥ 35 dB" in high.description
    )


def test_sources_are_checked_before_anything_runs(tmp_path, context, fingerprint):
    with Store(f"sqlite:///{tmp_path / 's.db'}") as store:
        _single_studies(store, context, fingerprint)
        _study(store, "e-ecad", "ecad", fingerprint)
        _study(store, "e-solver-2", "solver", fingerprint)
        _study(store, "other-solver", "solver", "sha256:other", model="other")
        with pytest.raises(SpaceError, match="no study 'nope'"):
            check_stack_sources(store, ["e-solver", "nope"], fingerprint)
        with pytest.raises(SpaceError, match="'ecad' space; only the points of solver, cache, sada, quant"):
            check_stack_sources(store, ["e-ecad"], fingerprint)
        with pytest.raises(SpaceError, match="'e-solver' and 'e-solver-2' both searched 'solver'"):
            check_stack_sources(store, ["e-solver", "e-solver-2"], fingerprint)
        with pytest.raises(SpaceError, match="tuned other weights"):
            check_stack_sources(store, ["other-solver"], fingerprint)
        assert [r.name for r in check_stack_sources(store, ["e-quant", "e-sada"], fingerprint)] == ["e-quant", "e-sada"]


def test_the_report_sets_each_stack_beside_the_best_searched_point_as_fast_and_as_small(tmp_path, context, fingerprint):
    objectives = (*SPEED[:2], ("weight_memory_mb", "minimize"), SPEED[2])
    solver = SolverSpace().baselines(context)[0]
    with Store(f"sqlite:///{tmp_path / 's.db'}") as store:
        joint = _study(store, "e-joint", "joint", fingerprint, objectives=objectives)
        for name, kind, speed, memory, psnr in (
            ("stack_psnr30", "baseline", 3.4, 2.14, 30.6),
            ("stack_psnr25", "baseline", 7.2, 1.15, 17.9),
            ("unipc_nfe5", "baseline", 4.1, 8.1, 31.5),  # not a stack: not reported, not compared
            ("", "searched", 3.85, 1.99, 30.9),  # as fast and smaller: the comparable point
            ("", "searched", 3.9, 8.1, 35.0),  # faster, better, but larger: not comparable
            ("", "searched", 3.0, 1.5, 40.0),  # slower
            ("", "seed", 3.9, 1.9, 45.0),  # hand-made: not the search's
            ("", "searched", 2.0, 1.0, 20.0),  # slower, smaller, as good as stack_psnr25
        ):
            _trial(
                store, joint, kind, name, {}, {"solver": solver.sections["solver"]}, context,
                speedup=speed, weight_memory_mb=memory, psnr=psnr,
            )  # fmt: skip
        rows = stack_report(store, "e-joint")
    assert [r.name for r in rows] == ["stack_psnr25", "stack_psnr30"]
    none, found = rows
    assert none.joint is None and math.isnan(none.psnr_gain)
    assert none.same_quality == 7 and none.speedup_ratio == pytest.approx(2.0 / 7.2)
    assert found.joint == 3 and found.psnr_gain == pytest.approx(0.3)
    assert found.same_quality == 3  # the fastest at ≥ 30.6 dB and ≤ 2.14 MB is the same point
    text = format_stack_report(rows)
    assert "stack_psnr30: 3.40×, 2.14 MB, 30.6 dB — joint #3: 3.85×, 1.99 MB, 30.9 dB (+0.3 dB)" in text
    assert (
        "stack_psnr25: 7.20×, 1.15 MB, 17.9 dB — no searched joint point is as fast (and as small); at its PSNR: "
        "joint #7 2.00×, 1.00 MB, 20.0 dB (0.28× its speed)"
    ) in text


def test_run_study_evaluates_the_stacks_as_baselines_of_the_joint_study(tmp_path, embedded_pipe, context, fingerprint):
    from difftune.search.runner import run_study

    url = f"sqlite:///{tmp_path / 's.db'}"
    with Store(url) as store:
        _single_studies(store, context, fingerprint)
    common = {"storage": url, "pipeline": embedded_pipe, "num_inference_steps": 8, "samples": 2}
    with pytest.raises(SpaceError, match="only the joint space stacks"):
        run_study("embedded", "solver", budget=1, stack_from=["e-solver"], **common)
    with pytest.raises(SpaceError, match="no study 'nope'"):
        run_study("embedded", "joint", budget=1, stack_from=["nope"], **common)
    with Store(url) as store:
        assert "embedded-joint" not in [s.name for s in store.list_studies()]  # refused before any write
    small = JointSpace(parts=("solver", "sparsity", "quantization"))  # no cache baselines: fewer trials
    context_8 = context.replace(num_inference_steps=8, nfe_range=(4, 6))
    budget = len(small.baselines(context_8)) + 3
    result = run_study(
        "embedded", small, budget=budget, nfe_range=(4, 6), stack_from=["e-solver", "e-sada", "e-quant"], **common
    )
    with Store(url) as store:
        trials = store.list_trials(result.study.id, "complete")
        stacks = [t for t in trials if str((t.config or {}).get("baseline", "")).startswith("stack_")]
        rows = stack_report(store, result.study.id)
    # 25 dB: DPM-Solver++ 4 (SADA repaired off), 30 dB: UniPC 5, 35 dB: UniPC 8 clamped to the range's 6 with SADA
    assert [t.config["baseline"] for t in stacks] == ["stack_psnr25", "stack_psnr30", "stack_psnr35"]
    assert all(t.kind == "baseline" and "naive stack" in t.config["description"] for t in stacks)
    profile = stacks[0].config["profile"]
    assert profile["solver"] is not None and profile["quantization"] is not None
    assert stacks[0].values()["weight_memory_mb"] < 8  # quantized weights, measured as served
    assert [r.name for r in rows] == ["stack_psnr25", "stack_psnr30", "stack_psnr35"]
    assert stacks[2].config["profile"]["sparsity"] is not None and "nfe: 8" in stacks[2].config["description"]
