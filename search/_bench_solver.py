"""``difftune bench solver``: tuned solver schedules against diffusers' solvers, the searchers' costs, DC ratios.

On the embedded model, for each NFE in ``nfes`` (4, 5, 8):

- one ``solver`` study per searcher (``tpe``, ``evo``, ``s3``) at that NFE alone (``nfe_range=(n, n)``),
  with DPM-Solver-v3's prediction in the space (statistics from ``ems`` trajectories, 64; 0 leaves it out),
  on ``objectives`` PSNR and class accuracy (the guard): at one NFE the speed is fixed by the NFE, and a
  speed objective would only spread the search over timing noise,
  ``budget`` finished trials; fidelity against the plain pipeline at ``reference_steps`` (200, a
  near-exact ODE solution: the images are computed once and cached) while speed stays timed against
  the plain pipeline at ``study_steps`` (20). Each study evaluates the baselines first (DPM-Solver++(2M), UniPC, DDIM at
  their measured best spacing);
- **held-out MSE**: the best *searched* schedule of all studies (highest calibration PSNR; baselines
  excluded) and the two baselines are re-run on ``held_out`` samples with seeds the search never
  saw, against the plain pipeline at ``reference_steps`` (200, a near-exact ODE solution): tuned
  MSE ÷ DPM-Solver++'s (target ≤ 0.15, must ≤ 0.3)
  and ÷ UniPC's (target ≤ 0.2, must ≤ 0.35); the detail gives the tuned and baseline calibration
  class accuracy and sharpness;
- **continuous fit**: the ``refine_top`` (3) best searched schedules of distinct discrete structure (all
  searchers' studies; baselines and seeds excluded) get their timesteps, relaxation factors and DC ratios
  fitted by CMA-ES (:func:`difftune.search.polish.polish_schedule`, ``polish`` runs each, 300; 0 = off) on
  ``polish_samples`` calibration samples (40, a superset of the studies' 10, none held-out) against the
  same 200 steps, keeping the sharper baseline's calibration sharpness (``min_sharpness``); the one with
  the lowest calibration MSE among those that keep it is re-run on the held-out seeds, with its held-out
  class accuracy and sharpness beside the baselines';
- **evaluations to reach**: for each searcher, its searched full evaluations (after the baselines,
  which every study evaluates first) until one's calibration PSNR first reaches the level every
  searcher reached (the lowest of the three searched bests);
- **DC ratios**: UniPC as DC-Solver's reference runs it, held-out MSE with ratios fitted at that NFE
  (10 calibration samples) ÷ with ρ = 1, and with ratios CPR-predicted from fits at the *other*
  NFEs of {4, 5, 6, 8, 10} at guidance 1.5 and 3 ÷ with ρ = 1.

One run is one sample of three noisy searches: quote the seed and the budget with each figure.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from difftune.benchmarks import Figure, register_benchmark

__all__ = ["bench_solver"]

_CPR_NFES = (4, 5, 6, 8, 10)
_CPR_GUIDANCE = (1.5, 3.0)


def _images(pipe: Any, schedule: Any, samples: Sequence[Any], guidance: float | None = None) -> Any:
    from difftune.evaluators import batch_kwargs

    handle = schedule.apply(pipe)
    try:
        kwargs: dict[str, Any] = {"num_inference_steps": schedule.num_steps, "output_type": "pt"}
        if guidance is not None:
            kwargs["guidance_scale"] = guidance
        return pipe(**batch_kwargs(list(samples)), **kwargs).images
    finally:
        handle.remove()


def _mse(a: Any, b: Any) -> float:
    return float(((a - b) ** 2).mean())


def _best_searched(trials: Sequence[Any]) -> Any:
    searched = [t for t in trials if t.kind in ("searched", "retry") and t.values().get("psnr") is not None]
    return max(searched, key=lambda t: t.values()["psnr"], default=None)


def _reach(trials: Sequence[Any], level: float) -> int | None:
    """Searched full evaluations (in order) until one's PSNR first reaches ``level``; None if never."""
    searched = [t for t in trials if t.kind in ("searched", "retry") and t.values().get("psnr") is not None]
    for k, trial in enumerate(searched):
        if trial.values()["psnr"] >= level - 1e-9:
            return k + 1
    return None


@register_benchmark("solver")
def bench_solver(
    budget: int = 40,
    samples: int = 20,
    seed: int = 0,
    nfes: Sequence[int] = (4, 5, 8),
    searchers: Sequence[str] = ("tpe", "evo", "s3"),
    reference_steps: int = 200,
    study_steps: int = 20,
    held_out: int = 40,
    progress: Any = None,
    storage_dir: str | None = None,
    ems: int = 64,
    objectives: Sequence[str] = ("psnr", "class_accuracy"),
    polish: int = 300,
    polish_samples: int = 40,
    refine_top: int = 3,
) -> list[Figure]:
    """See the module docstring."""
    import difftune
    from difftune.accel.solver import SolverSchedule
    from difftune.evaluators import Sample
    from difftune.search.dc import fit_cpr, fit_dc_ratios, reference_schedule, with_ratios
    from difftune.search.runner import run_study
    from difftune.store import TrialState, get_store

    pipe = difftune.load_pipeline("embedded")
    pipe.set_progress_bar_config(disable=True)
    held = [Sample(i % 10, 900_000 + i) for i in range(held_out)]
    calibration = [Sample(i % 10, i) for i in range(10)]
    reference = _images_plain(pipe, held, reference_steps)
    figures: list[Figure] = []
    fits: dict[tuple[int, float], tuple[float, ...]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(storage_dir or tmp)
        for n in nfes:
            studies: dict[str, list[Any]] = {}
            seconds: dict[str, float] = {}
            for name in searchers:
                url = f"sqlite:///{root / f'bench_solver_{n}_{name}.db'}"
                started = time.perf_counter()
                run_study(
                    pipeline=pipe,
                    space="solver",
                    searcher=name,
                    budget=budget,
                    storage=url,
                    study=f"nfe{n}-{name}",
                    nfe_range=(n, n),
                    num_inference_steps=study_steps,
                    samples=samples,
                    seed=seed,
                    progress=progress,
                    memo=False,
                    ems=ems,
                    objectives=list(objectives),
                    reference_steps=reference_steps,
                )
                seconds[name] = time.perf_counter() - started
                with get_store(url) as store:
                    studies[name] = store.list_trials(f"nfe{n}-{name}", TrialState.COMPLETE)
            baselines = {str(t.config.get("baseline")): t for t in studies[searchers[0]] if t.kind == "baseline"}
            best = {name: _best_searched(trials) for name, trials in studies.items()}
            found = {k: v for k, v in best.items() if v is not None}
            if not found:
                continue
            winner_name, winner = max(found.items(), key=lambda kv: kv[1].values()["psnr"])
            tuned = SolverSchedule.from_dict(winner.config["profile"]["solver"])
            tuned_mse = _mse(_images(pipe, tuned, held), reference)
            polished = None
            if polish:
                guard_schedules = [
                    SolverSchedule.from_dict(base.config["profile"]["solver"])
                    for key, base in baselines.items()
                    if key in (f"dpmsolver++_nfe{n}", f"unipc_nfe{n}")
                ]
                polished, polish_note = _fit_knobs(
                    pipe,
                    studies,
                    refine_top,
                    polish,
                    polish_samples,
                    reference_steps,
                    seed,
                    calibration,
                    ems,
                    guard_schedules,
                )
                polished_images = _images(pipe, polished.schedule, held)
                polished_mse = _mse(polished_images, reference)
            for method, label, target, must in (
                ("dpmsolver++", "DPM-Solver++(2M)", "<= 0.15", 0.3),
                ("unipc", "UniPC", "<= 0.2", 0.35),
            ):
                base = baselines.get(f"{method}_nfe{n}")
                if base is None:
                    continue
                schedule = SolverSchedule.from_dict(base.config["profile"]["solver"])
                base_images = _images(pipe, schedule, held)
                base_mse = _mse(base_images, reference)
                tv, bv = winner.values(), base.values()
                accuracy = f"{tv.get('class_accuracy', math.nan):.2f} vs {bv.get('class_accuracy', math.nan):.2f}"
                sharpness = f"{tv.get('sharpness', math.nan):.3g} vs {bv.get('sharpness', math.nan):.3g}"
                figures.append(
                    Figure(
                        f"NFE {n}: tuned MSE ÷ {label}'s (held-out, vs {reference_steps}-step reference)",
                        tuned_mse / base_mse if base_mse > 0 else math.nan,
                        target,
                        f"must ≤ {must}; tuned {tuned_mse:.3g} (best searched of {', '.join(searchers)}: "
                        f"{winner_name}, trial {winner.number}) vs {base_mse:.3g} ({label} at its best spacing); "
                        f"calibration class accuracy {accuracy}, sharpness {sharpness}; "
                        f"{held_out} held-out samples; budget {budget} per searcher, seed {seed}",
                    )
                )
                if polished is not None:
                    figures.append(
                        Figure(
                            f"NFE {n}: tuned + fitted timesteps, relaxations and DC ratios, MSE ÷ {label}'s (held-out)",
                            polished_mse / base_mse if base_mse > 0 else math.nan,
                            target,
                            f"must ≤ {must}; {polish_note}; held-out {polished_mse:.3g} vs {base_mse:.3g}; held-out "
                            f"{_guards(polished_images, base_images, reference, held)}; timesteps "
                            f"{[round(t, 1) for t in polished.schedule.timesteps]}",
                        )
                    )
            level = min(t.values()["psnr"] for t in found.values())
            reach = {name: _reach(studies[name], level) for name in found}
            figures.append(
                Figure(
                    f"NFE {n}: searched evaluations to reach {level:.2f} dB (the lowest searcher best): "
                    + ", ".join(f"{k} {v}" for k, v in reach.items()),
                    float(reach.get("s3") or math.nan) / float(reach.get("tpe") or math.nan)
                    if "s3" in reach and "tpe" in reach
                    else math.nan,
                    "",
                    "value: s3's ÷ tpe's; best calibration PSNR "
                    + ", ".join(f"{k} {v.values()['psnr']:.2f} dB" for k, v in found.items())
                    + "; study time "
                    + ", ".join(f"{k} {seconds[k]:.0f} s" for k in seconds)
                    + f"; {len(baselines)} baselines first in each",
                )
            )
        # DC-Solver: fitted and CPR-predicted ratios against ρ = 1, on UniPC as the reference runs it.
        cache = root / "dc"
        for guidance in _CPR_GUIDANCE:
            for n in _CPR_NFES:
                fit = fit_dc_ratios(
                    pipe, reference_schedule(pipe.scheduler, n), calibration, guidance_scale=guidance, cache_dir=cache
                )
                fits[(n, guidance)] = fit.ratios
        dc_reference = _images(pipe, _ddim(reference_steps), held)
        for n in nfes:
            plain = reference_schedule(pipe.scheduler, n)
            plain_mse = _mse(_images(pipe, plain, held), dc_reference)
            fitted = (
                fits.get((n, 1.5))
                or fit_dc_ratios(pipe, plain, calibration, guidance_scale=1.5, cache_dir=cache).ratios
            )
            fitted_mse = _mse(_images(pipe, with_ratios(plain, fitted), held), dc_reference)
            nxt = fit_dc_ratios(pipe, plain, calibration, guidance_scale=1.5, cache_dir=cache, target="next")
            next_mse = _mse(_images(pipe, nxt.schedule, held), dc_reference)
            cpr = fit_cpr([(k, g, r) for (k, g), r in fits.items() if k != n])
            predicted = cpr.ratios(n, 1.5)
            cpr_mse = _mse(_images(pipe, with_ratios(plain, predicted), held), dc_reference)
            figures.append(
                Figure(
                    f"NFE {n}: DC ratios fitted here, held-out MSE ÷ ρ = 1",
                    fitted_mse / plain_mse,
                    "<= 1.0",
                    f"ratios {[round(r, 3) for r in fitted]}; UniPC ending at sigma_min, guidance 1.5, vs 200-step "
                    f"DDIM; {plain_mse:.3g} → {fitted_mse:.3g}; with target='next' (only the last step against "
                    f"the final latent) {next_mse / plain_mse:.3f}, ratios {[round(r, 3) for r in nxt.ratios]}",
                )
            )
            figures.append(
                Figure(
                    f"NFE {n}: DC ratios CPR-predicted (NFE {n} never fitted), held-out MSE ÷ ρ = 1",
                    cpr_mse / plain_mse,
                    "<= 1.0",
                    f"ratios {[round(r, 3) for r in predicted]} from {len(cpr.settings)} fits at NFE "
                    f"{sorted({k for k, _ in cpr.settings})} × guidance {list(_CPR_GUIDANCE)}; {cpr_mse:.3g}",
                )
            )
    return figures


def _guards(tuned: Any, base: Any, reference: Any, samples: Sequence[Any]) -> str:
    """Held-out class accuracy and sharpness (vs the reference images) of ``tuned`` beside ``base``."""
    import torch

    from difftune.evaluators.conditioning import ClassAccuracy
    from difftune.evaluators.sharpness import sharpness_per_image

    labels = torch.tensor([int(s.condition) for s in samples])

    def accuracy(images: Any) -> float:
        metric = ClassAccuracy()
        metric.update(images, labels)
        return float(metric.compute())

    def sharp(images: Any) -> float:
        return float(sharpness_per_image(images, reference).mean())

    return (
        f"class accuracy {accuracy(tuned):.3f} vs {accuracy(base):.3f}, sharpness {sharp(tuned):.3f} vs "
        f"{sharp(base):.3f} (tuned vs baseline)"
    )


def _structure(schedule: Any) -> tuple[Any, ...]:
    """A schedule's discrete decisions (what the continuous fit keeps)."""
    steps = tuple((s.order, s.prediction, s.corrector, s.corrector_kind, s.points) for s in schedule.steps)
    return (steps, schedule.analytic_first, schedule.final_sigma, schedule.first_x0 is not None)


def _fit_knobs(
    pipe: Any,
    studies: dict[str, list[Any]],
    top: int,
    evaluations: int,
    pool_size: int,
    reference_steps: int,
    seed: int,
    calibration: Sequence[Any],
    ems: int,
    guards: Sequence[Any] = (),
) -> tuple[Any, str]:
    """The continuous fit (:func:`~difftune.search.polish.polish_schedule`) of the ``top`` searched schedules of
    distinct discrete structure (by calibration PSNR, all searchers' studies together); the one with the lowest
    calibration MSE after its fit, and a note saying where it came from.

    With ``guards`` (the baselines' schedules) the fits keep the sharpest baseline's calibration sharpness
    (``min_sharpness``): the issue asks for no blurrier images than the baselines', and an MSE fit drifts
    towards the posterior mean."""
    from difftune.accel.solver import SolverSchedule
    from difftune.evaluators import Sample
    from difftune.search.ems import compute_ems, ems_samples
    from difftune.search.polish import polish_schedule

    searched = [
        (t.values()["psnr"], name, t)
        for name, trials in studies.items()
        for t in trials
        if t.kind in ("searched", "retry") and t.values().get("psnr") is not None
    ]
    searched.sort(key=lambda row: -row[0])
    chosen: list[tuple[str, Any, Any]] = []
    seen: set[tuple[Any, ...]] = set()
    for _, name, trial in searched:
        schedule = SolverSchedule.from_dict(trial.config["profile"]["solver"])
        if _structure(schedule) not in seen:
            seen.add(_structure(schedule))
            chosen.append((name, trial, schedule))
        if len(chosen) == top:
            break
    pool = [Sample(i % 10, i) for i in range(pool_size)]  # the studies' 10 and more, never held-out
    floor = None
    if guards:
        from difftune.evaluators.sharpness import sharpness_per_image

        target = _images_plain(pipe, pool, reference_steps)
        floor = max(float(sharpness_per_image(_images(pipe, g, pool), target).mean()) for g in guards)
    stats = None
    results = []
    for name, trial, schedule in chosen:
        if stats is None and any(s.prediction == "v3" for s in schedule.steps):
            stats = compute_ems(pipe, ems_samples(calibration, ems or 64))
        fit = polish_schedule(
            pipe,
            schedule,
            pool,
            reference_steps=reference_steps,
            evaluations=evaluations,
            seed=seed,
            ems=stats,
            min_sharpness=floor,
        )
        results.append((fit.final_mse, name, trial, fit))
    # the lowest calibration MSE among the fits that keep the guard (all of them when none does)
    keeps = [row for row in results if floor is None or row[3].sharpness >= floor] or results
    _, name, trial, best = min(keeps, key=lambda row: row[0])
    note = (
        f"CMA-ES ({evaluations} runs each, {pool_size} calibration samples vs {reference_steps} steps) on the "
        f"top {len(results)} searched schedules of distinct structure: calibration MSE "
        + ", ".join(f"{r[1]} trial {r[2].number} {r[3].initial_mse:.3g} → {r[3].final_mse:.3g}" for r in results)
        + f"; kept {name} trial {trial.number} ({best.seconds:.0f} s)"
        + (
            ""
            if floor is None
            else f"; sharpness guard {floor:.3f} (the sharper baseline's), kept {best.sharpness:.3f}"
        )
    )
    return best, note


def _images_plain(pipe: Any, samples: Sequence[Any], steps: int) -> Any:
    from difftune.evaluators import batch_kwargs

    return pipe(**batch_kwargs(list(samples)), num_inference_steps=steps, output_type="pt").images


def _ddim(steps: int) -> Any:
    from difftune.accel.solver import SolverSchedule, SolverStep
    from difftune.search.dc import _reference_grid

    grid = _reference_grid(999.0, steps)
    return SolverSchedule(tuple(float(t) for t in grid), tuple(SolverStep(order=1) for _ in grid), "sigma_min")
