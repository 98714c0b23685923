"""Optuna behind the ask/tell interface: NSGA-II (default for several objectives), TPE, GP, random.

The Optuna study may live in difftune's own database (an RDB storage URL), so that several workers
share it and optuna-dashboard can open it too; it then holds the study's history itself, and
:meth:`OptunaSearcher.restore` has nothing to replay.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from difftune.errors import SpaceError
from difftune.search._base import Observation, Proposal, Searcher, not_finite, register_searcher

__all__ = ["OptunaSearcher", "make_sampler"]

SAMPLERS = ("nsga2", "tpe", "gp", "random")


def make_sampler(name: str, seed: int | None, n_objectives: int, population_size: int | None = None) -> Any:
    """The Optuna sampler behind a difftune searcher name."""
    import optuna

    if name == "nsga2":
        kwargs: dict[str, Any] = {"seed": seed}
        if population_size:
            kwargs["population_size"] = population_size
        return optuna.samplers.NSGAIISampler(**kwargs)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise SpaceError(f"unknown Optuna sampler {name!r}; known: {', '.join(SAMPLERS)}")


def _in_range(distribution: Any, value: Any) -> bool:
    """Whether ``value`` lies in ``distribution`` (Optuna's public attributes; its own check is private)."""
    import optuna.distributions as d

    if isinstance(distribution, d.CategoricalDistribution):
        return value in distribution.choices
    if isinstance(distribution, (d.FloatDistribution, d.IntDistribution)):
        try:
            number = float(value)
        except (TypeError, ValueError):
            return False
        if not math.isfinite(number) or not distribution.low <= number <= distribution.high:
            return False
        step = distribution.step
        if step is None:
            return True
        offset = (number - distribution.low) / step
        return abs(offset - round(offset)) < 1e-8
    return True


@register_searcher(*SAMPLERS, sampler=lambda name: name)
class OptunaSearcher(Searcher):
    """An Optuna study driven by ask/tell.

    Args:
        variables: the space's :class:`~difftune.spaces.Variable` s, or a mapping of parameter name →
            ``optuna.distributions.BaseDistribution``.
        directions: ``"minimize"`` / ``"maximize"`` per objective.
        sampler: one of ``nsga2``, ``tpe``, ``gp``, ``random``.
        seed: sampler seed.
        storage: an Optuna storage URL or object (``None``: in memory).
        study_name: the Optuna study's name; an existing one is resumed.
        population_size: NSGA-II's generation size.
    """

    name = "optuna"

    def __init__(
        self,
        variables: Sequence[Any] | Mapping[str, Any],
        directions: Sequence[str],
        *,
        sampler: str = "nsga2",
        seed: int | None = None,
        storage: Any = None,
        study_name: str | None = None,
        population_size: int | None = None,
    ):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if isinstance(variables, Mapping):
            distributions = dict(variables)
        else:
            distributions = {v.name: v.to_optuna_distribution() for v in variables}
        self.distributions = distributions
        self.directions = list(directions)
        self.sampler_name = sampler
        self.study = optuna.create_study(
            storage=storage,
            study_name=study_name,
            directions=self.directions,  # type: ignore[arg-type]
            sampler=make_sampler(sampler, seed, len(self.directions), population_size),
            load_if_exists=True,
        )
        self._open: dict[int, Any] = {}

    def enqueue(self, params: Mapping[str, Any], baseline: str | None = None) -> None:
        attrs = {"difftune:baseline": baseline} if baseline else None
        self.study.enqueue_trial(dict(params), user_attrs=attrs, skip_if_exists=True)

    def observe(
        self,
        params: Mapping[str, Any],
        values: Sequence[float],
        *,
        constraints: Mapping[str, float] | None = None,
        label: str | None = None,
    ) -> str | None:
        """Add a point evaluated outside ask/tell to the Optuna study (a baseline, a seed, a retry).

        For NSGA-II the point joins generation 0, so that baselines are parents of the first children.
        """
        import optuna

        reason = not_finite(values)
        if reason:
            return reason
        dists = {k: self.distributions[k] for k in params if k in self.distributions}
        clean = {k: params[k] for k in dists}
        for name, dist in dists.items():
            if not _in_range(dist, clean[name]):
                return f"its {name}={clean[name]!r} is outside the searched range {dist}"
        # Optuna's own key for a trial's constraints (what Trial.set_constraint writes).
        system_attrs: dict[str, Any] = {f"constraints:{k}": float(v) for k, v in (constraints or {}).items()}
        if isinstance(self.study.sampler, optuna.samplers.NSGAIISampler):
            system_attrs[f"{type(self.study.sampler).__name__}:generation"] = 0
        self.study.add_trial(
            optuna.trial.create_trial(
                params=clean,
                distributions=dists,
                values=[float(v) for v in values],
                user_attrs={"difftune:baseline": label} if label else None,
                system_attrs=system_attrs or None,
            )
        )
        return None

    def restore(self, history: Sequence[Observation]) -> list[str]:
        """Nothing to replay when the Optuna study already holds trials (its storage is the study's database)."""
        if self.study.trials:
            return []
        return super().restore(history)

    def fail(self, number: int, reason: str) -> None:
        """Mark trial ``number`` failed if it is still running (its worker was killed)."""
        import optuna

        trials = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if any(t.number == number for t in trials):
            try:
                self.study.tell(number, state=optuna.trial.TrialState.FAIL)
            except (RuntimeError, ValueError):
                pass  # another worker told it in the meantime

    def ask(self) -> Proposal:
        trial = self.study.ask(self.distributions)
        self._open[trial.number] = trial
        params = {name: trial.params[name] for name in self.distributions if name in trial.params}
        baseline = trial.user_attrs.get("difftune:baseline")
        return Proposal(number=trial.number, params=params, baseline=baseline)

    def tell(
        self,
        number: int,
        values: Sequence[float] | None,
        *,
        constraints: Mapping[str, float] | None = None,
        failure: str | None = None,
    ) -> None:
        import optuna

        trial = self._open.pop(number, None)
        target: Any = trial if trial is not None else number
        if trial is not None:
            for key, value in (constraints or {}).items():
                trial.set_constraint(key, float(value))
            if failure:
                trial.set_user_attr("difftune:failure", failure[:2000])
        if values is None or any(not math.isfinite(float(v)) for v in values):
            self.study.tell(target, state=optuna.trial.TrialState.FAIL)
            return
        self.study.tell(target, [float(v) for v in values])
