"""The errors difftune raises on purpose. Catch :class:`DifftuneError` to catch them all."""

from __future__ import annotations

__all__ = ["DifftuneError", "EvaluationError", "ModelError", "ProfileError", "SpaceError", "StoreError"]


class DifftuneError(Exception):
    """Base of every error difftune raises on purpose; the message says what to do next."""


class ModelError(DifftuneError):
    """A model spec that cannot be loaded or described, or a bad input to a pipeline."""


class ProfileError(DifftuneError):
    """A malformed profile, or one that does not fit the pipeline it is applied to."""


class SpaceError(DifftuneError):
    """An unknown search space or a point outside it."""


class EvaluationError(DifftuneError):
    """A trial's evaluation failed (NaN, out of memory, missing metric weights)."""


class StoreError(DifftuneError):
    """The database is unreachable, malformed or does not hold what was asked for."""
