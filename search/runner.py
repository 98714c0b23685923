"""The study runner: ask a searcher for points, evaluate them on the pipeline, store them, tell back.

One call of :func:`run_study` creates or resumes a study in difftune's store and the Optuna study
behind it in the same database (the Optuna storage URL is the store URL), then runs trials until the
store holds ``budget`` finished trials (complete or failed)::

    from difftune.search.runner import run_study

    result = run_study(model="embedded", space="cache", budget=24, storage="sqlite:///difftune.db")
    for trial in result.front:
        print(trial.number, trial.values())

The flow of one trial: ``ask`` → ``space.decode`` → profile sections → ``apply_profile`` →
``evaluate`` (against the reference setting — the plain pipeline at ``num_inference_steps`` — timed
in this process for ``speedup``) → ``handle.remove()`` → the trial's state and metrics stored in one
transaction → ``tell``. A trial that raises anything (an :class:`~difftune.EvaluationError`, a
:class:`~difftune.ProfileError`, any exception) is stored as failed with its reason, told as failed,
and the study goes on. The space's named baselines are evaluated first: those the space can express
as parameters are enqueued in the searcher, the others (e.g. FirstBlockCache policies) are evaluated
directly. After the loop the Pareto front is recorded in the store.

Every input (model, space, searcher, objectives) is checked before the store is opened, so bad input
never writes to the database.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from difftune.errors import DifftuneError, SpaceError, StoreError

__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_NFE_RANGE",
    "DEFAULT_OBJECTIVES",
    "DEFAULT_SAMPLES",
    "DEFAULT_STEPS",
    "DISTRIBUTION_METRICS",
    "HV_REFERENCE",
    "STALE_AFTER_S",
    "RunProgress",
    "RunResult",
    "WarmPoint",
    "default_study_name",
    "front_hypervolume",
    "memo_key",
    "run_study",
    "run_worker",
]

#: Finished trials of a default study: enough for the space's baselines and a first front.
DEFAULT_BUDGET = 24
#: Model evaluations the solver and joint spaces search.
DEFAULT_NFE_RANGE = (3, 12)
#: Calibration samples per trial (the embedded model: digits 0–9 × 2 seeds).
DEFAULT_SAMPLES = 20
#: ``num_inference_steps`` of the reference setting and of every cache mask.
DEFAULT_STEPS = 20
#: The embedded model's objectives: speed, fidelity to the reference, and a conditioning metric that
#: catches blur and wrong classes which PSNR alone would trade away.
DEFAULT_OBJECTIVES: tuple[tuple[str, str], ...] = (
    ("speedup", "maximize"),
    ("psnr", "maximize"),
    ("class_accuracy", "maximize"),
)
#: Every other family's objectives: speed, fidelity, and the blur guard that needs no weights.
DEFAULT_OBJECTIVES_OTHER: tuple[tuple[str, str], ...] = (
    ("speedup", "maximize"),
    ("psnr", "maximize"),
    ("sharpness", "maximize"),
)
#: Seconds without a heartbeat after which a running trial's worker (on another machine) is taken for
#: dead: the trial is failed as interrupted and its point retried. Workers beat every HEARTBEAT_S;
#: a dead worker on the same machine is noticed at once (its process is gone).
STALE_AFTER_S = 120.0
HEARTBEAT_S = 10.0
#: Reference point of the progress hypervolume for metrics that have a natural one: no faster than
#: the reference setting, 20 dB, … (other metrics use the worst value seen).
HV_REFERENCE: dict[str, float] = {
    "speedup": 1.0,
    "flops_ratio": 1.0,
    "psnr": 20.0,
    "ssim": 0.5,
    "class_accuracy": 0.5,
    "clip_score": 0.0,
    "sharpness": 0.5,
}
#: Every study keeps at least one of these as an objective or a constraint: a distribution, conditioning
#: or perceptual metric that catches the blurred or wrong-class points PSNR alone would trade in.
DISTRIBUTION_METRICS = ("fid", "class_accuracy", "clip_score", "image_reward", "sharpness", "lpips")
#: Measured for every trial besides the objectives (``peak_memory_mb`` only on CUDA).
EXTRA_METRICS = ("nfe", "flops_ratio", "latency_ms", "speedup_spread", "ssim", "mse", "sharpness", "peak_memory_mb")
#: Measured besides the objectives when their weights are on this machine (never downloaded).
OPTIONAL_METRICS = ("lpips", "clip_score", "image_reward", "fid")
#: Thumbnails kept per evaluated trial (the first samples of its first batch) and of the study's reference
#: (the same samples, once per study), each downscaled to at most THUMBNAIL_PX pixels a side, as PNG; a
#: study stops adding trial thumbnails once its images take THUMBNAIL_STUDY_BYTES (the dashboard shows them).
THUMBNAILS = 4
THUMBNAIL_PX = 128
THUMBNAIL_STUDY_BYTES = 32 * 2**20


@dataclass(frozen=True)
class RunProgress:
    """What the progress callback receives after each trial."""

    study: str
    finished: int
    budget: int
    front_size: int
    trial: Any  # the TrialRecord just stored
    label: str  # the baseline's name, or "trial N"
    hypervolume: float = 0.0  # of the front so far (see front_hypervolume)


@dataclass(frozen=True)
class RunResult:
    """The outcome of :func:`run_study`: the study, its front (complete trials), and the counts."""

    study: Any  # StudyRecord
    front: list[Any]  # TrialRecord, sorted by the first objective, best first
    objectives: tuple[Any, ...]  # MetricSpec
    finished: int
    new_trials: int
    failed: int
    storage: str
    hypervolume: float = 0.0
    #: seconds spent evaluating trials (decode, apply, evaluate) and in the searcher's and the
    #: store's own work around them (claims, ask/tell, stores, front queries), for `bench store`
    timings: Mapping[str, float] = field(default_factory=dict)
    #: trials of this run that failed, and their reasons with counts (most common first)
    new_failed: int = 0
    failures: Mapping[str, int] = field(default_factory=dict)
    #: complete trials the study holds
    complete: int = 0
    #: the study's constraints (points that miss one are kept off the front)
    constraints: tuple[str, ...] = ()
    #: what the run could not do and the user should know (a baseline the searcher could not take, …)
    notes: tuple[str, ...] = ()

    @property
    def all_failed(self) -> bool:
        """True when this run's trials all failed, or the study holds no complete trial at all."""
        return (self.new_trials > 0 and self.new_failed == self.new_trials) or self.complete == 0


@dataclass(frozen=True)
class WarmPoint:
    """A point an earlier study's search found, re-measured first in a new study to warm-start it.

    It is stored as a trial of kind ``warm`` (claimed once, as ``warm:<name>``), measured afresh — never
    copied from the memo — and given to the searcher like a seed.
    """

    name: str  # "<study>#<trial number>" of the trial it comes from
    params: Mapping[str, Any]  # the point in the space's variables
    origin: str | None = None  # where that trial's point first came from, when it was itself carried over

    def config(self) -> dict[str, Any]:
        return {"warm": self.name, **({"origin": self.origin} if self.origin else {})}


def default_study_name(model: str, space: str) -> str:
    """``"<model>-<space>"``, e.g. ``"embedded-cache"`` (path separators replaced)."""
    base = model.rstrip("/").replace("\\", "/").split("/")[-1] or "model"
    return f"{base}-{space}"


def default_objectives(family: str) -> tuple[tuple[str, str], ...]:
    """The objectives of a study that names none: :data:`DEFAULT_OBJECTIVES` for the embedded model, else
    :data:`DEFAULT_OBJECTIVES_OTHER` (speedup, PSNR, sharpness — no weights needed)."""
    return DEFAULT_OBJECTIVES if family == "embedded" else DEFAULT_OBJECTIVES_OTHER


def _objective_specs(objectives: Sequence[Any], constraints: Sequence[Any] = ()) -> tuple[Any, ...]:
    from difftune.store import MetricSpec, parse_constraint

    specs = tuple(MetricSpec.parse(o) for o in objectives)
    if not specs:
        raise SpaceError("objectives: give at least one, e.g. speedup, psnr, sharpness")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise SpaceError(f"objectives {names}: a metric is named twice")
    bounded = {parse_constraint(c).metric for c in constraints}
    if not any(n in DISTRIBUTION_METRICS for n in [*names, *bounded]):
        raise SpaceError(
            f"objectives {names}: every study keeps a distribution, conditioning or blur-guard metric "
            f"({', '.join(DISTRIBUTION_METRICS)}) as an objective or a constraint, so that blurred or wrong-class "
            "points are not traded in"
        )
    return specs


def _objective_names(searcher: str, specs: Sequence[Any]) -> dict[str, Any]:
    """``objective_names`` for searchers that rank by quality alone at one NFE (evo, s3)."""
    import inspect

    from difftune.search._base import get_searcher_class

    params = inspect.signature(get_searcher_class(searcher)).parameters
    return {"objective_names": [s.name for s in specs]} if "objective_names" in params else {}


def _population(searcher: str, asked: int | None, budget: int) -> int | None:
    """The population a new study's searcher gets: ``asked``, else the searcher's budget-aware default.

    Raises:
        SpaceError: a population for a searcher that has none (TPE, GP, random).
    """
    import inspect

    from difftune.search._base import _OPTIONS, get_searcher_class

    cls = get_searcher_class(searcher)
    sampler = _OPTIONS.get(searcher, {}).get("sampler")  # Optuna's samplers share one class: only nsga2 has one
    if "population_size" not in inspect.signature(cls).parameters or sampler not in (None, "nsga2"):
        if asked is not None:
            raise SpaceError(f"--population: searcher {searcher!r} has no population (nsga2 and pymoo-nsga2 have)")
        return None
    if asked is not None:
        return asked  # its range is checked with the other settings (StudySettings)
    default = getattr(cls, "default_population", None)
    return default(budget) if callable(default) else None


def _screen_samples(space: Any, asked: int | None, samples: int) -> int:
    """A new study's screening samples: ``asked``, else the space's default where the study has more samples."""
    if asked is not None:
        return asked
    default = int(getattr(space, "default_screen", 0))
    return default if 0 < default < samples else 0


def _check_searcher(name: str) -> None:
    """An unknown searcher name is bad input (the error lists the known ones)."""
    from difftune.search._base import get_searcher_class

    get_searcher_class(name)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("difftune", "diffusers", "torch"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


def _parse_worker(worker_id: str | None) -> tuple[str, int, str] | None:
    parts = (worker_id or "").rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]), parts[2]


def _worker_alive(worker_id: str | None) -> bool | None:
    """False when ``worker_id`` names a process of this host that no longer exists; None when unknown."""
    parsed = _parse_worker(worker_id)
    if parsed is None or parsed[0] != socket.gethostname():
        return None  # another machine: only its heartbeats tell
    _host, pid, token = parsed
    if pid == os.getpid():
        return token == _TOKEN
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return None
    return None


_TOKEN = os.urandom(4).hex()
_LOG = logging.getLogger("difftune.search")


class _Heartbeat:
    """Marks the running trial alive every ``interval`` seconds from a daemon thread."""

    def __init__(self, store: Any, trial_id: int, interval: float = HEARTBEAT_S) -> None:
        self._store, self._trial_id, self._interval = store, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="difftune-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._store.heartbeat(self._trial_id)
            except DifftuneError as exc:  # a busy database: the next beat retries; staleness takes minutes
                _LOG.warning("heartbeat of trial id %s not written (the next one retries): %s", self._trial_id, exc)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def hypervolume_reference(specs: Sequence[Any], rows: Sequence[Mapping[str, float]]) -> list[float]:
    """The reference point of a study's progress hypervolume: :data:`HV_REFERENCE` where the metric has
    one (speedup 1×, PSNR 20 dB, …), else the worst value seen."""
    out = []
    for s in specs:
        if s.name in HV_REFERENCE:
            out.append(HV_REFERENCE[s.name])
            continue
        seen = [r[s.name] for r in rows if s.name in r]
        if not seen:
            out.append(0.0)
        else:
            out.append(min(seen) if s.direction == "maximize" else max(seen))
    return out


def front_hypervolume(specs: Sequence[Any], trials: Sequence[Any]) -> float:
    """Hypervolume of ``trials``' values (complete trials) against :func:`hypervolume_reference`."""
    from difftune.store import hypervolume

    rows = [t.values() for t in trials]
    rows = [r for r in rows if all(s.name in r for s in specs)]
    if not rows:
        return 0.0
    ref = hypervolume_reference(specs, rows)
    return hypervolume([[r[s.name] for s in specs] for r in rows], ref, [s.direction for s in specs])


@dataclass
class _Job:
    """Everything one process needs to run trials of a study (calibrate and worker share it)."""

    store: Any
    study: Any  # StudyRecord
    space: Any
    context: Any
    specs: tuple[Any, ...]
    names: list[str]
    samples: list[Any]
    pipe: Any
    search: Any
    baselines: list[Any]
    seeds: list[Any]
    latency: Any
    reference: Any
    provenance: dict[str, Any]
    worker: str
    constraints: tuple[Any, ...] = ()
    timings: dict[str, float] = field(default_factory=lambda: {"evaluation_s": 0.0, "overhead_s": 0.0})
    failures: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: the study's reference thumbnails are known to be stored
    reference_thumbnails: bool = False
    #: what a trial's memo key covers beside its profile (None: memoisation off, every trial runs)
    memo_context: dict[str, Any] | None = None
    #: multi-fidelity: calibration samples of the screening rung (0: off) and the share that goes on
    screen: int = 0
    screen_eta: int = 3
    #: an earlier study's points, re-measured first (kind ``warm``) and given to the searcher
    warm: list[Any] = field(default_factory=list)


def _metric_context(pipe: Any, info: Any) -> Any:
    import torch

    from difftune.evaluators import MetricContext

    device = getattr(pipe, "device", None)
    return MetricContext(family=info.family, device=device if isinstance(device, torch.device) else torch.device("cpu"))


def _metric_names(
    specs: Sequence[Any], constraints: Sequence[Any], pipe: Any, info: Any
) -> tuple[list[str], dict[str, str]]:
    """What every trial measures — the objectives, the constrained metrics, :data:`EXTRA_METRICS`, and the
    :data:`OPTIONAL_METRICS` whose weights are on this machine (the embedded model: its FID and accuracy) —
    and, for the optional metrics left out, why (what is missing, how to get it)."""
    from difftune.errors import EvaluationError
    from difftune.evaluators import build_metric

    wanted = [*(s.name for s in specs), *(c.metric for c in constraints)]
    names = list(dict.fromkeys([*wanted, *EXTRA_METRICS]))
    if info.family == "embedded":
        return list(dict.fromkeys([*names, "fid", "class_accuracy"])), {}
    context = _metric_context(pipe, info)
    skipped: dict[str, str] = {}
    for name in OPTIONAL_METRICS:
        if name in names:
            continue
        if name in ("clip_score", "image_reward") and info.conditioning == "class":
            skipped[name] = "it needs text prompts; this model is class-conditional"
            continue
        try:
            build_metric(name, context)
        except EvaluationError as exc:
            skipped[name] = str(exc)  # measured only when asked for (and then it is an error)
            continue
        names.append(name)
    return names, skipped


def _validate(settings: Any, specs: Sequence[Any], constraints: Sequence[Any], pipe: Any, info: Any) -> None:
    """Fail before the store is opened: every objective and constraint can be measured on this model, the
    call's options fit the pipeline, and one short probe call gives finite images the metrics accept.

    Raises:
        DifftuneError: naming the metric, option or problem and what to do.
    """
    import torch

    from difftune.errors import EvaluationError
    from difftune.evaluators import EvalBatch, build_metric, generate, metric_spec

    context = _metric_context(pipe, info)
    bound = {}
    for name in dict.fromkeys([*(s.name for s in specs), *(c.metric for c in constraints)]):
        spec = metric_spec(name)  # unknown names list the known ones
        if spec.kind == "cost":
            continue
        try:
            bound[name] = build_metric(name, context)
        except EvaluationError as exc:
            raise EvaluationError(f"--objectives/--constraint: {exc}") from exc
    kwargs = settings.call_kwargs(pipe)
    probe = settings.samples_for(pipe, 2)[:1]
    kwargs["num_inference_steps"] = min(2, settings.num_inference_steps)
    try:
        images = generate(pipe, probe, kwargs)
    except DifftuneError:
        raise
    except Exception as exc:
        raise DifftuneError(
            f"a probe call of the pipeline failed on {settings.device or 'cpu'} in {settings.dtype or 'its dtype'} "
            f"({_reason(exc)}); check --prompts, --height/--width, --guidance-scale, --device and --dtype"
        ) from exc
    if not bool(torch.isfinite(images).all()):
        hint = (
            " (float16 VAEs of SD-XL overflow: try --dtype bfloat16 or float32)" if settings.dtype == "float16" else ""
        )
        raise DifftuneError(
            f"the pipeline draws NaN/inf images on {settings.device or 'cpu'} in {settings.dtype or 'its dtype'}"
            f"{hint}; nothing was stored"
        )
    batch = EvalBatch(images, images, [s.condition for s in probe])
    for metric in bound.values():
        try:
            metric.update(batch)
        except EvaluationError as exc:
            raise EvaluationError(f"--objectives/--constraint: {exc}") from exc


def _prepare_pipeline(settings: Any, pipeline: Any) -> tuple[Any, Any]:
    from difftune.models import describe

    pipe = settings.load_pipeline(pipeline)
    return pipe, describe(pipe)


def _job(
    store: Any,
    study_rec: Any,
    pipe: Any,
    space_obj: Any,
    specs: tuple[Any, ...],
    *,
    searcher_name: str,
    seed: int | None,
    settings: Any,
    memo: bool = True,
) -> _Job:
    from difftune.evaluators import LatencyOptions, Reference
    from difftune.search._base import make_searcher
    from difftune.search.settings import device_name, device_type
    from difftune.spaces import SpaceContext
    from difftune.store import parse_constraint

    call = settings.call_kwargs(pipe)
    chosen = settings.samples_for(pipe)
    context = SpaceContext.from_pipeline(
        pipe,
        num_inference_steps=settings.num_inference_steps,
        nfe_range=settings.nfe_range,
        guidance_scale=settings.guidance_scale,
        height=settings.height,
        width=settings.width,
        # Lazy measurements (the solver baselines' best spacings) run the study's own call and prompts.
        spacing_samples=chosen[:4],
        call_kwargs={k: v for k, v in call.items() if k != "guidance_scale"},
    )
    if settings.ems and getattr(space_obj, "uses_ems", False):
        from difftune.search.ems import compute_ems, ems_samples

        # DPM-Solver-v3's statistics of this model under the study's call (cached per model on disk).
        context = context.replace(
            ems=compute_ems(
                pipe,
                ems_samples(chosen, settings.ems),
                guidance_scale=settings.guidance_scale,
                call_kwargs={k: v for k, v in call.items() if k != "guidance_scale"},
                batch_size=settings.images_per_call(),
            )
        )
    variables = space_obj.variables(context)
    search = make_searcher(
        searcher_name,
        variables,
        [s.direction for s in specs],
        seed=seed,
        storage=store_url_for_optuna(store),
        study_name=study_rec.optuna_study_name or f"difftune:{study_rec.name}",
        **({"population_size": settings.population} if settings.population is not None else {}),
        **_objective_names(searcher_name, specs),
    )
    worker = f"{socket.gethostname()}:{os.getpid()}:{_TOKEN}"
    device = str(getattr(pipe, "device", "cpu"))
    statistic = "median" if device_type(device) == "cuda" else "paired"
    latency = LatencyOptions(warmup=1, repeats=settings.latency_repeats, statistic=statistic)
    return _Job(
        store=store,
        study=study_rec,
        space=space_obj,
        context=context,
        specs=specs,
        names=list(settings.metrics),
        samples=chosen,
        pipe=pipe,
        search=search,
        baselines=space_obj.baselines(context),
        seeds=space_obj.seeds(context),
        # On a CPU (often shared with other work) speedup is the median ratio of back-to-back runs of
        # the reference and the trial; on a GPU the ratio of medians (CUDA events, after a warm-up).
        latency=latency,
        reference=Reference.from_pipeline(
            pipe,
            num_inference_steps=settings.num_inference_steps,
            batch_size=settings.images_per_call(),
            image_steps=settings.reference_steps,
            **call,
        ),
        provenance={
            "study": study_rec.name,
            "device": device,
            "device_name": device_name(device),
            "dtype": settings.dtype or _dtype_name(pipe),
            "worker": worker,
            "versions": _versions(),
        },
        worker=worker,
        constraints=tuple(parse_constraint(c) for c in settings.constraints),
        memo_context=_memo_context(settings, context, device, latency) if memo else None,
        screen=settings.screen,
        screen_eta=settings.screen_eta,
    )


def store_url_for_optuna(store: Any) -> str:
    """The unmasked URL of ``store``'s database, for Optuna's RDB storage in the same database."""
    return str(store._url)


def _candidates(job: _Job) -> list[Any]:
    """Interrupted trials to retry first, then the warm-start points, the space's baselines and seeds, in order.

    Keys some trial already holds are skipped by :meth:`~difftune.store.Store.claim_trial` itself,
    inside its locked transaction; an interrupted baseline or seed frees its own key and is retried
    by it, a searched point as ``retry:<number>``.
    """
    from difftune.store import Candidate, TrialState

    out = []
    for t in job.store.list_trials(job.study.id, TrialState.INTERRUPTED):
        config = dict(t.config or {})
        if not config or t.kind in ("baseline", "seed", "warm"):
            continue  # killed before the searcher filled in its point; or retried by its own key
        config["retry_of"] = config.get("retry_of", t.number)
        config.pop("optuna_number", None)
        config.pop("searcher_number", None)
        out.append(Candidate(f"retry:{config['retry_of']}", t.params, config, kind="retry"))
    out += [Candidate(f"warm:{p.name}", p.params, p.config(), kind="warm") for p in job.warm]
    out += [
        Candidate(f"baseline:{p.name}", p.params or {}, _baseline_config(p), kind="baseline") for p in job.baselines
    ]
    out += [
        Candidate(f"seed:{p.name}", p.params, {"seed": p.name}, kind="seed") for p in job.seeds if p.params is not None
    ]
    return out


def _baseline_config(point: Any) -> dict[str, Any]:
    """A baseline trial's stored config: its name, and what it is (a stack names the points it stacks)."""
    return {"baseline": point.name, **({"description": point.description} if point.description else {})}


def _sections(job: _Job, params: Mapping[str, Any], point: Any) -> Mapping[str, Any]:
    """A trial's profile sections: a baseline's own, else the space's decoding of its params."""
    return dict(point.sections) if point is not None else job.space.decode(params, job.context)


def _png_thumbnails(images: Any, count: int = THUMBNAILS, size: int = THUMBNAIL_PX) -> list[bytes]:
    """The first ``count`` of N×C×H×W images in [0, 1] as PNG bytes, downscaled to at most ``size`` pixels a side
    (grey, RGB or RGBA by channel count; other shapes give none)."""
    import io

    import numpy as np
    from PIL import Image

    if getattr(images, "ndim", 0) != 4 or images.shape[1] not in (1, 3, 4):
        return []
    out = []
    for image in images[:count]:
        array = (image.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
        picture = Image.fromarray(array[0] if len(array) == 1 else np.moveaxis(array, 0, -1))
        picture.thumbnail((size, size), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG", optimize=True)
        out.append(buffer.getvalue())
    return out


def _store_thumbnails(job: _Job, trial: Any, pngs: Sequence[bytes]) -> None:
    """Store a complete trial's thumbnails (and, the first time, the reference's for the same samples) while the
    study's images stay under :data:`THUMBNAIL_STUDY_BYTES`. A thumbnail is not worth a measured trial: a store
    or image error here is logged, not raised."""
    if not pngs:
        return
    store, study_id = job.store, job.study.id
    try:
        used = store.image_bytes(study_id)
        if not job.reference_thumbnails:
            if not store.get_reference_images(study_id):
                # The evaluation has just cached these reference images on disk: no pipeline run here.
                reference = _png_thumbnails(job.reference.images(job.samples[: len(pngs)]), len(pngs))
                store.add_reference_images(study_id, reference)
                used += sum(len(p) for p in reference)
            job.reference_thumbnails = True
        if used + sum(len(p) for p in pngs) > THUMBNAIL_STUDY_BYTES:
            if not any(n.startswith("thumbnails stopped") for n in job.notes):
                limit = THUMBNAIL_STUDY_BYTES // 2**20
                job.notes.append(f"thumbnails stopped at trial {trial.number}: the study's images reached {limit} MiB")
            return
        store.add_images(trial.id, pngs)
    except Exception as exc:
        _LOG.warning("thumbnails of trial %s not stored: %s", trial.number, _reason(exc))


def memo_key(profile: Mapping[str, Any], context: Mapping[str, Any]) -> str:
    """The hash of what a trial measures: its profile (without name, figures and provenance) in ``context``."""
    applied = {k: v for k, v in profile.items() if k not in ("name", "metrics", "provenance")}
    text = json.dumps({"profile": applied, "context": context}, sort_keys=True, default=repr, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _memo_context(settings: Any, context: Any, device: str, latency: Any) -> dict[str, Any]:
    """Everything beside the profile that a measurement depends on: the model's weights, the device kind, the
    study's call and calibration samples, the metrics, how latency is timed, and the libraries' versions."""
    from difftune.search.settings import device_name, device_type

    # How candidates are chosen (the population, screening) does not change what a full evaluation measures.
    chosen = ("device", "population", "screen", "screen_eta", "not_measured")
    stored = {k: v for k, v in settings.to_dict().items() if k not in chosen}
    return {
        "fingerprint": context.info.fingerprint,
        "device": [device_type(device), device_name(device)],
        "settings": stored,
        "latency": [latency.warmup, latency.repeats, latency.statistic],
        "versions": _versions(),
    }


def _memoised(job: _Job, trial: Any, config: dict[str, Any], key: str) -> Any:
    """Complete ``trial`` with the figures of an earlier trial that measured the same thing, or return None."""
    from difftune.store import TrialState

    hit = job.store.find_memo(key)
    if hit is None or hit.id == trial.id:
        return None
    values = hit.values()
    needed = {s.name for s in job.specs} | {c.metric for c in job.constraints}
    if not needed <= set(values):
        return None
    config["memo_of"] = {"study_id": hit.study_id, "trial": hit.number}
    job.store.update_trial(trial.id, config=config)
    copied = {name: values[name] for name in job.names if name in values}
    record = job.store.set_trial_state(trial.id, TrialState.COMPLETE, metrics=copied, memo_key=key)
    try:
        pngs = [image.png for image in job.store.get_images(hit.id)]
    except Exception as exc:  # a thumbnail is not worth a trial
        _LOG.warning("thumbnails of trial %s not copied: %s", trial.number, _reason(exc))
        pngs = []
    _store_thumbnails(job, record, pngs)
    return record


def _finite(measured: Mapping[str, Any], where: str = "") -> dict[str, float]:
    """The measured values as floats; a NaN/inf one fails the trial (it must not be stored or told)."""
    from difftune.errors import EvaluationError

    values = {k: float(v) for k, v in measured.items() if v is not None}
    for name, value in values.items():
        if not math.isfinite(value):
            raise EvaluationError(f"metric {name} produced {'NaN' if math.isnan(value) else 'inf'}{where}")
    return values


def _evaluate_trial(job: _Job, trial: Any, sections_of: Callable[[], Mapping[str, Any]], label: str) -> Any:
    """Decode/apply/evaluate one claimed trial and store it complete or failed (with thumbnails); returns the record."""
    from difftune.evaluators import evaluate
    from difftune.profile import apply_profile
    from difftune.spaces import to_profile
    from difftune.store import TrialState

    config = dict(trial.config or {})
    thumbnails: list[bytes] = []
    key: str | None = None
    try:
        started = time.perf_counter()
        sections = sections_of()
        profile = to_profile(sections, job.context, name=label, provenance=job.provenance)
        config["profile"] = profile.to_dict()
        if job.memo_context is not None:
            key = memo_key(config["profile"], job.memo_context)
            # a warm-start point is there to be measured again (tonight's drivers, load, libraries)
            reused = _memoised(job, trial, config, key) if trial.kind != "warm" else None
            if reused is not None:
                return reused
        decoded = time.perf_counter()
        job.store.update_trial(trial.id, config=config)  # a store write: billed to the overhead, not the trial
        started += time.perf_counter() - decoded
        with _Heartbeat(job.store, trial.id):
            reference = job.reference
            handle = apply_profile(job.pipe, profile)
            try:
                if job.screen:
                    stopped = _screen(job, trial, profile)
                    if stopped is not None:
                        job.timings["evaluation_s"] += time.perf_counter() - started
                        return job.store.set_trial_state(trial.id, TrialState.PRUNED, error=stopped)
                measured = evaluate(
                    job.pipe,
                    job.samples,
                    reference,
                    metrics=job.names,
                    latency=job.latency,
                    call_kwargs={"num_inference_steps": profile.context.num_inference_steps},
                    on_images=lambda images: thumbnails.extend(_png_thumbnails(images)),
                )
            finally:
                handle.remove()
        job.timings["evaluation_s"] += time.perf_counter() - started
        values = _finite(measured)
        missing = [s.name for s in job.specs if s.name not in values]
        if missing:
            raise DifftuneError(f"objective(s) {missing} were not measured")
    except Exception as exc:
        return job.store.set_trial_state(trial.id, TrialState.FAILED, error=_reason(exc))
    except BaseException as exc:  # Ctrl-C, SystemExit: the trial is interrupted and will be retried
        job.store.interrupt_trials(job.study.id, grace_period=0, trial_ids=[trial.id], reason=_reason(exc))
        raise
    record = job.store.set_trial_state(trial.id, TrialState.COMPLETE, metrics=values, memo_key=key)
    _store_thumbnails(job, record, thumbnails)
    return record


#: The rung of the screening evaluation (the full one is rung 0).
SCREEN_RUNG = -1


def _screen_metrics(job: _Job) -> list[str]:
    """What the screening rung measures: the objectives and the constraints' metrics (not the extras)."""
    wanted = [s.name for s in job.specs] + [c.metric for c in job.constraints]
    return [n for n in dict.fromkeys(wanted) if n != "speedup_spread"]


def _screen(job: _Job, trial: Any, profile: Any) -> str | None:
    """Measure the applied ``profile`` at the screening rung, store those figures at rung -1, and return
    why the trial stops there, or None when it goes on to the full evaluation.

    Successive halving by Pareto rank, asynchronously (as MO-ASHA): a candidate goes on when fewer than
    ``1/eta`` of the study's screened points lie in better non-dominated fronts than its own. Speed at
    this rung is one timed call of the screening samples against the reference's (re-timed once per
    trial, fastest kept): cheap, and comparable across the candidates of the rung. Hand-made points
    (baselines, seeds) and warm-start points are screened too, so the rung has their figures to compare
    with, and always go on.
    """
    from difftune.evaluators import LatencyOptions, evaluate

    names = _screen_metrics(job)
    measured = evaluate(
        job.pipe,
        job.samples[: job.screen],
        job.reference,
        metrics=names,
        latency=LatencyOptions(warmup=0, repeats=1, batch_size=job.screen, statistic="min", reuse_reference=True),
        call_kwargs={"num_inference_steps": profile.context.num_inference_steps},
    )
    values = _finite(measured, " on screening")
    job.store.record_metrics(trial.id, values, rung=SCREEN_RUNG)
    if trial.kind in ("baseline", "seed", "warm"):
        return None
    return _screened_out(job, trial.id, values)


def _screened_out(job: _Job, trial_id: int, values: Mapping[str, float]) -> str | None:
    """Why the candidate ``trial_id`` (screened at ``values``) stops at the screening rung, or None."""
    import numpy as np
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    from difftune.store import TrialState

    def row(key: int, screened: Mapping[str, float]) -> tuple[int, list[float], bool]:
        loss = [-screened[s.name] if s.direction == "maximize" else screened[s.name] for s in job.specs]
        feasible = all(c.violation(screened[c.metric]) <= 0 for c in job.constraints if c.metric in screened)
        return key, loss, feasible

    rows = [row(trial_id, values)]
    for t in job.store.list_trials(job.study.id, [TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING]):
        screened = t.values(rung=SCREEN_RUNG)
        if t.id != trial_id and all(s.name in screened for s in job.specs):
            rows.append(row(t.id, screened))
    eta, n = job.screen_eta, len(rows)
    if n < eta:
        return None  # too few screened points to rank against
    keep = math.ceil(n / eta)
    mine = next(r for r in rows if r[0] == trial_id)
    if not mine[2]:
        return f"screened out on {job.screen} samples: it misses a constraint there"
    feasible = [r for r in rows if r[2]]
    fronts = NonDominatedSorting().do(np.array([r[1] for r in feasible], dtype=float))
    index = [r[0] for r in feasible].index(trial_id)
    better = 0
    for front in fronts:
        if index in front:
            break
        better += len(front)
    if better < keep:
        return None
    return (
        f"screened out on {job.screen} samples: {better} of {n} screened points lie in better fronts "
        f"(the best 1/{eta}, {keep}, go on)"
    )


def _run_trials(
    job: _Job,
    progress: Callable[[RunProgress], None] | None,
    max_trials: int | None = None,
    deadline: float | None = None,
) -> int:
    """Claim and run trials until the study's budget is used up (or ``max_trials``, or the ``time.monotonic()``
    ``deadline`` passes: no trial starts after it); returns how many ran."""
    from difftune.store import TrialState

    store, study_id = job.store, job.study.id
    ran = 0
    by_name = {p.name: p for p in job.baselines}
    while max_trials is None or ran < max_trials:
        if deadline is not None and time.monotonic() >= deadline:
            finished, budget = store.count_budget_trials(study_id), store.get_study(study_id).budget
            job.notes.append(f"stopped at the time limit after {ran} trials of this run ({finished} of {budget} done)")
            break
        iteration = time.perf_counter()
        evaluated = job.timings["evaluation_s"]
        if store.interrupt_trials(study_id, grace_period=STALE_AFTER_S, alive=_worker_alive):
            _fail_dead_proposals(job)  # e.g. their Optuna trials would stay RUNNING forever
        claim = store.claim_trial(study_id, worker_id=job.worker, candidates=_candidates(job))
        if claim is None:
            break
        trial, key = claim.trial, claim.key
        config = dict(trial.config or {})
        number: int | None = None
        params: dict[str, Any] = dict(trial.params)
        point: Any = None  # the baseline's NamedPoint (its exact sections), else params are decoded
        if key is None:  # a searched point
            proposal = job.search.ask()
            number, params = proposal.number, dict(proposal.params)
            config = {"baseline": None, "searcher_number": number}
            trial = store.update_trial(trial.id, params=params, config=config)
            label = f"trial {trial.number}"
        elif config.get("baseline"):
            point = by_name.get(config["baseline"])
            label = str(config["baseline"])
            if point is None:
                raise SpaceError(f"baseline {label!r} of study {job.study.name!r} is not a baseline of its space")
        elif config.get("seed"):
            label = f"seed {config['seed']}"
        elif config.get("warm"):
            label = f"warm {config['warm']}"
        else:  # a retried searched point
            label = f"trial {trial.number} (retry of {config.get('retry_of')})"
        sections_of = functools.partial(_sections, job, params, point)
        try:
            record = _evaluate_trial(job, trial, sections_of, label)
        except BaseException:
            if number is not None:
                job.search.tell(number, None, failure="interrupted")
            raise
        values = record.values() if record.state is TrialState.COMPLETE else None
        objective_values = None if values is None else [values[s.name] for s in job.specs]
        # Optuna's convention: a point is feasible when every constraint value is <= 0.
        violations = {str(c): c.violation(values[c.metric]) for c in job.constraints if values and c.metric in values}
        if record.state is TrialState.FAILED:
            reason = record.error or "unknown"
            job.failures[reason] = job.failures.get(reason, 0) + 1
        if number is not None:
            job.search.tell(number, objective_values, constraints=violations, failure=record.error)
        elif objective_values is not None and params:
            refused = job.search.observe(params, objective_values, constraints=violations, label=label)
            if refused:  # the searcher cannot learn from it: say so rather than drop it silently
                job.notes.append(f"{label} was evaluated but not given to the searcher: {refused}")
        ran += 1
        event = None
        if progress is not None:
            finished = store.count_budget_trials(study_id)
            front = store.pareto_front(study_id, constraints=job.constraints)
            event = RunProgress(
                job.study.name,
                finished,
                int(store.get_study(study_id).budget or finished),
                len(front),
                record,
                label,
                front_hypervolume(job.specs, front),
            )
        job.timings["overhead_s"] += time.perf_counter() - iteration - (job.timings["evaluation_s"] - evaluated)
        if event is not None:
            progress(event)  # type: ignore[misc]
    return ran


def _fail_dead_proposals(job: _Job) -> None:
    """The proposals of trials whose worker died are failed in the searcher (their points are retried by
    the store)."""
    from difftune.store import TrialState

    for t in job.store.list_trials(job.study.id, TrialState.INTERRUPTED):
        config = t.config or {}
        number = config.get("searcher_number", config.get("optuna_number"))
        if number is not None:
            job.search.fail(int(number), f"interrupted: {t.error or ''}".strip())


def _restore(job: _Job) -> None:
    for reason in job.search.restore(_history(job)):
        job.notes.append(f"not given to the searcher: {reason}")


def _history(job: _Job) -> list[Any]:
    """The study's finished trials as the searcher's :class:`~difftune.search.Observation` s (a resumed
    study: a searcher without storage of its own learns them again)."""
    from difftune.search._base import Observation
    from difftune.store import TrialState

    out = []
    # A screened-out trial is, for the searcher, a failed one: it never survives selection.
    for t in job.store.list_trials(job.study.id, [TrialState.COMPLETE, TrialState.FAILED, TrialState.PRUNED]):
        if not t.params:
            continue
        values = t.values() if t.state is TrialState.COMPLETE else {}
        if t.state is TrialState.COMPLETE and not all(s.name in values for s in job.specs):
            continue
        objective = [values[s.name] for s in job.specs] if values else None
        constraints = {str(c): c.violation(values[c.metric]) for c in job.constraints if c.metric in values}
        config = t.config or {}
        label = str(config.get("baseline") or config.get("seed") or config.get("warm") or f"trial {t.number}")
        out.append(Observation(t.params, objective, constraints, label))
    return out


def _result(job: _Job, before: int, ran: int) -> RunResult:
    from difftune.store import TrialState

    store, study_id = job.store, job.study.id
    front = store.pareto_front(study_id, constraints=job.constraints)
    study_rec = store.get_study(study_id)
    if not store.count_trials(study_id, TrialState.RUNNING):
        store.record_front(study_id, [t.id for t in front])
        # a run stopped early (a time limit, max_trials) leaves the study to be resumed, not finished
        if study_rec.budget is None or store.count_budget_trials(study_id) >= study_rec.budget:
            study_rec = store.set_study_status(study_id, "finished")
    if job.screen:
        pruned, complete = (
            store.count_trials(study_id, TrialState.PRUNED),
            store.count_trials(study_id, TrialState.COMPLETE),
        )
        job.notes.append(
            f"screening on {job.screen} of {len(job.samples)} samples: {pruned} candidates stopped there (pruned), "
            f"{complete} measured in full"
        )
    return RunResult(
        study=study_rec,
        front=front,
        objectives=job.specs,
        finished=store.count_budget_trials(study_id),
        new_trials=ran,
        failed=store.count_trials(study_id, TrialState.FAILED),
        storage=store.url,
        hypervolume=front_hypervolume(job.specs, front),
        timings=dict(job.timings),
        new_failed=sum(job.failures.values()),
        failures=dict(sorted(job.failures.items(), key=lambda kv: -kv[1])),
        complete=store.count_trials(study_id, TrialState.COMPLETE),
        constraints=tuple(str(c) for c in job.constraints),
        notes=tuple(job.notes),
    )


def run_study(
    model: str | Any = "embedded",
    space: str | Any = "cache",
    *,
    budget: int | None = None,
    study: str | None = None,
    storage: str | None = None,
    searcher: str | None = None,
    seed: int = 0,
    num_inference_steps: int = DEFAULT_STEPS,
    samples: int = DEFAULT_SAMPLES,
    objectives: Sequence[Any] | None = None,
    constraints: Sequence[str] = (),
    latency_repeats: int = 3,
    progress: Callable[[RunProgress], None] | None = None,
    pipeline: Any = None,
    nfe_range: tuple[int, int] = DEFAULT_NFE_RANGE,
    device: str | None = None,
    dtype: str | None = None,
    revision: str | None = None,
    prompts: Sequence[str] | None = None,
    negative_prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
    guidance_scale: float | None = None,
    call_args: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
    pipeline_class: str | None = None,
    config: str | None = None,
    population: int | None = None,
    memo: bool = True,
    screen: int | None = None,
    screen_eta: int | None = None,
    reference_steps: int | None = None,
    ems: int = 0,
    on_start: Callable[[Any], None] | None = None,
    stack_from: Sequence[str] = (),
    warm_start: Sequence[WarmPoint] = (),
    time_limit_s: float | None = None,
) -> RunResult:
    """Run or resume a study until the store holds ``budget`` finished trials, then record its front.

    Args:
        model: ``"embedded"`` (default), a pipeline directory, a single-file checkpoint or a hub id in
            the local cache (:func:`difftune.load_pipeline`).
        space: a search space name (:func:`difftune.spaces.get_space`), or a configured
            :class:`~difftune.spaces.Space` instance (the study stores its name; workers rebuild the
            registered space of that name).
        budget: finished trials (complete or failed; interrupted ones are retried, not counted) the
            study must hold (default: the space's ``default_budget``); it is stored with the study, so
            :func:`run_worker` processes stop there too, and rerunning with a larger budget resumes and
            adds only the difference.
        study: the study's name (default ``"<model>-<space>"``).
        storage: a SQLAlchemy URL (default ``$DIFFTUNE_STORAGE`` or ``sqlite:///difftune.db``);
            Optuna's study lives in the same database.
        searcher: ``nsga2``, ``tpe``, ``gp`` or ``random`` (default: the space's own).
        seed: the searcher's seed.
        num_inference_steps: steps of the reference setting (and of the space's context).
        samples: calibration samples per trial.
        objectives: metric names, ``"name:min|max"`` strings or ``(name, direction)`` pairs (default
            :func:`default_objectives` of the model's family); one of them or of the constraints must
            be a guard metric (:data:`DISTRIBUTION_METRICS`).
        constraints: ``"lpips<=0.1"``-style bounds: points that miss one are infeasible for the
            searcher and kept off the front.
        latency_repeats: timed calls per side for ``latency_ms`` / ``speedup``.
        progress: called after every stored trial with a :class:`RunProgress`.
        pipeline: an already loaded pipeline to use instead of loading ``model`` (moved to ``device``
            and ``dtype`` when they are given).
        nfe_range: model evaluations the ``solver`` and ``joint`` spaces search (and their baselines' NFEs).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (default: the pipeline's own device, else
            CUDA when present, else the CPU); a device this machine lacks is an error.
        dtype: ``float32``, ``float16`` or ``bfloat16`` (default: the weights' own).
        revision: the hub revision of a hub id.
        prompts: the calibration prompts (default: the family's built-in set); class names for
            class-conditional models.
        negative_prompt, height, width, guidance_scale: the call the study tunes (default: the
            pipeline's own).
        call_args: more keyword arguments of the pipeline call (e.g. ``{"max_sequence_length": 256}``).
        batch_size: images per pipeline call (default: all ``samples`` in one call).
        pipeline_class, config: for a single-file checkpoint ``model``: its diffusers pipeline class
            and a local directory or cached hub id holding the pipeline's configs.
        population: individuals per generation of ``nsga2`` / ``pymoo-nsga2`` (default: the searcher's,
            which for pymoo-nsga2 depends on ``budget``); chosen when the study is created, kept on resume.
        memo: reuse the figures of an earlier complete trial — of any study in the store — that applied
            the same profile in the same context (model weights, device, dtype, call, samples, metrics,
            timing, library versions) instead of measuring it again (:func:`memo_key`); False measures
            every trial.
        screen: multi-fidelity: measure every candidate first on this many calibration samples and only
            the best ``1/screen_eta`` by Pareto rank there in full (:func:`_screen`); 0: off; None: the
            space's ``default_screen`` (4 for ``ecad``, 0 for the others). Chosen when the study is
            created, kept on resume.
        screen_eta: the reduction factor of that screening (default 3).
        reference_steps: compare trials' images with the plain pipeline at this many steps (e.g. 200, near the
            exact ODE solution) instead of at ``num_inference_steps``; speedups stay relative to the plain
            pipeline at ``num_inference_steps``. Chosen when the study is created, kept on resume.
        ems: ``solver`` space only: compute DPM-Solver-v3's empirical model statistics from this many
            trajectories (:func:`difftune.search.ems.compute_ems`; cached per model and call) and offer
            the ``v3`` prediction; 0 (default): off. Chosen when the study is created, kept on resume.
        on_start: called with the resolved :class:`~difftune.search.settings.StudySettings` once the
            inputs are checked, before any trial runs (the CLI prints the device).
        stack_from: ``joint`` space only: names of ``solver`` / ``cache`` / ``sada`` / ``quant`` studies of
            the same model in this store; their best points per PSNR floor are stacked into joint
            points and evaluated as baselines ``stack_psnrF`` (:mod:`difftune.search.stack`). They
            count against the budget like every baseline; a stack already stored is not run again.
        warm_start: points of an earlier study of the same model and space (:class:`WarmPoint`), measured
            first as trials of kind ``warm`` and given to the searcher; they count against the budget.
            A point the space cannot decode fails as its own trial, like any other.
        time_limit_s: start no trial after this many seconds (the running one finishes); the study stays
            resumable with its budget, and the result's notes say where it stopped.

    Raises:
        DifftuneError: bad input (unknown model, space, searcher or metric; a metric this model
            cannot have; a device this machine lacks; a probe call that fails or draws NaN; a bad
            storage URL), raised before anything is written to the database.
    """
    from difftune.search.settings import StudySettings, merge_objectives, resolve_device

    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise SpaceError(f"budget: expected an integer >= 1, got {budget!r}")
    if time_limit_s is not None and not (isinstance(time_limit_s, (int, float)) and time_limit_s > 0):
        raise DifftuneError(f"time_limit_s: expected a number of seconds > 0, got {time_limit_s!r}")
    deadline = None if time_limit_s is None else time.monotonic() + float(time_limit_s)
    lo, hi = nfe_range
    if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
        raise SpaceError(f"nfe_range: expected integers 1 <= low <= high, got {nfe_range!r}")

    # ---- check every input before touching the database -----------------------------------------
    from difftune.evaluators import metric_spec
    from difftune.spaces import get_space
    from difftune.store import parse_constraint

    if isinstance(space, str):
        space_obj = get_space(space)
    else:  # a configured Space instance (e.g. a benchmark's variant); the study stores its name
        space_obj, space = space, str(space.name)
    if budget is None:
        budget = space_obj.default_budget
    searcher_name = searcher or space_obj.default_searcher
    _check_searcher(searcher_name)
    asked_population = population
    population = _population(searcher_name, population, budget)
    bounds = tuple(parse_constraint(c) for c in constraints)
    for c in bounds:
        metric_spec(c.metric)
    requested = merge_objectives(objectives) if objectives is not None else None
    if requested is not None:
        for s in _objective_specs(requested, [str(c) for c in bounds]):
            metric_spec(s.name)  # a metric the evaluators cannot measure is bad input too
    settings = StudySettings(
        model=_model_spec(model),
        revision=revision,
        pipeline_class=pipeline_class,
        config=_model_spec(config) if config is not None else None,
        device=resolve_device(device, pipeline),
        dtype=dtype,
        prompts=tuple(prompts) if prompts is not None else None,
        negative_prompt=negative_prompt,
        height=height,
        width=width,
        guidance_scale=guidance_scale,
        call_args=dict(call_args or {}),
        num_inference_steps=num_inference_steps,
        samples=samples,
        batch_size=batch_size,
        constraints=tuple(str(c) for c in bounds),
        nfe_range=(lo, hi),
        latency_repeats=latency_repeats,
        population=population,
        screen=_screen_samples(space_obj, screen, samples),
        screen_eta=3 if screen_eta is None else screen_eta,
        reference_steps=reference_steps,
        ems=ems,
    )
    if settings.ems and not getattr(space_obj, "uses_ems", False):
        raise SpaceError(f"ems: DPM-Solver-v3's statistics are for the solver space, not {space!r}; drop --ems")
    pipe, info = _prepare_pipeline(settings, pipeline)
    chosen_objectives: Sequence[Any] = (
        requested
        if requested is not None
        else (space_obj.default_objectives(info.family) or default_objectives(info.family))
    )
    specs = _objective_specs(chosen_objectives, settings.constraints)
    _validate(settings, specs, bounds, pipe, info)
    model_name = settings.model if isinstance(model, str) else info.name
    measured, skipped = _metric_names(specs, bounds, pipe, info)
    settings = dataclasses.replace(settings, model=model_name, metrics=tuple(measured))
    study_name = study or default_study_name(model_name, space)

    from difftune.store import default_url, get_store

    store = get_store(storage or default_url())
    try:
        if stack_from:
            from difftune.search.stack import check_stack_sources

            if not hasattr(space_obj, "stack"):
                raise SpaceError(f"--stack-from: only the joint space stacks other studies' points, not {space!r}")
            check_stack_sources(store, list(stack_from), info.fingerprint)
        model_rec = store.create_model(model_name, info.family, info.fingerprint)
        study_rec = store.create_study(
            study_name,
            model_id=model_rec.id,
            space=space,
            searcher=searcher_name,
            objectives=specs,
            reference=settings.to_dict(),
            optuna_study_name=f"difftune:{study_name}",
            load_if_exists=True,
        )
        stored = StudySettings.from_dict(study_rec.reference or {})
        changed = stored.differences(settings)
        if asked_population is not None and stored.population != asked_population:
            changed["population"] = (stored.population, asked_population)
        for name, asked in (("screen", screen), ("screen_eta", screen_eta)):
            if asked is not None and getattr(stored, name) != asked:
                changed[name] = (getattr(stored, name), asked)
        if changed:
            detail = "; ".join(f"{k} {old!r} (asked {new!r})" for k, (old, new) in changed.items())
            raise StoreError(
                f"cannot resume study {study_name!r}: it was created with {detail}; choose another --study"
            )
        # A resumed study keeps what it measures; this run's device index and repeats are its own.
        run_settings = dataclasses.replace(stored, device=settings.device, latency_repeats=latency_repeats)
        if on_start is not None:
            shown = dataclasses.replace(
                run_settings, dtype=run_settings.dtype or _dtype_name(pipe), extra={"not_measured": skipped}
            )
            on_start(shown)
        store.set_study_budget(study_rec.id, budget)
        study_rec = store.set_study_status(study_rec.id, "running")
        job = _job(
            store,
            study_rec,
            pipe,
            space_obj,
            specs,
            searcher_name=searcher_name,
            seed=seed,
            settings=run_settings,
            memo=memo,
        )
        if stack_from:
            from difftune.search.stack import stacked_points

            found = stacked_points(store, space_obj, job.context, list(stack_from), fingerprint=info.fingerprint)
            job.baselines = [*job.baselines, *found]
        job.warm = list(warm_start)
        _restore(job)
        _fail_dead_proposals(job)
        before = store.count_budget_trials(study_rec.id)
        ran = _run_trials(job, progress, deadline=deadline)
        return _result(job, before, ran)
    finally:
        store.close()


def _dtype_name(pipe: Any) -> str | None:
    dtype = getattr(pipe, "dtype", None)
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _model_spec(model: Any) -> str:
    """The model as stored: a local path made absolute (workers and exports may run elsewhere), else as given."""
    from pathlib import Path

    if not isinstance(model, (str, os.PathLike)):
        return ""
    text = os.fspath(model)
    if text != "embedded" and Path(text).expanduser().exists():
        return str(Path(text).expanduser().resolve())
    return text


def study_settings(study_rec: Any) -> Any:
    """The :class:`~difftune.search.settings.StudySettings` stored with ``study_rec``.

    Raises:
        StoreError: the study was not made by ``difftune calibrate`` (it has no settings).
    """
    from difftune.search.settings import StudySettings

    stored = dict(study_rec.reference or {})
    if not {"model", "num_inference_steps", "samples", "metrics"} <= set(stored):
        raise StoreError(f"study {study_rec.name!r} was not created by difftune calibrate; it has no settings")
    return StudySettings.from_dict(stored)


def worker_device(settings: Any, requested: str | None, study: str) -> str:
    """The device a worker of ``study`` runs on: ``requested``, else the study's device type here.

    Raises:
        ModelError: the device type differs from the study's (timings would not compare), or this
            machine lacks it.
    """
    from difftune.errors import ModelError
    from difftune.search.settings import device_type, resolve_device

    wanted = device_type(settings.device)
    if requested is not None and device_type(requested) != wanted:
        raise ModelError(
            f"study {study!r} measures on {wanted}; a worker on {requested} would time trials that do not compare "
            f"with its others: run this worker on a {wanted} machine (or with --device {wanted})"
        )
    try:
        return resolve_device(requested or (settings.device if wanted != "cpu" else "cpu"))
    except ModelError as exc:
        raise ModelError(
            f"study {study!r} measures on {settings.device}, which this machine lacks ({exc}); timings from "
            "another kind of device would not compare"
        ) from None


def run_worker(
    study: str,
    storage: str | None = None,
    *,
    progress: Callable[[RunProgress], None] | None = None,
    pipeline: Any = None,
    seed: int | None = None,
    max_trials: int | None = None,
    device: str | None = None,
    on_start: Callable[[Any], None] | None = None,
) -> RunResult:
    """Join a study that ``calibrate`` created: claim and run its trials until its budget is used up.

    The model, device type, dtype, call, space, searcher, objectives and calibration settings come from
    the study; several workers (processes or machines sharing the database) never run more trials than
    the budget, and each baseline and each retry of an interrupted trial runs once.

    Args:
        study: the study's name.
        storage: its database URL (default ``$DIFFTUNE_STORAGE`` or ``sqlite:///difftune.db``).
        progress: called after every stored trial.
        pipeline: an already loaded pipeline of the study's model (its fingerprint is checked).
        seed: the sampler's seed (default: random, so that workers propose different points).
        max_trials: stop after this many trials even if the budget is not used up.
        device: this worker's device (e.g. ``cuda:1``); its type must be the study's.
        on_start: called with the worker's settings before any trial runs.
    """
    from difftune.errors import ModelError
    from difftune.spaces import get_space
    from difftune.store import default_url, get_store

    store = get_store(storage or default_url())
    try:
        study_rec = store.get_study(study)
        stored = study_settings(study_rec)
        settings = dataclasses.replace(stored, device=worker_device(stored, device, study))
        space_obj = get_space(study_rec.space)
        specs = tuple(study_rec.objectives)
        pipe, info = _prepare_pipeline(settings, pipeline)
        model_rec = store.get_model(study_rec.model_id)
        if info.fingerprint != model_rec.fingerprint:
            raise ModelError(
                f"the weights of {settings.model!r} here differ from the ones study {study!r} was calibrated on "
                f"(fingerprint {info.fingerprint[:19]}… vs {model_rec.fingerprint[:19]}…); give the same model"
            )
        if on_start is not None:
            on_start(dataclasses.replace(settings, dtype=settings.dtype or _dtype_name(pipe)))
        job = _job(
            store, study_rec, pipe, space_obj, specs, searcher_name=study_rec.searcher, seed=seed, settings=settings
        )
        _restore(job)
        before = store.count_budget_trials(study_rec.id)
        ran = _run_trials(job, progress, max_trials=max_trials)
        return _result(job, before, ran)
    finally:
        store.close()
