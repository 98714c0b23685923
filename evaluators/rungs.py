"""Multi-fidelity rungs: evaluate every trial cheaply first, the promising ones on more samples.

A rung is a prefix of the calibration set (samples are seed-major, so a prefix covers the
conditions evenly, and the reference images of a smaller rung are reused by the larger one), the
metrics to compute there, and whether to time the trial. Which trials go up a rung is the
searcher's decision (successive halving, Hyperband, ASHA); this module only describes the rungs::

    >>> rungs = make_rungs(8, 32)
    >>> [r.n_samples for r in rungs], rungs[0].measure_latency
    ([8, 32], False)
    >>> first = rungs[0]
    >>> metrics = evaluate(pipe, first.select(calibration_set), reference, metrics=first.metrics)  # doctest: +SKIP

Compare values only within one rung: FID in particular is biased by the sample count.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from difftune.errors import EvaluationError

__all__ = ["DEFAULT_RUNGS", "Rung", "check_rungs", "make_rungs"]

T = TypeVar("T")


@dataclass(frozen=True)
class Rung:
    """One fidelity level.

    Attributes:
        n_samples: how many samples (a prefix of the calibration set) this rung evaluates.
        metrics: the metric names computed here, or None for the study's metrics.
        measure_latency: time the trial at this rung (timing is the costly part on big models;
            cheap rungs usually skip it and rely on ``nfe`` / ``flops_ratio``).
    """

    n_samples: int
    metrics: tuple[str, ...] | None = None
    measure_latency: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.n_samples, bool) or not isinstance(self.n_samples, int) or self.n_samples < 1:
            raise EvaluationError(f"Rung.n_samples must be a positive integer, got {self.n_samples!r}")
        if self.metrics is not None:
            from .metrics import metric_spec

            object.__setattr__(self, "metrics", tuple(self.metrics))
            for name in self.metrics:
                metric_spec(name)

    def select(self, samples: Sequence[T]) -> list[T]:
        """The first :attr:`n_samples` of ``samples``; fewer available is an error."""
        if len(samples) < self.n_samples:
            raise EvaluationError(f"this rung evaluates {self.n_samples} samples but the set holds only {len(samples)}")
        return list(samples[: self.n_samples])


def check_rungs(rungs: Sequence[Rung]) -> tuple[Rung, ...]:
    """``rungs`` as a tuple, after checking that their sample counts strictly increase."""
    out = tuple(rungs)
    if not out:
        raise EvaluationError("at least one rung is needed")
    counts = [r.n_samples for r in out]
    if any(b <= a for a, b in itertools.pairwise(counts)):
        raise EvaluationError(f"rung sample counts must strictly increase, got {counts}")
    return out


def make_rungs(*n_samples: int, metrics: Sequence[str] | None = None) -> tuple[Rung, ...]:
    """Rungs of the given sizes; all but the last skip latency."""
    chosen = tuple(metrics) if metrics is not None else None
    return check_rungs([Rung(n, chosen, measure_latency=(i == len(n_samples) - 1)) for i, n in enumerate(n_samples)])


#: 8 samples without timing, then 32 with it.
DEFAULT_RUNGS: tuple[Rung, ...] = make_rungs(8, 32)
