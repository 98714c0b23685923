"""``difftune bench front`` and ``difftune bench store``: the search's own figures, measured in one run.

``front``: two studies on the embedded model against the 50-step reference, with fixed budgets —
``joint`` (solver schedules of 3–12 NFE with DC ratios and optional cache masks) and ``cache``
(masks at 50 steps, for the high-quality end). Their baselines (DPM-Solver++, UniPC, DDIM at every
NFE at their best spacing; FORA; FirstBlockCache) and the joint space's seeds are evaluated in the
same run. Points are split by their stored kind: **hand-made** = baselines and seeds (a person
designed both), **searched** = what the searcher proposed (and retries of it). Then the Pareto
fronts (speedup × PSNR) of the hand-made and of the searched points are **re-measured on held-out
samples** the search never saw, each point timed alternately with the reference (median ratio of
back-to-back runs), and the figures are taken from those re-measurements:

- hypervolume ratio: HV(searched front) ÷ HV(hand-made front) in speedup × PSNR, reference point
  (speedup 1×, PSNR 20 dB) — target ≥ 1.2;
- speedup ratio at PSNR ≥ 30 dB: fastest searched point ÷ fastest hand-made point — target ≥ 1.3;
- hand-made points dominated or matched: the share of the hand-made front for which a searched point
  is at least as fast (within 3 %) and at least as good (within 0.2 dB) — target 1.0. Points off
  their own front are dominated by it, hence by whatever dominates it.

One run is one sample of a noisy search: quote the seed and the budget with each figure.

``store``: a small real ``cache`` study with the same per-trial bookkeeping as ``difftune
calibrate`` (claims, ask/tell, the stored trial, the front and hypervolume for the progress bar);
the searcher's and the store's time per trial as a share of the evaluation time (target ≤ 2 %),
and a 100,000-trial front queried on SQLite (target ≤ 1 s).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from difftune.benchmarks import Figure, register_benchmark

__all__ = ["HV_REFERENCE_POINT", "MATCH_DB", "MATCH_SPEEDUP", "bench_front", "bench_store", "split_points"]

#: (speedup, PSNR dB): the hypervolume's reference point — no faster than the reference, 20 dB.
HV_REFERENCE_POINT = (1.0, 20.0)
#: A baseline point is "matched" by a tuned one within these tolerances (measurement noise).
MATCH_SPEEDUP = 0.97
MATCH_DB = 0.2
PSNR_FLOOR = 30.0


def _front_2d(points: Sequence[tuple[float, float]]) -> list[int]:
    from difftune.store import non_dominated

    if not points:
        return []
    mask = non_dominated([list(p) for p in points], ["maximize", "maximize"])
    return [i for i, keep in enumerate(mask) if keep]


def _hv(points: Sequence[tuple[float, float]]) -> float:
    from difftune.store import hypervolume

    if not points:
        return 0.0
    return hypervolume([list(p) for p in points], HV_REFERENCE_POINT, ["maximize", "maximize"])


def _fastest(points: Sequence[tuple[float, float]], floor: float = PSNR_FLOOR) -> float:
    fast = [s for s, q in points if q >= floor]
    return max(fast) if fast else math.nan


def _remeasure(pipe: Any, trials: Sequence[Any], *, samples: int, steps: int, repeats: int) -> list[dict[str, float]]:
    """Each trial's stored profile re-measured on held-out samples, timed alternately with the reference."""
    from difftune.evaluators import CalibrationSet, LatencyOptions, Reference, evaluate
    from difftune.profile import Profile, apply_profile

    held_out = list(CalibrationSet.for_pipeline(pipe, seeds=max(1, math.ceil(samples / 10)), split="held_out"))
    held_out = held_out[:samples]
    reference = Reference.from_pipeline(pipe, num_inference_steps=steps, batch_size=len(held_out))
    latency = LatencyOptions(warmup=1, repeats=repeats, statistic="paired")
    out = []
    for trial in trials:
        profile = Profile.from_dict(trial.config["profile"])
        handle = apply_profile(pipe, profile)
        try:
            measured = evaluate(
                pipe,
                held_out,
                reference,
                metrics=["speedup", "psnr", "class_accuracy", "nfe"],
                latency=latency,
                call_kwargs={"num_inference_steps": profile.context.num_inference_steps},
            )
        finally:
            handle.remove()
        out.append({k: float(v) for k, v in measured.items() if v is not None})
    return out


@register_benchmark("front")
def bench_front(
    budget: int = 200,
    samples: int = 20,
    steps: int = 50,
    repeats: int = 7,
    seed: int = 0,
    storage: str | None = None,
    searcher: str = "tpe",
    cache_budget: int = 30,
    progress: Any = None,
) -> list[Any]:
    """The tuned solver + cache front against the baselines, re-measured on held-out samples.

    Two studies in one database: ``joint`` (``budget`` trials: solver schedules of 3–12 NFE, DC
    ratios, optional cache masks) and ``cache`` (``cache_budget`` trials: masks at the reference's
    ``steps``, the high-quality end the joint space's ≤ 12 NFE cannot reach). Their baselines are
    the baseline set, their searched points the tuned set. See the module docstring.
    """
    import difftune
    from difftune.search.runner import run_study
    from difftune.store import TrialState, get_store

    with tempfile.TemporaryDirectory() as tmp:
        url = storage or f"sqlite:///{Path(tmp) / 'bench_front.db'}"
        pipe = difftune.load_pipeline("embedded")
        pipe.set_progress_bar_config(disable=True)
        started = time.perf_counter()
        complete = []
        for space, n, sampler in (("joint", budget, searcher), ("cache", cache_budget, "nsga2")):
            result = run_study(
                "embedded",
                space,
                budget=n,
                study=f"bench-front-{space}-{seed}",
                storage=url,
                searcher=sampler,
                seed=seed,
                num_inference_steps=steps,
                samples=samples,
                pipeline=pipe,
                progress=progress,
            )
            with get_store(url) as store:
                complete += store.list_trials(result.study.id, TrialState.COMPLETE)
        search_s = time.perf_counter() - started
    baselines, tuned = split_points(complete)

    def calib(t: Any) -> tuple[float, float]:
        v = t.values()
        return (v["speedup"], v["psnr"])

    base_front = [baselines[i] for i in _front_2d([calib(t) for t in baselines])]
    tuned_front = [tuned[i] for i in _front_2d([calib(t) for t in tuned])]
    started = time.perf_counter()
    base_m = _remeasure(pipe, base_front, samples=samples, steps=steps, repeats=repeats)
    tuned_m = _remeasure(pipe, tuned_front, samples=samples, steps=steps, repeats=repeats)
    remeasure_s = time.perf_counter() - started
    base_pts = [(m["speedup"], m["psnr"]) for m in base_m]
    tuned_pts = [(m["speedup"], m["psnr"]) for m in tuned_m]

    hv_base, hv_tuned = _hv(base_pts), _hv(tuned_pts)
    fast_base, fast_tuned = _fastest(base_pts), _fastest(tuned_pts)
    covered = [any(ts >= MATCH_SPEEDUP * bs and tq >= bq - MATCH_DB for ts, tq in tuned_pts) for bs, bq in base_pts]
    uncovered = [_name(t) for t, ok in zip(base_front, covered, strict=True) if not ok]
    min_accuracy = min((m.get("class_accuracy", math.nan) for m in tuned_m), default=math.nan)

    def describe(trials: Sequence[Any], measured: Sequence[dict[str, float]]) -> str:
        rows = sorted(zip(trials, measured, strict=True), key=lambda tm: -tm[1]["speedup"])
        return "; ".join(f"{_name(t)} {m['speedup']:.2f}x/{m['psnr']:.1f}dB/nfe {m['nfe']:g}" for t, m in rows)

    seeds = sum(t.kind == "seed" for t in baselines)
    context = (
        f"{len(complete)} complete trials of a joint and a cache study ({len(baselines) - seeds} baselines, "
        f"{seeds} seeds, {len(tuned)} searched) in "
        f"{search_s:.0f} s, fronts re-measured on "
        f"{samples} held-out samples in {remeasure_s:.0f} s"
    )
    return [
        Figure(
            "hypervolume ratio (searched ÷ hand-made = baselines + seeds; speedup × PSNR, ref 1×/20 dB)",
            hv_tuned / hv_base if hv_base > 0 else math.nan,
            ">= 1.2",
            f"HV {hv_tuned:.1f} vs {hv_base:.1f}; {context}",
        ),
        Figure(
            f"speedup ratio at PSNR >= {PSNR_FLOOR:g} dB (fastest searched ÷ fastest hand-made)",
            fast_tuned / fast_base if fast_base > 0 else math.nan,
            ">= 1.3",
            f"{fast_tuned:.2f}x vs {fast_base:.2f}x",
        ),
        Figure(
            "hand-made front points (baselines + seeds) dominated or matched by a searched point",
            sum(covered) / len(covered) if covered else math.nan,
            ">= 1.0",
            f"{sum(covered)}/{len(covered)}" + (f"; not covered: {', '.join(uncovered)}" if uncovered else ""),
        ),
        Figure(
            "lowest class accuracy on the searched front (held-out)",
            min_accuracy,
            "",
            f"searched front: {describe(tuned_front, tuned_m)}",
        ),
        Figure("hand-made front size", float(len(base_front)), "", f"hand-made front: {describe(base_front, base_m)}"),
    ]


def split_points(trials: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """``(hand-made, searched)``: baselines and seeds (a person designed both; the identity — the
    reference setting itself, speedup 1 — is the reference, not a method to beat), and what the
    searcher alone proposed (searched points and retries of them), by the trials' stored kind."""
    hand_made = [t for t in trials if t.kind in ("baseline", "seed") and (t.config or {}).get("baseline") != "identity"]
    return hand_made, [t for t in trials if t.kind in ("searched", "retry")]


def _name(trial: Any) -> str:
    config = trial.config or {}
    if trial.kind == "baseline":
        return str(config.get("baseline"))
    if trial.kind == "seed":
        return f"seed {config.get('seed')}"
    return f"trial {trial.number}"


@register_benchmark("store")
def bench_store(budget: int = 16, samples: int = 20, steps: int = 20, n: int = 100_000) -> list[Any]:
    """The searcher's and the store's share of a trial's time, and the 100,000-trial front query."""
    import difftune
    from difftune.search.runner import RunProgress, run_study
    from difftune.store._bench import bench_store_front

    events: list[RunProgress] = []
    with tempfile.TemporaryDirectory() as tmp:
        pipe = difftune.load_pipeline("embedded")
        pipe.set_progress_bar_config(disable=True)
        result = run_study(
            "embedded",
            "cache",
            budget=budget,
            study="bench-store",
            storage=f"sqlite:///{Path(tmp) / 'bench_store.db'}",
            num_inference_steps=steps,
            samples=samples,
            pipeline=pipe,
            progress=events.append,  # the progress bar's front and hypervolume are part of the cost
        )
        front = bench_store_front(n, directory=tmp)
    overhead, evaluation = result.timings["overhead_s"], result.timings["evaluation_s"]
    per_trial = 1000 * overhead / max(1, result.new_trials)
    return [
        Figure(
            "searcher + store time per trial ÷ evaluation time (%)",
            100 * overhead / evaluation,
            "<= 2",
            f"{per_trial:.0f} ms of bookkeeping vs {1000 * evaluation / max(1, result.new_trials):.0f} ms of "
            f"evaluation per trial ({result.new_trials} trials, cache space, {steps} steps, {samples} samples)",
        ),
        Figure(
            f"front query over {n:,} stored trials on SQLite (s)",
            front.front_s,
            "<= 1",
            f"front of {front.front_size} points; filling the study took {front.fill_s:.1f} s",
        ),
    ]
