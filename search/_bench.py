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
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

from difftune.benchmarks import Figure, register_benchmark

__all__ = [
    "HV_REFERENCE_POINT",
    "MATCH_DB",
    "MATCH_SPEEDUP",
    "bench_front",
    "bench_search",
    "bench_store",
    "evaluations_to_reach",
    "hypervolume_curve",
    "split_points",
]

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
        from difftune.spaces import JointSpace

        # solver × cache: what this benchmark has always measured (sparsity and quantization: `bench joint`)
        solver_cache = JointSpace(parts=("solver", "cache"))
        for space, n, sampler in ((solver_cache, budget, searcher), ("cache", cache_budget, "nsga2")):
            result = run_study(
                "embedded",
                space,
                budget=n,
                study=f"bench-front-{getattr(space, 'name', space)}-{seed}",
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


# ---- bench search -------------------------------------------------------------------------------


def _full_evaluations(trials: Sequence[Any]) -> list[Any]:
    """The trials that cost a full evaluation, in the order they finished: complete, measured (not
    copied from a memoised trial), with full-fidelity figures."""
    measured = [t for t in trials if t.values() and not (t.config or {}).get("memo_of")]
    return sorted(measured, key=lambda t: (t.finished_at, t.number))


def hypervolume_curve(specs: Sequence[Any], trials: Sequence[Any]) -> list[float]:
    """The hypervolume of the first k full evaluations, for k = 1 … len(trials)."""
    from difftune.search.runner import front_hypervolume

    return [front_hypervolume(specs, trials[: k + 1]) for k in range(len(trials))]


def evaluations_to_reach(curve: Sequence[float], target: float) -> int | None:
    """The number of full evaluations after which ``curve`` first reaches ``target`` (None: never)."""
    for k, value in enumerate(curve):
        if value >= target * (1 - 1e-12):
            return k + 1
    return None


def _best_at_floor(trials: Sequence[Any], floor: float = PSNR_FLOOR) -> tuple[float, str]:
    fast = [(t.values()["speedup"], _name(t)) for t in trials if t.values().get("psnr", -math.inf) >= floor]
    return max(fast) if fast else (math.nan, "none")


def _random_start_ecad() -> Any:
    """ECAD's genome and operators with no hand-made generation 0: pymoo's random bit strings."""
    from difftune.spaces.ecad import EcadSpace

    class RandomStartEcad(EcadSpace):
        def baselines(self, context: Any) -> list[Any]:
            return []

        def seeds(self, context: Any) -> list[Any]:
            return []

    return RandomStartEcad()


@register_benchmark("search")
def bench_search(
    budget: int = 96,
    seeded_budget: int = 60,
    screen: int = 4,
    population: int = 24,
    samples: int = 20,
    steps: int = 20,
    seed: int = 0,
    space_budget: int = 8,
    spaces: Sequence[str] = ("bac", "harmonica"),
    progress: Any = None,
    storage_dir: str | None = None,
) -> list[Figure]:
    """Hypervolume against full evaluations: (a) random-initialised NSGA-II on ECAD's genome, (b) seeded
    NSGA-II with multi-fidelity screening and memoisation; and each space's best speedup at 30 dB."""
    import difftune
    from difftune.search.runner import front_hypervolume, run_study
    from difftune.store import get_store

    def study_trials(url: str, name: str) -> list[Any]:
        with get_store(url) as store:
            return store.list_trials(name)

    pipe = difftune.load_pipeline("embedded")
    pipe.set_progress_bar_config(disable=True)
    common = {"pipeline": pipe, "num_inference_steps": steps, "samples": samples, "seed": seed, "progress": progress}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(storage_dir or tmp)
        # (a) and (b) in stores of their own: neither may reuse the other's measurements.
        started = time.perf_counter()
        a_url = f"sqlite:///{root / 'bench_search_random.db'}"
        a = run_study(
            "embedded",
            _random_start_ecad(),
            budget=budget,
            study="random",
            storage=a_url,
            population=population,
            **common,
        )
        a_s = time.perf_counter() - started
        started = time.perf_counter()
        b_url = f"sqlite:///{root / 'bench_search_seeded.db'}"
        run_study(
            "embedded",
            "ecad",
            budget=seeded_budget,
            study="seeded",
            storage=b_url,
            population=population,
            screen=screen,
            **common,
        )
        b_s = time.perf_counter() - started
        a_trials, b_trials = study_trials(a_url, "random"), study_trials(b_url, "seeded")
        others: dict[str, tuple[list[Any], float]] = {}
        router_seconds: list[float] = []
        for name in spaces:
            started = time.perf_counter()
            url = f"sqlite:///{root / f'bench_search_{name}.db'}"
            # A cache of the run's own: HarmoniCa's routers are trained here, not loaded from an earlier run.
            with mock.patch.dict(os.environ, {"DIFFTUNE_CACHE": str(root / f"cache_{name}")}):
                run_study("embedded", name, budget=space_budget, study=name, storage=url, **common)
            others[name] = (study_trials(url, name), time.perf_counter() - started)
            router_seconds += _router_seconds(root / f"cache_{name}" / "harmonica")

    specs = a.objectives
    a_full, b_full = _full_evaluations(a_trials), _full_evaluations(b_trials)
    a_curve, b_curve = hypervolume_curve(specs, a_full), hypervolume_curve(specs, b_full)
    a_final = a_curve[-1] if a_curve else 0.0
    reached = evaluations_to_reach(b_curve, a_final)
    searched = split_points(b_full)[1]
    hv_hand = front_hypervolume(specs, [t for t in b_full if t.kind in ("baseline", "seed")])
    hv_searched = front_hypervolume(specs, searched)
    first_searched = next((k + 1 for k, t in enumerate(b_full) if t.kind in ("searched", "retry")), None)
    pruned = sum(t.state.value == "pruned" for t in b_trials)
    memoised = sum(bool((t.config or {}).get("memo_of")) for t in b_trials)
    figures = [
        Figure(
            "full evaluations for seeded + screened NSGA-II to reach random NSGA-II's final HV ÷ random's",
            (reached / len(a_full)) if reached and a_full else math.nan,
            "<= 0.25",
            f"(a) random start: HV {a_final:.3f} after {len(a_full)} evaluations ({a_s:.0f} s); (b) reached it at "
            f"evaluation {reached if reached else 'never'} of {len(b_full)} ({b_s:.0f} s; its first "
            f"{first_searched - 1 if first_searched else len(b_full)} evaluations are the hand-made baselines and "
            f"seeds, whose HV alone is {hv_hand:.3f}); seed {seed}, population {population}, {steps} steps, "
            f"{samples} samples",
        ),
        Figure(
            "(b) final HV ÷ (a) final HV",
            (b_curve[-1] / a_final) if b_curve and a_final > 0 else math.nan,
            "",
            f"(b) {seeded_budget} trials: {len(b_full)} full evaluations, {pruned} screened out on {screen} samples, "
            f"{memoised} memoised; HV {b_curve[-1] if b_curve else 0:.3f}",
        ),
        Figure(
            "(b) HV of the searched points alone ÷ HV of its hand-made points (baselines + seeds)",
            hv_searched / hv_hand if hv_hand > 0 else math.nan,
            "",
            f"{len(searched)} searched points measured in full: HV {hv_searched:.3f} vs {hv_hand:.3f}",
        ),
    ]
    # One yardstick for every space: the best of the hand-made schedules (FORA, Δ-DiT, T-GATE-like, evenly
    # spaced; the identity is the reference itself) that the seeded ecad study measured.
    best_made, made_name = _best_at_floor(split_points([t for t in b_full if t.kind == "baseline"])[0])
    for trials, label in (
        (b_full, "seeded ecad"),
        (a_full, "random-start ecad"),
        *((_full_evaluations(ts), n) for n, (ts, _) in others.items()),
    ):
        best_found, best_name = _best_at_floor(split_points(trials)[1])
        figures.append(
            Figure(
                f"{label}: best searched speedup at PSNR >= {PSNR_FLOOR:g} dB ÷ best hand-made baseline's",
                best_found / best_made if best_made > 0 else math.nan,
                "",
                f"{best_name} {best_found:.2f}x vs {made_name} {best_made:.2f}x (calibration figures)",
            )
        )
    if "harmonica" in others:
        trials, seconds = others["harmonica"]
        times = sorted(router_seconds)
        figures.append(
            Figure(
                "HarmoniCa router training time (s, median per router)",
                times[len(times) // 2] if times else math.nan,
                "",
                f"{len(times)} routers trained ({', '.join(f'{t:.0f}' for t in times)} s) in a "
                f"{len(trials)}-trial harmonica study of {seconds:.0f} s",
            )
        )
    return figures


def _router_seconds(folder: Path) -> list[float]:
    """The training time stored with each router HarmoniCa's space trained into ``folder``."""
    from safetensors.torch import safe_open

    out = []
    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.append(float((f.metadata() or {}).get("seconds", "nan")))
    return out
