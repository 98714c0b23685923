"""Export a study's chosen Pareto point as a deployable profile, re-measured on held-out samples.

A search can overfit its calibration samples: the point it picks is the best on the noise it was
tuned on. :func:`export_point` therefore re-measures the chosen point on *held-out* samples — the
same conditions with seeds from the disjoint held-out range, which no trial of the search ever saw —
stores those figures in the store under the ``held_out`` split, and writes them as the profile's
metrics, with the calibration figures beside them::

    from difftune.search.export import export_point

    result = export_point("sqlite:///difftune.db", "embedded-cache", "fastest where psnr>=30", "profile.json")
    print(result.metrics["psnr"])   # {"value": <held-out>, "unit": "dB", ..., "split": "held_out", "calibration": ...}

``format="diffusers"`` writes a directory instead: ``profile.json`` plus, where a profile section has
an exact diffusers equivalent, the native diffusers pieces (:func:`diffusers_pieces`).
``format="cache-dit"`` / ``"sglang"`` / ``"vllm-omni"`` write such a directory with the serving stack's
own config files (:func:`difftune.search.serving_formats.serving_pieces`).

Every input (the ``select`` expression, the output path) is checked before anything is measured or
written; when no point satisfies ``select`` nothing is written at all.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from difftune.errors import DifftuneError, StoreError

__all__ = [
    "FORMATS",
    "WORSE_BY",
    "DiffusersExport",
    "ExportResult",
    "diffusers_pieces",
    "export_point",
    "held_out_samples",
]

FORMATS = ("difftune", "diffusers", "cache-dit", "sglang", "vllm-omni", "ecad")
#: How much worse a quality figure may be on held-out samples than on calibration samples before
#: :func:`export_point` warns that the point may have overfit its calibration samples (absolute for
#: bounded figures, relative for FID).
WORSE_BY: dict[str, float] = {"psnr": 3.0, "ssim": 0.05, "class_accuracy": 0.1, "clip_score": 2.0, "lpips": 0.05}
#: FID may grow by this factor before a warning (it is noisy on few samples).
FID_RATIO = 1.5
#: Figures whose held-out values are compared with the calibration ones (timing is noise, not overfitting).
QUALITY_METRICS = ("psnr", "ssim", "mse", "lpips", "clip_score", "fid", "class_accuracy")
#: Files of a diffusers-format export.
PROFILE_FILE = "profile.json"
SCHEDULER_DIR = "scheduler"
CALL_KWARGS_FILE = "call_kwargs.json"
CACHE_FILE = "cache_config.json"
USAGE_FILE = "diffusers_usage.json"


@dataclass(frozen=True)
class DiffusersExport:
    """What a diffusers-format export holds: files written (relative to the directory) and sections without an
    exact diffusers equivalent (section → reason)."""

    files: dict[str, Any] = field(default_factory=dict)  # relative path -> JSON content
    expressible: dict[str, str] = field(default_factory=dict)  # section -> what represents it
    not_expressible: dict[str, str] = field(default_factory=dict)  # section -> why not

    def note(self) -> str | None:
        """One line for the user when some section has no diffusers equivalent."""
        if not self.not_expressible:
            return None
        parts = "; ".join(f"{k}: {v}" for k, v in self.not_expressible.items())
        return (
            f"no diffusers equivalent for {', '.join(self.not_expressible)} ({parts}); "
            f"apply {PROFILE_FILE} with difftune.apply_profile(pipe, difftune.load_profile(...)) instead"
        )


@dataclass(frozen=True)
class ExportResult:
    """The outcome of :func:`export_point`."""

    path: Path  # the profile file (difftune, ecad) or the directory (diffusers, cache-dit, sglang, vllm-omni)
    profile: Any  # the written difftune.Profile
    study: Any  # StudyRecord
    trial: Any  # TrialRecord as exported (held-out metrics included when validated)
    validated: bool
    calibration: dict[str, float]  # the stored calibration figures
    held_out: dict[str, float]  # the held-out figures (empty without validation)
    held_out_seeds: tuple[int, ...] = ()
    warnings: tuple[str, ...] = ()
    diffusers: DiffusersExport | None = None  # a directory format's pieces (a ServingExport for a serving stack)
    #: points re-measured before this one whose held-out figures missed the selection (TrialRecords)
    rejected: tuple[Any, ...] = ()

    @property
    def metrics(self) -> Mapping[str, Mapping[str, Any]]:
        return self.profile.metrics

    @property
    def notes(self) -> tuple[str, ...]:
        note = self.diffusers.note() if self.diffusers is not None else None
        return (note,) if note else ()


# --------------------------------------------------------------------------------------------
# Held-out samples
# --------------------------------------------------------------------------------------------


def held_out_samples(pipe: Any, n: int, settings: Any = None) -> list[Any]:
    """The first ``n`` held-out samples for ``pipe``: the study's calibration conditions (its prompts, or the
    family's built-in set), seeds from the held-out range, seed-major like the study's calibration samples
    (so they cover the conditions evenly)."""
    from difftune.search.settings import StudySettings

    return (settings or StudySettings()).samples_for(pipe, n, split="held_out")


def _overfit_warnings(calibration: Mapping[str, float], held_out: Mapping[str, float]) -> list[str]:
    from difftune.store import metric_spec

    out = []
    for name in QUALITY_METRICS:
        if name not in calibration or name not in held_out:
            continue
        cal, held = calibration[name], held_out[name]
        direction = metric_spec(name).direction
        if name == "fid":
            worse = held > FID_RATIO * cal and held - cal > 1.0
        elif name == "mse":
            worse = held > 2.0 * cal and held - cal > 1e-4
        else:
            limit = WORSE_BY.get(name, 0.0)
            worse = (cal - held > limit) if direction == "maximize" else (held - cal > limit)
        if worse:
            out.append(
                f"{name} is much worse on held-out samples ({held:.4g}) than on calibration samples ({cal:.4g}): "
                "the point may have overfit its calibration samples; consider more --samples in calibrate"
            )
    return out


# --------------------------------------------------------------------------------------------
# Diffusers pieces
# --------------------------------------------------------------------------------------------


def _synthetic_model(x: Any, t: Any) -> Any:
    """A smooth, nonlinear stand-in for a denoiser: enough curvature that solvers of different orders differ."""
    import torch

    s = float(t) / 1000.0
    return torch.tanh(x * (0.5 + s)) * 0.8 + 0.2 * torch.sin(3.0 * x + s)


def _run_scheduler(scheduler: Any, x: Any, *, timesteps: Sequence[int] | None, steps: int) -> Any:
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=list(timesteps))
    else:
        scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(_synthetic_model(x, t), t, x).prev_sample
    return x


def _dpm_solver_equivalent(solver: Any, base: Any) -> tuple[dict[str, Any] | None, str]:
    """A ``DPMSolverMultistepScheduler`` config sampling exactly like ``solver`` on its timesteps, or why none does.

    The structural conditions are checked first (data prediction, no corrector, no DC compensation,
    integer timesteps, a VP noise schedule whose sigmas follow its timesteps); then each candidate
    config (solver order, diffusers' final-step order lowering) is run next to difftune's
    ``USFScheduler`` on a synthetic model output and kept only if the trajectories agree to 1e-5.
    """
    import torch
    from diffusers import DPMSolverMultistepScheduler

    from difftune.accel.solver import _SIGMA_FIRST_OPTIONS, USFScheduler

    steps = solver.steps
    if getattr(solver, "analytic_first", False):
        return None, (
            "the analytical first step (no model call at the first timestep): diffusers' schedulers call the model at "
            "every timestep"
        )
    if any(s.prediction == "v3" for s in steps):
        return None, "DPM-Solver-v3 steps (the model's empirical statistics): no diffusers scheduler runs them"
    if any(s.prediction != "data" for s in steps):
        return None, "noise-prediction steps (DPM-Solver) mixed into the schedule"
    if any(s.corrector for s in steps):
        return None, (
            "UniC corrector steps: diffusers' UniPCMultistepScheduler.set_timesteps takes no explicit timesteps"
        )
    if any(s.dc_ratio != 1.0 for s in steps):
        return None, "DC-Solver compensation ratios have no diffusers equivalent"
    if any(t != round(t) for t in solver.timesteps):
        return None, "fractional timesteps (diffusers' DPMSolverMultistepScheduler rounds custom timesteps to integers)"
    config = dict(base.config)
    if str(config.get("_class_name", type(base).__name__)).startswith("FlowMatch") or config.get("use_flow_sigmas"):
        return None, "flow-matching schedule (DPMSolverMultistepScheduler takes no custom timesteps for it)"
    if any(config.get(k) for k in _SIGMA_FIRST_OPTIONS):
        return None, "the pipeline scheduler's sigmas do not follow its timesteps (Karras / exponential / beta sigmas)"
    timesteps = [round(t) for t in solver.timesteps]
    torch_state = torch.random.get_rng_state()
    try:
        x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    finally:
        torch.random.set_rng_state(torch_state)
    ours = _run_scheduler(USFScheduler.from_schedule(solver, base), x0.clone(), timesteps=None, steps=len(timesteps))
    max_order = max(s.order for s in steps)
    for order in sorted({max_order, min(max_order + 1, 3), 2}):
        for lower_order_final in (True, False):
            for euler_at_final in (False, True):
                candidate = DPMSolverMultistepScheduler.from_config(
                    config,
                    solver_order=order,
                    algorithm_type="dpmsolver++",
                    solver_type="midpoint",
                    lower_order_final=lower_order_final,
                    euler_at_final=euler_at_final,
                    thresholding=False,
                    variance_type=None,
                )
                try:
                    theirs = _run_scheduler(candidate, x0.clone(), timesteps=timesteps, steps=len(timesteps))
                except (ValueError, IndexError, RuntimeError):
                    continue
                scale = max(1.0, float(ours.abs().max()))
                if torch.isfinite(theirs).all() and float((theirs - ours).abs().max()) <= 1e-5 * scale:
                    return dict(candidate.config), ""
    return None, "the per-step orders differ from every DPMSolverMultistepScheduler configuration"


def _component_patterns(pipe: Any) -> list[str]:
    from difftune.models import describe

    info = describe(pipe)
    return [re.escape(p) for block in info.block_info for paths in block.components for p in paths]


def diffusers_pieces(profile: Any, pipe: Any) -> DiffusersExport:
    """The native diffusers pieces that reproduce ``profile`` on ``pipe`` where a section has an exact equivalent.

    - ``solver``: a schedule diffusers' ``DPMSolverMultistepScheduler`` runs on its timesteps (every
      step data prediction, no corrector, DC ratio 1, the per-step orders diffusers would use) →
      ``scheduler/scheduler_config.json`` and ``call_kwargs.json`` ``{"timesteps": [...]}``.
    - ``cache``: FirstBlockCache → ``cache_config.json`` ``{"class": "FirstBlockCacheConfig", ...}``;
      TaylorSeer with interval 2 (where diffusers' schedule agrees) → ``TaylorSeerCacheConfig``.
    - everything else (cache masks, FORA, DeepCache, Δ-DiT, SADA, quantization, UniPC-like or
      DC-Solver schedules) is listed in ``not_expressible`` with the reason.
    """
    files: dict[str, Any] = {}
    expressible: dict[str, str] = {}
    missing: dict[str, str] = {}
    call_kwargs: dict[str, Any] = {"num_inference_steps": profile.context.num_inference_steps}

    if profile.solver is None:
        expressible["solver"] = "none: the pipeline's own scheduler"
    else:
        config, why = _dpm_solver_equivalent(profile.solver, pipe.scheduler)
        if config is None:
            missing["solver"] = why
        else:
            files[f"{SCHEDULER_DIR}/scheduler_config.json"] = {
                **{k: v for k, v in config.items() if not str(k).startswith("_")},
                "_class_name": "DPMSolverMultistepScheduler",
            }
            call_kwargs = {"timesteps": [round(t) for t in profile.solver.timesteps]}
            expressible["solver"] = (
                f"DPMSolverMultistepScheduler (dpmsolver++, solver_order={config['solver_order']}) "
                "on explicit timesteps"
            )

    cache = profile.cache
    policy = getattr(cache, "policy", None) if cache is not None else None
    if cache is None:
        pass
    elif policy == "first_block_cache":
        files[CACHE_FILE] = {"class": "FirstBlockCacheConfig", "threshold": float(cache.threshold)}
        expressible["cache"] = "diffusers.hooks.FirstBlockCacheConfig"
    elif policy == "taylorseer" and cache.interval == 2:
        files[CACHE_FILE] = {
            "class": "TaylorSeerCacheConfig",
            "cache_interval": 2,
            "disable_cache_before_step": int(cache.warmup),
            "max_order": int(cache.order),
            "taylor_factors_dtype": "float32",
            "cache_identifiers": _component_patterns(pipe),
        }
        expressible["cache"] = "diffusers.hooks.TaylorSeerCacheConfig"
    elif policy == "taylorseer":
        missing["cache"] = (
            f"TaylorSeer with interval {cache.interval}: diffusers' TaylorSeerCacheConfig counts full steps from "
            "another step and agrees only at interval 2"
        )
    elif policy is not None:
        missing["cache"] = f"the {policy} cache policy"
    else:
        missing["cache"] = "a per-step, per-block cache mask"
    if profile.sparsity is not None:
        missing["sparsity"] = "SADA step skipping and token pruning"
    if profile.quantization is not None:
        missing["quantization"] = "per-layer bit-widths (simulated / torchao)"

    if f"{SCHEDULER_DIR}/scheduler_config.json" in files or "timesteps" in call_kwargs:
        files[CALL_KWARGS_FILE] = call_kwargs
    usage = [
        "pipe = DiffusionPipeline.from_pretrained(<the model this profile was tuned on>)",
    ]
    if f"{SCHEDULER_DIR}/scheduler_config.json" in files:
        usage.append(
            f"pipe.scheduler = DPMSolverMultistepScheduler.from_pretrained(<this dir>, subfolder='{SCHEDULER_DIR}')"
        )
    if CACHE_FILE in files:
        usage.append(
            f"pipe.transformer.enable_cache(diffusers.hooks.<class>(**{CACHE_FILE} without 'class'))"
            + (
                " with taylor_factors_dtype=torch.float32"
                if files[CACHE_FILE]["class"] == "TaylorSeerCacheConfig"
                else ""
            )
        )
    usage.append(
        f"pipe(..., **{CALL_KWARGS_FILE})"
        if CALL_KWARGS_FILE in files
        else f"pipe(..., num_inference_steps={profile.context.num_inference_steps})"
    )
    if missing:
        usage = [
            f"difftune.apply_profile(pipe, difftune.load_profile('{PROFILE_FILE}')): sections {sorted(missing)} need it"
        ]
    files[USAGE_FILE] = {
        "profile": PROFILE_FILE,
        "expressible": expressible,
        "not_expressible": missing,
        "usage": usage,
    }
    return DiffusersExport(files=files, expressible=expressible, not_expressible=missing)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _check_out(out: Path, fmt: str) -> None:
    """Refuse an output path that cannot be written, before anything is measured."""
    if fmt == "difftune":
        if out.is_dir():
            raise DifftuneError(f"--out {out} is a directory; give a file path (or use --format diffusers)")
    elif fmt == "ecad":
        if out.is_dir():
            raise DifftuneError(f"--out {out} is a directory; give the path of the ECAD schedule file (.json)")
    else:
        if out.exists() and not out.is_dir():
            raise DifftuneError(f"--out {out} is a file; --format {fmt} writes a directory")
        if out.is_dir() and any(out.iterdir()) and not (out / PROFILE_FILE).exists():
            raise DifftuneError(f"--out {out} is a non-empty directory that is not a difftune export; choose another")


def _write_directory(out: Path, profile: Any, pieces: DiffusersExport) -> Path:
    """Write the export directory atomically: built next to ``out``, then renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    old: Path | None = None
    try:
        profile.save(tmp / PROFILE_FILE)
        for rel, content in pieces.files.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            text = content if isinstance(content, str) else json.dumps(content, indent=2, sort_keys=True) + "\n"
            target.write_text(text)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / "previous")
        os.replace(tmp, out)
    except BaseException:
        if old is not None and (old / "previous").exists() and not out.exists():
            os.replace(old / "previous", out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


def _metric_entry(name: str, value: float, split: str, calibration: float | None) -> dict[str, Any]:
    from difftune.store import metric_spec

    spec = metric_spec(name)
    entry: dict[str, Any] = {"value": value, "unit": spec.unit, "direction": spec.direction, "split": split}
    if calibration is not None:
        entry["calibration"] = calibration
    return entry


# --------------------------------------------------------------------------------------------
# The export
# --------------------------------------------------------------------------------------------


def export_point(
    storage_or_store: Any,
    study: str,
    select: str,
    out: str | os.PathLike[str],
    *,
    format: str = "difftune",
    validate: bool = True,
    samples: int | None = None,
    latency_repeats: int = 3,
    pipeline: Any = None,
    progress: Callable[[str], None] | None = None,
    max_candidates: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    fit: int = 0,
    fit_samples: int = 40,
) -> ExportResult:
    """Write the profile of the Pareto point ``select`` picks from ``study``, re-measured on held-out samples.

    Args:
        storage_or_store: a :class:`difftune.store.Store` or a database URL (``None``: the default).
            A store passed in is left open.
        study: the study's name.
        select: e.g. ``"fastest where psnr>=30"`` (:func:`difftune.store.parse_select`).
        out: the profile file (``format="difftune"`` / ``"ecad"``) or directory (the other formats).
        format: ``"difftune"`` (one JSON profile), ``"diffusers"`` (a directory: ``profile.json``
            and the native diffusers configs where the setting is expressible there), ``"cache-dit"``,
            ``"sglang"`` or ``"vllm-omni"`` (such a directory with that serving stack's config files,
            :mod:`difftune.search.serving_formats`) or ``"ecad"`` (ECAD's schedule JSON).
        validate: re-measure the point on held-out samples (default). ``False`` keeps the stored
            calibration figures, marked ``"split": "calibration"``.
        samples: held-out samples (default: as many as the study's calibration samples).
        latency_repeats: timed calls per side for ``latency_ms`` / ``speedup``.
        pipeline: the study model's pipeline, already loaded (default: ``load_pipeline`` of the
            study's model); it is left as found.
        progress: called with a short status text at each stage.
        max_candidates: re-measure at most this many points (default: every point meeting the selection
            on calibration samples, in the order of its goal, until one meets it on held-out samples).
        steps: export for another ``num_inference_steps`` than the study's: each candidate's cache mask is
            resampled (:meth:`~difftune.accel.cache.CacheMaskConfig.resample`; step-count-free policies
            such as FORA stay as they are) and re-measured at ``steps`` against the plain pipeline at
            ``steps``, and the first that keeps ``select`` there is written — else nothing is, exit 2 with
            the closest point. Needs ``validate``. These measurements are not stored (the study's
            held-out figures are at its own step count).
        guidance_scale, height, width: export for another guidance or image size than the study's, the
            same way: the candidates are re-measured in that call (against the plain pipeline in it)
            and the profile's context says it; the provenance's ``transferred`` lists every change as
            ``[study's, new]``.
        fit: before a candidate with a solver schedule is re-measured, fit its timesteps, relaxation factors and
            DC ratios by CMA-ES with this many pipeline runs (:func:`difftune.search.polish.polish_schedule`;
            0 = off) on ``fit_samples`` calibration-split samples against the images the study's figures are
            measured against (the plain pipeline at its ``reference_steps``, else at its steps; a study run
            with ``--reference-steps 200`` fits towards the ODE's solution). The held-out figures are then the fitted
            schedule's, the profile carries no calibration figures (the study measured the unfitted one) and
            its provenance's ``fitted`` says what was fitted; the study's stored figures are left as they are.
            Needs ``validate``.
        fit_samples: calibration samples of the fit (40: with a study's 10 the fit follows their noise).

    Raises:
        StoreError: unknown study; no point satisfies ``select`` on calibration samples, or none of the
            candidates keeps it on held-out samples (naming the closest held-out point); a trial without
            a stored profile. Nothing is written.
        DifftuneError: malformed ``select`` (before the database is opened), a bad ``out``, a
            pipeline whose weights differ from the study's model, a failed held-out evaluation.
    """
    from difftune.store import HELD_OUT, MetricRecord, get_store, meets, no_point_error, parse_select, rank_points

    parse_select(select)  # a malformed expression fails before the database is opened
    if format not in FORMATS:
        raise DifftuneError(f"format {format!r}: expected one of {', '.join(FORMATS)}")
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 2):
        raise DifftuneError(f"samples: expected an integer >= 2, got {samples!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 2):
        raise DifftuneError(f"--steps: expected an integer >= 2, got {steps!r}")
    for option, size in (("--height", height), ("--width", width)):
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 8):
            raise DifftuneError(f"{option}: expected an integer >= 8, got {size!r}")
    if guidance_scale is not None and (
        isinstance(guidance_scale, bool)
        or not isinstance(guidance_scale, (int, float))
        or not math.isfinite(guidance_scale)
    ):
        raise DifftuneError(f"--guidance-scale: expected a finite number, got {guidance_scale!r}")
    for option, count, least in (("--fit", fit, 0), ("--fit-samples", fit_samples, 1)):
        if isinstance(count, bool) or not isinstance(count, int) or count < least:
            raise DifftuneError(f"{option}: expected an integer >= {least}, got {count!r}")
    if fit and not validate:
        raise DifftuneError("--fit: a fitted schedule must be re-measured on held-out samples; drop --no-validate")
    asked = {"num_inference_steps": steps, "guidance_scale": guidance_scale, "height": height, "width": width}
    if not validate and any(v is not None for v in asked.values()):
        raise DifftuneError(
            "--steps / --guidance-scale / --height / --width: a point moved to another call must be re-measured "
            "there; drop --no-validate"
        )
    out_path = Path(out)
    _check_out(out_path, format)

    def say(text: str) -> None:
        if progress is not None:
            progress(text)

    store = get_store(storage_or_store)
    owned = store is not storage_or_store
    try:
        record = store.get_study(study)
        settings = _settings_of(record)
        ranked = rank_points(store.pareto_front(record.id, constraints=settings.constraints), select)
        moved = {
            name: [getattr(settings, name), new]
            for name, new in asked.items()
            if new is not None and new != getattr(settings, name)
        }
        transfer = bool(moved)
        if transfer:
            settings = dataclasses.replace(settings, **{name: new for name, (_, new) in moved.items()})

        def profile_of(trial: Any) -> Any:
            profile = _stored_profile(trial, study)
            if "num_inference_steps" in moved:
                profile = transfer_profile(profile, moved["num_inference_steps"][1])
            call = {name: new for name, (_, new) in moved.items() if name != "num_inference_steps"}
            if call:
                profile = dataclasses.replace(profile, context=dataclasses.replace(profile.context, **call))
            return profile

        point = ranked[0]
        reference_info = dict(record.reference or {})

        pipe = None
        if validate or format not in ("difftune", "ecad"):
            pipe = _study_pipeline(store, record, settings, pipeline, say)

        held: dict[str, float] = {}
        seeds: tuple[int, ...] = ()
        chosen: list[Any] = []
        tried: list[Any] = []
        fits: dict[int, tuple[Any, dict[str, Any]]] = {}  # trial id → (fitted profile, provenance entry)
        if validate:
            assert pipe is not None
            n = samples or int(reference_info.get("samples") or 0) or 20
            chosen = held_out_samples(pipe, n, settings)
            seeds = tuple(sorted({s.seed for s in chosen}))
            # Candidates in the order of the goal: the first whose held-out figures keep every constraint
            # is written, so a profile never promises what it does not hold on unseen samples.
            for index, candidate in enumerate(ranked[: max_candidates or len(ranked)]):
                say(
                    f"re-measuring trial {candidate.number} (candidate {index + 1} of {len(ranked)}) on "
                    f"{len(chosen)} held-out samples …"
                )
                profile = profile_of(candidate)
                if fit and profile.solver is not None:
                    say(f"fitting trial {candidate.number}'s timesteps, relaxations and DC ratios ({fit} runs) …")
                    fits[candidate.id] = _fit_solver(pipe, profile, settings, fit, fit_samples)
                    profile = fits[candidate.id][0]
                measured = _measure(pipe, profile, chosen, settings, candidate.values(), latency_repeats)
                # figures in another call, or of the fitted schedule: not the study's held-out figures of this trial
                if transfer or candidate.id in fits:
                    candidate = dataclasses.replace(candidate, metrics=tuple(MetricRecord.collect(measured, HELD_OUT)))
                else:
                    candidate = store.record_metrics(candidate.id, measured, split=HELD_OUT, replace=True)
                tried.append(candidate)
                if meets(select, measured):
                    point, held = candidate, measured
                    break
            else:
                metric = _goal_metric(select, tried)
                names = ", ".join(f"trial {t.number}" for t in tried)
                raise no_point_error(
                    tried,
                    parse_select(select),
                    metric,
                    HELD_OUT,
                    what=f" on held-out samples (tried {names}; nothing written)",
                )
        profile = fits[point.id][0] if point.id in fits else profile_of(point)
        calibration = store.get_trial(point.id).values() if transfer or point.id in fits else point.values()
        if point.id in fits:  # the study's calibration figures are the unfitted schedule's
            calibration = {}

        metrics: dict[str, dict[str, Any]] = {}
        if validate:
            for name, value in held.items():
                metrics[name] = _metric_entry(name, value, "held_out", calibration.get(name))
        else:
            for name, value in calibration.items():
                metrics[name] = _metric_entry(name, value, "calibration", None)
        provenance = {
            **dict(profile.provenance),
            "study": record.name,
            "trial": point.number,
            "select": select,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "validated": validate,
        }
        if validate:
            provenance["held_out_samples"] = len(chosen)
            provenance["held_out_seeds"] = [seeds[0], seeds[-1]] if seeds else []
        if transfer:
            # the held-out figures are in the new call, the calibration ones in the study's: [study's, new]
            provenance["transferred"] = moved
        if point.id in fits:
            provenance["fitted"] = fits[point.id][1]
        name = profile.name or f"trial {point.number}"
        profile = dataclasses.replace(profile, name=f"{record.name}: {name}", metrics=metrics, provenance=provenance)

        pieces = None
        if format == "diffusers":
            assert pipe is not None
            say("writing the diffusers configs …")
            pieces = diffusers_pieces(profile, pipe)
            written = _write_directory(out_path, profile, pieces)
            profile_path = written / PROFILE_FILE
        elif format in ("cache-dit", "sglang", "vllm-omni"):
            from difftune.search.serving_formats import serving_pieces

            assert pipe is not None
            say(f"writing the {format} configs …")
            pieces = serving_pieces(profile, pipe, format)
            written = _write_directory(out_path, profile, pieces)
            profile_path = written / PROFILE_FILE
        elif format == "ecad":
            written = _write_ecad(out_path, profile)
            profile_path = written
        else:
            written = profile.save(out_path)
            profile_path = written
        store.save_profile(record.id, profile, trial_id=point.id, path=str(profile_path.resolve()))
    finally:
        if owned:
            store.close()
    warnings = tuple(_overfit_warnings(calibration, held)) if validate else ()
    return ExportResult(
        path=written,
        profile=profile,
        study=record,
        trial=point,
        validated=validate,
        calibration=calibration,
        held_out=held,
        held_out_seeds=seeds,
        warnings=warnings,
        diffusers=pieces,
        rejected=tuple(t for t in tried if t.id != point.id),
    )


def transfer_profile(profile: Any, steps: int) -> Any:
    """``profile`` moved to ``steps`` inference steps: its cache mask resampled, its context updated.

    Raises:
        DifftuneError: a section tied to its step count that cannot be moved (a solver schedule is a
            set of NFE-specific timesteps; SADA's ranges are in steps).
    """
    from difftune.accel.cache import CacheMaskConfig

    if steps == profile.context.num_inference_steps:
        return profile
    tied = [name for name in ("solver", "sparsity") if getattr(profile, name, None) is not None]
    if tied:
        raise DifftuneError(
            f"cannot move profile {profile.name!r} from {profile.context.num_inference_steps} to {steps} steps: its "
            f"{' and '.join(tied)} section is tied to its step count; calibrate a study at --steps {steps} instead"
        )
    cache = profile.cache
    if isinstance(cache, CacheMaskConfig):
        cache = cache.resample(steps)
    context = dataclasses.replace(profile.context, num_inference_steps=steps)
    return dataclasses.replace(profile, cache=cache, context=context)


def _write_ecad(out: Path, profile: Any) -> Path:
    """ECAD's schedule JSON of a cache-mask profile (:func:`difftune.spaces.ecad.to_ecad_json`), atomically."""
    from difftune._atomic import atomic_write
    from difftune.accel.cache import CacheMaskConfig
    from difftune.spaces.ecad import to_ecad_json

    cache = profile.cache
    if not isinstance(cache, CacheMaskConfig) or profile.solver is not None:
        what = "a solver schedule" if profile.solver is not None else f"a {type(cache).__name__}"
        raise DifftuneError(
            f"--format ecad writes cache masks only; this point is {what}: choose a point of a cache or ecad "
            "study, or --format difftune"
        )
    data = to_ecad_json(cache, profile.name, {k: v.get("value") for k, v in profile.metrics.items()})
    data["difftune_profile"] = profile.to_dict()
    text = json.dumps(data, indent=2) + "\n"
    return atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _stored_profile(point: Any, study: str) -> Any:
    from difftune.profile import Profile

    stored = (point.config or {}).get("profile")
    if not isinstance(stored, dict):
        raise StoreError(f"trial {point.number} of study {study!r} has no stored profile; it cannot be exported")
    return Profile.from_dict(stored)


def _goal_metric(select: str, records: Sequence[Any]) -> str:
    from difftune.store import HELD_OUT, parse_select

    goal = parse_select(select).goal
    if goal.metric is not None:
        return goal.metric
    return "speedup" if any("speedup" in r.values(HELD_OUT) for r in records) else "latency_ms"


def _fit_solver(pipe: Any, profile: Any, settings: Any, evaluations: int, samples: int) -> tuple[Any, dict[str, Any]]:
    """``profile`` with its solver schedule's continuous knobs fitted, and what the provenance says of the fit."""
    from difftune.search.polish import polish_schedule

    schedule = profile.solver
    # the images the study's figures are measured against: its reference_steps, else its served steps
    steps = int(settings.reference_steps or settings.num_inference_steps or profile.context.num_inference_steps)
    pool = settings.samples_for(pipe, samples)  # calibration split: never the held-out seeds
    call = settings.call_kwargs(pipe)
    stats = None
    if any(step.prediction == "v3" for step in schedule.steps):
        from difftune.search.ems import compute_ems, ems_samples

        # the study's statistics (cached on disk per model and call), as run_study computes them
        stats = compute_ems(
            pipe,
            ems_samples(pool, int(settings.ems or 64)),
            guidance_scale=settings.guidance_scale,
            call_kwargs={k: v for k, v in call.items() if k != "guidance_scale"},
            batch_size=settings.images_per_call(),
        )
    result = polish_schedule(
        pipe, schedule, pool, reference_steps=steps, evaluations=evaluations, ems=stats, call_kwargs=call
    )
    entry = {
        "knobs": list(result.knobs),
        "evaluations": result.evaluations,
        "samples": len(pool),
        "reference_steps": steps,
        "calibration_mse": [result.initial_mse, result.final_mse],
    }
    return dataclasses.replace(profile, solver=result.schedule), entry


def _settings_of(record: Any) -> Any:
    """The study's settings; a study without them (made outside ``calibrate``) gets the defaults."""
    from difftune.search.settings import StudySettings

    stored = dict(record.reference or {})
    return StudySettings.from_dict(stored) if "model" in stored else StudySettings()


def _study_pipeline(store: Any, record: Any, settings: Any, pipeline: Any, say: Callable[[str], None]) -> Any:
    """The pipeline of the study's model on the study's device and dtype, checked to hold the weights the
    study was run on."""
    import dataclasses as _dc

    from difftune.models import describe
    from difftune.search.settings import resolve_device

    model = store.get_model(record.model_id)
    name = settings.model or model.name
    try:
        device = resolve_device(settings.device) if settings.device else None
    except DifftuneError as exc:
        raise DifftuneError(
            f"study {record.name!r} was measured on {settings.device}, which this machine lacks ({exc}); export it "
            "on such a machine, or with --no-validate to keep the calibration figures"
        ) from None
    if pipeline is None:
        say(f"loading {name} …")
    pipeline = _dc.replace(settings, model=name, device=device).load_pipeline(pipeline)
    fingerprint = describe(pipeline).fingerprint
    if fingerprint != model.fingerprint:
        raise DifftuneError(
            f"the weights of {model.name!r} changed since study {record.name!r} was run (fingerprint "
            f"{fingerprint[:12]}… now, {model.fingerprint[:12]}… in the study); re-run the study on these weights, "
            "or export with the weights it was run on"
        )
    return pipeline


def _measure(
    pipe: Any,
    profile: Any,
    chosen: Sequence[Any],
    settings: Any,
    calibration: Mapping[str, float],
    latency_repeats: int,
) -> dict[str, float]:
    """The runner's evaluation of one trial (same reference call, metrics and timing), on ``chosen`` samples."""
    from difftune.evaluators import LatencyOptions, Reference, evaluate
    from difftune.profile import apply_profile
    from difftune.search.settings import device_type

    steps = int(settings.num_inference_steps or profile.context.num_inference_steps)
    names = list(settings.metrics or calibration)
    call = settings.call_kwargs(pipe)
    per_call = min(settings.batch_size or len(chosen), len(chosen))
    # the study's reference: images at its reference_steps (when set), timing against the served steps
    reference = Reference.from_pipeline(
        pipe, num_inference_steps=steps, batch_size=per_call, image_steps=settings.reference_steps, **call
    )
    statistic = "median" if device_type(str(getattr(pipe, "device", "cpu"))) == "cuda" else "paired"
    handle = apply_profile(pipe, profile)
    try:
        measured = evaluate(
            pipe,
            chosen,
            reference,
            metrics=names,
            latency=LatencyOptions(warmup=1, repeats=latency_repeats, statistic=statistic),
            call_kwargs={"num_inference_steps": profile.context.num_inference_steps},
        )
    finally:
        handle.remove()
    return {k: float(v) for k, v in measured.items() if v is not None}


def export_tiers(
    storage_or_store: Any,
    study: str,
    tiers: Mapping[str, str],
    out: str | os.PathLike[str],
    *,
    samples: int | None = None,
    latency_repeats: int = 3,
    pipeline: Any = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Any, dict[str, ExportResult]]:
    """Export one held-out-validated profile per tier (name → ``--select`` expression) into one bundle.

    Each tier is :func:`export_point` of its selection (the profile named after the tier); the bundle
    (:class:`difftune.tiers.TierBundle`) is written only when every tier kept its selection on
    held-out samples — otherwise the :class:`StoreError` of the tier that did not is raised and nothing
    is written. Returns the bundle and each tier's export result.
    """
    from difftune.store import get_store, parse_select
    from difftune.tiers import TierBundle

    if not tiers:
        raise DifftuneError("--tier: give at least one, e.g. --tier fast='fastest where psnr>=28'")
    for name, select in tiers.items():
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise DifftuneError(f"--tier {name!r}: a tier name is letters, digits, '-' and '_'")
        parse_select(select)  # every expression is checked before anything runs
    store = storage_or_store if hasattr(storage_or_store, "list_trials") else get_store(storage_or_store)
    results: dict[str, ExportResult] = {}
    try:
        if pipeline is None:  # one pipeline for every tier
            record = store.get_study(study)
            pipeline = _study_pipeline(store, record, _settings_of(record), None, progress or (lambda _: None))
        with tempfile.TemporaryDirectory() as tmp:
            for name, select in tiers.items():
                if progress is not None:
                    progress(f"tier {name}: {select}")
                results[name] = export_point(
                    store,
                    study,
                    select,
                    Path(tmp) / f"{name}.json",
                    samples=samples,
                    latency_repeats=latency_repeats,
                    pipeline=pipeline,
                    progress=progress,
                )
    finally:
        if store is not storage_or_store:
            store.close()
    bundle = TierBundle({name: dataclasses.replace(r.profile, name=name) for name, r in results.items()})
    bundle.save(out)
    return bundle, results
