"""The one interface every searcher speaks: ask for a point, tell its outcome.

The study runner never calls ``study.optimize`` or ``pymoo.minimize``: it asks for a point, hands it
to an evaluation that may run in another process and fail on its own, and tells the searcher what
came back. Searchers are registered by name; an unknown name lists the known ones.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from difftune.errors import SpaceError

__all__ = ["Proposal", "Searcher", "get_searcher_class", "register_searcher", "searchers"]


@dataclass(frozen=True)
class Proposal:
    """A point to evaluate: ``number`` identifies it when telling the outcome."""

    number: int
    params: Mapping[str, Any]
    #: Set when the point is a seeded baseline rather than one the sampler proposed.
    baseline: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


class Searcher(abc.ABC):
    """Ask/tell search over named parameters.

    Args (common to implementations):
        distributions: parameter name → search distribution.
        directions: one of ``"minimize"`` / ``"maximize"`` per objective.
        seed: makes the proposals reproducible.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def ask(self) -> Proposal:
        """The next point to evaluate (seeded points first, in the order they were enqueued)."""

    @abc.abstractmethod
    def tell(
        self,
        number: int,
        values: Sequence[float] | None,
        *,
        constraints: Mapping[str, float] | None = None,
        failure: str | None = None,
    ) -> None:
        """Report a finished point: its objective values, or ``None`` with a ``failure`` reason.

        ``constraints`` are ``name → value`` with the point feasible when every value is ≤ 0.
        """

    @abc.abstractmethod
    def enqueue(self, params: Mapping[str, Any], baseline: str | None = None) -> None:
        """Evaluate ``params`` before any sampled point (baselines seed the search)."""


_SEARCHERS: dict[str, type[Searcher]] = {}


def register_searcher(*names: str) -> Callable[[type[Searcher]], type[Searcher]]:
    """Class decorator: make a searcher available under ``names`` (e.g. ``"nsga2"``, ``"tpe"``)."""

    def decorate(cls: type[Searcher]) -> type[Searcher]:
        for name in names:
            if name in _SEARCHERS:
                raise ValueError(f"searcher {name!r} is already registered")
            _SEARCHERS[name] = cls
        return cls

    return decorate


def searchers() -> tuple[str, ...]:
    import difftune.search.optuna_searcher  # noqa: F401  (registers its names)

    return tuple(sorted(_SEARCHERS))


def get_searcher_class(name: str) -> type[Searcher]:
    known = searchers()
    if name not in _SEARCHERS:
        raise SpaceError(f"unknown searcher {name!r}; known searchers: {', '.join(known)}")
    return _SEARCHERS[name]
