"""The timestep spacing each solver baseline works best with, measured on the model at hand.

diffusers' DPM-Solver++ and UniPC place their steps by ``timestep_spacing`` ("linspace",
"leading", "trailing") and, for DPM-Solver, ``lambda_min_clipped``. The default is not the best
everywhere: on a cosine-schedule model "linspace" starts at t = 999, where the signal is ~0, and
UniPC's MSE at 5 steps was 10⁶ where "leading" gave 0.35. A baseline must be the method at its
best-configured settings, or beating it means nothing; so :func:`best_spacing` runs the method at
every candidate spacing on a few samples and keeps the one with the lowest MSE against a
200-step reference (DPM-Solver++(2M) on the scheduler's own grid).

Candidates whose schedules coincide (e.g. ``lambda_min_clipped`` on a linear-β model, where λ
never falls below the clip) are run once. Spacings that only change the final noise level
(``final_sigmas_type``) are not candidates: a :class:`~difftune.accel.SolverSchedule` ends where
the pipeline's scheduler config says, so they would not be the same baseline once exported.

Results are cached per process by (model fingerprint, noise schedule, method, NFE, call); pass
``refresh=True`` to measure again. The pipeline runs go through the evaluators (their call with
seeded per-sample generators, and their :class:`~difftune.evaluators.Reference`, whose images are
cached on disk), so a space never runs a pipeline its own way. :func:`spacing_table` measures a whole range of NFEs and
methods against one reference.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from difftune.accel.solver import SolverSchedule, USFScheduler
from difftune.errors import SpaceError

__all__ = [
    "METHODS",
    "SpacingChoice",
    "baseline_schedule",
    "best_spacing",
    "clear_spacing_cache",
    "default_spacing",
    "spacing_candidates",
    "spacing_table",
]

#: Solver baselines: DPM-Solver++(2M), UniPC (bh2, order 2 with the UniC corrector), DDIM (= DPM-Solver-1).
METHODS = ("dpmsolver++", "unipc", "ddim")
_METHOD_STEPS = {"dpmsolver++": (2, False), "unipc": (2, True), "ddim": (1, False)}
_SPACINGS = ("linspace", "leading", "trailing")
#: diffusers' recommended clip for cosine schedules (its docs: "-5.1 for the cosine (squaredcos_cap_v2) schedule").
_CLIPS = (-math.inf, -5.1)
_TEXT_PROMPTS = (
    "a photo of a cat",
    "a red car parked on a street",
    "a bowl of fruit on a wooden table",
    "a mountain landscape at sunset",
)


@dataclass(frozen=True)
class SpacingChoice:
    """The timestep spacing a solver baseline uses at one NFE, and what it was chosen from.

    Attributes:
        method: one of :data:`METHODS`.
        nfe: the number of model evaluations.
        label: the chosen candidate, e.g. ``"trailing"`` or ``"leading, lambda_min_clipped=-5.1"``.
        scheduler_kwargs: the diffusers scheduler settings that produce it (``timestep_spacing``,
            and ``lambda_min_clipped`` when not −∞); ``DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, **scheduler_kwargs)`` samples on the same timesteps.
        mse: MSE against the reference of every candidate tried (candidates with identical
            schedules share a value); empty when nothing was measured.
        measured: ``False`` when the scheduler's own spacing was taken unmeasured.
    """

    method: str
    nfe: int
    label: str
    scheduler_kwargs: Mapping[str, Any]
    mse: Mapping[str, float] = field(default_factory=dict)
    measured: bool = False

    def schedule(self, scheduler_config: Mapping[str, Any]) -> SolverSchedule:
        """The baseline's solver schedule for a model with this scheduler config."""
        return baseline_schedule(self.method, scheduler_config, self.nfe, self.scheduler_kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "nfe": self.nfe,
            "label": self.label,
            "scheduler_kwargs": dict(self.scheduler_kwargs),
            "mse": {k: (v if math.isfinite(v) else None) for k, v in self.mse.items()},
            "measured": self.measured,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SpacingChoice:
        try:
            return cls(
                method=_check_method(data["method"]),
                nfe=int(data["nfe"]),
                label=str(data["label"]),
                scheduler_kwargs=dict(data.get("scheduler_kwargs") or {}),
                mse={str(k): (math.inf if v is None else float(v)) for k, v in (data.get("mse") or {}).items()},
                measured=bool(data.get("measured", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SpaceError(f"spacing choice: malformed {dict(data)!r} ({exc})") from exc


def _check_method(method: Any) -> str:
    if method not in METHODS:
        raise SpaceError(f"unknown solver baseline {method!r}; known: {', '.join(METHODS)}")
    return str(method)


def is_flow_config(config: Mapping[str, Any]) -> bool:
    """Whether a scheduler config describes a flow-matching model (SD3, Flux)."""
    return bool(config.get("use_flow_sigmas")) or str(config.get("_class_name", "")).startswith("FlowMatch")


def _public(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not str(k).startswith("_")}


def _probe(config: Mapping[str, Any], scheduler_kwargs: Mapping[str, Any]) -> Any:
    """A ``DPMSolverMultistepScheduler`` for the model of ``config`` at the given spacing (timesteps only)."""
    from diffusers import DPMSolverMultistepScheduler

    extra: dict[str, Any] = {"algorithm_type": "dpmsolver++", "solver_order": 2}
    if is_flow_config(config):
        # Flux's resolution-dependent shift (use_dynamic_shifting) needs the image size; the static shift stands in.
        shift = config.get("shift", config.get("flow_shift", 1.0))
        extra.update(
            use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift, use_dynamic_shifting=False
        )
    # Only the keys DPMSolverMultistep takes: diffusers logs a warning for every other one.
    accepted = set(inspect.signature(DPMSolverMultistepScheduler.__init__).parameters)
    settings = {k: v for k, v in _public(config).items() if k in accepted}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DPMSolverMultistepScheduler.from_config({**settings, **extra, **dict(scheduler_kwargs)})


def baseline_schedule(
    method: str, scheduler_config: Mapping[str, Any], nfe: int, scheduler_kwargs: Mapping[str, Any] | None = None
) -> SolverSchedule:
    """The :class:`SolverSchedule` of a diffusers solver baseline at ``nfe`` steps.

    Timesteps are those ``DPMSolverMultistepScheduler`` picks with ``scheduler_kwargs`` (UniPC's
    ``linspace`` / ``leading`` / ``trailing`` grids are the same; ``lambda_min_clipped`` is
    DPM-Solver's clip, applied to every method alike); the per-step orders and correctors are
    those diffusers runs: DPM-Solver++(2M), UniPC-bh2 order 2, or DDIM (first order, data prediction).

    Raises:
        SpaceError: the spacing yields another number of steps than ``nfe`` (diffusers' "trailing"
            with a clipped start does).
    """
    order, corrector = _METHOD_STEPS[_check_method(method)]
    probe = _probe(scheduler_config, scheduler_kwargs or {})
    schedule = SolverSchedule.from_scheduler(probe, nfe, order=order, corrector=corrector, prediction="data")
    if schedule.num_steps != nfe:
        raise SpaceError(f"{method} with {dict(scheduler_kwargs or {})} gives {schedule.num_steps} steps, not {nfe}")
    return schedule


def spacing_candidates(scheduler_config: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, scheduler kwargs) of every spacing tried; the scheduler's own spacing comes first.

    Flow-matching models have one grid (diffusers' flow sigmas ignore ``timestep_spacing``).
    """
    if is_flow_config(scheduler_config):
        return [("flow sigmas", {})]
    own = scheduler_config.get("timestep_spacing", "linspace")
    order = [own, *(s for s in _SPACINGS if s != own)] if own in _SPACINGS else list(_SPACINGS)
    out = []
    for clip in _CLIPS:
        for spacing in order:
            kwargs: dict[str, Any] = {"timestep_spacing": spacing, "lambda_min_clipped": clip}
            label = spacing if clip == -math.inf else f"{spacing}, lambda_min_clipped={clip:g}"
            out.append((label, kwargs))
    return out


def _stored_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    # −∞ is diffusers' default and not JSON: store only settings that differ from it.
    return {k: v for k, v in kwargs.items() if not (k == "lambda_min_clipped" and v == -math.inf)}


def default_spacing(method: str, nfe: int, scheduler_config: Mapping[str, Any]) -> SpacingChoice:
    """The scheduler's own spacing, unmeasured (what a baseline uses when nothing can be measured)."""
    label, kwargs = spacing_candidates(scheduler_config)[0]
    return SpacingChoice(_check_method(method), int(nfe), label, _stored_kwargs(kwargs), {}, measured=False)


def _distinct(
    method: str, config: Mapping[str, Any], nfe: int
) -> list[tuple[list[str], dict[str, Any], SolverSchedule]]:
    """Candidates grouped by the schedule they produce (identical schedules are measured once)."""
    groups: list[tuple[list[str], dict[str, Any], SolverSchedule]] = []
    for label, kwargs in spacing_candidates(config):
        try:
            schedule = baseline_schedule(method, config, nfe, kwargs)
        except (SpaceError, ValueError):
            continue  # e.g. trailing with a clipped start: fewer steps than asked
        for labels, _, other in groups:
            if other == schedule:
                labels.append(label)
                break
        else:
            groups.append(([label], _stored_kwargs(kwargs), schedule))
    if not groups:
        raise SpaceError(f"no spacing gives {nfe} steps for {method} on this scheduler")
    return groups


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------

#: Measured choices, keyed by (fingerprint, noise schedule, method, NFE, call kwargs, guidance).
_CHOICES: dict[tuple[str, str, str, int, str, float | None], SpacingChoice] = {}
_REFERENCES: dict[tuple[Any, ...], torch.Tensor] = {}


def clear_spacing_cache() -> None:
    """Forget every measured spacing and reference (e.g. after changing a model's weights in place)."""
    _CHOICES.clear()
    _REFERENCES.clear()


def _scheduler_config(pipe: Any) -> dict[str, Any]:
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None or not hasattr(scheduler, "config"):
        raise SpaceError(f"{type(pipe).__name__} has no diffusers scheduler to measure spacings with")
    config = dict(scheduler.config)
    config["_class_name"] = type(scheduler).__name__
    return config


def _digest(config: Mapping[str, Any]) -> str:
    blob = json.dumps(_public(config), sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _samples(pipe: Any, samples: int | Sequence[Any], conditioning: str) -> tuple[tuple[Any, int], ...]:
    """(condition, seed) pairs: from a count, from conditions, from (condition, seed) or Sample-like objects."""
    if isinstance(samples, bool):
        raise SpaceError(f"samples: expected a count or a sequence of samples, got {samples!r}")
    if isinstance(samples, int):
        if samples < 1:
            raise SpaceError(f"samples: expected at least 1, got {samples}")
        if conditioning == "class":
            classes = int(getattr(getattr(pipe, "transformer", None), "config", {}).get("num_embeds_ada_norm") or 10)
            return tuple((i % classes, i) for i in range(samples))
        return tuple((_TEXT_PROMPTS[i % len(_TEXT_PROMPTS)], i) for i in range(samples))
    out = []
    for i, item in enumerate(samples):
        if hasattr(item, "condition") and hasattr(item, "seed"):
            out.append((item.condition, int(item.seed)))
        elif isinstance(item, tuple) and len(item) == 2:
            out.append((item[0], int(item[1])))
        else:
            out.append((item, i))
    if not out:
        raise SpaceError("samples: empty")
    return tuple(out)


def _call(guidance: float | None, call_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    kwargs = dict(call_kwargs or {})
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    return kwargs


def _as_samples(samples: Sequence[tuple[Any, int]]) -> list[Any]:
    from difftune.evaluators import Sample

    return [Sample(condition if isinstance(condition, str) else int(condition), seed) for condition, seed in samples]


def study_samples_and_call(context: Any, who: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The study's first calibration samples and call kwargs (with its size), for spaces that fit on the pipeline."""
    pipe = context.pipeline
    if pipe is None:
        raise SpaceError(
            f"space {who!r} fits on the pipeline: build the context with "
            "SpaceContext.from_pipeline(pipe, keep_pipeline=True)"
        )
    samples = tuple(_as_samples(_samples(pipe, context.spacing_samples, context.info.conditioning)))
    call = dict(context.call_kwargs)
    for name in ("height", "width"):
        value = getattr(context, name)
        if value is not None:
            call.setdefault(name, value)
    return samples, call


def _generate(
    pipe: Any,
    scheduler: Any,
    samples: Sequence[tuple[Any, int]],
    steps: int,
    guidance: float | None,
    call_kwargs: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """``samples`` drawn by ``pipe`` with ``scheduler`` swapped in (and back), through the evaluators' call."""
    from difftune.evaluators import generate

    original, bar = pipe.scheduler, getattr(pipe, "_progress_bar_config", None)
    pipe.scheduler = scheduler
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    try:
        images = generate(pipe, _as_samples(samples), {**_call(guidance, call_kwargs), "num_inference_steps": steps})
    finally:
        pipe.scheduler = original
        if bar is None:
            pipe.__dict__.pop("_progress_bar_config", None)
        else:
            pipe._progress_bar_config = bar
    return images.cpu()


def _reference(
    pipe: Any,
    fingerprint: str,
    config: Mapping[str, Any],
    samples: tuple[tuple[Any, int], ...],
    guidance: float | None,
    steps: int,
    call_kwargs: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """The DPM-Solver++(2M) reference of ``steps`` steps: the evaluators' :class:`~difftune.evaluators.Reference`
    on a copy of ``pipe`` (shared weights), so its images are cached on disk like every reference."""
    key = (fingerprint, _digest(config), samples, guidance, steps, _digest(dict(call_kwargs or {})))
    if key not in _REFERENCES:
        from difftune.evaluators import Reference, ReferenceSetting, shared_weights_copy

        # A USFScheduler already on a tuned schedule must not lend it to the reference: build from the config alone.
        base = {k: v for k, v in config.items() if k != "schedule"}
        ref_pipe = shared_weights_copy(pipe)
        ref_pipe.scheduler = USFScheduler.from_schedule(None, base, solver_order=2, predict_x0=True, corrector=False)
        if hasattr(ref_pipe, "set_progress_bar_config"):
            ref_pipe.set_progress_bar_config(disable=True)
        setting = ReferenceSetting.from_pipeline(ref_pipe, num_inference_steps=steps, **_call(guidance, call_kwargs))
        reference = Reference(ref_pipe, setting, batch_size=len(samples))
        _REFERENCES[key] = reference.images(_as_samples(samples))
    return _REFERENCES[key]


def best_spacing(
    pipe: Any,
    method: str,
    nfe: int,
    samples: int | Sequence[Any] = 4,
    *,
    guidance_scale: float | None = None,
    reference_steps: int = 200,
    refresh: bool = False,
    call_kwargs: Mapping[str, Any] | None = None,
) -> SpacingChoice:
    """Measure which spacing gives ``method`` at ``nfe`` steps the lowest MSE on ``pipe``.

    Args:
        pipe: the pipeline (its scheduler is swapped during the runs and restored after).
        method: ``"dpmsolver++"``, ``"unipc"`` or ``"ddim"``.
        nfe: the number of model evaluations.
        samples: how many (class labels 0, 1, … or a few stock prompts, seeds 0, 1, …), or the
            samples themselves: conditions, ``(condition, seed)`` pairs, or objects with
            ``.condition`` and ``.seed`` (difftune's calibration samples).
        guidance_scale: the call's guidance (``None`` = the pipeline's default).
        reference_steps: steps of the DPM-Solver++(2M) reference every candidate is compared with.
        refresh: measure again even if this (model, noise schedule, method, NFE) was measured.
        call_kwargs: the call's other kwargs (``height``, ``width``, ``negative_prompt``, …): spacings are
            measured on the call the study tunes.

    Each candidate runs as the :class:`SolverSchedule` the baseline decodes to (through
    :class:`~difftune.accel.USFScheduler`), i.e. exactly what the baseline point applies.

        >>> choice = best_spacing(difftune.load_pipeline("embedded"), "unipc", 5, samples=4)
        >>> choice.label, choice.mse
    """
    from difftune.models import describe

    _check_method(method)
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise SpaceError(f"nfe: expected an integer >= 1, got {nfe!r}")
    info = describe(pipe)
    config = _scheduler_config(pipe)
    key = (info.fingerprint, _digest(config), method, nfe, _digest(dict(call_kwargs or {})), guidance_scale)
    if not refresh and key in _CHOICES:
        return _CHOICES[key]
    pairs = _samples(pipe, samples, info.conditioning)
    groups = _distinct(method, config, nfe)
    reference = _reference(pipe, info.fingerprint, config, pairs, guidance_scale, reference_steps, call_kwargs)
    mse: dict[str, float] = {}
    best: tuple[float, int] | None = None
    for index, (labels, _, schedule) in enumerate(groups):
        scheduler = USFScheduler.from_schedule(schedule, pipe.scheduler)
        images = _generate(pipe, scheduler, pairs, nfe, guidance_scale, call_kwargs)
        value = float(((images - reference) ** 2).mean())
        value = value if math.isfinite(value) else math.inf
        for label in labels:
            mse[label] = value
        if best is None or value < best[0]:
            best = (value, index)
    assert best is not None
    labels, kwargs, _ = groups[best[1]]
    choice = SpacingChoice(method, nfe, labels[0], kwargs, mse, measured=True)
    _CHOICES[key] = choice
    return choice


def spacing_table(
    pipe: Any,
    methods: Iterable[str] = METHODS,
    nfes: Iterable[int] = range(3, 13),
    samples: int | Sequence[Any] = 4,
    *,
    guidance_scale: float | None = None,
    reference_steps: int = 200,
    refresh: bool = False,
) -> dict[tuple[str, int], SpacingChoice]:
    """:func:`best_spacing` for every method and NFE (one shared reference), keyed ``(method, nfe)``.

    The result is what :class:`~difftune.spaces.SpaceContext` takes as ``spacings``.
    """
    return {
        (m, n): best_spacing(
            pipe, m, n, samples, guidance_scale=guidance_scale, reference_steps=reference_steps, refresh=refresh
        )
        for m in methods
        for n in nfes
    }
