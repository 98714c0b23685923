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

import math
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from difftune.errors import DifftuneError, SpaceError

__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_OBJECTIVES",
    "DEFAULT_SAMPLES",
    "DEFAULT_STEPS",
    "DISTRIBUTION_METRICS",
    "STALE_AFTER_S",
    "RunProgress",
    "RunResult",
    "default_study_name",
    "run_study",
]

#: Finished trials of a default study: enough for the space's baselines and a first front.
DEFAULT_BUDGET = 24
#: Calibration samples per trial (the embedded model: digits 0–9 × 2 seeds).
DEFAULT_SAMPLES = 20
#: ``num_inference_steps`` of the reference setting and of every cache mask.
DEFAULT_STEPS = 20
#: Speed, fidelity to the reference, and a conditioning/distribution metric that catches blur and
#: wrong classes which PSNR alone would trade away.
DEFAULT_OBJECTIVES: tuple[tuple[str, str], ...] = (
    ("speedup", "maximize"),
    ("psnr", "maximize"),
    ("class_accuracy", "maximize"),
)
#: Seconds after which a trial still marked running (its process was killed) is stored as failed.
STALE_AFTER_S = 600.0
#: Every study keeps at least one of these as an objective.
DISTRIBUTION_METRICS = ("fid", "class_accuracy", "clip_score")
#: Measured for every trial besides the objectives (``peak_memory_mb`` only on CUDA).
EXTRA_METRICS = ("nfe", "flops_ratio", "latency_ms", "ssim", "mse", "fid", "peak_memory_mb")


@dataclass(frozen=True)
class RunProgress:
    """What the progress callback receives after each trial."""

    study: str
    finished: int
    budget: int
    front_size: int
    trial: Any  # the TrialRecord just stored
    label: str  # the baseline's name, or "trial N"


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


def default_study_name(model: str, space: str) -> str:
    """``"<model>-<space>"``, e.g. ``"embedded-cache"`` (path separators replaced)."""
    base = model.rstrip("/").replace("\\", "/").split("/")[-1] or "model"
    return f"{base}-{space}"


def _objective_specs(objectives: Sequence[Any]) -> tuple[Any, ...]:
    from difftune.store import MetricSpec

    specs = tuple(MetricSpec.parse(o) for o in objectives)
    if not specs:
        raise SpaceError("objectives: give at least one, e.g. speedup, psnr, class_accuracy")
    if not any(s.name in DISTRIBUTION_METRICS for s in specs):
        raise SpaceError(
            f"objectives {[s.name for s in specs]}: every study keeps a distribution or conditioning metric "
            f"({', '.join(DISTRIBUTION_METRICS)}) so that blurred or wrong-class points are not traded in"
        )
    return specs


def _check_searcher(name: str) -> None:
    from difftune.search._base import get_searcher_class
    from difftune.search.optuna_searcher import OptunaSearcher

    cls = get_searcher_class(name)
    if not issubclass(cls, OptunaSearcher):
        raise SpaceError(f"searcher {name!r} is not supported by the study runner yet; use nsga2, tpe, gp or random")


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


def run_study(
    model: str | Any = "embedded",
    space: str = "cache",
    *,
    budget: int = DEFAULT_BUDGET,
    study: str | None = None,
    storage: str | None = None,
    searcher: str | None = None,
    seed: int = 0,
    num_inference_steps: int = DEFAULT_STEPS,
    samples: int = DEFAULT_SAMPLES,
    objectives: Sequence[Any] = DEFAULT_OBJECTIVES,
    latency_repeats: int = 3,
    progress: Callable[[RunProgress], None] | None = None,
    pipeline: Any = None,
) -> RunResult:
    """Run or resume a study until the store holds ``budget`` finished trials, then record its front.

    Args:
        model: a model name or path for :func:`difftune.load_pipeline` (``"embedded"`` by default).
        space: a search space name (:func:`difftune.spaces.get_space`).
        budget: finished trials (complete or failed) the study must hold; rerunning with a larger
            budget resumes and adds only the difference.
        study: the study's name (default ``"<model>-<space>"``).
        storage: a SQLAlchemy URL (default ``$DIFFTUNE_STORAGE`` or ``sqlite:///difftune.db``);
            Optuna's study lives in the same database.
        searcher: ``nsga2``, ``tpe``, ``gp`` or ``random`` (default: the space's own).
        seed: the searcher's seed.
        num_inference_steps: steps of the reference setting (and of the space's context).
        samples: calibration samples per trial.
        objectives: metric names or ``(name, direction)`` pairs; one must be a distribution or
            conditioning metric (:data:`DISTRIBUTION_METRICS`).
        latency_repeats: timed calls per side for ``latency_ms`` / ``speedup``.
        progress: called after every stored trial with a :class:`RunProgress`.
        pipeline: an already loaded pipeline to use instead of loading ``model`` (it is left as found).

    Raises:
        DifftuneError: bad input (unknown model, space, searcher or metric; bad storage URL), raised
            before anything is written to the database.
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise SpaceError(f"budget: expected an integer >= 1, got {budget!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise SpaceError(f"samples: expected an integer >= 2, got {samples!r}")

    # ---- check every input before touching the database -----------------------------------------
    from difftune.spaces import get_space

    space_obj = get_space(space)
    searcher_name = searcher or space_obj.default_searcher
    _check_searcher(searcher_name)
    specs = _objective_specs(objectives)

    from difftune.evaluators import CalibrationSet, LatencyOptions, Reference, evaluate, metric_spec
    from difftune.models import describe, load_pipeline
    from difftune.profile import apply_profile
    from difftune.spaces import SpaceContext, to_profile

    for s in specs:
        metric_spec(s.name)  # a metric the evaluators cannot measure is bad input too
    pipe = pipeline if pipeline is not None else load_pipeline(model)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    info = describe(pipe)
    model_name = model if isinstance(model, str) else info.name
    context = SpaceContext.from_pipeline(pipe, num_inference_steps=num_inference_steps)
    variables = space_obj.variables(context)
    distributions = {v.name: v.to_optuna_distribution() for v in variables}
    baselines = space_obj.baselines(context)
    study_name = study or default_study_name(model_name, space)

    cal = CalibrationSet.for_pipeline(pipe, seeds=max(1, math.ceil(samples / 10)))
    chosen = list(cal)[:samples]
    names = list(dict.fromkeys([*(s.name for s in specs), *EXTRA_METRICS]))
    if info.family != "embedded":
        names = [n for n in names if n not in ("fid", "class_accuracy") or n in {s.name for s in specs}]

    # ---- the store and the Optuna study, in one database ----------------------------------------
    from difftune.search.optuna_searcher import OptunaSearcher
    from difftune.store import TrialState, default_url, get_store

    url = storage or default_url()
    store = get_store(url)
    try:
        model_rec = store.create_model(model_name, info.family, info.fingerprint)
        study_rec = store.create_study(
            study_name,
            model_id=model_rec.id,
            space=space,
            searcher=searcher_name,
            objectives=specs,
            reference={
                "model": model_name,
                "num_inference_steps": num_inference_steps,
                "samples": len(chosen),
                "metrics": names,
            },
            optuna_study_name=f"difftune:{study_name}",
            load_if_exists=True,
        )
        store.set_study_status(study_rec.id, "running")
        # A trial left running by a killed process is not counted; after a grace period it is failed.
        store.fail_stale_trials(study_rec.id, grace_period=STALE_AFTER_S)
        optuna_name = study_rec.optuna_study_name or f"difftune:{study_name}"
        search = OptunaSearcher(
            distributions,
            [s.direction for s in specs],
            sampler=searcher_name,
            seed=seed,
            storage=url,
            study_name=optuna_name,
        )

        stored = store.list_trials(study_rec.id)
        done_baselines = {
            (t.config or {}).get("baseline") for t in stored if (t.config or {}).get("baseline") is not None
        }
        direct: list[Any] = []
        for point in baselines:
            if point.name in done_baselines:
                continue
            if point.params is not None:
                search.enqueue(point.params, baseline=point.name)
            else:
                direct.append(point)

        reference = Reference.from_pipeline(pipe, num_inference_steps=num_inference_steps, batch_size=len(chosen))
        latency = LatencyOptions(warmup=1, repeats=latency_repeats)
        worker = f"{socket.gethostname()}:{os.getpid()}"
        provenance_base = {
            "study": study_name,
            "device": str(getattr(pipe, "device", "cpu")),
            "worker": worker,
            "versions": _versions(),
        }

        def one_trial(
            label: str, baseline: str | None, number: int | None, params: Mapping[str, Any], make: Any
        ) -> Any:
            """Decode/apply/evaluate one point; store it (complete or failed) and tell the searcher."""
            config: dict[str, Any] = {"baseline": baseline, "optuna_number": number}
            profile = None
            decode_error: BaseException | None = None
            try:
                sections = make()
                profile = to_profile(sections, context, name=label, provenance=provenance_base)
                config["profile"] = profile.to_dict()
            except Exception as exc:
                decode_error = exc
            trial = store.add_trial(study_rec.id, dict(params), config=config, worker_id=worker)
            try:
                if decode_error is not None:
                    raise decode_error
                assert profile is not None
                handle = apply_profile(pipe, profile)
                try:
                    measured = evaluate(
                        pipe,
                        chosen,
                        reference,
                        metrics=names,
                        latency=latency,
                        call_kwargs={"num_inference_steps": profile.context.num_inference_steps},
                    )
                finally:
                    handle.remove()
                values = {k: float(v) for k, v in measured.items() if v is not None}
                missing = [s.name for s in specs if s.name not in values]
                if missing:
                    raise DifftuneError(f"objective(s) {missing} were not measured")
            except BaseException as exc:
                reason = _reason(exc)
                if not isinstance(exc, Exception):
                    reason = f"interrupted ({reason})"
                record = store.set_trial_state(trial.id, TrialState.FAILED, error=reason)
                if number is not None:
                    search.tell(number, None, failure=reason)
                if not isinstance(exc, Exception):
                    raise
                return record
            record = store.set_trial_state(trial.id, TrialState.COMPLETE, metrics=values)
            if number is not None:
                search.tell(number, [values[s.name] for s in specs])
            return record

        before = store.count_finished_trials(study_rec.id)
        finished = before
        while finished < budget:
            if direct:
                point = direct.pop(0)
                record = one_trial(point.name, point.name, None, {}, lambda p=point: dict(p.sections))
                label = point.name
            else:
                proposal = search.ask()
                label = proposal.baseline or f"trial {proposal.number}"
                params = dict(proposal.params)
                record = one_trial(
                    label,
                    proposal.baseline,
                    proposal.number,
                    params,
                    lambda p=params: space_obj.decode(p, context),
                )
            finished = store.count_finished_trials(study_rec.id)
            if progress is not None:
                front_size = len(store.pareto_front(study_rec.id))
                progress(RunProgress(study_name, finished, budget, front_size, record, label))

        front = store.pareto_front(study_rec.id)
        store.record_front(study_rec.id, [t.id for t in front])
        study_rec = store.set_study_status(study_rec.id, "finished")
        failed = store.count_trials(study_rec.id, TrialState.FAILED)
        return RunResult(
            study=study_rec,
            front=front,
            objectives=specs,
            finished=finished,
            new_trials=finished - before,
            failed=failed,
            storage=store.url,
        )
    finally:
        store.close()
