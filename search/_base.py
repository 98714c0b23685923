"""The one interface every searcher speaks: ask for a point, tell its outcome, observe points evaluated elsewhere.

The study runner never calls ``study.optimize`` or ``pymoo.minimize`` and never checks which library is
behind a searcher: it builds one with :func:`make_searcher` from the space's variables, asks for a
point, hands it to an evaluation that may run in another process and fail on its own, and tells the
searcher what came back::

    searcher = make_searcher("nsga2", space.variables(context), ["maximize", "maximize"], seed=0)
    searcher.restore(finished_trials)          # resume: what the study already measured
    searcher.observe(baseline_params, values)  # a hand-made point evaluated outside ask/tell
    proposal = searcher.ask()
    searcher.tell(proposal.number, values, constraints={"lpips<=0.1": 0.0})
    searcher.fail(other.number, "interrupted")  # a proposal that will never be told (its worker died)

Implementations: Optuna's samplers (:mod:`difftune.search.optuna_searcher`), pymoo's algorithms through
their own ask/tell (:mod:`difftune.search.pymoo_searcher`), USF's evolution (:mod:`difftune.search.evo`)
and S³'s predictor-guided search (:mod:`difftune.search.s3`). Searchers are registered by name; an
unknown name lists the known ones.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from difftune.errors import SpaceError

__all__ = [
    "Observation",
    "Proposal",
    "Searcher",
    "get_searcher_class",
    "make_searcher",
    "register_searcher",
    "searchers",
]


@dataclass(frozen=True)
class Proposal:
    """A point to evaluate: ``number`` identifies it when telling the outcome."""

    number: int
    params: Mapping[str, Any]
    #: Set when the point is a seeded baseline rather than one the sampler proposed.
    baseline: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Observation:
    """A finished point the searcher should know of (:meth:`Searcher.restore`): ``values`` None when it failed."""

    params: Mapping[str, Any]
    values: Sequence[float] | None
    constraints: Mapping[str, float] = field(default_factory=dict)
    label: str | None = None


class Searcher(abc.ABC):
    """Ask/tell search over a space's variables, for one or several objectives.

    Build one with :func:`make_searcher`; implementations take ``(variables, directions, *, seed,
    storage, study_name, **options)``. ``storage`` / ``study_name`` name where a searcher that keeps
    its own state (Optuna's RDB storage) keeps it; one that does not is rebuilt by :meth:`restore`.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def ask(self) -> Proposal:
        """The next point to evaluate."""

    @abc.abstractmethod
    def tell(
        self,
        number: int,
        values: Sequence[float] | None,
        *,
        constraints: Mapping[str, float] | None = None,
        failure: str | None = None,
    ) -> None:
        """Report a finished point: its objective values, or ``None`` (or non-finite values) with a
        ``failure`` reason. ``constraints`` are ``name → value`` with the point feasible when every
        value is ≤ 0."""

    @abc.abstractmethod
    def observe(
        self,
        params: Mapping[str, Any],
        values: Sequence[float],
        *,
        constraints: Mapping[str, float] | None = None,
        label: str | None = None,
    ) -> str | None:
        """Learn from a point evaluated outside ask/tell (a baseline, a seed, a memoised result).

        Returns None when the searcher took it, else why it could not (a non-finite value, a parameter
        outside the searched ranges): the caller reports it.
        """

    def fail(self, number: int, reason: str) -> None:  # noqa: B027  (optional: a no-op by default)
        """A proposal that will never be told (its worker died): forget it, or count it failed."""

    def restore(self, history: Sequence[Observation]) -> list[str]:
        """Learn the finished points of a resumed study; returns the reasons of those not taken.

        The default observes every complete point. A searcher whose own storage already holds them
        (Optuna's) overrides this to do nothing.
        """
        reasons = []
        for item in history:
            if item.values is None:
                continue
            reason = self.observe(item.params, item.values, constraints=item.constraints, label=item.label)
            if reason:
                reasons.append(f"{item.label or 'a stored point'}: {reason}")
        return reasons


def not_finite(values: Sequence[float]) -> str | None:
    """Why ``values`` cannot be learnt from (a NaN or infinite objective), or None."""
    if any(not math.isfinite(float(v)) for v in values):
        return f"its objective values {list(values)} are not finite"
    return None


def outside(variables: Sequence[Any], params: Mapping[str, Any]) -> str | None:
    """Why ``params`` are not a point of ``variables`` (a value outside its range), or None."""
    for variable in variables:
        if variable.name in params and not variable.contains(params[variable.name]):
            return f"its {variable.name}={params[variable.name]!r} is outside the searched range"
    return None


_SEARCHERS: dict[str, type[Searcher]] = {}
_OPTIONS: dict[str, dict[str, Any]] = {}


def register_searcher(*names: str, **options: Any) -> Callable[[type[Searcher]], type[Searcher]]:
    """Class decorator: make a searcher available under ``names`` (e.g. ``"nsga2"``, ``"tpe"``); ``options``
    are the constructor options that name implies (e.g. ``sampler="tpe"``)."""

    def decorate(cls: type[Searcher]) -> type[Searcher]:
        for name in names:
            if name in _SEARCHERS:
                raise ValueError(f"searcher {name!r} is already registered")
            _SEARCHERS[name] = cls
            _OPTIONS[name] = {key: (value(name) if callable(value) else value) for key, value in options.items()}
        return cls

    return decorate


def _load() -> None:
    import difftune.search.evo
    import difftune.search.optuna_searcher
    import difftune.search.pymoo_searcher
    import difftune.search.s3  # noqa: F401


def searchers() -> tuple[str, ...]:
    """Every registered searcher name."""
    _load()
    return tuple(sorted(_SEARCHERS))


def get_searcher_class(name: str) -> type[Searcher]:
    known = searchers()
    if name not in _SEARCHERS:
        raise SpaceError(f"unknown searcher {name!r}; known searchers: {', '.join(known)}")
    return _SEARCHERS[name]


def make_searcher(
    name: str,
    variables: Sequence[Any],
    directions: Sequence[str],
    *,
    seed: int | None = None,
    storage: Any = None,
    study_name: str | None = None,
    **options: Any,
) -> Searcher:
    """The searcher registered as ``name`` over the space's ``variables`` (:class:`~difftune.spaces.Variable`)."""
    cls: Any = get_searcher_class(name)  # implementations take (variables, directions, *, seed, storage, …)
    merged = {**_OPTIONS.get(name, {}), **options}
    searcher: Searcher = cls(
        list(variables), list(directions), seed=seed, storage=storage, study_name=study_name, **merged
    )
    return searcher
